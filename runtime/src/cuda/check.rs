//! The GPU check: every step of every plan of a bundle, and then the whole model (training
//! steps with gradient accumulation, clipping and AdamW; prefill and a long decode), against
//! the CPU reference, by one rule.
//!
//! **The rule.** Each output is computed three times from the same inputs: by the GPU, by the
//! CPU reference in f64 (the exact result, up to f64 rounding), and by the CPU reference in f32
//! rounding to bf16 exactly where the GPU's kernels do ([`Rounding::LikeGpu`]: every value a plan
//! stores as bf16, the tensor-core attention's operands, the loss gradient's bf16 chunk). The
//! second run's error against the first is what rounding alone costs; the GPU passes where its
//! error against the f64 run is at most [`FACTOR`] times that, plus [`FLOOR`], in norm-relative
//! and worst-row terms (max-abs is reported). This is FlashAttention's test rule: a kernel may
//! differ from the emulation by its summation order and approximate intrinsics, not by a
//! wrong index, a missed mask or a dropped tail, which show as errors far above rounding.
//!
//! Step by step: the emulating run keeps every step's inputs; the GPU runs each step alone on
//! exactly those inputs and the f64 reference recomputes it from them, so an error points at one
//! kernel. Whole model: all three start from the same parameters (the GPU's f32 masters) and run
//! on by themselves, so the rule also covers how errors grow over steps.

use super::exec::GpuBackend;
use crate::backend::{Backend, CpuBackend};
use crate::cpu::exec::{execute_with, run_rounded, Rounding, Store};
use crate::cpu::tensor::{Data, Tensor};
use crate::plan::ValueId;
use crate::DType;
use std::collections::{BTreeMap, HashMap};

/// The GPU may err this many times more than rounding alone does ...
pub const FACTOR: f64 = 2.0;
/// ... plus this, for outputs that rounding leaves almost exact (f32 outputs of f32 arithmetic).
/// The GPU computes them with approximate exp2, lg2 and reciprocal (within 2⁻²² relative, but
/// systematically: the error does not average out as rounding does) and in other orders; in a
/// sum whose terms cancel to 2⁻¹⁰ of their magnitudes (gradients of weights and states summed
/// over 10³ tokens of random sign get there), that reaches 2⁻¹². A wrong or missing term of such
/// a sum errs by about 1/√N ≈ 2⁻⁵ and a wrong row by its whole size, far above it.
pub const FLOOR: f64 = 1.0 / 4096.0;

/// How far an output is from the f64 reference.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Errors {
    /// ‖x − r‖ / ‖r‖ (the difference's norm where r is zero).
    pub norm_rel: f64,
    /// max |x − r|.
    pub max_abs: f64,
    /// The largest error of one row (the last dimension) relative to that row's norm or the
    /// tensor's root-mean-square row norm, whichever is larger (a row far smaller than the rest
    /// is not a reason to fail; a wrong row of ordinary size is).
    pub worst_row: f64,
}

fn reals(t: &Tensor<f32>) -> Vec<f64> {
    match &t.data {
        Data::Real(v) => v.iter().map(|&x| x as f64).collect(),
        Data::Int(v) => v.iter().map(|&x| x as f64).collect(),
    }
}

fn rel(diff2: f64, norm2: f64) -> f64 {
    if norm2 == 0.0 {
        diff2.sqrt()
    } else {
        (diff2 / norm2).sqrt()
    }
}

/// The errors of `got` against `want` (same length), rows `width` long.
pub fn errors(got: &[f64], want: &[f64], width: usize) -> Errors {
    errors_over(&[(got, want, width)])
}

/// The errors of several tensors taken together, each with rows of its own width; a row's
/// error is relative to its norm or to what a row of its width has on average (the root mean
/// square over every element), whichever is larger.
pub fn errors_over(parts: &[(&[f64], &[f64], usize)]) -> Errors {
    let bad = Errors { norm_rel: f64::INFINITY, max_abs: f64::INFINITY, worst_row: f64::INFINITY };
    let (mut d2, mut n2, mut max_abs, mut elems) = (0.0, 0.0, 0.0f64, 0usize);
    let mut row_errors = Vec::new();
    for &(got, want, width) in parts {
        if got.len() != want.len() {
            return bad;
        }
        let width = width.max(1);
        for (g, w) in got.chunks(width).zip(want.chunks(width)) {
            let (mut rd, mut rn) = (0.0, 0.0);
            for (a, b) in g.iter().zip(w) {
                let d = a - b;
                rd += d * d;
                rn += b * b;
                max_abs = if d.is_finite() { max_abs.max(d.abs()) } else { f64::INFINITY };
            }
            d2 += rd;
            n2 += rn;
            row_errors.push((rd, rn, g.len()));
        }
        elems += got.len();
    }
    let mean_sq = n2 / elems.max(1) as f64;
    let worst_row = row_errors.iter().map(|&(rd, rn, len)| rel(rd, rn.max(mean_sq * len as f64))).fold(0.0, f64::max);
    let e = Errors { norm_rel: rel(d2, n2), max_abs, worst_row };
    if e.norm_rel.is_finite() && e.worst_row.is_finite() {
        e
    } else {
        bad
    }
}

