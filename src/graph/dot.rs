//! Graphviz output: operations as boxes, parameters and inputs as ellipses, one cluster per
//! section of the model.

use super::{Graph, NodeKind, Section};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use std::fmt::Write;

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

pub fn to_dot(g: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape(&g.name));
    let _ = writeln!(
        out,
        "  rankdir=TB;\n  node [fontname=\"monospace\", fontsize=10];"
    );
    let mut section = None;
    for (id, node) in g.nodes() {
        if section != Some(node.section) {
            if section.is_some() {
                out.push_str("  }\n");
            }
            section = Some(node.section);
            let label = match node.section {
                Section::Embed => "embedding".to_string(),
                Section::Layer(i) => format!("layer {i}"),
                Section::Head => "head".to_string(),
            };
            let _ = writeln!(
                out,
                "  subgraph cluster_{} {{\n    label=\"{label}\";",
                id.index()
            );
        }
        let (shape, label) = match &node.kind {
            NodeKind::Input { name } => ("ellipse", format!("{name}\\n{}", node.ty)),
            NodeKind::Param { name, .. } => ("ellipse", format!("{name}\\n{}", node.ty)),
            NodeKind::Op(op) => ("box", format!("%{} {op}\\n{}", id.index(), node.ty)),
        };
        let _ = writeln!(
            out,
            "    n{} [shape={shape}, label=\"{}\"];",
            id.index(),
            escape(&label).replace("\\\\n", "\\n")
        );
    }
    if section.is_some() {
        out.push_str("  }\n");
    }
    for e in (&g.g).edge_references() {
        let _ = writeln!(out, "  n{} -> n{};", e.source().index(), e.target().index());
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(
            out,
            "  out_{name} [shape=doubleoctagon, label=\"{}\"];\n  n{} -> out_{name};",
            escape(name),
            id.index()
        );
    }
    out.push_str("}\n");
    out
}
