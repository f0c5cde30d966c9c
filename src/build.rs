//! `weft build`: a program's plans lowered to device plans, their kernels compiled to PTX (from
//! the content-hashed cache where possible), and everything packed into a bundle.

use crate::lower::cache::{self, Cache};
use crate::lower::compile::{CompileError, Compiler};
use crate::lower::{lower_plan, Finding, Kernel, Located, Severity};
use std::collections::BTreeMap;
use std::time::Instant;
use weft_runtime::bundle::{Bundle, KernelModule, PlanShape};
use weft_runtime::device::DevicePlan;
use weft_runtime::plan::Program;

/// The largest call of each plan, which its arena is planned for.
#[derive(Clone, Debug)]
pub struct Shapes {
    /// Training and evaluation: sequences per step and tokens per sequence.
    pub batch: u64,
    pub seq: u64,
    /// Generation: sequences decoded together, and the longest prompt a prefill takes.
    pub gen_batch: u64,
    pub max_prompt: u64,
}

impl Shapes {
    /// Training at the run settings' batch and sequence length; generation of `generate.batch`
    /// sequences up to the longest context the settings allow.
    pub fn from_settings(s: &crate::config::RunConfig) -> Shapes {
        Shapes {
            batch: s.train.batch_size,
            seq: s.train.seq_len,
            gen_batch: s.generate.batch,
            max_prompt: s.train.seq_len + s.generate.max_new_tokens,
        }
    }

    pub fn of(&self, plan: &str) -> PlanShape {
        let (batch, seq) = match plan {
            "train_step" | "eval" => (self.batch, self.seq),
            "prefill" | "logits" | "score" => (self.gen_batch, self.max_prompt),
            "decode" => (self.gen_batch, 1),
            // One prompt at a time (the engine's staging row), a chunk of at most 512 tokens.
            "chunk" | "chunk_score" => (1, self.max_prompt.min(weft_runtime::engine::DEFAULT_PREFILL_CHUNK as u64)),
            _ => (1, 1),
        };
        PlanShape { batch, seq }
    }
}