fn errors_of(got: &Tensor<f32>, want: &[f64]) -> Errors {
    errors(&reals(got), want, got.shape.last().copied().unwrap_or(1))
}

/// Whether an error passes against the emulation's: `gpu ≤ FACTOR·emu + FLOOR`.
pub fn within(gpu: f64, emu: f64) -> bool {
    gpu.is_finite() && gpu <= FACTOR * emu + FLOOR
}

/// One comparison: the GPU's errors and the rounding emulation's, both against f64.
#[derive(Clone, Debug)]
pub struct Row {
    pub what: String,
    pub gpu: Errors,
    pub emu: Errors,
}

impl Row {
    pub fn passed(&self) -> bool {
        within(self.gpu.norm_rel, self.emu.norm_rel) && within(self.gpu.worst_row, self.emu.worst_row)
    }

    /// How close to failing: the larger of the two relative errors over its allowance (≤ 1
    /// passes).
    pub fn margin(&self) -> f64 {
        let m = |g: f64, e: f64| if g.is_finite() { g / (FACTOR * e + FLOOR) } else { f64::INFINITY };
        m(self.gpu.norm_rel, self.emu.norm_rel).max(m(self.gpu.worst_row, self.emu.worst_row))
    }
}

/// The worst of several rows (by margin), named `what`; none when `rows` is empty.
pub fn worst(what: &str, rows: &[Row]) -> Option<Row> {
    let w = rows.iter().max_by(|a, b| a.margin().total_cmp(&b.margin()))?;
    Some(Row { what: format!("{what} (worst: {})", w.what), gpu: w.gpu, emu: w.emu })
}

/// The inputs plan `name` takes, of those given.
fn only_inputs_of(
    gpu: &GpuBackend,
    name: &str,
    inputs: &[(String, Tensor<f32>)],
) -> Result<Vec<(String, Tensor<f32>)>, String> {
    let plan = gpu.program().plan(name).map_err(|e| e.0)?;
    Ok(inputs.iter().filter(|(n, _)| plan.inputs.iter().any(|(m, _)| m == n)).cloned().collect())
}

/// `t` rounded to what a tensor of `dtype` can hold.
fn round_to(t: &Tensor<f32>, dtype: DType) -> Tensor<f32> {
    match (&t.data, dtype) {
        (Data::Real(v), DType::BF16) => {
            Tensor::real(t.shape.clone(), v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect())
        }
        _ => t.clone(),
    }
}

/// The GPU's persistent tensors as a CPU store (bf16 parameters as their f32 masters).
fn cpu_store(gpu: &GpuBackend) -> Result<Store<f32>, String> {
    let p = gpu.program();
    let names: Vec<&str> =
        p.params.iter().map(|x| x.name.as_str()).chain(p.states.iter().map(|s| s.name.as_str())).collect();
    Ok(Store { tensors: gpu.read(&names)?.into_iter().collect() })
}

/// Compares every step of plan `name` on `inputs`; one row per step output, named
/// `plan[step] op.output`.
pub fn check_steps(gpu: &mut GpuBackend, name: &str, inputs: &[(String, Tensor<f32>)]) -> Result<Vec<Row>, String> {
    let inputs = &only_inputs_of(gpu, name, inputs)?;
    let mut store = cpu_store(gpu)?;
    let (plan, device, _) = gpu.plan_of(name).map_err(|e| e.0)?;
    let (plan, device) = (plan.clone(), device.clone());
    // The emulating run, keeping every value a step writes and every step's inputs: these are
    // bf16 where the plan stores bf16, as the GPU's kernels read them.
    let mut values: HashMap<ValueId, Tensor<f32>> = HashMap::new();
    let mut step_inputs: Vec<Vec<Tensor<f32>>> = Vec::new();
    {
        let mut observe = |i: usize, ins: &[&Tensor<f32>], outs: &[Tensor<f32>]| {
            for (v, t) in plan.steps[i].outputs.iter().zip(outs) {
                values.insert(*v, t.clone());
            }
            step_inputs.push(ins.iter().map(|t| (*t).clone()).collect());
        };
        run_rounded(&plan, &mut store, inputs.to_vec(), Rounding::LikeGpu, &mut observe)
            .map_err(|e| format!("CPU reference: {}", e.0))?;
    }
    let (batch, seq) = gpu.stage_inputs(name, inputs).map_err(|e| e.0)?;
    let view_root: HashMap<ValueId, ValueId> = device.memory.views.iter().copied().collect();
    let in_arena: std::collections::HashSet<ValueId> = device.memory.buffers.iter().map(|b| b.value).collect();
    let mut rows = Vec::new();
    let mut next = 0;
    for (i, step) in plan.steps.iter().enumerate() {
        let start = next;
        while next < device.origin.len() && device.origin[next] == i {
            next += 1;
        }
        if start == next {
            continue; // a view, or a step lowered with the one before it
        }
        // Steps lowered together with this one (no device steps of their own, and no view):
        // their outputs are written by this step's device steps.
        let mut group = vec![i];
        while let Some(s) = plan.steps.get(group.len() + i) {
            let j = i + group.len();
            if matches!(s.op, crate::Op::Slice { .. }) || device.origin.contains(&j) {
                break;
            }
            group.push(j);
        }
        let mut exact = Vec::new();
        for &j in &group {
            let step = &plan.steps[j];
            for (k, v) in step.inputs.iter().enumerate() {
                // Put the value (or, for a view, the tensor it views) where the kernel reads it.
                let root = view_root.get(v).copied().unwrap_or(*v);
                if !in_arena.contains(&root) {
                    continue; // inputs and persistent tensors are in place already
                }
                let t = if root == *v {
                    round_to(&step_inputs[j][k], plan.values[*v as usize].dtype)
                } else {
                    round_to(&values[&root], plan.values[root as usize].dtype)
                };
                gpu.put(name, root, &t).map_err(|e| e.0)?;
            }
            // The exact result from the same inputs.
            let ins64: Vec<Tensor<f64>> = step_inputs[j].iter().map(|t| t.cast()).collect();
            let refs: Vec<&Tensor<f64>> = ins64.iter().collect();
            let shapes: Vec<Vec<usize>> = step.outputs.iter().map(|v| values[v].shape.clone()).collect();
            let want = execute_with(&step.op, &refs, &shapes, false).map_err(|e| format!("CPU step {j}: {e}"))?;
            exact.push(want);
        }
        gpu.run_device_steps(name, batch, seq, start..next).map_err(|e| format!("step {i} ({}): {}", step.op, e.0))?;
        for (&j, want_all) in group.iter().zip(&exact) {
            let step = &plan.steps[j];
            for (k, v) in step.outputs.iter().enumerate() {
                let got = gpu.fetch_value(name, *v, batch, seq).map_err(|e| e.0)?;
                let want: Vec<f64> = match &want_all[k].data {
                    Data::Real(x) => x.clone(),
                    Data::Int(x) => x.iter().map(|&y| y as f64).collect(),
                };
                // The emulation keeps AdamW's parameter output as the f32 master; the GPU's
                // output value is the bf16 copy, rounded from it.
                let emu = round_to(&values[v], plan.values[*v as usize].dtype);
                rows.push(Row {
                    what: format!("{name}[{j}] {}.{k}", step.op.name()),
                    gpu: errors_of(&got, &want),
                    emu: errors_of(&emu, &want),
                });
            }
        }
    }
    Ok(rows)
}

