//! A builder for GPU kernels as MLIR text (gpu, arith, scf, memref and llvm dialects).
//!
//! Kernels are written in Rust against this builder and come out as one `gpu.module` each.
//! Rules the builder keeps so that every kernel lowers on NVPTX without libdevice:
//! - Buffers are `!llvm.ptr<1>` (global) kernel parameters addressed with `llvm.getelementptr`:
//!   one 64-bit parameter per buffer, whatever the shape, so the runtime's launch ABI is plain.
//! - Integer arithmetic is i64 (`scf.for` over i64), so no index conversion leaks into addresses.
//! - Transcendentals are NVPTX intrinsics it always selects (`llvm.exp2.f32` → `ex2.approx`,
//!   `llvm.sqrt.f32` → `sqrt.rn`, `lg2.approx`, `cos/sin.approx`); no `math.*` op and no
//!   `arith.maxnumf` (both become libdevice calls), never `llvm.exp.f32` (aborts NVPTX).
//! - Constants are written as exact hexadecimal bit patterns.

use std::fmt::Write;

/// An element or scalar type in a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    F32,
    BF16,
    I32,
    I64,
    I1,
    /// A global-memory pointer.
    Ptr,
    Index,
}

impl Ty {
    pub fn mlir(self) -> &'static str {
        match self {
            Ty::F32 => "f32",
            Ty::BF16 => "bf16",
            Ty::I32 => "i32",
            Ty::I64 => "i64",
            Ty::I1 => "i1",
            Ty::Ptr => "!llvm.ptr<1>",
            Ty::Index => "index",
        }
    }

    /// The parameter type of a kernel parameter of this type (pointers, i64 and f32 only).
    pub fn param_kind(self) -> weft_runtime::device::ParamKind {
        use weft_runtime::device::ParamKind;
        match self {
            Ty::Ptr => ParamKind::Ptr,
            Ty::I64 => ParamKind::I64,
            Ty::F32 => ParamKind::F32,
            other => panic!("a kernel parameter of type {} (weft passes pointers, i64 and f32)", other.mlir()),
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Ty::F32 | Ty::BF16)
    }

    pub fn of(d: weft_runtime::DType) -> Ty {
        match d {
            weft_runtime::DType::F32 => Ty::F32,
            weft_runtime::DType::BF16 => Ty::BF16,
            // f16 is not a storage type of any plan weft lowers; treat as a compile error upstream.
            weft_runtime::DType::F16 => Ty::BF16,
            weft_runtime::DType::I32 => Ty::I32,
        }
    }
}

/// An SSA value with its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V {
    pub name: String,
    pub ty: Ty,
}

/// An array in shared memory (a workgroup attribution) or in a thread's local memory (an
/// alloca, for per-thread arrays indexed at run time).
#[derive(Clone, Debug)]
pub struct Shared {
    name: String,
    len: u64,
    ty: Ty,
    local: bool,
}

/// One kernel parameter: a buffer pointer or a scalar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub ty: Ty,
}

/// Comparison predicates (signed for integers, ordered for floats).
#[derive(Clone, Copy, Debug)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Cmp {
    fn int(self) -> &'static str {
        match self {
            Cmp::Lt => "slt",
            Cmp::Le => "sle",
            Cmp::Gt => "sgt",
            Cmp::Ge => "sge",
            Cmp::Eq => "eq",
            Cmp::Ne => "ne",
        }
    }

    fn float(self) -> &'static str {
        match self {
            Cmp::Lt => "olt",
            Cmp::Le => "ole",
            Cmp::Gt => "ogt",
            Cmp::Ge => "oge",
            Cmp::Eq => "oeq",
            Cmp::Ne => "one",
        }
    }
}

pub struct KernelBuilder {
    name: String,
    block: [u32; 3],
    params: Vec<Param>,
    shared: Vec<Shared>,
    body: String,
    indent: usize,
    next: usize,
    /// Whether the kernel reads dynamic shared memory.
    dynamic_shared: bool,
    /// A cap on registers per thread (`.maxnreg`), for occupancy.
    max_registers: Option<u32>,
}

/// The symbol of a kernel's dynamic shared memory.
const DYNAMIC_SHARED: &str = "weft_dynamic_shared";

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f32 = std::f32::consts::LN_2;

