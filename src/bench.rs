//! `weft bench`: training, evaluation, prefill and decode throughput of a spec on a backend,
//! reported against a baseline measured in the same call (the backend's plain matrix-product
//! rate at the model's width), so numbers from different machines compare as ratios.

use crate::analysis::analyze;
use crate::config::RunConfig;
use crate::program::{build_program, OptimizerSettings};
use std::path::Path;
use std::time::Instant;
use weft_runtime::backend::{Backend, CpuBackend};
use weft_runtime::cpu::gemm;
use weft_runtime::cpu::tensor::Tensor;
use weft_runtime::generate::decode_inputs;

pub struct BenchReport {
    pub model: String,
    pub seq: u64,
    pub batch: u64,
    pub parameters: u64,
    /// Forward FLOPs per token at `seq` (weft check's count).
    pub forward_flops_per_token: f64,
    pub train_tokens_per_s: f64,
    pub eval_tokens_per_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// FLOP/s of a plain f32 matrix product [B·T × d]·[d × 4d] on the same backend.
    pub gemm_flops_per_s: f64,
}

impl BenchReport {
    /// Training FLOP/s counted as 3 × forward (forward + backward).
    pub fn train_flops_per_s(&self) -> f64 {
        3.0 * self.forward_flops_per_token * self.train_tokens_per_s
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "{}: {} parameters, sequence {}, batch {}, CPU reference (f32, {} threads)\n\n",
            self.model,
            crate::analysis::group_digits(self.parameters),
            self.seq,
            self.batch,
            rayon::current_num_threads()
        );
        s += &format!(
            "  training   {:>10.0} tokens/s   {:>7.2} GFLOP/s (3 × forward)\n",
            self.train_tokens_per_s,
            self.train_flops_per_s() / 1e9
        );
        s += &format!("  evaluation {:>10.0} tokens/s\n", self.eval_tokens_per_s);
        s += &format!("  prefill    {:>10.0} tokens/s\n", self.prefill_tokens_per_s);
        s += &format!(
            "  decode     {:>10.0} tokens/s   (batch {}, one token per sequence per step)\n",
            self.decode_tokens_per_s, self.batch
        );
        s += &format!(
            "  baseline: plain GEMM {:.2} GFLOP/s; training runs at {:.2} of it\n",
            self.gemm_flops_per_s / 1e9,
            self.train_flops_per_s() / self.gemm_flops_per_s
        );
        s
    }
}

fn tokens(b: usize, t: usize, vocab: u64, salt: u64) -> Vec<i32> {
    (0..b * t).map(|i| (weft_runtime::init::uniform(salt, "bench", i as u64, 0) * vocab as f64) as i32).collect()
}

