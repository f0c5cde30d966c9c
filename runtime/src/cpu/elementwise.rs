//! Elementwise kernels: SiLU-gated products and GLA's forget gate, forward and backward.

use super::Real;
use rayon::prelude::*;

/// Rows per parallel task; fixed, so partial sums always split the same way.
pub const ROWS_PER_TASK: usize = 64;

pub fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

pub fn silu<T: Real>(x: T) -> T {
    x * sigmoid(x)
}

/// d silu(x) / dx = σ(x)·(1 + x·(1 − σ(x))).
pub fn silu_grad<T: Real>(x: T) -> T {
    let s = sigmoid(x);
    s * (T::one() + x * (T::one() - s))
}

/// softplus(x) = ln(1 + eˣ), exact and stable for every finite x.
pub fn softplus<T: Real>(x: T) -> T {
    x.max(T::zero()) + (-x.abs()).exp().ln_1p()
}

/// `out = silu(a) ⊙ b`.
pub fn swiglu_fwd<T: Real>(a: &[T], b: &[T], out: &mut [T]) {
    assert!(a.len() == b.len() && b.len() == out.len(), "swiglu: sizes differ");
    out.par_iter_mut().zip(a.par_iter().zip(b.par_iter())).for_each(|(o, (&a, &b))| *o = silu(a) * b);
}

pub fn swiglu_bwd<T: Real>(a: &[T], b: &[T], g: &[T], ga: &mut [T], gb: &mut [T]) {
    assert!(
        a.len() == b.len() && b.len() == g.len() && ga.len() == g.len() && gb.len() == g.len(),
        "swiglu_bwd: sizes differ"
    );
    ga.par_iter_mut().zip(gb.par_iter_mut()).enumerate().for_each(|(i, (ga, gb))| {
        *gb = g[i] * silu(a[i]);
        *ga = g[i] * b[i] * silu_grad(a[i]);
    });
}

/// Elementwise sum.
pub fn add<T: Real>(a: &[T], b: &[T], out: &mut [T]) {
    assert!(a.len() == b.len() && b.len() == out.len(), "add: sizes differ");
    out.par_iter_mut().zip(a.par_iter().zip(b.par_iter())).for_each(|(o, (&a, &b))| *o = a + b);
}

/// GLA's forget gate: `out = logsigmoid(x + bias) / normalizer`, rows of width `n`.
pub fn gla_gate_fwd<T: Real>(n: usize, normalizer: f64, x: &[T], bias: &[T], out: &mut [T]) {
    assert!(bias.len() == n && x.len() == out.len() && x.len() % n.max(1) == 0, "gla_gate: sizes differ");
    let norm = T::of(normalizer);
    out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
        for j in 0..n {
            // logsigmoid(z) = −softplus(−z)
            o[j] = -softplus(-(x[j] + bias[j])) / norm;
        }
    });
}

/// Gradients of `gla_gate_fwd`: `g_x = g/normalizer · σ(−z)`, `g_bias = Σ_rows g_x`.
pub fn gla_gate_bwd<T: Real>(n: usize, normalizer: f64, x: &[T], bias: &[T], g: &[T], gx: &mut [T], gbias: &mut [T]) {
    assert!(
        bias.len() == n && gbias.len() == n && x.len() == g.len() && gx.len() == g.len(),
        "gla_gate_bwd: sizes differ"
    );
    let norm = T::of(normalizer);
    gx.par_chunks_mut(n).zip(x.par_chunks(n).zip(g.par_chunks(n))).for_each(|(gx, (x, g))| {
        for j in 0..n {
            gx[j] = g[j] / norm * sigmoid(-(x[j] + bias[j]));
        }
    });
    column_sums(n, gx, gbias);
}

/// `out[j] = Σ_rows m[row, j]` in a fixed order: partial sums over fixed blocks of rows in
/// parallel, then the partials added in block order.
pub fn column_sums<T: Real>(n: usize, m: &[T], out: &mut [T]) {
    assert_eq!(out.len(), n, "column_sums: output size");
    let partials: Vec<Vec<T>> = m
        .par_chunks(n * ROWS_PER_TASK)
        .map(|block| {
            let mut acc = vec![T::zero(); n];
            for row in block.chunks(n) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a = *a + v;
                }
            }
            acc
        })
        .collect();
    super::norm::sum_partials(partials, out);
}
