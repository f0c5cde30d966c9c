//! The operation set: every tensor operation a weft graph may contain, with its type rule, its
//! cost, what its backward pass keeps, and the state it carries while decoding.
//!
//! Operations are composite where the reference differentiates them as a whole (attention with
//! its window, GQA and RoPE; the selective scan with softplus, D skip and SiLU gate; tied head with
//! cross-entropy), so each has one forward and one backward kernel and an explicit saved set.

use crate::{DType, Dim, Shape, TensorType};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Causal attention, full or sliding-window, with grouped KV heads and optional rotate-half RoPE.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionAttrs {
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Keys a query sees, counting itself: query i attends keys `[i - window + 1, i]`.
    /// `None` is full causal attention.
    pub window: Option<u64>,
    /// RoPE base; `None` is NoPE.
    pub rope: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// `(tokens i32[B,T], table[V,d]) -> [B,T,d]`.
    Embed,
    /// `(x[..,d], weight[d]) -> [..,d]`: `weight * x / sqrt(mean(x²) + eps)`.
    RmsNorm { eps: f64 },
    /// Elementwise sum of two tensors of one type (the residual add).
    Add,
    /// `(x[..,k], w[n,k]) -> [..,n]`: `x · wᵀ`, weights stored out × in.
    MatMul,
    /// A view of `len` columns of the last axis starting at `start`.
    Slice { start: u64, len: u64 },
    /// `(a, b) -> silu(a) ⊙ b`.
    SwiGlu,
    /// `(x[B,T,C], w[C,k], bias[C]) -> silu(causal_depthwise_conv(x) + bias)`, left-padded by k-1.
    CausalConv1dSilu,
    /// Mamba-1 selective scan with its gate:
    /// `(u, delta, a_log, b, c, d, dt_bias, z) -> (scan(u; softplus(delta + dt_bias), -exp(a_log), b, c) + d·u) ⊙ silu(z)`.
    SelectiveScan,
    /// `(q[B,T,H·Dh], k[B,T,Hkv·Dh], v[B,T,Hkv·Dh]) -> [B,T,H·Dh]`, softmax scale `1/sqrt(Dh)`.
    Attention(AttentionAttrs),
    /// GLA's forget gate: `(x[B,T,n], bias[n]) -> f32: logsigmoid(x + bias) / normalizer`.
    GlaGate { normalizer: f64 },
    /// Gated linear attention, per head `S_t = diag(α_t) S_{t-1} + k_tᵀ v_t`, `o_t = (q_t/√dk) S_t`:
    /// `(q[B,T,K], k[B,T,K], v[B,T,V], log_alpha f32[B,T,K]) -> [B,T,V]`.
    Gla { heads: u64 },
    /// Multi-scale retention with per-head decay `γ_h = 1 - 2^(-5-h)` and optional RoPE on q, k:
    /// `(q[B,T,K], k[B,T,K], v[B,T,V]) -> [B,T,V]`.
    Retention { heads: u64, rope: Option<f64> },
    /// `(o[B,T,V], g[B,T,V], weight[V/heads]) -> rmsnorm_per_head(o)·weight ⊙ silu(g)`.
    HeadRmsNormGate { heads: u64, eps: f64 },
    /// Head and loss in one: `(h[B,T,d], w[V,d], targets i32[B,T]) -> f32[]`, the mean token
    /// cross-entropy of `h · wᵀ` without materialising all logits.
    CrossEntropy,
    /// `(h[B,T,d], w[V,d]) -> f32[B,T,V]`: the head alone, for inference.
    Logits,
}