fn timed<F: FnMut() -> Result<(), String>>(reps: usize, mut f: F) -> Result<f64, String> {
    f()?; // warm-up
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

/// Benchmarks `spec` on the CPU reference with `steps` timed repetitions of each plan.
pub fn bench_cpu(spec: &Path, seq: u64, batch: u64, steps: usize) -> Result<BenchReport, String> {
    let checked = crate::check_file(spec).map_err(|f| f.render())?;
    let model = &checked.model;
    let decode_steps = 16u64;
    let program = build_program(model, &OptimizerSettings::from_config(&RunConfig::default()), seq + decode_steps + 1)
        .map_err(|e| e.0)?;
    let report = analyze(&checked.graph, model, seq);
    let mut cpu = CpuBackend::new(program, 1);
    let (b, t) = (batch as usize, seq as usize);
    let batch_inputs = |salt| {
        vec![
            ("tokens".to_string(), Tensor::ints(vec![b, t], tokens(b, t, model.vocab, salt))),
            ("targets".to_string(), Tensor::ints(vec![b, t], tokens(b, t, model.vocab, salt + 1))),
        ]
    };
    let n = (b * t) as f64;
    let mut step = 0;
    let train_s = timed(steps, || {
        let mut inp = batch_inputs(step);
        inp.push(("loss_scale".into(), Tensor::scalar(1.0)));
        cpu.run("train_step", inp)?;
        cpu.run("optimizer_step", vec![("step".into(), Tensor::ints(vec![], vec![step as i32]))])?;
        step += 1;
        Ok(())
    })?;
    let eval_s = timed(steps, || cpu.run("eval", batch_inputs(7)).map(|_| ()))?;
    let mut states = None;
    let prefill_s = timed(steps, || {
        states = Some(cpu.run("prefill", vec![batch_inputs(9).remove(0)])?);
        Ok(())
    })?;
    let decode_plan = cpu.program().plan("decode").map_err(|e| e.0)?.clone();
    let mut out = states.ok_or("no prefill output")?;
    let mut pos = t;
    let decode_s = timed(decode_steps as usize - 1, || {
        let inp = decode_inputs(&decode_plan, &mut out, tokens(b, 1, model.vocab, pos as u64), &[pos])?;
        out = cpu.run("decode", inp)?;
        pos += 1;
        Ok(())
    })?;

    // Baseline: the same machine's plain GEMM at the model's width.
    let (m, k, nn) = (b * t, model.width as usize, 4 * model.width as usize);
    let a = vec![0.5f32; m * k];
    let w = vec![0.25f32; k * nn];
    let mut c = vec![0f32; m * nn];
    let gemm_s = timed(3, || {
        gemm(m, k, nn, &a, false, &w, false, &mut c, 0.0);
        Ok(())
    })?;

    Ok(BenchReport {
        model: model.name.clone(),
        seq,
        batch,
        parameters: report.parameters,
        forward_flops_per_token: report.flops_per_token,
        train_tokens_per_s: n / train_s,
        eval_tokens_per_s: n / eval_s,
        prefill_tokens_per_s: n / prefill_s,
        decode_tokens_per_s: b as f64 / decode_s,
        gemm_flops_per_s: 2.0 * (m * k * nn) as f64 / gemm_s,
    })
}

/// Compile time of a spec's whole bundle (training step, evaluation, optimizer, logits, prefill
/// and decode; every kernel to PTX, no ptxas), from the spec text: once with an empty kernel
/// cache, then again with the cache the first build filled.
pub struct CompileReport {
    pub model: String,
    pub kernels: usize,
    pub plans: usize,
    pub cold_s: f64,
    pub warm_s: f64,
    pub bundle_bytes: usize,
}

/// The front end's and lowering's time against the number of sub-layers, on generated specs (an
/// MLP stack, and a seeded random mix of Mamba, windowed and full attention and MLP), from 64 to
/// 4096 sub-layers (the most a spec may have): each phase in seconds, and per sub-layer relative
/// to 64 sub-layers (1.0 everywhere is linear).
pub fn bench_scaling() -> Result<String, String> {
    use std::fmt::Write;
    let spec = |n: usize, mixed: bool| -> String {
        let mut s = String::from("model scaling { vocab = 64  width = 64 }\n");
        s += "layer m = mamba(d_state = 4)\nlayer a = attention(heads = 1, window = 16)\n";
        s += "layer s = attention(heads = 1)\nlayer f = mlp(hidden = 64)\n";
        if mixed {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let names: Vec<&str> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ["m", "a", "s", "f"][(x % 4) as usize]
                })
                .collect();
            s += &format!("layers = [{}]\n", names.join(", "));
        } else {
            s += &format!("layers = f x {n}\n");
        }
        s
    };
    let settings = RunConfig::default();
    let shapes = crate::build::Shapes { batch: 1, seq: 64, gen_batch: 1, max_prompt: 128 };
    let mut out = String::new();
    writeln!(
        out,
        "{:<8} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "spec", "layers", "front end", "program", "check", "lower", "total", "per layer ×"
    )
    .unwrap();
    for mixed in [false, true] {
        let mut base = None;
        for n in [64usize, 128, 256, 512, 1024, 2048, 4096] {
            let text = spec(n, mixed);
            let t = Instant::now();
            let checked = crate::check_str(Path::new("scaling.weft"), &text).map_err(|f| f.render())?;
            let front = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let program =
                build_program(&checked.model, &OptimizerSettings::from_config(&settings), 128).map_err(|e| e.0)?;
            let prog = t.elapsed().as_secs_f64();
            let t = Instant::now();
            crate::analysis::memory_report_of(&program, 1, 64)?;
            crate::build::program_findings(&program, &shapes).map_err(|e| e.to_string())?;
            let check = t.elapsed().as_secs_f64();
            let t = Instant::now();
            crate::build::lower_program(&program, &shapes).map_err(|e| e.to_string())?;
            let lower = t.elapsed().as_secs_f64();
            let total = front + prog + check + lower;
            let per = total / n as f64;
            let rel = per / *base.get_or_insert(per);
            writeln!(
                out,
                "{:<8} {n:>6} {front:>9.3}s {prog:>9.3}s {check:>9.3}s {lower:>9.3}s {total:>9.3}s {rel:>12.2}",
                if mixed { "mixed" } else { "mlp" }
            )
            .unwrap();
        }
    }
    out +=
        "`weft check` is front end + program + check; `weft build` adds lowering and compiling the distinct kernels\n";
    Ok(out)
}

