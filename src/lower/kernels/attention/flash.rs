//! Attention on tensor cores, FlashAttention-2 style (kernels.md §5.2, §5.3), for bf16 q, k, v
//! (and g) and a head of 64 or 128: `mma.sync` m16n8k16 (bf16 operands, f32 accumulation),
//! fragments read from shared memory with `ldmatrix`, tiles copied in with `cp.async` into
//! double buffers (the next tile's copy overlaps this tile's products), rows of 16-byte chunks
//! swizzled (`chunk ^ row mod 8`) so that copies and `ldmatrix` are free of bank conflicts.
//!
//! - `attention_fa_prep_*`: one warp per (token, head slot) writes q and k rotated (RoPE) and v
//!   as dense bf16 `[token, heads, head_dim]` copies, so tiles are 16-byte rows; in the backward
//!   also g, and D = rowsum(g ⊙ o) per (token, query head) in f32.
//! - `attention_fa_*` (forward): a block is 4 warps × 16 query rows of one sequence and head;
//!   per 64-key tile S = QKᵀ, the online softmax on the accumulators (a row lives in a quad of
//!   lanes), O += PV with P (bf16) taken from the same registers.
//! - `attention_fa_dkdv_*`: a block owns 64 keys of one kv head (16 per warp; K and V stay in
//!   shared memory) and walks the group's query heads and the 32-query tiles that see them:
//!   Sᵀ = KQᵀ, dPᵀ = V·dOᵀ, Pᵀ = exp(Sᵀ − lse), dSᵀ = Pᵀ(dPᵀ − D), dV += Pᵀ·dO, dK += dSᵀ·Q.
//! - `attention_fa_dq_*`: a block owns 64 queries of one head and walks 32-key tiles: S, dP, dS
//!   as above, dQ += dS·K. dK and dQ are rotated back in registers.
//!
//! Every gradient element has one writer and a fixed summation order (no atomics). Operands of
//! the products are bf16: the rotated q and k, P and dS are rounded once, as in FlashAttention.

use super::{
    at, block_rows, first_key, lanes, load_head, mma, quad, row_grid, warp_slot_grid, warp_slots, Spec, LN2, LOG2E,
    THREADS,
};
use crate::lower::kernels::sig;
use crate::lower::mlir::{Cmp, KernelBuilder, Ty, V};
use crate::lower::{Emit, Operand};
use weft_runtime::device::{Arg, BufferArg, Extent};

/// Threads (4 warps) per block of the main kernels.
const FA_THREADS: u32 = 128;
const FA_WARPS: i64 = 4;
/// Query rows per forward and dQ block, keys per dK/dV block: 16 per warp.
const OWN: i64 = 16 * FA_WARPS;
/// Keys per forward tile; keys per dQ tile; queries per dK/dV tile.
const FWD_TILE: i64 = 64;
const DQ_TILE: i64 = 32;
const KV_TILE: i64 = 32;
/// The forward kernel's register cap.
const FWD_REGISTERS: u32 = 168;

/// Whether the tensor-core kernels serve these operands: bf16 and a head of 64 or 128.
pub(super) fn usable(s: &Spec, ins: &[&Operand]) -> bool {
    matches!(s.hd, 64 | 128) && ins.iter().all(|o| o.dtype() == weft_runtime::DType::BF16)
}

// ---- inline PTX ----

/// `ldmatrix` of four 8×8 bf16 matrices (lanes 8i…8i+7 give the row addresses of matrix i);
/// register i of every lane holds its pair of matrix i (transposed with `trans`).
fn ldsm(k: &mut KernelBuilder, addr: &V, trans: bool) -> Vec<V> {
    let t = if trans { ".trans" } else { "" };
    k.asm(
        &format!("ldmatrix.sync.aligned.m8n8.x4{t}.shared.b16 {{$0, $1, $2, $3}}, [$4];"),
        "=r,=r,=r,=r,r",
        &[Ty::I32; 4],
        &[addr],
    )
}

/// A 16-byte copy from global to shared memory, completed by [`wait_copies`].
fn cp_async16(k: &mut KernelBuilder, saddr: &V, gaddr: &V) {
    k.asm("cp.async.cg.shared.global [$0], [$1], 16;", "r,l", &[], &[saddr, gaddr]);
}

/// A 4-byte copy from global to shared memory.
fn cp_async4(k: &mut KernelBuilder, saddr: &V, gaddr: &V) {
    k.asm("cp.async.ca.shared.global [$0], [$1], 4;", "r,l", &[], &[saddr, gaddr]);
}

fn commit_copies(k: &mut KernelBuilder) {
    k.asm("cp.async.commit_group;", "", &[], &[]);
}

/// Waits for this thread's copies (a barrier after it makes everyone's visible).
fn wait_copies(k: &mut KernelBuilder) {
    k.asm("cp.async.wait_all;", "", &[], &[]);
}

fn ld_shared_f32(k: &mut KernelBuilder, addr: &V) -> V {
    k.asm("ld.shared.f32 $0, [$1];", "=f,r", &[Ty::F32], &[addr]).remove(0)
}

/// Two f32 values rounded to bf16 and packed into an i32, `lo` in the low half (an mma fragment
/// register).
fn pack_bf16(k: &mut KernelBuilder, lo: &V, hi: &V) -> V {
    k.asm("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", &[Ty::I32], &[hi, lo]).remove(0)
}

// ---- tiles in shared memory ----

/// A tile of `rows` head vectors (bf16, `hd` wide) in shared memory at `base`: row r's 16-byte
/// chunk c lives at `r·2hd + 16·(c ^ (r mod 8))`.
struct Tile {
    hd: i64,
    rows: i64,
}

impl Tile {
    fn bytes(&self) -> i64 {
        self.rows * self.hd * 2
    }

    /// Address of row `r`, chunk `c` (i32 values).
    fn addr(&self, k: &mut KernelBuilder, base: &V, r: &V, c: &V) -> V {
        let rb = k.i32((self.hd * 2) as i32);
        let ro = k.mul(r, &rb);
        let seven = k.i32(7);
        let sw = k.and(r, &seven);
        let x = xor(k, c, &sw);
        let four = k.i32(4);
        let co = k.raw(Ty::I32, &format!("arith.shli {}, {} : i32", x.name, four.name));
        let a = k.add(base, &ro);
        k.add(&a, &co)
    }

