//! Reading spec files: `extends` chains, and merging a derived spec's items over its base.

use super::model::Model;
use super::resolve::resolve;
use super::suggest::did_you_mean;
use crate::diag::{Diagnostic, Diagnostics, FileId, SourceMap, Span};
use crate::syntax::ast::{Item, KeyValue, LayerBody, LayersItem, Spanned};
use crate::syntax::parse;
use std::path::{Path, PathBuf};

/// `extends` chains longer than this are refused.
const MAX_EXTENDS_DEPTH: usize = 16;

/// The outcome of loading a spec: its sources (for rendering diagnostics), the model if it is
/// valid, and every diagnostic found.
pub struct Loaded {
    pub sources: SourceMap,
    pub model: Option<Model>,
    pub diags: Diagnostics,
}

impl Loaded {
    /// The model, or the rendered diagnostics.
    pub fn into_result(self) -> Result<(Model, SourceMap, Diagnostics), (SourceMap, Diagnostics)> {
        match self.model {
            Some(m) if !self.diags.has_errors() => Ok((m, self.sources, self.diags)),
            _ => Err((self.sources, self.diags)),
        }
    }
}

/// A layer definition after inheritance, before its arguments are checked.
#[derive(Clone, Debug)]
pub(super) struct MergedDef {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    pub args: Vec<KeyValue>,
}

/// A spec after its `extends` chain is applied.
#[derive(Clone, Debug, Default)]
pub(super) struct Merged {
    pub name: Option<Spanned<String>>,
    pub model_span: Option<Span>,
    pub settings: Vec<KeyValue>,
    pub defs: Vec<MergedDef>,
    pub layers: Option<LayersItem>,
    /// The file the user named, for errors about the spec as a whole.
    pub root: Option<FileId>,
}

pub fn load_file(path: &Path) -> Loaded {
    match weft_runtime::io::read_text(path, weft_runtime::io::limits::SPEC, "spec") {
        Ok(src) => load_str(path, src),
        Err(e) => {
            let mut diags = Diagnostics::default();
            diags.push(Diagnostic::error(e));
            Loaded { sources: SourceMap::new(), model: None, diags }
        }
    }
}

/// Loads a spec from text; `extends` paths are relative to `path`'s directory.
pub fn load_str(path: &Path, src: String) -> Loaded {
    load_with(path, src, &Files::Disk)
}

/// Loads a spec whose every file is given (a run's recorded spec): `extends` resolves to the
/// given files by path, never to the disk, so edits made since do not leak in.
pub fn load_stored(files: &[(PathBuf, String)]) -> Loaded {
    let Some((root, text)) = files.first() else {
        let mut diags = Diagnostics::default();
        diags.push(Diagnostic::error("the recorded spec holds no file"));
        return Loaded { sources: SourceMap::new(), model: None, diags };
    };
    load_with(root, text.clone(), &Files::Stored(files))
}

/// Where `extends` reads a base spec from.
enum Files<'a> {
    Disk,
    Stored(&'a [(PathBuf, String)]),
}

impl Files<'_> {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        match self {
            Files::Disk => weft_runtime::io::read_text(path, weft_runtime::io::limits::SPEC, "base spec")
                .map_err(std::io::Error::other),
            Files::Stored(files) => files.iter().find(|(p, _)| p == path).map(|(_, t)| t.clone()).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "the recorded spec does not hold this file")
            }),
        }
    }

    /// The name a file is known by, for finding cycles.
    fn identity(&self, path: &Path) -> PathBuf {
        match self {
            Files::Disk => std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            Files::Stored(_) => path.to_path_buf(),
        }
    }
}

fn load_with(path: &Path, src: String, files: &Files) -> Loaded {
    let mut sources = SourceMap::new();
    let mut diags = Diagnostics::default();
    let mut stack = Vec::new();
    let merged = load_chain(path, src, files, &mut sources, &mut diags, &mut stack);
    // Semantic errors after a syntax error are mostly its echoes: report the syntax alone.
    let model = if diags.has_errors() { None } else { resolve(&merged, &mut diags) };
    diags.sort_by_place();
    Loaded { sources, model, diags }
}

