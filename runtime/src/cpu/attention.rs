//! Causal softmax attention, full or sliding-window, with GQA/MQA and rotate-half RoPE
//! (kernels.md §5–§6, samba.md §1.4): forward, backward, ring-buffer decode and cache prefill.
//!
//! Query i (position i) sees keys j with i − w < j ≤ i (w counts the query itself; no window
//! means every j ≤ i); query head h reads kv head h / (heads / kv_heads); scores are scaled by
//! 1/√head_dim. RoPE, when present, rotates q and k by their absolute positions first.
//!
//! The forward visits only in-window keys, block by block, with an online softmax, so memory is
//! O(seq · width). The backward follows FlashAttention-2 (recompute P from the saved LSE) but
//! splits into a pass over query blocks (dQ) and a pass over key blocks (dK, dV) instead of
//! scattering with atomics: each gradient element has one writer and a fixed summation order.
//! Task partitions depend only on the sizes, so results are bit-identical for any thread count.

use rayon::prelude::*;

use super::layout::check_len;
use super::rope::{apply_rope, rotated, RopeTable};
use super::Real;

/// Sizes and options of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys per query, the query included; `None` = full causal attention.
    pub window: Option<usize>,
    /// RoPE base (e.g. 10 000), or `None` for no positional rotation.
    pub rope: Option<f64>,
    /// Round the rotated q and k, P and dS to bf16 before their products, as the GPU's
    /// tensor-core kernels do (the GPU check's rounding emulation); the sums stay unrounded.
    pub bf16_operands: bool,
    /// Self-Extend (neighbour window, group size): keys at least the window away from a
    /// query score at grouped positions (see [`crate::op::SelfExtend`]). Forward only.
    pub self_extend: Option<(usize, usize)>,
}

/// Query rows per forward/dQ task.
const QUERY_BLOCK: usize = 32;
/// Keys per online-softmax step in the forward; key rows per dK/dV task in the backward.
const KEY_BLOCK: usize = 32;

impl AttnDims {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale<T: Real>(&self) -> T {
        T::of(1.0 / (self.head_dim as f64).sqrt())
    }

    /// The first key query `i` sees.
    fn first_key(&self, i: usize) -> usize {
        match self.window {
            Some(w) => (i + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// One past the last query that sees key `j`.
    fn query_end(&self, j: usize) -> usize {
        match self.window {
            Some(w) => self.seq.min(j + w),
            None => self.seq,
        }
    }

    /// `x` as a product operand: rounded to bf16 when emulating the tensor-core kernels.
    fn operand<T: Real>(&self, x: T) -> T {
        if self.bf16_operands {
            x.to_bf16()
        } else {
            x
        }
    }

    /// The rotated q or k as the products read them.
    fn operands<'a, T: Real>(&self, x: std::borrow::Cow<'a, [T]>) -> std::borrow::Cow<'a, [T]> {
        if !self.bf16_operands {
            return x;
        }
        let mut v = x.into_owned();
        super::real::round_bf16(&mut v);
        std::borrow::Cow::Owned(v)
    }

    fn check(&self, kernel: &str) {
        assert!(
            self.heads > 0 && self.kv_heads > 0 && self.heads % self.kv_heads == 0,
            "{kernel}: heads ({}) must be a positive multiple of kv_heads ({})",
            self.heads,
            self.kv_heads
        );
        assert!(self.head_dim > 0, "{kernel}: head_dim must be positive");
        assert!(self.window != Some(0), "{kernel}: a window must hold at least the query itself");
        assert!(
            self.rope.is_none() || self.head_dim % 2 == 0,
            "{kernel}: RoPE needs an even head_dim, got {}",
            self.head_dim
        );
    }
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
}

/// y ← y + alpha·x.
fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + alpha * x;
    }
}

/// Rotated q and k (or the raw ones without RoPE) and v, with per-head row access.
struct Heads<'a, T> {
    dims: AttnDims,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    /// With Self-Extend: q and k rotated at their grouped positions.
    grouped: Option<(Vec<T>, Vec<T>)>,
}