#[derive(Debug)]
pub enum BuildError {
    Lower(Located),
    /// GPU limits launches would exceed at the plans' largest calls.
    Limits(Vec<Located>),
    Compile(CompileError),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::Lower(e) => write!(f, "{e}"),
            BuildError::Limits(v) => {
                let list: Vec<String> = v.iter().map(|l| l.to_string()).collect();
                write!(f, "the GPU cannot run these launches:\n  {}", list.join("\n  "))
            }
            BuildError::Compile(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// Times of the stages of a build, and how many kernels came from the cache.
#[derive(Clone, Debug, Default)]
pub struct BuildStats {
    pub lower_ms: f64,
    pub compile_ms: f64,
    pub kernels: usize,
    pub cached: usize,
}

/// Every plan lowered, with the generated kernels by name, and the GPU limits and kernel
/// fallbacks lowering found.
pub struct Lowered {
    pub plans: BTreeMap<String, (PlanShape, DevicePlan)>,
    pub kernels: BTreeMap<String, Kernel>,
    pub findings: Vec<Finding>,
}

impl Lowered {
    /// The limits launches would exceed (the plans cannot run).
    pub fn limits(&self) -> Vec<Located> {
        self.findings.iter().filter(|f| f.severity == Severity::Limit).map(|f| f.at.clone()).collect()
    }
}

/// What lowering every plan finds (errors, GPU limits, fallbacks), each kind of step lowered
/// once: what `weft check` reports, in a moment whatever the number of layers.
pub fn program_findings(program: &Program, shapes: &Shapes) -> Result<Vec<Finding>, Located> {
    use rayon::prelude::*;
    // Plans in parallel, then in plan order a step kind's findings only where it first occurs
    // (a step's findings depend on its signature alone).
    let per_plan: Vec<_> = program
        .plans
        .par_iter()
        .map(|(name, plan)| {
            let shape = shapes.of(name);
            crate::lower::plan_findings(plan, shape.batch, shape.seq)
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut findings = Vec::new();
    for plan in per_plan {
        let plan = plan?;
        let new: std::collections::HashSet<&String> =
            plan.iter().map(|(s, _)| s).filter(|s| !seen.contains(*s)).collect();
        findings.extend(plan.iter().filter(|(s, _)| new.contains(s)).map(|(_, f)| f.clone()));
        seen.extend(new.into_iter().cloned());
    }
    Ok(findings)
}

pub fn lower_program(program: &Program, shapes: &Shapes) -> Result<Lowered, Located> {
    let mut kernels = BTreeMap::new();
    let mut plans = BTreeMap::new();
    let mut findings = Vec::new();
    for (name, plan) in &program.plans {
        let shape = shapes.of(name);
        let (dp, f) = lower_plan(plan, shape.batch, shape.seq, &mut kernels)?;
        findings.extend(f);
        plans.insert(name.clone(), (shape, dp));
    }
    Ok(Lowered { plans, kernels, findings })
}

/// PTX for every kernel: from the cache, else compiled (on every core, one MLIR context each).
pub fn compile_kernels(
    kernels: &BTreeMap<String, Kernel>,
    cache: &Cache,
    stats: &mut BuildStats,
) -> Result<BTreeMap<String, String>, CompileError> {
    let mut ptx = BTreeMap::new();
    let mut todo = Vec::new();
    for (name, k) in kernels {
        let key = cache::key(&k.mlir);
        match cache.get(&key) {
            Some(p) => {
                ptx.insert(name.clone(), p);
                stats.cached += 1;
            }
            None => todo.push((name.clone(), key, k)),
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(todo.len().max(1));
    let results: Vec<Result<(String, String, String), CompileError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let todo = &todo;
                s.spawn(move || {
                    let compiler = Compiler::new();
                    todo.iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|(name, key, k)| compiler.ptx(name, &k.mlir).map(|p| (name.clone(), key.clone(), p)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("kernel compiler thread panicked")).collect()
    });
    for r in results {
        let (name, key, p) = r?;
        cache.put(&key, &p);
        ptx.insert(name, p);
    }
    stats.kernels = kernels.len();
    Ok(ptx)
}

/// Lowers and compiles `program` into a bundle.
pub fn build_bundle(program: &Program, shapes: &Shapes, cache: &Cache) -> Result<(Bundle, BuildStats), BuildError> {
    let mut stats = BuildStats::default();
    let t = Instant::now();
    let lowered = lower_program(program, shapes).map_err(BuildError::Lower)?;
    let over = lowered.limits();
    if !over.is_empty() {
        return Err(BuildError::Limits(over));
    }
    stats.lower_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let ptx = compile_kernels(&lowered.kernels, cache, &mut stats).map_err(BuildError::Compile)?;
    stats.compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let kernels = lowered
        .kernels
        .values()
        .map(|k| KernelModule {
            name: k.name.clone(),
            hash: cache::key(&k.mlir),
            ptx: ptx[&k.name].clone(),
            cubin: None,
            params: k.params.clone(),
        })
        .collect();
    let bundle = Bundle { program: program.clone(), plans: lowered.plans, kernels, source: None };
    Ok((bundle, stats))
}

/// Adds a cubin for sm_90 to every kernel of `bundle` with ptxas (cached like the PTX, on every
/// core); returns how many were assembled anew.
pub fn add_cubins(bundle: &mut Bundle, ptxas: &std::path::Path, cache: &Cache) -> Result<usize, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let todo: Vec<usize> = (0..bundle.kernels.len()).collect();
    // (kernel index, cubin, assembled now rather than read from the cache)
    type Assembled = Result<(usize, Vec<u8>, bool), String>;
    let results: Vec<Assembled> = std::thread::scope(|s| {
        let kernels = &bundle.kernels;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let todo = &todo;
                s.spawn(move || {
                    todo.iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|&i| {
                            let k = &kernels[i];
                            match cache.get_cubin(&k.hash) {
                                Some(c) => Ok((i, c, false)),
                                None => crate::snapshot::assemble(ptxas, &k.name, &k.ptx).map(|c| (i, c, true)),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("ptxas thread panicked")).collect()
    });
    let mut fresh = 0;
    for r in results {
        let (i, cubin, new) = r?;
        if new {
            cache.put_cubin(&bundle.kernels[i].hash, &cubin);
            fresh += 1;
        }
        bundle.kernels[i].cubin = Some(cubin);
    }
    Ok(fresh)
}

/// The device plans as text: each plan's shape and arena, then one line per device step.
pub fn render_plans(plans: &BTreeMap<String, (PlanShape, DevicePlan)>) -> String {
    use std::fmt::Write;
    use weft_runtime::device::{Arg, Base, BufferArg, DeviceStep};
    let buf = |b: &BufferArg| {
        let base = match &b.base {
            Base::Value(v) => format!("%{v}"),
            Base::Scratch => "scratch".to_string(),
            Base::Table(i) => format!("table{i}"),
            Base::Persistent(n) => format!("`{n}`"),
        };
        if b.offset == 0 {
            base
        } else {
            format!("{base}+{}", b.offset)
        }
    };
    let mut s = String::new();
    for (name, (shape, dp)) in plans {
        writeln!(
            s,
            "plan {name} (up to {} x {}): arena {} bytes, scratch {} bytes, {} steps",
            shape.batch,
            shape.seq,
            dp.memory.arena_bytes,
            dp.scratch_bytes,
            dp.steps.len()
        )
        .unwrap();
        for (i, step) in dp.steps.iter().enumerate() {
            let origin = dp.origin[i];
            match step {
                DeviceStep::Launch(l) => {
                    let args = l
                        .args
                        .iter()
                        .map(|a| match a {
                            Arg::Buffer(b) => buf(b),
                            Arg::I64 { value } => value.to_string(),
                            Arg::F32 { value } => format!("{value:e}"),
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    let grid = l.grid.iter().map(|g| {
                        if g.per_block == 1 {
                            g.extent.to_string()
                        } else {
                            format!("⌈({})/{}⌉", g.extent, g.per_block)
                        }
                    });
                    writeln!(
                        s,
                        "  [{origin}] launch {}<<<({}), ({}, {}, {}), {}>>>({args})",
                        l.kernel,
                        grid.collect::<Vec<_>>().join(", "),
                        l.block[0],
                        l.block[1],
                        l.block[2],
                        l.shared_bytes
                    )
                    .unwrap();
                }
                DeviceStep::Gemm(g) => {
                    writeln!(
                        s,
                        "  [{origin}] gemm m={} n={} k={} {}{}[{} ld {}] x {}{}[{} ld {}] -> {}[{} ld {}] alpha={} beta={}",
                        g.m,
                        g.n,
                        g.k,
                        buf(&g.a.buffer),
                        if g.trans_a { "ᵀ" } else { "" },
                        g.a.dtype,
                        g.a.ld,
                        buf(&g.b.buffer),
                        if g.trans_b { "ᵀ" } else { "" },
                        g.b.dtype,
                        g.b.ld,
                        buf(&g.c.buffer),
                        g.c.dtype,
                        g.c.ld,
                        g.alpha,
                        g.beta
                    )
                    .unwrap();
                }
                DeviceStep::Zero { buffer, bytes } => {
                    writeln!(s, "  [{origin}] zero {} ({bytes} bytes)", buf(buffer)).unwrap();
                }
            }
        }
    }
    s
}