impl KernelBuilder {
    /// A kernel launched with `block` threads per block (the launch must match: it becomes
    /// `.reqntid`-style bounds that the compiler optimises for).
    pub fn new(name: &str, block: [u32; 3]) -> KernelBuilder {
        KernelBuilder {
            name: name.to_string(),
            block,
            params: Vec::new(),
            shared: Vec::new(),
            body: String::new(),
            indent: 3,
            next: 0,
            dynamic_shared: false,
            max_registers: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Caps the registers per thread (ptxas spills past it), so that more blocks fit an SM.
    pub fn max_registers(&mut self, n: u32) {
        self.max_registers = Some(n);
    }

    pub fn block(&self) -> [u32; 3] {
        self.block
    }

    /// Bytes of the kernel's shared-memory arrays (static shared memory).
    pub fn static_shared_bytes(&self) -> u64 {
        self.shared.iter().filter(|s| !s.local).map(|s| s.len * elem_bytes(s.ty) as u64).sum()
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    fn fresh(&mut self, ty: Ty) -> V {
        let v = V { name: format!("%v{}", self.next), ty };
        self.next += 1;
        v
    }

    fn line(&mut self, s: &str) {
        for _ in 0..self.indent {
            self.body.push_str("  ");
        }
        self.body.push_str(s);
        self.body.push('\n');
    }

    /// A comment in the kernel body, for readers of the snapshots.
    pub fn comment(&mut self, s: &str) {
        self.line(&format!("// {s}"));
    }

    fn param(&mut self, name: &str, ty: Ty) -> V {
        assert!(
            !self.params.iter().any(|p| p.name == name),
            "kernel `{}` has two parameters named `{name}`",
            self.name
        );
        self.params.push(Param { name: name.to_string(), ty });
        V { name: format!("%{name}"), ty }
    }

    /// A buffer parameter: a device pointer to elements of some type.
    pub fn ptr(&mut self, name: &str) -> V {
        self.param(name, Ty::Ptr)
    }

    pub fn scalar_i64(&mut self, name: &str) -> V {
        self.param(name, Ty::I64)
    }

    pub fn scalar_f32(&mut self, name: &str) -> V {
        self.param(name, Ty::F32)
    }

    /// A shared-memory array of `len` elements.
    pub fn shared(&mut self, name: &str, ty: Ty, len: u64) -> Shared {
        let s = Shared { name: format!("%{name}"), len, ty, local: false };
        self.shared.push(s.clone());
        s
    }

    /// A per-thread array of `len` elements in local memory.
    pub fn local(&mut self, name: &str, ty: Ty, len: u64) -> Shared {
        let s = Shared { name: format!("%{name}"), len, ty, local: true };
        self.line(&format!("{} = memref.alloca() : {}", s.name, shared_type(&s)));
        s
    }

    fn emit(&mut self, ty: Ty, rhs: String) -> V {
        let v = self.fresh(ty);
        self.line(&format!("{} = {rhs}", v.name));
        v
    }

    // ---- constants ----

    pub fn f32(&mut self, x: f32) -> V {
        self.emit(Ty::F32, format!("arith.constant 0x{:08X} : f32", x.to_bits()))
    }

    pub fn i64(&mut self, x: i64) -> V {
        self.emit(Ty::I64, format!("arith.constant {x} : i64"))
    }

    pub fn i32(&mut self, x: i32) -> V {
        self.emit(Ty::I32, format!("arith.constant {x} : i32"))
    }

    // ---- thread geometry (as i64) ----

    fn geometry(&mut self, op: &str, dim: char) -> V {
        let idx = self.emit(Ty::Index, format!("gpu.{op} {dim}"));
        self.emit(Ty::I64, format!("arith.index_cast {} : index to i64", idx.name))
    }

    pub fn thread_id(&mut self, dim: char) -> V {
        self.geometry("thread_id", dim)
    }

    pub fn block_id(&mut self, dim: char) -> V {
        self.geometry("block_id", dim)
    }

    pub fn grid_dim(&mut self, dim: char) -> V {
        self.geometry("grid_dim", dim)
    }

    /// Threads per block along x, as fixed at build time.
    pub fn block_threads(&self) -> i64 {
        self.block[0] as i64
    }

    // ---- arithmetic ----

    fn binary(&mut self, float_op: &str, int_op: &str, a: &V, b: &V) -> V {
        assert_eq!(a.ty, b.ty, "{float_op}/{int_op} on {} and {} in `{}`", a.ty.mlir(), b.ty.mlir(), self.name);
        let op = if a.ty.is_float() { float_op } else { int_op };
        self.emit(a.ty, format!("arith.{op} {}, {} : {}", a.name, b.name, a.ty.mlir()))
    }

    pub fn add(&mut self, a: &V, b: &V) -> V {
        self.binary("addf", "addi", a, b)
    }

    pub fn sub(&mut self, a: &V, b: &V) -> V {
        self.binary("subf", "subi", a, b)
    }

    pub fn mul(&mut self, a: &V, b: &V) -> V {
        self.binary("mulf", "muli", a, b)
    }

    pub fn div(&mut self, a: &V, b: &V) -> V {
        self.binary("divf", "divsi", a, b)
    }

    pub fn rem(&mut self, a: &V, b: &V) -> V {
        self.binary("remf", "remsi", a, b)
    }

    pub fn and(&mut self, a: &V, b: &V) -> V {
        self.binary("andi", "andi", a, b)
    }

    pub fn or(&mut self, a: &V, b: &V) -> V {
        self.binary("ori", "ori", a, b)
    }

    pub fn neg(&mut self, a: &V) -> V {
        assert!(a.ty.is_float());
        self.emit(a.ty, format!("arith.negf {} : {}", a.name, a.ty.mlir()))
    }

    /// `a * b + c`: one fused multiply-add (a single rounding) for f32, multiply then add
    /// otherwise.
    pub fn fma(&mut self, a: &V, b: &V, c: &V) -> V {
        if a.ty == Ty::F32 && b.ty == Ty::F32 && c.ty == Ty::F32 {
            return self
                .emit(Ty::F32, format!("llvm.intr.fma({}, {}, {}) : (f32, f32, f32) -> f32", a.name, b.name, c.name));
        }
        let p = self.mul(a, b);
        self.add(&p, c)
    }

    pub fn cmp(&mut self, pred: Cmp, a: &V, b: &V) -> V {
        assert_eq!(a.ty, b.ty);
        let rhs = if a.ty.is_float() {
            format!("arith.cmpf {}, {}, {} : {}", pred.float(), a.name, b.name, a.ty.mlir())
        } else {
            format!("arith.cmpi {}, {}, {} : {}", pred.int(), a.name, b.name, a.ty.mlir())
        };
        self.emit(Ty::I1, rhs)
    }

    pub fn select(&mut self, c: &V, a: &V, b: &V) -> V {
        assert_eq!(a.ty, b.ty);
        self.emit(a.ty, format!("arith.select {}, {}, {} : {}", c.name, a.name, b.name, a.ty.mlir()))
    }

    pub fn max(&mut self, a: &V, b: &V) -> V {
        let c = self.cmp(Cmp::Gt, a, b);
        self.select(&c, a, b)
    }

    pub fn min(&mut self, a: &V, b: &V) -> V {
        let c = self.cmp(Cmp::Lt, a, b);
        self.select(&c, a, b)
    }

    /// Converts between f32/bf16, integer widths, and integer to f32.
    pub fn cast(&mut self, a: &V, to: Ty) -> V {
        if a.ty == to {
            return a.clone();
        }
        let op = match (a.ty, to) {
            (Ty::BF16, Ty::F32) => "extf",
            (Ty::F32, Ty::BF16) => "truncf",
            (Ty::I32, Ty::I64) | (Ty::I1, Ty::I64) | (Ty::I1, Ty::I32) => "extsi",
            (Ty::I64, Ty::I32) => "trunci",
            (Ty::I32 | Ty::I64, Ty::F32) => "sitofp",
            (Ty::F32, Ty::I32 | Ty::I64) => "fptosi",
            (Ty::I64, Ty::Index) | (Ty::Index, Ty::I64) => "index_cast",
            (f, t) => panic!("no cast from {} to {} in `{}`", f.mlir(), t.mlir(), self.name),
        };
        let op = if matches!((a.ty, to), (Ty::I1, _)) { "extui" } else { op };
        self.emit(to, format!("arith.{op} {} : {} to {}", a.name, a.ty.mlir(), to.mlir()))
    }

    fn intrinsic(&mut self, name: &str, a: &V) -> V {
        assert_eq!(a.ty, Ty::F32, "{name} takes f32");
        self.emit(Ty::F32, format!("llvm.call_intrinsic \"{name}\"({}) : (f32) -> f32", a.name))
    }

    /// `e^x` as `2^(x·log2 e)`.
    pub fn exp(&mut self, x: &V) -> V {
        let l = self.f32(LOG2E);
        let t = self.mul(x, &l);
        self.intrinsic("llvm.exp2.f32", &t)
    }

    pub fn exp2(&mut self, x: &V) -> V {
        self.intrinsic("llvm.exp2.f32", x)
    }

    /// Natural logarithm as `log2(x)·ln 2`.
    pub fn ln(&mut self, x: &V) -> V {
        let l = self.intrinsic("llvm.nvvm.lg2.approx.f", x);
        let c = self.f32(LN2);
        self.mul(&l, &c)
    }

    pub fn sqrt(&mut self, x: &V) -> V {
        self.intrinsic("llvm.sqrt.f32", x)
    }

    /// Cosine, accurate on [-π, π].
    pub fn cos(&mut self, x: &V) -> V {
        self.intrinsic("llvm.nvvm.cos.approx.f", x)
    }

    pub fn recip(&mut self, x: &V) -> V {
        let one = self.f32(1.0);
        self.div(&one, x)
    }

    /// `x·σ(x)`.
    pub fn silu(&mut self, x: &V) -> V {
        let s = self.sigmoid(x);
        self.mul(x, &s)
    }

    /// `1/(1 + e^-x)`, the reciprocal approximate (`rcp.approx`, within an ulp: far below the
    /// bf16 rounding every activation gets) rather than IEEE division's slow path.
    pub fn sigmoid(&mut self, x: &V) -> V {
        let n = self.neg(x);
        let e = self.exp(&n);
        let one = self.f32(1.0);
        let d = self.add(&one, &e);
        self.intrinsic("llvm.nvvm.rcp.approx.ftz.f", &d)
    }

    /// `ln(1 + e^x)`, linear above 20 as in the reference.
    pub fn softplus(&mut self, x: &V) -> V {
        let e = self.exp(x);
        let one = self.f32(1.0);
        let s = self.add(&one, &e);
        let l = self.ln(&s);
        let twenty = self.f32(20.0);
        let big = self.cmp(Cmp::Gt, x, &twenty);
        self.select(&big, x, &l)
    }

    // ---- memory ----

    fn gep(&mut self, base: &V, index: &V, elem: Ty) -> V {
        assert_eq!(base.ty, Ty::Ptr);
        assert_eq!(index.ty, Ty::I64, "addresses are i64 in `{}`", self.name);
        self.emit(
            Ty::Ptr,
            format!(
                "llvm.getelementptr {}[{}] : (!llvm.ptr<1>, i64) -> !llvm.ptr<1>, {}",
                base.name,
                index.name,
                elem.mlir()
            ),
        )
    }

    /// A 64-bit integer read as a global-memory pointer (addresses from a table).
    pub fn int_to_ptr(&mut self, v: &V) -> V {
        assert_eq!(v.ty, Ty::I64);
        self.emit(Ty::Ptr, format!("llvm.inttoptr {} : i64 to !llvm.ptr<1>", v.name))
    }

    /// `base[index]` as an element of type `elem`.
    pub fn load(&mut self, base: &V, index: &V, elem: Ty) -> V {
        let p = self.gep(base, index, elem);
        self.emit(elem, format!("llvm.load {} : !llvm.ptr<1> -> {}", p.name, elem.mlir()))
    }

    /// `lanes` consecutive elements from `base[index]` in one vector load (`base[index]` must be
    /// aligned to the vector's size, at most 16 bytes), each widened to f32.
    pub fn load_vector_f32(&mut self, base: &V, index: &V, elem: Ty, lanes: usize) -> Vec<V> {
        let xs = self.load_vector(base, index, elem, lanes);
        xs.iter().map(|x| self.cast(x, Ty::F32)).collect()
    }

    /// `lanes` consecutive elements of type `elem` from `base[index]` in one vector load, as
    /// stored (`base[index]` aligned to the vector's size, at most 16 bytes).
    pub fn load_vector(&mut self, base: &V, index: &V, elem: Ty, lanes: usize) -> Vec<V> {
        let p = self.gep(base, index, elem);
        let vt = format!("vector<{lanes}x{}>", elem.mlir());
        let v = format!("%v{}", self.next);
        self.next += 1;
        let align = lanes * elem_bytes(elem);
        self.line(&format!("{v} = llvm.load {} {{alignment = {align} : i64}} : !llvm.ptr<1> -> {vt}", p.name));
        (0..lanes)
            .map(|i| {
                let c = self.i32(i as i32);
                self.emit(elem, format!("llvm.extractelement {v}[{} : i32] : {vt}", c.name))
            })
            .collect()
    }

    /// Loads and widens to f32.
    pub fn load_f32(&mut self, base: &V, index: &V, elem: Ty) -> V {
        let v = self.load(base, index, elem);
        self.cast(&v, Ty::F32)
    }

    /// Stores `v` converted to `elem`.
    pub fn store(&mut self, v: &V, base: &V, index: &V, elem: Ty) {
        let v = self.cast(v, elem);
        let p = self.gep(base, index, elem);
        self.line(&format!("llvm.store {}, {} : {}, !llvm.ptr<1>", v.name, p.name, elem.mlir()));
    }

    /// Stores `vals` (converted to `elem`) at `base[index]…` in one vector store (`base[index]`
    /// must be aligned to the vector's size, at most 16 bytes).
    pub fn store_vector(&mut self, vals: &[V], base: &V, index: &V, elem: Ty) {
        let vt = format!("vector<{}x{}>", vals.len(), elem.mlir());
        let mut v = self.emit(Ty::Index, format!("llvm.mlir.undef : {vt}"));
        for (i, x) in vals.iter().enumerate() {
            let x = self.cast(x, elem);
            let c = self.i32(i as i32);
            v = self.emit(Ty::Index, format!("llvm.insertelement {}, {}[{} : i32] : {vt}", x.name, v.name, c.name));
        }
        let p = self.gep(base, index, elem);
        let align = vals.len() * elem_bytes(elem);
        self.line(&format!("llvm.store {}, {} {{alignment = {align} : i64}} : {vt}, !llvm.ptr<1>", v.name, p.name));
    }

    pub fn shared_load(&mut self, s: &Shared, index: &V) -> V {
        let i = self.cast(index, Ty::Index);
        let ty = s.ty;
        self.emit(ty, format!("memref.load {}[{}] : {}", s.name, i.name, shared_type(s)))
    }

    pub fn shared_store(&mut self, v: &V, s: &Shared, index: &V) {
        let v = self.cast(v, s.ty);
        let i = self.cast(index, Ty::Index);
        self.line(&format!("memref.store {}, {}[{}] : {}", v.name, s.name, i.name, shared_type(s)));
    }

    pub fn barrier(&mut self) {
        self.line("gpu.barrier");
    }

    /// The start of the kernel's dynamic shared memory (sized by the launch) as a 32-bit
    /// shared-window address, for the inline PTX that addresses shared memory directly. (An
    /// external zero-length `.shared` array, as CUDA's `extern __shared__`.)
    pub fn dynamic_shared_base(&mut self) -> V {
        self.dynamic_shared = true;
        let p = format!("%v{}", self.next);
        self.next += 1;
        self.line(&format!("{p} = llvm.mlir.addressof @{DYNAMIC_SHARED} : !llvm.ptr<3>"));
        self.emit(Ty::I32, format!("llvm.ptrtoint {p} : !llvm.ptr<3> to i32"))
    }

    /// A global-memory pointer as a 64-bit integer (its address).
    pub fn ptr_to_int(&mut self, p: &V) -> V {
        assert_eq!(p.ty, Ty::Ptr);
        self.emit(Ty::I64, format!("llvm.ptrtoint {} : !llvm.ptr<1> to i64", p.name))
    }

    /// The bits of `v` as another type of the same width (f32 and i32).
    pub fn bitcast(&mut self, v: &V, to: Ty) -> V {
        self.emit(to, format!("arith.bitcast {} : {} to {}", v.name, v.ty.mlir(), to.mlir()))
    }

    /// Inline PTX: `$0…` name the outputs (of types `outs`), then the inputs; `constraints` in
    /// LLVM's notation (`=r` an i32 output, `f` an f32 input, `l` an i64 one). Marked as having
    /// side effects, so it keeps its place among barriers, stores and other inline PTX.
    pub fn asm(&mut self, ptx: &str, constraints: &str, outs: &[Ty], ins: &[&V]) -> Vec<V> {
        let args = ins.iter().map(|v| v.name.clone()).collect::<Vec<_>>().join(", ");
        let in_tys = ins.iter().map(|v| v.ty.mlir()).collect::<Vec<_>>().join(", ");
        let head = format!(
            "llvm.inline_asm has_side_effects asm_dialect = att \"{ptx}\", \"{constraints}\" {args} : ({in_tys}) -> "
        );
        match outs {
            [] => {
                self.line(&format!("{head}()"));
                Vec::new()
            }
            [t] => vec![self.emit(*t, format!("{head}{}", t.mlir()))],
            _ => {
                let fields = outs.iter().map(|t| t.mlir()).collect::<Vec<_>>().join(", ");
                self.raw_struct(outs, &format!("{head}!llvm.struct<({fields})>"))
            }
        }
    }

    // ---- operations the builder has no method for ----

    /// `%r = <op>`: an operation written out in MLIR, its operands named by their `V::name`,
    /// with one result of type `ty` (e.g. `arith.bitcast %x : f32 to i32`). The caller keeps
    /// the rules in the module notes.
    pub fn raw(&mut self, ty: Ty, op: &str) -> V {
        self.emit(ty, op.to_string())
    }

    /// As [`raw`](Self::raw) for an operation whose result is an `!llvm.struct` of `fields`
    /// (e.g. `nvvm.mma.sync`): returns the fields, read with `llvm.extractvalue`.
    pub fn raw_struct(&mut self, fields: &[Ty], op: &str) -> Vec<V> {
        let name = format!("%v{}", self.next);
        self.next += 1;
        self.line(&format!("{name} = {op}"));
        let ty = format!("!llvm.struct<({})>", fields.iter().map(|t| t.mlir()).collect::<Vec<_>>().join(", "));
        fields.iter().enumerate().map(|(i, &f)| self.emit(f, format!("llvm.extractvalue {name}[{i}] : {ty}"))).collect()
    }

    // ---- warp and block reductions ----

    /// `v` from the lane `lane ^ offset`.
    pub fn shuffle_xor(&mut self, v: &V, offset: i32) -> V {
        let o = self.i32(offset);
        let w = self.i32(32);
        let r = self.fresh(v.ty);
        let ok = self.fresh(Ty::I1);
        self.line(&format!(
            "{}, {} = gpu.shuffle xor {}, {}, {} : {}",
            r.name,
            ok.name,
            v.name,
            o.name,
            w.name,
            v.ty.mlir()
        ));
        r
    }

    /// `v` from lane `lane` of the warp.
    pub fn shuffle_idx(&mut self, v: &V, lane: i32) -> V {
        let o = self.i32(lane);
        let w = self.i32(32);
        let r = self.fresh(v.ty);
        let ok = self.fresh(Ty::I1);
        self.line(&format!(
            "{}, {} = gpu.shuffle idx {}, {}, {} : {}",
            r.name,
            ok.name,
            v.name,
            o.name,
            w.name,
            v.ty.mlir()
        ));
        r
    }

    /// `combine` over the 32 lanes of a warp, in a fixed butterfly order; every lane gets the
    /// result.
    fn warp_reduce(&mut self, v: &V, combine: fn(&mut KernelBuilder, &V, &V) -> V) -> V {
        let mut acc = v.clone();
        for off in [16, 8, 4, 2, 1] {
            let o = self.shuffle_xor(&acc, off);
            acc = combine(self, &acc, &o);
        }
        acc
    }

    pub fn warp_sum(&mut self, v: &V) -> V {
        self.warp_reduce(v, KernelBuilder::add)
    }

    pub fn warp_max(&mut self, v: &V) -> V {
        self.warp_reduce(v, KernelBuilder::max)
    }

    /// `combine` over all threads of the block (x only), `identity` its neutral element; every
    /// thread gets the result. Uses `scratch` (one f32 per warp) and two barriers.
    fn block_reduce(
        &mut self,
        v: &V,
        scratch: &Shared,
        combine: fn(&mut KernelBuilder, &V, &V) -> V,
        identity: f32,
    ) -> V {
        let warps = (self.block_threads() / 32).max(1);
        let w = self.warp_reduce(v, combine);
        if warps == 1 {
            return w;
        }
        let tid = self.thread_id('x');
        let c32 = self.i64(32);
        let lane = self.rem(&tid, &c32);
        let warp = self.div(&tid, &c32);
        let zero = self.i64(0);
        let first = self.cmp(Cmp::Eq, &lane, &zero);
        self.if_(&first, |b| b.shared_store(&w, scratch, &warp));
        self.barrier();
        let init = self.f32(identity);
        let n = self.i64(warps);
        let total = self.for_(&zero, &n, 1, &[init], |b, k, acc| {
            let p = b.shared_load(scratch, &k);
            vec![combine(b, &acc[0], &p)]
        });
        self.barrier();
        total[0].clone()
    }

    /// Sum over all threads of the block (x only), in a fixed order.
    pub fn block_sum(&mut self, v: &V, scratch: &Shared) -> V {
        self.block_reduce(v, scratch, KernelBuilder::add, 0.0)
    }

    /// Maximum over all threads of the block (x only).
    pub fn block_max(&mut self, v: &V, scratch: &Shared) -> V {
        self.block_reduce(v, scratch, KernelBuilder::max, f32::NEG_INFINITY)
    }

    // ---- control flow ----

    /// `for i in (lo..hi).step_by(step)` with loop-carried values; returns their final values.
    pub fn for_(
        &mut self,
        lo: &V,
        hi: &V,
        step: i64,
        carried: &[V],
        body: impl FnOnce(&mut KernelBuilder, V, &[V]) -> Vec<V>,
    ) -> Vec<V> {
        let s = self.i64(step);
        self.for_dyn(lo, hi, &s, carried, body)
    }

    /// As [`for_`](Self::for_) with a step held in a value.
    pub fn for_dyn(
        &mut self,
        lo: &V,
        hi: &V,
        step: &V,
        carried: &[V],
        body: impl FnOnce(&mut KernelBuilder, V, &[V]) -> Vec<V>,
    ) -> Vec<V> {
        let iv = self.fresh(Ty::I64);
        let args: Vec<V> = carried.iter().map(|c| self.fresh(c.ty)).collect();
        let results: Vec<V> = carried.iter().map(|c| self.fresh(c.ty)).collect();
        let types = carried.iter().map(|c| c.ty.mlir()).collect::<Vec<_>>().join(", ");
        let head = if carried.is_empty() {
            format!("scf.for {} = {} to {} step {} : i64 {{", iv.name, lo.name, hi.name, step.name)
        } else {
            let inits = args
                .iter()
                .zip(carried)
                .map(|(a, c)| format!("{} = {}", a.name, c.name))
                .collect::<Vec<_>>()
                .join(", ");
            let names = results.iter().map(|r| r.name.clone()).collect::<Vec<_>>().join(", ");
            format!(
                "{names} = scf.for {} = {} to {} step {} iter_args({inits}) -> ({types}) : i64 {{",
                iv.name, lo.name, hi.name, step.name
            )
        };
        // Multi-result ops bind `%a, %b = ...`; MLIR wants `%r:2` or one name per result.
        let head = if results.len() > 1 { multi_result(&head, &results) } else { head };
        let results = if results.len() > 1 { multi_names(&results) } else { results };
        self.line(&head);
        self.indent += 1;
        let out = body(self, iv, &args);
        assert_eq!(out.len(), carried.len(), "loop body of `{}` yields the wrong number of values", self.name);
        if !out.is_empty() {
            let vals = out.iter().map(|v| v.name.clone()).collect::<Vec<_>>().join(", ");
            self.line(&format!("scf.yield {vals} : {types}"));
        }
        self.indent -= 1;
        self.line("}");
        results
    }

    /// `if cond { body }`.
    pub fn if_(&mut self, cond: &V, body: impl FnOnce(&mut KernelBuilder)) {
        self.line(&format!("scf.if {} {{", cond.name));
        self.indent += 1;
        body(self);
        self.indent -= 1;
        self.line("}");
    }

    /// `if cond { then } else { else_ }`, both yielding values of the same types.
    pub fn if_else(
        &mut self,
        cond: &V,
        then: impl FnOnce(&mut KernelBuilder) -> Vec<V>,
        else_: impl FnOnce(&mut KernelBuilder) -> Vec<V>,
    ) -> Vec<V> {
        let at = self.body.len();
        let ind = self.indent;
        self.indent += 1;
        let t = then(self);
        let then_body = self.body.split_off(at);
        let e = else_(self);
        let else_body = self.body.split_off(at);
        self.indent = ind;
        assert_eq!(t.iter().map(|v| v.ty).collect::<Vec<_>>(), e.iter().map(|v| v.ty).collect::<Vec<_>>());
        let types = t.iter().map(|v| v.ty.mlir()).collect::<Vec<_>>().join(", ");
        let results: Vec<V> = t.iter().map(|v| self.fresh(v.ty)).collect();
        let head = format!(
            "{} = scf.if {} -> ({types}) {{",
            results.iter().map(|r| r.name.clone()).collect::<Vec<_>>().join(", "),
            cond.name
        );
        let head = if results.len() > 1 { multi_result(&head, &results) } else { head };
        self.line(&head);
        self.body.push_str(&then_body);
        let yield_ = |vs: &[V]| {
            format!("scf.yield {} : {types}", vs.iter().map(|v| v.name.clone()).collect::<Vec<_>>().join(", "))
        };
        self.indent += 1;
        self.line(&yield_(&t));
        self.indent -= 1;
        self.line("} else {");
        self.body.push_str(&else_body);
        self.indent += 1;
        self.line(&yield_(&e));
        self.indent -= 1;
        self.line("}");
        if results.len() > 1 {
            multi_names(&results)
        } else {
            results
        }
    }

    /// The `gpu.module` holding this kernel, for the given target chip.
    pub fn finish(self, chip: &str) -> String {
        let mut s = String::new();
        let params = self.params.iter().map(|p| format!("%{}: {}", p.name, p.ty.mlir())).collect::<Vec<_>>().join(", ");
        let shared = if self.shared.is_empty() {
            String::new()
        } else {
            let list = self.shared.iter().map(|sh| format!("{}: {}", sh.name, shared_type(sh))).collect::<Vec<_>>();
            format!(" workgroup({})", list.join(", "))
        };
        let [x, y, z] = self.block;
        let maxnreg = self.max_registers.map_or(String::new(), |n| format!(", nvvm.maxnreg = {n} : i32"));
        writeln!(s, "module attributes {{gpu.container_module}} {{").unwrap();
        writeln!(s, "  gpu.module @{} [#nvvm.target<chip = \"{chip}\", features = \"+ptx80\", O = 3>] {{", self.name)
            .unwrap();
        if self.dynamic_shared {
            writeln!(
                s,
                "    llvm.mlir.global external @{DYNAMIC_SHARED}() {{addr_space = 3 : i32, alignment = 16 : i64}} : !llvm.array<0 x i8>"
            )
            .unwrap();
        }
        writeln!(
            s,
            "    gpu.func @{}({params}){shared} kernel attributes {{known_block_size = array<i32: {x}, {y}, {z}>{maxnreg}}} {{",
            self.name
        )
        .unwrap();
        // Programmatic dependent launch (Hopper): the runtime lets each kernel start while the
        // one before it finishes; it waits here until that one has completed and its writes are
        // visible, and lets the next one start as soon as all of its own blocks are running.
        // Both are no-ops for a kernel launched the ordinary way.
        for ptx in ["griddepcontrol.wait;", "griddepcontrol.launch_dependents;"] {
            writeln!(s, "      llvm.inline_asm has_side_effects asm_dialect = att \"{ptx}\", \"\"  : () -> ()")
                .unwrap();
        }
        s.push_str(&self.body);
        writeln!(s, "      gpu.return").unwrap();
        writeln!(s, "    }}").unwrap();
        writeln!(s, "  }}").unwrap();
        writeln!(s, "}}").unwrap();
        s
    }
}

/// Bytes of one element of a memory type.
fn elem_bytes(t: Ty) -> usize {
    match t {
        Ty::BF16 => 2,
        Ty::F32 | Ty::I32 => 4,
        Ty::I64 | Ty::Ptr | Ty::Index => 8,
        Ty::I1 => 1,
    }
}

fn shared_type(s: &Shared) -> String {
    if s.local {
        format!("memref<{}x{}>", s.len, s.ty.mlir())
    } else {
        format!("memref<{}x{}, #gpu.address_space<workgroup>>", s.len, s.ty.mlir())
    }
}

/// Rewrites `%a, %b = op` into `%a:2 = op` form's equivalent: MLIR accepts a list of names
/// only as `%r:2`; we bind `%vN:2` and refer to results as `%vN#0`, `%vN#1`.
fn multi_result(head: &str, results: &[V]) -> String {
    let names = results.iter().map(|r| r.name.clone()).collect::<Vec<_>>().join(", ");
    head.replacen(&names, &format!("{}:{}", results[0].name, results.len()), 1)
}

fn multi_names(results: &[V]) -> Vec<V> {
    (0..results.len()).map(|i| V { name: format!("{}#{i}", results[0].name), ty: results[i].ty }).collect()
}
