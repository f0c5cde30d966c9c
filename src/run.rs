//! Running a spec: training it on text with the CPU reference (or any backend), and generating
//! text from a trained run. This is where the spec, the run settings, the data and a backend
//! meet; the loop itself lives in the runtime crate so that a GPU machine can run it without the
//! compiler.

use crate::config::{DataFormat, RunConfig};
use crate::program::{build_program, OptimizerSettings};
use crate::spec::Model;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use weft_runtime::backend::{Backend, CpuBackend};
use weft_runtime::cpu::tensor::Tensor;

use weft_runtime::data::corpus::{load_shards, pack, read_documents, text_files, unigram_entropy};
use weft_runtime::data::{Tokenizer, Windows};
use weft_runtime::generate::Sampling;
use weft_runtime::io;
use weft_runtime::plan::Program;
use weft_runtime::run::{sha256, RunInfo, RunSettings};
use weft_runtime::train::{train, Summary, TrainOptions};

/// The settings of `c` that shape a run (what `run.json` and checkpoints identify it by).
pub fn run_settings(c: &RunConfig) -> RunSettings {
    let opt = OptimizerSettings::from_config(c);
    let tokenizer = match c.data.tokenizer.as_deref() {
        None | Some("bpe") => "bpe",
        Some("byte") => "byte",
        Some(_) => "file",
    };
    RunSettings {
        seq_len: c.train.seq_len,
        batch_size: c.train.batch_size,
        grad_accum: c.train.grad_accum,
        seed: c.train.seed,
        schedule_steps: opt.schedule.total,
        warmup_steps: opt.schedule.warmup,
        lr: opt.schedule.peak,
        min_lr: opt.schedule.min,
        beta1: opt.adamw.beta1,
        beta2: opt.adamw.beta2,
        eps: opt.adamw.eps,
        weight_decay: opt.adamw.weight_decay,
        grad_clip: opt.grad_clip,
        tokenizer: tokenizer.to_string(),
        data_format: match c.data.format {
            DataFormat::Text => "text",
            DataFormat::Tokens => "tokens",
        }
        .to_string(),
    }
}

/// The longest context the generation plans of a run with settings `c` take.
pub fn max_context(c: &RunConfig) -> u64 {
    c.train.seq_len + c.generate.max_new_tokens
}

/// The spec checked and its program built; errors come back rendered.
pub fn program_for(spec: &Path, settings: &RunConfig, max_context: u64) -> Result<(crate::Checked, Program), String> {
    let checked = crate::check_file(spec).map_err(|f| f.render())?;
    let opt = OptimizerSettings::from_config(settings);
    let program = build_program(&checked.model, &opt, max_context).map_err(|e| e.0)?;
    Ok((checked, program))
}

/// Everything a training run prints at the end.
pub struct TrainReport {
    pub summary: Summary,
    pub out_dir: PathBuf,
    pub tokenizer: String,
    pub corpus_tokens: usize,
    pub unigram_entropy: f64,
    /// Where it ran, in words.
    pub backend: String,
}

/// Where a run computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The GPU when one is usable, else the CPU reference.
    Auto,
    Cpu,
    /// The CPU reference in double precision (the check mode).
    CpuF64,
    Gpu,
}

/// The backend for `program` under `choice`: the GPU's needs the program compiled to a bundle
/// at the run's shapes. Returns the backend and its description.
pub fn make_backend(
    program: Program,
    c: &RunConfig,
    choice: BackendChoice,
) -> Result<(Box<dyn Backend>, String), String> {
    make_backend_with(program, c, choice, None)
}

