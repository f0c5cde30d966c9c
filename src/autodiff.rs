//! Reverse-mode differentiation of a forward graph into a training graph.
//!
//! Differentiation works at the level of the composite operations of the operation set: each
//! forward operation has one backward operation that reads the forward inputs (and the outputs
//! the forward keeps for it) and the gradient of its output, and gives the gradients of its real
//! inputs. Gradients of a value used several times are summed in the order their uses appear,
//! so the graph (and every backend) adds them in a fixed order.

use crate::graph::{Graph, Node, NodeId, NodeKind, Value};
use rustc_hash::FxHashMap as HashMap;
use weft_runtime::{DType, Op, Shape, TensorType};

/// The name of a parameter's gradient output.
pub fn grad_name(param: &str) -> String {
    format!("grad:{param}")
}

/// The input that scales the loss's gradient (1 / micro-batches per optimizer step).
pub const LOSS_SCALE: &str = "loss_scale";

#[derive(Debug)]
pub struct AutodiffError(pub String);

/// The forward graph plus the backward pass: outputs `loss` and `grad:NAME` for every parameter.
pub fn differentiate(fwd: &Graph) -> Result<Graph, AutodiffError> {
    let loss = fwd.output("loss").ok_or_else(|| AutodiffError("the graph has no `loss` output".into()))?;
    let mut g = fwd.clone();
    // The backward pass adds about twice the forward's nodes; growing into them copied the
    // whole graph over and over.
    g.g.reserve_nodes(2 * fwd.g.node_count());
    g.g.reserve_edges(3 * fwd.g.edge_count());
    g.name = format!("{}:train", fwd.name);
    g.outputs = vec![("loss".to_string(), loss)];

    let scale_ty = TensorType::new(DType::F32, Shape::scalar());
    let loss_node = fwd.node(loss.node);
    let seed = g.add(
        Node {
            kind: NodeKind::Input { name: LOSS_SCALE.to_string() },
            outs: vec![scale_ty],
            span: loss_node.span,
            section: loss_node.section,
            recompute: false,
        },
        &[],
    );

    let mut d = Diff { g, contributions: HashMap::default(), recomputed: HashMap::default() };
    d.contributions.entry(loss).or_default().push(seed.out0());

    let order: Vec<NodeId> = fwd.nodes().map(|(id, _)| id).collect();
    for &id in order.iter().rev() {
        let NodeKind::Op(op) = &fwd.node(id).kind else { continue };
        let outs: Vec<Option<Value>> =
            (0..fwd.node(id).outs.len()).map(|i| d.gradient(Value { node: id, output: i as u32 })).collect();
        // Only the first output carries a gradient (attention's second is its log-sum-exp).
        let Some(gy) = outs[0] else { continue };
        d.backward(fwd, id, op, gy)?;
    }

    let params: Vec<(NodeId, String)> = fwd.params().map(|(id, name, _)| (id, name.to_string())).collect();
    for (id, name) in params {
        let grad = d
            .gradient(id.out0())
            .ok_or_else(|| AutodiffError(format!("parameter `{name}` does not affect the loss")))?;
        d.g.outputs.push((grad_name(&name), grad));
    }
    Ok(d.g)
}

struct Diff {
    g: Graph,
    /// Gradient contributions to each forward value, in the order they were made.
    contributions: HashMap<Value, Vec<Value>>,
    /// Forward values marked `recompute`, computed again in the backward pass (once each).
    recomputed: HashMap<Value, Value>,
}

impl Diff {
    /// The summed gradient of a value, or `None` when nothing downstream depends on it.
    fn gradient(&mut self, v: Value) -> Option<Value> {
        let parts = self.contributions.remove(&v)?;
        let mut parts = parts.into_iter();
        let first = parts.next()?;
        let (span, section) = {
            let at = self.g.node(v.node);
            (at.span, at.section)
        };
        Some(parts.fold(first, |acc, p| {
            let ty = self.g.ty(acc).clone();
            let n = Node { kind: NodeKind::Op(Op::Add), outs: vec![ty], span, section, recompute: false };
            self.g.add(n, &[acc, p]).out0()
        }))
    }

