//! Running a spec: training it on text with the CPU reference (or any backend), and generating
//! text from a trained run. This is where the spec, the run settings, the data and a backend
//! meet; the loop itself lives in the runtime crate so that a GPU machine can run it without the
//! compiler.

use crate::config::{DataFormat, RunConfig};
use crate::program::{build_program, OptimizerSettings};
use crate::spec::Model;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use weft_runtime::backend::{Backend, CpuBackend};
use weft_runtime::checkpoint;
use weft_runtime::data::corpus::{load_shards, pack, read_documents, text_files, unigram_entropy};
use weft_runtime::data::{Tokenizer, Windows};
use weft_runtime::generate::{generate, Sampling};
use weft_runtime::plan::Program;
use weft_runtime::train::{train, Summary, TrainOptions};

/// What `weft generate` needs to rebuild a trained model: written into the run directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    /// The spec file, absolute.
    pub spec: PathBuf,
    /// `byte`, or the tokenizer file in the run directory.
    pub tokenizer: String,
    pub max_context: u64,
    pub seed: u64,
}

pub const RUN_INFO: &str = "run.json";

/// The spec checked and its program built; errors come back rendered.
pub fn program_for(spec: &Path, settings: &RunConfig, max_context: u64) -> Result<(Model, Program), String> {
    let checked = crate::check_file(spec).map_err(|f| f.render())?;
    let opt = OptimizerSettings::from_config(settings);
    let program = build_program(&checked.model, &opt, max_context).map_err(|e| e.0)?;
    Ok((checked.model, program))
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
            Ok((Box::new(GpuBackend::new(gpu, bundle, c.train.seed).map_err(|e| e.0)?), name))
        }
        None if choice == BackendChoice::CpuF64 => {
            Ok((Box::new(CpuBackend::new_f64(program, c.train.seed)), "the CPU reference (f64)".into()))
        }
        None => Ok((Box::new(CpuBackend::new(program, c.train.seed)), "the CPU reference".into())),
    }
}

/// Trains `spec` as the run settings say, on the CPU reference.
/// `f64` runs the CPU reference in double precision (the check mode).
pub fn train_cpu(spec: &Path, c: &RunConfig, progress: bool, f64: bool) -> Result<TrainReport, String> {
    train_on(spec, c, progress, if f64 { BackendChoice::CpuF64 } else { BackendChoice::Cpu })
}

/// Trains `spec` as the run settings say, on the backend `choice` picks.
pub fn train_on(spec: &Path, c: &RunConfig, progress: bool, choice: BackendChoice) -> Result<TrainReport, String> {
    let max_context = c.train.seq_len + c.generate.max_new_tokens;
    let (model, program) = program_for(spec, c, max_context)?;
    let out_dir = c.checkpoint.dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&model.name));
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create `{}`: {e}", out_dir.display()))?;

    // The backend first: a missing GPU is reported before any data is read.
    let (mut backend, backend_name) = make_backend(program, c, choice)?;
    let (tok_name, train_stream, valid_stream) = load_data(c, &model, &out_dir)?;
    let entropy = unigram_entropy(&train_stream.iter().chain(&valid_stream).copied().collect::<Vec<_>>());
    let corpus_tokens = train_stream.len() + valid_stream.len();
    let seq = c.train.seq_len as usize;
    let train_w = Windows::new(train_stream, seq, Path::new("the training data")).map_err(|e| e.0)?;
    let valid_w = Windows::new(valid_stream, seq, Path::new("the held-out data")).map_err(|e| e.0)?;
    let info = RunInfo {
        spec: std::fs::canonicalize(spec).unwrap_or_else(|_| spec.to_path_buf()),
        tokenizer: tok_name.clone(),
        max_context,
        seed: c.train.seed,
    };
    let json = serde_json::to_string_pretty(&info).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join(RUN_INFO), json).map_err(|e| format!("cannot write the run info: {e}"))?;

    let opts = TrainOptions {
        seed: c.train.seed,
        steps: c.train.steps,
        batch_size: c.train.batch_size as usize,
        seq_len: seq,
        grad_accum: c.train.grad_accum as usize,
        log_every: c.train.log_every,
        eval_every: c.train.eval_every,
        eval_batches: c.train.eval_batches as usize,
        out_dir: out_dir.clone(),
        checkpoint_every: c.checkpoint.every,
        keep: c.checkpoint.keep as usize,
        tokenizer: tok_name.clone(),
        progress,
    };
    let summary = train(backend.as_mut(), &train_w, &valid_w, &opts)?;
    Ok(TrainReport {
        summary,
        out_dir,
        tokenizer: tok_name,
        corpus_tokens,
        unigram_entropy: entropy,
        backend: backend_name,
    })
}

