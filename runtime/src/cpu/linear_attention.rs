//! Gated linear attention (GLA) and multi-scale retention (RetNet), the two linear-attention
//! mixers of the Samba baselines (samba.md §3.8–3.9, kernels.md §9): forward, backward, one-token
//! decode and prefill state.
//!
//! Per head, with dk = K/heads and dv = V/heads, both run the recurrence
//! ```text
//! S_t = diag(α_t) S_{t−1} + k_tᵀ v_t   (S: dk×dv, S_{−1} = 0),   o_t = (q_t / √dk) S_t
//! ```
//! GLA takes α_t = exp(log_alpha_t) per key dimension; retention a fixed γ_h = 1 − 2^(−5−h) per
//! head and, optionally, rotate-half RoPE on q and k. The implementation is the recurrence itself,
//! token by token, one task per (sequence, head); tasks depend only on the sizes and each output
//! has one writer, so results are bit-identical for any thread count.
//!
//! Backward, with dS_t the gradient of the loss with respect to S_t (a reverse-time recurrence):
//! ```text
//! dS_t = q̂_tᵀ do_t + diag(α_{t+1}) dS_{t+1}        q̂_t = q_t / √dk
//! g_q_t = (do_t S_tᵀ) / √dk,  g_k_t = v_t dS_tᵀ,  g_v_t = k_t dS_t
//! g_log_alpha_t[i] = α_t[i] Σ_j dS_t[i, j] S_{t−1}[i, j]
//! ```
//! The states are needed backwards in time: they are kept every ⌈√seq⌉ tokens and recomputed
//! per chunk, which bounds memory by 2⌈√seq⌉ states per task. The direct gate formula avoids the
//! cancellation of the equivalent reverse cumulative sum of q ⊙ g_q − k ⊙ g_k.

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use super::layout::{block_count, check_len, put_columns};
use super::rope::{apply_rope, rotated};
use super::Real;

/// Sizes of one linear-attention call.
#[derive(Clone, Copy, Debug)]
pub struct LinDims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    /// K, the total key width (dk = K / heads per head).
    pub key_dim: usize,
    /// V, the total value width (dv = V / heads per head).
    pub value_dim: usize,
}

impl LinDims {
    fn dk(&self) -> usize {
        self.key_dim / self.heads
    }

    fn dv(&self) -> usize {
        self.value_dim / self.heads
    }

    fn check(&self, kernel: &str) {
        assert!(self.heads > 0, "{kernel}: heads must be positive");
        assert!(
            self.key_dim % self.heads == 0 && self.key_dim > 0,
            "{kernel}: key_dim {} is not a positive multiple of heads {}",
            self.key_dim,
            self.heads
        );
        assert!(
            self.value_dim % self.heads == 0 && self.value_dim > 0,
            "{kernel}: value_dim {} is not a positive multiple of heads {}",
            self.value_dim,
            self.heads
        );
    }
}

/// Retention's fixed decay of head h: γ_h = 1 − 2^(−5−h).
fn retention_gamma(h: usize) -> f64 {
    1.0 - 0.5f64.powi(5 + h as i32)
}

/// How the state decays from one token to the next.
#[derive(Clone, Copy)]
enum Decay<'a, T> {
    /// GLA: log α per token and key dimension, `[batch, seq, K]`.
    Gated(&'a [T]),
    /// Retention: γ_h per head.
    Fixed,
}

/// The inputs of one call (q and k already rotated for retention), with per-head access.
struct Heads<'a, T> {
    dims: LinDims,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    decay: Decay<'a, T>,
}

/// Per-head backward results, `[seq, dk]` (`[seq, dv]` for v).
struct HeadGrads<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    log_alpha: Vec<T>,
}

