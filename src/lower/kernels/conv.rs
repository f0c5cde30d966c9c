//! Mamba's causal depthwise convolution with bias and SiLU: forward, backward (pre-activation
//! recomputed), the decode state after a prompt, and one decode step. Threads own one
//! (token, channel) element; the kernel width is fixed at build time, so its taps unroll.

use super::super::{grid_1d, Emit, LowerError, Operand};
use super::{load_at, sig, store_at, THREADS};
use crate::lower::mlir::{Cmp, KernelBuilder, V};
use weft_runtime::device::{Arg, Extent, GridDim};

fn kernel_width(w: &Operand) -> u64 {
    w.width
}

/// Token index, channel and position in the sequence of the thread's element, with an
/// in-bounds flag; `rows` = B·T and `batch` = B are kernel parameters.
struct Element {
    row: V,
    col: V,
    pos: V,
    inside: V,
}

fn element(k: &mut KernelBuilder, channels: u64, rows: &V, batch: &V) -> Element {
    let tid = k.thread_id('x');
    let bid = k.block_id('x');
    let n = k.i64(k.block_threads());
    let base = k.mul(&bid, &n);
    let idx = k.add(&base, &tid);
    let c = k.i64(channels as i64);
    let row = k.div(&idx, &c);
    let col = k.rem(&idx, &c);
    let seq = k.div(rows, batch);
    let pos = k.rem(&row, &seq);
    let total = k.mul(rows, &c);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    Element { row, col, pos, inside }
}

/// `bias[c] + Σ_j w[c, j]·x[t + j − (K−1), c]`, zero-padded at the start of each sequence.
fn pre_activation(
    k: &mut KernelBuilder,
    x: (&V, &Operand),
    w: (&V, &Operand),
    bias: (&V, &Operand),
    el: &Element,
) -> V {
    let kw = kernel_width(w.1) as i64;
    let zero = k.i64(0);
    let mut acc = load_at(k, bias.0, bias.1, &zero, &el.col);
    for j in 0..kw {
        let back = kw - 1 - j;
        let wv = {
            let jj = k.i64(j);
            load_at(k, w.0, w.1, &el.col, &jj)
        };
        let b = k.i64(back);
        let ok = k.cmp(Cmp::Ge, &el.pos, &b);
        let src = k.sub(&el.row, &b);
        let src = k.select(&ok, &src, &el.row);
        let xv = load_at(k, x.0, x.1, &src, &el.col);
        let z = k.f32(0.0);
        let xv = k.select(&ok, &xv, &z);
        acc = k.fma(&wv, &xv, &acc);
    }
    acc
}

fn size_args(x: &Operand) -> Vec<Arg> {
    vec![Arg::I64 { value: x.rows() }, Arg::I64 { value: Extent::per_sequence(1) }]
}

