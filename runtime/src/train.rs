//! The training loop: micro-batches accumulated into each AdamW step, held-out evaluation,
//! metrics as JSON lines, a progress bar, a loss curve, and checkpoints from which a killed run
//! resumes with exactly the losses an uninterrupted run would have had.

use crate::backend::Backend;
use crate::checkpoint::{self, RunState};
use crate::cpu::tensor::Tensor;
use crate::data::Windows;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub seed: u64,
    pub steps: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub log_every: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Where checkpoints, metrics and the loss curve go.
    pub out_dir: PathBuf,
    /// Steps between checkpoints; 0 saves only at the end.
    pub checkpoint_every: u64,
    pub keep: usize,
    /// `byte`, or the tokenizer file name in `out_dir`.
    pub tokenizer: String,
    pub progress: bool,
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

/// Mean loss over the first `batches` held-out batches, in order.
pub fn evaluate(
    backend: &mut dyn Backend,
    valid: &Windows,
    batch: usize,
    seq: usize,
    batches: usize,
) -> Result<f64, String> {
    let n = (batches * batch).min(valid.count()).max(1);
    let mut total = 0.0;
    let mut done = 0;
    while done < n {
        let b = batch.min(n - done);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in done..done + b {
            let (inp, tgt) = valid.window(i);
            x.extend(inp.iter().map(|&v| v as i32));
            y.extend(tgt.iter().map(|&v| v as i32));
        }
        let out = backend.run("eval", batch_inputs(x, y, b, seq))?;
        total += scalar(&out, "loss")? * b as f64;
        done += b;
    }
    Ok(total / n as f64)
}

fn metrics_path(dir: &Path) -> PathBuf {
    dir.join("metrics.jsonl")
}

/// Keeps the metrics of steps up to `step` (a resumed run rewrites what came after).
fn truncate_metrics(dir: &Path, step: u64) -> Result<Vec<Record>, String> {
    let path = metrics_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read `{}`: {e}", path.display())),
    };
    let kept: Vec<Record> =
        text.lines().filter_map(|l| serde_json::from_str::<Record>(l).ok()).filter(|r| r.step <= step).collect();
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

/// Trains `steps` optimizer steps, resuming from the newest checkpoint in `out_dir` if there is
/// one.
pub fn train(backend: &mut dyn Backend, train: &Windows, valid: &Windows, o: &TrainOptions) -> Result<Summary, String> {
    std::fs::create_dir_all(&o.out_dir).map_err(|e| format!("cannot create `{}`: {e}", o.out_dir.display()))?;
    let program = backend.program().clone();
    let mut first_step = 0;
    if let Some(ckpt) = checkpoint::latest(&o.out_dir).map_err(|e| e.0)? {
        let (state, tensors) = checkpoint::load(&ckpt, &program).map_err(|e| e.0)?;
        if state.seed != o.seed {
            return Err(format!(
                "`{}` was trained with seed {}, not {}: use another directory",
                ckpt.display(),
                state.seed,
                o.seed
            ));
        }
        backend.write(tensors)?;
        first_step = state.step;
    }
    let mut history = truncate_metrics(&o.out_dir, first_step)?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(metrics_path(&o.out_dir))
        .map_err(|e| format!("cannot open metrics: {e}"))?;

    let bar = if o.progress { ProgressBar::new(o.steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(first_step);
    let tokens_per_step = (o.batch_size * o.seq_len * o.grad_accum) as f64;
    let started = Instant::now();
    let mut last =
        Summary { first_step, steps: o.steps, final_loss: None, eval_loss: None, tokens_per_s: 0.0, checkpoint: None };
    let scale = Tensor::scalar(1.0 / o.grad_accum as f32);
    for step in first_step..o.steps {
        let t0 = Instant::now();
        let mut loss = 0.0;
        for micro in 0..o.grad_accum {
            let first = (step * o.grad_accum as u64 + micro as u64) * o.batch_size as u64;
            let (x, y) = train.batch(o.seed, first, o.batch_size);
            let mut inputs = batch_inputs(x, y, o.batch_size, o.seq_len);
            inputs.push(("loss_scale".into(), scale.clone()));
            let out = backend.run("train_step", inputs)?;
            loss += scalar(&out, "loss")? / o.grad_accum as f64;
        }
        if !loss.is_finite() {
            return Err(format!("the loss is {loss} at step {}: training diverged", step + 1));
        }
        let out = backend.run("optimizer_step", vec![("step".into(), Tensor::ints(vec![], vec![step as i32]))])?;
        let tps = tokens_per_step / t0.elapsed().as_secs_f64().max(1e-9);
        let done = step + 1;
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
            let e = evaluate(backend, valid, o.batch_size, o.seq_len, o.eval_batches)?;
            r.eval_loss = Some(e);
            r.eval_ppl = Some(e.exp());
            last.eval_loss = Some(e);
        }
        append(&mut metrics, &r)?;
        history.push(r.clone());
        last.final_loss = Some(loss);
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
        if (o.checkpoint_every > 0 && done % o.checkpoint_every == 0) || done == o.steps {
            let names: Vec<&str> = program
                .params
                .iter()
                .map(|p| p.name.as_str())
                .chain(program.states.iter().map(|s| s.name.as_str()))
                .collect();
            let tensors = backend.read(&names)?;
            let state = RunState {
                format_version: checkpoint::FORMAT_VERSION,
                model: program.model.clone(),
                step: done,
                seed: o.seed,
                tokenizer: o.tokenizer.clone(),
                checksums: Default::default(),
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
