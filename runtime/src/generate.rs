//! Generation: prefill a prompt, then decode token by token with each layer's state, sampling
//! greedily or with temperature and top-p.

use crate::backend::Backend;
use crate::cpu::tensor::Tensor;
use crate::data::Tokenizer;
use crate::plan::Plan;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Only the k most likely tokens are drawn from (0: no limit).
    pub top_k: usize,
    pub seed: u64,
}

/// The sampling settings of the Samba paper's downstream evaluations, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Greedy decoding (GSM8K, and the long-context summarisation tasks).
    Greedy,
    /// Nucleus sampling at temperature 0.2, top-p 0.95 (HumanEval).
    Humaneval,
    /// Temperature 0.01, top-p 0.95 (MBPP and SQuAD).
    Mbpp,
}

impl Preset {
    pub const NAMES: [&'static str; 3] = ["greedy", "humaneval", "mbpp"];

    pub fn from_name(name: &str) -> Option<Preset> {
        match name {
            "greedy" => Some(Preset::Greedy),
            "humaneval" => Some(Preset::Humaneval),
            "mbpp" => Some(Preset::Mbpp),
            _ => None,
        }
    }

    pub fn sampling(self, seed: u64) -> Sampling {
        let (temperature, top_p) = match self {
            Preset::Greedy => (0.0, 1.0),
            Preset::Humaneval => (0.2, 0.95),
            Preset::Mbpp => (0.01, 0.95),
        };
        Sampling { temperature, top_p, top_k: 0, seed }
    }
}

impl Sampling {
    /// From command-line flags: a named preset (see [`Preset`]) or the temperature and top-p
    /// given; checked.
    pub fn from_flags(
        temperature: f64,
        top_p: f64,
        top_k: usize,
        preset: Option<&str>,
        seed: u64,
    ) -> Result<Sampling, String> {
        let s = match preset {
            Some(name) => {
                let p = Preset::from_name(name)
                    .ok_or_else(|| format!("no sampling preset `{name}` (there are {})", Preset::NAMES.join(", ")))?;
                Sampling { top_k, ..p.sampling(seed) }
            }
            None => Sampling { temperature, top_p, top_k, seed },
        };
        s.validate()?;
        Ok(s)
    }

    /// A clear error for settings no draw can honour.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("the temperature must be finite and ≥ 0, not {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], not {}", self.top_p));
        }
        Ok(())
    }
}

