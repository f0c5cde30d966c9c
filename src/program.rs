//! From graphs to a [`Program`]: the training step (forward, backward, gradient accumulation),
//! the optimizer step (global-norm clipping, schedule, AdamW, accumulator reset) and the
//! evaluation pass, each lowered to a plan a backend executes.

use crate::autodiff::{differentiate, grad_name, AutodiffError};
use crate::config::RunConfig;
use crate::graph::{build_mode, verify, Graph, Mode, Node, NodeKind, Section, Value};
use crate::passes::{self, Pass, FUSION};
use crate::spec::Model;
use std::collections::BTreeMap;
use weft_runtime::op::{AdamWAttrs, ScheduleAttrs};
use weft_runtime::plan::{ParamSpec, Plan, Program, SourceSpan, StateSpec, Step};
use weft_runtime::{DType, Op, Shape, TensorType};

/// The state accumulating a parameter's gradient over micro-batches.
pub fn accumulator_name(param: &str) -> String {
    format!("grad_acc:{param}")
}

/// Optimizer settings the optimizer plan bakes in.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerSettings {
    pub adamw: AdamWAttrs,
    pub schedule: ScheduleAttrs,
    pub grad_clip: f64,
}

impl OptimizerSettings {
    pub fn from_config(c: &RunConfig) -> OptimizerSettings {
        let o = &c.optimizer;
        let total = c.schedule_steps();
        OptimizerSettings {
            adamw: AdamWAttrs { beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay },
            schedule: ScheduleAttrs {
                peak: o.lr,
                min: o.lr * o.min_lr_ratio,
                warmup: ((o.warmup * total as f64).round() as u64).max(1),
                total,
            },
            grad_clip: o.grad_clip,
        }
    }
}

#[derive(Debug)]
pub struct ProgramError(pub String);

impl From<AutodiffError> for ProgramError {
    fn from(e: AutodiffError) -> Self {
        ProgramError(e.0)
    }
}

fn check(g: &Graph) -> Result<(), ProgramError> {
    verify(g).map_err(|errs| {
        ProgramError(format!(
            "graph `{}` failed verification:\n{}",
            g.name,
            errs.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n")
        ))
    })
}

/// The training-step graph: forward and backward of one micro-batch, each parameter's gradient
/// added to its accumulator.
pub fn train_step_graph(fwd: &Graph) -> Result<Graph, ProgramError> {
    let mut g = differentiate(fwd)?;
    let grads: Vec<(String, Value)> = g.outputs.iter().filter(|(n, _)| n.starts_with("grad:")).cloned().collect();
    g.outputs.retain(|(n, _)| n == "loss");
    for (out, grad) in grads {
        let param = out.trim_start_matches("grad:").to_string();
        let at = g.node(grad.node).clone();
        let ty = g.ty(grad).clone();
        let name = accumulator_name(&param);
        let acc = g.add(
            Node {
                kind: NodeKind::State { name: name.clone() },
                outs: vec![ty.clone()],
                span: at.span,
                section: at.section,
                recompute: false,
            },
            &[],
        );
        let sum = g.add(
            Node { kind: NodeKind::Op(Op::Add), outs: vec![ty], span: at.span, section: at.section, recompute: false },
            &[acc.out0(), grad],
        );
        g.updates.push((name, sum.out0()));
        debug_assert_eq!(out, grad_name(&param));
    }
    check(&g)?;
    Ok(g)
}

