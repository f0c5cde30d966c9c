//! The optimizer step: the gradient norm (sum of squares), clipping, the learning-rate schedule
//! (scalars that stay on the device) and AdamW.

use super::super::{grid_1d, Emit, LowerError, Operand};
use super::{sig, THREADS};
use crate::lower::mlir::{Cmp, KernelBuilder, Ty, V};
use weft_runtime::device::{master_name, Arg, Base, BufferArg, Extent, GridDim, Table, Word};
use weft_runtime::op::{AdamWAttrs, ScheduleAttrs};
use weft_runtime::Op;

/// Blocks of the sum-of-squares kernel: each takes a strided share and writes its partial sum;
/// a one-block kernel then adds the partials in block order (no atomics: the same sum every run).
const SUM_BLOCKS: i64 = 264;

pub(super) fn sum_squares(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, out) = (&ins[0], &outs[0]);
    if !x.dense() {
        return Err(LowerError("sum_squares reads a dense tensor".into()));
    }
    let partial = e.scratch(Extent::constant(SUM_BLOCKS * 4));
    let name = format!("sum_squares_{}", sig(&[x]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let xp = k.ptr("x");
    let pp = k.ptr("partial");
    let n = k.scalar_i64("n");
    let scratch = k.shared("warp_sums", Ty::F32, (THREADS / 32) as u64);
    let tid = k.thread_id('x');
    let bid = k.block_id('x');
    let nb = k.grid_dim('x');
    let t = k.i64(THREADS as i64);
    let start = k.mul(&bid, &t);
    let start = k.add(&start, &tid);
    let stride = k.mul(&nb, &t);
    let zero = k.f32(0.0);
    let s = k.for_dyn(&start, &n, &stride, &[zero], |k, i, acc| {
        let v = k.load_f32(&xp, &i, x.elem());
        vec![k.fma(&v, &v, &acc[0])]
    });
    let total = k.block_sum(&s[0], &scratch);
    let z = k.i64(0);
    let first = k.cmp(Cmp::Eq, &tid, &z);
    k.if_(&first, |k| k.store(&total, &pp, &bid, Ty::F32));
    let args = vec![x.arg(), Arg::Buffer(partial.clone()), Arg::I64 { value: x.elems() }];
    e.launch(k, [GridDim::fixed(SUM_BLOCKS), GridDim::fixed(1), GridDim::fixed(1)], 0, args);
    sum_partials(e, &partial, SUM_BLOCKS as u64, out);
    Ok(())
}

/// `out = Σ partial[0..n]` (f32) by one block: each thread a strided share in index order, then
/// the block's fixed-order reduction.
pub(super) fn sum_partials(e: &mut Emit, partial: &BufferArg, n: u64, out: &Operand) {
    let name = format!("sum_partials_n{n}_{}", sig(&[out]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let pp = k.ptr("partial");
    let op = k.ptr("out");
    let scratch = k.shared("warp_sums", Ty::F32, (THREADS / 32) as u64);
    let tid = k.thread_id('x');
    let nv = k.i64(n as i64);
    let zero = k.f32(0.0);
    let s = k.for_(&tid, &nv, THREADS as i64, &[zero], |k, i, acc| {
        let v = k.load(&pp, &i, Ty::F32);
        vec![k.add(&acc[0], &v)]
    });
    let total = k.block_sum(&s[0], &scratch);
    let z = k.i64(0);
    let first = k.cmp(Cmp::Eq, &tid, &z);
    k.if_(&first, |k| k.store(&total, &op, &z, out.elem()));
    e.launch(k, grid_1d(Extent::constant(1), 1), 0, vec![Arg::Buffer(partial.clone()), out.arg()]);
}

/// A one-thread kernel over f32 scalars.
fn scalar_kernel(
    e: &mut Emit,
    name: &str,
    ins: &[&Operand],
    out: &Operand,
    f: impl FnOnce(&mut KernelBuilder, &[V]) -> V,
) {
    let mut k = KernelBuilder::new(name, [1, 1, 1]);
    let ptrs: Vec<_> = (0..ins.len()).map(|i| k.ptr(&format!("in{i}"))).collect();
    let op = k.ptr("out");
    let z = k.i64(0);
    let vals: Vec<_> = ins.iter().zip(&ptrs).map(|(o, p)| k.load(p, &z, o.elem())).collect();
    let r = f(&mut k, &vals);
    k.store(&r, &op, &z, out.elem());
    let mut args: Vec<Arg> = ins.iter().map(|o| o.arg()).collect();
    args.push(out.arg());
    e.launch(k, grid_1d(Extent::constant(1), 1), 0, args);
}

pub(super) fn add_scalar(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    scalar_kernel(e, "add_scalar", &[&ins[0], &ins[1]], &outs[0], |k, v| k.add(&v[0], &v[1]));
    Ok(())
}

/// `min(1, max_norm / (sqrt(ss) + 1e-6))`, or 1 when `max_norm` is 0.
pub(super) fn clip_scale(e: &mut Emit, max_norm: f64, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let name = format!("clip_scale_{:08x}", (max_norm as f32).to_bits());
    scalar_kernel(e, &name, &[&ins[0]], &outs[0], |k, v| {
        if max_norm <= 0.0 {
            return k.f32(1.0);
        }
        let s = k.sqrt(&v[0]);
        let eps = k.f32(1e-6);
        let d = k.add(&s, &eps);
        let m = k.f32(max_norm as f32);
        let r = k.div(&m, &d);
        let one = k.f32(1.0);
        k.min(&r, &one)
    });
    Ok(())
}

/// Warm-up then cosine decay, from the step counter on the device.
pub(super) fn lr_schedule(
    e: &mut Emit,
    s: &ScheduleAttrs,
    ins: &[Operand],
    outs: &[Operand],
) -> Result<(), LowerError> {
    let name = format!(
        "lr_schedule_{:08x}_{:08x}_{}_{}",
        (s.peak as f32).to_bits(),
        (s.min as f32).to_bits(),
        s.warmup,
        s.total
    );
    let s = s.clone();
    scalar_kernel(e, &name, &[&ins[0]], &outs[0], move |k, v| {
        let step = k.cast(&v[0], Ty::F32);
        let peak = k.f32(s.peak as f32);
        let warm = k.f32(s.warmup as f32);
        let one = k.f32(1.0);
        let sp1 = k.add(&step, &one);
        let wr = k.mul(&peak, &sp1);
        let warm_lr = k.div(&wr, &warm);
        let span = k.f32(s.total.saturating_sub(s.warmup).max(1) as f32);
        let since = k.sub(&step, &warm);
        let prog = k.div(&since, &span);
        let prog = k.min(&prog, &one);
        let pi = k.f32(std::f32::consts::PI);
        let ang = k.mul(&pi, &prog);
        let c = k.cos(&ang);
        let c1 = k.add(&one, &c);
        let half = k.f32(0.5 * (s.peak - s.min) as f32);
        let mn = k.f32(s.min as f32);
        let decay = k.fma(&half, &c1, &mn);
        let in_warmup = k.cmp(Cmp::Lt, &step, &warm);
        k.select(&in_warmup, &warm_lr, &decay)
    });
    Ok(())
}

/// AdamW, PyTorch's form, elementwise over one parameter tensor.
pub(super) fn adamw(e: &mut Emit, a: &AdamWAttrs, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let [p, g, m, v, lr, clip, step] = ins else { return Err(LowerError("adamw takes 7 inputs".into())) };
    let [p2, m2, v2] = outs else { return Err(LowerError("adamw has 3 outputs".into())) };
    for o in [p, g, m, v, p2, m2, v2] {
        if !o.dense() {
            return Err(LowerError("adamw reads dense tensors".into()));
        }
    }
    // A bf16 parameter is updated through its f32 master copy (read and written in place);
    // the bf16 output is the rounded master.
    let master = (p.dtype() == weft_runtime::DType::BF16).then(|| match &p.buf.base {
        Base::Value(v) => {
            e.persistent_name(*v).map(|n| BufferArg { base: Base::Persistent(master_name(&n)), offset: 0 })
        }
        _ => None,
    });
    let master = match master {
        Some(Some(m)) => Some(m),
        Some(None) => return Err(LowerError("adamw on a bf16 tensor that is not a parameter".into())),
        None => None,
    };
    let name = format!(
        "adamw{}_{}_{}",
        if master.is_some() { "_master" } else { "" },
        attrs_tag(a),
        sig(&[p, g, m, v, p2, m2, v2])
    );
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let (pp, gp, mp, vp, lrp, cp, sp, p2p, m2p, v2p) = (
        k.ptr("param"),
        k.ptr("grad"),
        k.ptr("m"),
        k.ptr("v"),
        k.ptr("lr"),
        k.ptr("clip"),
        k.ptr("step"),
        k.ptr("param_out"),
        k.ptr("m_out"),
        k.ptr("v_out"),
    );
    let mp32 = master.as_ref().map(|_| k.ptr("master"));
    let n = k.scalar_i64("n");
    let tid = k.thread_id('x');
    let bid = k.block_id('x');
    let t = k.i64(THREADS as i64);
    let i = k.mul(&bid, &t);
    let i = k.add(&i, &tid);
    let inside = k.cmp(Cmp::Lt, &i, &n);
    let sc = step_scalars(&mut k, a, &lrp, &cp, &sp);
    k.if_(&inside, |k| {
        let gv = k.load_f32(&gp, &i, g.elem());
        let mv = k.load_f32(&mp, &i, m.elem());
        let vv = k.load_f32(&vp, &i, v.elem());
        let pv = match &mp32 {
            Some(mp) => k.load(mp, &i, Ty::F32),
            None => k.load_f32(&pp, &i, p.elem()),
        };
        let (pn, mn, vn) = adamw_element(k, a, &sc, &gv, &mv, &vv, &pv);
        if let Some(mp) = &mp32 {
            k.store(&pn, mp, &i, Ty::F32);
        }
        k.store(&pn, &p2p, &i, p2.elem());
        k.store(&mn, &m2p, &i, m2.elem());
        k.store(&vn, &v2p, &i, v2.elem());
    });
    let args = vec![p.arg(), g.arg(), m.arg(), v.arg(), lr.arg(), clip.arg(), step.arg(), p2.arg(), m2.arg(), v2.arg()];
    let mut args = args;
    args.extend(master.map(Arg::Buffer));
    args.push(Arg::I64 { value: p.elems() });
    e.launch(k, grid_1d(p.elems(), THREADS as u64), 0, args);
    Ok(())
}

/// The words per tensor in a grouped AdamW's table: param, grad, m, v, param', m', v', master
/// (0 when none), element count.
const GROUP_WORDS: i64 = 9;

/// Elements per thread of the vectorised grouped AdamW.
const GROUP_VEC: i64 = 4;

/// AdamW over many tensors: one launch per kind of tensor (element types, master copy or not);
/// block row `y` takes tensor `y` of a device table of addresses, block columns share its
/// elements.
pub(super) fn adamw_group(e: &mut Emit, steps: &[usize]) -> Result<(), LowerError> {
    let plan = e.plan();
    let Op::AdamW(a) = &plan.steps[steps[0]].op else { return Err(LowerError("not an AdamW group".into())) };
    let a = a.clone();
    // Tensors by kind: the signature of their operands' types.
    let mut kinds: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for &i in steps {
        let s = &plan.steps[i];
        let ops: Vec<Operand> = s.inputs.iter().chain(&s.outputs).map(|&v| e.operand(v)).collect();
        let refs: Vec<&Operand> = ops.iter().take(4).chain(ops.iter().skip(7)).collect();
        kinds.entry(sig(&refs)).or_default().push(i);
    }
    for (kind, members) in kinds {
        let plan = e.plan();
        let first = &plan.steps[members[0]];
        let [p, g, m, v, lr, clip, step] = &first.inputs.iter().map(|&x| e.operand(x)).collect::<Vec<_>>()[..] else {
            return Err(LowerError("adamw takes 7 inputs".into()));
        };
        let outs: Vec<Operand> = first.outputs.iter().map(|&x| e.operand(x)).collect();
        let with_master = p.dtype() == weft_runtime::DType::BF16;
        let mut words = Vec::new();
        let mut largest = 0i64;
        // Vectors of four need every tensor's length a multiple of four and its start 16-byte
        // aligned (plan values and persistent tensors are allocated 256-byte aligned).
        let mut vectors_ok = true;
        for &i in &members {
            let s = &e.plan().steps[i];
            let ops: Vec<Operand> = s.inputs.iter().chain(&s.outputs).map(|&x| e.operand(x)).collect();
            for o in ops[..4].iter().chain(&ops[7..]) {
                if !o.dense() {
                    return Err(LowerError("adamw reads dense tensors".into()));
                }
                vectors_ok &= o.buf.offset % 16 == 0;
                words.push(Word::Address(o.buf.clone()));
            }
            let master = match (&ops[0].buf.base, with_master) {
                (Base::Value(v), true) => {
                    let n = e
                        .persistent_name(*v)
                        .ok_or_else(|| LowerError("adamw on a bf16 value that is no parameter".into()))?;
                    Word::Address(BufferArg { base: Base::Persistent(master_name(&n)), offset: 0 })
                }
                _ => Word::Int { value: 0 },
            };
            words.push(master);
            let n = ops[0].elems().c;
            vectors_ok &= n % GROUP_VEC == 0;
            largest = largest.max(n);
            words.push(Word::Int { value: n });
        }
        let table = e.table(Table::Words { words });
        let vectors = vectors_ok;
        let name = format!(
            "adamw_group{}{}_{}_{kind}",
            if with_master { "_master" } else { "" },
            if vectors { "_v4" } else { "" },
            attrs_tag(&a)
        );
        let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
        let (tp, lrp, cp, sp) = (k.ptr("table"), k.ptr("lr"), k.ptr("clip"), k.ptr("step"));
        let tensor = k.block_id('y');
        let nw = k.i64(GROUP_WORDS);
        let base = k.mul(&tensor, &nw);
        let word = |k: &mut KernelBuilder, j: i64| {
            let jj = k.i64(j);
            let idx = k.add(&base, &jj);
            k.load(&tp, &idx, Ty::I64)
        };
        let ptrs: Vec<_> = (0..8)
            .map(|j| {
                let w = word(&mut k, j);
                k.int_to_ptr(&w)
            })
            .collect();
        let n = word(&mut k, 8);
        let sc = step_scalars(&mut k, &a, &lrp, &cp, &sp);
        let tid = k.thread_id('x');
        let bid = k.block_id('x');
        let nb = k.grid_dim('x');
        let tt = k.i64(THREADS as i64);
        let start = k.mul(&bid, &tt);
        let start = k.add(&start, &tid);
        let stride = k.mul(&nb, &tt);
        let (pe, ge, me, ve) = (p.elem(), g.elem(), m.elem(), v.elem());
        let (p2e, m2e, v2e) = (outs[0].elem(), outs[1].elem(), outs[2].elem());
        if vectors {
            // Four elements a thread, each tensor read and written as vectors.
            let four = k.i64(GROUP_VEC);
            let n4 = k.div(&n, &four);
            k.for_dyn(&start, &n4, &stride, &[], |k, q, _| {
                let i = k.mul(&q, &four);
                let lanes = GROUP_VEC as usize;
                let gv = k.load_vector_f32(&ptrs[1], &i, ge, lanes);
                let mv = k.load_vector_f32(&ptrs[2], &i, me, lanes);
                let vv = k.load_vector_f32(&ptrs[3], &i, ve, lanes);
                let pv = if with_master {
                    k.load_vector_f32(&ptrs[7], &i, Ty::F32, lanes)
                } else {
                    k.load_vector_f32(&ptrs[0], &i, pe, lanes)
                };
                let mut out: [Vec<V>; 3] = Default::default();
                for j in 0..lanes {
                    let (pn, mn, vn) = adamw_element(k, &a, &sc, &gv[j], &mv[j], &vv[j], &pv[j]);
                    out[0].push(pn);
                    out[1].push(mn);
                    out[2].push(vn);
                }
                if with_master {
                    k.store_vector(&out[0], &ptrs[7], &i, Ty::F32);
                }
                k.store_vector(&out[0], &ptrs[4], &i, p2e);
                k.store_vector(&out[1], &ptrs[5], &i, m2e);
                k.store_vector(&out[2], &ptrs[6], &i, v2e);
                vec![]
            });
            let blocks = (largest.max(1) as u64).div_ceil(GROUP_VEC as u64 * THREADS as u64).min(1024) as i64;
            let grid = [GridDim::fixed(blocks), GridDim::fixed(members.len() as i64), GridDim::fixed(1)];
            e.launch(k, grid, 0, vec![Arg::Buffer(table), lr.arg(), clip.arg(), step.arg()]);
            continue;
        }
        k.for_dyn(&start, &n, &stride, &[], |k, i, _| {
            let gv = k.load_f32(&ptrs[1], &i, ge);
            let mv = k.load_f32(&ptrs[2], &i, me);
            let vv = k.load_f32(&ptrs[3], &i, ve);
            let pv = if with_master { k.load(&ptrs[7], &i, Ty::F32) } else { k.load_f32(&ptrs[0], &i, pe) };
            let (pn, mn, vn) = adamw_element(k, &a, &sc, &gv, &mv, &vv, &pv);
            if with_master {
                k.store(&pn, &ptrs[7], &i, Ty::F32);
            }
            k.store(&pn, &ptrs[4], &i, p2e);
            k.store(&mn, &ptrs[5], &i, m2e);
            k.store(&vn, &ptrs[6], &i, v2e);
            vec![]
        });
        let blocks = (largest.max(1) as u64).div_ceil(THREADS as u64).min(1024) as i64;
        let grid = [GridDim::fixed(blocks), GridDim::fixed(members.len() as i64), GridDim::fixed(1)];
        e.launch(k, grid, 0, vec![Arg::Buffer(table), lr.arg(), clip.arg(), step.arg()]);
    }
    Ok(())
}

/// AdamW's attributes as exact f32 bit patterns, for kernel names.
fn attrs_tag(a: &AdamWAttrs) -> String {
    [a.beta1, a.beta2, a.eps, a.weight_decay].map(|x| format!("{:08x}", (x as f32).to_bits())).join("_")
}

/// The scalars every element of a step shares, read from the device: the learning rate, the
/// clip factor and the bias corrections `1/(1 − β₁ᵗ)`, `1/(1 − β₂ᵗ)` at `t = step + 1`.
struct StepScalars {
    lr: V,
    clip: V,
    c1: V,
    c2: V,
}

fn step_scalars(k: &mut KernelBuilder, a: &AdamWAttrs, lr: &V, clip: &V, step: &V) -> StepScalars {
    let z = k.i64(0);
    let lr = k.load(lr, &z, Ty::F32);
    let clip = k.load(clip, &z, Ty::F32);
    let st = k.load(step, &z, Ty::I32);
    let one_i = k.i32(1);
    let st = k.add(&st, &one_i);
    let t = k.cast(&st, Ty::F32);
    let one = k.f32(1.0);
    // βᵗ = 2^(t·log2 β).
    let mut correction = |beta: f64| {
        let l = k.f32((beta as f32).log2());
        let e = k.mul(&t, &l);
        let bt = k.exp2(&e);
        let d = k.sub(&one, &bt);
        k.recip(&d)
    };
    let (c1, c2) = (correction(a.beta1), correction(a.beta2));
    StepScalars { lr, clip, c1, c2 }
}

/// One element of AdamW (PyTorch's form, decoupled decay) from f32 gradient, moments and
/// parameter: returns the parameter and the moments after the step.
#[allow(clippy::too_many_arguments)]
fn adamw_element(k: &mut KernelBuilder, a: &AdamWAttrs, s: &StepScalars, g: &V, m: &V, v: &V, p: &V) -> (V, V, V) {
    let g = k.mul(g, &s.clip);
    let b1 = k.f32(a.beta1 as f32);
    let b2 = k.f32(a.beta2 as f32);
    let ob1 = k.f32(1.0 - a.beta1 as f32);
    let ob2 = k.f32(1.0 - a.beta2 as f32);
    let mg = k.mul(&ob1, &g);
    let mn = k.fma(&b1, m, &mg);
    let gg = k.mul(&g, &g);
    let vg = k.mul(&ob2, &gg);
    let vn = k.fma(&b2, v, &vg);
    let mhat = k.mul(&mn, &s.c1);
    let vhat = k.mul(&vn, &s.c2);
    let sq = k.sqrt(&vhat);
    let eps = k.f32(a.eps as f32);
    let den = k.add(&sq, &eps);
    let upd = k.div(&mhat, &den);
    let upd = k.mul(&s.lr, &upd);
    let one = k.f32(1.0);
    let wd = k.f32(a.weight_decay as f32);
    let lwd = k.mul(&s.lr, &wd);
    let decay = k.sub(&one, &lwd);
    let pn = k.mul(p, &decay);
    let pn = k.sub(&pn, &upd);
    (pn, mn, vn)
}
