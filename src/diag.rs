//! Diagnostics: errors and warnings that point at a file, line and column, rendered the way
//! rustc shows them (the line, a caret under the place, what was expected).

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term;
use std::fmt;
use std::path::{Path, PathBuf};

/// Index of a source file in a [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// A byte range in one source file. Every AST node and graph node carries one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(file: FileId, start: usize, end: usize) -> Span {
        Span { file, start: start as u32, end: end as u32 }
    }

    /// The smallest span that covers both (same file assumed).
    pub fn to(self, other: Span) -> Span {
        Span { file: self.file, start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

/// The source files of one compilation: the spec and every spec it extends.
#[derive(Default)]
pub struct SourceMap {
    files: SimpleFiles<String, String>,
    paths: Vec<PathBuf>,
}

impl SourceMap {
    pub fn new() -> SourceMap {
        SourceMap::default()
    }

    pub fn add(&mut self, path: impl AsRef<Path>, source: String) -> FileId {
        let path = path.as_ref();
        self.paths.push(path.to_path_buf());
        FileId(self.files.add(path.display().to_string(), source) as u32)
    }

    pub fn source(&self, id: FileId) -> &str {
        self.files.get(id.0 as usize).map(|f| f.source().as_str()).unwrap_or("")
    }

    /// Every file, in the order added, as (path, text).
    pub fn files(&self) -> Vec<weft_runtime::run::SpecFile> {
        self.paths
            .iter()
            .enumerate()
            .map(|(i, p)| weft_runtime::run::SpecFile {
                path: p.display().to_string(),
                text: self.source(FileId(i as u32)).to_string(),
            })
            .collect()
    }

    pub fn path(&self, id: FileId) -> &Path {
        &self.paths[id.0 as usize]
    }

    pub fn find(&self, path: &Path) -> Option<FileId> {
        self.paths.iter().position(|p| p == path).map(|i| FileId(i as u32))
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, id: FileId, offset: u32) -> (usize, usize) {
        let src = self.source(id);
        let offset = (offset as usize).min(src.len());
        let before = &src[..floor_char_boundary(src, offset)];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    /// Where, and what to say under the caret.
    pub primary: Option<(Span, String)>,
    /// Other places that explain the error (a first definition, an inherited value).
    pub secondary: Vec<(Span, String)>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            primary: None,
            secondary: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn warning(message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(message) }
    }

    pub fn at(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.primary = Some((span, label.into()));
        self
    }

    pub fn also(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.secondary.push((span, label.into()));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    fn to_codespan(&self) -> CsDiagnostic<usize> {
        let mut d = match self.severity {
            Severity::Error => CsDiagnostic::error(),
            Severity::Warning => CsDiagnostic::warning(),
        }
        .with_message(&self.message);
        let mut labels = Vec::new();
        if let Some((span, label)) = &self.primary {
            labels
                .push(Label::primary(span.file.0 as usize, span.start as usize..span.end as usize).with_message(label));
        }
        for (span, label) in &self.secondary {
            labels.push(
                Label::secondary(span.file.0 as usize, span.start as usize..span.end as usize).with_message(label),
            );
        }
        d = d.with_labels(labels);
        d.with_notes(self.notes.clone())
    }
}

/// All diagnostics of one run, in the order found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.0.iter().filter(|d| d.is_error()).count()
    }

    /// Orders diagnostics by file and position (stable, so one place keeps its order).
    pub fn sort_by_place(&mut self) {
        self.0.sort_by_key(|d| d.primary.as_ref().map(|(s, _)| (s.file, s.start)));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }

    /// Plain text, as a terminal shows it.
    pub fn render(&self, sources: &SourceMap) -> String {
        let config = term::Config::default();
        let mut out = String::new();
        for d in &self.0 {
            match term::emit_into_string(&config, &sources.files, &d.to_codespan()) {
                Ok(s) => out.push_str(&s),
                // A span outside its file is a compiler bug; still say what went wrong.
                Err(_) => out.push_str(&format!("error: {}\n", d.message)),
            }
        }
        let errors = self.error_count();
        if errors > 0 {
            out.push_str(&format!("error: {} error{} found\n", errors, if errors == 1 { "" } else { "s" }));
        }
        out
    }

    pub fn eprint(&self, sources: &SourceMap) {
        eprint!("{}", self.render(sources));
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}
