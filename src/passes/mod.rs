//! The pass pipeline: named graph-to-graph rewrites, each followed by the verifier, each stage
//! dumpable as text.

mod fuse;

use crate::graph::{dump, verify, Graph};

/// A named rewrite; returns how many places it changed.
pub struct Pass {
    pub name: &'static str,
    pub run: fn(&mut Graph) -> usize,
}

/// The fusion passes, in the order they run.
pub const FUSION: &[Pass] = &[
    Pass { name: "fuse-add-rms-norm", run: fuse::add_rms_norm },
    Pass { name: "fuse-rms-norm-backward-add", run: fuse::rms_norm_backward_add },
];

#[derive(Debug)]
pub struct PassError(pub String);

/// What a pipeline did: each pass with its rewrite count, and the text of every stage when
/// asked for.
#[derive(Default, Debug)]
pub struct PipelineLog {
    pub rewrites: Vec<(&'static str, usize)>,
    pub stages: Vec<(String, String)>,
}

/// Runs `passes` over `g`, verifying after each; with `keep_dumps`, records the graph's text
/// before the first pass and after each.
pub fn run(mut g: Graph, passes: &[Pass], keep_dumps: bool) -> Result<(Graph, PipelineLog), PassError> {
    let mut log = PipelineLog::default();
    if keep_dumps {
        log.stages.push(("input".to_string(), dump(&g)));
    }
    for pass in passes {
        let n = (pass.run)(&mut g);
        // A fused node takes the place of the last node it replaces, so its readers may now
        // come before it; only then is the graph renumbered (a copy of every node).
        if keep_dumps || !g.is_ordered() {
            g = g.compact();
        }
        if let Err(errs) = verify(&g) {
            let list: Vec<String> = errs.iter().map(|e| format!("  {e}")).collect();
            return Err(PassError(format!(
                "after pass `{}`, the graph failed verification:\n{}",
                pass.name,
                list.join("\n")
            )));
        }
        log.rewrites.push((pass.name, n));
        if keep_dumps {
            log.stages.push((pass.name.to_string(), dump(&g)));
        }
    }
    // Removed nodes leave holes that a later `add` would fill out of order.
    if g.has_holes() {
        g = g.compact();
    }
    Ok((g, log))
}
