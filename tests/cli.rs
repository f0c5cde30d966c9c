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

#[test]
fn build_writes_a_bundle_and_snapshot_check_catches_a_changed_kernel() {
    let dir = std::env::temp_dir().join(format!("weft-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = dir.join("tiny.bundle");
    let (code, out, err) = weft(&["build", "specs/tiny/mamba-tiny.weft", "-o", bundle.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kernels") && out.contains("arena"), "{out}");
    let b = weft_runtime::bundle::Bundle::read(&bundle).expect("the bundle reads back");
    assert_eq!(b.program.model, "mamba-tiny");

    let snaps = dir.join("snaps");
    let snaps_s = snaps.to_str().unwrap();
    let (code, out, err) = weft(&["snapshot", "specs/tiny/mamba-tiny.weft", "--dir", snaps_s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote"), "{out}");
    let (code, _, err) = weft(&["snapshot", "specs/tiny/mamba-tiny.weft", "--dir", snaps_s, "--check"]);
    assert_eq!(code, 0, "{err}");
    // Edit one kernel's snapshot: the check fails and shows the line.
    let file = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("rms_norm_w"));
    let file = file.expect("an rms_norm kernel");
    let text = std::fs::read_to_string(&file).unwrap().replacen("gpu.return", "gpu.return // edited", 1);
    std::fs::write(&file, text).unwrap();
    let (code, _, err) = weft(&["snapshot", "specs/tiny/mamba-tiny.weft", "--dir", snaps_s, "--check"]);
    assert_eq!(code, 1);
    assert!(err.contains("changed") && err.contains("-") && err.contains("edited"), "{err}");
}

#[test]
fn build_of_a_layer_without_gpu_kernels_says_which() {
    let (code, out, err) = weft(&["build", "specs/tiny/sliding-gla-tiny.weft", "-o", "/dev/null"]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("gla") && err.contains("no GPU kernel"), "{err}");
}

#[test]
fn a_damaged_bundle_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("weft-bundle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.bundle");
    let mut bytes = b"WEFTBNDL".to_vec();
    bytes.extend(weft_runtime::bundle::FORMAT_VERSION.to_le_bytes());
    bytes.extend(b"\xff\xff\xff\xff\x00\x00\x00\x00{}");
    std::fs::write(&p, bytes).unwrap();
    let e = weft_runtime::bundle::Bundle::read(&p).expect_err("refused").0;
    assert!(e.contains("bad.bundle") && e.contains("truncated"), "{e}");
}

#[test]
fn training_on_a_gpu_without_one_says_what_is_missing() {
    // On a machine with a usable GPU this trains; everywhere else it must say why it cannot.
    if weft_runtime::cuda::Gpu::open(0).is_ok() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("weft-nogpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        "[train]\nsteps = 1\nseq_len = 32\nbatch_size = 1\n[data]\ntokenizer = \"byte\"\n[checkpoint]\ndir = \"run\"\n",
    )
    .unwrap();
    let (code, _, err) =
        weft(&["train", "--config", cfg.to_str().unwrap(), "specs/tiny/samba-micro.weft", "--backend", "gpu"]);
    assert_eq!(code, 1);
    assert!(err.contains("no usable GPU") && err.contains("driver"), "{err}");
}

fn write_spec(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `weft check` lowers the program at the run settings' shapes and reports, at the spec's
/// line, every GPU limit a kernel would exceed and every layer on a slower kernel.
#[test]
fn check_reports_gpu_limits_and_fallbacks_at_the_spec_line() {
    let spec =
        write_spec("long.weft", "model long { vocab = 64  width = 64 }\nlayer m = mamba(d_state = 16)\nlayers = [m]\n");
    // 5M tokens in one sequence: the chunked scan's grid would need 78126 rows (at most 65535).
    let (code, _, err) = weft(&["check", spec.to_str().unwrap(), "--seq", "5000000"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("blocks along y at 1 x 5000000 tokens (at most 65535)"), "{err}");
    assert!(err.contains("long.weft:3:11") && err.contains("the GPU cannot run the kernels of this layer"), "{err}");
    // Width 64: RMSNorm's fallback, a warning that does not fail the check.
    assert!(err.contains("warning: RMSNorm of width 64 runs one block per row"), "{err}");
    let (code, _, err) = weft(&["check", spec.to_str().unwrap(), "--seq", "4096"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("RMSNorm of width 64") && !err.contains("error"), "{err}");
    // A state the scan backward's kernel cannot hold: refused at check and at build, at its line.
    let big =
        write_spec("big.weft", "model big { vocab = 64  width = 64 }\nlayer m = mamba(d_state = 128)\nlayers = [m]\n");
    for cmd in [vec!["check", big.to_str().unwrap()], vec!["build", big.to_str().unwrap(), "-o", "/dev/null"]] {
        let (code, _, err) = weft(&cmd);
        assert_eq!(code, 1, "{cmd:?}: {err}");
        assert!(err.contains("at d_state 128") && err.contains("d_state up to 96"), "{cmd:?}: {err}");
        assert!(err.contains("big.weft:3:11"), "{cmd:?}: {err}");
    }
    // Heads of 256 run on the SIMT attention kernels.
    let (code, _, err) = weft(&["check", "scripts/gpu/cases/wide-heads.weft", "--seq", "300"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("attention with heads of 256 runs on the SIMT kernels") && err.contains("wide-heads.weft:14:23"),
        "{err}"
    );
    // GLA has no GPU kernels yet: said, not an error.
    let (code, _, err) = weft(&["check", "specs/tiny/sliding-gla-tiny.weft"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("has no GPU kernel yet") && err.contains("CPU reference only"), "{err}");
}

/// `weft bench --decode` times generation on the GPU: asked on the CPU it says so, and where
/// no GPU is usable it says that, both with a non-zero exit.
#[test]
fn bench_decode_names_what_it_needs() {
    let (code, _, err) = weft(&["bench", "specs/tiny/samba-micro.weft", "--decode"]);
    assert_eq!(code, 1);
    assert!(err.contains("--backend gpu"), "{err}");
    let (code, out, err) =
        weft(&["bench", "specs/tiny/samba-micro.weft", "--decode", "--backend", "gpu", "--seq", "64"]);
    // A machine with a GPU runs it; one without refuses by name.
    if code != 0 {
        assert_eq!(code, 1);
        assert!(err.contains("no usable GPU"), "{err}");
    } else {
        assert!(out.contains("states on the device"), "{out}");
    }
}
