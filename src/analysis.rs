//! Costs read off a verified graph: parameters, forward FLOPs per token, activation memory per
//! token kept for the backward pass, and decode-state bytes per sequence, per section.

use crate::graph::{Graph, NodeKind, Section, Value};
use crate::spec::Model;
use rustc_hash::FxHashSet as HashSet;
use serde::Serialize;
use std::collections::BTreeMap;
use weft_runtime::{Saved, TensorType};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    /// `embed`, `head`, or the layer's index in the expanded sequence.
    pub section: String,
    /// The layer definition's name (`mamba`, `swa`), or the section's.
    pub name: String,
    /// What the layer computes (`mamba`, `swa(w=2048)`, `swiglu`).
    pub kind: String,
    pub parameters: u64,
    pub flops_per_token: f64,
    /// FLOPs of matrix products alone (the 6·N·tokens part of the MFU formula, forward).
    pub matmul_flops_per_token: f64,
    pub activation_bytes_per_token: u64,
    pub decode_state_bytes: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub model: String,
    pub seq: u64,
    pub dtype: String,
    pub vocab: u64,
    pub width: u64,
    pub tied_embeddings: bool,
    pub parameters: u64,
    /// Parameters that are weights of matrix products (the head counted once when tied).
    pub matmul_parameters: u64,
    pub flops_per_token: f64,
    pub activation_bytes_per_token: u64,
    pub decode_state_bytes: u64,
    pub layers: Vec<Row>,
    /// The memory plan of the training step, when computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
}

/// What one training step needs on a device.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MemoryReport {
    pub batch: u64,
    pub seq: u64,
    /// The arena of the training step's activations and gradients (memory plan).
    pub train_arena_bytes: u64,
    /// The most bytes live at once in that step: the arena's lower bound.
    pub train_peak_live_bytes: u64,
    /// Parameters as the plan stores them.
    pub parameter_bytes: u64,
    /// Gradient accumulators and AdamW moments (f32).
    pub optimizer_state_bytes: u64,
    /// About what a training step takes on the CPU reference, which keeps every value in f32:
    /// twice the peak live bytes (bf16 values at 4 bytes), parameters in f32 and the optimizer
    /// state.
    pub cpu_bytes: u64,
    /// About what it takes on a GPU: the arena, parameters (bf16 with f32 masters) and the
    /// optimizer state (kernel scratch comes on top).
    pub gpu_bytes: u64,
}

/// Builds the model's program and plans the training step's memory at `batch` × `seq`.
pub fn memory_report(model: &Model, batch: u64, seq: u64) -> Result<MemoryReport, String> {
    use crate::program::{build_program, OptimizerSettings};
    let settings = OptimizerSettings::from_config(&crate::config::RunConfig::default());
    let program = build_program(model, &settings, seq).map_err(|e| e.0)?;
    memory_report_of(&program, batch, seq)
}

/// [`memory_report`] of a program already built.
pub fn memory_report_of(program: &weft_runtime::plan::Program, batch: u64, seq: u64) -> Result<MemoryReport, String> {
    let plan = program.plan("train_step").map_err(|e| e.0)?;
    let m = weft_runtime::memory::plan_memory(plan, batch, seq);
    m.check()?;
    let parameter_bytes: u64 = program.params.iter().map(|p| weft_runtime::memory::bytes(&p.ty, batch, seq)).sum();
    let optimizer_state_bytes: u64 =
        program.states.iter().map(|s| weft_runtime::memory::bytes(&s.ty, batch, seq)).sum();
    let elems: u64 =
        program.params.iter().map(|p| p.ty.shape.as_fixed().unwrap_or_default().iter().product::<u64>()).sum();
    let masters: u64 = program
        .params
        .iter()
        .filter(|p| p.ty.dtype == weft_runtime::DType::BF16)
        .map(|p| 4 * p.ty.shape.as_fixed().unwrap_or_default().iter().product::<u64>())
        .sum();
    Ok(MemoryReport {
        batch,
        seq,
        train_arena_bytes: m.arena_bytes,
        train_peak_live_bytes: m.peak_live_bytes,
        parameter_bytes,
        optimizer_state_bytes,
        cpu_bytes: 2 * m.peak_live_bytes + 4 * elems + optimizer_state_bytes,
        gpu_bytes: m.arena_bytes + parameter_bytes + masters + optimizer_state_bytes,
    })
}

/// Follows views (slices) to the tensor that owns the memory, and replaces recomputed values by
/// the inputs they are recomputed from.
fn stored_values(g: &Graph, v: Value, out: &mut Vec<Value>) {
    let node = g.node(v.node);
    match &node.kind {
        NodeKind::Param { .. } | NodeKind::State { .. } => {}
        NodeKind::Op(op) if op.is_view() => stored_values(g, g.inputs(v.node)[0], out),
        NodeKind::Op(_) if node.recompute => {
            for i in g.inputs(v.node) {
                stored_values(g, i, out);
            }
        }
        _ => out.push(v),
    }
}

