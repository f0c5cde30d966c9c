//! Initialisation rules of parameters (reference section 1.7).
//!
//! A rule is data, not code: the compiler records one per parameter and every backend draws the
//! same values from it, so the CPU and the GPU start from identical weights.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Init {
    /// N(0, std²).
    Normal {
        std: f64,
    },
    /// U(-bound, +bound).
    Uniform {
        bound: f64,
    },
    Constant {
        value: f64,
    },
    /// Mamba's S4D-real `A_log[c, s] = ln(s + 1)`, so that `A = -(1, 2, ..., d_state)`.
    S4dRealLog,
    /// Mamba's dt bias: `softplus⁻¹(dt)` with `dt = exp(U(ln dt_min, ln dt_max))` clamped to
    /// at least `floor`, so Δ starts in `[dt_min, dt_max]`.
    MambaDtBias {
        dt_min: f64,
        dt_max: f64,
        floor: f64,
    },
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Init::Normal { std } => write!(f, "normal(std={})", short(*std)),
            Init::Uniform { bound } => write!(f, "uniform(±{})", short(*bound)),
            Init::Constant { value } => write!(f, "constant({})", short(*value)),
            Init::S4dRealLog => f.write_str("s4d_real_log"),
            Init::MambaDtBias { dt_min, dt_max, floor } => write!(
                f,
                "mamba_dt_bias(dt_min={}, dt_max={}, floor={})",
                short(*dt_min),
                short(*dt_max),
                short(*floor)
            ),
        }
    }
}

/// Six significant digits: stable across platforms and short enough to read in a dump.
fn short(x: f64) -> String {
    let s = format!("{x:.6e}");
    let v: f64 = s.parse().unwrap_or(x);
    format!("{v}")
}

/// FNV-1a of a parameter's name: the name selects an independent stream of numbers.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in (0, 1) that depends only on (seed, name, element index, draw): the
/// counter-based generator every backend uses, so weights are identical everywhere.
pub fn uniform(seed: u64, name: &str, index: u64, draw: u64) -> f64 {
    let h = mix(mix(mix(seed ^ 0x9e37_79b9_7f4a_7c15) ^ name_hash(name)) ^ index.wrapping_mul(2).wrapping_add(draw));
    ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

impl Init {
    /// The initial values of a parameter of `shape` named `name`, in f64.
    pub fn values(&self, seed: u64, name: &str, shape: &[u64]) -> Vec<f64> {
        let n: u64 = shape.iter().product();
        let last = shape.last().copied().unwrap_or(1).max(1);
        (0..n)
            .map(|i| match *self {
                Init::Normal { std } => {
                    // Box–Muller on two independent draws of this element.
                    let (u1, u2) = (uniform(seed, name, i, 0), uniform(seed, name, i, 1));
                    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                }
                Init::Uniform { bound } => bound * (2.0 * uniform(seed, name, i, 0) - 1.0),
                Init::Constant { value } => value,
                Init::S4dRealLog => ((i % last) as f64 + 1.0).ln(),
                Init::MambaDtBias { dt_min, dt_max, floor } => {
                    let u = uniform(seed, name, i, 0);
                    let dt = (dt_min.ln() + u * (dt_max.ln() - dt_min.ln())).exp().max(floor);
                    // softplus⁻¹(dt) = dt + ln(−expm1(−dt))
                    dt + (-(-dt).exp_m1()).ln()
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_independent_per_name() {
        let a = Init::Normal { std: 0.02 }.values(7, "embed.weight", &[4, 8]);
        assert_eq!(a, Init::Normal { std: 0.02 }.values(7, "embed.weight", &[4, 8]));
        assert_ne!(a, Init::Normal { std: 0.02 }.values(7, "head.weight", &[4, 8]));
        assert_ne!(a, Init::Normal { std: 0.02 }.values(8, "embed.weight", &[4, 8]));
    }

    #[test]
    fn distributions_have_the_right_moments() {
        let n = 200_000;
        let x = Init::Normal { std: 0.5 }.values(1, "w", &[n]);
        let mean = x.iter().sum::<f64>() / n as f64;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.005 && (var.sqrt() - 0.5).abs() < 0.005, "{mean} {var}");
        let u = Init::Uniform { bound: 2.0 }.values(1, "u", &[n]);
        assert!(u.iter().all(|v| v.abs() < 2.0));
        let var = u.iter().map(|v| v * v).sum::<f64>() / n as f64;
        assert!((var - 4.0 / 3.0).abs() < 0.02, "{var}");
    }

    #[test]
    fn mamba_rules() {
        let a = Init::S4dRealLog.values(0, "A_log", &[2, 3]);
        assert_eq!(a, vec![0.0, 2f64.ln(), 3f64.ln(), 0.0, 2f64.ln(), 3f64.ln()]);
        let b = Init::MambaDtBias { dt_min: 0.001, dt_max: 0.1, floor: 1e-4 }.values(0, "dt", &[1000]);
        for v in b {
            let dt = v.max(0.0) + (-v.abs()).exp().ln_1p();
            assert!((0.001 - 1e-12..=0.1 + 1e-12).contains(&dt), "{dt}");
        }
    }
}
