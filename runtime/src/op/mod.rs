//! The operation set: every tensor operation a weft plan may contain — the forward operations
//! of the model, their backward operations, the optimizer's, and the decode steps — with type
//! rules (`types.rs`) and, for forward operations, costs, saved tensors and decode state
//! (`cost.rs`).
//!
//! Operations are composite where the reference differentiates them as a whole (attention with
//! its window, GQA and RoPE; the selective scan with softplus, D skip and SiLU gate; tied head
//! with cross-entropy), so each has one forward and one backward kernel and an explicit saved
//! set. An operation has one or more outputs.

mod cost;
mod types;

pub use cost::{mean_keys_per_query, Saved};

use crate::TensorType;
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
    /// Self-Extend at inference (LongLM): keys within `neighbours` of a query at their true
    /// relative positions, farther keys at grouped ones. Only full attention with RoPE, only on
    /// the CPU reference's whole-sequence forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_extend: Option<SelfExtend>,
}

/// Self-Extend's settings: the neighbour window W and the group size G. A query at position q
/// sees key k at distance q − k when that is below W; beyond, the query sits at
/// ⌊q/G⌋ + W − ⌊W/G⌋ and the key at ⌊k/G⌋, so distances up to (L − W)·G + W map into a
/// training length L.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfExtend {
    pub neighbours: u64,
    pub group: u64,
}

impl SelfExtend {
    /// The positions (query, key) a query at `q` and a key at `k ≤ q` are rotated by.
    pub fn positions(&self, q: u64, k: u64) -> (u64, u64) {
        let (w, g) = (self.neighbours, self.group);
        if q - k < w {
            (q, k)
        } else {
            (q / g + w - w / g, k / g)
        }
    }

    /// The longest distance it maps within a training length of `trained` tokens.
    pub fn reach(&self, trained: u64) -> u64 {
        trained.saturating_sub(self.neighbours) * self.group + self.neighbours
    }

    /// From a command line's `W,G` (neighbour window, group size; both at least 1).
    pub fn parse(s: &str) -> Result<SelfExtend, String> {
        let bad = || format!("--self-extend takes the neighbour window and the group size as `W,G`, not `{s}`");
        let (w, g) = s.split_once(',').ok_or_else(bad)?;
        let (neighbours, group) =
            (w.trim().parse::<u64>().map_err(|_| bad())?, g.trim().parse::<u64>().map_err(|_| bad())?);
        if neighbours == 0 || group == 0 {
            return Err(bad());
        }
        Ok(SelfExtend { neighbours, group })
    }
}

impl AttentionAttrs {
    /// Whether the GPU runs this attention (forward and backward) on tensor cores: bf16 q, k, v
    /// and a head of 64 or 128. Those kernels round the rotated q and k, P and dS to bf16 for
    /// their products; the others compute in f32. The lowering picks its kernels by this, and the
    /// CPU reference's GPU-like rounding follows it.
    pub fn on_tensor_cores(&self, operands_bf16: bool) -> bool {
        operands_bf16 && matches!(self.head_dim, 64 | 128)
    }
}

