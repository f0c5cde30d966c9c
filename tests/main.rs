//! The integration tests, in one binary because linking is slow: each module tests one stage.

mod autodiff;
mod cli;
mod config;
mod cpu;
mod diagnostics;
mod fusion;
mod graphs;
mod hostile;
mod lower;
mod parameters;
mod robustness;
mod serve;
mod train;

use std::path::{Path, PathBuf};

/// The repository root (tests run from the package root, which is the repository root).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a small corpus and the run settings of a quick samba-micro run under `d` (byte
/// tokenizer, 32-token windows, `steps` steps, `max_new` new tokens of context for
/// generation, the run in `d/run`); returns the settings' path.
pub fn tiny_run_config(d: &Path, steps: u64, max_new: u64) -> PathBuf {
    let docs = d.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for i in 0..4 {
        std::fs::write(docs.join(format!("d{i}.txt")), "the whale and the sea ".repeat(40)).unwrap();
    }
    let cfg = d.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "spec = \"{}\"\n[train]\nseq_len = 32\nbatch_size = 2\nsteps = {steps}\neval_batches = 1\n[data]\ntrain = [\"{}\"]\ntokenizer = \"byte\"\n[checkpoint]\ndir = \"run\"\n[generate]\nmax_new_tokens = {max_new}\n",
            root().join("specs/tiny/samba-micro.weft").display(),
            docs.display()
        ),
    )
    .unwrap();
    cfg
}

/// Checks a spec under the repository root; panics with the rendered errors if it fails.
pub fn checked(rel: &str) -> weft::Checked {
    match weft::check_file(Path::new(rel)) {
        Ok(c) => c,
        Err(f) => panic!("{rel} failed to check:\n{}", f.render()),
    }
}