impl<T: Real> Heads<'_, T> {
    fn q(&self, bi: usize, i: usize, h: usize) -> &[T] {
        let d = &self.dims;
        &self.q[(bi * d.seq + i) * d.q_width() + h * d.head_dim..][..d.head_dim]
    }

    fn k(&self, bi: usize, j: usize, g: usize) -> &[T] {
        let d = &self.dims;
        &self.k[(bi * d.seq + j) * d.kv_width() + g * d.head_dim..][..d.head_dim]
    }

    fn v(&self, bi: usize, j: usize, g: usize) -> &[T] {
        let d = &self.dims;
        &self.v[(bi * d.seq + j) * d.kv_width() + g * d.head_dim..][..d.head_dim]
    }

    /// Forward for query rows `i0..` of sequence `bi`: `out` (`[rows, heads·head_dim]`) and `lse`
    /// (`[rows, heads]`). Keys come in blocks of `KEY_BLOCK`; each row keeps a running max `m`
    /// and sum `l`, and its output slice is the running numerator.
    fn forward_block(&self, bi: usize, i0: usize, out: &mut [T], lse: &mut [T]) {
        let d = self.dims;
        let (hd, qw) = (d.head_dim, d.q_width());
        let rows = out.len() / qw;
        let scale = d.scale::<T>();
        let mut scores = [T::zero(); KEY_BLOCK];
        let mut m = vec![T::neg_infinity(); rows];
        let mut l = vec![T::zero(); rows];
        let i_end = i0 + rows;
        for h in 0..d.heads {
            let g = h / d.group();
            m.fill(T::neg_infinity());
            l.fill(T::zero());
            for r in 0..rows {
                out[r * qw + h * hd..][..hd].fill(T::zero());
            }
            let mut j0 = d.first_key(i0) / KEY_BLOCK * KEY_BLOCK;
            while j0 < i_end {
                let j1 = (j0 + KEY_BLOCK).min(i_end);
                for r in 0..rows {
                    let i = i0 + r;
                    let (lo, hi) = (j0.max(d.first_key(i)), j1.min(i + 1));
                    if lo >= hi {
                        continue;
                    }
                    let qi = self.q(bi, i, h);
                    let s = &mut scores[..hi - lo];
                    let mut tile_max = T::neg_infinity();
                    for (sj, j) in s.iter_mut().zip(lo..hi) {
                        *sj = match (&self.grouped, d.self_extend) {
                            (Some((qg, kg)), Some((w, _))) if i - j >= w => {
                                let (qw, kw) = (d.q_width(), d.kv_width());
                                let qi = &qg[(bi * d.seq + i) * qw + h * hd..][..hd];
                                scale * dot(qi, &kg[(bi * d.seq + j) * kw + g * hd..][..hd])
                            }
                            _ => scale * dot(qi, self.k(bi, j, g)),
                        };
                        tile_max = tile_max.max(*sj);
                    }
                    let m_new = m[r].max(tile_max);
                    // exp(−∞) = 0 on a row's first visible block.
                    let correction = (m[r] - m_new).exp();
                    let acc = &mut out[r * qw + h * hd..][..hd];
                    acc.iter_mut().for_each(|a| *a = *a * correction);
                    let mut sum = T::zero();
                    for (&sj, j) in s.iter().zip(lo..hi) {
                        let p = (sj - m_new).exp();
                        sum = sum + p;
                        axpy(d.operand(p), self.v(bi, j, g), acc);
                    }
                    l[r] = l[r] * correction + sum;
                    m[r] = m_new;
                }
                j0 = j1;
            }
            for r in 0..rows {
                let acc = &mut out[r * qw + h * hd..][..hd];
                acc.iter_mut().for_each(|a| *a = *a / l[r]);
                lse[r * d.heads + h] = m[r] + l[r].ln();
            }
        }
    }
}

/// Forward. q: `[batch, seq, heads·head_dim]`; k, v: `[batch, seq, kv_heads·head_dim]`; out:
/// like q; lse: `[batch, seq, heads]`, the natural-log sum-exp of each query's scaled scores
/// (saved for the backward). Both outputs are overwritten.
pub fn attention_fwd<T: Real>(dims: AttnDims, q: &[T], k: &[T], v: &[T], out: &mut [T], lse: &mut [T]) {
    let kernel = "attention_fwd";
    dims.check(kernel);
    let (tokens, qw, kw) = (dims.batch * dims.seq, dims.q_width(), dims.kv_width());
    check_len(kernel, "q", q, tokens * qw);
    check_len(kernel, "k", k, tokens * kw);
    check_len(kernel, "v", v, tokens * kw);
    check_len(kernel, "out", out, tokens * qw);
    check_len(kernel, "lse", lse, tokens * dims.heads);
    if tokens == 0 {
        return;
    }
    let qr = dims.operands(rotated(q, dims.seq, qw, dims.head_dim, dims.rope));
    let kr = dims.operands(rotated(k, dims.seq, kw, dims.head_dim, dims.rope));
    let grouped = match (dims.self_extend, dims.rope) {
        (Some((w, g)), Some(base)) => {
            assert!(
                dims.window.is_none() && g >= 1,
                "{kernel}: Self-Extend extends full attention with a group of 1 or more"
            );
            // Queries at ⌊i/G⌋ + W − ⌊W/G⌋, keys at ⌊j/G⌋ (LongLM's grouped positions).
            let at = |x: &[T], width: usize, pos: &dyn Fn(usize) -> usize| -> Vec<T> {
                let table = super::rope::RopeTable::new(base, dims.head_dim, 0..dims.seq + w + 1);
                let mut x = x.to_vec();
                for (row, xr) in x.chunks_mut(width).enumerate() {
                    for head in xr.chunks_mut(dims.head_dim) {
                        table.rotate(pos(row % dims.seq), head);
                    }
                }
                dims.operands(std::borrow::Cow::Owned(x)).into_owned()
            };
            Some((at(q, qw, &|i| i / g + w - w / g), at(k, kw, &|j| j / g)))
        }
        (Some(_), None) => panic!("{kernel}: Self-Extend needs RoPE"),
        _ => None,
    };
    let heads = Heads { dims, q: &qr, k: &kr, v, grouped };
    out.par_chunks_mut(dims.seq * qw).zip(lse.par_chunks_mut(dims.seq * dims.heads)).enumerate().for_each(
        |(bi, (ob, lb))| {
            ob.par_chunks_mut(QUERY_BLOCK * qw)
                .zip(lb.par_chunks_mut(QUERY_BLOCK * dims.heads))
                .enumerate()
                .for_each(|(blk, (o, l))| heads.forward_block(bi, blk * QUERY_BLOCK, o, l));
        },
    );
}

/// What the backward passes share: the (rotated) inputs, the saved LSE, g_out and
/// D_i = rowsum(g_out ⊙ out) per (token, head).
struct Backward<'a, T> {
    x: Heads<'a, T>,
    lse: &'a [T],
    d_row: &'a [T],
    g_out: &'a [T],
}