/// AdamW with decoupled weight decay (reference 2.4: applied to every parameter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWAttrs {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Linear warm-up to `peak`, then cosine decay to `min` at `total` steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleAttrs {
    pub peak: f64,
    pub min: f64,
    pub warmup: u64,
    pub total: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    // ---- forward ----
    /// `(tokens i32[B,T], table[V,d]) -> [B,T,d]`.
    Embed,
    /// `(x[..,d], weight[d]) -> [..,d]`: `weight * x / sqrt(mean(x²) + eps)`.
    RmsNorm { eps: f64 },
    /// Elementwise sum of two tensors of one type (the residual add, gradient accumulation).
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
    /// `(q[B,T,H·Dh], k[B,T,Hkv·Dh], v[B,T,Hkv·Dh]) -> (o[B,T,H·Dh], lse f32[B,T,H])`, softmax
    /// scale `1/sqrt(Dh)`; the log-sum-exp of each query row is kept for the backward pass.
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
    /// `(h[B,T,d], w[V,d], targets i32[B,T]) -> f32[B,T]`: the log-probability of each
    /// position's target under `softmax(h · wᵀ)` (0 where the target is negative), for
    /// perplexity and the log-probabilities of given tokens, without materialising all logits.
    TokenLogProbs,
    /// Residual add fused with the next RMSNorm: `(x, y, weight) -> (s = x + y, rms_norm(s))`.
    AddRmsNorm { eps: f64 },

    // ---- backward: inputs are the forward inputs (and saved outputs), then the output
    // gradients; outputs are the input gradients, parameters' in f32 ----
    /// `(tokens, g[B,T,d]) -> g_table f32[V,d]` (scatter-add by token id).
    EmbedBackward { vocab: u64 },
    /// `(x, weight, g) -> (g_x, g_weight f32)`; recomputes the inverse RMS.
    RmsNormBackward { eps: f64 },
    /// `(x, w, g) -> (g_x = g·w, g_w f32 = gᵀ·x)`.
    MatMulBackward,
    /// `(g[..,len]) -> [..,width]`: the gradient of a slice, zero outside `[start, start+len)`.
    SliceBackward { start: u64, width: u64 },
    /// `(a, b, g) -> (g_a, g_b)`.
    SwiGluBackward,
    /// `(x, w, bias, g) -> (g_x, g_w f32, g_bias f32)`; recomputes the pre-activation.
    CausalConv1dSiluBackward,
    /// `(u, delta, a_log, b, c, d, dt_bias, z, g) -> (g_u, g_delta, g_a_log, g_b, g_c, g_d, g_dt_bias, g_z)`.
    SelectiveScanBackward,
    /// `(q, k, v, o, lse, g) -> (g_q, g_k, g_v)`.
    AttentionBackward(AttentionAttrs),
    /// `(x, bias, g) -> (g_x, g_bias f32)`.
    GlaGateBackward { normalizer: f64 },
    /// `(q, k, v, log_alpha, g) -> (g_q, g_k, g_v, g_log_alpha)`.
    GlaBackward { heads: u64 },
    /// `(q, k, v, g) -> (g_q, g_k, g_v)`.
    RetentionBackward { heads: u64, rope: Option<f64> },
    /// `(o, g_in, weight, g) -> (g_o, g_g, g_weight f32)`.
    HeadRmsNormGateBackward { heads: u64, eps: f64 },
    /// `(h, w, targets, g_loss f32[]) -> (g_h, g_w f32)`.
    CrossEntropyBackward,
    /// RMSNorm's backward fused with the residual gradient it joins:
    /// `(x, weight, g, g_skip) -> (g_skip + g_x, g_weight f32)`.
    RmsNormBackwardAdd { eps: f64 },

    // ---- optimizer ----
    /// `(x) -> f32[]`: the sum of squares of all elements.
    SumSquares,
    /// `(a f32[], b f32[]) -> f32[]`.
    AddScalar,
    /// `(sum_squares f32[]) -> f32[]`: `min(1, max_norm / (sqrt(sum_squares) + 1e-6))`; 1 when
    /// `max_norm` is 0 (no clipping).
    ClipScale { max_norm: f64 },
    /// `(step i32[]) -> f32[]`: the learning rate at a 0-based step.
    LrSchedule(ScheduleAttrs),
    /// `(param, grad f32, m f32, v f32, lr f32[], clip f32[], step i32[]) -> (param', m', v')`:
    /// `g = grad·clip`, moments with bias correction at `step + 1`, decoupled decay.
    AdamW(AdamWAttrs),
    /// `() -> zeros` of the given type (resets gradient accumulators).
    Zeros(TensorType),

    // ---- generation: prefill ops give a layer's state after a prompt; step ops advance it by
    // one token (T = 1). States have the batch as their first dimension. ----
    /// `(x[B,T,C]) -> [B, width-1, C]`: the convolution's last `width − 1` inputs.
    ConvState { width: u64 },
    /// `(x[B,T,C]) -> [B,1,C]`: each sequence's last position (prefill's logits are only
    /// needed there).
    LastPosition,
    /// `(x[B,1,C], w[C,k], bias[C], state[B,k-1,C]) -> (y[B,1,C], state')`.
    CausalConv1dSiluStep,
    /// `(u, delta, a_log, b, c, dt_bias) -> h f32[B,E,N]`: the scan's state after the prompt.
    SelectiveScanState,
    /// `(u, delta, a_log, b, c, d, dt_bias, z, h) -> (y, h')` for one token.
    SelectiveScanStep,
    /// `(k, v) -> (k_cache, v_cache)`, each `[B, capacity, Hkv·Dh]`: the last `capacity` rotated
    /// keys and values, position p in slot p mod capacity.
    AttentionCache { attrs: AttentionAttrs, capacity: u64 },
    /// `(q, k, v, k_cache, v_cache, pos i32[]) -> (o, k_cache', v_cache')` for one token at
    /// position `pos`.
    AttentionDecode { attrs: AttentionAttrs, capacity: u64 },
    /// `(k, v, log_alpha) -> S f32[B,H,dk,dv]`.
    GlaState { heads: u64 },
    /// `(q, k, v, log_alpha, S) -> (o, S')` for one token.
    GlaStep { heads: u64 },
    /// `(k, v) -> S f32[B,H,dk,dv]`.
    RetentionState { heads: u64, rope: Option<f64> },
    /// `(q, k, v, S, pos i32[]) -> (o, S')` for one token at position `pos`.
    RetentionStep { heads: u64, rope: Option<f64> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpError(pub String);

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OpError {}

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
            Op::TokenLogProbs => "token_logprobs",
            Op::AddRmsNorm { .. } => "add_rms_norm",
            Op::RmsNormBackwardAdd { .. } => "rms_norm_backward_add",
            Op::EmbedBackward { .. } => "embed_backward",
            Op::RmsNormBackward { .. } => "rms_norm_backward",
            Op::MatMulBackward => "matmul_backward",
            Op::SliceBackward { .. } => "slice_backward",
            Op::SwiGluBackward => "swiglu_backward",
            Op::CausalConv1dSiluBackward => "causal_conv1d_silu_backward",
            Op::SelectiveScanBackward => "selective_scan_backward",
            Op::AttentionBackward(_) => "attention_backward",
            Op::GlaGateBackward { .. } => "gla_gate_backward",
            Op::GlaBackward { .. } => "gla_backward",
            Op::RetentionBackward { .. } => "retention_backward",
            Op::HeadRmsNormGateBackward { .. } => "head_rms_norm_gate_backward",
            Op::CrossEntropyBackward => "cross_entropy_backward",
            Op::SumSquares => "sum_squares",
            Op::AddScalar => "add_scalar",
            Op::ClipScale { .. } => "clip_scale",
            Op::LrSchedule(_) => "lr_schedule",
            Op::AdamW(_) => "adamw",
            Op::Zeros(_) => "zeros",
            Op::ConvState { .. } => "conv_state",
            Op::LastPosition => "last_position",
            Op::CausalConv1dSiluStep => "causal_conv1d_silu_step",
            Op::SelectiveScanState => "selective_scan_state",
            Op::SelectiveScanStep => "selective_scan_step",
            Op::AttentionCache { .. } => "attention_cache",
            Op::AttentionDecode { .. } => "attention_decode",
            Op::GlaState { .. } => "gla_state",
            Op::GlaStep { .. } => "gla_step",
            Op::RetentionState { .. } => "retention_state",
            Op::RetentionStep { .. } => "retention_step",
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
            Op::TokenLogProbs => &["h", "w", "targets"],
            Op::AddRmsNorm { .. } => &["x", "y", "weight"],
            Op::RmsNormBackwardAdd { .. } => &["x", "weight", "g", "g_skip"],
            Op::EmbedBackward { .. } => &["tokens", "g"],
            Op::RmsNormBackward { .. } => &["x", "weight", "g"],
            Op::MatMulBackward => &["x", "w", "g"],
            Op::SliceBackward { .. } => &["g"],
            Op::SwiGluBackward => &["a", "b", "g"],
            Op::CausalConv1dSiluBackward => &["x", "weight", "bias", "g"],
            Op::SelectiveScanBackward => &["u", "delta", "a_log", "b", "c", "d", "dt_bias", "z", "g"],
            Op::AttentionBackward(_) => &["q", "k", "v", "o", "lse", "g"],
            Op::GlaGateBackward { .. } => &["x", "bias", "g"],
            Op::GlaBackward { .. } => &["q", "k", "v", "log_alpha", "g"],
            Op::RetentionBackward { .. } => &["q", "k", "v", "g"],
            Op::HeadRmsNormGateBackward { .. } => &["o", "g_in", "weight", "g"],
            Op::CrossEntropyBackward => &["h", "w", "targets", "g_loss"],
            Op::SumSquares => &["x"],
            Op::AddScalar => &["a", "b"],
            Op::ClipScale { .. } => &["sum_squares"],
            Op::LrSchedule(_) => &["step"],
            Op::AdamW(_) => &["param", "grad", "m", "v", "lr", "clip", "step"],
            Op::Zeros(_) => &[],
            Op::ConvState { .. } | Op::LastPosition => &["x"],
            Op::CausalConv1dSiluStep => &["x", "weight", "bias", "state"],
            Op::SelectiveScanState => &["u", "delta", "a_log", "b", "c", "dt_bias"],
            Op::SelectiveScanStep => &["u", "delta", "a_log", "b", "c", "d", "dt_bias", "z", "h"],
            Op::AttentionCache { .. } => &["k", "v"],
            Op::AttentionDecode { .. } => &["q", "k", "v", "k_cache", "v_cache", "pos"],
            Op::GlaState { .. } => &["k", "v", "log_alpha"],
            Op::GlaStep { .. } => &["q", "k", "v", "log_alpha", "state"],
            Op::RetentionState { .. } => &["k", "v"],
            Op::RetentionStep { .. } => &["q", "k", "v", "state", "pos"],
        }
    }

    /// Attributes as `key=value` pairs, in a fixed order, for dumps.
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        let opt = |o: Option<f64>| o.map_or("none".to_string(), |b| format!("{b}"));
        let attention = |a: &AttentionAttrs| {
            vec![
                ("heads", a.heads.to_string()),
                ("kv_heads", a.kv_heads.to_string()),
                ("head_dim", a.head_dim.to_string()),
                ("window", a.window.map_or("full".to_string(), |w| w.to_string())),
                ("rope", opt(a.rope)),
            ]
        };
        match self {
            Op::RmsNorm { eps }
            | Op::RmsNormBackward { eps }
            | Op::AddRmsNorm { eps }
            | Op::RmsNormBackwardAdd { eps } => vec![("eps", format!("{eps:e}"))],
            Op::HeadRmsNormGate { heads, eps } | Op::HeadRmsNormGateBackward { heads, eps } => {
                vec![("heads", heads.to_string()), ("eps", format!("{eps:e}"))]
            }
            Op::Slice { start, len } => vec![("start", start.to_string()), ("len", len.to_string())],
            Op::SliceBackward { start, width } => {
                vec![("start", start.to_string()), ("width", width.to_string())]
            }
            Op::Attention(a) | Op::AttentionBackward(a) => attention(a),
            Op::AttentionCache { attrs, capacity } | Op::AttentionDecode { attrs, capacity } => {
                let mut v = attention(attrs);
                v.push(("capacity", capacity.to_string()));
                v
            }
            Op::ConvState { width } => vec![("width", width.to_string())],
            Op::GlaState { heads } | Op::GlaStep { heads } => vec![("heads", heads.to_string())],
            Op::RetentionState { heads, rope } | Op::RetentionStep { heads, rope } => {
                vec![("heads", heads.to_string()), ("rope", opt(*rope))]
            }
            Op::GlaGate { normalizer } | Op::GlaGateBackward { normalizer } => {
                vec![("normalizer", format!("{normalizer}"))]
            }
            Op::Gla { heads } | Op::GlaBackward { heads } => vec![("heads", heads.to_string())],
            Op::Retention { heads, rope } | Op::RetentionBackward { heads, rope } => {
                vec![("heads", heads.to_string()), ("rope", opt(*rope))]
            }
            Op::EmbedBackward { vocab } => vec![("vocab", vocab.to_string())],
            Op::Zeros(ty) => vec![("type", ty.to_string())],
            Op::ClipScale { max_norm } => vec![("max_norm", format!("{max_norm}"))],
            Op::LrSchedule(s) => vec![
                ("peak", format!("{:e}", s.peak)),
                ("min", format!("{:e}", s.min)),
                ("warmup", s.warmup.to_string()),
                ("total", s.total.to_string()),
            ],
            Op::AdamW(a) => vec![
                ("beta1", format!("{}", a.beta1)),
                ("beta2", format!("{}", a.beta2)),
                ("eps", format!("{:e}", a.eps)),
                ("weight_decay", format!("{}", a.weight_decay)),
            ],
            _ => Vec::new(),
        }
    }

    /// Whether the output is a view of the first input (no memory of its own).
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Slice { .. })
    }

    /// Whether this operation is a matrix product in the sense of the MFU formula.
    pub fn is_matmul(&self) -> bool {
        matches!(self, Op::MatMul | Op::CrossEntropy | Op::Logits | Op::TokenLogProbs)
    }
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
