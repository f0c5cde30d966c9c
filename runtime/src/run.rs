//! A run directory's identity: `run.json` records the spec's text (every file of its `extends`
//! chain), the settings that shape the run, the tokenizer's hash and where the parameters
//! started, so that a run resumes, generates and is served from one directory with nothing
//! else, whichever backend or command trained it. Every checkpoint records the hashes of the
//! spec and settings it was trained under; resuming or generating after a change is refused
//! with what changed, unless the caller accepts the change on purpose (and it is recorded).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const RUN_INFO: &str = "run.json";
/// Bumped when `run.json` changes shape.
pub const RUN_FORMAT: u32 = 2;

/// Hex SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// One file of a spec's `extends` chain, as it was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecFile {
    /// The path it was read from (relative ones stay relative: `extends` resolves against it).
    pub path: String,
    pub text: String,
}

/// A spec's text: the file named first, then each file it extends, in the order read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecSource {
    pub files: Vec<SpecFile>,
}

impl SpecSource {
    /// A hash of the texts in order (not the paths: a moved spec is the same spec).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update((f.text.len() as u64).to_le_bytes());
            h.update(f.text.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The path of the spec itself.
    pub fn root(&self) -> Option<&str> {
        self.files.first().map(|f| f.path.as_str())
    }
}

/// The settings that shape a run: two runs that differ in any of these are different runs.
/// How often to log, evaluate or checkpoint, and how many steps to train, do not belong here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    pub seq_len: u64,
    pub batch_size: u64,
    pub grad_accum: u64,
    pub seed: u64,
    /// The learning-rate schedule's length in optimizer steps (warm-up, then cosine to the
    /// minimum, which holds after it).
    pub schedule_steps: u64,
    pub warmup_steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// `byte`, `bpe` or `file`.
    pub tokenizer: String,
    /// `text` or `tokens`.
    pub data_format: String,
}

impl RunSettings {
    pub fn hash(&self) -> String {
        sha256(serde_json::to_string(self).expect("settings serialise").as_bytes())
    }

    /// What differs from `old`, one `name: old -> new` each.
    pub fn changes_from(&self, old: &RunSettings) -> Vec<String> {
        let (a, b) = (serde_json::to_value(old), serde_json::to_value(self));
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
            return vec!["the settings".into()];
        };
        a.iter()
            .filter_map(|(k, va)| {
                let vb = b.get(k)?;
                (va != vb).then(|| format!("{k}: {va} -> {vb}"))
            })
            .collect()
    }
}

/// Where a run's parameters came from when it did not start from initialisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitFrom {
    /// The run directory.
    pub run: PathBuf,
    /// Its checkpoint that was read (a directory name such as `step-00000300`).
    pub checkpoint: String,
    pub step: u64,
    pub spec_hash: Option<String>,
}

/// A change accepted on purpose when a run was resumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcceptedChange {
    /// The step the run resumed from.
    pub step: u64,
    pub what: Vec<String>,
}

/// `run.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunInfo {
    pub format_version: u32,
    pub model: String,
    pub spec: SpecSource,
    pub spec_hash: String,
    pub settings: RunSettings,
    pub settings_hash: String,
    /// `byte`, or the tokenizer file in the run directory.
    pub tokenizer: String,
    /// SHA-256 of that file (none for `byte`).
    pub tokenizer_hash: Option<String>,
    /// The longest context generation plans are built for.
    pub max_context: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<InitFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepted_changes: Vec<AcceptedChange>,
}

/// What identifies a checkpoint's run: the hashes it was trained under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub spec_hash: String,
    pub settings_hash: String,
    pub tokenizer_hash: Option<String>,
}

impl RunInfo {
    pub fn new(
        model: &str,
        spec: SpecSource,
        settings: RunSettings,
        tokenizer: String,
        tokenizer_hash: Option<String>,
        max_context: u64,
    ) -> RunInfo {
        RunInfo {
            format_version: RUN_FORMAT,
            model: model.to_string(),
            spec_hash: spec.hash(),
            spec,
            settings_hash: settings.hash(),
            settings,
            tokenizer,
            tokenizer_hash,
            max_context,
            init_from: None,
            accepted_changes: Vec::new(),
        }
    }

    pub fn identity(&self) -> Identity {
        Identity {
            spec_hash: self.spec_hash.clone(),
            settings_hash: self.settings_hash.clone(),
            tokenizer_hash: self.tokenizer_hash.clone(),
        }
    }

