//! The CPU executor: runs a [`Plan`] step by step against a [`Store`] of persistent tensors,
//! binding `B` and `T` from the inputs and freeing each value after its last use.

use super::attention::{attention_bwd, attention_decode, attention_fill_cache, attention_fwd, AttnDims};
use super::conv::{conv_bwd, conv_final_state, conv_fwd, conv_step, ConvDims};
use super::dense::*;
use super::elementwise::*;
use super::linear_attention::{
    gla_bwd, gla_final_state, gla_fwd, gla_step, retention_bwd, retention_final_state, retention_fwd, retention_step,
    LinDims,
};
use super::norm::*;
use super::optim::{adamw, clip_scale, learning_rate};
use super::scan::{
    selective_scan_bwd, selective_scan_final_state, selective_scan_fwd, selective_scan_step, ScanDims, ScanGrads,
};
use super::tensor::{Data, Tensor};
use super::Real;
use crate::plan::{Plan, Program};
use crate::{DType, Dim, Op, TensorType};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub struct ExecError(pub String);

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExecError {}

fn fail<T>(msg: impl Into<String>) -> Result<T, ExecError> {
    Err(ExecError(msg.into()))
}

/// The persistent tensors of a program: parameters and states, by name.
#[derive(Clone, Debug, PartialEq)]
pub struct Store<T> {
    pub tensors: BTreeMap<String, Tensor<T>>,
}

impl<T: Real> Store<T> {
    /// Parameters drawn from their initialisation rules with `seed` (the counter-based generator,
    /// so every backend starts from the same values); states at zero.
    pub fn init(program: &Program, seed: u64) -> Store<T> {
        let mut tensors = BTreeMap::new();
        for p in &program.params {
            let shape = p.ty.shape.as_fixed().unwrap_or_default();
            let values = p.init.values(seed, &p.name, &shape).into_iter().map(T::of).collect();
            tensors.insert(p.name.clone(), Tensor::real(shape.iter().map(|&d| d as usize).collect(), values));
        }
        for s in &program.states {
            let shape = s.ty.shape.as_fixed().unwrap_or_default();
            tensors.insert(s.name.clone(), Tensor::zeros(s.ty.dtype, shape.iter().map(|&d| d as usize).collect()));
        }
        Store { tensors }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor<T>> {
        self.tensors.get(name)
    }
}

/// Sizes bound to the symbolic dimensions for one call.
#[derive(Clone, Copy, Debug, Default)]
struct Bound {
    batch: Option<usize>,
    seq: Option<usize>,
}

impl Bound {
    /// Binds B and T from a caller's tensor of concrete `shape` declared as `ty`.
    fn bind(&mut self, ty: &TensorType, shape: &[usize], name: &str) -> Result<(), ExecError> {
        if ty.shape.rank() != shape.len() {
            return fail(format!("input `{name}` must have shape {}, has {shape:?}", ty.shape));
        }
        for (d, &n) in ty.shape.0.iter().zip(shape) {
            let slot = match d {
                Dim::Batch => &mut self.batch,
                Dim::Seq => &mut self.seq,
                Dim::Fixed(k) if *k as usize == n => continue,
                Dim::Fixed(k) => return fail(format!("input `{name}` must have size {k} where it has {n}")),
            };
            match *slot {
                Some(m) if m != n => return fail(format!("input `{name}`: {d} is {n} here but {m} elsewhere")),
                _ => *slot = Some(n),
            }
        }
        Ok(())
    }

    fn shape(&self, ty: &TensorType) -> Result<Vec<usize>, ExecError> {
        ty.shape
            .0
            .iter()
            .map(|d| match d {
                Dim::Batch => self.batch.ok_or_else(|| ExecError("batch size is not bound by any input".into())),
                Dim::Seq => self.seq.ok_or_else(|| ExecError("sequence length is not bound by any input".into())),
                Dim::Fixed(n) => Ok(*n as usize),
            })
            .collect()
    }
}

/// Where a CPU run rounds to bf16 besides its exact f32 (or f64) arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rounding {
    /// The reference: no rounding anywhere.
    #[default]
    Exact,
    /// Where the GPU rounds: every value a plan stores as bf16 (not the AdamW update of a
    /// parameter, which the GPU keeps in an f32 master), the tensor-core attention's operands
    /// (rotated q and k, P, dS) and the loss gradient's bf16 chunk. The GPU check measures what
    /// this rounding alone costs against f64, and allows the GPU twice that.
    LikeGpu,
}

impl Rounding {
    /// Whether step `op` of `plan` rounds its products' operands (see [`Rounding::LikeGpu`]).
    pub fn operands(self, plan: &Plan, step: &crate::plan::Step) -> bool {
        if self == Rounding::Exact {
            return false;
        }
        let bf16 = |k: usize| step.inputs.get(k).is_some_and(|&v| plan.values[v as usize].dtype == DType::BF16);
        match &step.op {
            Op::Attention(a) => a.on_tensor_cores(bf16(0) && bf16(1) && bf16(2)),
            Op::AttentionBackward(a) => a.on_tensor_cores(bf16(0) && bf16(1) && bf16(2) && bf16(5)),
            Op::CrossEntropyBackward => true,
            _ => false,
        }
    }
}

/// Runs `plan`: inputs by name, persistent tensors from `store`. Returns the named outputs and
/// writes the updates into `store` (only when the whole plan succeeded).
pub fn run<T: Real>(
    plan: &Plan,
    store: &mut Store<T>,
    inputs: Vec<(String, Tensor<T>)>,
) -> Result<BTreeMap<String, Tensor<T>>, ExecError> {
    run_observed(plan, store, inputs, &mut |_, _, _| {})
}

