//! A stable, diffable text form of a graph: one line per node in index order, parameters and
//! inputs referred to by name, operation results by `%index`.

use super::{Graph, NodeId, NodeKind, Section};
use std::fmt::Write;

fn reference(g: &Graph, id: NodeId) -> String {
    match &g.node(id).kind {
        NodeKind::Input { name } | NodeKind::Param { name, .. } => name.clone(),
        NodeKind::Op(_) => format!("%{}", id.index()),
    }
}

pub fn dump(g: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph {} {{", g.name);
    let mut section = None;
    for (id, node) in g.nodes() {
        if section != Some(node.section) {
            section = Some(node.section);
            let _ = match node.section {
                Section::Embed => writeln!(out, "  // embedding"),
                Section::Layer(i) => writeln!(out, "  // layer {i}"),
                Section::Head => writeln!(out, "  // head"),
            };
        }
        let _ = match &node.kind {
            NodeKind::Input { name } => writeln!(out, "  input {name}: {}", node.ty),
            NodeKind::Param { name, init } => writeln!(out, "  param {name}: {} = {init}", node.ty),
            NodeKind::Op(op) => {
                let args: Vec<String> = g.inputs(id).into_iter().map(|i| reference(g, i)).collect();
                let recompute = if node.recompute {
                    "  // recomputed in backward"
                } else {
                    ""
                };
                writeln!(
                    out,
                    "  %{} = {op}({}): {}{recompute}",
                    id.index(),
                    args.join(", "),
                    node.ty
                )
            }
        };
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(out, "  output {name} = {}", reference(g, *id));
    }
    out.push_str("}\n");
    out
}