/// What the whole-model check runs.
#[derive(Clone, Debug)]
pub struct ModelCheck {
    /// Optimizer steps (each after `grad_accum` training steps).
    pub optimizer_steps: usize,
    pub grad_accum: usize,
    /// Prompt length for prefill, then decode steps after it.
    pub prompt: usize,
    pub decode_steps: usize,
    pub seed: u64,
}

/// The three backends of the whole-model check.
struct Three<'a> {
    gpu: &'a mut GpuBackend,
    emu: CpuBackend,
    exact: CpuBackend,
}

impl Three<'_> {
    /// Runs `plan` on all three; returns (gpu, emu, f64) outputs.
    #[allow(clippy::type_complexity)]
    fn run(
        &mut self,
        plan: &str,
        inputs: &[(String, Tensor<f32>)],
    ) -> Result<(BTreeMap<String, Tensor<f32>>, BTreeMap<String, Tensor<f32>>, BTreeMap<String, Tensor<f32>>), String>
    {
        let g = self.gpu.run(plan, inputs.to_vec()).map_err(|e| format!("GPU, plan `{plan}`: {e}"))?;
        let e = self.emu.run(plan, inputs.to_vec()).map_err(|e| format!("CPU (bf16), plan `{plan}`: {e}"))?;
        let x = self.exact.run(plan, inputs.to_vec()).map_err(|e| format!("CPU (f64), plan `{plan}`: {e}"))?;
        Ok((g, e, x))
    }

    #[allow(clippy::type_complexity)]
    fn read_all(
        &self,
        names: &[&str],
    ) -> Result<(BTreeMap<String, Tensor<f32>>, BTreeMap<String, Tensor<f32>>, BTreeMap<String, Tensor<f32>>), String>
    {
        Ok((self.gpu.read(names)?, self.emu.read(names)?, self.exact.read(names)?))
    }
}

/// One tensor's values on the GPU, in the emulation and in f64, and its row width.
type Three64 = (Vec<f64>, Vec<f64>, Vec<f64>, usize);

/// One row over several tensors taken together (each keeping its own rows).
fn joined(what: &str, parts: &[(Tensor<f32>, Tensor<f32>, Tensor<f32>)]) -> Row {
    let vals: Vec<Three64> =
        parts.iter().map(|(a, b, c)| (reals(a), reals(b), reals(c), c.shape.last().copied().unwrap_or(1))).collect();
    let gpu: Vec<(&[f64], &[f64], usize)> = vals.iter().map(|(g, _, x, w)| (&g[..], &x[..], *w)).collect();
    let emu: Vec<(&[f64], &[f64], usize)> = vals.iter().map(|(_, e, x, w)| (&e[..], &x[..], *w)).collect();
    Row { what: what.to_string(), gpu: errors_over(&gpu), emu: errors_over(&emu) }
}

fn zip3(
    g: &BTreeMap<String, Tensor<f32>>,
    e: &BTreeMap<String, Tensor<f32>>,
    x: &BTreeMap<String, Tensor<f32>>,
) -> Vec<(Tensor<f32>, Tensor<f32>, Tensor<f32>)> {
    x.keys().map(|k| (g[k].clone(), e[k].clone(), x[k].clone())).collect()
}