/// What [`run_observed`] shows after each step: its index, its inputs and its outputs.
pub type StepObserver<'a, T> = dyn FnMut(usize, &[&Tensor<T>], &[Tensor<T>]) + 'a;

/// [`run`], calling `observe` after every step (the GPU check compares each step's outputs on
/// the same inputs).
pub fn run_observed<T: Real>(
    plan: &Plan,
    store: &mut Store<T>,
    inputs: Vec<(String, Tensor<T>)>,
    observe: &mut StepObserver<'_, T>,
) -> Result<BTreeMap<String, Tensor<T>>, ExecError> {
    run_rounded(plan, store, inputs, Rounding::Exact, observe)
}

/// [`run_observed`] with the given [`Rounding`].
pub fn run_rounded<T: Real>(
    plan: &Plan,
    store: &mut Store<T>,
    inputs: Vec<(String, Tensor<T>)>,
    rounding: Rounding,
    observe: &mut StepObserver<'_, T>,
) -> Result<BTreeMap<String, Tensor<T>>, ExecError> {
    let like_gpu = rounding == Rounding::LikeGpu;
    let stored_bf16 = |v: u32| like_gpu && plan.values[v as usize].dtype == DType::BF16;
    let mut bound = Bound::default();
    let mut slots: Vec<Option<Cow<Tensor<T>>>> = vec![None; plan.values.len()];
    let mut given: BTreeMap<String, Tensor<T>> = inputs.into_iter().collect();
    for (name, v) in &plan.inputs {
        let ty = &plan.values[*v as usize];
        let Some(t) = given.remove(name) else {
            return fail(format!("plan `{}` needs input `{name}`", plan.name));
        };
        if (ty.dtype == DType::I32) != matches!(t.data, Data::Int(_)) {
            return fail(format!(
                "input `{name}` must be {}",
                if ty.dtype == DType::I32 { "token ids" } else { "real numbers" }
            ));
        }
        bound.bind(ty, &t.shape, name)?;
        slots[*v as usize] = Some(Cow::Owned(if stored_bf16(*v) { rounded(t) } else { t }));
    }
    if let Some(extra) = given.keys().next() {
        return fail(format!("plan `{}` has no input `{extra}`", plan.name));
    }
    for (name, v) in &plan.persistent {
        let Some(t) = store.tensors.get(name) else {
            return fail(format!("the store has no `{name}`"));
        };
        let want = bound.shape(&plan.values[*v as usize])?;
        if t.shape != want {
            return fail(format!("`{name}` has shape {:?} in the store, the plan needs {want:?}", t.shape));
        }
        // A bf16 parameter is read as its bf16 copy, except by AdamW, which updates the master.
        let copy = stored_bf16(*v) && plan.steps.iter().any(|s| s.inputs.contains(v) && !matches!(s.op, Op::AdamW(_)));
        slots[*v as usize] = Some(if copy { Cow::Owned(rounded(t.clone())) } else { Cow::Borrowed(t) });
    }

    let last = plan.last_uses();
    let kept: HashSet<u32> = plan.outputs.iter().chain(&plan.updates).map(|(_, v)| *v).collect();
    for (i, step) in plan.steps.iter().enumerate() {
        let outs = {
            let ins: Vec<&Tensor<T>> = step
                .inputs
                .iter()
                .map(|v| {
                    slots[*v as usize].as_deref().ok_or_else(|| ExecError(format!("value {v} was freed or never set")))
                })
                .collect::<Result<_, _>>()?;
            let shapes: Vec<Vec<usize>> =
                step.outputs.iter().map(|v| bound.shape(&plan.values[*v as usize])).collect::<Result<_, _>>()?;
            let mut outs = execute_with(&step.op, &ins, &shapes, rounding.operands(plan, step))
                .map_err(|e| ExecError(format!("step {i} ({}): {e}", step.op.name())))?;
            if !matches!(step.op, Op::AdamW(_)) {
                for (v, t) in step.outputs.iter().zip(outs.iter_mut()) {
                    if let (true, Data::Real(x)) = (stored_bf16(*v), &mut t.data) {
                        super::real::round_bf16(x);
                    }
                }
            }
            observe(i, &ins, &outs);
            outs
        };
        for (v, t) in step.outputs.iter().zip(outs) {
            slots[*v as usize] = Some(Cow::Owned(t));
        }
        for v in &step.inputs {
            if last[*v as usize] == Some(i) && !kept.contains(v) {
                slots[*v as usize] = None;
            }
        }
    }

    let take = |slots: &mut Vec<Option<Cow<Tensor<T>>>>, v: u32| -> Result<Tensor<T>, ExecError> {
        slots[v as usize].clone().map(Cow::into_owned).ok_or_else(|| ExecError(format!("value {v} is not set")))
    };
    let mut outputs = BTreeMap::new();
    for (name, v) in &plan.outputs {
        outputs.insert(name.clone(), take(&mut slots, *v)?);
    }
    let mut updates = Vec::new();
    for (name, v) in &plan.updates {
        updates.push((name.clone(), take(&mut slots, *v)?));
    }
    drop(slots);
    for (name, t) in updates {
        store.tensors.insert(name, t);
    }
    Ok(outputs)
}

fn reals<'a, T: Real>(t: &'a Tensor<T>, what: &str) -> Result<&'a [T], ExecError> {
    t.reals().ok_or_else(|| ExecError(format!("{what} must be real numbers")))
}

