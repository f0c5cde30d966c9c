//! Opening the GPU, and device memory.

use cudarc::driver::{result, sys, CudaContext, CudaStream};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuError(pub String);

impl std::fmt::Display for GpuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GpuError {}

pub(crate) fn cuda(what: &str) -> impl FnOnce(result::DriverError) -> GpuError + '_ {
    move |e| GpuError(format!("{what}: {e:?}"))
}

/// The oldest CUDA driver the generated PTX (ISA 8.0) and cuBLASLt 13 run on.
const MIN_DRIVER: i32 = 13000;

/// One GPU: its context, the stream every plan runs on, and a cuBLASLt handle.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: super::blas::Blas,
    pub name: String,
    pub memory_bytes: usize,
    pub capability: (i32, i32),
    /// Page-locked host memory that large downloads land in (a decode step's logits, 8 MB at
    /// 64 sequences of a 32K vocabulary: a pageable copy goes through the driver's bounce
    /// buffer at a fraction of the bus's speed), grown on demand.
    staging: std::sync::Mutex<Option<Pinned>>,
}

/// Page-locked host memory, freed on drop.
struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the pointer is owned host memory, used only under the `staging` lock.
unsafe impl Send for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host and freed once; no copy into it is in flight (each
        // download synchronises before it returns).
        unsafe {
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

/// Downloads smaller than this go straight into the caller's (pageable) memory.
const STAGED_DOWNLOAD: usize = 1 << 20;

impl Gpu {
    /// Opens GPU `ordinal`: a missing driver, a too-old driver, a GPU older than Hopper, or a
    /// missing cuBLASLt each give a message naming what is needed.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: only asks the loader whether libcuda can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(GpuError(
                "no CUDA driver: libcuda.so could not be loaded (install NVIDIA's driver, 580 or newer, for CUDA 13)"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| GpuError(format!("cannot open GPU {ordinal}: {e:?}")))?;
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result().map_err(cuda("cuDriverGetVersion"))?;
        if version < MIN_DRIVER {
            return Err(GpuError(format!(
                "the CUDA driver supports CUDA {}.{}, weft's kernels need 13.0 or newer: update NVIDIA's driver",
                version / 1000,
                version % 1000 / 10
            )));
        }
        let capability = ctx.compute_capability().map_err(cuda("compute capability"))?;
        let name = ctx.name().map_err(cuda("device name"))?;
        if capability.0 < 9 {
            return Err(GpuError(format!(
                "{name} is compute capability {}.{}; weft's kernels are built for Hopper (9.0)",
                capability.0, capability.1
            )));
        }
        let memory_bytes = ctx.total_mem().map_err(cuda("device memory"))?;
        // A stream of our own: the legacy default stream cannot be captured into a CUDA graph.
        let stream = ctx.new_stream().map_err(cuda("create a stream"))?;
        let blas = super::blas::Blas::new(&stream)?;
        Ok(Gpu { ctx, stream, blas, name, memory_bytes, capability, staging: std::sync::Mutex::new(None) })
    }

    pub(crate) fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(cuda("bind the CUDA context"))
    }

    pub(crate) fn raw_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(cuda("synchronize"))
    }

    /// Device memory in use by the whole process (driver's view).
    pub fn used_bytes(&self) -> Result<usize, GpuError> {
        let (free, total) = self.ctx.mem_get_info().map_err(cuda("memory info"))?;
        Ok(total - free)
    }

    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        self.bind()?;
        let bytes = bytes.max(1);
        // SAFETY: a plain allocation, freed by DeviceBuffer's Drop.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| {
            let free = self.ctx.mem_get_info().map(|(f, _)| f as u64).unwrap_or(0);
            GpuError(format!(
                "cannot allocate {} on the GPU ({} free): {e:?}; lower the batch or sequence length",
                crate::io::size(bytes as u64),
                crate::io::size(free)
            ))
        })?;
        Ok(DeviceBuffer { ptr, bytes, ctx: self.ctx.clone(), owned: true })
    }

    pub fn upload(&self, dst: u64, bytes: &[u8]) -> Result<(), GpuError> {
        self.bind()?;
        // On our stream, then waited for. A synchronous copy from pageable memory may return
        // before its DMA lands, and our stream does not wait for the legacy stream's copies: a
        // kernel could read part of the old contents (seen as one-ulp errors in the check when
        // the GPU was shared).
        // SAFETY: the caller gives a device range of at least `bytes.len()` bytes; the host
        // slice outlives the copy, which is complete when the stream synchronises.
        unsafe { result::memcpy_htod_async(dst, bytes, self.raw_stream()) }.map_err(cuda("copy to the GPU"))?;
        self.synchronize()
    }

    pub fn download(&self, src: u64, bytes: &mut [u8]) -> Result<(), GpuError> {
        self.bind()?;
        self.synchronize()?;
        // SAFETY: the caller gives a device range of at least `bytes.len()` bytes.
        unsafe { result::memcpy_dtoh_sync(bytes, src) }.map_err(cuda("copy from the GPU"))
    }

    /// Downloads `len` bytes at `src` and hands them to `read`: large ones through the pinned
    /// staging buffer (read in place, no second host copy), small ones through a plain vector.
    pub fn download_with<R>(&self, src: u64, len: usize, read: impl FnOnce(&[u8]) -> R) -> Result<R, GpuError> {
        if len < STAGED_DOWNLOAD {
            let mut raw = vec![0u8; len];
            self.download(src, &mut raw)?;
            return Ok(read(&raw));
        }
        self.bind()?;
        let mut staging = self.staging.lock().map_err(|_| GpuError("the staging buffer's lock is poisoned".into()))?;
        if staging.as_ref().is_none_or(|p| p.bytes < len) {
            *staging = None;
            let bytes = len.next_power_of_two();
            // SAFETY: a plain page-locked allocation, freed by Pinned's Drop.
            let ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(cuda("allocate page-locked host memory"))?;
            *staging = Some(Pinned { ptr: ptr as *mut u8, bytes, ctx: self.ctx.clone() });
        }
        let pinned = staging.as_mut().expect("allocated above");
        // SAFETY: `pinned` holds at least `len` bytes, exclusively ours under the lock; the
        // copy is complete when the stream synchronises, before the slice is read.
        let buf = unsafe { std::slice::from_raw_parts_mut(pinned.ptr, len) };
        unsafe { result::memcpy_dtoh_async(buf, src, self.raw_stream()) }.map_err(cuda("copy from the GPU"))?;
        self.synchronize()?;
        Ok(read(buf))
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: both ranges are device memory of at least `bytes` bytes.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.raw_stream()) }.map_err(cuda("copy on the GPU"))
    }

    pub fn zero(&self, dst: u64, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: the range is device memory of at least `bytes` bytes.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.raw_stream()) }.map_err(cuda("clear GPU memory"))
    }
}

/// Device memory, freed on drop (a view into another buffer frees nothing).
pub struct DeviceBuffer {
    pub ptr: u64,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
    owned: bool,
}

impl DeviceBuffer {
    /// `bytes` bytes from `offset` on, as a buffer of their own that frees nothing: the caller
    /// keeps this buffer alive as long as the view.
    pub(crate) fn view(&self, offset: usize, bytes: usize) -> DeviceBuffer {
        assert!(offset + bytes <= self.bytes, "a view past its buffer");
        DeviceBuffer { ptr: self.ptr + offset as u64, bytes, ctx: self.ctx.clone(), owned: false }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_sync and freed once; the stream is synchronised by
        // whoever drops plans (GpuBackend synchronises after each run).
        unsafe {
            let _ = result::free_sync(self.ptr);
        }
    }
}