/// The optimizer-step graph over every parameter of `fwd`.
pub fn optimizer_graph(fwd: &Graph, s: &OptimizerSettings) -> Result<Graph, ProgramError> {
    let mut g = Graph::new(format!("{}:optimizer", fwd.name));
    let span = fwd.nodes().next().map(|(_, n)| n.span).ok_or_else(|| ProgramError("empty graph".into()))?;
    let scalar = |dtype| TensorType::new(dtype, Shape::scalar());
    let leaf = |kind: NodeKind, ty: TensorType| Node {
        kind,
        outs: vec![ty],
        span,
        section: Section::Optimizer,
        recompute: false,
    };
    let op = |op: Op, outs: Vec<TensorType>| Node {
        kind: NodeKind::Op(op),
        outs,
        span,
        section: Section::Optimizer,
        recompute: false,
    };

    let step = g.add(leaf(NodeKind::Input { name: "step".into() }, scalar(DType::I32)), &[]).out0();
    let mut tensors = Vec::new();
    let mut total: Option<Value> = None;
    for (_, name, node) in fwd.params() {
        let (name, pty) = (name.to_string(), node.ty().clone());
        let gty = TensorType::new(DType::F32, pty.shape.clone());
        let p = g.add(leaf(NodeKind::Param { name: name.clone(), init: param_init(node) }, pty.clone()), &[]).out0();
        let acc = g.add(leaf(NodeKind::State { name: accumulator_name(&name) }, gty.clone()), &[]).out0();
        let m = g.add(leaf(NodeKind::State { name: format!("adam_m:{name}") }, gty.clone()), &[]).out0();
        let v = g.add(leaf(NodeKind::State { name: format!("adam_v:{name}") }, gty.clone()), &[]).out0();
        let ss = g.add(op(Op::SumSquares, vec![scalar(DType::F32)]), &[acc]).out0();
        total = Some(match total {
            None => ss,
            Some(t) => g.add(op(Op::AddScalar, vec![scalar(DType::F32)]), &[t, ss]).out0(),
        });
        tensors.push((name, pty, gty, p, acc, m, v));
    }
    let total = total.ok_or_else(|| ProgramError("the model has no parameters".into()))?;
    let clip = g.add(op(Op::ClipScale { max_norm: s.grad_clip }, vec![scalar(DType::F32)]), &[total]).out0();
    let lr = g.add(op(Op::LrSchedule(s.schedule.clone()), vec![scalar(DType::F32)]), &[step]).out0();
    for (name, pty, gty, p, acc, m, v) in tensors {
        let upd =
            g.add(op(Op::AdamW(s.adamw.clone()), vec![pty, gty.clone(), gty.clone()]), &[p, acc, m, v, lr, clip, step]);
        g.updates.push((name.clone(), upd.out0()));
        g.updates.push((format!("adam_m:{name}"), Value { node: upd, output: 1 }));
        g.updates.push((format!("adam_v:{name}"), Value { node: upd, output: 2 }));
        let zero = g.add(op(Op::Zeros(gty.clone()), vec![gty]), &[]).out0();
        g.updates.push((accumulator_name(&name), zero));
    }
    g.outputs.push(("grad_sum_squares".into(), total));
    g.outputs.push(("clip".into(), clip));
    g.outputs.push(("lr".into(), lr));
    check(&g)?;
    Ok(g)
}

fn param_init(node: &Node) -> weft_runtime::Init {
    match &node.kind {
        NodeKind::Param { init, .. } => init.clone(),
        _ => weft_runtime::Init::Constant { value: 0.0 },
    }
}

/// Lowers a verified graph to a plan: one value per node output, in node order.
pub fn to_plan(g: &Graph, name: &str) -> Plan {
    // Plan value ids by node index, then output (node indices are dense after the passes).
    let bound = g.g.node_indices().map(|n| n.index() + 1).max().unwrap_or(0);
    let mut first: Vec<u32> = vec![u32::MAX; bound];
    let mut plan = Plan {
        name: name.to_string(),
        values: Vec::with_capacity(g.g.node_count()),
        inputs: Vec::new(),
        persistent: Vec::new(),
        steps: Vec::with_capacity(g.g.node_count()),
        outputs: Vec::new(),
        updates: Vec::new(),
    };
    let id_of = |first: &[u32], v: &Value| first[v.node.index()] + v.output;
    for (id, node) in g.nodes() {
        let mut outs = Vec::with_capacity(node.outs.len());
        first[id.index()] = plan.values.len() as u32;
        for ty in &node.outs {
            outs.push(plan.values.len() as u32);
            plan.values.push(ty.clone());
        }
        match &node.kind {
            NodeKind::Input { name } => plan.inputs.push((name.clone(), outs[0])),
            NodeKind::Param { name, .. } | NodeKind::State { name } => plan.persistent.push((name.clone(), outs[0])),
            NodeKind::Op(op) => {
                let inputs = g.inputs(id).iter().map(|v| id_of(&first, v)).collect();
                let at = SourceSpan { file: node.span.file.0, start: node.span.start, end: node.span.end };
                plan.steps.push(Step { op: op.clone(), inputs, outputs: outs, at: Some(at) });
            }
        }
    }
    plan.outputs = g.outputs.iter().map(|(n, v)| (n.clone(), id_of(&first, v))).collect();
    plan.updates = g.updates.iter().map(|(n, v)| (n.clone(), id_of(&first, v))).collect();
    plan
}

