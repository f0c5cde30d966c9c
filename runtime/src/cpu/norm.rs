//! RMSNorm over the last axis and the per-head RMSNorm with a SiLU gate of GLA and RetNet.

use super::elementwise::{silu, silu_grad, ROWS_PER_TASK};
use super::Real;
use rayon::prelude::*;

fn inv_rms<T: Real>(x: &[T], eps: f64) -> T {
    let d = T::of(x.len() as f64);
    let ss = x.iter().fold(T::zero(), |a, &v| a + v * v);
    T::one() / (ss / d + T::of(eps)).sqrt()
}

/// `y = w ⊙ x / sqrt(mean(x²) + eps)` for each row of width `d`.
pub fn rms_norm_fwd<T: Real>(d: usize, eps: f64, x: &[T], w: &[T], y: &mut [T]) {
    assert!(w.len() == d && x.len() == y.len() && x.len() % d.max(1) == 0, "rms_norm: sizes differ");
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
        let r = inv_rms(x, eps);
        for j in 0..d {
            y[j] = w[j] * x[j] * r;
        }
    });
}

/// `s = x + y`, `n = w ⊙ s / sqrt(mean(s²) + eps)`: the residual add fused with the next norm.
pub fn add_rms_norm_fwd<T: Real>(d: usize, eps: f64, x: &[T], y: &[T], w: &[T], s: &mut [T], n: &mut [T]) {
    assert!(
        w.len() == d && x.len() == y.len() && s.len() == x.len() && n.len() == x.len(),
        "add_rms_norm: sizes differ"
    );
    s.par_chunks_mut(d).zip(n.par_chunks_mut(d)).zip(x.par_chunks(d).zip(y.par_chunks(d))).for_each(
        |((s, n), (x, y))| {
            for j in 0..d {
                s[j] = x[j] + y[j];
            }
            let r = inv_rms(s, eps);
            for j in 0..d {
                n[j] = w[j] * s[j] * r;
            }
        },
    );
}

/// Backward of [`rms_norm_fwd`] (kernels.md §1): with `x̂ = x·ρ`, `u = w ⊙ g`,
/// `g_x = ρ·(u − mean(u ⊙ x̂)·x̂)`, `g_w = Σ_rows g ⊙ x̂`.
pub fn rms_norm_bwd<T: Real>(d: usize, eps: f64, x: &[T], w: &[T], g: &[T], gx: &mut [T], gw: &mut [T]) {
    assert!(w.len() == d && gw.len() == d && x.len() == g.len() && gx.len() == g.len(), "rms_norm_bwd: sizes differ");
    let dd = T::of(d as f64);
    let partials: Vec<Vec<T>> = gx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK).zip(g.par_chunks(d * ROWS_PER_TASK)))
        .map(|(gx, (x, g))| {
            let mut acc = vec![T::zero(); d];
            for ((gx, x), g) in gx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let r = inv_rms(x, eps);
                let c = (0..d).fold(T::zero(), |a, j| a + w[j] * g[j] * x[j] * r) / dd;
                for j in 0..d {
                    let xh = x[j] * r;
                    gx[j] = r * (w[j] * g[j] - c * xh);
                    acc[j] = acc[j] + g[j] * xh;
                }
            }
            acc
        })
        .collect();
    sum_partials(partials, gw);
}

/// Adds per-block partial sums in block order.
pub fn sum_partials<T: Real>(partials: Vec<Vec<T>>, out: &mut [T]) {
    out.iter_mut().for_each(|o| *o = T::zero());
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o = *o + v;
        }
    }
}

/// `y = rmsnorm_per_head(o)·w ⊙ silu(g)`: rows of width `heads·dh`, `w` of length `dh`.
pub fn head_rms_norm_gate_fwd<T: Real>(heads: usize, eps: f64, o: &[T], g: &[T], w: &[T], y: &mut [T]) {
    let dh = w.len();
    let width = heads * dh;
    assert!(
        o.len() == g.len() && o.len() == y.len() && o.len() % width.max(1) == 0,
        "head_rms_norm_gate: sizes differ"
    );
    y.par_chunks_mut(dh).zip(o.par_chunks(dh).zip(g.par_chunks(dh))).for_each(|(y, (o, g))| {
        let r = inv_rms(o, eps);
        for j in 0..dh {
            y[j] = o[j] * r * w[j] * silu(g[j]);
        }
    });
}

/// Backward of [`head_rms_norm_gate_fwd`]: `(g_o, g_g, g_w)`.
#[allow(clippy::too_many_arguments)]
pub fn head_rms_norm_gate_bwd<T: Real>(
    heads: usize,
    eps: f64,
    o: &[T],
    g_in: &[T],
    w: &[T],
    gy: &[T],
    go: &mut [T],
    gg: &mut [T],
    gw: &mut [T],
) {
    let dh = w.len();
    assert!(
        o.len() == g_in.len() && o.len() == gy.len() && go.len() == o.len() && gg.len() == o.len() && gw.len() == dh,
        "head_rms_norm_gate_bwd: sizes differ"
    );
    let _ = heads;
    let dd = T::of(dh as f64);
    let block = dh * ROWS_PER_TASK;
    let partials: Vec<Vec<T>> = go
        .par_chunks_mut(block)
        .zip(gg.par_chunks_mut(block))
        .zip(o.par_chunks(block).zip(g_in.par_chunks(block)).zip(gy.par_chunks(block)))
        .map(|((go, gg), ((o, gi), gy))| {
            let mut acc = vec![T::zero(); dh];
            for ((go, gg), ((o, gi), gy)) in
                go.chunks_mut(dh).zip(gg.chunks_mut(dh)).zip(o.chunks(dh).zip(gi.chunks(dh)).zip(gy.chunks(dh)))
            {
                let r = inv_rms(o, eps);
                // n = ô·w, y = n·silu(g): the norm's output gradient is gy·silu(g).
                let mut c = T::zero();
                for j in 0..dh {
                    let gn = gy[j] * silu(gi[j]);
                    c = c + w[j] * gn * o[j] * r;
                }
                c = c / dd;
                for j in 0..dh {
                    let oh = o[j] * r;
                    let gn = gy[j] * silu(gi[j]);
                    gg[j] = gy[j] * oh * w[j] * silu_grad(gi[j]);
                    go[j] = r * (w[j] * gn - c * oh);
                    acc[j] = acc[j] + gn * oh;
                }
            }
            acc
        })
        .collect();
    sum_partials(partials, gw);
}