pub fn bench_compile(spec: &Path, settings: &RunConfig) -> Result<CompileReport, String> {
    let cache_dir = std::env::temp_dir().join(format!("weft-compile-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache_dir);
    let cache = crate::lower::cache::Cache::at(&cache_dir);
    let build = || -> Result<(usize, usize, usize), String> {
        let checked = crate::check_file(spec).map_err(|f| f.render())?;
        let max_context = settings.train.seq_len + settings.generate.max_new_tokens;
        let program =
            build_program(&checked.model, &OptimizerSettings::from_config(settings), max_context).map_err(|e| e.0)?;
        let shapes = crate::build::Shapes::from_settings(settings);
        let (bundle, stats) = crate::build::build_bundle(&program, &shapes, &cache).map_err(|e| e.to_string())?;
        Ok((stats.kernels, bundle.plans.len(), bundle.to_bytes().len()))
    };
    let t = Instant::now();
    let (kernels, plans, bundle_bytes) = build()?;
    let cold_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    build()?;
    let warm_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&cache_dir);
    let model = spec.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    Ok(CompileReport { model, kernels, plans, cold_s, warm_s, bundle_bytes })
}

impl CompileReport {
    pub fn render(&self) -> String {
        format!(
            "{}: bundle of {} plans, {} kernels ({:.1} MiB), on {} threads\n  cold build (empty kernel cache) {:>7.2} s\n  unchanged rebuild (cache hit)   {:>7.2} s ({:.0}x faster)\n",
            self.model,
            self.plans,
            self.kernels,
            self.bundle_bytes as f64 / (1 << 20) as f64,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            self.cold_s,
            self.warm_s,
            self.cold_s / self.warm_s.max(1e-9)
        )
    }
}

/// The spec compiled at `batch × seq` and benchmarked on GPU 0 (see `weft_runtime::cuda::bench`).
/// With `decode`, generation instead: `batch` sequences decoding `steps` tokens after a `seq`-token
/// prompt (states on the device against through the host, start-up, the step's kernels).
pub fn bench_gpu(spec: &Path, seq: u64, batch: u64, steps: usize, decode: bool) -> Result<String, String> {
    use weft_runtime::cuda::{bench, Gpu, GpuBackend};
    let gpu = Gpu::open(0).map_err(|e| format!("no usable GPU: {e}"))?;
    let mut settings = RunConfig::default();
    settings.train.seq_len = seq;
    settings.train.batch_size = batch;
    let checked = crate::check_file(spec).map_err(|f| f.render())?;
    let max_context = seq + settings.generate.max_new_tokens;
    let program =
        build_program(&checked.model, &OptimizerSettings::from_config(&settings), max_context).map_err(|e| e.0)?;
    let shapes = if decode {
        // The decode bench prompts with the context less the steps and one.
        crate::build::Shapes { batch: 1, seq, gen_batch: batch, max_prompt: seq + steps as u64 + 1 }
    } else {
        crate::build::Shapes { batch, seq, gen_batch: 1, max_prompt: seq }
    };
    let (bundle, _) = crate::build::build_bundle(&program, &shapes, &crate::lower::cache::Cache::user())
        .map_err(|e| e.to_string())?;
    let mut be = GpuBackend::new(gpu, bundle, 0).map_err(|e| e.0)?;
    if decode {
        let b = bench::bench_decode(&mut be, steps)?.render();
        return Ok(b + &bench::paper_sweep(&mut be, steps)?.render());
    }
    Ok(bench::bench(&mut be, steps)?.render())
}
