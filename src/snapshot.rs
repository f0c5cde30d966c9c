//! Kernel snapshots: one readable file per generated kernel (its MLIR, ptxas's resource report
//! and its PTX), for `weft snapshot` and for users' own tests (with insta or any other tool), so
//! a change to any kernel shows in review.

use crate::build::{compile_kernels, lower_program, BuildError, BuildStats, Shapes};
use crate::lower::cache::Cache;
use std::path::{Path, PathBuf};
use std::process::Command;
use weft_runtime::plan::Program;

/// The chip ptxas checks kernels for.
pub const PTXAS_ARCH: &str = "sm_90";

#[derive(Clone, Debug, PartialEq)]
pub struct KernelSnapshot {
    pub name: String,
    pub mlir: String,
    pub ptx: String,
    /// ptxas's resource report (registers, spills, shared memory), when ptxas was found.
    pub ptxas: Option<String>,
}

impl KernelSnapshot {
    /// The file text: MLIR, the ptxas report, then the PTX.
    pub fn render(&self) -> String {
        let report = self.ptxas.as_deref().unwrap_or("(ptxas not found: no resource report)\n");
        format!(
            "// kernel {}\n// ---- MLIR ----\n{}// ---- ptxas -arch={PTXAS_ARCH} -v ----\n{}// ---- PTX ----\n{}",
            self.name, self.mlir, report, self.ptx
        )
    }
}

/// ptxas: `$WEFT_PTXAS`, else `ptxas` on the PATH, else the copy `scripts/setup.sh` unpacks
/// from NVIDIA's PyPI wheel into `~/.cache/weft/cuda`.
pub fn ptxas_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_PTXAS") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/weft/cuda/nvidia/cu13/bin/ptxas");
    p.is_file().then_some(p)
}

/// A fresh scratch directory for one ptxas run (tests and threads run ptxas concurrently).
fn scratch_dir() -> Result<PathBuf, String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("weft-ptxas-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Assembles `ptx` into a cubin for [`PTXAS_ARCH`] (what the driver loads in 0.1 ms instead of
/// compiling PTX at load).
pub fn assemble(ptxas: &Path, kernel: &str, ptx: &str) -> Result<Vec<u8>, String> {
    let dir = scratch_dir()?;
    let (src, out) = (dir.join(format!("{kernel}.ptx")), dir.join(format!("{kernel}.cubin")));
    std::fs::write(&src, ptx).map_err(|e| format!("cannot write {}: {e}", src.display()))?;
    let status = Command::new(ptxas).arg(format!("-arch={PTXAS_ARCH}")).arg(&src).arg("-o").arg(&out).output();
    let _ = std::fs::remove_file(&src);
    let status = status.map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    if !status.status.success() {
        return Err(format!("ptxas rejects kernel `{kernel}`:\n{}", String::from_utf8_lossy(&status.stderr)));
    }
    let bytes = std::fs::read(&out).map_err(|e| format!("cannot read {}: {e}", out.display()));
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// Resources of one kernel as ptxas reports them (`-v`), or ptxas's error.
#[derive(Clone, Debug, PartialEq)]
pub struct PtxasReport {
    /// The report lines, normalised (no file names or timings).
    pub text: String,
    pub registers: u32,
    pub spill_bytes: u32,
    pub stack_bytes: u32,
    pub shared_bytes: u32,
}

/// Assembles `ptx` with ptxas for [`PTXAS_ARCH`]; an assembly error names the kernel.
pub fn ptxas_report(ptxas: &Path, kernel: &str, ptx: &str) -> Result<PtxasReport, String> {
    let dir = scratch_dir()?;
    let file = dir.join(format!("{kernel}.ptx"));
    std::fs::write(&file, ptx).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={PTXAS_ARCH}"))
        .arg("-v")
        .arg(&file)
        .arg("-o")
        .arg(dir.join(format!("{kernel}.cubin")))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("ptxas rejects kernel `{kernel}`:\n{text}"));
    }
    Ok(parse_ptxas_report(&text))
}

/// The resources in ptxas's `-v` output (registers, spilled and stack bytes, shared memory).
pub fn parse_ptxas_report(text: &str) -> PtxasReport {
    // ptxas prints the stack frame and spill line indented, without the `ptxas info` prefix.
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("ptxas info    : ")
                .or_else(|| l.trim_start().contains("bytes spill stores").then(|| l.trim_start()))
        })
        .filter(|l| !l.starts_with("Compiling entry") && !l.contains("Compile time"))
        .map(str::to_string)
        .collect();
    let num_before = |needle: &str| -> u32 {
        lines
            .iter()
            .find_map(|l| {
                let i = l.find(needle)?;
                l[..i].split_whitespace().last()?.parse().ok()
            })
            .unwrap_or(0)
    };
    PtxasReport {
        registers: num_before(" registers"),
        spill_bytes: num_before(" bytes spill stores"),
        stack_bytes: num_before(" bytes stack frame"),
        shared_bytes: num_before(" bytes smem"),
        text: lines.join("\n") + "\n",
    }
}

/// Every kernel of `program` lowered at `shapes`, with its PTX and (when ptxas is found) its
/// resource report.
pub fn kernel_snapshots(program: &Program, shapes: &Shapes, cache: &Cache) -> Result<Vec<KernelSnapshot>, String> {
    let lowered = lower_program(program, shapes).map_err(|e| BuildError::Lower(e).to_string())?;
    let mut stats = BuildStats::default();
    let ptx = compile_kernels(&lowered.kernels, cache, &mut stats).map_err(|e| e.to_string())?;
    let ptxas = ptxas_path();
    lowered
        .kernels
        .values()
        .map(|k| {
            let p = ptx[&k.name].clone();
            let report = match &ptxas {
                Some(path) => Some(ptxas_report(path, &k.name, &p)?.text),
                None => None,
            };
            Ok(KernelSnapshot { name: k.name.clone(), mlir: k.mlir.clone(), ptx: p, ptxas: report })
        })
        .collect()
}

/// Writes one `<kernel>.kernel` file per snapshot into `dir` (removing stale ones).
pub fn write_dir(dir: &Path, snaps: &[KernelSnapshot]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for entry in std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|x| x == "kernel") {
            let _ = std::fs::remove_file(p);
        }
    }
    for s in snaps {
        let p = dir.join(format!("{}.kernel", s.name));
        std::fs::write(&p, s.render()).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

/// Compares snapshots with the files in `dir`: a readable diff per changed, new or missing
/// kernel (empty when all match).
pub fn check_dir(dir: &Path, snaps: &[KernelSnapshot]) -> Result<Vec<String>, String> {
    let mut diffs = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for s in snaps {
        let p = dir.join(format!("{}.kernel", s.name));
        seen.insert(p.clone());
        let now = s.render();
        match std::fs::read_to_string(&p) {
            Ok(old) if old == now => {}
            Ok(old) => {
                let d = similar::TextDiff::from_lines(&old, &now);
                diffs.push(format!(
                    "kernel `{}` changed ({}):\n{}",
                    s.name,
                    p.display(),
                    d.unified_diff().context_radius(3).header("snapshot", "now")
                ));
            }
            Err(_) => diffs.push(format!("kernel `{}` is new (no {})", s.name, p.display())),
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|x| x == "kernel") && !seen.contains(&p) {
            diffs.push(format!("{} has no kernel any more", p.display()));
        }
    }
    Ok(diffs)
}
