//! Elaboration: a [`Model`] becomes the forward-and-loss graph of one training step, every
//! parameter named and given its initialisation rule (reference section 1.7).

use super::{Graph, Node, NodeKind, Section, Value};
use crate::diag::Span;
use crate::spec::{Attention, Gla, InitScheme, LayerKind, Mamba, Model, RetNet, SwiGlu};
use weft_runtime::op::AttentionAttrs;
use weft_runtime::{DType, Init, Op, OpError, Shape, TensorType};

/// An operation that did not type-check while elaborating: a bug in the elaborator or a spec
/// the checker let through, reported at the layer it came from.
#[derive(Debug)]
pub struct BuildError {
    pub span: Span,
    pub message: String,
}

pub fn build(model: &Model) -> Result<Graph, BuildError> {
    let mut b = Builder {
        g: Graph::new(&model.name),
        model,
        section: Section::Embed,
        span: model.span,
        prefix: String::new(),
        residual_layers: model.layers.len() as u64,
    };
    let act = model.dtype;
    let d = model.width;
    let tokens = b.input("tokens");
    let targets = b.input("targets");
    let table = b.param("embed.weight", &[model.vocab, d], act, b.embed_init());
    let mut x = b.op(Op::Embed, &[tokens, table])?;

    for (i, layer) in model.layers.iter().enumerate() {
        let def = model.def(layer);
        b.section = Section::Layer(i);
        b.span = layer.span;
        b.prefix = format!("layers.{i}.");
        let norm_w = b.param("norm.weight", &[d], act, Init::Constant { value: 1.0 });
        let h = b.op(Op::RmsNorm { eps: model.norm_eps }, &[x, norm_w])?;
        b.prefix = format!("layers.{i}.{}.", def.kind.param_prefix());
        let y = match &def.kind {
            LayerKind::Mamba(m) => b.mamba(m, h)?,
            LayerKind::Attention(a) => b.attention(a, h)?,
            LayerKind::SwiGlu(s) => b.swiglu(s, h)?,
            LayerKind::Gla(g) => b.gla(g, h)?,
            LayerKind::RetNet(r) => b.retnet(r, h)?,
        };
        x = b.op(Op::Add, &[x, y])?;
    }

    b.section = Section::Head;
    b.span = model.span;
    b.prefix = String::new();
    let norm_w = b.param("final_norm.weight", &[d], act, Init::Constant { value: 1.0 });
    let h = b.op(Op::RmsNorm { eps: model.norm_eps }, &[x, norm_w])?;
    let head = if model.tied_embeddings {
        table
    } else {
        let init = b.linear_init(d, false);
        b.param("head.weight", &[model.vocab, d], act, init)
    };
    let loss = b.op(Op::CrossEntropy, &[h, head, targets])?;
    b.g.outputs.push(("loss".to_string(), loss));
    Ok(b.g)
}

struct Builder<'m> {
    g: Graph,
    model: &'m Model,
    section: Section,
    span: Span,
    /// Prepended to parameter names (`layers.3.attn.`).
    prefix: String,
    residual_layers: u64,
}

