//! The GPU benchmark: a bundle's training step (forward, backward, optimizer) replayed as CUDA
//! graphs, timed with CUDA events, as tokens/s and model FLOPs utilisation; the time split by
//! kernel class; prefill tokens/s. Shared by `weft-run bench` and `weft bench --backend gpu`.

use super::exec::GpuBackend;
use crate::backend::Backend;
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
    program.vocab().unwrap_or(256)
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

/// Decode throughput of a bundle's generation plans on the GPU: one prefill of a prompt, then
/// greedy-free decode steps (fixed next tokens, so both paths do the same work) with the layer
/// states carried on the device, against the same steps moving every state through host
/// memory (the path before carried states), in the same call.
pub struct DecodeBench {
    pub model: String,
    pub device: String,
    pub batch: u64,
    pub prompt: u64,
    pub steps: u64,
    /// Bytes of layer state per sequence (what a step reads and writes besides weights).
    pub state_bytes: u64,
    pub prefill_ms: f64,
    pub carried_ms_per_step: f64,
    /// None where the batch's states are over [`HOST_PATH_LIMIT`]: seconds per step, minutes
    /// in all, to show what smaller batches already show.
    pub host_ms_per_step: Option<f64>,
    pub memory_bytes: usize,
    /// One decode step's device time (CUDA events, no host work) by kernel class, and its
    /// costliest kernels, milliseconds.
    pub device_ms: f64,
    pub split: BTreeMap<&'static str, f64>,
    pub kernels: Vec<(String, f64)>,
    pub join: JoinTiming,
}

/// What a request joining a running batch costs: its prompt's prefill alone, then the same
/// prefill with its states copied into a slot of the decode plan (`run_plan_joining`), wall
/// time per call once both are captured as CUDA graphs; the prefill's device time by kernel.
pub struct JoinTiming {
    pub prompt: u64,
    pub prefill_ms: f64,
    pub joining_ms: f64,
    pub device_ms: f64,
    pub kernels: Vec<(String, f64)>,
    /// States that went through the host (laid out differently in the two plans).
    pub by_host: Vec<String>,
}

/// The most bytes of layer state (all sequences) the through-the-host comparison moves.
pub const HOST_PATH_LIMIT: u64 = 2 << 30;

pub fn bench_decode(be: &mut GpuBackend, steps: usize) -> Result<DecodeBench, String> {
    let decode = be.program().plan("decode").map_err(|e| e.0)?.clone();
    let d = be.bundle().plans.get("decode").ok_or("the bundle has no decode plan")?.0;
    let p = be.bundle().plans.get("prefill").ok_or("the bundle has no prefill plan")?.0;
    let batch = d.batch as usize;
    // A prompt that leaves room for the steps within the context the plans were built for.
    let prompt = (p.seq as usize).saturating_sub(steps + 1).max(1);
    let v = vocab(be.program());
    let pin = vec![("tokens".to_string(), Tensor::ints(vec![batch, prompt], tokens(batch * prompt, v, 11)))];
    let carried = crate::generate::state_names(&decode);
    let state_bytes: u64 =
        carried.iter().filter_map(|n| decode.input_type(n)).map(|t| crate::memory::bytes(t, 1, 1)).sum();
    let next = |i: usize| tokens(batch, v, 100 + i as u64);
    let t = std::time::Instant::now();
    let mut out = be.run_plan("prefill", &pin).map_err(|e| e.0)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let first = out.clone();
    // Carried: the first step uploads the prefill's states, the rest keep them on the device.
    let inputs = crate::generate::decode_inputs(&decode, &mut out, next(0), &[prompt])?;
    be.run_plan_carried("decode", &inputs, &carried).map_err(|e| e.0)?;
    let t = std::time::Instant::now();
    for i in 1..steps {
        let inputs = crate::generate::decode_inputs(&decode, &mut BTreeMap::new(), next(i), &[prompt + i])?;
        be.run_plan_carried("decode", &inputs, &carried).map_err(|e| e.0)?;
    }
    let carried_ms_per_step = t.elapsed().as_secs_f64() * 1e3 / (steps.max(2) - 1) as f64;
    // Where a step's device time goes (each step timed alone: the sum exceeds a replay's).
    let inputs = crate::generate::decode_inputs(&decode, &mut first.clone(), next(0), &[prompt])?;
    let (split, device_ms) = be.time_plan("decode", &inputs, 20).map_err(|e| e.0)?;
    let mut kernels: Vec<(String, f64)> = be.last_profile.iter().map(|(k, v)| (k.clone(), *v)).collect();
    kernels.sort_by(|a, b| b.1.total_cmp(&a.1));
    kernels.truncate(12);
    // Through the host: every state downloaded and uploaded again at every step (a second or
    // more per step at 16 sequences of Samba-421M: a few steps tell).
    let host_ms_per_step = if state_bytes * batch as u64 > HOST_PATH_LIMIT {
        None
    } else {
        let host_steps = steps.clamp(2, 11);
        let mut out = first;
        let inputs = crate::generate::decode_inputs(&decode, &mut out, next(0), &[prompt])?;
        out = be.run_plan("decode", &inputs).map_err(|e| e.0)?;
        let t = std::time::Instant::now();
        for i in 1..host_steps {
            let inputs = crate::generate::decode_inputs(&decode, &mut out, next(i), &[prompt + i])?;
            out = be.run_plan("decode", &inputs).map_err(|e| e.0)?;
        }
        Some(t.elapsed().as_secs_f64() * 1e3 / (host_steps - 1) as f64)
    };
    let join = time_join(be, &carried, batch, (p.seq as usize - 1).min(512))?;
    Ok(DecodeBench {
        join,
        model: be.program().model.clone(),
        device: be.gpu().name.clone(),
        batch: batch as u64,
        prompt: prompt as u64,
        steps: steps as u64,
        state_bytes,
        prefill_ms,
        carried_ms_per_step,
        host_ms_per_step,
        memory_bytes: be.gpu().used_bytes().map_err(|e| e.0)?,
        device_ms,
        split,
        kernels,
    })
}