/// The tokenizer's name in the run directory (trained or copied there, or `byte`) and the
/// training and held-out token streams.
fn load_data(c: &RunConfig, model: &Model, out_dir: &Path) -> Result<(String, Vec<u32>, Vec<u32>), String> {
    let vocab = model.vocab as usize;
    let tok_spec = c.data.tokenizer.clone().unwrap_or_else(|| "bpe".to_string());
    let saved = out_dir.join("tokenizer.json");
    let train_files = text_files(&c.data.train).map_err(|e| e.0)?;
    if c.data.format == DataFormat::Tokens {
        // Shards are tokenized already; the tokenizer is kept for generation.
        let tokenizer = Tokenizer::load(&tok_spec).map_err(|e| e.0)?;
        let name = match tokenizer {
            Tokenizer::Bytes => "byte".to_string(),
            _ => {
                tokenizer.save(&saved).map_err(|e| e.0)?;
                "tokenizer.json".to_string()
            }
        };
        let train = load_shards(&train_files, vocab).map_err(|e| e.0)?;
        let valid = load_shards(&text_files(&c.data.valid).map_err(|e| e.0)?, vocab).map_err(|e| e.0)?;
        return Ok((name, train, valid));
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
    let (tokenizer, name) = match tok_spec.as_str() {
        "byte" => (Tokenizer::Bytes, "byte".to_string()),
        "bpe" if saved.exists() => {
            (Tokenizer::load(&saved.display().to_string()).map_err(|e| e.0)?, "tokenizer.json".to_string())
        }
        "bpe" => {
            let t = Tokenizer::train_bpe(&docs, vocab).map_err(|e| e.0)?;
            t.save(&saved).map_err(|e| e.0)?;
            (t, "tokenizer.json".to_string())
        }
        path => {
            let t = Tokenizer::load(path).map_err(|e| e.0)?;
            t.save(&saved).map_err(|e| e.0)?;
            (t, "tokenizer.json".to_string())
        }
    };
    if tokenizer.vocab_size() > vocab {
        return Err(format!(
            "the {} tokenizer has {} tokens but the model's vocabulary is {vocab}: use a model with vocab ≥ {} or a smaller tokenizer",
            tokenizer.kind(),
            tokenizer.vocab_size(),
            tokenizer.vocab_size()
        ));
    }
    let train = pack(&docs, &tokenizer).map_err(|e| e.0)?;
    let valid = pack(&valid_docs, &tokenizer).map_err(|e| e.0)?;
    Ok((name, train, valid))
}

/// Generates text from the newest checkpoint of a run directory on the CPU reference.
pub fn generate_cpu(
    run_dir: &Path,
    prompt: &str,
    max_new: usize,
    sampling: &Sampling,
    mut out: impl FnMut(&str),
) -> Result<String, String> {
    let info_path = run_dir.join(RUN_INFO);
    let text = std::fs::read_to_string(&info_path)
        .map_err(|e| format!("`{}` is not a training run ({}: {e})", run_dir.display(), info_path.display()))?;
    let info: RunInfo =
        serde_json::from_str(&text).map_err(|e| format!("`{}` is damaged: {e}", info_path.display()))?;
    let (_, program) = program_for(&info.spec, &RunConfig::default(), info.max_context)?;
    let ckpt = checkpoint::latest(run_dir)
        .map_err(|e| e.0)?
        .ok_or_else(|| format!("`{}` has no checkpoint yet", run_dir.display()))?;
    let (_, params) = checkpoint::load_params(&ckpt, &program).map_err(|e| e.0)?;
    let tokenizer = match info.tokenizer.as_str() {
        "byte" => Tokenizer::Bytes,
        name => Tokenizer::load(&run_dir.join(name).display().to_string()).map_err(|e| e.0)?,
    };
    let mut backend = CpuBackend::new(program, info.seed);
    backend.write(params)?;
    let mut ids = tokenizer.encode(prompt).map_err(|e| e.0)?;
    if ids.is_empty() {
        // With no prompt, generate as after the end of a document.
        ids.push(tokenizer.eot());
    }
    let budget = (info.max_context as usize).saturating_sub(ids.len());
    let mut emitted = String::new();
    let mut all = Vec::new();
    generate(&mut backend, &ids, max_new.min(budget), sampling, Some(tokenizer.eot()), |t| {
        all.push(t);
        // Decode the whole continuation each time so multi-token characters come out whole.
        if let Ok(text) = tokenizer.decode(&all) {
            if text.len() > emitted.len() && text.is_char_boundary(emitted.len()) {
                out(&text[emitted.len()..]);
                emitted = text;
            }
        }
    })?;
    Ok(emitted)
}
