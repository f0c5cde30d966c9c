//! Elementwise kernels: one thread per element of a `rows × width` tensor, each operand read
//! with its own row stride (slices are views), math in f32.

use super::super::{grid_1d, Emit, LowerError, Operand};
use super::{load8, load_at, sig, store8, store_at, vector_aligned, THREADS, VEC};
use crate::lower::mlir::{Cmp, KernelBuilder, Ty, V};
use weft_runtime::device::{Arg, BufferArg, Extent};

/// `outs[r, j] = f(ins[r, j]...)` over the first output's rows × width. Where the width is a
/// multiple of 8 and every operand's rows are 16-byte aligned, a thread takes 8 consecutive
/// elements of a row as 16-byte vectors.
fn map(
    e: &mut Emit,
    family: &str,
    ins: &[&Operand],
    outs: &[&Operand],
    f: impl Fn(&mut KernelBuilder, &[V]) -> Vec<V>,
) {
    let width = outs[0].width;
    if width % VEC == 0 && ins.iter().chain(outs).all(|o| vector_aligned(o)) {
        map_vectors(e, family, ins, outs, f);
        return;
    }
    let all: Vec<&Operand> = ins.iter().chain(outs).copied().collect();
    let name = format!("{family}_w{width}_{}", sig(&all));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let in_ptrs: Vec<V> = (0..ins.len()).map(|i| k.ptr(&format!("in{i}"))).collect();
    let out_ptrs: Vec<V> = (0..outs.len()).map(|i| k.ptr(&format!("out{i}"))).collect();
    let rows = k.scalar_i64("rows");
    let (idx, row, col) = element_index(&mut k, width);
    let w = k.i64(width as i64);
    let total = k.mul(&rows, &w);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let vals: Vec<V> = ins.iter().zip(&in_ptrs).map(|(o, p)| load_at(k, p, o, &row, &col)).collect();
        let res = f(k, &vals);
        for ((o, p), v) in outs.iter().zip(&out_ptrs).zip(&res) {
            store_at(k, v, p, o, &row, &col);
        }
    });
    let mut args: Vec<Arg> = ins.iter().chain(outs).map(|o| o.arg()).collect();
    args.push(Arg::I64 { value: outs[0].rows() });
    e.launch(k, grid_1d(outs[0].rows().times(width as i64), THREADS as u64), 0, args);
}

/// [`map`] with 8 elements a thread.
fn map_vectors(
    e: &mut Emit,
    family: &str,
    ins: &[&Operand],
    outs: &[&Operand],
    f: impl Fn(&mut KernelBuilder, &[V]) -> Vec<V>,
) {
    let width = outs[0].width;
    let all: Vec<&Operand> = ins.iter().chain(outs).copied().collect();
    let name = format!("{family}_v{VEC}_w{width}_{}", sig(&all));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let in_ptrs: Vec<V> = (0..ins.len()).map(|i| k.ptr(&format!("in{i}"))).collect();
    let out_ptrs: Vec<V> = (0..outs.len()).map(|i| k.ptr(&format!("out{i}"))).collect();
    let rows = k.scalar_i64("rows");
    let groups = width / VEC;
    let (idx, row, g) = element_index(&mut k, groups);
    let gv = k.i64(groups as i64);
    let total = k.mul(&rows, &gv);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let v8 = k.i64(VEC as i64);
        let col = k.mul(&g, &v8);
        let vals: Vec<Vec<V>> = ins.iter().zip(&in_ptrs).map(|(o, p)| load8(k, p, o, &row, &col)).collect();
        let mut res: Vec<Vec<V>> = vec![Vec::new(); outs.len()];
        for i in 0..VEC as usize {
            let args: Vec<V> = vals.iter().map(|v| v[i].clone()).collect();
            for (r, y) in res.iter_mut().zip(f(k, &args)) {
                r.push(y);
            }
        }
        for ((o, p), v) in outs.iter().zip(&out_ptrs).zip(&res) {
            store8(k, v, p, o, &row, &col);
        }
    });
    let mut args: Vec<Arg> = ins.iter().chain(outs).map(|o| o.arg()).collect();
    args.push(Arg::I64 { value: outs[0].rows() });
    e.launch(k, grid_1d(outs[0].rows().times(groups as i64), THREADS as u64), 0, args);
}

/// The global thread index and its row and column in a tensor `width` wide.
fn element_index(k: &mut KernelBuilder, width: u64) -> (V, V, V) {
    let tid = k.thread_id('x');
    let bid = k.block_id('x');
    let n = k.i64(k.block_threads());
    let base = k.mul(&bid, &n);
    let idx = k.add(&base, &tid);
    let w = k.i64(width as i64);
    let row = k.div(&idx, &w);
    let col = k.rem(&idx, &w);
    (idx, row, col)
}