    /// Copies rows `t0..t0 + rows` (clamped to `last`) of head `head` of a dense `[token, heads,
    /// hd]` bf16 buffer into the tile at `base`: each thread copies 16-byte chunks.
    #[allow(clippy::too_many_arguments)]
    fn load(&self, k: &mut KernelBuilder, src: &V, heads: i64, head: &V, bs: &V, t0: &V, last: &V, base: &V) {
        let cpr = self.hd / 8;
        let threads = FA_THREADS as i64;
        let per = self.rows * cpr / threads;
        assert!(per >= 1 && (self.rows * cpr) % threads == 0 && threads % cpr == 0);
        let tid = k.thread_id('x');
        let cprv = k.i64(cpr);
        let c = k.rem(&tid, &cprv);
        let r0 = k.div(&tid, &cprv);
        let src_i = k.ptr_to_int(src);
        let c32 = k.cast(&c, Ty::I32);
        for u in 0..per {
            let off = k.i64(u * threads / cpr);
            let r = k.add(&r0, &off);
            let t = k.add(t0, &r);
            let t = k.min(&t, last);
            let row = k.add(bs, &t);
            let hv = k.i64(heads);
            let gi = k.mul(&row, &hv);
            let gi = k.add(&gi, head);
            let hdv = k.i64(self.hd);
            let gi = k.mul(&gi, &hdv);
            let c8 = k.i64(8);
            let co = k.mul(&c, &c8);
            let gi = k.add(&gi, &co);
            let two = k.i64(2);
            let gb = k.mul(&gi, &two);
            let ga = k.add(&src_i, &gb);
            let r32 = k.cast(&r, Ty::I32);
            let sa = self.addr(k, base, &r32, &c32);
            cp_async16(k, &sa, &ga);
        }
    }
}

/// Where a sequence's key and value rows of one kv head come from (the dense copies).
struct KvRows {
    k: V,
    v: V,
    heads: i64,
    head: V,
    /// The sequence's first row, and its last position.
    bs: V,
    last: V,
}

impl KvRows {
    /// Starts copying keys and values `j0..` into the (K tile, V tile) buffer at `at`.
    fn load(&self, k: &mut KernelBuilder, tile: &Tile, j0: &V, at: &V) {
        tile.load(k, &self.k, self.heads, &self.head, &self.bs, j0, &self.last, at);
        let tv = k.i32(tile.bytes() as i32);
        let vb = k.add(at, &tv);
        tile.load(k, &self.v, self.heads, &self.head, &self.bs, j0, &self.last, &vb);
        commit_copies(k);
    }
}

/// The keys the block's queries `first..first + OWN` see, in tiles of `rows`: (first key, tiles).
fn key_tiles(k: &mut KernelBuilder, s: &Spec, first: &V, seq: &V, rows: i64) -> (V, V) {
    let lo = first_key(k, s, first);
    let nrows = k.i64(OWN);
    let end = k.add(first, &nrows);
    let hi = k.min(&end, seq);
    let span = k.sub(&hi, &lo);
    let tl = k.i64(rows);
    let tl1 = k.i64(rows - 1);
    let nt = k.add(&span, &tl1);
    (lo, k.div(&nt, &tl))
}

/// The top of trip `it` of a double-buffered tile loop of `ntiles` trips: waits until this trip's
/// tile is in shared memory (everyone's copies, and everyone done with the other buffer), then
/// starts trip `it + 1`'s copies into the other buffer with `prefetch(k, it + 1, offset)`.
/// Returns this trip's buffer offset (buffers `buf_bytes` apart, i32).
fn next_tile(
    k: &mut KernelBuilder,
    it: &V,
    ntiles: &V,
    buf_bytes: i64,
    prefetch: impl FnOnce(&mut KernelBuilder, &V, &V),
) -> V {
    wait_copies(k);
    k.barrier();
    let one = k.i64(1);
    let next = k.add(it, &one);
    let two = k.i64(2);
    let par = k.rem(it, &two);
    let bb = k.i64(buf_bytes);
    let cur = k.mul(&par, &bb);
    let other = k.sub(&bb, &cur);
    let cur = k.cast(&cur, Ty::I32);
    let other = k.cast(&other, Ty::I32);
    let more = k.cmp(Cmp::Lt, &next, ntiles);
    k.if_(&more, |k| prefetch(k, &next, &other));
    cur
}

/// The key-tile loop of the forward and dQ kernels: the tiles of `kv`'s keys from `lo`, copied
/// into double buffers at `sbase`; `body(k, j0, kb, vb, cur)` gets each tile's first key and the
/// addresses of its K and V tiles.
#[allow(clippy::too_many_arguments)]
fn key_tile_loop(
    k: &mut KernelBuilder,
    tile: &Tile,
    kv: &KvRows,
    sbase: &V,
    lo: &V,
    ntiles: &V,
    init: &[V],
    body: impl FnOnce(&mut KernelBuilder, &V, &V, &V, &[V]) -> Vec<V>,
) -> Vec<V> {
    kv.load(k, tile, lo, sbase);
    let tb = tile.bytes();
    let z = k.i64(0);
    k.for_(&z, ntiles, 1, init, |k, it, cur| {
        let tlv = k.i64(tile.rows);
        let cur_off = next_tile(k, &it, ntiles, 2 * tb, |k, next, other| {
            let j1 = k.mul(next, &tlv);
            let j1 = k.add(lo, &j1);
            let at = k.add(sbase, other);
            kv.load(k, tile, &j1, &at);
        });
        let j0 = k.mul(&it, &tlv);
        let j0 = k.add(lo, &j0);
        let kb = k.add(sbase, &cur_off);
        let tv = k.i32(tb as i32);
        let vb = k.add(&kb, &tv);
        body(k, &j0, &kb, &vb, cur)
    })
}

fn xor(k: &mut KernelBuilder, a: &V, b: &V) -> V {
    k.raw(a.ty, &format!("arith.xori {}, {} : {}", a.name, b.name, a.ty.mlir()))
}

/// Lane parts of `ldmatrix` addresses: `(lane mod 8, (lane / 8) mod 2, lane / 16)` as i32.
struct LanePos {
    r8: V,
    b3: V,
    b4: V,
}

fn lane_pos(k: &mut KernelBuilder, lane: &V) -> LanePos {
    let l = k.cast(lane, Ty::I32);
    let c7 = k.i32(7);
    let r8 = k.and(&l, &c7);
    let c3 = k.i32(3);
    let s3 = k.raw(Ty::I32, &format!("arith.shrui {}, {} : i32", l.name, c3.name));
    let c1 = k.i32(1);
    let b3 = k.and(&s3, &c1);
    let c4 = k.i32(4);
    let b4 = k.raw(Ty::I32, &format!("arith.shrui {}, {} : i32", l.name, c4.name));
    LanePos { r8, b3, b4 }
}

