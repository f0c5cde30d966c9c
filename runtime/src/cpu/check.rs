//! Test helpers shared by the kernel tests: deterministic data, error measures, central finite
//! differences and thread-pool runs.

/// xorshift64* generator: deterministic test data without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * u
    }

    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// ‖x − r‖₂ / ‖r‖₂, accumulated in f64 (‖x‖₂ when r is all zero).
pub fn rel(x: &[f64], r: &[f64]) -> f64 {
    assert_eq!(x.len(), r.len(), "rel: length mismatch");
    let num: f64 = x.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = r.iter().map(|b| b * b).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Rounds through f32, so an f64 reference sees exactly the f32 kernel's inputs.
pub fn round32(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v as f32 as f64).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `loss` with respect to every element of `inputs[which]`.
pub fn fd_gradient(inputs: &mut [Vec<f64>], which: usize, step: f64, loss: &dyn Fn(&[Vec<f64>]) -> f64) -> Vec<f64> {
    (0..inputs[which].len())
        .map(|e| {
            let x0 = inputs[which][e];
            inputs[which][e] = x0 + step;
            let up = loss(inputs);
            inputs[which][e] = x0 - step;
            let down = loss(inputs);
            inputs[which][e] = x0;
            (up - down) / (2.0 * step)
        })
        .collect()
}

/// Checks each analytic gradient against central differences (step 1e-6, rel ≤ 1e-6); returns
/// the largest relative error seen.
pub fn check_gradients(
    name: &str,
    inputs: &mut [Vec<f64>],
    names: &[&str],
    analytic: &[Vec<f64>],
    loss: &dyn Fn(&[Vec<f64>]) -> f64,
) -> f64 {
    let mut worst = 0.0f64;
    for (which, grad) in analytic.iter().enumerate() {
        let fd = fd_gradient(inputs, which, 1e-6, loss);
        let err = rel(grad, &fd);
        assert!(err <= 1e-6, "{name}: gradient of {} off by rel {err:e}\n analytic {grad:?}\n fd {fd:?}", names[which]);
        worst = worst.max(err);
    }
    eprintln!("{name}: worst gradient rel error vs finite differences {worst:e}");
    worst
}

/// Runs `f` in the global pool twice and in dedicated pools of 1 and 3 threads.
pub fn in_pools<R: Send>(f: impl Fn() -> R + Sync + Send) -> Vec<R> {
    let mut runs = vec![f(), f()];
    for n in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        runs.push(pool.install(&f));
    }
    runs
}

/// Bit patterns, for exact comparisons that also distinguish −0 and NaN payloads.
pub fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

pub fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// Rows `ts` of every sequence of a `[batch, seq, width]` tensor, as `[batch, ts.len(), width]`.
pub fn rows(x: &[f64], batch: usize, seq: usize, width: usize, ts: std::ops::Range<usize>) -> Vec<f64> {
    (0..batch).flat_map(|bi| x[(bi * seq + ts.start) * width..(bi * seq + ts.end) * width].to_vec()).collect()
}

/// Casts every tensor of a list to `T`.
pub fn cast<T: super::Real>(x: &[Vec<f64>]) -> Vec<Vec<T>> {
    x.iter().map(|v| v.iter().map(|&e| T::of(e)).collect()).collect()
}

/// Widens a `T` tensor to f64.
pub fn widen<T: super::Real>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64().unwrap()).collect()
}
