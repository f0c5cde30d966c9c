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

/// Checks a spec under the repository root; panics with the rendered errors if it fails.
pub fn checked(rel: &str) -> weft::Checked {
    match weft::check_file(Path::new(rel)) {
        Ok(c) => c,
        Err(f) => panic!("{rel} failed to check:\n{}", f.render()),
    }
}