pub(super) fn add(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    map(e, "add", &[&ins[0], &ins[1]], &[&outs[0]], |k, v| vec![k.add(&v[0], &v[1])]);
    Ok(())
}

pub(super) fn swiglu(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    map(e, "swiglu", &[&ins[0], &ins[1]], &[&outs[0]], |k, v| {
        let s = k.silu(&v[0]);
        vec![k.mul(&s, &v[1])]
    });
    Ok(())
}

/// `g_a = g·b·silu'(a)`, `g_b = g·silu(a)`, with `silu'(a) = σ(a)(1 + a(1 − σ(a)))`.
pub(super) fn swiglu_backward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    map(e, "swiglu_backward", &[&ins[0], &ins[1], &ins[2]], &[&outs[0], &outs[1]], |k, v| {
        let (a, b, g) = (&v[0], &v[1], &v[2]);
        let s = k.sigmoid(a);
        let one = k.f32(1.0);
        let oms = k.sub(&one, &s);
        let t = k.fma(a, &oms, &one);
        let ds = k.mul(&s, &t);
        let gb = k.mul(g, b);
        let ga = k.mul(&gb, &ds);
        let sa = k.mul(a, &s);
        let gbo = k.mul(g, &sa);
        vec![ga, gbo]
    });
    Ok(())
}

/// The gradient of a slice: `g` placed at columns `[start, start + len)`, zero elsewhere. With
/// the slice's edges and the rows on 8-element boundaries, a thread writes 8 columns as one
/// vector (read from `g` as one, or zeros).
pub(super) fn slice_backward(e: &mut Emit, start: u64, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (g, out) = (&ins[0], &outs[0]);
    let width = out.width;
    if width % VEC == 0 && start % VEC == 0 && g.width % VEC == 0 && vector_aligned(g) && vector_aligned(out) {
        let name = format!("slice_backward_v{VEC}_w{width}_s{start}_l{}_{}", g.width, sig(&[g, out]));
        let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
        let gp = k.ptr("g");
        let op = k.ptr("out");
        let rows = k.scalar_i64("rows");
        let groups = width / VEC;
        let (idx, row, grp) = element_index(&mut k, groups);
        let gv = k.i64(groups as i64);
        let total = k.mul(&rows, &gv);
        let inside = k.cmp(Cmp::Lt, &idx, &total);
        k.if_(&inside, |k| {
            let v8 = k.i64(VEC as i64);
            let col = k.mul(&grp, &v8);
            let lo = k.i64(start as i64);
            let hi = k.i64((start + g.width) as i64);
            let ge = k.cmp(Cmp::Ge, &col, &lo);
            let lt = k.cmp(Cmp::Lt, &col, &hi);
            let within = k.and(&ge, &lt);
            k.if_(&within, |k| {
                let c = k.sub(&col, &lo);
                let v = load8(k, &gp, g, &row, &c);
                store8(k, &v, &op, out, &row, &col);
            });
            let t = k.raw(Ty::I1, "arith.constant true");
            let outside = k.raw(Ty::I1, &format!("arith.xori {}, {} : i1", within.name, t.name));
            k.if_(&outside, |k| {
                let z = k.f32(0.0);
                let zeros = vec![z; VEC as usize];
                store8(k, &zeros, &op, out, &row, &col);
            });
        });
        let args = vec![g.arg(), out.arg(), Arg::I64 { value: out.rows() }];
        e.launch(k, grid_1d(out.rows().times(groups as i64), THREADS as u64), 0, args);
        return Ok(());
    }
    let name = format!("slice_backward_w{width}_s{start}_l{}_{}", g.width, sig(&[g, out]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let gp = k.ptr("g");
    let op = k.ptr("out");
    let rows = k.scalar_i64("rows");
    let (idx, row, col) = element_index(&mut k, width);
    let w = k.i64(width as i64);
    let total = k.mul(&rows, &w);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let lo = k.i64(start as i64);
        let hi = k.i64((start + g.width) as i64);
        let ge = k.cmp(Cmp::Ge, &col, &lo);
        let lt = k.cmp(Cmp::Lt, &col, &hi);
        let within = k.and(&ge, &lt);
        let v = k.if_else(
            &within,
            |k| {
                let c = k.sub(&col, &lo);
                vec![load_at(k, &gp, g, &row, &c)]
            },
            |k| vec![k.f32(0.0)],
        );
        store_at(k, &v[0], &op, out, &row, &col);
    });
    let args = vec![g.arg(), out.arg(), Arg::I64 { value: out.rows() }];
    let r = out.rows();
    e.launch(k, grid_1d(r.times(width as i64), THREADS as u64), 0, args);
    Ok(())
}

