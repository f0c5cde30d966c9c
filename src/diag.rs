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

/// The source files of one compilation: the spec and every spec it extends. Each is kept as read
/// (for parsing) and as shown (control and invisible characters replaced by visible ones of the
/// same byte length, so spans stay valid and nothing in a file can drive the terminal).
#[derive(Default)]
pub struct SourceMap {
    files: SimpleFiles<String, String>,
    originals: Vec<String>,
    paths: Vec<PathBuf>,
}

/// `s` with every control or invisible character (other than tab and a line's end) replaced by
/// a visible one of the same UTF-8 length: `?` (1 byte), `¿` (2), `�` (3), `�?` (4).
pub fn shown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let keep = c == '\t' || c == '\n' || (c == '\r' && chars.peek() == Some(&'\n'));
        if keep || !invisible(c) {
            out.push(c);
        } else {
            out.push_str(match c.len_utf8() {
                1 => "?",
                2 => "¿",
                3 => "\u{FFFD}",
                _ => "\u{FFFD}?",
            });
        }
    }
    out
}

/// Control characters, and format characters that change how text shows (byte-order mark,
/// bidirectional overrides, zero-width joiners).
fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// `s` with control and invisible characters written as escapes (`\u{1b}`), for messages that
/// quote what a user wrote.
pub fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if invisible(c) && c != '\n' && c != '\t' {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

impl SourceMap {
    pub fn new() -> SourceMap {
        SourceMap::default()
    }

    pub fn add(&mut self, path: impl AsRef<Path>, source: String) -> FileId {
        let path = path.as_ref();
        self.paths.push(path.to_path_buf());
        let id = self.files.add(escaped(&path.display().to_string()), shown(&source));
        self.originals.push(source);
        FileId(id as u32)
    }

    /// The file as read.
    pub fn source(&self, id: FileId) -> &str {
        self.originals.get(id.0 as usize).map(String::as_str).unwrap_or("")
    }

    /// The file as shown (see [`shown`]).
    fn shown_source(&self, id: FileId) -> &str {
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

/// Diagnostics shown of one run; the rest are counted.
pub const MAX_SHOWN: usize = 50;
/// Lines longer than this many characters are shown as a window around the caret.
pub const MAX_LINE: usize = 160;

impl Diagnostic {
    /// The same with control characters in every text written as escapes.
    fn escaped(&self) -> Diagnostic {
        Diagnostic {
            severity: self.severity,
            message: escaped(&self.message),
            primary: self.primary.as_ref().map(|(s, l)| (*s, escaped(l))),
            secondary: self.secondary.iter().map(|(s, l)| (*s, escaped(l))).collect(),
            notes: self.notes.iter().map(|n| escaped(n)).collect(),
        }
    }

    /// The rendering of a diagnostic whose primary line is longer than [`MAX_LINE`]: that line
    /// cut to a window around the caret (other places as notes); `None` for shorter lines.
    fn render_window(&self, sources: &SourceMap) -> Option<String> {
        let (span, label) = self.primary.as_ref()?;
        let src = sources.shown_source(span.file);
        let start = floor_char_boundary(src, (span.start as usize).min(src.len()));
        let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = src[start..].find('\n').map_or(src.len(), |i| start + i);
        let line = src[line_start..line_end].trim_end_matches('\r');
        if line.chars().count() <= MAX_LINE {
            return None;
        }
        let (ln, col) = sources.line_col(span.file, span.start);
        // The window: 60 characters before the caret, up to MAX_LINE in all.
        let before: Vec<char> = src[line_start..start].chars().collect();
        let from = before.len().saturating_sub(60);
        let width = (span.end.saturating_sub(span.start) as usize).clamp(1, MAX_LINE - 70);
        let shown: String = line.chars().skip(from).take(MAX_LINE - 10).collect();
        let cut_left = if from > 0 { "…" } else { "" };
        let cut_right = if from + shown.chars().count() < line.chars().count() { "…" } else { "" };
        let stop = floor_char_boundary(src, (start + width).min(line_end)).max(start);
        let carets = src[start..stop].chars().count().max(1);
        let pad = before.len() - from + cut_left.chars().count();
        let gutter = " ".repeat(ln.to_string().len());
        let kind = if self.is_error() { "error" } else { "warning" };
        let mut s = format!("{kind}: {}\n", self.message);
        s += &format!(
            "{gutter} ┌─ {}:{ln}:{col}\n{gutter} │\n",
            escaped(&sources.path(span.file).display().to_string())
        );
        s += &format!("{ln} │ {cut_left}{shown}{cut_right}\n");
        s += &format!("{gutter} │ {}{} {label}\n{gutter} │\n", " ".repeat(pad), "^".repeat(carets));
        for (sp, l) in &self.secondary {
            let (sl, sc) = sources.line_col(sp.file, sp.start);
            s += &format!("{gutter} = also {}:{sl}:{sc}: {l}\n", escaped(&sources.path(sp.file).display().to_string()));
        }
        for n in &self.notes {
            s += &format!("{gutter} = {n}\n");
        }
        s.push('\n');
        Some(s)
    }

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

    /// Plain text, as a terminal shows it: at most [`MAX_SHOWN`] diagnostics (then how many
    /// more), a line longer than [`MAX_LINE`] characters cut to a window around the caret, and
    /// nothing a user wrote able to drive the terminal.
    pub fn render(&self, sources: &SourceMap) -> String {
        let config = term::Config::default();
        let mut out = String::new();
        for d in self.0.iter().take(MAX_SHOWN) {
            let d = d.escaped();
            if let Some(s) = d.render_window(sources) {
                out.push_str(&s);
                continue;
            }
            match term::emit_into_string(&config, &sources.files, &d.to_codespan()) {
                Ok(s) => out.push_str(&s),
                // A span outside its file is a compiler bug; still say what went wrong.
                Err(_) => out.push_str(&format!("error: {}\n", d.message)),
            }
        }
        if self.0.len() > MAX_SHOWN {
            let rest = &self.0[MAX_SHOWN..];
            let errors = rest.iter().filter(|d| d.is_error()).count();
            out.push_str(&format!(
                "note: {} more diagnostics not shown ({errors} errors, {} warnings)\n",
                rest.len(),
                rest.len() - errors
            ));
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
