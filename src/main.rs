//! The `weft` command line.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use weft::{analysis, config, graph, Checked};

// The compiler builds and drops graphs of hundreds of thousands of small nodes; glibc's
// allocator spent a third of `weft check`'s time consolidating and unlinking chunks there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weft", version, about = "A compiler for neural-network architectures")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a spec and print parameters, FLOPs and memory per layer.
    Check {
        spec: PathBuf,
        /// Sequence length for FLOPs and decode state (default: the run settings', else 4096).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
        seq: Option<u64>,
        /// Run settings (TOML); checked too.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Sequences per micro-batch for the memory plan (default: the run settings', else 1).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 16))]
        batch: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the typed graph of a spec as text, or as Graphviz with --dot.
    Graph {
        spec: PathBuf,
        #[arg(long)]
        dot: bool,
        /// The training step (forward, backward, gradient accumulation) instead of the forward.
        #[arg(long)]
        train: bool,
        /// After the fusion passes.
        #[arg(long)]
        fused: bool,
        /// Also write the graph before and after every pass into this directory.
        #[arg(long)]
        dump_dir: Option<PathBuf>,
    },
    /// Compile a spec into a bundle: device plans for training, evaluation and generation, and
    /// their kernels as PTX.
    Build {
        spec: PathBuf,
        /// Run settings (TOML): batch and sequence length, optimizer, generation.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The bundle to write (default: the spec's name with `.bundle`).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Print one stage instead of writing the bundle.
        #[arg(long, value_enum)]
        emit: Option<EmitStage>,
        /// Write every stage into this directory (graphs, device plans, each kernel's MLIR and PTX).
        #[arg(long)]
        dump_dir: Option<PathBuf>,
        /// Compile every kernel even when the cache holds it.
        #[arg(long)]
        no_cache: bool,
        /// Leave out the cubins (by default each kernel is also assembled for sm_90 when ptxas is
        /// found, so the driver need not compile PTX at load).
        #[arg(long)]
        no_cubin: bool,
    },
    /// Write one file per generated kernel (MLIR, ptxas report, PTX) into a directory, or with
    /// --check compare them with it and fail with a diff when any changed.
    Snapshot {
        spec: PathBuf,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        check: bool,
        /// Run settings (TOML), as for `weft build`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Train a spec as the run settings say (resumes from the newest checkpoint of the run).
    Train {
        /// Run settings (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The spec (default: the run settings' `spec`).
        spec: Option<PathBuf>,
        /// Steps to train (default: the run settings' `train.steps`).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1 << 40))]
        steps: Option<u64>,
        /// Log lines instead of a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Compute in f64 on the CPU reference (the check mode; checkpoints stay f32).
        #[arg(long)]
        f64: bool,
        /// Where to train: `auto` (a GPU when one is usable, else the CPU), `cpu` or `gpu`.
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// Resume even though the spec, the settings that shape the run or the tokenizer changed
        /// since the newest checkpoint (the change is recorded in the run's run.json).
        #[arg(long)]
        accept_changes: bool,
        /// Start from the newest parameters of another run directory, with a fresh optimizer
        /// and schedule (fine-tuning); recorded in run.json.
        #[arg(long, value_name = "RUN")]
        init_from: Option<PathBuf>,
        /// Data-parallel ranks, threads of this process (on the GPU, rank r on GPU r): each
        /// step's train.grad_accum micro-batches are shared among them, so the data, the
        /// checkpoints and (with one micro-batch a rank) the losses are those of one rank.
        /// Processes started torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and
        /// LOCAL_RANK for the GPU) are each one rank instead.
        #[arg(long, alias = "gpus", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
        ranks: Option<u64>,
    },
    /// Tokenize text files (each a document, followed by end-of-text) into a token shard.
    Shard {
        /// `byte`, or a tokenizer.json (e.g. one a training run saved).
        #[arg(long)]
        tokenizer: String,
        /// The shard to write.
        #[arg(long, short)]
        out: PathBuf,
        /// Text files, or directories of .txt files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Measure training, evaluation, prefill and decode throughput of a spec.
    Bench {
        /// The spec (not with --scaling).
        #[arg(required_unless_present = "scaling")]
        spec: Option<PathBuf>,
        /// Time the front end, program build, checks and lowering against the number of
        /// sub-layers (64 to 4096) on generated specs instead.
        #[arg(long, conflicts_with_all = ["compile", "backend"])]
        scaling: bool,
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        seq: u64,
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
        batch: u64,
        /// Timed repetitions of each plan.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Measure compile time instead: the whole bundle from the spec, cold and rebuilt.
        #[arg(long)]
        compile: bool,
        /// Run settings (TOML) for --compile (batch, sequence length, generation).
        #[arg(long)]
        config: Option<PathBuf>,
        /// `cpu` (the reference, default) or `gpu`: the spec compiled to a bundle at --batch x
        /// --seq and timed on the GPU (tokens/s, MFU, memory, time by kernel class, prefill).
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// With --backend gpu: time generation instead, --batch sequences decoding --steps
        /// tokens (at least 2) after a --seq-token prompt.
        #[arg(long, conflicts_with_all = ["compile", "scaling"])]
        decode: bool,
    },
    /// Generate text from the newest checkpoint of a training run.
    Generate {
        /// The run directory (the run settings' `checkpoint.dir`).
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        flags: weft_runtime::generate::GenerateFlags,
        /// Where to generate: `auto` (a GPU when one is usable, else the CPU), `cpu` or `gpu`.
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
        /// The longest sequence (prompt and new tokens); default: the run's.
        #[arg(long, value_parser = clap::value_parser!(u64).range(2..=1 << 24))]
        context: Option<u64>,
        /// Self-Extend on full-attention layers (neighbour window and group size, `W,G`): keys
        /// W or more back at grouped positions, so a model reaches (L − W)·G + W tokens for its
        /// training length L. On the CPU reference.
        #[arg(long, value_name = "W,G", value_parser = weft_runtime::op::SelfExtend::parse)]
        self_extend: Option<weft_runtime::op::SelfExtend>,
    },
    /// Load a completions server with concurrent streaming clients; report throughput and
    /// latencies (exits non-zero if a request failed).
    Load(weft_runtime::load::LoadFlags),
    /// Serve the newest checkpoint of a training run over HTTP, OpenAI's completions API
    /// (until SIGINT or SIGTERM).
    Serve {
        /// The run directory.
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        flags: weft_runtime::serve::ServeFlags,
        /// Sequences decoded at once.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
        slots: u64,
        /// The longest sequence (prompt and new tokens) served; default: the run's.
        #[arg(long, value_parser = clap::value_parser!(u64).range(2..=1 << 24))]
        context: Option<u64>,
        /// `auto` (a GPU when one is usable, else the CPU), `cpu` or `gpu`.
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendArg,
    },
    /// The paper's long-context experiments on a run's newest checkpoint.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity at each context length on held-out text: the documents joined by the
    /// end-of-text token, cut into windows of each length, each window scored from an empty
    /// state a chunk at a time (constant memory for recurrent and sliding-window layers), on
    /// the CPU reference; a table, and an SVG plot with --svg.
    Ppl {
        /// The run directory.
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        flags: weft_runtime::eval::PplFlags,
    },
    /// Passkey retrieval on the CPU reference: a key hidden at each depth of filler text of
    /// each length, asked for at the end, answered by greedy decoding; accuracy per length and
    /// depth, and an SVG heat map with --svg.
    Passkey {
        /// The run directory.
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        flags: weft_runtime::passkey::PasskeyFlags,
    },
    /// Attention entropy (H_a, of the last query rows) and Mamba's selection entropy (H_s, of
    /// Δ over time) per layer on held-out windows, on the CPU reference in f64; a table, and
    /// an SVG bar chart with --svg.
    Entropy {
        /// The run directory.
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EmitStage {
    /// The training step's graph before fusion.
    Graph,
    /// The training step's graph after fusion.
    Fused,
    /// The device plans: every launch and matrix product.
    Kernels,
    /// Every kernel's MLIR.
    Mlir,
    /// Every kernel's PTX.
    Ptx,
}

/// Errors are printed where they happen; the exit code says that one did.
struct Reported;

fn front_end(spec: &Path) -> Result<Checked, Reported> {
    match weft::check_file(spec) {
        Ok(c) => {
            c.diags.eprint(&c.sources);
            Ok(c)
        }
        Err(f) => {
            eprint!("{}", f.render());
            Err(Reported)
        }
    }
}

fn load_config(path: &Path) -> Result<config::RunConfig, Reported> {
    let mut c = config::load(path).map_err(|(sources, diags)| {
        diags.eprint(&sources);
        Reported
    })?;
    c.resolve_paths(path);
    Ok(c)
}

fn report<T>(r: Result<T, String>) -> Result<T, Reported> {
    r.map_err(|e| {
        // Diagnostics of a spec come rendered already.
        if e.starts_with("error") || e.starts_with("warning") {
            eprint!("{e}");
        } else {
            eprintln!("error: {e}");
        }
        Reported
    })
}

fn run(cli: Cli) -> Result<(), Reported> {
    match cli.command {
        Command::Check { spec, seq, config, batch, json } => {
            let settings = config.as_deref().map(load_config).transpose()?;
            let checked = front_end(&spec)?;
            let seq = seq.or(settings.as_ref().map(|s| s.train.seq_len)).unwrap_or(4096);
            let batch = batch.or(settings.as_ref().map(|s| s.train.batch_size)).unwrap_or(1);
            if batch * seq > config::limits::TOKENS_PER_BATCH {
                eprintln!(
                    "error: {batch} sequences of {seq} tokens are {} tokens per micro-batch, more than the {} allowed",
                    batch * seq,
                    config::limits::TOKENS_PER_BATCH
                );
                return Err(Reported);
            }
            let settings = settings.unwrap_or_default();
            let opt = weft::program::OptimizerSettings::from_config(&settings);
            let max_prompt = seq + settings.generate.max_new_tokens;
            let program = report(weft::program::build_program(&checked.model, &opt, max_prompt).map_err(|e| e.0))?;
            let shapes = weft::build::Shapes { batch, seq, gen_batch: 1, max_prompt };
            // Lowering every plan for its findings while the memory is planned.
            let (memory, findings) = rayon::join(
                || analysis::memory_report_of(&program, batch, seq),
                || weft::build::program_findings(&program, &shapes),
            );
            let memory = report(memory)?;
            let mut report = analysis::analyze(&checked.graph, &checked.model, seq);
            report.memory = Some(memory);
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: cannot write JSON: {e}");
                        return Err(Reported);
                    }
                }
            } else {
                print!("{}", analysis::render_table(&report));
            }
            gpu_findings(&checked, findings)?;
        }
        Command::Build { spec, config, out, emit, dump_dir, no_cache, no_cubin } => {
            let settings = config.as_deref().map(load_config).transpose()?.unwrap_or_default();
            build(&spec, &settings, out, emit, dump_dir, no_cache, no_cubin)?;
        }
        Command::Snapshot { spec, dir, check, config } => {
            let settings = config.as_deref().map(load_config).transpose()?.unwrap_or_default();
            let (_, program, shapes) = build_inputs(&spec, &settings)?;
            let cache = weft::lower::cache::Cache::user();
            let snaps = report(weft::snapshot::kernel_snapshots(&program, &shapes, &cache))?;
            if weft::snapshot::ptxas_path().is_none() {
                eprintln!("warning: ptxas not found (set WEFT_PTXAS or run scripts/setup.sh): snapshots have no resource reports");
            }
            if check {
                let diffs = report(weft::snapshot::check_dir(&dir, &snaps))?;
                if !diffs.is_empty() {
                    for d in &diffs {
                        eprintln!("{d}");
                    }
                    eprintln!(
                        "error: {} of {} kernel snapshots differ from {}",
                        diffs.len(),
                        snaps.len(),
                        dir.display()
                    );
                    return Err(Reported);
                }
                println!("{} kernel snapshots match {}", snaps.len(), dir.display());
            } else {
                report(weft::snapshot::write_dir(&dir, &snaps))?;
                println!("wrote {} kernel snapshots to {}", snaps.len(), dir.display());
            }
        }
        Command::Train { config, spec, steps, no_progress, f64, backend, accept_changes, init_from, ranks } => {
            let mut settings = load_config(&config)?;
            // The schedule keeps the length the file gives; --steps only trains more or less.
            settings.pin_schedule();
            if let Some(s) = steps {
                settings.train.steps = s;
            }
            let Some(spec) = spec.or_else(|| settings.spec.clone()) else {
                eprintln!("error: no spec: name one on the command line or set `spec` in `{}`", config.display());
                return Err(Reported);
            };
            use weft::run::BackendChoice;
            let choice = match (backend, f64) {
                (BackendArg::Gpu, true) => {
                    eprintln!("error: --f64 runs on the CPU reference; it cannot be combined with --backend gpu");
                    return Err(Reported);
                }
                (_, true) => BackendChoice::CpuF64,
                (BackendArg::Auto, _) => BackendChoice::Auto,
                (BackendArg::Cpu, _) => BackendChoice::Cpu,
                (BackendArg::Gpu, _) => BackendChoice::Gpu,
            };
            let start = weft::run::StartOptions { progress: !no_progress, accept_changes, init_from, ranks };
            let r = report(weft::run::train_on(&spec, &settings, &start, choice))?;
            let s = &r.summary;
            if s.first_step >= s.steps {
                println!(
                    "{} is already trained to step {}; raise --steps to train more (the learning rate holds its minimum past the schedule's {} steps)",
                    r.out_dir.display(),
                    s.first_step,
                    settings.schedule_steps()
                );
            }
            println!(
                "trained {} to step {} on {} ({} tokenizer, {} corpus tokens)",
                spec.display(),
                s.steps,
                r.backend,
                r.tokenizer,
                r.corpus_tokens
            );
            if let Some(l) = s.final_loss {
                println!("final training loss {l:.4} nats/token");
            }
            if let Some(e) = s.eval_loss {
                println!(
                    "held-out loss {e:.4} nats/token (perplexity {:.2}); unigram entropy of the corpus {:.4} nats/token ({:.0}% below)",
                    e.exp(),
                    r.unigram_entropy,
                    100.0 * (1.0 - e / r.unigram_entropy)
                );
            }
            println!("{:.0} tokens/s", s.tokens_per_s);
            if let Some(c) = &s.checkpoint {
                println!("checkpoint {}", c.display());
            }
            println!(
                "metrics {}, loss curve {}",
                r.out_dir.join("metrics.jsonl").display(),
                r.out_dir.join("loss.svg").display()
            );
        }
        Command::Eval(EvalCommand::Ppl { run, flags }) => {
            report(weft::run::eval_ppl(&run, &flags))?;
        }
        Command::Eval(EvalCommand::Passkey { run, flags }) => {
            report(weft::run::eval_passkey(&run, &flags))?;
        }
        Command::Eval(EvalCommand::Entropy { run, flags }) => {
            let r = report(weft::run::open_run(&run))?;
            let title = format!("entropy per layer: {}", run.display());
            report(flags.run(&r.program, &r.params, &r.tokenizer, &title))?;
        }
        Command::Load(flags) => {
            if !report(weft_runtime::load::run_and_report(&flags))? {
                return Err(Reported);
            }
        }
        Command::Serve { run, flags, slots, context, backend } => {
            let choice = match backend {
                BackendArg::Auto => weft::run::BackendChoice::Auto,
                BackendArg::Cpu => weft::run::BackendChoice::Cpu,
                BackendArg::Gpu => weft::run::BackendChoice::Gpu,
            };
            report(weft::run::serve_on(&run, choice, &flags, slots as usize, context))?;
        }
        Command::Generate { run, flags, backend, context, self_extend } => {
            let reach = weft::run::Reach { context, self_extend };
            let (prompt, sampling, options) = report(flags.resolve())?;
            let mut shown = false;
            let choice = match backend {
                BackendArg::Auto => weft::run::BackendChoice::Auto,
                BackendArg::Cpu => weft::run::BackendChoice::Cpu,
                BackendArg::Gpu => weft::run::BackendChoice::Gpu,
            };
            if flags.prompts.is_some() {
                let prompts = weft_runtime::generate::prompt_lines(&prompt);
                let texts = report(weft::run::generate_many_on(&run, &prompts, &options, &sampling, choice, &reach))?;
                for (i, (kept, text)) in texts.iter().enumerate() {
                    println!("{}", weft_runtime::generate::json_line(i, kept, text));
                }
                return Ok(());
            }
            let (kept, _) =
                report(weft::run::generate_on(&run, &prompt, &options, &sampling, choice, &reach, |kept, t| {
                    if !shown {
                        print!("{kept}");
                        shown = true;
                    }
                    print!("{t}");
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                }))?;
            if !shown {
                print!("{kept}");
            }
            println!();
        }
        Command::Shard { tokenizer, out, inputs } => {
            use weft_runtime::data::{corpus, shards, Tokenizer};
            let tok = report(Tokenizer::load(&tokenizer).map_err(|e| e.0))?;
            let files = report(corpus::text_files(&inputs).map_err(|e| e.0))?;
            let docs = report(corpus::read_documents(&files).map_err(|e| e.0))?;
            let tokens = report(corpus::pack(&docs, &tok).map_err(|e| e.0))?;
            report(shards::write(&out, tok.vocab_size() as u32, &tokens).map_err(|e| e.0))?;
            println!(
                "{} documents, {} tokens, vocabulary {} -> {}",
                docs.len(),
                tokens.len(),
                tok.vocab_size(),
                out.display()
            );
        }
        Command::Bench { spec, scaling, seq, batch, steps, compile, config, backend, decode } => {
            if scaling {
                print!("{}", report(weft::bench::bench_scaling())?);
                return Ok(());
            }
            let Some(spec) = spec else {
                eprintln!("error: name a spec to benchmark");
                return Err(Reported);
            };
            if decode && backend != BackendArg::Gpu {
                eprintln!("error: --decode times generation on the GPU: add --backend gpu (the CPU bench already reports decode tokens/s)");
                return Err(Reported);
            }
            if backend == BackendArg::Gpu && !compile {
                let steps = if decode { steps.max(2) } else { steps.max(1) };
                let r = report(weft::bench::bench_gpu(&spec, seq, batch, steps, decode))?;
                print!("{r}");
            } else if compile {
                let settings = config.as_deref().map(load_config).transpose()?.unwrap_or_default();
                let r = report(weft::bench::bench_compile(&spec, &settings))?;
                print!("{}", r.render());
            } else {
                let r = report(weft::bench::bench_cpu(&spec, seq, batch, steps.max(1)))?;
                print!("{}", r.render());
            }
        }
        Command::Graph { spec, dot, train, fused, dump_dir } => {
            let checked = front_end(&spec)?;
            let mut g = checked.graph;
            if train {
                g = report(weft::program::train_step_graph(&g).map_err(|e| e.0))?;
            }
            if fused || dump_dir.is_some() {
                let (out, log) =
                    report(weft::passes::run(g.clone(), weft::passes::FUSION, dump_dir.is_some()).map_err(|e| e.0))?;
                if let Some(dir) = dump_dir {
                    report(
                        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display())),
                    )?;
                    for (i, (stage, text)) in log.stages.iter().enumerate() {
                        let path = dir.join(format!("{i:02}-{stage}.txt"));
                        report(
                            std::fs::write(&path, text).map_err(|e| format!("cannot write `{}`: {e}", path.display())),
                        )?;
                    }
                    for (pass, n) in &log.rewrites {
                        eprintln!("{pass}: {n} rewrites");
                    }
                }
                if fused {
                    g = out;
                }
            }
            if dot {
                print!("{}", graph::to_dot(&g));
            } else {
                print!("{}", graph::dump(&g));
            }
        }
    }
    Ok(())
}

