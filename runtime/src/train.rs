//! The training loop: micro-batches accumulated into each AdamW step, held-out evaluation,
//! metrics as JSON lines, a progress bar, a loss curve, and checkpoints from which a killed run
//! resumes with exactly the losses an uninterrupted run would have had.

use crate::backend::Backend;
use crate::checkpoint::{self, RunState};
use crate::cpu::tensor::Tensor;
use crate::data::Windows;
use crate::plan::Program;
use crate::run::{AcceptedChange, InitFrom, RunInfo};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Train until this many optimizer steps are done (the schedule's length is a setting of
    /// the run, which this does not change).
    pub steps: u64,
    pub log_every: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Where `run.json`, checkpoints, metrics and the loss curve go.
    pub out_dir: PathBuf,
    /// Steps between checkpoints; 0 saves only at the end.
    pub checkpoint_every: u64,
    pub keep: usize,
    pub progress: bool,
    /// The run's identity (written to `run.json`); seed, batch, sequence length and gradient
    /// accumulation come from its settings.
    pub run: RunInfo,
    /// Resume even though the spec, settings or tokenizer differ from the checkpoint's (the
    /// change is recorded in `run.json`).
    pub accept_changes: bool,
    /// Start from another run's newest parameters, with fresh optimizer state and schedule.
    pub init_from: Option<PathBuf>,
    /// The `tokenizer.json` text to keep in the run directory (`run.tokenizer` names it and
    /// `run.tokenizer_hash` is its hash), written once the run is known to be this one.
    pub tokenizer_json: Option<String>,
}

impl TrainOptions {
    fn seed(&self) -> u64 {
        self.run.settings.seed
    }
    fn batch_size(&self) -> usize {
        self.run.settings.batch_size as usize
    }
    fn seq_len(&self) -> usize {
        self.run.settings.seq_len as usize
    }
    fn grad_accum(&self) -> usize {
        self.run.settings.grad_accum as usize
    }
}

/// A training run of a bundle on token shards (`weft-run train`).
#[derive(Clone, Debug)]
pub struct ShardRun {
    pub train: Vec<PathBuf>,
    pub valid: Vec<PathBuf>,
    /// `byte`, or the tokenizer.json the shards were made with.
    pub tokenizer: String,
    pub out: PathBuf,
    /// Default: the schedule's length.
    pub steps: Option<u64>,
    pub log_every: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub checkpoint_every: u64,
    pub keep: usize,
    pub accept_changes: bool,
    pub init_from: Option<PathBuf>,
    /// Instead of shards: this many generated passkey examples of the training length (keys
    /// from the run's seed), the loss on each answer alone; 64 more, of another seed, held out.
    pub passkey: Option<usize>,
}

/// The options and data [`train`] takes for a [`ShardRun`]: the run's identity is the spec and
/// settings the bundle records, so the run directory is one `weft train` would write.
pub fn shard_run(bundle: &crate::bundle::Bundle, r: &ShardRun) -> Result<(TrainOptions, Windows, Windows), String> {
    use crate::data::corpus::load_shards;
    use crate::data::Tokenizer;
    use crate::run::sha256;
    let source = bundle
        .source
        .clone()
        .ok_or("the bundle records no spec and settings (built by an older weft): rebuild it with `weft build`")?;
    let shape = bundle.plans.get("train_step").ok_or("the bundle has no training step")?.0;
    let mut settings = source.settings.clone();
    if (settings.batch_size, settings.seq_len) != (shape.batch, shape.seq) {
        return Err(format!(
            "the training step is planned for {} x {} tokens but the recorded settings say {} x {}: the bundle is inconsistent",
            shape.batch, shape.seq, settings.batch_size, settings.seq_len
        ));
    }
    let vocab = crate::cuda::bench::vocab(&bundle.program);
    let (tok, json) = if r.tokenizer == "byte" {
        (Tokenizer::Bytes, None)
    } else {
        let json = crate::io::read_text(Path::new(&r.tokenizer), crate::io::limits::TOKENIZER, "tokenizer")?;
        (Tokenizer::from_json(&json).map_err(|e| format!("`{}`: {}", r.tokenizer, e.0))?, Some(json))
    };
    if tok.vocab_size() > vocab {
        return Err(format!("the tokenizer has {} tokens but the model's vocabulary is {vocab}", tok.vocab_size()));
    }
    settings.tokenizer = if json.is_some() { "file" } else { "byte" }.to_string();
    settings.data_format = "tokens".to_string();
    let load = |files: &[PathBuf], what: &str| -> Result<Windows, String> {
        let tokens = load_shards(files, vocab).map_err(|e| e.0)?;
        Windows::new(tokens, shape.seq as usize, Path::new(what)).map_err(|e| e.0)
    };
    let (train_w, valid_w) = match r.passkey {
        None => (load(&r.train, "the training shards")?, load(&r.valid, "the held-out shards")?),
        Some(n) => {
            settings.data_format = "passkey".to_string();
            let seq = shape.seq as usize;
            let make = |count: usize, seed: u64, what: &str| -> Result<Windows, String> {
                let (tokens, mask) = crate::passkey::tuning_stream(&tok, seq, count, seed)?;
                Windows::masked(tokens, mask, seq, Path::new(what)).map_err(|e| e.0)
            };
            (
                make(n, settings.seed, "the passkey examples")?,
                make(64, settings.seed ^ 0x9e37_79b9, "the held-out passkey examples")?,
            )
        }
    };
    let info = RunInfo::new(
        &bundle.program.model,
        source.spec.clone(),
        settings.clone(),
        if json.is_some() { "tokenizer.json" } else { "byte" }.to_string(),
        json.as_deref().map(|j| sha256(j.as_bytes())),
        source.max_context,
    );
    let opts = TrainOptions {
        steps: r.steps.unwrap_or(settings.schedule_steps),
        log_every: r.log_every,
        eval_every: r.eval_every,
        eval_batches: r.eval_batches,
        out_dir: r.out.clone(),
        checkpoint_every: r.checkpoint_every,
        keep: r.keep,
        progress: false,
        run: info,
        accept_changes: r.accept_changes,
        init_from: r.init_from.clone(),
        tokenizer_json: json,
    };
    Ok((opts, train_w, valid_w))
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_ppl: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub first_step: u64,
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub checkpoint: Option<PathBuf>,
}

