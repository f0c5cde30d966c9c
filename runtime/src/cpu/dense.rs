//! Embedding, matrix products, slices, the head and the cross-entropy loss.

use super::elementwise::ROWS_PER_TASK;
use super::{gemm, Real};
use rayon::prelude::*;

/// A token id outside the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadToken {
    pub position: usize,
    pub id: i32,
    pub vocab: usize,
}

impl std::fmt::Display for BadToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "token id {} at position {} is outside the vocabulary of {}", self.id, self.position, self.vocab)
    }
}

pub fn check_tokens(tokens: &[i32], vocab: usize) -> Result<(), BadToken> {
    match tokens.iter().position(|&t| t < 0 || t as usize >= vocab) {
        Some(position) => Err(BadToken { position, id: tokens[position], vocab }),
        None => Ok(()),
    }
}

/// The target that marks a position with no target (padding, or a masked token): it adds no
/// loss and is not counted in the mean.
pub const NO_TARGET: i32 = -1;

/// Targets are token ids or [`NO_TARGET`].
pub fn check_targets(targets: &[i32], vocab: usize) -> Result<(), BadToken> {
    match targets.iter().position(|&t| t != NO_TARGET && (t < 0 || t as usize >= vocab)) {
        Some(position) => Err(BadToken { position, id: targets[position], vocab }),
        None => Ok(()),
    }
}

/// The number of positions that have a target.
pub fn target_count(targets: &[i32]) -> usize {
    targets.iter().filter(|&&t| t >= 0).count()
}

/// `out[i] = table[tokens[i]]`, rows of width `d`. Tokens must be checked first.
pub fn embed_fwd<T: Real>(d: usize, tokens: &[i32], table: &[T], out: &mut [T]) {
    assert_eq!(out.len(), tokens.len() * d, "embed: output size");
    out.par_chunks_mut(d).zip(tokens.par_iter()).for_each(|(row, &t)| {
        let t = t as usize;
        row.copy_from_slice(&table[t * d..(t + 1) * d]);
    });
}

