//! Plans: what a backend executes. A plan is a straight-line list of operations over numbered
//! values, with named inputs fed at each call, named persistent tensors (parameters and
//! optimizer state) read from a store, named outputs, and updates written back to the store.
//! A [`Program`] holds a model's parameters and states and its plans (training step, optimizer
//! step, evaluation, generation). The compiler produces programs; the CPU reference and the GPU
//! executor run them.

use crate::{Init, Op, OpError, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Index of a value in [`Plan::values`].
pub type ValueId = u32;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// The spec text this step comes from (the layer it belongs to), for errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<SourceSpan>,
}

/// A byte range of one file of the spec a program was built from (files numbered in the order
/// the spec's `extends` chain was read, as [`crate::run::SpecSource`] keeps them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceSpan {
    pub file: u32,
    pub start: u32,
    pub end: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    /// The type of every value; `B` and `T` are bound at each call.
    pub values: Vec<TensorType>,
    /// Fed by the caller at each call.
    pub inputs: Vec<(String, ValueId)>,
    /// Read from the store: parameters and states.
    pub persistent: Vec<(String, ValueId)>,
    pub steps: Vec<Step>,
    pub outputs: Vec<(String, ValueId)>,
    /// Written back to the store after the call.
    pub updates: Vec<(String, ValueId)>,
}

/// A trained tensor and how it starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub ty: TensorType,
    pub init: Init,
}

/// A persistent tensor that is not trained; it starts at zero.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateSpec {
    pub name: String,
    pub ty: TensorType,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub model: String,
    pub params: Vec<ParamSpec>,
    pub states: Vec<StateSpec>,
    pub plans: BTreeMap<String, Plan>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlanError(pub String);

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

impl Program {
    /// This program with Self-Extend on every full-attention layer with RoPE in its inference
    /// plans (the training and evaluation steps keep plain attention): what the compiler builds
    /// from a model with Self-Extend, for a bundle that was built without. An error where no
    /// layer takes it.
    pub fn with_self_extend(mut self, se: crate::op::SelfExtend) -> Result<Program, String> {
        if se.neighbours < 1 || se.group < 1 {
            return Err("Self-Extend needs a neighbour window and a group size of at least 1".into());
        }
        let mut any = false;
        for (name, plan) in self.plans.iter_mut() {
            if matches!(name.as_str(), "train_step" | "optimizer_step" | "eval") {
                continue;
            }
            for step in &mut plan.steps {
                let attrs = match &mut step.op {
                    Op::Attention(a) => a,
                    Op::AttentionCache { attrs, .. } | Op::AttentionDecode { attrs, .. } => attrs,
                    _ => continue,
                };
                if attrs.window.is_none() && attrs.rope.is_some() {
                    attrs.self_extend = Some(se);
                    any = true;
                }
            }
        }
        if !any {
            return Err(format!("`{}` has no full-attention layer with RoPE for Self-Extend to extend", self.model));
        }
        Ok(self)
    }

    /// The vocabulary: rows of the embedding table (`embed.weight`).
    pub fn vocab(&self) -> Option<usize> {
        let p = self.params.iter().find(|p| p.name == "embed.weight")?;
        p.ty.shape.as_fixed().and_then(|s| s.first().map(|&n| n as usize))
    }
}

impl Plan {
    /// The value of the output named `name`.
    pub fn output(&self, name: &str) -> Option<ValueId> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The type of the input named `name`.
    pub fn input_type(&self, name: &str) -> Option<&TensorType> {
        self.inputs.iter().find(|(n, _)| n == name).map(|(_, v)| &self.values[*v as usize])
    }

    /// Checks that every value is defined once before use and every step type-checks: a plan
    /// read from disk is not trusted.
    pub fn validate(&self) -> Result<(), PlanError> {
        let fail = |m: String| Err(PlanError(format!("plan `{}`: {m}", self.name)));
        let n = self.values.len();
        let mut defined = vec![false; n];
        let name = &self.name;
        let define = |defined: &mut Vec<bool>, v: ValueId, what: &str| -> Result<(), PlanError> {
            match defined.get_mut(v as usize) {
                Some(d) if !*d => {
                    *d = true;
                    Ok(())
                }
                Some(_) => Err(PlanError(format!("plan `{name}`: value {v} ({what}) is defined twice"))),
                None => Err(PlanError(format!("plan `{name}`: value {v} ({what}) is out of range"))),
            }
        };
        for (name, v) in self.inputs.iter().chain(&self.persistent) {
            define(&mut defined, *v, name)?;
        }
        for (i, step) in self.steps.iter().enumerate() {
            for v in &step.inputs {
                if !defined.get(*v as usize).copied().unwrap_or(false) {
                    return fail(format!("step {i} ({}) reads value {v} before it is defined", step.op.name()));
                }
            }
            let ins: Vec<&TensorType> = step.inputs.iter().map(|v| &self.values[*v as usize]).collect();
            let outs = step
                .op
                .infer(&ins)
                .map_err(|OpError(e)| PlanError(format!("plan `{}`: step {i} ({}): {e}", self.name, step.op.name())))?;
            if outs.len() != step.outputs.len()
                || outs.iter().zip(&step.outputs).any(|(t, v)| self.values.get(*v as usize) != Some(t))
            {
                return fail(format!("step {i} ({}) has outputs of the wrong type", step.op.name()));
            }
            for v in &step.outputs {
                define(&mut defined, *v, step.op.name())?;
            }
        }
        for (name, v) in self.outputs.iter().chain(&self.updates) {
            if !defined.get(*v as usize).copied().unwrap_or(false) {
                return fail(format!("`{name}` refers to undefined value {v}"));
            }
        }
        Ok(())
    }