impl<T: Real> Heads<'_, T> {
    fn scale(&self) -> T {
        T::of(1.0 / (self.dims.dk() as f64).sqrt())
    }

    fn key_row<'s>(&self, x: &'s [T], bi: usize, t: usize, h: usize) -> &'s [T] {
        let d = &self.dims;
        &x[(bi * d.seq + t) * d.key_dim + h * d.dk()..][..d.dk()]
    }

    fn v(&self, bi: usize, t: usize, h: usize) -> &[T] {
        let d = &self.dims;
        &self.v[(bi * d.seq + t) * d.value_dim + h * d.dv()..][..d.dv()]
    }

    /// α of token t, head h, per key dimension.
    fn alphas(&self, bi: usize, t: usize, h: usize, alpha: &mut [T]) {
        match self.decay {
            Decay::Gated(log_alpha) => {
                let la = self.key_row(log_alpha, bi, t, h);
                for (a, &l) in alpha.iter_mut().zip(la) {
                    *a = l.exp();
                }
            }
            Decay::Fixed => alpha.fill(T::of(retention_gamma(h))),
        }
    }

    /// S ← diag(α_t) S + k_tᵀ v_t; `alpha` receives α_t.
    fn advance(&self, bi: usize, t: usize, h: usize, s: &mut [T], alpha: &mut [T]) {
        self.alphas(bi, t, h, alpha);
        let (k, v) = (self.key_row(self.k, bi, t, h), self.v(bi, t, h));
        for ((row, &a), &ki) in s.chunks_mut(v.len()).zip(alpha.iter()).zip(k) {
            for (x, &vj) in row.iter_mut().zip(v) {
                *x = a * *x + ki * vj;
            }
        }
    }

    /// o = (q_t / √dk) S, summed over key dimensions in order.
    fn read(&self, bi: usize, t: usize, h: usize, s: &[T], o: &mut [T]) {
        o.fill(T::zero());
        let q = self.key_row(self.q, bi, t, h);
        for (row, &qi) in s.chunks(o.len()).zip(q) {
            axpy(self.scale() * qi, row, o);
        }
    }

    /// Runs tokens `ts` of (sequence bi, head h) from state `s`, updated in place.
    fn run(&self, bi: usize, h: usize, s: &mut [T], ts: Range<usize>) {
        let mut alpha = vec![T::zero(); self.dims.dk()];
        for t in ts {
            self.advance(bi, t, h, s, &mut alpha);
        }
    }

    /// Outputs of (sequence bi, head h) for the whole sequence, `[seq, dv]`.
    fn forward_head(&self, bi: usize, h: usize) -> Vec<T> {
        let (seq, dk, dv) = (self.dims.seq, self.dims.dk(), self.dims.dv());
        let mut s = vec![T::zero(); dk * dv];
        let mut alpha = vec![T::zero(); dk];
        let mut out = vec![T::zero(); seq * dv];
        for (t, o) in out.chunks_mut(dv).enumerate() {
            self.advance(bi, t, h, &mut s, &mut alpha);
            self.read(bi, t, h, &s, o);
        }
        out
    }

    /// Backward of (sequence bi, head h): states kept every ⌈√seq⌉ tokens, recomputed per chunk
    /// (last chunk first) while dS runs backwards in time.
    fn backward_head(&self, g_out: &[T], bi: usize, h: usize) -> HeadGrads<T> {
        let d = self.dims;
        let (seq, dk, dv) = (d.seq, d.dk(), d.dv());
        let size = dk * dv;
        let every = ((seq as f64).sqrt().ceil() as usize).max(1);
        let chunks = block_count(seq, every);
        let chunk = |c: usize| c * every..seq.min((c + 1) * every);

        let mut checkpoints = vec![T::zero(); chunks * size];
        let mut s = vec![T::zero(); size];
        for c in 0..chunks {
            checkpoints[c * size..(c + 1) * size].copy_from_slice(&s);
            self.run(bi, h, &mut s, chunk(c));
        }

        let gated = matches!(self.decay, Decay::Gated(_));
        let mut g = HeadGrads {
            q: vec![T::zero(); seq * dk],
            k: vec![T::zero(); seq * dk],
            v: vec![T::zero(); seq * dv],
            log_alpha: vec![T::zero(); if gated { seq * dk } else { 0 }],
        };
        let scale = self.scale();
        // states[r] = S before token t0 + r; alphas[r] = α of token t0 + r.
        let mut states = vec![T::zero(); (every + 1) * size];
        let mut alphas = vec![T::zero(); every * dk];
        // dS_t on use; diag(α_t) dS_t, the part carried to t − 1, between tokens.
        let mut ds = vec![T::zero(); size];
        let mut q_hat = vec![T::zero(); dk];
        for c in (0..chunks).rev() {
            let ts = chunk(c);
            let t0 = ts.start;
            states[..size].copy_from_slice(&checkpoints[c * size..(c + 1) * size]);
            for t in ts.clone() {
                let r = t - t0;
                let (done, next) = states.split_at_mut((r + 1) * size);
                next[..size].copy_from_slice(&done[r * size..]);
                self.advance(bi, t, h, &mut next[..size], &mut alphas[r * dk..(r + 1) * dk]);
            }
            for t in ts.rev() {
                let r = t - t0;
                let (prev, cur) = (&states[r * size..(r + 1) * size], &states[(r + 1) * size..(r + 2) * size]);
                let alpha = &alphas[r * dk..(r + 1) * dk];
                let (k, v, go) = (
                    self.key_row(self.k, bi, t, h),
                    self.v(bi, t, h),
                    &g_out[(bi * seq + t) * d.value_dim + h * dv..][..dv],
                );
                for (qh, &qi) in q_hat.iter_mut().zip(self.key_row(self.q, bi, t, h)) {
                    *qh = scale * qi;
                }
                for (row, &qh) in ds.chunks_mut(dv).zip(&q_hat) {
                    axpy(qh, go, row);
                }
                let gq = &mut g.q[t * dk..(t + 1) * dk];
                let gk = &mut g.k[t * dk..(t + 1) * dk];
                let gv = &mut g.v[t * dv..(t + 1) * dv];
                gv.fill(T::zero());
                for i in 0..dk {
                    let ds_row = &ds[i * dv..(i + 1) * dv];
                    gq[i] = scale * dot(&cur[i * dv..(i + 1) * dv], go);
                    gk[i] = dot(ds_row, v);
                    axpy(k[i], ds_row, gv);
                    if gated {
                        g.log_alpha[t * dk + i] = alpha[i] * dot(ds_row, &prev[i * dv..(i + 1) * dv]);
                    }
                }
                for (row, &a) in ds.chunks_mut(dv).zip(alpha) {
                    row.iter_mut().for_each(|x| *x = *x * a);
                }
            }
        }
        g
    }
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
}