fn ints<'a, T: Real>(t: &'a Tensor<T>, what: &str) -> Result<&'a [i32], ExecError> {
    t.ints_ref().ok_or_else(|| ExecError(format!("{what} must be token ids")))
}

fn last_dim<T>(t: &Tensor<T>) -> usize {
    t.shape.last().copied().unwrap_or(1)
}

fn zeros<T: Real>(shape: &[usize]) -> (Vec<usize>, Vec<T>) {
    (shape.to_vec(), vec![T::zero(); shape.iter().product()])
}

/// `t` with its reals rounded to bf16.
fn rounded<T: Real>(mut t: Tensor<T>) -> Tensor<T> {
    if let Data::Real(v) = &mut t.data {
        super::real::round_bf16(v);
    }
    t
}

/// Computes one operation on host tensors; `shapes` are the concrete output shapes.
#[cfg(test)]
pub(crate) fn execute<T: Real>(
    op: &Op,
    ins: &[&Tensor<T>],
    shapes: &[Vec<usize>],
) -> Result<Vec<Tensor<T>>, ExecError> {
    execute_with(op, ins, shapes, false)
}

/// [`execute`], rounding the operands of the products where the GPU does when `bf16_operands`
/// (see [`Rounding::operands`]).
pub(crate) fn execute_with<T: Real>(
    op: &Op,
    ins: &[&Tensor<T>],
    shapes: &[Vec<usize>],
    bf16_operands: bool,
) -> Result<Vec<Tensor<T>>, ExecError> {
    let out = |i: usize| zeros::<T>(&shapes[i]);
    let r = |i: usize| reals(ins[i], op.input_names()[i]);
    let seq_dims = |t: &Tensor<T>| (t.shape[0], t.shape[1], last_dim(t));
    let mut results = Vec::new();
    let mut emit = |(shape, data): (Vec<usize>, Vec<T>)| results.push(Tensor::real(shape, data));
    match op {
        Op::Embed => {
            let tokens = ints(ins[0], "tokens")?;
            let table = r(1)?;
            let (vocab, d) = (ins[1].shape[0], ins[1].shape[1]);
            check_tokens(tokens, vocab).map_err(|e| ExecError(e.to_string()))?;
            let mut o = out(0);
            embed_fwd(d, tokens, table, &mut o.1);
            emit(o);
        }
        Op::RmsNorm { eps } => {
            let mut o = out(0);
            rms_norm_fwd(last_dim(ins[0]), *eps, r(0)?, r(1)?, &mut o.1);
            emit(o);
        }
        Op::AddRmsNorm { eps } => {
            let (mut sum, mut n) = (out(0), out(1));
            add_rms_norm_fwd(last_dim(ins[0]), *eps, r(0)?, r(1)?, r(2)?, &mut sum.1, &mut n.1);
            emit(sum);
            emit(n);
        }
        Op::RmsNormBackwardAdd { eps } => {
            let (mut gx, mut gw) = (out(0), out(1));
            rms_norm_bwd(last_dim(ins[0]), *eps, r(0)?, r(1)?, r(2)?, &mut gx.1, &mut gw.1);
            for (a, &b) in gx.1.iter_mut().zip(r(3)?) {
                *a = *a + b;
            }
            emit(gx);
            emit(gw);
        }
        Op::Add => {
            let mut o = out(0);
            add(r(0)?, r(1)?, &mut o.1);
            emit(o);
        }
        Op::MatMul => {
            let (n, k) = (ins[1].shape[0], ins[1].shape[1]);
            let m = ins[0].len() / k.max(1);
            let mut o = out(0);
            matmul_fwd(m, k, n, r(0)?, r(1)?, &mut o.1);
            emit(o);
        }
        Op::Slice { start, len } => {
            let mut o = out(0);
            slice_fwd(last_dim(ins[0]), *start as usize, *len as usize, r(0)?, &mut o.1);
            emit(o);
        }
        Op::SwiGlu => {
            let mut o = out(0);
            swiglu_fwd(r(0)?, r(1)?, &mut o.1);
            emit(o);
        }
        Op::CausalConv1dSilu => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let dims = ConvDims { batch, seq, channels, width: ins[1].shape[1] };
            let mut o = out(0);
            conv_fwd(dims, r(0)?, r(1)?, r(2)?, &mut o.1);
            emit(o);
        }
        Op::SelectiveScan => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let dims = ScanDims { batch, seq, channels, state: ins[2].shape[1] };
            let mut o = out(0);
            selective_scan_fwd(dims, r(0)?, r(1)?, r(2)?, r(3)?, r(4)?, r(5)?, r(6)?, r(7)?, &mut o.1);
            emit(o);
        }
        Op::Attention(a) => {
            let dims = AttnDims { bf16_operands, ..attn_dims(a, ins[0]) };
            let (mut o, mut lse) = (out(0), out(1));
            attention_fwd(dims, r(0)?, r(1)?, r(2)?, &mut o.1, &mut lse.1);
            emit(o);
            emit(lse);
        }
        Op::GlaGate { normalizer } => {
            let mut o = out(0);
            gla_gate_fwd(last_dim(ins[0]), *normalizer, r(0)?, r(1)?, &mut o.1);
            emit(o);
        }
        Op::Gla { heads } => {
            let dims = lin_dims(*heads, ins[0], ins[2]);
            let mut o = out(0);
            gla_fwd(dims, r(0)?, r(1)?, r(2)?, r(3)?, &mut o.1);
            emit(o);
        }
        Op::Retention { heads, rope } => {
            let dims = lin_dims(*heads, ins[0], ins[2]);
            let mut o = out(0);
            retention_fwd(dims, *rope, r(0)?, r(1)?, r(2)?, &mut o.1);
            emit(o);
        }
        Op::HeadRmsNormGate { heads, eps } => {
            let mut o = out(0);
            head_rms_norm_gate_fwd(*heads as usize, *eps, r(0)?, r(1)?, r(2)?, &mut o.1);
            emit(o);
        }
        Op::CrossEntropy => {
            let targets = ints(ins[2], "targets")?;
            let (vocab, d) = (ins[1].shape[0], ins[1].shape[1]);
            check_targets(targets, vocab).map_err(|e| ExecError(format!("target {e}")))?;
            emit((Vec::new(), vec![cross_entropy_fwd(d, vocab, r(0)?, r(1)?, targets)]));
        }
        Op::TokenLogProbs => {
            let targets = ints(ins[2], "targets")?;
            let (vocab, d) = (ins[1].shape[0], ins[1].shape[1]);
            check_targets(targets, vocab).map_err(|e| ExecError(format!("target {e}")))?;
            let mut o = out(0);
            token_logprobs(d, vocab, r(0)?, r(1)?, targets, &mut o.1);
            emit(o);
        }
        Op::Logits => {
            let (vocab, d) = (ins[1].shape[0], ins[1].shape[1]);
            let mut o = out(0);
            logits_fwd(ins[0].len() / d.max(1), d, vocab, r(0)?, r(1)?, &mut o.1);
            emit(o);
        }

        Op::EmbedBackward { .. } => {
            let tokens = ints(ins[0], "tokens")?;
            let mut o = out(0);
            let d = last_dim(ins[1]);
            check_tokens(tokens, o.1.len() / d.max(1)).map_err(|e| ExecError(e.to_string()))?;
            embed_bwd(d, tokens, r(1)?, &mut o.1);
            emit(o);
        }
        Op::RmsNormBackward { eps } => {
            let (mut gx, mut gw) = (out(0), out(1));
            rms_norm_bwd(last_dim(ins[0]), *eps, r(0)?, r(1)?, r(2)?, &mut gx.1, &mut gw.1);
            emit(gx);
            emit(gw);
        }
        Op::MatMulBackward => {
            let (n, k) = (ins[1].shape[0], ins[1].shape[1]);
            let m = ins[0].len() / k.max(1);
            let (mut gx, mut gw) = (out(0), out(1));
            matmul_bwd(m, k, n, r(0)?, r(1)?, r(2)?, &mut gx.1, &mut gw.1);
            emit(gx);
            emit(gw);
        }
        Op::SliceBackward { start, width } => {
            let mut o = out(0);
            slice_bwd(*width as usize, *start as usize, last_dim(ins[0]), r(0)?, &mut o.1);
            emit(o);
        }
        Op::SwiGluBackward => {
            let (mut ga, mut gb) = (out(0), out(1));
            swiglu_bwd(r(0)?, r(1)?, r(2)?, &mut ga.1, &mut gb.1);
            emit(ga);
            emit(gb);
        }
        Op::CausalConv1dSiluBackward => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let dims = ConvDims { batch, seq, channels, width: ins[1].shape[1] };
            let (mut gx, mut gw, mut gb) = (out(0), out(1), out(2));
            conv_bwd(dims, r(0)?, r(1)?, r(2)?, r(3)?, &mut gx.1, &mut gw.1, &mut gb.1);
            emit(gx);
            emit(gw);
            emit(gb);
        }
        Op::SelectiveScanBackward => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let dims = ScanDims { batch, seq, channels, state: ins[2].shape[1] };
            let mut g: Vec<(Vec<usize>, Vec<T>)> = (0..8).map(out).collect();
            {
                let [gu, gdelta, ga, gb, gc, gd, gdt, gz] = &mut g[..] else { unreachable!("eight gradients") };
                let grads = ScanGrads {
                    u: &mut gu.1,
                    delta: &mut gdelta.1,
                    a_log: &mut ga.1,
                    b: &mut gb.1,
                    c: &mut gc.1,
                    d: &mut gd.1,
                    dt_bias: &mut gdt.1,
                    z: &mut gz.1,
                };
                selective_scan_bwd(dims, r(0)?, r(1)?, r(2)?, r(3)?, r(4)?, r(5)?, r(6)?, r(7)?, r(8)?, grads);
            }
            g.into_iter().for_each(&mut emit);
        }
        Op::AttentionBackward(a) => {
            let dims = AttnDims { bf16_operands, ..attn_dims(a, ins[0]) };
            let (mut gq, mut gk, mut gv) = (out(0), out(1), out(2));
            attention_bwd(dims, r(0)?, r(1)?, r(2)?, r(3)?, r(4)?, r(5)?, &mut gq.1, &mut gk.1, &mut gv.1);
            emit(gq);
            emit(gk);
            emit(gv);
        }
        Op::GlaGateBackward { normalizer } => {
            let (mut gx, mut gb) = (out(0), out(1));
            gla_gate_bwd(last_dim(ins[0]), *normalizer, r(0)?, r(1)?, r(2)?, &mut gx.1, &mut gb.1);
            emit(gx);
            emit(gb);
        }
        Op::GlaBackward { heads } => {
            let dims = lin_dims(*heads, ins[0], ins[2]);
            let (mut gq, mut gk, mut gv, mut ga) = (out(0), out(1), out(2), out(3));
            gla_bwd(dims, r(0)?, r(1)?, r(2)?, r(3)?, r(4)?, &mut gq.1, &mut gk.1, &mut gv.1, &mut ga.1);
            emit(gq);
            emit(gk);
            emit(gv);
            emit(ga);
        }
        Op::RetentionBackward { heads, rope } => {
            let dims = lin_dims(*heads, ins[0], ins[2]);
            let (mut gq, mut gk, mut gv) = (out(0), out(1), out(2));
            retention_bwd(dims, *rope, r(0)?, r(1)?, r(2)?, r(3)?, &mut gq.1, &mut gk.1, &mut gv.1);
            emit(gq);
            emit(gk);
            emit(gv);
        }
        Op::HeadRmsNormGateBackward { heads, eps } => {
            let (mut go, mut gg, mut gw) = (out(0), out(1), out(2));
            head_rms_norm_gate_bwd(*heads as usize, *eps, r(0)?, r(1)?, r(2)?, r(3)?, &mut go.1, &mut gg.1, &mut gw.1);
            emit(go);
            emit(gg);
            emit(gw);
        }
        Op::CrossEntropyBackward => {
            let targets = ints(ins[2], "targets")?;
            let (vocab, d) = (ins[1].shape[0], ins[1].shape[1]);
            check_targets(targets, vocab).map_err(|e| ExecError(format!("target {e}")))?;
            let g_loss = ins[3].item().ok_or_else(|| ExecError("g_loss must be a real scalar".into()))?;
            let (mut gh, mut gw) = (out(0), out(1));
            cross_entropy_bwd(d, vocab, r(0)?, r(1)?, targets, g_loss, bf16_operands, &mut gh.1, &mut gw.1);
            emit(gh);
            emit(gw);
        }

        Op::SumSquares => emit((Vec::new(), vec![sum_squares(r(0)?)])),
        Op::AddScalar => emit((Vec::new(), vec![r(0)?[0] + r(1)?[0]])),
        Op::ClipScale { max_norm } => {
            let ss = r(0)?[0].to_f64().unwrap_or(f64::NAN);
            emit((Vec::new(), vec![T::of(clip_scale(ss, *max_norm))]));
        }
        Op::LrSchedule(s) => {
            let step = ints(ins[0], "step")?[0];
            let step = u64::try_from(step).map_err(|_| ExecError(format!("step {step} is negative")))?;
            emit((Vec::new(), vec![T::of(learning_rate(s, step))]));
        }
        Op::AdamW(a) => {
            let lr = r(4)?[0].to_f64().unwrap_or(f64::NAN);
            let clip = r(5)?[0].to_f64().unwrap_or(f64::NAN);
            let step = ints(ins[6], "step")?[0];
            let step = u64::try_from(step).map_err(|_| ExecError(format!("step {step} is negative")))?;
            let (mut p, mut m, mut v) = (r(0)?.to_vec(), r(2)?.to_vec(), r(3)?.to_vec());
            adamw(a, lr, clip, step, &mut p, r(1)?, &mut m, &mut v);
            emit((shapes[0].clone(), p));
            emit((shapes[1].clone(), m));
            emit((shapes[2].clone(), v));
        }
        Op::ConvState { width } => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let mut o = out(0);
            conv_final_state(ConvDims { batch, seq, channels, width: *width as usize }, r(0)?, &mut o.1);
            emit(o);
        }
        // The last position is the final state of a convolution of width 2.
        Op::LastPosition => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let mut o = out(0);
            conv_final_state(ConvDims { batch, seq, channels, width: 2 }, r(0)?, &mut o.1);
            emit(o);
        }
        Op::CausalConv1dSiluStep => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let dims = ConvDims { batch, seq: 1, channels, width: ins[1].shape[1] };
            let (mut y, mut st) = (out(0), (shapes[1].clone(), r(3)?.to_vec()));
            by_token(batch, seq, &[r(0)?], &mut y.1, |_, x, o| {
                conv_step(dims, &x[0], r(1)?, r(2)?, &mut st.1, o);
                Ok(())
            })?;
            emit(y);
            emit(st);
        }
        Op::SelectiveScanState => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let dims = ScanDims { batch, seq, channels, state: ins[2].shape[1] };
            let mut h = out(0);
            selective_scan_final_state(dims, r(0)?, r(1)?, r(2)?, r(3)?, r(4)?, r(5)?, &mut h.1);
            emit(h);
        }
        Op::SelectiveScanStep => {
            let (batch, seq, channels) = seq_dims(ins[0]);
            let (mut y, mut h) = (out(0), (shapes[1].clone(), r(8)?.to_vec()));
            let tokens = [r(0)?, r(1)?, r(3)?, r(4)?, r(7)?];
            by_token(batch, seq, &tokens, &mut y.1, |_, x, o| {
                let (a_log, d, dt_bias) = (r(2)?, r(5)?, r(6)?);
                let n = ins[2].shape[1];
                selective_scan_step(
                    batch, channels, n, &x[0], &x[1], a_log, &x[2], &x[3], d, dt_bias, &x[4], &mut h.1, o,
                );
                Ok(())
            })?;
            emit(y);
            emit(h);
        }
        Op::AttentionCache { attrs, capacity } => {
            let (batch, seq, _) = seq_dims(ins[0]);
            let dims = AttnDims { batch, seq, ..attn_dims(attrs, ins[0]) };
            let (mut kc, mut vc) = (out(0), out(1));
            attention_fill_cache(dims, *capacity as usize, r(0)?, r(1)?, &mut kc.1, &mut vc.1);
            emit(kc);
            emit(vc);
        }
        Op::AttentionDecode { attrs, capacity } => {
            let (batch, seq, _) = seq_dims(ins[0]);
            let pos = positions(ins[5], batch)?;
            let last = pos.iter().map(|&p| p + seq - 1);
            if let Some(pos) = last.filter(|&p| attrs.window.is_none() && p >= *capacity as usize).max() {
                return fail(format!("position {pos} is past the cache of {capacity} tokens of full attention: generate fewer tokens or build a larger cache"));
            }
            let dims = AttnDims { seq: 1, ..attn_dims(attrs, ins[0]) };
            let mut o = out(0);
            let (mut kc, mut vc) = ((shapes[1].clone(), r(3)?.to_vec()), (shapes[2].clone(), r(4)?.to_vec()));
            by_token(batch, seq, &[r(0)?, r(1)?, r(2)?], &mut o.1, |t, x, o| {
                let at: Vec<usize> = pos.iter().map(|p| p + t).collect();
                attention_decode(dims, &at, *capacity as usize, &x[0], &x[1], &x[2], &mut kc.1, &mut vc.1, o);
                Ok(())
            })?;
            emit(o);
            emit(kc);
            emit(vc);
        }
        Op::GlaState { heads } => {
            let dims = lin_dims(*heads, ins[0], ins[1]);
            let mut st = out(0);
            gla_final_state(dims, r(0)?, r(1)?, r(2)?, &mut st.1);
            emit(st);
        }
        Op::GlaStep { heads } => {
            let (batch, seq, k) = seq_dims(ins[0]);
            let (mut o, mut st) = (out(0), (shapes[1].clone(), r(4)?.to_vec()));
            let v = last_dim(ins[2]);
            by_token(batch, seq, &[r(0)?, r(1)?, r(2)?, r(3)?], &mut o.1, |_, x, o| {
                gla_step(batch, *heads as usize, k, v, &x[0], &x[1], &x[2], &x[3], &mut st.1, o);
                Ok(())
            })?;
            emit(o);
            emit(st);
        }
        Op::RetentionState { heads, rope } => {
            let dims = lin_dims(*heads, ins[0], ins[1]);
            let mut st = out(0);
            retention_final_state(dims, *rope, r(0)?, r(1)?, &mut st.1);
            emit(st);
        }
        Op::RetentionStep { heads, rope } => {
            let (batch, seq, k) = seq_dims(ins[0]);
            let pos = positions(ins[4], batch)?;
            let (mut o, mut st) = (out(0), (shapes[1].clone(), r(3)?.to_vec()));
            let v = last_dim(ins[2]);
            by_token(batch, seq, &[r(0)?, r(1)?, r(2)?], &mut o.1, |t, x, o| {
                let at: Vec<usize> = pos.iter().map(|p| p + t).collect();
                retention_step(batch, *heads as usize, k, v, *rope, &at, &x[0], &x[1], &x[2], &mut st.1, o);
                Ok(())
            })?;
            emit(o);
            emit(st);
        }
        Op::Zeros(ty) => {
            if ty.dtype == DType::I32 {
                results.push(Tensor::zeros(DType::I32, shapes[0].clone()));
            } else {
                emit(out(0));
            }
        }
    }
    Ok(results)
}

