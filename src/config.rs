//! Run settings: everything about a training or serving run that is not the architecture
//! (sequence length, batch, optimizer, schedule, data, checkpoints), read from TOML with serde.
//! Unknown keys, wrong types and out-of-range values are errors at their line and column.

use crate::diag::{Diagnostic, Diagnostics, FileId, SourceMap, Span};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The largest values run settings take: checked before anything is sized by them.
pub mod limits {
    /// Tokens per sequence (2^24, as every size in a spec).
    pub const SEQ_LEN: u64 = 1 << 24;
    /// Sequences per micro-batch, and micro-batches per step.
    pub const BATCH: u64 = 1 << 16;
    /// Tokens per micro-batch (batch_size × seq_len): 2^26.
    pub const TOKENS_PER_BATCH: u64 = 1 << 26;
    /// Sequences generated together (the serving engine's slots).
    pub const GEN_BATCH: u64 = 1 << 12;
    /// Optimizer steps, and every count of steps.
    pub const STEPS: u64 = 1 << 40;
    pub const EVAL_BATCHES: u64 = 1 << 20;
    /// Checkpoints kept.
    pub const KEEP: u64 = 1 << 10;
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// The architecture spec, relative to this file (a command-line spec wins).
    pub spec: Option<PathBuf>,
    pub train: Train,
    pub optimizer: Optimizer,
    pub data: Data,
    pub checkpoint: Checkpoint,
    pub generate: Generate,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Train {
    /// Tokens per training sequence (the reference: 4096, twice the window).
    pub seq_len: u64,
    /// Sequences per micro-batch.
    pub batch_size: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum: u64,
    pub steps: u64,
    pub seed: u64,
    pub log_every: u64,
    pub eval_every: u64,
    pub eval_batches: u64,
}

impl Default for Train {
    fn default() -> Self {
        Train {
            seq_len: 4096,
            batch_size: 8,
            grad_accum: 1,
            steps: 1000,
            seed: 3407,
            log_every: 10,
            eval_every: 100,
            eval_batches: 8,
        }
    }
}

/// AdamW with global-norm clipping, linear warm-up and cosine decay (reference 2.4).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Optimizer {
    pub lr: f64,
    /// The cosine schedule ends at `lr · min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Warm-up length as a fraction of all steps.
    pub warmup: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm limit; 0 turns clipping off.
    pub grad_clip: f64,
    /// The schedule's length in optimizer steps (default: `train.steps` as the file gives it).
    /// `weft train --steps` does not change it: training past it holds the minimum rate.
    pub schedule_steps: Option<u64>,
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer {
            lr: 4e-4,
            min_lr_ratio: 0.1,
            warmup: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            schedule_steps: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// UTF-8 text files, tokenized on the fly.
    #[default]
    Text,
    /// Token shards in weft's binary format.
    Tokens,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Data {
    pub train: Vec<PathBuf>,
    pub valid: Vec<PathBuf>,
    pub format: DataFormat,
    /// `byte`, `bpe` (a byte-level BPE trained on the training text with the model's
    /// vocabulary), or the path of a `tokenizer.json`.
    pub tokenizer: Option<String>,
    /// Share of the documents held out for evaluation when `valid` is empty.
    pub valid_fraction: f64,
}

impl Default for Data {
    fn default() -> Self {
        Data { train: Vec::new(), valid: Vec::new(), format: DataFormat::Text, tokenizer: None, valid_fraction: 0.05 }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Checkpoint {
    pub dir: Option<PathBuf>,
    /// Steps between checkpoints; 0 saves only at the end.
    pub every: u64,
    /// Checkpoints kept on disk.
    pub keep: u64,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint { dir: None, every: 0, keep: 2 }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Generate {
    pub max_new_tokens: u64,
    /// Sequences the generation plans take at once (prefill and each decode step).
    pub batch: u64,
    /// 0 is greedy decoding.
    pub temperature: f64,
    pub top_p: f64,
}

impl Default for Generate {
    fn default() -> Self {
        Generate { max_new_tokens: 200, batch: 1, temperature: 0.8, top_p: 0.95 }
    }
}

/// Reads and checks a run-settings file. Errors come with the file in a [`SourceMap`] so they
/// can be rendered at their line and column.
pub fn load(path: &Path) -> Result<RunConfig, (SourceMap, Diagnostics)> {
    let mut sources = SourceMap::new();
    let mut diags = Diagnostics::default();
    let src = match weft_runtime::io::read_text(path, weft_runtime::io::limits::SETTINGS, "run settings file") {
        Ok(s) => s,
        Err(e) => {
            diags.push(Diagnostic::error(e));
            return Err((sources, diags));
        }
    };
    let file = sources.add(path, src);
    match parse(sources.source(file), file) {
        Ok(c) => Ok(c),
        Err(d) => Err((sources, d)),
    }
}

/// Parses run settings from text already in a source map.
pub fn parse(src: &str, file: FileId) -> Result<RunConfig, Diagnostics> {
    let mut diags = Diagnostics::default();
    let config: RunConfig = match toml::from_str(src) {
        Ok(c) => c,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_string();
            diags.push(
                Diagnostic::error(format!("invalid run settings: {message}"))
                    .at(Span::new(file, span.start, span.end), first_line(&message)),
            );
            return Err(diags);
        }
    };
    let doc = toml::de::DeTable::parse(src).ok();
    let at = |path: &[&str]| -> Span {
        let r = doc.as_ref().and_then(|d| find(d.get_ref(), path)).unwrap_or(0..0);
        Span::new(file, r.start, r.end)
    };
    let mut check = |ok: bool, path: &[&str], what: &str| {
        if !ok {
            diags.push(
                Diagnostic::error(format!("`{}` must be {what}", path.join(".")))
                    .at(at(path), format!("expected {what}")),
            );
        }
    };
    let t = &config.train;
    let range = |v: u64, lo: u64, hi: u64| (lo..=hi).contains(&v);
    let between = |lo: u64, hi: u64| format!("between {lo} and {hi}");
    check(range(t.seq_len, 1, limits::SEQ_LEN), &["train", "seq_len"], &between(1, limits::SEQ_LEN));
    check(range(t.batch_size, 1, limits::BATCH), &["train", "batch_size"], &between(1, limits::BATCH));
    check(range(t.grad_accum, 1, limits::BATCH), &["train", "grad_accum"], &between(1, limits::BATCH));
    check(range(t.steps, 0, limits::STEPS), &["train", "steps"], &between(0, limits::STEPS));
    check(range(t.log_every, 1, limits::STEPS), &["train", "log_every"], &between(1, limits::STEPS));
    check(range(t.eval_every, 0, limits::STEPS), &["train", "eval_every"], &between(0, limits::STEPS));
    check(
        range(t.eval_batches, 1, limits::EVAL_BATCHES),
        &["train", "eval_batches"],
        &between(1, limits::EVAL_BATCHES),
    );
    // Only when both are in range: the product of two bad values has no meaning.
    if range(t.seq_len, 1, limits::SEQ_LEN) && range(t.batch_size, 1, limits::BATCH) {
        check(
            t.batch_size * t.seq_len <= limits::TOKENS_PER_BATCH,
            &["train", "batch_size"],
            &format!(
                "at most {} sequences of {} tokens (batch_size × seq_len is at most {} tokens per micro-batch)",
                limits::TOKENS_PER_BATCH / t.seq_len,
                t.seq_len,
                limits::TOKENS_PER_BATCH
            ),
        );
    }
    let o = &config.optimizer;
    check(o.lr > 0.0 && o.lr.is_finite(), &["optimizer", "lr"], "a positive number");
    check((0.0..=1.0).contains(&o.min_lr_ratio), &["optimizer", "min_lr_ratio"], "between 0 and 1");
    check((0.0..=1.0).contains(&o.warmup), &["optimizer", "warmup"], "a fraction between 0 and 1");
    check((0.0..1.0).contains(&o.beta1), &["optimizer", "beta1"], "in [0, 1)");
    check((0.0..1.0).contains(&o.beta2), &["optimizer", "beta2"], "in [0, 1)");
    check(o.eps > 0.0, &["optimizer", "eps"], "a positive number");
    check(o.weight_decay >= 0.0, &["optimizer", "weight_decay"], "zero or more");
    check(o.grad_clip >= 0.0, &["optimizer", "grad_clip"], "zero or more");
    check(
        o.schedule_steps.is_none_or(|n| range(n, 1, limits::STEPS)),
        &["optimizer", "schedule_steps"],
        &between(1, limits::STEPS),
    );
    let g = &config.generate;
    check(g.temperature >= 0.0 && g.temperature.is_finite(), &["generate", "temperature"], "zero or more");
    check(g.top_p > 0.0 && g.top_p <= 1.0, &["generate", "top_p"], "in (0, 1]");
    check(range(g.max_new_tokens, 0, limits::SEQ_LEN), &["generate", "max_new_tokens"], &between(0, limits::SEQ_LEN));
    check(range(g.batch, 1, limits::GEN_BATCH), &["generate", "batch"], &between(1, limits::GEN_BATCH));
    let prompt_tokens = g.batch.saturating_mul(config.train.seq_len.saturating_add(g.max_new_tokens));
    check(
        prompt_tokens <= limits::TOKENS_PER_BATCH,
        &["generate", "batch"],
        &format!(
            "at most {} sequences of train.seq_len + generate.max_new_tokens tokens (a prefill of {} tokens in all)",
            limits::TOKENS_PER_BATCH / config.train.seq_len.saturating_add(g.max_new_tokens).max(1),
            limits::TOKENS_PER_BATCH
        ),
    );
    let c = &config.checkpoint;
    check(range(c.keep, 1, limits::KEEP), &["checkpoint", "keep"], &between(1, limits::KEEP));
    check(range(c.every, 0, limits::STEPS), &["checkpoint", "every"], &between(0, limits::STEPS));
    check(
        c.dir.as_ref().is_none_or(|d| !d.as_os_str().is_empty()),
        &["checkpoint", "dir"],
        "a directory (an empty path would write beside the settings file)",
    );
    check(
        config.data.valid_fraction > 0.0 && config.data.valid_fraction < 1.0,
        &["data", "valid_fraction"],
        "a fraction between 0 and 1",
    );
    if diags.has_errors() {
        Err(diags)
    } else {
        Ok(config)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// The byte range of the value at `path` in a parsed TOML document.
fn find(table: &toml::de::DeTable, path: &[&str]) -> Option<std::ops::Range<usize>> {
    let (first, rest) = path.split_first()?;
    let (_, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *first)?;
    if rest.is_empty() {
        return Some(value.span());
    }
    find(value.get_ref().as_table()?, rest)
}

impl RunConfig {
    /// The learning-rate schedule's length: its own setting, else `train.steps`.
    pub fn schedule_steps(&self) -> u64 {
        self.optimizer.schedule_steps.unwrap_or(self.train.steps).max(1)
    }

    /// Fixes the schedule's length at what the file says, so that changing `train.steps`
    /// afterwards (`weft train --steps`) trains longer without changing the schedule.
    pub fn pin_schedule(&mut self) {
        self.optimizer.schedule_steps = Some(self.schedule_steps());
    }

    /// Makes every path in the settings relative to the settings file's directory.
    pub fn resolve_paths(&mut self, config_path: &Path) {
        let fix = |p: &mut PathBuf| *p = relative_to(config_path, p);
        if let Some(s) = &mut self.spec {
            fix(s);
        }
        self.data.train.iter_mut().for_each(fix);
        self.data.valid.iter_mut().for_each(fix);
        if let Some(d) = &mut self.checkpoint.dir {
            fix(d);
        }
        if let Some(t) = &mut self.data.tokenizer {
            if t != "byte" && t != "bpe" {
                *t = relative_to(config_path, Path::new(t)).display().to_string();
            }
        }
    }
}

fn relative_to(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}
