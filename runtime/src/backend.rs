//! What the training loop and generation need from a backend: run a plan of the program, and
//! read or replace the persistent tensors. The CPU reference implements it; so will the GPU
//! executor.

use crate::cpu::exec::{run, Store};
use crate::cpu::tensor::Tensor;
use crate::plan::Program;
use std::collections::BTreeMap;

pub trait Backend {
    fn name(&self) -> &str;
    fn program(&self) -> &Program;
    /// Runs plan `plan` with the given inputs; returns its named outputs.
    fn run(&mut self, plan: &str, inputs: Vec<(String, Tensor<f32>)>) -> Result<BTreeMap<String, Tensor<f32>>, String>;
    /// Copies of the persistent tensors named.
    fn read(&self, names: &[&str]) -> Result<BTreeMap<String, Tensor<f32>>, String>;
    /// Replaces persistent tensors (shapes must match the program).
    fn write(&mut self, tensors: BTreeMap<String, Tensor<f32>>) -> Result<(), String>;
}

/// The CPU reference backend in f32.
pub struct CpuBackend {
    program: Program,
    store: Store<f32>,
}

impl CpuBackend {
    /// Parameters from the counter-based initialisation with `seed`, states at zero.
    pub fn new(program: Program, seed: u64) -> CpuBackend {
        let store = Store::init(&program, seed);
        CpuBackend { program, store }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn program(&self) -> &Program {
        &self.program
    }

    fn run(&mut self, plan: &str, inputs: Vec<(String, Tensor<f32>)>) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        let plan = self.program.plan(plan).map_err(|e| e.0)?;
        run(plan, &mut self.store, inputs).map_err(|e| e.0)
    }

    fn read(&self, names: &[&str]) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        names
            .iter()
            .map(|n| self.store.get(n).cloned().map(|t| (n.to_string(), t)).ok_or_else(|| format!("no tensor `{n}`")))
            .collect()
    }

    fn write(&mut self, tensors: BTreeMap<String, Tensor<f32>>) -> Result<(), String> {
        for (name, t) in tensors {
            match self.store.tensors.get(&name) {
                Some(old) if old.shape == t.shape => {
                    self.store.tensors.insert(name, t);
                }
                Some(old) => return Err(format!("`{name}` has shape {:?}, not {:?}", old.shape, t.shape)),
                None => return Err(format!("the model has no tensor `{name}`")),
            }
        }
        Ok(())
    }
}
