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
    let _ = writeln!(out, "  rankdir=TB;\n  node [fontname=\"monospace\", fontsize=10];");
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
                Section::Optimizer => "optimizer".to_string(),
            };
            let _ = writeln!(out, "  subgraph cluster_{} {{\n    label=\"{label}\";", id.index());
        }
        let types: Vec<String> = node.outs.iter().map(|t| t.to_string()).collect();
        let (shape, label) = match &node.kind {
            NodeKind::Op(op) => ("box", format!("%{} {op}\\n{}", id.index(), types.join(", "))),
            leaf => ("ellipse", format!("{}\\n{}", leaf.leaf_name().unwrap_or_default(), types.join(", "))),
        };
        let _ =
            writeln!(out, "    n{} [shape={shape}, label=\"{}\"];", id.index(), escape(&label).replace("\\\\n", "\\n"));
    }
    if section.is_some() {
        out.push_str("  }\n");
    }
    for e in (&g.g).edge_references() {
        let _ = writeln!(out, "  n{} -> n{};", e.source().index(), e.target().index());
    }
    for (name, v) in g.outputs.iter().chain(&g.updates) {
        let id = escape(&format!("out:{name}"));
        let _ = writeln!(out, "  \"{id}\" [shape=doubleoctagon, label=\"{}\"];", escape(name));
        let _ = writeln!(out, "  n{} -> \"{id}\";", v.node.index());
    }
    out.push_str("}\n");
    out
}
