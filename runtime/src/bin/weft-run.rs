//! `weft-run`: runs weft bundles on a GPU, with no compiler inside. `check` compares every
//! kernel and a whole model with the CPU reference; `bench` measures training throughput.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use weft_runtime::bundle::Bundle;
use weft_runtime::cpu::tensor::Tensor;
use weft_runtime::cuda::{check, Gpu, GpuBackend};

const USAGE: &str = "usage: weft-run info
       weft-run check BUNDLE [--seed N]
       weft-run bench BUNDLE [--steps N]
       weft-run train BUNDLE --train SHARD --valid SHARD --out DIR [--steps N] [--seed N]
                      [--tokenizer NAME] [--log-every N] [--eval-every N] [--eval-batches N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn flag(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).ok_or_else(|| format!("{name} needs a whole number")),
    }
}

fn value<'a>(args: &'a [String], name: &str) -> Result<&'a str, String> {
    let i = args.iter().position(|a| a == name).ok_or_else(|| format!("{name} is required\n{USAGE}"))?;
    args.get(i + 1).map(String::as_str).ok_or_else(|| format!("{name} needs a value"))
}

fn open(path: &str) -> Result<(Gpu, Bundle), String> {
    let bundle = Bundle::read(&PathBuf::from(path)).map_err(|e| e.0)?;
    let gpu = Gpu::open(0).map_err(|e| e.0)?;
    Ok((gpu, bundle))
}

use weft_runtime::cuda::bench::{tokens, vocab};

fn run(args: &[String]) -> Result<bool, String> {
    match args.first().map(String::as_str) {
        Some("info") => {
            let gpu = Gpu::open(0).map_err(|e| e.0)?;
            println!(
                "{} (sm_{}{}), {:.1} GiB",
                gpu.name,
                gpu.capability.0,
                gpu.capability.1,
                gpu.memory_bytes as f64 / (1u64 << 30) as f64
            );
            Ok(true)
        }
        Some("check") => {
            let path = args.get(1).ok_or(USAGE)?;
            let seed = flag(args, "--seed", 0)?;
            let (gpu, bundle) = open(path)?;
            println!("{}: {} on {}", path, bundle.program.model, gpu.name);
            let t0 = Instant::now();
            let mut be = GpuBackend::new(gpu, bundle.clone(), seed).map_err(|e| e.0)?;
            let mut rows = Vec::new();
            let inputs = weft_runtime::cuda::bench::train_inputs(&be, seed)?;
            for plan in ["train_step", "eval"] {
                rows.extend(check::check_steps(&mut be, plan, &inputs)?);
            }
            let v = vocab(&bundle.program);
            let prompt = tokens(24, v, seed + 7);
            let pre = vec![("tokens".to_string(), Tensor::ints(vec![1, prompt.len()], prompt.clone()))];
            rows.extend(check::check_steps(&mut be, "prefill", &pre)?);
            // Per-kernel table: the worst row of each operation.
            let mut by_op: std::collections::BTreeMap<String, check::Row> = Default::default();
            for r in &rows {
                let op = r.what.split(' ').nth(1).unwrap_or("").split('.').next().unwrap_or("").to_string();
                let e = by_op.entry(op.clone()).or_insert_with(|| check::Row {
                    what: op.clone(),
                    error: 0.0,
                    tolerance: r.tolerance,
                });
                if r.error > e.error || !r.error.is_finite() || (r.error / r.tolerance > e.error / e.tolerance) {
                    *e = check::Row {
                        what: format!("{op} (worst: {})", r.what),
                        error: r.error,
                        tolerance: r.tolerance,
                    };
                }
            }
            let failed: Vec<&check::Row> = rows.iter().filter(|r| !r.passed()).collect();
            println!("step checks: {} outputs of {} plans, {} failed", rows.len(), 3, failed.len());
            for r in failed.iter().take(20) {
                println!("  FAIL {} error {:.3e} tol {:.1e}", r.what, r.error, r.tolerance);
            }
            let model = check::check_model(&mut be, &inputs, &prompt, 8)?;
            let mut table: Vec<check::Row> = by_op.into_values().collect();
            table.extend(model);
            print!("{}", check::render(&table));
            println!("check took {:.1} s", t0.elapsed().as_secs_f64());
            Ok(failed.is_empty() && table.iter().all(check::Row::passed))
        }
        Some("bench") => {
            let path = args.get(1).ok_or(USAGE)?;
            let steps = flag(args, "--steps", 5)? as usize;
            let (gpu, bundle) = open(path)?;
            let mut be = GpuBackend::new(gpu, bundle, 0).map_err(|e| e.0)?;
            print!("{}", weft_runtime::cuda::bench::bench(&mut be, steps)?.render());
            Ok(true)
        }
        Some("train") => {
            use weft_runtime::data::corpus::{load_shards, Windows};
            use weft_runtime::train::{train, TrainOptions};
            let path = args.get(1).ok_or(USAGE)?;
            let (gpu, bundle) = open(path)?;
            let shape = bundle.plans.get("train_step").ok_or("the bundle has no training step")?.0;
            let v = vocab(&bundle.program);
            let load = |flag: &str| -> Result<Windows, String> {
                let file = PathBuf::from(value(args, flag)?);
                let tokens = load_shards(std::slice::from_ref(&file), v).map_err(|e| e.0)?;
                Windows::new(tokens, shape.seq as usize, &file).map_err(|e| e.0)
            };
            let (train_w, valid_w) = (load("--train")?, load("--valid")?);
            let steps = flag(args, "--steps", 300)?;
            let seed = flag(args, "--seed", 3407)?;
            let out_dir = PathBuf::from(value(args, "--out")?);
            std::fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
            let opts = TrainOptions {
                seed,
                steps,
                batch_size: shape.batch as usize,
                seq_len: shape.seq as usize,
                grad_accum: 1,
                log_every: flag(args, "--log-every", 25)?,
                eval_every: flag(args, "--eval-every", 50)?,
                eval_batches: flag(args, "--eval-batches", 8)? as usize,
                out_dir: out_dir.clone(),
                checkpoint_every: 0,
                keep: 1,
                tokenizer: value(args, "--tokenizer").unwrap_or("byte").to_string(),
                progress: false,
            };
            println!(
                "training {} on {} ({} x {} tokens per step)",
                bundle.program.model, gpu.name, shape.batch, shape.seq
            );
            let mut be = GpuBackend::new(gpu, bundle, seed).map_err(|e| e.0)?;
            let s = train(&mut be, &train_w, &valid_w, &opts)?;
            println!(
                "final training loss {:.4}, held-out loss {:.4}, {:.0} tokens/s",
                s.final_loss.unwrap_or(f64::NAN),
                s.eval_loss.unwrap_or(f64::NAN),
                s.tokens_per_s
            );
            Ok(true)
        }
        _ => Err(USAGE.to_string()),
    }
}