/// y ← y + alpha·x.
fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + alpha * x;
    }
}

/// Checks the sequence inputs of a forward or backward call.
fn check_inputs<T>(kernel: &str, d: LinDims, q: &[T], k: &[T], v: &[T]) {
    d.check(kernel);
    let tokens = d.batch * d.seq;
    check_len(kernel, "q", q, tokens * d.key_dim);
    check_len(kernel, "k", k, tokens * d.key_dim);
    check_len(kernel, "v", v, tokens * d.value_dim);
}

/// Forward of any decay: one task per (sequence, head), then the heads' columns are placed.
fn forward<T: Real>(x: &Heads<'_, T>, out: &mut [T]) {
    let d = x.dims;
    if out.is_empty() {
        return;
    }
    let results: Vec<Vec<T>> =
        (0..d.batch * d.heads).into_par_iter().map(|task| x.forward_head(task / d.heads, task % d.heads)).collect();
    out.par_chunks_mut(d.seq * d.value_dim).enumerate().for_each(|(bi, ob)| {
        for h in 0..d.heads {
            put_columns(ob, d.value_dim, h * d.dv(), &results[bi * d.heads + h], d.dv());
        }
    });
}

/// Backward of any decay into the (rotated-space) gradient buffers; g_log_alpha only for GLA.
fn backward<T: Real>(
    x: &Heads<'_, T>,
    g_out: &[T],
    gq: &mut [T],
    gk: &mut [T],
    gv: &mut [T],
    g_log_alpha: Option<&mut [T]>,
) {
    let d = x.dims;
    if gv.is_empty() {
        return;
    }
    let results: Vec<HeadGrads<T>> = (0..d.batch * d.heads)
        .into_par_iter()
        .map(|task| x.backward_head(g_out, task / d.heads, task % d.heads))
        .collect();
    let place = |dst: &mut [T], width: usize, pick: fn(&HeadGrads<T>) -> &Vec<T>| {
        let w = width / d.heads;
        dst.par_chunks_mut(d.seq * width).enumerate().for_each(|(bi, db)| {
            for h in 0..d.heads {
                put_columns(db, width, h * w, pick(&results[bi * d.heads + h]), w);
            }
        });
    };
    place(gq, d.key_dim, |r| &r.q);
    place(gk, d.key_dim, |r| &r.k);
    place(gv, d.value_dim, |r| &r.v);
    if let Some(gla) = g_log_alpha {
        place(gla, d.key_dim, |r| &r.log_alpha);
    }
}

/// GLA forward. q, k, log_alpha: `[batch, seq, K]`; v, out: `[batch, seq, V]` (out overwritten).
pub fn gla_fwd<T: Real>(dims: LinDims, q: &[T], k: &[T], v: &[T], log_alpha: &[T], out: &mut [T]) {
    let kernel = "gla_fwd";
    check_inputs(kernel, dims, q, k, v);
    check_len(kernel, "log_alpha", log_alpha, k.len());
    check_len(kernel, "out", out, v.len());
    let x = Heads { dims, q, k, v, decay: Decay::Gated(log_alpha) };
    forward(&x, out);
}

