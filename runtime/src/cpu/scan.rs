//! Mamba-1 selective scan with the softplus Δ bias, the D skip and the SiLU(z) gate
//! (kernels.md §4, samba.md §1.3): forward, backward, one-token decode and prefill state.
//!
//! Per sequence and channel c the scan is a diagonal linear recurrence over the N state entries:
//! ```text
//! Δ_t = softplus(δ_t + β[c]),  A = −exp(A_log),  h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t
//! y_t = C_t · h_t + D[c] u_t,  out_t = y_t · silu(z_t)
//! ```
//! Work is split into tasks of (sequence, block of `CHANNEL_BLOCK` channels). The partition does
//! not depend on the thread count, each output has one writer, and every sum over channels,
//! tokens or sequences runs in a fixed order, so results are bit-identical however rayon
//! schedules the tasks.

use std::ops::Range;

use rayon::prelude::*;

use super::layout::{block_count, check_len, put_columns};
use super::Real;

/// Sizes of one scan call.
#[derive(Clone, Copy, Debug)]
pub struct ScanDims {
    pub batch: usize,
    pub seq: usize,
    /// E, the inner width (one independent recurrence per channel).
    pub channels: usize,
    /// N, the state size per channel.
    pub state: usize,
}

/// Channels per task: fixed, so the partition (and every sum order) never depends on threads.
const CHANNEL_BLOCK: usize = 16;

/// The backward keeps the state every this many tokens and recomputes the tokens between.
const CHECKPOINT_EVERY: usize = 16;

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

fn silu<T: Real>(x: T) -> T {
    x * sigmoid(x)
}

fn silu_grad<T: Real>(x: T) -> T {
    let s = sigmoid(x);
    s * (T::one() + x * (T::one() - s))
}

