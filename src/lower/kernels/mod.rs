//! One module per kernel family; `lower_step` picks the family for each operation.

mod attention;
mod chunks;
mod conv;
mod elementwise;
mod gemm;
mod loss;
mod norm;
mod optim;
mod scan;
mod skinny;

use super::{Emit, LowerError, Operand};
use crate::lower::mlir::{KernelBuilder, Ty, V};
use weft_runtime::plan::Step;
use weft_runtime::{DType, Op};

pub(crate) fn lower_step(e: &mut Emit, step: &Step) -> Result<(), LowerError> {
    let ins: Vec<Operand> = step.inputs.iter().map(|&v| e.operand(v)).collect();
    let outs: Vec<Operand> = step.outputs.iter().map(|&v| e.operand(v)).collect();
    for o in ins.iter().chain(&outs) {
        if o.dtype() == DType::F16 {
            return Err(LowerError("f16 tensors have no GPU kernels (weft stores bf16 and f32)".into()));
        }
    }
    match &step.op {
        // A view: no work, the consumers read the source with its stride.
        Op::Slice { .. } => Ok(()),
        Op::MatMul => gemm::matmul(e, &ins, &outs),
        Op::MatMulBackward => gemm::matmul_backward(e, &ins, &outs),
        Op::Add => elementwise::add(e, &ins, &outs),
        Op::SwiGlu => elementwise::swiglu(e, &ins, &outs),
        Op::SwiGluBackward => elementwise::swiglu_backward(e, &ins, &outs),
        Op::SliceBackward { start, .. } => elementwise::slice_backward(e, *start, &ins, &outs),
        Op::Embed => elementwise::embed(e, &ins, &outs),
        Op::EmbedBackward { .. } => elementwise::embed_backward(e, &ins, &outs),
        Op::Zeros(_) => {
            e.zero(outs[0].buf.clone(), bytes_of(&outs[0]));
            Ok(())
        }
        Op::RmsNorm { eps } => norm::rms_norm(e, *eps, &ins, &outs),
        Op::AddRmsNorm { eps } => norm::add_rms_norm(e, *eps, &ins, &outs),
        Op::RmsNormBackward { eps } => norm::rms_norm_backward(e, *eps, &ins, &outs, false),
        Op::RmsNormBackwardAdd { eps } => norm::rms_norm_backward(e, *eps, &ins, &outs, true),
        Op::Attention(a)
        | Op::AttentionBackward(a)
        | Op::AttentionCache { attrs: a, .. }
        | Op::AttentionDecode { attrs: a, .. }
            if a.self_extend.is_some() =>
        {
            Err(LowerError("Self-Extend has no GPU kernel yet: it runs on the CPU reference".into()))
        }
        Op::Attention(a) => attention::attention(e, a, &ins, &outs),
        Op::AttentionBackward(a) => attention::attention_backward(e, a, &ins, &outs),
        Op::AttentionCache { attrs, capacity } => attention::attention_cache(e, attrs, *capacity, &ins, &outs),
        Op::AttentionDecode { attrs, capacity } => attention::attention_decode(e, attrs, *capacity, &ins, &outs),
        Op::CausalConv1dSilu => conv::conv(e, &ins, &outs),
        Op::CausalConv1dSiluBackward => conv::conv_backward(e, &ins, &outs),
        Op::ConvState { width } => conv::conv_state(e, *width, &ins, &outs),
        // The last position is the final state of a convolution of width 2.
        Op::LastPosition => conv::conv_state(e, 2, &ins, &outs),
        Op::CausalConv1dSiluStep => conv::conv_step(e, &ins, &outs),
        Op::SelectiveScan => scan::forward(e, &ins, &outs),
        Op::SelectiveScanBackward => scan::backward(e, &ins, &outs),
        Op::SelectiveScanState => scan::state(e, &ins, &outs),
        Op::SelectiveScanStep => scan::step(e, &ins, &outs),
        Op::CrossEntropy => loss::cross_entropy(e, &ins, &outs),
        Op::CrossEntropyBackward => loss::cross_entropy_backward(e, &ins, &outs),
        Op::Logits => loss::logits(e, &ins, &outs),
        Op::TokenLogProbs => loss::token_logprobs(e, &ins, &outs),
        Op::SumSquares => optim::sum_squares(e, &ins, &outs),
        Op::AddScalar => optim::add_scalar(e, &ins, &outs),
        Op::ClipScale { max_norm } => optim::clip_scale(e, *max_norm, &ins, &outs),
        Op::LrSchedule(s) => optim::lr_schedule(e, s, &ins, &outs),
        Op::AdamW(a) => optim::adamw(e, a, &ins, &outs),
        other => Err(LowerError(format!("`{}` has no GPU kernel yet", other.name()))),
    }
}

