//! Kernels that walk sequences in chunks of [`CHUNK`] tokens, one block row of the grid per
//! (sequence, chunk): the selective scan and the causal convolution.

use crate::lower::mlir::{Cmp, KernelBuilder, Ty, V};
use weft_runtime::device::{Extent, GridDim};

/// Tokens per chunk: the unit of parallelism along the sequence.
pub(super) const CHUNK: i64 = 64;

/// Grid of the per-chunk passes: channel blocks by `⌈(B·T + B·(CHUNK−1)) / CHUNK⌉ ≥ B·⌈T/CHUNK⌉`
/// chunk rows (the extra ones find no sequence and return).
pub(super) fn chunk_grid(x_blocks: u64) -> [GridDim; 3] {
    [
        GridDim::fixed(x_blocks as i64),
        GridDim { extent: Extent { bt: 1, b: CHUNK - 1, c: 0 }, per_block: CHUNK as u64 },
        GridDim::fixed(1),
    ]
}

/// Grid of the per-(sequence, channel) passes.
pub(super) fn sequence_grid(x_blocks: u64) -> [GridDim; 3] {
    [GridDim::fixed(x_blocks as i64), GridDim { extent: Extent::per_sequence(1), per_block: 1 }, GridDim::fixed(1)]
}

/// The chunk of this block (block y): its sequence, tokens `t0..t1` of it, the sequence's first
/// row, the chunk's index among all chunks (`b·nch + chunk`), and whether it exists.
pub(super) struct ChunkPos {
    pub seq: V,
    pub t0: V,
    pub t1: V,
    pub row0: V,
    pub index: V,
    pub live: V,
}

/// `(seq, nch)`: tokens per sequence and chunks per sequence.
pub(super) fn seq_chunks(k: &mut KernelBuilder, rows: &V, batch: &V) -> (V, V) {
    let one = k.i64(1);
    let b = k.max(batch, &one);
    let seq = k.div(rows, &b);
    let q = k.i64(CHUNK);
    let qm = k.i64(CHUNK - 1);
    let n = k.add(&seq, &qm);
    let nch = k.div(&n, &q);
    (seq, nch)
}

pub(super) fn chunk_pos(k: &mut KernelBuilder, rows: &V, batch: &V) -> ChunkPos {
    let (seq, nch) = seq_chunks(k, rows, batch);
    let index = k.block_id('y');
    let one = k.i64(1);
    let nch1 = k.max(&nch, &one);
    let b = k.div(&index, &nch1);
    let kc = k.rem(&index, &nch1);
    let in_batch = k.cmp(Cmp::Lt, &b, batch);
    let zero = k.i64(0);
    let nonempty = k.cmp(Cmp::Gt, &seq, &zero);
    let live = k.and(&in_batch, &nonempty);
    let q = k.i64(CHUNK);
    let t0 = k.mul(&kc, &q);
    let t1 = k.add(&t0, &q);
    let t1 = k.min(&t1, &seq);
    let row0 = k.mul(&b, &seq);
    ChunkPos { seq, t0, t1, row0, index, live }
}

/// The channel of a one-thread-per-channel pass (the block's global thread index).
pub(super) fn channel(k: &mut KernelBuilder) -> V {
    let tid = k.thread_id('x');
    let bid = k.block_id('x');
    let n = k.i64(k.block_threads());
    let base = k.mul(&bid, &n);
    k.add(&base, &tid)
}

/// `for i in lo..hi` with `carried` values, `unroll` iterations per loop trip so that their
/// loads can be in flight together: `body(k, i, valid, cur)` runs for each of them with `valid`
/// false past `hi` (its loads must then read somewhere harmless and its stores be skipped), and
/// the carried values of an invalid iteration are kept.
pub(super) fn unrolled(
    k: &mut KernelBuilder,
    lo: &V,
    hi: &V,
    unroll: i64,
    carried: &[V],
    mut body: impl FnMut(&mut KernelBuilder, &V, &V, &[V]) -> Vec<V>,
) -> Vec<V> {
    k.for_(lo, hi, unroll, carried, |k, i0, cur| {
        let mut cur = cur.to_vec();
        for u in 0..unroll {
            let off = k.i64(u);
            let i = k.add(&i0, &off);
            let valid = k.cmp(Cmp::Lt, &i, hi);
            let next = body(k, &i, &valid, &cur);
            cur = next.iter().zip(&cur).map(|(n, c)| k.select(&valid, n, c)).collect();
        }
        cur
    })
}

/// `Σ_y partial[(y·per + q)·channels + c]` over the call's chunks `y < B·nch`, in chunk order:
/// how per-chunk partial sums (`[chunks, per, channels]` f32) are reduced, so results do not
/// depend on scheduling.
#[allow(clippy::too_many_arguments)]
pub(super) fn sum_over_chunks(
    k: &mut KernelBuilder,
    rows: &V,
    batch: &V,
    partial: &V,
    per: i64,
    q: &V,
    c: &V,
    channels: i64,
) -> V {
    let (_, nch) = seq_chunks(k, rows, batch);
    let chunks = k.mul(&nch, batch);
    let zero = k.i64(0);
    let zf = k.f32(0.0);
    let perv = k.i64(per);
    let chv = k.i64(channels);
    let sum = k.for_(&zero, &chunks, 1, &[zf], |k, y, acc| {
        let r = k.mul(&y, &perv);
        let r = k.add(&r, q);
        let r = k.mul(&r, &chv);
        let r = k.add(&r, c);
        let v = k.load(partial, &r, Ty::F32);
        vec![k.add(&acc[0], &v)]
    });
    sum[0].clone()
}
