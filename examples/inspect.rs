//! Using weft as a library: check a spec, then walk its typed graph.
//!
//! `cargo run --example inspect -- specs/tiny/samba-tiny.weft`

use std::path::PathBuf;
use weft::graph::NodeKind;

fn main() {
    let path: PathBuf = std::env::args().nth(1).unwrap_or_else(|| "specs/tiny/samba-tiny.weft".into()).into();
    let checked = match weft::check_file(&path) {
        Ok(c) => c,
        Err(failed) => {
            eprint!("{}", failed.render());
            std::process::exit(1);
        }
    };
    let model = &checked.model;
    println!("{}: {} sub-layers, width {}", model.name, model.layers.len(), model.width);
    for (i, layer) in model.layers.iter().enumerate().take(4) {
        println!("  layer {i}: {} ({})", model.def(layer).name, model.def(layer).kind.describe());
    }
    let biggest = checked
        .graph
        .params()
        .max_by_key(|(_, _, node)| node.ty().shape.fixed_elems())
        .map(|(_, name, node)| format!("{name}: {}", node.ty()));
    println!("largest parameter: {}", biggest.unwrap_or_default());
    let ops = checked.graph.nodes().filter(|(_, n)| matches!(n.kind, NodeKind::Op(_))).count();
    println!("{ops} operations, {} parameters", checked.graph.parameter_count());
}
