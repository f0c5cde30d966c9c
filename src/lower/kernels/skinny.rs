//! Products of few rows, as decoding makes them (one row per sequence):
//! `out[m, n] = Σ_k x[m, k]·w[n, k]` for at most [`MAX_ROWS`] rows, bf16 operands. A product
//! like this reads every weight once for a few FLOPs each, so its speed is the rate it streams
//! `w`; a library GEMM tiles it for large `m` and leaves most of the GPU idle (a 1536×1536
//! product ran at about a tenth of the memory bandwidth).
//!
//! A block of 8 warps owns 8 output columns (one `mma.sync` n-tile) and all rows; its warps
//! take the 32-wide steps of `k` in turn, 6 steps in flight per warp. In a step each lane loads
//! 16 bytes of one weight row (8 consecutive `k`) and 16 bytes of each of its two `x` rows,
//! which are exactly the fragments of two m16n8k16 products once their `k` are permuted alike
//! in `x` and `w` (a sum does not depend on which slot holds which `k`). Rows of the tile past
//! the call's rows and columns past `n` only reach outputs that are never stored; the `k` tail is
//! zeroed. The warps' partial tiles meet in shared memory and are summed in warp order: no
//! atomics, the same bits every run.

use super::super::{Emit, Operand};
use super::{mma, sig};
use crate::lower::mlir::{Cmp, KernelBuilder, Ty, V};
use weft_runtime::device::{Arg, GridDim};
use weft_runtime::DType;

/// The most rows (the m16n8k16 tile's height).
pub(super) const MAX_ROWS: u64 = 16;
const WARPS: i64 = 8;
/// Output columns per block: one n-tile.
const COLS: i64 = 8;
/// `k` per step: two k16 products.
const STEP: i64 = 32;
/// Steps each warp has in flight: a 1536-wide `k` is one round trip to memory.
const UNROLL: i64 = 6;

/// Whether `x · wᵀ -> out` runs here: bf16 operands, at most [`MAX_ROWS`] rows at the plan's
/// largest call, and 16-byte aligned rows (`k` and both strides multiples of 8).
/// `WEFT_NO_SKINNY=1` at build time leaves every product to cuBLASLt (to compare the two).
pub(super) fn usable(e: &Emit, x: &Operand, w: &Operand, out: &Operand) -> bool {
    if std::env::var_os("WEFT_NO_SKINNY").is_some_and(|v| v == "1") {
        return false;
    }
    let (b, t) = e.max_shape();
    let rows = x.rows().eval(b, t);
    x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && matches!(out.dtype(), DType::BF16 | DType::F32)
        && rows >= 0
        && rows as u64 <= MAX_ROWS
        && x.width % 8 == 0
        && x.ld % 8 == 0
        && w.ld % 8 == 0
        && x.buf.offset % 16 == 0
        && w.buf.offset % 16 == 0
}

