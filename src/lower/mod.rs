//! Lowering: plans to device plans and GPU kernels.
//!
//! Each step of a [`Plan`] becomes matrix products (cuBLASLt problems, described in the device
//! plan) and launches of kernels generated for the step's sizes (`kernels/`, written against
//! the MLIR builder in `mlir.rs`). Kernels are named by what they are specialised to, so the
//! same kernel is generated once however many layers use it. `compile.rs` turns each kernel's
//! MLIR into PTX; `cache.rs` keeps PTX by content hash so an unchanged rebuild compiles nothing.

pub mod cache;
pub mod compile;
mod kernels;
pub mod mlir;

use crate::lower::mlir::{KernelBuilder, Ty};
use std::collections::BTreeMap;
use weft_runtime::device::{
    Arg, Base, BufferArg, DevicePlan, DeviceStep, Extent, Gemm, GridDim, Launch, MatrixArg, ParamKind, Table,
};
use weft_runtime::memory::{plan_memory, row_pitch};
use weft_runtime::plan::{Plan, SourceSpan, ValueId};
use weft_runtime::{DType, Dim, Op, TensorType};

/// The chip kernels are built for (Hopper; sm_90a is used by kernels that issue wgmma).
pub const CHIP: &str = "sm_90";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerError(pub String);

impl std::fmt::Display for LowerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LowerError {}

/// A lowering error or finding at one plan step, with the spec text the step comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub plan: String,
    pub step: usize,
    pub op: String,
    pub at: Option<SourceSpan>,
    pub message: String,
}

impl std::fmt::Display for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plan `{}`, step {} ({}): {}", self.plan, self.step, self.op, self.message)
    }
}

impl std::error::Error for Located {}

/// What lowering found besides errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// A GPU limit a launch would exceed at the plan's largest call: the plan cannot run.
    Limit,
    /// A layer that runs on a slower kernel than its kind's fastest.
    Fallback,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub at: Located,
}

/// GPU limits (Hopper): threads per block, grid sizes, shared memory per block.
pub mod limits {
    pub const BLOCK_THREADS: u64 = 1024;
    pub const GRID_X: u64 = (1 << 31) - 1;
    pub const GRID_YZ: u64 = 65535;
    /// Static shared memory a kernel may declare.
    pub const STATIC_SHARED: u64 = 48 * 1024;
    /// Dynamic shared memory a block may opt in to (227 KiB).
    pub const DYNAMIC_SHARED: u64 = 227 * 1024;
}

/// A generated kernel: its MLIR module and the launch shape it was written for.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub mlir: String,
    /// Its parameters in order (what every launch passes).
    pub params: Vec<ParamKind>,
}

/// Lowers `plan` for calls of up to `batch` sequences of `seq` tokens; new kernels are added
/// to `kernels` (a kernel already there by name is reused). Also returns the GPU limits its
/// launches would exceed and the layers that fall back to slower kernels.
pub fn lower_plan(
    plan: &Plan,
    batch: u64,
    seq: u64,
    kernels: &mut BTreeMap<String, Kernel>,
) -> Result<(DevicePlan, Vec<Finding>), Located> {
    let (dp, findings) = lower_plan_with(plan, batch, seq, kernels, None)?;
    Ok((dp, findings.into_iter().map(|(_, f)| f).collect()))
}

/// What lowering `plan` finds (errors, limits, fallbacks) without the device plan, each with
/// the signature of its step (operation, operands and call sizes): a step like one lowered
/// before is not lowered again, so a spec of thousands of identical layers is checked in a
/// moment.
pub fn plan_findings(plan: &Plan, batch: u64, seq: u64) -> Result<Vec<(String, Finding)>, Located> {
    let mut kernels = BTreeMap::new();
    let mut seen = rustc_hash::FxHashSet::default();
    Ok(lower_plan_with(plan, batch, seq, &mut kernels, Some(&mut seen))?.1)
}

