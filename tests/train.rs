//! Training as a user runs it: `weft train` as a process, killed and resumed, checkpoints that are
//! damaged or from another model, and the loss a tiny Samba reaches on real English text.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn weft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weft"));
    c.current_dir(crate::root());
    c
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("weft-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small synthetic English-like corpus: enough documents for a held-out split.
fn write_corpus(dir: &Path) -> PathBuf {
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    let words = [
        "the", "whale", "sea", "ship", "captain", "white", "harpoon", "deck", "sailor", "wind", "and", "of", "a", "to",
    ];
    for d in 0..12 {
        let text: Vec<&str> = (0..400).map(|i| words[(i * 7 + d * 3 + i / 5) % words.len()]).collect();
        std::fs::write(docs.join(format!("doc-{d:02}.txt")), text.join(" ")).unwrap();
    }
    docs
}

fn config(dir: &Path, docs: &Path, steps: u64, every: u64, tokenizer: &str) -> PathBuf {
    let spec = crate::root().join("specs/tiny/samba-micro.weft");
    let text = format!(
        "spec = \"{}\"\n[train]\nseq_len = 64\nbatch_size = 4\ngrad_accum = 2\nsteps = {steps}\neval_every = 4\neval_batches = 2\n\
         [optimizer]\nlr = 3e-3\n[data]\ntrain = [\"{}\"]\ntokenizer = \"{tokenizer}\"\n[checkpoint]\ndir = \"run\"\nevery = {every}\nkeep = 2\n",
        spec.display(),
        docs.display()
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn losses(run: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    // Losses as written (bit-exact decimal forms); throughput differs between runs.
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {}", v["step"], v["loss"], v["eval_loss"])
        })
        .collect()
}

#[test]
fn a_killed_run_resumes_with_exactly_the_uninterrupted_losses() {
    let dir = temp_dir("resume");
    let docs = write_corpus(&dir);
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let ca = config(&a, &docs, 12, 4, "byte");
    let cb = config(&b, &docs, 12, 4, "byte");

    let out = weft().args(["train", "--no-progress", "--config"]).arg(&ca).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let uninterrupted = losses(&a.join("run"));
    assert_eq!(uninterrupted.len(), 12);

    // Kill the second run between its first and second checkpoints.
    let mut child = weft()
        .args(["train", "--no-progress", "--config"])
        .arg(&cb)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run_b = b.join("run");
    let start = Instant::now();
    loop {
        let done = std::fs::read_to_string(run_b.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
        if done >= 6 && run_b.join("latest").exists() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "the run did not reach step 6");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = losses(&run_b);
    assert!(partial.len() < 12, "killed too late: {} steps", partial.len());

    let out = weft().args(["train", "--no-progress", "--config"]).arg(&cb).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(losses(&run_b), uninterrupted);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_or_foreign_checkpoints_are_refused() {
    let dir = temp_dir("damaged");
    let docs = write_corpus(&dir);
    let cfg = config(&dir, &docs, 2, 2, "byte");
    let out = weft().args(["train", "--no-progress", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = dir.join("run");
    let params = run.join("step-00000002/params.safetensors");

    // Generation works from the checkpoint.
    let out = weft()
        .args(["generate", "--max-new-tokens", "5", "--prompt", "the whale", "--run"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("the whale"));
    // And without a prompt, as after the end of a document.
    let out =
        weft().args(["generate", "--max-new-tokens", "5", "--temperature", "0", "--run"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A flipped byte.
    let mut bytes = std::fs::read(&params).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&params, &bytes).unwrap();
    let out = weft().args(["train", "--no-progress", "--steps", "4", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("params.safetensors` is damaged: its checksum does not match"), "{err}");

    // A checkpoint of another model.
    let text = std::fs::read_to_string(&cfg).unwrap().replace("samba-micro.weft", "mamba-tiny.weft");
    std::fs::write(&cfg, text).unwrap();
    let out = weft().args(["train", "--no-progress", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a checkpoint of model `samba-micro`, not `mamba-tiny`"), "{err}");

    // A tokenizer larger than the model's vocabulary.
    let small = dir.join("small.weft");
    std::fs::write(
        &small,
        format!(
            "extends \"{}\"\nmodel small {{ vocab = 200 }}\n",
            crate::root().join("specs/tiny/samba-micro.weft").display()
        ),
    )
    .unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&crate::root().join("specs/tiny/mamba-tiny.weft").display().to_string(), &small.display().to_string())
        .replace("dir = \"run\"", "dir = \"run-small\"");
    std::fs::write(&cfg, text).unwrap();
    let out = weft().args(["train", "--no-progress", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the byte tokenizer has 257 tokens but the model's vocabulary is 200"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The loss criterion of the CPU reference: a tiny Samba trained on Moby-Dick (fetched by
/// scripts/corpus.sh) ends with a held-out loss at least 30% below the unigram entropy of the
/// corpus under the same tokenizer.
#[test]
fn tiny_samba_learns_english_well_below_unigram_entropy() {
    let corpus = crate::root().join("data/corpus/moby-dick");
    assert!(corpus.join(".complete").exists(), "the corpus is missing: run scripts/corpus.sh (scripts/test.sh does)");
    let dir = temp_dir("english");
    let spec = crate::root().join("specs/tiny/samba-micro.weft");
    let text = format!(
        "spec = \"{}\"\n[train]\nseq_len = 256\nbatch_size = 8\nsteps = 400\neval_every = 400\neval_batches = 8\n\
         [optimizer]\nlr = 3e-3\nwarmup = 0.03\n[data]\ntrain = [\"{}\"]\ntokenizer = \"bpe\"\n[checkpoint]\ndir = \"run\"\n",
        spec.display(),
        corpus.display()
    );
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = weft().args(["train", "--no-progress", "--config"]).arg(&cfg).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("held-out loss")).expect("held-out line");
    let nums: Vec<f64> =
        line.split(|c: char| !(c.is_ascii_digit() || c == '.')).filter_map(|w| w.parse().ok()).collect();
    let (held_out, entropy) = (nums[0], nums[2]);
    eprintln!("{line}");
    assert!(held_out <= 0.7 * entropy, "held-out {held_out} vs unigram entropy {entropy}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn token_shards_train_like_text() {
    let dir = temp_dir("shards");
    let docs = write_corpus(&dir);
    let shard = dir.join("train.tokens");
    let out = weft().args(["shard", "--tokenizer", "byte", "--out"]).arg(&shard).arg(&docs).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("12 documents"));
    let cfg = config(&dir, &docs, 2, 2, "byte");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("train = [\"{}\"]", docs.display()),
        &format!("train = [\"{}\"]\nvalid = [\"{}\"]\nformat = \"tokens\"", shard.display(), shard.display()),
    );
    std::fs::write(&cfg, text).unwrap();
    let out = weft().args(["train", "--no-progress", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("held-out loss"));
    // A damaged shard is refused with its name.
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes.truncate(bytes.len() - 2);
    std::fs::write(&shard, bytes).unwrap();
    let _ = std::fs::remove_dir_all(dir.join("run"));
    let out = weft().args(["train", "--no-progress", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("truncated or damaged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn f64_check_mode_trains_to_the_f32_losses_within_rounding() {
    let dir = temp_dir("f64");
    let docs = write_corpus(&dir);
    let mut runs = Vec::new();
    for (name, flag) in [("f32", None), ("f64", Some("--f64"))] {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let cfg = config(&sub, &docs, 3, 3, "byte");
        let mut cmd = weft();
        cmd.args(["train", "--no-progress", "--config"]).arg(&cfg);
        if let Some(f) = flag {
            cmd.arg(f);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(sub.join("run/metrics.jsonl")).unwrap();
        let losses: Vec<f64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect();
        runs.push(losses);
    }
    assert_eq!(runs[0].len(), 3);
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "f32 {a} vs f64 {b}");
    }
    assert_ne!(runs[0], runs[1], "the two precisions should not round identically");
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_json(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap()
}

fn metric(run: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64().unwrap())
        .collect()
}

fn train_cmd(cfg: &Path, extra: &[&str]) -> std::process::Output {
    weft().args(["train", "--no-progress", "--config"]).arg(cfg).args(extra).output().unwrap()
}

fn greedy(run: &Path) -> String {
    let out = weft()
        .args(["generate", "--max-new-tokens", "8", "--temperature", "0", "--prompt", "the whale", "--run"])
        .arg(run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_run_knows_its_spec_and_settings_and_refuses_to_resume_after_a_change() {
    let dir = temp_dir("identity");
    let docs = write_corpus(&dir);
    let spec = dir.join("micro.weft");
    std::fs::copy(crate::root().join("specs/tiny/samba-micro.weft"), &spec).unwrap();
    // It extends samba-tiny.weft: the whole chain is recorded.
    std::fs::copy(crate::root().join("specs/tiny/samba-tiny.weft"), dir.join("samba-tiny.weft")).unwrap();
    let cfg = config(&dir, &docs, 4, 2, "byte");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace(&crate::root().join("specs/tiny/samba-micro.weft").display().to_string(), "micro.weft");
    std::fs::write(&cfg, &text).unwrap();
    let out = train_cmd(&cfg, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = dir.join("run");
    let info = run_json(&run);
    assert_eq!(info["spec"]["files"][0]["text"].as_str().unwrap(), std::fs::read_to_string(&spec).unwrap());
    assert!(info["spec"]["files"][1]["path"].as_str().unwrap().ends_with("samba-tiny.weft"), "{info}");
    assert_eq!(info["settings"]["schedule_steps"], 4);
    assert_eq!(info["settings"]["grad_accum"], 2);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("step-00000004/state.json")).unwrap()).unwrap();
    assert_eq!(state["spec_hash"], info["spec_hash"]);
    assert_eq!(state["settings_hash"], info["settings_hash"]);

    // Generation rebuilds the model from the recorded spec: the file is not read at all.
    let before = greedy(&run);
    std::fs::rename(&spec, dir.join("moved.weft")).unwrap();
    std::fs::write(dir.join("samba-tiny.weft"), "garbage").unwrap();
    assert_eq!(greedy(&run), before);
    std::fs::rename(dir.join("moved.weft"), &spec).unwrap();
    std::fs::copy(crate::root().join("specs/tiny/samba-tiny.weft"), dir.join("samba-tiny.weft")).unwrap();

    // An edited spec (one comment added) is refused on resume, saying what changed.
    std::fs::write(&spec, std::fs::read_to_string(&spec).unwrap() + "// tuned\n").unwrap();
    let out = train_cmd(&cfg, &["--steps", "6"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the spec's text") && err.contains("micro.weft: first change at line"), "{err}");
    assert!(err.contains("--accept-changes"), "{err}");
    assert_eq!(metric(&run, "loss").len(), 4, "a refused resume trained anyway");
    // Resumed on purpose, the change is recorded.
    let out = train_cmd(&cfg, &["--steps", "6", "--accept-changes"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info = run_json(&run);
    assert_eq!(info["accepted_changes"][0]["step"], 4);
    assert!(info["accepted_changes"][0]["what"][0].as_str().unwrap().contains("spec"), "{info}");

    // A changed setting is refused with its old and new values.
    std::fs::write(&cfg, text.replace("lr = 3e-3", "lr = 1e-3")).unwrap();
    let out = train_cmd(&cfg, &["--steps", "8"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lr: 0.003 -> 0.001") && err.contains("min_lr"), "{err}");
    std::fs::write(&cfg, &text).unwrap();

    // --steps past the schedule trains on at the minimum rate: the schedule keeps its 4 steps.
    let out = train_cmd(&cfg, &["--steps", "8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lr = metric(&run, "lr");
    assert_eq!(lr.len(), 8);
    for (i, &l) in lr.iter().enumerate().skip(4) {
        // The rate is an f32 of the plan: within its rounding (2^-24 relative) of 3e-4.
        assert!((l - 3e-4).abs() <= 3e-4 * 2f64.powi(-23), "step {}: lr {l}, not the schedule's minimum 3e-4", i + 1);
    }
    assert!(lr[0] > 3e-4 && lr[1] > 3e-4, "{lr:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn init_from_starts_from_another_runs_parameters_with_a_fresh_optimizer() {
    let dir = temp_dir("init-from");
    let docs = write_corpus(&dir);
    let cfg = config(&dir, &docs, 4, 4, "byte");
    let out = train_cmd(&cfg, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = dir.join("run");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("dir = \"run\"", "dir = \"tuned\"");
    let cfg_b = dir.join("tuned.toml");
    std::fs::write(&cfg_b, text).unwrap();
    let out = train_cmd(&cfg_b, &["--steps", "2", "--init-from", a.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = dir.join("tuned");
    let info = run_json(&b);
    assert_eq!(info["init_from"]["step"], 4);
    assert_eq!(info["init_from"]["checkpoint"], "step-00000004");
    // The same first batch, from trained parameters: a lower loss; the schedule starts afresh.
    let (la, lb) = (metric(&a, "loss"), metric(&b, "loss"));
    assert!(lb[0] < la[0] - 0.1, "init-from run starts at {} against {} from initialisation", lb[0], la[0]);
    assert_eq!(metric(&a, "lr")[0], metric(&b, "lr")[0]);
    // Resuming keeps the record.
    let out = train_cmd(&cfg_b, &["--steps", "3", "--init-from", a.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run_json(&b)["init_from"]["step"], 4);
    // A run with no checkpoint, or of another model, is refused.
    let cfg_c = dir.join("c.toml");
    std::fs::write(&cfg_c, std::fs::read_to_string(&cfg_b).unwrap().replace("dir = \"tuned\"", "dir = \"c\"")).unwrap();
    let out = train_cmd(&cfg_c, &["--init-from", dir.join("docs").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no checkpoint"));
    let text = std::fs::read_to_string(&cfg_c).unwrap().replace("samba-micro.weft", "mamba-tiny.weft");
    std::fs::write(&cfg_c, text).unwrap();
    let out = train_cmd(&cfg_c, &["--init-from", a.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--init-from") && err.contains("samba-micro"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `weft-run train` (here on the CPU reference, through the same library call) writes a run
/// directory that `weft generate` reads and that resumes like one `weft train` wrote.
#[test]
fn a_bundle_trains_into_a_run_directory_weft_generates_from() {
    use weft_runtime::backend::CpuBackend;
    use weft_runtime::train::{shard_run, train, ShardRun};
    let dir = temp_dir("bundle-run");
    let docs = write_corpus(&dir);
    let cfg = config(&dir, &docs, 3, 2, "byte");
    let bundle_path = dir.join("micro.bundle");
    let out = weft()
        .args(["build", "--no-cubin", "--config"])
        .arg(&cfg)
        .arg("specs/tiny/samba-micro.weft")
        .arg("-o")
        .arg(&bundle_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shard = dir.join("docs.tokens");
    let out = weft().args(["shard", "--tokenizer", "byte", "--out"]).arg(&shard).arg(&docs).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bundle = weft_runtime::bundle::Bundle::read(&bundle_path).unwrap();
    let run_dir = dir.join("gpu-style-run");
    let mut r = ShardRun {
        train: vec![shard.clone()],
        valid: vec![shard.clone()],
        tokenizer: "byte".into(),
        out: run_dir.clone(),
        steps: Some(2),
        log_every: 1,
        eval_every: 0,
        eval_batches: 1,
        checkpoint_every: 1,
        keep: 2,
        accept_changes: false,
        init_from: None,
        passkey: None,
    };
    let go = |r: &ShardRun| {
        let (opts, tw, vw) = shard_run(&bundle, r).unwrap();
        let mut be = CpuBackend::new(bundle.program.clone(), opts.run.settings.seed);
        train(&mut be, &tw, &vw, &opts)
    };
    go(&r).unwrap();
    let info = run_json(&run_dir);
    assert_eq!(info["settings"]["grad_accum"], 2);
    assert_eq!(info["settings"]["data_format"], "tokens");
    assert!(info["spec"]["files"][0]["text"].as_str().unwrap().contains("model samba-micro"));
    assert!(greedy(&run_dir).starts_with("the whale"));
    // It resumes from its checkpoint to the schedule's end (3 steps, from the bundle's settings).
    r.steps = None;
    go(&r).unwrap();
    assert_eq!(metric(&run_dir, "loss").len(), 3);
    // Generating with the bundle's program, as `weft-run generate` does, gives the text `weft
    // generate` gives from the spec the run records (greedy, so exactly).
    {
        use weft_runtime::backend::Backend;
        use weft_runtime::generate::{generate_text, GenerateOptions, Sampling};
        let info = weft_runtime::run::RunInfo::read(&run_dir).unwrap().unwrap();
        let g = weft_runtime::run::open_for_generation(&run_dir, &info, &bundle.program).unwrap();
        let mut be = CpuBackend::new(bundle.program.clone(), 0);
        be.write(g.params).unwrap();
        let context = bundle.plans["prefill"].0.seq as usize;
        let o = GenerateOptions { max_new: 8, truncate_prompt: false, stop: vec![] };
        let greedy_sampling = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
        let (kept, text) =
            generate_text(&mut be, &g.tokenizer, context, "the whale", &o, &greedy_sampling, |_, _| {}).unwrap();
        assert_eq!(format!("{kept}{text}\n"), greedy(&run_dir));
        // A stop string ends the text before its first appearance, even one spanning tokens.
        let chars: Vec<char> = text.chars().collect();
        assert!(chars.len() >= 4, "{text:?}");
        let stop: String = chars[chars.len() - 3..chars.len() - 1].iter().collect();
        let expect = &text[..text.find(&stop).unwrap()];
        let out = weft()
            .args([
                "generate",
                "--max-new-tokens",
                "8",
                "--preset",
                "greedy",
                "--prompt",
                "the whale",
                "--stop",
                &stop,
                "--run",
            ])
            .arg(&run_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("the whale{expect}\n"));
    }
    // A bundle of another model cannot resume it.
    let other = dir.join("other.bundle");
    let out = weft()
        .args(["build", "--no-cubin", "--config"])
        .arg(&cfg)
        .arg("specs/tiny/mamba-tiny.weft")
        .arg("-o")
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let other = weft_runtime::bundle::Bundle::read(&other).unwrap();
    let (opts, tw, vw) = shard_run(&other, &r).unwrap();
    let mut be = CpuBackend::new(other.program.clone(), 0);
    let e = train(&mut be, &tw, &vw, &opts).unwrap_err();
    assert!(e.contains("is a checkpoint of model `samba-micro`, not `mamba-tiny`"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `weft eval ppl` against perplexity computed by hand from the `score` plan (every window in
/// one full-sequence pass, not chunked): windows longer than samba-micro's 128-token window
/// (the ring wraps), a chunk that divides neither length, the shorter length scoring the same
/// tokens in more windows; and its refusals.
#[test]
fn eval_ppl_matches_perplexity_computed_from_the_score_plan() {
    use weft_runtime::backend::{Backend, CpuBackend};
    use weft_runtime::cpu::tensor::Tensor;
    let dir = temp_dir("eval-ppl");
    let docs = write_corpus(&dir);
    let out = train_cmd(&config(&dir, &docs, 2, 2, "byte"), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = dir.join("run");
    // Held-out text unlike the training documents.
    let held = dir.join("held-out.txt");
    let text: Vec<String> = (0..300).map(|i| format!("w{}", (i * 13 + i / 7) % 29)).collect();
    std::fs::write(&held, text.join(" ")).unwrap();
    let svg = dir.join("ppl.svg");
    let out = weft()
        .args(["eval", "ppl", "--lengths", "60,150", "--windows", "3", "--chunk", "7", "--run"])
        .arg(&run)
        .arg("--data")
        .arg(&held)
        .arg("--svg")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<Vec<String>> =
        table.lines().skip(1).map(|l| l.split_whitespace().map(str::to_string).collect()).collect();
    assert_eq!(rows.len(), 2, "{table}");

    let opened = weft::run::open_run_for(&run, Some(151)).unwrap();
    let mut stream = opened.tokenizer.encode(&std::fs::read_to_string(&held).unwrap()).unwrap();
    stream.push(opened.tokenizer.eot());
    let mut be = CpuBackend::new(opened.program, 0);
    be.write(opened.params).unwrap();
    for (row, (length, windows)) in rows.iter().zip([(60usize, 7usize), (150, 3)]) {
        let per_window: Vec<f64> = (0..windows)
            .map(|w| {
                let span: Vec<i32> = stream[w * length..w * length + length + 1].iter().map(|&t| t as i32).collect();
                let inputs = vec![
                    ("tokens".to_string(), Tensor::ints(vec![1, length], span[..length].to_vec())),
                    ("targets".to_string(), Tensor::ints(vec![1, length], span[1..].to_vec())),
                ];
                let out = be.run("score", inputs).unwrap();
                -out["logprobs"].reals().unwrap().iter().map(|&x| x as f64).sum::<f64>() / length as f64
            })
            .collect();
        let n = windows as f64;
        let nll = per_window.iter().sum::<f64>() / n;
        let sd = (per_window.iter().map(|x| (x - nll).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let half = 1.96 * sd / n.sqrt();
        let num = |i: usize| row[i].parse::<f64>().unwrap();
        assert_eq!(row[0], length.to_string(), "{table}");
        assert_eq!(row[1], windows.to_string(), "{table}");
        // Printed to 4 and 3 decimals (half a unit of the last place), over f32 log-probabilities
        // summed over at most 150 tokens (relative error well below 1e-5).
        assert!((num(2) - nll).abs() < 5e-5 + 1e-5 * nll, "nll {} against {nll}\n{table}", row[2]);
        let close = |got: f64, want: f64| (got - want).abs() < 5e-4 + 2e-5 * want;
        assert!(close(num(3), nll.exp()), "ppl {} against {}\n{table}", row[3], nll.exp());
        assert!(close(num(4), (nll - half).exp()) && close(num(6), (nll + half).exp()), "interval\n{table}");
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(plot.matches("<circle").count(), 2);

    // Entropies per layer of the same run, windows of 200 tokens (longer than the 128-token
    // sliding window): samba-micro's two Mamba and two attention layers in the order they run,
    // each at most the log of what its weights spread over (128 keys; 200 tokens for Δ).
    let out = weft()
        .args(["eval", "entropy", "--length", "200", "--last", "16", "--windows", "2", "--run"])
        .arg(&run)
        .arg("--data")
        .arg(&held)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<(String, f64)> = text
        .lines()
        .skip(2)
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (format!("{} {}", w[0], w[1]), w[3].parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["mamba 1", "attention 1", "mamba 2", "attention 2"], "{text}");
    for (name, h) in &rows {
        let ceiling = if name.starts_with("attention") { 128f64.ln() } else { 200f64.ln() };
        assert!(*h > 0.0 && *h <= ceiling + 1e-9, "{name}: {h}\n{text}");
    }

    // Refusals: a length the text cannot fill, a malformed length, Self-Extend malformed or on
    // a model without full attention (samba-micro's is sliding-window), a missing file.
    for (args, says) in [
        (vec!["--lengths", "100000"], "too few for one window"),
        (vec!["--lengths", "2x"], "is not a length"),
        (vec!["--self-extend", "16"], "takes the neighbour window and the group size"),
        (vec!["--self-extend", "16,4", "--lengths", "60"], "no full-attention layer with RoPE"),
    ] {
        let out =
            weft().args(["eval", "ppl", "--run"]).arg(&run).arg("--data").arg(&held).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let out = weft().args(["eval", "ppl", "--run"]).arg(&run).args(["--data", "no-such-file.txt"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-file.txt"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Passkey tuning as `weft-run train --passkey` runs it (here on the CPU reference): examples
/// of the training length whose loss is the answer's alone. The held-out loss the run reports
/// is the mean negative log-probability of the answer tokens only, as the score plan gives
/// them; the run records its data as passkey examples.
#[test]
fn passkey_tuning_scores_the_answer_alone() {
    use weft_runtime::backend::{Backend, CpuBackend};
    use weft_runtime::cpu::tensor::Tensor;
    use weft_runtime::train::{evaluate, shard_run, train, ShardRun};
    let dir = temp_dir("passkey");
    let spec = crate::root().join("specs/tiny/samba-micro.weft");
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "spec = \"{}\"\n[train]\nseq_len = 400\nbatch_size = 2\nsteps = 2\n[optimizer]\nlr = 1e-3\n[data]\ntrain = [\"x\"]\n",
            spec.display()
        ),
    )
    .unwrap();
    let bundle_path = dir.join("micro.bundle");
    let out = weft()
        .args(["build", "--no-cubin", "--config"])
        .arg(&cfg)
        .arg(&spec)
        .arg("-o")
        .arg(&bundle_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bundle = weft_runtime::bundle::Bundle::read(&bundle_path).unwrap();
    let r = ShardRun {
        train: vec![],
        valid: vec![],
        tokenizer: "byte".into(),
        out: dir.join("pk"),
        steps: Some(2),
        log_every: 1,
        eval_every: 0,
        eval_batches: 4,
        checkpoint_every: 0,
        keep: 1,
        accept_changes: false,
        init_from: None,
        passkey: Some(20),
    };
    let (opts, tw, vw) = shard_run(&bundle, &r).unwrap();
    let mut be = CpuBackend::new(bundle.program.clone(), opts.run.settings.seed);
    train(&mut be, &tw, &vw, &opts).unwrap();
    assert_eq!(run_json(&r.out)["settings"]["data_format"], "passkey");
    // Held-out: 64 examples, each a window whose targets count only for the answer (a space and
    // 5 digits), the last 6 of the example's tokens: targets 393..399 of the window (the last
    // target, the next example's first token, does not count).
    assert_eq!(vw.count(), 64);
    let reported = evaluate(&mut be, &vw, 2, 400, 4).unwrap();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for i in 0..8 {
        let (x, y) = vw.masked_window(i);
        assert_eq!(y.iter().filter(|&&t| t >= 0).count(), 6);
        assert!(y[..393].iter().all(|&t| t < 0) && y[393..399].iter().all(|&t| t >= 0) && y[399] < 0, "{y:?}");
        let inputs = vec![
            ("tokens".to_string(), Tensor::ints(vec![1, 400], x)),
            ("targets".to_string(), Tensor::ints(vec![1, 400], y)),
        ];
        let lp = be.run("score", inputs).unwrap()["logprobs"].reals().unwrap().to_vec();
        sum -= lp.iter().map(|&v| v as f64).sum::<f64>();
        count += 6;
    }
    let want = sum / count as f64;
    // f32 sums over 48 tokens and an 800-token batch: far below 1e-4 relative.
    assert!((reported - want).abs() < 1e-4 * want, "{reported} against {want}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Data-parallel ranks on the CPU: two ranks of one micro-batch each add the same numbers in the
/// same order as one process accumulating two, so losses, gradient norms (clipping active) and
/// every parameter and optimizer moment are bit-identical; a run resumes on another number of
/// ranks; a rank count that does not divide the micro-batches is refused.
#[test]
fn two_ranks_train_bit_identically_to_one_accumulating_two() {
    let dir = temp_dir("ranks");
    let docs = write_corpus(&dir);
    let clip = 0.05;
    let make = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let cfg = config(&d, &docs, 6, 3, "byte");
        let text =
            std::fs::read_to_string(&cfg).unwrap().replace("lr = 3e-3\n", &format!("lr = 3e-3\ngrad_clip = {clip}\n"));
        std::fs::write(&cfg, text).unwrap();
        (cfg, d.join("run"))
    };
    let train = |cfg: &Path, extra: &[&str]| {
        let out = weft()
            .args(["train", "--no-progress", "--backend", "cpu", "--config"])
            .arg(cfg)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let with_norms = |run: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert!(v["grad_norm"].as_f64().unwrap() > clip, "clipping must act at every step: {l}");
                format!("{} {} {} {}", v["step"], v["loss"], v["grad_norm"], v["eval_loss"])
            })
            .collect()
    };
    let latest = |run: &Path, file: &str| {
        let step = std::fs::read_to_string(run.join("latest")).unwrap();
        std::fs::read(run.join(step.trim()).join(file)).unwrap()
    };

    let (one, one_run) = make("one");
    let (code, _, err) = train(&one, &[]);
    assert_eq!(code, Some(0), "{err}");
    let (two, two_run) = make("two");
    let (code, stdout, err) = train(&two, &["--ranks", "2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("2 data-parallel ranks"), "{stdout}");
    assert_eq!(with_norms(&two_run), with_norms(&one_run));
    assert_eq!(with_norms(&one_run).len(), 6);
    for f in ["params.safetensors", "optimizer.safetensors"] {
        assert!(latest(&two_run, f) == latest(&one_run, f), "{f} differs between one rank and two");
    }

    // Two ranks to the checkpoint at step 3, then one rank on to step 6: the same run.
    let (mixed, mixed_run) = make("mixed");
    let (code, _, err) = train(&mixed, &["--ranks", "2", "--steps", "3"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = train(&mixed, &[]);
    assert_eq!(code, Some(0), "{err}");
    // (The first invocation also evaluated at its last step, 3.)
    let trained = |run: &Path| -> Vec<String> {
        with_norms(run).iter().map(|l| l.rsplit_once(' ').unwrap().0.to_string()).collect()
    };
    assert_eq!(trained(&mixed_run), trained(&one_run));
    for f in ["params.safetensors", "optimizer.safetensors"] {
        assert!(latest(&mixed_run, f) == latest(&one_run, f), "{f} differs after resuming on one rank");
    }

    // And the other way: one rank to step 3, then two ranks (each keeping its share of the
    // optimizer state the checkpoint holds whole) on to 6.
    let (back, back_run) = make("back");
    let (code, _, err) = train(&back, &["--steps", "3"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = train(&back, &["--ranks", "2"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(trained(&back_run), trained(&one_run));
    for f in ["params.safetensors", "optimizer.safetensors"] {
        assert!(latest(&back_run, f) == latest(&one_run, f), "{f} differs after resuming on two ranks");
    }

    let (code, _, err) = train(&mixed, &["--gpus", "3", "--steps", "8"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("3 ranks share each step's train.grad_accum = 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ranks as processes, started torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): two
/// `weft train` processes train the run one process accumulating both micro-batches trains, bit
/// for bit; killing one rank with SIGKILL stops the other at once with an error naming it, and
/// the newest checkpoint stays whole (one process resumes from it).
#[test]
fn two_processes_train_as_one_and_a_killed_rank_stops_the_other() {
    let dir = temp_dir("processes");
    let docs = write_corpus(&dir);
    let make = |name: &str, steps: u64, every: u64| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        (config(&d, &docs, steps, every, "byte"), d.join("run"))
    };
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rank = |cfg: &Path, rank: usize, port: u16, extra: &[&str]| {
        weft()
            .args(["train", "--no-progress", "--backend", "cpu", "--config"])
            .arg(cfg)
            .args(extra)
            .env("WORLD_SIZE", "2")
            .env("RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let metrics = |run: &Path| std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let trained = |run: &Path| -> Vec<String> {
        metrics(run)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {} {}", v["step"], v["loss"], v["grad_norm"])
            })
            .collect()
    };

    let (one, one_run) = make("one", 4, 2);
    let out = weft().args(["train", "--no-progress", "--backend", "cpu", "--config"]).arg(&one).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (two, two_run) = make("two", 4, 2);
    let port = free_port();
    let children = [rank(&two, 1, port, &[]), rank(&two, 0, port, &[])];
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(trained(&two_run), trained(&one_run));
    assert_eq!(trained(&one_run).len(), 4);

    // A long run, killed mid-way: rank 1 by SIGKILL once rank 0 has written a checkpoint.
    let (long, long_run) = make("long", 400, 2);
    let port = free_port();
    let mut victim = rank(&long, 1, port, &[]);
    let survivor = rank(&long, 0, port, &[]);
    let t = Instant::now();
    while !long_run.join("latest").exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint within two minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    victim.kill().unwrap();
    let killed_at = Instant::now();
    let out = survivor.wait_with_output().unwrap();
    let stopped = killed_at.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(stopped < Duration::from_secs(60), "rank 0 took {stopped:?} to stop");
    assert!(err.contains("rank 1") && err.contains("closed"), "{err}");
    let _ = victim.wait();
    let done = metrics(&long_run).lines().count();
    assert!(done < 400, "the run was not cut short ({done} steps)");
    // The newest checkpoint is whole: one process resumes from it and trains on.
    let ckpt = std::fs::read_to_string(long_run.join("latest")).unwrap();
    let step: u64 = ckpt.trim().trim_start_matches("step-").parse().unwrap();
    let target = (step + 1).to_string();
    let out = weft()
        .args(["train", "--no-progress", "--backend", "cpu", "--steps", &target, "--config"])
        .arg(&long)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(metrics(&long_run).lines().count() as u64, step + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rendezvous that cannot work is said, with what to fix, and the process exits 1 without
/// waiting past its timeout: a rank outside the world, a missing variable, --ranks as well, a
/// rank 0 that never comes, a rank that never joins, a port already taken.
#[test]
fn a_bad_rendezvous_is_named() {
    let dir = temp_dir("rendezvous");
    let docs = write_corpus(&dir);
    let cfg = config(&dir, &docs, 2, 0, "byte");
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let run = |vars: &[(&str, String)], extra: &[&str]| {
        let mut c = weft();
        c.args(["train", "--no-progress", "--backend", "cpu", "--config"]).arg(&cfg).args(extra);
        for (k, v) in vars {
            c.env(k, v);
        }
        let t = Instant::now();
        let out = c.output().unwrap();
        assert!(t.elapsed() < Duration::from_secs(60), "{vars:?} took {:?}", t.elapsed());
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let s = |v: &str| v.to_string();
    let local = |rank: &str, p: u16| {
        vec![
            ("WORLD_SIZE", s("2")),
            ("RANK", s(rank)),
            ("MASTER_ADDR", s("127.0.0.1")),
            ("MASTER_PORT", p.to_string()),
            ("WEFT_COLLECTIVE_TIMEOUT", s("1")),
        ]
    };
    type Case<'a> = (Vec<(&'a str, String)>, &'a [&'a str], &'a str);
    let cases: Vec<Case> = vec![
        (vec![("WORLD_SIZE", s("2")), ("RANK", s("2"))], &[], "RANK=2 is not below WORLD_SIZE=2"),
        (vec![("WORLD_SIZE", s("2")), ("RANK", s("0"))], &[], "so MASTER_ADDR must be too"),
        (local("0", port()), &["--ranks", "2"], "leave out --ranks"),
        (local("1", port()), &[], "could not reach rank 0 at 127.0.0.1"),
        (local("0", port()), &[], "rank(s) 1 never joined"),
    ];
    for (vars, extra, want) in cases {
        let (code, err) = run(&vars, extra);
        assert_eq!(code, Some(1), "{vars:?}: {err}");
        assert!(err.contains(want), "{vars:?}: {err}");
    }
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let (code, err) = run(&local("0", taken.local_addr().unwrap().port()), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot listen on port"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