/// A step operation over `seq` tokens of each of `batch` sequences (a decode step, or a chunk
/// of a prompt continuing from carried states): `step(t, rows, out)` advances every sequence
/// by its token `t`, given each of `inputs`' `[batch, 1, width]` rows of that token, writing
/// the token's `[batch, 1, out width]` rows. Token by token, as decoding does, so a chunk of
/// any length gives what decoding its tokens one at a time gives.
fn by_token<T: Real>(
    batch: usize,
    seq: usize,
    inputs: &[&[T]],
    out: &mut [T],
    mut step: impl FnMut(usize, &[Vec<T>], &mut [T]) -> Result<(), ExecError>,
) -> Result<(), ExecError> {
    if seq == 1 {
        let rows: Vec<Vec<T>> = inputs.iter().map(|x| x.to_vec()).collect();
        return step(0, &rows, out);
    }
    let ow = out.len() / (batch * seq).max(1);
    let mut o = vec![T::zero(); batch * ow];
    for t in 0..seq {
        let rows: Vec<Vec<T>> = inputs
            .iter()
            .map(|x| {
                let w = x.len() / (batch * seq);
                (0..batch).flat_map(|b| x[(b * seq + t) * w..(b * seq + t + 1) * w].iter().copied()).collect()
            })
            .collect();
        step(t, &rows, &mut o)?;
        for b in 0..batch {
            out[(b * seq + t) * ow..(b * seq + t + 1) * ow].copy_from_slice(&o[b * ow..(b + 1) * ow]);
        }
    }
    Ok(())
}

