//! The typed graph: tensor operations from the runtime's operation set on a petgraph graph,
//! every node with the types of its outputs, the span of the spec text it came from, and the
//! section of the model (embedding, a layer, the head) it belongs to.
//!
//! Architecture invariant: node indices are assigned in a topological order (every node after
//! its inputs), and each edge names the output it reads and the input slot it feeds, so a
//! node's inputs are ordered by slot.

mod build;
mod dot;
mod dump;
mod verify;

pub use build::{build, build_mode, Mode};
pub use dot::to_dot;
pub use dump::dump;
pub use verify::{verify, VerifyError};

use crate::diag::Span;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::fmt;
use weft_runtime::{Init, Op, TensorType};

/// A node of a [`Graph`]; stable under deletion, so ids kept by later passes stay valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub NodeIndex);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// One output of a node: the unit that flows along edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub output: u32,
}

impl NodeId {
    /// The node's first (for most operations, only) output.
    pub fn out0(self) -> Value {
        Value { node: self, output: 0 }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.output == 0 {
            write!(f, "%{}", self.node.index())
        } else {
            write!(f, "%{}.{}", self.node.index(), self.output)
        }
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
    /// The optimizer step.
    Optimizer,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    /// Data fed to every step (tokens, targets, the step number).
    Input {
        name: String,
    },
    /// A trained tensor with its initialisation rule.
    Param {
        name: String,
        init: Init,
    },
    /// A persistent tensor that is not trained (optimizer moments, gradient accumulators),
    /// zero at the start.
    State {
        name: String,
    },
    Op(Op),
}

impl NodeKind {
    /// The name of an input, parameter or state.
    pub fn leaf_name(&self) -> Option<&str> {
        match self {
            NodeKind::Input { name } | NodeKind::Param { name, .. } | NodeKind::State { name } => Some(name),
            NodeKind::Op(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    /// The type of each output (leaves have one).
    pub outs: Vec<TensorType>,
    pub span: Span,
    pub section: Section,
    /// The backward pass recomputes this value from its inputs instead of keeping it.
    pub recompute: bool,
}

impl Node {
    /// The type of the first output.
    pub fn ty(&self) -> &TensorType {
        &self.outs[0]
    }
}

/// An edge: which output of the source feeds which input slot of the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    pub output: u32,
    pub input: u32,
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub name: String,
    pub g: StableDiGraph<Node, Port>,
    /// Named results of the graph (`loss`, gradients).
    pub outputs: Vec<(String, Value)>,
    /// Persistent tensors this graph writes: (parameter or state name, its new value).
    pub updates: Vec<(String, Value)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), g: StableDiGraph::new(), outputs: Vec::new(), updates: Vec::new() }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    pub fn ty(&self, v: Value) -> &TensorType {
        &self.g[v.node.0].outs[v.output as usize]
    }

    pub fn add(&mut self, node: Node, inputs: &[Value]) -> NodeId {
        let id = NodeId(self.g.add_node(node));
        for (slot, input) in inputs.iter().enumerate() {
            self.g.add_edge(input.node.0, id.0, Port { output: input.output, input: slot as u32 });
        }
        id
    }

    /// A node's inputs ordered by slot.
    pub fn inputs(&self, id: NodeId) -> Vec<Value> {
        let mut edges: Vec<(u32, Value)> = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (e.weight().input, Value { node: NodeId(e.source()), output: e.weight().output }))
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, v)| v).collect()
    }

    /// Every node in index order, which is a topological order (a stable graph enumerates
    /// its node slots in index order).
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.g.node_indices().map(move |i| (NodeId(i), &self.g[i]))
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
        self.params().map(|(_, _, n)| n.ty().shape.fixed_elems()).sum()
    }

    pub fn output(&self, name: &str) -> Option<Value> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// The nodes that outputs and updates name, kept by a pass that rewrites many nodes: a
/// training graph has an update per parameter, and scanning them at every rewrite made fusion
/// quadratic in the number of layers.
pub struct Named(rustc_hash::FxHashSet<NodeId>);

impl Named {
    pub fn of(g: &Graph) -> Named {
        Named(g.outputs.iter().chain(&g.updates).map(|(_, v)| v.node).collect())
    }

