//! Mamba's causal depthwise convolution with bias and SiLU, forward, backward and decode.

use super::elementwise::{silu, silu_grad};
use super::Real;
use rayon::prelude::*;

/// Dimensions of a `[batch, seq, channels]` activation convolved with a `[channels, width]` kernel.
#[derive(Clone, Copy, Debug)]
pub struct ConvDims {
    pub batch: usize,
    pub seq: usize,
    pub channels: usize,
    pub width: usize,
}

/// The pre-activation `bias[c] + Σ_j w[c, j]·x[t + j − (width−1), c]` (zero left padding).
fn pre<T: Real>(dims: ConvDims, x: &[T], w: &[T], bias: &[T], t: usize, c: usize) -> T {
    let ConvDims { channels, width, .. } = dims;
    let mut acc = bias[c];
    for j in 0..width {
        if let Some(src) = (t + j).checked_sub(width - 1) {
            acc = acc + w[c * width + j] * x[src * channels + c];
        }
    }
    acc
}

fn check<T>(dims: ConvDims, x: &[T], w: &[T], bias: &[T], other: &[T]) {
    let n = dims.batch * dims.seq * dims.channels;
    assert!(
        x.len() == n && other.len() == n && w.len() == dims.channels * dims.width && bias.len() == dims.channels,
        "conv: sizes differ"
    );
}

pub fn conv_fwd<T: Real>(dims: ConvDims, x: &[T], w: &[T], bias: &[T], out: &mut [T]) {
    check(dims, x, w, bias, out);
    let per_seq = dims.seq * dims.channels;
    out.par_chunks_mut(per_seq).zip(x.par_chunks(per_seq)).for_each(|(o, x)| {
        for t in 0..dims.seq {
            for c in 0..dims.channels {
                o[t * dims.channels + c] = silu(pre(dims, x, w, bias, t, c));
            }
        }
    });
}

/// Gradients of `conv_fwd`: the pre-activation is recomputed; `g_w`, `g_bias` are summed per
/// sequence in parallel, then over sequences in order.
#[allow(clippy::too_many_arguments)]
pub fn conv_bwd<T: Real>(
    dims: ConvDims,
    x: &[T],
    w: &[T],
    bias: &[T],
    g: &[T],
    gx: &mut [T],
    gw: &mut [T],
    gbias: &mut [T],
) {
    check(dims, x, w, bias, g);
    let ConvDims { seq, channels, width, .. } = dims;
    let per_seq = seq * channels;
    let partials: Vec<(Vec<T>, Vec<T>)> = gx
        .par_chunks_mut(per_seq)
        .zip(x.par_chunks(per_seq).zip(g.par_chunks(per_seq)))
        .map(|(gx, (x, g))| {
            let mut gpre = vec![T::zero(); per_seq];
            for t in 0..seq {
                for c in 0..channels {
                    let i = t * channels + c;
                    gpre[i] = g[i] * silu_grad(pre(dims, x, w, bias, t, c));
                }
            }
            let mut gw = vec![T::zero(); channels * width];
            let mut gb = vec![T::zero(); channels];
            gx.iter_mut().for_each(|v| *v = T::zero());
            for t in 0..seq {
                for c in 0..channels {
                    let gp = gpre[t * channels + c];
                    gb[c] = gb[c] + gp;
                    for j in 0..width {
                        if let Some(src) = (t + j).checked_sub(width - 1) {
                            gw[c * width + j] = gw[c * width + j] + gp * x[src * channels + c];
                            gx[src * channels + c] = gx[src * channels + c] + gp * w[c * width + j];
                        }
                    }
                }
            }
            (gw, gb)
        })
        .collect();
    gw.iter_mut().for_each(|v| *v = T::zero());
    gbias.iter_mut().for_each(|v| *v = T::zero());
    for (pw, pb) in partials {
        gw.iter_mut().zip(pw).for_each(|(a, b)| *a = *a + b);
        gbias.iter_mut().zip(pb).for_each(|(a, b)| *a = *a + b);
    }
}

/// One decode step: `state` holds the last `width − 1` inputs of each sequence
/// (`[batch, width−1, channels]`, oldest first); it shifts in `x` (`[batch, channels]`).
pub fn conv_step<T: Real>(dims: ConvDims, x: &[T], w: &[T], bias: &[T], state: &mut [T], out: &mut [T]) {
    let ConvDims { channels, width, .. } = dims;
    let keep = width - 1;
    assert!(
        state.len() == dims.batch * keep * channels && x.len() == dims.batch * channels && out.len() == x.len(),
        "conv_step: sizes differ"
    );
    state
        .par_chunks_mut(keep * channels.max(1))
        .zip(x.par_chunks(channels).zip(out.par_chunks_mut(channels)))
        .for_each(|(s, (x, o))| {
            for c in 0..channels {
                let mut acc = bias[c];
                for j in 0..keep {
                    acc = acc + w[c * width + j] * s[j * channels + c];
                }
                acc = acc + w[c * width + keep] * x[c];
                o[c] = silu(acc);
            }
            if keep > 0 {
                s.copy_within(channels.., 0);
                s[(keep - 1) * channels..].copy_from_slice(x);
            }
        });
}

/// The decode state after a prompt: its last `width − 1` inputs (zeros before the start).
pub fn conv_final_state<T: Real>(dims: ConvDims, x: &[T], state: &mut [T]) {
    let ConvDims { seq, channels, width, .. } = dims;
    let keep = width - 1;
    for (b, s) in state.chunks_mut(keep * channels.max(1)).enumerate().take(dims.batch) {
        for j in 0..keep {
            let row = &mut s[j * channels..(j + 1) * channels];
            match (seq + j).checked_sub(keep) {
                Some(t) if t < seq => row.copy_from_slice(&x[(b * seq + t) * channels..(b * seq + t + 1) * channels]),
                _ => row.iter_mut().for_each(|v| *v = T::zero()),
            }
        }
    }
}