/// The AdamW steps of a plan, when there are several and every one's inputs are ready at the
/// first (so one launch at its place can update them all).
pub(crate) fn adamw_group(plan: &weft_runtime::plan::Plan) -> Option<Vec<usize>> {
    let steps: Vec<usize> =
        plan.steps.iter().enumerate().filter(|(_, s)| matches!(s.op, Op::AdamW(_))).map(|(i, _)| i).collect();
    let first = *steps.first()?;
    if steps.len() < 2 {
        return None;
    }
    let attrs = &plan.steps[first].op;
    let mut defined: rustc_hash::FxHashSet<u32> = plan.inputs.iter().chain(&plan.persistent).map(|(_, v)| *v).collect();
    for s in &plan.steps[..first] {
        defined.extend(s.outputs.iter().copied());
    }
    let ok =
        steps.iter().all(|&i| plan.steps[i].op == *attrs && plan.steps[i].inputs.iter().all(|v| defined.contains(v)));
    ok.then_some(steps)
}

pub(crate) fn lower_adamw_group(e: &mut Emit, steps: &[usize]) -> Result<(), LowerError> {
    optim::adamw_group(e, steps)
}

/// Whether plan steps `i` and `i + 1` are a cross-entropy and its backward that lower as one.
pub(crate) fn fused_loss_at(plan: &weft_runtime::plan::Plan, i: usize) -> bool {
    loss::fusable_pair(plan, i)
}

pub(crate) fn lower_fused_loss(e: &mut Emit, fwd: &Step, bwd: &Step) -> Result<(), LowerError> {
    loss::cross_entropy_fused(e, fwd, bwd)
}

/// Bytes of an operand's tensor (dense).
fn bytes_of(o: &Operand) -> weft_runtime::device::Extent {
    o.elems().times(o.dtype().bytes() as i64)
}

/// A short signature of operands for kernel names: element type letter, and the row stride
/// where it differs from the width.
fn sig(ops: &[&Operand]) -> String {
    ops.iter()
        .map(|o| {
            let t = match o.dtype() {
                DType::F32 => "f",
                DType::BF16 => "b",
                DType::I32 => "i",
                DType::F16 => "h",
            };
            if o.dense() {
                t.to_string()
            } else {
                format!("{t}{}", o.ld)
            }
        })
        .collect::<Vec<_>>()
        .join("")
}

/// `base[row·ld + col]` as f32.
fn load_at(k: &mut KernelBuilder, p: &V, o: &Operand, row: &V, col: &V) -> V {
    let ld = k.i64(o.ld as i64);
    let r = k.mul(row, &ld);
    let i = k.add(&r, col);
    k.load_f32(p, &i, o.elem())
}

fn store_at(k: &mut KernelBuilder, v: &V, p: &V, o: &Operand, row: &V, col: &V) {
    let ld = k.i64(o.ld as i64);
    let r = k.mul(row, &ld);
    let i = k.add(&r, col);
    k.store(v, p, &i, o.elem());
}

/// Elements per thread of the vectorised row-wise and elementwise kernels (16 bytes of bf16).
const VEC: u64 = 8;

/// Whether an operand's rows start at 16-byte aligned addresses (so 8 bf16 or 4 f32 elements
/// from a column that is a multiple of 8 load as vectors).
fn vector_aligned(o: &Operand) -> bool {
    let bytes = o.dtype().bytes();
    matches!(o.dtype(), DType::BF16 | DType::F32) && (o.ld * bytes) % 16 == 0 && o.buf.offset % 16 == 0
}

/// Columns `col..col + 8` of row `row` as f32.
fn load8(k: &mut KernelBuilder, p: &V, o: &Operand, row: &V, col: &V) -> Vec<V> {
    let ld = k.i64(o.ld as i64);
    let r = k.mul(row, &ld);
    let i = k.add(&r, col);
    let lanes = 16 / o.dtype().bytes() as usize;
    (0..VEC as usize / lanes)
        .flat_map(|v| {
            let off = k.i64((v * lanes) as i64);
            let iv = k.add(&i, &off);
            k.load_vector_f32(p, &iv, o.elem(), lanes)
        })
        .collect()
}

fn store8(k: &mut KernelBuilder, vals: &[V], p: &V, o: &Operand, row: &V, col: &V) {
    let ld = k.i64(o.ld as i64);
    let r = k.mul(row, &ld);
    let i = k.add(&r, col);
    let lanes = 16 / o.dtype().bytes() as usize;
    for (v, part) in vals.chunks(lanes).enumerate() {
        let off = k.i64((v * lanes) as i64);
        let iv = k.add(&i, &off);
        k.store_vector(part, p, &iv, o.elem());
    }
}

/// The number of threads per block of the row-wise and elementwise kernels.
const THREADS: u32 = 256;

/// `c + a·b` on a 16×8×16 bf16 tile (`mma.sync`), f32 accumulators in `c`.
fn mma(k: &mut KernelBuilder, a: &[V], b: &[V], c: &[V]) -> Vec<V> {
    let n = |v: &[V]| v.iter().map(|x| x.name.clone()).collect::<Vec<_>>().join(", ");
    let op = format!(
        "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, \
         multiplicandAPtxType = #nvvm.mma_type<bf16>, multiplicandBPtxType = #nvvm.mma_type<bf16>, \
         shape = #nvvm.shape<m = 16, n = 8, k = 16>}} : (i32, i32, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
        n(a),
        n(b),
        n(c)
    );
    k.raw_struct(&[Ty::F32; 4], &op)
}
