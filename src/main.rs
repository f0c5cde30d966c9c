//! The `weft` command line.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use weft::{analysis, config, graph, Checked};

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
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 32))]
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
    /// Train a spec as the run settings say (resumes from the newest checkpoint of the run).
    Train {
        /// Run settings (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The spec (default: the run settings' `spec`).
        spec: Option<PathBuf>,
        /// Steps to train (default: the run settings' `train.steps`).
        #[arg(long)]
        steps: Option<u64>,
        /// Log lines instead of a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Compute in f64 on the CPU reference (the check mode; checkpoints stay f32).
        #[arg(long)]
        f64: bool,
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
        spec: PathBuf,
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        seq: u64,
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
        batch: u64,
        /// Timed repetitions of each plan.
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
    /// Generate text from the newest checkpoint of a training run.
    Generate {
        /// The run directory (the run settings' `checkpoint.dir`).
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_new_tokens: usize,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
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
            let memory = report(analysis::memory_report(&checked.model, batch, seq))?;
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
        }
        Command::Train { config, spec, steps, no_progress, f64 } => {
            let mut settings = load_config(&config)?;
            if let Some(s) = steps {
                settings.train.steps = s;
            }
            let Some(spec) = spec.or_else(|| settings.spec.clone()) else {
                eprintln!("error: no spec: name one on the command line or set `spec` in `{}`", config.display());
                return Err(Reported);
            };
            let r = report(weft::run::train_cpu(&spec, &settings, !no_progress, f64))?;
            let s = &r.summary;
            if s.first_step >= s.steps {
                println!(
                    "{} is already trained to step {}; delete it, or raise --steps, to train more",
                    r.out_dir.display(),
                    s.first_step
                );
            }
            println!(
                "trained {} to step {} on the CPU reference ({} tokenizer, {} corpus tokens)",
                spec.display(),
                s.steps,
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
        Command::Generate { run, prompt, max_new_tokens, temperature, top_p, seed } => {
            if !(temperature >= 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                eprintln!("error: --temperature must be ≥ 0 and --top-p in (0, 1]");
                return Err(Reported);
            }
            let sampling = weft_runtime::generate::Sampling { temperature, top_p, seed };
            print!("{prompt}");
            report(weft::run::generate_cpu(&run, &prompt, max_new_tokens, &sampling, |t| {
                print!("{t}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }))?;
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
        Command::Bench { spec, seq, batch, steps } => {
            let r = report(weft::bench::bench_cpu(&spec, seq, batch, steps.max(1)))?;
            print!("{}", r.render());
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Reported) => ExitCode::FAILURE,
    }
}
