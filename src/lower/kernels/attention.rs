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
//! - Decode: `attention_decode_cache_*` copies each cache to its new value with the token's
//!   (rotated) key and value in slot pos mod capacity (elementwise, so it is also correct in
//!   place), then `attention_decode_*` (one block of 8 warps per (sequence, head), each warp an
//!   online softmax over a strided share of the positions, merged through shared memory) reads
//!   the updated caches.
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

use super::super::{Emit, LowerError, Operand};
use super::sig;
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

/// Forward: `(q, k, v) -> (o, lse)`.
pub(super) fn attention(e: &mut Emit, a: &AttentionAttrs, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let s = Spec::new(a)?;
    let (q, kk, v) = (&ins[0], &ins[1], &ins[2]);
    let (o, lse) = (&outs[0], &outs[1]);
    if tensor_cores(&s, &[q, kk, v]) {
        attention_tc(e, &s, [q, kk, v], o, lse);
        return Ok(());
    }
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
    if tensor_cores(&s, &[q, kk, v, g]) {
        attention_backward_tc(e, &s, [q, kk, v, o, lse, g], [gq, gk, gv]);
        return Ok(());
    }
    let delta = e.scratch(Extent::per_token(4 * s.heads as i64));
    backward_delta(e, &s, o, g, &delta);
    backward_dq(e, &s, [q, kk, v, lse, g], &delta, gq);
    backward_dkdv(e, &s, [q, kk, v, lse, g], &delta, gk, gv);
    Ok(())
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
    let bid = k.block_id('x');
    let w = k.i64(WARPS);
    let base = k.mul(&bid, &w);
    let r = k.add(&base, &warp);
    let heads = k.i64(s.heads as i64);
    let n = k.mul(&tokens, &heads);
    let valid = k.cmp(Cmp::Lt, &r, &n);
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
    let grid = [
        GridDim { extent: Extent::per_token(s.heads as i64), per_block: WARPS as u64 },
        GridDim::fixed(1),
        GridDim::fixed(1),
    ];
    e.launch(k, grid, 0, args);
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

/// The decode position (`pos`, an i32 scalar), at least 0.
fn load_pos(k: &mut KernelBuilder, p: &V) -> V {
    let zero = k.i64(0);
    let x = k.load(p, &zero, Ty::I32);
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
    let (hd, kw) = (s.hd, s.kv_heads * s.hd);
    let ptag = if s.rope.is_some() { format!("_r{positions}") } else { String::new() };

    // 1. The new caches: the old ones with this token's rotated key and its value in its slot.
    let name = format!("attention_decode_cache_{}_c{capacity}{ptag}_{}", s.tag(), sig(&[kk, v, kc, vc, kc2, vc2]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let kp = k.ptr("k");
    let vp = k.ptr("v");
    let kcp = k.ptr("k_cache");
    let vcp = k.ptr("v_cache");
    let posp = k.ptr("pos");
    let kc2p = k.ptr("k_cache_out");
    let vc2p = k.ptr("v_cache_out");
    let rope = s.rope_params(&mut k, Some(positions));
    let batch = k.scalar_i64("batch");
    let (inside, b, slot, col) = cache_element(&mut k, capacity, kw, &batch);
    k.if_(&inside, |k| {
        let p = load_pos(k, &posp);
        let cap = k.i64(capacity as i64);
        let ns = k.rem(&p, &cap);
        let bc = k.mul(&b, &cap);
        let crow = k.add(&bc, &slot);
        let new = k.cmp(Cmp::Eq, &slot, &ns);
        let vals = k.if_else(
            &new,
            |k| {
                // One token per sequence: row b of k and v.
                let w = k.i64(hd as i64);
                let head = k.div(&col, &w);
                let d = k.rem(&col, &w);
                let kx = load_head(k, &kp, kk, &b, &head, hd, rope.as_ref(), &p, &d);
                let vx = load_head(k, &vp, v, &b, &head, hd, None, &p, &d);
                vec![kx, vx]
            },
            |k| {
                let ki = at(k, kc, &crow, &col);
                let kx = k.load_f32(&kcp, &ki, kc.elem());
                let vi = at(k, vc, &crow, &col);
                let vx = k.load_f32(&vcp, &vi, vc.elem());
                vec![kx, vx]
            },
        );
        let ki = at(k, kc2, &crow, &col);
        k.store(&vals[0], &kc2p, &ki, kc2.elem());
        let vi = at(k, vc2, &crow, &col);
        k.store(&vals[1], &vc2p, &vi, vc2.elem());
    });
    let mut args = vec![kk.arg(), v.arg(), kc.arg(), vc.arg(), pos.arg(), kc2.arg(), vc2.arg()];
    args.extend(s.tables(e, positions));
    args.push(Arg::I64 { value: Extent::per_sequence(1) });
    e.launch(k, cache_grid(capacity, kw), 0, args);

    // 2. Attention over the updated caches: one block per (sequence, head).
    let name = format!("attention_decode_{}_c{capacity}{ptag}_{}", s.tag(), sig(&[q, kc2, vc2, o]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let qp = k.ptr("q");
    let kcp = k.ptr("k_cache");
    let vcp = k.ptr("v_cache");
    let op = k.ptr("o");
    let posp = k.ptr("pos");
    let rope = s.rope_params(&mut k, Some(positions));
    let sm = k.shared("warp_max", Ty::F32, WARPS as u64);
    let sl = k.shared("warp_sum", Ty::F32, WARPS as u64);
    let sacc = k.shared("warp_out", Ty::F32, WARPS as u64 * hd);
    let (tid, lane, warp) = lanes(&mut k);
    let b = k.block_id('x');
    let h = k.block_id('y');
    let p = load_pos(&mut k, &posp);
    let cap = k.i64(capacity as i64);
    let one = k.i64(1);
    let p1 = k.add(&p, &one);
    let lo_w = first_key(&mut k, &s, &p);
    // The reference requires the cache to hold every position the query sees; past that, the
    // oldest positions it no longer holds are left out rather than read stale.
    let lo_c = k.sub(&p1, &cap);
    let start = k.max(&lo_w, &lo_c);
    let n = k.sub(&p1, &start);
    let grp = k.i64(s.group() as i64);
    let g_kv = k.div(&h, &grp);
    let dims = lane_dims(&mut k, &s, &lane);
    let c = k.f32(s.scale() * LOG2E);
    let qv: Vec<V> = dims
        .iter()
        .map(|(d, _)| {
            let x = load_head(&mut k, &qp, q, &b, &h, hd, rope.as_ref(), &p, d);
            k.mul(&x, &c)
        })
        .collect();
    let ninf = k.f32(f32::NEG_INFINITY);
    let zero = k.f32(0.0);
    let mut init = vec![ninf.clone(), zero.clone()];
    init.extend(std::iter::repeat_n(zero.clone(), dims.len()));
    let fin = k.for_(&warp, &n, WARPS, &init, |k, t, cur| {
        let pp = k.add(&start, &t);
        let slot = k.rem(&pp, &cap);
        let bc = k.mul(&b, &cap);
        let crow = k.add(&bc, &slot);
        let kr: Vec<V> = dims.iter().map(|(d, _)| load_head(k, &kcp, kc2, &crow, &g_kv, hd, None, &pp, d)).collect();
        let sc = warp_dot(k, &dims, &qv, &kr);
        let m_new = k.max(&cur[0], &sc);
        let dm = k.sub(&cur[0], &m_new);
        let corr = k.exp2(&dm);
        let ds = k.sub(&sc, &m_new);
        let pe = k.exp2(&ds);
        let l = k.fma(&cur[1], &corr, &pe);
        let mut out = vec![m_new, l];
        for ((d, _), a) in dims.iter().zip(&cur[2..]) {
            let vx = load_head(k, &vcp, vc2, &crow, &g_kv, hd, None, &pp, d);
            let a = k.mul(a, &corr);
            out.push(k.fma(&pe, &vx, &a));
        }
        out
    });
    let zero_i = k.i64(0);
    let first_lane = k.cmp(Cmp::Eq, &lane, &zero_i);
    k.if_(&first_lane, |k| {
        k.shared_store(&fin[0], &sm, &warp);
        k.shared_store(&fin[1], &sl, &warp);
    });
    let w = k.i64(hd as i64);
    let sbase = k.mul(&warp, &w);
    for ((d, inside), x) in dims.iter().zip(&fin[2..]) {
        let i = k.add(&sbase, d);
        match inside {
            Some(m) => k.if_(m, |k| k.shared_store(x, &sacc, &i)),
            None => k.shared_store(x, &sacc, &i),
        }
    }
    k.barrier();
    k.for_(&tid, &w, THREADS as i64, &[], |k, d, _| {
        let zero_i = k.i64(0);
        let nw = k.i64(WARPS);
        let mx = k.for_(&zero_i, &nw, 1, std::slice::from_ref(&ninf), |k, wi, m| {
            let x = k.shared_load(&sm, &wi);
            vec![k.max(&m[0], &x)]
        });
        let mx = mx[0].clone();
        let tot = k.for_(&zero_i, &nw, 1, &[zero.clone(), zero.clone()], |k, wi, acc| {
            let mw = k.shared_load(&sm, &wi);
            let dm = k.sub(&mw, &mx);
            let f = k.exp2(&dm);
            let lw = k.shared_load(&sl, &wi);
            let l = k.fma(&lw, &f, &acc[0]);
            let wbase = k.mul(&wi, &w);
            let i = k.add(&wbase, &d);
            let aw = k.shared_load(&sacc, &i);
            let num = k.fma(&aw, &f, &acc[1]);
            vec![l, num]
        });
        let y = k.div(&tot[1], &tot[0]);
        let col0 = k.mul(&h, &w);
        let col = k.add(&col0, &d);
        let idx = at(k, o, &b, &col);
        k.store(&y, &op, &idx, o.elem());
        vec![]
    });
    let mut args = vec![q.arg(), kc2.arg(), vc2.arg(), o.arg(), pos.arg()];
    args.extend(s.tables(e, positions));
    let grid =
        [GridDim { extent: Extent::per_sequence(1), per_block: 1 }, GridDim::fixed(s.heads as i64), GridDim::fixed(1)];
    e.launch(k, grid, 0, args);
    Ok(())
}

// ---- the tensor-core forward ----

/// Warps per block of the tensor-core forward, and its query rows (16 per warp).
const TC_WARPS: i64 = 4;
const TC_ROWS: i64 = 16 * TC_WARPS;

/// Whether the forward runs on tensor cores: bf16 q, k, v and a head of 64 or 128.
fn tensor_cores(s: &Spec, ins: &[&Operand]) -> bool {
    matches!(s.hd, 64 | 128) && ins.iter().all(|o| o.dtype() == weft_runtime::DType::BF16)
}

/// The f32 bit pattern of `x` as an i32.
fn bits(k: &mut KernelBuilder, x: &V) -> V {
    k.raw(Ty::I32, &format!("arith.bitcast {} : f32 to i32", x.name))
}

/// `x` rounded to bf16, as f32.
fn round_bf16(k: &mut KernelBuilder, x: &V) -> V {
    let b = k.cast(x, Ty::BF16);
    k.cast(&b, Ty::F32)
}

/// `x = hi + lo` to about 16 significant bits, both bf16 values (as f32).
fn split_bf16(k: &mut KernelBuilder, x: &V) -> (V, V) {
    let hi = round_bf16(k, x);
    let r = k.sub(x, &hi);
    (hi.clone(), round_bf16(k, &r))
}

/// Two bf16 values (as f32) packed into an i32, `a` in the low half (an mma fragment register).
fn pack(k: &mut KernelBuilder, a: &V, b: &V) -> V {
    let ba = bits(k, a);
    let bb = bits(k, b);
    let c16 = k.i32(16);
    let lo = k.raw(Ty::I32, &format!("arith.shrui {}, {} : i32", ba.name, c16.name));
    k.or(&bb, &lo)
}

/// `c + a·b` on a 16×8×16 bf16 tile (`mma.sync`), f32 accumulators in `c`.
fn mma(k: &mut KernelBuilder, a: &[V], b: &[V], c: &[V]) -> Vec<V> {
    let n = |v: &[V]| v.iter().map(|x| x.name.clone()).collect::<Vec<_>>().join(", ");
    let op = format!(
        "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, \
         multiplicandAPtxType = #nvvm.mma_type<bf16>, multiplicandBPtxType = #nvvm.mma_type<bf16>, \
         shape = #nvvm.shape<m = 16, n = 8, k = 16>}} : (i32, i32, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
        n(a),
        n(b),
        n(c)
    );
    k.raw_struct(&[Ty::F32; 4], &op)
}

/// `max` or `+` over the 4 lanes of a quad (the lanes holding one row of an mma tile).
fn quad(k: &mut KernelBuilder, x: &V, max: bool) -> V {
    let mut acc = x.clone();
    for off in [1, 2] {
        let o = k.shuffle_xor(&acc, off);
        acc = if max { k.max(&acc, &o) } else { k.add(&acc, &o) };
    }
    acc
}

/// The forward on tensor cores (`mma.sync` m16n8k16, bf16 in, f32 accumulation), FlashAttention-2
/// style: a block is 4 warps × 16 query rows of one sequence and head (grid `B·⌈T/64⌉ × heads`);
/// key tiles (rotated k, packed bf16 pairs) and value tiles (transposed) go through shared
/// memory; each warp computes its 16 × tile scores with mma, the online softmax on the
/// accumulator fragments (a row lives in a quad of lanes), and P·V with mma from the same
/// registers. To stay close to the f32 reference, operands that are not bf16 values are split
/// into hi + lo bf16 parts: rotated q and k (S = q_hi·k_hi + q_hi·k_lo + q_lo·k_hi; without
/// RoPE they are exact and one product suffices) and the probabilities (P·V = P_hi·V + P_lo·V).
fn attention_tc(e: &mut Emit, s: &Spec, ins: [&Operand; 3], o: &Operand, lse: &Operand) {
    let [q, kk, v] = ins;
    let hd = s.hd as i64;
    let kb: i64 = 32;
    let split = s.rope.is_some();
    let name = format!("attention_tc_{}_{}", s.tag(), sig(&[q, kk, v, o, lse]));
    let threads = (32 * TC_WARPS) as u32;
    let mut k = KernelBuilder::new(&name, [threads, 1, 1]);
    let qp = k.ptr("q");
    let kp = k.ptr("k");
    let vp = k.ptr("v");
    let op = k.ptr("o");
    let lp = k.ptr("lse");
    // With RoPE the keys come rotated and split from the prep kernel's scratch words.
    let pre = if split {
        let hi = e.scratch(Extent::per_token(2 * s.kv_heads as i64 * hd));
        let lo = e.scratch(Extent::per_token(2 * s.kv_heads as i64 * hd));
        tc_prep_keys(e, s, kk, &hi, &lo);
        let ptrs = (k.ptr("k_rot_hi"), k.ptr("k_rot_lo"));
        Some((hi, lo, ptrs))
    } else {
        None
    };
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    // Row strides in i32 (bf16 pairs), padded by 4 so a fragment's 8 rows × 4 lanes hit 32 banks.
    let (ks, vs) = (hd / 2 + 4, kb / 2 + 4);
    let kh = k.shared("k_hi", Ty::I32, (kb * ks) as u64);
    let kl = if split { Some(k.shared("k_lo", Ty::I32, (kb * ks) as u64)) } else { None };
    let vt = k.shared("v_t", Ty::I32, (hd * vs) as u64);
    let (tid, lane, warp) = lanes(&mut k);
    let c4 = k.i64(4);
    let gq = k.div(&lane, &c4);
    let tq = k.rem(&lane, &c4);
    let r = block_rows(&mut k, &batch, &tokens, TC_ROWS);
    let h = k.block_id('y');
    k.if_(&r.live, |k| {
        let seq = &r.seq;
        let one = k.i64(1);
        let last = k.sub(seq, &one);
        let bs = k.mul(&r.b, seq);
        let c16 = k.i64(16);
        let wrow = k.mul(&warp, &c16);
        let wrow = k.add(&r.first, &wrow);
        let r0 = k.add(&wrow, &gq);
        let c8 = k.i64(8);
        let r1 = k.add(&r0, &c8);
        let rows = [r0.clone(), r1.clone()];
        let rc: Vec<V> = rows.iter().map(|x| k.min(x, &last)).collect();
        let grp = k.i64(s.group() as i64);
        let g_kv = k.div(&h, &grp);
        let tq2 = k.add(&tq, &tq);
        // Q fragments (A, 16 × 16 per k-step): registers (row gq, cols 2tq..), (gq+8, 2tq..),
        // (gq, 2tq+8..), (gq+8, 2tq+8..).
        let mut qh = Vec::new();
        let mut ql = Vec::new();
        for st in 0..hd / 16 {
            let mut fh = Vec::new();
            let mut fl = Vec::new();
            for (ri, dc) in [(0usize, 0i64), (1, 0), (0, 8), (1, 8)] {
                let off = k.i64(16 * st + dc);
                let d0 = k.add(&tq2, &off);
                let d1 = k.add(&d0, &one);
                let row = k.add(&bs, &rc[ri]);
                let x0 = load_head(k, &qp, q, &row, &h, s.hd, rope.as_ref(), &rc[ri], &d0);
                let x1 = load_head(k, &qp, q, &row, &h, s.hd, rope.as_ref(), &rc[ri], &d1);
                if split {
                    let (h0, l0) = split_bf16(k, &x0);
                    let (h1, l1) = split_bf16(k, &x1);
                    fh.push(pack(k, &h0, &h1));
                    fl.push(pack(k, &l0, &l1));
                } else {
                    let h0 = round_bf16(k, &x0);
                    let h1 = round_bf16(k, &x1);
                    fh.push(pack(k, &h0, &h1));
                }
            }
            qh.push(fh);
            ql.push(fl);
        }
        let row_lo: Vec<V> = rows.iter().map(|x| first_key(k, s, x)).collect();
        let lo = first_key(k, s, &r.first);
        let nrows = k.i64(TC_ROWS);
        let end = k.add(&r.first, &nrows);
        let hi = k.min(&end, seq);
        let ninf = k.f32(f32::NEG_INFINITY);
        let zero = k.f32(0.0);
        let c = k.f32(s.scale() * LOG2E);
        let nd = (hd / 8) as usize;
        let mut init = vec![ninf.clone(), ninf.clone(), zero.clone(), zero.clone()];
        init.extend(std::iter::repeat_n(zero.clone(), 4 * nd));
        // Lane offsets into the tiles: row gq of a fragment, pair tq.
        let kbase = k.i64(ks);
        let kbase = k.mul(&gq, &kbase);
        let kbase = k.add(&kbase, &tq);
        let vbase = k.i64(vs);
        let vbase = k.mul(&gq, &vbase);
        let vbase = k.add(&vbase, &tq);
        let fin = k.for_(&lo, &hi, kb, &init, |k, j0, cur| {
            k.barrier();
            // Keys: rotated, split, bf16 pairs along d.
            let n = k.i64(kb * hd / 2);
            k.for_(&tid, &n, threads as i64, &[], |k, idx, _| {
                let half = k.i64(hd / 2);
                let jj = k.div(&idx, &half);
                let dp = k.rem(&idx, &half);
                let j = k.add(&j0, &jj);
                let j = k.min(&j, &last);
                let row = k.add(&bs, &j);
                let stride = k.i64(ks);
                let at = k.mul(&jj, &stride);
                let at = k.add(&at, &dp);
                match (&kl, &pre) {
                    (Some(kl), Some((_, _, (khp, klp)))) => {
                        // Word (token, kv head, pair) of the prep kernel's [token, kv, hd/2].
                        let nkv = k.i64(s.kv_heads as i64);
                        let i = k.mul(&row, &nkv);
                        let i = k.add(&i, &g_kv);
                        let i = k.mul(&i, &half);
                        let i = k.add(&i, &dp);
                        let ph = k.load(khp, &i, Ty::I32);
                        let pl = k.load(klp, &i, Ty::I32);
                        k.shared_store(&ph, &kh, &at);
                        k.shared_store(&pl, kl, &at);
                    }
                    _ => {
                        let d0 = k.add(&dp, &dp);
                        let one = k.i64(1);
                        let d1 = k.add(&d0, &one);
                        let x0 = load_head(k, &kp, kk, &row, &g_kv, s.hd, None, &j, &d0);
                        let x1 = load_head(k, &kp, kk, &row, &g_kv, s.hd, None, &j, &d1);
                        let h0 = round_bf16(k, &x0);
                        let h1 = round_bf16(k, &x1);
                        let ph = pack(k, &h0, &h1);
                        k.shared_store(&ph, &kh, &at);
                    }
                }
                vec![]
            });
            // Values: transposed, bf16 pairs along the keys.
            let n = k.i64(hd * kb / 2);
            k.for_(&tid, &n, threads as i64, &[], |k, idx, _| {
                let w = k.i64(hd);
                let jp = k.div(&idx, &w);
                let d = k.rem(&idx, &w);
                let j = k.add(&jp, &jp);
                let j = k.add(&j0, &j);
                let one = k.i64(1);
                let ja = k.min(&j, &last);
                let jb = k.add(&j, &one);
                let jb = k.min(&jb, &last);
                let ra = k.add(&bs, &ja);
                let rb = k.add(&bs, &jb);
                let x0 = load_head(k, &vp, v, &ra, &g_kv, s.hd, None, &ja, &d);
                let x1 = load_head(k, &vp, v, &rb, &g_kv, s.hd, None, &jb, &d);
                let pv = pack(k, &x0, &x1);
                let stride = k.i64(vs);
                let at = k.mul(&d, &stride);
                let at = k.add(&at, &jp);
                k.shared_store(&pv, &vt, &at);
                vec![]
            });
            k.barrier();
            // S = Q·Kᵀ, 16 × kb per warp, as kb/8 accumulator tiles.
            let mut sc: Vec<Vec<V>> = Vec::new();
            for nt in 0..kb / 8 {
                let mut acc = vec![zero.clone(); 4];
                for st in 0..hd / 16 {
                    let o0 = k.i64(nt * 8 * ks + st * 8);
                    let i0 = k.add(&kbase, &o0);
                    let o4 = k.i64(4);
                    let i1 = k.add(&i0, &o4);
                    let b = [k.shared_load(&kh, &i0), k.shared_load(&kh, &i1)];
                    acc = mma(k, &qh[st as usize], &b, &acc);
                    if let Some(kl) = &kl {
                        let bl = [k.shared_load(kl, &i0), k.shared_load(kl, &i1)];
                        acc = mma(k, &qh[st as usize], &bl, &acc);
                        acc = mma(k, &ql[st as usize], &b, &acc);
                    }
                }
                // Scale to base 2 and mask: element i is (row i/2, key 8nt + 2tq + i%2).
                let mut t = Vec::new();
                for (i, x) in acc.iter().enumerate() {
                    let off = k.i64(nt * 8 + (i % 2) as i64);
                    let j = k.add(&j0, &off);
                    let j = k.add(&j, &tq2);
                    let ge = k.cmp(Cmp::Ge, &j, &row_lo[i / 2]);
                    let le = k.cmp(Cmp::Le, &j, &rows[i / 2]);
                    let vis = k.and(&ge, &le);
                    let y = k.mul(x, &c);
                    t.push(k.select(&vis, &y, &ninf));
                }
                sc.push(t);
            }
            // Online softmax per row (each row's 16 × kb scores live in one quad).
            let mut m_new = Vec::new();
            let mut corr = Vec::new();
            let mut m_use = Vec::new();
            for ri in 0..2 {
                let mut mx = cur[ri].clone();
                for t in &sc {
                    mx = k.max(&mx, &t[2 * ri]);
                    mx = k.max(&mx, &t[2 * ri + 1]);
                }
                let mx = quad(k, &mx, true);
                let none = k.cmp(Cmp::Eq, &mx, &ninf);
                let mu = k.select(&none, &zero, &mx);
                let dm = k.sub(&cur[ri], &mu);
                corr.push(k.exp2(&dm));
                m_new.push(mx);
                m_use.push(mu);
            }
            let p: Vec<Vec<V>> = sc
                .iter()
                .map(|t| {
                    t.iter()
                        .enumerate()
                        .map(|(i, x)| {
                            let d = k.sub(x, &m_use[i / 2]);
                            k.exp2(&d)
                        })
                        .collect()
                })
                .collect();
            let mut out = m_new.clone();
            for ri in 0..2 {
                let mut l = k.mul(&cur[2 + ri], &corr[ri]);
                for t in &p {
                    l = k.add(&l, &t[2 * ri]);
                    l = k.add(&l, &t[2 * ri + 1]);
                }
                out.push(l);
            }
            // P as A fragments: k-step kk takes score tiles 2kk and 2kk + 1.
            let mut ph = Vec::new();
            let mut pl = Vec::new();
            for kk2 in 0..(kb / 16) as usize {
                let (a, b) = (&p[2 * kk2], &p[2 * kk2 + 1]);
                let mut fh = Vec::new();
                let mut fl = Vec::new();
                for (x0, x1) in [(&a[0], &a[1]), (&a[2], &a[3]), (&b[0], &b[1]), (&b[2], &b[3])] {
                    let (h0, l0) = split_bf16(k, x0);
                    let (h1, l1) = split_bf16(k, x1);
                    fh.push(pack(k, &h0, &h1));
                    fl.push(pack(k, &l0, &l1));
                }
                ph.push(fh);
                pl.push(fl);
            }
            // O = O·corr + P·V, hd/8 accumulator tiles.
            for dt in 0..nd {
                let base = 4 + 4 * dt;
                let mut acc: Vec<V> = (0..4).map(|i| k.mul(&cur[base + i], &corr[i / 2])).collect();
                for kk2 in 0..(kb / 16) as usize {
                    let o0 = k.i64(dt as i64 * 8 * vs + kk2 as i64 * 8);
                    let i0 = k.add(&vbase, &o0);
                    let o4 = k.i64(4);
                    let i1 = k.add(&i0, &o4);
                    let b = [k.shared_load(&vt, &i0), k.shared_load(&vt, &i1)];
                    acc = mma(k, &ph[kk2], &b, &acc);
                    acc = mma(k, &pl[kk2], &b, &acc);
                }
                out.extend(acc);
            }
            out
        });
        // Rows' sums from the quads, then the outputs: accumulator element i of tile dt is
        // (row i/2, column 8dt + 2tq + i%2).
        let l: Vec<V> = (0..2).map(|ri| quad(k, &fin[2 + ri], false)).collect();
        let w = k.i64(hd);
        let col0 = k.mul(&h, &w);
        let col0 = k.add(&col0, &tq2);
        for ri in 0..2 {
            let valid = k.cmp(Cmp::Lt, &rows[ri], seq);
            k.if_(&valid, |k| {
                let row = k.add(&bs, &rows[ri]);
                for dt in 0..nd {
                    for i in [2 * ri, 2 * ri + 1] {
                        let y = k.div(&fin[4 + 4 * dt + i], &l[ri]);
                        let off = k.i64(8 * dt as i64 + (i % 2) as i64);
                        let col = k.add(&col0, &off);
                        let idx = at(k, o, &row, &col);
                        k.store(&y, &op, &idx, o.elem());
                    }
                }
                let z = k.i64(0);
                let first = k.cmp(Cmp::Eq, &tq, &z);
                k.if_(&first, |k| {
                    let ln2 = k.f32(LN2);
                    let mn = k.mul(&fin[ri], &ln2);
                    let ll = k.ln(&l[ri]);
                    let y = k.add(&mn, &ll);
                    let idx = at(k, lse, &row, &h);
                    k.store(&y, &lp, &idx, lse.elem());
                });
            });
        }
    });
    let mut args = vec![q.arg(), kk.arg(), v.arg(), o.arg(), lse.arg()];
    if let Some((hi, lo, _)) = &pre {
        args.extend([Arg::Buffer(hi.clone()), Arg::Buffer(lo.clone())]);
    }
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, row_grid(s.heads, TC_ROWS), 0, args);
}

/// The forward's rotated keys, once per token (`attention_tc_prep_*`): one warp per (token, kv
/// head) writes k rotated, split into bf16 hi + lo and packed in pairs along the head,
/// `[token, kv_heads, head_dim/2]` i32, as the backward's prep does.
fn tc_prep_keys(e: &mut Emit, s: &Spec, kk: &Operand, hi: &BufferArg, lo: &BufferArg) {
    let (kv, hd) = (s.kv_heads as i64, s.hd as i64);
    let name = format!("attention_tc_prep_{}_{}", s.tag(), sig(&[kk]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let kp = k.ptr("k");
    let khp = k.ptr("k_hi");
    let klp = k.ptr("k_lo");
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let (_, lane, warp) = lanes(&mut k);
    let bid = k.block_id('x');
    let w = k.i64(WARPS);
    let base = k.mul(&bid, &w);
    let r = k.add(&base, &warp);
    let slots = k.i64(kv);
    let n = k.mul(&tokens, &slots);
    let valid = k.cmp(Cmp::Lt, &r, &n);
    k.if_(&valid, |k| {
        let tok = k.div(&r, &slots);
        let head = k.rem(&r, &slots);
        let one = k.i64(1);
        let safe_b = k.max(&batch, &one);
        let seq = k.div(&tokens, &safe_b);
        let pos = k.rem(&tok, &seq);
        // Lane l has pairs l + 32e.
        for e in 0..hd / 64 {
            let off = k.i64(32 * e);
            let p = k.add(&lane, &off);
            let d0 = k.add(&p, &p);
            let d1 = k.add(&d0, &one);
            let x0 = load_head(k, &kp, kk, &tok, &head, s.hd, rope.as_ref(), &pos, &d0);
            let x1 = load_head(k, &kp, kk, &tok, &head, s.hd, rope.as_ref(), &pos, &d1);
            let i = k.mul(&tok, &slots);
            let i = k.add(&i, &head);
            let w2 = k.i64(hd / 2);
            let i = k.mul(&i, &w2);
            let i = k.add(&i, &p);
            let (h0, l0) = split_bf16(k, &x0);
            let (h1, l1) = split_bf16(k, &x1);
            let ph = pack(k, &h0, &h1);
            let pl = pack(k, &l0, &l1);
            k.store(&ph, &khp, &i, Ty::I32);
            k.store(&pl, &klp, &i, Ty::I32);
        }
    });
    let mut args = vec![kk.arg(), Arg::Buffer(hi.clone()), Arg::Buffer(lo.clone())];
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    let grid =
        [GridDim { extent: Extent::per_token(kv), per_block: WARPS as u64 }, GridDim::fixed(1), GridDim::fixed(1)];
    e.launch(k, grid, 0, args);
}

// ---- the tensor-core backward ----

/// Rows of a loop tile of the tensor-core backward: the k extent of one mma.
const TCB_TILE: i64 = 16;

/// Warps per block of the tensor-core backward (16 own rows each), so that the block's operands
/// and one loop tile fit the 48 KiB of static shared memory.
fn tcb_warps(hd: u64) -> i64 {
    if hd <= 64 {
        4
    } else {
        2
    }
}

/// Whether an operand is bf16 with its even columns at 4-byte aligned addresses (pairs load as
/// one i32).
fn pairs_aligned(o: &Operand) -> bool {
    o.dtype() == weft_runtime::DType::BF16 && o.ld % 2 == 0 && o.buf.offset % 4 == 0
}

/// Elements `col`, `col + 1` (`col` even) of row `row` of a bf16 operand as one i32, `col` in the
/// low half.
fn load_pair(k: &mut KernelBuilder, p: &V, o: &Operand, row: &V, col: &V, aligned: bool) -> V {
    let i = at(k, o, row, col);
    if aligned {
        let two = k.i64(2);
        let w = k.div(&i, &two);
        k.load(p, &w, Ty::I32)
    } else {
        let x0 = k.load_f32(p, &i, o.elem());
        let one = k.i64(1);
        let i1 = k.add(&i, &one);
        let x1 = k.load_f32(p, &i1, o.elem());
        pack(k, &x0, &x1)
    }
}

fn xor(k: &mut KernelBuilder, a: &V, b: &V) -> V {
    assert_eq!(a.ty, b.ty);
    k.raw(a.ty, &format!("arith.xori {}, {} : {}", a.name, b.name, a.ty.mlir()))
}

/// Word `p` of row `r` of a row-major tile of `w2` words a row, rows padded by 4 words so that an
/// mma fragment's 8 rows × 4 words fall in 32 banks (and its addresses are a lane's base plus a
/// constant).
fn row_word(k: &mut KernelBuilder, r: &V, p: &V, w2: i64) -> V {
    let w = k.i64(w2 + 4);
    let b = k.mul(r, &w);
    k.add(&b, p)
}

/// Word `rp` (a pair of rows) of column `d` of a transposed tile of 16 rows (8 words a column),
/// swizzled (`rp ^ (d & 4)`) so that a fragment's 8 columns × 4 words fall in 32 banks.
fn swz_t(k: &mut KernelBuilder, d: &V, rp: &V) -> V {
    let c4 = k.i64(4);
    let m = k.and(d, &c4);
    let x = xor(k, rp, &m);
    let c8 = k.i64(8);
    let b = k.mul(d, &c8);
    k.add(&b, &x)
}

/// Two words of bf16 pairs of consecutive rows, `a` = (a₀, a₁) and `b` = (b₀, b₁), as the pairs
/// of the columns: (a₀, b₀) and (a₁, b₁).
fn transpose_pairs(k: &mut KernelBuilder, a: &V, b: &V) -> (V, V) {
    let lo = k.i32(0xFFFF);
    let hi = k.i32(-65536);
    let c16 = k.i32(16);
    let a0 = k.and(a, &lo);
    let b0 = k.raw(Ty::I32, &format!("arith.shli {}, {} : i32", b.name, c16.name));
    let t0 = k.or(&a0, &b0);
    let a1 = k.raw(Ty::I32, &format!("arith.shrui {}, {} : i32", a.name, c16.name));
    let b1 = k.and(b, &hi);
    let t1 = k.or(&a1, &b1);
    (t0, t1)
}

/// The scratch buffers of the tensor-core backward: D per (token, query head), and rotated q and
/// k as bf16 pairs along the head, `[token, heads, head_dim/2]` i32 (hi, and lo with RoPE).
struct TcbBufs {
    delta: BufferArg,
    q_hi: BufferArg,
    q_lo: Option<BufferArg>,
    k_hi: BufferArg,
    k_lo: Option<BufferArg>,
}

/// Backward on tensor cores (bf16 q, k, v, g; head_dim 64 or 128), FlashAttention-2 style in three
/// launches, every gradient element with one writer and a fixed summation order:
/// - `attention_tcb_prep_*`: one warp per (token, head slot): D = rowsum(g ⊙ o) for the query
///   heads, and q and k rotated, split into bf16 hi + lo (hi only without RoPE, where they are
///   exact) and packed in pairs, into scratch, so the loops below copy tiles without recomputing
///   angles.
/// - `attention_tcb_dkdv_*`: a block owns 16·W keys of one kv head (W warps, 16 keys each; grid
///   `B·⌈T/16W⌉ × kv_heads`) and loops over the group's query heads and the 16-query tiles that
///   see its keys; per tile and warp, Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (mma), Pᵀ = exp(Sᵀ·scale − lse),
///   dSᵀ = Pᵀ ⊙ (dPᵀ − D), then dV += Pᵀ·dO and dK += dSᵀ·Q from the accumulator registers.
/// - `attention_tcb_dq_*`: a block owns 16·W queries of one head (grid `B·⌈T/16W⌉ × heads`) and
///   loops over the 16-key tiles they see: S, dP, dS as above, dQ += dS·K.
///
/// The block's own operands (K hi/lo and V, or Q hi/lo and dO) stay in shared memory for the whole
/// loop; each tile is copied in twice, row-major (pairs along the head, for the products over the
/// head) and transposed (pairs along the tile's rows, for the products over the tile). Precision
/// as the forward's: S from split q and k (3 products), P and dS split into hi + lo for the
/// products they enter; dK and dQ use the hi part of rotated q (resp. also the lo part of k).
/// dK and dQ are rotated back in registers (a row's elements d and d + head_dim/2 are in one
/// thread).
fn attention_backward_tc(e: &mut Emit, s: &Spec, ins: [&Operand; 6], outs: [&Operand; 3]) {
    let [q, kk, v, o, lse, g] = ins;
    let [gq, gk, gv] = outs;
    let split = s.rope.is_some();
    let (h, kv, hd) = (s.heads as i64, s.kv_heads as i64, s.hd as i64);
    let bufs = TcbBufs {
        delta: e.scratch(Extent::per_token(4 * h)),
        q_hi: e.scratch(Extent::per_token(2 * h * hd)),
        q_lo: if split { Some(e.scratch(Extent::per_token(2 * h * hd))) } else { None },
        k_hi: e.scratch(Extent::per_token(2 * kv * hd)),
        k_lo: if split { Some(e.scratch(Extent::per_token(2 * kv * hd))) } else { None },
    };
    tcb_prep(e, s, [q, kk, o, g], &bufs);
    tcb_main(e, s, true, [v, lse, g], &bufs, &[gk, gv]);
    tcb_main(e, s, false, [v, lse, g], &bufs, &[gq]);
}

/// D, and the rotated q and k words (see [`attention_backward_tc`]).
fn tcb_prep(e: &mut Emit, s: &Spec, ins: [&Operand; 4], bufs: &TcbBufs) {
    let [q, kk, o, g] = ins;
    let split = s.rope.is_some();
    let (heads, kv, hd) = (s.heads as i64, s.kv_heads as i64, s.hd as i64);
    let name = format!("attention_tcb_prep_{}_{}", s.tag(), sig(&[q, kk, o, g]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let qp = k.ptr("q");
    let kp = k.ptr("k");
    let op = k.ptr("o");
    let gp = k.ptr("g");
    let dp = k.ptr("delta");
    let qhp = k.ptr("q_hi");
    let qlp = if split { Some(k.ptr("q_lo")) } else { None };
    let khp = k.ptr("k_hi");
    let klp = if split { Some(k.ptr("k_lo")) } else { None };
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let (_, lane, warp) = lanes(&mut k);
    let bid = k.block_id('x');
    let w = k.i64(WARPS);
    let base = k.mul(&bid, &w);
    let r = k.add(&base, &warp);
    let slots = k.i64(heads + kv);
    let n = k.mul(&tokens, &slots);
    let valid = k.cmp(Cmp::Lt, &r, &n);
    k.if_(&valid, |k| {
        let tok = k.div(&r, &slots);
        let slot = k.rem(&r, &slots);
        let one = k.i64(1);
        let safe_b = k.max(&batch, &one);
        let seq = k.div(&tokens, &safe_b);
        let pos = k.rem(&tok, &seq);
        let hv = k.i64(heads);
        // The words of one head of q or k: lane l has pairs l + 32e.
        let words = |k: &mut KernelBuilder, src: &V, x: &Operand, head: &V, nh: i64, hi: &V, lo: Option<&V>| {
            for e in 0..hd / 64 {
                let off = k.i64(32 * e);
                let p = k.add(&lane, &off);
                let d0 = k.add(&p, &p);
                let one = k.i64(1);
                let d1 = k.add(&d0, &one);
                let x0 = load_head(k, src, x, &tok, head, s.hd, rope.as_ref(), &pos, &d0);
                let x1 = load_head(k, src, x, &tok, head, s.hd, rope.as_ref(), &pos, &d1);
                let nhv = k.i64(nh);
                let i = k.mul(&tok, &nhv);
                let i = k.add(&i, head);
                let w2 = k.i64(hd / 2);
                let i = k.mul(&i, &w2);
                let i = k.add(&i, &p);
                match lo {
                    Some(lo) => {
                        let (h0, l0) = split_bf16(k, &x0);
                        let (h1, l1) = split_bf16(k, &x1);
                        let ph = pack(k, &h0, &h1);
                        let pl = pack(k, &l0, &l1);
                        k.store(&ph, hi, &i, Ty::I32);
                        k.store(&pl, lo, &i, Ty::I32);
                    }
                    None => {
                        let h0 = round_bf16(k, &x0);
                        let h1 = round_bf16(k, &x1);
                        let ph = pack(k, &h0, &h1);
                        k.store(&ph, hi, &i, Ty::I32);
                    }
                }
            }
        };
        let is_q = k.cmp(Cmp::Lt, &slot, &hv);
        k.if_(&is_q, |k| {
            let dims = lane_dims(k, s, &lane);
            let zero = k.i64(0);
            let ov: Vec<V> =
                dims.iter().map(|(d, _)| load_head(k, &op, o, &tok, &slot, s.hd, None, &zero, d)).collect();
            let gv: Vec<V> =
                dims.iter().map(|(d, _)| load_head(k, &gp, g, &tok, &slot, s.hd, None, &zero, d)).collect();
            let dot = warp_dot(k, &dims, &gv, &ov);
            let first = k.cmp(Cmp::Eq, &lane, &zero);
            let di = k.mul(&tok, &hv);
            let di = k.add(&di, &slot);
            k.if_(&first, |k| k.store(&dot, &dp, &di, Ty::F32));
            words(k, &qp, q, &slot, heads, &qhp, qlp.as_ref());
        });
        let is_k = k.cmp(Cmp::Ge, &slot, &hv);
        k.if_(&is_k, |k| {
            let gh = k.sub(&slot, &hv);
            words(k, &kp, kk, &gh, kv, &khp, klp.as_ref());
        });
    });
    let buf = |b: &BufferArg| Arg::Buffer(b.clone());
    let mut args = vec![q.arg(), kk.arg(), o.arg(), g.arg(), buf(&bufs.delta), buf(&bufs.q_hi)];
    args.extend(bufs.q_lo.as_ref().map(buf));
    args.push(buf(&bufs.k_hi));
    args.extend(bufs.k_lo.as_ref().map(buf));
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    let grid = [
        GridDim { extent: Extent::per_token(heads + kv), per_block: WARPS as u64 },
        GridDim::fixed(1),
        GridDim::fixed(1),
    ];
    e.launch(k, grid, 0, args);
}

/// The dK/dV kernel (`dkdv`) or the dQ kernel (see [`attention_backward_tc`]). In the names below
/// the block's own rows are X (rotated, split: k for dK/dV, q for dQ) and Y (v, resp. g), the loop
/// tile's Z (rotated, split: q, resp. k) and W (g, resp. v).
fn tcb_main(e: &mut Emit, s: &Spec, dkdv: bool, ins: [&Operand; 3], bufs: &TcbBufs, outs: &[&Operand]) {
    let [v, lse, g] = ins;
    let split = s.rope.is_some();
    let (heads, kvh, hd) = (s.heads as i64, s.kv_heads as i64, s.hd as i64);
    let (w2, nst, nd) = (hd / 2, hd / 16, (hd / 8) as usize);
    let nw = tcb_warps(s.hd);
    let own = TCB_TILE * nw;
    let threads = (32 * nw) as u32;
    let aligned = pairs_aligned(v) && pairs_aligned(g);
    let mut sig_ops = vec![v, lse, g];
    sig_ops.extend(outs);
    let name = format!(
        "attention_tcb_{}_{}_{}{}",
        if dkdv { "dkdv" } else { "dq" },
        s.tag(),
        sig(&sig_ops),
        if aligned { "" } else { "_u" }
    );
    let mut k = KernelBuilder::new(&name, [threads, 1, 1]);
    let (x_name, z_name) = if dkdv { ("k", "q") } else { ("q", "k") };
    let xh = k.ptr(&format!("{x_name}_hi"));
    let xl = if split { Some(k.ptr(&format!("{x_name}_lo"))) } else { None };
    let zh = k.ptr(&format!("{z_name}_hi"));
    let zl = if split { Some(k.ptr(&format!("{z_name}_lo"))) } else { None };
    let vp = k.ptr("v");
    let gp = k.ptr("g");
    let lp = k.ptr("lse");
    let dp = k.ptr("delta");
    let outp: Vec<V> = if dkdv { vec![k.ptr("g_k"), k.ptr("g_v")] } else { vec![k.ptr("g_q")] };
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    // (operand pointer, operand) of Y and W; heads of the X and Z scratch.
    let (yp, yo, wp, wo) = if dkdv { (&vp, v, &gp, g) } else { (&gp, g, &vp, v) };
    let (x_heads, z_heads) = if dkdv { (kvh, heads) } else { (heads, kvh) };
    let fx_hi = k.shared("x_hi", Ty::I32, (own * (w2 + 4)) as u64);
    let fx_lo = if split { Some(k.shared("x_lo", Ty::I32, (own * (w2 + 4)) as u64)) } else { None };
    let fy = k.shared("y", Ty::I32, (own * (w2 + 4)) as u64);
    let tz_hi = k.shared("z_hi", Ty::I32, (TCB_TILE * (w2 + 4)) as u64);
    let tz_lo = if split { Some(k.shared("z_lo", Ty::I32, (TCB_TILE * (w2 + 4)) as u64)) } else { None };
    let tw = k.shared("w", Ty::I32, (TCB_TILE * (w2 + 4)) as u64);
    let tzt_hi = k.shared("z_t_hi", Ty::I32, (hd * 8) as u64);
    // The second transposed tile: W for dV, or the lo part of Z for dQ.
    let t2 = if dkdv || split {
        Some(k.shared(if dkdv { "w_t" } else { "z_t_lo" }, Ty::I32, (hd * 8) as u64))
    } else {
        None
    };
    let lse_tile = if dkdv { Some(k.shared("lse_tile", Ty::F32, TCB_TILE as u64)) } else { None };
    let d_tile = if dkdv { Some(k.shared("delta_tile", Ty::F32, TCB_TILE as u64)) } else { None };
    let (tid, lane, warp) = lanes(&mut k);
    let c4 = k.i64(4);
    let gq4 = k.div(&lane, &c4);
    let tq = k.rem(&lane, &c4);
    let r = block_rows(&mut k, &batch, &tokens, own);
    let hb = k.block_id('y');
    k.if_(&r.live, |k| {
        let seq = &r.seq;
        let one = k.i64(1);
        let last = k.sub(seq, &one);
        let bs = k.mul(&r.b, seq);
        let grp = k.i64(s.group() as i64);
        let g_kv = if dkdv { hb.clone() } else { k.div(&hb, &grp) };
        let hdv = k.i64(hd);
        let w2v = k.i64(w2);
        // The block's own operands.
        let x_head = hb.clone();
        let y_col = k.mul(&hb, &hdv);
        // Thread t copies word t mod w2 of rows t/w2 + (threads/w2)·u, in batches of 8 rows:
        // the batch's global loads first, then its shared stores.
        assert!(threads as i64 % w2 == 0 && (8 * w2) % threads as i64 == 0);
        let p = k.rem(&tid, &w2v);
        let rr0 = k.div(&tid, &w2v);
        let yc = k.add(&p, &p);
        let yc = k.add(&y_col, &yc);
        let rstep = threads as i64 / w2;
        let per = own / rstep;
        for batch in 0..(per + 7) / 8 {
            let mut loaded = Vec::new();
            for u in batch * 8..(batch * 8 + 8).min(per) {
                let off = k.i64(rstep * u);
                let rr = k.add(&rr0, &off);
                let o = k.add(&r.first, &rr);
                let oc = k.min(&o, &last);
                let row = k.add(&bs, &oc);
                let nh = k.i64(x_heads);
                let xi = k.mul(&row, &nh);
                let xi = k.add(&xi, &x_head);
                let xi = k.mul(&xi, &w2v);
                let xi = k.add(&xi, &p);
                let x = k.load(&xh, &xi, Ty::I32);
                let xlo = xl.as_ref().map(|xl| k.load(xl, &xi, Ty::I32));
                let y = load_pair(k, yp, yo, &row, &yc, aligned);
                loaded.push((rr, x, xlo, y));
            }
            for (rr, x, xlo, y) in &loaded {
                let at = row_word(k, rr, &p, w2);
                k.shared_store(x, &fx_hi, &at);
                if let (Some(xlo), Some(fx_lo)) = (xlo, &fx_lo) {
                    k.shared_store(xlo, fx_lo, &at);
                }
                k.shared_store(y, &fy, &at);
            }
        }
        // This thread's own rows (fragment rows gq and gq + 8 of its warp), absolute in the
        // sequence, and for dQ their LSE (base 2) and D.
        let c16 = k.i64(16);
        let wrow = k.mul(&warp, &c16);
        let lrow0 = k.add(&wrow, &gq4);
        let c8 = k.i64(8);
        let lrow1 = k.add(&lrow0, &c8);
        let own_rows: Vec<V> = [&lrow0, &lrow1].iter().map(|lr| k.add(&r.first, lr)).collect();
        let l2e = k.f32(LOG2E);
        let row_stats: Vec<(V, V)> = if dkdv {
            vec![]
        } else {
            own_rows
                .iter()
                .map(|i| {
                    let ic = k.min(i, &last);
                    let row = k.add(&bs, &ic);
                    let li = at(k, lse, &row, &hb);
                    let lv = k.load_f32(&lp, &li, lse.elem());
                    let l2 = k.mul(&lv, &l2e);
                    let hv = k.i64(heads);
                    let di = k.mul(&row, &hv);
                    let di = k.add(&di, &hb);
                    let dv = k.load(&dp, &di, Ty::F32);
                    (l2, dv)
                })
                .collect()
        };
        // The loop's range of other rows (queries for dK/dV, keys for dQ), from a multiple of 16.
        let (lo, hi) = if dkdv {
            let hi = match s.window {
                None => seq.clone(),
                Some(w) => {
                    let ext = k.i64(own - 1 + w as i64);
                    let e = k.add(&r.first, &ext);
                    k.min(&e, seq)
                }
            };
            (r.first.clone(), hi)
        } else {
            let f = first_key(k, s, &r.first);
            let fm = k.rem(&f, &c16);
            let lo = k.sub(&f, &fm);
            let ownv = k.i64(own);
            let e = k.add(&r.first, &ownv);
            (lo, k.min(&e, seq))
        };
        // Lane parts of the fragment addresses: word tq of A rows gq, gq + 8 of the warp's rows
        // and of B row gq of a row-major tile; column gq of a transposed tile, words tq and
        // tq + 4 (swizzled).
        let arow0 = row_word(k, &lrow0, &tq, w2);
        let arow1 = row_word(k, &lrow1, &tq, w2);
        let brow = row_word(k, &gq4, &tq, w2);
        let c8g = k.mul(&gq4, &c8);
        let g4 = k.and(&gq4, &c4);
        let tx = xor(k, &tq, &g4);
        let tb0 = k.add(&c8g, &tx);
        let tx1 = xor(k, &tx, &c4);
        let tb1 = k.add(&c8g, &tx1);
        let c = k.f32(s.scale() * LOG2E);
        let zero = k.f32(0.0);
        let n_acc = if dkdv { 2 * 4 * nd } else { 4 * nd };
        let init = vec![zero.clone(); n_acc];
        // One tile of other rows from t0, for query head `h` (kv head `g_kv`).
        let tile = |k: &mut KernelBuilder, h: &V, t0: &V, cur: &[V]| -> Vec<V> {
            let z_head = if dkdv { h.clone() } else { g_kv.clone() };
            let w_head = if dkdv { h.clone() } else { g_kv.clone() };
            k.barrier();
            // Thread t copies the pair of rows 2·(t mod 8), + 1 at words t/8 + (threads/8)·u:
            // every global load of the tile first, then the shared stores.
            let c8 = k.i64(8);
            let rp = k.rem(&tid, &c8);
            let p0 = k.div(&tid, &c8);
            let r0 = k.add(&rp, &rp);
            let one = k.i64(1);
            let r1 = k.add(&r0, &one);
            let rows: Vec<V> = [&r0, &r1]
                .iter()
                .map(|rr| {
                    let o = k.add(t0, rr);
                    let oc = k.min(&o, &last);
                    k.add(&bs, &oc)
                })
                .collect();
            let zbase: Vec<V> = rows
                .iter()
                .map(|row| {
                    let nh = k.i64(z_heads);
                    let i = k.mul(row, &nh);
                    let i = k.add(&i, &z_head);
                    let i = k.mul(&i, &w2v);
                    k.add(&i, &p0)
                })
                .collect();
            let hdv = k.i64(hd);
            let wc0 = k.mul(&w_head, &hdv);
            let pc = k.add(&p0, &p0);
            let wc0 = k.add(&wc0, &pc);
            // The LSE and D of the tile's rows (dK/dV), loaded by every thread, stored by 16.
            let stats = if dkdv {
                let c16 = k.i64(TCB_TILE);
                let ti = k.rem(&tid, &c16);
                let i = k.add(t0, &ti);
                let i = k.min(&i, &last);
                let row = k.add(&bs, &i);
                let li = at(k, lse, &row, h);
                let lv = k.load_f32(&lp, &li, lse.elem());
                let hv = k.i64(heads);
                let di = k.mul(&row, &hv);
                let di = k.add(&di, h);
                let dv = k.load(&dp, &di, Ty::F32);
                Some((lv, dv))
            } else {
                None
            };
            let per = 8 * w2 / threads as i64;
            let step = threads as i64 / 8;
            let mut loaded = Vec::new();
            for u in 0..per {
                let off = k.i64(step * u);
                let zi: Vec<V> = zbase.iter().map(|b| k.add(b, &off)).collect();
                let zhw: Vec<V> = zi.iter().map(|i| k.load(&zh, i, Ty::I32)).collect();
                let zlw: Vec<V> = match &zl {
                    Some(zl) => zi.iter().map(|i| k.load(zl, i, Ty::I32)).collect(),
                    None => vec![],
                };
                let off2 = k.i64(2 * step * u);
                let wc = k.add(&wc0, &off2);
                let ww: Vec<V> = rows.iter().map(|row| load_pair(k, wp, wo, row, &wc, aligned)).collect();
                loaded.push((zhw, zlw, ww));
            }
            for (u, (zhw, zlw, ww)) in loaded.iter().enumerate() {
                let off = k.i64(step * u as i64);
                let p = k.add(&p0, &off);
                let ats: Vec<V> = [&r0, &r1].iter().map(|rr| row_word(k, rr, &p, w2)).collect();
                for i in 0..2 {
                    k.shared_store(&zhw[i], &tz_hi, &ats[i]);
                    if let Some(tz_lo) = &tz_lo {
                        k.shared_store(&zlw[i], tz_lo, &ats[i]);
                    }
                    k.shared_store(&ww[i], &tw, &ats[i]);
                }
                let d0 = k.add(&p, &p);
                let d1 = k.add(&d0, &one);
                let t_at0 = swz_t(k, &d0, &rp);
                let t_at1 = swz_t(k, &d1, &rp);
                let (a, b) = transpose_pairs(k, &zhw[0], &zhw[1]);
                k.shared_store(&a, &tzt_hi, &t_at0);
                k.shared_store(&b, &tzt_hi, &t_at1);
                if let Some(t2) = &t2 {
                    let (a, b) =
                        if dkdv { transpose_pairs(k, &ww[0], &ww[1]) } else { transpose_pairs(k, &zlw[0], &zlw[1]) };
                    k.shared_store(&a, t2, &t_at0);
                    k.shared_store(&b, t2, &t_at1);
                }
            }
            if let (Some(lt), Some(dt), Some((lv, dv))) = (&lse_tile, &d_tile, &stats) {
                let nt = k.i64(TCB_TILE);
                let few = k.cmp(Cmp::Lt, &tid, &nt);
                k.if_(&few, |k| {
                    let l2 = k.mul(lv, &l2e);
                    k.shared_store(&l2, lt, &tid);
                    k.shared_store(dv, dt, &tid);
                });
            }
            k.barrier();
            // S = X·Zᵀ and dP = Y·Wᵀ: 16 own rows × 16 tile rows, two accumulator tiles each.
            let mut sacc = vec![vec![zero.clone(); 4]; 2];
            let mut pacc = vec![vec![zero.clone(); 4]; 2];
            for st in 0..nst {
                let x0 = k.i64(8 * st);
                let x1 = k.i64(8 * st + 4);
                let afrag = |k: &mut KernelBuilder, t: &Shared| -> Vec<V> {
                    [(&arow0, &x0), (&arow1, &x0), (&arow0, &x1), (&arow1, &x1)]
                        .iter()
                        .map(|(r, x)| {
                            let i = k.add(r, x);
                            k.shared_load(t, &i)
                        })
                        .collect()
                };
                let a_hi = afrag(k, &fx_hi);
                let a_lo = fx_lo.as_ref().map(|t| afrag(k, t));
                let a_y = afrag(k, &fy);
                for nt in 0..2 {
                    let ro = k.i64(8 * nt * (w2 + 4));
                    let rb = k.add(&brow, &ro);
                    let bfrag = |k: &mut KernelBuilder, t: &Shared| -> Vec<V> {
                        [&x0, &x1]
                            .iter()
                            .map(|x| {
                                let i = k.add(&rb, x);
                                k.shared_load(t, &i)
                            })
                            .collect()
                    };
                    let b_hi = bfrag(k, &tz_hi);
                    sacc[nt as usize] = mma(k, &a_hi, &b_hi, &sacc[nt as usize]);
                    if let (Some(a_lo), Some(tz_lo)) = (&a_lo, &tz_lo) {
                        let b_lo = bfrag(k, tz_lo);
                        sacc[nt as usize] = mma(k, &a_hi, &b_lo, &sacc[nt as usize]);
                        sacc[nt as usize] = mma(k, a_lo, &b_hi, &sacc[nt as usize]);
                    }
                    let b_w = bfrag(k, &tw);
                    pacc[nt as usize] = mma(k, &a_y, &b_w, &pacc[nt as usize]);
                }
            }
            // P and dS; element i of tile nt is (own row gq + 8⌊i/2⌋, tile row 8nt + 2tq + i%2).
            let tq2 = k.add(&tq, &tq);
            let mut pm: Vec<Vec<V>> = Vec::new();
            let mut dsm: Vec<Vec<V>> = Vec::new();
            for nt in 0..2usize {
                let mut pt = Vec::new();
                let mut dst = Vec::new();
                for i in 0..4usize {
                    let off = k.i64(8 * nt as i64 + (i % 2) as i64);
                    let col = k.add(&tq2, &off);
                    let other = k.add(t0, &col);
                    let mine = &own_rows[i / 2];
                    let (qi, kj) = if dkdv { (&other, mine) } else { (mine, &other) };
                    let le = k.cmp(Cmp::Le, kj, qi);
                    let inside = k.cmp(Cmp::Lt, qi, seq);
                    let mut vis = k.and(&le, &inside);
                    if let Some(w) = s.window {
                        let dq = k.sub(qi, kj);
                        let wv = k.i64(w as i64);
                        let near = k.cmp(Cmp::Lt, &dq, &wv);
                        vis = k.and(&vis, &near);
                    }
                    let (l2, dd) = match (&lse_tile, &d_tile) {
                        (Some(lt), Some(dt)) => (k.shared_load(lt, &col), k.shared_load(dt, &col)),
                        _ => row_stats[i / 2].clone(),
                    };
                    let x = k.mul(&sacc[nt][i], &c);
                    let x = k.sub(&x, &l2);
                    let pe = k.exp2(&x);
                    let p = k.select(&vis, &pe, &zero);
                    let t = k.sub(&pacc[nt][i], &dd);
                    dst.push(k.mul(&p, &t));
                    pt.push(p);
                }
                pm.push(pt);
                dsm.push(dst);
            }
            // As A fragments over the 16 tile rows, hi and lo parts.
            let frags = |k: &mut KernelBuilder, m: &[Vec<V>]| -> (Vec<V>, Vec<V>) {
                let mut fh = Vec::new();
                let mut fl = Vec::new();
                for (x0, x1) in [(&m[0][0], &m[0][1]), (&m[0][2], &m[0][3]), (&m[1][0], &m[1][1]), (&m[1][2], &m[1][3])]
                {
                    let (h0, l0) = split_bf16(k, x0);
                    let (h1, l1) = split_bf16(k, x1);
                    fh.push(pack(k, &h0, &h1));
                    fl.push(pack(k, &l0, &l1));
                }
                (fh, fl)
            };
            let (dsh, dsl) = frags(k, &dsm);
            let pf = if dkdv { Some(frags(k, &pm)) } else { None };
            let mut out: Vec<V> = cur.to_vec();
            for dt in 0..nd {
                let o0 = k.i64(64 * dt as i64);
                let i0 = k.add(&tb0, &o0);
                let i1 = k.add(&tb1, &o0);
                let b = [k.shared_load(&tzt_hi, &i0), k.shared_load(&tzt_hi, &i1)];
                let mut acc: Vec<V> = out[4 * dt..4 * dt + 4].to_vec();
                acc = mma(k, &dsh, &b, &acc);
                acc = mma(k, &dsl, &b, &acc);
                if !dkdv {
                    if let Some(t2) = &t2 {
                        let bl = [k.shared_load(t2, &i0), k.shared_load(t2, &i1)];
                        acc = mma(k, &dsh, &bl, &acc);
                    }
                }
                out[4 * dt..4 * dt + 4].clone_from_slice(&acc);
                if let (Some((ph, pl)), Some(t2)) = (&pf, &t2) {
                    let b = [k.shared_load(t2, &i0), k.shared_load(t2, &i1)];
                    let base = 4 * nd + 4 * dt;
                    let mut acc: Vec<V> = out[base..base + 4].to_vec();
                    acc = mma(k, ph, &b, &acc);
                    acc = mma(k, pl, &b, &acc);
                    out[base..base + 4].clone_from_slice(&acc);
                }
            }
            out
        };
        let fin = if dkdv {
            let h0 = k.mul(&g_kv, &grp);
            let h1 = k.add(&h0, &grp);
            k.for_(&h0, &h1, 1, &init, |k, h, cur| k.for_(&lo, &hi, TCB_TILE, cur, |k, t0, cur| tile(k, &h, &t0, cur)))
        } else {
            k.for_(&lo, &hi, TCB_TILE, &init, |k, t0, cur| tile(k, &hb, &t0, cur))
        };
        // Outputs: accumulator element i of tile dt is (own row gq + 8⌊i/2⌋, column
        // 8dt + 2tq + i%2); dK (dQ) scaled and rotated back by the row's position.
        let out_head = if dkdv { g_kv.clone() } else { hb.clone() };
        let col0 = k.mul(&out_head, &hdv);
        let tq2 = k.add(&tq, &tq);
        let col0 = k.add(&col0, &tq2);
        let sc = k.f32(s.scale());
        let half = nd / 2;
        for (ri, own_row) in own_rows.iter().enumerate() {
            let valid = k.cmp(Cmp::Lt, own_row, seq);
            k.if_(&valid, |k| {
                let row = k.add(&bs, own_row);
                let gop = outs[0];
                for dt in 0..nd {
                    for i in [2 * ri, 2 * ri + 1] {
                        let y = match &rope {
                            None => k.mul(&fin[4 * dt + i], &sc),
                            Some(rp) => {
                                // Pair (d, d + head_dim/2) sits in tiles dt and dt + nd/2.
                                let (dlo, dhi) = if dt < half { (dt, dt + half) } else { (dt - half, dt) };
                                let x1 = k.mul(&fin[4 * dlo + i], &sc);
                                let x2 = k.mul(&fin[4 * dhi + i], &sc);
                                let off = k.i64(8 * dlo as i64 + (i % 2) as i64);
                                let ii = k.add(&tq2, &off);
                                let (cs, sn) = rp.angles(k, own_row, &ii);
                                if dt < half {
                                    let a = k.mul(&x1, &cs);
                                    let b = k.mul(&x2, &sn);
                                    k.add(&a, &b)
                                } else {
                                    let a = k.mul(&x2, &cs);
                                    let b = k.mul(&x1, &sn);
                                    k.sub(&a, &b)
                                }
                            }
                        };
                        let off = k.i64(8 * dt as i64 + (i % 2) as i64);
                        let col = k.add(&col0, &off);
                        let idx = at(k, gop, &row, &col);
                        k.store(&y, &outp[0], &idx, gop.elem());
                        if dkdv {
                            let gvo = outs[1];
                            let idx = at(k, gvo, &row, &col);
                            k.store(&fin[4 * nd + 4 * dt + i], &outp[1], &idx, gvo.elem());
                        }
                    }
                }
            });
        }
    });
    let buf = |b: &BufferArg| Arg::Buffer(b.clone());
    let (x_hi, x_lo, z_hi, z_lo) = if dkdv {
        (&bufs.k_hi, &bufs.k_lo, &bufs.q_hi, &bufs.q_lo)
    } else {
        (&bufs.q_hi, &bufs.q_lo, &bufs.k_hi, &bufs.k_lo)
    };
    let mut args = vec![buf(x_hi)];
    args.extend(x_lo.as_ref().map(buf));
    args.push(buf(z_hi));
    args.extend(z_lo.as_ref().map(buf));
    args.extend([v.arg(), g.arg(), lse.arg(), buf(&bufs.delta)]);
    args.extend(outs.iter().map(|o| o.arg()));
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    let y = if dkdv { s.kv_heads } else { s.heads };
    e.launch(k, row_grid(y, own), 0, args);
}