pub fn analyze(g: &Graph, model: &Model, seq: u64) -> Report {
    let mut rows: BTreeMap<Section, Row> = BTreeMap::new();
    let row = |s: Section| -> Row {
        let (section, name, kind) = match s {
            Section::Embed => ("embed".to_string(), "embed".to_string(), "embedding".to_string()),
            Section::Head => (
                "head".to_string(),
                "head".to_string(),
                if model.tied_embeddings { "norm+head(tied)+ce" } else { "norm+head+ce" }.to_string(),
            ),
            Section::Layer(i) => {
                let def = model.def(&model.layers[i]);
                (i.to_string(), def.name.clone(), def.kind.describe())
            }
            Section::Optimizer => ("optimizer".to_string(), "optimizer".to_string(), "adamw".to_string()),
        };
        Row {
            section,
            name,
            kind,
            parameters: 0,
            flops_per_token: 0.0,
            matmul_flops_per_token: 0.0,
            activation_bytes_per_token: 0,
            decode_state_bytes: 0,
        }
    };
    for (_, node) in g.nodes() {
        rows.entry(node.section).or_insert_with(|| row(node.section));
    }

    let mut saved: HashSet<Value> = HashSet::default();
    let mut matmul_weights: HashSet<Value> = HashSet::default();
    for (id, node) in g.nodes() {
        let r = rows.get_mut(&node.section).expect("every section has a row");
        match &node.kind {
            NodeKind::Param { .. } => r.parameters += node.ty().shape.fixed_elems(),
            NodeKind::Input { .. } | NodeKind::State { .. } => {}
            NodeKind::Op(op) => {
                let ins = g.inputs(id);
                let tys: Vec<&TensorType> = ins.iter().map(|i| g.ty(*i)).collect();
                let f = op.flops_per_token(&tys, seq);
                r.flops_per_token += f;
                if op.is_matmul() {
                    r.matmul_flops_per_token += f;
                    matmul_weights.insert(ins[1]);
                }
                r.decode_state_bytes += op.decode_state_bytes(&tys, seq);
                for s in op.saves(&tys) {
                    let mut values = Vec::new();
                    match s {
                        Saved::Input(i) => stored_values(g, ins[i], &mut values),
                        Saved::Output(i) => values.push(Value { node: id, output: i as u32 }),
                        Saved::Stat { bytes_per_token } => r.activation_bytes_per_token += bytes_per_token,
                    }
                    saved.extend(values);
                }
            }
        }
    }
    for v in saved {
        let ty = g.ty(v);
        if ty.shape.is_per_token() {
            rows.get_mut(&g.node(v.node).section).expect("row").activation_bytes_per_token += ty.bytes_per_token();
        }
    }

    let layers: Vec<Row> = rows.into_values().collect();
    Report {
        model: model.name.clone(),
        seq,
        dtype: model.dtype.name().to_string(),
        vocab: model.vocab,
        width: model.width,
        tied_embeddings: model.tied_embeddings,
        parameters: g.parameter_count(),
        matmul_parameters: matmul_weights.iter().map(|w| g.ty(*w).shape.fixed_elems()).sum(),
        flops_per_token: layers.iter().map(|r| r.flops_per_token).sum(),
        activation_bytes_per_token: layers.iter().map(|r| r.activation_bytes_per_token).sum(),
        decode_state_bytes: layers.iter().map(|r| r.decode_state_bytes).sum(),
        layers,
        memory: None,
    }
}

/// `421793280` → `421,793,280`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

fn mflops(f: f64) -> String {
    format!("{:.2}", f / 1e6)
}

/// The per-layer table `weft check` prints.
pub fn render_table(r: &Report) -> String {
    let mut out = format!(
        "{}: {} layers, width {}, vocab {} ({}), {} activations, sequence {}\n\n",
        r.model,
        r.layers.len().saturating_sub(2),
        r.width,
        r.vocab,
        if r.tied_embeddings { "tied" } else { "untied" },
        r.dtype,
        r.seq
    );
    let header = ["layer", "name", "kind", "parameters", "fwd MFLOP/tok", "act/tok (train)", "decode state/seq"];
    let mut cells: Vec<[String; 7]> = r
        .layers
        .iter()
        .map(|l| {
            [
                l.section.clone(),
                l.name.clone(),
                l.kind.clone(),
                group_digits(l.parameters),
                mflops(l.flops_per_token),
                bytes(l.activation_bytes_per_token),
                bytes(l.decode_state_bytes),
            ]
        })
        .collect();
    cells.push([
        "total".into(),
        String::new(),
        String::new(),
        group_digits(r.parameters),
        mflops(r.flops_per_token),
        bytes(r.activation_bytes_per_token),
        bytes(r.decode_state_bytes),
    ]);
    let mut widths = header.map(str::len);
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[String]| -> String {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(widths).enumerate() {
            let pad = w - cell.chars().count();
            if i < 3 {
                s.push_str(cell);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            }
            s.push_str("  ");
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&line(&header.map(String::from)));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    let n = cells.len();
    for (i, c) in cells.iter().enumerate() {
        if i + 1 == n {
            out.push_str(&line(&widths.map(|w| "-".repeat(w))));
        }
        out.push_str(&line(c));
    }
    out.push_str(&format!(
        "\nparameters: {} ({} in matrix products)\n",
        group_digits(r.parameters),
        group_digits(r.matmul_parameters)
    ));
    if let Some(m) = &r.memory {
        out.push_str(&format!(
            "training step at batch {} × {} tokens: activation arena {} (peak live {}), parameters {}, gradients and AdamW state {}\n",
            m.batch,
            m.seq,
            bytes(m.train_arena_bytes),
            bytes(m.train_peak_live_bytes),
            bytes(m.parameter_bytes),
            bytes(m.optimizer_state_bytes)
        ));
        let here = weft_runtime::io::available_memory()
            .map(|a| format!("; this machine has {} available", bytes(a)))
            .unwrap_or_default();
        out.push_str(&format!(
            "it needs about {} on the CPU reference{here}, and {} plus kernel scratch on a GPU\n",
            bytes(m.cpu_bytes),
            bytes(m.gpu_bytes)
        ));
    }
    out
}