/// [`make_backend`] with the parameters given (a checkpoint's) instead of initialised: the GPU
/// puts them on the device directly, with no initialisation to overwrite.
pub fn make_backend_with(
    program: Program,
    c: &RunConfig,
    choice: BackendChoice,
    params: Option<BTreeMap<String, Tensor<f32>>>,
) -> Result<(Box<dyn Backend>, String), String> {
    use weft_runtime::cuda::{Gpu, GpuBackend};
    let gpu = match choice {
        BackendChoice::Cpu | BackendChoice::CpuF64 => None,
        BackendChoice::Gpu => Some(Gpu::open(0).map_err(|e| format!("no usable GPU: {e}"))?),
        BackendChoice::Auto => Gpu::open(0).ok(),
    };
    match gpu {
        Some(gpu) => {
            let shapes = crate::build::Shapes::from_settings(c);
            let (bundle, _) = crate::build::build_bundle(&program, &shapes, &crate::lower::cache::Cache::user())
                .map_err(|e| e.to_string())?;
            let name = format!("the GPU ({})", gpu.name);
            let be = match params {
                Some(p) => GpuBackend::with_parameters(gpu, bundle, p),
                None => GpuBackend::new(gpu, bundle, c.train.seed),
            };
            Ok((Box::new(be.map_err(|e| e.0)?), name))
        }
        None => {
            let (mut be, name) = if choice == BackendChoice::CpuF64 {
                (CpuBackend::new_f64(program, c.train.seed), "the CPU reference (f64)")
            } else {
                (CpuBackend::new(program, c.train.seed), "the CPU reference")
            };
            if let Some(p) = params {
                be.write(p)?;
            }
            Ok((Box::new(be), name.into()))
        }
    }
}

/// The backend of a data-parallel rank: the CPU reference, or GPU `device` with the program
/// compiled for it; parameters from the run's seed (every rank's the same). With `shard`, the
/// rank keeps only its share of the optimizer state.
fn rank_backend(
    program: &Program,
    c: &RunConfig,
    on_gpu: bool,
    device: usize,
    shard: Option<(&weft_runtime::zero::Shards, usize)>,
) -> Result<Box<dyn Backend>, String> {
    use weft_runtime::cuda::{Gpu, GpuBackend};
    if !on_gpu {
        let own = match shard {
            Some((z, rank)) => z.program_for(rank)?.0,
            None => program.clone(),
        };
        return Ok(Box::new(CpuBackend::new(own, c.train.seed)));
    }
    let gpu = Gpu::open(device).map_err(|e| format!("no GPU {device} for a rank: {e}"))?;
    let shapes = crate::build::Shapes::from_settings(c);
    let (bundle, _) =
        crate::build::build_bundle(program, &shapes, &crate::lower::cache::Cache::user()).map_err(|e| e.to_string())?;
    let bundle = match shard {
        Some((z, rank)) => z.bundle_for(&bundle, rank)?,
        None => bundle,
    };
    Ok(Box::new(GpuBackend::new(gpu, bundle, c.train.seed).map_err(|e| e.0)?))
}

/// How a training run starts besides its settings.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    pub progress: bool,
    /// Resume even though the spec, settings or tokenizer changed (recorded in run.json).
    pub accept_changes: bool,
    /// Start from another run's newest parameters, with a fresh optimizer and schedule.
    pub init_from: Option<PathBuf>,
    /// Data-parallel ranks as threads of this process (on the GPU, rank r on GPU r); None: one,
    /// or this process as one rank where torchrun's environment (WORLD_SIZE, ...) says so.
    pub ranks: Option<u64>,
}

/// Trains `spec` as the run settings say, on the CPU reference.
/// `f64` runs the CPU reference in double precision (the check mode).
pub fn train_cpu(spec: &Path, c: &RunConfig, progress: bool, f64: bool) -> Result<TrainReport, String> {
    let start = StartOptions { progress, ..StartOptions::default() };
    train_on(spec, c, &start, if f64 { BackendChoice::CpuF64 } else { BackendChoice::Cpu })
}