impl<T: Real> Backward<'_, T> {
    fn g_out(&self, bi: usize, i: usize, h: usize) -> &[T] {
        let d = &self.x.dims;
        &self.g_out[(bi * d.seq + i) * d.q_width() + h * d.head_dim..][..d.head_dim]
    }

    /// (P_ij, dS_ij) for query i of head h and key j of kv head g, P recomputed from the LSE.
    fn p_and_ds(&self, bi: usize, i: usize, h: usize, j: usize, g: usize) -> (T, T) {
        let d = &self.x.dims;
        let row = (bi * d.seq + i) * d.heads + h;
        let s = d.scale::<T>() * dot(self.x.q(bi, i, h), self.x.k(bi, j, g));
        let p = (s - self.lse[row]).exp();
        let dp = dot(self.g_out(bi, i, h), self.x.v(bi, j, g));
        // Both are product operands (dV += P·dO, dK += dS·Q, dQ += dS·K).
        (d.operand(p), d.operand(p * (dp - self.d_row[row])))
    }

    /// dQ (before un-rotating) for query rows `i0..` of sequence `bi`: `[rows, heads·head_dim]`.
    fn query_block(&self, bi: usize, i0: usize, gq: &mut [T]) {
        let d = self.x.dims;
        let (hd, qw) = (d.head_dim, d.q_width());
        let scale = d.scale::<T>();
        for (r, row) in gq.chunks_mut(qw).enumerate() {
            let i = i0 + r;
            for (h, acc) in row.chunks_mut(hd).enumerate() {
                let g = h / d.group();
                acc.fill(T::zero());
                for j in d.first_key(i)..=i {
                    let (_, ds) = self.p_and_ds(bi, i, h, j, g);
                    axpy(scale * ds, self.x.k(bi, j, g), acc);
                }
            }
        }
    }

    /// dK (before un-rotating) and dV for key rows `j0..` of sequence `bi`, summing the query
    /// heads of each kv head in head order, then the queries in position order.
    fn key_block(&self, bi: usize, j0: usize, gk: &mut [T], gv: &mut [T]) {
        let d = self.x.dims;
        let (hd, kw) = (d.head_dim, d.kv_width());
        let scale = d.scale::<T>();
        for (r, (krow, vrow)) in gk.chunks_mut(kw).zip(gv.chunks_mut(kw)).enumerate() {
            let j = j0 + r;
            for (g, (dk, dv)) in krow.chunks_mut(hd).zip(vrow.chunks_mut(hd)).enumerate() {
                dk.fill(T::zero());
                dv.fill(T::zero());
                for h in g * d.group()..(g + 1) * d.group() {
                    for i in j..d.query_end(j) {
                        let (p, ds) = self.p_and_ds(bi, i, h, j, g);
                        axpy(p, self.g_out(bi, i, h), dv);
                        axpy(scale * ds, self.x.q(bi, i, h), dk);
                    }
                }
            }
        }
    }
}

/// Backward: gradients of `sum(g_out ⊙ out)` with respect to q, k, v (through RoPE), from the
/// saved `out` and `lse` of [`attention_fwd`]. gq, gk, gv are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    dims: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    g_out: &[T],
    gq: &mut [T],
    gk: &mut [T],
    gv: &mut [T],
) {
    let kernel = "attention_bwd";
    dims.check(kernel);
    let (seq, hd) = (dims.seq, dims.head_dim);
    let (tokens, qw, kw) = (dims.batch * seq, dims.q_width(), dims.kv_width());
    check_len(kernel, "q", q, tokens * qw);
    check_len(kernel, "k", k, tokens * kw);
    check_len(kernel, "v", v, tokens * kw);
    check_len(kernel, "out", out, tokens * qw);
    check_len(kernel, "lse", lse, tokens * dims.heads);
    check_len(kernel, "g_out", g_out, tokens * qw);
    check_len(kernel, "gq", gq, tokens * qw);
    check_len(kernel, "gk", gk, tokens * kw);
    check_len(kernel, "gv", gv, tokens * kw);
    if tokens == 0 {
        return;
    }
    let qr = dims.operands(rotated(q, seq, qw, hd, dims.rope));
    let kr = dims.operands(rotated(k, seq, kw, hd, dims.rope));
    let mut d_row = vec![T::zero(); tokens * dims.heads];
    d_row.par_chunks_mut(dims.heads).enumerate().for_each(|(tok, dr)| {
        let (o, go) = (&out[tok * qw..][..qw], &g_out[tok * qw..][..qw]);
        for (h, dh) in dr.iter_mut().enumerate() {
            *dh = dot(&o[h * hd..][..hd], &go[h * hd..][..hd]);
        }
    });
    assert!(dims.self_extend.is_none(), "{kernel}: Self-Extend is for inference; the backward has none");
    let bw = Backward { x: Heads { dims, q: &qr, k: &kr, v, grouped: None }, lse, d_row: &d_row, g_out };
    gq.par_chunks_mut(seq * qw).enumerate().for_each(|(bi, gqb)| {
        gqb.par_chunks_mut(QUERY_BLOCK * qw)
            .enumerate()
            .for_each(|(blk, rows)| bw.query_block(bi, blk * QUERY_BLOCK, rows));
    });
    gk.par_chunks_mut(seq * kw).zip(gv.par_chunks_mut(seq * kw)).enumerate().for_each(|(bi, (gkb, gvb))| {
        gkb.par_chunks_mut(KEY_BLOCK * kw)
            .zip(gvb.par_chunks_mut(KEY_BLOCK * kw))
            .enumerate()
            .for_each(|(blk, (dk, dv))| bw.key_block(bi, blk * KEY_BLOCK, dk, dv));
    });
    if let Some(base) = dims.rope {
        apply_rope(gq, seq, qw, hd, base, 0, true);
        apply_rope(gk, seq, kw, hd, base, 0, true);
    }
}

