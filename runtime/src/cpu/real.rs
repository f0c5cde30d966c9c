//! The element type of the CPU reference (f32, or f64 in check mode) and its matrix product.

use std::fmt::{Debug, Display};
use std::iter::Sum;

pub trait Real:
    num_traits::Float + num_traits::FromPrimitive + Send + Sync + Default + Debug + Display + Sum + 'static
{
    /// Raw GEMM of the `matrixmultiply` crate for this type.
    ///
    /// # Safety
    /// The pointers and strides must describe valid matrices of the given sizes, and `c` must not
    /// overlap `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );

    fn of(x: f64) -> Self {
        <Self as num_traits::FromPrimitive>::from_f64(x).unwrap_or_else(Self::nan)
    }

    /// The nearest bf16 value (ties to even), as the GPU's `cvt.rn.bf16.f32` rounds an f32.
    /// Through f32: `half`'s conversion straight from f64 rounds some values differently.
    fn to_bf16(self) -> Self {
        Self::of(half::bf16::from_f32(self.to_f32().unwrap_or(f32::NAN)).to_f64())
    }
}

/// Rounds every element to bf16 in place.
pub fn round_bf16<T: Real>(x: &mut [T]) {
    x.iter_mut().for_each(|v| *v = v.to_bf16());
}

impl Real for f32 {
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Real for f64 {
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// `C = op(A)·op(B) + beta·C` on row-major storage: C is m×n; A is m×k, or stored k×m when
/// `a_transposed`; B is k×n, or stored n×k when `b_transposed`.
///
/// Panics if a slice is shorter than its matrix: callers pass buffers sized by the plan.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    a_transposed: bool,
    b: &[T],
    b_transposed: bool,
    c: &mut [T],
    beta: T,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: buffer too small");
    if m == 0 || n == 0 {
        return;
    }
    let (rsa, csa) = if a_transposed { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if b_transposed { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every index the strides reach; `c` is a distinct
    // mutable borrow, so it overlaps neither input.
    unsafe { T::raw_gemm(m, k, n, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_the_definition_in_every_layout() {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
        let at: Vec<f64> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f64> = (0..k * n).map(|i| b[(i % k) * n + i / k]).collect();
        let mut want = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        for (aa, ta) in [(&a, false), (&at, true)] {
            for (bb, tb) in [(&b, false), (&bt, true)] {
                let mut c = vec![1.0; m * n];
                gemm(m, k, n, aa, ta, bb, tb, &mut c, 0.0);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-12, "ta={ta} tb={tb}");
                }
            }
        }
    }
}
