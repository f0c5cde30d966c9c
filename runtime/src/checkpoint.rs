//! Checkpoints: parameters and optimizer state in safetensors files, the run state beside them
//! in JSON, written atomically.
//!
//! A checkpoint is a directory `step-NNNNNNNN/` holding `params.safetensors`,
//! `optimizer.safetensors` and `state.json`. It is written under a temporary name and renamed
//! into place only when complete, and the file `latest` (also replaced by a rename) names the
//! newest one, so a run killed at any moment leaves the previous checkpoint intact. `state.json`
//! records a checksum of each tensor file; a damaged or mismatched checkpoint is refused.

use crate::cpu::tensor::Tensor;
use crate::plan::Program;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Format 2 records the run's identity (spec, settings and tokenizer hashes); format 1
/// checkpoints still load for generation and `--init-from`, but do not resume.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointError(pub String);

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckpointError {}

fn fail<T>(msg: impl Into<String>) -> Result<T, CheckpointError> {
    Err(CheckpointError(msg.into()))
}

/// What a run needs besides tensors to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub format_version: u32,
    pub model: String,
    /// Optimizer steps completed.
    pub step: u64,
    pub seed: u64,
    /// `byte`, or the tokenizer file saved beside the checkpoints.
    pub tokenizer: String,
    /// Checksums (FNV-1a 64, hex) of the tensor files.
    pub checksums: BTreeMap<String, String>,
    /// The run's identity when it was saved (see [`crate::run`]); absent in format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_hash: Option<String>,
    /// SHA-256 of this state with this field empty (format 2): an edited `state.json` (a step
    /// changed by hand) is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_checksum: Option<String>,
}

impl RunState {
    /// The checksum this state should carry.
    fn own_checksum(&self) -> String {
        let mut copy = self.clone();
        copy.state_checksum = None;
        crate::run::sha256(&serde_json::to_vec(&copy).expect("the run state serialises"))
    }

    /// The identity recorded, if the checkpoint has one (format 2).
    pub fn identity(&self) -> Option<crate::run::Identity> {
        Some(crate::run::Identity {
            spec_hash: self.spec_hash.clone()?,
            settings_hash: self.settings_hash.clone()?,
            tokenizer_hash: self.tokenizer_hash.clone(),
        })
    }
}

pub(crate) fn fnv64(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

fn io<E: fmt::Display>(what: String) -> impl FnOnce(E) -> CheckpointError {
    move |e| CheckpointError(format!("{what}: {e}"))
}

/// Writes bytes to `path` through a temporary file, synced, then renamed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(format!("cannot create `{}`", tmp.display())))?;
        f.write_all(bytes).map_err(io(format!("cannot write `{}`", tmp.display())))?;
        f.sync_all().map_err(io(format!("cannot sync `{}`", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(io(format!("cannot rename `{}`", tmp.display())))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn to_safetensors(tensors: &[(&str, &Tensor<f32>)]) -> Result<Vec<u8>, CheckpointError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let data = t.reals().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).unwrap_or_default();
            (name.to_string(), t.shape.clone(), data)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, d)| TensorView::new(Dtype::F32, s.clone(), d).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(io("cannot lay out tensors".into()))?;
    safetensors::serialize(views, None::<HashMap<String, String>>).map_err(io("cannot serialise tensors".into()))
}

fn from_safetensors(bytes: &[u8], file: &Path) -> Result<BTreeMap<String, Tensor<f32>>, CheckpointError> {
    let st =
        SafeTensors::deserialize(bytes).map_err(io(format!("`{}` is not a valid safetensors file", file.display())))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return fail(format!(
                "`{}`: tensor `{name}` is {:?}; weft checkpoints hold f32",
                file.display(),
                view.dtype()
            ));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.insert(name, Tensor::real(view.shape().to_vec(), values));
    }
    Ok(out)
}

/// The directory name of a step's checkpoint.
pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}"))
}

/// Saves parameters and optimizer states (everything but gradient accumulators, which are zero
/// between optimizer steps) and the run state; keeps the newest `keep` checkpoints.
pub fn save(
    dir: &Path,
    program: &Program,
    tensors: &BTreeMap<String, Tensor<f32>>,
    state: &RunState,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create `{}`", dir.display())))?;
    let get = |name: &str| tensors.get(name).ok_or_else(|| CheckpointError(format!("no tensor `{name}` to save")));
    let mut params = Vec::new();
    for p in &program.params {
        params.push((p.name.as_str(), get(&p.name)?));
    }
    let mut opt = Vec::new();
    for s in program.states.iter().filter(|s| !s.name.starts_with("grad_acc:")) {
        opt.push((s.name.as_str(), get(&s.name)?));
    }
    let files = [("params.safetensors", to_safetensors(&params)?), ("optimizer.safetensors", to_safetensors(&opt)?)];
    let final_dir = step_dir(dir, state.step);
    let tmp_dir = dir.join(format!(".step-{:08}.tmp", state.step));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir_all(&tmp_dir).map_err(io(format!("cannot create `{}`", tmp_dir.display())))?;
    let mut state = state.clone();
    state.checksums.clear();
    let written = (|| -> Result<(), CheckpointError> {
        for (name, bytes) in &files {
            write_atomic(&tmp_dir.join(name), bytes)?;
            state.checksums.insert(name.to_string(), fnv64(bytes));
        }
        state.state_checksum = None;
        state.state_checksum = Some(state.own_checksum());
        let json = serde_json::to_vec_pretty(&state).map_err(io("cannot write the run state".into()))?;
        write_atomic(&tmp_dir.join("state.json"), &json)
    })();
    if let Err(e) = written {
        // A full disk, say: leave nothing half-written behind (the previous checkpoint stays).
        let _ = std::fs::remove_dir_all(&tmp_dir);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp_dir, &final_dir)
        .map_err(io(format!("cannot move the checkpoint into `{}`", final_dir.display())))?;
    write_atomic(
        &dir.join("latest"),
        final_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes(),
    )?;
    prune(dir, keep);
    Ok(final_dir)
}

