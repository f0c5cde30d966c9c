//! Shapes with two symbolic dimensions, batch `B` and sequence `T`, and fixed sizes elsewhere.
//!
//! Keeping B and T symbolic lets one graph describe every batch and sequence length; costs are
//! reported per token, which is the product of the fixed dimensions.

use crate::DType;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// Sequences in a batch.
    Batch,
    /// Tokens in a sequence.
    Seq,
    Fixed(u64),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => f.write_str("B"),
            Dim::Seq => f.write_str("T"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn fixed(dims: &[u64]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }

    /// `[B, T, rest...]`: an activation laid out token-major.
    pub fn tokens(rest: &[u64]) -> Shape {
        let mut dims = vec![Dim::Batch, Dim::Seq];
        dims.extend(rest.iter().map(|&d| Dim::Fixed(d)));
        Shape(dims)
    }

    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn last(&self) -> Option<u64> {
        match self.0.last() {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        }
    }

    /// True when the shape is `[B, T, ...]`, one row per token.
    pub fn is_per_token(&self) -> bool {
        self.0.len() >= 2 && self.0[0] == Dim::Batch && self.0[1] == Dim::Seq
    }

    /// Number of elements of the fixed dimensions (for `[B, T, d]`, d elements per token),
    /// saturating rather than overflowing.
    pub fn fixed_elems(&self) -> u64 {
        self.0.iter().fold(1u64, |acc, d| match d {
            Dim::Fixed(n) => acc.saturating_mul(*n),
            _ => acc,
        })
    }

    /// The fixed sizes, or `None` when the shape has a symbolic dimension.
    pub fn as_fixed(&self) -> Option<Vec<u64>> {
        self.0
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// Same shape with the last dimension replaced.
    pub fn with_last(&self, n: u64) -> Shape {
        let mut dims = self.0.clone();
        if let Some(last) = dims.last_mut() {
            *last = Dim::Fixed(n);
        }
        Shape(dims)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// The type of a tensor value: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }

    /// A per-sequence decode state `[B, dims...]`.
    pub fn per_sequence(dtype: DType, dims: &[u64]) -> TensorType {
        let mut d = vec![Dim::Batch];
        d.extend(dims.iter().map(|&n| Dim::Fixed(n)));
        TensorType::new(dtype, Shape(d))
    }

    /// Bytes per token for a `[B, T, ...]` tensor.
    pub fn bytes_per_token(&self) -> u64 {
        self.dtype.bytes() * self.shape.fixed_elems()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}
