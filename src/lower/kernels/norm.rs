//! RMSNorm forward (alone or after the residual add) and backward (alone or with the residual
//! gradient it joins).
//!
//! Where the width is a multiple of 256 and every operand's rows are 16-byte aligned (the
//! models' widths), one warp owns a row: lane `l` holds columns `8(l + 32i)…+8`, read and
//! written as 16-byte vectors, and the row's sums are warp shuffles. The backward's warps each
//! walk many rows adding their share of g_w into a row of shared memory; a block's rows are
//! summed in warp order, then the blocks' sums in block order by a second kernel.
//! Other widths run one block per row, the sum of squares reduced across the block.

use super::super::{grid_1d, Emit, LowerError, Operand};
use super::{load8, load_at, sig, store8, store_at, vector_aligned, THREADS, VEC};
use crate::lower::mlir::{Cmp, KernelBuilder, Ty, V};
use weft_runtime::device::{Arg, BufferArg, Extent, GridDim};

/// `1 / sqrt(mean(x²) + eps)` of the row, computed by the whole block from `value(j)`.
fn inv_rms(k: &mut KernelBuilder, width: u64, eps: f64, value: impl Fn(&mut KernelBuilder, &V) -> V) -> V {
    let scratch = k.shared("partial", Ty::F32, (THREADS / 32) as u64);
    let tid = k.thread_id('x');
    let w = k.i64(width as i64);
    let zero = k.f32(0.0);
    let ss = k.for_(&tid, &w, THREADS as i64, &[zero], |k, j, acc| {
        let x = value(k, &j);
        vec![k.fma(&x, &x, &acc[0])]
    });
    let total = k.block_sum(&ss[0], &scratch);
    let inv_w = k.f32(1.0 / width as f32);
    let mean = k.mul(&total, &inv_w);
    let e = k.f32(eps as f32);
    let me = k.add(&mean, &e);
    let sd = k.sqrt(&me);
    k.recip(&sd)
}