/// Deletes all but the newest `keep` checkpoints.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut steps: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for old in &steps[..excess] {
        let _ = std::fs::remove_dir_all(old);
    }
}

/// The newest complete checkpoint of a run directory, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let pointer = dir.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    match crate::io::read_text(&pointer, crate::io::limits::SMALL, "checkpoint pointer") {
        Ok(name) => {
            let path = dir.join(name.trim());
            if !path.is_dir() {
                return fail(format!("`{}` names `{}`, which does not exist", pointer.display(), name.trim()));
            }
            Ok(Some(path))
        }
        Err(e) => fail(e),
    }
}

/// Loads a checkpoint and checks it against the program: every parameter and optimizer state
/// present with its shape, nothing unknown, checksums intact.
pub fn load(path: &Path, program: &Program) -> Result<(RunState, BTreeMap<String, Tensor<f32>>), CheckpointError> {
    let state = read_state(path)?;
    let tensors = load_tensors(path, program, &state)?;
    Ok((state, tensors))
}

/// Reads a checkpoint's `state.json` alone (its format and model checked later by [`load`]).
pub fn read_state(path: &Path) -> Result<RunState, CheckpointError> {
    let state_path = path.join("state.json");
    let text =
        crate::io::read_text(&state_path, crate::io::limits::SMALL, "checkpoint state").map_err(CheckpointError)?;
    let state: RunState =
        serde_json::from_str(&text).map_err(io(format!("`{}` is not a valid run state", state_path.display())))?;
    if !(1..=FORMAT_VERSION).contains(&state.format_version) {
        return fail(format!(
            "`{}` is checkpoint format {}; this weft reads format {FORMAT_VERSION}",
            path.display(),
            state.format_version
        ));
    }
    if state.format_version >= 2 && state.state_checksum.as_deref() != Some(state.own_checksum().as_str()) {
        return fail(format!(
            "`{}` is damaged or was edited: its checksum does not match its contents (restore it, or resume from another checkpoint)",
            state_path.display()
        ));
    }
    Ok(state)
}

/// The tensors of a checkpoint whose state was read, checked against the program.
fn load_tensors(
    path: &Path,
    program: &Program,
    state: &RunState,
) -> Result<BTreeMap<String, Tensor<f32>>, CheckpointError> {
    if state.model != program.model {
        return fail(format!(
            "`{}` is a checkpoint of model `{}`, not `{}`",
            path.display(),
            state.model,
            program.model
        ));
    }
    let mut tensors = BTreeMap::new();
    // Neither file can be larger than the program's tensors in f32 and their header.
    let elems = |ty: &crate::TensorType| ty.shape.as_fixed().unwrap_or_default().iter().product::<u64>();
    let count = program.params.len() + program.states.len();
    let data: u64 = program.params.iter().map(|p| elems(&p.ty)).sum::<u64>()
        + program.states.iter().map(|s| elems(&s.ty)).sum::<u64>();
    let limit = 4 * data + 512 * count as u64 + (1 << 20);
    for file in ["params.safetensors", "optimizer.safetensors"] {
        let p = path.join(file);
        let bytes = crate::io::read_bounded(&p, limit, "checkpoint file").map_err(CheckpointError)?;
        if state.checksums.get(file) != Some(&fnv64(&bytes)) {
            return fail(format!("`{}` is damaged: its checksum does not match the run state", p.display()));
        }
        tensors.extend(from_safetensors(&bytes, &p)?);
    }
    let expected: Vec<(&str, Vec<usize>)> = program
        .params
        .iter()
        .map(|p| (p.name.as_str(), &p.ty))
        .chain(program.states.iter().filter(|s| !s.name.starts_with("grad_acc:")).map(|s| (s.name.as_str(), &s.ty)))
        .map(|(n, ty)| (n, ty.shape.as_fixed().unwrap_or_default().iter().map(|&d| d as usize).collect()))
        .collect();
    for (name, shape) in &expected {
        match tensors.get(*name) {
            None => {
                return fail(format!("`{}` has no tensor `{name}`: it was saved from another model", path.display()))
            }
            Some(t) if &t.shape != shape => {
                return fail(format!(
                    "`{}`: `{name}` has shape {:?}, the model needs {shape:?}",
                    path.display(),
                    t.shape
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !expected.iter().any(|(n, _)| n == k)) {
        return fail(format!("`{}` holds `{extra}`, which the model does not have", path.display()));
    }
    Ok(tensors)
}

/// Reads only the parameters of a checkpoint (for generation), checked against the program.
pub fn load_params(
    path: &Path,
    program: &Program,
) -> Result<(RunState, BTreeMap<String, Tensor<f32>>), CheckpointError> {
    let (state, mut tensors) = load(path, program)?;
    tensors.retain(|k, _| program.params.iter().any(|p| &p.name == k));
    Ok((state, tensors))
}
