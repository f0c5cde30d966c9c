//! The head and the loss: cross-entropy over chunks of rows (one chunk of logits exists at a
//! time, in scratch), and the plain logits for inference. The matrix products are cuBLASLt's;
//! the kernels do the row-wise softmax work.

use super::super::{Emit, LowerError, Operand};
use super::{sig, THREADS};
use crate::lower::mlir::{Cmp, KernelBuilder, Ty, V};
use weft_runtime::device::{Arg, BufferArg, Extent, Gemm, GridDim, MatrixArg};
use weft_runtime::plan::{Plan, Step, ValueId};
use weft_runtime::{DType, Op};

/// Rows of logits per chunk.
pub const CHUNK_ROWS: u64 = 2048;

/// `logits = h · wᵀ` (f32 output).
pub(super) fn logits(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (h, w, out) = (&ins[0], &ins[1], &outs[0]);
    e.gemm(Gemm {
        m: h.rows(),
        n: Extent::constant(out.width as i64),
        k: Extent::constant(h.width as i64),
        a: h.matrix(),
        trans_a: false,
        b: w.matrix(),
        trans_b: true,
        c: out.matrix(),
        alpha: 1.0,
        beta: 0.0,
    });
    Ok(())
}

fn offset(b: &BufferArg, bytes: u64) -> BufferArg {
    BufferArg { base: b.base.clone(), offset: b.offset + bytes }
}

/// The chunks of the largest call: (first row, rows). Plans with a cross-entropy run at exactly
/// the shape they were lowered for.
fn chunks(e: &Emit, h: &Operand) -> Vec<(u64, u64)> {
    let (b, t) = e.max_shape();
    let rows = h.rows().eval(b, t).max(0) as u64;
    (0..rows.div_ceil(CHUNK_ROWS)).map(|c| (c * CHUNK_ROWS, CHUNK_ROWS.min(rows - c * CHUNK_ROWS))).collect()
}

fn vocab_of(w: &Operand) -> u64 {
    w.rows().c as u64
}

/// What a row-wise kernel writes. A row whose target is negative (no target: a padded or
/// masked position) has no loss and a zero gradient; `N` counts the rows with a target.
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    /// `row_loss[r] = lse − z[target]` (0 without a target), summed by [`loss_sum`].
    Loss,
    /// `G = (softmax(z) − onehot)·g_loss/N` as bf16.
    Grad,
    Both,
    /// `logprob[r] = z[target] − lse` (0 without a target), the plan's output itself.
    LogProb,
}

