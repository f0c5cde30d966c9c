//! The memory plan of a plan: every value an operation writes gets a place in one arena, and
//! values whose lifetimes do not overlap share bytes. Slices are views: they take no memory and
//! keep their source alive.
//!
//! Placement is greedy by size (largest first, each at the lowest offset that no
//! lifetime-overlapping buffer occupies), which is within a few percent of the best packing on
//! the straight-line plans weft makes.

use crate::plan::{Plan, ValueId};
use crate::{Dim, Op, TensorType};
use serde::{Deserialize, Serialize};

/// Offsets are multiples of this (the widest vector load on the GPU, and a cache line).
pub const ALIGN: u64 = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub value: ValueId,
    pub offset: u64,
    pub bytes: u64,
    /// First and last step (inclusive) during which the buffer holds its value.
    pub first: usize,
    pub last: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryPlan {
    pub batch: u64,
    pub seq: u64,
    pub arena_bytes: u64,
    pub buffers: Vec<Buffer>,
    /// Values that are views of another value's buffer: (view, source).
    pub views: Vec<(ValueId, ValueId)>,
    /// The most bytes live at once: no packing can use less.
    pub peak_live_bytes: u64,
}

pub fn bytes(ty: &TensorType, batch: u64, seq: u64) -> u64 {
    let elems = ty.shape.0.iter().fold(1u64, |a, d| {
        a.saturating_mul(match d {
            Dim::Batch => batch,
            Dim::Seq => seq,
            Dim::Fixed(n) => *n,
        })
    });
    elems.saturating_mul(ty.dtype.bytes())
}

/// Elements from one row of a value in the arena to the next: the last dimension, rounded up
/// so that every row starts 16-byte aligned (vector loads and cuBLASLt's fast paths need it;
/// Samba-1.7B's MLP width 8196 is not). Only activations (`[B, T, ...]`) are padded; parameters,
/// their gradients and plan inputs keep dense rows.
pub fn row_pitch(ty: &TensorType) -> u64 {
    let width = ty.shape.last().unwrap_or(1);
    // Only `[B, T, ..., n]`: a `[B, T]` tensor's rows are its sequences, never padded.
    if !ty.shape.is_per_token() || ty.shape.rank() < 3 {
        return width;
    }
    let per16 = (16 / ty.dtype.bytes()).max(1);
    width.div_ceil(per16) * per16
}

/// Bytes of a value in the arena: its rows at [`row_pitch`].
pub fn arena_bytes(ty: &TensorType, batch: u64, seq: u64) -> u64 {
    let width = ty.shape.last().unwrap_or(1).max(1);
    bytes(ty, batch, seq) / width * row_pitch(ty)
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN).saturating_mul(ALIGN)
}

/// Places every value the plan's steps write, at `batch` sequences of `seq` tokens.
pub fn plan_memory(plan: &Plan, batch: u64, seq: u64) -> MemoryPlan {
    let n_steps = plan.steps.len();
    let mut producer: Vec<Option<usize>> = vec![None; plan.values.len()];
    let mut source: Vec<ValueId> = (0..plan.values.len() as ValueId).collect();
    let mut views = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        for &v in &step.outputs {
            producer[v as usize] = Some(i);
        }
        if let Op::Slice { .. } = step.op {
            let root = source[step.inputs[0] as usize];
            source[step.outputs[0] as usize] = root;
            views.push((step.outputs[0], root));
        }
    }
    // Lifetimes of buffers: from the producing step to the last read of the value or any view.
    let mut last: Vec<usize> = producer.iter().map(|p| p.unwrap_or(0)).collect();
    for (i, step) in plan.steps.iter().enumerate() {
        for &v in &step.inputs {
            let r = source[v as usize] as usize;
            last[r] = last[r].max(i);
        }
    }
    for (_, v) in plan.outputs.iter().chain(&plan.updates) {
        last[source[*v as usize] as usize] = n_steps;
    }
    let mut buffers: Vec<Buffer> = (0..plan.values.len())
        .filter(|&v| producer[v].is_some() && source[v] as usize == v)
        .map(|v| Buffer {
            value: v as ValueId,
            offset: 0,
            bytes: align(arena_bytes(&plan.values[v], batch, seq)),
            first: producer[v].unwrap_or(0),
            last: last[v],
        })
        .collect();

    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by(|&a, &b| buffers[b].bytes.cmp(&buffers[a].bytes).then(a.cmp(&b)));
    let mut placed: Vec<usize> = Vec::new();
    let mut arena = 0u64;
    for i in order {
        let mut taken: Vec<(u64, u64)> = placed
            .iter()
            .map(|&j| &buffers[j])
            .filter(|b| b.first <= buffers[i].last && buffers[i].first <= b.last)
            .map(|b| (b.offset, b.offset + b.bytes))
            .collect();
        taken.sort();
        let mut offset = 0u64;
        for (lo, hi) in taken {
            if offset + buffers[i].bytes <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        buffers[i].offset = offset;
        arena = arena.max(offset + buffers[i].bytes);
        placed.push(i);
    }
    let peak = (0..=n_steps)
        .map(|s| buffers.iter().filter(|b| b.first <= s && s <= b.last).map(|b| b.bytes).sum::<u64>())
        .max()
        .unwrap_or(0);
    MemoryPlan { batch, seq, arena_bytes: arena, buffers, views, peak_live_bytes: peak }
}

impl MemoryPlan {
    /// Checks that no two buffers alive at the same step share a byte.
    pub fn check(&self) -> Result<(), String> {
        for (i, a) in self.buffers.iter().enumerate() {
            for b in &self.buffers[i + 1..] {
                let live = a.first <= b.last && b.first <= a.last;
                let overlap = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
                if live && overlap {
                    return Err(format!("values {} and {} overlap in the arena while both are live", a.value, b.value));
                }
            }
            if a.offset % ALIGN != 0 || a.offset + a.bytes > self.arena_bytes {
                return Err(format!("value {} is misplaced", a.value));
            }
        }
        Ok(())
    }
}