/// `out[r, j] = table[tokens[r], j]`.
pub(super) fn embed(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (tokens, table, out) = (&ins[0], &ins[1], &outs[0]);
    let width = out.width;
    let name = format!("embed_w{width}_{}", sig(&[table, out]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let tp = k.ptr("tokens");
    let wp = k.ptr("table");
    let op = k.ptr("out");
    let rows = k.scalar_i64("rows");
    let vocab = k.scalar_i64("vocab");
    let (idx, row, col) = element_index(&mut k, width);
    let w = k.i64(width as i64);
    let total = k.mul(&rows, &w);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let t = k.load(&tp, &row, Ty::I32);
        let t = k.cast(&t, Ty::I64);
        // Out-of-range ids read row 0 rather than stray memory (the runtime checks ids first).
        let zero = k.i64(0);
        let ge = k.cmp(Cmp::Ge, &t, &zero);
        let lt = k.cmp(Cmp::Lt, &t, &vocab);
        let ok = k.and(&ge, &lt);
        let t = k.select(&ok, &t, &zero);
        let v = load_at(k, &wp, table, &t, &col);
        store_at(k, &v, &op, out, &row, &col);
    });
    let vocab_n = table.ty.shape.0.first().map_or(0, |d| match d {
        weft_runtime::Dim::Fixed(n) => *n as i64,
        _ => 0,
    });
    let args = vec![
        tokens.arg(),
        table.arg(),
        out.arg(),
        Arg::I64 { value: out.rows() },
        Arg::I64 { value: Extent::constant(vocab_n) },
    ];
    let r = out.rows();
    e.launch(k, grid_1d(r.times(width as i64), THREADS as u64), 0, args);
    Ok(())
}

/// `g_table[v, j] = Σ_{r: tokens[r] = v} g[r, j]`, each sum in row order, with no atomics: a
/// first kernel sorts the rows by token (a stable counting sort, each row finding its place by
/// counting the rows before it), a second sums each token's run of rows.
pub(super) fn embed_backward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (tokens, g, out) = (&ins[0], &ins[1], &outs[0]);
    e.zero(out.buf.clone(), super::bytes_of(out));
    let order = e.scratch(g.rows().times(4));
    let runs = e.scratch(g.rows().times(4));
    embed_backward_order(e, tokens, &order, &runs, g.rows(), out.rows());
    embed_backward_sum(e, tokens, g, out, &order, &runs)
}

/// Rows per block of the ordering kernel.
const ORDER_THREADS: u32 = 128;