/// The row-wise kernel, one block per row of `z` (f32 logits): `lse = log Σ exp z` in one pass,
/// then the row's loss and/or (a second pass) the logits' gradient (see [`Rows`]).
fn rows_kernel(vocab: u64, mode: Rows, tag: &str) -> KernelBuilder {
    let family = match mode {
        Rows::Loss => "cross_entropy_rows_online",
        Rows::Grad => "cross_entropy_backward_rows_online",
        Rows::Both => "cross_entropy_fused_rows_online",
        Rows::LogProb => "token_logprobs_rows_online",
    };
    let mut k = KernelBuilder::new(&format!("{family}_v{vocab}_{tag}"), [THREADS, 1, 1]);
    let zp = k.ptr("logits");
    let tp = k.ptr("targets");
    let grad = matches!(mode, Rows::Grad | Rows::Both);
    let gz = grad.then(|| k.ptr("g_logits"));
    let loss = (mode != Rows::Grad).then(|| k.ptr(if mode == Rows::LogProb { "logprobs" } else { "row_loss" }));
    let gl = grad.then(|| k.ptr("g_loss"));
    let count = (mode != Rows::LogProb).then(|| k.ptr("count"));
    let first = k.scalar_i64("first_row");
    let scratch = k.shared("partial", Ty::F32, (THREADS / 32) as u64);
    let row = k.block_id('x');
    let tid = k.thread_id('x');
    let v = k.i64(vocab as i64);
    let base = k.mul(&row, &v);
    let ninf = k.f32(f32::NEG_INFINITY);
    let zero = k.f32(0.0);
    // One pass of online softmax statistics: per thread the running max and the sum of
    // exponentials below it (rescaled when the max grows), over 4-wide vectors where the row
    // allows, then the block's max and its sum rescaled to it.
    let groups = if vocab % 4 == 0 { vocab / 4 } else { vocab };
    let lanes = (vocab / groups) as usize;
    let load_group = |k: &mut KernelBuilder, q: &V| -> Vec<V> {
        let l = k.i64(lanes as i64);
        let j = k.mul(q, &l);
        let i = k.add(&base, &j);
        if lanes == 1 {
            vec![k.load(&zp, &i, Ty::F32)]
        } else {
            k.load_vector_f32(&zp, &i, Ty::F32, lanes)
        }
    };
    let gv = k.i64(groups as i64);
    let stats = k.for_(&tid, &gv, THREADS as i64, &[ninf.clone(), zero.clone()], |k, q, acc| {
        let z = load_group(k, &q);
        let mut mx = acc[0].clone();
        for x in &z {
            mx = k.max(&mx, x);
        }
        let d = k.sub(&acc[0], &mx);
        let r = k.exp(&d);
        let mut sum = k.mul(&acc[1], &r);
        for x in &z {
            let d = k.sub(x, &mx);
            let ex = k.exp(&d);
            sum = k.add(&sum, &ex);
        }
        vec![mx, sum]
    });
    let m = k.block_max(&stats[0], &scratch);
    let d = k.sub(&stats[0], &m);
    let r = k.exp(&d);
    let mine = k.mul(&stats[1], &r);
    let s = k.block_sum(&mine, &scratch);
    let ls = k.ln(&s);
    let lse = k.add(&m, &ls);
    let grow = k.add(&first, &row);
    let t = k.load(&tp, &grow, Ty::I32);
    let t = k.cast(&t, Ty::I64);
    let z0 = k.i64(0);
    let has_target = k.cmp(Cmp::Ge, &t, &z0);
    if let Some(out) = &loss {
        let is0 = k.cmp(Cmp::Eq, &tid, &z0);
        k.if_(&is0, |k| {
            // Ids are checked where they enter; clamped anyway so no row reads out of bounds.
            let tc = k.max(&t, &z0);
            let last = k.i64(vocab as i64 - 1);
            let tc = k.min(&tc, &last);
            let i = k.add(&base, &tc);
            let zt = k.load(&zp, &i, Ty::F32);
            let l = if mode == Rows::LogProb { k.sub(&zt, &lse) } else { k.sub(&lse, &zt) };
            let zf = k.f32(0.0);
            let l = k.select(&has_target, &l, &zf);
            k.store(&l, out, &grow, Ty::F32);
        });
    }
    if let (Some(out), Some(gl), Some(count)) = (&gz, &gl, &count) {
        let zi = k.i64(0);
        let g = k.load(gl, &zi, Ty::F32);
        let n = k.load(count, &zi, Ty::F32);
        let one = k.f32(1.0);
        let n = k.max(&n, &one);
        let scale = k.div(&g, &n);
        let zf = k.f32(0.0);
        let scale = k.select(&has_target, &scale, &zf);
        k.for_(&tid, &gv, THREADS as i64, &[], |k, q, _| {
            let z = load_group(k, &q);
            let l = k.i64(lanes as i64);
            let j0 = k.mul(&q, &l);
            let g: Vec<_> = z
                .iter()
                .enumerate()
                .map(|(u, x)| {
                    let d = k.sub(x, &lse);
                    let p = k.exp(&d);
                    let p = k.mul(&p, &scale);
                    let off = k.i64(u as i64);
                    let j = k.add(&j0, &off);
                    let hit = k.cmp(Cmp::Eq, &j, &t);
                    let q = k.sub(&p, &scale);
                    k.select(&hit, &q, &p)
                })
                .collect();
            let i = k.add(&base, &j0);
            if lanes == 1 {
                k.store(&g[0], out, &i, Ty::BF16);
            } else {
                k.store_vector(&g, out, &i, Ty::BF16);
            }
            vec![]
        });
    }
    k
}

/// `z = h[first .. first + rows] · wᵀ` into the f32 logits scratch.
fn chunk_logits(e: &mut Emit, h: &Operand, w: &Operand, first: u64, rows: u64, z: &BufferArg) {
    let vocab = vocab_of(w);
    e.gemm(Gemm {
        m: Extent::constant(rows as i64),
        n: Extent::constant(vocab as i64),
        k: Extent::constant(h.width as i64),
        a: chunk_matrix(h, first),
        trans_a: false,
        b: w.matrix(),
        trans_b: true,
        c: MatrixArg { buffer: z.clone(), dtype: DType::F32, ld: vocab },
        alpha: 1.0,
        beta: 0.0,
    });
}

fn chunk_matrix(o: &Operand, first: u64) -> MatrixArg {
    MatrixArg { buffer: offset(&o.buf, first * o.ld * o.dtype().bytes()), dtype: o.dtype(), ld: o.ld }
}

