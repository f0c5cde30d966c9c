//! What the training loop and generation need from a backend: run a plan of the program, and
//! read or replace the persistent tensors. The CPU reference implements it; so will the GPU
//! executor.

use crate::cpu::exec::{run_rounded, Rounding, Store};
use crate::cpu::tensor::Tensor;
use crate::plan::Program;
use std::collections::BTreeMap;

pub trait Backend {
    fn name(&self) -> &str;
    fn program(&self) -> &Program;
    /// Runs plan `plan` with the given inputs; returns its named outputs.
    fn run(&mut self, plan: &str, inputs: Vec<(String, Tensor<f32>)>) -> Result<BTreeMap<String, Tensor<f32>>, String>;
    /// Runs plan `plan` keeping the values named in `carried` inside the backend between calls
    /// (generation's layer states): a carried input left out of `inputs` is this backend's
    /// copy of that name's output from the last call of the plan at the same batch, and
    /// carried outputs are kept, not returned. The GPU keeps them on the device, so a decode
    /// step moves only tokens in and logits out.
    fn run_carried(
        &mut self,
        plan: &str,
        inputs: Vec<(String, Tensor<f32>)>,
        carried: &[String],
    ) -> Result<BTreeMap<String, Tensor<f32>>, String>;
    /// Replaces rows `first..first + n` of the value `name` that plan `plan` carries, with the
    /// `n` sequences of `rows` (a sequence joining slot `first` of a batch of `batch`). A value
    /// not carried at `batch` sequences is first made `batch` sequences of zeros.
    fn put_carried(
        &mut self,
        plan: &str,
        name: &str,
        batch: usize,
        first: usize,
        rows: &Tensor<f32>,
    ) -> Result<(), String>;
    /// Runs plan `plan` on one sequence and puts its outputs named in `names` into row `slot`
    /// of the values plan `to` carries at `batch` sequences (a prompt's layer states joining a
    /// decode batch), instead of returning them; returns the other outputs. The GPU copies on
    /// the device.
    fn run_joining(
        &mut self,
        plan: &str,
        inputs: Vec<(String, Tensor<f32>)>,
        names: &[String],
        to: &str,
        batch: usize,
        slot: usize,
    ) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        let mut out = self.run(plan, inputs)?;
        for n in names {
            let rows = out.remove(n).ok_or_else(|| format!("plan `{plan}` gives no `{n}`"))?;
            self.put_carried(to, n, batch, slot, &rows)?;
        }
        Ok(out)
    }

    /// Runs plan `plan` on one sequence whose states `names` are row `from` of the values plan
    /// `to` carries at `batch` sequences, writing its outputs of those names into row `into`
    /// (a prompt's next chunk continuing the sequence there); returns the other outputs. The
    /// GPU copies on the device.
    #[allow(clippy::too_many_arguments)]
    fn run_in_slot(
        &mut self,
        plan: &str,
        inputs: Vec<(String, Tensor<f32>)>,
        names: &[String],
        to: &str,
        batch: usize,
        from: usize,
        into: usize,
    ) -> Result<BTreeMap<String, Tensor<f32>>, String>;
    /// Whether this backend can run plan `name` (a bundle may leave out plans the GPU has no
    /// kernels for).
    fn runs(&self, name: &str) -> bool {
        self.program().plan(name).is_ok()
    }
    /// The (sequences, tokens) plan `name` was built for where the backend runs plans at a
    /// planned shape (the GPU: at most that, exactly that for plans with log-probabilities);
    /// None where any shape runs (the CPU reference).
    fn plan_shape(&self, _name: &str) -> Option<(usize, usize)> {
        None
    }
    /// Sums the gradient accumulators (`grad_acc:*`) over the ranks of `group`, in rank order:
    /// after it every rank holds the whole step's gradients. Here through the host, one bucket
    /// of every accumulator end to end.
    fn all_reduce_grads(&mut self, group: &dyn crate::collective::Collective) -> Result<(), String> {
        all_reduce_grads_through_host(self, group)
    }
    /// Replaces the parameters `names` on every rank of `group` by rank `root`'s, device to
    /// device, where this backend and the group can (whether it did: else the caller goes
    /// through the host).
    fn broadcast_on_device(
        &mut self,
        _names: &[String],
        _root: usize,
        _group: &dyn crate::collective::Collective,
    ) -> Result<bool, String> {
        Ok(false)
    }
    /// Copies of the persistent tensors named.
    fn read(&self, names: &[&str]) -> Result<BTreeMap<String, Tensor<f32>>, String>;
    /// Replaces persistent tensors (shapes must match the program).
    fn write(&mut self, tensors: BTreeMap<String, Tensor<f32>>) -> Result<(), String>;
}

/// The gradient accumulators' names.
pub fn accumulator_names(program: &Program) -> Vec<String> {
    program.states.iter().map(|s| s.name.clone()).filter(|n| n.starts_with("grad_acc:")).collect()
}

