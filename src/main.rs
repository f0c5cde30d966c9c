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
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the typed graph of a spec as text, or as Graphviz with --dot.
    Graph {
        spec: PathBuf,
        #[arg(long)]
        dot: bool,
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
    config::load(path).map_err(|(sources, diags)| {
        diags.eprint(&sources);
        Reported
    })
}

fn run(cli: Cli) -> Result<(), Reported> {
    match cli.command {
        Command::Check { spec, seq, config, json } => {
            let settings = config.as_deref().map(load_config).transpose()?;
            let checked = front_end(&spec)?;
            let seq = seq.or(settings.map(|s| s.train.seq_len)).unwrap_or(4096);
            let report = analysis::analyze(&checked.graph, &checked.model, seq);
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
        Command::Graph { spec, dot } => {
            let checked = front_end(&spec)?;
            if dot {
                print!("{}", graph::to_dot(&checked.graph));
            } else {
                print!("{}", graph::dump(&checked.graph));
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