/// Picks the next token from one row of logits; the draw for step `n` depends only on
/// (seed, n), so a generation is reproducible.
pub fn sample(logits: &[f32], s: &Sampling, n: u64) -> u32 {
    let argmax = || {
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &v)| (i as u32, ((v as f64 - m) / s.temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    // Most likely first, ties by id. Only the head of that order is ever read, so it is sorted
    // a growing prefix at a time (a whole vocabulary per token would cost milliseconds).
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let sort_head = |probs: &mut Vec<(u32, f64)>, k: usize| {
        if k < probs.len() {
            probs.select_nth_unstable_by(k, order);
        }
        probs[..k].sort_by(order);
    };
    let mut head = if s.top_k > 0 { s.top_k.min(probs.len()) } else { probs.len().min(256) };
    sort_head(&mut probs, head);
    if s.top_k > 0 && s.top_k < probs.len() {
        // top-p is then a share of the mass top-k leaves.
        probs.truncate(s.top_k);
        let kept: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= kept);
    }
    // The smallest prefix whose mass reaches top_p.
    let keep = loop {
        let mut mass = 0.0;
        let cut = probs[..head].iter().position(|p| {
            mass += p.1;
            mass >= s.top_p
        });
        match cut {
            Some(i) => break i + 1,
            None if head == probs.len() => break head,
            None => {
                head = (head * 4).min(probs.len());
                sort_head(&mut probs, head);
            }
        }
    };
    let kept = &probs[..keep];
    let z: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = crate::init::uniform(s.seed, "sampling", n, 0) * z;
    for p in kept {
        u -= p.1;
        if u <= 0.0 {
            return p.0;
        }
    }
    kept.last().map_or_else(argmax, |p| p.0)
}

/// The inputs of one decode step: every layer state taken out of `previous` (the prefill's
/// outputs; after the first step the backend carries them, and `previous` is empty), the next
/// token of each sequence (`batch × 1`), and each sequence's position where the plan reads
/// them (`positions`: one per sequence, or one for all).
pub fn decode_inputs(
    plan: &Plan,
    previous: &mut BTreeMap<String, Tensor<f32>>,
    tokens: Vec<i32>,
    positions: &[usize],
) -> Result<Vec<(String, Tensor<f32>)>, String> {
    let mut inputs = Vec::new();
    for name in state_names(plan) {
        if let Some(t) = previous.remove(&name) {
            inputs.push((name, t));
        }
    }
    let batch = tokens.len();
    inputs.push(("tokens".into(), Tensor::ints(vec![batch, 1], tokens)));
    if plan.inputs.iter().any(|(n, _)| n == "pos") {
        let pos: Vec<i32> = match positions {
            [one] => vec![*one as i32; batch],
            each if each.len() == batch => each.iter().map(|&p| p as i32).collect(),
            each => return Err(format!("{} positions for {batch} sequences", each.len())),
        };
        inputs.push(("pos".into(), Tensor::ints(vec![batch], pos)));
    }
    Ok(inputs)
}

/// Every layer state a plan reads (`state:…`), zero, for `batch` sequences: where generation
/// starts from nothing.
pub fn zero_states(plan: &Plan, batch: usize) -> Vec<(String, Tensor<f32>)> {
    plan.inputs
        .iter()
        .filter(|(n, _)| n.starts_with("state:"))
        .map(|(n, v)| {
            let shape: Vec<usize> = plan.values[*v as usize]
                .shape
                .0
                .iter()
                .map(|d| match d {
                    crate::shape::Dim::Fixed(k) => *k as usize,
                    _ => batch,
                })
                .collect();
            let len = shape.iter().product();
            (n.clone(), Tensor::real(shape, vec![0.0; len]))
        })
        .collect()
}

/// The layer states a decode plan reads and writes (`state:…`).
pub fn state_names(plan: &Plan) -> Vec<String> {
    plan.inputs.iter().map(|(n, _)| n).filter(|n| n.starts_with("state:")).cloned().collect()
}

/// Generates up to `max_new` tokens after `prompt` (one sequence), calling `on_token` with each
/// (which returns false to stop there); stops early at `stop`.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop: Option<u32>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>, String> {
    if prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    let vocab = backend.program().vocab().unwrap_or(0);
    let tokens: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let decode = backend.program().plan("decode").map_err(|e| e.0)?.clone();
    // The states stay in the backend from step to step (on the GPU's device), from the
    // prefill's straight into the decode plan's first row.
    let carried = state_names(&decode);
    let prompt_in = vec![("tokens".into(), Tensor::ints(vec![1, prompt.len()], tokens))];
    let mut out = backend.run_joining("prefill", prompt_in, &carried, "decode", 1, 0)?;
    let last_row = |out: &BTreeMap<String, Tensor<f32>>| -> Result<Vec<f32>, String> {
        let l = out.get("logits").and_then(|t| t.reals()).ok_or("the plan gave no logits")?;
        Ok(l[l.len() - vocab..].to_vec())
    };
    let mut generated = Vec::new();
    let mut next = sample(&last_row(&out)?, sampling, 0);
    for i in 0..max_new {
        generated.push(next);
        let go_on = on_token(next);
        if !go_on || Some(next) == stop || i + 1 == max_new {
            break;
        }
        let inputs = decode_inputs(&decode, &mut out, vec![next as i32], &[prompt.len() + i])?;
        out = backend.run_carried("decode", inputs, &carried)?;
        next = sample(&last_row(&out)?, sampling, i as u64 + 1);
    }
    Ok(generated)
}

/// What a user says about one generation, as both command lines take it.
#[derive(clap::Args, Clone, Debug)]
pub struct GenerateFlags {
    #[arg(long, default_value = "", conflicts_with_all = ["prompt_file", "prompts"])]
    pub prompt: String,
    /// Read the prompt from a file (`-`: standard input).
    #[arg(long, conflicts_with = "prompts")]
    pub prompt_file: Option<std::path::PathBuf>,
    /// Several prompts at once, one per line of this file (`-`: standard input), generated
    /// together in the run's `generate.batch` slots (more wait for a free one); prints a
    /// JSON line per prompt, in order. Prompt i samples with seed + i.
    #[arg(long)]
    pub prompts: Option<std::path::PathBuf>,
    /// Keep the end of a prompt longer than the context instead of refusing it.
    #[arg(long)]
    pub truncate_prompt: bool,
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=1 << 24))]
    pub max_new_tokens: u64,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Draw only from the k most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// The Samba paper's settings: `greedy` (GSM8K), `humaneval` (temperature 0.2, top-p
    /// 0.95), `mbpp` (temperature 0.01, top-p 0.95; also SQuAD).
    #[arg(long, conflicts_with_all = ["temperature", "top_p"], value_parser = clap::builder::PossibleValuesParser::new(Preset::NAMES))]
    pub preset: Option<String>,
    /// End the text where this appears (repeatable); the text stops before it.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl GenerateFlags {
    /// The prompt, the sampling and the options these flags give, checked.
    pub fn resolve(&self) -> Result<(String, Sampling, GenerateOptions), String> {
        let sampling =
            Sampling::from_flags(self.temperature, self.top_p, self.top_k, self.preset.as_deref(), self.seed)?;
        let prompt = match (&self.prompt_file, &self.prompts) {
            (Some(p), _) | (None, Some(p)) => crate::io::read_prompt(p)?,
            (None, None) => self.prompt.clone(),
        };
        let options = GenerateOptions {
            max_new: self.max_new_tokens as usize,
            truncate_prompt: self.truncate_prompt,
            stop: self.stop.clone(),
        };
        Ok((prompt, sampling, options))
    }
}