/// softplus with mamba's threshold: the identity above 20, ln(1 + eˣ) otherwise.
fn softplus<T: Real>(x: T) -> T {
    if x > T::of(20.0) {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Derivative of [`softplus`] as defined (1 on the identity branch).
fn softplus_grad<T: Real>(x: T) -> T {
    if x > T::of(20.0) {
        T::one()
    } else {
        sigmoid(x)
    }
}

/// A = −exp(A_log) for a run of rows of A_log.
fn neg_exp<T: Real>(a_log: &[T]) -> Vec<T> {
    a_log.iter().map(|&v| -v.exp()).collect()
}

/// One token of one channel: h ← exp(ΔA) ⊙ h + Δu·B; `abar` receives exp(ΔA).
fn advance_channel<T: Real>(dt: T, u: T, a: &[T], b: &[T], h: &mut [T], abar: &mut [T]) {
    let du = dt * u;
    for (((h, ab), &a), &b) in h.iter_mut().zip(abar.iter_mut()).zip(a).zip(b) {
        *ab = (dt * a).exp();
        *h = *ab * *h + du * b;
    }
}

/// C · h, summed in index order.
fn readout<T: Real>(c: &[T], h: &[T]) -> T {
    c.iter().zip(h).fold(T::zero(), |acc, (&c, &h)| acc + c * h)
}

/// The inputs of one call, with the index arithmetic every pass shares. Arguments a pass does not
/// need (d and z for the prefill state) are empty.
#[derive(Clone, Copy)]
struct Inputs<'a, T> {
    dims: ScanDims,
    u: &'a [T],
    delta: &'a [T],
    a_log: &'a [T],
    b: &'a [T],
    c: &'a [T],
    d: &'a [T],
    dt_bias: &'a [T],
    z: &'a [T],
}

impl<T: Real> Inputs<'_, T> {
    fn check(&self, kernel: &str, with_gate: bool) {
        let ScanDims { batch, seq, channels: e, state: n } = self.dims;
        assert!(n > 0, "{kernel}: the state size must be positive");
        let tokens = batch * seq;
        check_len(kernel, "u", self.u, tokens * e);
        check_len(kernel, "delta", self.delta, tokens * e);
        check_len(kernel, "a_log", self.a_log, e * n);
        check_len(kernel, "b", self.b, tokens * n);
        check_len(kernel, "c", self.c, tokens * n);
        check_len(kernel, "dt_bias", self.dt_bias, e);
        if with_gate {
            check_len(kernel, "d", self.d, e);
            check_len(kernel, "z", self.z, tokens * e);
        }
    }

    fn block_width(&self, block: usize) -> usize {
        CHANNEL_BLOCK.min(self.dims.channels - block * CHANNEL_BLOCK)
    }

    /// Runs tokens `ts` of sequence `bi` over channels `c0..c0 + h.len()/N`, whose states `h`
    /// (`[channels, N]`) are updated in place; after each (token, channel) `visit(t, ci, h_c, Ā)`.
    fn scan_block(
        &self,
        bi: usize,
        c0: usize,
        a: &[T],
        h: &mut [T],
        ts: Range<usize>,
        mut visit: impl FnMut(usize, usize, &[T], &[T]),
    ) {
        let (e, n) = (self.dims.channels, self.dims.state);
        let mut abar = vec![T::zero(); n];
        for t in ts {
            let tok = bi * self.dims.seq + t;
            let b = &self.b[tok * n..][..n];
            for (ci, (hc, ac)) in h.chunks_mut(n).zip(a.chunks(n)).enumerate() {
                let (ch, x) = (c0 + ci, tok * e + c0 + ci);
                let dt = softplus(self.delta[x] + self.dt_bias[ch]);
                advance_channel(dt, self.u[x], ac, b, hc, &mut abar);
                visit(t, ci, hc, &abar);
            }
        }
    }

    /// Gated outputs of one (sequence, channel block) for the whole sequence: `[seq, width]`.
    fn forward_block(&self, bi: usize, block: usize) -> Vec<T> {
        let (seq, e, n) = (self.dims.seq, self.dims.channels, self.dims.state);
        let (c0, cw) = (block * CHANNEL_BLOCK, self.block_width(block));
        let a = neg_exp(&self.a_log[c0 * n..(c0 + cw) * n]);
        let mut h = vec![T::zero(); cw * n];
        let mut out = vec![T::zero(); seq * cw];
        self.scan_block(bi, c0, &a, &mut h, 0..seq, |t, ci, hc, _| {
            let tok = bi * seq + t;
            let x = tok * e + c0 + ci;
            let y = readout(&self.c[tok * n..][..n], hc) + self.d[c0 + ci] * self.u[x];
            out[t * cw + ci] = y * silu(self.z[x]);
        });
        out
    }
}

/// Forward: `out = (C·h + D u) ⊙ silu(z)` for every token.
///
/// u, delta, z: `[batch, seq, E]`; b, c: `[batch, seq, N]`; a_log: `[E, N]`; d, dt_bias: `[E]`;
/// out: `[batch, seq, E]` (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_fwd<T: Real>(
    dims: ScanDims,
    u: &[T],
    delta: &[T],
    a_log: &[T],
    b: &[T],
    c: &[T],
    d: &[T],
    dt_bias: &[T],
    z: &[T],
    out: &mut [T],
) {
    let inp = Inputs { dims, u, delta, a_log, b, c, d, dt_bias, z };
    inp.check("selective_scan_fwd", true);
    check_len("selective_scan_fwd", "out", out, u.len());
    if out.is_empty() {
        return;
    }
    let (seq, e) = (dims.seq, dims.channels);
    let blocks = block_count(e, CHANNEL_BLOCK);
    let results: Vec<Vec<T>> =
        (0..dims.batch * blocks).into_par_iter().map(|task| inp.forward_block(task / blocks, task % blocks)).collect();
    out.par_chunks_mut(seq * e).enumerate().for_each(|(bi, ob)| {
        for blk in 0..blocks {
            let r = &results[bi * blocks + blk];
            put_columns(ob, e, blk * CHANNEL_BLOCK, r, inp.block_width(blk));
        }
    });
}

/// Gradient buffers of [`selective_scan_bwd`], shaped like the matching inputs.
pub struct ScanGrads<'a, T> {
    pub u: &'a mut [T],
    pub delta: &'a mut [T],
    pub a_log: &'a mut [T],
    pub b: &'a mut [T],
    pub c: &'a mut [T],
    pub d: &'a mut [T],
    pub dt_bias: &'a mut [T],
    pub z: &'a mut [T],
}