pub(super) fn conv(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, b, y) = (&ins[0], &ins[1], &ins[2], &outs[0]);
    let ch = x.width;
    let name = format!("causal_conv1d_silu_c{ch}_k{}_{}", kernel_width(w), sig(&[x, w, b, y]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let (xp, wp, bp, yp) = (k.ptr("x"), k.ptr("weight"), k.ptr("bias"), k.ptr("y"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let el = element(&mut k, ch, &rows, &batch);
    k.if_(&el.inside.clone(), |k| {
        let p = pre_activation(k, (&xp, x), (&wp, w), (&bp, b), &el);
        let s = k.silu(&p);
        store_at(k, &s, &yp, y, &el.row, &el.col);
    });
    let mut args = vec![x.arg(), w.arg(), b.arg(), y.arg()];
    args.extend(size_args(x));
    e.launch(k, grid_1d(x.rows().times(ch as i64), THREADS as u64), 0, args);
    Ok(())
}

/// Token chunks of the weight-gradient kernel: each thread sums one channel over a chunk and
/// adds its partial sums atomically.
const WEIGHT_CHUNKS: i64 = 64;

pub(super) fn conv_backward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, b, g) = (&ins[0], &ins[1], &ins[2], &ins[3]);
    let (gx, gw, gb) = (&outs[0], &outs[1], &outs[2]);
    let ch = x.width;
    let kw = kernel_width(w) as i64;
    let tag = format!("c{ch}_k{kw}_{}", sig(&[x, w, b, g, gx, gw, gb]));
    // 1. gpre = g · silu'(pre) into scratch (f32, dense).
    let gpre_buf = e.scratch(x.rows().times(ch as i64 * 4));
    let gpre = Operand {
        buf: gpre_buf.clone(),
        ty: weft_runtime::TensorType::new(weft_runtime::DType::F32, x.ty.shape.clone()),
        width: ch,
        ld: ch,
    };
    {
        let mut k = KernelBuilder::new(&format!("causal_conv1d_silu_backward_pre_{tag}"), [THREADS, 1, 1]);
        let (xp, wp, bp, gp, pp) = (k.ptr("x"), k.ptr("weight"), k.ptr("bias"), k.ptr("g"), k.ptr("g_pre"));
        let rows = k.scalar_i64("rows");
        let batch = k.scalar_i64("batch");
        let el = element(&mut k, ch, &rows, &batch);
        k.if_(&el.inside.clone(), |k| {
            let p = pre_activation(k, (&xp, x), (&wp, w), (&bp, b), &el);
            let s = k.sigmoid(&p);
            let one = k.f32(1.0);
            let oms = k.sub(&one, &s);
            let t = k.fma(&p, &oms, &one);
            let d = k.mul(&s, &t);
            let gv = load_at(k, &gp, g, &el.row, &el.col);
            let r = k.mul(&gv, &d);
            store_at(k, &r, &pp, &gpre, &el.row, &el.col);
        });
        let mut args = vec![x.arg(), w.arg(), b.arg(), g.arg(), gpre.arg()];
        args.extend(size_args(x));
        e.launch(k, grid_1d(x.rows().times(ch as i64), THREADS as u64), 0, args);
    }
    // 2. g_x[s, c] = Σ_j w[c, j]·gpre[s + (K−1) − j, c] within the sequence.
    {
        let mut k = KernelBuilder::new(&format!("causal_conv1d_silu_backward_x_{tag}"), [THREADS, 1, 1]);
        let (wp, pp, gxp) = (k.ptr("weight"), k.ptr("g_pre"), k.ptr("g_x"));
        let rows = k.scalar_i64("rows");
        let batch = k.scalar_i64("batch");
        let el = element(&mut k, ch, &rows, &batch);
        k.if_(&el.inside.clone(), |k| {
            let seq = k.div(&rows, &batch);
            let mut acc = k.f32(0.0);
            for j in 0..kw {
                let ahead = k.i64(kw - 1 - j);
                let t = k.add(&el.pos, &ahead);
                let ok = k.cmp(Cmp::Lt, &t, &seq);
                let src = k.add(&el.row, &ahead);
                let src = k.select(&ok, &src, &el.row);
                let gv = load_at(k, &pp, &gpre, &src, &el.col);
                let z = k.f32(0.0);
                let gv = k.select(&ok, &gv, &z);
                let jj = k.i64(j);
                let wv = load_at(k, &wp, w, &el.col, &jj);
                acc = k.fma(&wv, &gv, &acc);
            }
            store_at(k, &acc, &gxp, gx, &el.row, &el.col);
        });
        let mut args = vec![w.arg(), gpre.arg(), gx.arg()];
        args.extend(size_args(x));
        e.launch(k, grid_1d(x.rows().times(ch as i64), THREADS as u64), 0, args);
    }
    // 3. g_w[c, j] = Σ_t gpre[t, c]·x[t + j − (K−1), c], g_bias[c] = Σ_t gpre[t, c].
    e.zero(gw.buf.clone(), super::bytes_of(gw));
    e.zero(gb.buf.clone(), super::bytes_of(gb));
    {
        let mut k = KernelBuilder::new(&format!("causal_conv1d_silu_backward_w_{tag}"), [THREADS, 1, 1]);
        let (xp, pp, gwp, gbp) = (k.ptr("x"), k.ptr("g_pre"), k.ptr("g_weight"), k.ptr("g_bias"));
        let rows = k.scalar_i64("rows");
        let batch = k.scalar_i64("batch");
        let tid = k.thread_id('x');
        let bid = k.block_id('x');
        let n = k.i64(THREADS as i64);
        let cb = k.mul(&bid, &n);
        let c = k.add(&cb, &tid);
        let chunk = k.block_id('y');
        let chunks = k.i64(WEIGHT_CHUNKS);
        let chv = k.i64(ch as i64);
        let ok = k.cmp(Cmp::Lt, &c, &chv);
        k.if_(&ok, |k| {
            let seq = k.div(&rows, &batch);
            let per = k.add(&rows, &chunks);
            let one = k.i64(1);
            let per = k.sub(&per, &one);
            let per = k.div(&per, &chunks);
            let lo = k.mul(&chunk, &per);
            let hi = k.add(&lo, &per);
            let hi = k.min(&hi, &rows);
            let zero = k.f32(0.0);
            let init: Vec<V> = (0..=kw).map(|_| zero.clone()).collect();
            let sums = k.for_(&lo, &hi, 1, &init, |k, r, acc| {
                let gv = load_at(k, &pp, &gpre, &r, &c);
                let pos = k.rem(&r, &seq);
                let mut out = Vec::new();
                for j in 0..kw {
                    let back = k.i64(kw - 1 - j);
                    let okp = k.cmp(Cmp::Ge, &pos, &back);
                    let src = k.sub(&r, &back);
                    let src = k.select(&okp, &src, &r);
                    let xv = load_at(k, &xp, x, &src, &c);
                    let z = k.f32(0.0);
                    let xv = k.select(&okp, &xv, &z);
                    out.push(k.fma(&gv, &xv, &acc[j as usize]));
                }
                out.push(k.add(&gv, &acc[kw as usize]));
                out
            });
            for j in 0..kw {
                let kwv = k.i64(kw);
                let i = k.mul(&c, &kwv);
                let jj = k.i64(j);
                let i = k.add(&i, &jj);
                k.atomic_add(&sums[j as usize], &gwp, &i);
            }
            k.atomic_add(&sums[kw as usize], &gbp, &c);
        });
        let mut args = vec![x.arg(), gpre.arg(), gw.arg(), gb.arg()];
        args.extend(size_args(x));
        let grid = [
            GridDim { extent: Extent::constant(ch as i64), per_block: THREADS as u64 },
            GridDim::fixed(WEIGHT_CHUNKS),
            GridDim::fixed(1),
        ];
        e.launch(k, grid, 0, args);
    }
    Ok(())
}

/// `state[b, j, c] = x[b, T − (K−1) + j, c]`, zero before the start.
pub(super) fn conv_state(e: &mut Emit, width: u64, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, s) = (&ins[0], &outs[0]);
    let ch = x.width;
    let keep = width as i64 - 1;
    let name = format!("conv_state_c{ch}_k{width}_{}", sig(&[x, s]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let (xp, sp) = (k.ptr("x"), k.ptr("state"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let tid = k.thread_id('x');
    let bid = k.block_id('x');
    let n = k.i64(THREADS as i64);
    let base = k.mul(&bid, &n);
    let idx = k.add(&base, &tid);
    let c = k.i64(ch as i64);
    let keepv = k.i64(keep);
    let per_seq = k.mul(&keepv, &c);
    let total = k.mul(&batch, &per_seq);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let bi = k.div(&idx, &per_seq);
        let rem = k.rem(&idx, &per_seq);
        let j = k.div(&rem, &c);
        let col = k.rem(&rem, &c);
        let seq = k.div(&rows, &batch);
        let t = k.sub(&seq, &keepv);
        let t = k.add(&t, &j);
        let zero = k.i64(0);
        let ok = k.cmp(Cmp::Ge, &t, &zero);
        let row = k.mul(&bi, &seq);
        let row = k.add(&row, &t);
        let row = k.select(&ok, &row, &zero);
        let v = load_at(k, &xp, x, &row, &col);
        let z = k.f32(0.0);
        let v = k.select(&ok, &v, &z);
        let srow = k.mul(&bi, &keepv);
        let srow = k.add(&srow, &j);
        store_at(k, &v, &sp, s, &srow, &col);
    });
    let mut args = vec![x.arg(), s.arg()];
    args.extend(size_args(x));
    e.launch(k, grid_1d(Extent::per_sequence(keep * ch as i64), THREADS as u64), 0, args);
    Ok(())
}

/// One decode step: `y = silu(bias + Σ_j<K−1 w[c, j]·state[j] + w[c, K−1]·x)`, the state shifted.
pub(super) fn conv_step(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, b, s) = (&ins[0], &ins[1], &ins[2], &ins[3]);
    let (y, s2) = (&outs[0], &outs[1]);
    let ch = x.width;
    let kw = kernel_width(w) as i64;
    let keep = kw - 1;
    let name = format!("causal_conv1d_silu_step_c{ch}_k{kw}_{}", sig(&[x, w, b, s, y, s2]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let (xp, wp, bp, sp, yp, s2p) =
        (k.ptr("x"), k.ptr("weight"), k.ptr("bias"), k.ptr("state"), k.ptr("y"), k.ptr("state_out"));
    let batch = k.scalar_i64("batch");
    let tid = k.thread_id('x');
    let bid = k.block_id('x');
    let n = k.i64(THREADS as i64);
    let base = k.mul(&bid, &n);
    let idx = k.add(&base, &tid);
    let c = k.i64(ch as i64);
    let total = k.mul(&batch, &c);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let bi = k.div(&idx, &c);
        let col = k.rem(&idx, &c);
        let zero = k.i64(0);
        let mut acc = load_at(k, &bp, b, &zero, &col);
        let keepv = k.i64(keep);
        let srow0 = k.mul(&bi, &keepv);
        let mut window = Vec::new();
        for j in 0..keep {
            let jj = k.i64(j);
            let r = k.add(&srow0, &jj);
            window.push(load_at(k, &sp, s, &r, &col));
        }
        let xv = load_at(k, &xp, x, &bi, &col);
        window.push(xv);
        for (j, v) in window.iter().enumerate() {
            let jj = k.i64(j as i64);
            let wv = load_at(k, &wp, w, &col, &jj);
            acc = k.fma(&wv, v, &acc);
        }
        let out = k.silu(&acc);
        store_at(k, &out, &yp, y, &bi, &col);
        for j in 0..keep {
            let jj = k.i64(j);
            let r = k.add(&srow0, &jj);
            store_at(k, &window[j as usize + 1], &s2p, s2, &r, &col);
        }
    });
    let args = vec![x.arg(), w.arg(), b.arg(), s.arg(), y.arg(), s2.arg(), Arg::I64 { value: Extent::per_sequence(1) }];
    e.launch(k, grid_1d(Extent::per_sequence(ch as i64), THREADS as u64), 0, args);
    Ok(())
}