/// What the backward pass of an operation keeps from its forward pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Saved {
    /// The operation's i-th input.
    Input(usize),
    /// Its output.
    Output,
    /// Extra tensors it writes for the backward pass (row statistics, chunk carries).
    Stat { bytes_per_token: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpError(pub String);

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OpError {}

fn err<T>(msg: impl Into<String>) -> Result<T, OpError> {
    Err(OpError(msg.into()))
}

/// The number of keys each query sees on average in a causal sequence of `seq` tokens.
/// With window 2048 at 4096 tokens this is 1536.25.
pub fn mean_keys_per_query(seq: u64, window: Option<u64>) -> f64 {
    if seq == 0 {
        return 0.0;
    }
    let w = window.unwrap_or(seq).min(seq);
    // Queries 1..=w see i keys; the remaining seq - w see w.
    let ramp = w as f64 * (w as f64 + 1.0) / 2.0;
    let flat = (seq - w) as f64 * w as f64;
    (ramp + flat) / seq as f64
}

fn per_token(t: &TensorType, what: &str) -> Result<u64, OpError> {
    if t.shape.rank() == 3 && t.shape.is_per_token() {
        Ok(t.shape.last().unwrap_or(0))
    } else {
        err(format!("{what} must be [B, T, n], found {t}"))
    }
}

fn vector(t: &TensorType, what: &str) -> Result<u64, OpError> {
    match t.shape.as_fixed().as_deref() {
        Some([n]) => Ok(*n),
        _ => err(format!("{what} must be a vector [n], found {t}")),
    }
}

fn matrix(t: &TensorType, what: &str) -> Result<(u64, u64), OpError> {
    match t.shape.as_fixed().as_deref() {
        Some([r, c]) => Ok((*r, *c)),
        _ => err(format!("{what} must be a matrix [r, c], found {t}")),
    }
}

fn float(t: &TensorType, what: &str) -> Result<(), OpError> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        err(format!("{what} must be a float tensor, found {t}"))
    }
}

fn same(a: &TensorType, b: &TensorType, what: &str) -> Result<(), OpError> {
    if a == b {
        Ok(())
    } else {
        err(format!("{what}: {a} and {b} differ"))
    }
}

fn expect_len(n: u64, want: u64, what: &str) -> Result<(), OpError> {
    if n == want {
        Ok(())
    } else {
        err(format!("{what} is {n}, expected {want}"))
    }
}