/// What one (sequence, channel block) task contributes to the gradients.
struct BlockGrads<T> {
    /// `[seq, width]` each: this block's columns of g_u, g_δ, g_z.
    u: Vec<T>,
    delta: Vec<T>,
    z: Vec<T>,
    /// `[seq, N]` each: this block's partial sums over its channels of g_B, g_C.
    b: Vec<T>,
    c: Vec<T>,
    /// `[width]`, `[width, N]`, `[width]`: sums over this sequence's tokens of g_D, g_A, g_β.
    d: Vec<T>,
    a: Vec<T>,
    dt_bias: Vec<T>,
}

impl<T: Real> BlockGrads<T> {
    fn zeros(seq: usize, width: usize, n: usize) -> Self {
        let z = || vec![T::zero(); seq * width];
        BlockGrads {
            u: z(),
            delta: z(),
            z: z(),
            b: vec![T::zero(); seq * n],
            c: vec![T::zero(); seq * n],
            d: vec![T::zero(); width],
            a: vec![T::zero(); width * n],
            dt_bias: vec![T::zero(); width],
        }
    }
}

/// The forward states one token's backward needs: h_{t−1}, h_t and Ā_t, each `[width, N]`.
struct TokenStates<'s, T> {
    prev: &'s [T],
    cur: &'s [T],
    abar: &'s [T],
}

impl<T: Real> Inputs<'_, T> {
    /// Backward of one (sequence, channel block). The forward states are kept every
    /// `CHECKPOINT_EVERY` tokens and recomputed per chunk, last chunk first, while the adjoint λ
    /// runs backwards in time (kernels.md §4.2).
    fn backward_block(&self, g_out: &[T], bi: usize, block: usize) -> BlockGrads<T> {
        let (seq, n) = (self.dims.seq, self.dims.state);
        let (c0, cw) = (block * CHANNEL_BLOCK, self.block_width(block));
        let a = neg_exp(&self.a_log[c0 * n..(c0 + cw) * n]);
        let size = cw * n;
        let chunks = block_count(seq, CHECKPOINT_EVERY);
        let chunk = |k: usize| k * CHECKPOINT_EVERY..seq.min((k + 1) * CHECKPOINT_EVERY);

        let mut checkpoints = vec![T::zero(); chunks * size];
        let mut h = vec![T::zero(); size];
        for k in 0..chunks {
            checkpoints[k * size..(k + 1) * size].copy_from_slice(&h);
            self.scan_block(bi, c0, &a, &mut h, chunk(k), |_, _, _, _| {});
        }

        let mut grads = BlockGrads::zeros(seq, cw, n);
        // states[r] = h before token t0 + r; abars[r] = Ā of token t0 + r.
        let mut states = vec![T::zero(); (CHECKPOINT_EVERY + 1) * size];
        let mut abars = vec![T::zero(); CHECKPOINT_EVERY * size];
        // Ā_{t+1} ⊙ λ_{t+1}: the part of λ_t carried from the future (zero past the end).
        let mut carry = vec![T::zero(); size];
        for k in (0..chunks).rev() {
            let ts = chunk(k);
            let t0 = ts.start;
            states[..size].copy_from_slice(&checkpoints[k * size..(k + 1) * size]);
            h.copy_from_slice(&states[..size]);
            self.scan_block(bi, c0, &a, &mut h, ts.clone(), |t, ci, hc, ab| {
                let r = t - t0;
                states[(r + 1) * size + ci * n..][..n].copy_from_slice(hc);
                abars[r * size + ci * n..][..n].copy_from_slice(ab);
            });
            for t in ts.rev() {
                let r = t - t0;
                let st = TokenStates {
                    prev: &states[r * size..(r + 1) * size],
                    cur: &states[(r + 1) * size..(r + 2) * size],
                    abar: &abars[r * size..(r + 1) * size],
                };
                self.backward_token(g_out, bi, t, c0, &a, &st, &mut carry, &mut grads);
            }
        }
        grads
    }

    /// One token of the backward for a channel block: updates λ (through `carry`) and writes or
    /// accumulates every gradient contribution of token `t`.
    #[allow(clippy::too_many_arguments)]
    fn backward_token(
        &self,
        g_out: &[T],
        bi: usize,
        t: usize,
        c0: usize,
        a: &[T],
        st: &TokenStates<'_, T>,
        carry: &mut [T],
        g: &mut BlockGrads<T>,
    ) {
        let (seq, e, n) = (self.dims.seq, self.dims.channels, self.dims.state);
        let cw = g.d.len();
        let tok = bi * seq + t;
        let (b, c) = (&self.b[tok * n..][..n], &self.c[tok * n..][..n]);
        let gb = &mut g.b[t * n..][..n];
        let gc = &mut g.c[t * n..][..n];
        for ci in 0..cw {
            let (ch, x) = (c0 + ci, tok * e + c0 + ci);
            let pre = self.delta[x] + self.dt_bias[ch];
            let dt = softplus(pre);
            let (u, z, go) = (self.u[x], self.z[x], g_out[x]);
            let rows = ci * n..(ci + 1) * n;
            let (hp, hc, ab) = (&st.prev[rows.clone()], &st.cur[rows.clone()], &st.abar[rows.clone()]);
            let (ac, lam_next) = (&a[rows.clone()], &mut carry[rows.clone()]);
            let ga = &mut g.a[rows];

            let y = readout(c, hc) + self.d[ch] * u;
            let gy = go * silu(z);
            g.z[t * cw + ci] = go * y * silu_grad(z);
            g.d[ci] = g.d[ci] + gy * u;

            let dtu = dt * u;
            let mut lam_b = T::zero();
            let mut g_dt = T::zero();
            for s in 0..n {
                let lam = gy * c[s] + lam_next[s];
                let ah = ab[s] * hp[s];
                lam_b = lam_b + lam * b[s];
                g_dt = g_dt + lam * (b[s] * u + ac[s] * ah);
                ga[s] = ga[s] + lam * dt * ah;
                gb[s] = gb[s] + lam * dtu;
                gc[s] = gc[s] + gy * hc[s];
                lam_next[s] = ab[s] * lam;
            }
            g.u[t * cw + ci] = self.d[ch] * gy + dt * lam_b;
            let g_delta = g_dt * softplus_grad(pre);
            g.delta[t * cw + ci] = g_delta;
            g.dt_bias[ci] = g.dt_bias[ci] + g_delta;
        }
    }
}