/// The prompts of `--prompts`: the lines of `text` (a trailing newline ends the last one; an
/// empty line is an empty prompt); none in an empty text.
pub fn prompt_lines(text: &str) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
    text.strip_suffix('\n').unwrap_or(text).split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()).collect()
}

/// One result of `--prompts` as a JSON line: its index, the prompt as kept, the new text.
pub fn json_line(index: usize, prompt: &str, text: &str) -> String {
    serde_json::json!({ "index": index, "prompt": prompt, "text": text }).to_string()
}

/// How a prompt is treated and how much is generated after it.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new: usize,
    /// Keep the end of a prompt longer than the context instead of refusing it.
    pub truncate_prompt: bool,
    /// Texts that end the generation where they appear (the text stops before them).
    pub stop: Vec<String>,
}

/// Generates text after `prompt` on `backend` (its parameters already in place), for a model
/// built for `context` tokens. `out` gets the prompt as kept (the whole prompt unless it was
/// truncated) with each piece of new text; returns the prompt as kept and the new text.
pub fn generate_text(
    backend: &mut dyn Backend,
    tokenizer: &Tokenizer,
    context: usize,
    prompt: &str,
    o: &GenerateOptions,
    sampling: &Sampling,
    mut out: impl FnMut(&str, &str),
) -> Result<(String, String), String> {
    let (ids, kept) = encode_prompt(tokenizer, context, prompt, o)?;
    let budget = context - ids.len();
    let mut stream = TextStream::new(tokenizer, &o.stop);
    generate(backend, &ids, o.max_new.min(budget), sampling, Some(tokenizer.eot()), |t| {
        let piece = stream.push(t);
        if !piece.is_empty() {
            out(&kept, &piece);
        }
        !stream.stopped()
    })?;
    let rest = stream.finish();
    if !rest.is_empty() {
        out(&kept, &rest);
    }
    Ok((kept, stream.text().to_string()))
}

/// The text of a growing token sequence as it can be shown piece by piece: whole characters
/// only (a trailing replacement character may be half of one, so it waits), cut before the
/// first stop string, and an end that may begin a stop string held back until it is known
/// not to.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    stops: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    shown: usize,
    stopped: bool,
    /// Stop strings count from the `min_tokens`-th token on (as vLLM's `min_tokens`).
    min_tokens: usize,
    /// Where stop strings are looked for, once they count: from just before the text of that
    /// token, so a stop string ending in it matches and none that ended earlier does.
    search_from: Option<usize>,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer, stops: &[String]) -> TextStream<'t> {
        TextStream::with_min_tokens(tokenizer, stops, 0)
    }

    /// Stop strings end the text only from the `min_tokens`-th token on.
    pub fn with_min_tokens(tokenizer: &'t Tokenizer, stops: &[String], min_tokens: usize) -> TextStream<'t> {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        TextStream {
            tokenizer,
            stops,
            tokens: Vec::new(),
            text: String::new(),
            shown: 0,
            stopped: false,
            min_tokens,
            search_from: (min_tokens == 0).then_some(0),
        }
    }

    /// Adds a token; returns the text it makes safe to show (often empty).
    pub fn push(&mut self, token: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.tokens.push(token);
        if self.search_from.is_none() && self.tokens.len() >= self.min_tokens {
            let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
            let mut from = self.text.len().saturating_sub(longest.saturating_sub(1));
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            self.search_from = Some(from);
        }
        // The whole continuation each time, so characters split across tokens come out whole.
        let Ok(text) = self.tokenizer.decode(&self.tokens) else { return String::new() };
        self.text = text;
        let stops: Vec<&str> = self.stops.iter().map(String::as_str).collect();
        let from = self.search_from.filter(|&f| self.text.is_char_boundary(f));
        let found = from.and_then(|f| stops.iter().filter_map(|s| self.text[f..].find(s).map(|i| f + i)).min());
        if let Some(at) = found {
            self.text.truncate(at);
            self.stopped = true;
            let n = self.text.len();
            return self.take(n);
        }
        let mut safe = self.text.len() - held_back(&self.text, &stops);
        if self.text[..safe].ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        self.take(safe)
    }

    /// Whether a stop string has appeared (the text ends before it).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The rest of the text, at the end of the sequence.
    pub fn finish(&mut self) -> String {
        let n = self.text.len();
        self.take(n)
    }

    /// The text so far (cut at a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, upto: usize) -> String {
        let t = &self.text;
        if upto <= self.shown || !t.is_char_boundary(self.shown) || !t.is_char_boundary(upto) {
            return String::new();
        }
        let piece = t[self.shown..upto].to_string();
        self.shown = upto;
        piece
    }
}