fn scalar(out: &std::collections::BTreeMap<String, Tensor<f32>>, name: &str) -> Result<f64, String> {
    out.get(name).and_then(|t| t.item()).map(f64::from).ok_or_else(|| format!("the plan gave no scalar `{name}`"))
}

fn batch_inputs(x: Vec<i32>, y: Vec<i32>, b: usize, t: usize) -> Vec<(String, Tensor<f32>)> {
    vec![("tokens".into(), Tensor::ints(vec![b, t], x)), ("targets".into(), Tensor::ints(vec![b, t], y))]
}

/// Mean loss per token over the first `batches · batch` held-out windows (all of them if there
/// are fewer), in order. Every call has the full batch (plans with a loss run at one shape): a
/// last batch with fewer windows is padded with rows that have no targets, which add no loss.
pub fn evaluate(
    backend: &mut dyn Backend,
    valid: &Windows,
    batch: usize,
    seq: usize,
    batches: usize,
) -> Result<f64, String> {
    let n = (batches * batch).min(valid.count());
    if n == 0 {
        return Err("there is no held-out window to evaluate".into());
    }
    let (mut total, mut counted) = (0.0, 0usize);
    let mut done = 0;
    while done < n {
        let b = batch.min(n - done);
        let mut x = Vec::with_capacity(batch * seq);
        let mut y = Vec::with_capacity(batch * seq);
        for i in done..done + b {
            let (inp, tgt) = valid.masked_window(i);
            x.extend(inp);
            y.extend(tgt);
        }
        x.resize(batch * seq, 0);
        y.resize(batch * seq, crate::cpu::dense::NO_TARGET);
        // The plan's loss is the mean over the positions with a target (all b·seq of them,
        // or those a loss mask keeps).
        let with_target = y.iter().filter(|&&t| t >= 0).count();
        let out = backend.run("eval", batch_inputs(x, y, batch, seq))?;
        if with_target > 0 {
            total += scalar(&out, "loss")? * with_target as f64;
            counted += with_target;
        }
        done += b;
    }
    if counted == 0 {
        return Err("no held-out window has a target the loss counts".into());
    }
    Ok(total / counted as f64)
}

fn metrics_path(dir: &Path) -> PathBuf {
    dir.join("metrics.jsonl")
}

