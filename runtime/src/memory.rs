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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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

    let arena = if buffers.len() <= GREEDY_MAX { place_by_size(&mut buffers) } else { place_in_order(&mut buffers) };
    // The most bytes live at once: a sweep over the lifetimes' ends.
    let mut events: Vec<(usize, bool, u64)> = Vec::with_capacity(2 * buffers.len());
    for b in &buffers {
        events.push((b.first, false, b.bytes));
        events.push((b.last, true, b.bytes));
    }
    // At one step, births before deaths: a buffer born where another dies overlaps it.
    events.sort();
    let (mut live, mut peak) = (0u64, 0u64);
    for (_, dies, bytes) in events {
        if dies {
            live -= bytes;
        } else {
            live += bytes;
            peak = peak.max(live);
        }
    }
    MemoryPlan { batch, seq, arena_bytes: arena, buffers, views, peak_live_bytes: peak }
}

/// Plans of up to this many buffers are packed greedily by size (the tightest arenas, quadratic
/// in the buffers); larger ones first fit in step order (n log n), so that a spec of thousands of
/// layers plans in a moment.
const GREEDY_MAX: usize = 8192;

/// Greedy by size: the largest buffer first, each at the lowest offset free throughout its
/// lifetime. Returns the arena's size.
fn place_by_size(buffers: &mut [Buffer]) -> u64 {
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
    arena
}

/// First fit in step order, as an allocator would run the plan: buffers are born in step order
/// (at a step, the larger first) and freed after their last step; each takes the lowest free
/// range that fits, from free ranges kept by offset. Returns the arena's size.
fn place_in_order(buffers: &mut [Buffer]) -> u64 {
    use std::collections::{BTreeMap, BinaryHeap};
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by(|&a, &b| buffers[a].first.cmp(&buffers[b].first).then(buffers[b].bytes.cmp(&buffers[a].bytes)));
    // Free ranges below the arena's top, by offset; the top grows when none fits.
    let mut free: BTreeMap<u64, u64> = BTreeMap::new();
    let mut top = 0u64;
    // Live buffers by the step after which they die (a min-heap through Reverse).
    let mut dying: BinaryHeap<std::cmp::Reverse<(usize, u64, u64)>> = BinaryHeap::new();
    let release = |free: &mut BTreeMap<u64, u64>, top: &mut u64, mut lo: u64, mut hi: u64| {
        // Merge with the neighbours, then give the top back.
        if let Some((&plo, &phi)) = free.range(..lo).next_back() {
            if phi == lo {
                free.remove(&plo);
                lo = plo;
            }
        }
        if let Some(&nhi) = free.get(&hi) {
            free.remove(&hi);
            hi = nhi;
        }
        if hi == *top {
            *top = lo;
        } else {
            free.insert(lo, hi);
        }
    };
    for i in order {
        let (first, bytes) = (buffers[i].first, buffers[i].bytes);
        while let Some(std::cmp::Reverse((last, lo, hi))) = dying.peek().copied() {
            if last >= first {
                break;
            }
            dying.pop();
            release(&mut free, &mut top, lo, hi);
        }
        // The lowest free range that fits (first fit by offset).
        let fit = free.iter().find(|(&lo, &hi)| hi - lo >= bytes).map(|(&lo, &hi)| (lo, hi));
        let offset = match fit {
            Some((lo, hi)) => {
                free.remove(&lo);
                if hi - lo > bytes {
                    free.insert(lo + bytes, hi);
                }
                lo
            }
            None => {
                let lo = top;
                top += bytes;
                lo
            }
        };
        buffers[i].offset = offset;
        dying.push(std::cmp::Reverse((buffers[i].last, offset, offset + bytes)));
    }
    buffers.iter().map(|b| b.offset + b.bytes).max().unwrap_or(0)
}

impl MemoryPlan {
    /// Checks that no two buffers alive at the same step share a byte.
    /// (A sweep in step order: the live buffers kept by offset, each new one compared with its
    /// neighbours, so a plan of any size checks in n log n.)
    pub fn check(&self) -> Result<(), String> {
        use std::collections::BTreeMap;
        for a in &self.buffers {
            if a.offset % ALIGN != 0 || a.offset.checked_add(a.bytes).is_none_or(|end| end > self.arena_bytes) {
                return Err(format!("value {} is misplaced", a.value));
            }
        }
        let mut order: Vec<&Buffer> = self.buffers.iter().collect();
        order.sort_by_key(|b| (b.first, b.offset));
        // Live buffers by offset: (end, last step, value); and by the step after which they die.
        let mut live: BTreeMap<u64, (u64, usize, ValueId)> = BTreeMap::new();
        let mut dying: std::collections::BinaryHeap<std::cmp::Reverse<(usize, u64, ValueId)>> = Default::default();
        let clash =
            |a: ValueId, b: ValueId| Err(format!("values {a} and {b} overlap in the arena while both are live"));
        for b in order {
            while let Some(std::cmp::Reverse((last, off, v))) = dying.peek().copied() {
                if last >= b.first {
                    break;
                }
                dying.pop();
                if live.get(&off).is_some_and(|e| e.2 == v) {
                    live.remove(&off);
                }
            }
            if b.bytes == 0 {
                continue;
            }
            let end = b.offset + b.bytes;
            if let Some((_, &(pend, _, pv))) = live.range(..=b.offset).next_back() {
                if pend > b.offset {
                    return clash(pv, b.value);
                }
            }
            if let Some((&noff, &(_, _, nv))) = live.range(b.offset..).next() {
                if noff < end {
                    return clash(nv, b.value);
                }
            }
            live.insert(b.offset, (end, b.last, b.value));
            dying.push(std::cmp::Reverse((b.last, b.offset, b.value)));
        }
        Ok(())
    }
}