/// A prompt's tokens (the end-of-text token for an empty one, as after a document) and its
/// text as kept: refused past the context, or cut to its end with `truncate_prompt`.
fn encode_prompt(
    tokenizer: &Tokenizer,
    context: usize,
    prompt: &str,
    o: &GenerateOptions,
) -> Result<(Vec<u32>, String), String> {
    let mut ids = tokenizer.encode(prompt).map_err(|e| e.0)?;
    if ids.is_empty() {
        ids.push(tokenizer.eot());
    }
    let mut kept = prompt.to_string();
    if ids.len() >= context {
        if !o.truncate_prompt {
            return Err(format!(
                "the prompt is {} tokens, but this run's model was built for a context of {context} (train.seq_len + generate.max_new_tokens): shorten it, or pass --truncate-prompt to keep its last {} tokens",
                ids.len(),
                context - 1
            ));
        }
        ids.drain(..ids.len() + 1 - context);
        kept = tokenizer.decode(&ids).map_err(|e| e.0)?;
        eprintln!("warning: the prompt was cut to its last {} tokens (the run's context)", ids.len());
    }
    let budget = context - ids.len();
    if o.max_new > budget {
        eprintln!(
            "note: generating at most {budget} tokens: the prompt's {} and the new tokens share the run's context of {context}",
            ids.len()
        );
    }
    Ok((ids, kept))
}

/// [`generate_text`] for several prompts at once, through an [`Engine`] of `slots` sequences
/// (more prompts than slots wait for a free one). Prompt i samples with seed + i, so prompt 0
/// gives what [`generate_text`] gives it. Returns each prompt as kept and its new text, in
/// order.
///
/// [`Engine`]: crate::engine::Engine
#[allow(clippy::too_many_arguments)]
pub fn generate_texts(
    backend: &mut dyn Backend,
    tokenizer: &Tokenizer,
    context: usize,
    slots: usize,
    prompts: &[String],
    o: &GenerateOptions,
    sampling: &Sampling,
) -> Result<Vec<(String, String)>, String> {
    use crate::engine::{Engine, Event, Request};
    if prompts.is_empty() {
        return Err("no prompts: give one per line".into());
    }
    let mut engine = Engine::new(backend, slots, context)?;
    let mut kept = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (ids, k) = encode_prompt(tokenizer, context, p, o).map_err(|e| format!("prompt {}: {e}", i + 1))?;
        kept.push(k);
        let sampling = Sampling { seed: sampling.seed.wrapping_add(i as u64), ..sampling.clone() };
        let r = Request::new(ids, o.max_new, sampling, vec![tokenizer.eot()]);
        engine.submit(r).map_err(|e| format!("prompt {}: {e}", i + 1))?;
    }
    let mut streams: Vec<TextStream> = prompts.iter().map(|_| TextStream::new(tokenizer, &o.stop)).collect();
    while !engine.idle() {
        for e in engine.step()? {
            let Event::Token { id, token, .. } = e else { continue };
            if streams[id].stopped() {
                continue;
            }
            streams[id].push(token);
            if streams[id].stopped() {
                engine.cancel(id);
            }
        }
    }
    Ok(kept.into_iter().zip(streams.iter().map(|s| s.text().to_string())).collect())
}