fn lower_plan_with(
    plan: &Plan,
    batch: u64,
    seq: u64,
    kernels: &mut BTreeMap<String, Kernel>,
    mut seen: Option<&mut rustc_hash::FxHashSet<String>>,
) -> Result<(DevicePlan, Vec<(String, Finding)>), Located> {
    use rustc_hash::FxHashSet as HashSet;
    let memory = if seen.is_some() { Default::default() } else { plan_memory(plan, batch, seq) };
    let mut e = Emit::new(plan, batch, seq, kernels);
    // AdamW over every parameter in one launch per kind of parameter, where the plan allows.
    let adamw = kernels::adamw_group(plan);
    let in_group: HashSet<usize> = adamw.iter().flatten().copied().collect();
    // The loss and its backward in one pass over the logits, where they are adjacent.
    let fused_loss: HashSet<usize> = (0..plan.steps.len()).filter(|&i| kernels::fused_loss_at(plan, i)).collect();
    let mut findings = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let before = e.steps.len();
        e.step_scratch = 0;
        let mut signature = String::new();
        if let Some(seen) = seen.as_deref_mut() {
            signature = e.signature(step);
            if !seen.insert(signature.clone()) {
                continue;
            }
        }
        let located = |message: String| Located {
            plan: plan.name.clone(),
            step: i,
            op: step.op.to_string(),
            at: step.at,
            message,
        };
        let lowered = match &adamw {
            Some(group) if group.first() == Some(&i) => kernels::lower_adamw_group(&mut e, group),
            Some(_) if in_group.contains(&i) => Ok(()),
            _ if fused_loss.contains(&i) => kernels::lower_fused_loss(&mut e, step, &plan.steps[i + 1]),
            _ if i > 0 && fused_loss.contains(&(i - 1)) => Ok(()),
            _ => kernels::lower_step(&mut e, step),
        };
        lowered.map_err(|LowerError(m)| located(m))?;
        for (severity, m) in e.findings.drain(..) {
            findings.push((signature.clone(), Finding { severity, at: located(m) }));
        }
        e.origin.extend(std::iter::repeat_n(i, e.steps.len() - before));
    }
    let dp = DevicePlan {
        name: plan.name.clone(),
        memory,
        scratch_bytes: e.scratch,
        tables: e.tables,
        exact_shape: e.exact_shape,
        origin: e.origin,
        steps: e.steps,
        aliases: e.aliases,
    };
    Ok((dp, findings))
}

/// A value as a kernel sees it: where it starts, its type, and the elements between rows (a
/// slice's rows keep the stride of the tensor it views).
#[derive(Clone, Debug)]
pub(crate) struct Operand {
    pub buf: BufferArg,
    pub ty: TensorType,
    /// Last dimension.
    pub width: u64,
    /// Elements from one row to the next.
    pub ld: u64,
}

impl Operand {
    pub fn elem(&self) -> Ty {
        Ty::of(self.ty.dtype)
    }

    pub fn dtype(&self) -> DType {
        self.ty.dtype
    }

    /// Rows: the product of every dimension but the last.
    pub fn rows(&self) -> Extent {
        extent_of(&self.ty.shape.0[..self.ty.shape.0.len().saturating_sub(1)])
    }

    pub fn elems(&self) -> Extent {
        extent_of(&self.ty.shape.0)
    }

    pub fn arg(&self) -> Arg {
        Arg::Buffer(self.buf.clone())
    }

    pub fn matrix(&self) -> MatrixArg {
        MatrixArg { buffer: self.buf.clone(), dtype: self.ty.dtype, ld: self.ld }
    }

    /// Whether rows follow each other with no gap.
    pub fn dense(&self) -> bool {
        self.ld == self.width
    }
}

/// The product of dimensions as an extent (at most one `B` and one `T`).
pub(crate) fn extent_of(dims: &[Dim]) -> Extent {
    let mut fixed = 1i64;
    let (mut b, mut t) = (false, false);
    for d in dims {
        match d {
            Dim::Batch => b = true,
            Dim::Seq => t = true,
            Dim::Fixed(n) => fixed *= *n as i64,
        }
    }
    match (b, t) {
        (true, true) => Extent::per_token(fixed),
        (true, false) => Extent::per_sequence(fixed),
        // A sequence dimension without a batch does not occur in plans.
        (false, _) => Extent::constant(fixed),
    }
}

/// The state of lowering one plan.
pub(crate) struct Emit<'a> {
    plan: &'a Plan,
    /// For each value that is a view: the value whose buffer it lives in, and its element offset
    /// within each row.
    views: Vec<Option<(ValueId, u64)>>,
    /// Values a step writes (in the arena, rows at `row_pitch`); the rest are inputs and
    /// persistent tensors with dense rows.
    in_arena: Vec<bool>,
    kernels: &'a mut BTreeMap<String, Kernel>,
    pub steps: Vec<DeviceStep>,
    origin: Vec<usize>,
    scratch: u64,
    /// Scratch bytes the current step has taken so far.
    step_scratch: u64,
    batch: u64,
    seq: u64,
    tables: Vec<Table>,
    exact_shape: bool,
    /// The current step's limits and fallbacks.
    findings: Vec<(Severity, String)>,
    /// The names of persistent values.
    persistent: rustc_hash::FxHashMap<ValueId, String>,
    /// Values written into another value's buffer (see [`Emit::write_in_place`]).
    aliases: Vec<(ValueId, ValueId)>,
}

