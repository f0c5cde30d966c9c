//! pest → syntax tree, one top-level item at a time so that every item's first syntax error is
//! reported, with limits on size, nesting and pest's call count.

use super::ast::*;
use crate::diag::{Diagnostic, Diagnostics, FileId, Span};
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::Parser;
use std::num::NonZeroUsize;
use std::sync::Once;

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/weft.pest"]
struct WeftParser;

/// Larger specs are refused before parsing: real ones are a few kilobytes.
pub const MAX_SOURCE_BYTES: usize = 1 << 20;
/// Brackets nest at most this deep; deeper input is refused before pest recurses into it.
pub const MAX_NESTING: usize = 32;
/// pest's bound on rule calls per parse, so no input can make it run for long.
const CALL_LIMIT: usize = 5_000_000;

static PEST_SETUP: Once = Once::new();

/// Parses one file. Returns the items that parsed and every syntax error found (the first of
/// each top-level item).
pub fn parse(src: &str, file: FileId) -> (File, Diagnostics) {
    PEST_SETUP.call_once(|| {
        pest::set_call_limit(NonZeroUsize::new(CALL_LIMIT));
        pest::set_error_detail(true);
    });
    let mut diags = Diagnostics::default();
    let mut out = File { id: file, items: Vec::new() };
    if src.len() > MAX_SOURCE_BYTES {
        diags.push(
            Diagnostic::error(format!("spec is {} bytes; the limit is {} bytes", src.len(), MAX_SOURCE_BYTES))
                .at(Span::new(file, 0, 0), "file starts here"),
        );
        return (out, diags);
    }
    if let Some(d) = check_nesting(src, file) {
        diags.push(d);
        return (out, diags);
    }
    let mut pos = 0;
    while pos < src.len() {
        let rest = &src[pos..];
        if WeftParser::parse(Rule::only_trivia, rest).is_ok() {
            break;
        }
        match WeftParser::parse(Rule::one_item, rest) {
            Ok(mut pairs) => {
                let Some(pair) = pairs.next() else { break };
                let end = pair.as_span().end();
                let mut b = Builder { file, base: pos, diags: &mut diags };
                if let Some(item) = b.item(pair) {
                    out.items.push(item);
                }
                pos += end.max(1);
            }
            Err(e) => {
                let at = error_position(&e);
                let mut d = syntax_error(&e, rest, pos, file);
                let item_start = skip_trivia(src, pos);
                let line_start = src[..pos + at].rfind('\n').map_or(0, |i| i + 1);
                let line_start = skip_trivia_inline(src, line_start);
                if line_start > item_start && starts_item(&src[line_start..]) {
                    d = d.note("this line starts a new item: is a `}`, `)` or `]` missing before it?");
                }
                diags.push(d);
                match next_item_start(src, item_start, pos + at) {
                    Some(next) => pos = next,
                    None => break,
                }
            }
        }
    }
    (out, diags)
}

/// Refuses input that nests brackets deeper than [`MAX_NESTING`], or opens a block comment it
/// never closes, before the recursive parser sees it.
fn check_nesting(src: &str, file: FileId) -> Option<Diagnostic> {
    let bytes = src.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let open = i;
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                if i + 1 >= bytes.len() {
                    // Said where it opens, not at the end of the file where the parser stops.
                    return Some(
                        Diagnostic::error("unterminated block comment")
                            .at(Span::new(file, open, open + 2), "this `/*` has no `*/`"),
                    );
                }
                i += 1;
            }
            b'[' | b'(' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(
                        Diagnostic::error(format!("brackets nest more than {MAX_NESTING} deep"))
                            .at(Span::new(file, i, i + 1), "too deep here"),
                    );
                }
            }
            b']' | b')' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The start of the next line, after `after`, that begins with a top-level keyword: where
/// parsing resumes after a syntax error.
fn next_item_start(src: &str, item_start: usize, error_at: usize) -> Option<usize> {
    let error_at = error_at.min(src.len());
    // Candidates are the lines from the error's own line on (a block missing its `}` fails at
    // the next item's keyword), never the failed item's first line.
    let mut line_start = src[..error_at].rfind('\n').map_or(0, |i| i + 1);
    loop {
        let start = skip_trivia_inline(src, line_start);
        if start > item_start && starts_item(&src[start..]) {
            return Some(start);
        }
        line_start += src[line_start..].find('\n')? + 1;
    }
}

fn skip_trivia_inline(src: &str, pos: usize) -> usize {
    pos + (src[pos..].len() - src[pos..].trim_start_matches([' ', '\t']).len())
}