/// GLA backward: gradients of `sum(g_out ⊙ out)` with respect to q, k, v and log_alpha, all
/// overwritten.
#[allow(clippy::too_many_arguments)]
pub fn gla_bwd<T: Real>(
    dims: LinDims,
    q: &[T],
    k: &[T],
    v: &[T],
    log_alpha: &[T],
    g_out: &[T],
    gq: &mut [T],
    gk: &mut [T],
    gv: &mut [T],
    g_log_alpha: &mut [T],
) {
    let kernel = "gla_bwd";
    check_inputs(kernel, dims, q, k, v);
    check_len(kernel, "log_alpha", log_alpha, k.len());
    check_len(kernel, "g_out", g_out, v.len());
    check_len(kernel, "gq", gq, q.len());
    check_len(kernel, "gk", gk, k.len());
    check_len(kernel, "gv", gv, v.len());
    check_len(kernel, "g_log_alpha", g_log_alpha, k.len());
    let x = Heads { dims, q, k, v, decay: Decay::Gated(log_alpha) };
    backward(&x, g_out, gq, gk, gv, Some(g_log_alpha));
}

/// Retention's RoPE rotates halves of each head's keys, so dk must be even.
fn check_rope(kernel: &str, dims: LinDims, rope: Option<f64>) {
    assert!(rope.is_none() || dims.dk() % 2 == 0, "{kernel}: RoPE needs an even per-head key size, got {}", dims.dk());
}

/// q and k with retention's RoPE (over each head's dk dimensions, positions from 0), if any.
fn rotated_qk<'a, T: Real>(dims: LinDims, rope: Option<f64>, q: &'a [T], k: &'a [T]) -> (Cow<'a, [T]>, Cow<'a, [T]>) {
    (rotated(q, dims.seq, dims.key_dim, dims.dk(), rope), rotated(k, dims.seq, dims.key_dim, dims.dk(), rope))
}

/// Retention forward. q, k: `[batch, seq, K]`; v, out: `[batch, seq, V]` (out overwritten).
/// `rope`: rotate-half RoPE base for q and k, or `None`.
pub fn retention_fwd<T: Real>(dims: LinDims, rope: Option<f64>, q: &[T], k: &[T], v: &[T], out: &mut [T]) {
    let kernel = "retention_fwd";
    check_inputs(kernel, dims, q, k, v);
    check_rope(kernel, dims, rope);
    check_len(kernel, "out", out, v.len());
    let (qr, kr) = rotated_qk(dims, rope, q, k);
    let x = Heads { dims, q: &qr, k: &kr, v, decay: Decay::Fixed };
    forward(&x, out);
}

/// Retention backward: gradients of `sum(g_out ⊙ out)` with respect to q, k, v (through RoPE),
/// all overwritten.
#[allow(clippy::too_many_arguments)]
pub fn retention_bwd<T: Real>(
    dims: LinDims,
    rope: Option<f64>,
    q: &[T],
    k: &[T],
    v: &[T],
    g_out: &[T],
    gq: &mut [T],
    gk: &mut [T],
    gv: &mut [T],
) {
    let kernel = "retention_bwd";
    check_inputs(kernel, dims, q, k, v);
    check_rope(kernel, dims, rope);
    check_len(kernel, "g_out", g_out, v.len());
    check_len(kernel, "gq", gq, q.len());
    check_len(kernel, "gk", gk, k.len());
    check_len(kernel, "gv", gv, v.len());
    let (qr, kr) = rotated_qk(dims, rope, q, k);
    let x = Heads { dims, q: &qr, k: &kr, v, decay: Decay::Fixed };
    backward(&x, g_out, gq, gk, gv, None);
    if let (Some(base), false) = (rope, gq.is_empty()) {
        apply_rope(gq, dims.seq, dims.key_dim, dims.dk(), base, 0, true);
        apply_rope(gk, dims.seq, dims.key_dim, dims.dk(), base, 0, true);
    }
}

/// One decode step of any decay: state `[batch, heads, dk, dv]` advanced in place, out
/// `[batch, V]` overwritten.
fn step<T: Real>(x: &Heads<'_, T>, state: &mut [T], out: &mut [T]) {
    let d = x.dims;
    if out.is_empty() {
        return;
    }
    state.par_chunks_mut(d.dk() * d.dv()).zip(out.par_chunks_mut(d.dv())).enumerate().for_each(|(task, (s, o))| {
        let (bi, h) = (task / d.heads, task % d.heads);
        let mut alpha = vec![T::zero(); d.dk()];
        x.advance(bi, 0, h, s, &mut alpha);
        x.read(bi, 0, h, s, o);
    });
}

