//! The optimizer step: gradient clipping, the learning-rate schedule and AdamW.

use super::Real;
use crate::op::{AdamWAttrs, ScheduleAttrs};
use rayon::prelude::*;

/// `min(1, max_norm / (‖g‖ + 1e-6))`, or 1 without clipping.
pub fn clip_scale(sum_squares: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (sum_squares.sqrt() + 1e-6)).min(1.0)
}

/// Linear warm-up over `warmup` steps to `peak`, then cosine decay to `min` at `total`.
pub fn learning_rate(s: &ScheduleAttrs, step: u64) -> f64 {
    if step < s.warmup {
        return s.peak * (step + 1) as f64 / s.warmup as f64;
    }
    let span = s.total.saturating_sub(s.warmup).max(1) as f64;
    let progress = ((step - s.warmup) as f64 / span).min(1.0);
    s.min + 0.5 * (s.peak - s.min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// One AdamW update in place (PyTorch's form): `p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps)` with
/// bias-corrected moments at step `step + 1` and the gradient scaled by `clip`.
#[allow(clippy::too_many_arguments)]
pub fn adamw<T: Real>(a: &AdamWAttrs, lr: f64, clip: f64, step: u64, p: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
    assert!(p.len() == g.len() && m.len() == g.len() && v.len() == g.len(), "adamw: sizes differ");
    let t = (step + 1) as i32;
    let (b1, b2) = (T::of(a.beta1), T::of(a.beta2));
    let c1 = T::one() / (T::one() - T::of(a.beta1.powi(t)));
    let c2 = T::one() / (T::one() - T::of(a.beta2.powi(t)));
    let (lr, clip, eps) = (T::of(lr), T::of(clip), T::of(a.eps));
    let decay = T::one() - lr * T::of(a.weight_decay);
    p.par_iter_mut().zip(m.par_iter_mut().zip(v.par_iter_mut())).zip(g.par_iter()).for_each(|((p, (m, v)), &g)| {
        let g = g * clip;
        *m = b1 * *m + (T::one() - b1) * g;
        *v = b2 * *v + (T::one() - b2) * g * g;
        let mhat = *m * c1;
        let vhat = *v * c2;
        *p = *p * decay - lr * mhat / (vhat.sqrt() + eps);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = ScheduleAttrs { peak: 1e-3, min: 1e-4, warmup: 10, total: 110 };
        assert!((learning_rate(&s, 0) - 1e-4).abs() < 1e-15);
        assert!((learning_rate(&s, 9) - 1e-3).abs() < 1e-15);
        assert!((learning_rate(&s, 10) - 1e-3).abs() < 1e-15);
        assert!((learning_rate(&s, 60) - 5.5e-4).abs() < 1e-12);
        assert!((learning_rate(&s, 110) - 1e-4).abs() < 1e-15);
        assert!((learning_rate(&s, 500) - 1e-4).abs() < 1e-15);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_in_the_gradient_sign() {
        let a = AdamWAttrs { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 };
        let mut p = vec![1.0f64, -1.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        adamw(&a, 0.1, 1.0, 0, &mut p, &[2.0, -3.0], &mut m, &mut v);
        assert!((p[0] - 0.9).abs() < 1e-7 && (p[1] + 0.9).abs() < 1e-7, "{p:?}");
    }

    #[test]
    fn clipping_scales_to_the_limit() {
        assert_eq!(clip_scale(0.25, 1.0), 1.0);
        assert!((clip_scale(16.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_scale(16.0, 0.0), 1.0);
    }
}