/// [`Backend::all_reduce_grads`] through host memory (nothing to do for a world of one).
pub fn all_reduce_grads_through_host<B: Backend + ?Sized>(
    backend: &mut B,
    group: &dyn crate::collective::Collective,
) -> Result<(), String> {
    if group.world() == 1 {
        return Ok(());
    }
    let names = accumulator_names(backend.program());
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut tensors = backend.read(&refs)?;
    let mut bucket = Vec::new();
    for t in tensors.values() {
        bucket.extend_from_slice(t.reals().ok_or("a gradient accumulator holds integers")?);
    }
    group.all_reduce_f32(&mut bucket)?;
    let mut at = 0;
    for t in tensors.values_mut() {
        let r = t.reals_mut().expect("read as reals above");
        r.copy_from_slice(&bucket[at..at + r.len()]);
        at += r.len();
    }
    backend.write(tensors)
}

/// The persistent tensors of the CPU backend, in f32 (the reference) or f64 (check mode).
enum CpuStore {
    F32(Store<f32>),
    F64(Store<f64>),
}

/// The CPU reference backend: f32, or f64 in check mode (values cross the interface as f32),
/// exact or rounding to bf16 where the GPU does.
pub struct CpuBackend {
    program: Program,
    store: CpuStore,
    rounding: Rounding,
    /// [`Backend::run_carried`]'s values, by name.
    carried: BTreeMap<String, Tensor<f32>>,
}

impl CpuBackend {
    /// Parameters from the counter-based initialisation with `seed`, states at zero.
    pub fn new(program: Program, seed: u64) -> CpuBackend {
        let store = CpuStore::F32(Store::init(&program, seed));
        CpuBackend { program, store, rounding: Rounding::Exact, carried: BTreeMap::new() }
    }

    /// The same in f64: every operation computes in double precision.
    pub fn new_f64(program: Program, seed: u64) -> CpuBackend {
        let store = CpuStore::F64(Store::init(&program, seed));
        CpuBackend { program, store, rounding: Rounding::Exact, carried: BTreeMap::new() }
    }

    /// f32, rounding to bf16 where the GPU's kernels do ([`Rounding::LikeGpu`]): what the GPU
    /// check measures rounding alone against.
    pub fn new_like_gpu(program: Program, seed: u64) -> CpuBackend {
        let store = CpuStore::F32(Store::init(&program, seed));
        CpuBackend { program, store, rounding: Rounding::LikeGpu, carried: BTreeMap::new() }
    }

    fn tensor(&self, name: &str) -> Option<Tensor<f32>> {
        match &self.store {
            CpuStore::F32(s) => s.get(name).cloned(),
            CpuStore::F64(s) => s.get(name).map(|t| t.cast()),
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        match (&self.store, self.rounding) {
            (CpuStore::F32(_), Rounding::Exact) => "cpu",
            (CpuStore::F32(_), Rounding::LikeGpu) => "cpu-bf16",
            (CpuStore::F64(_), _) => "cpu-f64",
        }
    }

    fn program(&self) -> &Program {
        &self.program
    }

    fn run(&mut self, plan: &str, inputs: Vec<(String, Tensor<f32>)>) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        let plan = self.program.plan(plan).map_err(|e| e.0)?;
        plan.check_token_ids(&inputs).map_err(|e| e.0)?;
        match &mut self.store {
            CpuStore::F32(s) => run_rounded(plan, s, inputs, self.rounding, &mut |_, _, _| {}).map_err(|e| e.0),
            CpuStore::F64(s) => {
                let inputs = inputs.into_iter().map(|(n, t)| (n, t.cast())).collect();
                let out = run_rounded(plan, s, inputs, self.rounding, &mut |_, _, _| {}).map_err(|e| e.0)?;
                Ok(out.into_iter().map(|(n, t)| (n, t.cast())).collect())
            }
        }
    }