/// Each sequence's decode position.
fn positions<T: Real>(t: &Tensor<T>, batch: usize) -> Result<Vec<usize>, ExecError> {
    let p = ints(t, "pos")?;
    if p.len() != batch {
        return fail(format!("pos has {} positions for {batch} sequences", p.len()));
    }
    p.iter().map(|&p| usize::try_from(p).map_err(|_| ExecError(format!("position {p} is negative")))).collect()
}

fn attn_dims<T>(a: &crate::op::AttentionAttrs, q: &Tensor<T>) -> AttnDims {
    AttnDims {
        batch: q.shape[0],
        seq: q.shape[1],
        heads: a.heads as usize,
        kv_heads: a.kv_heads as usize,
        head_dim: a.head_dim as usize,
        window: a.window.map(|w| w as usize),
        rope: a.rope,
        bf16_operands: false,
        self_extend: a.self_extend.map(|s| (s.neighbours as usize, s.group as usize)),
    }
}

fn lin_dims<T>(heads: u64, q: &Tensor<T>, v: &Tensor<T>) -> LinDims {
    LinDims { batch: q.shape[0], seq: q.shape[1], heads: heads as usize, key_dim: last_dim(q), value_dim: last_dim(v) }
}

#[cfg(test)]
mod tests {
    //! Every forward operation's backward operation, run through the executor's dispatch,
    //! against central finite differences in f64.