/// [`JoinTiming`] of a `prompt`-token request into the last slot of a `batch`-sequence decode.
fn time_join(be: &mut GpuBackend, carried: &[String], batch: usize, prompt: usize) -> Result<JoinTiming, String> {
    const REPEATS: usize = 8;
    let v = vocab(be.program());
    let pin = vec![("tokens".to_string(), Tensor::ints(vec![1, prompt], tokens(prompt, v, 5)))];
    let wall = |be: &mut GpuBackend, joining: bool| -> Result<f64, String> {
        let run = |be: &mut GpuBackend| match joining {
            true => be.run_plan_joining("prefill", &pin, carried, "decode", batch, batch - 1).map(drop),
            false => be.run_plan("prefill", &pin).map(drop),
        };
        // The first two calls load kernels and capture the graph.
        for _ in 0..2 {
            run(be).map_err(|e| e.0)?;
        }
        let t = std::time::Instant::now();
        for _ in 0..REPEATS {
            run(be).map_err(|e| e.0)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / REPEATS as f64)
    };
    let prefill_ms = wall(be, false)?;
    let joining_ms = wall(be, true)?;
    let by_host = be.last_join_by_host.clone();
    let (_, device_ms) = be.time_plan("prefill", &pin, 5).map_err(|e| e.0)?;
    let mut kernels: Vec<(String, f64)> = be.last_profile.iter().map(|(k, v)| (k.clone(), *v)).collect();
    kernels.sort_by(|a, b| b.1.total_cmp(&a.1));
    kernels.truncate(8);
    Ok(JoinTiming { prompt: prompt as u64, prefill_ms, joining_ms, device_ms, kernels, by_host })
}

impl DecodeBench {
    pub fn render(&self) -> String {
        let tps = |ms: f64| self.batch as f64 / (ms * 1e-3);
        format!(
            "{} on {}: decode at batch {} after a {}-token prompt, {} steps\n\
             layer state {:.2} MiB per sequence; device memory in use {:.2} GiB; first prefill {:.1} ms\n\
             states on the device  {:>8.3} ms/step  {:>9.0} tokens/s\n{}",
            self.model,
            self.device,
            self.batch,
            self.prompt,
            self.steps,
            self.state_bytes as f64 / (1u64 << 20) as f64,
            self.memory_bytes as f64 / (1u64 << 30) as f64,
            self.prefill_ms,
            self.carried_ms_per_step,
            tps(self.carried_ms_per_step),
            match self.host_ms_per_step {
                Some(h) => format!(
                    "states through host   {h:>8.3} ms/step  {:>9.0} tokens/s\nspeed-up {:.2}x\n",
                    tps(h),
                    h / self.carried_ms_per_step
                ),
                None => format!(
                    "states through host: not run ({:.1} GiB of states per step)\n",
                    (self.state_bytes * self.batch) as f64 / (1u64 << 30) as f64
                ),
            },
        ) + &self.profile()
    }

