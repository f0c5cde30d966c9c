//! The GPU check: every step of every plan of a bundle, and then the whole model, against the
//! CPU reference.
//!
//! Step by step: the CPU reference runs a plan in f32 and keeps every step's inputs and outputs;
//! the GPU then runs each step alone on exactly those inputs (rounded to bf16 where the plan
//! stores bf16) and its outputs are compared, so an error points at one kernel. Whole model:
//! both backends start from the same parameters (the GPU's f32 masters), run a training step
//! (loss and every gradient), an optimizer step (every parameter's update) and generation
//! (prefill and decode logits). Errors are norm-relative: ‖gpu − cpu‖ / ‖cpu‖.

use super::exec::GpuBackend;
use crate::backend::{Backend, CpuBackend};
use crate::cpu::exec::{run_observed, Store};
use crate::cpu::tensor::{Data, Tensor};
use crate::plan::ValueId;
use crate::DType;
use std::collections::HashMap;

/// One comparison.
#[derive(Clone, Debug)]
pub struct Row {
    pub what: String,
    pub error: f64,
    pub tolerance: f64,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// Tolerance for a step's output stored as `dtype`: bf16 keeps 8 bits of mantissa (relative
/// rounding 2⁻⁹ per element, plus what the inputs' rounding carries); f32 outputs come from bf16
/// inputs with f32 accumulation and approximate exponentials.
pub fn step_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 | DType::F16 => 2e-2,
        _ => 5e-3,
    }
}

fn reals(t: &Tensor<f32>) -> Vec<f64> {
    match &t.data {
        Data::Real(v) => v.iter().map(|&x| x as f64).collect(),
        Data::Int(v) => v.iter().map(|&x| x as f64).collect(),
    }
}

/// ‖a − b‖ / ‖b‖ (0 when both are zero; the difference's norm when only b is).
pub fn norm_relative(got: &Tensor<f32>, want: &Tensor<f32>) -> f64 {
    let (g, w) = (reals(got), reals(want));
    if g.len() != w.len() {
        return f64::INFINITY;
    }
    let diff: f64 = g.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    let norm: f64 = w.iter().map(|b| b * b).sum::<f64>().sqrt();
    if !diff.is_finite() {
        return f64::INFINITY;
    }
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
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

/// The GPU's persistent tensors as the CPU store (bf16 parameters as their f32 masters).
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
    // Parameters as the GPU's kernels read them (bf16 copies, not the f32 masters).
    for (n, t) in store.tensors.iter_mut() {
        if let Some(p) = gpu.program().params.iter().find(|p| &p.name == n) {
            *t = round_to(t, p.ty.dtype);
        }
    }
    let (plan, device, _) = gpu.plan_of(name).map_err(|e| e.0)?;
    let (plan, device) = (plan.clone(), device.clone());
    // The CPU run, keeping every value a step writes.
    let mut values: HashMap<ValueId, Tensor<f32>> = HashMap::new();
    let mut step_inputs: Vec<Vec<Tensor<f32>>> = Vec::new();
    {
        let mut observe = |i: usize, ins: &[&Tensor<f32>], outs: &[Tensor<f32>]| {
            for (v, t) in plan.steps[i].outputs.iter().zip(outs) {
                values.insert(*v, t.clone());
            }
            step_inputs.push(ins.iter().map(|t| (*t).clone()).collect());
        };
        run_observed(&plan, &mut store, inputs.to_vec(), &mut observe)
            .map_err(|e| format!("CPU reference: {}", e.0))?;
    }
    // Each step again on the CPU from its inputs rounded as the plan stores them, and on the
    // GPU from the same rounded inputs: the difference is the kernel's own.
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
        let mut wants = Vec::new();
        for &j in &group {
            let step = &plan.steps[j];
            let rounded: Vec<Tensor<f32>> = step
                .inputs
                .iter()
                .zip(&step_inputs[j])
                .map(|(v, t)| round_to(t, plan.values[*v as usize].dtype))
                .collect();
            for (k, v) in step.inputs.iter().enumerate() {
                // Put the value (or, for a view, the tensor it views) where the kernel reads it.
                let root = view_root.get(v).copied().unwrap_or(*v);
                if !in_arena.contains(&root) {
                    continue; // inputs and persistent tensors are in place already
                }
                let t = if root == *v {
                    rounded[k].clone()
                } else {
                    round_to(&values[&root], plan.values[root as usize].dtype)
                };
                gpu.put(name, root, &t).map_err(|e| e.0)?;
            }
            let shapes: Vec<Vec<usize>> = step.outputs.iter().map(|v| values[v].shape.clone()).collect();
            let refs: Vec<&Tensor<f32>> = rounded.iter().collect();
            let want = crate::cpu::exec::execute(&step.op, &refs, &shapes).map_err(|e| format!("CPU step {j}: {e}"))?;
            wants.push(want);
        }
        gpu.run_device_steps(name, batch, seq, start..next).map_err(|e| format!("step {i} ({}): {}", step.op, e.0))?;
        for (&j, want_all) in group.iter().zip(&wants) {
            let step = &plan.steps[j];
            for (k, v) in step.outputs.iter().enumerate() {
                let got = gpu.fetch_value(name, *v, batch, seq).map_err(|e| e.0)?;
                let want = &want_all[k];
                let dtype = plan.values[*v as usize].dtype;
                rows.push(Row {
                    what: format!("{name}[{j}] {}.{k}", step.op.name()),
                    error: norm_relative(&got, want),
                    tolerance: step_tolerance(dtype),
                });
            }
        }
    }
    Ok(rows)
}