/// Row `r` with token `t` goes to place `#{r': tok[r'] < t} + #{r' < r: tok[r'] = t}` of
/// `order`; the first row of each token's run also writes the run's length into `runs` at its
/// place (other places get 0). Every row reads every token (broadcast loads, 4 in flight):
/// quadratic in the rows, which stays far below the step's matrix products at any batch that
/// fits (7 instructions per pair: ~0.3 ms for 32768 rows on an H200, against a 250 ms step).
fn embed_backward_order(
    e: &mut Emit,
    tokens: &Operand,
    order: &BufferArg,
    runs: &BufferArg,
    rows: Extent,
    vocab_n: Extent,
) {
    let name = "embed_backward_order".to_string();
    let mut k = KernelBuilder::new(&name, [ORDER_THREADS, 1, 1]);
    let tp = k.ptr("tokens");
    let op = k.ptr("order");
    let rp = k.ptr("runs");
    let n = k.scalar_i64("rows");
    let vocab = k.scalar_i64("vocab");
    let r = super::chunks::channel(&mut k);
    let inside = k.cmp(Cmp::Lt, &r, &n);
    k.if_(&inside, |k| {
        let t = k.load(&tp, &r, Ty::I32);
        // Counts of tokens below `t` and equal to it over rows `lo..hi`, 4 loads in flight.
        // Raw ids are compared: an id outside the vocabulary (refused where ids enter) still
        // gets a place of its own, and forms no run.
        let count = |k: &mut KernelBuilder, lo: &V, hi: &V, acc: Vec<V>| -> Vec<V> {
            let one = |k: &mut KernelBuilder, j: &V, acc: &[V]| -> Vec<V> {
                let u = k.load(&tp, j, Ty::I32);
                let lt = k.cmp(Cmp::Lt, &u, &t);
                let eq = k.cmp(Cmp::Eq, &u, &t);
                let lt = k.cast(&lt, Ty::I32);
                let eq = k.cast(&eq, Ty::I32);
                vec![k.add(&acc[0], &lt), k.add(&acc[1], &eq)]
            };
            let four = k.i64(4);
            let span = k.sub(hi, lo);
            let whole = k.div(&span, &four);
            let whole = k.mul(&whole, &four);
            let mid = k.add(lo, &whole);
            let acc = k.for_(lo, &mid, 4, &acc, |k, j0, acc| {
                let mut acc = acc.to_vec();
                for u in 0..4 {
                    let off = k.i64(u);
                    let j = k.add(&j0, &off);
                    acc = one(k, &j, &acc);
                }
                acc
            });
            k.for_(&mid, hi, 1, &acc, |k, j, acc| one(k, &j, acc))
        };
        let zero = k.i32(0);
        let z64 = k.i64(0);
        let before = count(k, &z64, &r, vec![zero.clone(), zero.clone()]);
        let after = count(k, &r, &n, vec![before[0].clone(), zero.clone()]);
        let (less, same_before) = (&after[0], &before[1]);
        let same = k.add(&before[1], &after[1]);
        let place = k.add(less, same_before);
        let place = k.cast(&place, Ty::I64);
        let r32 = k.cast(&r, Ty::I32);
        k.store(&r32, &op, &place, Ty::I32);
        let first = k.cmp(Cmp::Eq, same_before, &zero);
        let ge = k.cmp(Cmp::Ge, &t, &zero);
        let v32 = k.cast(&vocab, Ty::I32);
        let lt = k.cmp(Cmp::Lt, &t, &v32);
        let valid = k.and(&ge, &lt);
        let head = k.and(&first, &valid);
        let len = k.select(&head, &same, &zero);
        k.store(&len, &rp, &place, Ty::I32);
    });
    let args = vec![
        tokens.arg(),
        Arg::Buffer(order.clone()),
        Arg::Buffer(runs.clone()),
        Arg::I64 { value: rows },
        Arg::I64 { value: vocab_n },
    ];
    e.launch(k, grid_1d(rows, ORDER_THREADS as u64), 0, args);
}

/// One thread per (place, column): where a run starts, `g_table[token] = Σ g[order[q]]` over
/// the run's places `q` in order (rows in their original order).
fn embed_backward_sum(
    e: &mut Emit,
    tokens: &Operand,
    g: &Operand,
    out: &Operand,
    order: &BufferArg,
    runs: &BufferArg,
) -> Result<(), LowerError> {
    let width = g.width;
    let name = format!("embed_backward_sum_w{width}_{}", sig(&[g, out]));
    let mut k = KernelBuilder::new(&name, [THREADS, 1, 1]);
    let tp = k.ptr("tokens");
    let gp = k.ptr("g");
    let op = k.ptr("out");
    let orp = k.ptr("order");
    let rp = k.ptr("runs");
    let rows = k.scalar_i64("rows");
    let (idx, place, col) = element_index(&mut k, width);
    let w = k.i64(width as i64);
    let total = k.mul(&rows, &w);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let len = k.load(&rp, &place, Ty::I32);
        let len = k.cast(&len, Ty::I64);
        let zero = k.i64(0);
        let head = k.cmp(Cmp::Gt, &len, &zero);
        k.if_(&head, |k| {
            let r0 = k.load(&orp, &place, Ty::I32);
            let r0 = k.cast(&r0, Ty::I64);
            let t = k.load(&tp, &r0, Ty::I32);
            let t = k.cast(&t, Ty::I64);
            let end = k.add(&place, &len);
            let zf = k.f32(0.0);
            let sum = k.for_(&place, &end, 1, &[zf], |k, q, acc| {
                let r = k.load(&orp, &q, Ty::I32);
                let r = k.cast(&r, Ty::I64);
                let v = load_at(k, &gp, g, &r, &col);
                vec![k.add(&acc[0], &v)]
            });
            store_at(k, &sum[0], &op, out, &t, &col);
        });
    });
    let args = vec![
        tokens.arg(),
        g.arg(),
        out.arg(),
        Arg::Buffer(order.clone()),
        Arg::Buffer(runs.clone()),
        Arg::I64 { value: g.rows() },
    ];
    e.launch(k, grid_1d(g.rows().times(width as i64), THREADS as u64), 0, args);
    Ok(())
}