    fn profile(&self) -> String {
        let j = &self.join;
        let mut s = format!(
            "a {}-token request joining: prefill {:.2} ms, prefill into a decode slot {:.2} ms (wall, per call); \
             prefill device time {:.2} ms; states through the host: {}\n",
            j.prompt,
            j.prefill_ms,
            j.joining_ms,
            j.device_ms,
            if j.by_host.is_empty() { "none".to_string() } else { j.by_host.join(", ") }
        );
        for (k, t) in &j.kernels {
            s += &format!("  {t:>8.3} ms  {k}\n");
        }
        s += &format!("one decode step, device time by kernel class ({:.3} ms in all):\n", self.device_ms);
        for (class, t) in &self.split {
            s += &format!("  {class:<10} {t:>8.3} ms\n");
        }
        s += "costliest kernels of a decode step:\n";
        for (k, t) in &self.kernels {
            s += &format!("  {t:>8.3} ms  {k}\n");
        }
        s
    }
}

/// The paper's generation figures at small cost: decode at each batch size the decode plan
/// holds, decode far into the context, and chunked prefill of prompts of each length.
pub struct Sweep {
    /// (batch, ms per step) at the bench's context.
    pub batches: Vec<(usize, f64)>,
    /// (position, ms per step at one sequence, device memory in use): from a synthetic (zero)
    /// state at that position, as if that many tokens had come before.
    pub positions: Vec<(usize, f64, usize)>,
    /// (prompt length, tokens/s) over `prefill_budget` tokens of prompts each prefilled from
    /// nothing a chunk at a time (the `chunk` plan, its states kept on the device).
    pub prefill: Vec<(usize, f64)>,
    pub prefill_budget: usize,
    pub chunk: usize,
}

/// Decode steps of `batch` sequences at `pos`, from zero states: ms per step (wall, after one
/// step that captures the graph).
fn decode_at(be: &mut GpuBackend, batch: usize, pos: usize, steps: usize) -> Result<f64, String> {
    let decode = be.program().plan("decode").map_err(|e| e.0)?.clone();
    let carried = crate::generate::state_names(&decode);
    let v = vocab(be.program());
    let mut first: BTreeMap<String, Tensor<f32>> = crate::generate::zero_states(&decode, batch).into_iter().collect();
    let inputs = crate::generate::decode_inputs(&decode, &mut first, tokens(batch, v, 7), &[pos])?;
    be.run_plan_carried("decode", &inputs, &carried).map_err(|e| e.0)?;
    let inputs = crate::generate::decode_inputs(&decode, &mut BTreeMap::new(), tokens(batch, v, 8), &[pos + 1])?;
    be.run_plan_carried("decode", &inputs, &carried).map_err(|e| e.0)?;
    let t = std::time::Instant::now();
    for i in 0..steps {
        let inputs = crate::generate::decode_inputs(
            &decode,
            &mut BTreeMap::new(),
            tokens(batch, v, 9 + i as u64),
            &[pos + 2 + i],
        )?;
        be.run_plan_carried("decode", &inputs, &carried).map_err(|e| e.0)?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64)
}