/// A fragments (16 rows × 16 columns per k-step, mma order) of rows `r0..r0 + 16` of a tile,
/// for every k-step over the head.
fn a_frags(k: &mut KernelBuilder, t: &Tile, base: &V, r0: &V, lp: &LanePos) -> Vec<Vec<V>> {
    // Matrix i = lane / 8: rows r0 + 8·(i mod 2) + lane mod 8, chunk 2ks + i / 2.
    let c8 = k.i32(8);
    let ro = k.mul(&lp.b3, &c8);
    let r = k.add(r0, &ro);
    let r = k.add(&r, &lp.r8);
    (0..t.hd / 16)
        .map(|ks| {
            let kc = k.i32(2 * ks as i32);
            let c = k.add(&kc, &lp.b4);
            let a = t.addr(k, base, &r, &c);
            ldsm(k, &a, false)
        })
        .collect()
}

/// B fragments for `acc[n] += A · Tᵀ` over the head (the tile's rows are the n dimension): for
/// rows `n0 + 16p…`, k-step ks, `[b0b1 of n-tile 2p, b0b1 of 2p + 1]` from one `ldmatrix`.
fn bt_frags(k: &mut KernelBuilder, t: &Tile, base: &V, n0: i64, ks: i64, lp: &LanePos) -> Vec<V> {
    // Matrix i: rows n0 + lane mod 8 + 8·(i / 2), chunk 2ks + i mod 2.
    let c8 = k.i32(8);
    let ro = k.mul(&lp.b4, &c8);
    let nv = k.i32(n0 as i32);
    let r = k.add(&nv, &ro);
    let r = k.add(&r, &lp.r8);
    let kc = k.i32(2 * ks as i32);
    let c = k.add(&kc, &lp.b3);
    let a = t.addr(k, base, &r, &c);
    ldsm(k, &a, false)
}

/// B fragments for `acc[d] += A · T` (the tile's rows are the k dimension, its columns n): for
/// k-step `kk` (rows 16kk…) and column tiles 2dp, 2dp + 1, `[b0b1, b2b3]` of each, transposed.
fn b_frags(k: &mut KernelBuilder, t: &Tile, base: &V, kk: i64, dp: i64, lp: &LanePos) -> Vec<V> {
    // Matrix i: rows 16kk + lane mod 8 + 8·(i mod 2), chunk 2dp + i / 2.
    let c8 = k.i32(8);
    let ro = k.mul(&lp.b3, &c8);
    let kv = k.i32(16 * kk as i32);
    let r = k.add(&kv, &ro);
    let r = k.add(&r, &lp.r8);
    let dc = k.i32(2 * dp as i32);
    let c = k.add(&dc, &lp.b4);
    let a = t.addr(k, base, &r, &c);
    ldsm(k, &a, true)
}

/// `acc += A·Tᵀ` over the head: `a` the A fragments per k-step, the tile's rows `0..8·n_tiles`.
fn products_t(k: &mut KernelBuilder, t: &Tile, base: &V, a: &[Vec<V>], n_tiles: usize, lp: &LanePos) -> Vec<Vec<V>> {
    let zero = k.f32(0.0);
    let mut acc = vec![vec![zero; 4]; n_tiles];
    // k-steps outermost: the products of one k-step go to different accumulators, so they do
    // not wait on each other.
    for (ks, af) in a.iter().enumerate() {
        for p in 0..n_tiles / 2 {
            let b = bt_frags(k, t, base, 16 * p as i64, ks as i64, lp);
            acc[2 * p] = mma(k, af, &b[0..2], &acc[2 * p]);
            acc[2 * p + 1] = mma(k, af, &b[2..4], &acc[2 * p + 1]);
        }
    }
    acc
}

/// `acc[d] += P·T` with `p` the A fragments per 16-row k-step of the tile.
fn products(k: &mut KernelBuilder, t: &Tile, base: &V, p: &[Vec<V>], acc: &mut [Vec<V>], lp: &LanePos) {
    // As in `products_t`: one k-step's products go to different accumulators.
    for (kk, pf) in p.iter().enumerate() {
        for dp in 0..(t.hd / 16) as usize {
            let b = b_frags(k, t, base, kk as i64, dp as i64, lp);
            acc[2 * dp] = mma(k, pf, &b[0..2], &acc[2 * dp]);
            acc[2 * dp + 1] = mma(k, pf, &b[2..4], &acc[2 * dp + 1]);
        }
    }
}

/// Accumulator tiles (16 × 8 each: elements (row g + 8⌊i/2⌋, column 2t + i mod 2)) as A
/// fragments over their columns: k-step j takes tiles 2j and 2j + 1, rounded to bf16.
fn as_a_frags(k: &mut KernelBuilder, m: &[Vec<V>]) -> Vec<Vec<V>> {
    (0..m.len() / 2)
        .map(|j| {
            let (a, b) = (&m[2 * j], &m[2 * j + 1]);
            vec![
                pack_bf16(k, &a[0], &a[1]),
                pack_bf16(k, &a[2], &a[3]),
                pack_bf16(k, &b[0], &b[1]),
                pack_bf16(k, &b[2], &b[3]),
            ]
        })
        .collect()
}

/// Whether key `j` is visible to query `i` (i32 values): `0 ≤ i − j < window`.
fn visible(k: &mut KernelBuilder, s: &Spec, i: &V, j: &V) -> V {
    let d = k.sub(i, j);
    match s.window {
        Some(w) => {
            let wv = k.i32(w.min(i32::MAX as u64) as i32);
            k.raw(Ty::I1, &format!("arith.cmpi ult, {}, {} : i32", d.name, wv.name))
        }
        None => {
            let z = k.i32(0);
            k.cmp(Cmp::Ge, &d, &z)
        }
    }
}

// ---- scratch: the dense copies ----

struct Copies {
    q: BufferArg,
    k: BufferArg,
    v: BufferArg,
    /// The backward's g copy and D.
    g: Option<BufferArg>,
    delta: Option<BufferArg>,
}