fn row(what: String, g: &Tensor<f32>, e: &Tensor<f32>, x: &Tensor<f32>) -> Row {
    let want = reals(x);
    Row { what, gpu: errors_of(g, &want), emu: errors_of(e, &want) }
}

/// Training inputs for micro-batch `n` at the training step's planned shape: random tokens,
/// and targets of which every 37th is -1 (no target), so the masked loss is exercised.
pub fn train_batch(gpu: &GpuBackend, seed: u64, n: u64) -> Result<Vec<(String, Tensor<f32>)>, String> {
    let s = gpu.bundle().plans.get("train_step").ok_or("the bundle has no training step")?.0;
    let (b, t) = (s.batch as usize, s.seq as usize);
    let v = super::bench::vocab(gpu.program());
    let mut targets = super::bench::tokens(b * t, v, seed * 1000 + 2 * n + 1);
    for (i, x) in targets.iter_mut().enumerate() {
        if i % 37 == 36 {
            *x = crate::cpu::dense::NO_TARGET;
        }
    }
    Ok(vec![
        ("tokens".into(), Tensor::ints(vec![b, t], super::bench::tokens(b * t, v, seed * 1000 + 2 * n))),
        ("targets".into(), Tensor::ints(vec![b, t], targets)),
    ])
}

/// The whole model on the three backends: `optimizer_steps` AdamW steps of `grad_accum`
/// micro-batches each, every step from the f64 run's state (parameters and moments copied into
/// the other two first, so each step is compared on its own rather than through the chaotic
/// growth of earlier differences): the loss of every micro-batch, every gradient, the global
/// norm, the clip scale and every parameter after the step; then a prefill and `decode_steps`
/// decode steps teacher-forced with the f64 run's greedy tokens (every step's logits). Returns
/// the rows and each optimizer step's clip scale.
pub fn check_model(gpu: &mut GpuBackend, c: &ModelCheck) -> Result<(Vec<Row>, Vec<f64>), String> {
    let program = gpu.program().clone();
    let start = cpu_store(gpu)?;
    let mut emu = CpuBackend::new_like_gpu(program.clone(), 0);
    let mut exact = CpuBackend::new_f64(program.clone(), 0);
    emu.write(start.tensors.clone())?;
    exact.write(start.tensors.clone())?;
    let mut three = Three { gpu, emu, exact };
    let mut rows = Vec::new();
    let mut clips = Vec::new();
    let params: Vec<&str> = program.params.iter().map(|p| p.name.as_str()).collect();
    let grads: Vec<String> = params.iter().map(|p| format!("grad_acc:{p}")).collect();
    let grads: Vec<&str> = grads.iter().map(String::as_str).collect();
    let states: Vec<&str> = program.states.iter().map(|s| s.name.as_str()).collect();
    let scale = Tensor::scalar(1.0 / c.grad_accum.max(1) as f32);
    for step in 0..c.optimizer_steps {
        // Every backend from the exact run's state.
        let mut names = params.clone();
        names.extend(&states);
        let state = three.exact.read(&names)?;
        three.gpu.write(state.clone())?;
        three.emu.write(state)?;
        let mut losses = Vec::new();
        for micro in 0..c.grad_accum.max(1) {
            let mut inputs = train_batch(three.gpu, c.seed, (step * c.grad_accum.max(1) + micro) as u64)?;
            inputs.push(("loss_scale".into(), scale.clone()));
            let (g, e, x) = three.run("train_step", &inputs)?;
            losses.push((g["loss"].clone(), e["loss"].clone(), x["loss"].clone()));
        }
        rows.push(joined(&format!("step {}: loss of each of {} micro-batches", step + 1, losses.len()), &losses));
        let (g, e, x) = three.read_all(&grads)?;
        rows.push(joined(&format!("step {}: every gradient ({} tensors)", step + 1, grads.len()), &zip3(&g, &e, &x)));
        let opt = vec![("step".to_string(), Tensor::ints(vec![], vec![step as i32]))];
        let (g, e, x) = three.run("optimizer_step", &opt)?;
        rows.push(row(
            format!("step {}: gradient norm²", step + 1),
            &g["grad_sum_squares"],
            &e["grad_sum_squares"],
            &x["grad_sum_squares"],
        ));
        clips.push(x["clip"].item().map_or(f64::NAN, f64::from));
        rows.push(row(format!("step {}: clip scale", step + 1), &g["clip"], &e["clip"], &x["clip"]));
        let (g, e, x) = three.read_all(&params)?;
        rows.push(joined(
            &format!("step {}: every parameter after AdamW ({} tensors)", step + 1, params.len()),
            &zip3(&g, &e, &x),
        ));
    }
    // Generation from the trained parameters.
    let v = super::bench::vocab(&program);
    let prompt = super::bench::tokens(c.prompt, v, c.seed + 7);
    let tokens = |ids: &[i32]| vec![("tokens".to_string(), Tensor::ints(vec![1, ids.len()], ids.to_vec()))];
    // Every position's logits (the `logits` plan), then the prefill's (its last position).
    let (gl, el, xl) = three.run("logits", &tokens(&prompt))?;
    rows.push(row(
        format!("logits of every position ({} tokens)", c.prompt),
        &gl["logits"],
        &el["logits"],
        &xl["logits"],
    ));
    let (mut gs, mut es, mut xs) = three.run("prefill", &tokens(&prompt))?;
    rows.push(row(
        format!("prefill logits (last of {} tokens)", c.prompt),
        &gs["logits"],
        &es["logits"],
        &xs["logits"],
    ));
    if three.gpu.bundle().plans.contains_key("chunk") {
        rows.extend(chunked_prefill(&mut three, &program, &prompt, &xs)?);
    }
    let decode = program.plan("decode").map_err(|e| e.0)?.clone();
    let argmax = |t: &Tensor<f32>| {
        let r = reals(t);
        let last = &r[r.len() - v..];
        last.iter().enumerate().fold((0usize, f64::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0 as i32
    };
    let mut next = argmax(&xs["logits"]);
    let mut steps = Vec::new();
    // The teacher-forced tokens and the GPU's logits of each step, for the batched run below.
    let mut forced = Vec::new();
    let mut alone = Vec::new();
    for s in 0..c.decode_steps {
        let pos = c.prompt + s;
        let gi = crate::generate::decode_inputs(&decode, &mut gs, vec![next], &[pos])?;
        let ei = crate::generate::decode_inputs(&decode, &mut es, vec![next], &[pos])?;
        let xi = crate::generate::decode_inputs(&decode, &mut xs, vec![next], &[pos])?;
        forced.push(next);
        gs = three.gpu.run("decode", gi).map_err(|e| format!("GPU decode at position {pos}: {e}"))?;
        es = three.emu.run("decode", ei).map_err(|e| format!("CPU (bf16) decode at position {pos}: {e}"))?;
        xs = three.exact.run("decode", xi).map_err(|e| format!("CPU (f64) decode at position {pos}: {e}"))?;
        steps.push(row(format!("position {pos}"), &gs["logits"], &es["logits"], &xs["logits"]));
        same_argmax(&gs["logits"], &xs["logits"], &format!("decode at position {pos}"))?;
        alone.push(gs["logits"].clone());
        next = argmax(&xs["logits"]);
    }
    rows.extend(worst(&format!("decode logits, positions {}..{}", c.prompt, c.prompt + c.decode_steps), &steps));
    let batch = program_batch(three.gpu, "decode");
    if batch >= 2 {
        rows.extend(batched_decode(&mut three, c, batch.min(3), &forced, &alone)?);
    }
    Ok((rows, clips))
}

/// The prompt again in chunks from empty states (the `chunk` plan), of 1, 63, 64 and 100
/// tokens in turn (at most the plan's chunk), so chunks cross windows and rings wrap within and
/// across chunks: every chunk's last logits, then the last chunk's logits and the states after
/// it against the whole prompt's prefill (`whole`, the f64 reference's).
fn chunked_prefill(
    three: &mut Three,
    program: &crate::plan::Program,
    prompt: &[i32],
    whole: &BTreeMap<String, Tensor<f32>>,
) -> Result<Vec<Row>, String> {
    let plan = program.plan("chunk").map_err(|e| e.0)?.clone();
    let longest = three.gpu.bundle().plans["chunk"].0.seq as usize;
    let names = crate::generate::state_names(&plan);
    let zeros: BTreeMap<String, Tensor<f32>> = crate::generate::zero_states(&plan, 1).into_iter().collect();
    let (mut g, mut e, mut x) = (zeros.clone(), zeros.clone(), zeros);
    let has_pos = plan.input_type("pos").is_some();
    let mut steps = Vec::new();
    let (mut start, mut i) = (0, 0);
    while start < prompt.len() {
        let n = [1, 63, 64, 100][i % 4].min(longest).min(prompt.len() - start);
        i += 1;
        let inputs = |prev: &mut BTreeMap<String, Tensor<f32>>| -> Result<Vec<(String, Tensor<f32>)>, String> {
            let mut v = Vec::new();
            for name in &names {
                v.push((name.clone(), prev.remove(name).ok_or(format!("the chunk plan gave no `{name}`"))?));
            }
            v.push(("tokens".to_string(), Tensor::ints(vec![1, n], prompt[start..start + n].to_vec())));
            if has_pos {
                v.push(("pos".to_string(), Tensor::ints(vec![1], vec![start as i32])));
            }
            Ok(v)
        };
        let (gi, ei, xi) = (inputs(&mut g)?, inputs(&mut e)?, inputs(&mut x)?);
        g = three.gpu.run("chunk", gi).map_err(|e| format!("GPU chunk at {start}: {e}"))?;
        e = three.emu.run("chunk", ei).map_err(|e| format!("CPU (bf16) chunk at {start}: {e}"))?;
        x = three.exact.run("chunk", xi).map_err(|e| format!("CPU (f64) chunk at {start}: {e}"))?;
        steps.push(row(format!("tokens {start}..{}", start + n), &g["logits"], &e["logits"], &x["logits"]));
        same_argmax(&g["logits"], &x["logits"], &format!("chunk at {start}"))?;
        start += n;
    }
    let mut rows: Vec<Row> =
        worst(&format!("chunked prefill logits, chunks of 1, 63, 64, 100 over {} tokens", prompt.len()), &steps)
            .into_iter()
            .collect();
    rows.push(row(
        "chunked prefill: last logits against the whole prompt's".into(),
        &g["logits"],
        &e["logits"],
        &whole["logits"],
    ));
    let states: Vec<Row> = names.iter().map(|n| row(n.clone(), &g[n], &e[n], &whole[n])).collect();
    rows.extend(worst("chunked prefill: states after the prompt against the whole prompt's", &states));
    Ok(rows)
}

/// The most sequences plan `name` was built for.
fn program_batch(gpu: &GpuBackend, name: &str) -> usize {
    gpu.bundle().plans.get(name).map_or(1, |p| p.0.batch as usize)
}

/// Fails where the GPU's greedy token differs from the f64 reference's while the reference's
/// top two logits are more than 0.1 apart (closer than that, bf16 rounding may swap them).
fn same_argmax(gpu: &Tensor<f32>, exact: &Tensor<f32>, what: &str) -> Result<(), String> {
    let (g, x) = (reals(gpu), reals(exact));
    let v = exact.shape.last().copied().unwrap_or(1).max(1);
    for (i, (gr, xr)) in g.chunks(v).zip(x.chunks(v)).enumerate() {
        let top = |r: &[f64]| r.iter().enumerate().fold((0, f64::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m });
        let (xi, xm) = top(xr);
        let second = xr.iter().enumerate().filter(|&(j, _)| j != xi).map(|(_, &x)| x).fold(f64::MIN, f64::max);
        let (gi, _) = top(gr);
        if gi != xi && xm - second > 0.1 {
            return Err(format!(
                "{what}, sequence {i}: the GPU's greedy token is {gi}, the reference's {xi} with a top-2 margin of {:.3}",
                xm - second
            ));
        }
    }
    Ok(())
}

/// Sequences of different prompt lengths, each prefilled alone, then decoded together in one
/// batch at their own positions, teacher-forced with the reference's tokens of the one-sequence
/// run (sequence 0 repeats that run exactly): every step's logits against the references, the
/// greedy tokens where the reference is decided, and whether sequence 0's logits are bit for
/// bit those it had decoding alone.
fn batched_decode(
    three: &mut Three,
    c: &ModelCheck,
    batch: usize,
    forced: &[i32],
    alone: &[Tensor<f32>],
) -> Result<Vec<Row>, String> {
    let program = three.gpu.program().clone();
    let decode = program.plan("decode").map_err(|e| e.0)?.clone();
    let names = crate::generate::state_names(&decode);
    let v = super::bench::vocab(&program);
    let lens: Vec<usize> = (0..batch).map(|i| [c.prompt, c.prompt / 3 + 1, c.prompt.min(5)][i % 3]).collect();
    let mut prefilled = (Vec::new(), Vec::new(), Vec::new());
    for (i, &n) in lens.iter().enumerate() {
        let ids = super::bench::tokens(n, v, c.seed + 7 + i as u64 * (i as u64 + 1));
        let (g, e, x) = three.run("prefill", &[("tokens".to_string(), Tensor::ints(vec![1, n], ids))])?;
        prefilled.0.push(g);
        prefilled.1.push(e);
        prefilled.2.push(x);
    }
    let stack = |each: &[BTreeMap<String, Tensor<f32>>]| -> Result<BTreeMap<String, Tensor<f32>>, String> {
        names
            .iter()
            .map(|n| {
                let parts: Vec<&Tensor<f32>> = each
                    .iter()
                    .map(|m| m.get(n).ok_or(format!("the prefill gives no `{n}`")))
                    .collect::<Result<_, _>>()?;
                let mut shape = parts[0].shape.clone();
                shape[0] = parts.len();
                let data: Vec<f32> = parts
                    .iter()
                    .map(|t| t.reals().map(<[f32]>::to_vec))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("ids")?
                    .concat();
                Ok((n.clone(), Tensor::real(shape, data)))
            })
            .collect()
    };
    let (mut gs, mut es, mut xs) = (stack(&prefilled.0)?, stack(&prefilled.1)?, stack(&prefilled.2)?);
    let mut steps = Vec::new();
    let mut same = 0;
    // Sequence 0 takes the forced tokens; the others the reference's own greedy tokens.
    let mut next: Vec<i32> = (0..batch as i32).map(|i| 1 + i).collect();
    // At most 400 steps: a batch of three costs the CPU references three times a lone step.
    let count = forced.len().min(400);
    for (s, &token) in forced.iter().enumerate().take(count) {
        let pos: Vec<usize> = lens.iter().map(|l| l + s).collect();
        next[0] = token;
        let gi = crate::generate::decode_inputs(&decode, &mut gs, next.clone(), &pos)?;
        let ei = crate::generate::decode_inputs(&decode, &mut es, next.clone(), &pos)?;
        let xi = crate::generate::decode_inputs(&decode, &mut xs, next.clone(), &pos)?;
        gs = three.gpu.run("decode", gi).map_err(|e| format!("GPU batched decode, step {s}: {e}"))?;
        es = three.emu.run("decode", ei).map_err(|e| format!("CPU (bf16) batched decode, step {s}: {e}"))?;
        xs = three.exact.run("decode", xi).map_err(|e| format!("CPU (f64) batched decode, step {s}: {e}"))?;
        steps.push(row(format!("step {s}"), &gs["logits"], &es["logits"], &xs["logits"]));
        same_argmax(&gs["logits"], &xs["logits"], &format!("batched decode, step {s}"))?;
        let g = gs["logits"].reals().ok_or("logits are ids")?;
        if alone.get(s).and_then(|t| t.reals()).is_some_and(|a| a == &g[..v]) {
            same += 1;
        }
        let x = reals(&xs["logits"]);
        for (i, n) in next.iter_mut().enumerate().skip(1) {
            let r = &x[i * v..(i + 1) * v];
            *n = r.iter().enumerate().fold((0usize, f64::MIN), |m, (j, &y)| if y > m.1 { (j, y) } else { m }).0 as i32;
        }
    }
    let what = format!(
        "batched decode logits, {batch} sequences from prompts of {lens:?} tokens, {count} steps; sequence 0 equals its lone run bit for bit at {same} of them"
    );
    Ok(worst(&what, &steps).into_iter().collect())
}

/// What `weft-run check` runs on a bundle.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub seed: u64,
    /// Skip the whole-model check (the step checks alone).
    pub steps_only: bool,
    /// Which plans' steps to check (of `train_step`, `eval`, `optimizer_step`, `prefill`).
    pub plans: Vec<String>,
    pub model: ModelCheck,
}

/// The plans whose steps the check compares, in order.
pub const STEP_PLANS: [&str; 5] = ["train_step", "eval", "optimizer_step", "prefill", "score"];

/// The outcome: the worst step check of each operation, the whole-model rows, each optimizer
/// step's clip scale, and every failing step check.
pub struct Report {
    pub by_op: Vec<Row>,
    pub model: Vec<Row>,
    pub clips: Vec<f64>,
    pub failed_steps: Vec<Row>,
    pub step_checks: usize,
    /// Whether ids outside the vocabulary were refused (or why not).
    pub ids_refused: Result<(), String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failed_steps.is_empty()
            && self.by_op.iter().chain(&self.model).all(Row::passed)
            && self.ids_refused.is_ok()
    }
}

