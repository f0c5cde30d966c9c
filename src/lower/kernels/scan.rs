//! The Mamba-1 selective scan with softplus(Δ + bias), the D skip and the SiLU(z) gate: forward,
//! backward, the state after a prompt, and one decode step.
//!
//! The recurrence `h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t` is diagonal, so it splits into
//! chunks of [`CHUNK`] tokens that run in parallel (kernels.md §4.6): over one chunk the state
//! decays by `exp(A·ΣΔ)`, a single number per (channel, state entry). Every pass is one thread
//! per (sequence, chunk, channel), threads of a block consecutive channels of one chunk, so the
//! per-token B and C rows they read are the same and the u, δ, z loads are coalesced.
//!
//! Forward: `selective_scan_chunk_*` runs each chunk from a zero state (its end state and ΣΔ
//! into scratch), `selective_scan_carry_*` walks the chunks of each (sequence, channel) in order
//! and replaces each end state by the state entering the chunk, and `selective_scan_*` runs each
//! chunk again from that state and writes the gated output. The prompt's final state (prefill)
//! is the first two passes.
//!
//! Backward: the forward's first two passes give the state entering each chunk;
//! `selective_scan_bwd_chunk_*` runs the adjoint λ backwards over each chunk from zero and
//! `selective_scan_bwd_carry_*` carries it across chunks the same way (the part of λ_t coming
//! from later chunks is `exp(ΔA)`-decayed from the next chunk's start). Then
//! `selective_scan_backward_*` gives each (sequence, chunk, channel) to `P` threads (`P` = 2 for
//! an even state size, each owning half the state entries): it walks the chunk forward keeping
//! the state every [`SUB`] tokens (local memory), then sub-chunk by sub-chunk in reverse
//! recomputes the [`SUB`] states into registers and walks them backwards. g_B and g_C (sums over
//! channels) are reduced across the warp by a butterfly that halves the values each lane holds
//! at every step, then across the block's warps in shared memory, into per-block partial rows
//! that `selective_scan_bwd_bc_*` sums in block order; g_A, g_D and g_β have per-chunk partials
//! that `selective_scan_bwd_params_*` sums in chunk order. Every output has one writer and a
//! fixed summation order: no atomics, results independent of scheduling.

use super::super::{Emit, LowerError, Operand};
use super::chunks::{channel, chunk_grid, chunk_pos, seq_chunks, sequence_grid, sum_over_chunks, ChunkPos, CHUNK};
use super::{load_at, sig, store_at};
use crate::lower::mlir::{Cmp, KernelBuilder, Ty, V};
use weft_runtime::device::{Arg, BufferArg, Extent};

/// Tokens per sub-chunk of the backward, whose states live in registers.
const SUB: usize = 4;
/// The register cap of the backward's main kernel.
const BWD_REGISTERS: u32 = 168;

/// The scan's operands: u, delta, a_log, b, c, d, dt_bias, z (d and z absent for the state).
struct Scan<'a> {
    u: &'a Operand,
    delta: &'a Operand,
    a_log: &'a Operand,
    b: &'a Operand,
    c: &'a Operand,
    dt_bias: &'a Operand,
    channels: u64,
    state: u64,
}

impl<'a> Scan<'a> {
    fn new(
        u: &'a Operand,
        delta: &'a Operand,
        a_log: &'a Operand,
        b: &'a Operand,
        c: &'a Operand,
        dt_bias: &'a Operand,
    ) -> Self {
        Scan { u, delta, a_log, b, c, dt_bias, channels: u.width, state: a_log.width }
    }

    /// Channels per block of the one-thread-per-channel passes: whole warps.
    fn block(&self) -> Result<u32, LowerError> {
        [128u32, 64, 32].into_iter().find(|t| self.channels % *t as u64 == 0).ok_or_else(|| {
            LowerError(format!("the scan needs an inner width divisible by 32 (it is {})", self.channels))
        })
    }

    /// Bytes of `per_channel` f32 values per (chunk, channel), for at most `B·T/CHUNK + B ≥
    /// B·⌈T/CHUNK⌉` chunks.
    fn per_chunk(&self, per_channel: u64) -> Extent {
        let bytes = (self.channels * per_channel * 4) as i64;
        Extent { bt: (bytes + CHUNK - 1) / CHUNK, b: bytes, c: 0 }
    }
}

fn sizes() -> Vec<Arg> {
    vec![Arg::I64 { value: Extent::per_token(1) }, Arg::I64 { value: Extent::per_sequence(1) }]
}

fn name(family: &str, s: &Scan, ops: &[&Operand]) -> String {
    format!("{family}_e{}_n{}_c{CHUNK}_{}", s.channels, s.state, sig(ops))
}

/// `A = −exp(A_log)` for some state entries of a channel, and `A·log₂e` (exponentials of `Δ·A`
/// are `exp2(Δ·A·log₂e)`).
struct Decay {
    a: Vec<V>,
    a2: Vec<V>,
}

impl Decay {
    /// `exp(x·A_j)`.
    fn exp(&self, k: &mut KernelBuilder, x: &V, j: usize) -> V {
        let t = k.mul(x, &self.a2[j]);
        k.exp2(&t)
    }
}

/// [`Decay`] of state entries `n0 + j`, `j < count`, of channel `ch`.
fn neg_a(k: &mut KernelBuilder, s: &Scan, a_log: &V, ch: &V, n0: Option<&V>, count: u64) -> Decay {
    let l2e = k.f32(std::f32::consts::LOG2_E);
    let (mut a, mut a2) = (Vec::new(), Vec::new());
    for j in 0..count {
        let jj = k.i64(j as i64);
        let n = match n0 {
            Some(n0) => k.add(n0, &jj),
            None => jj,
        };
        let v = load_at(k, a_log, s.a_log, ch, &n);
        let e = k.exp(&v);
        let an = k.neg(&e);
        a2.push(k.mul(&an, &l2e));
        a.push(an);
    }
    Decay { a, a2 }
}

/// Δ_t = softplus(δ + β) and the raw δ + β (for the backward's softplus').
fn delta_t(k: &mut KernelBuilder, s: &Scan, delta: &V, beta: &V, row: &V, ch: &V) -> (V, V) {
    let d = load_at(k, delta, s.delta, row, ch);
    let x = k.add(&d, beta);
    (k.softplus(&x), x)
}

/// Row `row`, state entries `n0 + j`, `j < count`, of B (or C): 16-byte vector loads where the
/// rows and `n0` allow (B and C are slices of one projection's rows), else one load each.
fn state_row(k: &mut KernelBuilder, p: &V, o: &Operand, row: &V, n0: Option<&V>, count: u64) -> Vec<V> {
    let bytes = o.dtype().bytes();
    let lanes = 16 / bytes;
    let vectors = (o.dtype() == weft_runtime::DType::BF16 || o.dtype() == weft_runtime::DType::F32)
        && (o.ld * bytes) % 16 == 0
        && o.buf.offset % 16 == 0
        && count % lanes == 0;
    let ld = k.i64(o.ld as i64);
    let base = k.mul(row, &ld);
    let base = match n0 {
        Some(n0) => k.add(&base, n0),
        None => base,
    };
    if vectors {
        (0..count / lanes)
            .flat_map(|v| {
                let off = k.i64((v * lanes) as i64);
                let i = k.add(&base, &off);
                k.load_vector_f32(p, &i, o.elem(), lanes as usize)
            })
            .collect()
    } else {
        (0..count)
            .map(|j| {
                let jj = k.i64(j as i64);
                let i = k.add(&base, &jj);
                k.load_f32(p, &i, o.elem())
            })
            .collect()
    }
}

