//! Causal softmax attention (full or sliding-window, GQA/MQA, rotate-half RoPE): forward with
//! the log-sum-exp, the backward in three deterministic passes, the prefill cache fill, and
//! one-token decode over the ring-buffer cache. The semantics are the CPU reference's
//! (`runtime/src/cpu/attention.rs`, `rope.rs`): query i sees keys j with i − w < j ≤ i, query
//! head h reads kv head h / (heads / kv_heads), scores are scaled by 1/√head_dim, and q and k
//! are rotated by their absolute positions before the dot products.
//!
//! - Forward on tensor cores (`attention_tc_*`, for bf16 q, k, v and head_dim 64 or 128): see
//!   [`attention_tc`]; 4 warps × 16 query rows per block, `mma.sync` for S = QKᵀ and O = PV.
//! - Backward on tensor cores (`attention_tcb_*`, wherever the forward runs on them and g is
//!   bf16): see [`attention_backward_tc`]; a prepass (D, rotated and split q and k), then a dK/dV
//!   kernel (blocks of keys looping over query tiles) and a dQ kernel (blocks of queries looping
//!   over key tiles), every product on `mma.sync`.
//!
//! The other kernels are SIMT: one warp per query (or key) row, lane `l` holding the elements
//! `d = l + 32e` of the row's head vector, dot products reduced with warp shuffles.
//! - Forward (`attention_*`, every other case): a block is 8 warps = 8 consecutive query rows
//!   of one sequence and head (grid `B·⌈T/8⌉ × heads`). Key/value tiles of the block's key range
//!   are rotated once into shared memory (f32), each warp scores the tile for its row, and an
//!   online softmax per tile (max, then exponentials) accumulates the output; scores run in
//!   base 2 (`q` pre-scaled by `log2 e/√head_dim`), the LSE is stored in natural log.
//! - Backward (every other case): `attention_bwd_delta_*` (one warp per (token, head): D = rowsum(g ⊙ o) into
//!   scratch), `attention_bwd_dq_*` (as the forward: P recomputed from the LSE, dS = P(dP − D),
//!   dQ = scale·Σ dS·k, rotated back), `attention_bwd_dkdv_*` (8 key rows per block, grid
//!   `B·⌈T/8⌉ × kv_heads`, looping over the query heads of the group and the queries that see
//!   each key, tiles of rotated q and of g in shared memory). Every gradient element has one
//!   writer and a fixed summation order: no atomics, results independent of scheduling.
//! - `attention_cache_*`: one thread per cache element; slot s holds the one position
//!   p ≡ s (mod capacity) among the last `capacity`, key rotated, zero where none.
//! - Decode: the caches are carried states updated in place. `attention_decode_append_*` writes
//!   the token's (rotated) key and value into slot pos mod capacity; then flash-decoding:
//!   `attention_decode_*` splits the keys a query sees into ranges of at most 64 (at most 128
//!   ranges), one block of 8 warps per (sequence, query heads of one GQA group, range), each key
//!   and value row read once for all the block's heads, each warp an online softmax over a
//!   strided share of the range, merged through shared memory into the range's partial record
//!   (unnormalised output, max, sum); `attention_decode_combine_*` merges the live ranges of each
//!   (sequence, head) in range order, so the sum order is fixed.
//!
//! RoPE angles come from the plan's `RopeCos`/`RopeSin` tables (cos/sin of p·θ_i computed in
//! f64 by the runtime, as in the reference). Forward, backward and cache fill see positions
//! below the plan's longest sequence, so their tables hold `max_shape().1` positions. Decode
//! runs at T = 1 but at positions up to the context length, which the decode plan does not
//! record (a sliding-window layer's cache is only the window): its table holds
//! `max(capacity, 8192)` positions (at most 65536, and at least the plan's sequence), and a
//! position p past the table is composed as (p mod S) + ⌊p/S⌋·S with S = positions − 1, by
//! complex multiplication with the angles of S (a few f32 roundings more than the reference,
//! and never a read past the table).

mod flash;

use super::super::{Emit, LowerError, Operand};
use super::{mma, sig};
use crate::lower::mlir::{Cmp, KernelBuilder, Shared, Ty, V};
use weft_runtime::device::{Arg, BufferArg, Extent, GridDim, Table};
use weft_runtime::op::AttentionAttrs;

/// Threads per block of every attention kernel: 8 warps.
const THREADS: u32 = 256;
const WARPS: i64 = THREADS as i64 / 32;
/// Query rows per forward/dQ block and key rows per dK/dV block: one per warp.
const ROWS: i64 = WARPS;
/// The fewest RoPE positions a decode table holds, and the most (past it, angles are composed).
const DECODE_ROPE_MIN: u64 = 8192;
const DECODE_ROPE_MAX: u64 = 65536;
/// The largest head supported (the specs' largest): the dK/dV kernel's two tiles of 16 rows and
/// its staging rows then take 41 KiB of the 48 KiB of static shared memory.
const MAX_HEAD_DIM: u64 = 256;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f32 = std::f32::consts::LN_2;

/// The sizes a kernel is specialised to, and its name tag.
struct Spec {
    heads: u64,
    kv_heads: u64,
    hd: u64,
    window: Option<u64>,
    rope: Option<f64>,
}

impl Spec {
    fn new(a: &AttentionAttrs) -> Result<Spec, LowerError> {
        if a.heads == 0 || a.kv_heads == 0 || a.heads % a.kv_heads != 0 {
            return Err(LowerError(format!(
                "attention: heads ({}) must be a positive multiple of kv_heads ({})",
                a.heads, a.kv_heads
            )));
        }
        if a.head_dim == 0 || a.head_dim > MAX_HEAD_DIM {
            return Err(LowerError(format!("attention: head_dim {} is not in 1..={MAX_HEAD_DIM}", a.head_dim)));
        }
        if a.rope.is_some() && a.head_dim % 2 != 0 {
            return Err(LowerError(format!("attention: RoPE needs an even head_dim, got {}", a.head_dim)));
        }
        if a.window == Some(0) {
            return Err(LowerError("attention: a window must hold at least the query itself".into()));
        }
        Ok(Spec { heads: a.heads, kv_heads: a.kv_heads, hd: a.head_dim, window: a.window, rope: a.rope })
    }

    fn group(&self) -> u64 {
        self.heads / self.kv_heads
    }

    /// Elements of a head vector per lane.
    fn per_lane(&self) -> usize {
        self.hd.div_ceil(32) as usize
    }

    /// Whether some lanes hold fewer elements (head_dim not a multiple of 32).
    fn ragged(&self) -> bool {
        self.hd % 32 != 0
    }

    /// Rows of a SIMT kernel's shared-memory tile: two f32 tiles take at most 32 KiB, and at most
    /// 32 rows keep the unrolled tile loop within the registers.
    fn tile(&self) -> i64 {
        (4096 / (32 * self.per_lane() as i64)).clamp(8, 32)
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.hd as f64).sqrt()) as f32
    }

    fn tag(&self) -> String {
        let w = self.window.map_or("full".to_string(), |w| w.to_string());
        let r = if self.rope.is_some() { "rope" } else { "nope" };
        format!("h{}_kv{}_d{}_w{w}_{r}", self.heads, self.kv_heads, self.hd)
    }

    /// The RoPE tables' arguments for `positions` positions (none without RoPE).
    fn tables(&self, e: &mut Emit, positions: u64) -> Vec<Arg> {
        match self.rope {
            None => vec![],
            Some(base) => {
                let positions = positions.max(2);
                let c = e.table(Table::RopeCos { base, head_dim: self.hd, positions });
                let s = e.table(Table::RopeSin { base, head_dim: self.hd, positions });
                vec![Arg::Buffer(c), Arg::Buffer(s)]
            }
        }
    }

    /// The table parameters of a kernel; `limit` is the table's positions when a position may
    /// lie past it.
    fn rope_params(&self, k: &mut KernelBuilder, limit: Option<u64>) -> Option<Rope> {
        self.rope.map(|_| {
            let cos = k.ptr("rope_cos");
            let sin = k.ptr("rope_sin");
            Rope { cos, sin, half: self.hd / 2, limit: limit.map(|n| n.max(2)) }
        })
    }
}

/// Whether a lane can hold a run of consecutive elements of `o`'s head vectors, read in 16-byte
/// (or smaller) vector loads: head_dim a multiple of 32 and rows aligned to the run.
fn contiguous_lanes(s: &Spec, o: &Operand) -> bool {
    let run = s.per_lane() as u64 * o.dtype().bytes();
    s.hd % 32 == 0 && run <= 16 && o.ld % s.per_lane() as u64 == 0 && o.buf.offset % run == 0
}

/// The elements a lane holds as one run, `d = lane·per_lane + e` (see [`contiguous_lanes`]).
fn lane_run(k: &mut KernelBuilder, s: &Spec, lane: &V) -> Vec<(V, Option<V>)> {
    let pl = k.i64(s.per_lane() as i64);
    let first = k.mul(lane, &pl);
    (0..s.per_lane())
        .map(|e| {
            let off = k.i64(e as i64);
            (k.add(&first, &off), None)
        })
        .collect()
}

