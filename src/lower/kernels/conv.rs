//! Mamba's causal depthwise convolution with bias and SiLU: forward, backward (pre-activation
//! recomputed), the decode state after a prompt, and one decode step. The forward and backward
//! walk chunks of tokens per channel (see `chunks`); the kernel width is fixed at build time, so
//! its taps unroll.

use super::super::{grid_1d, Emit, LowerError, Operand};
use super::chunks::{channel, chunk_grid, chunk_pos, sum_over_chunks, unrolled, ChunkPos, CHUNK};
use super::{load_at, sig, store_at, THREADS};
use crate::lower::mlir::{Cmp, KernelBuilder, V};
use weft_runtime::device::{Arg, Extent};

fn kernel_width(w: &Operand) -> u64 {
    w.width
}

fn size_args(x: &Operand) -> Vec<Arg> {
    vec![Arg::I64 { value: x.rows() }, Arg::I64 { value: Extent::per_sequence(1) }]
}

/// Threads per block of the chunked passes: consecutive channels of one (sequence, chunk).
const CHANNELS: u32 = 128;
/// Tokens per trip of the chunked passes' loops (their loads in flight together).
const UNROLL: i64 = 4;

/// `x[row0 + t, c]`, zero outside `0 ≤ t < limit` (before the sequence, or past it).
#[allow(clippy::too_many_arguments)]
fn x_at(k: &mut KernelBuilder, p: &V, x: &Operand, cp: &ChunkPos, t: &V, limit: &V, c: &V) -> V {
    let zero = k.i64(0);
    let ge = k.cmp(Cmp::Ge, t, &zero);
    let lt = k.cmp(Cmp::Lt, t, limit);
    let ok = k.and(&ge, &lt);
    let tc = k.select(&ok, t, &zero);
    let row = k.add(&cp.row0, &tc);
    let v = load_at(k, p, x, &row, c);
    let z = k.f32(0.0);
    k.select(&ok, &v, &z)
}

/// `bias + Σ_j w_j·window_j` over the K inputs ending at a token.
fn pre_activation(k: &mut KernelBuilder, bias: &V, taps: &[V], window: &[V]) -> V {
    let mut acc = bias.clone();
    for (w, x) in taps.iter().zip(window) {
        acc = k.fma(w, x, &acc);
    }
    acc
}

/// `silu'(p) = σ(p)·(1 + p·(1 − σ(p)))`.
fn silu_grad(k: &mut KernelBuilder, p: &V) -> V {
    let s = k.sigmoid(p);
    let one = k.f32(1.0);
    let oms = k.sub(&one, &s);
    let t = k.fma(p, &oms, &one);
    k.mul(&s, &t)
}

/// The thread's channel, whether it is one, its taps and its bias.
fn channel_taps(k: &mut KernelBuilder, ch: u64, kw: i64, w: (&V, &Operand), b: (&V, &Operand)) -> (V, V, Vec<V>, V) {
    let c = channel(k);
    let chv = k.i64(ch as i64);
    let ok = k.cmp(Cmp::Lt, &c, &chv);
    let last = k.i64(ch as i64 - 1);
    let cc = k.min(&c, &last);
    let taps = (0..kw)
        .map(|j| {
            let jj = k.i64(j);
            load_at(k, w.0, w.1, &cc, &jj)
        })
        .collect();
    let zero = k.i64(0);
    let bias = load_at(k, b.0, b.1, &zero, &cc);
    (cc, ok, taps, bias)
}

