//! Expansion of `layers = ...`: names, groups with repetition, and Megatron-style pattern strings
//! (`"M-*-"` with each symbol bound to a layer definition), checked before anything is expanded
//! so that no input can make the expansion large.

use super::model::{LayerUse, MAX_LAYERS};
use super::suggest::did_you_mean;
use crate::diag::{Diagnostic, Diagnostics, Span};
use crate::syntax::ast::{Atom, Binding, Term};

/// Resolves names to definition indices and expands the sequence; `None` after reporting errors.
pub(super) fn expand(terms: &[Term], defs: &[&str], diags: &mut Diagnostics) -> Option<Vec<LayerUse>> {
    let before = diags.error_count();
    check_terms(terms, defs, diags);
    if diags.error_count() > before {
        return None;
    }
    let total = count_terms(terms);
    if total > MAX_LAYERS {
        let span = terms[0].span.to(terms[terms.len() - 1].span);
        diags.push(
            Diagnostic::error(format!("the layer sequence expands to more than {MAX_LAYERS} layers"))
                .at(span, if total == u64::MAX { "too many layers".to_string() } else { format!("{total} layers") }),
        );
        return None;
    }
    let mut out = Vec::with_capacity(total as usize);
    expand_terms(terms, defs, &mut out);
    if out.is_empty() {
        let span = terms.first().map(|t| t.span);
        let mut d = Diagnostic::error("the layer sequence is empty");
        if let Some(s) = span {
            d = d.at(s, "no layers here");
        }
        diags.push(d);
        return None;
    }
    Some(out)
}

/// What a pattern symbol means: a layer, or nothing (`|` marks a pipeline cut, spaces separate).
fn is_ignored(c: char) -> bool {
    c.is_whitespace() || c == '|'
}

fn check_terms(terms: &[Term], defs: &[&str], diags: &mut Diagnostics) {
    for term in terms {
        if let Some(r) = &term.repeat {
            if r.value == 0 {
                diags.push(Diagnostic::error("repetition count must be at least 1").at(r.span, "zero repetitions"));
            }
        }
        match &term.atom {
            Atom::Name(name) => check_name(&name.value, name.span, defs, diags),
            Atom::Group(inner) => check_terms(inner, defs, diags),
            Atom::Pattern { text, bindings } => {
                check_bindings(bindings, defs, diags);
                let mut used = vec![false; bindings.len()];
                for (i, c) in text.value.char_indices() {
                    if is_ignored(c) {
                        continue;
                    }
                    let at = Span::new(
                        text.span.file,
                        text.span.start as usize + 1 + i,
                        text.span.start as usize + 1 + i + c.len_utf8(),
                    );
                    if c == '/' {
                        diags.push(
                            Diagnostic::error("multi-token-prediction heads (`/`) are not supported")
                                .at(at, "remove the `/...` suffix"),
                        );
                        continue;
                    }
                    match bindings.iter().position(|b| b.symbol.value.chars().eq(std::iter::once(c))) {
                        Some(b) => used[b] = true,
                        None => {
                            let mut bound: Vec<String> = Vec::new();
                            for b in bindings {
                                let sym = format!("`{}`", b.symbol.value);
                                if !bound.contains(&sym) {
                                    bound.push(sym);
                                }
                            }
                            diags.push(
                                Diagnostic::error(format!("pattern symbol `{c}` has no layer bound to it"))
                                    .at(at, "unbound symbol")
                                    .note(format!(
                                        "bind it in the pattern, e.g. pattern(\"...\", \"{c}\" = some_layer)"
                                    ))
                                    .note(if bound.is_empty() {
                                        "no symbols are bound".to_string()
                                    } else {
                                        format!("bound symbols: {}", bound.join(", "))
                                    }),
                            );
                        }
                    }
                }
                for (i, (b, used)) in bindings.iter().zip(used).enumerate() {
                    let repeated = bindings[..i].iter().any(|p| p.symbol.value == b.symbol.value);
                    if !used && !repeated {
                        diags.push(
                            Diagnostic::warning(format!(
                                "symbol `{}` is bound but does not occur in the pattern",
                                b.symbol.value
                            ))
                            .at(b.symbol.span, "unused binding"),
                        );
                    }
                }
                if text.value.chars().all(is_ignored) {
                    diags.push(Diagnostic::error("the pattern string is empty").at(text.span, "no layers here"));
                }
            }
        }
    }
}

fn check_bindings(bindings: &[Binding], defs: &[&str], diags: &mut Diagnostics) {
    for (i, b) in bindings.iter().enumerate() {
        let sym = &b.symbol.value;
        if sym.chars().count() != 1 || sym.chars().all(is_ignored) || sym == "/" {
            diags.push(
                Diagnostic::error(format!("a pattern symbol is one character, found \"{sym}\""))
                    .at(b.symbol.span, "not a single symbol"),
            );
        }
        if let Some(first) = bindings[..i].iter().find(|p| p.symbol.value == *sym) {
            diags.push(
                Diagnostic::error(format!("symbol `{sym}` is bound twice"))
                    .at(b.symbol.span, "bound again here")
                    .also(first.symbol.span, "first bound here"),
            );
        }
        check_name(&b.layer.value, b.layer.span, defs, diags);
    }
}

fn check_name(name: &str, span: Span, defs: &[&str], diags: &mut Diagnostics) {
    if defs.contains(&name) {
        return;
    }
    let mut d = Diagnostic::error(format!("unknown layer `{name}`")).at(span, "no layer definition has this name");
    if let Some(hint) = did_you_mean(name, defs.iter().copied()) {
        d = d.note(hint);
    }
    d = d.note(if defs.is_empty() {
        "define one first, e.g. `layer mlp = swiglu(hidden = 4096)`".to_string()
    } else {
        format!("defined layers: {}", defs.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "))
    });
    diags.push(d);
}

/// Expanded length, saturating at `u64::MAX`.
fn count_terms(terms: &[Term]) -> u64 {
    terms.iter().fold(0u64, |acc, t| {
        let one = match &t.atom {
            Atom::Name(_) => 1,
            Atom::Group(inner) => count_terms(inner),
            Atom::Pattern { text, .. } => text.value.chars().filter(|c| !is_ignored(*c)).count() as u64,
        };
        acc.saturating_add(one.saturating_mul(t.repeat.as_ref().map_or(1, |r| r.value)))
    })
}

fn expand_terms(terms: &[Term], defs: &[&str], out: &mut Vec<LayerUse>) {
    for t in terms {
        for _ in 0..t.repeat.as_ref().map_or(1, |r| r.value) {
            match &t.atom {
                Atom::Name(name) => push(out, defs, &name.value, name.span),
                Atom::Group(inner) => expand_terms(inner, defs, out),
                Atom::Pattern { text, bindings } => {
                    for (i, c) in text.value.char_indices().filter(|(_, c)| !is_ignored(*c)) {
                        if let Some(b) = bindings.iter().find(|b| b.symbol.value.chars().eq(std::iter::once(c))) {
                            let start = text.span.start as usize + 1 + i;
                            push(out, defs, &b.layer.value, Span::new(text.span.file, start, start + c.len_utf8()));
                        }
                    }
                }
            }
        }
    }
}

fn push(out: &mut Vec<LayerUse>, defs: &[&str], name: &str, span: Span) {
    if let Some(def) = defs.iter().position(|d| *d == name) {
        out.push(LayerUse { def, span });
    }
}
