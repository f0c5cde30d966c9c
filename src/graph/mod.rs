//! The typed graph: tensor operations from the runtime's operation set on a petgraph graph,
//! every node with its type, the span of the spec text it came from, and the section of the
//! model (embedding, a layer, the head) it belongs to.
//!
//! Architecture invariant: node indices are assigned in a topological order (every node after
//! its inputs), and edges carry the input slot, so a node's inputs are ordered by slot.

mod build;
mod dot;
mod dump;
mod verify;

pub use build::build;
pub use dot::to_dot;
pub use dump::dump;
pub use verify::{verify, VerifyError};

use crate::diag::Span;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use weft_runtime::{Init, Op, TensorType};

/// A node of a [`Graph`]; stable under deletion, so ids kept by later passes stay valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub NodeIndex);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// Which part of the model a node belongs to; cost tables have one row per section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    Embed,
    /// The i-th residual sub-layer of the expanded `layers` sequence.
    Layer(usize),
    /// Final norm, head and loss.
    Head,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    /// Data fed to every step (tokens, targets).
    Input {
        name: String,
    },
    /// A trained tensor with its initialisation rule.
    Param {
        name: String,
        init: Init,
    },
    Op(Op),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub ty: TensorType,
    pub span: Span,
    pub section: Section,
    /// The backward pass recomputes this value from its inputs instead of keeping it.
    pub recompute: bool,
}

/// An input slot of an edge's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(pub usize);

#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    pub g: StableDiGraph<Node, Slot>,
    /// Named results of the graph (`loss`).
    pub outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            g: StableDiGraph::new(),
            outputs: Vec::new(),
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    pub fn add(&mut self, node: Node, inputs: &[NodeId]) -> NodeId {
        let id = NodeId(self.g.add_node(node));
        for (slot, input) in inputs.iter().enumerate() {
            self.g.add_edge(input.0, id.0, Slot(slot));
        }
        id
    }

    /// A node's inputs ordered by slot.
    pub fn inputs(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(usize, NodeId)> = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (e.weight().0, NodeId(e.source())))
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// Every node in index order, which is a topological order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        let mut ids: Vec<NodeIndex> = self.g.node_indices().collect();
        ids.sort();
        ids.into_iter().map(move |i| (NodeId(i), &self.g[i]))
    }

    pub fn params(&self) -> impl Iterator<Item = (NodeId, &str, &Node)> {
        self.nodes().filter_map(|(id, n)| match &n.kind {
            NodeKind::Param { name, .. } => Some((id, name.as_str(), n)),
            _ => None,
        })
    }

    pub fn is_param(&self, id: NodeId) -> bool {
        matches!(self.node(id).kind, NodeKind::Param { .. })
    }

    /// Number of trained scalars: every parameter tensor, norms included.
    pub fn parameter_count(&self) -> u64 {
        self.params()
            .map(|(_, _, n)| n.ty.shape.fixed_elems())
            .sum()
    }
}
