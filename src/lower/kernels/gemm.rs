//! Matrix products: described in the device plan for cuBLASLt (bf16 or f32 operands, f32
//! accumulation), except products of a few rows, which run on our own kernel (`skinny`).

use super::super::{Emit, LowerError, Operand};
use weft_runtime::device::{Extent, Gemm};

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
pub(super) fn matmul(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, out) = (&ins[0], &ins[1], &outs[0]);
    if super::skinny::usable(e, x, w, out) {
        super::skinny::matmul(e, x, w, out);
        return Ok(());
    }
    e.gemm(Gemm {
        m: x.rows(),
        n: Extent::constant(out.width as i64),
        k: Extent::constant(x.width as i64),
        a: x.matrix(),
        trans_a: false,
        b: w.matrix(),
        trans_b: true,
        c: out.matrix(),
        alpha: 1.0,
        beta: 0.0,
    });
    Ok(())
}

/// `g_x[m, k] = g[m, n] · w[n, k]` and `g_w[n, k] = g[m, n]ᵀ · x[m, k]` (f32).
pub(super) fn matmul_backward(e: &mut Emit, ins: &[Operand], outs: &[Operand]) -> Result<(), LowerError> {
    let (x, w, g) = (&ins[0], &ins[1], &ins[2]);
    let (gx, gw) = (&outs[0], &outs[1]);
    e.gemm(Gemm {
        m: g.rows(),
        n: Extent::constant(x.width as i64),
        k: Extent::constant(g.width as i64),
        a: g.matrix(),
        trans_a: false,
        b: w.matrix(),
        trans_b: false,
        c: gx.matrix(),
        alpha: 1.0,
        beta: 0.0,
    });
    e.gemm(Gemm {
        m: Extent::constant(g.width as i64),
        n: Extent::constant(x.width as i64),
        k: g.rows(),
        a: g.matrix(),
        trans_a: true,
        b: x.matrix(),
        trans_b: false,
        c: gw.matrix(),
        alpha: 1.0,
        beta: 0.0,
    });
    Ok(())
}