pub(super) fn cross_entropy(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (h, w, targets, loss) = (&ins[0], &ins[1], &ins[2], &outs[0]);
    let vocab = vocab_of(w);
    let z = e.scratch(Extent::constant((CHUNK_ROWS * vocab * 4) as i64));
    let (count, row_loss) = count_targets(e, h, targets);
    let tag = sig(&[h, w]);
    for (first, rows) in chunks(e, h) {
        chunk_logits(e, h, w, first, rows, &z);
        let k = rows_kernel(vocab, Rows::Loss, &tag);
        let args = vec![
            Arg::Buffer(z.clone()),
            targets.arg(),
            Arg::Buffer(row_loss.clone()),
            Arg::Buffer(count.clone()),
            Arg::I64 { value: Extent::constant(first as i64) },
        ];
        e.launch(k, [GridDim::fixed(rows as i64), GridDim::fixed(1), GridDim::fixed(1)], 0, args);
    }
    loss_sum(e, &row_loss, &count, h.rows(), loss);
    e.exact_shape();
    Ok(())
}

/// Each position's log-probability of its target: the logits chunk by chunk as for the loss,
/// each row's `z[target] − lse` written straight into the output.
pub(super) fn token_logprobs(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (h, w, targets, out) = (&ins[0], &ins[1], &ins[2], &outs[0]);
    let vocab = vocab_of(w);
    let z = e.scratch(Extent::constant((CHUNK_ROWS * vocab * 4) as i64));
    let tag = sig(&[h, w]);
    for (first, rows) in chunks(e, h) {
        chunk_logits(e, h, w, first, rows, &z);
        let k = rows_kernel(vocab, Rows::LogProb, &tag);
        let args =
            vec![Arg::Buffer(z.clone()), targets.arg(), out.arg(), Arg::I64 { value: Extent::constant(first as i64) }];
        e.launch(k, [GridDim::fixed(rows as i64), GridDim::fixed(1), GridDim::fixed(1)], 0, args);
    }
    e.exact_shape();
    Ok(())
}

/// Scratch for the number of rows with a target (f32, written by a one-block kernel counting
/// `targets ≥ 0` in a fixed order) and for each row's loss.
fn count_targets(e: &mut Emit, h: &Operand, targets: &Operand) -> (BufferArg, BufferArg) {
    let count = e.scratch(Extent::constant(4));
    let row_loss = e.scratch(h.rows().times(4));
    let mut k = KernelBuilder::new("cross_entropy_count_targets", [THREADS, 1, 1]);
    let tp = k.ptr("targets");
    let cp = k.ptr("count");
    let n = k.scalar_i64("rows");
    let scratch = k.shared("partial", Ty::F32, (THREADS / 32) as u64);
    let tid = k.thread_id('x');
    let zf = k.f32(0.0);
    let c = k.for_(&tid, &n, THREADS as i64, &[zf], |k, i, acc| {
        let t = k.load(&tp, &i, Ty::I32);
        let z = k.i32(0);
        let has = k.cmp(Cmp::Ge, &t, &z);
        let one = k.f32(1.0);
        let zf = k.f32(0.0);
        let x = k.select(&has, &one, &zf);
        vec![k.add(&acc[0], &x)]
    });
    // Counts below 2^24 are exact in f32 whatever the order.
    let total = k.block_sum(&c[0], &scratch);
    let z = k.i64(0);
    let first = k.cmp(Cmp::Eq, &tid, &z);
    k.if_(&first, |k| k.store(&total, &cp, &z, Ty::F32));
    let args = vec![targets.arg(), Arg::Buffer(count.clone()), Arg::I64 { value: h.rows() }];
    e.launch(k, [GridDim::fixed(1), GridDim::fixed(1), GridDim::fixed(1)], 0, args);
    (count, row_loss)
}

/// `loss = Σ row_loss / max(count, 1)`, the rows added by one block in a fixed order.
fn loss_sum(e: &mut Emit, row_loss: &BufferArg, count: &BufferArg, rows: Extent, loss: &Operand) {
    let mut k = KernelBuilder::new("cross_entropy_loss_sum", [THREADS, 1, 1]);
    let lp = k.ptr("row_loss");
    let cp = k.ptr("count");
    let op = k.ptr("loss");
    let n = k.scalar_i64("rows");
    let scratch = k.shared("partial", Ty::F32, (THREADS / 32) as u64);
    let tid = k.thread_id('x');
    let zf = k.f32(0.0);
    let s = k.for_(&tid, &n, THREADS as i64, &[zf], |k, i, acc| {
        let v = k.load(&lp, &i, Ty::F32);
        vec![k.add(&acc[0], &v)]
    });
    let total = k.block_sum(&s[0], &scratch);
    let z = k.i64(0);
    let first = k.cmp(Cmp::Eq, &tid, &z);
    k.if_(&first, |k| {
        let c = k.load(&cp, &z, Ty::F32);
        let one = k.f32(1.0);
        let c = k.max(&c, &one);
        let l = k.div(&total, &c);
        k.store(&l, &op, &z, Ty::F32);
    });
    let args = vec![Arg::Buffer(row_loss.clone()), Arg::Buffer(count.clone()), loss.arg(), Arg::I64 { value: rows }];
    e.launch(k, [GridDim::fixed(1), GridDim::fixed(1), GridDim::fixed(1)], 0, args);
}