    /// Applies `f` to every output and update value of `g` on node `id`.
    pub fn for_each_on(&self, g: &mut Graph, id: NodeId, mut f: impl FnMut(&mut Value)) {
        if self.0.contains(&id) {
            g.outputs.iter_mut().chain(g.updates.iter_mut()).filter(|(_, v)| v.node == id).for_each(|(_, v)| f(v));
        }
    }

    /// Makes every reader of `old` (operations, outputs, updates) read `new` instead.
    pub fn replace_uses(&mut self, g: &mut Graph, old: Value, new: Value) {
        g.replace_edge_uses(old, new);
        if self.0.contains(&old.node) {
            let mut moved = false;
            for (_, v) in g.outputs.iter_mut().chain(g.updates.iter_mut()) {
                if *v == old {
                    *v = new;
                    moved = true;
                }
            }
            if moved {
                self.0.insert(new.node);
            }
        }
    }
}

impl Graph {
    /// Every (node, input slot) that reads `v`.
    pub fn users(&self, v: Value) -> Vec<(NodeId, u32)> {
        let mut u: Vec<(NodeId, u32)> = self
            .g
            .edges_directed(v.node.0, Direction::Outgoing)
            .filter(|e| e.weight().output == v.output)
            .map(|e| (NodeId(e.target()), e.weight().input))
            .collect();
        u.sort();
        u
    }

    /// Makes every operation reading `old` read `new` instead (outputs and updates are the
    /// caller's: see [`Named`]).
    pub fn replace_edge_uses(&mut self, old: Value, new: Value) {
        for (user, slot) in self.users(old) {
            if let Some(e) = self
                .g
                .edges_connecting(old.node.0, user.0)
                .find(|e| e.weight().input == slot && e.weight().output == old.output)
                .map(|e| e.id())
            {
                self.g.remove_edge(e);
            }
            self.g.add_edge(new.node.0, user.0, Port { output: new.output, input: slot });
        }
    }

    /// Whether every edge goes from a lower to a higher node index.
    pub fn is_ordered(&self) -> bool {
        self.g.edge_indices().all(|e| self.g.edge_endpoints(e).is_some_and(|(s, t)| s < t))
    }

    /// Whether removed nodes left vacant indices (which the next added nodes would take).
    pub fn has_holes(&self) -> bool {
        self.g.node_count() != self.g.node_indices().map(|n| n.index() + 1).max().unwrap_or(0)
    }

    /// Rebuilds the graph so that node indices are again a topological order (the invariant
    /// passes may break by adding nodes), keeping the original order wherever it is one.
    pub fn compact(&self) -> Graph {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        // Indexed by node index (dense tables, not maps: this runs after every pass).
        let bound = self.g.node_indices().map(|n| n.index() + 1).max().unwrap_or(0);
        let mut indegree = vec![0usize; bound];
        for e in self.g.edge_indices() {
            if let Some((_, t)) = self.g.edge_endpoints(e) {
                indegree[t.index()] += 1;
            }
        }
        let mut ready: BinaryHeap<Reverse<NodeIndex>> =
            self.g.node_indices().filter(|n| indegree[n.index()] == 0).map(Reverse).collect();
        // Sized up front: growing a vector of a few hundred thousand nodes copied it over and
        // over (a fifth of a 4096-layer check).
        let mut out = Graph::new(self.name.clone());
        out.g.reserve_exact_nodes(self.g.node_count());
        out.g.reserve_exact_edges(self.g.edge_count());
        let mut map: Vec<Option<NodeId>> = vec![None; bound];
        let mapped = |map: &[Option<NodeId>], n: NodeIndex| map[n.index()].expect("inputs come first");
        while let Some(Reverse(n)) = ready.pop() {
            let inputs: Vec<Value> = self
                .inputs(NodeId(n))
                .into_iter()
                .map(|v| Value { node: mapped(&map, v.node.0), output: v.output })
                .collect();
            map[n.index()] = Some(out.add(self.g[n].clone(), &inputs));
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let t = e.target();
                let d = &mut indegree[t.index()];
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(t));
                }
            }
        }
        let remap = |v: &Value| Value { node: mapped(&map, v.node.0), output: v.output };
        out.outputs = self.outputs.iter().map(|(n, v)| (n.clone(), remap(v))).collect();
        out.updates = self.updates.iter().map(|(n, v)| (n.clone(), remap(v))).collect();
        out
    }
}
