//! `weft-run`: runs weft bundles on a GPU, with no compiler inside. `check` compares every
//! kernel and a whole model with the CPU reference; `bench` measures training throughput;
//! `train` trains into a run directory like `weft train` writes.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use weft_runtime::backend::{Backend, CpuBackend};
use weft_runtime::bundle::Bundle;
use weft_runtime::cuda::{check, Gpu, GpuBackend};

#[derive(Parser)]
#[command(name = "weft-run", version, about = "Runs weft bundles on an NVIDIA GPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Name the GPU and its memory.
    Info,
    /// Compare every kernel of a bundle, then the whole model, with the CPU reference.
    Check {
        bundle: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// AdamW steps of the whole-model check (each after the bundle's gradient accumulation).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
        optimizer_steps: u64,
        /// Prompt tokens for prefill (default 24).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
        prompt: Option<u64>,
        /// Decode steps after the prompt (default 8; at most the bundle's context).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1 << 24))]
        decode_steps: Option<u64>,
        /// Only the step checks (no whole-model training and generation).
        #[arg(long)]
        steps_only: bool,
        /// The plans whose steps are checked, comma-separated (default: all of them).
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(check::STEP_PLANS))]
        plans: Vec<String>,
    },
    /// Measure training throughput (tokens/s, MFU, memory, time by kernel class) and prefill.
    Bench {
        bundle: PathBuf,
        /// Timed repetitions (with --decode: decode steps).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        steps: u64,
        /// Time generation instead: decode steps with the layer states kept on the device
        /// against the same steps through host memory, and where start-up time goes.
        #[arg(long)]
        decode: bool,
    },
    /// Train a bundle's model on token shards into a run directory (resumes from its newest
    /// checkpoint). The settings that shape the run (batch, sequence length, gradient
    /// accumulation, seed, optimizer and schedule) are the ones the bundle was built with.
    Train {
        bundle: PathBuf,
        /// Token shards to train on (made by `weft shard`).
        #[arg(long = "train", required_unless_present = "passkey", num_args = 1..)]
        train_shards: Vec<PathBuf>,
        /// Held-out token shards.
        #[arg(long = "valid", required_unless_present = "passkey", num_args = 1..)]
        valid_shards: Vec<PathBuf>,
        /// Instead of shards: tune on this many generated passkey examples of the training
        /// length (the loss on each answer alone; usually with --init-from).
        #[arg(long, conflicts_with_all = ["train_shards", "valid_shards"], value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
        passkey: Option<u64>,
        /// The run directory.
        #[arg(long)]
        out: PathBuf,
        /// Train until this many optimizer steps are done (default: the schedule's length).
        #[arg(long)]
        steps: Option<u64>,
        /// `byte`, or the tokenizer.json the shards were made with (kept in the run directory).
        #[arg(long, default_value = "byte")]
        tokenizer: String,
        #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..))]
        log_every: u64,
        /// Steps between held-out evaluations (0: only at the end).
        #[arg(long, default_value_t = 50)]
        eval_every: u64,
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        eval_batches: u64,
        /// Steps between checkpoints (0: only at the end).
        #[arg(long, default_value_t = 0)]
        checkpoint_every: u64,
        /// Checkpoints kept.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
        keep: u64,
        /// Resume even though the run's identity changed (recorded in run.json).
        #[arg(long)]
        accept_changes: bool,
        /// Start from another run's newest parameters, with a fresh optimizer and schedule.
        #[arg(long, value_name = "RUN")]
        init_from: Option<PathBuf>,
        /// Where to train: `gpu`, `cpu` (the reference, in f32) or `auto` (the GPU when one is
        /// usable).
        #[arg(long, value_enum, default_value = "gpu")]
        backend: BackendArg,
        /// Data-parallel ranks, threads of this process (on the GPU, rank r on GPU r): each
        /// step's micro-batches are shared among them, gradients summed in rank order, so the
        /// data and checkpoints (and, with one micro-batch a rank, the losses) are one rank's.
        /// Processes started torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and
        /// LOCAL_RANK for the GPU) are each one rank instead.
        #[arg(long, alias = "gpus", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
        ranks: Option<u64>,
    },
    /// Generate text from the newest checkpoint of a run directory with a bundle of its model
    /// (built from the spec and settings the run records).
    Generate {
        bundle: PathBuf,
        /// The run directory (made by `weft train` or `weft-run train`).
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        flags: weft_runtime::generate::GenerateFlags,
        /// Where to generate: `gpu`, `cpu` (the reference) or `auto`.
        #[arg(long, value_enum, default_value = "gpu")]
        backend: BackendArg,
    },
    /// The paper's long-context experiments on a run's newest checkpoint.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Load a completions server with concurrent streaming clients; report throughput and
    /// latencies (exits non-zero if a request failed).
    Load(weft_runtime::load::LoadFlags),
    /// Serve a run's newest checkpoint over HTTP, OpenAI's completions API, with the bundle's
    /// generation batch as the slots decoded at once (until SIGINT or SIGTERM).
    Serve {
        bundle: PathBuf,
        /// The run directory (made by `weft train` or `weft-run train`).
        #[arg(long, required_unless_present = "random_weights")]
        run: Option<PathBuf>,
        /// Serve freshly initialised parameters (this seed) instead of a run's: for load tests
        /// of a model never trained. Needs --tokenizer.
        #[arg(long, conflicts_with = "run", requires = "tokenizer")]
        random_weights: Option<u64>,
        /// With --random-weights: `byte` or a tokenizer.json.
        #[arg(long, requires = "random_weights")]
        tokenizer: Option<String>,
        #[command(flatten)]
        flags: weft_runtime::serve::ServeFlags,
        #[arg(long, value_enum, default_value = "gpu")]
        backend: BackendArg,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity at each context length on held-out text: the documents joined by the
    /// end-of-text token, cut into windows of each length, each window scored from an empty
    /// state a chunk at a time (constant memory for recurrent and sliding-window layers; on the
    /// GPU chunks of the bundle's `chunk_score` plan). A table, and an SVG plot with --svg.
    Ppl {
        bundle: PathBuf,
        /// The run directory (made by `weft train` or `weft-run train`).
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        flags: weft_runtime::eval::PplFlags,
        #[arg(long, value_enum, default_value = "gpu")]
        backend: BackendArg,
    },
    /// Passkey retrieval: a key hidden at each depth of filler text of each length, asked for
    /// at the end, answered by greedy decoding (whole-prompt prefill: the bundle's prompt
    /// length bounds the lengths); accuracy per length and depth, and an SVG heat map.
    Passkey {
        bundle: PathBuf,
        /// The run directory (made by `weft train` or `weft-run train`).
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        flags: weft_runtime::passkey::PasskeyFlags,
        #[arg(long, value_enum, default_value = "gpu")]
        backend: BackendArg,
    },
    /// Attention entropy (H_a, of the last query rows) and Mamba's selection entropy (H_s, of
    /// Δ over time) per layer on held-out windows, on the CPU reference in f64; a table, and
    /// an SVG bar chart with --svg.
    Entropy {
        bundle: PathBuf,
        /// The run directory (made by `weft train` or `weft-run train`).
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        flags: weft_runtime::entropy::EntropyFlags,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendArg {
    Auto,
    Cpu,
    Gpu,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open(path: &std::path::Path) -> Result<(Gpu, Bundle), String> {
    let bundle = Bundle::read(path).map_err(|e| e.0)?;
    let gpu = Gpu::open(0).map_err(|e| e.0)?;
    Ok((gpu, bundle))
}

fn run(command: Command) -> Result<bool, String> {
    match command {
        Command::Info => {
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
        Command::Check { bundle: path, seed, optimizer_steps, prompt, decode_steps, steps_only, plans } => {
            let (gpu, bundle) = open(&path)?;
            println!("{}: {} on {}", path.display(), bundle.program.model, gpu.name);
            let t0 = Instant::now();
            let grad_accum = bundle.source.as_ref().map_or(1, |s| s.settings.grad_accum as usize);
            let max_context = bundle.source.as_ref().map_or(0, |s| s.max_context as usize);
            let prompt = prompt.unwrap_or(24) as usize;
            let decode_steps = (decode_steps.unwrap_or(8) as usize).min(max_context.saturating_sub(prompt));
            let mut be = GpuBackend::new(gpu, bundle, seed).map_err(|e| e.0)?;
            let options = check::CheckOptions {
                seed,
                steps_only,
                plans: if plans.is_empty() { check::STEP_PLANS.iter().map(|p| p.to_string()).collect() } else { plans },
                model: check::ModelCheck {
                    optimizer_steps: optimizer_steps as usize,
                    grad_accum,
                    prompt,
                    decode_steps,
                    seed,
                },
            };
            let report = check::check_bundle(&mut be, &options)?;
            println!("step checks: {} outputs, {} failed", report.step_checks, report.failed_steps.len());
            for r in report.failed_steps.iter().take(20) {
                println!(
                    "  FAIL {}: gpu {:.3e}, bf16 emulation {:.3e} (worst row {:.3e} / {:.3e})",
                    r.what, r.gpu.norm_rel, r.emu.norm_rel, r.gpu.worst_row, r.emu.worst_row
                );
            }
            match &report.ids_refused {
                Ok(()) => println!("token ids outside the vocabulary: refused, named"),
                Err(e) => println!("FAIL token ids: {e}"),
            }
            let mut table = report.by_op.clone();
            table.extend(report.model.clone());
            print!("{}", check::render(&table));
            let mut ok = report.passed();
            if !steps_only {
                println!(
                    "clip scale per optimizer step: {}",
                    report.clips.iter().map(|c| format!("{c:.3}")).collect::<Vec<_>>().join(", ")
                );
                if !report.clips.iter().any(|&c| c < 1.0) {
                    println!("FAIL: clipping never acted: lower optimizer.grad_clip in the check's settings");
                    ok = false;
                }
            }
            println!("check took {:.1} s: {}", t0.elapsed().as_secs_f64(), if ok { "pass" } else { "FAIL" });
            Ok(ok)
        }
        Command::Bench { bundle, steps, decode: false } => {
            let (gpu, bundle) = open(&bundle)?;
            let mut be = GpuBackend::new(gpu, bundle, 0).map_err(|e| e.0)?;
            print!("{}", weft_runtime::cuda::bench::bench(&mut be, steps as usize)?.render());
            Ok(true)
        }
        Command::Bench { bundle, steps, decode: true } => {
            // Start-up, phase by phase: what a user waits for before the first token.
            let t = std::time::Instant::now();
            let read = Bundle::read(&bundle).map_err(|e| e.0)?;
            let t_read = t.elapsed().as_secs_f64();
            let gpu = Gpu::open(0).map_err(|e| e.0)?;
            let t_gpu = t.elapsed().as_secs_f64();
            let mut be = GpuBackend::new(gpu, read, 0).map_err(|e| e.0)?;
            let t_params = t.elapsed().as_secs_f64();
            let b = weft_runtime::cuda::bench::bench_decode(&mut be, steps.max(2) as usize)?;
            println!(
                "start-up: bundle read {:.2} s, GPU context {:.2} s, parameters {:.2} s, first prefill {:.2} s",
                t_read,
                t_gpu - t_read,
                t_params - t_gpu,
                b.prefill_ms / 1e3
            );
            print!("{}", b.render());
            print!("{}", weft_runtime::cuda::bench::paper_sweep(&mut be, steps as usize)?.render());
            Ok(true)
        }
        Command::Train {
            bundle: path,
            train_shards,
            valid_shards,
            out,
            steps,
            tokenizer,
            log_every,
            eval_every,
            eval_batches,
            checkpoint_every,
            keep,
            accept_changes,
            init_from,
            passkey,
            backend,
            ranks,
        } => {
            use weft_runtime::collective::Layout;
            use weft_runtime::train::{shard_run, train_ranked, ShardRun};
            // Everything is checked before the GPU is touched.
            let bundle = Bundle::read(&path).map_err(|e| e.0)?;
            let run = ShardRun {
                train: train_shards,
                valid: valid_shards,
                tokenizer,
                out,
                steps,
                log_every,
                eval_every,
                eval_batches: eval_batches as usize,
                checkpoint_every,
                keep: keep as usize,
                accept_changes,
                init_from,
                passkey: passkey.map(|n| n as usize),
            };
            let (opts, train_w, valid_w) = shard_run(&bundle, &run).map_err(|e| format!("{}: {e}", path.display()))?;
            let settings = opts.run.settings.clone();
            let shape = bundle.plans.get("train_step").ok_or("the bundle has no training step")?.0;
            let layout = Layout::new(ranks)?;
            let world = layout.world();
            if settings.grad_accum % world as u64 != 0 {
                return Err(format!(
                    "{world} ranks share each step's {} micro-batches (the bundle's grad_accum): build it with a multiple of {world}",
                    settings.grad_accum
                ));
            }
            let highest = layout.devices().into_iter().max().unwrap_or(0);
            let on_gpu = match backend {
                BackendArg::Gpu => {
                    Gpu::open(highest)
                        .map_err(|e| format!("no usable GPU {highest} for this process's ranks: {}", e.0))?;
                    true
                }
                BackendArg::Auto => Gpu::open(highest).is_ok(),
                BackendArg::Cpu => false,
            };
            // GPUs sum gradients through NCCL (also a world of one when --ranks is given, so
            // one GPU runs the same path); the CPU's ranks through the host.
            let nccl = on_gpu && (world > 1 || ranks.is_some());
            let per_rank = settings.grad_accum as usize / world;
            // Several ranks each keep their share of the optimizer state (ZeRO-1).
            let shards = (world > 1).then(|| weft_runtime::zero::Shards::new(&bundle.program, world));
            // Each rank's backend is made on its own thread, on its GPU.
            let make = |rank: usize, device: usize| -> Result<Box<dyn Backend>, String> {
                let (be, place): (Box<dyn Backend>, String) = match on_gpu {
                    false => {
                        let program = match &shards {
                            Some(z) => z.program_for(rank)?.0,
                            None => bundle.program.clone(),
                        };
                        (Box::new(CpuBackend::new(program, settings.seed)), "the CPU reference".into())
                    }
                    true => {
                        let gpu = Gpu::open(device).map_err(|e| format!("GPU {device}: {}", e.0))?;
                        let name = gpu.name.clone();
                        let own = match &shards {
                            Some(z) => z.bundle_for(&bundle, rank)?,
                            None => bundle.clone(),
                        };
                        (Box::new(GpuBackend::new(gpu, own, settings.seed).map_err(|e| e.0)?), name)
                    }
                };
                if rank == 0 {
                    let how = match (world, nccl) {
                        (1, false) => String::new(),
                        (_, true) => format!(
                            ", {world} ranks of {per_rank} each, gradients summed by NCCL, optimizer state sharded"
                        ),
                        (_, false) => format!(", {world} ranks of {per_rank} each, optimizer state sharded"),
                    };
                    println!(
                        "training {} on {place} ({} x {} tokens per micro-batch, {} micro-batches per step{how})",
                        bundle.program.model, shape.batch, shape.seq, settings.grad_accum
                    );
                }
                Ok(be)
            };
            let s = weft_runtime::collective::run(&layout, nccl, make, |be, group| {
                train_ranked(be, &train_w, &valid_w, &opts, group, shards.as_ref())
            })?;
            if matches!(&layout, Layout::Process(r) if r.rank != 0) {
                return Ok(true);
            }
            println!(
                "final training loss {:.4}, held-out loss {:.4}, {:.0} tokens/s",
                s.final_loss.unwrap_or(f64::NAN),
                s.eval_loss.unwrap_or(f64::NAN),
                s.tokens_per_s
            );
            Ok(true)
        }
        Command::Load(flags) => weft_runtime::load::run_and_report(&flags),
        Command::Serve { bundle: path, run, random_weights, tokenizer, flags, backend } => {
            let (bundle, context, params, tokenizer, seed) = match (run, random_weights, tokenizer) {
                (Some(run), _, _) => {
                    let g = open_generation(&path, &run)?;
                    (g.bundle, g.context, Some(g.run.params), g.run.tokenizer, g.seed)
                }
                (None, Some(seed), Some(t)) => {
                    let bundle = Bundle::read(&path).map_err(|e| e.0)?;
                    let context = bundle.plans.get("prefill").ok_or("the bundle has no prefill plan")?.0.seq as usize;
                    let tokenizer = weft_runtime::data::Tokenizer::load(&t).map_err(|e| e.0)?;
                    (bundle, context, None, tokenizer, seed)
                }
                _ => return Err("give --run DIR, or --random-weights SEED with --tokenizer".into()),
            };
            let rows = bundle.plans.get("decode").ok_or("the bundle has no decode plan")?.0.batch as usize;
            // Prompts prefilled in chunks take the decode plan's last row as their staging row.
            let chunked = backend != BackendArg::Cpu
                && bundle.plans.contains_key("chunk")
                && flags.prefill_chunk != Some(0)
                && rows > 1;
            let slots = if chunked { rows - 1 } else { rows };
            if chunked {
                eprintln!("{slots} slots: the decode plan's last row stages prompts prefilled in chunks");
            }
            let vocab = bundle.program.vocab().ok_or("the model has no embedding table")?;
            if tokenizer.vocab_size() > vocab {
                return Err(format!(
                    "the tokenizer has {} tokens, more than the model's vocabulary of {vocab}",
                    tokenizer.vocab_size()
                ));
            }
            let o = flags.options(bundle.program.model.clone(), context, slots);
            // The backend is made on the engine's thread, which keeps it.
            let make = Box::new(move || backend_for(bundle, params, seed, backend));
            weft_runtime::serve::serve(o, tokenizer, vocab, make, |a| eprintln!("listening on http://{a}"))?;
            Ok(true)
        }
        Command::Eval(EvalCommand::Ppl { bundle: path, run, flags, backend }) => {
            let mut g = open_generation(&path, &run)?;
            // Self-Extend: the bundle's inference plans patched, on the CPU reference (the GPU
            // has no kernel for it yet).
            let backend = match (flags.self_extend()?, backend) {
                (None, b) => b,
                (Some(_), BackendArg::Gpu) => {
                    return Err("Self-Extend has no GPU kernels yet: evaluate it with --backend cpu".into())
                }
                (Some(se), _) => {
                    g.bundle.program = g.bundle.program.with_self_extend(se)?;
                    BackendArg::Cpu
                }
            };
            let (_, longest) = flags.lengths()?;
            // Without chunks, the whole-window pass must fit the score plan (the CPU scores in
            // chunks).
            if backend != BackendArg::Cpu && !g.bundle.plans.contains_key("chunk_score") {
                if let Some((shape, _)) = g.bundle.plans.get("score") {
                    if longest as u64 > shape.seq {
                        return Err(format!(
                            "`{}` scores windows of at most {} tokens on the GPU; --lengths asks for {longest}: rebuild it with a longer generation (train.seq_len + generate.max_new_tokens), or use --backend cpu",
                            path.display(),
                            shape.seq
                        ));
                    }
                }
            }
            let started = Instant::now();
            let tokenizer = g.run.tokenizer;
            let mut be = backend_for(g.bundle, Some(g.run.params), g.seed, backend)?;
            let title = format!("perplexity against context length: {}", run.display());
            flags.run(be.as_mut(), &tokenizer, &title)?;
            eprintln!("evaluated in {:.1} s on {}", started.elapsed().as_secs_f64(), be.name());
            Ok(true)
        }
        Command::Eval(EvalCommand::Passkey { bundle: path, run, flags, backend }) => {
            let g = open_generation(&path, &run)?;
            let (_, longest) = flags.lengths()?;
            if longest + weft_runtime::passkey::KEY_DIGITS + 1 > g.context {
                return Err(format!(
                    "`{}` generates within {} tokens; --lengths asks for {longest} and the answer: rebuild it with a longer generation (train.seq_len + generate.max_new_tokens)",
                    path.display(),
                    g.context
                ));
            }
            let started = Instant::now();
            let tokenizer = g.run.tokenizer;
            let mut be = backend_for(g.bundle, Some(g.run.params), g.seed, backend)?;
            let title = format!("passkey retrieval: {}", run.display());
            flags.run(be.as_mut(), &tokenizer, &title)?;
            eprintln!("evaluated in {:.1} s on {}", started.elapsed().as_secs_f64(), be.name());
            Ok(true)
        }
        Command::Eval(EvalCommand::Entropy { bundle: path, run, flags }) => {
            let g = open_generation(&path, &run)?;
            let title = format!("entropy per layer: {}", run.display());
            flags.run(&g.bundle.program, &g.run.params, &g.run.tokenizer, &title)?;
            Ok(true)
        }
        Command::Generate { bundle: path, run, flags, backend } => {
            use weft_runtime::generate::generate_text;
            let launched = Instant::now();
            let (prompt, sampling, options) = flags.resolve()?;
            // Everything is checked before the GPU is touched.
            let g = open_generation(&path, &run)?;
            let t_open = launched.elapsed().as_secs_f64();
            // The bundle's generation batch is the engine's pool of slots (with --prompts).
            let slots = g.bundle.plans.get("decode").map(|p| p.0.batch as usize);
            let (r, context) = (g.run, g.context);
            let mut be = backend_for(g.bundle, Some(r.params), g.seed, backend)?;
            let t_backend = launched.elapsed().as_secs_f64();
            let started = Instant::now();
            if flags.prompts.is_some() {
                let slots = slots.ok_or("the bundle has no decode plan")?;
                let prompts = weft_runtime::generate::prompt_lines(&prompt);
                let texts = weft_runtime::generate::generate_texts(
                    be.as_mut(),
                    &r.tokenizer,
                    context,
                    slots,
                    &prompts,
                    &options,
                    &sampling,
                )?;
                for (i, (kept, text)) in texts.iter().enumerate() {
                    println!("{}", weft_runtime::generate::json_line(i, kept, text));
                }
                eprintln!(
                    "{} prompts in {:.2} s on {} ({slots} at a time)",
                    texts.len(),
                    started.elapsed().as_secs_f64(),
                    be.name()
                );
                return Ok(true);
            }
            let mut shown = false;
            let mut pieces = 0usize;
            let mut first_token = None;
            let (kept, _) =
                generate_text(be.as_mut(), &r.tokenizer, context, &prompt, &options, &sampling, |kept, t| {
                    if !shown {
                        print!("{kept}");
                        shown = true;
                    }
                    first_token.get_or_insert_with(|| launched.elapsed().as_secs_f64());
                    pieces += 1;
                    print!("{t}");
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                })?;
            if !shown {
                print!("{kept}");
            }
            println!();
            eprintln!("{pieces} pieces of text in {:.2} s on {}", started.elapsed().as_secs_f64(), be.name());
            // Where the wait for the first token went: reading the run and the bundle, the
            // backend (on the GPU: context and parameters on the device), then the prompt's
            // prefill with every first-use cost (kernel loading, matrix-product algorithms,
            // graph capture).
            if let Some(first) = first_token {
                eprintln!(
                    "start-up: first text {first:.2} s after launch (run and bundle read {t_open:.2} s, backend {:.2} s, prefill and first step {:.2} s)",
                    t_backend - t_open,
                    first - t_backend
                );
            }
            Ok(true)
        }
    }
}

/// A bundle and a run directory checked against each other (the same spec), with the run's
/// newest checkpoint and tokenizer.
struct Generation {
    bundle: Bundle,
    run: weft_runtime::run::RunForGeneration,
    /// Prompt and new tokens together.
    context: usize,
    seed: u64,
}

fn open_generation(path: &std::path::Path, run: &std::path::Path) -> Result<Generation, String> {
    use weft_runtime::run::{open_for_generation, RunInfo};
    let bundle = Bundle::read(path).map_err(|e| e.0)?;
    let info = RunInfo::read(run)?.ok_or_else(|| {
        format!("`{}` is not a training run (it has no {})", run.display(), weft_runtime::run::RUN_INFO)
    })?;
    let source = bundle
        .source
        .as_ref()
        .ok_or("the bundle records no spec and settings (built by an older weft): rebuild it with `weft build`")?;
    if source.spec.hash() != info.spec_hash {
        return Err(format!(
            "`{}` was built from another spec than the run `{}` was trained with",
            path.display(),
            run.display()
        ));
    }
    let context = bundle.plans.get("prefill").ok_or("the bundle has no prefill plan")?.0.seq as usize;
    let r = open_for_generation(run, &info, &bundle.program)?;
    Ok(Generation { bundle, run: r, context, seed: info.settings.seed })
}

/// The backend a generation runs on, the checkpoint's parameters in place (on the GPU they go
/// straight to the device: nothing is initialised only to be overwritten), or with none, the
/// parameters initialised from `seed`.
fn backend_for(
    bundle: Bundle,
    params: Option<std::collections::BTreeMap<String, weft_runtime::cpu::tensor::Tensor<f32>>>,
    seed: u64,
    backend: BackendArg,
) -> Result<Box<dyn Backend>, String> {
    let cpu = |bundle: Bundle, params: Option<_>| -> Result<Box<dyn Backend>, String> {
        let mut be = CpuBackend::new(bundle.program, seed);
        if let Some(p) = params {
            be.write(p)?;
        }
        Ok(Box::new(be))
    };
    match backend {
        BackendArg::Cpu => cpu(bundle, params),
        BackendArg::Gpu | BackendArg::Auto => match Gpu::open(0) {
            Ok(gpu) => Ok(Box::new(
                match params {
                    Some(p) => GpuBackend::with_parameters(gpu, bundle, p),
                    None => GpuBackend::new(gpu, bundle, seed),
                }
                .map_err(|e| e.0)?,
            )),
            Err(e) if backend == BackendArg::Gpu => Err(format!("no usable GPU: {}", e.0)),
            Err(_) => cpu(bundle, params),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("weft-run").chain(args.iter().copied())).map_err(|e| e.to_string())
    }

    #[test]
    fn the_command_line_is_well_formed() {
        // Catches flags whose declared type and parser disagree before a user does.
        <Cli as clap::CommandFactory>::command().debug_assert();
        for args in [
            &["check", "m.bundle", "--optimizer-steps", "3", "--prompt", "300", "--decode-steps", "790"][..],
            &["check", "m.bundle", "--steps-only", "--plans", "train_step,prefill"],
            &["bench", "m.bundle", "--steps", "10"],
            &[
                "train",
                "m.bundle",
                "--train",
                "a",
                "b",
                "--valid",
                "c",
                "--out",
                "r",
                "--steps",
                "5",
                "--checkpoint-every",
                "2",
                "--keep",
                "3",
                "--eval-batches",
                "2",
                "--backend",
                "cpu",
            ],
            &[
                "generate",
                "m.bundle",
                "--run",
                "r",
                "--prompt-file",
                "-",
                "--max-new-tokens",
                "7",
                "--temperature",
                "0",
            ],
            &["serve", "m.bundle", "--run", "r", "--port", "0", "--queue", "4", "--backend", "cpu"],
            &["serve", "m.bundle", "--random-weights", "3", "--tokenizer", "byte", "--timeout", "5"],
            &["load", "--clients", "64", "--prompt-tokens", "256:768", "--output-tokens", "256"],
            &["eval", "ppl", "m.bundle", "--run", "r", "--data", "a", "b", "--lengths", "512,2k", "--backend", "cpu"],
            &["eval", "entropy", "m.bundle", "--run", "r", "--data", "a", "--length", "2k", "--last", "16"],
            &["eval", "passkey", "m.bundle", "--run", "r", "--lengths", "2k,8k", "--depths", "3"],
            &["train", "m.bundle", "--passkey", "500", "--out", "r", "--init-from", "base", "--steps", "5"],
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            // Reading every field, as `run` does, must not panic.
            match cli.command {
                Command::Check { optimizer_steps, prompt, decode_steps, .. } => {
                    let _ = (optimizer_steps + 1, prompt.map(|p| p + 1), decode_steps.map(|d| d + 1));
                }
                Command::Bench { steps, decode, .. } => assert_eq!((steps, decode), (10, false)),
                Command::Train { passkey: Some(n), train_shards, init_from, .. } => {
                    assert_eq!((n, train_shards.len(), init_from.is_some()), (500, 0, true))
                }
                Command::Train { steps, keep, eval_batches, train_shards, .. } => {
                    assert_eq!((steps, keep, eval_batches, train_shards.len()), (Some(5), 3, 2, 2))
                }
                Command::Generate { flags, .. } => {
                    assert_eq!(
                        (flags.max_new_tokens, flags.prompt_file.as_deref()),
                        (7, Some(std::path::Path::new("-")))
                    )
                }
                Command::Serve { flags, random_weights: None, .. } => {
                    assert_eq!((flags.port, flags.queue, flags.host.as_str()), (0, 4, "127.0.0.1"))
                }
                Command::Serve { flags, random_weights: Some(seed), tokenizer, run, .. } => {
                    assert_eq!((seed, tokenizer.as_deref(), run, flags.timeout), (3, Some("byte"), None, 5))
                }
                Command::Load(f) => {
                    assert_eq!((f.clients, f.prompt_tokens.lo, f.prompt_tokens.hi, f.requests), (64, 256, 768, None))
                }
                Command::Eval(EvalCommand::Passkey { flags, .. }) => {
                    assert_eq!((flags.lengths().unwrap().1, flags.depths, flags.keys), (8192, 3, 5))
                }
                Command::Eval(EvalCommand::Entropy { flags, .. }) => {
                    assert_eq!((flags.length.as_str(), flags.last, flags.windows), ("2k", 16, 4))
                }
                Command::Eval(EvalCommand::Ppl { flags, .. }) => {
                    assert_eq!(
                        (flags.data.len(), flags.lengths().unwrap(), flags.windows),
                        (2, (vec![512, 2048], 2048), 8)
                    )
                }
                Command::Info => {}
            }
        }
    }

    #[test]
    fn unknown_or_malformed_flags_are_errors() {
        let base = ["train", "m.bundle", "--train", "a.tokens", "--valid", "b.tokens", "--out", "run"];
        assert!(parse(&base).is_ok());
        // A misspelt flag is refused, not ignored (it used to train the default 300 steps).
        let e = parse(&[&base[..], &["--step", "100"]].concat()).err().expect("--step accepted");
        assert!(e.contains("--step") && e.contains("--steps"), "{e}");
        let e = parse(&[&base[..], &["--steps", "ten"]].concat()).err().expect("--steps ten accepted");
        assert!(e.contains("ten"), "{e}");
        let e = parse(&["train", "m.bundle", "--out", "run"]).err().expect("no shards accepted");
        assert!(e.contains("--train"), "{e}");
        let e = parse(&["bench", "m.bundle", "--steps", "0"]).err().expect("0 steps accepted");
        assert!(e.contains("0"), "{e}");
        let e = parse(&["check", "m.bundle", "--plans", "train_step,evil"]).err().expect("unknown plan accepted");
        assert!(e.contains("evil") && e.contains("optimizer_step"), "{e}");
        let e = parse(&["generate", "m.bundle", "--run", "r", "--prompt", "a", "--prompt-file", "p"])
            .err()
            .expect("two prompts accepted");
        assert!(e.contains("--prompt-file"), "{e}");
        let e = parse(&["generate", "m.bundle", "--prompt", "a"]).err().expect("no run accepted");
        assert!(e.contains("--run"), "{e}");
        let e = parse(&["frobnicate"]).err().expect("unknown command accepted");
        assert!(e.contains("frobnicate"), "{e}");
    }
}