/// Decode one token per sequence at absolute position `pos` (the same for the whole batch).
///
/// q: `[batch, heads·head_dim]`; k_new, v_new: `[batch, kv_heads·head_dim]` (before RoPE).
/// k_cache, v_cache: `[batch, capacity, kv_heads·head_dim]`, a ring buffer of rotated keys and
/// values where position p lives in slot p % capacity (capacity = the window for SWA, the longest
/// context for full attention). Writes the new key and value into their slot, then attends over
/// positions max(0, pos + 1 − window)..=pos. out: `[batch, heads·head_dim]`, overwritten.
///
/// Panics if the cache is too small to hold every position the query attends.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<T: Real>(
    dims: AttnDims,
    positions: &[usize],
    capacity: usize,
    q: &[T],
    k_new: &[T],
    v_new: &[T],
    k_cache: &mut [T],
    v_cache: &mut [T],
    out: &mut [T],
) {
    let kernel = "attention_decode";
    dims.check(kernel);
    let (batch, hd, qw, kw) = (dims.batch, dims.head_dim, dims.q_width(), dims.kv_width());
    check_len(kernel, "q", q, batch * qw);
    check_len(kernel, "k_new", k_new, batch * kw);
    check_len(kernel, "v_new", v_new, batch * kw);
    check_len(kernel, "k_cache", k_cache, batch * capacity * kw);
    check_len(kernel, "v_cache", v_cache, batch * capacity * kw);
    check_len(kernel, "out", out, batch * qw);
    assert_eq!(positions.len(), batch, "{kernel}: one position per sequence");
    for &pos in positions {
        let start = dims.first_key(pos);
        assert!(
            pos + 1 - start <= capacity,
            "{kernel}: a cache of {capacity} slots cannot hold the {} positions that position {pos} attends",
            pos + 1 - start
        );
    }
    if batch == 0 {
        return;
    }
    let scale = dims.scale::<T>();
    if let Some(se) = dims.self_extend {
        return self_extend_decode(dims, se, positions, capacity, q, k_new, v_new, k_cache, v_cache, out);
    }
    out.par_chunks_mut(qw)
        .zip(k_cache.par_chunks_mut(capacity * kw))
        .zip(v_cache.par_chunks_mut(capacity * kw))
        .enumerate()
        .for_each(|(bi, ((o, kc), vc))| {
            // Each sequence at its own position.
            let pos = positions[bi];
            let (start, slot) = (dims.first_key(pos), pos % capacity);
            let table = dims.rope.map(|base| RopeTable::new(base, hd, pos..pos + 1));
            let rotate = |x: &mut [T]| {
                if let Some(t) = &table {
                    x.chunks_mut(hd).for_each(|head| t.rotate(pos, head));
                }
            };
            let k_slot = &mut kc[slot * kw..][..kw];
            k_slot.copy_from_slice(&k_new[bi * kw..][..kw]);
            rotate(k_slot);
            vc[slot * kw..][..kw].copy_from_slice(&v_new[bi * kw..][..kw]);
            let mut qrow = q[bi * qw..][..qw].to_vec();
            rotate(&mut qrow);
            let mut scores = vec![T::zero(); pos + 1 - start];
            for (h, (qh, oh)) in qrow.chunks(hd).zip(o.chunks_mut(hd)).enumerate() {
                let at = |p: usize| (p % capacity) * kw + (h / dims.group()) * hd;
                let mut max = T::neg_infinity();
                for (s, p) in scores.iter_mut().zip(start..=pos) {
                    *s = scale * dot(qh, &kc[at(p)..][..hd]);
                    max = max.max(*s);
                }
                oh.fill(T::zero());
                let mut sum = T::zero();
                for (&s, p) in scores.iter().zip(start..=pos) {
                    let e = (s - max).exp();
                    sum = sum + e;
                    axpy(e, &vc[at(p)..][..hd], oh);
                }
                oh.iter_mut().for_each(|x| *x = *x / sum);
            }
        });
}