/// Checks the one-token inputs and state of a decode step.
fn check_step<T>(kernel: &str, d: LinDims, q: &[T], k: &[T], v: &[T], state: &[T], out: &[T]) {
    check_inputs(kernel, d, q, k, v);
    check_len(kernel, "state", state, d.batch * d.key_dim * d.dv());
    check_len(kernel, "out", out, d.batch * d.value_dim);
}

/// GLA decode step for one token per sequence: q, k, log_alpha `[batch, K]`, v `[batch, V]`;
/// state `[batch, heads, dk, dv]` advanced in place; out `[batch, V]` overwritten.
#[allow(clippy::too_many_arguments)]
pub fn gla_step<T: Real>(
    batch: usize,
    heads: usize,
    key_dim: usize,
    value_dim: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    log_alpha: &[T],
    state: &mut [T],
    out: &mut [T],
) {
    let kernel = "gla_step";
    let dims = LinDims { batch, seq: 1, heads, key_dim, value_dim };
    check_step(kernel, dims, q, k, v, state, out);
    check_len(kernel, "log_alpha", log_alpha, k.len());
    let x = Heads { dims, q, k, v, decay: Decay::Gated(log_alpha) };
    step(&x, state, out);
}

/// Retention decode step for one token per sequence at absolute position `pos` (for RoPE):
/// q, k `[batch, K]`, v `[batch, V]`; state `[batch, heads, dk, dv]` advanced in place; out
/// `[batch, V]` overwritten.
#[allow(clippy::too_many_arguments)]
pub fn retention_step<T: Real>(
    batch: usize,
    heads: usize,
    key_dim: usize,
    value_dim: usize,
    rope: Option<f64>,
    positions: &[usize],
    q: &[T],
    k: &[T],
    v: &[T],
    state: &mut [T],
    out: &mut [T],
) {
    let kernel = "retention_step";
    assert_eq!(positions.len(), batch, "{kernel}: one position per sequence");
    let dims = LinDims { batch, seq: 1, heads, key_dim, value_dim };
    check_step(kernel, dims, q, k, v, state, out);
    check_rope(kernel, dims, rope);
    let (mut qr, mut kr) = (q.to_vec(), k.to_vec());
    if let (Some(base), false) = (rope, q.is_empty()) {
        // Each sequence's row at its own position.
        for (b, &pos) in positions.iter().enumerate() {
            apply_rope(&mut qr[b * key_dim..][..key_dim], 1, key_dim, dims.dk(), base, pos, false);
            apply_rope(&mut kr[b * key_dim..][..key_dim], 1, key_dim, dims.dk(), base, pos, false);
        }
    }
    let x = Heads { dims, q: &qr, k: &kr, v, decay: Decay::Fixed };
    step(&x, state, out);
}

/// Final states of any decay after a whole prompt, `[batch, heads, dk, dv]` (overwritten).
fn final_state<T: Real>(x: &Heads<'_, T>, state: &mut [T]) {
    let d = x.dims;
    state.fill(T::zero());
    if state.is_empty() {
        return;
    }
    state
        .par_chunks_mut(d.dk() * d.dv())
        .enumerate()
        .for_each(|(task, s)| x.run(task / d.heads, task % d.heads, s, 0..d.seq));
}

/// Checks the keys, values and state of a prefill call.
fn check_prompt<T>(kernel: &str, d: LinDims, k: &[T], v: &[T], state: &[T]) {
    d.check(kernel);
    let tokens = d.batch * d.seq;
    check_len(kernel, "k", k, tokens * d.key_dim);
    check_len(kernel, "v", v, tokens * d.value_dim);
    check_len(kernel, "state", state, d.batch * d.key_dim * d.dv());
}

/// GLA states after a prompt (prefill → decode): k, log_alpha `[batch, seq, K]`, v
/// `[batch, seq, V]`; state `[batch, heads, dk, dv]`.
pub fn gla_final_state<T: Real>(dims: LinDims, k: &[T], v: &[T], log_alpha: &[T], state: &mut [T]) {
    let kernel = "gla_final_state";
    check_prompt(kernel, dims, k, v, state);
    check_len(kernel, "log_alpha", log_alpha, k.len());
    let x = Heads {
        dims,
        q: k, // not read: states need no queries
        k,
        v,
        decay: Decay::Gated(log_alpha),
    };
    final_state(&x, state);
}

