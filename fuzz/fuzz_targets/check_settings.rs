//! Feeds arbitrary bytes through the run-settings reader: TOML parsing, every range check, the
//! located diagnostics and their rendering, and (for settings that pass) what is sized from
//! them: the schedule, the run's identity and the memory plan of a small spec's training step.
//! Any panic, hang or runaway allocation is a bug.
//!
//! Run with `cargo fuzz run check_settings` from the repository root (seed corpus: `examples/`
//! and `scripts/gpu/`).

#[path = "driver.rs"]
mod driver;

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;

/// A small spec's program, built once.
fn program() -> &'static weft_runtime::plan::Program {
    static PROGRAM: OnceLock<weft_runtime::plan::Program> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let src = "model fuzz { vocab = 64  width = 64 }\nlayer m = mamba(d_state = 4)\nlayer f = mlp(hidden = 64)\nlayers = [m, f]\n";
        let model = weft::check_str(Path::new("fuzz.weft"), src).ok().expect("the fuzz spec checks").model;
        let settings = weft::program::OptimizerSettings::from_config(&weft::config::RunConfig::default());
        weft::program::build_program(&model, &settings, 512).expect("the fuzz program builds")
    })
}

fuzz_target!(|data: &[u8]| {
    let src = String::from_utf8_lossy(data).into_owned();
    let mut sources = weft::diag::SourceMap::new();
    let file = sources.add("run.toml", src);
    match weft::config::parse(sources.source(file), file) {
        Ok(mut c) => {
            c.pin_schedule();
            let _ = weft::run::run_settings(&c).hash();
            let _ = weft::run::max_context(&c);
            // Sizes that passed the checks must be safe to plan with (bounded: small seq).
            let seq = c.train.seq_len.min(256);
            let _ = weft::analysis::memory_report_of(program(), c.train.batch_size.min(64), seq);
        }
        Err(d) => {
            let _ = d.render(&sources);
        }
    }
});

fn main() {
    driver::run();
}
