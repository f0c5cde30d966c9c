//! The GPU benchmark: a bundle's training step (forward, backward, optimizer) replayed as CUDA
//! graphs, timed with CUDA events, as tokens/s and model FLOPs utilisation; the time split by
//! kernel class; prefill tokens/s. Shared by `weft-run bench` and `weft bench --backend gpu`.

use super::exec::GpuBackend;
use crate::cpu::tensor::Tensor;
use std::collections::BTreeMap;

/// Dense bf16 peak of an H100/H200 SXM, the MFU denominator.
pub const PEAK_FLOPS: f64 = 989e12;

pub struct GpuBench {
    pub model: String,
    pub device: String,
    pub batch: u64,
    pub seq: u64,
    pub step_ms: f64,
    pub optimizer_ms: f64,
    pub tokens_per_s: f64,
    pub flops_per_step: f64,
    pub mfu: f64,
    pub memory_bytes: usize,
    /// Milliseconds of one training step by kernel class.
    pub split: BTreeMap<&'static str, f64>,
    /// The training step's costliest kernels (summed over launches), milliseconds.
    pub kernels: Vec<(String, f64)>,
    pub prefill_tokens: u64,
    pub prefill_tokens_per_s: f64,
}

/// Deterministic token ids in `[0, vocab)`.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<i32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) % vocab.max(1) as u64) as i32
        })
        .collect()
}

/// The vocabulary of a program (rows of its embedding).
pub fn vocab(program: &crate::plan::Program) -> usize {
    program
        .params
        .iter()
        .find(|p| p.name == "embed.weight")
        .and_then(|p| p.ty.shape.as_fixed())
        .map_or(256, |s| s[0] as usize)
}

/// Inputs of the training step at its planned shape.
pub fn train_inputs(be: &GpuBackend, seed: u64) -> Result<Vec<(String, Tensor<f32>)>, String> {
    let s = be.bundle().plans.get("train_step").ok_or("the bundle has no training step")?.0;
    let (b, t) = (s.batch as usize, s.seq as usize);
    let v = vocab(be.program());
    Ok(vec![
        ("tokens".into(), Tensor::ints(vec![b, t], tokens(b * t, v, seed))),
        ("targets".into(), Tensor::ints(vec![b, t], tokens(b * t, v, seed + 1))),
        // The training step scales its gradients by this (1/grad_accum in the training loop).
        ("loss_scale".into(), Tensor::scalar(1.0)),
    ])
}

pub fn bench(be: &mut GpuBackend, repeats: usize) -> Result<GpuBench, String> {
    let shape = be.bundle().plans.get("train_step").ok_or("the bundle has no training step")?.0;
    let tokens_per_step = (shape.batch * shape.seq) as f64;
    let inputs = train_inputs(be, 0)?;
    let (split, step_ms) = be.time_plan("train_step", &inputs, repeats).map_err(|e| e.0)?;
    let mut kernels: Vec<(String, f64)> = be.last_profile.iter().map(|(k, v)| (k.clone(), *v)).collect();
    kernels.sort_by(|a, b| b.1.total_cmp(&a.1));
    kernels.truncate(24);
    let (_, optimizer_ms) =
        be.time_plan("optimizer_step", &[("step".into(), Tensor::ints(vec![], vec![0]))], repeats).map_err(|e| e.0)?;
    let total = step_ms + optimizer_ms;
    let flops_per_step = crate::flops::train_flops_per_token(be.program(), shape.seq)? * tokens_per_step;
    let memory_bytes = be.gpu().used_bytes().map_err(|e| e.0)?;
    // Prefill: one prompt as long as the prefill plan takes.
    let p = be.bundle().plans.get("prefill").map(|x| x.0);
    let (prefill_tokens, prefill_tokens_per_s) = match p {
        Some(ps) => {
            let n = (ps.batch * ps.seq) as usize;
            let ids = tokens(n, vocab(be.program()), 7);
            let pin = vec![("tokens".to_string(), Tensor::ints(vec![ps.batch as usize, ps.seq as usize], ids))];
            let (_, ms) = be.time_plan("prefill", &pin, repeats).map_err(|e| e.0)?;
            (n as u64, n as f64 / (ms * 1e-3))
        }
        None => (0, 0.0),
    };
    Ok(GpuBench {
        model: be.program().model.clone(),
        device: be.gpu().name.clone(),
        batch: shape.batch,
        seq: shape.seq,
        step_ms,
        optimizer_ms,
        tokens_per_s: tokens_per_step / (total * 1e-3),
        flops_per_step,
        mfu: flops_per_step / (total * 1e-3) / PEAK_FLOPS,
        memory_bytes,
        split,
        kernels,
        prefill_tokens,
        prefill_tokens_per_s,
    })
}

impl GpuBench {
    pub fn render(&self) -> String {
        let total = self.step_ms + self.optimizer_ms;
        let mut s = format!(
            "{} on {}: batch {} x seq {}\ntraining step {total:.1} ms (forward+backward {:.1}, optimizer {:.1}): {:.0} tokens/s\n",
            self.model, self.device, self.batch, self.seq, self.step_ms, self.optimizer_ms, self.tokens_per_s
        );
        s += &format!(
            "model FLOPs {:.3e} per step: MFU {:.1}% of {:.0} TFLOP/s\ndevice memory in use {:.1} GiB\n",
            self.flops_per_step,
            self.mfu * 100.0,
            PEAK_FLOPS / 1e12,
            self.memory_bytes as f64 / (1u64 << 30) as f64
        );
        let sum: f64 = self.split.values().sum();
        for (class, t) in &self.split {
            s += &format!("  {class:<10} {t:>8.2} ms  {:>5.1}%\n", 100.0 * t / sum.max(1e-9));
        }
        s += "costliest kernels of the training step:\n";
        for (k, t) in &self.kernels {
            s += &format!("  {t:>8.2} ms  {k}\n");
        }
        if self.prefill_tokens > 0 {
            s += &format!("prefill of {} tokens: {:.0} tokens/s\n", self.prefill_tokens, self.prefill_tokens_per_s);
        }
        s
    }
}