/// Forward: one thread per (sequence, chunk, channel) walks the chunk's tokens keeping the last
/// K−1 inputs in registers, so each input is read once (plus K−1 before the chunk).
pub(super) fn conv(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, b, y) = (&ins[0], &ins[1], &ins[2], &outs[0]);
    let ch = x.width;
    let kw = kernel_width(w) as i64;
    let name = format!("causal_conv1d_silu_c{ch}_k{kw}_q{CHUNK}_{}", sig(&[x, w, b, y]));
    let mut k = KernelBuilder::new(&name, [CHANNELS, 1, 1]);
    let (xp, wp, bp, yp) = (k.ptr("x"), k.ptr("weight"), k.ptr("bias"), k.ptr("y"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let (c, is_channel, taps, bias) = channel_taps(&mut k, ch, kw, (&wp, w), (&bp, b));
    let cp = chunk_pos(&mut k, &rows, &batch);
    let run = k.and(&cp.live, &is_channel);
    k.if_(&run, |k| {
        let window: Vec<V> = (0..kw - 1)
            .map(|j| {
                let off = k.i64(kw - 1 - j);
                let t = k.sub(&cp.t0, &off);
                x_at(k, &xp, x, &cp, &t, &cp.seq, &c)
            })
            .collect();
        unrolled(k, &cp.t0, &cp.t1, UNROLL, &window, |k, t, valid, win| {
            let one = k.i64(1);
            let last = k.sub(&cp.t1, &one);
            let tc = k.min(t, &last);
            let row = k.add(&cp.row0, &tc);
            let xt = load_at(k, &xp, x, &row, &c);
            let mut full = win.to_vec();
            full.push(xt);
            let p = pre_activation(k, &bias, &taps, &full);
            let s = k.silu(&p);
            k.if_(valid, |k| store_at(k, &s, &yp, y, &row, &c));
            full[1..].to_vec()
        });
    });
    let mut args = vec![x.arg(), w.arg(), b.arg(), y.arg()];
    args.extend(size_args(x));
    e.launch(k, chunk_grid(ch.div_ceil(CHANNELS as u64)), 0, args);
    Ok(())
}

/// Backward: one thread per (sequence, chunk, channel) walks the chunk backwards, keeping the
/// inputs of the current window and the pre-activation gradients of the next K−1 tokens (those
/// past the chunk recomputed), so `g_x_t = Σ_j w_j·g_pre_{t+K−1−j}` needs no second pass; the
/// chunk's sums for g_w and g_bias go to per-chunk partials that a second kernel adds in chunk
/// order.
pub(super) fn conv_backward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, b, g) = (&ins[0], &ins[1], &ins[2], &ins[3]);
    let (gx, gw, gb) = (&outs[0], &outs[1], &outs[2]);
    let ch = x.width;
    let kw = kernel_width(w) as i64;
    let tag = format!("c{ch}_k{kw}_q{CHUNK}_{}", sig(&[x, w, b, g, gx, gw, gb]));
    let per_chunk = ((kw + 1) * ch as i64) * 4;
    let partial = e.scratch(Extent { bt: (per_chunk + CHUNK - 1) / CHUNK, b: per_chunk, c: 0 });
    let mut k = KernelBuilder::new(&format!("causal_conv1d_silu_backward_{tag}"), [CHANNELS, 1, 1]);
    let (xp, wp, bp, gp, gxp, pp) =
        (k.ptr("x"), k.ptr("weight"), k.ptr("bias"), k.ptr("g"), k.ptr("g_x"), k.ptr("partial"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let (c, is_channel, taps, bias) = channel_taps(&mut k, ch, kw, (&wp, w), (&bp, b));
    let cp = chunk_pos(&mut k, &rows, &batch);
    let run = k.and(&cp.live, &is_channel);
    let keep = (kw - 1) as usize;
    k.if_(&run, |k| {
        // g_pre of token s (zero past the sequence), from its inputs.
        let g_pre = |k: &mut KernelBuilder, s: &V, window: &[V]| -> V {
            let p = pre_activation(k, &bias, &taps, window);
            let d = silu_grad(k, &p);
            let gv = x_at(k, &gp, g, &cp, s, &cp.seq, &c);
            k.mul(&gv, &d)
        };
        let inputs = |k: &mut KernelBuilder, s: &V| -> Vec<V> {
            (0..kw)
                .map(|j| {
                    let off = k.i64(kw - 1 - j);
                    let t = k.sub(s, &off);
                    x_at(k, &xp, x, &cp, &t, &cp.seq, &c)
                })
                .collect()
        };
        // Carried: inputs x_{t−K+2..t} (after the step: of the token before), g_pre_{t+1..t+K−1},
        // then the sums of g_w and g_bias.
        let one = k.i64(1);
        let t_last = k.sub(&cp.t1, &one);
        let mut init = inputs(k, &t_last)[1..].to_vec();
        for a in 1..kw {
            let off = k.i64(a);
            let s = k.add(&t_last, &off);
            let win = inputs(k, &s);
            init.push(g_pre(k, &s, &win));
        }
        let zf = k.f32(0.0);
        init.extend((0..=kw).map(|_| zf.clone()));
        let len = k.sub(&cp.t1, &cp.t0);
        let zero = k.i64(0);
        let fin = unrolled(k, &zero, &len, UNROLL, &init, |k, i, valid, cur| {
            let one = k.i64(1);
            let t = k.sub(&cp.t1, &one);
            let t = k.sub(&t, i);
            let t = k.max(&t, &cp.t0);
            let row = k.add(&cp.row0, &t);
            let off = k.i64(kw - 1);
            let first = k.sub(&t, &off);
            let oldest = x_at(k, &xp, x, &cp, &first, &cp.seq, &c);
            let mut window = vec![oldest];
            window.extend(cur[..keep].iter().take(keep).cloned());
            // cur[..keep] holds x_{t−K+2..t}.
            let future = &cur[keep..2 * keep];
            let gt = g_pre(k, &t, &window);
            // g_x_t = w_{K−1}·g_pre_t + Σ_{a≥1} w_{K−1−a}·g_pre_{t+a}.
            let mut gxv = k.mul(&taps[keep], &gt);
            for (a, f) in future.iter().enumerate() {
                gxv = k.fma(&taps[keep - 1 - a], f, &gxv);
            }
            k.if_(valid, |k| store_at(k, &gxv, &gxp, gx, &row, &c));
            let mut out: Vec<V> = window[..keep].to_vec();
            out.push(gt.clone());
            out.extend(future[..keep - 1].iter().cloned());
            for (j, xv) in window.iter().enumerate() {
                out.push(k.fma(&gt, xv, &cur[2 * keep + j]));
            }
            out.push(k.add(&gt, &cur[2 * keep + kw as usize]));
            out
        });
        let kv1 = (kw + 1) as u64;
        for q in 0..=kw as usize {
            let qv = k.i64(q as i64);
            let kvv = k.i64(kv1 as i64);
            let r = k.mul(&cp.index, &kvv);
            let r = k.add(&r, &qv);
            let chv = k.i64(ch as i64);
            let r = k.mul(&r, &chv);
            let r = k.add(&r, &c);
            k.store(&fin[2 * keep + q], &pp, &r, crate::lower::mlir::Ty::F32);
        }
    });
    let mut args = vec![x.arg(), w.arg(), b.arg(), g.arg(), gx.arg(), Arg::Buffer(partial.clone())];
    args.extend(size_args(x));
    e.launch(k, chunk_grid(ch.div_ceil(CHANNELS as u64)), 0, args);

    // g_w[c, j] and g_bias[c]: the chunks' sums in chunk order.
    let mut k = KernelBuilder::new(&format!("causal_conv1d_silu_backward_params_{tag}"), [THREADS, 1, 1]);
    let (pp, gwp, gbp) = (k.ptr("partial"), k.ptr("g_weight"), k.ptr("g_bias"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let idx = channel(&mut k);
    let chv = k.i64(ch as i64);
    let q = k.div(&idx, &chv);
    let c = k.rem(&idx, &chv);
    let nq = k.i64(kw + 1);
    let inside = k.cmp(Cmp::Lt, &q, &nq);
    k.if_(&inside, |k| {
        let sum = [sum_over_chunks(k, &rows, &batch, &pp, kw + 1, &q, &c, ch as i64)];
        let kwv = k.i64(kw);
        let is_w = k.cmp(Cmp::Lt, &q, &kwv);
        k.if_(&is_w, |k| store_at(k, &sum[0], &gwp, gw, &c, &q));
        let is_b = k.cmp(Cmp::Eq, &q, &kwv);
        let z = k.i64(0);
        k.if_(&is_b, |k| store_at(k, &sum[0], &gbp, gb, &z, &c));
    });
    let args = vec![
        Arg::Buffer(partial),
        gw.arg(),
        gb.arg(),
        Arg::I64 { value: Extent::per_token(1) },
        Arg::I64 { value: Extent::per_sequence(1) },
    ];
    e.launch(k, grid_1d(Extent::constant((kw + 1) * ch as i64), THREADS as u64), 0, args);
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
    let idx = channel(&mut k);
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
    if e.max_shape().1 > 1 {
        return conv_chunk(e, ins, outs);
    }
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
    let idx = channel(&mut k);
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

/// A chunk of T tokens continuing from the carried state (the `chunk` plan): thread (b, c)
/// walks the chunk in order with the channel's last `kw - 1` inputs in registers, and leaves
/// the last `kw - 1` inputs (from the carried state where the chunk is shorter) as the state.
fn conv_chunk(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, b, s) = (&ins[0], &ins[1], &ins[2], &ins[3]);
    let (y, s2) = (&outs[0], &outs[1]);
    let ch = x.width;
    let kw = kernel_width(w) as i64;
    let keep = kw - 1;
    let name = format!("causal_conv1d_silu_chunk_c{ch}_k{kw}_{}", sig(&[x, w, b, s, y, s2]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let (xp, wp, bp, sp, yp, s2p) =
        (k.ptr("x"), k.ptr("weight"), k.ptr("bias"), k.ptr("state"), k.ptr("y"), k.ptr("state_out"));
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let idx = channel(&mut k);
    let c = k.i64(ch as i64);
    let total = k.mul(&batch, &c);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let bi = k.div(&idx, &c);
        let col = k.rem(&idx, &c);
        let t_len = k.div(&tokens, &batch);
        let row0 = k.mul(&bi, &t_len);
        let zero = k.i64(0);
        let bias = load_at(k, &bp, b, &zero, &col);
        let weights: Vec<V> = (0..kw)
            .map(|j| {
                let jj = k.i64(j);
                load_at(k, &wp, w, &col, &jj)
            })
            .collect();
        let keepv = k.i64(keep);
        let srow0 = k.mul(&bi, &keepv);
        let window: Vec<V> = (0..keep)
            .map(|j| {
                let jj = k.i64(j);
                let r = k.add(&srow0, &jj);
                load_at(k, &sp, s, &r, &col)
            })
            .collect();
        let last = k.for_(&zero, &t_len, 1, &window, |k, t, win| {
            let row = k.add(&row0, &t);
            let xv = load_at(k, &xp, x, &row, &col);
            let mut acc = bias.clone();
            for (wv, v) in weights.iter().zip(win.iter().chain(std::iter::once(&xv))) {
                acc = k.fma(wv, v, &acc);
            }
            let out = k.silu(&acc);
            store_at(k, &out, &yp, y, &row, &col);
            win[1..].iter().cloned().chain(std::iter::once(xv)).collect()
        });
        for (j, v) in last.iter().enumerate() {
            let jj = k.i64(j as i64);
            let r = k.add(&srow0, &jj);
            store_at(k, v, &s2p, s2, &r, &col);
        }
    });
    let args = vec![
        x.arg(),
        w.arg(),
        b.arg(),
        s.arg(),
        y.arg(),
        s2.arg(),
        Arg::I64 { value: Extent::per_sequence(1) },
        Arg::I64 { value: Extent::per_token(1) },
    ];
    e.launch(k, grid_1d(Extent::per_sequence(ch as i64), THREADS as u64), 0, args);
    Ok(())
}
