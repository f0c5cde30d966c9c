//! NCCL between the GPUs of one host, each a rank on its own thread: the gradient accumulators
//! are summed on the devices (`ncclAllReduce` in place, every accumulator in one group call on
//! the rank's stream), host values (losses) through the ranks' [`LocalGroup`].
//!
//! libnccl is loaded at run time like libcuda (NVIDIA's PyPI wheel `nvidia-nccl-cu13` puts it
//! in `site-packages/nvidia/nccl/lib`). The ring algorithm and the simple protocol are pinned
//! (unless the environment says otherwise), so two runs sum in the same order and give the same
//! bits; with two ranks a ring adds a + b, which is rank order, so their losses equal one
//! process accumulating two micro-batches. A watchdog thread polls the communicator's
//! asynchronous error and aborts it when a collective has waited past its deadline, so a rank
//! that died never leaves the others waiting.

use crate::collective::Collective;
use cudarc::nccl::{result, sys};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A new group's identity, made by one rank (here: before the ranks' threads start) and given
/// to every rank.
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

// SAFETY: 128 opaque bytes.
unsafe impl Send for NcclId {}
unsafe impl Sync for NcclId {}

impl NcclId {
    pub fn new() -> Result<NcclId, String> {
        available()?;
        // Reproducible sums: one algorithm and protocol whatever the message sizes.
        for (k, v) in [("NCCL_ALGO", "Ring"), ("NCCL_PROTO", "Simple")] {
            if std::env::var_os(k).is_none() {
                // SAFETY: set before any rank's thread starts.
                unsafe { std::env::set_var(k, v) };
            }
        }
        result::get_uniqueid().map(NcclId).map_err(|e| format!("ncclGetUniqueId: {e:?}"))
    }

    /// The id as bytes, to hand to ranks in other processes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|&c| c as u8).collect()
    }

    pub fn from_bytes(b: &[u8]) -> Result<NcclId, String> {
        if b.len() != 128 {
            return Err(format!("an NCCL id is 128 bytes, not {}", b.len()));
        }
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, &s) in id.internal.iter_mut().zip(b) {
            *d = s as _;
        }
        Ok(NcclId(id))
    }
}

/// Whether libnccl can be loaded, with what to install where it cannot.
pub fn available() -> Result<(), String> {
    // SAFETY: only asks the loader whether the library opens.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err("ranks on several GPUs need NCCL: libnccl.so.2 could not be loaded (pip install nvidia-nccl-cu13, and put its nvidia/nccl/lib on LD_LIBRARY_PATH)".into())
    }
}

/// The communicator, shared with the watchdog.
struct Comm {
    raw: sys::ncclComm_t,
    aborted: AtomicBool,
    /// When the collective under way started (ms since `epoch`), 0 when none is.
    waiting_since: AtomicU64,
    epoch: Instant,
}

// SAFETY: NCCL allows ncclCommGetAsyncError and ncclCommAbort from another thread than the one
// issuing collectives; nothing else is called from two threads.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

impl Comm {
    fn async_error(&self) -> Option<String> {
        let mut e = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (aborted ones are not asked).
        let r = unsafe { sys::ncclCommGetAsyncError(self.raw, &mut e) };
        match (r, e) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess) => None,
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => None,
            (sys::ncclResult_t::ncclSuccess, e) => Some(format!("{e:?}")),
            (r, _) => Some(format!("ncclCommGetAsyncError: {r:?}")),
        }
    }

    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: once; the communicator is not used afterwards.
            unsafe {
                let _ = result::comm_abort(self.raw);
            }
        }
    }
}

/// One rank of a group of GPUs.
pub struct NcclGroup<'a> {
    host: &'a dyn Collective,
    comm: Arc<Comm>,
    deadline: Duration,
    stop: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl<'a> NcclGroup<'a> {
    /// Joins group `id` as `host`'s rank, on the GPU whose context is bound to this thread
    /// (every rank calls this at once: NCCL's initialisation is itself collective).
    pub fn join(host: &'a dyn Collective, id: NcclId, deadline: Duration) -> Result<NcclGroup<'a>, String> {
        available()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives the communicator; the id came from ncclGetUniqueId.
        unsafe { result::comm_init_rank(&mut raw, host.world() as i32, id.0, host.rank() as i32) }
            .map_err(|e| format!("rank {}: ncclCommInitRank: {e:?}", host.rank()))?;
        let comm = Arc::new(Comm {
            raw,
            aborted: AtomicBool::new(false),
            waiting_since: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (comm, stop) = (comm.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) && !comm.aborted.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    let since = comm.waiting_since.load(Ordering::SeqCst);
                    let late =
                        since > 0 && comm.epoch.elapsed().as_millis() as u64 > since + deadline.as_millis() as u64;
                    if late || comm.async_error().is_some() {
                        comm.abort();
                    }
                }
            })
        };
        Ok(NcclGroup { host, comm, deadline, stop, watchdog: Some(watchdog) })
    }

    fn failed(&self, what: &str) -> String {
        match self.comm.aborted.load(Ordering::SeqCst) {
            true => format!(
                "rank {}: {what} was aborted (a rank failed, or the collective waited more than {} s)",
                self.host.rank(),
                self.deadline.as_secs()
            ),
            false => format!("rank {}: {what} failed", self.host.rank()),
        }
    }
}

