//! The graph verifier: the invariants every pass must keep, checked between passes.

use super::{Graph, NodeId, NodeKind, Value};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use rustc_hash::FxHashSet as HashSet;
use std::fmt;
use weft_runtime::{DType, Shape, TensorType};

#[derive(Clone, Debug, PartialEq)]
pub struct VerifyError {
    pub node: Option<NodeId>,
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(n) => write!(f, "node %{}: {}", n.index(), self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Checks that the graph is well formed:
/// - every edge goes from a lower to a higher node index (so index order is topological, and
///   the graph is acyclic) and reads an output its source has;
/// - leaves (inputs, parameters, states) have no inputs and one output; each operation has
///   exactly one edge per input slot, and its recorded output types are what the operation's
///   type rule gives for its inputs;
/// - leaf names are unique and non-empty;
/// - every node contributes to an output or an update, a `loss` output is an f32 scalar, and
///   every update writes a parameter or state of the same name and type.
pub fn verify(g: &Graph) -> Result<(), Vec<VerifyError>> {
    let mut errs = Vec::new();
    let mut fail = |node: Option<NodeId>, message: String| errs.push(VerifyError { node, message });

    for e in (&g.g).edge_references() {
        if e.source() >= e.target() {
            fail(Some(NodeId(e.target())), format!("input %{} does not come before its user", e.source().index()));
        }
        if e.weight().output as usize >= g.g[e.source()].outs.len() {
            fail(
                Some(NodeId(e.target())),
                format!("reads output {} of %{}, which it lacks", e.weight().output, e.source().index()),
            );
        }
    }
    // Dense tables by node index and borrowed names: this runs after every pass over graphs
    // of hundreds of thousands of nodes.
    let mut names: HashSet<&str> = HashSet::default();
    let mut slots: Vec<u32> = Vec::new();
    for (id, node) in g.nodes() {
        slots.clear();
        slots.extend(g.g.edges_directed(id.0, Direction::Incoming).map(|e| e.weight().input));
        match &node.kind {
            NodeKind::Op(op) => {
                slots.sort_unstable();
                let arity = op.input_names().len();
                if slots.len() != arity || slots.iter().enumerate().any(|(i, &s)| s as usize != i) {
                    fail(Some(id), format!("{} needs inputs in slots 0..{arity}, has slots {slots:?}", op.name()));
                    continue;
                }
                let ins = g.inputs(id);
                if ins.iter().any(|v| v.output as usize >= g.node(v.node).outs.len()) {
                    continue;
                }
                let tys: Vec<&TensorType> = ins.iter().map(|i| g.ty(*i)).collect();
                match op.infer(&tys) {
                    Ok(outs) if outs == node.outs => {}
                    Ok(outs) => fail(
                        Some(id),
                        format!(
                            "{} records types {} but its inputs give {}",
                            op.name(),
                            types(&node.outs),
                            types(&outs)
                        ),
                    ),
                    Err(e) => fail(Some(id), format!("{} does not type-check: {e}", op.name())),
                }
            }
            leaf => {
                let name = leaf.leaf_name().unwrap_or_default();
                if !slots.is_empty() {
                    fail(Some(id), format!("`{name}` is a leaf but has inputs"));
                }
                if node.outs.len() != 1 {
                    fail(Some(id), format!("`{name}` must have one output"));
                }
                if name.is_empty() || !names.insert(name) {
                    fail(Some(id), format!("name `{name}` is empty or not unique"));
                }
                if !matches!(leaf, NodeKind::Input { .. }) && node.outs.iter().any(|t| t.shape.as_fixed().is_none()) {
                    fail(Some(id), format!("`{name}` is persistent but has a symbolic shape {}", node.ty().shape));
                }
            }
        }
    }

    let exists = |v: &Value| g.g.contains_node(v.node.0) && (v.output as usize) < g.node(v.node).outs.len();
    let bound = g.g.node_indices().map(|n| n.index() + 1).max().unwrap_or(0);
    let mut live = vec![false; bound];
    let mut stack: Vec<NodeId> = Vec::new();
    for (name, v) in g.outputs.iter().chain(&g.updates) {
        if exists(v) {
            stack.push(v.node);
        } else {
            fail(None, format!("`{name}` refers to missing value {v}"));
        }
    }
    while let Some(n) = stack.pop() {
        if !std::mem::replace(&mut live[n.index()], true) {
            stack.extend(g.g.edges_directed(n.0, Direction::Incoming).map(|e| NodeId(e.source())));
        }
    }
    for (id, node) in g.nodes() {
        if !live[id.index()] {
            let what = match &node.kind {
                NodeKind::Op(op) => op.name().to_string(),
                leaf => format!("`{}`", leaf.leaf_name().unwrap_or_default()),
            };
            fail(Some(id), format!("{what} does not contribute to any output"));
        }
    }
    for (name, v) in &g.outputs {
        if name == "loss" && exists(v) && *g.ty(*v) != TensorType::new(DType::F32, Shape::scalar()) {
            fail(Some(v.node), format!("loss must be an f32 scalar, is {}", g.ty(*v)));
        }
    }
    // Persistent leaves by name, once (updates name them).
    let persistent: std::collections::HashMap<&str, &crate::graph::Node> = g
        .nodes()
        .filter_map(|(_, n)| match &n.kind {
            NodeKind::Param { name, .. } | NodeKind::State { name } => Some((name.as_str(), n)),
            _ => None,
        })
        .collect();
    for (name, v) in &g.updates {
        let target = persistent.get(name.as_str()).map(|n| ((), *n));
        match target {
            Some((_, t)) if exists(v) && t.ty() == g.ty(*v) => {}
            Some((_, t)) if exists(v) => {
                fail(Some(v.node), format!("update of `{name}` is {} but `{name}` is {}", g.ty(*v), t.ty()))
            }
            Some(_) => {}
            None => fail(None, format!("update of `{name}`, which is no parameter or state")),
        }
    }
    if g.outputs.is_empty() && g.updates.is_empty() {
        fail(None, "the graph has no outputs".to_string());
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

fn types(ts: &[TensorType]) -> String {
    ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}