/// The whole model: a training step, an optimizer step and generation on both backends from
/// the same parameters.
pub fn check_model(
    gpu: &mut GpuBackend,
    train_inputs: &[(String, Tensor<f32>)],
    prompt: &[i32],
    decode_steps: usize,
) -> Result<Vec<Row>, String> {
    let mut cpu = CpuBackend::new(gpu.program().clone(), 0);
    let start = cpu_store(gpu)?;
    cpu.write(start.tensors.clone())?;
    let mut rows = Vec::new();
    let g_out = gpu.run("train_step", train_inputs.to_vec())?;
    let c_out = cpu.run("train_step", train_inputs.to_vec())?;
    for (n, want) in &c_out {
        if let Some(got) = g_out.get(n) {
            rows.push(Row {
                what: format!("train_step output `{n}`"),
                error: norm_relative(got, want),
                tolerance: 2e-2,
            });
        }
    }
    let p = gpu.program().clone();
    let grads: Vec<&str> = p.states.iter().map(|s| s.name.as_str()).filter(|n| n.starts_with("grad_acc:")).collect();
    let g_grads = gpu.read(&grads)?;
    let c_grads = cpu.read(&grads)?;
    let mut worst = ("", 0.0f64);
    for n in &grads {
        let e = norm_relative(&g_grads[*n], &c_grads[*n]);
        if e > worst.1 || !e.is_finite() {
            worst = (n, e);
        }
    }
    rows.push(Row {
        what: format!("every gradient after one step ({}; worst {})", grads.len(), worst.0),
        error: worst.1,
        tolerance: 5e-2,
    });
    // The optimizer from the same gradients: compare each parameter's update.
    cpu.write(g_grads.clone())?;
    let params: Vec<&str> = p.params.iter().map(|x| x.name.as_str()).collect();
    let before = gpu.read(&params)?;
    let step = vec![("step".to_string(), Tensor::ints(vec![], vec![0]))];
    let opt_inputs: Vec<(String, Tensor<f32>)> =
        if p.plan("optimizer_step").map(|pl| pl.inputs.is_empty()).unwrap_or(true) { Vec::new() } else { step };
    gpu.run("optimizer_step", opt_inputs.clone())?;
    cpu.run("optimizer_step", opt_inputs)?;
    let (g_after, c_after) = (gpu.read(&params)?, cpu.read(&params)?);
    let mut worst = ("", 0.0f64);
    for n in &params {
        let delta = |a: &Tensor<f32>| {
            let (x, y) = (reals(a), reals(&before[*n]));
            Tensor::real(a.shape.clone(), x.iter().zip(&y).map(|(a, b)| (a - b) as f32).collect())
        };
        let e = norm_relative(&delta(&g_after[*n]), &delta(&c_after[*n]));
        if e > worst.1 || !e.is_finite() {
            worst = (n, e);
        }
    }
    rows.push(Row {
        what: format!("every parameter's AdamW update ({}; worst {})", params.len(), worst.0),
        error: worst.1,
        tolerance: 1e-2,
    });
    // Generation: prefill the prompt, then decode greedily on the CPU's choices.
    let tokens = |ids: &[i32]| vec![("tokens".to_string(), Tensor::ints(vec![1, ids.len()], ids.to_vec()))];
    let g_pre = gpu.run("prefill", tokens(prompt))?;
    let c_pre = cpu.run("prefill", tokens(prompt))?;
    if let (Some(g), Some(c)) = (g_pre.get("logits"), c_pre.get("logits")) {
        rows.push(Row { what: "prefill logits".into(), error: norm_relative(g, c), tolerance: 5e-2 });
    }
    let mut worst = 0.0f64;
    let decode_plan = p.plan("decode").map_err(|e| e.0)?.clone();
    let argmax = |t: &Tensor<f32>| {
        reals(t).iter().enumerate().fold((0usize, f64::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0
    };
    let vocab = c_pre["logits"].shape.last().copied().unwrap_or(1);
    let prompt_logits = reals(&c_pre["logits"]);
    let tail = &prompt_logits[prompt_logits.len() - vocab..];
    let mut next =
        tail.iter().enumerate().fold((0usize, f64::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0 as i32;
    let (mut g_state, mut c_state) = (g_pre, c_pre);
    for s in 0..decode_steps {
        let pos = prompt.len() + s;
        let gi = crate::generate::decode_inputs(&decode_plan, &mut g_state, vec![next], pos)?;
        let ci = crate::generate::decode_inputs(&decode_plan, &mut c_state, vec![next], pos)?;
        g_state = gpu.run("decode", gi)?;
        c_state = cpu.run("decode", ci)?;
        worst = worst.max(norm_relative(&g_state["logits"], &c_state["logits"]));
        next = (argmax(&c_state["logits"]) % vocab) as i32;
    }
    rows.push(Row { what: format!("decode logits ({decode_steps} steps, worst)"), error: worst, tolerance: 5e-2 });
    Ok(rows)
}

/// The table the check prints: one line per row, then the count of failures.
pub fn render(rows: &[Row]) -> String {
    let mut s = String::new();
    for r in rows {
        s.push_str(&format!(
            "{:<64} {:>10.3e}  tol {:>7.1e}  {}\n",
            r.what,
            r.error,
            r.tolerance,
            if r.passed() { "ok" } else { "FAIL" }
        ));
    }
    let failed = rows.iter().filter(|r| !r.passed()).count();
    s.push_str(&format!("{} checks, {} failed\n", rows.len(), failed));
    s
}