/// Retention states after a prompt (prefill → decode), keys rotated from position 0 when `rope`
/// is set: k `[batch, seq, K]`, v `[batch, seq, V]`; state `[batch, heads, dk, dv]`.
pub fn retention_final_state<T: Real>(dims: LinDims, rope: Option<f64>, k: &[T], v: &[T], state: &mut [T]) {
    let kernel = "retention_final_state";
    check_prompt(kernel, dims, k, v, state);
    check_rope(kernel, dims, rope);
    let kr = rotated(k, dims.seq, dims.key_dim, dims.dk(), rope);
    let x = Heads {
        dims,
        q: &kr, // not read: states need no queries
        k: &kr,
        v,
        decay: Decay::Fixed,
    };
    final_state(&x, state);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::check::{dot, *};

    fn dims(batch: usize, seq: usize, heads: usize, key_dim: usize, value_dim: usize) -> LinDims {
        LinDims { batch, seq, heads, key_dim, value_dim }
    }

    /// Which mixer a test runs: GLA, or retention with an optional RoPE base.
    #[derive(Clone, Copy, Debug)]
    enum Mixer {
        Gla,
        Retention(Option<f64>),
    }

    /// q, k, v and (GLA only) log α: mostly mild decay, with some near 0 and some strong.
    fn inputs(d: LinDims, mixer: Mixer, seed: u64, amp: f64) -> Vec<Vec<f64>> {
        let mut rng = Rng::new(seed);
        let t = d.batch * d.seq;
        let mut x = vec![
            rng.vec(t * d.key_dim, -amp, amp),
            rng.vec(t * d.key_dim, -amp, amp),
            rng.vec(t * d.value_dim, -amp, amp),
        ];
        if let Mixer::Gla = mixer {
            let la = (0..t * d.key_dim)
                .map(|i| match i % 7 {
                    0 => rng.uniform(-8.0, -3.0),
                    1 => rng.uniform(-0.01, 0.0),
                    _ => rng.uniform(-1.0, 0.0),
                })
                .collect();
            x.push(la);
        }
        x
    }

    fn fwd<T: Real>(d: LinDims, mixer: Mixer, x: &[Vec<T>]) -> Vec<T> {
        let mut out = vec![T::zero(); x[2].len()];
        match mixer {
            Mixer::Gla => gla_fwd(d, &x[0], &x[1], &x[2], &x[3], &mut out),
            Mixer::Retention(rope) => retention_fwd(d, rope, &x[0], &x[1], &x[2], &mut out),
        }
        out
    }

    fn bwd<T: Real>(d: LinDims, mixer: Mixer, x: &[Vec<T>], g: &[T]) -> Vec<Vec<T>> {
        let mut gs: Vec<Vec<T>> = x.iter().map(|v| vec![T::zero(); v.len()]).collect();
        match (mixer, &mut gs[..]) {
            (Mixer::Gla, [gq, gk, gv, gla]) => gla_bwd(d, &x[0], &x[1], &x[2], &x[3], g, gq, gk, gv, gla),
            (Mixer::Retention(rope), [gq, gk, gv]) => retention_bwd(d, rope, &x[0], &x[1], &x[2], g, gq, gk, gv),
            _ => unreachable!(),
        }
        gs
    }

    /// RoPE straight from the formula on `[batch, seq, K]` with heads of `dk`.
    fn naive_rope(d: LinDims, base: f64, x: &[f64]) -> Vec<f64> {
        let (dk, half) = (d.dk(), d.dk() / 2);
        let mut y = x.to_vec();
        for (row, (xr, yr)) in x.chunks(dk).zip(y.chunks_mut(dk)).enumerate() {
            let pos = (row / d.heads) % d.seq;
            for i in 0..half {
                let th = pos as f64 * base.powf(-2.0 * i as f64 / dk as f64);
                yr[i] = xr[i] * th.cos() - xr[i + half] * th.sin();
                yr[i + half] = xr[i] * th.sin() + xr[i + half] * th.cos();
            }
        }
        y
    }

    /// The parallel (attention-like) form, independent of the recurrence:
    /// o_t = Σ_{s≤t} Σ_i q_t[i] k_s[i] decay(s→t)[i] v_s / √dk.
    fn naive(d: LinDims, mixer: Mixer, x: &[Vec<f64>]) -> Vec<f64> {
        let (q, k) = match mixer {
            Mixer::Retention(Some(base)) => (naive_rope(d, base, &x[0]), naive_rope(d, base, &x[1])),
            _ => (x[0].clone(), x[1].clone()),
        };
        let v = &x[2];
        let (dk, dv, kd, vd) = (d.dk(), d.dv(), d.key_dim, d.value_dim);
        let mut out = vec![0.0; v.len()];
        for bi in 0..d.batch {
            for h in 0..d.heads {
                for t in 0..d.seq {
                    for s in 0..=t {
                        let mut w = 0.0;
                        for i in 0..dk {
                            let decay = match mixer {
                                Mixer::Gla => {
                                    (s + 1..=t).map(|r| x[3][(bi * d.seq + r) * kd + h * dk + i]).sum::<f64>().exp()
                                }
                                Mixer::Retention(_) => (1.0 - 0.5f64.powi(5 + h as i32)).powi((t - s) as i32),
                            };
                            w += q[(bi * d.seq + t) * kd + h * dk + i] * k[(bi * d.seq + s) * kd + h * dk + i] * decay;
                        }
                        for j in 0..dv {
                            out[(bi * d.seq + t) * vd + h * dv + j] +=
                                w * v[(bi * d.seq + s) * vd + h * dv + j] / (dk as f64).sqrt();
                        }
                    }
                }
            }
        }
        out
    }

    const MIXERS: [Mixer; 4] =
        [Mixer::Gla, Mixer::Retention(None), Mixer::Retention(Some(10_000.0)), Mixer::Retention(Some(100.0))];

    #[test]
    fn forward_matches_the_parallel_form() {
        let shapes = [
            dims(1, 1, 1, 2, 3),
            dims(2, 7, 2, 6, 8),
            dims(2, 40, 3, 12, 9),
            dims(1, 33, 4, 8, 16),
            dims(3, 17, 1, 5, 7),
        ];
        let (mut worst64, mut worst32) = (0.0f64, 0.0f64);
        for (k, &d) in shapes.iter().enumerate() {
            for mixer in MIXERS {
                if matches!(mixer, Mixer::Retention(Some(_))) && d.dk() % 2 == 1 {
                    continue;
                }
                let x: Vec<Vec<f64>> = inputs(d, mixer, k as u64 + 1, 1.0).iter().map(|v| round32(v)).collect();
                let want = naive(d, mixer, &x);
                let got = fwd::<f64>(d, mixer, &x);
                let e64 = rel(&got, &want);
                assert!(e64 <= 1e-12, "{d:?} {mixer:?}: f64 rel {e64:e}");
                let e32 = rel(&widen(&fwd::<f32>(d, mixer, &cast(&x))), &got);
                assert!(e32 <= 1e-5, "{d:?} {mixer:?}: f32 rel {e32:e}");
                worst64 = worst64.max(e64);
                worst32 = worst32.max(e32);
            }
        }
        eprintln!("linear attention forward: f64 vs naive {worst64:e}, f32 vs f64 {worst32:e}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (k, &d) in [dims(2, 7, 2, 8, 6), dims(1, 20, 2, 4, 6)].iter().enumerate() {
            for mixer in MIXERS {
                let mut x = inputs(d, mixer, 30 + k as u64, 1.0);
                let g = Rng::new(70 + k as u64).vec(x[2].len(), -1.0, 1.0);
                let analytic = bwd::<f64>(d, mixer, &x, &g);
                let loss = |x: &[Vec<f64>]| dot(&fwd::<f64>(d, mixer, x), &g);
                check_gradients(&format!("{mixer:?} {d:?}"), &mut x, &["q", "k", "v", "log_alpha"], &analytic, &loss);
            }
        }
    }

    #[test]
    fn f32_gradients_track_f64() {
        let d = dims(2, 50, 2, 8, 12);
        let mut worst = 0.0f64;
        for mixer in MIXERS {
            let x: Vec<Vec<f64>> = inputs(d, mixer, 35, 1.0).iter().map(|v| round32(v)).collect();
            let g = round32(&Rng::new(36).vec(x[2].len(), -1.0, 1.0));
            let g64 = bwd::<f64>(d, mixer, &x, &g);
            let g32 = bwd::<f32>(d, mixer, &cast(&x), &to_f32(&g));
            for (a, b) in g32.iter().zip(&g64) {
                let e = rel(&widen(a), b);
                assert!(e <= 1e-4, "{mixer:?}: f32 gradient rel {e:e}");
                worst = worst.max(e);
            }
        }
        eprintln!("linear attention backward: f32 vs f64 {worst:e}");
    }

    #[test]
    fn decode_steps_reproduce_the_forward() {
        let d = dims(2, 23, 2, 8, 6);
        let (kd, vd) = (d.key_dim, d.value_dim);
        let mut worst = 0.0f64;
        for mixer in MIXERS {
            let x = inputs(d, mixer, 40, 1.0);
            let want = fwd::<f64>(d, mixer, &x);
            let row = |i: usize, w: usize, ts: Range<usize>| rows(&x[i], d.batch, d.seq, w, ts);
            for prefix in [0, 9, 22] {
                let pd = LinDims { seq: prefix, ..d };
                let mut state = vec![1.0; d.batch * kd * d.dv()];
                match mixer {
                    Mixer::Gla => gla_final_state(
                        pd,
                        &row(1, kd, 0..prefix),
                        &row(2, vd, 0..prefix),
                        &row(3, kd, 0..prefix),
                        &mut state,
                    ),
                    Mixer::Retention(rope) => {
                        retention_final_state(pd, rope, &row(1, kd, 0..prefix), &row(2, vd, 0..prefix), &mut state)
                    }
                }
                let (mut got, mut expect) = (vec![], vec![]);
                for t in prefix..d.seq {
                    let mut o = vec![0.0; d.batch * vd];
                    let (q1, k1, v1) = (row(0, kd, t..t + 1), row(1, kd, t..t + 1), row(2, vd, t..t + 1));
                    match mixer {
                        Mixer::Gla => {
                            gla_step(d.batch, d.heads, kd, vd, &q1, &k1, &v1, &row(3, kd, t..t + 1), &mut state, &mut o)
                        }
                        Mixer::Retention(rope) => retention_step(
                            d.batch,
                            d.heads,
                            kd,
                            vd,
                            rope,
                            &vec![t; d.batch],
                            &q1,
                            &k1,
                            &v1,
                            &mut state,
                            &mut o,
                        ),
                    }
                    got.extend(o);
                    expect.extend(rows(&want, d.batch, d.seq, vd, t..t + 1));
                }
                let err = rel(&got, &expect);
                assert!(err <= 1e-12, "{mixer:?} prefix {prefix}: rel {err:e}");
                worst = worst.max(err);
            }
        }
        eprintln!("linear attention decode vs forward: {worst:e}");
    }

    #[test]
    fn results_are_bitwise_identical_across_runs_and_thread_counts() {
        let d = dims(3, 40, 3, 12, 9);
        for mixer in MIXERS {
            let x: Vec<Vec<f32>> = cast(&inputs(d, mixer, 50, 1.0));
            let g = to_f32(&Rng::new(51).vec(x[2].len(), -1.0, 1.0));
            let runs = in_pools(|| {
                let mut all = bits(&fwd(d, mixer, &x));
                for gr in bwd(d, mixer, &x, &g) {
                    all.extend(bits(&gr));
                }
                let mut state = vec![0.0f32; d.batch * d.key_dim * d.dv()];
                match mixer {
                    Mixer::Gla => gla_final_state(d, &x[1], &x[2], &x[3], &mut state),
                    Mixer::Retention(rope) => retention_final_state(d, rope, &x[1], &x[2], &mut state),
                }
                all.extend(bits(&state));
                all
            });
            for r in &runs[1..] {
                assert!(r == &runs[0], "{mixer:?} results depend on the run or thread count");
            }
        }
    }

    #[test]
    fn large_inputs_stay_finite() {
        let d = dims(2, 30, 2, 8, 12);
        for mixer in MIXERS {
            let mut x = inputs(d, mixer, 60, 5.0);
            if let Mixer::Gla = mixer {
                x[3] = Rng::new(61).vec(x[3].len(), -40.0, 0.0);
            }
            let x: Vec<Vec<f64>> = x.iter().map(|v| round32(v)).collect();
            let g = round32(&Rng::new(62).vec(x[2].len(), -1.0, 1.0));
            let x32: Vec<Vec<f32>> = cast(&x);
            let out = fwd(d, mixer, &x32);
            assert!(all_finite(&out));
            let e = rel(&widen(&out), &fwd::<f64>(d, mixer, &x));
            assert!(e <= 1e-5, "{mixer:?}: f32 forward rel {e:e}");
            let g64 = bwd::<f64>(d, mixer, &x, &g);
            for (a, b) in bwd(d, mixer, &x32, &to_f32(&g)).iter().zip(&g64) {
                assert!(all_finite(a));
                let e = rel(&widen(a), b);
                assert!(e <= 1e-4, "{mixer:?}: f32 gradient rel {e:e}");
            }
        }
    }
}