fn load_chain(
    path: &Path,
    src: String,
    files: &Files,
    sources: &mut SourceMap,
    diags: &mut Diagnostics,
    stack: &mut Vec<PathBuf>,
) -> Merged {
    // A byte-order mark (as some editors write) is not part of the spec.
    let src = match src.strip_prefix('\u{FEFF}') {
        Some(rest) => rest.to_string(),
        None => src,
    };
    let file = sources.add(path, src);
    let (ast, syntax) = parse(sources.source(file), file);
    diags.extend(syntax);
    stack.push(files.identity(path));

    let mut merged = Merged { root: Some(file), ..Merged::default() };
    let mut seen_model: Option<Span> = None;
    let mut seen_layers: Option<Span> = None;
    let mut defined_here: Vec<(String, Span)> = Vec::new();
    for (i, item) in ast.items.iter().enumerate() {
        match item {
            Item::Extends(target) => {
                if i != 0 {
                    diags.push(
                        Diagnostic::error("`extends` must be the first item of a spec")
                            .at(target.span, "move this to the top of the file"),
                    );
                    continue;
                }
                if let Some(base) = load_base(path, target, files, sources, diags, stack) {
                    merged = Merged { root: Some(file), ..base };
                }
            }
            Item::Model(block) => {
                if let Some(first) = seen_model {
                    diags.push(
                        Diagnostic::error("a spec has one `model` block")
                            .at(block.name.span, "second `model` block")
                            .also(first, "first `model` block"),
                    );
                    continue;
                }
                seen_model = Some(block.name.span);
                merged.name = Some(block.name.clone());
                merged.model_span = Some(block.name.span);
                merge_args(&mut merged.settings, &block.settings, diags);
            }
            Item::Layer(layer) => {
                let name = &layer.name;
                if let Some((_, first)) = defined_here.iter().find(|(n, _)| *n == name.value) {
                    diags.push(
                        Diagnostic::error(format!("layer `{}` is defined twice", name.value))
                            .at(name.span, "defined again here")
                            .also(*first, "first defined here"),
                    );
                    continue;
                }
                defined_here.push((name.value.clone(), name.span));
                let existing = merged.defs.iter().position(|d| d.name.value == name.value);
                match (&layer.body, existing) {
                    (LayerBody::Define { kind, args }, _) => {
                        let mut fresh = Vec::new();
                        merge_args(&mut fresh, args, diags);
                        let def = MergedDef { name: name.clone(), kind: kind.clone(), args: fresh };
                        match existing {
                            Some(at) => merged.defs[at] = def,
                            None => merged.defs.push(def),
                        }
                    }
                    (LayerBody::Patch { args }, Some(at)) => {
                        let def = &mut merged.defs[at];
                        merge_args(&mut def.args, args, diags);
                        def.name.span = name.span;
                    }
                    (LayerBody::Patch { .. }, None) => {
                        let mut d = Diagnostic::error(format!("no layer `{}` to change", name.value))
                            .at(name.span, "not defined here or in a base spec")
                            .note(format!(
                                "`layer {}(...)` changes an inherited definition; define a new one with `layer {} = KIND(...)`",
                                name.value, name.value
                            ));
                        if let Some(hint) = did_you_mean(&name.value, merged.defs.iter().map(|d| d.name.value.as_str()))
                        {
                            d = d.note(hint);
                        }
                        diags.push(d);
                    }
                }
            }
            Item::Layers(layers) => {
                if let Some(first) = seen_layers {
                    diags.push(
                        Diagnostic::error("a spec has one `layers = ...` line")
                            .at(layers.span, "second `layers`")
                            .also(first, "first `layers`"),
                    );
                    continue;
                }
                seen_layers = Some(layers.span);
                merged.layers = Some(layers.clone());
            }
        }
    }
    stack.pop();
    merged
}

fn load_base(
    path: &Path,
    target: &Spanned<String>,
    files: &Files,
    sources: &mut SourceMap,
    diags: &mut Diagnostics,
    stack: &mut Vec<PathBuf>,
) -> Option<Merged> {
    let base_path = path.parent().unwrap_or(Path::new(".")).join(&target.value);
    if base_path.extension().is_none_or(|e| e != "weft") {
        // Only specs: a syntax error in any other file would show its first line.
        diags.push(
            Diagnostic::error(format!("`extends` names `{}`, which is not a .weft spec", target.value))
                .at(target.span, "extends takes a file ending in .weft"),
        );
        return None;
    }
    let canonical = files.identity(&base_path);
    if stack.contains(&canonical) {
        diags.push(
            Diagnostic::error(format!("`{}` extends itself", target.value))
                .at(target.span, "this closes a cycle of `extends`"),
        );
        return None;
    }
    if stack.len() >= MAX_EXTENDS_DEPTH {
        diags.push(
            Diagnostic::error(format!("`extends` chain deeper than {MAX_EXTENDS_DEPTH} files"))
                .at(target.span, "too deep"),
        );
        return None;
    }
    match files.read(&base_path) {
        Ok(src) => Some(load_chain(&base_path, src, files, sources, diags, stack)),
        Err(e) => {
            let msg = e.to_string();
            // Messages from bounded reads name the file already.
            let msg = if msg.contains(&base_path.display().to_string()) {
                msg
            } else {
                format!("cannot read base spec `{}`: {msg}", base_path.display())
            };
            diags.push(Diagnostic::error(msg).at(target.span, "named here"));
            None
        }
    }
}

/// Adds `new` over `base`: a key already in `base` is replaced in place; a key given twice in
/// `new` is an error.
fn merge_args(base: &mut Vec<KeyValue>, new: &[KeyValue], diags: &mut Diagnostics) {
    for (i, kv) in new.iter().enumerate() {
        if let Some(first) = new[..i].iter().find(|p| p.key.value == kv.key.value) {
            diags.push(
                Diagnostic::error(format!("`{}` is given twice", kv.key.value))
                    .at(kv.key.span, "given again here")
                    .also(first.key.span, "first given here"),
            );
            continue;
        }
        match base.iter_mut().find(|p| p.key.value == kv.key.value) {
            Some(slot) => *slot = kv.clone(),
            None => base.push(kv.clone()),
        }
    }
}