/// The first position at or after `pos` that is not whitespace or a comment.
fn skip_trivia(src: &str, mut pos: usize) -> usize {
    let b = src.as_bytes();
    while pos < b.len() {
        match b[pos] {
            b' ' | b'\t' | b'\r' | b'\n' => pos += 1,
            b'#' => pos = src[pos..].find('\n').map_or(b.len(), |i| pos + i),
            b'/' if b.get(pos + 1) == Some(&b'/') => pos = src[pos..].find('\n').map_or(b.len(), |i| pos + i),
            b'/' if b.get(pos + 1) == Some(&b'*') => {
                pos = src[pos + 2..].find("*/").map_or(b.len(), |i| pos + 2 + i + 2)
            }
            _ => break,
        }
    }
    pos
}

fn starts_item(s: &str) -> bool {
    ["extends", "model", "layers", "layer"].iter().any(|kw| {
        s.starts_with(kw)
            && !s[kw.len()..].chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    })
}

/// Expected tokens worth naming in a message.
const PUNCTUATION_AND_KEYWORDS: &[&str] =
    &["{", "}", "(", ")", "[", "]", "=", ",", "extends", "model", "layer", "layers", "pattern", "x"];

fn rule_name(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::name => "a name",
        Rule::number | Rule::integer => "a number",
        Rule::string => "a string",
        Rule::extends | Rule::kw_extends => "`extends`",
        Rule::model | Rule::kw_model => "`model`",
        Rule::layer | Rule::kw_layer => "`layer`",
        Rule::layers | Rule::kw_layers => "`layers`",
        Rule::setting => "a setting `key = value`",
        Rule::arg => "a parameter `key = value`",
        Rule::define => "`=`",
        Rule::args | Rule::patch => "`(`",
        Rule::sequence | Rule::term => "a layer",
        Rule::group => "`[`",
        Rule::kw_pattern => "`pattern(`",
        Rule::repeat | Rule::repeat_op => "a repetition `x N`",
        Rule::binding | Rule::symbol | Rule::bare_symbol => "a binding `SYMBOL = layer`",
        Rule::EOI => "end of file",
        _ => return None,
    })
}

fn error_position(e: &pest::error::Error<Rule>) -> usize {
    let at = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    // The furthest token attempt is where the text stops making sense (after `d_state` in
    // `(d_state 16)`), which can lie past the failed rule's start.
    e.parse_attempts().map_or(at, |a| a.max_position.max(at))
}

fn syntax_error(e: &pest::error::Error<Rule>, rest: &str, base: usize, file: FileId) -> Diagnostic {
    let at = error_position(e);
    let mut expected: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !expected.contains(&s) {
            expected.push(s);
        }
    };
    match e.parse_attempts() {
        Some(attempts) => {
            for tok in attempts.expected_tokens() {
                let t = tok.to_string();
                // Characters inside names, numbers and comments are noise; rule names say it.
                if PUNCTUATION_AND_KEYWORDS.contains(&t.as_str()) {
                    push(format!("`{t}`"));
                }
            }
            for stack in attempts.call_stacks() {
                if let Some(n) = stack.deepest.get_rule().and_then(|r| rule_name(*r)) {
                    push(n.to_string());
                }
            }
        }
        None => {
            if let ErrorVariant::ParsingError { positives, .. } = &e.variant {
                for r in positives {
                    if let Some(n) = rule_name(*r) {
                        push(n.to_string());
                    }
                }
            }
        }
    }
    if let ErrorVariant::CustomError { message } = &e.variant {
        push(message.clone());
    }
    let found = found_token(rest, at);
    let len = if found == "end of file" { 0 } else { found_len(rest, at) };
    let message = if expected.is_empty() {
        format!("unexpected {found}")
    } else {
        format!("expected {}, found {found}", join_or(&expected))
    };
    Diagnostic::error(message).at(
        Span::new(file, base + at, base + at + len),
        if expected.is_empty() { "here".to_string() } else { format!("expected {}", join_or(&expected)) },
    )
}

fn found_len(rest: &str, at: usize) -> usize {
    let tail = &rest[at.min(rest.len())..];
    let word: usize = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').map(char::len_utf8).sum();
    if word > 0 {
        word
    } else {
        tail.chars().next().map_or(0, char::len_utf8)
    }
}

fn found_token(rest: &str, at: usize) -> String {
    let tail = &rest[at.min(rest.len())..];
    match tail.chars().next() {
        None => "end of file".to_string(),
        Some('\n') | Some('\r') => "end of line".to_string(),
        Some(_) => format!("`{}`", &tail[..found_len(rest, at)]),
    }
}

fn join_or(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {}", init.join(", "), last),
    }
}

/// Turns pest pairs into syntax-tree nodes, offsetting spans by where the item started.
struct Builder<'a> {
    file: FileId,
    base: usize,
    diags: &'a mut Diagnostics,
}

