//! Device plans: what a GPU executor runs for one plan of a program. The compiler lowers each
//! step of a [`Plan`](crate::plan::Plan) to kernel launches (generated PTX) and matrix products
//! (cuBLASLt problems whose algorithm the runtime picks on the device), over buffers placed by
//! the plan's [`MemoryPlan`](crate::memory::MemoryPlan).
//!
//! Sizes that depend on the call (`B` sequences of `T` tokens) are [`Extent`]s, so one device
//! plan serves every call up to the sizes its arena was planned for.

use crate::memory::MemoryPlan;
use crate::plan::ValueId;
use crate::DType;
use serde::{Deserialize, Serialize};

/// `bt·B·T + b·B + c`, evaluated at each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extent {
    pub bt: i64,
    pub b: i64,
    pub c: i64,
}

impl Extent {
    pub const fn constant(c: i64) -> Extent {
        Extent { bt: 0, b: 0, c }
    }

    /// `n` per token.
    pub const fn per_token(n: i64) -> Extent {
        Extent { bt: n, b: 0, c: 0 }
    }

    /// `n` per sequence.
    pub const fn per_sequence(n: i64) -> Extent {
        Extent { bt: 0, b: n, c: 0 }
    }

    /// This extent times `n`.
    pub const fn times(self, n: i64) -> Extent {
        Extent { bt: self.bt * n, b: self.b * n, c: self.c * n }
    }

    pub fn eval(&self, batch: u64, seq: u64) -> i64 {
        self.bt * (batch * seq) as i64 + self.b * batch as i64 + self.c
    }
}

impl std::fmt::Display for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut terms = Vec::new();
        if self.bt != 0 {
            terms.push(if self.bt == 1 { "B·T".to_string() } else { format!("{}·B·T", self.bt) });
        }
        if self.b != 0 {
            terms.push(if self.b == 1 { "B".to_string() } else { format!("{}·B", self.b) });
        }
        if self.c != 0 || terms.is_empty() {
            terms.push(self.c.to_string());
        }
        f.write_str(&terms.join(" + "))
    }
}

/// Where a kernel argument points.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Base {
    /// A value of the plan: an input, a persistent tensor, or a value in the arena.
    Value(ValueId),
    /// The plan's scratch area (temporaries inside one lowered step).
    Scratch,
    /// A persistent tensor the runtime keeps beside the program's (see [`master_name`]).
    Persistent(String),
    /// One of the plan's constant tables ([`DevicePlan::tables`]), filled by the runtime at load.
    Table(u32),
}

/// The f32 master copy of a parameter stored in bf16: the optimizer updates the master and
/// writes the bf16 copy the matrix products read (mixed precision as the reference trains).
pub fn master_name(param: &str) -> String {
    format!("master:{param}")
}

/// A constant the runtime computes once when it loads a plan (the same code as the CPU
/// reference, so both see the same numbers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "table", rename_all = "snake_case")]
pub enum Table {
    /// RoPE's `cos(p·θ_i)` (f32 `[positions, head_dim/2]`), `θ_i = base^(−2i/head_dim)`, angles in f64.
    RopeCos { base: f64, head_dim: u64, positions: u64 },
    /// The matching sines.
    RopeSin { base: f64, head_dim: u64, positions: u64 },
    /// 64-bit words: device addresses of plan buffers and integers (a multi-tensor kernel's
    /// list of tensors), resolved when the runtime loads the plan.
    Words { words: Vec<Word> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "word", rename_all = "snake_case")]
pub enum Word {
    Address(BufferArg),
    Int { value: i64 },
}

/// A device pointer: `base` plus `offset` bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BufferArg {
    pub base: Base,
    pub offset: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Arg {
    Buffer(BufferArg),
    I64 { value: Extent },
    F32 { value: f32 },
}

/// The type of a kernel parameter, as the bundle records it and the PTX declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A global-memory pointer (`.param .u64 .ptr`).
    Ptr,
    /// A 64-bit integer (`.param .u64`).
    I64,
    /// A 32-bit float (`.param .f32`).
    F32,
}

impl ParamKind {
    /// Bytes the parameter takes in the kernel's parameter buffer.
    pub fn bytes(self) -> usize {
        match self {
            ParamKind::Ptr | ParamKind::I64 => 8,
            ParamKind::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ParamKind::Ptr => "pointer",
            ParamKind::I64 => "i64",
            ParamKind::F32 => "f32",
        }
    }
}

impl Arg {
    /// The parameter type this argument fills.
    pub fn kind(&self) -> ParamKind {
        match self {
            Arg::Buffer(_) => ParamKind::Ptr,
            Arg::I64 { .. } => ParamKind::I64,
            Arg::F32 { .. } => ParamKind::F32,
        }
    }
}