/// The length of the longest end of `text` that begins some stop string (at a character
/// boundary).
fn held_back(text: &str, stops: &[&str]) -> usize {
    let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
    (1..longest.min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stops.iter().any(|s| s.starts_with(&text[text.len() - n..]))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_maximum_and_top_p_keeps_the_head() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 1 };
        assert_eq!(sample(&logits, &greedy, 0), 1);
        let narrow = Sampling { temperature: 1.0, top_p: 0.3, top_k: 0, seed: 1 };
        for n in 0..50 {
            assert_eq!(sample(&logits, &narrow, n), 1);
        }
        let wide = Sampling { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 1 };
        let picks: std::collections::HashSet<u32> = (0..200).map(|n| sample(&logits, &wide, n)).collect();
        assert!(picks.contains(&3) && picks.contains(&2));
        // top-k = 2 leaves the two largest, whatever top-p says; the draw is the same for the
        // same (seed, step).
        let two = Sampling { temperature: 1.0, top_p: 1.0, top_k: 2, seed: 1 };
        let picks: std::collections::HashSet<u32> = (0..200).map(|n| sample(&logits, &two, n)).collect();
        assert_eq!(picks, [1, 3].into_iter().collect());
        assert!((0..50).all(|n| sample(&logits, &two, n) == sample(&logits, &two, n)));
        // The paper's presets.
        assert_eq!(Preset::from_name("humaneval").unwrap().sampling(3).temperature, 0.2);
        assert_eq!(sample(&logits, &Preset::Greedy.sampling(9), 4), 1);
        assert!(Sampling { temperature: f64::NAN, top_p: 1.0, top_k: 0, seed: 0 }.validate().is_err());
        assert!(Sampling { temperature: 1.0, top_p: 0.0, top_k: 0, seed: 0 }.validate().is_err());
    }

    /// The draw as a plain definition: every token sorted, top-k, then the top-p prefix.
    fn sample_by_full_sort(logits: &[f32], s: &Sampling, n: u64) -> u32 {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &v)| (i as u32, ((v as f64 - m) / s.temperature).exp())).collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if s.top_k > 0 && s.top_k < probs.len() {
            probs.truncate(s.top_k);
            let kept: f64 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= kept);
        }
        let mut mass = 0.0;
        let keep = probs.iter().position(|p| {
            mass += p.1;
            mass >= s.top_p
        });
        let kept = &probs[..keep.map_or(probs.len(), |i| i + 1)];
        let z: f64 = kept.iter().map(|p| p.1).sum();
        let mut u = crate::init::uniform(s.seed, "sampling", n, 0) * z;
        for p in kept {
            u -= p.1;
            if u <= 0.0 {
                return p.0;
            }
        }
        kept.last().unwrap().0
    }

    /// Sorting only the head of the distribution draws exactly what sorting all of it draws:
    /// vocabularies past the first head of 256, peaked and flat rows (a flat one at top-p 0.95
    /// needs most of its tokens), ties, top-k below and above the head, top-p of 1.
    #[test]
    fn the_partial_sort_draws_what_the_full_sort_draws() {
        let mut x = 7u64;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        for (vocab, spread) in [(5, 4.0), (300, 8.0), (1000, 0.05), (4096, 12.0), (4096, 0.0)] {
            let logits: Vec<f32> = (0..vocab).map(|_| next() * spread).collect();
            for (t, p, k) in
                [(1.0, 0.95, 0), (0.2, 0.95, 0), (1.0, 1.0, 0), (2.0, 0.9, 40), (1.0, 0.5, 600), (0.7, 0.99, 3)]
            {
                let s = Sampling { temperature: t, top_p: p, top_k: k, seed: 11 };
                for n in 0..40 {
                    assert_eq!(
                        sample(&logits, &s, n),
                        sample_by_full_sort(&logits, &s, n),
                        "vocab {vocab}, spread {spread}, {s:?}, draw {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn prompts_are_lines() {
        assert_eq!(prompt_lines("a\nb c\n"), ["a", "b c"]);
        assert_eq!(prompt_lines("a\r\n\nz"), ["a", "", "z"]);
        assert_eq!(prompt_lines("\n"), [""]);
        assert!(prompt_lines("").is_empty());
    }

    #[test]
    fn text_that_may_begin_a_stop_string_is_held_back() {
        assert_eq!(held_back("the whale\n", &["\n\n"]), 1);
        assert_eq!(held_back("the whale", &["\n\n"]), 0);
        assert_eq!(held_back("abcEN", &["END", "x"]), 2);
        assert_eq!(held_back("é", &["éa"]), 2);
        assert_eq!(held_back("anything", &[]), 0);
    }
}
