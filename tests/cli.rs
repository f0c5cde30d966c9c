//! The `weft` binary as a user runs it.

use std::process::Command;

fn weft(args: &[&str]) -> (i32, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_weft")).args(args).current_dir(crate::root()).output().expect("run weft");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_json_has_parameters_and_layers() {
    let (code, out, err) = weft(&["check", "specs/samba-421m.weft", "--json", "--batch", "8"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["parameters"], 421_793_280u64);
    let layers = v["layers"].as_array().expect("layers");
    // embedding, 24 sub-layers, head
    assert_eq!(layers.len(), 26);
    let sum: u64 = layers.iter().map(|l| l["parameters"].as_u64().unwrap()).sum();
    assert_eq!(sum, 421_793_280);
    assert_eq!(layers[3]["kind"], "swa(w=2048)");
    // About 20 GiB of activations for a micro-batch of 8 × 4096 tokens.
    assert!(v["memory"]["train_arena_bytes"].as_u64().unwrap() > 16 << 30);
    assert_eq!(v["memory"]["batch"], 8);
}

#[test]
fn check_prints_the_count_to_the_unit() {
    let (code, out, _) = weft(&["check", "specs/mamba-432m.weft"]);
    assert_eq!(code, 0);
    assert!(out.contains("parameters: 432,804,864"), "{out}");
}

#[test]
fn check_takes_the_sequence_length_from_run_settings() {
    let dir = std::env::temp_dir().join(format!("weft-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "[train]\nseq_len = 512\n").unwrap();
    let (code, out, err) = weft(&["check", "specs/tiny/samba-tiny.weft", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["seq"], 512);
    std::fs::write(&cfg, "[train]\nseq_len = 0\n").unwrap();
    let (code, _, err) = weft(&["check", "specs/tiny/samba-tiny.weft", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("run.toml:2:11"), "{err}");
}

#[test]
fn broken_spec_exits_non_zero_with_located_errors() {
    let (code, out, err) = weft(&["check", "tests/data/errors/many_semantic_errors.weft"]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("tests/data/errors/many_semantic_errors.weft:10:31"), "{err}");
    assert!(err.contains("error: 10 errors found"), "{err}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let (code, _, err) = weft(&["check", "specs/does-not-exist.weft"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read spec `specs/does-not-exist.weft`"), "{err}");
}

#[test]
fn graph_prints_text_and_dot() {
    let (code, out, _) = weft(&["graph", "specs/tiny/mamba-tiny.weft"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("graph mamba-tiny {"));
    assert!(out.contains("output loss = %"));
    let (code, out, _) = weft(&["graph", "specs/tiny/mamba-tiny.weft", "--dot"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("digraph"));
}

#[test]
fn graph_dumps_every_stage_of_the_pass_pipeline() {
    let dir = std::env::temp_dir().join(format!("weft-stages-{}", std::process::id()));
    let (code, out, err) =
        weft(&["graph", "specs/tiny/mamba-mlp-tiny.weft", "--train", "--fused", "--dump-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("fuse-add-rms-norm: 16 rewrites") && err.contains("fuse-rms-norm-backward-add: 16 rewrites"),
        "{err}"
    );
    assert!(out.contains("rms_norm_backward_add") && out.contains("selective_scan_backward"));
    let stages: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(stages.len(), 3, "{stages:?}");
    let first = std::fs::read_to_string(dir.join("00-input.txt")).unwrap();
    assert!(!first.contains("add_rms_norm"));
    let _ = std::fs::remove_dir_all(&dir);
}