/// `attention_fa_prep_*`: see the module notes. `back` holds (o, g) for the backward.
fn prep(e: &mut Emit, s: &Spec, ins: [&Operand; 3], back: Option<[&Operand; 2]>) -> Copies {
    let [q, kk, v] = ins;
    let (h, kv, hd) = (s.heads as i64, s.kv_heads as i64, s.hd as i64);
    let copies = Copies {
        q: e.scratch(Extent::per_token(2 * h * hd)),
        k: e.scratch(Extent::per_token(2 * kv * hd)),
        v: e.scratch(Extent::per_token(2 * kv * hd)),
        g: back.map(|_| e.scratch(Extent::per_token(2 * h * hd))),
        delta: back.map(|_| e.scratch(Extent::per_token(4 * h))),
    };
    let mut ops = vec![q, kk, v];
    if let Some([o, g]) = back {
        ops.extend([o, g]);
    }
    let name = format!("attention_fa_prep{}_{}_{}", if back.is_some() { "_bwd" } else { "" }, s.tag(), sig(&ops));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let (qp, kp, vp) = (k.ptr("q"), k.ptr("k"), k.ptr("v"));
    let og = back.map(|_| (k.ptr("o"), k.ptr("g")));
    let (qo, ko, vo) = (k.ptr("q_out"), k.ptr("k_out"), k.ptr("v_out"));
    let gd = back.map(|_| (k.ptr("g_out"), k.ptr("delta")));
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let (_, lane, warp) = lanes(&mut k);
    let nslots = h + 2 * kv + if back.is_some() { h } else { 0 };
    let (r, slots, valid) = warp_slots(&mut k, &warp, &tokens, nslots);
    k.if_(&valid, |k| {
        let tok = k.div(&r, &slots);
        let slot = k.rem(&r, &slots);
        let one = k.i64(1);
        let safe_b = k.max(&batch, &one);
        let seq = k.div(&tokens, &safe_b);
        let pos = k.rem(&tok, &seq);
        // Lane l holds elements l + 32e of the head.
        let dims: Vec<V> = (0..hd / 32)
            .map(|e| {
                let off = k.i64(32 * e);
                k.add(&lane, &off)
            })
            .collect();
        let copy = |k: &mut KernelBuilder, src: &V, x: &Operand, head: &V, nh: i64, dst: &V, rot: bool| {
            let nhv = k.i64(nh);
            let ob = k.mul(&tok, &nhv);
            let ob = k.add(&ob, head);
            let hdv = k.i64(hd);
            let ob = k.mul(&ob, &hdv);
            for d in &dims {
                let r = if rot { rope.as_ref() } else { None };
                let x = load_head(k, src, x, &tok, head, s.hd, r, &pos, d);
                let i = k.add(&ob, d);
                k.store(&x, dst, &i, Ty::BF16);
            }
        };
        let bounds = [h, h + kv, h + 2 * kv];
        let range = |k: &mut KernelBuilder, lo: i64, hi: i64| {
            let lv = k.i64(lo);
            let hv = k.i64(hi);
            let ge = k.cmp(Cmp::Ge, &slot, &lv);
            let lt = k.cmp(Cmp::Lt, &slot, &hv);
            let inside = k.and(&ge, &lt);
            let head = k.sub(&slot, &lv);
            (inside, head)
        };
        let (is_q, hq) = range(k, 0, bounds[0]);
        k.if_(&is_q, |k| copy(k, &qp, q, &hq, h, &qo, true));
        let (is_k, hk) = range(k, bounds[0], bounds[1]);
        k.if_(&is_k, |k| copy(k, &kp, kk, &hk, kv, &ko, true));
        let (is_v, hv) = range(k, bounds[1], bounds[2]);
        k.if_(&is_v, |k| copy(k, &vp, v, &hv, kv, &vo, false));
        if let (Some([o, g]), Some((op, gp)), Some((gop, dp))) = (back, &og, &gd) {
            let (is_g, hg) = range(k, bounds[2], bounds[2] + h);
            k.if_(&is_g, |k| {
                let z = k.i64(0);
                let mut dot: Option<V> = None;
                for d in &dims {
                    let ov = load_head(k, op, o, &tok, &hg, s.hd, None, &z, d);
                    let gv = load_head(k, gp, g, &tok, &hg, s.hd, None, &z, d);
                    dot = Some(match dot {
                        None => k.mul(&gv, &ov),
                        Some(acc) => k.fma(&gv, &ov, &acc),
                    });
                }
                let dot = k.warp_sum(&dot.expect("a head has elements"));
                copy(k, gp, g, &hg, h, gop, false);
                let first = k.cmp(Cmp::Eq, &lane, &z);
                let hv = k.i64(h);
                let di = k.mul(&tok, &hv);
                let di = k.add(&di, &hg);
                k.if_(&first, |k| k.store(&dot, dp, &di, Ty::F32));
            });
        }
    });
    let buf = |b: &BufferArg| Arg::Buffer(b.clone());
    let mut args: Vec<Arg> = ops.iter().map(|o| o.arg()).collect();
    args.extend([buf(&copies.q), buf(&copies.k), buf(&copies.v)]);
    if let (Some(g), Some(d)) = (&copies.g, &copies.delta) {
        args.extend([buf(g), buf(d)]);
    }
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, warp_slot_grid(nslots), 0, args);
    copies
}

/// The rows of a block's 16-row warp slice a thread's accumulators hold: `(first + 16w + g,
/// + 8)` (i64) with `g = lane / 4`, and `t = lane mod 4` (i64).
struct Quads {
    t: V,
    rows: [V; 2],
}

fn quads(k: &mut KernelBuilder, lane: &V, warp: &V, first: &V) -> Quads {
    let c4 = k.i64(4);
    let g = k.div(lane, &c4);
    let t = k.rem(lane, &c4);
    let c16 = k.i64(16);
    let w = k.mul(warp, &c16);
    let r0 = k.add(first, &w);
    let r0 = k.add(&r0, &g);
    let c8 = k.i64(8);
    let r1 = k.add(&r0, &c8);
    Quads { t, rows: [r0, r1] }
}

