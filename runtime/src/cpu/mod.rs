//! The CPU reference backend: every operation of the operation set, forward and backward, in
//! f32 (or f64 for gradient checks), parallel across cores with rayon. It is the ground truth
//! for every GPU kernel, so each kernel here follows the reference equations plainly, and every
//! reduction runs in a fixed order (fixed chunking), so results do not depend on scheduling.

pub mod attention;
pub mod conv;
pub mod dense;
pub mod elementwise;
pub mod exec;
pub mod linear_attention;
pub mod norm;
pub mod optim;
pub mod real;
pub mod rope;
pub mod scan;
pub mod tensor;

#[cfg(test)]
mod check;
mod layout;

pub use real::{gemm, Real};