/// A lane's run of `n` elements of a row's head vector from `d0` on, as f32, in one load.
#[allow(clippy::too_many_arguments)]
fn load_run(k: &mut KernelBuilder, p: &V, o: &Operand, row: &V, head: &V, hd: u64, d0: &V, n: usize) -> Vec<V> {
    let w = k.i64(hd as i64);
    let col = k.mul(head, &w);
    let col = k.add(&col, d0);
    let i = at(k, o, row, &col);
    k.load_vector_f32(p, &i, o.elem(), n)
}

/// The positions of the RoPE tables of the decode plan (see the module notes).
fn decode_positions(capacity: u64, seq: u64) -> u64 {
    capacity.clamp(DECODE_ROPE_MIN, DECODE_ROPE_MAX).max(seq)
}

/// A kernel's RoPE tables: f32 `[positions, half]` cosines and sines.
struct Rope {
    cos: V,
    sin: V,
    half: u64,
    /// The table's positions, when a position may be past them.
    limit: Option<u64>,
}

impl Rope {
    /// cos and sin of `pos·θ_i`.
    fn angles(&self, k: &mut KernelBuilder, pos: &V, i: &V) -> (V, V) {
        let half = k.i64(self.half as i64);
        let at = |k: &mut KernelBuilder, p: &V| {
            let r = k.mul(p, &half);
            let idx = k.add(&r, i);
            let c = k.load(&self.cos, &idx, Ty::F32);
            let s = k.load(&self.sin, &idx, Ty::F32);
            (c, s)
        };
        match self.limit {
            None => at(k, pos),
            Some(n) => {
                // pos = r + q·S: the angles of r, turned q times by those of S.
                let step = k.i64(n as i64 - 1);
                let q = k.div(pos, &step);
                let r = k.rem(pos, &step);
                let (c0, s0) = at(k, &r);
                let (cs, ss) = at(k, &step);
                let zero = k.i64(0);
                let out = k.for_(&zero, &q, 1, &[c0, s0], |k, _, cur| {
                    let (c, s) = (&cur[0], &cur[1]);
                    let a = k.mul(c, &cs);
                    let b = k.mul(s, &ss);
                    let nc = k.sub(&a, &b);
                    let a = k.mul(s, &cs);
                    let b = k.mul(c, &ss);
                    let ns = k.add(&a, &b);
                    vec![nc, ns]
                });
                (out[0].clone(), out[1].clone())
            }
        }
    }

    /// Element `d` of a head vector rotated by the angles of `pos` (by their transpose when
    /// `back`); `load(d)` reads element `d` of the unrotated vector.
    fn rotate(
        &self,
        k: &mut KernelBuilder,
        pos: &V,
        d: &V,
        back: bool,
        load: &dyn Fn(&mut KernelBuilder, &V) -> V,
    ) -> V {
        let half = k.i64(self.half as i64);
        let low = k.cmp(Cmp::Lt, d, &half);
        let down = k.sub(d, &half);
        let up = k.add(d, &half);
        let i = k.select(&low, d, &down);
        let pair = k.select(&low, &up, &down);
        let x = load(k, d);
        let y = load(k, &pair);
        let (c, s) = self.angles(k, pos, &i);
        let xc = k.mul(&x, &c);
        let ys = k.mul(&y, &s);
        // Forward: x₁' = x₁c − x₂s, x₂' = x₁s + x₂c; backward: x₁' = x₁c + x₂s, x₂' = x₂c − x₁s.
        let plus = k.add(&ys, &xc);
        let minus = k.sub(&xc, &ys);
        if back {
            k.select(&low, &plus, &minus)
        } else {
            k.select(&low, &minus, &plus)
        }
    }
}

/// Element `row·ld + col` of an operand.
fn at(k: &mut KernelBuilder, o: &Operand, row: &V, col: &V) -> V {
    let ld = k.i64(o.ld as i64);
    let r = k.mul(row, &ld);
    k.add(&r, col)
}

/// Element `d` of a row's head vector as f32, rotated by `pos` when there is RoPE.
#[allow(clippy::too_many_arguments)]
fn load_head(
    k: &mut KernelBuilder,
    p: &V,
    o: &Operand,
    row: &V,
    head: &V,
    hd: u64,
    rope: Option<&Rope>,
    pos: &V,
    d: &V,
) -> V {
    let w = k.i64(hd as i64);
    let col = k.mul(head, &w);
    let base = at(k, o, row, &col);
    let elem = o.elem();
    let load = |k: &mut KernelBuilder, d: &V| {
        let i = k.add(&base, d);
        k.load_f32(p, &i, elem)
    };
    match rope {
        Some(r) => r.rotate(k, pos, d, false, &load),
        None => load(k, d),
    }
}

/// Thread index, lane and warp.
fn lanes(k: &mut KernelBuilder) -> (V, V, V) {
    let tid = k.thread_id('x');
    let c32 = k.i64(32);
    let lane = k.rem(&tid, &c32);
    let warp = k.div(&tid, &c32);
    (tid, lane, warp)
}

/// The elements a lane holds, `d = lane + 32e`, clamped into the head, and whether each is in
/// the head (only when head_dim is ragged).
fn lane_dims(k: &mut KernelBuilder, s: &Spec, lane: &V) -> Vec<(V, Option<V>)> {
    (0..s.per_lane())
        .map(|e| {
            let off = k.i64(32 * e as i64);
            let d = k.add(lane, &off);
            if s.ragged() {
                let hd = k.i64(s.hd as i64);
                let inside = k.cmp(Cmp::Lt, &d, &hd);
                let last = k.i64(s.hd as i64 - 1);
                let dc = k.min(&d, &last);
                (dc, Some(inside))
            } else {
                (d, None)
            }
        })
        .collect()
}

/// `Σ_e a_e·b_e` over the lane's elements (masked elements count zero), summed over the warp.
fn warp_dot(k: &mut KernelBuilder, dims: &[(V, Option<V>)], a: &[V], b: &[V]) -> V {
    let mut acc: Option<V> = None;
    for ((_, inside), (x, y)) in dims.iter().zip(a.iter().zip(b)) {
        let mut p = k.mul(x, y);
        if let Some(m) = inside {
            let z = k.f32(0.0);
            p = k.select(m, &p, &z);
        }
        acc = Some(match acc {
            None => p,
            Some(s) => k.add(&s, &p),
        });
    }
    let partial = acc.expect("a head has at least one element");
    k.warp_sum(&partial)
}

/// Reads row `r` of a shared tile at the lane's elements.
fn tile_row(k: &mut KernelBuilder, t: &Shared, hd: u64, r: i64, dims: &[(V, Option<V>)]) -> Vec<V> {
    dims.iter()
        .map(|(d, _)| {
            let base = k.i64(r * hd as i64);
            let i = k.add(&base, d);
            k.shared_load(t, &i)
        })
        .collect()
}

/// The sizes every sequence kernel derives from its `batch` and `tokens` arguments: the
/// sequence length and, for a grid of `B·⌈T/ROWS⌉` blocks in x, this block's sequence, first
/// row, and whether the block is one of them (the grid is rounded up past them).
struct Rows {
    seq: V,
    b: V,
    first: V,
    live: V,
}

fn block_rows(k: &mut KernelBuilder, batch: &V, tokens: &V, per_block: i64) -> Rows {
    let one = k.i64(1);
    let safe_b = k.max(batch, &one);
    let seq = k.div(tokens, &safe_b);
    let rows_m1 = k.i64(per_block - 1);
    let rows = k.i64(per_block);
    let t = k.add(&seq, &rows_m1);
    let nblk = k.div(&t, &rows);
    let bid = k.block_id('x');
    let safe_n = k.max(&nblk, &one);
    let b = k.div(&bid, &safe_n);
    let blk = k.rem(&bid, &safe_n);
    let first = k.mul(&blk, &rows);
    let total = k.mul(batch, &nblk);
    let live = k.cmp(Cmp::Lt, &bid, &total);
    Rows { seq, b, first, live }
}

/// The grid of [`block_rows`]: `⌈(B·T + (R−1)·B) / R⌉ ≥ B·⌈T/R⌉` blocks (R rows each) by `y`.
fn row_grid(y: u64, per_block: i64) -> [GridDim; 3] {
    [
        GridDim { extent: Extent { bt: 1, b: per_block - 1, c: 0 }, per_block: per_block as u64 },
        GridDim::fixed(y as i64),
        GridDim::fixed(1),
    ]
}

/// The first key query `i` sees.
fn first_key(k: &mut KernelBuilder, s: &Spec, i: &V) -> V {
    match s.window {
        None => k.i64(0),
        Some(w) => {
            let c = k.i64(w as i64 - 1);
            let f = k.sub(i, &c);
            let z = k.i64(0);
            k.max(&f, &z)
        }
    }
}

/// Why an attention runs on the SIMT kernels.
fn simt_reason(s: &Spec) -> String {
    format!(
        "attention with heads of {} runs on the SIMT kernels, several times slower than the tensor-core ones, which take bf16 heads of 64 or 128",
        s.hd
    )
}

