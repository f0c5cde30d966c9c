//! Fusions of neighbouring operations into one kernel. A fused operation takes the place (the
//! node) of the last operation it replaces, so the graph's order stays the order of the work.

use crate::graph::{Graph, Named, NodeId, NodeKind, Port, Value};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use weft_runtime::{Op, TensorType};

fn op(g: &Graph, v: Value) -> Option<&Op> {
    match &g.node(v.node).kind {
        NodeKind::Op(op) => Some(op),
        _ => None,
    }
}

/// Turns node `id` into `op` with the given inputs and output types; readers of its old output
/// `k` now read output `remap[k]`.
fn rewrite(g: &mut Graph, named: &Named, id: NodeId, op: Op, inputs: &[Value], outs: Vec<TensorType>, remap: &[u32]) {
    let incoming: Vec<_> = g.g.edges_directed(id.0, Direction::Incoming).map(|e| e.id()).collect();
    for e in incoming {
        g.g.remove_edge(e);
    }
    let outgoing: Vec<_> = g.g.edges_directed(id.0, Direction::Outgoing).map(|e| e.id()).collect();
    for e in outgoing {
        if let Some(p) = g.g.edge_weight_mut(e) {
            p.output = remap[p.output as usize];
        }
    }
    named.for_each_on(g, id, |v| v.output = remap[v.output as usize]);
    for (slot, v) in inputs.iter().enumerate() {
        g.g.add_edge(v.node.0, id.0, Port { output: v.output, input: slot as u32 });
    }
    let node = &mut g.g[id.0];
    node.kind = NodeKind::Op(op);
    node.outs = outs;
}

/// `s = add(x, y); n = rms_norm(s, w)` becomes `(s, n) = add_rms_norm(x, y, w)`: the residual
/// stream is read once and written once.
pub fn add_rms_norm(g: &mut Graph) -> usize {
    let norms: Vec<_> = g
        .nodes()
        .filter_map(|(id, n)| match &n.kind {
            NodeKind::Op(Op::RmsNorm { eps }) => Some((id, *eps)),
            _ => None,
        })
        .collect();
    let mut named = Named::of(g);
    let mut fused = 0;
    for (norm, eps) in norms {
        let ins = g.inputs(norm);
        let s = ins[0];
        if op(g, s) != Some(&Op::Add) || g.ty(s) != g.node(norm).ty() {
            continue;
        }
        let add_ins = g.inputs(s.node);
        let outs = vec![g.ty(s).clone(), g.node(norm).ty().clone()];
        rewrite(g, &named, norm, Op::AddRmsNorm { eps }, &[add_ins[0], add_ins[1], ins[1]], outs, &[1]);
        named.replace_uses(g, s, norm.out0());
        g.g.remove_node(s.node.0);
        fused += 1;
    }
    fused
}

/// `(gx, gw) = rms_norm_backward(x, w, g); t = add(a, gx)` — the residual gradient joining the
/// norm's — becomes `(t, gw) = rms_norm_backward_add(x, w, g, a)` when `t` is gx's only use.
pub fn rms_norm_backward_add(g: &mut Graph) -> usize {
    let adds: Vec<_> = g.nodes().filter(|(_, n)| matches!(n.kind, NodeKind::Op(Op::Add))).map(|(id, _)| id).collect();
    let mut named = Named::of(g);
    let mut fused = 0;
    for add in adds {
        let ins = g.inputs(add);
        // Either operand may be the norm's gradient.
        let pick = [(ins[1], ins[0]), (ins[0], ins[1])].into_iter().find(|(gx, _)| {
            gx.output == 0 && matches!(op(g, *gx), Some(Op::RmsNormBackward { .. })) && g.users(*gx).len() == 1
        });
        let Some((gx, other)) = pick else { continue };
        let Some(Op::RmsNormBackward { eps }) = op(g, gx).cloned() else { continue };
        let bins = g.inputs(gx.node);
        let outs = g.node(gx.node).outs.clone();
        rewrite(g, &named, add, Op::RmsNormBackwardAdd { eps }, &[bins[0], bins[1], bins[2], other], outs, &[0]);
        named.replace_uses(g, Value { node: gx.node, output: 1 }, Value { node: add, output: 1 });
        g.g.remove_node(gx.node.0);
        fused += 1;
    }
    fused
}