/// Stores accumulator tiles (16 × 8 each, element i at (row ⌊i/2⌋ of `rows`, column 8dt + 2t +
/// i mod 2)) scaled by `scale[row]`, rotated back by RoPE at the rows' positions when `rope`, as
/// head `head` of `out`, for the rows that are inside the sequence.
#[allow(clippy::too_many_arguments)]
fn store_rows(
    k: &mut KernelBuilder,
    s: &Spec,
    acc: &[Vec<V>],
    scale: &[V; 2],
    rope: Option<&super::Rope>,
    rows: &[V; 2],
    seq: &V,
    bs: &V,
    head: &V,
    t: &V,
    out: &Operand,
    p: &V,
) {
    let nd = acc.len();
    let half = nd / 2;
    let hdv = k.i64(s.hd as i64);
    let col0 = k.mul(head, &hdv);
    let t2 = k.add(t, t);
    let col0 = k.add(&col0, &t2);
    for (ri, row) in rows.iter().enumerate() {
        let valid = k.cmp(Cmp::Lt, row, seq);
        k.if_(&valid, |k| {
            let grow = k.add(bs, row);
            for dt in 0..nd {
                let vals: Vec<V> = [2 * ri, 2 * ri + 1]
                    .iter()
                    .map(|&i| match rope {
                        None => k.mul(&acc[dt][i], &scale[ri]),
                        Some(rp) => {
                            // Pair (d, d + head_dim/2) sits in tiles dt and dt ± nd/2.
                            let (dlo, dhi) = if dt < half { (dt, dt + half) } else { (dt - half, dt) };
                            let x1 = k.mul(&acc[dlo][i], &scale[ri]);
                            let x2 = k.mul(&acc[dhi][i], &scale[ri]);
                            let off = k.i64(8 * dlo as i64 + (i % 2) as i64);
                            let ii = k.add(&t2, &off);
                            let (cs, sn) = rp.angles(k, row, &ii);
                            if dt < half {
                                let a = k.mul(&x1, &cs);
                                k.fma(&x2, &sn, &a)
                            } else {
                                let a = k.mul(&x2, &cs);
                                let b = k.mul(&x1, &sn);
                                k.sub(&a, &b)
                            }
                        }
                    })
                    .collect();
                let off = k.i64(8 * dt as i64);
                let col = k.add(&col0, &off);
                let idx = at(k, out, &grow, &col);
                if out.dtype() == weft_runtime::DType::BF16 && out.ld % 2 == 0 && out.buf.offset % 4 == 0 {
                    let w = pack_bf16(k, &vals[0], &vals[1]);
                    let two = k.i64(2);
                    let wi = k.div(&idx, &two);
                    k.store(&w, p, &wi, Ty::I32);
                } else {
                    k.store(&vals[0], p, &idx, out.elem());
                    let one = k.i64(1);
                    let i1 = k.add(&idx, &one);
                    k.store(&vals[1], p, &i1, out.elem());
                }
            }
        });
    }
}

/// Forward: `(q, k, v) -> (o, lse)`.
pub(super) fn forward(e: &mut Emit, s: &Spec, ins: [&Operand; 3], o: &Operand, lse: &Operand) {
    let cp = prep(e, s, ins, None);
    let (heads, kvh, hd) = (s.heads as i64, s.kv_heads as i64, s.hd as i64);
    let tile = Tile { hd, rows: FWD_TILE };
    let tb = tile.bytes();
    // Shared memory: two buffers of (K tile, V tile); the Q tile is first staged in the second.
    let smem = 4 * tb;
    let name = format!("attention_fa_{}_{}", s.tag(), sig(&[o, lse]));
    let mut k = KernelBuilder::new(&name, [FA_THREADS, 1, 1]);
    // Three blocks per SM instead of two, for a few spilled bytes (faster on an H200).
    k.max_registers(FWD_REGISTERS);
    let (qp, kp, vp) = (k.ptr("q"), k.ptr("k"), k.ptr("v"));
    let (op, lp) = (k.ptr("o"), k.ptr("lse"));
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let sbase = k.dynamic_shared_base();
    let (_, lane, warp) = lanes(&mut k);
    let lpos = lane_pos(&mut k, &lane);
    let r = block_rows(&mut k, &batch, &tokens, OWN);
    let h = k.block_id('y');
    k.if_(&r.live, |k| {
        let seq = &r.seq;
        let one = k.i64(1);
        let last = k.sub(seq, &one);
        let bs = k.mul(&r.b, seq);
        let grp = k.i64(s.group() as i64);
        let g_kv = k.div(&h, &grp);
        let qd = quads(k, &lane, &warp, &r.first);
        // Q: staged in buffer 1, read into A fragments.
        let tbv = k.i32((2 * tb) as i32);
        let stage = k.add(&sbase, &tbv);
        let qt = Tile { hd, rows: OWN };
        qt.load(k, &qp, heads, &h, &bs, &r.first, &last, &stage);
        commit_copies(k);
        wait_copies(k);
        k.barrier();
        let c16 = k.i32(16);
        let w32 = k.cast(&warp, Ty::I32);
        let wr = k.mul(&w32, &c16);
        let qf = a_frags(k, &qt, &stage, &wr, &lpos);
        let (lo, ntiles) = key_tiles(k, s, &r.first, seq, FWD_TILE);
        let kv = KvRows { k: kp.clone(), v: vp.clone(), heads: kvh, head: g_kv, bs: bs.clone(), last: last.clone() };
        let ninf = k.f32(f32::NEG_INFINITY);
        let zero = k.f32(0.0);
        let c = k.f32(s.scale() * LOG2E);
        let nd = (hd / 8) as usize;
        let mut init = vec![ninf.clone(), ninf.clone(), zero.clone(), zero.clone()];
        init.extend(std::iter::repeat_n(zero.clone(), 4 * nd));
        let i_rows: Vec<V> = qd.rows.iter().map(|x| k.cast(x, Ty::I32)).collect();
        let t2 = k.add(&qd.t, &qd.t);
        let t2 = k.cast(&t2, Ty::I32);
        let fin = key_tile_loop(k, &tile, &kv, &sbase, &lo, &ntiles, &init, |k, j0, kb, vb, cur| {
            // S = Q·Kᵀ, 16 × 64 per warp, as 8 accumulator tiles.
            let acc = products_t(k, &tile, kb, &qf, (FWD_TILE / 8) as usize, &lpos);
            // Scale to base 2 and mask: element i is (row i/2, key j0 + 8nt + 2t + i%2).
            let j32 = k.cast(j0, Ty::I32);
            let jt = k.add(&j32, &t2);
            let sc: Vec<Vec<V>> = acc
                .iter()
                .enumerate()
                .map(|(nt, a)| {
                    a.iter()
                        .enumerate()
                        .map(|(i, x)| {
                            let off = k.i32((nt * 8 + i % 2) as i32);
                            let j = k.add(&jt, &off);
                            let vis = visible(k, s, &i_rows[i / 2], &j);
                            let y = k.mul(x, &c);
                            k.select(&vis, &y, &ninf)
                        })
                        .collect()
                })
                .collect();
            // Online softmax per row (each row's scores live in one quad).
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
            // O = O·corr + P·V.
            let mut oacc: Vec<Vec<V>> =
                (0..nd).map(|dt| (0..4).map(|i| k.mul(&cur[4 + 4 * dt + i], &corr[i / 2])).collect()).collect();
            let pf = as_a_frags(k, &p);
            products(k, &tile, vb, &pf, &mut oacc, &lpos);
            for a in oacc {
                out.extend(a);
            }
            out
        });
        let l: Vec<V> = (0..2).map(|ri| quad(k, &fin[2 + ri], false)).collect();
        let onef = k.f32(1.0);
        let inv = [k.div(&onef, &l[0]), k.div(&onef, &l[1])];
        let oacc: Vec<Vec<V>> = (0..nd).map(|dt| fin[4 + 4 * dt..8 + 4 * dt].to_vec()).collect();
        store_rows(k, s, &oacc, &inv, None, &qd.rows, seq, &bs, &h, &qd.t, o, &op);
        for ri in 0..2 {
            let valid = k.cmp(Cmp::Lt, &qd.rows[ri], seq);
            let z = k.i64(0);
            let first = k.cmp(Cmp::Eq, &qd.t, &z);
            let both = k.and(&valid, &first);
            k.if_(&both, |k| {
                let row = k.add(&bs, &qd.rows[ri]);
                let ln2 = k.f32(LN2);
                let mn = k.mul(&fin[ri], &ln2);
                let ll = k.ln(&l[ri]);
                let y = k.add(&mn, &ll);
                let idx = at(k, lse, &row, &h);
                k.store(&y, &lp, &idx, lse.elem());
            });
        }
    });
    let buf = |b: &BufferArg| Arg::Buffer(b.clone());
    let mut args = vec![buf(&cp.q), buf(&cp.k), buf(&cp.v), o.arg(), lse.arg()];
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, row_grid(s.heads, OWN), smem as u32, args);
}