/// Trains `spec` as the run settings say, on the backend `choice` picks.
pub fn train_on(
    spec: &Path,
    c: &RunConfig,
    start: &StartOptions,
    choice: BackendChoice,
) -> Result<TrainReport, String> {
    let max_context = max_context(c);
    let (checked, program) = program_for(spec, c, max_context)?;
    let model = &checked.model;
    let out_dir = c.checkpoint.dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&model.name));
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create `{}`: {e}", out_dir.display()))?;

    // The backend first: a missing GPU is reported before any data is read.
    let layout = weft_runtime::collective::Layout::new(start.ranks)?;
    let ranks = layout.world();
    let distributed = layout != weft_runtime::collective::Layout::Threads(1) || start.ranks.is_some();
    if distributed && choice == BackendChoice::CpuF64 {
        return Err("the f64 check mode runs one rank: leave out --ranks".into());
    }
    if c.train.grad_accum % ranks as u64 != 0 {
        return Err(format!(
            "{ranks} ranks share each step's train.grad_accum = {} micro-batches: make it a multiple of {ranks}",
            c.train.grad_accum
        ));
    }
    // One backend, or where the ranks run (each rank makes its own on its thread and GPU, from
    // the program kept for them).
    let mut program = Some(program);
    let (mut backend, mut backend_name, on_gpu) = match distributed {
        false => {
            let (b, name) = make_backend(program.take().expect("not yet taken"), c, choice)?;
            let on_gpu = !b.name().starts_with("cpu");
            (Some(b), name, on_gpu)
        }
        true => {
            let last = layout.devices().into_iter().max().unwrap_or(0);
            let gpu = match choice {
                BackendChoice::Gpu => {
                    Some(weft_runtime::cuda::Gpu::open(last).map_err(|e| format!("no usable GPU {last}: {e}"))?)
                }
                BackendChoice::Auto => weft_runtime::cuda::Gpu::open(last).ok(),
                _ => None,
            };
            match gpu {
                Some(g) => (None, format!("the GPU ({})", g.name), true),
                None => (None, "the CPU reference".to_string(), false),
            }
        }
    };
    if !on_gpu {
        fits_in_memory(model, c, choice == BackendChoice::CpuF64, layout.devices().len())?;
    }
    let data = load_data(c, model, &out_dir)?;
    let entropy = unigram_entropy(&data.train.iter().chain(&data.valid).copied().collect::<Vec<_>>());
    let corpus_tokens = data.train.len() + data.valid.len();
    let seq = c.train.seq_len as usize;
    let train_w = Windows::new(data.train, seq, Path::new("the training data")).map_err(|e| e.0)?;
    let valid_w = Windows::new(data.valid, seq, Path::new("the held-out data")).map_err(|e| e.0)?;
    let info = RunInfo::new(
        &model.name,
        checked.source(),
        run_settings(c),
        data.name.clone(),
        data.json.as_deref().map(|j| sha256(j.as_bytes())),
        max_context,
    );
    let opts = TrainOptions {
        steps: c.train.steps,
        log_every: c.train.log_every,
        eval_every: c.train.eval_every,
        eval_batches: c.train.eval_batches as usize,
        out_dir: out_dir.clone(),
        checkpoint_every: c.checkpoint.every,
        keep: c.checkpoint.keep as usize,
        progress: start.progress,
        run: info,
        accept_changes: start.accept_changes,
        init_from: start.init_from.clone(),
        tokenizer_json: data.json,
    };
    let summary = match backend.as_mut() {
        Some(backend) => train(backend.as_mut(), &train_w, &valid_w, &opts)?,
        None => {
            // Each rank's backend is made on its thread, on its GPU; GPUs sum gradients through
            // NCCL, the CPU's ranks through the host.
            let program = program.as_ref().expect("kept for the ranks");
            // Several ranks each keep their share of the optimizer state (ZeRO-1).
            let shards = (ranks > 1).then(|| weft_runtime::zero::Shards::new(program, ranks));
            let summary = weft_runtime::collective::run(
                &layout,
                on_gpu,
                |rank, device| rank_backend(program, c, on_gpu, device, shards.as_ref().map(|z| (z, rank))),
                |be, group| weft_runtime::train::train_ranked(be, &train_w, &valid_w, &opts, group, shards.as_ref()),
            )?;
            backend_name = match &layout {
                weft_runtime::collective::Layout::Process(r) => {
                    format!("rank {} of {ranks} data-parallel ranks on {backend_name}", r.rank)
                }
                _ => format!("{ranks} data-parallel ranks on {backend_name}"),
            };
            summary
        }
    };
    Ok(TrainReport {
        summary,
        out_dir,
        tokenizer: data.name,
        corpus_tokens,
        unigram_entropy: entropy,
        backend: backend_name,
    })
}