/// Prompts of `len` tokens, `budget / len` of them (at least one), each prefilled from nothing
/// in chunks of the `chunk` plan: tokens/s.
fn chunked_prefill(be: &mut GpuBackend, len: usize, budget: usize) -> Result<f64, String> {
    let chunk_plan = be.program().plan("chunk").map_err(|e| e.0)?.clone();
    let size = be.plan_shape("chunk").map_or(512, |s| s.1);
    let carried = crate::generate::state_names(&chunk_plan);
    let v = vocab(be.program());
    let prompts = (budget / len).max(1);
    let with_pos = chunk_plan.input_type("pos").is_some();
    let t = std::time::Instant::now();
    for p in 0..prompts {
        let ids = tokens(len, v, 40 + p as u64);
        let mut start = 0;
        while start < len {
            let n = size.min(len - start);
            let mut inputs = vec![("tokens".to_string(), Tensor::ints(vec![1, n], ids[start..start + n].to_vec()))];
            if start == 0 {
                inputs.extend(crate::generate::zero_states(&chunk_plan, 1));
            }
            if with_pos {
                inputs.push(("pos".to_string(), Tensor::ints(vec![1], vec![start as i32])));
            }
            // A shorter last chunk runs at its own shape: the plan takes any length up to its own.
            be.run_plan_carried("chunk", &inputs, &carried).map_err(|e| e.0)?;
            start += n;
        }
    }
    Ok((prompts * len) as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

/// [`Sweep`]: batch sizes `batches` (those the decode plan holds), positions `positions` (those a
/// full-attention cache reaches), prompt lengths `prompts` over `budget` tokens each.
pub fn sweep(
    be: &mut GpuBackend,
    batches: &[usize],
    positions: &[usize],
    prompts: &[usize],
    budget: usize,
    steps: usize,
) -> Result<Sweep, String> {
    let d = be.bundle().plans.get("decode").ok_or("the bundle has no decode plan")?.0;
    let p = be.bundle().plans.get("prefill").ok_or("the bundle has no prefill plan")?.0;
    let (rows, context) = (d.batch as usize, p.seq as usize);
    // Full attention keeps every position: its cache bounds the reach.
    let decode = be.program().plan("decode").map_err(|e| e.0)?.clone();
    let reach = decode
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            crate::Op::AttentionDecode { attrs, capacity } if attrs.window.is_none() => Some(*capacity as usize),
            _ => None,
        })
        .min()
        .unwrap_or(usize::MAX);
    let mut s = Sweep { batches: vec![], positions: vec![], prefill: vec![], prefill_budget: budget, chunk: 0 };
    let at = context.saturating_sub(steps + 3).min(4096);
    for &b in batches.iter().filter(|&&b| b >= 1 && b <= rows) {
        s.batches.push((b, decode_at(be, b, at, steps)?));
    }
    for &pos in positions.iter().filter(|&&p| p + steps + 3 <= reach) {
        let ms = decode_at(be, 1, pos, steps)?;
        s.positions.push((pos, ms, be.gpu().used_bytes().map_err(|e| e.0)?));
    }
    if be.runs("chunk") {
        s.chunk = be.plan_shape("chunk").map_or(0, |c| c.1);
        for &len in prompts {
            s.prefill.push((len, chunked_prefill(be, len, budget)?));
        }
    }
    Ok(s)
}

/// [`sweep`] at the paper's points: batch sizes 1 to 256 (those the plan holds), positions 4K
/// to 1M, prompts of 1K to 128K tokens at 128K prompt tokens each.
pub fn paper_sweep(be: &mut GpuBackend, steps: usize) -> Result<Sweep, String> {
    sweep(
        be,
        &[1, 16, 64, 256],
        &[4096, 65536, 262144, 1 << 20],
        &[1024, 4096, 16384, 65536, 131072],
        131072,
        steps.clamp(2, 64),
    )
}

impl Sweep {
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.batches.is_empty() {
            s += "decode by batch (zero states at position min(context, 4096)):\n";
            for (b, ms) in &self.batches {
                s += &format!("  B = {b:<4} {ms:>8.3} ms/step  {:>9.0} tokens/s\n", *b as f64 / (ms * 1e-3));
            }
        }
        if !self.positions.is_empty() {
            s += "decode at one sequence far into the context (a synthetic zero state at that position):\n";
            for (p, ms, mem) in &self.positions {
                s += &format!(
                    "  position {p:>8}  {ms:>8.3} ms/step  {:>7.0} tokens/s  device memory in use {:.3} GiB\n",
                    1e3 / ms,
                    *mem as f64 / (1u64 << 30) as f64
                );
            }
        }
        if !self.prefill.is_empty() {
            s += &format!(
                "chunked prefill ({}-token chunks, {} prompt tokens per length):\n",
                self.chunk, self.prefill_budget
            );
            for (len, tps) in &self.prefill {
                s += &format!("  prompts of {len:>7} tokens  {tps:>9.0} tokens/s\n");
            }
        }
        s
    }
}