pub(super) fn rms_norm(e: &mut Emit, eps: f64, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, y) = (&ins[0], &ins[1], &outs[0]);
    if warp_rows(x.width, &[x, w, y]) {
        forward_warp(e, eps, [x, w, y], None);
        return Ok(());
    }
    e.fallback(block_rows_reason(x.width));
    let width = x.width;
    let name = format!("rms_norm_w{width}_{}", sig(&[x, w, y]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let xp = k.ptr("x");
    let wp = k.ptr("weight");
    let yp = k.ptr("y");
    let row = k.block_id('x');
    let r = inv_rms(&mut k, width, eps, |k, j| load_at(k, &xp, x, &row, j));
    let tid = k.thread_id('x');
    let wd = k.i64(width as i64);
    k.for_(&tid, &wd, THREADS as i64, &[], |k, j, _| {
        let xv = load_at(k, &xp, x, &row, &j);
        let zero = k.i64(0);
        let wv = load_at(k, &wp, w, &zero, &j);
        let n = k.mul(&xv, &r);
        let out = k.mul(&n, &wv);
        store_at(k, &out, &yp, y, &row, &j);
        vec![]
    });
    e.launch(k, grid_1d(x.rows(), 1), 0, vec![x.arg(), w.arg(), y.arg()]);
    Ok(())
}

/// `s = x + y` (stored), `out = rms_norm(s)` from the unrounded sum.
pub(super) fn add_rms_norm(e: &mut Emit, eps: f64, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, y, w) = (&ins[0], &ins[1], &ins[2]);
    let (s, out) = (&outs[0], &outs[1]);
    if warp_rows(x.width, &[x, y, w, s, out]) {
        forward_warp(e, eps, [x, w, out], Some([y, s]));
        return Ok(());
    }
    e.fallback(block_rows_reason(x.width));
    let width = x.width;
    let name = format!("add_rms_norm_w{width}_{}", sig(&[x, y, w, s, out]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let xp = k.ptr("x");
    let yp = k.ptr("y");
    let wp = k.ptr("weight");
    let sp = k.ptr("sum");
    let op = k.ptr("out");
    let row = k.block_id('x');
    let sum = |k: &mut KernelBuilder, j: &V| {
        let a = load_at(k, &xp, x, &row, j);
        let b = load_at(k, &yp, y, &row, j);
        k.add(&a, &b)
    };
    let r = inv_rms(&mut k, width, eps, sum);
    let tid = k.thread_id('x');
    let wd = k.i64(width as i64);
    k.for_(&tid, &wd, THREADS as i64, &[], |k, j, _| {
        let v = sum(k, &j);
        store_at(k, &v, &sp, s, &row, &j);
        let zero = k.i64(0);
        let wv = load_at(k, &wp, w, &zero, &j);
        let n = k.mul(&v, &r);
        let o = k.mul(&n, &wv);
        store_at(k, &o, &op, out, &row, &j);
        vec![]
    });
    e.launch(k, grid_1d(x.rows(), 1), 0, vec![x.arg(), y.arg(), w.arg(), s.arg(), out.arg()]);
    Ok(())
}

/// Blocks of the backward kernels: each takes rows `block, block + BLOCKS, ...` and keeps its
/// share of the weight gradient in shared memory, written out as one partial row at the end.
const BLOCKS: i64 = 528;

/// With `r = inv_rms(x)`, `x̂ = x·r`, `u = g·w`: `g_x = r·(u − x̂·mean(u·x̂))` (plus `g_skip`
/// when `add`), `g_w = Σ_rows g·x̂`.
pub(super) fn rms_norm_backward(
    e: &mut Emit,
    eps: f64,
    ins: &[Operand],
    outs: &[Operand],
    add: bool,
) -> Result<(), LowerError> {
    let (x, w, g) = (&ins[0], &ins[1], &ins[2]);
    let skip = ins.get(3).filter(|_| add);
    let (gx, gw) = (&outs[0], &outs[1]);
    let mut all = vec![x, w, g, gx];
    all.extend(skip);
    if warp_rows(x.width, &all) {
        backward_warp(e, eps, [x, w, g, gx, gw], skip);
        return Ok(());
    }
    e.fallback(block_rows_reason(x.width));
    let width = x.width;
    let family = if add { "rms_norm_backward_add" } else { "rms_norm_backward" };
    let mut all = vec![x, w, g];
    all.extend(skip);
    all.extend([gx, gw]);
    let name = format!("{family}_w{width}_{}", sig(&all));
    let partial = e.scratch(Extent::constant(BLOCKS * width as i64 * 4));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let xp = k.ptr("x");
    let wp = k.ptr("weight");
    let gp = k.ptr("g");
    let sp = skip.map(|_| k.ptr("g_skip"));
    let gxp = k.ptr("g_x");
    let pp = k.ptr("block_partials");
    let rows = k.scalar_i64("rows");
    let acc = k.shared("g_weight_part", Ty::F32, width);
    let dot_scratch = k.shared("dot_partial", Ty::F32, (THREADS / 32) as u64);
    let tid = k.thread_id('x');
    let wd = k.i64(width as i64);
    k.for_(&tid, &wd, THREADS as i64, &[], |k, j, _| {
        let z = k.f32(0.0);
        k.shared_store(&z, &acc, &j);
        vec![]
    });
    let first = k.block_id('x');
    let stride = k.grid_dim('x');
    k.for_dyn(&first, &rows, &stride, &[], |k, row, _| {
        let r = inv_rms(k, width, eps, |k, j| load_at(k, &xp, x, &row, j));
        let zero = k.f32(0.0);
        let part = k.for_(&tid, &wd, THREADS as i64, &[zero], |k, j, a| {
            let xv = load_at(k, &xp, x, &row, &j);
            let gv = load_at(k, &gp, g, &row, &j);
            let z = k.i64(0);
            let wv = load_at(k, &wp, w, &z, &j);
            let u = k.mul(&gv, &wv);
            let xh = k.mul(&xv, &r);
            vec![k.fma(&u, &xh, &a[0])]
        });
        let dot = k.block_sum(&part[0], &dot_scratch);
        let inv_w = k.f32(1.0 / width as f32);
        let mean = k.mul(&dot, &inv_w);
        k.for_(&tid, &wd, THREADS as i64, &[], |k, j, _| {
            let xv = load_at(k, &xp, x, &row, &j);
            let gv = load_at(k, &gp, g, &row, &j);
            let z = k.i64(0);
            let wv = load_at(k, &wp, w, &z, &j);
            let u = k.mul(&gv, &wv);
            let xh = k.mul(&xv, &r);
            let t = k.mul(&xh, &mean);
            let d = k.sub(&u, &t);
            let mut out = k.mul(&d, &r);
            if let (Some(so), Some(sp)) = (skip, &sp) {
                let sv = load_at(k, sp, so, &row, &j);
                out = k.add(&out, &sv);
            }
            store_at(k, &out, &gxp, gx, &row, &j);
            let old = k.shared_load(&acc, &j);
            let new = k.fma(&gv, &xh, &old);
            k.shared_store(&new, &acc, &j);
            vec![]
        });
        vec![]
    });
    // The block's share of g_w, summed over blocks in block order by the next kernel.
    let bid = k.block_id('x');
    k.for_(&tid, &wd, THREADS as i64, &[], |k, j, _| {
        let v = k.shared_load(&acc, &j);
        let r = k.mul(&bid, &wd);
        let r = k.add(&r, &j);
        k.store(&v, &pp, &r, Ty::F32);
        vec![]
    });
    let mut args = vec![x.arg(), w.arg(), g.arg()];
    args.extend(skip.map(|s| s.arg()));
    args.extend([gx.arg(), Arg::Buffer(partial.clone()), Arg::I64 { value: x.rows() }]);
    let grid = [GridDim { extent: Extent::constant(BLOCKS), per_block: 1 }, GridDim::fixed(1), GridDim::fixed(1)];
    e.launch(k, grid, 0, args);
    weight_grad(e, &partial, BLOCKS, width, gw);
    Ok(())
}

// ---- one warp per row ----

/// Blocks of the warp-per-row backward (four per SM of an H100/H200), and their threads (4 warps,
/// whose rows of g_w's share fit static shared memory up to width 3072).
const WARP_BLOCKS: i64 = 528;
const BWD_THREADS: u32 = 128;

fn warp_rows(width: u64, ops: &[&Operand]) -> bool {
    width % (32 * VEC) == 0 && width <= MAX_WARP_WIDTH && ops.iter().all(|o| vector_aligned(o))
}

/// Why an RMSNorm runs one block per row.
fn block_rows_reason(width: u64) -> String {
    format!(
        "RMSNorm of width {width} runs one block per row; the faster warp-per-row kernels take widths that are multiples of {} up to {MAX_WARP_WIDTH}, with 16-byte aligned rows",
        32 * VEC
    )
}

/// The widest row of the warp-per-row kernels (the backward's shared memory: 4 rows of f32).
const MAX_WARP_WIDTH: u64 = 3072;

/// The lane's column groups of a row `width` wide: `8(lane + 32i)`.
fn lane_cols(k: &mut KernelBuilder, lane: &V, width: u64) -> Vec<V> {
    (0..width / (32 * VEC))
        .map(|i| {
            let off = k.i64(32 * i as i64);
            let c = k.add(lane, &off);
            let v = k.i64(VEC as i64);
            k.mul(&c, &v)
        })
        .collect()
}

/// `1 / sqrt(Σ/width + eps)` from a lane's partial sum of squares.
fn warp_inv_rms(k: &mut KernelBuilder, partial: &V, width: u64, eps: f64) -> V {
    let total = k.warp_sum(partial);
    let inv_w = k.f32(1.0 / width as f32);
    let mean = k.mul(&total, &inv_w);
    let e = k.f32(eps as f32);
    let me = k.add(&mean, &e);
    let sd = k.sqrt(&me);
    k.recip(&sd)
}

/// `out = rms_norm(x [+ y])·w`, storing the sum as `s` when `add = [y, s]`: 8 rows per block.
fn forward_warp(e: &mut Emit, eps: f64, ops: [&Operand; 3], add: Option<[&Operand; 2]>) {
    let [x, w, out] = ops;
    let width = x.width;
    let mut all = vec![x, w, out];
    if let Some([y, s]) = add {
        all.extend([y, s]);
    }
    let family = if add.is_some() { "add_rms_norm_warp" } else { "rms_norm_warp" };
    let name = format!("{family}_w{width}_{}", sig(&all));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let xp = k.ptr("x");
    let wp = k.ptr("weight");
    let op = k.ptr("out");
    let ys = add.map(|_| (k.ptr("y"), k.ptr("sum")));
    let rows = k.scalar_i64("rows");
    let tid = k.thread_id('x');
    let c32 = k.i64(32);
    let lane = k.rem(&tid, &c32);
    let warp = k.div(&tid, &c32);
    let bid = k.block_id('x');
    let wpb = k.i64(THREADS as i64 / 32);
    let row = k.mul(&bid, &wpb);
    let row = k.add(&row, &warp);
    let inside = k.cmp(Cmp::Lt, &row, &rows);
    k.if_(&inside, |k| {
        let cols = lane_cols(k, &lane, width);
        let vals: Vec<Vec<V>> = cols
            .iter()
            .map(|c| {
                let a = load8(k, &xp, x, &row, c);
                match (add, &ys) {
                    (Some([y, _]), Some((yp, _))) => {
                        let b = load8(k, yp, y, &row, c);
                        a.iter().zip(&b).map(|(p, q)| k.add(p, q)).collect()
                    }
                    _ => a,
                }
            })
            .collect();
        let mut ss = k.f32(0.0);
        for v in vals.iter().flatten() {
            ss = k.fma(v, v, &ss);
        }
        let r = warp_inv_rms(k, &ss, width, eps);
        let zero = k.i64(0);
        for (c, v) in cols.iter().zip(&vals) {
            if let (Some([_, s]), Some((_, sp))) = (add, &ys) {
                store8(k, v, sp, s, &row, c);
            }
            let wv = load8(k, &wp, w, &zero, c);
            let o: Vec<V> = v
                .iter()
                .zip(&wv)
                .map(|(a, b)| {
                    let n = k.mul(a, &r);
                    k.mul(&n, b)
                })
                .collect();
            store8(k, &o, &op, out, &row, c);
        }
    });
    let mut args = vec![x.arg(), w.arg(), out.arg()];
    if let Some([y, s]) = add {
        args.extend([y.arg(), s.arg()]);
    }
    args.push(Arg::I64 { value: x.rows() });
    e.launch(k, grid_1d(x.rows(), THREADS as u64 / 32), 0, args);
}

/// The backward with one warp per row (see the module notes): `g_x`, then `g_w` from per-block
/// partial rows. Each warp adds its rows' `g·x̂` into its own row of shared memory, stored
/// column-major by lane (element `8q + j` at `j·width/8 + q`) so a warp's accesses hit distinct
/// banks.
fn backward_warp(e: &mut Emit, eps: f64, ops: [&Operand; 5], skip: Option<&Operand>) {
    let [x, w, g, gx, gw] = ops;
    let width = x.width;
    let mut all = vec![x, w, g];
    all.extend(skip);
    all.extend([gx, gw]);
    let family = if skip.is_some() { "rms_norm_backward_add_warp" } else { "rms_norm_backward_warp" };
    let name = format!("{family}_w{width}_{}", sig(&all));
    let partial = e.scratch(Extent::constant(WARP_BLOCKS * width as i64 * 4));
    let mut k = KernelBuilder::new(&name, [BWD_THREADS, 1, 1]);
    // Without a stated cap ptxas aims at more blocks per SM than fit and spills; 128 registers
    // keep four blocks of 4 warps.
    k.max_registers(128);
    let xp = k.ptr("x");
    let wp = k.ptr("weight");
    let gp = k.ptr("g");
    let sp = skip.map(|_| k.ptr("g_skip"));
    let gxp = k.ptr("g_x");
    let pp = k.ptr("partial");
    let rows = k.scalar_i64("rows");
    let wpb = BWD_THREADS as i64 / 32;
    let red = k.shared("g_weight_part", Ty::F32, wpb as u64 * width);
    let tid = k.thread_id('x');
    let c32 = k.i64(32);
    let lane = k.rem(&tid, &c32);
    let warp = k.div(&tid, &c32);
    let bid = k.block_id('x');
    let wpbv = k.i64(wpb);
    let first = k.mul(&bid, &wpbv);
    let first = k.add(&first, &warp);
    let stride = k.i64(WARP_BLOCKS * wpb);
    let cols = lane_cols(&mut k, &lane, width);
    let wd = k.i64(width as i64);
    let total = k.i64(wpb * width as i64);
    k.for_(&tid, &total, BWD_THREADS as i64, &[], |k, j, _| {
        let z = k.f32(0.0);
        k.shared_store(&z, &red, &j);
        vec![]
    });
    k.barrier();
    // Slot of element `8q + j` of this warp's row: q = lane + 32i for column group i.
    let per_j = k.i64((width / VEC) as i64);
    let row_base = k.mul(&warp, &wd);
    let slot = |k: &mut KernelBuilder, ci: usize, j: usize| -> V {
        let q = k.i64(32 * ci as i64);
        let q = k.add(&lane, &q);
        let jo = k.i64(j as i64);
        let o = k.mul(&jo, &per_j);
        let o = k.add(&o, &q);
        k.add(&row_base, &o)
    };
    let zero = k.i64(0);
    k.for_dyn(&first, &rows, &stride, &[], |k, row, _| {
        let mut ss = k.f32(0.0);
        let mut dot = k.f32(0.0);
        for c in &cols {
            let xv = load8(k, &xp, x, &row, c);
            let gv = load8(k, &gp, g, &row, c);
            let wv = load8(k, &wp, w, &zero, c);
            for i in 0..VEC as usize {
                ss = k.fma(&xv[i], &xv[i], &ss);
                let u = k.mul(&gv[i], &wv[i]);
                dot = k.fma(&u, &xv[i], &dot);
            }
        }
        let r = warp_inv_rms(k, &ss, width, eps);
        let dot = k.warp_sum(&dot);
        // mean(u·x̂) = r·Σ(u·x)/width.
        let inv_w = k.f32(1.0 / width as f32);
        let mean = k.mul(&dot, &inv_w);
        let mean = k.mul(&mean, &r);
        for (ci, c) in cols.iter().enumerate() {
            let xv = load8(k, &xp, x, &row, c);
            let gv = load8(k, &gp, g, &row, c);
            let wv = load8(k, &wp, w, &zero, c);
            let sv = match (skip, &sp) {
                (Some(so), Some(sp)) => Some(load8(k, sp, so, &row, c)),
                _ => None,
            };
            let mut res = Vec::new();
            for i in 0..VEC as usize {
                let xh = k.mul(&xv[i], &r);
                let u = k.mul(&gv[i], &wv[i]);
                let t = k.mul(&xh, &mean);
                let d = k.sub(&u, &t);
                let mut o = k.mul(&d, &r);
                if let Some(sv) = &sv {
                    o = k.add(&o, &sv[i]);
                }
                res.push(o);
                let at = slot(k, ci, i);
                let old = k.shared_load(&red, &at);
                let new = k.fma(&gv[i], &xh, &old);
                k.shared_store(&new, &red, &at);
            }
            store8(k, &res, &gxp, gx, &row, c);
        }
        vec![]
    });
    // The block's share of g_w: its warps' rows added in warp order.
    k.barrier();
    k.for_(&tid, &wd, BWD_THREADS as i64, &[], |k, col, _| {
        let v8 = k.i64(VEC as i64);
        let q = k.div(&col, &v8);
        let j = k.rem(&col, &v8);
        let o = k.mul(&j, &per_j);
        let o = k.add(&o, &q);
        let mut sum = k.f32(0.0);
        for wi in 0..wpb {
            let base = k.i64(wi * width as i64);
            let at = k.add(&base, &o);
            let v = k.shared_load(&red, &at);
            sum = k.add(&sum, &v);
        }
        let r = k.mul(&bid, &wd);
        let r = k.add(&r, &col);
        k.store(&sum, &pp, &r, Ty::F32);
        vec![]
    });
    let mut args = vec![x.arg(), w.arg(), g.arg()];
    args.extend(skip.map(|s| s.arg()));
    args.extend([gx.arg(), Arg::Buffer(partial.clone()), Arg::I64 { value: x.rows() }]);
    let grid = [GridDim::fixed(WARP_BLOCKS), GridDim::fixed(1), GridDim::fixed(1)];
    e.launch(k, grid, 0, args);

    weight_grad(e, &partial, WARP_BLOCKS, width, gw);
}

/// `g_w[j] = Σ_b partial[b·width + j]` over `blocks` block rows, in block order.
fn weight_grad(e: &mut Emit, partial: &BufferArg, blocks: i64, width: u64, gw: &Operand) {
    let name = format!("rms_norm_weight_grad_w{width}_b{blocks}_{}", sig(&[gw]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let pp = k.ptr("partial");
    let gwp = k.ptr("g_weight");
    let j = super::chunks::channel(&mut k);
    let wd = k.i64(width as i64);
    let inside = k.cmp(Cmp::Lt, &j, &wd);
    k.if_(&inside, |k| {
        let zero = k.i64(0);
        let nb = k.i64(blocks);
        let zf = k.f32(0.0);
        let sum = k.for_(&zero, &nb, 1, &[zf], |k, b, acc| {
            let r = k.mul(&b, &wd);
            let r = k.add(&r, &j);
            let v = k.load(&pp, &r, Ty::F32);
            vec![k.add(&acc[0], &v)]
        });
        let z = k.i64(0);
        store_at(k, &sum[0], &gwp, gw, &z, &j);
    });
    let args = vec![Arg::Buffer(partial.clone()), gw.arg()];
    e.launch(k, grid_1d(Extent::constant(width as i64), THREADS as u64), 0, args);
}