impl Builder<'_> {
    /// The pair's span without the whitespace pest may have consumed after it.
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        let len = p.as_str().trim_end().len();
        Span::new(self.file, self.base + s.start(), self.base + s.start() + len)
    }

    fn text(&self, p: &Pair<Rule>) -> Spanned<String> {
        Spanned::new(p.as_str().to_string(), self.span(p))
    }

    /// Children without the keyword tokens.
    fn children<'i>(p: Pair<'i, Rule>) -> impl Iterator<Item = Pair<'i, Rule>> {
        p.into_inner().filter(|c| {
            !matches!(
                c.as_rule(),
                Rule::kw_extends | Rule::kw_model | Rule::kw_layer | Rule::kw_layers | Rule::kw_pattern
            )
        })
    }

    fn item(&mut self, p: Pair<Rule>) -> Option<Item> {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::extends => {
                let s = Self::children(p).next()?;
                Some(Item::Extends(self.string(s)))
            }
            Rule::model => {
                let mut it = Self::children(p);
                let name = self.text(&it.next()?);
                let settings = it.map(|kv| self.key_value(kv)).collect();
                Some(Item::Model(ModelBlock { name, settings, span }))
            }
            Rule::layer => {
                let mut it = Self::children(p);
                let name = self.text(&it.next()?);
                let body = it.next()?;
                let body = match body.as_rule() {
                    Rule::define => {
                        let mut d = body.into_inner();
                        let kind = self.text(&d.next()?);
                        let args = d.next().map(|a| self.args(a)).unwrap_or_default();
                        LayerBody::Define { kind, args }
                    }
                    _ => LayerBody::Patch { args: self.args(body.into_inner().next()?) },
                };
                Some(Item::Layer(LayerItem { name, body, span }))
            }
            Rule::layers => {
                let seq = Self::children(p).next()?;
                Some(Item::Layers(LayersItem { terms: self.sequence(seq), span }))
            }
            _ => None,
        }
    }

    fn string(&self, p: Pair<Rule>) -> Spanned<String> {
        let span = self.span(&p);
        let body = p.into_inner().next().map(|b| b.as_str().to_string()).unwrap_or_default();
        Spanned::new(body, span)
    }

    fn args(&mut self, p: Pair<Rule>) -> Vec<KeyValue> {
        p.into_inner().map(|kv| self.key_value(kv)).collect()
    }

    fn key_value(&mut self, p: Pair<Rule>) -> KeyValue {
        let mut it = p.into_inner();
        let key = it.next().map(|k| self.text(&k));
        let value = it.next().map(|v| self.value(v));
        match (key, value) {
            (Some(key), Some(value)) => KeyValue { key, value },
            // The grammar guarantees both; keep going with an empty pair rather than panic.
            _ => {
                let span = Span::new(self.file, self.base, self.base);
                KeyValue {
                    key: Spanned::new(String::new(), span),
                    value: Spanned::new(Value::Name(String::new()), span),
                }
            }
        }
    }

    fn value(&self, p: Pair<Rule>) -> Spanned<Value> {
        let span = self.span(&p);
        let v = match p.as_rule() {
            Rule::number => Value::Number(p.as_str().to_string()),
            Rule::string => Value::Str(self.string(p).value),
            _ => Value::Name(p.as_str().to_string()),
        };
        Spanned::new(v, span)
    }

    fn sequence(&mut self, p: Pair<Rule>) -> Vec<Term> {
        p.into_inner().filter_map(|t| self.term(t)).collect()
    }

    fn term(&mut self, p: Pair<Rule>) -> Option<Term> {
        let span = self.span(&p);
        let mut it = p.into_inner();
        let atom_pair = it.next()?;
        let atom = match atom_pair.as_rule() {
            Rule::group => Atom::Group(self.sequence(atom_pair.into_inner().next()?)),
            Rule::pattern => {
                let mut pit = Self::children(atom_pair);
                let text = self.string(pit.next()?);
                let bindings = pit
                    .filter_map(|b| {
                        let mut bit = b.into_inner();
                        let sym = bit.next()?;
                        let sym_inner = sym.clone().into_inner().next()?;
                        let symbol = match sym_inner.as_rule() {
                            Rule::string => self.string(sym_inner),
                            _ => self.text(&sym),
                        };
                        let layer = self.text(&bit.next()?);
                        Some(Binding { symbol, layer })
                    })
                    .collect();
                Atom::Pattern { text, bindings }
            }
            _ => Atom::Name(self.text(&atom_pair)),
        };
        let repeat = match it.next() {
            Some(r) => {
                let num = r.into_inner().find(|c| c.as_rule() == Rule::integer)?;
                let span = self.span(&num);
                match num.as_str().replace('_', "").parse::<u64>() {
                    Ok(n) => Some(Spanned::new(n, span)),
                    Err(_) => {
                        self.diags.push(
                            Diagnostic::error("repetition count is too large").at(span, "does not fit in 64 bits"),
                        );
                        None
                    }
                }
            }
            None => None,
        };
        Some(Term { atom, repeat, span })
    }
}