/// Backward: gradients of `sum(g_out ⊙ out)` with respect to every input, overwriting `grads`
/// (g_A_log = g_A ⊙ A). Recomputes the forward from the inputs.
///
/// Per-token gradients come from one task each; g_B and g_C add the per-block partials in block
/// order; g_D, g_A_log and g_dt_bias add the per-sequence partials in sequence order.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_bwd<T: Real>(
    dims: ScanDims,
    u: &[T],
    delta: &[T],
    a_log: &[T],
    b: &[T],
    c: &[T],
    d: &[T],
    dt_bias: &[T],
    z: &[T],
    g_out: &[T],
    grads: ScanGrads<'_, T>,
) {
    let kernel = "selective_scan_bwd";
    let inp = Inputs { dims, u, delta, a_log, b, c, d, dt_bias, z };
    inp.check(kernel, true);
    check_len(kernel, "g_out", g_out, u.len());
    check_len(kernel, "grads.u", grads.u, u.len());
    check_len(kernel, "grads.delta", grads.delta, delta.len());
    check_len(kernel, "grads.a_log", grads.a_log, a_log.len());
    check_len(kernel, "grads.b", grads.b, b.len());
    check_len(kernel, "grads.c", grads.c, c.len());
    check_len(kernel, "grads.d", grads.d, d.len());
    check_len(kernel, "grads.dt_bias", grads.dt_bias, dt_bias.len());
    check_len(kernel, "grads.z", grads.z, z.len());
    for g in [&mut *grads.a_log, &mut *grads.b, &mut *grads.c, &mut *grads.d, &mut *grads.dt_bias] {
        g.fill(T::zero());
    }
    if u.is_empty() {
        return;
    }
    let (seq, e, n) = (dims.seq, dims.channels, dims.state);
    let blocks = block_count(e, CHANNEL_BLOCK);
    let results: Vec<BlockGrads<T>> = (0..dims.batch * blocks)
        .into_par_iter()
        .map(|task| inp.backward_block(g_out, task / blocks, task % blocks))
        .collect();

    let columns = |dst: &mut [T], pick: fn(&BlockGrads<T>) -> &Vec<T>| {
        dst.par_chunks_mut(seq * e).enumerate().for_each(|(bi, db)| {
            for blk in 0..blocks {
                let r = pick(&results[bi * blocks + blk]);
                put_columns(db, e, blk * CHANNEL_BLOCK, r, inp.block_width(blk));
            }
        });
    };
    columns(grads.u, |r| &r.u);
    columns(grads.delta, |r| &r.delta);
    columns(grads.z, |r| &r.z);

    let over_blocks = |dst: &mut [T], pick: fn(&BlockGrads<T>) -> &Vec<T>| {
        dst.par_chunks_mut(seq * n).enumerate().for_each(|(bi, db)| {
            for blk in 0..blocks {
                add_into(db, pick(&results[bi * blocks + blk]));
            }
        });
    };
    over_blocks(grads.b, |r| &r.b);
    over_blocks(grads.c, |r| &r.c);

    for bi in 0..dims.batch {
        for blk in 0..blocks {
            let r = &results[bi * blocks + blk];
            let (c0, cw) = (blk * CHANNEL_BLOCK, inp.block_width(blk));
            add_into(&mut grads.d[c0..c0 + cw], &r.d);
            add_into(&mut grads.dt_bias[c0..c0 + cw], &r.dt_bias);
            add_into(&mut grads.a_log[c0 * n..(c0 + cw) * n], &r.a);
        }
    }
    for (g, &al) in grads.a_log.iter_mut().zip(a_log) {
        *g = *g * -al.exp();
    }
}