    /// Reads and checks `dir/run.json` (its hashes must match what it holds); `None` if absent.
    pub fn read(dir: &Path) -> Result<Option<RunInfo>, String> {
        let path = dir.join(RUN_INFO);
        if !path.exists() {
            return Ok(None);
        }
        let text = crate::io::read_text(&path, crate::io::limits::RUN_INFO, "run description")?;
        let info: RunInfo = serde_json::from_str(&text).map_err(|e| {
            format!(
                "`{}` is not a run description this weft reads ({e}); runs from before run identities were recorded cannot resume: start a new run directory, with --init-from to keep the parameters",
                path.display()
            )
        })?;
        if info.format_version != RUN_FORMAT {
            return Err(format!(
                "`{}` has format {}; this weft reads format {RUN_FORMAT}",
                path.display(),
                info.format_version
            ));
        }
        if info.spec.hash() != info.spec_hash || info.settings.hash() != info.settings_hash {
            return Err(format!(
                "`{}` is damaged: its hashes do not match the spec and settings it holds",
                path.display()
            ));
        }
        Ok(Some(info))
    }

    /// Writes `dir/run.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        crate::checkpoint::write_atomic(&dir.join(RUN_INFO), &json).map_err(|e| e.0)
    }

    /// What differs between this run's identity and the one a checkpoint or an earlier
    /// `run.json` (`old`) recorded, in words; empty when they are the same run.
    pub fn changes_from(&self, old_identity: &Identity, old: Option<&RunInfo>) -> Vec<String> {
        let mut what = Vec::new();
        if old_identity.spec_hash != self.spec_hash {
            let files = old
                .filter(|o| o.spec_hash == old_identity.spec_hash)
                .map(|o| spec_diff(&o.spec, &self.spec))
                .unwrap_or_default();
            what.push(format!("the spec's text{files}"));
        }
        if old_identity.settings_hash != self.settings_hash {
            match old.filter(|o| o.settings_hash == old_identity.settings_hash) {
                Some(o) => what.extend(self.settings.changes_from(&o.settings)),
                None => what.push("the run settings".into()),
            }
        }
        if old_identity.tokenizer_hash != self.tokenizer_hash {
            what.push("the tokenizer (its file's hash)".into());
        }
        what
    }
}

/// Which files of a spec differ, for messages: ` (specs/x.weft: line 12)`.
fn spec_diff(old: &SpecSource, new: &SpecSource) -> String {
    let mut parts = Vec::new();
    for (i, nf) in new.files.iter().enumerate() {
        match old.files.get(i) {
            Some(of) if of.text == nf.text => {}
            Some(of) => {
                let line = of
                    .text
                    .lines()
                    .zip(nf.text.lines())
                    .position(|(a, b)| a != b)
                    .map_or_else(|| of.text.lines().count().min(nf.text.lines().count()) + 1, |l| l + 1);
                parts.push(format!("{}: first change at line {line}", nf.path));
            }
            None => parts.push(format!("{}: a new file of the extends chain", nf.path)),
        }
    }
    if old.files.len() > new.files.len() {
        parts.push("a file left the extends chain".into());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}

/// What generation reads back from a run directory besides the model: its newest parameters
/// and its tokenizer, each checked against `run.json`.
pub struct RunForGeneration {
    pub params: std::collections::BTreeMap<String, crate::cpu::tensor::Tensor<f32>>,
    pub tokenizer: crate::data::Tokenizer,
    /// The checkpoint read.
    pub checkpoint: PathBuf,
}

/// Reads the newest checkpoint of `run_dir` (described by `info`) for `program`, refusing a
/// checkpoint trained from another spec and a tokenizer that is not the run's.
pub fn open_for_generation(
    run_dir: &std::path::Path,
    info: &RunInfo,
    program: &crate::plan::Program,
) -> Result<RunForGeneration, String> {
    use crate::data::Tokenizer;
    let ckpt = crate::checkpoint::latest(run_dir)
        .map_err(|e| e.0)?
        .ok_or_else(|| format!("`{}` has no checkpoint yet", run_dir.display()))?;
    let (state, params) = crate::checkpoint::load_params(&ckpt, program).map_err(|e| e.0)?;
    if state.spec_hash.as_ref().is_some_and(|h| *h != info.spec_hash) {
        return Err(format!(
            "`{}` was trained from another spec than the one `{}` records: the run directory has been mixed with another",
            ckpt.display(),
            run_dir.join(RUN_INFO).display()
        ));
    }
    let tokenizer = match info.tokenizer.as_str() {
        "byte" => Tokenizer::Bytes,
        name => {
            let path = run_dir.join(name);
            let json = crate::io::read_text(&path, crate::io::limits::TOKENIZER, "tokenizer")?;
            if info.tokenizer_hash.as_deref() != Some(sha256(json.as_bytes()).as_str()) {
                return Err(format!(
                    "`{}` is not the tokenizer this run was trained with (its hash differs from run.json's)",
                    path.display()
                ));
            }
            Tokenizer::from_json(&json).map_err(|e| format!("`{}`: {}", path.display(), e.0))?
        }
    };
    Ok(RunForGeneration { params, tokenizer, checkpoint: ckpt })
}
