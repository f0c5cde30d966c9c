//! Layer kinds, their parameters and defaults (from the Samba reference), and the checks that
//! tie them to the model width.

use super::args::ArgReader;
use crate::diag::{Diagnostic, Span};

/// Every layer kind a spec may name; `mlp` is SwiGLU, as in Samba.
pub const LAYER_KINDS: &[&str] = &["mamba", "attention", "swiglu", "mlp", "gla", "retnet"];

/// Mamba-1 (S6) mixer, reference section 1.3.
#[derive(Clone, Debug, PartialEq)]
pub struct Mamba {
    pub d_state: u64,
    pub expand: u64,
    pub d_conv: u64,
    pub dt_rank: u64,
    pub dt_min: f64,
    pub dt_max: f64,
    pub dt_floor: f64,
}

impl Mamba {
    pub fn inner(&self, width: u64) -> u64 {
        self.expand * width
    }
}

/// Causal softmax attention, full or sliding-window, reference sections 1.4 and 3.1–3.2.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub window: Option<u64>,
    pub rope: Option<f64>,
    /// Self-Extend at inference, set by evaluation (never by a spec): full attention with RoPE
    /// only, and never in the training graph.
    pub self_extend: Option<weft_runtime::op::SelfExtend>,
}

/// SwiGLU MLP `W₃(SiLU(W₁x) ⊙ W₂x)`, reference section 1.5.
#[derive(Clone, Debug, PartialEq)]
pub struct SwiGlu {
    pub hidden: u64,
}

/// Gated linear attention, reference section 3.8.
#[derive(Clone, Debug, PartialEq)]
pub struct Gla {
    pub heads: u64,
    pub key_dim: u64,
    pub value_dim: u64,
    pub gate_rank: u64,
    pub gate_norm: f64,
}

/// Multi-scale retention, reference section 3.9.
#[derive(Clone, Debug, PartialEq)]
pub struct RetNet {
    pub heads: u64,
    pub key_dim: u64,
    pub value_dim: u64,
    pub rope: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    Mamba(Mamba),
    Attention(Attention),
    SwiGlu(SwiGlu),
    Gla(Gla),
    RetNet(RetNet),
}

impl LayerKind {
    pub fn kind_name(&self) -> &'static str {
        match self {
            LayerKind::Mamba(_) => "mamba",
            LayerKind::Attention(_) => "attention",
            LayerKind::SwiGlu(_) => "swiglu",
            LayerKind::Gla(_) => "gla",
            LayerKind::RetNet(_) => "retnet",
        }
    }

    /// The name of the mixer in parameter names (`layers.3.attn.q_proj.weight`).
    pub fn param_prefix(&self) -> &'static str {
        match self {
            LayerKind::Mamba(_) => "mamba",
            LayerKind::Attention(_) => "attn",
            LayerKind::SwiGlu(_) => "mlp",
            LayerKind::Gla(_) => "gla",
            LayerKind::RetNet(_) => "retnet",
        }
    }

    /// A short description for tables: `swa(w=2048)`, `attention(full)`, `mamba`.
    pub fn describe(&self) -> String {
        match self {
            LayerKind::Attention(a) => match a.window {
                Some(w) => format!("swa(w={w})"),
                None => "attention(full)".to_string(),
            },
            other => other.kind_name().to_string(),
        }
    }
}

/// The widest causal convolution the GPU kernels take (their taps unroll into registers).
pub const MAX_CONV_WIDTH: u64 = 16;