/// The step checks of the training step, evaluation, the optimizer step (after real steps, so
/// its moments and gradients are not zero) and prefill, then the whole model.
pub fn check_bundle(be: &mut GpuBackend, o: &CheckOptions) -> Result<Report, String> {
    let mut rows = Vec::new();
    let t0 = std::time::Instant::now();
    // Progress on stderr as each plan's steps are checked (a long check shows how far it got).
    let progress = |plan: &str, new: &[Row]| {
        let failed = new.iter().filter(|r| !r.passed()).count();
        let worst = new.iter().map(Row::margin).fold(0.0, f64::max);
        eprintln!(
            "  {plan}: {} step outputs, {failed} failed, worst margin {worst:.2} ({:.0} s)",
            new.len(),
            t0.elapsed().as_secs_f64()
        );
    };
    let inputs = train_batch(be, o.seed, 1_000)?;
    let mut train = inputs.clone();
    train.push(("loss_scale".into(), Tensor::scalar(1.0)));
    let wanted = |p: &str| o.plans.iter().any(|x| x == p);
    if wanted("train_step") {
        let r = check_steps(be, "train_step", &train)?;
        progress("train_step", &r);
        rows.extend(r);
    }
    if wanted("eval") {
        let r = check_steps(be, "eval", &inputs)?;
        progress("eval", &r);
        rows.extend(r);
    }
    // Two real training steps and one optimizer step first: the moments and the accumulated
    // gradients the optimizer step reads are then all non-zero.
    for n in 0..2 {
        be.run("train_step", train_with(&train_batch(be, o.seed, 2_000 + n)?))?;
        if n == 0 {
            be.run("optimizer_step", vec![("step".into(), Tensor::ints(vec![], vec![0]))])?;
        }
    }
    if wanted("optimizer_step") {
        let r = check_steps(be, "optimizer_step", &[("step".into(), Tensor::ints(vec![], vec![1]))])?;
        progress("optimizer_step", &r);
        rows.extend(r);
    }
    be.run("optimizer_step", vec![("step".into(), Tensor::ints(vec![], vec![1]))])?;
    let v = super::bench::vocab(be.program());
    let prompt = super::bench::tokens(o.model.prompt, v, o.seed + 7);
    if wanted("prefill") {
        let r = check_steps(be, "prefill", &[("tokens".into(), Tensor::ints(vec![1, prompt.len()], prompt))])?;
        progress("prefill", &r);
        rows.extend(r);
    }
    // The score plan runs at exactly its planned shape (its head works in fixed chunks): random
    // tokens and targets there, every 37th target masked.
    if let Some(shape) = be.bundle().plans.get("score").map(|p| p.0).filter(|_| wanted("score")) {
        let (b, t) = (shape.batch as usize, shape.seq as usize);
        let ids = super::bench::tokens(b * t, v, o.seed + 11);
        let targets: Vec<i32> = super::bench::tokens(b * t, v, o.seed + 13)
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 37 == 0 { -1 } else { x })
            .collect();
        let inputs = [
            ("tokens".to_string(), Tensor::ints(vec![b, t], ids)),
            ("targets".to_string(), Tensor::ints(vec![b, t], targets)),
        ];
        let r = check_steps(be, "score", &inputs)?;
        progress("score", &r);
        rows.extend(r);
    }
    let mut by_op: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for r in &rows {
        let op = r.what.split(' ').nth(1).unwrap_or("").split('.').next().unwrap_or("").to_string();
        by_op.entry(op).or_default().push(r.clone());
    }
    let by_op = by_op.iter().filter_map(|(op, rs)| worst(op, rs)).collect();
    let failed_steps: Vec<Row> = rows.iter().filter(|r| !r.passed()).cloned().collect();
    let ids_refused = refuses_bad_ids(be, &inputs);
    let (model, clips) = if o.steps_only { (Vec::new(), Vec::new()) } else { check_model(be, &o.model)? };
    Ok(Report { by_op, model, clips, failed_steps, step_checks: rows.len(), ids_refused })
}

