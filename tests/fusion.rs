//! The pass pipeline: which operations each tiny spec fuses, the fused graph's text, and the CPU
//! reference running fused and unfused programs to the same numbers.

use std::path::Path;
use weft::graph::dump;
use weft::passes::{run, FUSION};
use weft::program::{build_program_with, train_step_graph, OptimizerSettings};
use weft_runtime::cpu::exec::{run as execute, Store};
use weft_runtime::cpu::tensor::Tensor;

#[test]
fn every_residual_add_fuses_with_the_next_norm_forward_and_backward() {
    for entry in std::fs::read_dir(crate::root().join("specs/tiny")).unwrap() {
        let path = entry.unwrap().path();
        let c = weft::check_file(&path).unwrap_or_else(|f| panic!("{}", f.render()));
        let layers = c.model.layers.len();
        let (_, log) = run(train_step_graph(&c.graph).unwrap(), FUSION, false).unwrap();
        // Each sub-layer's residual add meets the next norm (the last meets the final norm), and
        // each norm's input gradient joins the residual gradient.
        assert_eq!(
            log.rewrites,
            vec![("fuse-add-rms-norm", layers), ("fuse-rms-norm-backward-add", layers)],
            "{}",
            path.display()
        );
        let (_, log) = run(c.graph.clone(), FUSION, false).unwrap();
        assert_eq!(log.rewrites, vec![("fuse-add-rms-norm", layers), ("fuse-rms-norm-backward-add", 0)]);
    }
}

#[test]
fn fused_training_graph_of_one_layer_of_each_kind() {
    let c = weft::check_str(Path::new("one-of-each.weft"), crate::autodiff::ONE_OF_EACH)
        .unwrap_or_else(|f| panic!("{}", f.render()));
    let (g, log) = run(train_step_graph(&c.graph).unwrap(), FUSION, true).unwrap();
    assert_eq!(log.stages.len(), 3);
    insta::assert_snapshot!(dump(&g));
}

#[test]
fn fused_and_unfused_programs_compute_the_same_numbers() {
    let c = crate::checked("specs/tiny/samba-micro.weft");
    let settings = OptimizerSettings::from_config(&weft::config::RunConfig::default());
    let fused = build_program_with(&c.model, &settings, 64, FUSION).unwrap();
    let plain = build_program_with(&c.model, &settings, 64, &[]).unwrap();
    assert!(fused.plan("train_step").unwrap().steps.len() < plain.plan("train_step").unwrap().steps.len());
    let (b, t) = (2, 32);
    let ids = |salt: u64| -> Vec<i32> { (0..b * t).map(|i| ((i as u64 * 2654435761 + salt) % 1024) as i32).collect() };
    let inputs = vec![
        ("tokens".to_string(), Tensor::ints(vec![b, t], ids(1))),
        ("targets".to_string(), Tensor::ints(vec![b, t], ids(2))),
        ("loss_scale".to_string(), Tensor::scalar(1.0f32)),
    ];
    let mut results = Vec::new();
    for p in [&fused, &plain] {
        let mut store: Store<f32> = Store::init(p, 5);
        let out = execute(p.plan("train_step").unwrap(), &mut store, inputs.clone()).unwrap();
        results.push((out["loss"].item().unwrap(), store));
    }
    let (loss_f, store_f) = &results[0];
    let (loss_p, store_p) = &results[1];
    // The fused kernels do the same arithmetic in the same order: the tolerance is f32 rounding
    // (rel 1e-6), and the results here are in fact identical.
    assert!((loss_f - loss_p).abs() <= 1e-6 * loss_p.abs(), "{loss_f} vs {loss_p}");
    for spec in &fused.params {
        let name = format!("grad_acc:{}", spec.name);
        let (a, b) = (store_f.get(&name).unwrap().reals().unwrap(), store_p.get(&name).unwrap().reals().unwrap());
        let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
        let norm: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
        assert!(diff <= 1e-6 * norm.max(1e-30), "{name}: rel {}", diff / norm);
    }
}
