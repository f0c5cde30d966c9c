//! Matrix products through cuBLASLt. A device plan's [`Gemm`] is row-major; cuBLASLt is
//! column-major, so `C = op(A)·op(B)` runs as `Cᵀ = op(B)ᵀ·op(A)ᵀ`: the operands swap and
//! each row-major matrix is read as its column-major transpose. The algorithm for each problem
//! is chosen once by cuBLASLt's heuristic and kept.

use super::device::GpuError;
use crate::device::Gemm;
use crate::DType;
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{result as dr, CudaStream};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// cuBLASLt's workspace (its recommendation for Hopper).
const WORKSPACE: usize = 32 << 20;

/// The sizes and types that fix a cuBLASLt problem.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    m: u64,
    n: u64,
    k: u64,
    trans_a: bool,
    trans_b: bool,
    lda: u64,
    ldb: u64,
    ldc: u64,
    a: DType,
    b: DType,
    c: DType,
}

struct Problem {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    problems: HashMap<Key, Problem>,
    _stream: Arc<CudaStream>,
}

fn blas_err(what: &str) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> GpuError + '_ {
    move |e| GpuError(format!("cuBLASLt {what}: {e:?}"))
}

fn data_type(d: DType) -> Result<sys::cudaDataType, GpuError> {
    match d {
        DType::BF16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        DType::F32 => Ok(sys::cudaDataType::CUDA_R_32F),
        DType::F16 => Ok(sys::cudaDataType::CUDA_R_16F),
        DType::I32 => Err(GpuError("a matrix product of token ids".into())),
    }
}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Blas, GpuError> {
        // cudarc panics when the library cannot be loaded: turn that into a message.
        let handle = std::panic::catch_unwind(result::create_handle).map_err(|_| {
            GpuError(
                "cuBLASLt could not be loaded: libcublasLt.so.13 (CUDA 13) must be on the loader path, e.g. from the \
                 PyPI wheel nvidia-cublas (add its nvidia/cu13/lib to LD_LIBRARY_PATH)"
                    .into(),
            )
        })?;
        let handle = handle.map_err(blas_err("create"))?;
        // SAFETY: a plain allocation, freed in Drop.
        let workspace =
            unsafe { dr::malloc_sync(WORKSPACE) }.map_err(|e| GpuError(format!("cuBLASLt workspace: {e:?}")))?;
        Ok(Blas { handle, workspace, problems: HashMap::new(), _stream: stream.clone() })
    }

    fn problem(&mut self, key: &Key) -> Result<&Problem, GpuError> {
        if !self.problems.contains_key(key) {
            let p = self.make(key)?;
            self.problems.insert(key.clone(), p);
        }
        Ok(&self.problems[key])
    }

    fn make(&self, key: &Key) -> Result<Problem, GpuError> {
        let desc =
            result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
                .map_err(blas_err("matmul descriptor"))?;
        // cublasOperation_t as an i32: 1 is T, 0 is N.
        let op = |t: bool| t as i32;
        // Column-major: "A" is our B, "B" is our A.
        let (ta, tb) = (op(key.trans_b), op(key.trans_a));
        // SAFETY: the attributes are the documented type (cublasOperation_t, 4 bytes).
        unsafe {
            result::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const _ as *const c_void,
                std::mem::size_of_val(&ta),
            )
            .map_err(blas_err("transpose A"))?;
            result::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb as *const _ as *const c_void,
                std::mem::size_of_val(&tb),
            )
            .map_err(blas_err("transpose B"))?;
        }
        // Our B (k×n, or n×k when transposed) read column-major.
        let (br, bc) = if key.trans_b { (key.k, key.n) } else { (key.n, key.k) };
        let a = result::create_matrix_layout(data_type(key.b)?, br, bc, key.ldb as i64).map_err(blas_err("layout"))?;
        let (ar, ac) = if key.trans_a { (key.m, key.k) } else { (key.k, key.m) };
        let b = result::create_matrix_layout(data_type(key.a)?, ar, ac, key.lda as i64).map_err(blas_err("layout"))?;
        let c = result::create_matrix_layout(data_type(key.c)?, key.n, key.m, key.ldc as i64)
            .map_err(blas_err("layout"))?;
        let pref = result::create_matmul_pref().map_err(blas_err("preference"))?;
        let ws = WORKSPACE as u64;
        // SAFETY: documented attribute type (u64); every handle was created above.
        let heuristic = unsafe {
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                std::mem::size_of_val(&ws),
            )
            .map_err(blas_err("workspace preference"))?;
            let h = result::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
            let _ = result::destroy_matmul_pref(pref);
            h
        };
        let heuristic = heuristic.map_err(|e| {
            GpuError(format!(
                "cuBLASLt has no algorithm for a {}×{}×{} product ({:?}/{:?} -> {:?}): {e:?}",
                key.m, key.n, key.k, key.a, key.b, key.c
            ))
        })?;
        Ok(Problem { desc, a, b, c, algo: heuristic.algo })
    }

    /// Runs `g` at the call's sizes with operands at the given device addresses.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &mut self,
        g: &Gemm,
        m: u64,
        n: u64,
        k: u64,
        a: u64,
        b: u64,
        c: u64,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<(), GpuError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let key = Key {
            m,
            n,
            k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            lda: g.a.ld,
            ldb: g.b.ld,
            ldc: g.c.ld,
            a: g.a.dtype,
            b: g.b.dtype,
            c: g.c.dtype,
        };
        let handle = self.handle;
        let workspace = self.workspace;
        let p = self.problem(&key)?;
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: the operands are device ranges the plan's memory plan sized for these
        // dimensions; descriptors live as long as `self`.
        unsafe {
            result::matmul(
                handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                p.a,
                a as *const c_void,
                p.b,
                c as *const c_void,
                p.c,
                c as *mut c_void,
                p.c,
                &p.algo,
                workspace as *mut c_void,
                WORKSPACE,
                stream as sys::cudaStream_t,
            )
        }
        .map_err(blas_err("matmul"))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: every handle was created by this object and is destroyed once.
        unsafe {
            for p in self.problems.values() {
                let _ = result::destroy_matrix_layout(p.a);
                let _ = result::destroy_matrix_layout(p.b);
                let _ = result::destroy_matrix_layout(p.c);
                let _ = result::destroy_matmul_desc(p.desc);
            }
            let _ = result::destroy_handle(self.handle);
            let _ = dr::free_sync(self.workspace);
        }
    }
}
