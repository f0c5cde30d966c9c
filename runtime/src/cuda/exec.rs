//! The GPU backend: a bundle's plans run from device memory.
//!
//! Persistent tensors (parameters, optimizer state, gradient accumulators) live in the store
//! for the backend's whole life; each plan gets, on first use, its arena (planned at the plan's
//! largest call), its scratch, its constant tables and buffers for its inputs. A call binds B
//! and T from its inputs, runs the device steps in order on one stream, writes the plan's
//! updates into the store and returns its outputs.

use super::device::{cuda, DeviceBuffer, Gpu, GpuError};
use crate::backend::Backend;
use crate::bundle::{Bundle, PlanShape};
use crate::cpu::tensor::{Data, Tensor};
use crate::device::{master_name, Arg, Base, BufferArg, DevicePlan, DeviceStep, Table, Word};
use crate::plan::{Plan, Program, ValueId};
use crate::{DType, Dim, TensorType};
use cudarc::driver::{result, sys, CudaFunction, CudaGraph, CudaModule};
use cudarc::nvrtc::Ptx;
use half::bf16;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::sync::Arc;

struct LoadedPlan {
    shape: PlanShape,
    device: DevicePlan,
    plan: Plan,
    /// Where each value lives, as (buffer, byte offset) resolved at load.
    arena: DeviceBuffer,
    scratch: DeviceBuffer,
    tables: Vec<DeviceBuffer>,
    inputs: BTreeMap<String, DeviceBuffer>,
    /// The arena offset of each value a step writes.
    offsets: HashMap<ValueId, u64>,
    /// The plan's device steps captured as a CUDA graph, per call shape (B, T): replayed in one
    /// launch. Captured on the second call of a shape (the first loads every kernel and picks
    /// every cuBLASLt algorithm).
    graphs: HashMap<(u64, u64), CudaGraph>,
    calls: HashMap<(u64, u64), usize>,
    /// Inputs whose buffer holds a carried value (the last calls' outputs of that name), with
    /// the sequences it holds: a call of fewer reads and writes the first rows only.
    resident: HashMap<String, u64>,
}

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_DYNAMIC_SHARED: u32 = 48 * 1024;

pub struct GpuBackend {
    gpu: Gpu,
    bundle: Bundle,
    functions: HashMap<String, (Arc<CudaModule>, CudaFunction)>,
    /// Kernels allowed more than the default dynamic shared memory, and how much.
    shared_opt_in: HashMap<String, u32>,
    store: BTreeMap<String, (TensorType, DeviceBuffer)>,
    /// The memory of every gradient accumulator in `store` (views into it), f32.
    grad_bucket: Option<DeviceBuffer>,
    plans: HashMap<String, LoadedPlan>,
    /// Milliseconds by kernel (and by matrix-product shape) of the last `time_plan`'s profiled run.
    pub last_profile: BTreeMap<String, f64>,
    /// Whether kernels launch as programmatic dependents (see [`launch`]); off with
    /// `WEFT_NO_PDL=1`.
    dependent_launch: bool,
    /// The states the last [`GpuBackend::run_plan_joining`] moved through the host (laid out
    /// differently in the two plans), for the benchmark to show.
    pub last_join_by_host: Vec<String>,
}

fn dense_bytes(ty: &TensorType, batch: u64, seq: u64) -> usize {
    crate::memory::bytes(ty, batch, seq) as usize
}

fn fixed_shape(ty: &TensorType) -> Vec<usize> {
    ty.shape.as_fixed().unwrap_or_default().iter().map(|&d| d as usize).collect()
}

/// Host bytes of an f32 tensor stored as `dtype`.
fn encode(t: &Tensor<f32>, dtype: DType) -> Result<Vec<u8>, GpuError> {
    match (&t.data, dtype) {
        (Data::Int(v), DType::I32) => Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        (Data::Real(v), DType::F32) => Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        (Data::Real(v), DType::BF16) => Ok(v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()),
        _ => Err(GpuError(format!("a tensor of the wrong kind for {dtype}"))),
    }
}

/// Host values of device bytes, converted on every core (a decode step's logits are
/// millions of values).
fn decode(bytes: &[u8], dtype: DType, shape: Vec<usize>) -> Tensor<f32> {
    use rayon::prelude::*;
    const GRAIN: usize = 1 << 14;
    match dtype {
        DType::I32 => Tensor::ints(
            shape,
            bytes.par_chunks_exact(4).with_min_len(GRAIN).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect(),
        ),
        DType::F32 => Tensor::real(
            shape,
            bytes.par_chunks_exact(4).with_min_len(GRAIN).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        ),
        DType::BF16 | DType::F16 => Tensor::real(
            shape,
            bytes
                .par_chunks_exact(2)
                .with_min_len(GRAIN)
                .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
        ),
    }
}

impl GpuBackend {
    /// Loads `bundle` onto `gpu` with parameters from the counter-based initialisation with
    /// `seed` (the CPU reference's values, stored at each parameter's type) and states at zero.
    pub fn new(gpu: Gpu, bundle: Bundle, seed: u64) -> Result<GpuBackend, GpuError> {
        use crate::cpu::real::Real;
        use rayon::prelude::*;
        // Parameters from the counter-based rule on every core (one thread took 22 s for
        // Samba-421M's).
        let values: Vec<Tensor<f32>> = bundle
            .program
            .params
            .par_iter()
            .map(|p| {
                let shape = p.ty.shape.as_fixed().unwrap_or_default();
                let dims = shape.iter().map(|&d| d as usize).collect();
                // As the CPU reference's store rounds them (`Real::of`).
                let v = p.init.values(seed, &p.name, &shape).into_iter().map(<f32 as Real>::of).collect();
                Tensor::real(dims, v)
            })
            .collect();
        Self::with_values(gpu, bundle, values)
    }

