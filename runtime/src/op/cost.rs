//! Costs of forward operations: FLOPs per token, what the backward pass keeps, and the state a
//! decode step carries.

use super::types::matrix;
use super::Op;
use crate::TensorType;

/// What the backward pass of an operation keeps from its forward pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Saved {
    /// The operation's i-th input.
    Input(usize),
    /// Its i-th output.
    Output(usize),
    /// Extra tensors it writes for the backward pass (chunk carries).
    Stat { bytes_per_token: u64 },
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

impl Op {
    /// Forward FLOPs per token at sequence length `seq`, given well-typed inputs; 0 for
    /// operations that are not part of a forward pass.
    ///
    /// Matrix products count 2·k·n; attention counts 4·H·Dh per key a query really sees
    /// (its window) plus RoPE; linear-attention recurrences count 4·dk·dv per head; elementwise
    /// work counts the arithmetic of the reference formulas.
    pub fn flops_per_token(&self, ins: &[&TensorType], seq: u64) -> f64 {
        let last = |i: usize| ins[i].shape.last().unwrap_or(0) as f64;
        let rows = |i: usize| ins[i].shape.fixed_elems() as f64 / last(i).max(1.0);
        match self {
            Op::RmsNorm { .. } => 4.0 * last(0) * rows(0),
            Op::AddRmsNorm { .. } => 5.0 * last(0) * rows(0),
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
                let rope = if a.rope.is_some() { 3.0 * ((a.heads + a.kv_heads) * a.head_dim) as f64 } else { 0.0 };
                scores + rope
            }
            Op::GlaGate { .. } => 5.0 * last(0),
            Op::Gla { heads } | Op::Retention { heads, .. } => {
                let (k, v) = (last(0), last(2));
                let h = *heads as f64;
                4.0 * h * (k / h) * (v / h)
            }
            Op::HeadRmsNormGate { .. } => 9.0 * last(0),
            Op::CrossEntropy | Op::TokenLogProbs => {
                let (v, d) = matrix(ins[1], "w").unwrap_or((0, 0));
                2.0 * (v * d) as f64 + 4.0 * v as f64
            }
            Op::Logits => {
                let (v, d) = matrix(ins[1], "w").unwrap_or((0, 0));
                2.0 * (v * d) as f64
            }
            _ => 0.0,
        }
    }

    /// What the backward pass keeps (kernels.md, "saved vs recomputed" of each kernel).
    pub fn saves(&self, ins: &[&TensorType]) -> Vec<Saved> {
        use Saved::*;
        let width = |i: usize| ins[i].shape.last().unwrap_or(0);
        match self {
            Op::Embed => vec![Input(0)],
            // The input is the residual stream; the inverse RMS is recomputed from it.
            Op::RmsNorm { .. } => vec![Input(0)],
            // The sum is the residual stream the backward reads.
            Op::AddRmsNorm { .. } => vec![Output(0)],
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
                    Stat { bytes_per_token: e * ins[0].dtype.bytes() + e * 2 * n * 4 / 2048 },
                ]
            }
            // q, k, v, the output and the log-sum-exp of each query row.
            Op::Attention(_) => vec![Input(0), Input(1), Input(2), Output(0), Output(1)],
            Op::GlaGate { .. } => vec![Input(0)],
            Op::Gla { heads } | Op::Retention { heads, .. } => {
                let (k, v) = (width(0), width(2));
                let state = k / heads * v / heads * heads * 4;
                let mut s = vec![Input(0), Input(1), Input(2)];
                if let Op::Gla { .. } = self {
                    s.push(Input(3));
                }
                // Chunk-boundary states, one per 64 tokens.
                s.push(Stat { bytes_per_token: state / 64 });
                s
            }
            Op::HeadRmsNormGate { .. } => vec![Input(0), Input(1)],
            Op::CrossEntropy => vec![Input(0), Input(2)],
            _ => Vec::new(),
        }
    }

    /// Bytes of state this operation keeps per sequence while decoding, at context `seq`.
    pub fn decode_state_bytes(&self, ins: &[&TensorType], seq: u64) -> u64 {
        match self {
            Op::CausalConv1dSilu => {
                let (c, k) = matrix(ins[1], "weight").unwrap_or((0, 0));
                c.saturating_mul(k.saturating_sub(1)).saturating_mul(ins[0].dtype.bytes())
            }
            Op::SelectiveScan => {
                let (e, n) = matrix(ins[2], "a_log").unwrap_or((0, 0));
                e.saturating_mul(n).saturating_mul(4)
            }
            Op::Attention(a) => {
                let kept = a.window.map_or(seq, |w| w.min(seq));
                (2 * kept).saturating_mul(a.kv_heads * a.head_dim).saturating_mul(ins[1].dtype.bytes())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Shape};

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
        assert_eq!(Op::MatMul.infer(&[&x, &w]).unwrap()[0].shape, Shape::tokens(&[4]));
    }
}