impl NcclGroup<'_> {
    /// `issue` for each buffer inside one NCCL group call on `stream`, then waits for all of
    /// it under the watchdog's deadline.
    fn grouped(
        &self,
        what: &str,
        buffers: &[(u64, usize)],
        stream: usize,
        issue: impl Fn(u64, usize, sys::ncclComm_t, sys::cudaStream_t) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.comm.aborted.load(Ordering::SeqCst) {
            return Err(self.failed(what));
        }
        let stream = stream as sys::cudaStream_t;
        result::group_start().map_err(|e| format!("ncclGroupStart: {e:?}"))?;
        let issued = buffers.iter().try_for_each(|&(ptr, n)| issue(ptr, n, self.comm.raw, stream));
        result::group_end().map_err(|e| format!("ncclGroupEnd: {e:?}"))?;
        issued?;
        self.comm.waiting_since.store(self.comm.epoch.elapsed().as_millis().max(1) as u64, Ordering::SeqCst);
        // SAFETY: a stream of this thread's bound context.
        let r = unsafe { cudarc::driver::sys::cuStreamSynchronize(stream as cudarc::driver::sys::CUstream) };
        self.comm.waiting_since.store(0, Ordering::SeqCst);
        if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS || self.comm.aborted.load(Ordering::SeqCst) {
            return Err(self.failed(what));
        }
        match self.comm.async_error() {
            Some(e) => Err(format!("rank {}: NCCL: {e}", self.host.rank())),
            None => Ok(()),
        }
    }
}

impl Drop for NcclGroup<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        if !self.comm.aborted.load(Ordering::SeqCst) {
            // SAFETY: no collective is in flight (each one synchronises before it returns).
            unsafe {
                let _ = result::comm_destroy(self.comm.raw);
            }
        }
    }
}

impl Collective for NcclGroup<'_> {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world(&self) -> usize {
        self.host.world()
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<(), String> {
        self.host.all_reduce_f32(buf)
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<(), String> {
        self.host.all_reduce_f64(buf)
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<(), String> {
        self.host.broadcast_f32(buf, root)
    }
    fn abort(&self, why: &str) {
        self.host.abort(why);
        self.comm.abort();
    }
    fn all_reduce_device_f32(&self, buffers: &[(u64, usize)], stream: usize) -> Option<Result<(), String>> {
        Some(self.grouped("the gradient all-reduce", buffers, stream, |ptr, n, comm, stream| {
            // SAFETY: `ptr` holds `n` f32 on this rank's GPU, read and written in place on
            // `stream`, which is synchronised before the buffer is used elsewhere.
            unsafe {
                result::all_reduce(
                    ptr as *const std::ffi::c_void,
                    ptr as *mut std::ffi::c_void,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
            .map(drop)
            .map_err(|e| format!("ncclAllReduce: {e:?}"))
        }))
    }
    fn broadcast_device(&self, buffers: &[(u64, usize)], root: usize, stream: usize) -> Option<Result<(), String>> {
        Some(self.grouped("the parameter broadcast", buffers, stream, |ptr, bytes, comm, stream| {
            // SAFETY: `ptr` holds `bytes` bytes on this rank's GPU, sent (root) or overwritten
            // in place on `stream`, which is synchronised before the buffer is used elsewhere.
            unsafe {
                result::broadcast(
                    ptr as *const std::ffi::c_void,
                    ptr as *mut std::ffi::c_void,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    root as i32,
                    comm,
                    stream,
                )
            }
            .map(drop)
            .map_err(|e| format!("ncclBroadcast: {e:?}"))
        }))
    }
}

/// Runs `f` with this rank's collective: the group of GPUs `id` names when given (joined once
/// every rank is ready, so a rank that failed to start ends the others instead of leaving them
/// in NCCL's initialisation), else the ranks' own `host` group. A failure of `f` aborts the
/// group.
pub fn with_group<T>(
    host: &dyn Collective,
    id: Option<NcclId>,
    f: impl FnOnce(&dyn Collective) -> Result<T, String>,
) -> Result<T, String> {
    let Some(id) = id else { return f(host) };
    host.all_reduce_f64(&mut [0.0])?;
    // As long as the host collectives wait (rank 0 may be writing a checkpoint meanwhile).
    let group = NcclGroup::join(host, id, crate::collective::tcp::timeout()?)?;
    let r = f(&group);
    if let Err(e) = &r {
        group.abort(e);
    }
    r
}