fn add_into<T: Real>(dst: &mut [T], src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = *d + s;
    }
}

/// One decode step for `batch` sequences, one token each: u, delta, z `[batch, E]`, b, c
/// `[batch, N]`; the states h `[batch, E, N]` advance in place; out `[batch, E]` is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_step<T: Real>(
    batch: usize,
    channels: usize,
    state: usize,
    u: &[T],
    delta: &[T],
    a_log: &[T],
    b: &[T],
    c: &[T],
    d: &[T],
    dt_bias: &[T],
    z: &[T],
    h: &mut [T],
    out: &mut [T],
) {
    let kernel = "selective_scan_step";
    let dims = ScanDims { batch, seq: 1, channels, state };
    let inp = Inputs { dims, u, delta, a_log, b, c, d, dt_bias, z };
    inp.check(kernel, true);
    check_len(kernel, "h", h, batch * channels * state);
    check_len(kernel, "out", out, batch * channels);
    if out.is_empty() {
        return;
    }
    let (e, n) = (channels, state);
    out.par_chunks_mut(e).zip(h.par_chunks_mut(e * n)).enumerate().for_each(|(bi, (ob, hb))| {
        ob.par_chunks_mut(CHANNEL_BLOCK).zip(hb.par_chunks_mut(CHANNEL_BLOCK * n)).enumerate().for_each(
            |(blk, (o, hblk))| {
                let c0 = blk * CHANNEL_BLOCK;
                let a = neg_exp(&a_log[c0 * n..(c0 + o.len()) * n]);
                inp.scan_block(bi, c0, &a, hblk, 0..1, |_, ci, hc, _| {
                    let x = bi * e + c0 + ci;
                    let y = readout(&c[bi * n..][..n], hc) + d[c0 + ci] * u[x];
                    o[ci] = y * silu(z[x]);
                });
            },
        );
    });
}

