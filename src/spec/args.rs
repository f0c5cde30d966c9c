//! Typed reading of `key = value` lists (model settings and layer arguments) with an error at
//! the value for every wrong type or range, and at the key for every unknown one.

use super::suggest::did_you_mean;
use crate::diag::{Diagnostic, Diagnostics, Span};
use crate::syntax::ast::{KeyValue, Value};

/// Every size in a spec is at most 2^24, so products of a few sizes cannot overflow.
pub const MAX_SIZE: u64 = 1 << 24;

/// Reads a list of `key = value`; call [`ArgReader::finish`] to report keys nobody asked for.
pub struct ArgReader<'a> {
    /// "model setting" or "parameter", for messages.
    what: &'static str,
    /// "" or " of `mamba`", after the key in messages.
    of: String,
    args: &'a [KeyValue],
    asked: Vec<&'static str>,
    /// Where to point when a required key is missing.
    owner: Span,
    pub diags: &'a mut Diagnostics,
}

impl<'a> ArgReader<'a> {
    pub fn new(what: &'static str, of: String, args: &'a [KeyValue], owner: Span, diags: &'a mut Diagnostics) -> Self {
        ArgReader { what, of, args, asked: Vec::new(), owner, diags }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a KeyValue> {
        self.asked.push(key);
        self.args.iter().rev().find(|kv| kv.key.value == key)
    }

    pub fn span_of(&self, key: &str) -> Option<Span> {
        self.args.iter().rev().find(|kv| kv.key.value == key).map(|kv| kv.value.span)
    }

    fn missing(&mut self, key: &str, hint: &str) {
        self.diags.push(
            Diagnostic::error(format!("missing {} `{key}`{}", self.what, self.of))
                .at(self.owner, format!("`{key}` is required here"))
                .note(hint.to_string()),
        );
    }

    fn wrong(&mut self, kv: &KeyValue, expected: &str) {
        self.diags.push(
            Diagnostic::error(format!("`{}` must be {expected}, found {}", kv.key.value, kv.value.value.describe()))
                .at(kv.value.span, format!("expected {expected}")),
        );
    }

    /// A whole number ≥ `min`; `default` None makes the key required.
    pub fn int(&mut self, key: &'static str, default: Option<u64>, min: u64, hint: &str) -> Option<u64> {
        let Some(kv) = self.get(key) else {
            if default.is_none() {
                self.missing(key, hint);
            }
            return default;
        };
        self.int_value(kv, min)
    }

    fn int_value(&mut self, kv: &KeyValue, min: u64) -> Option<u64> {
        if let Value::Number(text) = &kv.value.value {
            match parse_int(text) {
                Some(n) if n > MAX_SIZE => {
                    self.diags.push(
                        Diagnostic::error(format!(
                            "`{}` is {n}, larger than {MAX_SIZE}, the largest size weft accepts",
                            kv.key.value
                        ))
                        .at(kv.value.span, "too large"),
                    );
                    return None;
                }
                Some(n) if n >= min => return Some(n),
                _ => {}
            }
        }
        self.wrong(kv, &format!("a whole number ≥ {min}"));
        None
    }

    /// As [`int`](Self::int), at most `max`, `why` saying what sets the bound.
    pub fn int_at_most(
        &mut self,
        key: &'static str,
        default: Option<u64>,
        min: u64,
        max: u64,
        why: &str,
    ) -> Option<u64> {
        let n = self.int(key, default, min, "")?;
        if n > max {
            let at = self.get(key).map(|kv| kv.value.span).unwrap_or(self.owner);
            self.diags.push(
                Diagnostic::error(format!("`{key}` is {n}, more than {max}, the most weft's kernels take"))
                    .at(at, format!("at most {max}"))
                    .note(why.to_string()),
            );
            return None;
        }
        Some(n)
    }

    /// A finite number > 0.
    pub fn positive(&mut self, key: &'static str, default: f64) -> f64 {
        match self.get(key) {
            None => default,
            Some(kv) => self.positive_value(kv).unwrap_or(default),
        }
    }

    fn positive_value(&mut self, kv: &KeyValue) -> Option<f64> {
        match &kv.value.value {
            Value::Number(text) => match parse_float(text) {
                Some(x) if x > 0.0 && x.is_finite() => Some(x),
                _ => {
                    self.wrong(kv, "a positive number");
                    None
                }
            },
            _ => {
                self.wrong(kv, "a positive number");
                None
            }
        }
    }

    /// A whole number ≥ `min` or the word `word` (`window = full`); `Ok(None)` is the word.
    pub fn int_or_word(&mut self, key: &'static str, word: &str, default: Option<u64>, min: u64) -> Option<u64> {
        let Some(kv) = self.get(key) else {
            return default;
        };
        match &kv.value.value {
            Value::Name(n) if n == word => None,
            Value::Number(text) if parse_int(text).is_some_and(|n| n >= min) => self.int_value(kv, min).or(default),
            _ => {
                self.wrong(kv, &format!("a whole number ≥ {min} or `{word}`"));
                default
            }
        }
    }

    /// A positive number or the word `word` (`rope = none`).
    pub fn positive_or_word(&mut self, key: &'static str, word: &str, default: Option<f64>) -> Option<f64> {
        let Some(kv) = self.get(key) else {
            return default;
        };
        match &kv.value.value {
            Value::Name(n) if n == word => None,
            Value::Number(_) => self.positive_value(kv).or(default),
            _ => {
                self.wrong(kv, &format!("a positive number or `{word}`"));
                default
            }
        }
    }

    /// One of a fixed set of words.
    pub fn word(&mut self, key: &'static str, choices: &[&'static str], default: &'static str) -> &'static str {
        let Some(kv) = self.get(key) else {
            return default;
        };
        if let Value::Name(n) | Value::Str(n) = &kv.value.value {
            if let Some(c) = choices.iter().find(|c| *c == n) {
                return c;
            }
        }
        let list = choices.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(" or ");
        self.wrong(kv, &list);
        default
    }

    /// Reports every key that no reader asked for.
    pub fn finish(self) {
        let known = self.asked;
        for kv in self.args {
            let key = kv.key.value.as_str();
            if known.contains(&key) {
                continue;
            }
            let mut d = Diagnostic::error(format!("unknown {} `{key}`{}", self.what, self.of))
                .at(kv.key.span, "not a known key");
            if let Some(hint) = did_you_mean(key, known.iter().copied()) {
                d = d.note(hint);
            }
            let list = known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            self.diags.push(d.note(format!("known keys: {list}")));
        }
    }
}

/// Integers may use `_` separators; a fraction or exponent makes the number not an integer.
pub fn parse_int(text: &str) -> Option<u64> {
    let t = text.replace('_', "");
    if t.contains(['.', 'e', 'E']) {
        let x: f64 = t.parse().ok()?;
        if x.fract() == 0.0 && (0.0..9.0e15).contains(&x) {
            return Some(x as u64);
        }
        return None;
    }
    t.parse::<u64>().ok().filter(|n| *n < (1u64 << 63))
}

pub fn parse_float(text: &str) -> Option<f64> {
    text.replace('_', "").parse::<f64>().ok()
}