/// Refuses a CPU run whose training step would not fit this machine's memory, with the numbers
/// (each of `ranks` data-parallel ranks holds a whole copy).
fn fits_in_memory(model: &Model, c: &RunConfig, f64: bool, ranks: usize) -> Result<(), String> {
    let m = crate::analysis::memory_report(model, c.train.batch_size, c.train.seq_len)?;
    let need = if f64 { 2 * m.cpu_bytes } else { m.cpu_bytes } * ranks as u64;
    match weft_runtime::io::available_memory() {
        Some(avail) if need > avail => Err(format!(
            "a training step of {} × {} tokens needs about {} on the CPU reference{}{} (activations {}, parameters and optimizer state {}), but this machine has {} available: lower train.batch_size or train.seq_len",
            c.train.batch_size,
            c.train.seq_len,
            io::size(need),
            if f64 { " in f64" } else { "" },
            if ranks > 1 { format!(" for {ranks} ranks") } else { String::new() },
            io::size(2 * m.train_peak_live_bytes * if f64 { 2 } else { 1 }),
            io::size((m.cpu_bytes - 2 * m.train_peak_live_bytes) * if f64 { 2 } else { 1 }),
            io::size(avail)
        )),
        _ => Ok(()),
    }
}

/// A run's tokenizer and token streams.
struct Data {
    /// `byte`, or `tokenizer.json` (the file the run keeps).
    name: String,
    /// That file's text (none for bytes).
    json: Option<String>,
    train: Vec<u32>,
    valid: Vec<u32>,
}