/// The states h_T `[batch, E, N]` after a whole prompt, to continue with
/// [`selective_scan_step`] (prefill → decode). `c` is not read (it does not affect the state);
/// it is taken, length-checked, so the call mirrors the forward.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_final_state<T: Real>(
    dims: ScanDims,
    u: &[T],
    delta: &[T],
    a_log: &[T],
    b: &[T],
    c: &[T],
    dt_bias: &[T],
    h: &mut [T],
) {
    let kernel = "selective_scan_final_state";
    let inp = Inputs { dims, u, delta, a_log, b, c, d: &[], dt_bias, z: &[] };
    inp.check(kernel, false);
    let (e, n) = (dims.channels, dims.state);
    check_len(kernel, "h", h, dims.batch * e * n);
    h.fill(T::zero());
    if h.is_empty() {
        return;
    }
    h.par_chunks_mut(e * n).enumerate().for_each(|(bi, hb)| {
        hb.par_chunks_mut(CHANNEL_BLOCK * n).enumerate().for_each(|(blk, hblk)| {
            let c0 = blk * CHANNEL_BLOCK;
            let a = neg_exp(&a_log[c0 * n..c0 * n + hblk.len()]);
            inp.scan_block(bi, c0, &a, hblk, 0..dims.seq, |_, _, _, _| {});
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::check::*;

    /// The inputs in argument order.
    const NAMES: [&str; 8] = ["u", "delta", "a_log", "b", "c", "d", "dt_bias", "z"];

    fn sizes(d: ScanDims) -> [usize; 8] {
        let (t, e, n) = (d.batch * d.seq, d.channels, d.state);
        [t * e, t * e, e * n, t * n, t * n, e, e, t * e]
    }

    fn dims(batch: usize, seq: usize, channels: usize, state: usize) -> ScanDims {
        ScanDims { batch, seq, channels, state }
    }

    /// Random inputs in argument order; `wide` spreads δ over ±40 so that softplus takes both
    /// branches (δ + β is kept off the threshold itself, where the derivative jumps).
    fn inputs(d: ScanDims, seed: u64, wide: bool) -> Vec<Vec<f64>> {
        let mut rng = Rng::new(seed);
        let sz = sizes(d);
        let (lo, hi) = if wide { (-40.0, 40.0) } else { (-3.0, 1.5) };
        let dt_bias = rng.vec(sz[6], -1.0, 0.5);
        let mut delta = rng.vec(sz[1], lo, hi);
        for (i, x) in delta.iter_mut().enumerate() {
            if (*x + dt_bias[i % d.channels] - 20.0).abs() < 1e-2 {
                *x += 0.1;
            }
        }
        let a_log = (0..sz[2]).map(|i| ((i % d.state) as f64 + 1.0).ln() + rng.uniform(-0.3, 0.3)).collect();
        vec![
            rng.vec(sz[0], -1.0, 1.0),
            delta,
            a_log,
            rng.vec(sz[3], -1.0, 1.0),
            rng.vec(sz[4], -1.0, 1.0),
            rng.vec(sz[5], 0.5, 1.5),
            dt_bias,
            rng.vec(sz[7], -2.0, 2.0),
        ]
    }

    fn fwd<T: Real>(d: ScanDims, x: &[Vec<T>]) -> Vec<T> {
        let mut out = vec![T::zero(); sizes(d)[0]];
        selective_scan_fwd(d, &x[0], &x[1], &x[2], &x[3], &x[4], &x[5], &x[6], &x[7], &mut out);
        out
    }

    fn bwd<T: Real>(d: ScanDims, x: &[Vec<T>], g: &[T]) -> Vec<Vec<T>> {
        let mut gs: Vec<Vec<T>> = sizes(d).iter().map(|&n| vec![T::zero(); n]).collect();
        let [gu, gdl, gal, gb, gc, gd, gbias, gz] = &mut gs[..] else { unreachable!() };
        let grads = ScanGrads { u: gu, delta: gdl, a_log: gal, b: gb, c: gc, d: gd, dt_bias: gbias, z: gz };
        selective_scan_bwd(d, &x[0], &x[1], &x[2], &x[3], &x[4], &x[5], &x[6], &x[7], g, grads);
        gs
    }

    /// The recurrence exactly as written in the equations, in f64.
    fn naive(d: ScanDims, x: &[Vec<f64>]) -> Vec<f64> {
        let (u, delta, a_log, b, c, dd, bias, z) = (&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], &x[6], &x[7]);
        let (e, n) = (d.channels, d.state);
        let mut out = vec![0.0; u.len()];
        for bi in 0..d.batch {
            for ch in 0..e {
                let mut h = vec![0.0; n];
                for t in 0..d.seq {
                    let tok = bi * d.seq + t;
                    let i = tok * e + ch;
                    let pre = delta[i] + bias[ch];
                    let dt = if pre > 20.0 { pre } else { pre.exp().ln_1p() };
                    let mut y = dd[ch] * u[i];
                    for s in 0..n {
                        let a = -a_log[ch * n + s].exp();
                        h[s] = (dt * a).exp() * h[s] + dt * b[tok * n + s] * u[i];
                        y += c[tok * n + s] * h[s];
                    }
                    out[i] = y * z[i] / (1.0 + (-z[i]).exp());
                }
            }
        }
        out
    }

    fn rows_of(x: &[f64], d: ScanDims, width: usize, ts: Range<usize>) -> Vec<f64> {
        rows(x, d.batch, d.seq, width, ts)
    }

    #[test]
    fn forward_matches_the_naive_recurrence() {
        let shapes = [(1, 1, 1, 1), (2, 7, 5, 3), (3, 37, 20, 4), (1, 70, 33, 16), (2, 17, 16, 2)];
        let (mut worst64, mut worst32) = (0.0f64, 0.0f64);
        for (k, &(batch, seq, channels, state)) in shapes.iter().enumerate() {
            for wide in [false, true] {
                let d = dims(batch, seq, channels, state);
                let x: Vec<Vec<f64>> = inputs(d, k as u64 + 1, wide).iter().map(|v| round32(v)).collect();
                let want = naive(d, &x);
                let got = fwd::<f64>(d, &x);
                let e64 = rel(&got, &want);
                assert!(e64 <= 1e-12, "{d:?} wide={wide}: f64 rel {e64:e}");
                let got32 = widen(&fwd::<f32>(d, &cast(&x)));
                let e32 = rel(&got32, &got);
                assert!(e32 <= 1e-5, "{d:?} wide={wide}: f32 rel {e32:e}");
                worst64 = worst64.max(e64);
                worst32 = worst32.max(e32);
            }
        }
        eprintln!("scan forward: f64 vs naive {worst64:e}, f32 vs f64 {worst32:e}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let cases = [
            (dims(2, 7, 5, 3), false),
            (dims(2, 7, 5, 3), true),
            // Several checkpoint chunks, the last one short.
            (dims(2, 37, 5, 3), false),
            // Two channel blocks, so g_B and g_C add partials.
            (dims(1, 9, 18, 2), true),
        ];
        for (k, &(d, wide)) in cases.iter().enumerate() {
            let mut x = inputs(d, 10 + k as u64, wide);
            let g = Rng::new(50 + k as u64).vec(sizes(d)[0], -1.0, 1.0);
            let analytic = bwd::<f64>(d, &x, &g);
            let loss = |x: &[Vec<f64>]| dot(&fwd::<f64>(d, x), &g);
            check_gradients(&format!("scan {d:?} wide={wide}"), &mut x, &NAMES, &analytic, &loss);
        }
    }

    #[test]
    fn f32_gradients_track_f64() {
        let d = dims(2, 45, 20, 4);
        let x: Vec<Vec<f64>> = inputs(d, 21, false).iter().map(|v| round32(v)).collect();
        let g = round32(&Rng::new(22).vec(sizes(d)[0], -1.0, 1.0));
        let g64 = bwd::<f64>(d, &x, &g);
        let g32 = bwd::<f32>(d, &cast(&x), &to_f32(&g));
        let mut worst = 0.0f64;
        for (name, (a, b)) in NAMES.iter().zip(g32.iter().zip(&g64)) {
            let e = rel(&widen(a), b);
            assert!(e <= 1e-4, "g_{name}: f32 rel {e:e}");
            worst = worst.max(e);
        }
        eprintln!("scan backward: f32 vs f64 {worst:e}");
    }

    #[test]
    fn decode_steps_reproduce_the_forward() {
        let d = dims(2, 23, 20, 4);
        let (e, n) = (d.channels, d.state);
        let x = inputs(d, 31, true);
        let want = fwd::<f64>(d, &x);
        let mut stepped_state = vec![];
        for prefix in [0, 9, 22] {
            let pd = ScanDims { seq: prefix, ..d };
            let mut h = vec![1.0; d.batch * e * n];
            selective_scan_final_state(
                pd,
                &rows_of(&x[0], d, e, 0..prefix),
                &rows_of(&x[1], d, e, 0..prefix),
                &x[2],
                &rows_of(&x[3], d, n, 0..prefix),
                &rows_of(&x[4], d, n, 0..prefix),
                &x[6],
                &mut h,
            );
            let (mut got, mut expect) = (vec![], vec![]);
            for t in prefix..d.seq {
                let mut o = vec![0.0; d.batch * e];
                selective_scan_step(
                    d.batch,
                    e,
                    n,
                    &rows_of(&x[0], d, e, t..t + 1),
                    &rows_of(&x[1], d, e, t..t + 1),
                    &x[2],
                    &rows_of(&x[3], d, n, t..t + 1),
                    &rows_of(&x[4], d, n, t..t + 1),
                    &x[5],
                    &x[6],
                    &rows_of(&x[7], d, e, t..t + 1),
                    &mut h,
                    &mut o,
                );
                got.extend(o);
                expect.extend(rows_of(&want, d, e, t..t + 1));
            }
            let err = rel(&got, &expect);
            assert!(err <= 1e-12, "prefix {prefix}: rel {err:e}");
            if prefix == 0 {
                stepped_state = h;
            }
        }
        let mut h = vec![0.0; d.batch * e * n];
        selective_scan_final_state(d, &x[0], &x[1], &x[2], &x[3], &x[4], &x[6], &mut h);
        assert!(rel(&h, &stepped_state) <= 1e-12);
    }

    #[test]
    fn results_are_bitwise_identical_across_runs_and_thread_counts() {
        let d = dims(3, 40, 40, 5);
        let x: Vec<Vec<f32>> = cast(&inputs(d, 41, true));
        let g = to_f32(&Rng::new(42).vec(sizes(d)[0], -1.0, 1.0));
        let runs = in_pools(|| {
            let mut all = bits(&fwd(d, &x));
            for gr in bwd(d, &x, &g) {
                all.extend(bits(&gr));
            }
            let mut h = vec![0.0f32; d.batch * d.channels * d.state];
            selective_scan_final_state(d, &x[0], &x[1], &x[2], &x[3], &x[4], &x[6], &mut h);
            all.extend(bits(&h));
            all
        });
        for r in &runs[1..] {
            assert!(r == &runs[0], "scan results depend on the run or thread count");
        }
    }

    #[test]
    fn large_inputs_stay_finite() {
        let d = dims(2, 30, 20, 4);
        let mut x = inputs(d, 51, true);
        let mut rng = Rng::new(52);
        x[0].iter_mut().for_each(|v| *v *= 5.0);
        x[7] = rng.vec(x[7].len(), -30.0, 30.0);
        let x: Vec<Vec<f64>> = x.iter().map(|v| round32(v)).collect();
        let g = round32(&rng.vec(sizes(d)[0], -1.0, 1.0));
        let x32: Vec<Vec<f32>> = cast(&x);
        let out32 = fwd(d, &x32);
        let grads32 = bwd(d, &x32, &to_f32(&g));
        assert!(all_finite(&out32));
        assert!(grads32.iter().all(|v| all_finite(v)));
        let e = rel(&widen(&out32), &fwd::<f64>(d, &x));
        assert!(e <= 1e-5, "forward f32 rel {e:e}");
        let grads64 = bwd::<f64>(d, &x, &g);
        for (name, (a, b)) in NAMES.iter().zip(grads32.iter().zip(&grads64)) {
            let e = rel(&widen(a), b);
            assert!(e <= 1e-4, "g_{name}: f32 rel {e:e}");
        }
    }
}