/// Keeps the metrics of steps up to `step` (a resumed run rewrites what came after).
fn truncate_metrics(dir: &Path, step: u64) -> Result<Vec<Record>, String> {
    let path = metrics_path(dir);
    let text = if path.exists() {
        // Lossy: a line cut inside a character is one damaged line, not an unreadable file.
        String::from_utf8_lossy(&crate::io::read_bounded(&path, crate::io::limits::METRICS, "metrics file")?)
            .into_owned()
    } else {
        String::new()
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut kept: Vec<Record> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Record>(line) {
            Ok(r) if r.step <= step => kept.push(r),
            Ok(_) => {}
            // A run killed while appending leaves a cut last line: only that line is lost.
            Err(e) => eprintln!(
                "warning: `{}` line {} is damaged ({e}); it is dropped{}",
                path.display(),
                i + 1,
                if i + 1 == lines.len() { " (a run stopped while writing it)" } else { "" }
            ),
        }
    }
    let mut out = String::new();
    for r in &kept {
        out.push_str(&serde_json::to_string(r).map_err(|e| e.to_string())?);
        out.push('\n');
    }
    std::fs::write(&path, out).map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
    Ok(kept)
}

fn append(file: &mut std::fs::File, r: &Record) -> Result<(), String> {
    let line = serde_json::to_string(r).map_err(|e| e.to_string())?;
    writeln!(file, "{line}").map_err(|e| format!("cannot write metrics: {e}"))
}

/// The step to start from: the newest checkpoint's (its tensors written into the backend) if
/// the run directory has one and it is the same run, else 0 (from another run's parameters with
/// `init_from`). Writes `run.json` when `write` (rank 0 of a data-parallel run).
/// `full` is the whole program where the backend holds a share of the optimizer state (it keeps
/// its own share of a checkpoint).
fn start(backend: &mut dyn Backend, o: &TrainOptions, write: bool, full: Option<&Program>) -> Result<u64, String> {
    let program = full.cloned().unwrap_or_else(|| backend.program().clone());
    let held: std::collections::BTreeSet<String> = {
        let p = backend.program();
        p.params.iter().map(|x| x.name.clone()).chain(p.states.iter().map(|x| x.name.clone())).collect()
    };
    let mut info = o.run.clone();
    let previous = RunInfo::read(&o.out_dir)?;
    let keep_tokenizer = |info: &RunInfo| -> Result<(), String> {
        if !write {
            return Ok(());
        }
        if let Some(json) = &o.tokenizer_json {
            crate::checkpoint::write_atomic(&o.out_dir.join(&info.tokenizer), json.as_bytes()).map_err(|e| e.0)?;
        }
        info.write(&o.out_dir)
    };
    if let Some(ckpt) = checkpoint::latest(&o.out_dir).map_err(|e| e.0)? {
        // The identity first: a different run is refused before its tensors are read.
        let state = checkpoint::read_state(&ckpt).map_err(|e| e.0)?;
        if state.model != program.model {
            return Err(format!(
                "`{}` is a checkpoint of model `{}`, not `{}`: train into another directory",
                ckpt.display(),
                state.model,
                program.model
            ));
        }
        let Some(identity) = state.identity() else {
            return Err(format!(
                "`{}` was written by an older weft and records no run identity, so it cannot resume: start a new run directory with --init-from {} to keep its parameters",
                ckpt.display(),
                o.out_dir.display()
            ));
        };
        let changes = info.changes_from(&identity, previous.as_ref());
        if !changes.is_empty() {
            if !o.accept_changes {
                return Err(format!(
                    "`{}` was trained under another {}: {}. Resuming would continue it as a different run; restore them, train into a new directory (--init-from {} starts from its parameters), or pass --accept-changes to resume anyway (recorded in run.json)",
                    o.out_dir.display(),
                    if changes.len() == 1 { "setting" } else { "set of settings" },
                    changes.join("; "),
                    o.out_dir.display()
                ));
            }
            if write {
                eprintln!("warning: resuming `{}` with changes: {}", o.out_dir.display(), changes.join("; "));
            }
            if let Some(p) = &previous {
                info.accepted_changes = p.accepted_changes.clone();
                info.init_from = p.init_from.clone();
            }
            info.accepted_changes.push(AcceptedChange { step: state.step, what: changes });
        } else if let Some(p) = &previous {
            info.accepted_changes = p.accepted_changes.clone();
            info.init_from = p.init_from.clone();
        }
        let (state, mut tensors) = checkpoint::load(&ckpt, &program).map_err(|e| e.0)?;
        tensors.retain(|n, _| held.contains(n));
        backend.write(tensors)?;
        keep_tokenizer(&info)?;
        if o.init_from.is_some() && write {
            eprintln!("note: --init-from is ignored: `{}` resumes from its own checkpoint", o.out_dir.display());
        }
        return Ok(state.step);
    }
    if let Some(from) = &o.init_from {
        let ckpt = checkpoint::latest(from)
            .map_err(|e| e.0)?
            .ok_or_else(|| format!("--init-from `{}`: the run has no checkpoint", from.display()))?;
        let (state, params) = checkpoint::load_params(&ckpt, &program)
            .map_err(|e| format!("--init-from `{}`: {}", from.display(), e.0))?;
        backend.write(params)?;
        info.init_from = Some(InitFrom {
            run: std::fs::canonicalize(from).unwrap_or_else(|_| from.clone()),
            checkpoint: ckpt.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            step: state.step,
            spec_hash: state.spec_hash.clone(),
        });
        if write {
            eprintln!(
                "starting from the parameters of `{}` (step {}), with a fresh optimizer",
                ckpt.display(),
                state.step
            );
        }
    }
    keep_tokenizer(&info)?;
    Ok(0)
}