/// Reports what lowering the spec's program found (no kernel is compiled), at the spec's
/// lines: every GPU limit a launch would exceed (errors) and every layer that runs on a slower
/// kernel (warnings).
fn gpu_findings(
    checked: &weft::Checked,
    findings: Result<Vec<weft::lower::Finding>, weft::lower::Located>,
) -> Result<(), Reported> {
    use weft::diag::Diagnostics;
    use weft::lower::Severity;
    let mut diags = Diagnostics::default();
    match findings {
        Ok(findings) => {
            // A fallback once per message (layers of a kind share kernels), a limit once per
            // place in the spec, with how many more there are.
            let same = |a: &weft::lower::Finding, b: &weft::lower::Finding| {
                a.severity == b.severity
                    && match a.severity {
                        Severity::Fallback => a.at.message == b.at.message,
                        Severity::Limit => a.at.at == b.at.at,
                    }
            };
            let mut groups: Vec<(&weft::lower::Finding, usize)> = Vec::new();
            for f in &findings {
                match groups.iter_mut().find(|(g, _)| same(g, f)) {
                    Some((_, n)) => *n += 1,
                    None => groups.push((f, 1)),
                }
            }
            for (f, n) in groups {
                let mut d = weft::lowering_diagnostic(&f.at, f.severity, f.severity == Severity::Limit);
                if n > 1 {
                    let what = match f.severity {
                        Severity::Fallback => "steps of the program run the same slower kernel",
                        Severity::Limit => "launches of this layer exceed limits too",
                    };
                    d = d.note(format!("{} more {what}", n - 1));
                }
                diags.push(d);
            }
        }
        Err(e) if e.message.contains("has no GPU kernel yet") => diags.push(
            weft::lowering_diagnostic(&e, Severity::Fallback, false)
                .note("this spec trains and generates on the CPU reference only"),
        ),
        Err(e) => diags.push(weft::lowering_diagnostic(&e, Severity::Limit, true)),
    }
    if diags.is_empty() {
        return Ok(());
    }
    diags.eprint(&checked.sources);
    if diags.error_count() > 0 {
        Err(Reported)
    } else {
        Ok(())
    }
}

