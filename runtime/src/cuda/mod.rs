//! The GPU executor: runs a bundle's device plans on an NVIDIA GPU through the CUDA driver and
//! cuBLASLt, both loaded at run time (nothing CUDA is needed to build this crate, and a machine
//! without a GPU never touches them).
//!
//! `device.rs` opens the GPU and owns device memory; `blas.rs` runs the plans' matrix products;
//! `exec.rs` is the [`Backend`](crate::backend::Backend) that runs plans; `check.rs` compares
//! every step and a whole model with the CPU reference; `nccl.rs` sums gradients between GPUs.

pub mod bench;
mod blas;
pub mod check;
mod device;
mod exec;
pub mod nccl;

pub use device::{DeviceBuffer, Gpu, GpuError};
pub use exec::GpuBackend;
