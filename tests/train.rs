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
