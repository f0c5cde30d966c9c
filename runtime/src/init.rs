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