pub(super) fn cross_entropy_backward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    backward_chunks(e, ins, outs, None)
}

/// A cross-entropy and its backward in one pass over the logits (see [`fusable_pair`]): the
/// backward's chunk loop also adds up the loss, so the logits are computed once.
pub(super) fn cross_entropy_fused(e: &mut Emit, fwd: &Step, bwd: &Step) -> Result<(), LowerError> {
    let loss = e.operand(fwd.outputs[0]);
    let ins: Vec<Operand> = bwd.inputs.iter().map(|&v| e.operand(v)).collect();
    let outs: Vec<Operand> = bwd.outputs.iter().map(|&v| e.operand(v)).collect();
    backward_chunks(e, &ins, &outs, Some(&loss))
}

/// Whether plan step `i` (a cross-entropy) and step `i + 1` (its backward on the same
/// operands) can be lowered as one at step `i`: the backward's gradient input is ready by then,
/// and no value's life ends at step `i` (the backward's outputs, written a step early, may
/// share bytes with values that die there).
pub(crate) fn fusable_pair(plan: &Plan, i: usize) -> bool {
    let (Some(fwd), Some(bwd)) = (plan.steps.get(i), plan.steps.get(i + 1)) else { return false };
    if !matches!(fwd.op, Op::CrossEntropy) || !matches!(bwd.op, Op::CrossEntropyBackward) {
        return false;
    }
    if fwd.inputs.len() != 3 || bwd.inputs.len() != 4 || fwd.inputs[..] != bwd.inputs[..3] {
        return false;
    }
    let ready = |v: ValueId| {
        plan.inputs.iter().chain(&plan.persistent).any(|(_, x)| *x == v)
            || plan.steps[..i].iter().any(|s| s.outputs.contains(&v))
    };
    let read_later = |v: ValueId| {
        plan.steps[i + 1..].iter().any(|s| s.inputs.contains(&v)) || plan.outputs.iter().any(|(_, x)| *x == v)
    };
    ready(bwd.inputs[3]) && fwd.outputs.iter().all(|&v| read_later(v))
}

fn backward_chunks(e: &mut Emit, ins: &[Operand], outs: &[Operand], loss: Option<&Operand>) -> Result<(), LowerError> {
    let (h, w, targets, g_loss) = (&ins[0], &ins[1], &ins[2], &ins[3]);
    let (gh, gw) = (&outs[0], &outs[1]);
    let vocab = vocab_of(w);
    let z = e.scratch(Extent::constant((CHUNK_ROWS * vocab * 4) as i64));
    let gz = e.scratch(Extent::constant((CHUNK_ROWS * vocab * 2) as i64));
    e.zero(gw.buf.clone(), super::bytes_of(gw));
    let (count, row_loss) = count_targets(e, h, targets);
    let tag = sig(&[h, w]);
    for (first, rows) in chunks(e, h) {
        let m = Extent::constant(rows as i64);
        chunk_logits(e, h, w, first, rows, &z);
        let k = rows_kernel(vocab, if loss.is_some() { Rows::Both } else { Rows::Grad }, &tag);
        let mut args = vec![Arg::Buffer(z.clone()), targets.arg(), Arg::Buffer(gz.clone())];
        if loss.is_some() {
            args.push(Arg::Buffer(row_loss.clone()));
        }
        args.extend([g_loss.arg(), Arg::Buffer(count.clone()), Arg::I64 { value: Extent::constant(first as i64) }]);
        e.launch(k, [GridDim::fixed(rows as i64), GridDim::fixed(1), GridDim::fixed(1)], 0, args);
        let g = MatrixArg { buffer: gz.clone(), dtype: DType::BF16, ld: vocab };
        // g_h[chunk] = G · w
        e.gemm(Gemm {
            m,
            n: Extent::constant(h.width as i64),
            k: Extent::constant(vocab as i64),
            a: g.clone(),
            trans_a: false,
            b: w.matrix(),
            trans_b: false,
            c: chunk_matrix(gh, first),
            alpha: 1.0,
            beta: 0.0,
        });
        // g_w += Gᵀ · h[chunk]
        e.gemm(Gemm {
            m: Extent::constant(vocab as i64),
            n: Extent::constant(h.width as i64),
            k: m,
            a: g,
            trans_a: true,
            b: chunk_matrix(h, first),
            trans_b: false,
            c: gw.matrix(),
            alpha: 1.0,
            beta: 1.0,
        });
    }
    if let Some(l) = loss {
        loss_sum(e, &row_loss, &count, h.rows(), l);
    }
    e.exact_shape();
    Ok(())
}
