//! A stable, diffable text form of a graph: one line per node in index order; leaves referred
//! to by name, operation results by `%index` (`%index.k` for the k-th output).

use super::{Graph, NodeKind, Section, Value};
use std::fmt::Write;

fn reference(g: &Graph, v: Value) -> String {
    match g.node(v.node).kind.leaf_name() {
        Some(name) => name.to_string(),
        None => v.to_string(),
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
                Section::Optimizer => writeln!(out, "  // optimizer"),
            };
        }
        let _ = match &node.kind {
            NodeKind::Input { name } => writeln!(out, "  input {name}: {}", node.ty()),
            NodeKind::Param { name, init } => writeln!(out, "  param {name}: {} = {init}", node.ty()),
            NodeKind::State { name } => writeln!(out, "  state {name}: {}", node.ty()),
            NodeKind::Op(op) => {
                let args: Vec<String> = g.inputs(id).into_iter().map(|v| reference(g, v)).collect();
                let recompute = if node.recompute { "  // recomputed in backward" } else { "" };
                let results: Vec<String> =
                    (0..node.outs.len()).map(|i| Value { node: id, output: i as u32 }.to_string()).collect();
                let types: Vec<String> = node.outs.iter().map(|t| t.to_string()).collect();
                writeln!(out, "  {} = {op}({}): {}{recompute}", results.join(", "), args.join(", "), types.join(", "))
            }
        };
    }
    for (name, v) in &g.outputs {
        let _ = writeln!(out, "  output {name} = {}", reference(g, *v));
    }
    for (name, v) in &g.updates {
        let _ = writeln!(out, "  update {name} = {}", reference(g, *v));
    }
    out.push_str("}\n");
    out
}