/// Backward: `(q, k, v, o, lse, g) -> (g_q, g_k, g_v)`.
pub(super) fn backward(e: &mut Emit, s: &Spec, ins: [&Operand; 6], outs: [&Operand; 3]) {
    let [q, kk, v, o, lse, g] = ins;
    let [gq, gk, gv] = outs;
    let cp = prep(e, s, [q, kk, v], Some([o, g]));
    dkdv(e, s, &cp, lse, [gk, gv]);
    dq(e, s, &cp, lse, gq);
}

/// `lse·log₂e` and D of `row`, head `h`.
fn row_stats(k: &mut KernelBuilder, lse: &Operand, lp: &V, dp: &V, heads: i64, row: &V, h: &V) -> (V, V) {
    let li = at(k, lse, row, h);
    let l = k.load_f32(lp, &li, lse.elem());
    let l2e = k.f32(LOG2E);
    let l2 = k.mul(&l, &l2e);
    let hv = k.i64(heads);
    let di = k.mul(row, &hv);
    let di = k.add(&di, h);
    let d = k.load(dp, &di, Ty::F32);
    (l2, d)
}

/// The dK/dV kernel (see the module notes).
fn dkdv(e: &mut Emit, s: &Spec, cp: &Copies, lse: &Operand, outs: [&Operand; 2]) {
    let [gk, gv] = outs;
    let (heads, kvh, hd) = (s.heads as i64, s.kv_heads as i64, s.hd as i64);
    let own = Tile { hd, rows: OWN };
    let tile = Tile { hd, rows: KV_TILE };
    let (ob, tb) = (own.bytes(), tile.bytes());
    // Shared memory: K, V of the block's keys; two buffers of (Q tile, dO tile, lse·log₂e, D).
    let stats = 2 * 4 * KV_TILE;
    let buf_bytes = 2 * tb + stats;
    let smem = 2 * ob + 2 * buf_bytes;
    let name = format!("attention_fa_dkdv_{}_{}", s.tag(), sig(&[lse, gk, gv]));
    let mut k = KernelBuilder::new(&name, [FA_THREADS, 1, 1]);
    let (qp, kp, vp, gp) = (k.ptr("q"), k.ptr("k"), k.ptr("v"), k.ptr("g"));
    let (lp, dp) = (k.ptr("lse"), k.ptr("delta"));
    let (gkp, gvp) = (k.ptr("g_k"), k.ptr("g_v"));
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let sbase = k.dynamic_shared_base();
    let (tid, lane, warp) = lanes(&mut k);
    let lpos = lane_pos(&mut k, &lane);
    let r = block_rows(&mut k, &batch, &tokens, OWN);
    let hb = k.block_id('y');
    k.if_(&r.live, |k| {
        let seq = &r.seq;
        let one = k.i64(1);
        let last = k.sub(seq, &one);
        let bs = k.mul(&r.b, seq);
        let grp = k.i64(s.group() as i64);
        let qd = quads(k, &lane, &warp, &r.first);
        let kb = sbase.clone();
        let obv = k.i32(ob as i32);
        let vb = k.add(&sbase, &obv);
        own.load(k, &kp, kvh, &hb, &bs, &r.first, &last, &kb);
        own.load(k, &vp, kvh, &hb, &bs, &r.first, &last, &vb);
        commit_copies(k);
        // The queries that see the block's keys: first..first + OWN − 1 + (w − 1).
        let qlo = r.first.clone();
        let reach = k.i64(OWN + s.window.map_or(i64::MAX / 4, |w| w as i64 - 1));
        let qend = k.add(&qlo, &reach);
        let qhi = k.min(&qend, seq);
        let span = k.sub(&qhi, &qlo);
        let tl = k.i64(KV_TILE);
        let tl1 = k.i64(KV_TILE - 1);
        let nt = k.add(&span, &tl1);
        let per_head = k.div(&nt, &tl);
        let ntiles = k.mul(&per_head, &grp);
        let h0 = k.mul(&hb, &grp);
        let bufs0 = k.i32((2 * ob) as i32);
        let bufs0 = k.add(&sbase, &bufs0);
        // Tile `it` (query head h0 + it / per_head, queries from qlo + (it mod per_head)·KV_TILE)
        // into the buffer at `at`.
        let where_ = |k: &mut KernelBuilder, it: &V| -> (V, V) {
            let one = k.i64(1);
            let ph = k.max(&per_head, &one);
            let hh = k.div(it, &ph);
            let hh = k.add(&h0, &hh);
            let ti = k.rem(it, &ph);
            let tlv = k.i64(KV_TILE);
            let t0 = k.mul(&ti, &tlv);
            let t0 = k.add(&qlo, &t0);
            (hh, t0)
        };
        let load_tile = |k: &mut KernelBuilder, it: &V, dst: &V| {
            let (hh, t0) = where_(k, it);
            tile.load(k, &qp, heads, &hh, &bs, &t0, &last, dst);
            let tbv = k.i32(tb as i32);
            let gb = k.add(dst, &tbv);
            tile.load(k, &gp, heads, &hh, &bs, &t0, &last, &gb);
            // lse and D of the tile's queries: one f32 per thread of the first 2·KV_TILE.
            let n2 = k.i64(2 * KV_TILE);
            let few = k.cmp(Cmp::Lt, &tid, &n2);
            k.if_(&few, |k| {
                let tlv = k.i64(KV_TILE);
                let which = k.div(&tid, &tlv);
                let i = k.rem(&tid, &tlv);
                let t = k.add(&t0, &i);
                let t = k.min(&t, &last);
                let row = k.add(&bs, &t);
                let hv = k.i64(heads);
                let gi = k.mul(&row, &hv);
                let gi = k.add(&gi, &hh);
                let four = k.i64(4);
                let zero = k.i64(0);
                let is_lse = k.cmp(Cmp::Eq, &which, &zero);
                // lse is read with its own row stride; D is dense [token, heads].
                let lrow = at(k, lse, &row, &hh);
                let lb = k.ptr_to_int(&lp);
                let db = k.ptr_to_int(&dp);
                let lo = k.mul(&lrow, &four);
                let la = k.add(&lb, &lo);
                let dofs = k.mul(&gi, &four);
                let da = k.add(&db, &dofs);
                let ga = k.select(&is_lse, &la, &da);
                let so = k.mul(&tid, &four);
                let so = k.cast(&so, Ty::I32);
                let tb2 = k.i32((2 * tb) as i32);
                let sa = k.add(dst, &tb2);
                let sa = k.add(&sa, &so);
                cp_async4(k, &sa, &ga);
            });
            commit_copies(k);
        };
        let z32 = k.i32(0);
        let first_buf = k.add(&bufs0, &z32);
        let z = k.i64(0);
        load_tile(k, &z, &first_buf);
        let zero = k.f32(0.0);
        let c = k.f32(s.scale() * LOG2E);
        let nd = (hd / 8) as usize;
        let init = vec![zero.clone(); 2 * 4 * nd];
        let j_rows: Vec<V> = qd.rows.iter().map(|x| k.cast(x, Ty::I32)).collect();
        let t2 = k.add(&qd.t, &qd.t);
        let t2_32 = k.cast(&t2, Ty::I32);
        let seq32 = k.cast(seq, Ty::I32);
        let c16 = k.i32(16);
        let w32 = k.cast(&warp, Ty::I32);
        let wr = k.mul(&w32, &c16);
        let fin = k.for_(&z, &ntiles, 1, &init, |k, it, cur| {
            let cur_off = next_tile(k, &it, &ntiles, buf_bytes, |k, next, other| {
                let dst = k.add(&bufs0, other);
                load_tile(k, next, &dst);
            });
            let qb = k.add(&bufs0, &cur_off);
            let tbv = k.i32(tb as i32);
            let gb = k.add(&qb, &tbv);
            let tb2 = k.i32((2 * tb) as i32);
            let sb = k.add(&qb, &tb2);
            let (_, t0) = where_(k, &it);
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: 16 keys × KV_TILE queries per warp.
            let kf = a_frags(k, &own, &kb, &wr, &lpos);
            let st = products_t(k, &tile, &qb, &kf, (KV_TILE / 8) as usize, &lpos);
            let vf = a_frags(k, &own, &vb, &wr, &lpos);
            let dpt = products_t(k, &tile, &gb, &vf, (KV_TILE / 8) as usize, &lpos);
            // Pᵀ and dSᵀ; element i of tile nt is (key row i/2, query t0 + 8nt + 2t + i%2).
            let t032 = k.cast(&t0, Ty::I32);
            let it0 = k.add(&t032, &t2_32);
            let mut pm: Vec<Vec<V>> = Vec::new();
            let mut dsm: Vec<Vec<V>> = Vec::new();
            for nt in 0..st.len() {
                let mut pt = Vec::new();
                let mut dst = Vec::new();
                for i in 0..4usize {
                    let col = (nt * 8 + i % 2) as i32;
                    let off = k.i32(col);
                    let qi = k.add(&it0, &off);
                    let vis = visible(k, s, &qi, &j_rows[i / 2]);
                    let inside = k.cmp(Cmp::Lt, &qi, &seq32);
                    let vis = k.and(&vis, &inside);
                    // Column 2t + col of the tile's stats.
                    let colv = k.add(&t2_32, &off);
                    let four = k.i32(4);
                    let so = k.mul(&colv, &four);
                    let la = k.add(&sb, &so);
                    let lraw = ld_shared_f32(k, &la);
                    let l2e = k.f32(LOG2E);
                    let l2 = k.mul(&lraw, &l2e);
                    let dofs = k.i32((4 * KV_TILE) as i32);
                    let da = k.add(&la, &dofs);
                    let dd = ld_shared_f32(k, &da);
                    let x = k.mul(&st[nt][i], &c);
                    let x = k.sub(&x, &l2);
                    let pe = k.exp2(&x);
                    let p = k.select(&vis, &pe, &zero);
                    let tt = k.sub(&dpt[nt][i], &dd);
                    dst.push(k.mul(&p, &tt));
                    pt.push(p);
                }
                pm.push(pt);
                dsm.push(dst);
            }
            let pf = as_a_frags(k, &pm);
            let dsf = as_a_frags(k, &dsm);
            let mut dk_acc: Vec<Vec<V>> = (0..nd).map(|dt| cur[4 * dt..4 * dt + 4].to_vec()).collect();
            let mut dv_acc: Vec<Vec<V>> =
                (0..nd).map(|dt| cur[4 * nd + 4 * dt..4 * nd + 4 * dt + 4].to_vec()).collect();
            products(k, &tile, &gb, &pf, &mut dv_acc, &lpos);
            products(k, &tile, &qb, &dsf, &mut dk_acc, &lpos);
            let mut out: Vec<V> = dk_acc.into_iter().flatten().collect();
            out.extend(dv_acc.into_iter().flatten());
            out
        });
        let sc = k.f32(s.scale());
        let onef = k.f32(1.0);
        let dk: Vec<Vec<V>> = (0..nd).map(|dt| fin[4 * dt..4 * dt + 4].to_vec()).collect();
        let dv: Vec<Vec<V>> = (0..nd).map(|dt| fin[4 * nd + 4 * dt..4 * nd + 4 * dt + 4].to_vec()).collect();
        store_rows(k, s, &dk, &[sc.clone(), sc], rope.as_ref(), &qd.rows, seq, &bs, &hb, &qd.t, gk, &gkp);
        store_rows(k, s, &dv, &[onef.clone(), onef], None, &qd.rows, seq, &bs, &hb, &qd.t, gv, &gvp);
    });
    let buf = |b: &BufferArg| Arg::Buffer(b.clone());
    let (gbuf, dbuf) = (cp.g.as_ref().expect("backward copies"), cp.delta.as_ref().expect("backward D"));
    let mut args = vec![buf(&cp.q), buf(&cp.k), buf(&cp.v), buf(gbuf), lse.arg(), buf(dbuf), gk.arg(), gv.arg()];
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, row_grid(s.kv_heads, OWN), smem as u32, args);
}

