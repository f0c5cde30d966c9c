//! Collectives between the ranks of a data-parallel run: each rank trains on its share of every
//! step's micro-batches, and the ranks' gradients are summed before each holds the same update.
//!
//! Sums run in rank order (rank 0's values, plus rank 1's, ...), starting from zero, so a run of
//! N ranks each with one micro-batch adds the very numbers, in the very order, that one process
//! accumulating N micro-batches adds: their losses and parameters are bit-identical.
//!
//! [`Solo`] is a world of one. [`LocalGroup`] joins ranks that are threads of one process (the
//! CPU reference's ranks, and GPUs of one host through the host): every rank deposits its buffer,
//! waits for the others, and sums all of them itself. [`TcpGroup`] joins ranks that are
//! processes, on one machine or several, by the rendezvous torchrun uses (`RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`): rank 0 sums what the others send. A rank that fails aborts the
//! group, and every rank waiting in it returns an error instead of waiting for ever.

mod local;
pub mod tcp;

pub use local::{run_ranks, LocalGroup};
pub use tcp::{Rendezvous, TcpGroup};

/// One rank's view of its group.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `buf` on every rank by the sum over ranks of their `buf`s, added in rank order.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), String>;
    /// As [`Collective::all_reduce_f32`], for host values (losses).
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), String>;
    /// Replaces `buf` on every rank by rank `root`'s.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), String>;
    /// Tells every rank of the group that this one failed with `why`: their collectives return
    /// an error from then on.
    fn abort(&self, why: &str);
    /// Sums `count` f32 at each device address of `buffers` over the ranks, in place, on
    /// `stream` (a CUDA stream of this rank's GPU), and waits for it; None where the group has
    /// no path between devices (the sums then go through the host).
    fn all_reduce_device_f32(&self, _buffers: &[(u64, usize)], _stream: usize) -> Option<Result<(), String>> {
        None
    }
    /// Replaces the `bytes` bytes at each device address of `buffers` on every rank by rank
    /// `root`'s, on `stream`, and waits for it; None where the group has no path between
    /// devices.
    fn broadcast_device(&self, _buffers: &[(u64, usize)], _root: usize, _stream: usize) -> Option<Result<(), String>> {
        None
    }
}

/// A world of one rank: every collective leaves its buffer as it is.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _: &mut [f32]) -> Result<(), String> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<(), String> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32], _: usize) -> Result<(), String> {
        Ok(())
    }
    fn abort(&self, _: &str) {}
}

/// How a training command's ranks are laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Every rank a thread of this process (`--ranks N`; one by default), rank r on GPU r.
    Threads(usize),
    /// This process is one rank of several, by torchrun's environment.
    Process(Rendezvous),
}

impl Layout {
    /// From the environment (`WORLD_SIZE` set: this process is one rank) and `--ranks`.
    pub fn new(ranks: Option<u64>) -> Result<Layout, String> {
        match (Rendezvous::from_env()?, ranks) {
            (Some(r), Some(_)) => Err(format!(
                "WORLD_SIZE={} is set, so this process is rank {} of a group started torchrun-style: leave out --ranks",
                r.world, r.rank
            )),
            (Some(r), None) => Ok(Layout::Process(r)),
            (None, n) => Ok(Layout::Threads(n.unwrap_or(1) as usize)),
        }
    }

    /// Ranks in the whole group.
    pub fn world(&self) -> usize {
        match self {
            Layout::Threads(n) => *n,
            Layout::Process(r) => r.world,
        }
    }

    /// The GPU ordinals this process uses.
    pub fn devices(&self) -> Vec<usize> {
        match self {
            Layout::Threads(n) => (0..*n).collect(),
            Layout::Process(r) => vec![r.local_rank],
        }
    }
}

/// Trains on every rank this process holds: `make(rank, device)` builds a rank's backend on
/// its own thread, then `train` runs with the rank's collective: NCCL between GPUs when `nccl`
/// (the id made by rank 0 and handed out), else the ranks' host group. The result of the
/// lowest rank here (rank 0's where this process holds it).
pub fn run<T: Send>(
    layout: &Layout,
    nccl: bool,
    make: impl Fn(usize, usize) -> Result<Box<dyn crate::backend::Backend>, String> + Sync,
    train: impl Fn(&mut dyn crate::backend::Backend, &dyn Collective) -> Result<T, String> + Sync,
) -> Result<T, String> {
    use crate::cuda::nccl::{with_group, NcclId};
    match layout {
        Layout::Threads(n) => {
            let id = if nccl { Some(NcclId::new()?) } else { None };
            let all = run_ranks(*n, |g| {
                let mut be = make(g.rank(), g.rank())?;
                with_group(g, id, |c| train(be.as_mut(), c))
            })?;
            Ok(all.into_iter().next().expect("one rank at least"))
        }
        Layout::Process(r) => {
            let tcp = TcpGroup::join(r)?;
            let go = || {
                let mut be = make(r.rank, r.local_rank)?;
                let id = match nccl {
                    true => {
                        let mut bytes = if r.rank == 0 { NcclId::new()?.to_bytes() } else { Vec::new() };
                        tcp.broadcast(&mut bytes)?;
                        Some(NcclId::from_bytes(&bytes)?)
                    }
                    false => None,
                };
                with_group(&tcp, id, |c| train(be.as_mut(), c))
            };
            let out = go();
            if let Err(e) = &out {
                tcp.abort(e);
            }
            out
        }
    }
}