/// One token: `h ← exp(Δ a) ⊙ h + Δ u B`; returns the new state and `exp(Δ a)`.
fn advance(k: &mut KernelBuilder, a: &Decay, b: &[V], dt: &V, u: &V, h: &[V]) -> (Vec<V>, Vec<V>) {
    let du = k.mul(dt, u);
    let mut out = Vec::new();
    let mut abar = Vec::new();
    for (j, (bn, hn)) in b.iter().zip(h).enumerate() {
        let ab = a.exp(k, dt, j);
        let x = k.mul(&du, bn);
        out.push(k.fma(&ab, hn, &x));
        abar.push(ab);
    }
    (out, abar)
}

/// Element `(chunk index, n, ch)` of a `[chunks, per, E]` f32 scratch array.
fn chunk_slot(k: &mut KernelBuilder, s: &Scan, index: &V, per: u64, n: &V, ch: &V) -> V {
    let pv = k.i64(per as i64);
    let r = k.mul(index, &pv);
    let r = k.add(&r, n);
    let e = k.i64(s.channels as i64);
    let r = k.mul(&r, &e);
    k.add(&r, ch)
}

/// Scratch of the forward's first two passes: per chunk the states (`[chunks, N, E]` f32) and
/// ΣΔ (`[chunks, E]` f32).
struct Carries {
    h: BufferArg,
    sd: BufferArg,
}

fn carries(e: &mut Emit, s: &Scan) -> Carries {
    Carries { h: e.scratch(s.per_chunk(s.state)), sd: e.scratch(s.per_chunk(1)) }
}

