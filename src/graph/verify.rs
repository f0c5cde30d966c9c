//! The graph verifier: the invariants every pass must keep, checked between passes.

use super::{Graph, NodeId, NodeKind};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;
use std::collections::{BTreeSet, HashSet};
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
///   the graph is acyclic);
/// - inputs and parameters have no inputs; each operation has exactly one edge per input slot,
///   and its recorded type is what the operation's type rule gives for its inputs;
/// - parameter and input names are unique and non-empty;
/// - every node contributes to an output, and a `loss` output is an f32 scalar.
pub fn verify(g: &Graph) -> Result<(), Vec<VerifyError>> {
    let mut errs = Vec::new();
    let mut fail = |node: Option<NodeId>, message: String| errs.push(VerifyError { node, message });

    for e in (&g.g).edge_references() {
        if e.source() >= e.target() {
            fail(
                Some(NodeId(e.target())),
                format!(
                    "input %{} does not come before its user",
                    e.source().index()
                ),
            );
        }
    }
    let mut names = HashSet::new();
    for (id, node) in g.nodes() {
        let incoming: Vec<usize> =
            g.g.edges_directed(id.0, Direction::Incoming)
                .map(|e| e.weight().0)
                .collect();
        match &node.kind {
            NodeKind::Input { name } | NodeKind::Param { name, .. } => {
                if !incoming.is_empty() {
                    fail(Some(id), format!("`{name}` is a leaf but has inputs"));
                }
                if name.is_empty() || !names.insert(name.clone()) {
                    fail(Some(id), format!("name `{name}` is empty or not unique"));
                }
                if node.ty.shape.as_fixed().is_none() && matches!(node.kind, NodeKind::Param { .. })
                {
                    fail(
                        Some(id),
                        format!("parameter `{name}` has a symbolic shape {}", node.ty.shape),
                    );
                }
            }
            NodeKind::Op(op) => {
                let slots: BTreeSet<usize> = incoming.iter().copied().collect();
                let arity = op.input_names().len();
                if slots.len() != incoming.len() || slots != (0..arity).collect() {
                    fail(
                        Some(id),
                        format!(
                            "{} needs inputs in slots 0..{arity}, has slots {incoming:?}",
                            op.name()
                        ),
                    );
                    continue;
                }
                let ins = g.inputs(id);
                let tys: Vec<&TensorType> = ins.iter().map(|i| &g.node(*i).ty).collect();
                match op.infer(&tys) {
                    Ok(ty) if ty == node.ty => {}
                    Ok(ty) => fail(
                        Some(id),
                        format!(
                            "{} records type {} but its inputs give {ty}",
                            op.name(),
                            node.ty
                        ),
                    ),
                    Err(e) => fail(Some(id), format!("{} does not type-check: {e}", op.name())),
                }
            }
        }
    }

    // Liveness: walk back from the outputs.
    let mut live = HashSet::new();
    let mut stack: Vec<NodeId> = g.outputs.iter().map(|(_, n)| *n).collect();
    while let Some(n) = stack.pop() {
        if !g.g.contains_node(n.0) {
            fail(
                None,
                format!("output refers to missing node %{}", n.index()),
            );
            continue;
        }
        if live.insert(n) {
            stack.extend(g.inputs(n));
        }
    }
    for (id, node) in g.nodes() {
        if !live.contains(&id) {
            let what = match &node.kind {
                NodeKind::Param { name, .. } | NodeKind::Input { name } => format!("`{name}`"),
                NodeKind::Op(op) => op.name().to_string(),
            };
            fail(
                Some(id),
                format!("{what} does not contribute to any output"),
            );
        }
    }
    for (name, id) in &g.outputs {
        if name == "loss"
            && g.g.contains_node(id.0)
            && g.node(*id).ty != TensorType::new(DType::F32, Shape::scalar())
        {
            fail(
                Some(*id),
                format!("loss must be an f32 scalar, is {}", g.node(*id).ty),
            );
        }
    }
    if g.outputs.is_empty() {
        fail(None, "the graph has no outputs".to_string());
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}