    use super::*;
    use crate::cpu::check::{check_gradients, Rng};
    use crate::op::AttentionAttrs;

    /// Builds a backward op's inputs from the forward inputs, forward outputs and gradient.
    type BackwardInputs = dyn Fn(&[Tensor<f64>], &[Tensor<f64>], Tensor<f64>) -> Vec<Tensor<f64>>;

    /// An input: its shape, and either a range for random reals or a bound for token ids.
    enum In {
        Real(Vec<usize>, f64, f64),
        Ids(Vec<usize>, i32),
    }

    fn make(inputs: &[In], rng: &mut Rng) -> Vec<Tensor<f64>> {
        inputs
            .iter()
            .map(|i| match i {
                In::Real(s, lo, hi) => Tensor::real(s.clone(), rng.vec(s.iter().product(), *lo, *hi)),
                In::Ids(s, n) => Tensor::ints(
                    s.clone(),
                    (0..s.iter().product()).map(|_| (rng.next_u64() % *n as u64) as i32).collect(),
                ),
            })
            .collect()
    }

    fn shapes_of(op: &Op, ins: &[Tensor<f64>]) -> Vec<Vec<usize>> {
        // Forward outputs of the ops under test share the first input's leading dimensions.
        match op {
            Op::Embed => vec![vec![ins[0].shape[0], ins[0].shape[1], ins[1].shape[1]]],
            Op::MatMul => {
                let mut s = ins[0].shape.clone();
                *s.last_mut().unwrap() = ins[1].shape[0];
                vec![s]
            }
            Op::Slice { len, .. } => {
                let mut s = ins[0].shape.clone();
                *s.last_mut().unwrap() = *len as usize;
                vec![s]
            }
            Op::CrossEntropy => vec![vec![]],
            Op::Attention(a) => vec![ins[0].shape.clone(), vec![ins[0].shape[0], ins[0].shape[1], a.heads as usize]],
            Op::Gla { .. } | Op::Retention { .. } => vec![ins[2].shape.clone()],
            _ => vec![ins[0].shape.clone()],
        }
    }

