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

/// A directory of `<key>.ptx` files, each with the SHA-256 of its bytes beside it. Reads that
/// fail or do not match are misses; writes are atomic (a rename), so a killed build never leaves
/// a truncated entry.
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
        let bytes = self.read(&format!("{key}.ptx"))?;
        String::from_utf8(bytes).ok().filter(|s| s.contains(".entry"))
    }

    /// A cubin assembled from the PTX of `key`.
    pub fn get_cubin(&self, key: &str) -> Option<Vec<u8>> {
        self.read(&format!("{key}.sm_90.cubin")).filter(|b| b.starts_with(b"\x7fELF"))
    }

    pub fn put_cubin(&self, key: &str, cubin: &[u8]) {
        self.write(&format!("{key}.sm_90.cubin"), cubin);
    }

    pub fn put(&self, key: &str, ptx: &str) {
        self.write(&format!("{key}.ptx"), ptx.as_bytes());
    }

    /// An entry whose bytes match the hash beside it (`<file>.sha256`); a damaged or edited
    /// entry is a miss, said once, and is rebuilt and rewritten by the caller.
    fn read(&self, file: &str) -> Option<Vec<u8>> {
        let dir = self.dir.as_ref()?;
        let path = dir.join(file);
        let bytes = std::fs::read(&path).ok()?;
        // An entry from before hashes were kept has none: a silent miss.
        let want = std::fs::read_to_string(dir.join(format!("{file}.sha256"))).ok()?;
        if want.trim() == digest(&bytes) {
            return Some(bytes);
        }
        eprintln!(
            "warning: kernel cache entry `{}` does not match its hash (damaged or edited): rebuilding it",
            path.display()
        );
        None
    }

    /// The entry, then its hash, each written atomically (a rename).
    fn write(&self, file: &str, bytes: &[u8]) {
        let Some(dir) = &self.dir else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let put = |name: &str, data: &[u8]| {
            let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, data).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join(name));
            } else {
                let _ = std::fs::remove_file(&tmp);
            }
        };
        put(file, bytes);
        put(&format!("{file}.sha256"), digest(bytes).as_bytes());
    }
}

fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edited_entry_is_a_miss_and_is_rewritten() {
        let dir = std::env::temp_dir().join(format!("weft-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = Cache::at(&dir);
        c.put("k", ".entry k(\n\tmov.u32 %r1, 1;\n");
        assert!(c.get("k").unwrap().contains("mov.u32"));
        let p = dir.join("k.ptx");
        std::fs::write(&p, std::fs::read_to_string(&p).unwrap().replace("mov.u32", "sub.u32")).unwrap();
        assert_eq!(c.get("k"), None);
        c.put("k", ".entry k(\n\tmov.u32 %r1, 1;\n");
        assert!(c.get("k").unwrap().contains("mov.u32"));
        // An entry without its hash (an older cache) is rebuilt too.
        std::fs::remove_file(dir.join("k.ptx.sha256")).unwrap();
        assert_eq!(c.get("k"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