/// The tokenizer (trained, read from the run directory, or read from a given file; nothing is
/// written here: the training loop keeps it once the run is known to be this one) and the
/// training and held-out token streams.
fn load_data(c: &RunConfig, model: &Model, out_dir: &Path) -> Result<Data, String> {
    let vocab = model.vocab as usize;
    let tok_spec = c.data.tokenizer.clone().unwrap_or_else(|| "bpe".to_string());
    let saved = out_dir.join("tokenizer.json");
    let read_saved = || -> Result<(Tokenizer, String), String> {
        let json = io::read_text(&saved, io::limits::TOKENIZER, "tokenizer")?;
        let t = Tokenizer::from_json(&json).map_err(|e| format!("`{}`: {}", saved.display(), e.0))?;
        Ok((t, json))
    };
    let read_file = |path: &str| -> Result<(Tokenizer, String), String> {
        let json = io::read_text(Path::new(path), io::limits::TOKENIZER, "tokenizer")?;
        let t = Tokenizer::from_json(&json).map_err(|e| format!("`{path}`: {}", e.0))?;
        Ok((t, json))
    };
    let named = |t: Tokenizer, json: Option<String>| match json {
        None => (t, "byte".to_string(), None),
        Some(j) => (t, "tokenizer.json".to_string(), Some(j)),
    };
    let train_files = text_files(&c.data.train).map_err(|e| e.0)?;
    let check_vocab = |t: &Tokenizer| -> Result<(), String> {
        if t.vocab_size() > vocab {
            return Err(format!(
                "the {} tokenizer has {} tokens but the model's vocabulary is {vocab}: use a model with vocab ≥ {} or a smaller tokenizer",
                t.kind(),
                t.vocab_size(),
                t.vocab_size()
            ));
        }
        Ok(())
    };
    if c.data.format == DataFormat::Tokens {
        // Shards are tokenized already; the tokenizer is kept for generation.
        let (tokenizer, name, json) = match tok_spec.as_str() {
            "byte" => named(Tokenizer::Bytes, None),
            "bpe" => return Err(
                "token shards need the tokenizer that made them: set `data.tokenizer` to `byte` or a tokenizer.json"
                    .into(),
            ),
            path => {
                let (t, j) = read_file(path)?;
                named(t, Some(j))
            }
        };
        check_vocab(&tokenizer)?;
        let train = load_shards(&train_files, vocab).map_err(|e| e.0)?;
        let valid = load_shards(&text_files(&c.data.valid).map_err(|e| e.0)?, vocab).map_err(|e| e.0)?;
        return Ok(Data { name, json, train, valid });
    }
    let mut docs = read_documents(&train_files).map_err(|e| e.0)?;
    let valid_docs = if c.data.valid.is_empty() {
        if docs.len() < 2 {
            return Err("hold-out needs at least two documents: give `data.valid`, or more training files".into());
        }
        let n = ((docs.len() as f64 * c.data.valid_fraction).ceil() as usize).clamp(1, docs.len() - 1);
        docs.split_off(docs.len() - n)
    } else {
        read_documents(&text_files(&c.data.valid).map_err(|e| e.0)?).map_err(|e| e.0)?
    };
    let (tokenizer, name, json) = match tok_spec.as_str() {
        "byte" => named(Tokenizer::Bytes, None),
        "bpe" if saved.exists() => {
            let (t, j) = read_saved()?;
            named(t, Some(j))
        }
        "bpe" => {
            let t = Tokenizer::train_bpe(&docs, vocab).map_err(|e| e.0)?;
            let j = t.to_json().map_err(|e| e.0)?;
            named(t, j)
        }
        path => {
            let (t, j) = read_file(path)?;
            named(t, Some(j))
        }
    };
    check_vocab(&tokenizer)?;
    let train = pack(&docs, &tokenizer).map_err(|e| e.0)?;
    let valid = pack(&valid_docs, &tokenizer).map_err(|e| e.0)?;
    Ok(Data { name, json, train, valid })
}

/// A trained run, opened for generation: its recorded spec checked and built into a program,
/// its newest parameters and its tokenizer, each checked against `run.json`.
pub struct OpenRun {
    pub info: RunInfo,
    pub program: Program,
    pub params: BTreeMap<String, Tensor<f32>>,
    pub tokenizer: Tokenizer,
    /// The checkpoint read.
    pub checkpoint: PathBuf,
}

/// Opens `run_dir` for generation. The model is rebuilt from the spec text `run.json` keeps
/// (an edited spec file changes nothing); a checkpoint or tokenizer that is not the run's is
/// refused.
pub fn open_run(run_dir: &Path) -> Result<OpenRun, String> {
    open_run_for(run_dir, None)
}

/// [`open_run`] with generation plans for a context of `context` tokens instead of the run's
/// (recurrent and sliding-window layers keep constant state; full attention's cache grows).
pub fn open_run_for(run_dir: &Path, context: Option<u64>) -> Result<OpenRun, String> {
    open_run_with(run_dir, context, None)
}

/// [`open_run_for`] with Self-Extend on the model's full-attention layers.
pub fn open_run_with(
    run_dir: &Path,
    context: Option<u64>,
    self_extend: Option<weft_runtime::op::SelfExtend>,
) -> Result<OpenRun, String> {
    let mut info = RunInfo::read(run_dir)?.ok_or_else(|| {
        format!("`{}` is not a training run (it has no {})", run_dir.display(), weft_runtime::run::RUN_INFO)
    })?;
    let checked = crate::check_source(&info.spec).map_err(|f| {
        format!("the spec recorded in `{}` no longer checks:\n{}", run_dir.join("run.json").display(), f.render())
    })?;
    if let Some(c) = context {
        if c < 2 {
            return Err(format!("a context of {c} tokens leaves no room for a prompt and a new token"));
        }
        info.max_context = c;
    }
    let settings = RunConfig::default();
    let model = match self_extend {
        Some(se) => checked.model.with_self_extend(se)?,
        None => checked.model,
    };
    let program =
        build_program(&model, &OptimizerSettings::from_config(&settings), info.max_context).map_err(|e| e.0)?;
    let r = weft_runtime::run::open_for_generation(run_dir, &info, &program)?;
    Ok(OpenRun { info, program, params: r.params, tokenizer: r.tokenizer, checkpoint: r.checkpoint })
}

