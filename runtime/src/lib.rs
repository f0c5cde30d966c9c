//! weft's runtime crate: the operation set, tensor types and initialisation rules shared by the
//! compiler and every executor.
//!
//! Architecture invariant: this crate links no LLVM or MLIR. The compiler (`weft`) depends on it,
//! never the other way round, so a machine that only runs bundles needs no compiler.

pub mod backend;
pub mod bundle;
pub mod checkpoint;
pub mod collective;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dtype;
pub mod engine;
pub mod entropy;
pub mod eval;
pub mod flops;
pub mod generate;
pub mod init;
pub mod io;
pub mod load;
pub mod memory;
pub mod op;
pub mod passkey;
pub mod plan;
pub mod run;
pub mod serve;
pub mod shape;
pub mod svg;
pub mod train;
pub mod zero;

pub use dtype::DType;
pub use init::Init;
pub use op::{Op, OpError, Saved};
pub use shape::{Dim, Shape, TensorType};
