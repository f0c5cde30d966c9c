//! Ranks that are threads of one process.

use super::Collective;
use std::any::Any;
use std::sync::{Arc, Condvar, Mutex};

/// What the ranks of a [`LocalGroup`] share.
struct Shared {
    world: usize,
    state: Mutex<State>,
    turn: Condvar,
}

struct State {
    /// Ranks at the barrier in the current generation.
    arrived: usize,
    /// Counts the barriers passed: a rank waits until it changes.
    generation: u64,
    /// Each rank's buffer of the collective under way.
    deposits: Vec<Option<Box<dyn Any + Send>>>,
    aborted: Option<String>,
}

/// A rank of a group whose ranks are threads of this process.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// The `world` ranks of a new group, rank 0 first: hand one to each thread.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let state = State { arrived: 0, generation: 0, deposits: (0..world).map(|_| None).collect(), aborted: None };
        let shared = Arc::new(Shared { world, state: Mutex::new(state), turn: Condvar::new() });
        (0..world).map(|rank| LocalGroup { rank, shared: shared.clone() }).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A rank that panicked while holding the lock left nothing half-written that matters:
        // the group is aborted below by its guard.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every rank has arrived (or the group is aborted).
    fn barrier<'a>(
        &'a self,
        mut s: std::sync::MutexGuard<'a, State>,
    ) -> Result<std::sync::MutexGuard<'a, State>, String> {
        if let Some(why) = &s.aborted {
            return Err(why.clone());
        }
        s.arrived += 1;
        if s.arrived == self.shared.world {
            s.arrived = 0;
            s.generation += 1;
            self.shared.turn.notify_all();
            return Ok(s);
        }
        let generation = s.generation;
        while s.generation == generation {
            if let Some(why) = &s.aborted {
                return Err(why.clone());
            }
            s = self.shared.turn.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        Ok(s)
    }

    fn all_reduce<T>(&self, buf: &mut [T]) -> Result<(), String>
    where
        T: Copy + Default + std::ops::Add<Output = T> + Send + 'static,
    {
        let mut s = self.lock();
        s.deposits[self.rank] = Some(Box::new(buf.to_vec()));
        s = self.barrier(s)?;
        let mut sum = vec![T::default(); buf.len()];
        for (r, d) in s.deposits.iter().enumerate() {
            let d = d
                .as_ref()
                .and_then(|d| d.downcast_ref::<Vec<T>>())
                .ok_or_else(|| format!("rank {r} reduced a buffer of another type than rank {}'s", self.rank))?;
            if d.len() != buf.len() {
                let why = format!("rank {r} reduced {} values and rank {} {}", d.len(), self.rank, buf.len());
                drop(s);
                self.abort(&why);
                return Err(why);
            }
            for (a, &b) in sum.iter_mut().zip(d) {
                *a = *a + b;
            }
        }
        // Every rank has read every deposit before any rank's next collective replaces its own.
        s = self.barrier(s)?;
        s.deposits[self.rank] = None;
        buf.copy_from_slice(&sum);
        Ok(())
    }
}

impl LocalGroup {
    fn broadcast<T: Copy + Send + 'static>(&self, buf: &mut [T], root: usize) -> Result<(), String> {
        let mut s = self.lock();
        if self.rank == root {
            s.deposits[root] = Some(Box::new(buf.to_vec()));
        }
        s = self.barrier(s)?;
        if self.rank != root {
            let d = s.deposits.get(root).and_then(|d| d.as_ref()).and_then(|d| d.downcast_ref::<Vec<T>>());
            match d {
                Some(d) if d.len() == buf.len() => buf.copy_from_slice(d),
                _ => {
                    let why = format!("rank {root} broadcast a buffer unlike rank {}'s", self.rank);
                    drop(s);
                    self.abort(&why);
                    return Err(why);
                }
            }
        }
        s = self.barrier(s)?;
        if self.rank == root {
            s.deposits[root] = None;
        }
        Ok(())
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), String> {
        self.all_reduce(buf)
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), String> {
        self.all_reduce(buf)
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), String> {
        self.broadcast(buf, root)
    }
    fn abort(&self, why: &str) {
        let mut s = self.lock();
        if s.aborted.is_none() {
            s.aborted = Some(format!("rank {} failed: {why}", self.rank));
        }
        self.shared.turn.notify_all();
    }
}

/// Runs `f` on each rank of a new [`LocalGroup`] of `world` threads (one rank: on this thread);
/// a rank that fails or panics aborts the others. Every rank's result by rank, or the first failure (`rank r failed:
/// why`).
pub fn run_ranks<T: Send>(world: usize, f: impl Fn(&LocalGroup) -> Result<T, String> + Sync) -> Result<Vec<T>, String> {
    let groups = LocalGroup::new(world);
    // A world of one runs here, its error as it is: there is no other rank to stop.
    if let [only] = &groups[..] {
        return f(only).map(|t| vec![t]);
    }
    let results: Vec<Result<T, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .map(|g| {
                let f = &f;
                s.spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(g)))
                        .unwrap_or_else(|_| Err("it panicked".to_string()));
                    if let Err(e) = &r {
                        g.abort(e);
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("its thread was lost".into()))).collect()
    });
    if let Some(why) = groups.first().and_then(|g| g.lock().aborted.clone()) {
        return Err(why);
    }
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Collective;

    #[test]
    fn sums_in_rank_order_from_zero() {
        // 1e8 + 1 − 1e8 in f32 depends on the order: (1e8 + 1) rounds the 1 away.
        let values = [1e8f32, 1.0, -1e8];
        let out = run_ranks(3, |g| {
            let mut b = vec![values[g.rank()], 2.0 * g.rank() as f32];
            for _ in 0..3 {
                g.all_reduce_f32(&mut b)?;
                b = vec![values[g.rank()], 2.0 * g.rank() as f32];
            }
            g.all_reduce_f32(&mut b)?;
            Ok(b)
        });
        let want = vec![((0.0f32 + 1e8) + 1.0) + -1e8, 6.0];
        assert_eq!(
            (want[0], (1e8f32 + -1e8) + 1.0),
            (0.0, 1.0),
            "the order must matter for this check to mean anything"
        );
        for r in out.unwrap() {
            assert_eq!(r, want);
        }
    }

    #[test]
    fn broadcasts_the_roots_buffer_bit_for_bit() {
        let out = run_ranks(3, |g| {
            let mut b = if g.rank() == 1 { vec![-0.0f32, 3.5] } else { vec![9.0; 2] };
            g.broadcast_f32(&mut b, 1)?;
            Ok(b.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        });
        for b in out.unwrap() {
            assert_eq!(b, [(-0.0f32).to_bits(), 3.5f32.to_bits()]);
        }
    }

    #[test]
    fn a_failing_rank_releases_the_others() {
        let out = run_ranks(3, |g| -> Result<(), String> {
            if g.rank() == 2 {
                return Err("out of data".into());
            }
            let mut b = [g.rank() as f64];
            loop {
                g.all_reduce_f64(&mut b)?;
            }
        });
        assert_eq!(out, Err("rank 2 failed: out of data".to_string()));
    }

    #[test]
    fn mismatched_buffers_are_an_error_on_every_rank() {
        let out = run_ranks(2, |g| {
            let mut b = vec![1.0f32; 3 + g.rank()];
            g.all_reduce_f32(&mut b)
        });
        let e = out.unwrap_err();
        assert!(e.contains("reduced 4 values") || e.contains("reduced 3 values"), "{e}");
    }
}