/// A spec's program and the shapes its plans are lowered for, from the run settings.
fn build_inputs(
    spec: &Path,
    settings: &config::RunConfig,
) -> Result<(Checked, weft_runtime::plan::Program, weft::build::Shapes), Reported> {
    let checked = front_end(spec)?;
    let max_context = settings.train.seq_len + settings.generate.max_new_tokens;
    let opt = weft::program::OptimizerSettings::from_config(settings);
    let program = report(weft::program::build_program(&checked.model, &opt, max_context).map_err(|e| e.0))?;
    let shapes = weft::build::Shapes::from_settings(settings);
    Ok((checked, program, shapes))
}

fn build(
    spec: &Path,
    settings: &config::RunConfig,
    out: Option<PathBuf>,
    emit: Option<EmitStage>,
    dump_dir: Option<PathBuf>,
    no_cache: bool,
    no_cubin: bool,
) -> Result<(), Reported> {
    use weft::build::{build_bundle, lower_program};
    use weft::lower::cache::Cache;
    let (checked, program, shapes) = build_inputs(spec, settings)?;
    let source = weft_runtime::bundle::BundleSource {
        spec: checked.source(),
        settings: weft::run::run_settings(settings),
        max_context: weft::run::max_context(settings),
    };
    let write = |path: PathBuf, text: &str| {
        report(std::fs::write(&path, text).map_err(|e| format!("cannot write `{}`: {e}", path.display())))
    };
    let train_graph = || report(weft::program::train_step_graph(&checked.graph).map_err(|e| e.0));
    let stages_needed = emit.is_some() || dump_dir.is_some();
    let lowered =
        if stages_needed { Some(report(lower_program(&program, &shapes).map_err(|e| e.to_string()))?) } else { None };
    if let Some(dir) = &dump_dir {
        report(std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display())))?;
        let (fused, log) = report(weft::passes::run(train_graph()?, weft::passes::FUSION, true).map_err(|e| e.0))?;
        let _ = fused;
        for (i, (stage, text)) in log.stages.iter().enumerate() {
            write(dir.join(format!("graph-{i:02}-{stage}.txt")), text)?;
        }
        let lowered = lowered.as_ref().expect("lowered above");
        write(dir.join("device-plans.txt"), &weft::build::render_plans(&lowered.plans))?;
        for k in lowered.kernels.values() {
            write(dir.join(format!("{}.mlir", k.name)), &k.mlir)?;
        }
    }
    if let Some(stage) = emit {
        let lowered = lowered.as_ref().expect("lowered above");
        match stage {
            EmitStage::Graph => print!("{}", graph::dump(&train_graph()?)),
            EmitStage::Fused => {
                let (g, _) = report(weft::passes::run(train_graph()?, weft::passes::FUSION, false).map_err(|e| e.0))?;
                print!("{}", graph::dump(&g));
            }
            EmitStage::Kernels => print!("{}", weft::build::render_plans(&lowered.plans)),
            EmitStage::Mlir => {
                for k in lowered.kernels.values() {
                    println!("// ---- kernel {} ----\n{}", k.name, k.mlir);
                }
            }
            EmitStage::Ptx => {
                let cache = if no_cache { Cache::disabled() } else { Cache::user() };
                let mut stats = Default::default();
                let ptx = report(
                    weft::build::compile_kernels(&lowered.kernels, &cache, &mut stats).map_err(|e| e.to_string()),
                )?;
                for (name, p) in &ptx {
                    println!("// ---- kernel {name} ----\n{p}");
                }
            }
        }
        return Ok(());
    }
    let cache = if no_cache { Cache::disabled() } else { Cache::user() };
    let (mut bundle, stats) = match build_bundle(&program, &shapes, &cache) {
        Ok(b) => b,
        Err(e) => {
            // Lowering errors and GPU limits point at the spec's lines.
            let mut diags = weft::diag::Diagnostics::default();
            match &e {
                weft::build::BuildError::Lower(l) => {
                    diags.push(weft::lowering_diagnostic(l, weft::lower::Severity::Limit, true))
                }
                weft::build::BuildError::Limits(v) => {
                    for l in v {
                        diags.push(weft::lowering_diagnostic(l, weft::lower::Severity::Limit, true));
                    }
                }
                weft::build::BuildError::Compile(_) => return report(Err(e.to_string())),
            }
            diags.eprint(&checked.sources);
            return Err(Reported);
        }
    };
    bundle.source = Some(source);
    let cubins = match weft::snapshot::ptxas_path().filter(|_| !no_cubin) {
        Some(ptxas) => {
            let t = std::time::Instant::now();
            let fresh = report(weft::build::add_cubins(&mut bundle, &ptxas, &cache))?;
            format!(", cubins for sm_90 ({fresh} assembled in {:.1} s)", t.elapsed().as_secs_f64())
        }
        None => ", PTX only (ptxas not found)".to_string(),
    };
    if let Some(dir) = &dump_dir {
        for k in &bundle.kernels {
            write(dir.join(format!("{}.ptx", k.name)), &k.ptx)?;
        }
    }
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{}.bundle", program.model)));
    report(bundle.write(&out).map_err(|e| e.0))?;
    let train = &bundle.plans["train_step"].1;
    println!(
        "{} -> {}: {} plans, {} kernels ({} from the cache), lowered in {:.0} ms, compiled in {:.0} ms{cubins}",
        spec.display(),
        out.display(),
        bundle.plans.len(),
        stats.kernels,
        stats.cached,
        stats.lower_ms,
        stats.compile_ms
    );
    println!(
        "training step at {} x {}: {} device steps, arena {:.1} MiB, scratch {:.1} MiB",
        settings.train.batch_size,
        settings.train.seq_len,
        train.steps.len(),
        train.memory.arena_bytes as f64 / (1u64 << 20) as f64,
        train.scratch_bytes as f64 / (1u64 << 20) as f64
    );
    Ok(())
}

/// Tells the allocator to keep memory it frees instead of handing it back to the kernel after
/// 10 ms: a build frees one whole-model graph and allocates the next, and every page handed
/// back came again as a fresh page the kernel zeroed (a fifth of a 4096-layer check).
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h's option enum, which the bindings do not name.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a plain option value; mimalloc reads it when it next purges.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe would panic; a command-line tool
    // should end quietly, as `cat` does.
    // SAFETY: called first, before any thread exists; sets a signal disposition only.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Reported) => ExitCode::FAILURE,
    }
}