/// [`attention_decode`] with Self-Extend `(W, G)` (full attention with RoPE): the cache holds
/// keys as they came, unrotated, since a key scores at its own position for queries less than W
/// away and at ⌊p/G⌋ for the others; each is rotated when scored. Scores as the whole-window
/// forward does.
#[allow(clippy::too_many_arguments)]
fn self_extend_decode<T: Real>(
    dims: AttnDims,
    (w, g): (usize, usize),
    positions: &[usize],
    capacity: usize,
    q: &[T],
    k_new: &[T],
    v_new: &[T],
    k_cache: &mut [T],
    v_cache: &mut [T],
    out: &mut [T],
) {
    let kernel = "attention_decode";
    let base = dims.rope.unwrap_or_else(|| panic!("{kernel}: Self-Extend needs RoPE"));
    assert!(dims.window.is_none() && g >= 1, "{kernel}: Self-Extend extends full attention with a group of 1 or more");
    let (hd, qw, kw) = (dims.head_dim, dims.q_width(), dims.kv_width());
    let scale = dims.scale::<T>();
    out.par_chunks_mut(qw)
        .zip(k_cache.par_chunks_mut(capacity * kw))
        .zip(v_cache.par_chunks_mut(capacity * kw))
        .enumerate()
        .for_each(|(bi, ((o, kc), vc))| {
            let pos = positions[bi];
            let slot = pos % capacity;
            kc[slot * kw..][..kw].copy_from_slice(&k_new[bi * kw..][..kw]);
            vc[slot * kw..][..kw].copy_from_slice(&v_new[bi * kw..][..kw]);
            let grouped_q = pos / g + w - w / g;
            let table = RopeTable::new(base, hd, 0..pos.max(grouped_q) + 1);
            let rotated = |x: &[T], at: usize| -> Vec<T> {
                let mut x = x.to_vec();
                table.rotate(at, &mut x);
                x
            };
            let mut scores = vec![T::zero(); pos + 1];
            for (h, oh) in o.chunks_mut(hd).enumerate() {
                let qh = &q[bi * qw + h * hd..][..hd];
                let (near, far) = (rotated(qh, pos), rotated(qh, grouped_q));
                let at = |p: usize| (p % capacity) * kw + (h / dims.group()) * hd;
                let mut max = T::neg_infinity();
                for (s, p) in scores.iter_mut().zip(0..=pos) {
                    let k = &kc[at(p)..][..hd];
                    *s = match pos - p >= w {
                        true => scale * dot(&far, &rotated(k, p / g)),
                        false => scale * dot(&near, &rotated(k, p)),
                    };
                    max = max.max(*s);
                }
                oh.fill(T::zero());
                let mut sum = T::zero();
                for (&s, p) in scores.iter().zip(0..=pos) {
                    let e = (s - max).exp();
                    sum = sum + e;
                    axpy(e, &vc[at(p)..][..hd], oh);
                }
                oh.iter_mut().for_each(|x| *x = *x / sum);
            }
        });
}