    /// For each value, the index of the last step that reads it (`None`: only outputs or
    /// updates read it, or nothing does). Executors free buffers after their last use.
    pub fn last_uses(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.values.len()];
        for (i, step) in self.steps.iter().enumerate() {
            for v in &step.inputs {
                last[*v as usize] = Some(i);
            }
        }
        last
    }
}

/// An input of a plan that holds token ids: read by an embedding, or as a loss's targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInput {
    pub name: String,
    pub vocab: usize,
    /// Targets may also be [`NO_TARGET`](crate::cpu::dense::NO_TARGET) (no loss there).
    pub targets: bool,
}

impl Plan {
    /// The inputs that carry token ids, with the vocabulary each indexes.
    pub fn token_inputs(&self) -> Vec<TokenInput> {
        let mut found: Vec<TokenInput> = Vec::new();
        let input_name = |v: ValueId| self.inputs.iter().find(|(_, x)| *x == v).map(|(n, _)| n.clone());
        let rows = |v: ValueId| match self.values[v as usize].shape.0.first() {
            Some(crate::Dim::Fixed(n)) => *n as usize,
            _ => 0,
        };
        for step in &self.steps {
            let (ids, vocab, targets) = match step.op {
                Op::Embed => (step.inputs[0], rows(step.inputs[1]), false),
                Op::EmbedBackward { vocab } => (step.inputs[0], vocab as usize, false),
                Op::CrossEntropy | Op::CrossEntropyBackward => (step.inputs[2], rows(step.inputs[1]), true),
                _ => continue,
            };
            if let Some(name) = input_name(ids) {
                if !found.iter().any(|t| t.name == name) {
                    found.push(TokenInput { name, vocab, targets });
                }
            }
        }
        found
    }

    /// Refuses token ids outside the vocabulary where they enter a call, naming the input, the
    /// place and the id: every backend calls this before it runs the plan.
    pub fn check_token_ids<T>(&self, inputs: &[(String, crate::cpu::tensor::Tensor<T>)]) -> Result<(), PlanError> {
        for ti in self.token_inputs() {
            let Some((_, t)) = inputs.iter().find(|(n, _)| *n == ti.name) else { continue };
            let crate::cpu::tensor::Data::Int(ids) = &t.data else { continue };
            let check = if ti.targets { crate::cpu::dense::check_targets } else { crate::cpu::dense::check_tokens };
            if let Err(bad) = check(ids, ti.vocab) {
                let width = t.shape.last().copied().unwrap_or(1).max(1);
                let place = if t.shape.len() >= 2 {
                    format!("sequence {}, position {}", bad.position / width, bad.position % width)
                } else {
                    format!("position {}", bad.position)
                };
                let allowed = if ti.targets {
                    format!("0..{} (or {} for no target)", ti.vocab - 1, crate::cpu::dense::NO_TARGET)
                } else {
                    format!("0..{}", ti.vocab.saturating_sub(1))
                };
                return Err(PlanError(format!(
                    "plan `{}`, input `{}`: token id {} at {place} is outside the model's vocabulary of {} ids ({allowed})",
                    self.name, ti.name, bad.id, ti.vocab
                )));
            }
        }
        Ok(())
    }
}

impl Program {
    pub fn plan(&self, name: &str) -> Result<&Plan, PlanError> {
        self.plans.get(name).ok_or_else(|| {
            PlanError(format!(
                "the program has no plan `{name}` (it has: {})",
                self.plans.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Validates every plan and checks that persistent names and types match the program's.
    pub fn validate(&self) -> Result<(), PlanError> {
        let declared: std::collections::HashMap<&str, &TensorType> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), &p.ty))
            .chain(self.states.iter().map(|s| (s.name.as_str(), &s.ty)))
            .collect();
        // Each plan type-checked on its own thread; the first error in plan order is reported.
        let checked: Vec<Result<(), PlanError>> = {
            use rayon::prelude::*;
            self.plans.par_iter().map(|(_, p)| p.validate()).collect()
        };
        for (plan, checked) in self.plans.values().zip(checked) {
            checked?;
            for (name, v) in plan.persistent.iter().chain(&plan.updates) {
                let ty = declared.get(name.as_str()).copied();
                match ty {
                    Some(t) if *t == plan.values[*v as usize] => {}
                    Some(t) => {
                        return Err(PlanError(format!(
                            "plan `{}`: `{name}` is {} but the program declares {t}",
                            plan.name, plan.values[*v as usize]
                        )))
                    }
                    None => {
                        return Err(PlanError(format!(
                            "plan `{}` uses `{name}`, which the program does not declare",
                            plan.name
                        )))
                    }
                }
            }
        }
        Ok(())
    }
}
