//! Elaboration: a [`Model`] becomes a graph — the forward pass and loss of a training step, the
//! forward pass to logits, or the prefill and decode passes of generation — every parameter
//! named and given its initialisation rule (reference section 1.7).

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

/// Which graph to elaborate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward pass and mean cross-entropy (`loss`): training and evaluation.
    Train,
    /// Forward pass to `logits` for every position.
    Logits,
    /// Forward pass to `logprobs`, each position's log-probability of its target (0 where the
    /// target is negative): perplexity, and the log-probabilities of given tokens.
    Score,
    /// A prompt's `logits` and every layer's decode state (`state:...` outputs).
    Prefill { max_context: u64 },
    /// One token per sequence at position `pos`: reads and writes every layer's state.
    Decode { max_context: u64 },
    /// A chunk of a prompt continuing from every layer's state (tokens at positions `pos`,
    /// `pos + 1`, ...), token by token as decoding: its last position's `logits`, or with
    /// `score` (and `targets`) each position's `logprobs` as [`Mode::Score`] gives them; and
    /// the states after it. A prompt of any length, a chunk at a time, in constant memory.
    Chunk { max_context: u64, score: bool },
}

/// The training graph (forward pass and loss).
pub fn build(model: &Model) -> Result<Graph, BuildError> {
    build_mode(model, Mode::Train)
}