/// Reads a layer definition's arguments; `None` after reporting when they are wrong.
/// `width` is `None` when the model's width is itself wrong: the arguments are still checked,
/// only the checks against the width are skipped.
pub fn read_layer(kind: &str, r: &mut ArgReader, width: Option<u64>, def: Span) -> Option<LayerKind> {
    let known_width = width;
    let width = width.unwrap_or(0);
    let errors_before = r.diags.error_count();
    let kind = match kind {
        "mamba" => {
            let d_state = r.int("d_state", Some(16), 1, "");
            let expand = r.int("expand", Some(2), 1, "");
            let d_conv = r.int_at_most(
                "d_conv",
                Some(4),
                1,
                MAX_CONV_WIDTH,
                "the convolution's kernels keep every tap and its window in registers (the reference uses 4)",
            );
            let dt_rank = r.int_or_word("dt_rank", "auto", None, 1).unwrap_or(width.div_ceil(16));
            let dt_min = r.positive("dt_min", 0.001);
            let dt_max = r.positive("dt_max", 0.1);
            let dt_floor = r.positive("dt_floor", 1e-4);
            if dt_max < dt_min {
                let at = r.span_of("dt_max").unwrap_or(def);
                r.diags.push(
                    Diagnostic::error(format!("dt_max {dt_max} is below dt_min {dt_min}"))
                        .at(at, "must be at least dt_min"),
                );
            }
            LayerKind::Mamba(Mamba {
                d_state: d_state?,
                expand: expand?,
                d_conv: d_conv?,
                dt_rank,
                dt_min,
                dt_max,
                dt_floor,
            })
        }
        "attention" => {
            let heads = r.int("heads", None, 1, "attention needs `heads = N`");
            // Without a valid `heads` there is no default to miss: only `heads` is reported.
            let kv_heads = r.int("kv_heads", Some(heads.unwrap_or(1)), 1, "");
            let head_dim = r.int("head_dim", Some(0), 1, "");
            let window = r.int_or_word("window", "full", None, 1);
            let rope = r.positive_or_word("rope", "none", Some(10000.0));
            let heads = heads?;
            let kv_heads = kv_heads?;
            let head_dim = match r.span_of("head_dim") {
                Some(_) => head_dim?,
                None => {
                    if known_width.is_some() && width % heads != 0 {
                        let at = r.span_of("heads").unwrap_or(def);
                        r.diags.push(
                            Diagnostic::error(format!("{heads} heads do not divide the width {width}"))
                                .at(at, format!("{width} is not a multiple of {heads}"))
                                .note("choose heads that divide the width, or give `head_dim` explicitly"),
                        );
                        return None;
                    }
                    (width / heads).max(1)
                }
            };
            if heads % kv_heads != 0 {
                let at = r.span_of("kv_heads").unwrap_or(def);
                r.diags.push(
                    Diagnostic::error(format!("kv_heads {kv_heads} does not divide heads {heads}"))
                        .at(at, "each key/value head must serve a whole number of query heads"),
                );
            }
            // A head size derived from an unknown width says nothing.
            let head_dim_known = known_width.is_some() || r.span_of("head_dim").is_some();
            if head_dim_known && rope.is_some() && head_dim % 2 != 0 {
                let at = r.span_of("head_dim").or(r.span_of("heads")).unwrap_or(def);
                r.diags.push(
                    Diagnostic::error(format!("RoPE needs an even head dimension, found {head_dim}"))
                        .at(at, "odd head dimension")
                        .note(
                            "rotate-half RoPE pairs the two halves of each head; use `rope = none` or an even head_dim",
                        ),
                );
            }
            LayerKind::Attention(Attention { heads, kv_heads, head_dim, window, rope, self_extend: None })
        }
        "swiglu" | "mlp" => {
            let hidden = r.int("hidden", None, 1, "an MLP needs its hidden width, e.g. `hidden = 4096`");
            LayerKind::SwiGlu(SwiGlu { hidden: hidden? })
        }
        "gla" => {
            let heads = r.int("heads", Some((width / 384).max(1)), 1, "");
            let ke = r.positive("key_expansion", 0.5);
            let ve = r.positive("value_expansion", 1.0);
            let gate_rank = r.int("gate_rank", Some(16), 1, "");
            let gate_norm = r.positive("gate_norm", 16.0);
            let heads = heads?;
            let key_dim = expanded(r, "key_expansion", known_width, ke, heads, def)?;
            let value_dim = expanded(r, "value_expansion", known_width, ve, heads, def)?;
            LayerKind::Gla(Gla { heads, key_dim, value_dim, gate_rank: gate_rank?, gate_norm })
        }
        "retnet" => {
            let heads = r.int("heads", None, 1, "retnet needs `heads = N`");
            let ke = r.positive("key_expansion", 1.0);
            let ve = r.positive("value_expansion", 2.0);
            let rope = r.positive_or_word("rope", "none", Some(10000.0));
            let heads = heads?;
            let key_dim = expanded(r, "key_expansion", known_width, ke, heads, def)?;
            let value_dim = expanded(r, "value_expansion", known_width, ve, heads, def)?;
            if rope.is_some() && (key_dim / heads) % 2 != 0 {
                r.diags.push(
                    Diagnostic::error(format!("RoPE needs an even key dimension per head, found {}", key_dim / heads))
                        .at(r.span_of("heads").unwrap_or(def), "odd key dimension per head"),
                );
            }
            LayerKind::RetNet(RetNet { heads, key_dim, value_dim, rope })
        }
        _ => return None,
    };
    (r.diags.error_count() == errors_before).then_some(kind)
}

/// `width · expansion`, which must be a whole number that the heads divide.
fn expanded(
    r: &mut ArgReader,
    key: &'static str,
    width: Option<u64>,
    factor: f64,
    heads: u64,
    def: Span,
) -> Option<u64> {
    let Some(width) = width else {
        return Some(heads);
    };
    let dim = width as f64 * factor;
    let at = r.span_of(key).unwrap_or(def);
    if dim.fract() != 0.0 || dim < 1.0 || dim > super::args::MAX_SIZE as f64 {
        r.diags.push(
            Diagnostic::error(format!(
                "{key} {factor} of width {width} gives {dim}, not a whole number from 1 to 2^24"
            ))
            .at(at, "gives a fractional width"),
        );
        return None;
    }
    let dim = dim as u64;
    if dim % heads != 0 {
        r.diags.push(
            Diagnostic::error(format!("{heads} heads do not divide the {key} width {dim}"))
                .at(r.span_of("heads").unwrap_or(at), format!("{dim} is not a multiple of {heads}")),
        );
        return None;
    }
    Some(dim)
}