/// `g_table[v] = Σ_{i: tokens[i] = v} g[i]`, summed in token order for every column block.
pub fn embed_bwd<T: Real>(d: usize, tokens: &[i32], g: &[T], g_table: &mut [T]) {
    assert_eq!(g.len(), tokens.len() * d, "embed_bwd: gradient size");
    g_table.iter_mut().for_each(|x| *x = T::zero());
    let vocab = g_table.len() / d.max(1);
    // Each task owns whole vocabulary rows, so no two tasks write one element.
    let rows_per_task = vocab.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    g_table.par_chunks_mut(rows_per_task * d).enumerate().for_each(|(task, block)| {
        let lo = task * rows_per_task;
        let hi = lo + block.len() / d;
        for (i, &t) in tokens.iter().enumerate() {
            let t = t as usize;
            if (lo..hi).contains(&t) {
                let row = &mut block[(t - lo) * d..(t - lo + 1) * d];
                for (r, &v) in row.iter_mut().zip(&g[i * d..(i + 1) * d]) {
                    *r = *r + v;
                }
            }
        }
    });
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`.
pub fn matmul_fwd<T: Real>(m: usize, k: usize, n: usize, x: &[T], w: &[T], y: &mut [T]) {
    gemm(m, k, n, x, false, w, true, y, T::zero());
}

/// `g_x = g · w`, `g_w = gᵀ · x`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bwd<T: Real>(m: usize, k: usize, n: usize, x: &[T], w: &[T], g: &[T], gx: &mut [T], gw: &mut [T]) {
    gemm(m, n, k, g, false, w, false, gx, T::zero());
    gemm(n, m, k, g, true, x, false, gw, T::zero());
}

/// Columns `[start, start + len)` of rows of width `width`.
pub fn slice_fwd<T: Real>(width: usize, start: usize, len: usize, x: &[T], out: &mut [T]) {
    out.par_chunks_mut(len).zip(x.par_chunks(width)).for_each(|(o, x)| o.copy_from_slice(&x[start..start + len]));
}

/// The gradient of a slice: rows of width `width`, zero outside the slice.
pub fn slice_bwd<T: Real>(width: usize, start: usize, len: usize, g: &[T], out: &mut [T]) {
    out.par_chunks_mut(width).zip(g.par_chunks(len)).for_each(|(o, g)| {
        o.iter_mut().for_each(|v| *v = T::zero());
        o[start..start + len].copy_from_slice(g);
    });
}

/// Tokens per cross-entropy chunk: bounds the logits held at once to `CHUNK × vocab`.
pub const CE_CHUNK: usize = 256;

/// Mean token cross-entropy of `h · wᵀ` against `targets` over the positions that have one
/// (0 when none has), computed chunk by chunk so only `CE_CHUNK × vocab` logits exist at a time.
pub fn cross_entropy_fwd<T: Real>(d: usize, vocab: usize, h: &[T], w: &[T], targets: &[i32]) -> T {
    let n = targets.len();
    let losses: Vec<T> = (0..n.div_ceil(CE_CHUNK))
        .into_par_iter()
        .map(|c| {
            let lo = c * CE_CHUNK;
            let rows = (n - lo).min(CE_CHUNK);
            let mut z = vec![T::zero(); rows * vocab];
            gemm(rows, d, vocab, &h[lo * d..(lo + rows) * d], false, w, true, &mut z, T::zero());
            let mut sum = T::zero();
            for (r, zr) in z.chunks(vocab).enumerate() {
                let t = targets[lo + r];
                if t >= 0 {
                    sum = sum + log_sum_exp(zr) - zr[t as usize];
                }
            }
            sum
        })
        .collect();
    losses.into_iter().fold(T::zero(), |a, b| a + b) / T::of(target_count(targets).max(1) as f64)
}

/// The log-probability of each row's target under `softmax(h · wᵀ)` (0 where the target is
/// negative), chunk by chunk as [`cross_entropy_fwd`].
pub fn token_logprobs<T: Real>(d: usize, vocab: usize, h: &[T], w: &[T], targets: &[i32], out: &mut [T]) {
    out.par_chunks_mut(CE_CHUNK).enumerate().for_each(|(c, out)| {
        let lo = c * CE_CHUNK;
        let rows = out.len();
        let mut z = vec![T::zero(); rows * vocab];
        gemm(rows, d, vocab, &h[lo * d..(lo + rows) * d], false, w, true, &mut z, T::zero());
        for ((o, zr), &t) in out.iter_mut().zip(z.chunks(vocab)).zip(&targets[lo..lo + rows]) {
            *o = if t >= 0 { zr[t as usize] - log_sum_exp(zr) } else { T::zero() };
        }
    });
}

fn log_sum_exp<T: Real>(z: &[T]) -> T {
    let m = z.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
    m + z.iter().fold(T::zero(), |a, &v| a + (v - m).exp()).ln()
}

/// Gradients of `g_loss · cross_entropy_fwd`: with `G = (softmax(z) − onehot)·g_loss/N` (zero
/// rows where there is no target, `N` the positions with one; rounded to bf16 with `round_g`),
/// `g_h = G · w` and `g_w = Gᵀ · h`. Chunks run in order (each product is itself parallel), so
/// `g_w` accumulates in a fixed order and only one chunk of logits exists at a time.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_bwd<T: Real>(
    d: usize,
    vocab: usize,
    h: &[T],
    w: &[T],
    targets: &[i32],
    g_loss: T,
    round_g: bool,
    gh: &mut [T],
    gw: &mut [T],
) {
    let n = targets.len();
    let scale = g_loss / T::of(target_count(targets).max(1) as f64);
    gw.iter_mut().for_each(|v| *v = T::zero());
    let mut z = vec![T::zero(); CE_CHUNK.min(n) * vocab];
    for (c, gh) in gh.chunks_mut(CE_CHUNK * d).enumerate() {
        let lo = c * CE_CHUNK;
        let rows = (n - lo).min(CE_CHUNK);
        let hc = &h[lo * d..(lo + rows) * d];
        let z = &mut z[..rows * vocab];
        gemm(rows, d, vocab, hc, false, w, true, z, T::zero());
        z.par_chunks_mut(vocab).enumerate().for_each(|(r, zr)| {
            let t = targets[lo + r];
            if t < 0 {
                zr.iter_mut().for_each(|v| *v = T::zero());
                return;
            }
            let lse = log_sum_exp(zr);
            for v in zr.iter_mut() {
                *v = (*v - lse).exp() * scale;
            }
            let t = t as usize;
            zr[t] = zr[t] - scale;
            if round_g {
                // The GPU keeps each chunk's G in bf16 for its two products.
                super::real::round_bf16(zr);
            }
        });
        gemm(rows, vocab, d, z, false, w, false, gh, T::zero());
        gemm(vocab, rows, d, z, true, hc, false, gw, T::one());
    }
}

/// `logits = h · wᵀ`.
pub fn logits_fwd<T: Real>(rows: usize, d: usize, vocab: usize, h: &[T], w: &[T], out: &mut [T]) {
    gemm(rows, d, vocab, h, false, w, true, out, T::zero());
}

/// Σ x² in a fixed order.
pub fn sum_squares<T: Real>(x: &[T]) -> T {
    let partials: Vec<T> =
        x.par_chunks(ROWS_PER_TASK * 1024).map(|c| c.iter().fold(T::zero(), |a, &v| a + v * v)).collect();
    partials.into_iter().fold(T::zero(), |a, b| a + b)
}