pub(super) fn matmul(e: &mut Emit, x: &Operand, w: &Operand, out: &Operand) {
    let (n, kd) = (out.width as i64, x.width as i64);
    let name = format!("matmul_rows{MAX_ROWS}_n{n}_k{kd}_{}", sig(&[x, w, out]));
    let mut k = KernelBuilder::new(&name, [(WARPS * 32) as u32, 1, 1]);
    let xp = k.ptr("x");
    let wp = k.ptr("w");
    let op = k.ptr("out");
    let rows = k.scalar_i64("rows");
    let red = k.shared("partial", Ty::F32, (WARPS * 32 * 4) as u64);
    let tid = k.thread_id('x');
    let c32 = k.i64(32);
    let lane = k.rem(&tid, &c32);
    let warp = k.div(&tid, &c32);
    let four = k.i64(4);
    let g = k.div(&lane, &four);
    let q = k.rem(&lane, &four);
    let bid = k.block_id('x');
    let cols = k.i64(COLS);
    let n0 = k.mul(&bid, &cols);
    // This lane's weight row (column g of the tile) and x rows g and g + 8, clamped in range.
    let col = k.add(&n0, &g);
    let last_col = k.i64(n - 1);
    let wrow = k.min(&col, &last_col);
    let one = k.i64(1);
    let zero = k.i64(0);
    let last_row = k.sub(&rows, &one);
    let last_row = k.max(&last_row, &zero);
    let r0 = k.min(&g, &last_row);
    let eight = k.i64(8);
    let g8 = k.add(&g, &eight);
    let r1 = k.min(&g8, &last_row);
    let qk = k.mul(&q, &eight);
    let row_at = |k: &mut KernelBuilder, o: &Operand, r: &V| {
        let ld = k.i64(o.ld as i64);
        k.mul(r, &ld)
    };
    let wbase = row_at(&mut k, w, &wrow);
    let xbase0 = row_at(&mut k, x, &r0);
    let xbase1 = row_at(&mut k, x, &r1);
    let steps = k.i64((kd as u64).div_ceil(STEP as u64) as i64);
    let fz = k.f32(0.0);
    let init = vec![fz.clone(), fz.clone(), fz.clone(), fz];
    let acc = k.for_(&warp, &steps, WARPS * UNROLL, &init, |k, s0, acc| {
        // Every load of the iteration first, then the products.
        let mut frags = Vec::new();
        for u in 0..UNROLL {
            let du = k.i64(u * WARPS);
            let s = k.add(&s0, &du);
            let st = k.i64(STEP);
            let kk = k.mul(&s, &st);
            let kk = k.add(&kk, &qk);
            let kmax = k.i64(kd);
            let inside = k.cmp(Cmp::Lt, &kk, &kmax);
            let klast = k.i64(kd - 8);
            let kc = k.min(&kk, &klast);
            let words = |k: &mut KernelBuilder, p: &V, base: &V| {
                let i = k.add(base, &kc);
                let two = k.i64(2);
                let i = k.div(&i, &two);
                let ws = k.load_vector(p, &i, Ty::I32, 4);
                let z = k.i32(0);
                ws.iter().map(|v| k.select(&inside, v, &z)).collect::<Vec<_>>()
            };
            let wv = words(k, &wp, &wbase);
            let x0 = words(k, &xp, &xbase0);
            let x1 = words(k, &xp, &xbase1);
            frags.push((wv, x0, x1));
        }
        let mut c = acc.to_vec();
        for (wv, x0, x1) in &frags {
            for h in 0..2 {
                let a = [x0[2 * h].clone(), x1[2 * h].clone(), x0[2 * h + 1].clone(), x1[2 * h + 1].clone()];
                c = mma(k, &a, &wv[2 * h..2 * h + 2], &c);
            }
        }
        c
    });
    // The tile's element (row g + 8i, column 2q + j) is this lane's acc[2i + j].
    let wl = k.mul(&warp, &c32);
    let wl = k.add(&wl, &lane);
    let slot0 = k.mul(&wl, &four);
    for (j, v) in acc.iter().enumerate() {
        let jj = k.i64(j as i64);
        let at = k.add(&slot0, &jj);
        k.shared_store(v, &red, &at);
    }
    k.barrier();
    let tile = k.i64(MAX_ROWS as i64 * COLS);
    let live = k.cmp(Cmp::Lt, &tid, &tile);
    k.if_(&live, |k| {
        let row = k.div(&tid, &cols);
        let c = k.rem(&tid, &cols);
        let rg = k.rem(&row, &eight);
        let ri = k.div(&row, &eight);
        let two = k.i64(2);
        let cq = k.div(&c, &two);
        let cj = k.rem(&c, &two);
        let src = k.mul(&rg, &four);
        let src = k.add(&src, &cq);
        let j = k.mul(&ri, &two);
        let j = k.add(&j, &cj);
        let nw = k.i64(WARPS);
        let zero = k.i64(0);
        let fz = k.f32(0.0);
        let sum = k.for_(&zero, &nw, 1, std::slice::from_ref(&fz), |k, wi, s| {
            let at = k.mul(&wi, &c32);
            let at = k.add(&at, &src);
            let at = k.mul(&at, &four);
            let at = k.add(&at, &j);
            let v = k.shared_load(&red, &at);
            vec![k.add(&s[0], &v)]
        });
        let oc = k.add(&n0, &c);
        let nn = k.i64(n);
        let in_col = k.cmp(Cmp::Lt, &oc, &nn);
        let in_row = k.cmp(Cmp::Lt, &row, &rows);
        let ok = k.and(&in_col, &in_row);
        k.if_(&ok, |k| {
            let base = row_at(k, out, &row);
            let at = k.add(&base, &oc);
            k.store(&sum[0], &op, &at, out.elem());
        });
    });
    let args = vec![x.arg(), w.arg(), out.arg(), Arg::I64 { value: x.rows() }];
    let grid = [GridDim::fixed((n as u64).div_ceil(COLS as u64) as i64), GridDim::fixed(1), GridDim::fixed(1)];
    e.launch(k, grid, 0, args);
}