/// The program of a model: its parameters and optimizer state, and the plans `eval` (forward
/// and loss), `train_step`, `optimizer_step`, `logits` (every position's logits), `prefill` and
/// `decode` (generation with each layer's state; full attention caches `max_context` tokens),
/// `chunk` and `chunk_score` (a prompt's next chunk from the carried states), each graph
/// through the fusion passes.
pub fn build_program(model: &Model, settings: &OptimizerSettings, max_context: u64) -> Result<Program, ProgramError> {
    build_program_with(model, settings, max_context, FUSION)
}

/// [`build_program`] with the given passes run over every plan's graph.
pub fn build_program_with(
    model: &Model,
    settings: &OptimizerSettings,
    max_context: u64,
    passes: &[Pass],
) -> Result<Program, ProgramError> {
    let optimize = |g: Graph| -> Result<Graph, ProgramError> {
        Ok(passes::run(g, passes, false).map_err(|e| ProgramError(e.0))?.0)
    };
    let plan = |mode, name: &str| -> Result<Plan, ProgramError> {
        let g = build_mode(model, mode).map_err(|e| ProgramError(e.message))?;
        check(&g)?;
        Ok(to_plan(&optimize(g)?, name))
    };
    // The graphs are independent of each other: the training path on one thread, the
    // generation plans on others (a 4096-layer model's check spends most of its time here).
    let training = || -> Result<_, ProgramError> {
        let unfused = build_mode(model, Mode::Train).map_err(|e| ProgramError(e.message))?;
        // Fusion leaves parameters alone, so the optimizer is built from the unfused graph.
        let ((fwd, opt), train) = rayon::join(
            || rayon::join(|| optimize(unfused.clone()), || optimizer_graph(&unfused, settings)),
            || train_step_graph(&unfused).and_then(optimize).map(|g| to_plan(&g, "train_step")),
        );
        Ok((fwd?, train?, opt?))
    };
    let generation = || {
        let ((logits, score), (prefill, decode)) = rayon::join(
            || rayon::join(|| plan(Mode::Logits, "logits"), || plan(Mode::Score, "score")),
            || {
                rayon::join(
                    || plan(Mode::Prefill { max_context }, "prefill"),
                    || plan(Mode::Decode { max_context }, "decode"),
                )
            },
        );
        let (chunk, chunk_score) = rayon::join(
            || plan(Mode::Chunk { max_context, score: false }, "chunk"),
            || plan(Mode::Chunk { max_context, score: true }, "chunk_score"),
        );
        Ok::<_, ProgramError>([logits?, score?, prefill?, decode?, chunk?, chunk_score?])
    };
    let (training, generation) = rayon::join(training, generation);
    let (fwd, train, opt) = training?;
    let fwd = &fwd;
    let params: Vec<ParamSpec> = fwd
        .params()
        .map(|(_, name, node)| ParamSpec { name: name.to_string(), ty: node.ty().clone(), init: param_init(node) })
        .collect();
    let mut states = Vec::new();
    for (_, node) in opt.nodes() {
        if let NodeKind::State { name } = &node.kind {
            states.push(StateSpec { name: name.clone(), ty: node.ty().clone() });
        }
    }
    let (eval, optimizer_step) = rayon::join(|| to_plan(fwd, "eval"), || to_plan(&opt, "optimizer_step"));
    let mut plans = BTreeMap::new();
    for p in [eval, train, optimizer_step].into_iter().chain(generation?) {
        plans.insert(p.name.clone(), p);
    }
    let program = Program { model: fwd.name.clone(), params, states, plans };
    program.validate().map_err(|e| ProgramError(e.0))?;
    Ok(program)
}
