//! PTX by content: the hash of a kernel's MLIR (and the pipeline and compiler version) names its
//! PTX in a cache directory, so an unchanged rebuild lowers nothing.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The content hash of a kernel: its MLIR text, the lowering pipeline and weft's version.
pub fn key(mlir: &str) -> String {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update([0]);
    h.update(super::compile::PIPELINE.as_bytes());
    h.update([0]);
    h.update(mlir.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory of `<key>.ptx` files. Reads that fail are misses; writes are atomic (a rename),
/// so a killed build never leaves a truncated entry.
pub struct Cache {
    dir: Option<PathBuf>,
}

impl Cache {
    /// The user's cache: `$WEFT_CACHE_DIR`, else `$XDG_CACHE_HOME/weft/kernels`, else
    /// `~/.cache/weft/kernels`; none when no such place exists.
    pub fn user() -> Cache {
        let dir = std::env::var_os("WEFT_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("weft/kernels")))
            .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/weft/kernels")));
        Cache { dir }
    }

    pub fn at(dir: &Path) -> Cache {
        Cache { dir: Some(dir.to_path_buf()) }
    }

    pub fn disabled() -> Cache {
        Cache { dir: None }
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let path = self.dir.as_ref()?.join(format!("{key}.ptx"));
        std::fs::read_to_string(path).ok().filter(|s| s.contains(".entry"))
    }

    /// A cubin assembled from the PTX of `key`.
    pub fn get_cubin(&self, key: &str) -> Option<Vec<u8>> {
        let path = self.dir.as_ref()?.join(format!("{key}.sm_90.cubin"));
        std::fs::read(path).ok().filter(|b| b.starts_with(b"\x7fELF"))
    }

    pub fn put_cubin(&self, key: &str, cubin: &[u8]) {
        self.write(&format!("{key}.sm_90.cubin"), cubin);
    }

    pub fn put(&self, key: &str, ptx: &str) {
        self.write(&format!("{key}.ptx"), ptx.as_bytes());
    }

    fn write(&self, file: &str, bytes: &[u8]) {
        let Some(dir) = &self.dir else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let tmp = dir.join(format!(".{file}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(file));
        }
    }
}