impl<'a> Emit<'a> {
    fn new(plan: &'a Plan, batch: u64, seq: u64, kernels: &'a mut BTreeMap<String, Kernel>) -> Emit<'a> {
        let mut views: Vec<Option<(ValueId, u64)>> = vec![None; plan.values.len()];
        for step in &plan.steps {
            if let Op::Slice { start, .. } = step.op {
                let src = step.inputs[0];
                let (root, off) = views[src as usize].unwrap_or((src, 0));
                views[step.outputs[0] as usize] = Some((root, off + start));
            }
        }
        let mut in_arena = vec![false; plan.values.len()];
        for step in &plan.steps {
            for &v in &step.outputs {
                in_arena[v as usize] = true;
            }
        }
        Emit {
            plan,
            views,
            in_arena,
            kernels,
            steps: Vec::new(),
            origin: Vec::new(),
            scratch: 0,
            step_scratch: 0,
            batch,
            seq,
            tables: Vec::new(),
            exact_shape: false,
            findings: Vec::new(),
            aliases: Vec::new(),
            persistent: {
                // A value may be persistent under several names: the first names it, as the
                // plan lists them.
                let mut m = rustc_hash::FxHashMap::default();
                for (n, v) in &plan.persistent {
                    m.entry(*v).or_insert_with(|| n.clone());
                }
                m
            },
        }
    }

    pub fn operand(&self, v: ValueId) -> Operand {
        let ty = self.plan.values[v as usize].clone();
        let width = ty.shape.last().unwrap_or(1);
        match self.views[v as usize] {
            Some((root, start)) => {
                let rty = &self.plan.values[root as usize];
                let ld = if self.in_arena[root as usize] { row_pitch(rty) } else { rty.shape.last().unwrap_or(1) };
                Operand { buf: BufferArg { base: Base::Value(root), offset: start * ty.dtype.bytes() }, width, ld, ty }
            }
            None => {
                let ld = if self.in_arena[v as usize] { row_pitch(&ty) } else { width };
                Operand { buf: BufferArg { base: Base::Value(v), offset: 0 }, width, ld, ty }
            }
        }
    }

    /// Scratch for the current step: `bytes` (at the largest call), 256-byte aligned. Scratch
    /// lives only within one plan step, so every step's parts start again at zero.
    pub fn scratch(&mut self, bytes: Extent) -> BufferArg {
        let offset = self.step_scratch;
        self.step_scratch += (bytes.eval(self.batch, self.seq).max(0) as u64).div_ceil(256) * 256;
        self.scratch = self.scratch.max(self.step_scratch);
        BufferArg { base: Base::Scratch, offset }
    }

    pub fn plan(&self) -> &'a Plan {
        self.plan
    }

    /// The name of a persistent value (a parameter or state), if `v` is one.
    pub fn persistent_name(&self, v: ValueId) -> Option<String> {
        self.persistent.get(&v).cloned()
    }

    /// Marks the plan as runnable only at the shape it was lowered for (its steps were
    /// unrolled over the rows of that shape).
    pub fn exact_shape(&mut self) {
        self.exact_shape = true;
    }

    /// The largest call the plan is lowered for: (sequences, tokens per sequence).
    pub fn max_shape(&self) -> (u64, u64) {
        (self.batch, self.seq)
    }

    /// A constant table for the plan (shared by every step that asks for the same one).
    pub fn table(&mut self, t: Table) -> BufferArg {
        let i = match self.tables.iter().position(|x| *x == t) {
            Some(i) => i,
            None => {
                self.tables.push(t);
                self.tables.len() - 1
            }
        };
        BufferArg { base: Base::Table(i as u32), offset: 0 }
    }

    /// What decides how a step lowers: its operation, the call sizes and every operand's type,
    /// layout and place (two steps alike in all of it lower alike).
    fn signature(&self, step: &weft_runtime::plan::Step) -> String {
        use std::fmt::Write;
        // One string written in place: this runs for every step of every plan in a check.
        let mut s = String::with_capacity(128);
        let _ = write!(s, "{}|{}x{}|", step.op, self.batch, self.seq);
        for &v in step.inputs.iter().chain(&step.outputs) {
            let o = self.operand(v);
            let persistent = self.persistent.contains_key(&v);
            let _ = write!(s, "{}/{}/{}/{}/{persistent},", o.ty, o.ld, o.width, o.buf.offset);
        }
        s
    }

    /// Whether each output may be written into the buffer of its input (and is, from now on):
    /// the input is a plan input and the output the plan's output of the same name (a carried
    /// generation state, `state:…`) of the same type, read by no step. The caller's kernel then
    /// updates the inputs in place; the outputs are their buffers. All pairs or none.
    pub fn write_in_place(&mut self, pairs: &[(&Operand, &Operand)]) -> bool {
        fn named(list: &[(String, ValueId)], v: ValueId) -> Option<&str> {
            list.iter().find(|(_, x)| *x == v).map(|(n, _)| n.as_str())
        }
        let mut found = Vec::new();
        for (out, input) in pairs {
            let (Base::Value(o), Base::Value(i)) = (&out.buf.base, &input.buf.base) else { return false };
            let (o, i) = (*o, *i);
            let same = matches!((named(&self.plan.inputs, i), named(&self.plan.outputs, o)),
                (Some(a), Some(b)) if a == b && a.starts_with("state:"));
            let read = self.plan.steps.iter().any(|s| s.inputs.contains(&o));
            let dense = out.buf.offset == 0 && input.buf.offset == 0 && out.ty == input.ty && input.dense();
            if !same || read || !dense {
                return false;
            }
            found.push((o, i));
        }
        self.aliases.extend(found);
        true
    }

    /// Notes that the current step runs on a slower kernel than its kind's fastest, and why.
    pub fn fallback(&mut self, why: String) {
        self.findings.push((Severity::Fallback, why));
    }

    /// Adds a launch of `k` (registering the kernel) over `grid` blocks.
    pub fn launch(&mut self, k: KernelBuilder, grid: [GridDim; 3], shared_bytes: u32, args: Vec<Arg>) {
        let block = k.block();
        self.check_limits(&k, &grid, shared_bytes);
        assert_eq!(
            k.params().len(),
            args.len(),
            "kernel `{}`: {} parameters, {} arguments",
            k.name(),
            k.params().len(),
            args.len()
        );
        let name = k.name().to_string();
        let params: Vec<ParamKind> = k.params().iter().map(|p| p.ty.param_kind()).collect();
        let passed: Vec<ParamKind> = args.iter().map(Arg::kind).collect();
        assert_eq!(params, passed, "kernel `{name}`: launched with arguments of the wrong types");
        let mlir = k.finish(CHIP);
        match self.kernels.get(&name) {
            // A kernel's name carries everything it is specialised to; one name, one kernel.
            Some(old) => assert_eq!(old.mlir, mlir, "two different kernels are named `{name}`"),
            None => {
                self.kernels.insert(name.clone(), Kernel { name: name.clone(), mlir, params });
            }
        }
        self.steps.push(DeviceStep::Launch(Launch { kernel: name, grid, block, shared_bytes, args }));
    }

    /// Records every GPU limit this launch would exceed at the plan's largest call.
    fn check_limits(&mut self, k: &KernelBuilder, grid: &[GridDim; 3], shared_bytes: u32) {
        let name = k.name();
        let threads: u64 = k.block().iter().map(|&b| b as u64).product();
        let mut over = Vec::new();
        if threads > limits::BLOCK_THREADS {
            over.push(format!("{threads} threads per block (at most {})", limits::BLOCK_THREADS));
        }
        for (axis, g) in ["x", "y", "z"].iter().zip(grid) {
            let blocks = (g.extent.eval(self.batch, self.seq).max(0) as u64).div_ceil(g.per_block.max(1));
            let max = if *axis == "x" { limits::GRID_X } else { limits::GRID_YZ };
            if blocks > max {
                over.push(format!(
                    "{blocks} blocks along {axis} at {} x {} tokens (at most {max})",
                    self.batch, self.seq
                ));
            }
        }
        let stat = k.static_shared_bytes();
        if stat > limits::STATIC_SHARED {
            over.push(format!("{stat} bytes of static shared memory (at most {})", limits::STATIC_SHARED));
        }
        if shared_bytes as u64 + stat > limits::DYNAMIC_SHARED {
            over.push(format!(
                "{} bytes of shared memory per block (at most {})",
                shared_bytes as u64 + stat,
                limits::DYNAMIC_SHARED
            ));
        }
        for o in over {
            self.findings.push((Severity::Limit, format!("kernel `{name}` would need {o}")));
        }
    }

    pub fn gemm(&mut self, g: Gemm) {
        self.steps.push(DeviceStep::Gemm(g));
    }

    pub fn zero(&mut self, buffer: BufferArg, bytes: Extent) {
        self.steps.push(DeviceStep::Zero { buffer, bytes });
    }
}

/// A 1-D grid of `ceil(extent / per_block)` blocks.
pub(crate) fn grid_1d(extent: Extent, per_block: u64) -> [GridDim; 3] {
    [GridDim { extent, per_block }, GridDim::fixed(1), GridDim::fixed(1)]
}