    fn run_carried(
        &mut self,
        plan: &str,
        mut inputs: Vec<(String, Tensor<f32>)>,
        carried: &[String],
    ) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        // The call's sequences: a kept value of more gives its first rows, and gets them back.
        let batch = inputs.iter().find(|(n, _)| n == "tokens").and_then(|(_, t)| t.shape.first().copied());
        for name in carried {
            if !inputs.iter().any(|(n, _)| n == name) {
                let t = self.carried.get(name).ok_or_else(|| format!("no carried `{name}`: give it the first time"))?;
                let b = batch.unwrap_or(t.shape[0]);
                if b > t.shape[0] {
                    return Err(format!("`{name}` is kept for {} sequences; this call has {b}", t.shape[0]));
                }
                inputs.push((name.clone(), rows(t, b)?));
            }
        }
        let mut out = self.run(plan, inputs)?;
        for name in carried {
            let t = out.remove(name).ok_or_else(|| format!("plan `{plan}` has no output `{name}` to carry"))?;
            match self.carried.get_mut(name) {
                Some(kept) if kept.shape[0] > t.shape[0] && kept.shape[1..] == t.shape[1..] => {
                    let src = t.reals().ok_or_else(|| format!("`{name}` holds ids"))?;
                    kept.reals_mut().ok_or_else(|| format!("`{name}` holds ids"))?[..src.len()].copy_from_slice(src);
                }
                _ => {
                    self.carried.insert(name.clone(), t);
                }
            }
        }
        Ok(out)
    }

    fn put_carried(
        &mut self,
        plan: &str,
        name: &str,
        batch: usize,
        first: usize,
        rows: &Tensor<f32>,
    ) -> Result<(), String> {
        let shape = carried_rows(self.program.plan(plan).map_err(|e| e.0)?, name, batch, first, rows)?;
        let per: usize = shape[1..].iter().product();
        let n = rows.shape[0];
        let slot = self.carried.entry(name.to_string()).or_insert_with(|| Tensor::real(vec![0], vec![]));
        // Sequences it holds stay; more are made as zeros.
        if slot.shape[1..] != shape[1..] {
            *slot = Tensor::real(shape.clone(), vec![0.0; shape.iter().product()]);
        } else if slot.shape[0] < batch {
            let mut v = slot.reals().ok_or_else(|| format!("`{name}` holds ids"))?.to_vec();
            v.resize(batch * per, 0.0);
            *slot = Tensor::real(shape.clone(), v);
        }
        let src = rows.reals().ok_or_else(|| format!("`{name}` holds ids"))?;
        let dst = slot.reals_mut().ok_or_else(|| format!("`{name}` holds ids"))?;
        dst[first * per..(first + n) * per].copy_from_slice(src);
        Ok(())
    }

    fn run_in_slot(
        &mut self,
        plan: &str,
        mut inputs: Vec<(String, Tensor<f32>)>,
        names: &[String],
        to: &str,
        batch: usize,
        from: usize,
        into: usize,
    ) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        for n in names {
            let t = self.carried.get(n).ok_or_else(|| format!("no carried `{n}`: no sequence joined yet"))?;
            if t.shape[0] != batch || from.max(into) >= batch {
                return Err(format!(
                    "`{n}` is kept for {} sequences, not rows {from} and {into} of {batch}",
                    t.shape[0]
                ));
            }
            let per: usize = t.shape[1..].iter().product();
            let v = t.reals().ok_or_else(|| format!("`{n}` holds ids"))?;
            let mut shape = t.shape.clone();
            shape[0] = 1;
            inputs.push((n.clone(), Tensor::real(shape, v[from * per..(from + 1) * per].to_vec())));
        }
        let mut out = self.run(plan, inputs)?;
        for n in names {
            let rows = out.remove(n).ok_or_else(|| format!("plan `{plan}` gives no `{n}`"))?;
            self.put_carried(to, n, batch, into, &rows)?;
        }
        Ok(out)
    }

    fn read(&self, names: &[&str]) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        names
            .iter()
            .map(|n| self.tensor(n).map(|t| (n.to_string(), t)).ok_or_else(|| format!("no tensor `{n}`")))
            .collect()
    }

    fn write(&mut self, tensors: BTreeMap<String, Tensor<f32>>) -> Result<(), String> {
        for (name, t) in tensors {
            let old = self.tensor(&name).ok_or_else(|| format!("the model has no tensor `{name}`"))?;
            if old.shape != t.shape {
                return Err(format!("`{name}` has shape {:?}, not {:?}", old.shape, t.shape));
            }
            match &mut self.store {
                CpuStore::F32(s) => {
                    s.tensors.insert(name, t);
                }
                CpuStore::F64(s) => {
                    s.tensors.insert(name, t.cast());
                }
            }
        }
        Ok(())
    }
}

/// The first `b` sequences (rows of the first dimension) of `t`.
fn rows(t: &Tensor<f32>, b: usize) -> Result<Tensor<f32>, String> {
    let per: usize = t.shape[1..].iter().product();
    let v = t.reals().ok_or("a carried value holds ids")?;
    let mut shape = t.shape.clone();
    shape[0] = b;
    Ok(Tensor::real(shape, v[..b * per].to_vec()))
}

/// Checks [`Backend::put_carried`]'s arguments against `plan`: returns the shape of the carried
/// input `name` (`[B, ...]`, only its first dimension the batch) at `batch` sequences, which
/// `rows` (`[n, ...]`) fits at rows `first..first + n`.
pub fn carried_rows(
    plan: &crate::plan::Plan,
    name: &str,
    batch: usize,
    first: usize,
    rows: &Tensor<f32>,
) -> Result<Vec<usize>, String> {
    use crate::shape::Dim;
    let ty = plan.input_type(name).ok_or_else(|| format!("plan `{}` has no input `{name}`", plan.name))?;
    let not_rows = || format!("`{name}` ({}) is not one row per sequence", ty.shape);
    let (lead, rest) = ty.shape.0.split_first().ok_or_else(not_rows)?;
    if *lead != Dim::Batch {
        return Err(not_rows());
    }
    let mut shape = vec![batch];
    for d in rest {
        match d {
            Dim::Fixed(n) => shape.push(*n as usize),
            _ => return Err(not_rows()),
        }
    }
    let n = rows.shape.first().copied().unwrap_or(0);
    if rows.shape.get(1..) != Some(&shape[1..]) || first + n > batch {
        return Err(format!("`{name}`: {:?} cannot go to rows {first}..{} of {shape:?}", rows.shape, first + n));
    }
    Ok(shape)
}