/// The parameters of the `.entry` named `kernel` in `ptx`, in order, or why they cannot be read.
pub fn ptx_entry_params(ptx: &str, kernel: &str) -> Result<Vec<ParamKind>, String> {
    let head = format!(".entry {kernel}(");
    let start = ptx.find(&head).ok_or_else(|| format!("the PTX has no entry `{kernel}`"))? + head.len();
    let end = ptx[start..].find(')').ok_or_else(|| format!("the PTX entry `{kernel}` is not closed"))? + start;
    let mut kinds = Vec::new();
    for decl in ptx[start..end].split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let words: Vec<&str> = decl.split_whitespace().collect();
        let kind = match words.as_slice() {
            [".param", ".u64", ".ptr", ..] => ParamKind::Ptr,
            [".param", ".u64" | ".b64" | ".s64", _] => ParamKind::I64,
            [".param", ".f32", _] => ParamKind::F32,
            _ => return Err(format!("the PTX entry `{kernel}` declares a parameter weft does not pass: `{decl}`")),
        };
        kinds.push(kind);
    }
    Ok(kinds)
}

/// `(ptr, i64, f32)`: a parameter list as text, for errors.
pub fn render_params(kinds: &[ParamKind]) -> String {
    format!("({})", kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "))
}

/// A grid dimension: `ceil(extent / per_block)` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridDim {
    pub extent: Extent,
    pub per_block: u64,
}

impl GridDim {
    pub const fn fixed(n: i64) -> GridDim {
        GridDim { extent: Extent::constant(n), per_block: 1 }
    }

    pub fn eval(&self, batch: u64, seq: u64) -> u32 {
        let e = self.extent.eval(batch, seq).max(0) as u64;
        e.div_ceil(self.per_block.max(1)).min(u32::MAX as u64) as u32
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// The kernel's name in the bundle (one PTX module per kernel).
    pub kernel: String,
    pub grid: [GridDim; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    pub args: Vec<Arg>,
}

/// A row-major matrix operand: `rows × cols` elements of `dtype`, `ld` elements between rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatrixArg {
    pub buffer: BufferArg,
    pub dtype: DType,
    pub ld: u64,
}

/// `C = alpha · op(A) · op(B) + beta · C` in row-major terms, `C` being `m × n` and the
/// inner dimension `k`; `op(X)` is `Xᵀ` when `trans_x`. f32 accumulation. The runtime maps it
/// to cuBLASLt's column-major API and picks the algorithm on the device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gemm {
    pub m: Extent,
    pub n: Extent,
    pub k: Extent,
    pub a: MatrixArg,
    pub trans_a: bool,
    pub b: MatrixArg,
    pub trans_b: bool,
    pub c: MatrixArg,
    pub alpha: f32,
    pub beta: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum DeviceStep {
    Launch(Launch),
    Gemm(Gemm),
    /// Sets `bytes` bytes at the argument to zero.
    Zero {
        buffer: BufferArg,
        bytes: Extent,
    },
}

/// A plan lowered for the device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DevicePlan {
    pub name: String,
    /// Where every value the plan's steps write lives; planned at the largest call
    /// (`memory.batch` sequences of `memory.seq` tokens).
    pub memory: MemoryPlan,
    /// Bytes of scratch the steps need beyond the arena (the largest single step's).
    pub scratch_bytes: u64,
    /// Whether calls must have exactly the planned shape (steps were unrolled over its rows, as
    /// the cross-entropy's chunks are); otherwise any call up to it runs.
    pub exact_shape: bool,
    /// Constant tables the steps read (`Base::Table(i)`).
    pub tables: Vec<Table>,
    /// The index of the plan step each device step came from, for profiles and errors.
    pub origin: Vec<usize>,
    pub steps: Vec<DeviceStep>,
    /// Values written in place of another value's buffer: (value, the value whose buffer it
    /// is). A decode step appends this token's key and value to the carried cache input
    /// instead of writing a new cache.
    #[serde(default)]
    pub aliases: Vec<(ValueId, ValueId)>,
}

impl DeviceStep {
    /// The class of work, for time splits: matrix products, attention, scan, other.
    pub fn class(&self) -> &'static str {
        match self {
            DeviceStep::Gemm(_) => "matmul",
            DeviceStep::Zero { .. } => "other",
            DeviceStep::Launch(l) if l.kernel.starts_with("matmul") => "matmul",
            DeviceStep::Launch(l) if l.kernel.starts_with("attention") => "attention",
            DeviceStep::Launch(l) if l.kernel.starts_with("selective_scan") => "scan",
            DeviceStep::Launch(_) => "other",
        }
    }
}