    /// The value a backward operation reads: the forward value itself, or, when the forward pass
    /// marks it `recompute`, a copy of its operation placed in the backward pass, so the
    /// original dies after its forward uses.
    fn saved(&mut self, v: Value) -> Value {
        if !self.g.node(v.node).recompute {
            return v;
        }
        if let Some(r) = self.recomputed.get(&v) {
            return *r;
        }
        let inputs: Vec<Value> = self.g.inputs(v.node).into_iter().map(|i| self.saved(i)).collect();
        let node = self.g.node(v.node).clone();
        let copy = self.g.add(Node { recompute: false, ..node }, &inputs);
        let r = Value { node: copy, output: v.output };
        self.recomputed.insert(v, r);
        r
    }

    fn contribute(&mut self, to: Value, grad: Value) {
        self.contributions.entry(to).or_default().push(grad);
    }

    /// Adds one backward operation for forward node `id` and records the input gradients.
    fn backward(&mut self, fwd: &Graph, id: NodeId, op: &Op, gy: Value) -> Result<(), AutodiffError> {
        let ins = fwd.inputs(id);
        let node = fwd.node(id);
        let y = id.out0();
        // (backward op, its inputs, which forward input each of its outputs is the gradient of)
        let (bop, binputs, targets): (Op, Vec<Value>, Vec<usize>) = match op {
            Op::Add => {
                self.contribute(ins[0], gy);
                self.contribute(ins[1], gy);
                return Ok(());
            }
            Op::Embed => {
                let vocab = fwd.ty(ins[1]).shape.as_fixed().map_or(0, |s| s[0]);
                (Op::EmbedBackward { vocab }, vec![ins[0], gy], vec![1])
            }
            Op::RmsNorm { eps } => (Op::RmsNormBackward { eps: *eps }, vec![ins[0], ins[1], gy], vec![0, 1]),
            Op::MatMul => (Op::MatMulBackward, vec![ins[0], ins[1], gy], vec![0, 1]),
            Op::Slice { start, .. } => {
                let width = fwd.ty(ins[0]).shape.last().unwrap_or(0);
                (Op::SliceBackward { start: *start, width }, vec![gy], vec![0])
            }
            Op::SwiGlu => (Op::SwiGluBackward, vec![ins[0], ins[1], gy], vec![0, 1]),
            Op::CausalConv1dSilu => (Op::CausalConv1dSiluBackward, vec![ins[0], ins[1], ins[2], gy], vec![0, 1, 2]),
            Op::SelectiveScan => {
                let mut v = ins.clone();
                v.push(gy);
                (Op::SelectiveScanBackward, v, (0..8).collect())
            }
            Op::Attention(a) => {
                let lse = Value { node: id, output: 1 };
                (Op::AttentionBackward(a.clone()), vec![ins[0], ins[1], ins[2], y, lse, gy], vec![0, 1, 2])
            }
            Op::GlaGate { normalizer } => {
                (Op::GlaGateBackward { normalizer: *normalizer }, vec![ins[0], ins[1], gy], vec![0, 1])
            }
            Op::Gla { heads } => {
                (Op::GlaBackward { heads: *heads }, vec![ins[0], ins[1], ins[2], ins[3], gy], vec![0, 1, 2, 3])
            }
            Op::Retention { heads, rope } => {
                (Op::RetentionBackward { heads: *heads, rope: *rope }, vec![ins[0], ins[1], ins[2], gy], vec![0, 1, 2])
            }
            Op::HeadRmsNormGate { heads, eps } => (
                Op::HeadRmsNormGateBackward { heads: *heads, eps: *eps },
                vec![ins[0], ins[1], ins[2], gy],
                vec![0, 1, 2],
            ),
            Op::CrossEntropy => (Op::CrossEntropyBackward, vec![ins[0], ins[1], ins[2], gy], vec![0, 1]),
            other => return Err(AutodiffError(format!("{} has no backward rule", other.name()))),
        };
        let binputs: Vec<Value> = binputs.into_iter().map(|v| self.saved(v)).collect();
        let tys: Vec<&TensorType> = binputs.iter().map(|v| self.g.ty(*v)).collect();
        let outs = bop.infer(&tys).map_err(|e| AutodiffError(format!("{}: {e}", bop.name())))?;
        let n = Node { kind: NodeKind::Op(bop), outs, span: node.span, section: node.section, recompute: false };
        let b = self.g.add(n, &binputs);
        for (k, &input) in targets.iter().enumerate() {
            self.contribute(ins[input], Value { node: b, output: k as u32 });
        }
        Ok(())
    }
}