impl Builder<'_> {
    fn node(&self, kind: NodeKind, outs: Vec<TensorType>) -> Node {
        Node { kind, outs, span: self.span, section: self.section, recompute: false }
    }

    fn input(&mut self, name: &str) -> Value {
        let ty = TensorType::new(DType::I32, Shape::tokens(&[]));
        let n = self.node(NodeKind::Input { name: name.to_string() }, vec![ty]);
        self.g.add(n, &[]).out0()
    }

    fn param(&mut self, name: &str, shape: &[u64], dtype: DType, init: Init) -> Value {
        let kind = NodeKind::Param { name: format!("{}{name}", self.prefix), init };
        let n = self.node(kind, vec![TensorType::new(dtype, Shape::fixed(shape))]);
        self.g.add(n, &[]).out0()
    }

    /// Adds an operation and returns its first output.
    fn op(&mut self, op: Op, inputs: &[Value]) -> Result<Value, BuildError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|i| self.g.ty(*i)).collect();
        let outs = op.infer(&tys).map_err(|OpError(e)| BuildError {
            span: self.span,
            message: format!("{} in {}: {e}", op.name(), self.prefix.trim_end_matches('.')),
        })?;
        let n = self.node(NodeKind::Op(op), outs);
        Ok(self.g.add(n, inputs).out0())
    }

    fn recomputed(&mut self, v: Value) -> Value {
        self.g.g[v.node.0].recompute = true;
        v
    }

    fn slice(&mut self, x: Value, start: u64, len: u64) -> Result<Value, BuildError> {
        self.op(Op::Slice { start, len }, &[x])
    }

    fn embed_init(&self) -> Init {
        match self.model.init {
            InitScheme::Samba => Init::Normal { std: 0.02 },
            InitScheme::Neox => Init::Normal { std: (2.0 / (5.0 * self.model.width as f64)).sqrt() },
        }
    }

    /// A linear layer's weight; `residual_out` marks the projections that write into the
    /// residual stream, which both schemes scale down with depth.
    fn linear_init(&self, fan_in: u64, residual_out: bool) -> Init {
        let d = self.model.width as f64;
        match (self.model.init, residual_out) {
            (InitScheme::Samba, false) => Init::Uniform { bound: 1.0 / (fan_in as f64).sqrt() },
            // Samba divides by sqrt(k · blocks), which is sqrt(number of residual sub-layers).
            (InitScheme::Samba, true) => {
                Init::Uniform { bound: 1.0 / (fan_in as f64).sqrt() / (self.residual_layers as f64).sqrt() }
            }
            (InitScheme::Neox, false) => Init::Normal { std: (2.0 / (5.0 * d)).sqrt() },
            // lit-gpt's 1/(sqrt(d)·n_layer), with n_layer the blocks of two sub-layers.
            (InitScheme::Neox, true) => Init::Normal { std: 1.0 / d.sqrt() / self.residual_layers.div_ceil(2) as f64 },
        }
    }

    fn linear(&mut self, name: &str, x: Value, out: u64, residual_out: bool) -> Result<Value, BuildError> {
        let fan_in = self.g.ty(x).shape.last().unwrap_or(0);
        let init = self.linear_init(fan_in, residual_out);
        let w = self.param(&format!("{name}.weight"), &[out, fan_in], self.model.dtype, init);
        self.op(Op::MatMul, &[x, w])
    }

    fn mamba(&mut self, m: &Mamba, h: Value) -> Result<Value, BuildError> {
        let (d, e, n, r, k) = (self.model.width, m.inner(self.model.width), m.d_state, m.dt_rank, m.d_conv);
        let act = self.model.dtype;
        let xz = self.linear("in_proj", h, 2 * e, false)?;
        let u0 = self.slice(xz, 0, e)?;
        let z = self.slice(xz, e, e)?;
        let conv_bound = Init::Uniform { bound: 1.0 / (k as f64).sqrt() };
        let conv_w = self.param("conv.weight", &[e, k], act, conv_bound.clone());
        let conv_b = self.param("conv.bias", &[e], act, conv_bound);
        let u = self.op(Op::CausalConv1dSilu, &[u0, conv_w, conv_b])?;
        // MambaInnerFn recomputes the convolution and dt_proj in backward (kernels.md 4.3).
        let u = self.recomputed(u);
        let x_dbl = self.linear("x_proj", u, r + 2 * n, false)?;
        let dt_low = self.slice(x_dbl, 0, r)?;
        let bm = self.slice(x_dbl, r, n)?;
        let cm = self.slice(x_dbl, r + n, n)?;
        let dt_w = self.param("dt_proj.weight", &[e, r], act, Init::Uniform { bound: 1.0 / (r as f64).sqrt() });
        let delta = self.op(Op::MatMul, &[dt_low, dt_w])?;
        let delta = self.recomputed(delta);
        let dt_bias = Init::MambaDtBias { dt_min: m.dt_min, dt_max: m.dt_max, floor: m.dt_floor };
        let dt_b = self.param("dt_proj.bias", &[e], DType::F32, dt_bias);
        let a_log = self.param("A_log", &[e, n], DType::F32, Init::S4dRealLog);
        let dskip = self.param("D", &[e], DType::F32, Init::Constant { value: 1.0 });
        let y = self.op(Op::SelectiveScan, &[u, delta, a_log, bm, cm, dskip, dt_b, z])?;
        self.linear("out_proj", y, d, true)
    }

    fn attention(&mut self, a: &Attention, h: Value) -> Result<Value, BuildError> {
        let q = self.linear("q_proj", h, a.heads * a.head_dim, false)?;
        let k = self.linear("k_proj", h, a.kv_heads * a.head_dim, false)?;
        let v = self.linear("v_proj", h, a.kv_heads * a.head_dim, false)?;
        let attrs = AttentionAttrs {
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: a.head_dim,
            window: a.window,
            rope: a.rope,
        };
        let o = self.op(Op::Attention(attrs), &[q, k, v])?;
        self.linear("o_proj", o, self.model.width, true)
    }

    fn swiglu(&mut self, s: &SwiGlu, h: Value) -> Result<Value, BuildError> {
        let a = self.linear("w1", h, s.hidden, false)?;
        let b = self.linear("w2", h, s.hidden, false)?;
        let g = self.op(Op::SwiGlu, &[a, b])?;
        self.linear("w3", g, self.model.width, true)
    }

    /// Output gate shared by GLA and RetNet: per-head RMSNorm of `o`, times SiLU(x W_g), then W_o.
    fn gated_output(&mut self, o: Value, h: Value, heads: u64, value_dim: u64) -> Result<Value, BuildError> {
        let g = self.linear("g_proj", h, value_dim, false)?;
        let w = self.param("g_norm.weight", &[value_dim / heads], self.model.dtype, Init::Constant { value: 1.0 });
        let gated = self.op(Op::HeadRmsNormGate { heads, eps: self.model.norm_eps }, &[o, g, w])?;
        self.linear("o_proj", gated, self.model.width, true)
    }

    fn gla(&mut self, l: &Gla, h: Value) -> Result<Value, BuildError> {
        let q = self.linear("q_proj", h, l.key_dim, false)?;
        let k = self.linear("k_proj", h, l.key_dim, false)?;
        let v = self.linear("v_proj", h, l.value_dim, false)?;
        let low = self.linear("gk_proj.0", h, l.gate_rank, false)?;
        let gk = self.linear("gk_proj.1", low, l.key_dim, false)?;
        let bias = self.param("gk_proj.1.bias", &[l.key_dim], self.model.dtype, Init::Constant { value: 0.0 });
        let log_alpha = self.op(Op::GlaGate { normalizer: l.gate_norm }, &[gk, bias])?;
        let o = self.op(Op::Gla { heads: l.heads }, &[q, k, v, log_alpha])?;
        self.gated_output(o, h, l.heads, l.value_dim)
    }

    fn retnet(&mut self, l: &RetNet, h: Value) -> Result<Value, BuildError> {
        let q = self.linear("q_proj", h, l.key_dim, false)?;
        let k = self.linear("k_proj", h, l.key_dim, false)?;
        let v = self.linear("v_proj", h, l.value_dim, false)?;
        let o = self.op(Op::Retention { heads: l.heads, rope: l.rope }, &[q, k, v])?;
        self.gated_output(o, h, l.heads, l.value_dim)
    }
}