pub use weft_runtime::generate::GenerateOptions;

/// How far generation reaches past the run's own context.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reach {
    /// Prompt and new tokens together (default: the run's context).
    pub context: Option<u64>,
    /// Self-Extend on the full-attention layers.
    pub self_extend: Option<weft_runtime::op::SelfExtend>,
}

/// The backend for generating from the newest checkpoint of a run directory (the recorded spec
/// compiled at the run's shapes for `slots` sequences at once, on the GPU when `choice` says so,
/// else the CPU reference), its parameters in place; with the run's tokenizer and context.
fn open_generator(
    run_dir: &Path,
    choice: BackendChoice,
    slots: usize,
    reach: &Reach,
) -> Result<(Box<dyn Backend>, Tokenizer, usize), String> {
    let run = open_run_with(run_dir, reach.context, reach.self_extend)?;
    // Self-Extend runs on the CPU reference (the GPU's kernels have none yet).
    let choice = match (reach.self_extend, choice) {
        (Some(_), BackendChoice::Auto) => BackendChoice::Cpu,
        (Some(_), BackendChoice::Gpu) => {
            return Err(
                "Self-Extend has no GPU kernels yet: generate with it on the CPU reference (--backend cpu)".into()
            )
        }
        (_, c) => c,
    };
    let c = generation_config(&run.info, slots);
    let (backend, _) = make_backend_with(run.program, &c, choice, Some(run.params))?;
    Ok((backend, run.tokenizer, run.info.max_context as usize))
}

/// The run settings a run's generation plans are built with, for `slots` sequences at once.
fn generation_config(info: &weft_runtime::run::RunInfo, slots: usize) -> RunConfig {
    let s = &info.settings;
    let mut c = RunConfig::default();
    c.train.batch_size = s.batch_size;
    // Prompt and new tokens share the context: the generation plans' length.
    c.train.seq_len = s.seq_len.min(info.max_context);
    c.train.seed = s.seed;
    c.generate.max_new_tokens = info.max_context - c.train.seq_len;
    c.generate.batch = slots as u64;
    c
}

/// Serves the newest checkpoint of a run directory over HTTP (see `weft_runtime::serve`), the
/// backend built on the engine's thread; `ready` gets the address once it listens.
pub fn serve_on(
    run_dir: &Path,
    choice: BackendChoice,
    flags: &weft_runtime::serve::ServeFlags,
    slots: usize,
    context: Option<u64>,
) -> Result<(), String> {
    let run = open_run_for(run_dir, context)?;
    // One row more than the slots: the staging row where long prompts are prefilled in chunks
    // between decode steps (the GPU runs plans at their built batch; the CPU at any).
    let chunked = flags.prefill_chunk != Some(0);
    let c = generation_config(&run.info, slots + usize::from(chunked));
    let context = run.info.max_context as usize;
    let vocab = run.program.vocab().ok_or("the model has no embedding table")?;
    let model = run.program.model.clone();
    let o = flags.options(model, context, slots);
    let (program, params) = (run.program, run.params);
    let make = Box::new(move || make_backend_with(program, &c, choice, Some(params)).map(|(b, _)| b));
    weft_runtime::serve::serve(o, run.tokenizer, vocab, make, |addr| eprintln!("listening on http://{addr}"))
}

