//! Careless and hostile inputs, as a user would give them to the `weft` binary: every one gets
//! a clear error (what and where) and a non-zero exit, or a correct result, and none hangs or
//! allocates without bound. Commands that used to hang or allocate run under a time limit and a
//! memory cap (`ulimit -v`) that only a regression would reach: they are not speed tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("weft-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `weft ARGS` under a memory cap of `mem_mib` MiB of address space and a time limit; returns
/// (exit code, stdout, stderr). A run past the limit fails the test.
fn capped(args: &[&str], mem_mib: u64, limit: Duration) -> (i32, String, String) {
    capped_with_input(args, mem_mib, limit, None)
}

fn capped_with_input(args: &[&str], mem_mib: u64, limit: Duration, input: Option<&str>) -> (i32, String, String) {
    let bin = env!("CARGO_BIN_EXE_weft");
    let quoted: Vec<String> = args.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    let script = format!("ulimit -v {}; exec '{bin}' {}", mem_mib * 1024, quoted.join(" "));
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(crate::root())
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = input {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("weft {args:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GIB: u64 = 1024;

fn settings(dir: &Path, train: &str) -> PathBuf {
    let p = dir.join("run.toml");
    std::fs::write(
        &p,
        format!(
            "spec = \"{}\"\n[train]\n{train}\n[data]\ntrain = [\"{}\"]\ntokenizer = \"byte\"\n[checkpoint]\ndir = \"run\"\n",
            crate::root().join("specs/tiny/samba-micro.weft").display(),
            crate::root().join("data/corpus/moby-dick").display()
        ),
    )
    .unwrap();
    p
}

/// Case 1: sizes in run settings are bounded before anything is allocated, with the same
/// located error from `weft check --config` and `weft train`.
#[test]
fn run_settings_are_bounded_before_anything_is_allocated() {
    let d = dir("settings");
    for (line, key, expect) in [
        ("batch_size = 1000000000000", "train.batch_size", "between 1 and 65536"),
        ("batch_size = 9223372036854775807", "train.batch_size", "between 1 and 65536"),
        ("batch_size = 100000000", "train.batch_size", "between 1 and 65536"),
        ("grad_accum = 1000000000000", "train.grad_accum", "between 1 and 65536"),
        ("seq_len = 4096\nbatch_size = 65536", "train.batch_size", "batch_size × seq_len is at most 67108864"),
    ] {
        let cfg = settings(&d, line);
        let cfg = cfg.to_str().unwrap();
        for cmd in [
            vec!["check", "specs/tiny/samba-micro.weft", "--config", cfg],
            vec!["train", "--no-progress", "--config", cfg],
        ] {
            let (code, _, err) = capped(&cmd, 2 * GIB, Duration::from_secs(60));
            assert_eq!(code, 1, "{cmd:?}: {err}");
            assert!(err.contains(&format!("`{key}` must be")) && err.contains(expect), "{cmd:?}: {err}");
            assert!(err.contains("run.toml:"), "{cmd:?}: no location: {err}");
        }
    }
    // Within the bounds but beyond this machine: refused with the numbers, before allocating.
    let cfg = settings(&d, "seq_len = 65536\nbatch_size = 1024");
    let (code, _, err) = capped(
        &["train", "--no-progress", "--backend", "cpu", "--config", cfg.to_str().unwrap()],
        2 * GIB,
        Duration::from_secs(60),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("needs about") && err.contains("available") && err.contains("lower train.batch_size"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// Case 2: many diagnostics are capped at 50 and a count; a long line is cut to a window
/// around the caret. (How check and build time grow with sub-layers is `weft bench --scaling`,
/// a benchmark, not a test.)
#[test]
fn diagnostics_are_capped_and_long_lines_cut() {
    let d = dir("diags");
    let names: Vec<String> = (0..4096).map(|i| format!("nope{i}")).collect();
    let spec = d.join("unknown.weft");
    std::fs::write(&spec, format!("model t {{ vocab = 64  width = 64 }}\nlayers = [{}]\n", names.join(", "))).unwrap();
    let (code, _, err) = capped(&["check", spec.to_str().unwrap()], 2 * GIB, Duration::from_secs(60));
    assert_eq!(code, 1);
    assert_eq!(err.matches("error: unknown layer").count(), 50, "{}", &err[..2000.min(err.len())]);
    assert!(
        err.contains("note: 4046 more diagnostics not shown (4046 errors, 0 warnings)"),
        "{}",
        &err[err.len() - 400..]
    );
    assert!(err.contains("error: 4096 errors found"));
    assert!(err.len() < 64 * 1024, "{} bytes of diagnostics", err.len());
    assert!(err.lines().all(|l| l.chars().count() < 220), "a line of over 220 characters");
    let _ = std::fs::remove_dir_all(&d);
}

/// Case 3: paths from users are read only as regular files, at most their limit.
#[test]
fn only_regular_files_within_their_limit_are_read() {
    let d = dir("reads");
    let (code, _, err) = capped(&["check", "/dev/zero"], GIB, Duration::from_secs(20));
    assert_eq!(code, 1);
    assert!(err.contains("`/dev/zero` is not a regular file"), "{err}");
    // A FIFO named like a spec is refused without blocking; a sparse 2 GB spec by its size.
    let fifo = d.join("pipe.weft");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let big = d.join("big.weft");
    std::fs::File::create(&big).unwrap().set_len(2 << 30).unwrap();
    for (target, expect) in [(&fifo, "not a regular file"), (&big, "2 GiB, more than the 1 MiB a base spec may have")] {
        let spec = d.join("derived.weft");
        std::fs::write(&spec, format!("extends \"{}\"\nmodel t {{}}\n", target.display())).unwrap();
        let (code, _, err) = capped(&["check", spec.to_str().unwrap()], GIB, Duration::from_secs(20));
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(expect) && err.contains("derived.weft:1:9"), "{err}");
    }
    // `extends` of anything but a spec: not read, so nothing of it is shown.
    let spec = d.join("shadow.weft");
    std::fs::write(&spec, "extends \"/etc/shadow\"\nmodel t {}\n").unwrap();
    let (code, _, err) = capped(&["check", spec.to_str().unwrap()], GIB, Duration::from_secs(20));
    assert_eq!(code, 1);
    assert!(err.contains("which is not a .weft spec") && !err.contains("root:"), "{err}");
    // A tokenizer of /dev/zero.
    let cfg = settings(&d, "seq_len = 64\nbatch_size = 2\nsteps = 1").to_str().unwrap().to_string();
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap().replace("tokenizer = \"byte\"", "tokenizer = \"/dev/zero\""),
    )
    .unwrap();
    let (code, _, err) =
        capped(&["train", "--no-progress", "--backend", "cpu", "--config", &cfg], 2 * GIB, Duration::from_secs(60));
    assert_eq!(code, 1);
    assert!(err.contains("`/dev/zero` is not a regular file"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Case 4: sizes the kernel generators cannot take are refused by `weft check`, at their line,
/// with the limit named, and `weft build` refuses them the same way instead of aborting.
#[test]
fn sizes_the_kernels_cannot_take_are_refused_at_check() {
    let d = dir("kernels");
    for (layer, expect) in [
        ("layer m = mamba(d_state = 4096)", "d_state up to 96 is supported"),
        ("layer m = mamba(d_conv = 65536)", "`d_conv` is 65536, more than 16"),
    ] {
        let spec = d.join("k.weft");
        std::fs::write(&spec, format!("model t {{ vocab = 64  width = 64 }}\n{layer}\nlayers = [m]\n")).unwrap();
        for cmd in [vec!["check", spec.to_str().unwrap()], vec!["build", spec.to_str().unwrap(), "-o", "/dev/null"]] {
            let (code, _, err) = capped(&cmd, 2 * GIB, Duration::from_secs(60));
            assert_eq!(code, 1, "{cmd:?}: {err}");
            assert!(err.contains(expect) && err.contains("k.weft:"), "{cmd:?}: {err}");
        }
    }
    let spec = d.join("wide.weft");
    std::fs::write(&spec, "model t { vocab = 64  width = 16777216 }\nlayer f = mlp(hidden = 64)\nlayers = [f]\n")
        .unwrap();
    for cmd in
        [vec!["check", spec.to_str().unwrap(), "--seq", "64"], vec!["build", spec.to_str().unwrap(), "-o", "/dev/null"]]
    {
        let (code, _, err) = capped(&cmd, 4 * GIB, Duration::from_secs(60));
        assert_eq!(code, 1, "{cmd:?}: {err}");
        assert!(err.contains("would need") && err.contains("wide.weft:"), "{cmd:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Case 6: the smaller ones.
#[test]
fn the_front_end_says_what_and_where_for_odd_text() {
    let d = dir("text");
    let check = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        capped(&["check", p.to_str().unwrap(), "--seq", "64"], GIB, Duration::from_secs(30))
    };
    // A byte-order mark is not part of the spec.
    let (code, _, err) =
        check("bom.weft", b"\xef\xbb\xbfmodel t { vocab = 64  width = 64 }\nlayer f = mlp(hidden = 4)\nlayers = [f]\n");
    assert_eq!(code, 0, "{err}");
    // Invalid UTF-8: line, column and byte offset.
    let (code, _, err) = check("utf8.weft", b"model t { vocab = 64 }\nlayer \xff = mlp(hidden = 4)\n");
    assert_eq!(code, 1);
    assert!(err.contains("line 2, column 7 (byte offset 29)"), "{err}");
    // An unterminated block comment, where it opens.
    let (code, _, err) = check("comment.weft", b"model t { vocab = 64  width = 64 }\n/* open\nlayers = [f]\n");
    assert_eq!(code, 1);
    assert!(err.contains("unterminated block comment") && err.contains("comment.weft:2:1"), "{err}");
    // A broken pattern is an error inside it.
    let (code, _, err) = check(
        "pattern.weft",
        b"model t { vocab = 64  width = 64 }\nlayer f = mlp(hidden = 4)\nlayers = pattern(\"ff\"\n",
    );
    assert_eq!(code, 1);
    assert!(err.contains("expected `)` or `,`") && !err.contains("`extends`"), "{err}");
    // One error for one mistake.
    let (code, _, err) =
        check("heads.weft", b"model t { vocab = 64  width = 64 }\nlayer a = attention(heads = 0)\nlayers = [a]\n");
    assert_eq!(code, 1);
    assert!(err.contains("`heads` must be") && !err.contains("kv_heads") && err.contains("1 error found"), "{err}");
    // Terminal escapes in a spec are shown escaped, never sent.
    let (code, _, err) =
        check("escape.weft", b"model t { vocab = 64  width = 64 }\nlayer \x1b[31mred = mlp(hidden = 4)\n");
    assert_eq!(code, 1);
    assert!(!err.contains('\x1b') && err.contains("\\u{1b}"), "{err:?}");
    // An empty checkpoint directory would write beside the settings.
    let cfg = settings(&d, "seq_len = 64");
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("dir = \"run\"", "dir = \"\"")).unwrap();
    let (code, _, err) =
        capped(&["train", "--no-progress", "--config", cfg.to_str().unwrap()], GIB, Duration::from_secs(30));
    assert_eq!(code, 1);
    assert!(err.contains("`checkpoint.dir` must be a directory"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

fn train(cfg: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["train", "--no-progress", "--backend", "cpu", "--config", cfg.to_str().unwrap()];
    args.extend(extra);
    capped(&args, 4 * GIB, Duration::from_secs(300))
}

/// Case 5: everything a run reads back is verified, and damage is said.
#[test]
fn a_run_trusts_no_file_it_reads_back() {
    let d = dir("integrity");
    let docs = d.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for i in 0..6 {
        let text: String = (0..300).map(|j| ["the ", "whale ", "sea ", "ship "][(i + j * 3) % 4]).collect();
        std::fs::write(docs.join(format!("d{i}.txt")), text).unwrap();
    }
    let cfg = d.join("run.toml");
    let write_cfg = |tokenizer: &str| {
        std::fs::write(
            &cfg,
            format!(
                "spec = \"{}\"\n[train]\nseq_len = 32\nbatch_size = 2\nsteps = 4\neval_every = 2\neval_batches = 1\n[data]\ntrain = [\"{}\"]\ntokenizer = \"{tokenizer}\"\n[checkpoint]\ndir = \"run\"\nevery = 2\n",
                crate::root().join("specs/tiny/samba-micro.weft").display(),
                docs.display()
            ),
        )
        .unwrap()
    };
    write_cfg("bpe");
    let (code, _, err) = train(&cfg, &[]);
    assert_eq!(code, 0, "{err}");
    let run = d.join("run");
    // An edited step in state.json.
    let state = run.join("step-00000004/state.json");
    let original = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, original.replace("\"step\": 4", "\"step\": 2")).unwrap();
    let (code, _, err) = train(&cfg, &["--steps", "6"]);
    assert_eq!(code, 1);
    assert!(err.contains("state.json` is damaged or was edited"), "{err}");
    std::fs::write(&state, &original).unwrap();
    // Two ids of the tokenizer swapped: not the run's tokenizer.
    let tok = run.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok).unwrap();
    std::fs::write(
        &tok,
        text.replacen("\"a\":", "\"ZZ\":", 1).replacen("\"b\":", "\"a\":", 1).replacen("\"ZZ\":", "\"b\":", 1),
    )
    .unwrap();
    let (code, _, err) = train(&cfg, &["--steps", "6"]);
    assert_eq!(code, 1);
    assert!(err.contains("the tokenizer"), "{err}");
    let gen = capped(
        &["generate", "--run", run.to_str().unwrap(), "--max-new-tokens", "2"],
        2 * GIB,
        Duration::from_secs(60),
    );
    assert_eq!(gen.0, 1);
    assert!(gen.2.contains("is not the tokenizer this run was trained with"), "{}", gen.2);
    std::fs::write(&tok, &text).unwrap();
    // Byte tokens on a BPE-trained run: a different run.
    write_cfg("byte");
    let (code, _, err) = train(&cfg, &["--steps", "6"]);
    assert_eq!(code, 1);
    assert!(err.contains("tokenizer: \"bpe\" -> \"byte\""), "{err}");
    write_cfg("bpe");
    // A cut last line of metrics.jsonl is dropped alone, with a warning.
    let metrics = run.join("metrics.jsonl");
    let mut m = std::fs::read_to_string(&metrics).unwrap();
    m.push_str("{\"step\": 5, \"lo");
    std::fs::write(&metrics, m).unwrap();
    let (code, _, err) = train(&cfg, &["--steps", "6"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("metrics.jsonl` line 5 is damaged") && err.contains("stopped while writing"), "{err}");
    let lines = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(lines, 6, "the history before the damaged line must stay");
    // No partial checkpoint is left behind.
    assert!(std::fs::read_dir(&run).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")));
    let _ = std::fs::remove_dir_all(&d);
}

/// Case 6, generation: a prompt longer than the context is refused (or cut with a flag), and
/// prompts come from a file or standard input.
#[test]
fn prompts_longer_than_the_context_are_refused_and_come_from_files() {
    let d = dir("prompts");
    let cfg = crate::tiny_run_config(&d, 1, 16);
    let (code, _, err) = train(&cfg, &[]);
    assert_eq!(code, 0, "{err}");
    let run = d.join("run");
    let run = run.to_str().unwrap();
    let long = "x".repeat(120 * 1024);
    let prompt_file = d.join("prompt.txt");
    std::fs::write(&prompt_file, &long).unwrap();
    let (code, _, err) = capped(
        &["generate", "--run", run, "--prompt-file", prompt_file.to_str().unwrap()],
        2 * GIB,
        Duration::from_secs(60),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("the prompt is 122880 tokens")
            && err.contains("context of 48")
            && err.contains("--truncate-prompt"),
        "{err}"
    );
    let (code, out, err) = capped(
        &[
            "generate",
            "--run",
            run,
            "--prompt-file",
            prompt_file.to_str().unwrap(),
            "--truncate-prompt",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        2 * GIB,
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("cut to its last 47 tokens") && out.starts_with(&"x".repeat(47)), "{err}\n{out}");
    // From standard input, as from an argument.
    let (code, out_stdin, err) = capped_with_input(
        &["generate", "--run", run, "--prompt-file", "-", "--max-new-tokens", "4", "--temperature", "0"],
        2 * GIB,
        Duration::from_secs(60),
        Some("the whale"),
    );
    assert_eq!(code, 0, "{err}");
    let (_, out_arg, _) = capped(
        &["generate", "--run", run, "--prompt", "the whale", "--max-new-tokens", "4", "--temperature", "0"],
        2 * GIB,
        Duration::from_secs(60),
    );
    assert_eq!(out_stdin, out_arg);
    assert!(out_arg.starts_with("the whale"));
    // Several prompts at once (one per line, an empty one among them): each gets the text
    // it gets alone, as one JSON line, in order.
    let prompts = ["the sea and", "the whale", ""];
    let list = d.join("prompts.txt");
    std::fs::write(&list, prompts.join("\n") + "\n").unwrap();
    let flags = ["--max-new-tokens", "4", "--temperature", "0"];
    let (code, out, err) = capped(
        &[&["generate", "--run", run, "--prompts", list.to_str().unwrap()][..], &flags[..]].concat(),
        2 * GIB,
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (i, p) in prompts.iter().enumerate() {
        let (_, alone, err) = capped(
            &[&["generate", "--run", run, "--prompt", p][..], &flags[..]].concat(),
            2 * GIB,
            Duration::from_secs(60),
        );
        assert_eq!(lines[i]["index"], i, "{out}");
        let together = format!("{}{}\n", lines[i]["prompt"].as_str().unwrap(), lines[i]["text"].as_str().unwrap());
        assert_eq!(together, alone, "prompt {i}: {err}");
    }
    std::fs::write(&list, "").unwrap();
    let (code, _, err) =
        capped(&["generate", "--run", run, "--prompts", list.to_str().unwrap()], 2 * GIB, Duration::from_secs(60));
    assert!(code == 1 && err.contains("no prompts"), "{code}: {err}");
    let _ = std::fs::remove_dir_all(&d);
}