    /// Loads `bundle` onto `gpu` with the given parameters (a checkpoint's: generation computes
    /// no initialisation it would overwrite), states at zero. Every parameter of the program
    /// must be there at its shape.
    pub fn with_parameters(
        gpu: Gpu,
        bundle: Bundle,
        mut params: BTreeMap<String, Tensor<f32>>,
    ) -> Result<GpuBackend, GpuError> {
        let mut values = Vec::with_capacity(bundle.program.params.len());
        for p in &bundle.program.params {
            let t = params.remove(&p.name).ok_or_else(|| GpuError(format!("no value for parameter `{}`", p.name)))?;
            if t.shape != fixed_shape(&p.ty) {
                return Err(GpuError(format!(
                    "`{}` has shape {:?}, the program needs {}",
                    p.name, t.shape, p.ty.shape
                )));
            }
            values.push(t);
        }
        Self::with_values(gpu, bundle, values)
    }

    /// Parameters (in program order) uploaded at their types, with f32 masters of bf16 ones;
    /// optimizer states zeroed on the device.
    fn with_values(gpu: Gpu, bundle: Bundle, values: Vec<Tensor<f32>>) -> Result<GpuBackend, GpuError> {
        let program = &bundle.program;
        let mut store = BTreeMap::new();
        for (p, t) in program.params.iter().zip(&values) {
            let (name, ty) = (&p.name, &p.ty);
            let buf = gpu.alloc(dense_bytes(ty, 1, 1))?;
            gpu.upload(buf.ptr, &encode(t, ty.dtype)?)?;
            store.insert(name.clone(), (ty.clone(), buf));
            if ty.dtype == DType::BF16 {
                let master_ty = TensorType::new(DType::F32, ty.shape.clone());
                let m = gpu.alloc(dense_bytes(&master_ty, 1, 1))?;
                gpu.upload(m.ptr, &encode(t, DType::F32)?)?;
                store.insert(master_name(name), (master_ty, m));
            }
        }
        // The gradient accumulators live in one flat bucket (each at a 256-byte boundary, the
        // gaps zero), which data-parallel ranks sum in one collective.
        let accumulators = crate::backend::accumulator_names(program);
        if let Some(st) = program.states.iter().find(|st| accumulators.contains(&st.name) && st.ty.dtype != DType::F32)
        {
            return Err(GpuError(format!("gradient accumulator `{}` is {}, not f32", st.name, st.ty.dtype)));
        }
        let place = |bytes: usize| bytes.div_ceil(256) * 256;
        let bucket_bytes: usize = program
            .states
            .iter()
            .filter(|st| accumulators.contains(&st.name))
            .map(|st| place(dense_bytes(&st.ty, 1, 1)))
            .sum();
        let grad_bucket = match bucket_bytes {
            0 => None,
            n => {
                let b = gpu.alloc(n)?;
                gpu.zero(b.ptr, n)?;
                Some(b)
            }
        };
        let mut at = 0;
        for st in &program.states {
            let bytes = dense_bytes(&st.ty, 1, 1);
            let buf = match &grad_bucket {
                Some(bucket) if accumulators.contains(&st.name) => {
                    let view = bucket.view(at, bytes);
                    at += place(bytes);
                    view
                }
                _ => {
                    let buf = gpu.alloc(bytes)?;
                    gpu.zero(buf.ptr, bytes)?;
                    buf
                }
            };
            store.insert(st.name.clone(), (st.ty.clone(), buf));
        }
        gpu.synchronize()?;
        Ok(GpuBackend {
            gpu,
            bundle,
            functions: HashMap::new(),
            shared_opt_in: HashMap::new(),
            store,
            grad_bucket,
            plans: HashMap::new(),
            last_profile: BTreeMap::new(),
            dependent_launch: std::env::var_os("WEFT_NO_PDL").is_none_or(|v| v != "1"),
            last_join_by_host: Vec::new(),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The kernel `name`, loaded on first use, allowed `shared_bytes` of dynamic shared memory
    /// (above the default 48 KiB a kernel must opt in).
    fn function(&mut self, name: &str, shared_bytes: u32) -> Result<sys::CUfunction, GpuError> {
        let f = self.load_function(name)?;
        if shared_bytes > DEFAULT_DYNAMIC_SHARED && self.shared_opt_in.get(name).is_none_or(|&b| b < shared_bytes) {
            // SAFETY: `f` is a live function of a module this backend keeps loaded.
            unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared_bytes as i32,
                )
            }
            .map_err(|e| {
                GpuError(format!(
                    "kernel `{name}` needs {shared_bytes} bytes of shared memory, which this GPU refuses: {e:?}"
                ))
            })?;
            self.shared_opt_in.insert(name.to_string(), shared_bytes);
        }
        Ok(f)
    }

    fn load_function(&mut self, name: &str) -> Result<sys::CUfunction, GpuError> {
        if let Some((_, f)) = self.functions.get(name) {
            return Ok(f.cu_function());
        }
        let k = self.bundle.kernel(name).ok_or_else(|| GpuError(format!("the bundle has no kernel `{name}`")))?;
        let ptx = match &k.cubin {
            Some(c) => Ptx::from_binary(c.clone()),
            None => Ptx::from_src(k.ptx.clone()),
        };
        let module = self
            .gpu
            .ctx
            .load_module(ptx)
            .map_err(|e| GpuError(format!("the driver cannot load kernel `{name}`: {e:?}")))?;
        let f = module
            .load_function(name)
            .map_err(|e| GpuError(format!("kernel `{name}` is missing from its module: {e:?}")))?;
        let raw = f.cu_function();
        check_params(raw, name, &k.params)?;
        self.functions.insert(name.to_string(), (module, f));
        Ok(raw)
    }

    fn load_plan(&mut self, name: &str) -> Result<(), GpuError> {
        if self.plans.contains_key(name) {
            return Ok(());
        }
        let (shape, device) = self
            .bundle
            .plans
            .get(name)
            .cloned()
            .ok_or_else(|| GpuError(format!("the bundle has no device plan `{name}`")))?;
        let plan = self.bundle.program.plan(name).map_err(|e| GpuError(e.0))?.clone();
        let arena = self.gpu.alloc(device.memory.arena_bytes as usize)?;
        let scratch = self.gpu.alloc(device.scratch_bytes as usize)?;
        let tables = Vec::new();
        let mut inputs = BTreeMap::new();
        for (n, v) in &plan.inputs {
            let ty = &plan.values[*v as usize];
            inputs.insert(n.clone(), self.gpu.alloc(dense_bytes(ty, shape.batch, shape.seq))?);
        }
        let offsets = device.memory.buffers.iter().map(|b| (b.value, b.offset)).collect();
        self.plans.insert(
            name.to_string(),
            LoadedPlan {
                shape,
                device,
                plan,
                arena,
                scratch,
                tables,
                inputs,
                offsets,
                graphs: HashMap::new(),
                calls: HashMap::new(),
                resident: HashMap::new(),
            },
        );
        // Tables last: lists of addresses need every buffer of the plan in place.
        let lp = &self.plans[name];
        let mut tables = Vec::new();
        for t in &lp.device.tables {
            let bytes: Vec<u8> = match t {
                Table::Words { words } => {
                    let mut v = Vec::with_capacity(words.len() * 8);
                    for w in words {
                        let x = match w {
                            Word::Address(b) => self.addr(lp, b)?,
                            Word::Int { value } => *value as u64,
                        };
                        v.extend_from_slice(&x.to_le_bytes());
                    }
                    v
                }
                _ => table_values(t).iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            let buf = self.gpu.alloc(bytes.len())?;
            self.gpu.upload(buf.ptr, &bytes)?;
            tables.push(buf);
        }
        self.plans.get_mut(name).expect("inserted above").tables = tables;
        Ok(())
    }

    /// The device address of a value of a loaded plan.
    fn value_addr(&self, lp: &LoadedPlan, v: ValueId) -> Result<u64, GpuError> {
        if let Some(&(_, target)) = lp.device.aliases.iter().find(|(a, _)| *a == v) {
            return self.value_addr(lp, target);
        }
        if let Some(off) = lp.offsets.get(&v) {
            return Ok(lp.arena.ptr + off);
        }
        if let Some((n, _)) = lp.plan.inputs.iter().find(|(_, x)| *x == v) {
            return Ok(lp.inputs[n].ptr);
        }
        if let Some((n, _)) = lp.plan.persistent.iter().find(|(_, x)| *x == v) {
            return self.store.get(n).map(|(_, b)| b.ptr).ok_or_else(|| GpuError(format!("the store has no `{n}`")));
        }
        Err(GpuError(format!("plan `{}`: value {v} has no place on the device", lp.plan.name)))
    }

    fn addr(&self, lp: &LoadedPlan, b: &BufferArg) -> Result<u64, GpuError> {
        let base = match b.base {
            Base::Value(v) => self.value_addr(lp, v)?,
            Base::Scratch => lp.scratch.ptr,
            Base::Table(i) => {
                lp.tables.get(i as usize).map(|t| t.ptr).ok_or_else(|| GpuError(format!("no table {i}")))?
            }
            Base::Persistent(ref n) => {
                self.store.get(n).map(|(_, b)| b.ptr).ok_or_else(|| GpuError(format!("the store has no `{n}`")))?
            }
        };
        Ok(base + b.offset)
    }

    /// Binds B and T from the inputs, checking them against the plan's types and its shape.
    fn bind(&self, lp: &LoadedPlan, inputs: &[(String, Tensor<f32>)]) -> Result<(u64, u64), GpuError> {
        let (mut b, mut t) = (None::<u64>, None::<u64>);
        let mut resident = Vec::new();
        for (name, v) in &lp.plan.inputs {
            let Some(tensor) = inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t) else {
                match lp.resident.get(name) {
                    Some(&at) => {
                        resident.push((name, at));
                        continue;
                    }
                    None => return Err(GpuError(format!("plan `{}` needs input `{name}`", lp.plan.name))),
                }
            };
            let ty = &lp.plan.values[*v as usize];
            if ty.shape.rank() != tensor.shape.len() {
                return Err(GpuError(format!("input `{name}` must have shape {}", ty.shape)));
            }
            for (d, &n) in ty.shape.0.iter().zip(&tensor.shape) {
                let slot = match d {
                    Dim::Batch => &mut b,
                    Dim::Seq => &mut t,
                    Dim::Fixed(k) if *k as usize == n => continue,
                    Dim::Fixed(k) => {
                        return Err(GpuError(format!("input `{name}` must have size {k} where it has {n}")))
                    }
                };
                match *slot {
                    Some(m) if m != n as u64 => {
                        return Err(GpuError(format!("input `{name}`: {d} is {n} here, {m} elsewhere")))
                    }
                    _ => *slot = Some(n as u64),
                }
            }
        }
        let (b, t) = (b.unwrap_or(1), t.unwrap_or(1));
        // A kept value's first b rows are its first b sequences' (rows are whole sequences).
        if let Some((name, at)) = resident.into_iter().find(|&(_, at)| at < b) {
            return Err(GpuError(format!("input `{name}` is kept for {at} sequences; this call has {b}")));
        }
        let s = lp.shape;
        if b > s.batch || t > s.seq || (lp.device.exact_shape && (b, t) != (s.batch, s.seq)) {
            return Err(GpuError(format!(
                "plan `{}` was built for {} {} sequences of {} tokens; this call has {b} of {t}: rebuild the bundle with matching run settings",
                lp.plan.name,
                if lp.device.exact_shape { "exactly" } else { "up to" },
                s.batch,
                s.seq
            )));
        }
        Ok((b, t))
    }

    /// Runs the device steps `range` of a loaded plan at (batch, seq).
    pub(crate) fn run_device_steps(
        &mut self,
        name: &str,
        batch: u64,
        seq: u64,
        range: std::ops::Range<usize>,
    ) -> Result<(), GpuError> {
        self.gpu.bind()?;
        let stream = self.gpu.raw_stream();
        for i in range {
            let step = self.plans[name].device.steps[i].clone();
            match &step {
                DeviceStep::Launch(l) => {
                    let f = self.function(&l.kernel, l.shared_bytes)?;
                    let lp = &self.plans[name];
                    let grid: Vec<u32> = l.grid.iter().map(|g| g.eval(batch, seq)).collect();
                    if grid.contains(&0) {
                        continue;
                    }
                    let mut cells: Vec<u64> = Vec::with_capacity(l.args.len());
                    for a in &l.args {
                        cells.push(match a {
                            Arg::Buffer(b) => self.addr(lp, b)?,
                            Arg::I64 { value } => value.eval(batch, seq) as u64,
                            Arg::F32 { value } => value.to_bits() as u64,
                        });
                    }
                    let mut params: Vec<*mut c_void> = cells.iter_mut().map(|c| c as *mut u64 as *mut c_void).collect();
                    // SAFETY: the kernel's parameters are 8-byte pointers and integers or 4-byte
                    // floats (read from the cell's first bytes, little-endian), in the order the
                    // compiler recorded: the bundle checked every launch's arguments against the
                    // kernel's recorded types and its PTX, and loading checked them against the
                    // driver's view. Every buffer lies inside memory this plan owns.
                    unsafe { launch(f, grid, l.block, l.shared_bytes, stream, &mut params, self.dependent_launch) }
                        .map_err(|e| GpuError(format!("plan `{name}`, launch of `{}`: {e:?}", l.kernel)))?;
                }
                DeviceStep::Gemm(g) => {
                    let lp = &self.plans[name];
                    let (a, b, c) =
                        (self.addr(lp, &g.a.buffer)?, self.addr(lp, &g.b.buffer)?, self.addr(lp, &g.c.buffer)?);
                    let dims = [g.m, g.n, g.k].map(|e| e.eval(batch, seq).max(0) as u64);
                    self.gpu.blas.gemm(g, dims[0], dims[1], dims[2], a, b, c, stream)?;
                }
                DeviceStep::Zero { buffer, bytes } => {
                    let lp = &self.plans[name];
                    let p = self.addr(lp, buffer)?;
                    let n = bytes.eval(batch, seq).max(0) as usize;
                    if n > 0 {
                        self.gpu.zero(p, n)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Uploads a call's inputs and binds its sizes.
    pub(crate) fn stage_inputs(
        &mut self,
        name: &str,
        inputs: &[(String, Tensor<f32>)],
    ) -> Result<(u64, u64), GpuError> {
        self.load_plan(name)?;
        let lp = &self.plans[name];
        // Ids index tables on the device: one outside the vocabulary would read stray memory.
        lp.plan.check_token_ids(inputs).map_err(|e| GpuError(e.0))?;
        let (b, t) = self.bind(lp, inputs)?;
        for (n, v) in &lp.plan.inputs {
            // Left out: kept on the device from the last call (checked by `bind`).
            let Some((_, tensor)) = inputs.iter().find(|(x, _)| x == n) else { continue };
            let bytes = encode(tensor, lp.plan.values[*v as usize].dtype)
                .map_err(|GpuError(e)| GpuError(format!("input `{n}`: {e}")))?;
            self.gpu.upload(lp.inputs[n].ptr, &bytes)?;
        }
        Ok((b, t))
    }

    /// Copies a value of a loaded plan to the host (rows at the arena's pitch made dense).
    pub(crate) fn fetch_value(&self, name: &str, v: ValueId, batch: u64, seq: u64) -> Result<Tensor<f32>, GpuError> {
        let lp = &self.plans[name];
        let ty = &lp.plan.values[v as usize];
        let shape: Vec<usize> = ty
            .shape
            .0
            .iter()
            .map(|d| match d {
                Dim::Batch => batch as usize,
                Dim::Seq => seq as usize,
                Dim::Fixed(n) => *n as usize,
            })
            .collect();
        let addr = self.value_addr(lp, v)?;
        let width = ty.shape.last().unwrap_or(1) as usize;
        let pitch = if lp.offsets.contains_key(&v) { crate::memory::row_pitch(ty) as usize } else { width };
        let esize = ty.dtype.bytes() as usize;
        let elems: usize = shape.iter().product();
        let rows = elems.checked_div(width).unwrap_or(0);
        let row_bytes = width * esize;
        self.gpu.download_with(addr, rows * pitch * esize, |raw| {
            if pitch == width {
                decode(raw, ty.dtype, shape)
            } else {
                let mut dense = Vec::with_capacity(rows * row_bytes);
                raw.chunks(pitch * esize).for_each(|r| dense.extend_from_slice(&r[..row_bytes]));
                decode(&dense, ty.dtype, shape)
            }
        })
    }

    /// Writes a host tensor into a value's place (rows at the arena's pitch).
    pub(crate) fn put(&self, name: &str, v: ValueId, t: &Tensor<f32>) -> Result<(), GpuError> {
        let lp = &self.plans[name];
        let ty = &lp.plan.values[v as usize];
        let addr = self.value_addr(lp, v)?;
        let width = ty.shape.last().unwrap_or(1) as usize;
        let pitch = if lp.offsets.contains_key(&v) { crate::memory::row_pitch(ty) as usize } else { width };
        let bytes = encode(t, ty.dtype)?;
        let esize = ty.dtype.bytes() as usize;
        if pitch == width {
            return self.gpu.upload(addr, &bytes);
        }
        let mut padded = Vec::with_capacity(bytes.len() / width * pitch);
        for row in bytes.chunks(width * esize) {
            padded.extend_from_slice(row);
            padded.resize(padded.len() + (pitch - width) * esize, 0);
        }
        self.gpu.upload(addr, &padded)
    }

    pub(crate) fn plan_of(&mut self, name: &str) -> Result<(&Plan, &DevicePlan, PlanShape), GpuError> {
        self.load_plan(name)?;
        let lp = &self.plans[name];
        Ok((&lp.plan, &lp.device, lp.shape))
    }

    /// Writes a finished call's updates into the store and its carried outputs into the input
    /// buffers of the same names (on the device); returns its other outputs but `skip`.
    fn finish(
        &mut self,
        name: &str,
        batch: u64,
        seq: u64,
        carried: &[String],
        skip: &[String],
    ) -> Result<BTreeMap<String, Tensor<f32>>, GpuError> {
        let lp = &self.plans[name];
        for (n, v) in &lp.plan.updates {
            let src = self.value_addr(lp, *v)?;
            let (ty, dst) = self.store.get(n).ok_or_else(|| GpuError(format!("the store has no `{n}`")))?;
            self.gpu.copy(dst.ptr, src, dense_bytes(ty, 1, 1))?;
        }
        let mut kept = Vec::new();
        for n in carried {
            let v = lp.plan.output(n).ok_or_else(|| GpuError(format!("plan `{name}` has no output `{n}` to carry")))?;
            let dst = lp.inputs.get(n).ok_or_else(|| GpuError(format!("plan `{name}` has no input `{n}` to carry")))?;
            let (ty, ity) = (&lp.plan.values[v as usize], lp.plan.input_type(n));
            if Some(ty) != ity || crate::memory::row_pitch(ty) != ty.shape.last().unwrap_or(1) {
                return Err(GpuError(format!("plan `{name}`: output `{n}` cannot be carried into its input")));
            }
            // Either the steps updated the input in place (nothing to copy) or they read it
            // and wrote the output elsewhere; both are done.
            let src = self.value_addr(lp, v)?;
            if src != dst.ptr {
                self.gpu.copy(dst.ptr, src, dense_bytes(ty, batch, 1))?;
            }
            kept.push(n.clone());
        }
        self.gpu.synchronize()?;
        let mut out = BTreeMap::new();
        for (n, v) in &lp.plan.outputs {
            if !carried.contains(n) && !skip.contains(n) {
                out.insert(n.clone(), self.fetch_value(name, *v, batch, seq)?);
            }
        }
        // Rows past this call's batch keep what they held.
        let lp = self.plans.get_mut(name).expect("loaded");
        for n in kept {
            let at = lp.resident.entry(n).or_insert(batch);
            *at = (*at).max(batch);
        }
        Ok(out)
    }

    /// The plan's device steps at (B, T) captured as a CUDA graph (nothing runs).
    fn capture(&mut self, name: &str, b: u64, t: u64) -> Result<CudaGraph, GpuError> {
        let n = self.plans[name].device.steps.len();
        let stream = self.gpu.stream.clone();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda("begin capturing a CUDA graph"))?;
        let ran = self.run_device_steps(name, b, t, 0..n);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        ran?;
        let graph = graph.map_err(cuda("capture a CUDA graph"))?;
        graph.ok_or_else(|| GpuError(format!("plan `{name}`: the CUDA graph came out empty")))
    }

    /// Runs a plan: inputs by name; returns its outputs. From the second call of a shape on, the
    /// device steps replay as one CUDA graph (disable with `WEFT_NO_CUDA_GRAPH=1`).
    pub fn run_plan(
        &mut self,
        name: &str,
        inputs: &[(String, Tensor<f32>)],
    ) -> Result<BTreeMap<String, Tensor<f32>>, GpuError> {
        self.run_plan_carried(name, inputs, &[])
    }

    /// [`GpuBackend::run_plan`] keeping the outputs named in `carried` on the device, in the
    /// input buffers of the same names, for the next call ([`Backend::run_carried`]).
    pub fn run_plan_carried(
        &mut self,
        name: &str,
        inputs: &[(String, Tensor<f32>)],
        carried: &[String],
    ) -> Result<BTreeMap<String, Tensor<f32>>, GpuError> {
        let (b, t) = self.stage_inputs(name, inputs)?;
        self.run_staged(name, b, t)?;
        self.finish(name, b, t, carried, &[])
    }

    /// Runs a staged call's device steps: from the second call of a shape on, as a CUDA graph.
    fn run_staged(&mut self, name: &str, b: u64, t: u64) -> Result<(), GpuError> {
        let n = self.plans[name].device.steps.len();
        let use_graphs = std::env::var_os("WEFT_NO_CUDA_GRAPH").is_none();
        let lp = self.plans.get_mut(name).expect("staged");
        let calls = {
            let c = lp.calls.entry((b, t)).or_insert(0);
            *c += 1;
            *c
        };
        if let Some(g) = lp.graphs.get(&(b, t)) {
            g.launch().map_err(|e| GpuError(format!("plan `{name}`: replaying its CUDA graph: {e:?}")))?;
        } else if use_graphs && calls >= 2 {
            let graph = self.capture(name, b, t)?;
            graph.launch().map_err(|e| GpuError(format!("plan `{name}`: launching its CUDA graph: {e:?}")))?;
            self.plans.get_mut(name).expect("staged").graphs.insert((b, t), graph);
        } else {
            self.run_device_steps(name, b, t, 0..n)?;
        }
        Ok(())
    }

    /// [`Backend::run_joining`]: a one-sequence call whose outputs `names` are copied on the
    /// device into row `slot` of the inputs of plan `to` that carry them at `batch` sequences
    /// (a prompt's states joining the decode batch: no round trip through the host).
    pub fn run_plan_joining(
        &mut self,
        name: &str,
        inputs: &[(String, Tensor<f32>)],
        names: &[String],
        to: &str,
        batch: usize,
        slot: usize,
    ) -> Result<BTreeMap<String, Tensor<f32>>, GpuError> {
        self.load_plan(to)?;
        let (b, t) = self.stage_inputs(name, inputs)?;
        if b != 1 {
            return Err(GpuError(format!("plan `{name}` joins one sequence at a time, not {b}")));
        }
        self.run_staged(name, b, t)?;
        let mut by_host = Vec::new();
        for n in names {
            let lp = &self.plans[name];
            let v = lp.plan.output(n).ok_or_else(|| GpuError(format!("plan `{name}` has no output `{n}`")))?;
            let ty = &lp.plan.values[v as usize];
            let ity = self.plans[to].plan.input_type(n);
            let dense = !lp.offsets.contains_key(&v) || crate::memory::row_pitch(ty) == ty.shape.last().unwrap_or(1);
            if Some(ty) != ity || !dense {
                // Laid out differently: through the host.
                by_host.push((n.clone(), v));
                continue;
            }
            let (src, row_bytes) = (self.value_addr(lp, v)?, dense_bytes(ty, 1, 1));
            let dst = self.carried_rows_at(to, n, batch)?;
            self.gpu.copy(dst + (slot * row_bytes) as u64, src, row_bytes)?;
        }
        self.last_join_by_host = by_host.iter().map(|(n, _)| n.clone()).collect();
        for (n, v) in by_host {
            let rows = self.fetch_value(name, v, b, t)?;
            self.put_carried_rows(to, &n, batch, slot, &rows)?;
        }
        self.finish(name, b, t, &[], names)
    }

    /// [`Backend::run_in_slot`]: row `from` of the values plan `to` carries goes into this
    /// one-sequence call's inputs `names`, and its outputs of those names into row `into`, all
    /// on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn run_plan_in_slot(
        &mut self,
        name: &str,
        inputs: &[(String, Tensor<f32>)],
        names: &[String],
        to: &str,
        batch: usize,
        from: usize,
        into: usize,
    ) -> Result<BTreeMap<String, Tensor<f32>>, GpuError> {
        self.load_plan(to)?;
        self.load_plan(name)?;
        let mut rows = Vec::new();
        for n in names {
            let (lp, tp) = (&self.plans[name], &self.plans[to]);
            let ty = lp.plan.input_type(n).ok_or_else(|| GpuError(format!("plan `{name}` has no input `{n}`")))?;
            let v = lp.plan.output(n).ok_or_else(|| GpuError(format!("plan `{name}` has no output `{n}`")))?;
            let oty = &lp.plan.values[v as usize];
            let dense = !lp.offsets.contains_key(&v) || crate::memory::row_pitch(oty) == oty.shape.last().unwrap_or(1);
            if tp.plan.input_type(n) != Some(ty) || oty != ty || !dense {
                return Err(GpuError(format!("plan `{name}`: `{n}` is laid out unlike plan `{to}`'s")));
            }
            let kept = tp.resident.get(n).copied().unwrap_or(0);
            if from.max(into) >= batch || kept < batch as u64 {
                return Err(GpuError(format!(
                    "plan `{to}` keeps `{n}` for {kept} sequences, not rows {from} and {into} of {batch}"
                )));
            }
            let (row_bytes, base) = (dense_bytes(ty, 1, 1), tp.inputs[n].ptr);
            self.gpu.copy(lp.inputs[n].ptr, base + (from * row_bytes) as u64, row_bytes)?;
            rows.push((n.clone(), v, base + (into * row_bytes) as u64, row_bytes));
        }
        let lp = self.plans.get_mut(name).expect("loaded");
        for n in names {
            lp.resident.insert(n.clone(), 1);
        }
        let (b, t) = self.stage_inputs(name, inputs)?;
        if b != 1 {
            return Err(GpuError(format!("plan `{name}` continues one sequence at a time, not {b}")));
        }
        self.run_staged(name, b, t)?;
        for (_, v, at, row_bytes) in &rows {
            let src = self.value_addr(&self.plans[name], *v)?;
            self.gpu.copy(*at, src, *row_bytes)?;
        }
        self.finish(name, b, t, &[], names)
    }

    /// The input buffer of plan `to` that carries `name` for `batch` sequences, rows it did not
    /// hold yet cleared.
    fn carried_rows_at(&mut self, to: &str, name: &str, batch: usize) -> Result<u64, GpuError> {
        let lp = &self.plans[to];
        if batch as u64 > lp.shape.batch {
            return Err(GpuError(format!(
                "plan `{to}` was built for up to {} sequences, not {batch}: rebuild the bundle with a larger generate.batch",
                lp.shape.batch
            )));
        }
        let ty = lp.plan.input_type(name).ok_or_else(|| GpuError(format!("plan `{to}` has no input `{name}`")))?;
        let dst = lp.inputs[name].ptr;
        let row_bytes = dense_bytes(ty, 1, 1) as u64;
        let kept = lp.resident.get(name).copied().unwrap_or(0);
        if kept < batch as u64 {
            self.gpu.zero(dst + kept * row_bytes, (row_bytes * (batch as u64 - kept)) as usize)?;
        }
        self.plans.get_mut(to).expect("loaded").resident.insert(name.to_string(), kept.max(batch as u64));
        Ok(dst)
    }

    /// [`Backend::put_carried`]: the rows go straight into the plan's input buffer, where the
    /// next call finds the carried value.
    pub fn put_carried_rows(
        &mut self,
        plan: &str,
        name: &str,
        batch: usize,
        first: usize,
        rows: &Tensor<f32>,
    ) -> Result<(), GpuError> {
        self.load_plan(plan)?;
        let lp = &self.plans[plan];
        crate::backend::carried_rows(&lp.plan, name, batch, first, rows).map_err(GpuError)?;
        let ty = lp.plan.input_type(name).expect("checked");
        let (row_bytes, bytes) = (dense_bytes(ty, 1, 1), encode(rows, ty.dtype)?);
        let dst = self.carried_rows_at(plan, name, batch)?;
        self.gpu.upload(dst + (first * row_bytes) as u64, &bytes)
    }

    /// Runs a plan `repeats` times after its inputs were staged once, timing each device step
    /// class with CUDA events; returns milliseconds per run by class and in total.
    pub fn time_plan(
        &mut self,
        name: &str,
        inputs: &[(String, Tensor<f32>)],
        repeats: usize,
    ) -> Result<(BTreeMap<&'static str, f64>, f64), GpuError> {
        let (b, t) = self.stage_inputs(name, inputs)?;
        let n = self.plans[name].device.steps.len();
        // Warm up: loads every kernel, picks every cuBLASLt algorithm.
        self.run_device_steps(name, b, t, 0..n)?;
        self.gpu.synchronize()?;
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut by_class: BTreeMap<&'static str, f64> = BTreeMap::new();
        self.last_profile.clear();
        let start = self.gpu.ctx.new_event(flags).map_err(cuda("event"))?;
        let end = self.gpu.ctx.new_event(flags).map_err(cuda("event"))?;
        // Timed as training runs: the whole plan replayed as one CUDA graph.
        let graph = self.capture(name, b, t)?;
        start.record(&self.gpu.stream).map_err(cuda("event"))?;
        for _ in 0..repeats {
            graph.launch().map_err(cuda("launch the CUDA graph"))?;
        }
        end.record(&self.gpu.stream).map_err(cuda("event"))?;
        end.synchronize().map_err(cuda("event"))?;
        let total = start.elapsed_ms(&end).map_err(cuda("event"))? as f64 / repeats as f64;
        // One more run with an event around every step, for the split by class.
        let events: Vec<_> =
            (0..=n).map(|_| self.gpu.ctx.new_event(flags)).collect::<Result<_, _>>().map_err(cuda("event"))?;
        events[0].record(&self.gpu.stream).map_err(cuda("event"))?;
        for i in 0..n {
            self.run_device_steps(name, b, t, i..i + 1)?;
            events[i + 1].record(&self.gpu.stream).map_err(cuda("event"))?;
        }
        events[n].synchronize().map_err(cuda("event"))?;
        for i in 0..n {
            let ms = events[i].elapsed_ms(&events[i + 1]).map_err(cuda("event"))? as f64;
            let step = &self.plans[name].device.steps[i];
            *by_class.entry(step.class()).or_default() += ms;
            let kernel = match step {
                DeviceStep::Launch(l) => l.kernel.clone(),
                DeviceStep::Gemm(g) => format!("gemm {}x{}x{}", g.m.eval(b, t), g.n.eval(b, t), g.k.eval(b, t)),
                DeviceStep::Zero { .. } => "zero".to_string(),
            };
            *self.last_profile.entry(kernel).or_default() += ms;
        }
        Ok((by_class, total))
    }

    pub fn program(&self) -> &Program {
        &self.bundle.program
    }
}

/// Compares the parameters the driver sees in a loaded kernel with those the bundle records
/// (and every launch passes): their number and each one's size.
fn check_params(f: sys::CUfunction, name: &str, params: &[crate::device::ParamKind]) -> Result<(), GpuError> {
    let info = |i: usize| -> Option<usize> {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: `f` is a live function; the driver writes two integers.
        let r = unsafe { sys::cuFuncGetParamInfo(f, i, &mut offset, &mut size) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(size)
    };
    let expected = crate::device::render_params(params);
    for (i, kind) in params.iter().enumerate() {
        match info(i) {
            Some(size) if size == kind.bytes() => {}
            Some(size) => {
                return Err(GpuError(format!(
                    "kernel `{name}`: parameter {i} takes {size} bytes on the device, but the bundle passes a {} ({} bytes); launches pass {expected}",
                    kind.name(),
                    kind.bytes()
                )))
            }
            None => {
                return Err(GpuError(format!(
                    "kernel `{name}` has {i} parameters on the device, but the bundle passes {}: {expected}",
                    params.len()
                )))
            }
        }
    }
    if info(params.len()).is_some() {
        return Err(GpuError(format!(
            "kernel `{name}` takes more than the {} parameters the bundle passes ({expected})",
            params.len()
        )));
    }
    Ok(())
}

/// The values of a constant table (f32), computed as the CPU reference computes them.
fn table_values(t: &Table) -> Vec<f32> {
    match *t {
        Table::Words { .. } => Vec::new(),
        Table::RopeCos { base, head_dim, positions } | Table::RopeSin { base, head_dim, positions } => {
            let half = (head_dim / 2) as usize;
            let inv: Vec<f64> = (0..half).map(|i| base.powf(-2.0 * i as f64 / head_dim as f64)).collect();
            let cos = matches!(t, Table::RopeCos { .. });
            let mut v = Vec::with_capacity(positions as usize * half);
            for p in 0..positions {
                for f in &inv {
                    let th = p as f64 * f;
                    v.push(if cos { th.cos() } else { th.sin() } as f32);
                }
            }
            v
        }
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> &str {
        "gpu"
    }

    fn program(&self) -> &Program {
        &self.bundle.program
    }

    fn run(&mut self, plan: &str, inputs: Vec<(String, Tensor<f32>)>) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        self.run_plan(plan, &inputs).map_err(|e| e.0)
    }

    fn run_carried(
        &mut self,
        plan: &str,
        inputs: Vec<(String, Tensor<f32>)>,
        carried: &[String],
    ) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        self.run_plan_carried(plan, &inputs, carried).map_err(|e| e.0)
    }

    fn put_carried(
        &mut self,
        plan: &str,
        name: &str,
        batch: usize,
        first: usize,
        rows: &Tensor<f32>,
    ) -> Result<(), String> {
        self.put_carried_rows(plan, name, batch, first, rows).map_err(|e| e.0)
    }

    fn run_joining(
        &mut self,
        plan: &str,
        inputs: Vec<(String, Tensor<f32>)>,
        names: &[String],
        to: &str,
        batch: usize,
        slot: usize,
    ) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        self.run_plan_joining(plan, &inputs, names, to, batch, slot).map_err(|e| e.0)
    }

    fn run_in_slot(
        &mut self,
        plan: &str,
        inputs: Vec<(String, Tensor<f32>)>,
        names: &[String],
        to: &str,
        batch: usize,
        from: usize,
        into: usize,
    ) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        self.run_plan_in_slot(plan, &inputs, names, to, batch, from, into).map_err(|e| e.0)
    }

    fn runs(&self, name: &str) -> bool {
        self.bundle.plans.contains_key(name)
    }

    fn plan_shape(&self, name: &str) -> Option<(usize, usize)> {
        self.bundle.plans.get(name).map(|p| (p.0.batch as usize, p.0.seq as usize))
    }

    /// On the devices through the group's NCCL communicator where it has one (the flat bucket
    /// of f32 accumulators, checked f32 at load, in place in one collective on the stream the
    /// plans run on), else through the host.
    fn all_reduce_grads(&mut self, group: &dyn crate::collective::Collective) -> Result<(), String> {
        let buffers: Vec<(u64, usize)> = self.grad_bucket.iter().map(|b| (b.ptr, b.bytes / 4)).collect();
        self.gpu.bind().map_err(|e| e.0)?;
        match group.all_reduce_device_f32(&buffers, self.gpu.raw_stream() as usize) {
            Some(done) => done,
            None => crate::backend::all_reduce_grads_through_host(self, group),
        }
    }

    /// Each parameter's buffer and its f32 master's, through NCCL.
    fn broadcast_on_device(
        &mut self,
        names: &[String],
        root: usize,
        group: &dyn crate::collective::Collective,
    ) -> Result<bool, String> {
        let mut buffers = Vec::new();
        for n in names {
            for key in [n.clone(), master_name(n)] {
                if let Some((ty, buf)) = self.store.get(&key) {
                    buffers.push((buf.ptr, dense_bytes(ty, 1, 1)));
                }
            }
        }
        self.gpu.bind().map_err(|e| e.0)?;
        match group.broadcast_device(&buffers, root, self.gpu.raw_stream() as usize) {
            Some(done) => done.map(|()| true),
            None => Ok(false),
        }
    }

    fn read(&self, names: &[&str]) -> Result<BTreeMap<String, Tensor<f32>>, String> {
        let mut out = BTreeMap::new();
        for n in names {
            // A bf16 parameter reads as its f32 master: checkpoints keep full precision.
            let master = master_name(n);
            let entry = self.store.get(&master).or_else(|| self.store.get(*n));
            let (ty, buf) = entry.ok_or_else(|| format!("the store has no `{n}`"))?;
            let mut raw = vec![0u8; dense_bytes(ty, 1, 1)];
            self.gpu.download(buf.ptr, &mut raw).map_err(|e| e.0)?;
            out.insert(n.to_string(), decode(&raw, ty.dtype, fixed_shape(ty)));
        }
        Ok(out)
    }

    fn write(&mut self, tensors: BTreeMap<String, Tensor<f32>>) -> Result<(), String> {
        for (n, t) in tensors {
            let (ty, buf) = self.store.get(&n).ok_or_else(|| format!("the store has no `{n}`"))?;
            if t.shape != fixed_shape(ty) {
                return Err(format!("`{n}` has shape {:?}, the program needs {}", t.shape, ty.shape));
            }
            self.gpu.upload(buf.ptr, &encode(&t, ty.dtype).map_err(|e| e.0)?).map_err(|e| e.0)?;
            if let Some((mty, m)) = self.store.get(&master_name(&n)) {
                self.gpu.upload(m.ptr, &encode(&t, mty.dtype).map_err(|e| e.0)?).map_err(|e| e.0)?;
            }
        }
        Ok(())
    }
}

/// Launches kernel `f`. With `dependent`, as a programmatic dependent launch: the kernel may
/// start before the one ahead of it on the stream has finished (every weft kernel begins by
/// waiting for it, `griddepcontrol.wait`), which hides the launch gap between small kernels.
///
/// # Safety
/// As `cuLaunchKernel`: `params` match the kernel's parameters.
unsafe fn launch(
    f: sys::CUfunction,
    grid: Vec<u32>,
    block: [u32; 3],
    shared_bytes: u32,
    stream: sys::CUstream,
    params: &mut [*mut c_void],
    dependent: bool,
) -> Result<(), result::DriverError> {
    // SAFETY: zero is a valid bit pattern of the attribute value union.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid[0],
        gridDimY: grid[1],
        gridDimZ: grid[2],
        blockDimX: block[0],
        blockDimY: block[1],
        blockDimZ: block[2],
        sharedMemBytes: shared_bytes,
        hStream: stream,
        attrs: &mut attr,
        numAttrs: dependent as u32,
    };
    // SAFETY: the caller's contract; `config` and `attr` outlive the call.
    unsafe { sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut()) }.result()
}
