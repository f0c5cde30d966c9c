//! RMSNorm forward (alone or after the residual add) and backward (alone or with the residual
//! gradient it joins): one block per row, the sum of squares reduced across the block.

use super::super::{grid_1d, Emit, LowerError, Operand};
use super::{load_at, sig, store_at, THREADS};
use crate::lower::mlir::{KernelBuilder, Ty, V};
use weft_runtime::device::{Arg, Extent, GridDim};

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
/// share of the weight gradient in shared memory, added to the f32 output once at the end.
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
    let width = x.width;
    let family = if add { "rms_norm_backward_add" } else { "rms_norm_backward" };
    let mut all = vec![x, w, g];
    all.extend(skip);
    all.extend([gx, gw]);
    let name = format!("{family}_w{width}_{}", sig(&all));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let xp = k.ptr("x");
    let wp = k.ptr("weight");
    let gp = k.ptr("g");
    let sp = skip.map(|_| k.ptr("g_skip"));
    let gxp = k.ptr("g_x");
    let gwp = k.ptr("g_weight");
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
    k.for_(&tid, &wd, THREADS as i64, &[], |k, j, _| {
        let v = k.shared_load(&acc, &j);
        k.atomic_add(&v, &gwp, &j);
        vec![]
    });
    e.zero(gw.buf.clone(), super::bytes_of(gw));
    let mut args = vec![x.arg(), w.arg(), g.arg()];
    args.extend(skip.map(|s| s.arg()));
    args.extend([gx.arg(), gw.arg(), Arg::I64 { value: x.rows() }]);
    let grid = [GridDim { extent: Extent::constant(BLOCKS), per_block: 1 }, GridDim::fixed(1), GridDim::fixed(1)];
    e.launch(k, grid, 0, args);
    Ok(())
}
