//! Type rules: each operation checks its input types and gives its output types.

use super::{Op, OpError};
use crate::{DType, Dim, Shape, TensorType};

fn err<T>(msg: impl Into<String>) -> Result<T, OpError> {
    Err(OpError(msg.into()))
}

pub(super) fn per_token(t: &TensorType, what: &str) -> Result<u64, OpError> {
    if t.shape.rank() == 3 && t.shape.is_per_token() {
        Ok(t.shape.last().unwrap_or(0))
    } else {
        err(format!("{what} must be [B, T, n], found {t}"))
    }
}

pub(super) fn vector(t: &TensorType, what: &str) -> Result<u64, OpError> {
    match t.shape.as_fixed().as_deref() {
        Some([n]) => Ok(*n),
        _ => err(format!("{what} must be a vector [n], found {t}")),
    }
}

pub(super) fn matrix(t: &TensorType, what: &str) -> Result<(u64, u64), OpError> {
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

fn scalar(t: &TensorType, dtype: DType, what: &str) -> Result<(), OpError> {
    if t.dtype == dtype && t.shape.rank() == 0 {
        Ok(())
    } else {
        err(format!("{what} must be {dtype}[], found {t}"))
    }
}

/// Decode positions: one i32 per sequence, `[B]`.
fn positions(t: &TensorType) -> Result<(), OpError> {
    if t.dtype == DType::I32 && t.shape.0 == [Dim::Batch] {
        Ok(())
    } else {
        err(format!("pos must be i32[B] (one position per sequence), found {t}"))
    }
}

fn divides(heads: u64, k: u64, v: u64) -> Result<(), OpError> {
    if heads == 0 || k % heads != 0 || v % heads != 0 {
        return err(format!("heads {heads} must divide key width {k} and value width {v}"));
    }
    Ok(())
}

fn state(dtype: DType, dims: &[u64]) -> TensorType {
    TensorType::per_sequence(dtype, dims)
}

fn scan_vec(e: u64) -> TensorType {
    TensorType::new(DType::F32, Shape::fixed(&[e]))
}

fn cache_capacity(a: &super::AttentionAttrs, capacity: u64) -> Result<(), OpError> {
    match a.window {
        Some(w) if capacity < w => err(format!("a cache of {capacity} entries cannot hold a window of {w}")),
        _ if capacity == 0 => err("cache capacity must be at least 1"),
        _ => Ok(()),
    }
}

/// The f32 type of a parameter's gradient.
fn grad_of(param: &TensorType) -> TensorType {
    TensorType::new(DType::F32, param.shape.clone())
}

fn f32_scalar() -> TensorType {
    TensorType::new(DType::F32, Shape::scalar())
}

/// The forward rule of `op` on the first `n` inputs; the next input must be the gradient of its
/// first output.
fn forward_then_grad(op: Op, ins: &[&TensorType], n: usize) -> Result<Vec<TensorType>, OpError> {
    let out = op.infer(&ins[..n])?;
    same(ins[ins.len() - 1], &out[0], "gradient and forward output")?;
    Ok(out)
}

impl Op {
    /// Checks the input types and returns the output types.
    pub fn infer(&self, ins: &[&TensorType]) -> Result<Vec<TensorType>, OpError> {
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
        let one = |t: TensorType| Ok(vec![t]);
        match self {
            Op::Embed => {
                token_ids(ins[0], "tokens")?;
                float(ins[1], "table")?;
                let (_, d) = matrix(ins[1], "table")?;
                one(TensorType::new(ins[1].dtype, Shape::tokens(&[d])))
            }
            Op::RmsNorm { eps } => {
                if *eps <= 0.0 || !eps.is_finite() {
                    return err(format!("eps must be a positive number, found {eps}"));
                }
                float(ins[0], "x")?;
                let d = vector(ins[1], "weight")?;
                expect_len(ins[0].shape.last().unwrap_or(0), d, "width of x")?;
                one(ins[0].clone())
            }
            Op::Add | Op::SwiGlu => {
                float(ins[0], names[0])?;
                same(ins[0], ins[1], "operands")?;
                one(ins[0].clone())
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
                one(TensorType::new(ins[0].dtype, ins[0].shape.with_last(n)))
            }
            Op::Slice { start, len } => {
                let n = ins[0].shape.last().unwrap_or(0);
                if *len == 0 || start.checked_add(*len).is_none_or(|end| end > n) {
                    return err(format!("slice [{start}, {start}+{len}) exceeds width {n}"));
                }
                one(TensorType::new(ins[0].dtype, ins[0].shape.with_last(*len)))
            }
            Op::CausalConv1dSilu => {
                let c = per_token(ins[0], "x")?;
                let (wc, _k) = matrix(ins[1], "weight")?;
                expect_len(wc, c, "channels of weight")?;
                expect_len(vector(ins[2], "bias")?, c, "length of bias")?;
                one(ins[0].clone())
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
                        return err(format!("{what} must be f32 (the scan's state is f32), found {t}"));
                    }
                }
                one(ins[0].clone())
            }
            Op::Attention(a) => {
                if a.heads == 0 || a.kv_heads == 0 || a.head_dim == 0 {
                    return err("heads, kv_heads and head_dim must be positive");
                }
                if a.heads % a.kv_heads != 0 {
                    return err(format!("kv_heads {} does not divide heads {}", a.kv_heads, a.heads));
                }
                if a.rope.is_some() && a.head_dim % 2 != 0 {
                    return err(format!("RoPE needs an even head_dim, found {}", a.head_dim));
                }
                if a.window == Some(0) {
                    return err("window must be at least 1");
                }
                expect_len(per_token(ins[0], "q")?, a.heads * a.head_dim, "width of q")?;
                expect_len(per_token(ins[1], "k")?, a.kv_heads * a.head_dim, "width of k")?;
                same(ins[1], ins[2], "k and v")?;
                Ok(vec![ins[0].clone(), TensorType::new(DType::F32, Shape::tokens(&[a.heads]))])
            }
            Op::GlaGate { normalizer } => {
                if *normalizer <= 0.0 {
                    return err("normalizer must be positive");
                }
                let n = per_token(ins[0], "x")?;
                expect_len(vector(ins[1], "bias")?, n, "length of bias")?;
                one(TensorType::new(DType::F32, ins[0].shape.clone()))
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
                one(ins[2].clone())
            }
            Op::Retention { heads, rope } => {
                let k = per_token(ins[0], "q")?;
                same(ins[0], ins[1], "q and k")?;
                let v = per_token(ins[2], "v")?;
                divides(*heads, k, v)?;
                if rope.is_some() && (k / heads) % 2 != 0 {
                    return err("RoPE needs an even key dimension per head");
                }
                one(ins[2].clone())
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
                one(ins[0].clone())
            }
            // Logits also of one row per sequence ([B, n, d], as the last position's).
            Op::Logits if ins[0].shape.rank() == 3 && ins[0].shape.0[..2] == [Dim::Batch, Dim::Fixed(1)] => {
                let d = ins[0].shape.last().unwrap_or(0);
                let (v, wd) = matrix(ins[1], "w")?;
                expect_len(wd, d, "width of w")?;
                if ins[0].dtype != ins[1].dtype {
                    return err(format!("h is {} but w is {}", ins[0].dtype, ins[1].dtype));
                }
                one(TensorType::per_sequence(DType::F32, &[1, v]))
            }
            Op::CrossEntropy | Op::Logits | Op::TokenLogProbs => {
                let d = per_token(ins[0], "h")?;
                let (v, wd) = matrix(ins[1], "w")?;
                expect_len(wd, d, "width of w")?;
                if ins[0].dtype != ins[1].dtype {
                    return err(format!("h is {} but w is {}", ins[0].dtype, ins[1].dtype));
                }
                if let Op::CrossEntropy = self {
                    token_ids(ins[2], "targets")?;
                    one(f32_scalar())
                } else if let Op::TokenLogProbs = self {
                    token_ids(ins[2], "targets")?;
                    one(TensorType::new(DType::F32, Shape::tokens(&[])))
                } else {
                    one(TensorType::new(DType::F32, Shape::tokens(&[v])))
                }
            }

            Op::AddRmsNorm { eps } => {
                let sum = Op::Add.infer(&ins[..2])?;
                let n = Op::RmsNorm { eps: *eps }.infer(&[&sum[0], ins[2]])?;
                Ok(vec![sum[0].clone(), n[0].clone()])
            }
            Op::RmsNormBackwardAdd { eps } => {
                let g = Op::RmsNormBackward { eps: *eps }.infer(&ins[..3])?;
                same(ins[3], &g[0], "g_skip")?;
                Ok(g)
            }
            Op::EmbedBackward { vocab } => {
                token_ids(ins[0], "tokens")?;
                let d = per_token(ins[1], "g")?;
                one(TensorType::new(DType::F32, Shape::fixed(&[*vocab, d])))
            }
            Op::RmsNormBackward { eps } => {
                forward_then_grad(Op::RmsNorm { eps: *eps }, ins, 2)?;
                Ok(vec![ins[0].clone(), grad_of(ins[1])])
            }
            Op::MatMulBackward => {
                forward_then_grad(Op::MatMul, ins, 2)?;
                Ok(vec![ins[0].clone(), grad_of(ins[1])])
            }
            Op::SliceBackward { start, width } => {
                let len = ins[0].shape.last().unwrap_or(0);
                if len == 0 || start.checked_add(len).is_none_or(|end| end > *width) {
                    return err(format!("slice [{start}, {start}+{len}) exceeds width {width}"));
                }
                one(TensorType::new(ins[0].dtype, ins[0].shape.with_last(*width)))
            }
            Op::SwiGluBackward => {
                forward_then_grad(Op::SwiGlu, ins, 2)?;
                Ok(vec![ins[0].clone(), ins[1].clone()])
            }
            Op::CausalConv1dSiluBackward => {
                forward_then_grad(Op::CausalConv1dSilu, ins, 3)?;
                Ok(vec![ins[0].clone(), grad_of(ins[1]), grad_of(ins[2])])
            }
            Op::SelectiveScanBackward => {
                forward_then_grad(Op::SelectiveScan, ins, 8)?;
                Ok(vec![
                    ins[0].clone(),
                    ins[1].clone(),
                    grad_of(ins[2]),
                    ins[3].clone(),
                    ins[4].clone(),
                    grad_of(ins[5]),
                    grad_of(ins[6]),
                    ins[7].clone(),
                ])
            }
            Op::AttentionBackward(a) => {
                let out = Op::Attention(a.clone()).infer(&ins[..3])?;
                same(ins[3], &out[0], "o")?;
                same(ins[4], &out[1], "lse")?;
                same(ins[5], &out[0], "gradient and forward output")?;
                Ok(vec![ins[0].clone(), ins[1].clone(), ins[2].clone()])
            }
            Op::GlaGateBackward { normalizer } => {
                forward_then_grad(Op::GlaGate { normalizer: *normalizer }, ins, 2)?;
                Ok(vec![ins[0].clone(), grad_of(ins[1])])
            }
            Op::GlaBackward { heads } => {
                forward_then_grad(Op::Gla { heads: *heads }, ins, 4)?;
                Ok(ins[..4].iter().map(|t| (*t).clone()).collect())
            }
            Op::RetentionBackward { heads, rope } => {
                forward_then_grad(Op::Retention { heads: *heads, rope: *rope }, ins, 3)?;
                Ok(ins[..3].iter().map(|t| (*t).clone()).collect())
            }
            Op::HeadRmsNormGateBackward { heads, eps } => {
                forward_then_grad(Op::HeadRmsNormGate { heads: *heads, eps: *eps }, ins, 3)?;
                Ok(vec![ins[0].clone(), ins[1].clone(), grad_of(ins[2])])
            }
            Op::CrossEntropyBackward => {
                Op::CrossEntropy.infer(&ins[..3])?;
                scalar(ins[3], DType::F32, "g_loss")?;
                Ok(vec![ins[0].clone(), grad_of(ins[1])])
            }

            Op::SumSquares => {
                float(ins[0], "x")?;
                one(f32_scalar())
            }
            Op::AddScalar => {
                scalar(ins[0], DType::F32, "a")?;
                scalar(ins[1], DType::F32, "b")?;
                one(f32_scalar())
            }
            Op::ClipScale { max_norm } => {
                if *max_norm < 0.0 || !max_norm.is_finite() {
                    return err(format!("max_norm must be zero or more, found {max_norm}"));
                }
                scalar(ins[0], DType::F32, "sum_squares")?;
                one(f32_scalar())
            }
            Op::LrSchedule(s) => {
                if !(s.peak > 0.0 && s.min >= 0.0 && s.min <= s.peak && s.total >= 1) {
                    return err("schedule needs peak > 0, 0 ≤ min ≤ peak and at least one step");
                }
                scalar(ins[0], DType::I32, "step")?;
                one(f32_scalar())
            }
            Op::AdamW(a) => {
                if !(0.0..1.0).contains(&a.beta1) || !(0.0..1.0).contains(&a.beta2) || a.eps <= 0.0 {
                    return err("AdamW needs betas in [0, 1) and eps > 0");
                }
                float(ins[0], "param")?;
                let g = grad_of(ins[0]);
                same(ins[1], &g, "grad")?;
                same(ins[2], &g, "m")?;
                same(ins[3], &g, "v")?;
                scalar(ins[4], DType::F32, "lr")?;
                scalar(ins[5], DType::F32, "clip")?;
                scalar(ins[6], DType::I32, "step")?;
                Ok(vec![ins[0].clone(), g.clone(), g])
            }
            Op::LastPosition => {
                let c = per_token(ins[0], "x")?;
                one(state(ins[0].dtype, &[1, c]))
            }
            Op::ConvState { width } => {
                let c = per_token(ins[0], "x")?;
                if *width == 0 {
                    return err("width must be at least 1");
                }
                one(state(ins[0].dtype, &[width - 1, c]))
            }
            Op::CausalConv1dSiluStep => {
                let out = Op::CausalConv1dSilu.infer(&ins[..3])?;
                let (c, k) = matrix(ins[1], "weight")?;
                same(ins[3], &state(ins[0].dtype, &[k - 1, c]), "state")?;
                Ok(vec![out[0].clone(), ins[3].clone()])
            }
            Op::SelectiveScanState => {
                let (e, n) = matrix(ins[2], "a_log")?;
                let full = [ins[0], ins[1], ins[2], ins[3], ins[4], &scan_vec(e), ins[5], ins[0]];
                Op::SelectiveScan.infer(&full)?;
                one(state(DType::F32, &[e, n]))
            }
            Op::SelectiveScanStep => {
                let out = Op::SelectiveScan.infer(&ins[..8])?;
                let (e, n) = matrix(ins[2], "a_log")?;
                same(ins[8], &state(DType::F32, &[e, n]), "h")?;
                Ok(vec![out[0].clone(), ins[8].clone()])
            }
            Op::AttentionCache { attrs, capacity } => {
                let width = attrs.kv_heads * attrs.head_dim;
                expect_len(per_token(ins[0], "k")?, width, "width of k")?;
                same(ins[0], ins[1], "k and v")?;
                cache_capacity(attrs, *capacity)?;
                let c = state(ins[0].dtype, &[*capacity, width]);
                Ok(vec![c.clone(), c])
            }
            Op::AttentionDecode { attrs, capacity } => {
                let out = Op::Attention(attrs.clone()).infer(&ins[..3])?;
                cache_capacity(attrs, *capacity)?;
                let c = state(ins[1].dtype, &[*capacity, attrs.kv_heads * attrs.head_dim]);
                same(ins[3], &c, "k_cache")?;
                same(ins[4], &c, "v_cache")?;
                positions(ins[5])?;
                Ok(vec![out[0].clone(), c.clone(), c])
            }
            Op::GlaState { heads } => {
                let (k, v) = (per_token(ins[0], "k")?, per_token(ins[1], "v")?);
                divides(*heads, k, v)?;
                expect_len(per_token(ins[2], "log_alpha")?, k, "width of log_alpha")?;
                one(state(DType::F32, &[*heads, k / heads, v / heads]))
            }
            Op::GlaStep { heads } => {
                let out = Op::Gla { heads: *heads }.infer(&ins[..4])?;
                let (k, v) = (per_token(ins[0], "q")?, per_token(ins[2], "v")?);
                same(ins[4], &state(DType::F32, &[*heads, k / heads, v / heads]), "state")?;
                Ok(vec![out[0].clone(), ins[4].clone()])
            }
            Op::RetentionState { heads, .. } => {
                let (k, v) = (per_token(ins[0], "k")?, per_token(ins[1], "v")?);
                divides(*heads, k, v)?;
                one(state(DType::F32, &[*heads, k / heads, v / heads]))
            }
            Op::RetentionStep { heads, rope } => {
                let out = Op::Retention { heads: *heads, rope: *rope }.infer(&ins[..3])?;
                let (k, v) = (per_token(ins[0], "q")?, per_token(ins[2], "v")?);
                same(ins[3], &state(DType::F32, &[*heads, k / heads, v / heads]), "state")?;
                positions(ins[4])?;
                Ok(vec![out[0].clone(), ins[3].clone()])
            }
            Op::Zeros(ty) => {
                if ty.shape.as_fixed().is_none() {
                    return err(format!("zeros needs a fixed shape, found {ty}"));
                }
                one(ty.clone())
            }
        }
    }
}
