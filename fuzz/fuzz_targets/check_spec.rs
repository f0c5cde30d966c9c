//! Feeds arbitrary bytes through the whole front end: parse, resolve, elaborate, verify and
//! render the diagnostics. Any panic, stack overflow, hang or runaway allocation is a bug.
//!
//! Run with `cargo fuzz run check_spec` from the repository root (seed corpus: `specs/`).

#[path = "driver.rs"]
mod driver;

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let src = String::from_utf8_lossy(data);
    match weft::check_str(Path::new("fuzz.weft"), &src) {
        Ok(c) => {
            let _ = weft::graph::dump(&c.graph);
            let _ = weft::analysis::analyze(&c.graph, &c.model, 4096);
        }
        Err(f) => {
            let _ = f.render();
        }
    }
});

fn main() {
    driver::run();
}