    /// Runs the forward op, takes L = Σ r ⊙ out₀, runs `backward` on
    /// `backward_inputs(forward inputs, forward outputs, r)` and checks the gradients it gives
    /// for the forward inputs listed in `grads_of` against finite differences.
    fn check(
        name: &str,
        forward: Op,
        backward: Op,
        inputs: &[In],
        grads_of: &[usize],
        backward_inputs: &BackwardInputs,
    ) {
        let mut rng = Rng::new(name.len() as u64 * 7919 + 13);
        let ins = make(inputs, &mut rng);
        let refs: Vec<&Tensor<f64>> = ins.iter().collect();
        let out = execute(&forward, &refs, &shapes_of(&forward, &ins)).unwrap();
        let r = if out[0].shape.is_empty() { vec![1.0] } else { rng.vec(out[0].len(), -1.0, 1.0) };
        let g = Tensor::real(out[0].shape.clone(), r.clone());
        let bins = backward_inputs(&ins, &out, g);
        let brefs: Vec<&Tensor<f64>> = bins.iter().collect();
        let out_shapes: Vec<Vec<usize>> = grads_of.iter().map(|&i| ins[i].shape.clone()).collect();
        let grads = execute(&backward, &brefs, &out_shapes).unwrap();
        let analytic: Vec<Vec<f64>> = grads.iter().map(|t| t.reals().unwrap().to_vec()).collect();

        let mut vars: Vec<Vec<f64>> = grads_of.iter().map(|&i| ins[i].reals().unwrap().to_vec()).collect();
        let names: Vec<&str> = grads_of.iter().map(|&i| forward.input_names()[i]).collect();
        let loss = |vars: &[Vec<f64>]| -> f64 {
            let mut now = ins.clone();
            for (k, &i) in grads_of.iter().enumerate() {
                now[i] = Tensor::real(ins[i].shape.clone(), vars[k].clone());
            }
            let refs: Vec<&Tensor<f64>> = now.iter().collect();
            let out = execute(&forward, &refs, &shapes_of(&forward, &now)).unwrap();
            out[0].reals().unwrap().iter().zip(&r).map(|(a, b)| a * b).sum()
        };
        check_gradients(name, &mut vars, &names, &analytic, &loss);
    }

    fn with_g(ins: &[Tensor<f64>], g: Tensor<f64>) -> Vec<Tensor<f64>> {
        let mut v = ins.to_vec();
        v.push(g);
        v
    }