/// Generates text from the newest checkpoint of a run directory, on the GPU when `choice` says
/// so (the recorded spec compiled at the run's shapes) or the CPU reference. `out` gets the
/// prompt as kept with each piece of text; returns the prompt as kept and the text.
pub fn generate_on(
    run_dir: &Path,
    prompt: &str,
    o: &GenerateOptions,
    sampling: &Sampling,
    choice: BackendChoice,
    reach: &Reach,
    out: impl FnMut(&str, &str),
) -> Result<(String, String), String> {
    let (mut backend, tokenizer, context) = open_generator(run_dir, choice, 1, reach)?;
    weft_runtime::generate::generate_text(backend.as_mut(), &tokenizer, context, prompt, o, sampling, out)
}

/// The most sequences `weft generate --prompts` decodes at once.
pub const GENERATE_SLOTS: usize = 16;

/// [`generate_on`] for several prompts at once (continuous batching in up to
/// [`GENERATE_SLOTS`] slots); each prompt as kept and its text, in order.
pub fn generate_many_on(
    run_dir: &Path,
    prompts: &[String],
    o: &GenerateOptions,
    sampling: &Sampling,
    choice: BackendChoice,
    reach: &Reach,
) -> Result<Vec<(String, String)>, String> {
    if prompts.is_empty() {
        return Err("no prompts: give one per line".into());
    }
    let slots = prompts.len().clamp(1, GENERATE_SLOTS);
    let (mut backend, tokenizer, context) = open_generator(run_dir, choice, slots, reach)?;
    weft_runtime::generate::generate_texts(backend.as_mut(), &tokenizer, context, slots, prompts, o, sampling)
}

/// [`generate_on`] on the CPU reference.
pub fn generate_cpu(
    run_dir: &Path,
    prompt: &str,
    o: &GenerateOptions,
    sampling: &Sampling,
    out: impl FnMut(&str, &str),
) -> Result<(String, String), String> {
    generate_on(run_dir, prompt, o, sampling, BackendChoice::Cpu, &Reach::default(), out)
}

/// `weft eval ppl`: perplexity of a run's newest checkpoint at each length on held-out text,
/// on the CPU reference (chunked scoring; full attention's cache sized for the longest length);
/// prints the table, writes the plot where asked, and gives the rows.
pub fn eval_ppl(
    run_dir: &Path,
    flags: &weft_runtime::eval::PplFlags,
) -> Result<Vec<weft_runtime::eval::Perplexity>, String> {
    let (_, longest) = flags.lengths()?;
    let self_extend = flags.self_extend()?;
    let run = open_run_with(run_dir, Some(longest as u64 + 1), self_extend)?;
    let mut backend = CpuBackend::new(run.program, 0);
    backend.write(run.params)?;
    let title = match self_extend {
        Some(se) => format!(
            "perplexity against context length: {}, Self-Extend W={} G={} (reach {} tokens)",
            run_dir.display(),
            se.neighbours,
            se.group,
            se.reach(run.info.settings.seq_len)
        ),
        None => format!("perplexity against context length: {}", run_dir.display()),
    };
    flags.run(&mut backend, &run.tokenizer, &title)
}

/// `weft eval passkey`: passkey retrieval of a run's newest checkpoint on the CPU reference
/// (generation plans for the longest prompt and its answer); prints the table, writes the heat
/// map where asked, and gives the cells.
pub fn eval_passkey(
    run_dir: &Path,
    flags: &weft_runtime::passkey::PasskeyFlags,
) -> Result<Vec<weft_runtime::passkey::Cell>, String> {
    let (_, longest) = flags.lengths()?;
    let run = open_run_for(run_dir, Some((longest + weft_runtime::passkey::KEY_DIGITS + 1) as u64))?;
    let mut backend = CpuBackend::new(run.program, 0);
    backend.write(run.params)?;
    let title = format!("passkey retrieval: {}", run_dir.display());
    flags.run(&mut backend, &run.tokenizer, &title)
}