/// Trains until `steps` optimizer steps are done, resuming from the newest checkpoint in
/// `out_dir` if there is one (and it is the same run: see [`crate::run`]).
pub fn train(backend: &mut dyn Backend, train: &Windows, valid: &Windows, o: &TrainOptions) -> Result<Summary, String> {
    train_ranked(backend, train, valid, o, &crate::collective::Solo, None)
}

/// [`train`] as one rank of a data-parallel group: the step's `grad_accum` micro-batches are
/// shared out among the ranks in order (rank r takes the r-th share, so the data each step reads
/// is the same whatever the number of ranks), the ranks' gradients and losses are summed in rank
/// order, and every rank takes the same optimizer step. Rank 0 alone writes the run directory
/// (run.json, metrics, checkpoints), evaluates and reports. One micro-batch per rank gives
/// losses and parameters bit-identical to one process accumulating them all.
///
/// With `zero`, the backend holds this rank's share of the optimizer state (see
/// [`crate::zero`]): after each step the ranks exchange their updated parameters, and at each
/// checkpoint rank 0 gathers every share.
pub fn train_ranked(
    backend: &mut dyn Backend,
    train: &Windows,
    valid: &Windows,
    o: &TrainOptions,
    group: &dyn crate::collective::Collective,
    zero: Option<&crate::zero::Shards>,
) -> Result<Summary, String> {
    let (rank, world) = (group.rank(), group.world());
    let lead = rank == 0;
    let (batch_size, seq_len, grad_accum, seed) = (o.batch_size(), o.seq_len(), o.grad_accum(), o.seed());
    if world == 0 || grad_accum % world != 0 {
        return Err(format!(
            "{world} ranks cannot share {grad_accum} micro-batches per step: make train.grad_accum a multiple of the number of ranks"
        ));
    }
    let share = grad_accum / world;
    if lead {
        std::fs::create_dir_all(&o.out_dir).map_err(|e| format!("cannot create `{}`: {e}", o.out_dir.display()))?;
    }
    if zero.is_some_and(|z| z.world() != world) {
        return Err(format!("the optimizer state is sharded for another number of ranks than {world}"));
    }
    let program = zero.map_or_else(|| backend.program().clone(), |z| z.full().clone());
    let first_step = start(backend, o, lead, zero.map(|z| z.full()))?;
    if world > 1 {
        // Equal on every rank exactly when the sum is world·s and the sum of squares world·s².
        let s = first_step as f64;
        let mut v = [s, s * s];
        group.all_reduce_f64(&mut v)?;
        if v != [world as f64 * s, world as f64 * s * s] {
            return Err(format!(
                "the ranks would start from different steps (rank {rank} from step {first_step}): every rank needs the same run directory `{}` (one machine, or a shared file system)",
                o.out_dir.display()
            ));
        }
    }
    let mut history = if lead { truncate_metrics(&o.out_dir, first_step)? } else { Vec::new() };
    let mut metrics = match lead {
        true => Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(metrics_path(&o.out_dir))
                .map_err(|e| format!("cannot open metrics: {e}"))?,
        ),
        false => None,
    };

    let bar = if o.progress && lead { ProgressBar::new(o.steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(first_step);
    let tokens_per_step = (batch_size * seq_len * grad_accum) as f64;
    let started = Instant::now();
    let mut last =
        Summary { first_step, steps: o.steps, final_loss: None, eval_loss: None, tokens_per_s: 0.0, checkpoint: None };
    let scale = Tensor::scalar(1.0 / grad_accum as f32);
    for step in first_step..o.steps {
        let t0 = Instant::now();
        let mut loss = 0.0;
        for micro in rank * share..(rank + 1) * share {
            let first = (step * grad_accum as u64 + micro as u64) * batch_size as u64;
            let (x, y) = train.batch(seed, first, batch_size);
            let mut inputs = batch_inputs(x, y, batch_size, seq_len);
            inputs.push(("loss_scale".into(), scale.clone()));
            let out = backend.run("train_step", inputs)?;
            loss += scalar(&out, "loss")? / grad_accum as f64;
        }
        // (A world of one too: NCCL's path runs on one GPU as on several.)
        backend.all_reduce_grads(group)?;
        let mut l = [loss];
        group.all_reduce_f64(&mut l)?;
        loss = l[0];
        if !loss.is_finite() {
            return Err(format!("the loss is {loss} at step {}: training diverged", step + 1));
        }
        let out = backend.run("optimizer_step", vec![("step".into(), Tensor::ints(vec![], vec![step as i32]))])?;
        if let Some(z) = zero {
            z.gather_params(backend, group)?;
        }
        let tps = tokens_per_step / t0.elapsed().as_secs_f64().max(1e-9);
        let done = step + 1;
        last.final_loss = Some(loss);
        let checkpoint_now = (o.checkpoint_every > 0 && done % o.checkpoint_every == 0) || done == o.steps;
        // Every rank takes part in gathering a sharded state; rank 0 saves it below.
        let gathered = match (zero, checkpoint_now) {
            (Some(z), true) => z.gather_state(backend, group)?,
            _ => None,
        };
        let Some(metrics) = metrics.as_mut() else { continue };
        let mut r = Record {
            step: done,
            loss: Some(loss),
            lr: Some(scalar(&out, "lr")?),
            grad_norm: Some(scalar(&out, "grad_sum_squares")?.sqrt()),
            tokens_per_s: Some(tps),
            eval_loss: None,
            eval_ppl: None,
        };
        if (o.eval_every > 0 && done % o.eval_every == 0) || done == o.steps {
            let e = evaluate(backend, valid, batch_size, seq_len, o.eval_batches)?;
            r.eval_loss = Some(e);
            r.eval_ppl = Some(e.exp());
            last.eval_loss = Some(e);
        }
        append(metrics, &r)?;
        history.push(r.clone());
        bar.set_position(done);
        bar.set_message(match r.eval_loss {
            Some(e) => format!("loss {loss:.3}  eval {e:.3}  {tps:.0} tok/s"),
            None => format!("loss {loss:.3}  {tps:.0} tok/s"),
        });
        if !o.progress && (done % o.log_every == 0 || done == o.steps) {
            eprintln!(
                "step {done}/{}: loss {loss:.4}{}  {tps:.0} tok/s",
                o.steps,
                r.eval_loss.map_or(String::new(), |e| format!("  eval {e:.4}"))
            );
        }
        if checkpoint_now {
            let tensors = match gathered {
                Some(t) => t,
                None => {
                    let names: Vec<&str> = program
                        .params
                        .iter()
                        .map(|p| p.name.as_str())
                        .chain(program.states.iter().map(|s| s.name.as_str()))
                        .collect();
                    backend.read(&names)?
                }
            };
            let id = o.run.identity();
            let state = RunState {
                format_version: checkpoint::FORMAT_VERSION,
                model: program.model.clone(),
                step: done,
                seed,
                tokenizer: o.run.tokenizer.clone(),
                checksums: Default::default(),
                spec_hash: Some(id.spec_hash),
                settings_hash: Some(id.settings_hash),
                tokenizer_hash: id.tokenizer_hash,
                state_checksum: None,
            };
            last.checkpoint = Some(checkpoint::save(&o.out_dir, &program, &tensors, &state, o.keep).map_err(|e| e.0)?);
            plot(&o.out_dir.join("loss.svg"), &history)?;
        }
    }
    bar.finish();
    let trained = o.steps.saturating_sub(first_step) as f64;
    last.tokens_per_s = trained * tokens_per_step / started.elapsed().as_secs_f64().max(1e-9);
    Ok(last)
}

/// The training loss (and held-out loss, as points) against steps, as SVG.
pub fn plot(path: &Path, history: &[Record]) -> Result<(), String> {
    use plotters::prelude::*;
    let train: Vec<(f64, f64)> = history.iter().filter_map(|r| r.loss.map(|l| (r.step as f64, l))).collect();
    let eval: Vec<(f64, f64)> = history.iter().filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l))).collect();
    if train.is_empty() {
        return Ok(());
    }
    let max_step = train.iter().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = train.iter().chain(&eval).fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let err = |e: &dyn std::fmt::Display| format!("cannot draw `{}`: {e}", path.display());
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss (nats per token)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_step, (lo - 0.05 * (hi - lo))..(hi + 0.05 * (hi - lo) + 1e-9))
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(train, &BLUE))
        .map_err(|e| err(&e))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
        .map_err(|e| err(&e))?
        .label("held-out")
        .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