/// The dQ kernel (see the module notes).
fn dq(e: &mut Emit, s: &Spec, cp: &Copies, lse: &Operand, gq: &Operand) {
    let (heads, kvh, hd) = (s.heads as i64, s.kv_heads as i64, s.hd as i64);
    let tile = Tile { hd, rows: DQ_TILE };
    let tb = tile.bytes();
    let own = Tile { hd, rows: OWN };
    // Shared memory: two buffers of (K tile, V tile); Q and dO are first staged over them.
    let smem = (4 * tb).max(2 * own.bytes());
    let name = format!("attention_fa_dq_{}_{}", s.tag(), sig(&[lse, gq]));
    let mut k = KernelBuilder::new(&name, [FA_THREADS, 1, 1]);
    let (qp, kp, vp, gp) = (k.ptr("q"), k.ptr("k"), k.ptr("v"), k.ptr("g"));
    let (lp, dp) = (k.ptr("lse"), k.ptr("delta"));
    let gqp = k.ptr("g_q");
    let rope = s.rope_params(&mut k, None);
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let sbase = k.dynamic_shared_base();
    let (_, lane, warp) = lanes(&mut k);
    let lpos = lane_pos(&mut k, &lane);
    let r = block_rows(&mut k, &batch, &tokens, OWN);
    let h = k.block_id('y');
    k.if_(&r.live, |k| {
        let seq = &r.seq;
        let one = k.i64(1);
        let last = k.sub(seq, &one);
        let bs = k.mul(&r.b, seq);
        let grp = k.i64(s.group() as i64);
        let g_kv = k.div(&h, &grp);
        let qd = quads(k, &lane, &warp, &r.first);
        // Q and dO: staged, read into A fragments.
        let obv = k.i32(own.bytes() as i32);
        let gstage = k.add(&sbase, &obv);
        own.load(k, &qp, heads, &h, &bs, &r.first, &last, &sbase);
        own.load(k, &gp, heads, &h, &bs, &r.first, &last, &gstage);
        commit_copies(k);
        wait_copies(k);
        k.barrier();
        let c16 = k.i32(16);
        let w32 = k.cast(&warp, Ty::I32);
        let wr = k.mul(&w32, &c16);
        let qf = a_frags(k, &own, &sbase, &wr, &lpos);
        let gf = a_frags(k, &own, &gstage, &wr, &lpos);
        k.barrier();
        let stats: Vec<(V, V)> = qd
            .rows
            .iter()
            .map(|row| {
                let rc = k.min(row, &last);
                let grow = k.add(&bs, &rc);
                row_stats(k, lse, &lp, &dp, heads, &grow, &h)
            })
            .collect();
        let (lo, ntiles) = key_tiles(k, s, &r.first, seq, DQ_TILE);
        let kv = KvRows { k: kp.clone(), v: vp.clone(), heads: kvh, head: g_kv, bs: bs.clone(), last: last.clone() };
        let zero = k.f32(0.0);
        let c = k.f32(s.scale() * LOG2E);
        let nd = (hd / 8) as usize;
        let init = vec![zero.clone(); 4 * nd];
        let i_rows: Vec<V> = qd.rows.iter().map(|x| k.cast(x, Ty::I32)).collect();
        let t2 = k.add(&qd.t, &qd.t);
        let t2 = k.cast(&t2, Ty::I32);
        let fin = key_tile_loop(k, &tile, &kv, &sbase, &lo, &ntiles, &init, |k, j0, kb, vb, cur| {
            let sacc = products_t(k, &tile, kb, &qf, (DQ_TILE / 8) as usize, &lpos);
            let pacc = products_t(k, &tile, vb, &gf, (DQ_TILE / 8) as usize, &lpos);
            let j32 = k.cast(j0, Ty::I32);
            let jt = k.add(&j32, &t2);
            let dsm: Vec<Vec<V>> = (0..sacc.len())
                .map(|nt| {
                    (0..4usize)
                        .map(|i| {
                            let off = k.i32((nt * 8 + i % 2) as i32);
                            let j = k.add(&jt, &off);
                            let vis = visible(k, s, &i_rows[i / 2], &j);
                            let (l2, dd) = &stats[i / 2];
                            let x = k.mul(&sacc[nt][i], &c);
                            let x = k.sub(&x, l2);
                            let pe = k.exp2(&x);
                            let p = k.select(&vis, &pe, &zero);
                            let tt = k.sub(&pacc[nt][i], dd);
                            k.mul(&p, &tt)
                        })
                        .collect()
                })
                .collect();
            let dsf = as_a_frags(k, &dsm);
            let mut acc: Vec<Vec<V>> = (0..nd).map(|dt| cur[4 * dt..4 * dt + 4].to_vec()).collect();
            products(k, &tile, kb, &dsf, &mut acc, &lpos);
            acc.into_iter().flatten().collect()
        });
        let sc = k.f32(s.scale());
        let acc: Vec<Vec<V>> = (0..nd).map(|dt| fin[4 * dt..4 * dt + 4].to_vec()).collect();
        store_rows(k, s, &acc, &[sc.clone(), sc], rope.as_ref(), &qd.rows, seq, &bs, &h, &qd.t, gq, &gqp);
    });
    let buf = |b: &BufferArg| Arg::Buffer(b.clone());
    let (gbuf, dbuf) = (cp.g.as_ref().expect("backward copies"), cp.delta.as_ref().expect("backward D"));
    let mut args = vec![buf(&cp.q), buf(&cp.k), buf(&cp.v), buf(gbuf), lse.arg(), buf(dbuf), gq.arg()];
    let positions = e.max_shape().1;
    args.extend(s.tables(e, positions));
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, row_grid(s.heads, OWN), smem as u32, args);
}
