//! Rotate-half ("GPT-NeoX") rotary position embedding, shared by attention and retention.
//!
//! A head vector x = [x₁ | x₂] at position p becomes (x₁ cos θ − x₂ sin θ, x₁ sin θ + x₂ cos θ)
//! with θ_i = p · base^(−2i/head_dim). The rotation is orthogonal, so its backward is the
//! rotation by −θ (the transpose). Angles are formed in f64 and only the cosines and sines are
//! rounded to `T`: θ grows with p, and an f32 angle would lose the low bits of large positions.

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use super::Real;

/// cos θ and sin θ for a run of consecutive positions, `half = head_dim / 2` values each.
pub struct RopeTable<T> {
    half: usize,
    first: usize,
    cos: Vec<T>,
    sin: Vec<T>,
}

impl<T: Real> RopeTable<T> {
    /// Table for `positions` with frequencies base^(−2i/head_dim). Panics on an odd head_dim.
    pub fn new(base: f64, head_dim: usize, positions: Range<usize>) -> Self {
        assert!(head_dim % 2 == 0, "rope: head_dim must be even for rotate-half, got {head_dim}");
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| base.powf(-2.0 * i as f64 / head_dim as f64)).collect();
        let count = positions.len();
        let mut cos = Vec::with_capacity(count * half);
        let mut sin = Vec::with_capacity(count * half);
        for p in positions.clone() {
            for &f in &inv_freq {
                let theta = p as f64 * f;
                cos.push(T::of(theta.cos()));
                sin.push(T::of(theta.sin()));
            }
        }
        RopeTable { half, first: positions.start, cos, sin }
    }

    fn angles(&self, pos: usize) -> (&[T], &[T]) {
        let at = (pos - self.first) * self.half;
        (&self.cos[at..at + self.half], &self.sin[at..at + self.half])
    }

    /// Rotates one head vector in place by the angles of `pos`.
    pub fn rotate(&self, pos: usize, x: &mut [T]) {
        let (cos, sin) = self.angles(pos);
        let (x1, x2) = x.split_at_mut(self.half);
        for i in 0..self.half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = a * sin[i] + b * cos[i];
        }
    }

    /// Applies the transpose (rotation by −θ) in place: the backward of [`Self::rotate`].
    pub fn rotate_back(&self, pos: usize, x: &mut [T]) {
        let (cos, sin) = self.angles(pos);
        let (x1, x2) = x.split_at_mut(self.half);
        for i in 0..self.half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] + b * sin[i];
            x2[i] = b * cos[i] - a * sin[i];
        }
    }
}

/// Rotates, in place, every head of every row of `x` ([batch, seq, width], width a multiple of
/// head_dim); row t of a sequence sits at position `first_pos + t`. With `transpose`, applies the
/// backward (rotation by −θ) instead.
pub fn apply_rope<T: Real>(
    x: &mut [T],
    seq: usize,
    width: usize,
    head_dim: usize,
    base: f64,
    first_pos: usize,
    transpose: bool,
) {
    assert!(
        head_dim > 0 && width % head_dim == 0,
        "rope: row width {width} is not a positive multiple of head_dim {head_dim}"
    );
    assert!(
        x.is_empty() || (seq > 0 && x.len() % (seq * width) == 0),
        "rope: buffer of {} is not [batch, {seq}, {width}]",
        x.len()
    );
    if x.is_empty() {
        return;
    }
    let table = RopeTable::new(base, head_dim, first_pos..first_pos + seq);
    x.par_chunks_mut(width).enumerate().for_each(|(row, xr)| {
        let pos = first_pos + row % seq;
        for head in xr.chunks_mut(head_dim) {
            if transpose {
                table.rotate_back(pos, head);
            } else {
                table.rotate(pos, head);
            }
        }
    });
}

/// `x` with RoPE applied from position 0 (a copy), or `x` itself when there is no RoPE.
pub(crate) fn rotated<'a, T: Real>(
    x: &'a [T],
    seq: usize,
    width: usize,
    head_dim: usize,
    rope: Option<f64>,
) -> Cow<'a, [T]> {
    match rope {
        None => Cow::Borrowed(x),
        Some(base) => {
            let mut y = x.to_vec();
            apply_rope(&mut y, seq, width, head_dim, base, 0, false);
            Cow::Owned(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_preserves_norms_and_its_transpose_inverts_it() {
        let (seq, hd) = (5, 6);
        let x: Vec<f64> = (0..2 * seq * 2 * hd).map(|i| (i as f64 * 0.71).sin()).collect();
        let mut y = x.clone();
        apply_rope(&mut y, seq, 2 * hd, hd, 10_000.0, 3, false);
        for (a, b) in x.chunks(hd).zip(y.chunks(hd)) {
            let na: f64 = a.iter().map(|v| v * v).sum();
            let nb: f64 = b.iter().map(|v| v * v).sum();
            assert!((na - nb).abs() < 1e-12);
        }
        apply_rope(&mut y, seq, 2 * hd, hd, 10_000.0, 3, true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-14);
        }
    }

    #[test]
    fn rope_matches_the_formula() {
        let (hd, base, pos) = (4usize, 100.0f64, 7usize);
        let x = [0.3f64, -1.2, 0.8, 2.0];
        let mut y = x;
        RopeTable::new(base, hd, pos..pos + 1).rotate(pos, &mut y);
        for i in 0..2 {
            let th = pos as f64 * base.powf(-2.0 * i as f64 / hd as f64);
            let (x1, x2) = (x[i], x[i + 2]);
            assert!((y[i] - (x1 * th.cos() - x2 * th.sin())).abs() < 1e-15);
            assert!((y[i + 2] - (x1 * th.sin() + x2 * th.cos())).abs() < 1e-15);
        }
    }
}
