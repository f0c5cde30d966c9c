//! weft: a compiler for neural-network architectures.
//!
//! The pipeline, each stage a module:
//! `syntax` (pest grammar → syntax tree) → `spec` (names resolved, inheritance merged, parameters
//! checked → a model description) → `graph` (typed petgraph of tensor operations, verified) →
//! `analysis` (parameters, FLOPs, memory).

pub mod analysis;
pub mod autodiff;
pub mod bench;
pub mod build;
pub mod config;
pub mod diag;
pub mod graph;
pub mod lower;
pub mod passes;
pub mod program;
pub mod run;
pub mod snapshot;
pub mod spec;
pub mod syntax;

use diag::{Diagnostic, Diagnostics, SourceMap};
use std::path::Path;

/// A spec that parsed, resolved, elaborated and verified.
pub struct Checked {
    pub model: spec::Model,
    pub graph: graph::Graph,
    pub sources: SourceMap,
    /// Warnings only (errors stop the front end).
    pub diags: Diagnostics,
}

/// What went wrong, with the sources to render it against.
pub struct Failed {
    pub sources: SourceMap,
    pub diags: Diagnostics,
}

impl Failed {
    pub fn render(&self) -> String {
        self.diags.render(&self.sources)
    }
}

/// Runs the front end on a spec file: parse, resolve, elaborate, verify.
pub fn check_file(path: &Path) -> Result<Checked, Failed> {
    front_end(spec::load_file(path))
}

/// The same on spec text; `path` names it in messages and anchors relative `extends`.
pub fn check_str(path: &Path, src: &str) -> Result<Checked, Failed> {
    front_end(spec::load_str(path, src.to_string()))
}

/// The same on a run's recorded spec (every file of its `extends` chain): nothing is read from
/// the disk.
pub fn check_source(source: &weft_runtime::run::SpecSource) -> Result<Checked, Failed> {
    let files: Vec<(std::path::PathBuf, String)> =
        source.files.iter().map(|f| (std::path::PathBuf::from(&f.path), f.text.clone())).collect();
    front_end(spec::load_stored(&files))
}

impl Checked {
    /// The spec's text as read (the file named, then each file it extends), for `run.json`
    /// and bundles.
    pub fn source(&self) -> weft_runtime::run::SpecSource {
        weft_runtime::run::SpecSource { files: self.sources.files() }
    }
}

/// A lowering error or finding as a diagnostic at the spec text its plan step comes from.
pub fn lowering_diagnostic(l: &lower::Located, severity: lower::Severity, is_error: bool) -> Diagnostic {
    let d = if is_error { Diagnostic::error(l.message.clone()) } else { Diagnostic::warning(l.message.clone()) };
    let label = match severity {
        _ if l.message.contains("has no GPU kernel") => "no GPU kernel",
        lower::Severity::Limit if is_error => "the GPU cannot run the kernels of this layer",
        lower::Severity::Limit => "exceeds a GPU limit",
        lower::Severity::Fallback => "runs on a slower kernel",
    };
    let d = match l.at {
        Some(at) => d.at(diag::Span { file: diag::FileId(at.file), start: at.start, end: at.end }, label),
        None => d,
    };
    d.note(format!("in plan `{}`, step {} ({})", l.plan, l.step, l.op))
}

fn front_end(loaded: spec::Loaded) -> Result<Checked, Failed> {
    let (model, sources, mut diags) = loaded.into_result().map_err(|(sources, diags)| Failed { sources, diags })?;
    let graph = match graph::build(&model) {
        Ok(g) => g,
        Err(e) => {
            diags.push(Diagnostic::error(e.message).at(e.span, "while elaborating this layer"));
            return Err(Failed { sources, diags });
        }
    };
    if let Err(errs) = graph::verify(&graph) {
        let mut d = Diagnostic::error("internal error: the elaborated graph failed verification");
        for e in errs {
            d = d.note(e.to_string());
        }
        diags.push(d);
        return Err(Failed { sources, diags });
    }
    Ok(Checked { model, graph, sources, diags })
}