    #[test]
    fn dense_and_elementwise_backwards_match_finite_differences() {
        use In::*;
        let plain = |ins: &[Tensor<f64>], _: &[Tensor<f64>], g| with_g(ins, g);
        check(
            "rms_norm",
            Op::RmsNorm { eps: 1e-5 },
            Op::RmsNormBackward { eps: 1e-5 },
            &[Real(vec![2, 3, 5], -2.0, 2.0), Real(vec![5], 0.5, 1.5)],
            &[0, 1],
            &plain,
        );
        check(
            "matmul",
            Op::MatMul,
            Op::MatMulBackward,
            &[Real(vec![2, 3, 4], -1.0, 1.0), Real(vec![5, 4], -1.0, 1.0)],
            &[0, 1],
            &plain,
        );
        check(
            "swiglu",
            Op::SwiGlu,
            Op::SwiGluBackward,
            &[Real(vec![2, 3, 4], -4.0, 4.0), Real(vec![2, 3, 4], -2.0, 2.0)],
            &[0, 1],
            &plain,
        );
        check(
            "conv",
            Op::CausalConv1dSilu,
            Op::CausalConv1dSiluBackward,
            &[Real(vec![2, 6, 3], -1.0, 1.0), Real(vec![3, 4], -0.5, 0.5), Real(vec![3], -0.5, 0.5)],
            &[0, 1, 2],
            &plain,
        );
        check(
            "gla_gate",
            Op::GlaGate { normalizer: 16.0 },
            Op::GlaGateBackward { normalizer: 16.0 },
            &[Real(vec![2, 3, 4], -3.0, 3.0), Real(vec![4], -1.0, 1.0)],
            &[0, 1],
            &plain,
        );
        check(
            "head_rms_norm_gate",
            Op::HeadRmsNormGate { heads: 2, eps: 1e-5 },
            Op::HeadRmsNormGateBackward { heads: 2, eps: 1e-5 },
            &[Real(vec![2, 3, 6], -2.0, 2.0), Real(vec![2, 3, 6], -3.0, 3.0), Real(vec![3], 0.5, 1.5)],
            &[0, 1, 2],
            &plain,
        );
        check(
            "slice",
            Op::Slice { start: 2, len: 3 },
            Op::SliceBackward { start: 2, width: 7 },
            &[Real(vec![2, 3, 7], -1.0, 1.0)],
            &[0],
            &|_, _, g| vec![g],
        );
        check(
            "embed",
            Op::Embed,
            Op::EmbedBackward { vocab: 6 },
            &[Ids(vec![2, 4], 6), Real(vec![6, 3], -1.0, 1.0)],
            &[1],
            &|ins, _, g| vec![ins[0].clone(), g],
        );
        // Cross-entropy over a chunk boundary (more tokens than one chunk holds).
        let n = crate::cpu::dense::CE_CHUNK + 5;
        check(
            "cross_entropy",
            Op::CrossEntropy,
            Op::CrossEntropyBackward,
            &[Real(vec![1, n, 3], -2.0, 2.0), Real(vec![7, 3], -2.0, 2.0), Ids(vec![1, n], 7)],
            &[0, 1],
            &|ins, _, _| vec![ins[0].clone(), ins[1].clone(), ins[2].clone(), Tensor::scalar(1.0)],
        );
    }

    #[test]
    fn sequence_mixer_backwards_through_dispatch_match_finite_differences() {
        use In::*;
        let (b, t) = (2, 5);
        let plain = |ins: &[Tensor<f64>], _: &[Tensor<f64>], g| with_g(ins, g);
        check(
            "selective_scan",
            Op::SelectiveScan,
            Op::SelectiveScanBackward,
            &[
                Real(vec![b, t, 4], -1.0, 1.0),
                Real(vec![b, t, 4], -2.0, 1.0),
                Real(vec![4, 3], -1.0, 1.0),
                Real(vec![b, t, 3], -1.0, 1.0),
                Real(vec![b, t, 3], -1.0, 1.0),
                Real(vec![4], -1.0, 1.0),
                Real(vec![4], -1.0, 1.0),
                Real(vec![b, t, 4], -2.0, 2.0),
            ],
            &[0, 1, 2, 3, 4, 5, 6, 7],
            &plain,
        );
        let attrs = AttentionAttrs {
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            window: Some(3),
            rope: Some(10000.0),
            self_extend: None,
        };
        check(
            "attention",
            Op::Attention(attrs.clone()),
            Op::AttentionBackward(attrs),
            &[Real(vec![b, t, 16], -1.0, 1.0), Real(vec![b, t, 8], -1.0, 1.0), Real(vec![b, t, 8], -1.0, 1.0)],
            &[0, 1, 2],
            &|ins, outs, g| vec![ins[0].clone(), ins[1].clone(), ins[2].clone(), outs[0].clone(), outs[1].clone(), g],
        );
        check(
            "gla",
            Op::Gla { heads: 2 },
            Op::GlaBackward { heads: 2 },
            &[
                Real(vec![b, t, 4], -1.0, 1.0),
                Real(vec![b, t, 4], -1.0, 1.0),
                Real(vec![b, t, 6], -1.0, 1.0),
                Real(vec![b, t, 4], -1.0, -0.01),
            ],
            &[0, 1, 2, 3],
            &plain,
        );
        check(
            "retention",
            Op::Retention { heads: 2, rope: Some(10000.0) },
            Op::RetentionBackward { heads: 2, rope: Some(10000.0) },
            &[Real(vec![b, t, 4], -1.0, 1.0), Real(vec![b, t, 4], -1.0, 1.0), Real(vec![b, t, 6], -1.0, 1.0)],
            &[0, 1, 2],
            &plain,
        );
    }

    #[test]
    fn bad_token_ids_are_errors() {
        let tokens: Tensor<f32> = Tensor::ints(vec![1, 2], vec![0, 9]);
        let table = Tensor::real(vec![4, 2], vec![0.0; 8]);
        let e = execute(&Op::Embed, &[&tokens, &table], &[vec![1, 2, 2]]).unwrap_err();
        assert_eq!(e.0, "token id 9 at position 1 is outside the vocabulary of 4");
    }
}