/// `selective_scan_chunk_*`: each chunk from a zero state; its end state and ΣΔ.
fn chunk_states(e: &mut Emit, s: &Scan, block: u32, cr: &Carries) {
    let ops = [s.u, s.delta, s.a_log, s.b, s.dt_bias];
    let mut k = KernelBuilder::new(&name("selective_scan_chunk", s, &ops), [block, 1, 1]);
    let (up, dp, ap, bp, bip) = (k.ptr("u"), k.ptr("delta"), k.ptr("a_log"), k.ptr("b"), k.ptr("dt_bias"));
    let (hp, sdp) = (k.ptr("h"), k.ptr("sum_delta"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let ch = channel(&mut k);
    let cp = chunk_pos(&mut k, &rows, &batch);
    k.if_(&cp.live, |k| {
        let a = neg_a(k, s, &ap, &ch, None, s.state);
        let zero = k.i64(0);
        let beta = load_at(k, &bip, s.dt_bias, &zero, &ch);
        let mut init: Vec<V> = (0..s.state).map(|_| k.f32(0.0)).collect();
        init.push(k.f32(0.0));
        let n = s.state as usize;
        let fin = k.for_(&cp.t0, &cp.t1, 1, &init, |k, t, cur| {
            let row = k.add(&cp.row0, &t);
            let (dt, _) = delta_t(k, s, &dp, &beta, &row, &ch);
            let uv = load_at(k, &up, s.u, &row, &ch);
            let b = state_row(k, &bp, s.b, &row, None, s.state);
            let (mut h, _) = advance(k, &a, &b, &dt, &uv, &cur[..n]);
            h.push(k.add(&cur[n], &dt));
            h
        });
        for (j, hn) in fin[..n].iter().enumerate() {
            let jj = k.i64(j as i64);
            let i = chunk_slot(k, s, &cp.index, s.state, &jj, &ch);
            k.store(hn, &hp, &i, Ty::F32);
        }
        let i = chunk_slot(k, s, &cp.index, 1, &zero, &ch);
        k.store(&fin[n], &sdp, &i, Ty::F32);
    });
    let mut args: Vec<Arg> = ops.iter().map(|o| o.arg()).collect();
    args.extend([Arg::Buffer(cr.h.clone()), Arg::Buffer(cr.sd.clone())]);
    args.extend(sizes());
    e.launch(k, chunk_grid(s.channels / block as u64), 0, args);
}

/// Chunks a carry pass reads ahead.
const CARRY_UNROLL: i64 = 8;

/// Which way a carry pass walks the chunks.
#[derive(Clone, Copy, PartialEq)]
enum Walk {
    /// The forward's states: chunks in order; each chunk's end state (from zero) becomes the
    /// state entering it.
    States,
    /// The backward's adjoints: chunks last to first; each chunk's `exp(Δ_{t0}A)·λ_{t0}` (from
    /// zero) becomes the part of λ entering it from the right, `exp(Δ_{t1}A)·λ_{t1}`.
    Adjoints,
}

/// `selective_scan_carry_*` / `selective_scan_bwd_carry_*`: one thread per (sequence, state
/// entry, channel) walks the chunks (see [`Walk`]), replacing each chunk's local value `x_k` in
/// place by the carry entering it, `carry ← exp(A·ΣΔ_k)·carry + x_k`. With `last`, the carry
/// after the last chunk (the state after the prompt) goes to `last` (`[B, E, N]` f32).
fn carry(e: &mut Emit, s: &Scan, walk: Walk, vals: &BufferArg, sd: &BufferArg, last: Option<&Operand>) {
    let mut ops = vec![s.a_log];
    ops.extend(last);
    let family = match (walk, last.is_some()) {
        (Walk::States, false) => "selective_scan_carry",
        (Walk::States, true) => "selective_scan_carry_final",
        (Walk::Adjoints, _) => "selective_scan_bwd_carry",
    };
    let threads = 256u32;
    let mut k = KernelBuilder::new(&name(family, s, &ops), [threads, 1, 1]);
    let ap = k.ptr("a_log");
    let (xp, sdp) = (k.ptr("values"), k.ptr("sum_delta"));
    let lp = last.map(|_| k.ptr("state"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let idx = channel(&mut k);
    let ev = k.i64(s.channels as i64);
    let n = k.div(&idx, &ev);
    let ch = k.rem(&idx, &ev);
    let nv = k.i64(s.state as i64);
    let inside = k.cmp(Cmp::Lt, &n, &nv);
    k.if_(&inside, |k| {
        let b = k.block_id('y');
        let (_, nch) = seq_chunks(k, &rows, &batch);
        let al = load_at(k, &ap, s.a_log, &ch, &n);
        let ex = k.exp(&al);
        let a = k.neg(&ex);
        let l2e = k.f32(std::f32::consts::LOG2_E);
        let a2 = k.mul(&a, &l2e);
        let zf = k.f32(0.0);
        let zero = k.i64(0);
        // CARRY_UNROLL chunks at a time: their loads first (they do not depend on the carry),
        // then the carries in order, so each thread has several loads in flight.
        let fin = k.for_(&zero, &nch, CARRY_UNROLL, &[zf], |k, i0, c| {
            let mut carry = c[0].clone();
            let mut loaded = Vec::new();
            for u in 0..CARRY_UNROLL {
                let off = k.i64(u);
                let i = k.add(&i0, &off);
                let valid = k.cmp(Cmp::Lt, &i, &nch);
                let one = k.i64(1);
                let lastc = k.sub(&nch, &one);
                let i = k.min(&i, &lastc);
                let kc = match walk {
                    Walk::States => i.clone(),
                    Walk::Adjoints => k.sub(&lastc, &i),
                };
                let r = k.mul(&b, &nch);
                let index = k.add(&r, &kc);
                let z = k.i64(0);
                let si = chunk_slot(k, s, &index, 1, &z, &ch);
                let sdv = k.load(&sdp, &si, Ty::F32);
                let vi = chunk_slot(k, s, &index, s.state, &n, &ch);
                let local = k.load(&xp, &vi, Ty::F32);
                loaded.push((valid, vi, sdv, local));
            }
            for (valid, vi, sdv, local) in loaded {
                k.if_(&valid, |k| k.store(&carry, &xp, &vi, Ty::F32));
                let t = k.mul(&a2, &sdv);
                let decay = k.exp2(&t);
                let next = k.fma(&decay, &carry, &local);
                carry = k.select(&valid, &next, &carry);
            }
            vec![carry]
        });
        if let Some(lp) = &lp {
            let r = k.mul(&b, &ev);
            let r = k.add(&r, &ch);
            let r = k.mul(&r, &nv);
            let i = k.add(&r, &n);
            k.store(&fin[0], lp, &i, Ty::F32);
        }
    });
    let mut args: Vec<Arg> = vec![s.a_log.arg(), Arg::Buffer(vals.clone()), Arg::Buffer(sd.clone())];
    args.extend(last.map(|o| o.arg()));
    args.extend(sizes());
    let total = s.channels * s.state;
    e.launch(k, sequence_grid(total.div_ceil(threads as u64)), 0, args);
}

pub(super) fn forward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let [u, delta, a_log, b, c, d, dt_bias, z] = ins else { return Err(LowerError("the scan takes 8 inputs".into())) };
    let y = &outs[0];
    let s = Scan::new(u, delta, a_log, b, c, dt_bias);
    let block = s.block()?;
    let cr = carries(e, &s);
    chunk_states(e, &s, block, &cr);
    carry(e, &s, Walk::States, &cr.h, &cr.sd, None);
    let ops = [u, delta, a_log, b, c, d, dt_bias, z, y];
    let mut k = KernelBuilder::new(&name("selective_scan", &s, &ops), [block, 1, 1]);
    let (up, dp, ap, bp, cp_, dd, bip, zp, yp) = (
        k.ptr("u"),
        k.ptr("delta"),
        k.ptr("a_log"),
        k.ptr("b"),
        k.ptr("c"),
        k.ptr("d"),
        k.ptr("dt_bias"),
        k.ptr("z"),
        k.ptr("y"),
    );
    let hp = k.ptr("h");
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let ch = channel(&mut k);
    let cp = chunk_pos(&mut k, &rows, &batch);
    k.if_(&cp.live, |k| {
        let a = neg_a(k, &s, &ap, &ch, None, s.state);
        let zero = k.i64(0);
        let beta = load_at(k, &bip, dt_bias, &zero, &ch);
        let dv = load_at(k, &dd, d, &zero, &ch);
        let h0: Vec<V> = (0..s.state as usize)
            .map(|j| {
                let jj = k.i64(j as i64);
                let i = chunk_slot(k, &s, &cp.index, s.state, &jj, &ch);
                k.load(&hp, &i, Ty::F32)
            })
            .collect();
        k.for_(&cp.t0, &cp.t1, 1, &h0, |k, t, h| {
            let row = k.add(&cp.row0, &t);
            let (dt, _) = delta_t(k, &s, &dp, &beta, &row, &ch);
            let uv = load_at(k, &up, u, &row, &ch);
            let bv = state_row(k, &bp, b, &row, None, s.state);
            let (h, _) = advance(k, &a, &bv, &dt, &uv, h);
            let cv = state_row(k, &cp_, c, &row, None, s.state);
            let mut r = k.f32(0.0);
            for (cn, hn) in cv.iter().zip(&h) {
                r = k.fma(cn, hn, &r);
            }
            let y0 = k.fma(&dv, &uv, &r);
            let zv = load_at(k, &zp, z, &row, &ch);
            let g = k.silu(&zv);
            let out = k.mul(&y0, &g);
            store_at(k, &out, &yp, y, &row, &ch);
            h
        });
    });
    let mut args: Vec<Arg> = ops.iter().map(|o| o.arg()).collect();
    args.push(Arg::Buffer(cr.h.clone()));
    args.extend(sizes());
    e.launch(k, chunk_grid(s.channels / block as u64), 0, args);
    Ok(())
}

/// The state `[B, E, N]` (f32) after the whole prompt.
pub(super) fn state(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let [u, delta, a_log, b, c, dt_bias] = ins else { return Err(LowerError("the scan state takes 6 inputs".into())) };
    let s = Scan::new(u, delta, a_log, b, c, dt_bias);
    let block = s.block()?;
    let cr = carries(e, &s);
    chunk_states(e, &s, block, &cr);
    carry(e, &s, Walk::States, &cr.h, &cr.sd, Some(&outs[0]));
    Ok(())
}

/// `h[b, c, n]` in a dense f32 `[B, E, N]` state.
fn state_index(k: &mut KernelBuilder, s: &Scan, seq_index: &V, ch: &V, n: usize) -> V {
    let e = k.i64(s.channels as i64);
    let r = k.mul(seq_index, &e);
    let r = k.add(&r, ch);
    let nn = k.i64(s.state as i64);
    let r = k.mul(&r, &nn);
    let i = k.i64(n as i64);
    k.add(&r, &i)
}

/// A token's row, its channel, and the channel's decay and step bias.
struct TokenAt<'a> {
    a: &'a Decay,
    beta: &'a V,
    row: &'a V,
    ch: &'a V,
}

/// One token of the recurrence from the state `h`: y written (pointers and operands in the
/// order delta, u, b, c, z, y; `d` the skip weight, asked for once the output needs it); the
/// new state returned.
fn step_token(
    k: &mut KernelBuilder,
    s: &Scan,
    [dp, up, bp, cp, zp, yp]: [&V; 6],
    [u, b, c, z, y]: [&Operand; 5],
    at: TokenAt,
    h: &[V],
    d: impl FnOnce(&mut KernelBuilder) -> V,
) -> Vec<V> {
    let TokenAt { a, beta, row, ch } = at;
    let (dt, _) = delta_t(k, s, dp, beta, row, ch);
    let uv = load_at(k, up, u, row, ch);
    let bv = state_row(k, bp, b, row, None, s.state);
    let (h, _) = advance(k, a, &bv, &dt, &uv, h);
    let cv = state_row(k, cp, c, row, None, s.state);
    let mut r = k.f32(0.0);
    for (cn, hn) in cv.iter().zip(&h) {
        r = k.fma(cn, hn, &r);
    }
    let dv = d(k);
    let y0 = k.fma(&dv, &uv, &r);
    let zv = load_at(k, zp, z, row, ch);
    let g = k.silu(&zv);
    let out = k.mul(&y0, &g);
    store_at(k, &out, yp, y, row, ch);
    h
}

/// One token from the state: `(y, h')`.
pub(super) fn step(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let [u, delta, a_log, b, c, d, dt_bias, z, h_in] = ins else {
        return Err(LowerError("the scan step takes 9 inputs".into()));
    };
    let (y, h_out) = (&outs[0], &outs[1]);
    let s = Scan::new(u, delta, a_log, b, c, dt_bias);
    let block = s.block()?;
    let ops = [u, delta, a_log, b, c, d, dt_bias, z, h_in, y, h_out];
    if e.max_shape().1 > 1 {
        return step_chunk(e, &s, block, ops);
    }
    let mut k =
        KernelBuilder::new(&format!("selective_scan_step_e{}_n{}_{}", s.channels, s.state, sig(&ops)), [block, 1, 1]);
    let (up, dp, ap, bp, cp, dd, bip, zp, hip, yp, hop) = (
        k.ptr("u"),
        k.ptr("delta"),
        k.ptr("a_log"),
        k.ptr("b"),
        k.ptr("c"),
        k.ptr("d"),
        k.ptr("dt_bias"),
        k.ptr("z"),
        k.ptr("h"),
        k.ptr("y"),
        k.ptr("h_out"),
    );
    let ch = channel(&mut k);
    let row = k.block_id('y');
    let a = neg_a(&mut k, &s, &ap, &ch, None, s.state);
    let zero = k.i64(0);
    let beta = load_at(&mut k, &bip, dt_bias, &zero, &ch);
    let h: Vec<V> = (0..s.state as usize)
        .map(|n| {
            let i = state_index(&mut k, &s, &row, &ch, n);
            k.load(&hip, &i, Ty::F32)
        })
        .collect();
    let at = TokenAt { a: &a, beta: &beta, row: &row, ch: &ch };
    let h = step_token(&mut k, &s, [&dp, &up, &bp, &cp, &zp, &yp], [u, b, c, z, y], at, &h, |k| {
        load_at(k, &dd, d, &zero, &ch)
    });
    for (n, hn) in h.iter().enumerate() {
        let i = state_index(&mut k, &s, &row, &ch, n);
        k.store(hn, &hop, &i, Ty::F32);
    }
    let args: Vec<Arg> = ops.iter().map(|o| o.arg()).collect();
    e.launch(k, sequence_grid(s.channels / block as u64), 0, args);
    Ok(())
}

/// A chunk of T tokens continuing from the carried state (the `chunk` plan): the step's
/// recurrence, token by token, thread per channel with its state in registers across the
/// chunk; the state after the last token is written once.
fn step_chunk(e: &mut Emit, s: &Scan, block: u32, ops: [&Operand; 11]) -> Result<(), LowerError> {
    let [u, _, _, b, c, d, dt_bias, z, _, y, _] = ops;
    let name = format!("selective_scan_chunk_e{}_n{}_{}", s.channels, s.state, sig(&ops));
    let mut k = KernelBuilder::new(&name, [block, 1, 1]);
    let (up, dp, ap, bp, cp, dd, bip, zp, hip, yp, hop) = (
        k.ptr("u"),
        k.ptr("delta"),
        k.ptr("a_log"),
        k.ptr("b"),
        k.ptr("c"),
        k.ptr("d"),
        k.ptr("dt_bias"),
        k.ptr("z"),
        k.ptr("h"),
        k.ptr("y"),
        k.ptr("h_out"),
    );
    let batch = k.scalar_i64("batch");
    let tokens = k.scalar_i64("tokens");
    let ch = channel(&mut k);
    let seq = k.block_id('y');
    let t_len = k.div(&tokens, &batch);
    let row0 = k.mul(&seq, &t_len);
    let a = neg_a(&mut k, s, &ap, &ch, None, s.state);
    let zero = k.i64(0);
    let beta = load_at(&mut k, &bip, dt_bias, &zero, &ch);
    let dv = load_at(&mut k, &dd, d, &zero, &ch);
    let h: Vec<V> = (0..s.state as usize)
        .map(|n| {
            let i = state_index(&mut k, s, &seq, &ch, n);
            k.load(&hip, &i, Ty::F32)
        })
        .collect();
    let h = k.for_(&zero, &t_len, 1, &h, |k, t, h| {
        let row = k.add(&row0, &t);
        let at = TokenAt { a: &a, beta: &beta, row: &row, ch: &ch };
        step_token(k, s, [&dp, &up, &bp, &cp, &zp, &yp], [u, b, c, z, y], at, h, |_| dv.clone())
    });
    for (n, hn) in h.iter().enumerate() {
        let i = state_index(&mut k, s, &seq, &ch, n);
        k.store(hn, &hop, &i, Ty::F32);
    }
    let mut args: Vec<Arg> = ops.iter().map(|o| o.arg()).collect();
    args.extend([Arg::I64 { value: Extent::per_sequence(1) }, Arg::I64 { value: Extent::per_token(1) }]);
    e.launch(k, sequence_grid(s.channels / block as u64), 0, args);
    Ok(())
}

// ---- the backward ----

/// `x + (x from lane ^ 1)` when a channel's state is split over a pair of lanes.
fn pair_sum(k: &mut KernelBuilder, x: &V, split: u64) -> V {
    if split == 2 {
        let o = k.shuffle_xor(x, 1);
        k.add(x, &o)
    } else {
        x.clone()
    }
}

/// The backward's thread layout: `split` lanes per channel (each `nh` state entries), `cb`
/// channels per block, `threads = split·cb`.
/// Static shared memory a kernel may declare (48 KiB).
const MAX_STATIC_SHARED: u64 = 48 * 1024;
/// The largest state the scan backward's buffer fits at one warp per block.
pub(crate) const MAX_BWD_STATE: u64 = MAX_STATIC_SHARED / (CHUNK as u64 * 2 * 4);

struct BwdLayout {
    split: u64,
    nh: u64,
    cb: u64,
    threads: u32,
}

impl BwdLayout {
    /// The widest block (most channels) that divides the inner width and whose g_B/g_C buffer
    /// fits static shared memory: larger states take fewer warps per block.
    fn new(s: &Scan) -> Result<BwdLayout, LowerError> {
        let split = if s.state % 2 == 0 { 2 } else { 1 };
        let divides: Vec<u64> =
            [128u64 / split, 64 / split, 32 / split].into_iter().filter(|cb| s.channels % cb == 0).collect();
        if divides.is_empty() {
            return Err(LowerError(format!(
                "the scan backward needs an inner width divisible by {} (it is {})",
                32 / split,
                s.channels
            )));
        }
        let fits = |cb: u64| BwdLayout::shared_bytes(s.state, split * cb / 32) <= MAX_STATIC_SHARED;
        let cb = divides.iter().copied().find(|&cb| fits(cb)).ok_or_else(|| {
            LowerError(format!(
                "the scan backward's per-block buffer needs {} bytes of shared memory at d_state {} (at most {MAX_STATIC_SHARED}): d_state up to {} is supported",
                BwdLayout::shared_bytes(s.state, 1),
                s.state,
                MAX_BWD_STATE
            ))
        })?;
        Ok(BwdLayout { split, nh: s.state / split, cb, threads: (split * cb) as u32 })
    }

    /// Bytes of the g_B/g_C reduction buffer of a block of `warps` warps: `[CHUNK, warps, 2N]` f32.
    fn shared_bytes(state: u64, warps: u64) -> u64 {
        CHUNK as u64 * warps.max(1) * 2 * state * 4
    }

    fn warps(&self) -> u64 {
        self.threads as u64 / 32
    }

    /// Blocks along the channels (partial rows of g_B and g_C per token).
    fn blocks(&self, s: &Scan) -> u64 {
        s.channels / self.cb
    }

    /// The butterfly's exchange offsets: across the lanes of other channels (the low `split`
    /// bits of a lane name its state half).
    fn offsets(&self) -> Vec<i32> {
        let lowest = if self.split == 2 { 2 } else { 1 };
        [16, 8, 4, 2, 1].into_iter().filter(|&o| o >= lowest).collect()
    }
}

/// The values of one lane after [`butterfly`]: the sums over the warp's channels of entries
/// `index + j` of every lane's list, and whether this lane is the one that stores them.
struct Reduced {
    values: Vec<V>,
    index: V,
    writer: V,
}

/// Sums `vals` (each lane's list, the same length on every lane, padded to a power of two)
/// over the lanes that differ in the bits of `offsets`: at each offset a lane keeps half of its
/// list (the upper half when its bit is set) plus its partner's matching half, so every lane
/// ends holding a distinct part of the sum (one value once the list is exhausted; then the
/// remaining offsets add whole values and only the lanes with those bits clear store).
fn butterfly(k: &mut KernelBuilder, vals: Vec<V>, lane: &V, offsets: &[i32]) -> Reduced {
    let mut vals = vals;
    let zero_f = k.f32(0.0);
    while !vals.len().is_power_of_two() {
        vals.push(zero_f.clone());
    }
    let mut index = k.i64(0);
    let mut writer = k.raw(Ty::I1, "arith.constant true");
    for &o in offsets {
        let ov = k.i64(o as i64);
        let bit = k.and(lane, &ov);
        let z = k.i64(0);
        let set = k.cmp(Cmp::Ne, &bit, &z);
        if vals.len() > 1 {
            let half = vals.len() / 2;
            let mut kept = Vec::with_capacity(half);
            for i in 0..half {
                let (lo, hi) = (&vals[i], &vals[i + half]);
                let send = k.select(&set, lo, hi);
                let keep = k.select(&set, hi, lo);
                let got = k.shuffle_xor(&send, o);
                kept.push(k.add(&keep, &got));
            }
            let hv = k.i64(half as i64);
            let step = k.select(&set, &hv, &z);
            index = k.add(&index, &step);
            vals = kept;
        } else {
            let got = k.shuffle_xor(&vals[0], o);
            vals[0] = k.add(&vals[0], &got);
            let t = k.raw(Ty::I1, "arith.constant true");
            let clear = k.raw(Ty::I1, &format!("arith.xori {}, {} : i1", set.name, t.name));
            writer = k.and(&writer, &clear);
        }
    }
    Reduced { values: vals, index, writer }
}

/// One token of a sub-chunk: its row, whether it is inside the chunk, Δ (0 outside, which makes
/// the token an identity), δ + β, and u.
struct Tok {
    row: V,
    valid: V,
    dt: V,
    x: V,
    u: V,
}

#[allow(clippy::too_many_arguments)]
fn token(k: &mut KernelBuilder, s: &Scan, dp: &V, up: &V, beta: &V, cp: &ChunkPos, t: &V, ch: &V) -> Tok {
    let valid = k.cmp(Cmp::Lt, t, &cp.t1);
    let one = k.i64(1);
    let last = k.sub(&cp.t1, &one);
    let tc = k.min(t, &last);
    let row = k.add(&cp.row0, &tc);
    let (dt, x) = delta_t(k, s, dp, beta, &row, ch);
    let zf = k.f32(0.0);
    let dt = k.select(&valid, &dt, &zf);
    let u = load_at(k, up, s.u, &row, ch);
    Tok { row, valid, dt, x, u }
}

/// Scratch of the backward beyond the forward's carries.
struct BwdBufs {
    /// λ entering each chunk from the right, `[chunks, N, E]` f32.
    xi: BufferArg,
    /// g_B and g_C partial rows: `[B·T, blocks, 2N]` f32 (g_B in the first N).
    bc: BufferArg,
    /// Per-chunk sums: `[chunks, N + 2, E]` f32 (g_A before the factor A, then g_D, g_β).
    params: BufferArg,
}

/// `selective_scan_bwd_chunk_*`: λ backwards over each chunk from zero; stores `exp(Δ_{t0}A)·λ_{t0}`.
fn adjoint_chunks(e: &mut Emit, s: &Scan, z: &Operand, g: &Operand, block: u32, xi: &BufferArg) {
    let ops = [s.delta, s.a_log, s.c, s.dt_bias, z, g];
    let mut k = KernelBuilder::new(&name("selective_scan_bwd_chunk", s, &ops), [block, 1, 1]);
    let (dp, ap, cp_, bip, zp, gp) =
        (k.ptr("delta"), k.ptr("a_log"), k.ptr("c"), k.ptr("dt_bias"), k.ptr("z"), k.ptr("g"));
    let xp = k.ptr("xi");
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let ch = channel(&mut k);
    let cp = chunk_pos(&mut k, &rows, &batch);
    k.if_(&cp.live, |k| {
        let a = neg_a(k, s, &ap, &ch, None, s.state);
        let zero = k.i64(0);
        let beta = load_at(k, &bip, s.dt_bias, &zero, &ch);
        let init: Vec<V> = (0..s.state).map(|_| k.f32(0.0)).collect();
        let len = k.sub(&cp.t1, &cp.t0);
        let fin = k.for_(&zero, &len, 1, &init, |k, i, xi| {
            let one = k.i64(1);
            let t = k.sub(&cp.t1, &one);
            let t = k.sub(&t, &i);
            let row = k.add(&cp.row0, &t);
            let (dt, _) = delta_t(k, s, &dp, &beta, &row, &ch);
            let zv = load_at(k, &zp, z, &row, &ch);
            let gv = load_at(k, &gp, g, &row, &ch);
            let sz = k.silu(&zv);
            let gy = k.mul(&gv, &sz);
            let cv = state_row(k, &cp_, s.c, &row, None, s.state);
            (0..s.state as usize)
                .map(|j| {
                    let lam = k.fma(&gy, &cv[j], &xi[j]);
                    let ab = a.exp(k, &dt, j);
                    k.mul(&ab, &lam)
                })
                .collect()
        });
        for (j, v) in fin.iter().enumerate() {
            let jj = k.i64(j as i64);
            let i = chunk_slot(k, s, &cp.index, s.state, &jj, &ch);
            k.store(v, &xp, &i, Ty::F32);
        }
    });
    let mut args: Vec<Arg> = ops.iter().map(|o| o.arg()).collect();
    args.push(Arg::Buffer(xi.clone()));
    args.extend(sizes());
    e.launch(k, chunk_grid(s.channels / block as u64), 0, args);
}

pub(super) fn backward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let [u, delta, a_log, b, c, d, dt_bias, z, g] = ins else {
        return Err(LowerError("the scan backward takes 9 inputs".into()));
    };
    let [gu, gdelta, ga, gb, gc, gd, gbeta, gz] = outs else {
        return Err(LowerError("the scan backward has 8 outputs".into()));
    };
    let s = Scan::new(u, delta, a_log, b, c, dt_bias);
    let block = s.block()?;
    let lay = BwdLayout::new(&s)?;
    if lay.cb < 128 / lay.split && s.channels % (128 / lay.split) == 0 {
        e.fallback(format!(
            "the scan backward runs {} warps per block at d_state {} (its per-block buffer must fit shared memory), fewer than at d_state up to 16",
            lay.warps(),
            s.state
        ));
    }
    let n = s.state;
    let cr = carries(e, &s);
    let bufs = BwdBufs {
        xi: e.scratch(s.per_chunk(n)),
        bc: e.scratch(Extent::per_token((lay.blocks(&s) * 2 * n * 4) as i64)),
        params: e.scratch(s.per_chunk(n + 2)),
    };
    chunk_states(e, &s, block, &cr);
    carry(e, &s, Walk::States, &cr.h, &cr.sd, None);
    adjoint_chunks(e, &s, z, g, block, &bufs.xi);
    carry(e, &s, Walk::Adjoints, &bufs.xi, &cr.sd, None);
    backward_main(e, &s, &lay, [d, z, g], [gu, gdelta, gz], &cr, &bufs);
    reduce_bc(e, &s, &lay, &bufs, gb, gc);
    reduce_params(e, &s, &bufs, [ga, gd, gbeta]);
    Ok(())
}

/// `selective_scan_backward_*`: see the module notes. Writes g_u, g_δ, g_z, the g_B/g_C partial
/// rows and the per-chunk parameter sums.
fn backward_main(
    e: &mut Emit,
    s: &Scan,
    lay: &BwdLayout,
    ins: [&Operand; 3],
    outs: [&Operand; 3],
    cr: &Carries,
    bufs: &BwdBufs,
) {
    let [d, z, g] = ins;
    let [gu, gdelta, gz] = outs;
    let (n, nh, split) = (s.state, lay.nh, lay.split);
    let nsub = CHUNK / SUB as i64;
    let ops = [s.u, s.delta, s.a_log, s.b, s.c, d, s.dt_bias, z, g, gu, gdelta, gz];
    let mut k = KernelBuilder::new(&name("selective_scan_backward", s, &ops), [lay.threads, 1, 1]);
    // 168 registers fit three blocks per SM for a few spilled bytes (measured faster on an H200
    // than two blocks without spills).
    k.max_registers(BWD_REGISTERS);
    let (up, dp, ap, bp, cp_, dd, bip, zp, gp) = (
        k.ptr("u"),
        k.ptr("delta"),
        k.ptr("a_log"),
        k.ptr("b"),
        k.ptr("c"),
        k.ptr("d"),
        k.ptr("dt_bias"),
        k.ptr("z"),
        k.ptr("g"),
    );
    let (gup, gdp, gzp) = (k.ptr("g_u"), k.ptr("g_delta"), k.ptr("g_z"));
    let (hp, xp, bcp, pp) = (k.ptr("h"), k.ptr("xi"), k.ptr("bc_partial"), k.ptr("param_partial"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let warps = lay.warps();
    // g_B/g_C of the chunk's tokens per warp, summed over the block's warps at the chunk's end.
    let red = k.shared("bc_reduce", Ty::F32, CHUNK as u64 * warps * 2 * n);
    let bounds = k.local("bounds", Ty::F32, nsub as u64 * nh);
    let tid = k.thread_id('x');
    let c32 = k.i64(32);
    let lane = k.rem(&tid, &c32);
    let warp = k.div(&tid, &c32);
    let spv = k.i64(split as i64);
    let cl = k.div(&tid, &spv);
    let half = k.rem(&tid, &spv);
    let bx = k.block_id('x');
    let cbv = k.i64(lay.cb as i64);
    let ch = k.mul(&bx, &cbv);
    let ch = k.add(&ch, &cl);
    let nhv = k.i64(nh as i64);
    let n0 = k.mul(&half, &nhv);
    let z0 = k.i64(0);
    let first_of_pair = k.cmp(Cmp::Eq, &half, &z0);
    let cp = chunk_pos(&mut k, &rows, &batch);
    // Where each value of the butterfly goes: slot q·N + n0 + (index mod nh) of the block's
    // [SUB, warps, 2N] buffer, q = 0 for g_B and 1 for g_C.
    let offsets = lay.offsets();
    k.if_(&cp.live, |k| {
        let a = neg_a(k, s, &ap, &ch, Some(&n0), nh);
        let zero = k.i64(0);
        let beta = load_at(k, &bip, s.dt_bias, &zero, &ch);
        let dv = load_at(k, &dd, d, &zero, &ch);
        let slot_of = |k: &mut KernelBuilder, j: usize| -> V {
            let jj = k.i64(j as i64);
            let nn = k.add(&n0, &jj);
            chunk_slot(k, s, &cp.index, n, &nn, &ch)
        };
        let h0: Vec<V> = (0..nh as usize)
            .map(|j| {
                let i = slot_of(k, j);
                k.load(&hp, &i, Ty::F32)
            })
            .collect();
        // Phase A: the state at the start of every sub-chunk.
        let nsv = k.i64(nsub);
        k.for_(&zero, &nsv, 1, &h0, |k, jb, h| {
            let base = k.mul(&jb, &nhv);
            for (j, hj) in h.iter().enumerate() {
                let jj = k.i64(j as i64);
                let at = k.add(&base, &jj);
                k.shared_store(hj, &bounds, &at);
            }
            let sv = k.i64(SUB as i64);
            let t_sub = k.mul(&jb, &sv);
            let t_sub = k.add(&cp.t0, &t_sub);
            let mut h = h.to_vec();
            for st in 0..SUB {
                let off = k.i64(st as i64);
                let t = k.add(&t_sub, &off);
                let tok = token(k, s, &dp, &up, &beta, &cp, &t, &ch);
                let bv = state_row(k, &bp, s.b, &tok.row, Some(&n0), nh);
                h = advance(k, &a, &bv, &tok.dt, &tok.u, &h).0;
            }
            h
        });
        // Phase B: sub-chunks last to first, carrying λ's part from the future (ξ), ΣgA, ΣgD, Σgβ.
        let mut init: Vec<V> = (0..nh as usize)
            .map(|j| {
                let i = slot_of(k, j);
                k.load(&xp, &i, Ty::F32)
            })
            .collect();
        let zf = k.f32(0.0);
        init.extend((0..nh + 2).map(|_| zf.clone()));
        let nhu = nh as usize;
        let fin = k.for_(&zero, &nsv, 1, &init, |k, jj, acc| {
            let one = k.i64(1);
            let jb = k.sub(&nsv, &one);
            let jb = k.sub(&jb, &jj);
            let base = k.mul(&jb, &nhv);
            let mut h: Vec<V> = (0..nhu)
                .map(|j| {
                    let jv = k.i64(j as i64);
                    let at = k.add(&base, &jv);
                    k.shared_load(&bounds, &at)
                })
                .collect();
            let sv = k.i64(SUB as i64);
            let t_sub = k.mul(&jb, &sv);
            let t_sub = k.add(&cp.t0, &t_sub);
            let mut toks = Vec::new();
            let mut hist = Vec::new();
            for st in 0..SUB {
                let off = k.i64(st as i64);
                let t = k.add(&t_sub, &off);
                let tok = token(k, s, &dp, &up, &beta, &cp, &t, &ch);
                let bv = state_row(k, &bp, s.b, &tok.row, Some(&n0), nh);
                hist.push(h.clone());
                h = advance(k, &a, &bv, &tok.dt, &tok.u, &h).0;
                toks.push(tok);
            }
            let mut xi: Vec<V> = acc[..nhu].to_vec();
            let mut ga: Vec<V> = acc[nhu..2 * nhu].to_vec();
            let (mut gdsum, mut gbsum) = (acc[2 * nhu].clone(), acc[2 * nhu + 1].clone());
            for st in (0..SUB).rev() {
                let tok = &toks[st];
                let hp_ = &hist[st];
                let zv = load_at(k, &zp, z, &tok.row, &ch);
                let gv = load_at(k, &gp, g, &tok.row, &ch);
                let zf = k.f32(0.0);
                let gv = k.select(&tok.valid, &gv, &zf);
                let cv = state_row(k, &cp_, s.c, &tok.row, Some(&n0), nh);
                let bv = state_row(k, &bp, s.b, &tok.row, Some(&n0), nh);
                // h_t = Ā·h_{t−1} + Δu·B, keeping Ā·h_{t−1} for dΔ and dA.
                let dtu = k.mul(&tok.dt, &tok.u);
                let mut ab = Vec::new();
                let mut ah = Vec::new();
                let mut ht = Vec::new();
                for j in 0..nhu {
                    let x = a.exp(k, &tok.dt, j);
                    let y = k.mul(&x, &hp_[j]);
                    ht.push(k.fma(&dtu, &bv[j], &y));
                    ab.push(x);
                    ah.push(y);
                }
                let mut yp = k.f32(0.0);
                for (cn, hn) in cv.iter().zip(&ht) {
                    yp = k.fma(cn, hn, &yp);
                }
                let yp = pair_sum(k, &yp, split);
                let y = k.fma(&dv, &tok.u, &yp);
                // Gate: out = y·silu(z).
                let sg = k.sigmoid(&zv);
                let onef = k.f32(1.0);
                let oms = k.sub(&onef, &sg);
                let tt = k.fma(&zv, &oms, &onef);
                let dsilu = k.mul(&sg, &tt);
                let gyz = k.mul(&gv, &y);
                let gzv = k.mul(&gyz, &dsilu);
                let silu_z = k.mul(&zv, &sg);
                let gy = k.mul(&gv, &silu_z);
                let mut vals_b = Vec::new();
                let mut vals_c = Vec::new();
                let mut lam_b = k.f32(0.0);
                let mut lah_a = k.f32(0.0);
                for j in 0..nhu {
                    let lam = k.fma(&gy, &cv[j], &xi[j]);
                    vals_b.push(k.mul(&lam, &dtu));
                    vals_c.push(k.mul(&gy, &ht[j]));
                    lam_b = k.fma(&lam, &bv[j], &lam_b);
                    // dΔ = Σ λ·(u·B + a·Ā·h_{t−1}) = u·Σ λB + Σ (λĀh_{t−1})·a; dA = λ·Δ·Ā·h_{t−1}.
                    let lah = k.mul(&lam, &ah[j]);
                    lah_a = k.fma(&lah, &a.a[j], &lah_a);
                    ga[j] = k.fma(&lah, &tok.dt, &ga[j]);
                    xi[j] = k.mul(&ab[j], &lam);
                }
                let lam_b = pair_sum(k, &lam_b, split);
                let lah_a = pair_sum(k, &lah_a, split);
                let gdt = k.fma(&tok.u, &lam_b, &lah_a);
                let gdu = k.mul(&tok.dt, &lam_b);
                let guv = k.fma(&dv, &gy, &gdu);
                // softplus' = σ(x), 1 on the linear branch.
                let sp = k.sigmoid(&tok.x);
                let twenty = k.f32(20.0);
                let big = k.cmp(Cmp::Gt, &tok.x, &twenty);
                let sp = k.select(&big, &onef, &sp);
                let gdv = k.mul(&gdt, &sp);
                gdsum = k.fma(&gy, &tok.u, &gdsum);
                let gdm = k.select(&tok.valid, &gdv, &zf);
                gbsum = k.add(&gbsum, &gdm);
                let store = k.and(&tok.valid, &first_of_pair);
                k.if_(&store, |k| {
                    store_at(k, &guv, &gup, gu, &tok.row, &ch);
                    store_at(k, &gdv, &gdp, gdelta, &tok.row, &ch);
                    store_at(k, &gzv, &gzp, gz, &tok.row, &ch);
                });
                // g_B, g_C over the warp's channels, into the block's buffer.
                let mut vals = vals_b;
                vals.extend(vals_c);
                let r = butterfly(k, vals, &lane, &offsets);
                let sv = k.i64(SUB as i64);
                let tc = k.mul(&jb, &sv);
                let stv = k.i64(st as i64);
                let tc = k.add(&tc, &stv);
                let wn = k.i64(warps as i64);
                let slot_base = k.mul(&tc, &wn);
                let slot_base = k.add(&slot_base, &warp);
                let w2n = k.i64(2 * n as i64);
                let slot_base = k.mul(&slot_base, &w2n);
                for (j, v) in r.values.iter().enumerate() {
                    let jv = k.i64(j as i64);
                    let idx = k.add(&r.index, &jv);
                    let lim = k.i64(2 * nh as i64);
                    let real = k.cmp(Cmp::Lt, &idx, &lim);
                    let ok = k.and(&real, &r.writer);
                    k.if_(&ok, |k| {
                        let q = k.div(&idx, &nhv);
                        let nl = k.rem(&idx, &nhv);
                        let nv = k.i64(n as i64);
                        let slot = k.mul(&q, &nv);
                        let slot = k.add(&slot, &n0);
                        let slot = k.add(&slot, &nl);
                        let at = k.add(&slot_base, &slot);
                        k.shared_store(v, &red, &at);
                    });
                }
            }
            let mut out = xi;
            out.extend(ga);
            out.push(gdsum);
            out.push(gbsum);
            out
        });
        // The chunk's partial rows of g_B and g_C: the block's warps summed in order.
        k.barrier();
        let total = k.i64((CHUNK as u64 * 2 * n) as i64);
        k.for_(&tid, &total, lay.threads as i64, &[], |k, i, _| {
            let w2n = k.i64(2 * n as i64);
            let tc = k.div(&i, &w2n);
            let slot = k.rem(&i, &w2n);
            let mut sum = k.f32(0.0);
            let wn = k.i64(warps as i64);
            let row_base = k.mul(&tc, &wn);
            for w in 0..warps {
                let wv = k.i64(w as i64);
                let wv = k.add(&row_base, &wv);
                let at = k.mul(&wv, &w2n);
                let at = k.add(&at, &slot);
                let x = k.shared_load(&red, &at);
                sum = k.add(&sum, &x);
            }
            let t = k.add(&cp.t0, &tc);
            let inside = k.cmp(Cmp::Lt, &t, &cp.t1);
            k.if_(&inside, |k| {
                let row = k.add(&cp.row0, &t);
                let nb = k.i64(lay.blocks(s) as i64);
                let r = k.mul(&row, &nb);
                let r = k.add(&r, &bx);
                let r = k.mul(&r, &w2n);
                let r = k.add(&r, &slot);
                k.store(&sum, &bcp, &r, Ty::F32);
            });
            vec![]
        });
        // Per-chunk parameter sums: g_A (before the factor A) per state entry, g_D and g_β once
        // per channel.
        for j in 0..nhu {
            let jv = k.i64(j as i64);
            let nn = k.add(&n0, &jv);
            let i = chunk_slot(k, s, &cp.index, n + 2, &nn, &ch);
            k.store(&fin[nhu + j], &pp, &i, Ty::F32);
        }
        k.if_(&first_of_pair, |k| {
            for (q, v) in [(n, &fin[2 * nhu]), (n + 1, &fin[2 * nhu + 1])] {
                let qv = k.i64(q as i64);
                let i = chunk_slot(k, s, &cp.index, n + 2, &qv, &ch);
                k.store(v, &pp, &i, Ty::F32);
            }
        });
    });
    let mut args: Vec<Arg> = ops.iter().map(|o| o.arg()).collect();
    for b in [&cr.h, &bufs.xi, &bufs.bc, &bufs.params] {
        args.push(Arg::Buffer(b.clone()));
    }
    args.extend(sizes());
    e.launch(k, chunk_grid(lay.blocks(s)), 0, args);
}

/// `selective_scan_bwd_bc_*`: g_B and g_C, each element the sum of its partial rows in block order.
fn reduce_bc(e: &mut Emit, s: &Scan, lay: &BwdLayout, bufs: &BwdBufs, gb: &Operand, gc: &Operand) {
    let n = s.state as i64;
    let nb = lay.blocks(s) as i64;
    let ops = [gb, gc];
    let mut k = KernelBuilder::new(&format!("{}_p{nb}", name("selective_scan_bwd_bc", s, &ops)), [256, 1, 1]);
    let bcp = k.ptr("bc_partial");
    let (gbp, gcp) = (k.ptr("g_b"), k.ptr("g_c"));
    let rows = k.scalar_i64("rows");
    let idx = channel(&mut k);
    let w = k.i64(2 * n);
    let total = k.mul(&rows, &w);
    let inside = k.cmp(Cmp::Lt, &idx, &total);
    k.if_(&inside, |k| {
        let row = k.div(&idx, &w);
        let slot = k.rem(&idx, &w);
        let nbv = k.i64(nb);
        let base = k.mul(&row, &nbv);
        let mut sum = k.f32(0.0);
        for blk in 0..nb {
            let bv = k.i64(blk);
            let r = k.add(&base, &bv);
            let r = k.mul(&r, &w);
            let r = k.add(&r, &slot);
            let x = k.load(&bcp, &r, Ty::F32);
            sum = k.add(&sum, &x);
        }
        let nv = k.i64(n);
        let is_b = k.cmp(Cmp::Lt, &slot, &nv);
        k.if_(&is_b, |k| store_at(k, &sum, &gbp, gb, &row, &slot));
        let is_c = k.cmp(Cmp::Ge, &slot, &nv);
        k.if_(&is_c, |k| {
            let col = k.sub(&slot, &nv);
            store_at(k, &sum, &gcp, gc, &row, &col);
        });
    });
    let args = vec![Arg::Buffer(bufs.bc.clone()), gb.arg(), gc.arg(), Arg::I64 { value: Extent::per_token(1) }];
    e.launch(k, super::super::grid_1d(Extent::per_token(2 * n), 256), 0, args);
}

/// `selective_scan_bwd_params_*`: g_A_log = (Σ over chunks)·A, g_D and g_β, summed in chunk order.
fn reduce_params(e: &mut Emit, s: &Scan, bufs: &BwdBufs, outs: [&Operand; 3]) {
    let [ga, gd, gbeta] = outs;
    let n = s.state as i64;
    let ops = [s.a_log, ga, gd, gbeta];
    let mut k = KernelBuilder::new(&name("selective_scan_bwd_params", s, &ops), [256, 1, 1]);
    let ap = k.ptr("a_log");
    let pp = k.ptr("param_partial");
    let (gap, gdp, gbp) = (k.ptr("g_a_log"), k.ptr("g_d"), k.ptr("g_dt_bias"));
    let rows = k.scalar_i64("rows");
    let batch = k.scalar_i64("batch");
    let idx = channel(&mut k);
    let ev = k.i64(s.channels as i64);
    let q = k.div(&idx, &ev);
    let ch = k.rem(&idx, &ev);
    let np2 = k.i64(n + 2);
    let inside = k.cmp(Cmp::Lt, &q, &np2);
    k.if_(&inside, |k| {
        let sum = [sum_over_chunks(k, &rows, &batch, &pp, n + 2, &q, &ch, s.channels as i64)];
        let nv = k.i64(n);
        let is_a = k.cmp(Cmp::Lt, &q, &nv);
        k.if_(&is_a, |k| {
            let al = load_at(k, &ap, s.a_log, &ch, &q);
            let ex = k.exp(&al);
            let av = k.neg(&ex);
            let v = k.mul(&sum[0], &av);
            store_at(k, &v, &gap, ga, &ch, &q);
        });
        let is_d = k.cmp(Cmp::Eq, &q, &nv);
        let z = k.i64(0);
        k.if_(&is_d, |k| store_at(k, &sum[0], &gdp, gd, &z, &ch));
        let n1 = k.i64(n + 1);
        let is_b = k.cmp(Cmp::Eq, &q, &n1);
        k.if_(&is_b, |k| store_at(k, &sum[0], &gbp, gbeta, &z, &ch));
    });
    let args = vec![
        s.a_log.arg(),
        Arg::Buffer(bufs.params.clone()),
        ga.arg(),
        gd.arg(),
        gbeta.arg(),
        Arg::I64 { value: Extent::per_token(1) },
        Arg::I64 { value: Extent::per_sequence(1) },
    ];
    let total = (n + 2) * s.channels as i64;
    e.launch(k, super::super::grid_1d(Extent::constant(total), 256), 0, args);
}