/// Forward: `(q, k, v) -> (o, lse)`.
pub(super) fn attention(e: &mut Emit, a: &AttentionAttrs, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let s = Spec::new(a)?;
    let (q, kk, v) = (&ins[0], &ins[1], &ins[2]);
    let (o, lse) = (&outs[0], &outs[1]);
    if flash::usable(&s, &[q, kk, v]) && lse.dtype() == weft_runtime::DType::F32 {
        flash::forward(e, &s, [q, kk, v], o, lse);
        return Ok(());
    }
    e.fallback(simt_reason(&s));
    let (hd, kb) = (s.hd, s.tile());
    let name = format!("attention_{}_{}", s.tag(), sig(&[q, kk, v, o, lse]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let qp = k.ptr("q");
    let kp = k.ptr("k");
    let vp = k.ptr("v");
    let op = k.ptr("o");
    let lp = k.ptr("lse");
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let tile_len = (kb as u64) * hd + 32;
    let kt = k.shared("k_tile", Ty::F32, tile_len);
    let vt = k.shared("v_tile", Ty::F32, tile_len);
    let (tid, lane, warp) = lanes(&mut k);
    let r = block_rows(&mut k, &batch, &tokens, ROWS);
    let h = k.block_id('y');
    k.if_(&r.live, |k| {
        let seq = &r.seq;
        let one = k.i64(1);
        let last = k.sub(seq, &one);
        let i = k.add(&r.first, &warp);
        let valid = k.cmp(Cmp::Lt, &i, seq);
        let ic = k.min(&i, &last);
        let bs = k.mul(&r.b, seq);
        let row = k.add(&bs, &ic);
        let grp = k.i64(s.group() as i64);
        let g = k.div(&h, &grp);
        let dims = lane_dims(k, &s, &lane);
        let c = k.f32(s.scale() * LOG2E);
        let qv: Vec<V> = dims
            .iter()
            .map(|(d, _)| {
                let x = load_head(k, &qp, q, &row, &h, hd, rope.as_ref(), &ic, d);
                k.mul(&x, &c)
            })
            .collect();
        let lo_row = first_key(k, &s, &ic);
        let lo = first_key(k, &s, &r.first);
        let rows = k.i64(ROWS);
        let end = k.add(&r.first, &rows);
        let hi = k.min(&end, seq);
        let ninf = k.f32(f32::NEG_INFINITY);
        let zero = k.f32(0.0);
        let mut init = vec![ninf.clone(), zero.clone()];
        init.extend(std::iter::repeat_n(zero.clone(), dims.len()));
        let fin = k.for_(&lo, &hi, kb, &init, |k, j0, cur| {
            k.barrier();
            let n = k.i64(kb * hd as i64);
            k.for_(&tid, &n, THREADS as i64, &[], |k, idx, _| {
                let w = k.i64(hd as i64);
                let jj = k.div(&idx, &w);
                let d = k.rem(&idx, &w);
                let j = k.add(&j0, &jj);
                let j = k.min(&j, &last);
                let krow = k.add(&bs, &j);
                let kx = load_head(k, &kp, kk, &krow, &g, hd, rope.as_ref(), &j, &d);
                k.shared_store(&kx, &kt, &idx);
                let vx = load_head(k, &vp, v, &krow, &g, hd, None, &j, &d);
                k.shared_store(&vx, &vt, &idx);
                vec![]
            });
            k.barrier();
            // Scores of the tile; lane jj mod 32 keeps score jj.
            let regs = (kb as usize).div_ceil(32);
            let mut sreg = vec![ninf.clone(); regs];
            for jj in 0..kb {
                let kr = tile_row(k, &kt, hd, jj, &dims);
                let dot = warp_dot(k, &dims, &qv, &kr);
                let off = k.i64(jj);
                let j = k.add(&j0, &off);
                let ge = k.cmp(Cmp::Ge, &j, &lo_row);
                let le = k.cmp(Cmp::Le, &j, &ic);
                let vis = k.and(&ge, &le);
                let sc = k.select(&vis, &dot, &ninf);
                let mine = k.i64(jj % 32);
                let is_mine = k.cmp(Cmp::Eq, &lane, &mine);
                let ri = (jj / 32) as usize;
                sreg[ri] = k.select(&is_mine, &sc, &sreg[ri]);
            }
            let mut tmax = sreg[0].clone();
            for x in &sreg[1..] {
                tmax = k.max(&tmax, x);
            }
            let tmax = k.warp_max(&tmax);
            let m_old = &cur[0];
            let m_new = k.max(m_old, &tmax);
            let none = k.cmp(Cmp::Eq, &m_new, &ninf);
            let m_use = k.select(&none, &zero, &m_new);
            let p: Vec<V> = sreg
                .iter()
                .map(|x| {
                    let d = k.sub(x, &m_use);
                    k.exp2(&d)
                })
                .collect();
            let mut psum = p[0].clone();
            for x in &p[1..] {
                psum = k.add(&psum, x);
            }
            let lt = k.warp_sum(&psum);
            let dm = k.sub(m_old, &m_use);
            let corr = k.exp2(&dm);
            let mut acc: Vec<V> = cur[2..].iter().map(|x| k.mul(x, &corr)).collect();
            for jj in 0..kb {
                let pj = k.shuffle_idx(&p[(jj / 32) as usize], (jj % 32) as i32);
                let vr = tile_row(k, &vt, hd, jj, &dims);
                for (a, x) in acc.iter_mut().zip(&vr) {
                    *a = k.fma(&pj, x, a);
                }
            }
            let l = k.fma(&cur[1], &corr, &lt);
            let mut out = vec![m_new, l];
            out.extend(acc);
            out
        });
        k.if_(&valid, |k| {
            let (m, l) = (&fin[0], &fin[1]);
            let w = k.i64(hd as i64);
            let col0 = k.mul(&h, &w);
            for ((d, inside), acc) in dims.iter().zip(&fin[2..]) {
                let y = k.div(acc, l);
                let col = k.add(&col0, d);
                let idx = at(k, o, &row, &col);
                match inside {
                    Some(m) => k.if_(m, |k| k.store(&y, &op, &idx, o.elem())),
                    None => k.store(&y, &op, &idx, o.elem()),
                }
            }
            let z = k.i64(0);
            let first_lane = k.cmp(Cmp::Eq, &lane, &z);
            k.if_(&first_lane, |k| {
                // (m + log2 l)·ln 2 = m·ln 2 + ln l.
                let ln2 = k.f32(LN2);
                let mn = k.mul(m, &ln2);
                let ll = k.ln(l);
                let y = k.add(&mn, &ll);
                let idx = at(k, lse, &row, &h);
                k.store(&y, &lp, &idx, lse.elem());
            });
        });
    });
    let mut args = vec![q.arg(), kk.arg(), v.arg(), o.arg(), lse.arg()];
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, row_grid(s.heads, ROWS), 0, args);
    Ok(())
}

/// Stores the lane's elements of a head vector to row `row`, head `head` of `o` where `valid`,
/// rotated back by the angles of `pos` when there is RoPE (through the warp's part of `stage`,
/// so every warp of the block must get here).
#[allow(clippy::too_many_arguments)]
fn store_head(
    k: &mut KernelBuilder,
    p: &V,
    o: &Operand,
    row: &V,
    head: &V,
    s: &Spec,
    dims: &[(V, Option<V>)],
    vals: &[V],
    rope: Option<&Rope>,
    pos: &V,
    stage: &Shared,
    warp: &V,
    valid: &V,
) {
    let hd = s.hd;
    let w = k.i64(hd as i64);
    let sbase = k.mul(warp, &w);
    if rope.is_some() {
        for ((d, inside), x) in dims.iter().zip(vals) {
            let i = k.add(&sbase, d);
            match inside {
                Some(m) => k.if_(m, |k| k.shared_store(x, stage, &i)),
                None => k.shared_store(x, stage, &i),
            }
        }
        k.barrier();
    }
    k.if_(valid, |k| {
        let col0 = k.mul(head, &w);
        for ((d, inside), x) in dims.iter().zip(vals) {
            let y = match rope {
                Some(r) => {
                    let load = |k: &mut KernelBuilder, d: &V| {
                        let i = k.add(&sbase, d);
                        k.shared_load(stage, &i)
                    };
                    r.rotate(k, pos, d, true, &load)
                }
                None => x.clone(),
            };
            let col = k.add(&col0, d);
            let idx = at(k, o, row, &col);
            match inside {
                Some(m) => k.if_(m, |k| k.store(&y, p, &idx, o.elem())),
                None => k.store(&y, p, &idx, o.elem()),
            }
        }
    });
}

/// Backward: `(q, k, v, o, lse, g) -> (g_q, g_k, g_v)`.
pub(super) fn attention_backward(
    e: &mut Emit,
    a: &AttentionAttrs,
    ins: &[Operand],
    outs: &[Operand],
) -> Result<(), LowerError> {
    let s = Spec::new(a)?;
    let (q, kk, v, o, lse, g) = (&ins[0], &ins[1], &ins[2], &ins[3], &ins[4], &ins[5]);
    let (gq, gk, gv) = (&outs[0], &outs[1], &outs[2]);
    if flash::usable(&s, &[q, kk, v, g]) && lse.dtype() == weft_runtime::DType::F32 {
        flash::backward(e, &s, [q, kk, v, o, lse, g], [gq, gk, gv]);
        return Ok(());
    }
    e.fallback(simt_reason(&s));
    let delta = e.scratch(Extent::per_token(4 * s.heads as i64));
    backward_delta(e, &s, o, g, &delta);
    backward_dq(e, &s, [q, kk, v, lse, g], &delta, gq);
    backward_dkdv(e, &s, [q, kk, v, lse, g], &delta, gk, gv);
    Ok(())
}

/// One warp per (token, slot) of `slots` per token (8 per block, grid [`warp_slot_grid`]): the
/// warp's index `r = token·slots + slot`, `slots` as a value, and whether `r` is a real pair.
fn warp_slots(k: &mut KernelBuilder, warp: &V, tokens: &V, slots: i64) -> (V, V, V) {
    let bid = k.block_id('x');
    let w = k.i64(WARPS);
    let base = k.mul(&bid, &w);
    let r = k.add(&base, warp);
    let sv = k.i64(slots);
    let n = k.mul(tokens, &sv);
    let valid = k.cmp(Cmp::Lt, &r, &n);
    (r, sv, valid)
}

fn warp_slot_grid(slots: i64) -> [GridDim; 3] {
    [GridDim { extent: Extent::per_token(slots), per_block: WARPS as u64 }, GridDim::fixed(1), GridDim::fixed(1)]
}

/// `D[t·heads + h] = Σ_d g[t, h, d]·o[t, h, d]` (f32), one warp per (token, head).
fn backward_delta(e: &mut Emit, s: &Spec, o: &Operand, g: &Operand, delta: &BufferArg) {
    let name = format!("attention_bwd_delta_h{}_d{}_{}", s.heads, s.hd, sig(&[o, g]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let op = k.ptr("o");
    let gp = k.ptr("g");
    let dp = k.ptr("delta");
    let tokens = k.scalar_i64("tokens");
    let (_, lane, warp) = lanes(&mut k);
    let (r, heads, valid) = warp_slots(&mut k, &warp, &tokens, s.heads as i64);
    k.if_(&valid, |k| {
        let tok = k.div(&r, &heads);
        let h = k.rem(&r, &heads);
        let dims = lane_dims(k, s, &lane);
        let zero = k.i64(0);
        let ov: Vec<V> = dims.iter().map(|(d, _)| load_head(k, &op, o, &tok, &h, s.hd, None, &zero, d)).collect();
        let gv: Vec<V> = dims.iter().map(|(d, _)| load_head(k, &gp, g, &tok, &h, s.hd, None, &zero, d)).collect();
        let dot = warp_dot(k, &dims, &gv, &ov);
        let first = k.cmp(Cmp::Eq, &lane, &zero);
        k.if_(&first, |k| k.store(&dot, &dp, &r, Ty::F32));
    });
    let args = vec![o.arg(), g.arg(), Arg::Buffer(delta.clone()), Arg::I64 { value: Extent::per_token(1) }];
    e.launch(k, warp_slot_grid(s.heads as i64), 0, args);
}

/// dQ: one warp per query row, key tiles as in the forward, rotated back at the end.
fn backward_dq(e: &mut Emit, s: &Spec, ins: [&Operand; 5], delta: &BufferArg, gq: &Operand) {
    let [q, kk, v, lse, g] = ins;
    let (hd, kb) = (s.hd, s.tile());
    let name = format!("attention_bwd_dq_{}_{}", s.tag(), sig(&[q, kk, v, lse, g, gq]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let qp = k.ptr("q");
    let kp = k.ptr("k");
    let vp = k.ptr("v");
    let lp = k.ptr("lse");
    let gp = k.ptr("g");
    let dp = k.ptr("delta");
    let gqp = k.ptr("g_q");
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let tile_len = (kb as u64) * hd + 32;
    let kt = k.shared("k_tile", Ty::F32, tile_len);
    let vt = k.shared("v_tile", Ty::F32, tile_len);
    let stage = k.shared("stage", Ty::F32, ROWS as u64 * hd);
    let (tid, lane, warp) = lanes(&mut k);
    let r = block_rows(&mut k, &batch, &tokens, ROWS);
    let h = k.block_id('y');
    k.if_(&r.live, |k| {
        let seq = &r.seq;
        let one = k.i64(1);
        let last = k.sub(seq, &one);
        let i = k.add(&r.first, &warp);
        let valid = k.cmp(Cmp::Lt, &i, seq);
        let ic = k.min(&i, &last);
        let bs = k.mul(&r.b, seq);
        let row = k.add(&bs, &ic);
        let grp = k.i64(s.group() as i64);
        let g_kv = k.div(&h, &grp);
        let dims = lane_dims(k, s, &lane);
        let c = k.f32(s.scale() * LOG2E);
        let qv: Vec<V> = dims
            .iter()
            .map(|(d, _)| {
                let x = load_head(k, &qp, q, &row, &h, hd, rope.as_ref(), &ic, d);
                k.mul(&x, &c)
            })
            .collect();
        let zero_i = k.i64(0);
        let gv: Vec<V> = dims.iter().map(|(d, _)| load_head(k, &gp, g, &row, &h, hd, None, &zero_i, d)).collect();
        let l2e = k.f32(LOG2E);
        let li = at(k, lse, &row, &h);
        let lv = k.load_f32(&lp, &li, lse.elem());
        let lse2 = k.mul(&lv, &l2e);
        let heads = k.i64(s.heads as i64);
        let di = k.mul(&row, &heads);
        let di = k.add(&di, &h);
        let dv = k.load(&dp, &di, Ty::F32);
        let lo_row = first_key(k, s, &ic);
        let lo = first_key(k, s, &r.first);
        let rows = k.i64(ROWS);
        let end = k.add(&r.first, &rows);
        let hi = k.min(&end, seq);
        let zero = k.f32(0.0);
        let init = vec![zero.clone(); dims.len()];
        let acc = k.for_(&lo, &hi, kb, &init, |k, j0, cur| {
            k.barrier();
            let n = k.i64(kb * hd as i64);
            k.for_(&tid, &n, THREADS as i64, &[], |k, idx, _| {
                let w = k.i64(hd as i64);
                let jj = k.div(&idx, &w);
                let d = k.rem(&idx, &w);
                let j = k.add(&j0, &jj);
                let j = k.min(&j, &last);
                let krow = k.add(&bs, &j);
                let kx = load_head(k, &kp, kk, &krow, &g_kv, hd, rope.as_ref(), &j, &d);
                k.shared_store(&kx, &kt, &idx);
                let vx = load_head(k, &vp, v, &krow, &g_kv, hd, None, &j, &d);
                k.shared_store(&vx, &vt, &idx);
                vec![]
            });
            k.barrier();
            let mut acc: Vec<V> = cur.to_vec();
            for jj in 0..kb {
                let kr = tile_row(k, &kt, hd, jj, &dims);
                let vr = tile_row(k, &vt, hd, jj, &dims);
                let sd = warp_dot(k, &dims, &qv, &kr);
                let dpv = warp_dot(k, &dims, &gv, &vr);
                let off = k.i64(jj);
                let j = k.add(&j0, &off);
                let ge = k.cmp(Cmp::Ge, &j, &lo_row);
                let le = k.cmp(Cmp::Le, &j, &ic);
                let vis = k.and(&ge, &le);
                let x = k.sub(&sd, &lse2);
                let pe = k.exp2(&x);
                let p = k.select(&vis, &pe, &zero);
                let t = k.sub(&dpv, &dv);
                let ds = k.mul(&p, &t);
                for (a, x) in acc.iter_mut().zip(&kr) {
                    *a = k.fma(&ds, x, a);
                }
            }
            acc
        });
        let sc = k.f32(s.scale());
        let vals: Vec<V> = acc.iter().map(|x| k.mul(x, &sc)).collect();
        store_head(k, &gqp, gq, &row, &h, s, &dims, &vals, rope.as_ref(), &ic, &stage, &warp, &valid);
    });
    let mut args = vec![q.arg(), kk.arg(), v.arg(), lse.arg(), g.arg(), Arg::Buffer(delta.clone()), gq.arg()];
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, row_grid(s.heads, ROWS), 0, args);
}

/// dK and dV: one warp per key row; for each query head of the kv head's group in order, tiles
/// of the queries that see the block's keys (rotated q, g, and their LSE and D) in shared memory.
fn backward_dkdv(e: &mut Emit, s: &Spec, ins: [&Operand; 5], delta: &BufferArg, gk: &Operand, gvo: &Operand) {
    let [q, kk, v, lse, g] = ins;
    let (hd, qb) = (s.hd, s.tile());
    let name = format!("attention_bwd_dkdv_{}_{}", s.tag(), sig(&[q, kk, v, lse, g, gk, gvo]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let qp = k.ptr("q");
    let kp = k.ptr("k");
    let vp = k.ptr("v");
    let lp = k.ptr("lse");
    let gp = k.ptr("g");
    let dp = k.ptr("delta");
    let gkp = k.ptr("g_k");
    let gvp = k.ptr("g_v");
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let tile_len = (qb as u64) * hd + 32;
    let qt = k.shared("q_tile", Ty::F32, tile_len);
    let gt = k.shared("g_tile", Ty::F32, tile_len);
    let lt = k.shared("lse_tile", Ty::F32, qb as u64);
    let dt = k.shared("delta_tile", Ty::F32, qb as u64);
    let stage = k.shared("stage", Ty::F32, ROWS as u64 * hd);
    let (tid, lane, warp) = lanes(&mut k);
    let r = block_rows(&mut k, &batch, &tokens, ROWS);
    let g_kv = k.block_id('y');
    k.if_(&r.live, |k| {
        let seq = &r.seq;
        let one = k.i64(1);
        let last = k.sub(seq, &one);
        let j = k.add(&r.first, &warp);
        let valid = k.cmp(Cmp::Lt, &j, seq);
        let jc = k.min(&j, &last);
        let bs = k.mul(&r.b, seq);
        let row = k.add(&bs, &jc);
        let dims = lane_dims(k, s, &lane);
        let c = k.f32(s.scale() * LOG2E);
        let kv: Vec<V> = dims
            .iter()
            .map(|(d, _)| {
                let x = load_head(k, &kp, kk, &row, &g_kv, hd, rope.as_ref(), &jc, d);
                k.mul(&x, &c)
            })
            .collect();
        let zero_i = k.i64(0);
        let vv: Vec<V> = dims.iter().map(|(d, _)| load_head(k, &vp, v, &row, &g_kv, hd, None, &zero_i, d)).collect();
        // Queries that see key j: j ≤ i < q_end(j); the block's: from its first key to one past
        // the last query that sees its last key.
        let (q_end, hi) = match s.window {
            None => (seq.clone(), seq.clone()),
            Some(w) => {
                let wv = k.i64(w as i64);
                let e = k.add(&jc, &wv);
                let qe = k.min(&e, seq);
                let lastk = k.i64(ROWS - 1 + w as i64);
                let e = k.add(&r.first, &lastk);
                (qe, k.min(&e, seq))
            }
        };
        let lo = r.first.clone();
        let zero = k.f32(0.0);
        let init = vec![zero.clone(); 2 * dims.len()];
        let l2e = k.f32(LOG2E);
        let grp = k.i64(s.group() as i64);
        let h0 = k.mul(&g_kv, &grp);
        let h1 = k.add(&h0, &grp);
        let n_e = dims.len();
        let fin = k.for_(&h0, &h1, 1, &init, |k, h, cur| {
            k.for_(&lo, &hi, qb, cur, |k, i0, cur| {
                k.barrier();
                let n = k.i64(qb * hd as i64);
                k.for_(&tid, &n, THREADS as i64, &[], |k, idx, _| {
                    let w = k.i64(hd as i64);
                    let ii = k.div(&idx, &w);
                    let d = k.rem(&idx, &w);
                    let i = k.add(&i0, &ii);
                    let i = k.min(&i, &last);
                    let qrow = k.add(&bs, &i);
                    let qx = load_head(k, &qp, q, &qrow, &h, hd, rope.as_ref(), &i, &d);
                    k.shared_store(&qx, &qt, &idx);
                    let gx = load_head(k, &gp, g, &qrow, &h, hd, None, &i, &d);
                    k.shared_store(&gx, &gt, &idx);
                    vec![]
                });
                let nq = k.i64(qb);
                let few = k.cmp(Cmp::Lt, &tid, &nq);
                k.if_(&few, |k| {
                    let i = k.add(&i0, &tid);
                    let i = k.min(&i, &last);
                    let qrow = k.add(&bs, &i);
                    let li = at(k, lse, &qrow, &h);
                    let lv = k.load_f32(&lp, &li, lse.elem());
                    let l2 = k.mul(&lv, &l2e);
                    k.shared_store(&l2, &lt, &tid);
                    let heads = k.i64(s.heads as i64);
                    let di = k.mul(&qrow, &heads);
                    let di = k.add(&di, &h);
                    let dv = k.load(&dp, &di, Ty::F32);
                    k.shared_store(&dv, &dt, &tid);
                });
                k.barrier();
                let (mut dk, mut dv): (Vec<V>, Vec<V>) = (cur[..n_e].to_vec(), cur[n_e..].to_vec());
                for ii in 0..qb {
                    let qr = tile_row(k, &qt, hd, ii, &dims);
                    let gr = tile_row(k, &gt, hd, ii, &dims);
                    let sd = warp_dot(k, &dims, &kv, &qr);
                    let dpv = warp_dot(k, &dims, &vv, &gr);
                    let off = k.i64(ii);
                    let i = k.add(&i0, &off);
                    let ge = k.cmp(Cmp::Ge, &i, &jc);
                    let lt_end = k.cmp(Cmp::Lt, &i, &q_end);
                    let vis = k.and(&ge, &lt_end);
                    let l2 = k.shared_load(&lt, &off);
                    let dd = k.shared_load(&dt, &off);
                    let x = k.sub(&sd, &l2);
                    let pe = k.exp2(&x);
                    let p = k.select(&vis, &pe, &zero);
                    let t = k.sub(&dpv, &dd);
                    let ds = k.mul(&p, &t);
                    for (a, x) in dv.iter_mut().zip(&gr) {
                        *a = k.fma(&p, x, a);
                    }
                    for (a, x) in dk.iter_mut().zip(&qr) {
                        *a = k.fma(&ds, x, a);
                    }
                }
                dk.extend(dv);
                dk
            })
        });
        let sc = k.f32(s.scale());
        let dkv: Vec<V> = fin[..n_e].iter().map(|x| k.mul(x, &sc)).collect();
        store_head(k, &gkp, gk, &row, &g_kv, s, &dims, &dkv, rope.as_ref(), &jc, &stage, &warp, &valid);
        store_head(k, &gvp, gvo, &row, &g_kv, s, &dims, &fin[n_e..], None, &jc, &stage, &warp, &valid);
    });
    let mut args =
        vec![q.arg(), kk.arg(), v.arg(), lse.arg(), g.arg(), Arg::Buffer(delta.clone()), gk.arg(), gvo.arg()];
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, row_grid(s.kv_heads, ROWS), 0, args);
}

/// The global thread index of a 1-D launch and the (sequence, slot, column) of a cache
/// `[B, capacity, kv_width]` it stands for, and whether it is inside `batch` sequences.
fn cache_element(k: &mut KernelBuilder, capacity: u64, kv_width: u64, batch: &V) -> (V, V, V, V) {
    let tid = k.thread_id('x');
    let bid = k.block_id('x');
    let n = k.i64(THREADS as i64);
    let base = k.mul(&bid, &n);
    let idx = k.add(&base, &tid);
    let per = k.i64((capacity * kv_width) as i64);
    let total = k.mul(batch, &per);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    let b = k.div(&idx, &per);
    let rem = k.rem(&idx, &per);
    let kw = k.i64(kv_width as i64);
    let slot = k.div(&rem, &kw);
    let col = k.rem(&rem, &kw);
    (inside, b, slot, col)
}

fn cache_grid(capacity: u64, kv_width: u64) -> [GridDim; 3] {
    [
        GridDim { extent: Extent::per_sequence((capacity * kv_width) as i64), per_block: THREADS as u64 },
        GridDim::fixed(1),
        GridDim::fixed(1),
    ]
}

/// Prefill's caches: `(k, v) -> (k_cache, v_cache)`, `[B, capacity, kv_heads·head_dim]`, the
/// last `capacity` positions (keys rotated), position p in slot p mod capacity, zero elsewhere.
pub(super) fn attention_cache(
    e: &mut Emit,
    a: &AttentionAttrs,
    capacity: u64,
    ins: &[Operand],
    outs: &[Operand],
) -> Result<(), LowerError> {
    let s = Spec::new(a)?;
    if capacity == 0 {
        return Err(LowerError("attention cache: capacity must be at least 1".into()));
    }
    let (kk, v) = (&ins[0], &ins[1]);
    let (kc, vc) = (&outs[0], &outs[1]);
    let (hd, kw) = (s.hd, s.kv_heads * s.hd);
    let name = format!("attention_cache_{}_c{capacity}_{}", s.tag(), sig(&[kk, v, kc, vc]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let kp = k.ptr("k");
    let vp = k.ptr("v");
    let kcp = k.ptr("k_cache");
    let vcp = k.ptr("v_cache");
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let (inside, b, slot, col) = cache_element(&mut k, capacity, kw, &batch);
    k.if_(&inside, |k| {
        let one = k.i64(1);
        let safe_b = k.max(&batch, &one);
        let seq = k.div(&tokens, &safe_b);
        let cap = k.i64(capacity as i64);
        let zero = k.i64(0);
        let f = k.sub(&seq, &cap);
        let first = k.max(&f, &zero);
        // The position of the window [first, first + capacity) that lands in this slot.
        let fm = k.rem(&first, &cap);
        let t = k.sub(&slot, &fm);
        let t = k.add(&t, &cap);
        let t = k.rem(&t, &cap);
        let p = k.add(&first, &t);
        let have = k.cmp(Cmp::Lt, &p, &seq);
        let vals = k.if_else(
            &have,
            |k| {
                let bs = k.mul(&b, &seq);
                let row = k.add(&bs, &p);
                let w = k.i64(hd as i64);
                let head = k.div(&col, &w);
                let d = k.rem(&col, &w);
                let kx = load_head(k, &kp, kk, &row, &head, hd, rope.as_ref(), &p, &d);
                let vx = load_head(k, &vp, v, &row, &head, hd, None, &p, &d);
                vec![kx, vx]
            },
            |k| {
                let z = k.f32(0.0);
                vec![z.clone(), z]
            },
        );
        let bc = k.mul(&b, &cap);
        let crow = k.add(&bc, &slot);
        let ki = at(k, kc, &crow, &col);
        k.store(&vals[0], &kcp, &ki, kc.elem());
        let vi = at(k, vc, &crow, &col);
        k.store(&vals[1], &vcp, &vi, vc.elem());
    });
    let mut args = vec![kk.arg(), v.arg(), kc.arg(), vc.arg()];
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, cache_grid(capacity, kw), 0, args);
    Ok(())
}

/// One token's key (rotated) and value written into slot `pos mod capacity` of each sequence's
/// carried caches, in place: `B × kv_heads·head_dim` elements, whatever the capacity.
fn append_decode_row(e: &mut Emit, s: &Spec, capacity: u64, positions: u64, ptag: &str, ops: [&Operand; 5]) {
    let [kk, v, kc, vc, pos] = ops;
    let (hd, kw) = (s.hd, s.kv_heads * s.hd);
    let name = format!("attention_decode_append_{}_c{capacity}{ptag}_{}", s.tag(), sig(&[kk, v, kc, vc]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let kp = k.ptr("k");
    let vp = k.ptr("v");
    let kcp = k.ptr("k_cache");
    let vcp = k.ptr("v_cache");
    let posp = k.ptr("pos");
    let rope = s.rope_params(&mut k, Some(positions));
    let batch = k.scalar_i64("batch");
    // Element (b, col) of this token's keys and values: a cache of one slot.
    let (inside, b, _, col) = cache_element(&mut k, 1, kw, &batch);
    k.if_(&inside, |k| {
        let p = load_pos(k, &posp, &b);
        let cap = k.i64(capacity as i64);
        let row = CacheRow { seq: &b, token: &b, pos: &p, capacity: &cap, col: &col };
        store_cache_row(k, [&kp, &vp, &kcp, &vcp], [kk, v, kc, vc], hd, rope.as_ref(), row);
    });
    let mut args = vec![kk.arg(), v.arg(), kc.arg(), vc.arg(), pos.arg()];
    args.extend(s.tables(e, positions));
    args.push(Arg::I64 { value: Extent::per_sequence(1) });
    e.launch(k, cache_grid(1, kw), 0, args);
}

/// Where one element of a new key and value goes: column `col` of token row `token` (sequence
/// `seq`, position `pos`), into slot `pos mod capacity` of the sequence's ring.
struct CacheRow<'a> {
    seq: &'a V,
    token: &'a V,
    pos: &'a V,
    capacity: &'a V,
    col: &'a V,
}

/// Writes a [`CacheRow`]'s key element (rotated at its position) and value element into the
/// carried caches (pointers and operands in the order k, v, k_cache, v_cache).
fn store_cache_row(
    k: &mut KernelBuilder,
    [kp, vp, kcp, vcp]: [&V; 4],
    [kk, v, kc, vc]: [&Operand; 4],
    hd: u64,
    rope: Option<&Rope>,
    r: CacheRow,
) {
    let slot = k.rem(r.pos, r.capacity);
    let bc = k.mul(r.seq, r.capacity);
    let crow = k.add(&bc, &slot);
    let hw = k.i64(hd as i64);
    let head = k.div(r.col, &hw);
    let d = k.rem(r.col, &hw);
    let kx = load_head(k, kp, kk, r.token, &head, hd, rope, r.pos, &d);
    let vx = load_head(k, vp, v, r.token, &head, hd, None, r.pos, &d);
    let ki = at(k, kc, &crow, r.col);
    k.store(&kx, kcp, &ki, kc.elem());
    let vi = at(k, vc, &crow, r.col);
    k.store(&vx, vcp, &vi, vc.elem());
}

/// Sequence `b`'s decode position (`pos`, i32 per sequence), at least 0.
fn load_pos(k: &mut KernelBuilder, p: &V, b: &V) -> V {
    let zero = k.i64(0);
    let x = k.load(p, b, Ty::I32);
    let x = k.cast(&x, Ty::I64);
    k.max(&x, &zero)
}

/// One token: `(q, k, v, k_cache, v_cache, pos) -> (o, k_cache', v_cache')`.
pub(super) fn attention_decode(
    e: &mut Emit,
    a: &AttentionAttrs,
    capacity: u64,
    ins: &[Operand],
    outs: &[Operand],
) -> Result<(), LowerError> {
    let s = Spec::new(a)?;
    if capacity == 0 {
        return Err(LowerError("attention decode: capacity must be at least 1".into()));
    }
    let (q, kk, v, kc, vc, pos) = (&ins[0], &ins[1], &ins[2], &ins[3], &ins[4], &ins[5]);
    let (o, kc2, vc2) = (&outs[0], &outs[1], &outs[2]);
    let positions = decode_positions(capacity, e.max_shape().1);
    if e.max_shape().1 > 1 {
        return attention_chunk(e, &s, capacity, positions, &ins[..6], &outs[..3]);
    }
    let hd = s.hd;
    let ptag = if s.rope.is_some() { format!("_r{positions}") } else { String::new() };

    // 1. The caches are generation's carried states, updated in place: only this token's
    // rotated key and its value are written, into its slot (a decode step reads the window
    // once, not twice over as a copy would).
    if !e.write_in_place(&[(kc2, kc), (vc2, vc)]) {
        return Err(LowerError(
            "attention decode: its caches must be the plan's carried states (`state:…` inputs and outputs), read by no other step"
                .into(),
        ));
    }
    let (kc2, vc2) = (kc, vc);
    append_decode_row(e, &s, capacity, positions, &ptag, [kk, v, kc, vc, pos]);

    // 2. Attention over the updated caches, split across the window (flash-decoding): a block
    // per (sequence, group of query heads sharing a kv head, key range) writes its partial
    // softmax, and a combine kernel merges the ranges in a fixed order.
    let sp = DecodeSplit::new(&s, capacity);
    let partial = e.scratch(Extent::per_sequence((4 * s.heads * sp.splits * (hd + 2)) as i64));
    decode_partial(e, &s, &sp, capacity, positions, &ptag, [q, kc2, vc2, pos], None, &partial);
    decode_combine(e, &s, &sp, capacity, [pos, o], false, &partial);
    Ok(())
}

/// How decode attention splits its work: `splits` key ranges of `chunk` keys (of the most a
/// query sees), and `heads` query heads of one GQA group per block, so each block reads its
/// keys and values once for all of them.
struct DecodeSplit {
    splits: u64,
    chunk: u64,
    heads: u64,
}

/// Keys per range the decode split aims at (8 per warp), and the most ranges.
const DECODE_CHUNK: u64 = 64;
const DECODE_MAX_SPLITS: u64 = 128;
/// The most f32 values a lane keeps per head group (the group's queries and accumulators).
const DECODE_LANE_VALUES: u64 = 16;

impl DecodeSplit {
    fn new(s: &Spec, capacity: u64) -> DecodeSplit {
        let keys = s.window.map_or(capacity, |w| w.min(capacity)).max(1);
        let splits = keys.div_ceil(DECODE_CHUNK).clamp(1, DECODE_MAX_SPLITS);
        let chunk = keys.div_ceil(splits);
        let per_lane = s.per_lane() as u64;
        let g = s.group();
        let heads = (1..=g).rev().find(|h| g % h == 0 && h * per_lane <= DECODE_LANE_VALUES).unwrap_or(1);
        DecodeSplit { splits, chunk, heads }
    }

    /// Blocks per kv head.
    fn blocks_per_group(&self, s: &Spec) -> u64 {
        s.group() / self.heads
    }
}

/// The key positions `[start, p]` sequence `b`'s query at `pos[b]` sees in the caches: `start`
/// and the count. The reference requires the cache to hold every position the query sees;
/// past that, the oldest positions it no longer holds are left out rather than read stale.
fn decode_keys(k: &mut KernelBuilder, s: &Spec, capacity: u64, p: &V) -> (V, V) {
    let cap = k.i64(capacity as i64);
    let one = k.i64(1);
    let p1 = k.add(p, &one);
    let lo_w = first_key(k, s, p);
    let lo_c = k.sub(&p1, &cap);
    let start = k.max(&lo_w, &lo_c);
    let n = k.sub(&p1, &start);
    (start, n)
}

/// Element `d` of the partial record of (sequence `b`, head `h`, range `j`): `head_dim`
/// unnormalised outputs, then the range's running max (base 2) and its sum of exponentials.
fn partial_at(k: &mut KernelBuilder, s: &Spec, sp: &DecodeSplit, b: &V, h: &V, j: &V, d: &V) -> V {
    let heads = k.i64(s.heads as i64);
    let splits = k.i64(sp.splits as i64);
    let rec = k.i64(s.hd as i64 + 2);
    let bh = k.mul(b, &heads);
    let bh = k.add(&bh, h);
    let r = k.mul(&bh, &splits);
    let r = k.add(&r, j);
    let r = k.mul(&r, &rec);
    k.add(&r, d)
}

/// The partial softmax of each key range: grid (B, kv_heads·group/heads, splits), 8 warps
/// taking the range's keys in turn, each key and value row read once for the block's heads;
/// warps merged through shared memory into the range's record.
#[allow(clippy::too_many_arguments)]
fn decode_partial(
    e: &mut Emit,
    s: &Spec,
    sp: &DecodeSplit,
    capacity: u64,
    positions: u64,
    ptag: &str,
    ops: [&Operand; 4],
    chunk: Option<[&Operand; 2]>,
    partial: &BufferArg,
) {
    let [q, kc, vc, pos] = ops;
    let (hd, g) = (s.hd, sp.heads as usize);
    let name = match chunk {
        None => format!(
            "attention_decode_{}_c{capacity}{ptag}_s{}x{}g{g}_{}",
            s.tag(),
            sp.splits,
            sp.chunk,
            sig(&[q, kc, vc])
        ),
        Some([kk, v]) => format!(
            "attention_chunk_{}_c{capacity}{ptag}_s{}x{}g{g}_{}",
            s.tag(),
            sp.splits,
            sp.chunk,
            sig(&[q, kc, vc, kk, v])
        ),
    };
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let qp = k.ptr("q");
    let kcp = k.ptr("k_cache");
    let vcp = k.ptr("v_cache");
    let posp = k.ptr("pos");
    let pp_out = k.ptr("partial");
    let chunk_ptrs = chunk.map(|_| (k.ptr("k"), k.ptr("v")));
    let rope = s.rope_params(&mut k, Some(positions));
    let sizes = chunk.map(|_| (k.scalar_i64("batch"), k.scalar_i64("tokens")));
    let gw = WARPS as u64 * sp.heads;
    let sm = k.shared("warp_max", Ty::F32, gw);
    let sl = k.shared("warp_sum", Ty::F32, gw);
    let sacc = k.shared("warp_out", Ty::F32, gw * hd);
    let (tid, lane, warp) = lanes(&mut k);
    // Decode: block x is a sequence. A chunk: block x is a token row (sequence b, token t of
    // it, at position pos[b] + t); `b` below is then the row, `seq` its sequence.
    let b = k.block_id('x');
    let (seq, t) = match &sizes {
        None => (b.clone(), None),
        Some((batch, tokens)) => {
            let t_len = k.div(tokens, batch);
            (k.div(&b, &t_len), Some(k.rem(&b, &t_len)))
        }
    };
    let y = k.block_id('y');
    let j = k.block_id('z');
    let per = k.i64(sp.blocks_per_group(s) as i64);
    let kvh = k.div(&y, &per);
    let sub = k.rem(&y, &per);
    let grp = k.i64(s.group() as i64);
    let gh = k.i64(sp.heads as i64);
    let h0 = k.mul(&kvh, &grp);
    let off = k.mul(&sub, &gh);
    let h0 = k.add(&h0, &off);
    let p0 = load_pos(&mut k, &posp, &seq);
    let p = match &t {
        None => p0.clone(),
        Some(t) => k.add(&p0, t),
    };
    let (start, n) = match &t {
        None => decode_keys(&mut k, s, capacity, &p),
        Some(_) => chunk_keys(&mut k, s, capacity, &p, &p0),
    };
    let chunk_len = k.i64(sp.chunk as i64);
    let lo = k.mul(&j, &chunk_len);
    let live = k.cmp(Cmp::Lt, &lo, &n);
    // Ranges past the query's keys have no record; the combine reads only the live ones.
    k.if_(&live, |k| {
        let hi = k.add(&lo, &chunk_len);
        let hi = k.min(&hi, &n);
        let first = k.add(&lo, &warp);
        let cap = k.i64(capacity as i64);
        let vec_rows = contiguous_lanes(s, kc) && contiguous_lanes(s, vc);
        let dims = if vec_rows { lane_run(k, s, &lane) } else { lane_dims(k, s, &lane) };
        let c = k.f32(s.scale() * LOG2E);
        let heads: Vec<V> = (0..g as i64)
            .map(|i| {
                let i = k.i64(i);
                k.add(&h0, &i)
            })
            .collect();
        let qv: Vec<Vec<V>> = heads
            .iter()
            .map(|h| {
                dims.iter()
                    .map(|(d, _)| {
                        let x = load_head(k, &qp, q, &b, h, hd, rope.as_ref(), &p, d);
                        k.mul(&x, &c)
                    })
                    .collect()
            })
            .collect();
        let ninf = k.f32(f32::NEG_INFINITY);
        let zero = k.f32(0.0);
        // Per head: max, sum, then the lane's accumulators.
        let per_head = 2 + dims.len();
        let mut init = Vec::new();
        for _ in 0..g {
            init.extend([ninf.clone(), zero.clone()]);
            init.extend(std::iter::repeat_n(zero.clone(), dims.len()));
        }
        let fin = k.for_(&first, &hi, WARPS, &init, |k, t, cur| {
            let pp = k.add(&start, &t);
            let ring = |k: &mut KernelBuilder| -> Vec<V> {
                let slot = k.rem(&pp, &cap);
                let bc = k.mul(&seq, &cap);
                let crow = k.add(&bc, &slot);
                let row = |k: &mut KernelBuilder, p: &V, o: &Operand| -> Vec<V> {
                    if vec_rows {
                        load_run(k, p, o, &crow, &kvh, hd, &dims[0].0, dims.len())
                    } else {
                        dims.iter().map(|(d, _)| load_head(k, p, o, &crow, &kvh, hd, None, &pp, d)).collect()
                    }
                };
                let mut kv = row(k, &kcp, kc);
                kv.extend(row(k, &vcp, vc));
                kv
            };
            // A chunk's query sees the ring's keys before the chunk, then the chunk's own
            // (rotated here; the ring takes them after every query has read it).
            let kv = match (chunk, &chunk_ptrs) {
                (Some([kk, v]), Some((kp, vp))) => {
                    let before = k.cmp(Cmp::Lt, &pp, &p0);
                    k.if_else(&before, ring, |k| {
                        let t_len = k.div(&sizes.as_ref().expect("chunk").1, &sizes.as_ref().expect("chunk").0);
                        let r0 = k.mul(&seq, &t_len);
                        let off = k.sub(&pp, &p0);
                        let r = k.add(&r0, &off);
                        let mut kv: Vec<V> = dims
                            .iter()
                            .map(|(d, _)| load_head(k, kp, kk, &r, &kvh, hd, rope.as_ref(), &pp, d))
                            .collect();
                        kv.extend(dims.iter().map(|(d, _)| load_head(k, vp, v, &r, &kvh, hd, None, &pp, d)));
                        kv
                    })
                }
                _ => ring(k),
            };
            let (kr, vr) = kv.split_at(dims.len());
            let mut out = Vec::with_capacity(cur.len());
            for (i, qh) in qv.iter().enumerate() {
                let cur = &cur[i * per_head..(i + 1) * per_head];
                let sc = warp_dot(k, &dims, qh, kr);
                let m_new = k.max(&cur[0], &sc);
                let dm = k.sub(&cur[0], &m_new);
                let corr = k.exp2(&dm);
                let ds = k.sub(&sc, &m_new);
                let pe = k.exp2(&ds);
                let l = k.fma(&cur[1], &corr, &pe);
                out.extend([m_new, l]);
                for (a, vx) in cur[2..].iter().zip(vr) {
                    let a = k.mul(a, &corr);
                    out.push(k.fma(&pe, vx, &a));
                }
            }
            out
        });
        let zero_i = k.i64(0);
        let first_lane = k.cmp(Cmp::Eq, &lane, &zero_i);
        let w = k.i64(hd as i64);
        for i in 0..g {
            let f = &fin[i * per_head..(i + 1) * per_head];
            let gi = k.i64(i as i64);
            let wg = k.mul(&warp, &gh);
            let slot = k.add(&wg, &gi);
            k.if_(&first_lane, |k| {
                k.shared_store(&f[0], &sm, &slot);
                k.shared_store(&f[1], &sl, &slot);
            });
            let sbase = k.mul(&slot, &w);
            for ((d, inside), x) in dims.iter().zip(&f[2..]) {
                let at = k.add(&sbase, d);
                match inside {
                    Some(m) => k.if_(m, |k| k.shared_store(x, &sacc, &at)),
                    None => k.shared_store(x, &sacc, &at),
                }
            }
        }
        k.barrier();
        // Thread (i, d) merges the warps of head i, element d. A warp that saw no key holds
        // −∞ and weighs zero; the range has at least one key, so the max is finite.
        let gd = k.i64((sp.heads * hd) as i64);
        k.for_(&tid, &gd, THREADS as i64, &[], |k, x, _| {
            let i = k.div(&x, &w);
            let d = k.rem(&x, &w);
            let zero_i = k.i64(0);
            let nw = k.i64(WARPS);
            let mx = k.for_(&zero_i, &nw, 1, std::slice::from_ref(&ninf), |k, wi, m| {
                let wg = k.mul(&wi, &gh);
                let slot = k.add(&wg, &i);
                let v = k.shared_load(&sm, &slot);
                vec![k.max(&m[0], &v)]
            });
            let mx = mx[0].clone();
            let tot = k.for_(&zero_i, &nw, 1, &[zero.clone(), zero.clone()], |k, wi, acc| {
                let wg = k.mul(&wi, &gh);
                let slot = k.add(&wg, &i);
                let mw = k.shared_load(&sm, &slot);
                let dm = k.sub(&mw, &mx);
                let f = k.exp2(&dm);
                let lw = k.shared_load(&sl, &slot);
                let l = k.fma(&lw, &f, &acc[0]);
                let sb = k.mul(&slot, &w);
                let at = k.add(&sb, &d);
                let aw = k.shared_load(&sacc, &at);
                let num = k.fma(&aw, &f, &acc[1]);
                vec![l, num]
            });
            let h = k.add(&h0, &i);
            let idx = partial_at(k, s, sp, &b, &h, &j, &d);
            k.store(&tot[1], &pp_out, &idx, Ty::F32);
            let d0 = k.cmp(Cmp::Eq, &d, &zero_i);
            k.if_(&d0, |k| {
                let at = k.add(&idx, &w);
                k.store(&mx, &pp_out, &at, Ty::F32);
                let one = k.i64(1);
                let at = k.add(&at, &one);
                k.store(&tot[0], &pp_out, &at, Ty::F32);
            });
            vec![]
        });
    });
    let mut args = vec![q.arg(), kc.arg(), vc.arg(), pos.arg(), Arg::Buffer(partial.clone())];
    if let Some([kk, v]) = chunk {
        args.extend([kk.arg(), v.arg()]);
    }
    args.extend(s.tables(e, positions));
    let rows = match chunk {
        None => Extent::per_sequence(1),
        Some(_) => {
            args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
            Extent::per_token(1)
        }
    };
    let grid = [
        GridDim { extent: rows, per_block: 1 },
        GridDim::fixed((s.kv_heads * sp.blocks_per_group(s)) as i64),
        GridDim::fixed(sp.splits as i64),
    ];
    e.launch(k, grid, 0, args);
}

/// The output of each (sequence, head): the live ranges' records merged in range order.
#[allow(clippy::too_many_arguments)]
fn decode_combine(
    e: &mut Emit,
    s: &Spec,
    sp: &DecodeSplit,
    capacity: u64,
    ops: [&Operand; 2],
    per_token: bool,
    partial: &BufferArg,
) {
    let [pos, o] = ops;
    let hd = s.hd;
    let kind = if per_token { "chunk" } else { "decode" };
    let name = format!("attention_{kind}_combine_{}_c{capacity}_s{}x{}_{}", s.tag(), sp.splits, sp.chunk, sig(&[o]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let pp = k.ptr("partial");
    let posp = k.ptr("pos");
    let op = k.ptr("o");
    let tid = k.thread_id('x');
    // Block x: a sequence (decode) or a token row of the chunk, as in the partial kernel.
    let b = k.block_id('x');
    let h = k.block_id('y');
    let n = if per_token {
        let batch = k.scalar_i64("batch");
        let tokens = k.scalar_i64("tokens");
        let t_len = k.div(&tokens, &batch);
        let seq = k.div(&b, &t_len);
        let t = k.rem(&b, &t_len);
        let p0 = load_pos(&mut k, &posp, &seq);
        let p = k.add(&p0, &t);
        chunk_keys(&mut k, s, capacity, &p, &p0).1
    } else {
        let p = load_pos(&mut k, &posp, &b);
        decode_keys(&mut k, s, capacity, &p).1
    };
    let chunk = k.i64(sp.chunk as i64);
    let one = k.i64(1);
    let n1 = k.add(&n, &chunk);
    let n1 = k.sub(&n1, &one);
    let live = k.div(&n1, &chunk);
    let w = k.i64(hd as i64);
    let ninf = k.f32(f32::NEG_INFINITY);
    let zero = k.f32(0.0);
    k.for_(&tid, &w, THREADS as i64, &[], |k, d, _| {
        let zero_i = k.i64(0);
        let mx = k.for_(&zero_i, &live, 1, std::slice::from_ref(&ninf), |k, j, m| {
            let at = partial_at(k, s, sp, &b, &h, &j, &w);
            let v = k.load(&pp, &at, Ty::F32);
            vec![k.max(&m[0], &v)]
        });
        let mx = mx[0].clone();
        let tot = k.for_(&zero_i, &live, 1, &[zero.clone(), zero.clone()], |k, j, acc| {
            let base = partial_at(k, s, sp, &b, &h, &j, &zero_i);
            let at = k.add(&base, &w);
            let mj = k.load(&pp, &at, Ty::F32);
            let dm = k.sub(&mj, &mx);
            let f = k.exp2(&dm);
            let one = k.i64(1);
            let at = k.add(&at, &one);
            let lj = k.load(&pp, &at, Ty::F32);
            let l = k.fma(&lj, &f, &acc[0]);
            let at = k.add(&base, &d);
            let aj = k.load(&pp, &at, Ty::F32);
            let num = k.fma(&aj, &f, &acc[1]);
            vec![l, num]
        });
        let y = k.div(&tot[1], &tot[0]);
        let col0 = k.mul(&h, &w);
        let col = k.add(&col0, &d);
        let idx = at(k, o, &b, &col);
        k.store(&y, &op, &idx, o.elem());
        vec![]
    });
    let mut args = vec![Arg::Buffer(partial.clone()), pos.arg(), o.arg()];
    let rows = if per_token {
        args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
        Extent::per_token(1)
    } else {
        Extent::per_sequence(1)
    };
    let grid = [GridDim { extent: rows, per_block: 1 }, GridDim::fixed(s.heads as i64), GridDim::fixed(1)];
    e.launch(k, grid, 0, args);
}

/// The key positions `[start, p]` a chunk's query at `p` sees (the chunk starts at `p0`): the
/// ring holds the `capacity` positions before the chunk, the chunk its own; start and count.
fn chunk_keys(k: &mut KernelBuilder, s: &Spec, capacity: u64, p: &V, p0: &V) -> (V, V) {
    let cap = k.i64(capacity as i64);
    let one = k.i64(1);
    let p1 = k.add(p, &one);
    let lo_w = first_key(k, s, p);
    let lo_c = k.sub(p0, &cap);
    let start = k.max(&lo_w, &lo_c);
    let n = k.sub(&p1, &start);
    (start, n)
}

/// A chunk of T tokens from the carried caches (the `chunk` plan): `(q, k, v, k_cache,
/// v_cache, pos) -> (o, k_cache', v_cache')`, the chunk at positions `pos[b] ..`. Each query
/// attends to the ring's keys before the chunk and to the chunk's own up to itself
/// (flash-decoding per token row); then the chunk's last `capacity` keys (rotated) and values
/// go into the ring, in place, once every query has read it.
fn attention_chunk(
    e: &mut Emit,
    s: &Spec,
    capacity: u64,
    positions: u64,
    ins: &[Operand],
    outs: &[Operand],
) -> Result<(), LowerError> {
    let (q, kk, v, kc, vc, pos) = (&ins[0], &ins[1], &ins[2], &ins[3], &ins[4], &ins[5]);
    let (o, kc2, vc2) = (&outs[0], &outs[1], &outs[2]);
    if !e.write_in_place(&[(kc2, kc), (vc2, vc)]) {
        return Err(LowerError(
            "attention over a chunk: its caches must be the plan's carried states (`state:…` inputs and outputs), read by no other step"
                .into(),
        ));
    }
    let ptag = if s.rope.is_some() { format!("_r{positions}") } else { String::new() };
    let sp = DecodeSplit::new(s, capacity);
    let partial = e.scratch(Extent::per_token((4 * s.heads * sp.splits * (s.hd + 2)) as i64));
    decode_partial(e, s, &sp, capacity, positions, &ptag, [q, kc, vc, pos], Some([kk, v]), &partial);
    decode_combine(e, s, &sp, capacity, [pos, o], true, &partial);
    append_chunk_rows(e, s, capacity, positions, &ptag, [kk, v, kc, vc, pos]);
    Ok(())
}

/// The chunk's keys (rotated) and values written into the ring, slot `(pos + t) mod
/// capacity` for token t; only the last `capacity` tokens, so that no two write one slot.
fn append_chunk_rows(e: &mut Emit, s: &Spec, capacity: u64, positions: u64, ptag: &str, ops: [&Operand; 5]) {
    let [kk, v, kc, vc, pos] = ops;
    let (hd, kw) = (s.hd, s.kv_heads * s.hd);
    let name = format!("attention_chunk_append_{}_c{capacity}{ptag}_{}", s.tag(), sig(&[kk, v, kc, vc]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let kp = k.ptr("k");
    let vp = k.ptr("v");
    let kcp = k.ptr("k_cache");
    let vcp = k.ptr("v_cache");
    let posp = k.ptr("pos");
    let rope = s.rope_params(&mut k, Some(positions));
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    // Element (row, col) of the chunk's keys and values.
    let (inside, r, _, col) = cache_element(&mut k, 1, kw, &tokens);
    let t_len = k.div(&tokens, &batch);
    let b = k.div(&r, &t_len);
    let t = k.rem(&r, &t_len);
    let cap = k.i64(capacity as i64);
    let reach = k.add(&t, &cap);
    let kept = k.cmp(Cmp::Ge, &reach, &t_len);
    let write = k.and(&inside, &kept);
    k.if_(&write, |k| {
        let p0 = load_pos(k, &posp, &b);
        let p = k.add(&p0, &t);
        let row = CacheRow { seq: &b, token: &r, pos: &p, capacity: &cap, col: &col };
        store_cache_row(k, [&kp, &vp, &kcp, &vcp], [kk, v, kc, vc], hd, rope.as_ref(), row);
    });
    let mut args = vec![kk.arg(), v.arg(), kc.arg(), vc.arg(), pos.arg()];
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    let grid = [
        GridDim { extent: Extent::per_token(kw as i64), per_block: THREADS as u64 },
        GridDim::fixed(1),
        GridDim::fixed(1),
    ];
    e.launch(k, grid, 0, args);
}

// ---- the tensor-core forward ----

// ---- tensor-core helpers (see `flash`) ----

/// `max` or `+` over the 4 lanes of a quad (the lanes holding one row of an mma tile).
fn quad(k: &mut KernelBuilder, x: &V, max: bool) -> V {
    let mut acc = x.clone();
    for off in [1, 2] {
        let o = k.shuffle_xor(&acc, off);
        acc = if max { k.max(&acc, &o) } else { k.add(&acc, &o) };
    }
    acc
}