fn token_ids(t: &TensorType, what: &str) -> Result<(), OpError> {
    if t.dtype == DType::I32 && t.shape == Shape(vec![Dim::Batch, Dim::Seq]) {
        Ok(())
    } else {
        err(format!("{what} must be i32[B, T], found {t}"))
    }
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embed => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Add => "add",
            Op::MatMul => "matmul",
            Op::Slice { .. } => "slice",
            Op::SwiGlu => "swiglu",
            Op::CausalConv1dSilu => "causal_conv1d_silu",
            Op::SelectiveScan => "selective_scan",
            Op::Attention(_) => "attention",
            Op::GlaGate { .. } => "gla_gate",
            Op::Gla { .. } => "gla",
            Op::Retention { .. } => "retention",
            Op::HeadRmsNormGate { .. } => "head_rms_norm_gate",
            Op::CrossEntropy => "cross_entropy",
            Op::Logits => "logits",
        }
    }

    /// Names of the inputs, in order; their count is the operation's arity.
    pub fn input_names(&self) -> &'static [&'static str] {
        match self {
            Op::Embed => &["tokens", "table"],
            Op::RmsNorm { .. } => &["x", "weight"],
            Op::Add => &["a", "b"],
            Op::MatMul => &["x", "w"],
            Op::Slice { .. } => &["x"],
            Op::SwiGlu => &["a", "b"],
            Op::CausalConv1dSilu => &["x", "weight", "bias"],
            Op::SelectiveScan => &["u", "delta", "a_log", "b", "c", "d", "dt_bias", "z"],
            Op::Attention(_) => &["q", "k", "v"],
            Op::GlaGate { .. } => &["x", "bias"],
            Op::Gla { .. } => &["q", "k", "v", "log_alpha"],
            Op::Retention { .. } => &["q", "k", "v"],
            Op::HeadRmsNormGate { .. } => &["o", "g", "weight"],
            Op::CrossEntropy => &["h", "w", "targets"],
            Op::Logits => &["h", "w"],
        }
    }

    /// Attributes as `key=value` pairs, in a fixed order, for dumps.
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        let opt = |o: Option<f64>| o.map_or("none".to_string(), |b| format!("{b}"));
        match self {
            Op::RmsNorm { eps } => vec![("eps", format!("{eps:e}"))],
            Op::HeadRmsNormGate { heads, eps } => {
                vec![("heads", heads.to_string()), ("eps", format!("{eps:e}"))]
            }
            Op::Slice { start, len } => {
                vec![("start", start.to_string()), ("len", len.to_string())]
            }
            Op::Attention(a) => vec![
                ("heads", a.heads.to_string()),
                ("kv_heads", a.kv_heads.to_string()),
                ("head_dim", a.head_dim.to_string()),
                (
                    "window",
                    a.window.map_or("full".to_string(), |w| w.to_string()),
                ),
                ("rope", opt(a.rope)),
            ],
            Op::GlaGate { normalizer } => vec![("normalizer", format!("{normalizer}"))],
            Op::Gla { heads } => vec![("heads", heads.to_string())],
            Op::Retention { heads, rope } => {
                vec![("heads", heads.to_string()), ("rope", opt(*rope))]
            }
            _ => Vec::new(),
        }
    }

    /// Checks the input types and returns the output type.
    pub fn infer(&self, ins: &[&TensorType]) -> Result<TensorType, OpError> {
        let names = self.input_names();
        if ins.len() != names.len() {
            return err(format!(
                "{} takes {} inputs ({}), got {}",
                self.name(),
                names.len(),
                names.join(", "),
                ins.len()
            ));
        }
        match self {
            Op::Embed => {
                token_ids(ins[0], "tokens")?;
                float(ins[1], "table")?;
                let (_, d) = matrix(ins[1], "table")?;
                Ok(TensorType::new(ins[1].dtype, Shape::tokens(&[d])))
            }
            Op::RmsNorm { eps } => {
                if *eps <= 0.0 || !eps.is_finite() {
                    return err(format!("eps must be a positive number, found {eps}"));
                }
                float(ins[0], "x")?;
                let d = vector(ins[1], "weight")?;
                expect_len(ins[0].shape.last().unwrap_or(0), d, "width of x")?;
                Ok(ins[0].clone())
            }
            Op::Add | Op::SwiGlu => {
                float(ins[0], names[0])?;
                same(ins[0], ins[1], "operands")?;
                Ok(ins[0].clone())
            }
            Op::MatMul => {
                float(ins[0], "x")?;
                let (n, k) = matrix(ins[1], "w")?;
                if ins[0].shape.rank() == 0 {
                    return err("x must have at least one dimension");
                }
                expect_len(ins[0].shape.last().unwrap_or(0), k, "inner dimension of x")?;
                if ins[0].dtype != ins[1].dtype {
                    return err(format!("x is {} but w is {}", ins[0].dtype, ins[1].dtype));
                }
                Ok(TensorType::new(ins[0].dtype, ins[0].shape.with_last(n)))
            }
            Op::Slice { start, len } => {
                let n = ins[0].shape.last().unwrap_or(0);
                if *len == 0 || start.checked_add(*len).is_none_or(|end| end > n) {
                    return err(format!("slice [{start}, {start}+{len}) exceeds width {n}"));
                }
                Ok(TensorType::new(ins[0].dtype, ins[0].shape.with_last(*len)))
            }
            Op::CausalConv1dSilu => {
                let c = per_token(ins[0], "x")?;
                let (wc, _k) = matrix(ins[1], "weight")?;
                expect_len(wc, c, "channels of weight")?;
                expect_len(vector(ins[2], "bias")?, c, "length of bias")?;
                Ok(ins[0].clone())
            }
            Op::SelectiveScan => {
                let e = per_token(ins[0], "u")?;
                same(ins[0], ins[1], "u and delta")?;
                same(ins[0], ins[7], "u and z")?;
                let (ae, n) = matrix(ins[2], "a_log")?;
                expect_len(ae, e, "channels of a_log")?;
                expect_len(per_token(ins[3], "b")?, n, "width of b")?;
                expect_len(per_token(ins[4], "c")?, n, "width of c")?;
                expect_len(vector(ins[5], "d")?, e, "length of d")?;
                expect_len(vector(ins[6], "dt_bias")?, e, "length of dt_bias")?;
                for (t, what) in [(ins[2], "a_log"), (ins[5], "d"), (ins[6], "dt_bias")] {
                    if t.dtype != DType::F32 {
                        return err(format!(
                            "{what} must be f32 (the scan's state is f32), found {t}"
                        ));
                    }
                }
                Ok(ins[0].clone())
            }
            Op::Attention(a) => {
                if a.heads == 0 || a.kv_heads == 0 || a.head_dim == 0 {
                    return err("heads, kv_heads and head_dim must be positive");
                }
                if a.heads % a.kv_heads != 0 {
                    return err(format!(
                        "kv_heads {} does not divide heads {}",
                        a.kv_heads, a.heads
                    ));
                }
                if a.rope.is_some() && a.head_dim % 2 != 0 {
                    return err(format!("RoPE needs an even head_dim, found {}", a.head_dim));
                }
                if a.window == Some(0) {
                    return err("window must be at least 1");
                }
                expect_len(per_token(ins[0], "q")?, a.heads * a.head_dim, "width of q")?;
                expect_len(
                    per_token(ins[1], "k")?,
                    a.kv_heads * a.head_dim,
                    "width of k",
                )?;
                same(ins[1], ins[2], "k and v")?;
                Ok(ins[0].clone())
            }
            Op::GlaGate { normalizer } => {
                if *normalizer <= 0.0 {
                    return err("normalizer must be positive");
                }
                let n = per_token(ins[0], "x")?;
                expect_len(vector(ins[1], "bias")?, n, "length of bias")?;
                Ok(TensorType::new(DType::F32, ins[0].shape.clone()))
            }
            Op::Gla { heads } => {
                let k = per_token(ins[0], "q")?;
                same(ins[0], ins[1], "q and k")?;
                let v = per_token(ins[2], "v")?;
                expect_len(per_token(ins[3], "log_alpha")?, k, "width of log_alpha")?;
                if ins[3].dtype != DType::F32 {
                    return err(format!("log_alpha must be f32, found {}", ins[3]));
                }
                divides(*heads, k, v)?;
                Ok(ins[2].clone())
            }
            Op::Retention { heads, rope } => {
                let k = per_token(ins[0], "q")?;
                same(ins[0], ins[1], "q and k")?;
                let v = per_token(ins[2], "v")?;
                divides(*heads, k, v)?;
                if rope.is_some() && (k / heads) % 2 != 0 {
                    return err("RoPE needs an even key dimension per head");
                }
                Ok(ins[2].clone())
            }
            Op::HeadRmsNormGate { heads, eps } => {
                if *eps <= 0.0 {
                    return err("eps must be positive");
                }
                let v = per_token(ins[0], "o")?;
                same(ins[0], ins[1], "o and g")?;
                if *heads == 0 || v % heads != 0 {
                    return err(format!("heads {heads} does not divide width {v}"));
                }
                expect_len(vector(ins[2], "weight")?, v / heads, "length of weight")?;
                Ok(ins[0].clone())
            }
            Op::CrossEntropy | Op::Logits => {
                let d = per_token(ins[0], "h")?;
                let (_, wd) = matrix(ins[1], "w")?;
                expect_len(wd, d, "width of w")?;
                if ins[0].dtype != ins[1].dtype {
                    return err(format!("h is {} but w is {}", ins[0].dtype, ins[1].dtype));
                }
                if let Op::CrossEntropy = self {
                    token_ids(ins[2], "targets")?;
                    Ok(TensorType::new(DType::F32, Shape::scalar()))
                } else {
                    let (v, _) = matrix(ins[1], "w")?;
                    Ok(TensorType::new(DType::F32, Shape::tokens(&[v])))
                }
            }
        }
    }

    /// Forward FLOPs per token at sequence length `seq`, given well-typed inputs.
    ///
    /// Matrix products count 2·k·n; attention counts 4·H·Dh per key a query really sees
    /// (its window) plus RoPE; linear-attention recurrences count 4·dk·dv per head; elementwise
    /// work counts the arithmetic of the reference formulas.
    pub fn flops_per_token(&self, ins: &[&TensorType], seq: u64) -> f64 {
        let last = |i: usize| ins[i].shape.last().unwrap_or(0) as f64;
        let rows = |i: usize| ins[i].shape.fixed_elems() as f64 / last(i).max(1.0);
        match self {
            Op::Embed | Op::Slice { .. } => 0.0,
            Op::RmsNorm { .. } => 4.0 * last(0) * rows(0),
            Op::Add => ins[0].shape.fixed_elems() as f64,
            Op::SwiGlu => 5.0 * ins[0].shape.fixed_elems() as f64,
            Op::MatMul => {
                let (n, k) = matrix(ins[1], "w").unwrap_or((0, 0));
                2.0 * (n * k) as f64 * rows(0)
            }
            Op::CausalConv1dSilu => {
                let (c, k) = matrix(ins[1], "weight").unwrap_or((0, 0));
                (2 * k + 1 + 4) as f64 * c as f64
            }
            Op::SelectiveScan => {
                let (e, n) = matrix(ins[2], "a_log").unwrap_or((0, 0));
                // Per (channel, state): ΔA, exp, ΔBu, a·h + v, C·h: 7. Per channel: softplus,
                // Δu, D·u, gate silu(z) and product: 12.
                7.0 * (e * n) as f64 + 12.0 * e as f64
            }
            Op::Attention(a) => {
                let keys = mean_keys_per_query(seq, a.window);
                let scores = 4.0 * (a.heads * a.head_dim) as f64 * keys;
                let rope = if a.rope.is_some() {
                    3.0 * ((a.heads + a.kv_heads) * a.head_dim) as f64
                } else {
                    0.0
                };
                scores + rope
            }
            Op::GlaGate { .. } => 5.0 * last(0),
            Op::Gla { heads } | Op::Retention { heads, .. } => {
                let (k, v) = (last(0), last(2));
                let h = *heads as f64;
                4.0 * h * (k / h) * (v / h)
            }
            Op::HeadRmsNormGate { .. } => 9.0 * last(0),
            Op::CrossEntropy => {
                let (v, d) = matrix(ins[1], "w").unwrap_or((0, 0));
                2.0 * (v * d) as f64 + 4.0 * v as f64
            }
            Op::Logits => {
                let (v, d) = matrix(ins[1], "w").unwrap_or((0, 0));
                2.0 * (v * d) as f64
            }
        }
    }

    /// Whether this operation is a matrix product in the sense of the MFU formula.
    pub fn is_matmul(&self) -> bool {
        matches!(self, Op::MatMul | Op::CrossEntropy | Op::Logits)
    }

    /// Whether the output is a view of the first input (no memory of its own).
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Slice { .. })
    }

    /// What the backward pass keeps (kernels.md, "saved vs recomputed" of each kernel).
    pub fn saves(&self, ins: &[&TensorType]) -> Vec<Saved> {
        use Saved::*;
        let width = |i: usize| ins[i].shape.last().unwrap_or(0);
        match self {
            Op::Embed => vec![Input(0)],
            // The input is the residual stream; the inverse RMS is one f32 per row.
            Op::RmsNorm { .. } => vec![Input(0), Stat { bytes_per_token: 4 }],
            Op::Add | Op::Slice { .. } | Op::Logits => Vec::new(),
            // dW = xᵀ·g needs x; the weight is a parameter, which is not activation memory.
            Op::MatMul => vec![Input(0)],
            Op::SwiGlu => vec![Input(0), Input(1)],
            Op::CausalConv1dSilu => vec![Input(0)],
            Op::SelectiveScan => {
                let (e, n) = matrix(ins[2], "a_log").unwrap_or((0, 0));
                vec![
                    Input(0),
                    Input(1),
                    Input(3),
                    Input(4),
                    Input(7),
                    // The pre-gate output y, and the running (ΠĀ, h) pair at each end of a
                    // 2048-token chunk in f32.
                    Stat {
                        bytes_per_token: e * ins[0].dtype.bytes() + e * 2 * n * 4 / 2048,
                    },
                ]
            }
            Op::Attention(a) => {
                vec![
                    Input(0),
                    Input(1),
                    Input(2),
                    Output,
                    Stat {
                        bytes_per_token: 4 * a.heads,
                    },
                ]
            }
            Op::GlaGate { .. } => vec![Input(0)],
            Op::Gla { heads } | Op::Retention { heads, .. } => {
                let (k, v) = (width(0), width(2));
                let state = k / heads * v / heads * heads * 4;
                let mut s = vec![Input(0), Input(1), Input(2), Output];
                if let Op::Gla { .. } = self {
                    s.push(Input(3));
                }
                // Chunk-boundary states, one per 64 tokens.
                s.push(Stat {
                    bytes_per_token: state / 64,
                });
                s
            }
            Op::HeadRmsNormGate { heads, .. } => {
                vec![
                    Input(0),
                    Input(1),
                    Stat {
                        bytes_per_token: 4 * heads,
                    },
                ]
            }
            Op::CrossEntropy => vec![Input(0), Input(2), Stat { bytes_per_token: 4 }],
        }
    }

    /// Bytes of state this operation keeps per sequence while decoding, at context `seq`.
    pub fn decode_state_bytes(&self, ins: &[&TensorType], seq: u64) -> u64 {
        match self {
            Op::CausalConv1dSilu => {
                let (c, k) = matrix(ins[1], "weight").unwrap_or((0, 0));
                c.saturating_mul(k.saturating_sub(1))
                    .saturating_mul(ins[0].dtype.bytes())
            }
            Op::SelectiveScan => {
                let (e, n) = matrix(ins[2], "a_log").unwrap_or((0, 0));
                e.saturating_mul(n).saturating_mul(4)
            }
            Op::Attention(a) => {
                let kept = a.window.map_or(seq, |w| w.min(seq));
                (2 * kept)
                    .saturating_mul(a.kv_heads * a.head_dim)
                    .saturating_mul(ins[1].dtype.bytes())
            }
            Op::Gla { heads } | Op::Retention { heads, .. } => {
                let k = ins[0].shape.last().unwrap_or(0);
                let v = ins[2].shape.last().unwrap_or(0);
                (k / heads).saturating_mul(v).saturating_mul(4)
            }
            _ => 0,
        }
    }
}

fn divides(heads: u64, k: u64, v: u64) -> Result<(), OpError> {
    if heads == 0 || k % heads != 0 || v % heads != 0 {
        return err(format!(
            "heads {heads} must divide key width {k} and value width {v}"
        ));
    }
    Ok(())
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        let attrs = self.attrs();
        if !attrs.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in attrs.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}={v}")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_key_count_matches_the_mfu_formula() {
        assert_eq!(mean_keys_per_query(4096, Some(2048)), 1536.25);
        assert_eq!(mean_keys_per_query(4, None), 2.5);
        assert_eq!(mean_keys_per_query(4, Some(1)), 1.0);
    }

    #[test]
    fn matmul_checks_inner_dimension() {
        let x = TensorType::new(DType::BF16, Shape::tokens(&[8]));
        let w = TensorType::new(DType::BF16, Shape::fixed(&[4, 9]));
        let e = Op::MatMul.infer(&[&x, &w]).unwrap_err();
        assert_eq!(e.0, "inner dimension of x is 8, expected 9");
        let w = TensorType::new(DType::BF16, Shape::fixed(&[4, 8]));
        assert_eq!(
            Op::MatMul.infer(&[&x, &w]).unwrap().shape,
            Shape::tokens(&[4])
        );
    }
}