/// Fill ring-buffer caches (`[batch, capacity, kv_heads·head_dim]`) from a prompt's k and v
/// (`[batch, seq, kv_heads·head_dim]`) for prefill → decode: the last min(seq, capacity)
/// positions, keys rotated, position p in slot p % capacity. Slots no position reaches are
/// zeroed.
pub fn attention_fill_cache<T: Real>(
    dims: AttnDims,
    capacity: usize,
    k: &[T],
    v: &[T],
    k_cache: &mut [T],
    v_cache: &mut [T],
) {
    let kernel = "attention_fill_cache";
    dims.check(kernel);
    let (seq, hd, kw) = (dims.seq, dims.head_dim, dims.kv_width());
    check_len(kernel, "k", k, dims.batch * seq * kw);
    check_len(kernel, "v", v, dims.batch * seq * kw);
    check_len(kernel, "k_cache", k_cache, dims.batch * capacity * kw);
    check_len(kernel, "v_cache", v_cache, dims.batch * capacity * kw);
    if k_cache.is_empty() {
        return;
    }
    let first = seq.saturating_sub(capacity);
    // Self-Extend rotates each key when it is scored (at one of two positions): kept as it came.
    let table = dims.rope.filter(|_| dims.self_extend.is_none()).map(|base| RopeTable::new(base, hd, first..seq));
    k_cache.par_chunks_mut(capacity * kw).zip(v_cache.par_chunks_mut(capacity * kw)).enumerate().for_each(
        |(bi, (kc, vc))| {
            kc.fill(T::zero());
            vc.fill(T::zero());
            for p in first..seq {
                let (src, dst) = ((bi * seq + p) * kw, (p % capacity) * kw);
                let k_slot = &mut kc[dst..dst + kw];
                k_slot.copy_from_slice(&k[src..src + kw]);
                if let Some(t) = &table {
                    k_slot.chunks_mut(hd).for_each(|head| t.rotate(p, head));
                }
                vc[dst..dst + kw].copy_from_slice(&v[src..src + kw]);
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::check::{dot, *};

    #[allow(clippy::too_many_arguments)]
    fn dims(
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
        rope: Option<f64>,
    ) -> AttnDims {
        AttnDims { batch, seq, heads, kv_heads, head_dim, window, rope, bf16_operands: false, self_extend: None }
    }

    /// q, k, v with entries uniform in ±`amp`.
    fn inputs(d: AttnDims, seed: u64, amp: f64) -> Vec<Vec<f64>> {
        let mut rng = Rng::new(seed);
        let t = d.batch * d.seq;
        vec![
            rng.vec(t * d.q_width(), -amp, amp),
            rng.vec(t * d.kv_width(), -amp, amp),
            rng.vec(t * d.kv_width(), -1.0, 1.0),
        ]
    }

    fn fwd<T: Real>(d: AttnDims, x: &[Vec<T>]) -> (Vec<T>, Vec<T>) {
        let t = d.batch * d.seq;
        let mut out = vec![T::zero(); t * d.q_width()];
        let mut lse = vec![T::zero(); t * d.heads];
        attention_fwd(d, &x[0], &x[1], &x[2], &mut out, &mut lse);
        (out, lse)
    }

    fn bwd<T: Real>(d: AttnDims, x: &[Vec<T>], g: &[T]) -> Vec<Vec<T>> {
        let (out, lse) = fwd(d, x);
        let mut gs: Vec<Vec<T>> = x.iter().map(|v| vec![T::zero(); v.len()]).collect();
        let [gq, gk, gv] = &mut gs[..] else { unreachable!() };
        attention_bwd(d, &x[0], &x[1], &x[2], &out, &lse, g, gq, gk, gv);
        gs
    }

    /// RoPE straight from the formula, on every head of `[batch, seq, width]`.
    fn naive_rope(d: AttnDims, x: &[f64]) -> Vec<f64> {
        let Some(base) = d.rope else {
            return x.to_vec();
        };
        let (hd, half) = (d.head_dim, d.head_dim / 2);
        let mut y = x.to_vec();
        for (row, (xr, yr)) in x.chunks(hd).zip(y.chunks_mut(hd)).enumerate() {
            let width_heads = x.len() / (d.batch * d.seq * hd);
            let pos = (row / width_heads) % d.seq;
            for i in 0..half {
                let th = pos as f64 * base.powf(-2.0 * i as f64 / hd as f64);
                yr[i] = xr[i] * th.cos() - xr[i + half] * th.sin();
                yr[i + half] = xr[i] * th.sin() + xr[i + half] * th.cos();
            }
        }
        y
    }

    /// Full masked score matrix per (sequence, head), then softmax: (out, lse, max |score|).
    fn naive(d: AttnDims, x: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>, f64) {
        let (q, k, v) = (naive_rope(d, &x[0]), naive_rope(d, &x[1]), &x[2]);
        let (s, hd, qw, kw) = (d.seq, d.head_dim, d.q_width(), d.kv_width());
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; d.batch * s * d.heads];
        let mut biggest = 0.0f64;
        for bi in 0..d.batch {
            for h in 0..d.heads {
                let g = h / (d.heads / d.kv_heads);
                let mut scores = vec![vec![f64::NEG_INFINITY; s]; s];
                for (i, row) in scores.iter_mut().enumerate() {
                    for (j, sij) in row.iter_mut().enumerate() {
                        let visible = j <= i && d.window.is_none_or(|w| i - j < w);
                        if visible {
                            let qi = &q[(bi * s + i) * qw + h * hd..][..hd];
                            let kj = &k[(bi * s + j) * kw + g * hd..][..hd];
                            *sij = dot(qi, kj) / (hd as f64).sqrt();
                            biggest = biggest.max(sij.abs());
                        }
                    }
                }
                for (i, row) in scores.iter().enumerate() {
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = row.iter().map(|&x| (x - m).exp()).sum();
                    lse[(bi * s + i) * d.heads + h] = m + sum.ln();
                    for (j, &sij) in row.iter().enumerate() {
                        let p = (sij - m).exp() / sum;
                        for e in 0..hd {
                            out[(bi * s + i) * qw + h * hd + e] += p * v[(bi * s + j) * kw + g * hd + e];
                        }
                    }
                }
            }
        }
        (out, lse, biggest)
    }

    /// Self-Extend straight from LongLM's formula: each (query, key) pair's positions from
    /// `SelfExtend::positions`, each vector rotated at its own, then a softmax per row.
    fn naive_self_extend(d: AttnDims, se: crate::op::SelfExtend, x: &[Vec<f64>]) -> Vec<f64> {
        let base = d.rope.expect("RoPE");
        let (s, hd, qw, kw) = (d.seq, d.head_dim, d.q_width(), d.kv_width());
        let rot = |v: &[f64], pos: u64| -> Vec<f64> {
            let half = hd / 2;
            let mut y = v.to_vec();
            for i in 0..half {
                let th = pos as f64 * base.powf(-2.0 * i as f64 / hd as f64);
                y[i] = v[i] * th.cos() - v[i + half] * th.sin();
                y[i + half] = v[i] * th.sin() + v[i + half] * th.cos();
            }
            y
        };
        let mut out = vec![0.0; x[0].len()];
        for bi in 0..d.batch {
            for h in 0..d.heads {
                let g = h / (d.heads / d.kv_heads);
                for i in 0..s {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let (pq, pk) = se.positions(i as u64, j as u64);
                            let qi = rot(&x[0][(bi * s + i) * qw + h * hd..][..hd], pq);
                            let kj = rot(&x[1][(bi * s + j) * kw + g * hd..][..hd], pk);
                            dot(&qi, &kj) / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                    for (j, sc) in scores.iter().enumerate() {
                        let p = (sc - m).exp() / z;
                        for e in 0..hd {
                            out[(bi * s + i) * qw + h * hd + e] += p * x[2][(bi * s + j) * kw + g * hd + e];
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn self_extend_positions_follow_longlm() {
        let se = crate::op::SelfExtend { neighbours: 8, group: 3 };
        // Within the neighbour window: the true positions.
        assert_eq!(se.positions(20, 13), (20, 13));
        // Beyond: the query at ⌊20/3⌋ + 8 − ⌊8/3⌋ = 12, the key at ⌊3/3⌋ = 1.
        assert_eq!(se.positions(20, 12), (12, 4));
        assert_eq!(se.positions(20, 3), (12, 1));
        // Reach over a training length of 512: (512 − 8)·3 + 8.
        assert_eq!(se.reach(512), 1520);
    }

    #[test]
    fn self_extend_matches_the_formula_and_leaves_the_neighbours_alone() {
        // 40 tokens, a neighbour window of 8 and groups of 3 (neither divides the other nor 40),
        // GQA: every row past the window mixes true and grouped positions.
        let d = dims(2, 40, 4, 2, 8, None, Some(10000.0));
        let se = crate::op::SelfExtend { neighbours: 8, group: 3 };
        let x = inputs(d, 17, 1.5);
        let (got, _) = fwd(AttnDims { self_extend: Some((8, 3)), ..d }, &x);
        let want = naive_self_extend(d, se, &x);
        // f64 sums of at most 40 terms of size ~1: rounding far below 1e-12.
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "{err}");
        // A neighbour window as long as the sequence changes nothing; a short one does.
        let (plain, _) = fwd(d, &x);
        let (wide, _) = fwd(AttnDims { self_extend: Some((40, 3)), ..d }, &x);
        assert_eq!(plain, wide);
        assert!(plain.iter().zip(&got).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    /// The decode outputs of tokens `prefix..` of `x`, the first `prefix` filled into a cache
    /// of `capacity` (holding 7s where nothing was written).
    fn decoded(d: AttnDims, capacity: usize, x: &[Vec<f64>], prefix: usize) -> Vec<f64> {
        let (qw, kw) = (d.q_width(), d.kv_width());
        let (mut kc, mut vc) = (vec![7.0; d.batch * capacity * kw], vec![7.0; d.batch * capacity * kw]);
        let kp = rows(&x[1], d.batch, d.seq, kw, 0..prefix);
        let vp = rows(&x[2], d.batch, d.seq, kw, 0..prefix);
        attention_fill_cache(AttnDims { seq: prefix, ..d }, capacity, &kp, &vp, &mut kc, &mut vc);
        let mut got = vec![];
        for t in prefix..d.seq {
            let mut o = vec![0.0; d.batch * qw];
            let row = |i: usize, w: usize| rows(&x[i], d.batch, d.seq, w, t..t + 1);
            attention_decode(
                d,
                &vec![t; d.batch],
                capacity,
                &row(0, qw),
                &row(1, kw),
                &row(2, kw),
                &mut kc,
                &mut vc,
                &mut o,
            );
            got.extend(o);
        }
        got
    }

    #[test]
    fn self_extend_decode_over_unrotated_keys_reproduces_the_forward() {
        // Two sequences at different positions each step (the second a token behind), a prefix
        // shorter and one longer than the neighbour window 8, groups of 3.
        let d = dims(2, 40, 4, 2, 8, None, Some(10000.0));
        let se = AttnDims { self_extend: Some((8, 3)), ..d };
        let qw = d.q_width();
        let x = inputs(d, 23, 1.0);
        let (want, _) = fwd::<f64>(se, &x);
        for prefix in [3, 20] {
            let got = decoded(se, 40, &x, prefix);
            let expect: Vec<f64> = (prefix..d.seq).flat_map(|t| rows(&want, d.batch, d.seq, qw, t..t + 1)).collect();
            // f64, at most 40 terms per sum: rounding far below 1e-12.
            let err = rel(&got, &expect);
            assert!(err <= 1e-12, "prefix {prefix}: rel {err:e}");
        }
    }

    #[test]
    fn forward_matches_the_naive_reference() {
        let cases = [
            dims(1, 1, 4, 4, 4, None, None),
            dims(2, 7, 4, 2, 6, Some(3), Some(100.0)),
            dims(2, 70, 4, 1, 8, Some(1), Some(10_000.0)),
            dims(1, 70, 4, 4, 4, Some(100), None),
            dims(3, 65, 4, 2, 4, Some(33), Some(10_000.0)),
            dims(1, 45, 4, 1, 5, Some(17), None),
            dims(2, 33, 4, 4, 8, None, Some(500.0)),
            dims(1, 97, 3, 3, 2, Some(40), Some(10_000.0)),
        ];
        let (mut worst64, mut worst32) = (0.0f64, 0.0f64);
        for (k, &d) in cases.iter().enumerate() {
            let x: Vec<Vec<f64>> = inputs(d, k as u64 + 1, 1.0).iter().map(|v| round32(v)).collect();
            let (want, want_lse, _) = naive(d, &x);
            let (out, lse) = fwd::<f64>(d, &x);
            let e64 = rel(&out, &want).max(rel(&lse, &want_lse));
            assert!(e64 <= 1e-12, "{d:?}: f64 rel {e64:e}");
            let (out32, lse32) = fwd::<f32>(d, &cast(&x));
            let e32 = rel(&widen(&out32), &out).max(rel(&widen(&lse32), &lse));
            assert!(e32 <= 1e-5, "{d:?}: f32 rel {e32:e}");
            worst64 = worst64.max(e64);
            worst32 = worst32.max(e32);
        }
        eprintln!("attention forward: f64 vs naive {worst64:e}, f32 vs f64 {worst32:e}");
    }

    #[test]
    fn a_window_covering_the_sequence_is_full_attention() {
        let d = dims(2, 40, 4, 2, 6, None, Some(10_000.0));
        let x: Vec<Vec<f32>> = cast(&inputs(d, 5, 1.0));
        let full = fwd(d, &x);
        for w in [40, 41, 1000] {
            let windowed = fwd(AttnDims { window: Some(w), ..d }, &x);
            assert_eq!(bits(&full.0), bits(&windowed.0));
            assert_eq!(bits(&full.1), bits(&windowed.1));
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let cases = [
            dims(2, 7, 4, 4, 4, Some(3), Some(100.0)),
            dims(2, 7, 4, 2, 4, Some(3), Some(100.0)),
            dims(2, 7, 4, 1, 4, None, Some(10_000.0)),
            dims(2, 7, 2, 1, 4, Some(1), None),
            dims(2, 7, 2, 2, 4, Some(9), None),
            // Several query and key blocks.
            dims(1, 40, 2, 1, 4, Some(9), Some(50.0)),
        ];
        for (k, &d) in cases.iter().enumerate() {
            let mut x = inputs(d, 20 + k as u64, 1.0);
            let g = Rng::new(60 + k as u64).vec(x[0].len(), -1.0, 1.0);
            let analytic = bwd::<f64>(d, &x, &g);
            let loss = |x: &[Vec<f64>]| dot(&fwd::<f64>(d, x).0, &g);
            check_gradients(&format!("attention {d:?}"), &mut x, &["q", "k", "v"], &analytic, &loss);
        }
    }

    #[test]
    fn f32_gradients_track_f64() {
        let d = dims(2, 50, 4, 2, 8, Some(20), Some(10_000.0));
        let x: Vec<Vec<f64>> = inputs(d, 25, 1.0).iter().map(|v| round32(v)).collect();
        let g = round32(&Rng::new(26).vec(x[0].len(), -1.0, 1.0));
        let g64 = bwd::<f64>(d, &x, &g);
        let g32 = bwd::<f32>(d, &cast(&x), &to_f32(&g));
        let mut worst = 0.0f64;
        for (a, b) in g32.iter().zip(&g64) {
            worst = worst.max(rel(&widen(a), b));
        }
        assert!(worst <= 1e-4, "f32 gradient rel {worst:e}");
        eprintln!("attention backward: f32 vs f64 {worst:e}");
    }

    #[test]
    fn decode_over_the_ring_buffer_reproduces_the_forward() {
        let configs = [
            (Some(5), 5, Some(100.0)),
            (Some(5), 8, Some(100.0)),
            (Some(5), 5, None),
            (None, 45, Some(10_000.0)),
            (None, 50, Some(10_000.0)),
            (Some(1), 1, Some(10_000.0)),
            (Some(40), 40, Some(10_000.0)),
            (Some(60), 60, None),
        ];
        let mut worst = 0.0f64;
        for (window, capacity, rope) in configs {
            let d = dims(2, 45, 4, 2, 6, window, rope);
            let qw = d.q_width();
            let x = inputs(d, 70, 1.0);
            let (want, _) = fwd::<f64>(d, &x);
            for prefix in [0, 9, 38] {
                let got = decoded(d, capacity, &x, prefix);
                let expect: Vec<f64> =
                    (prefix..d.seq).flat_map(|t| rows(&want, d.batch, d.seq, qw, t..t + 1)).collect();
                let err = rel(&got, &expect);
                assert!(err <= 1e-12, "window {window:?} capacity {capacity} prefix {prefix}: rel {err:e}");
                worst = worst.max(err);
            }
        }
        eprintln!("attention decode vs forward: {worst:e}");
    }

    #[test]
    #[should_panic(expected = "cannot hold")]
    fn decode_rejects_a_cache_smaller_than_the_window() {
        let d = dims(1, 1, 2, 1, 4, Some(4), None);
        let mut kc = vec![0.0f64; 3 * 4];
        let mut vc = kc.clone();
        let mut out = vec![0.0; 8];
        attention_decode(d, &[5], 3, &[0.0; 8], &[0.0; 4], &[0.0; 4], &mut kc, &mut vc, &mut out);
    }

    #[test]
    fn results_are_bitwise_identical_across_runs_and_thread_counts() {
        let d = dims(3, 70, 4, 2, 8, Some(20), Some(10_000.0));
        let x: Vec<Vec<f32>> = cast(&inputs(d, 80, 1.0));
        let g = to_f32(&Rng::new(81).vec(x[0].len(), -1.0, 1.0));
        let cap = 20;
        let runs = in_pools(|| {
            let (out, lse) = fwd(d, &x);
            let mut all = bits(&out);
            all.extend(bits(&lse));
            for gr in bwd(d, &x, &g) {
                all.extend(bits(&gr));
            }
            let kw = d.kv_width();
            let mut kc = vec![0.0f32; d.batch * cap * kw];
            let mut vc = kc.clone();
            attention_fill_cache(d, cap, &x[1], &x[2], &mut kc, &mut vc);
            let mut o = vec![0.0f32; d.batch * d.q_width()];
            let q1 = to_f32(&Rng::new(82).vec(o.len(), -1.0, 1.0));
            let kv1 = to_f32(&Rng::new(83).vec(d.batch * kw, -1.0, 1.0));
            attention_decode(d, &vec![d.seq; d.batch], cap, &q1, &kv1, &kv1, &mut kc, &mut vc, &mut o);
            all.extend(bits(&o));
            all
        });
        for r in &runs[1..] {
            assert!(r == &runs[0], "attention results depend on the run or thread count");
        }
    }

    #[test]
    fn large_scores_stay_finite_and_accurate() {
        let d = dims(2, 40, 4, 2, 8, Some(16), Some(10_000.0));
        let x: Vec<Vec<f64>> = inputs(d, 90, 5.5).iter().map(|v| round32(v)).collect();
        let (want, want_lse, biggest) = naive(d, &x);
        assert!(biggest >= 30.0, "test data should reach |score| 30, got {biggest}");
        let x32: Vec<Vec<f32>> = cast(&x);
        let (out, lse) = fwd(d, &x32);
        assert!(all_finite(&out) && all_finite(&lse));
        let e = rel(&widen(&out), &want).max(rel(&widen(&lse), &want_lse));
        assert!(e <= 1e-5, "f32 forward rel {e:e}");
        let g = round32(&Rng::new(91).vec(x[0].len(), -1.0, 1.0));
        let g32 = bwd(d, &x32, &to_f32(&g));
        let g64 = bwd::<f64>(d, &x, &g);
        for (a, b) in g32.iter().zip(&g64) {
            assert!(all_finite(a));
            let e = rel(&widen(a), b);
            assert!(e <= 1e-4, "f32 gradient rel {e:e}");
        }
    }
}