pub fn build_mode(model: &Model, mode: Mode) -> Result<Graph, BuildError> {
    let mut b = Builder {
        mode,
        layer: String::new(),
        g: Graph::new(&model.name),
        model,
        section: Section::Embed,
        span: model.span,
        prefix: String::new(),
        residual_layers: model.layers.len() as u64,
        pos: None,
    };
    let act = model.dtype;
    let d = model.width;
    let tokens = b.input("tokens");
    let targets = if matches!(mode, Mode::Train | Mode::Score | Mode::Chunk { score: true, .. }) {
        Some(b.input("targets"))
    } else {
        None
    };
    let table = b.param("embed.weight", &[model.vocab, d], act, b.embed_init());
    let mut x = b.op(Op::Embed, &[tokens, table])?;

    for (i, layer) in model.layers.iter().enumerate() {
        let def = model.def(layer);
        b.section = Section::Layer(i);
        b.span = layer.span;
        b.prefix = format!("layers.{i}.");
        b.layer = format!("layers.{i}");
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
    match targets {
        Some(targets) if matches!(b.mode, Mode::Score | Mode::Chunk { .. }) => {
            let logprobs = b.op(Op::TokenLogProbs, &[h, head, targets])?;
            b.g.outputs.push(("logprobs".to_string(), logprobs));
        }
        Some(targets) => {
            let loss = b.op(Op::CrossEntropy, &[h, head, targets])?;
            b.g.outputs.push(("loss".to_string(), loss));
        }
        None => {
            // Generation samples from the prompt's last position only; the `logits` plan
            // keeps every position (perplexity, log-probabilities).
            let h = match b.mode {
                Mode::Prefill { .. } | Mode::Chunk { .. } => b.op(Op::LastPosition, &[h])?,
                _ => h,
            };
            let logits = b.op(Op::Logits, &[h, head])?;
            b.g.outputs.push(("logits".to_string(), logits));
        }
    }
    Ok(b.g)
}

struct Builder<'m> {
    mode: Mode,
    /// `layers.3`: names the layer's decode states.
    layer: String,
    /// The decode position input.
    pos: Option<Value>,
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

    /// Adds an operation and returns all its outputs.
    fn op_all(&mut self, op: Op, inputs: &[Value]) -> Result<Vec<Value>, BuildError> {
        let first = self.op(op, inputs)?;
        let n = self.g.node(first.node).outs.len();
        Ok((0..n as u32).map(|output| Value { node: first.node, output }).collect())
    }

    /// A decode state of this layer: named `state:layers.i.what`.
    fn state_name(&self, what: &str) -> String {
        format!("state:{}.{what}", self.layer)
    }

    /// Reads a decode state (an input of the decode graph) of the type `ty`.
    fn state_in(&mut self, what: &str, ty: TensorType) -> Value {
        let n = self.node(NodeKind::Input { name: self.state_name(what) }, vec![ty]);
        self.g.add(n, &[]).out0()
    }

    fn state_out(&mut self, what: &str, v: Value) {
        let name = self.state_name(what);
        self.g.outputs.push((name, v));
    }

    /// The decode position of each sequence (`[B]`), an input made on first use (a pure-Mamba
    /// model has none): sequences of a batch may be at different positions.
    fn pos(&mut self) -> Result<Value, BuildError> {
        if let Some(p) = self.pos {
            return Ok(p);
        }
        let n = self.node(NodeKind::Input { name: "pos".into() }, vec![TensorType::per_sequence(DType::I32, &[])]);
        let p = self.g.add(n, &[]).out0();
        self.pos = Some(p);
        Ok(p)
    }

    /// The K/V cache size of an attention layer: its window, or the longest context.
    fn capacity(&self, a: &Attention) -> u64 {
        match (a.window, self.mode) {
            (Some(w), _) => w,
            (None, Mode::Prefill { max_context } | Mode::Decode { max_context } | Mode::Chunk { max_context, .. }) => {
                max_context
            }
            (None, _) => 0,
        }
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
        let u = match self.mode {
            Mode::Decode { .. } | Mode::Chunk { .. } => {
                let st = self.state_in("conv", TensorType::per_sequence(act, &[k - 1, e]));
                let r = self.op_all(Op::CausalConv1dSiluStep, &[u0, conv_w, conv_b, st])?;
                self.state_out("conv", r[1]);
                r[0]
            }
            _ => self.op(Op::CausalConv1dSilu, &[u0, conv_w, conv_b])?,
        };
        if let Mode::Prefill { .. } = self.mode {
            let st = self.op(Op::ConvState { width: k }, &[u0])?;
            self.state_out("conv", st);
        }
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
        let y = match self.mode {
            Mode::Decode { .. } | Mode::Chunk { .. } => {
                let st = self.state_in("ssm", TensorType::per_sequence(DType::F32, &[e, n]));
                let r = self.op_all(Op::SelectiveScanStep, &[u, delta, a_log, bm, cm, dskip, dt_b, z, st])?;
                self.state_out("ssm", r[1]);
                r[0]
            }
            _ => self.op(Op::SelectiveScan, &[u, delta, a_log, bm, cm, dskip, dt_b, z])?,
        };
        if let Mode::Prefill { .. } = self.mode {
            let st = self.op(Op::SelectiveScanState, &[u, delta, a_log, bm, cm, dt_b])?;
            self.state_out("ssm", st);
        }
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
            self_extend: if matches!(self.mode, Mode::Train) { None } else { a.self_extend },
        };
        let capacity = self.capacity(a);
        let o = match self.mode {
            Mode::Decode { .. } | Mode::Chunk { .. } => {
                let cache = TensorType::per_sequence(self.model.dtype, &[capacity, a.kv_heads * a.head_dim]);
                let kc = self.state_in("k", cache.clone());
                let vc = self.state_in("v", cache);
                let pos = self.pos()?;
                let r = self.op_all(Op::AttentionDecode { attrs, capacity }, &[q, k, v, kc, vc, pos])?;
                self.state_out("k", r[1]);
                self.state_out("v", r[2]);
                r[0]
            }
            Mode::Prefill { .. } => {
                let r = self.op_all(Op::AttentionCache { attrs: attrs.clone(), capacity }, &[k, v])?;
                self.state_out("k", r[0]);
                self.state_out("v", r[1]);
                self.op(Op::Attention(attrs), &[q, k, v])?
            }
            _ => self.op(Op::Attention(attrs), &[q, k, v])?,
        };
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
        let st_ty = TensorType::per_sequence(DType::F32, &[l.heads, l.key_dim / l.heads, l.value_dim / l.heads]);
        let o = match self.mode {
            Mode::Decode { .. } | Mode::Chunk { .. } => {
                let st = self.state_in("gla", st_ty);
                let r = self.op_all(Op::GlaStep { heads: l.heads }, &[q, k, v, log_alpha, st])?;
                self.state_out("gla", r[1]);
                r[0]
            }
            _ => self.op(Op::Gla { heads: l.heads }, &[q, k, v, log_alpha])?,
        };
        if let Mode::Prefill { .. } = self.mode {
            let st = self.op(Op::GlaState { heads: l.heads }, &[k, v, log_alpha])?;
            self.state_out("gla", st);
        }
        self.gated_output(o, h, l.heads, l.value_dim)
    }

    fn retnet(&mut self, l: &RetNet, h: Value) -> Result<Value, BuildError> {
        let q = self.linear("q_proj", h, l.key_dim, false)?;
        let k = self.linear("k_proj", h, l.key_dim, false)?;
        let v = self.linear("v_proj", h, l.value_dim, false)?;
        let st_ty = TensorType::per_sequence(DType::F32, &[l.heads, l.key_dim / l.heads, l.value_dim / l.heads]);
        let o = match self.mode {
            Mode::Decode { .. } | Mode::Chunk { .. } => {
                let st = self.state_in("retention", st_ty);
                let pos = self.pos()?;
                let r = self.op_all(Op::RetentionStep { heads: l.heads, rope: l.rope }, &[q, k, v, st, pos])?;
                self.state_out("retention", r[1]);
                r[0]
            }
            _ => self.op(Op::Retention { heads: l.heads, rope: l.rope }, &[q, k, v])?,
        };
        if let Mode::Prefill { .. } = self.mode {
            let st = self.op(Op::RetentionState { heads: l.heads, rope: l.rope }, &[k, v])?;
            self.state_out("retention", st);
        }
        self.gated_output(o, h, l.heads, l.value_dim)
    }
}