/// Whether the GPU refuses an id outside the vocabulary, and a target below -1, before any
/// kernel reads them (the message names the id).
fn refuses_bad_ids(be: &mut GpuBackend, inputs: &[(String, Tensor<f32>)]) -> Result<(), String> {
    let v = super::bench::vocab(be.program()) as i32;
    for (which, id) in [("tokens", v), ("targets", -2)] {
        let mut bad = inputs.to_vec();
        if let Some((_, Tensor { data: Data::Int(ids), .. })) = bad.iter_mut().find(|(n, _)| n == which) {
            ids[5] = id;
        }
        match be.run("eval", bad) {
            Err(e) if e.contains(&format!("token id {id}")) => {}
            Err(e) => return Err(format!("{which} id {id}: refused, but the message does not name it: {e}")),
            Ok(_) => return Err(format!("{which} id {id} outside the vocabulary of {v} was accepted")),
        }
    }
    Ok(())
}

fn train_with(batch: &[(String, Tensor<f32>)]) -> Vec<(String, Tensor<f32>)> {
    let mut v = batch.to_vec();
    v.push(("loss_scale".into(), Tensor::scalar(1.0)));
    v
}

/// The table the check prints: one line per row (the GPU's errors, the emulation's, and the
/// margin: the GPU's relative error over its allowance), then the count of failures.
pub fn render(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<70} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>6}\n",
        "output", "gpu rel", "max-abs", "worst row", "bf16 rel", "max-abs", "worst row", "margin"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<70} {:>9.2e} {:>9.2e} {:>9.2e} | {:>9.2e} {:>9.2e} {:>9.2e} | {:>6.2} {}\n",
            r.what,
            r.gpu.norm_rel,
            r.gpu.max_abs,
            r.gpu.worst_row,
            r.emu.norm_rel,
            r.emu.max_abs,
            r.emu.worst_row,
            r.margin(),
            if r.passed() { "ok" } else { "FAIL" }
        ));
    }
    let failed = rows.iter().filter(|r| !r.passed()).count();
    s.push_str(&format!(
        "{} checks, {} failed (pass: gpu ≤ {FACTOR}·bf16 + 2^-16, norm-relative and worst row, against f64)\n",
        rows.len(),
        failed
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_measure_norms_maxima_and_rows() {
        let want = [3.0, 4.0, 0.0, 0.0, 1.0, 0.0];
        let got = [3.0, 4.0, 0.0, 0.0, 1.5, 0.0];
        let e = errors(&got, &want, 2);
        assert!((e.norm_rel - 0.5 / 26f64.sqrt()).abs() < 1e-15);
        assert_eq!(e.max_abs, 0.5);
        // The last row's norm (1) is below the average row's (√(26/3)): relative to that.
        assert!((e.worst_row - 0.5 / (26f64 / 3.0).sqrt()).abs() < 1e-15, "{e:?}");
        // A wrong tail row of ordinary size shows in the worst row even when the norm hides it.
        let mut want = vec![1.0; 1000];
        let mut got = want.clone();
        got[998] = -1.0;
        want.truncate(1000);
        let e = errors(&got, &want, 2);
        assert!(e.norm_rel < 0.07 && e.worst_row > 1.0, "{e:?}");
        // A row far smaller than the rest, a little off, is not the worst.
        let mut want = vec![1.0; 1000];
        want.extend([1e-6, 1e-6]);
        let mut got = want.clone();
        got[1000] = 1.1e-6;
        assert!(errors(&got, &want, 2).worst_row < 1e-6);
        assert!(errors(&[f64::NAN], &[1.0], 1).norm_rel.is_infinite());
        // Tensors taken together keep their own rows.
        let e = errors_over(&[(&[1.0, 1.0], &[1.0, 1.0], 2), (&[2.0], &[1.0], 1)]);
        assert!((e.norm_rel - 1.0 / 3f64.sqrt()).abs() < 1e-15 && (e.worst_row - 1.0).abs() < 1e-15, "{e:?}");
    }

    #[test]
    fn the_rule_allows_twice_the_rounding_plus_the_floor() {
        assert!(within(2e-3 + FLOOR, 1e-3));
        assert!(!within(2.01e-3 + FLOOR, 1e-3));
        assert!(within(FLOOR, 0.0) && !within(2.0 * FLOOR, 0.0));
        assert!(!within(f64::NAN, 1.0));
    }
}
