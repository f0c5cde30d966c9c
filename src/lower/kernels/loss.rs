//! The head and the loss: cross-entropy over chunks of rows (one chunk of logits exists at a
//! time, in scratch), and the plain logits for inference. The matrix products are cuBLASLt's;
//! the kernels do the row-wise softmax work.

use super::super::{Emit, LowerError, Operand};
use super::{sig, THREADS};
use crate::lower::mlir::{Cmp, KernelBuilder, Ty};
use weft_runtime::device::{Arg, BufferArg, Extent, Gemm, GridDim, MatrixArg};
use weft_runtime::DType;

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

/// The row-wise kernel: per row of `z` (f32 logits), `lse = log Σ exp z`; forward: `loss +=
/// (lse − z[target]) / N`; backward: `G = (softmax(z) − onehot)·g_loss/N` as bf16.
fn rows_kernel(vocab: u64, backward: bool, tag: &str) -> KernelBuilder {
    let family = if backward { "cross_entropy_backward_rows" } else { "cross_entropy_rows" };
    let mut k = KernelBuilder::new(&format!("{family}_v{vocab}_{tag}"), [THREADS, 1, 1]);
    let zp = k.ptr("logits");
    let tp = k.ptr("targets");
    let out = k.ptr(if backward { "g_logits" } else { "loss" });
    let gl = if backward { Some(k.ptr("g_loss")) } else { None };
    let first = k.scalar_i64("first_row");
    let total = k.scalar_i64("total_rows");
    let scratch = k.shared("partial", Ty::F32, (THREADS / 32) as u64);
    let row = k.block_id('x');
    let tid = k.thread_id('x');
    let v = k.i64(vocab as i64);
    let base = k.mul(&row, &v);
    let ninf = k.f32(f32::NEG_INFINITY);
    let m = k.for_(&tid, &v, THREADS as i64, &[ninf], |k, j, acc| {
        let i = k.add(&base, &j);
        let z = k.load(&zp, &i, Ty::F32);
        vec![k.max(&acc[0], &z)]
    });
    let m = k.block_max(&m[0], &scratch);
    let zero = k.f32(0.0);
    let s = k.for_(&tid, &v, THREADS as i64, &[zero], |k, j, acc| {
        let i = k.add(&base, &j);
        let z = k.load(&zp, &i, Ty::F32);
        let d = k.sub(&z, &m);
        let ex = k.exp(&d);
        vec![k.add(&acc[0], &ex)]
    });
    let s = k.block_sum(&s[0], &scratch);
    let ls = k.ln(&s);
    let lse = k.add(&m, &ls);
    let grow = k.add(&first, &row);
    let t = k.load(&tp, &grow, Ty::I32);
    let t = k.cast(&t, Ty::I64);
    let n = k.cast(&total, Ty::F32);
    match gl {
        None => {
            let z0 = k.i64(0);
            let is0 = k.cmp(Cmp::Eq, &tid, &z0);
            k.if_(&is0, |k| {
                let i = k.add(&base, &t);
                let zt = k.load(&zp, &i, Ty::F32);
                let l = k.sub(&lse, &zt);
                let l = k.div(&l, &n);
                let zi = k.i64(0);
                k.atomic_add(&l, &out, &zi);
            });
        }
        Some(gl) => {
            let zi = k.i64(0);
            let g = k.load(&gl, &zi, Ty::F32);
            let scale = k.div(&g, &n);
            k.for_(&tid, &v, THREADS as i64, &[], |k, j, _| {
                let i = k.add(&base, &j);
                let z = k.load(&zp, &i, Ty::F32);
                let d = k.sub(&z, &lse);
                let p = k.exp(&d);
                let p = k.mul(&p, &scale);
                let hit = k.cmp(Cmp::Eq, &j, &t);
                let q = k.sub(&p, &scale);
                let r = k.select(&hit, &q, &p);
                k.store(&r, &out, &i, Ty::BF16);
                vec![]
            });
        }
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
    e.zero(loss.buf.clone(), Extent::constant(4));
    let tag = sig(&[h, w]);
    for (first, rows) in chunks(e, h) {
        chunk_logits(e, h, w, first, rows, &z);
        let k = rows_kernel(vocab, false, &tag);
        let args = vec![
            Arg::Buffer(z.clone()),
            targets.arg(),
            loss.arg(),
            Arg::I64 { value: Extent::constant(first as i64) },
            Arg::I64 { value: h.rows() },
        ];
        e.launch(k, [GridDim::fixed(rows as i64), GridDim::fixed(1), GridDim::fixed(1)], 0, args);
    }
    e.exact_shape();
    Ok(())
}

pub(super) fn cross_entropy_backward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (h, w, targets, g_loss) = (&ins[0], &ins[1], &ins[2], &ins[3]);
    let (gh, gw) = (&outs[0], &outs[1]);
    let vocab = vocab_of(w);
    let z = e.scratch(Extent::constant((CHUNK_ROWS * vocab * 4) as i64));
    let gz = e.scratch(Extent::constant((CHUNK_ROWS * vocab * 2) as i64));
    e.zero(gw.buf.clone(), super::bytes_of(gw));
    let tag = sig(&[h, w]);
    for (first, rows) in chunks(e, h) {
        let m = Extent::constant(rows as i64);
        chunk_logits(e, h, w, first, rows, &z);
        let k = rows_kernel(vocab, true, &tag);
        let args = vec![
            Arg::Buffer(z.clone()),
            targets.arg(),
            Arg::Buffer(gz.clone()),
            g_loss.arg(),
            Arg::I64 { value: Extent::constant(first as i64) },
            Arg::I64 { value: h.rows() },
        ];
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
    e.exact_shape();
    Ok(())
}
