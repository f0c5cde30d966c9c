//! The backward pass as a graph: every spec differentiates into a verified training graph, and
//! the training, optimizer and evaluation plans of a program validate.

use std::path::Path;
use weft::autodiff::differentiate;
use weft::graph::{dump, verify, NodeKind};
use weft::program::{build_program, train_step_graph, OptimizerSettings};

/// One layer of every mixer kind, small enough to read its whole training graph.
pub const ONE_OF_EACH: &str = "model one-of-each { vocab = 64  width = 32 }
layer m = mamba(d_state = 4)
layer a = attention(heads = 2, kv_heads = 1, window = 8)
layer f = mlp(hidden = 48)
layers = [m, a, f]
";

fn settings() -> OptimizerSettings {
    OptimizerSettings::from_config(&weft::config::RunConfig::default())
}

#[test]
fn every_tiny_spec_differentiates_into_a_valid_program() {
    for entry in std::fs::read_dir(crate::root().join("specs/tiny")).unwrap() {
        let path = entry.unwrap().path();
        let c = weft::check_file(&path).unwrap_or_else(|f| panic!("{}", f.render()));
        let train = differentiate(&c.graph).unwrap();
        assert_eq!(verify(&train), Ok(()), "{}", path.display());
        // One gradient output per parameter.
        let grads = train.outputs.iter().filter(|(n, _)| n.starts_with("grad:")).count();
        assert_eq!(grads, c.graph.params().count());
        let program = build_program(&c.model, &settings(), 1024).unwrap();
        let names: Vec<&str> = program.plans.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["chunk", "chunk_score", "decode", "eval", "logits", "optimizer_step", "prefill", "score", "train_step"]
        );
        assert_eq!(program.validate(), Ok(()));
    }
}

#[test]
fn tied_embedding_gradient_sums_both_uses() {
    let c = crate::checked("specs/tiny/samba-tiny.weft");
    let train = differentiate(&c.graph).unwrap();
    let (_, grad) = train.outputs.iter().find(|(n, _)| n == "grad:embed.weight").unwrap();
    let node = train.node(grad.node);
    assert!(matches!(&node.kind, NodeKind::Op(op) if op.name() == "add"), "{:?}", node.kind);
    let ops: Vec<String> = train
        .inputs(grad.node)
        .iter()
        .map(|v| match &train.node(v.node).kind {
            NodeKind::Op(op) => op.name().to_string(),
            _ => "leaf".into(),
        })
        .collect();
    assert_eq!(ops, ["cross_entropy_backward", "embed_backward"]);
}

#[test]
fn training_graph_of_one_layer_of_each_kind() {
    let c = weft::check_str(Path::new("one-of-each.weft"), ONE_OF_EACH).unwrap_or_else(|f| panic!("{}", f.render()));
    let g = train_step_graph(&c.graph).unwrap();
    insta::assert_snapshot!(dump(&g));
}
