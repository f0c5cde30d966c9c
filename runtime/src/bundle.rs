//! The bundle: what `weft build` writes and a runtime loads. One file:
//!
//! ```text
//! "WEFTBNDL"  u32 format version (LE)  u64 manifest length (LE)  manifest (JSON)  blobs...
//! ```
//!
//! The manifest holds the program (parameters with their initialisation, states, plans), each
//! plan's device plan (memory plan, launches, matrix products) with the largest call it was
//! planned for, and each kernel's name, content hash and the place and FNV-1a checksum of its
//! PTX (and cubin, when one was assembled) among the blobs. A bundle of another format version,
//! or whose bytes do not match their checksums, is refused with a message saying which.

use crate::checkpoint::fnv64;
use crate::device::{ptx_entry_params, render_params, Arg, Base, DevicePlan, DeviceStep, ParamKind};
use crate::plan::Program;
use crate::run::{RunSettings, SpecSource};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"WEFTBNDL";
/// Bumped on every change to the manifest or the device plan types.
pub const FORMAT_VERSION: u32 = 2;
const HEADER: usize = 8 + 4 + 8;

/// The largest call a plan's arena is planned for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanShape {
    pub batch: u64,
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct KernelModule {
    pub name: String,
    /// Content hash of the kernel's MLIR (with the pipeline and compiler version).
    pub hash: String,
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
    /// The kernel's parameters in order: what every launch of it must pass.
    pub params: Vec<ParamKind>,
}

/// What a bundle was built from: a run trained from the bundle records this identity, so its
/// directory resumes and generates like one `weft train` wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleSource {
    pub spec: SpecSource,
    pub settings: RunSettings,
    /// The longest context the generation plans take.
    pub max_context: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    pub program: Program,
    pub plans: BTreeMap<String, (PlanShape, DevicePlan)>,
    pub kernels: Vec<KernelModule>,
    pub source: Option<BundleSource>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Blob {
    offset: u64,
    len: u64,
    fnv64: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct KernelEntry {
    name: String,
    hash: String,
    params: Vec<ParamKind>,
    ptx: Blob,
    cubin: Option<Blob>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct PlanEntry {
    shape: PlanShape,
    device: DevicePlan,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format_version: u32,
    weft_version: String,
    model: String,
    program: Program,
    plans: BTreeMap<String, PlanEntry>,
    kernels: Vec<KernelEntry>,
    #[serde(default)]
    source: Option<BundleSource>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleError(pub String);

impl std::fmt::Display for BundleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BundleError {}

impl Bundle {
    /// The bundle's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut blobs = Vec::new();
        let mut put = |bytes: &[u8]| {
            let b = Blob { offset: blobs.len() as u64, len: bytes.len() as u64, fnv64: fnv64(bytes) };
            blobs.extend_from_slice(bytes);
            b
        };
        let kernels = self
            .kernels
            .iter()
            .map(|k| KernelEntry {
                name: k.name.clone(),
                hash: k.hash.clone(),
                params: k.params.clone(),
                ptx: put(k.ptx.as_bytes()),
                cubin: k.cubin.as_deref().map(&mut put),
            })
            .collect();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            weft_version: env!("CARGO_PKG_VERSION").to_string(),
            model: self.program.model.clone(),
            program: self.program.clone(),
            plans: self
                .plans
                .iter()
                .map(|(n, (s, d))| (n.clone(), PlanEntry { shape: *s, device: d.clone() }))
                .collect(),
            kernels,
            source: self.source.clone(),
        };
        let json = serde_json::to_vec(&manifest).expect("the manifest serialises");
        let mut out = Vec::with_capacity(HEADER + json.len() + blobs.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&blobs);
        out
    }

    /// Reads and checks a bundle: header, format version, manifest, every blob's checksum, the
    /// program's plans, and that every launch names a kernel the bundle holds.
    pub fn from_bytes(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let err = |m: String| Err(BundleError(m));
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return err("not a weft bundle (it does not start with the bundle header)".into());
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return err(format!(
                "the bundle has format version {version}, but this runtime reads version {FORMAT_VERSION}: rebuild it with `weft build`"
            ));
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let end = (HEADER as u64).checked_add(len).filter(|&e| e <= bytes.len() as u64);
        let Some(end) = end else {
            return err(format!(
                "the bundle is truncated: its manifest needs {len} bytes, {} remain",
                bytes.len() - HEADER
            ));
        };
        let manifest: Manifest = serde_json::from_slice(&bytes[HEADER..end as usize])
            .map_err(|e| BundleError(format!("the bundle's manifest is damaged: {e}")))?;
        let blobs = &bytes[end as usize..];
        let blob = |b: &Blob, what: &str| -> Result<Vec<u8>, BundleError> {
            let range = b.offset.checked_add(b.len).filter(|&e| e <= blobs.len() as u64);
            let Some(e) = range else {
                return Err(BundleError(format!("the bundle is truncated: {what} lies past its end")));
            };
            let data = &blobs[b.offset as usize..e as usize];
            if fnv64(data) != b.fnv64 {
                return Err(BundleError(format!("the bundle is damaged: {what} does not match its checksum")));
            }
            Ok(data.to_vec())
        };
        let mut kernels = Vec::new();
        for k in &manifest.kernels {
            let ptx = String::from_utf8(blob(&k.ptx, &format!("the PTX of kernel `{}`", k.name))?)
                .map_err(|_| BundleError(format!("the PTX of kernel `{}` is not text", k.name)))?;
            let cubin = k.cubin.as_ref().map(|c| blob(c, &format!("the cubin of kernel `{}`", k.name))).transpose()?;
            let declared =
                ptx_entry_params(&ptx, &k.name).map_err(|e| BundleError(format!("kernel `{}`: {e}", k.name)))?;
            if declared != k.params {
                return err(format!(
                    "kernel `{}`: the manifest says it takes {} but its PTX declares {}",
                    k.name,
                    render_params(&k.params),
                    render_params(&declared)
                ));
            }
            kernels.push(KernelModule {
                name: k.name.clone(),
                hash: k.hash.clone(),
                ptx,
                cubin,
                params: k.params.clone(),
            });
        }
        manifest.program.validate().map_err(|e| BundleError(format!("the bundle's program is invalid: {e}")))?;
        let bundle = Bundle {
            program: manifest.program,
            plans: manifest.plans.into_iter().map(|(n, p)| (n, (p.shape, p.device))).collect(),
            kernels,
            source: manifest.source,
        };
        if let Some(src) = &bundle.source {
            if src.spec.files.is_empty() {
                return err("the bundle's recorded spec holds no file".into());
            }
        }
        bundle.check_plans()?;
        Ok(bundle)
    }

    /// Every device plan belongs to a plan of the program, launches only kernels the bundle
    /// holds, and refers only to values its plan has.
    fn check_plans(&self) -> Result<(), BundleError> {
        for (name, (_, dp)) in &self.plans {
            let plan = self.program.plan(name).map_err(|e| BundleError(format!("the bundle's device plans: {e}")))?;
            let fail = |m: String| Err(BundleError(format!("device plan `{name}`: {m}")));
            if dp.origin.len() != dp.steps.len() {
                return fail("its steps and their origins differ in number".into());
            }
            dp.memory.check().map_err(|e| BundleError(format!("device plan `{name}`: memory plan: {e}")))?;
            for step in &dp.steps {
                let mut values = Vec::new();
                match step {
                    DeviceStep::Launch(l) => {
                        let Some(k) = self.kernels.iter().find(|k| k.name == l.kernel) else {
                            return fail(format!("launches kernel `{}`, which the bundle does not hold", l.kernel));
                        };
                        let passed: Vec<ParamKind> = l.args.iter().map(Arg::kind).collect();
                        if passed != k.params {
                            return fail(format!(
                                "launches kernel `{}` with arguments {}, but it takes {}",
                                l.kernel,
                                render_params(&passed),
                                render_params(&k.params)
                            ));
                        }
                        for a in &l.args {
                            if let Arg::Buffer(b) = a {
                                values.push(&b.base);
                            }
                        }
                    }
                    DeviceStep::Gemm(g) => values.extend([&g.a.buffer.base, &g.b.buffer.base, &g.c.buffer.base]),
                    DeviceStep::Zero { buffer, .. } => values.push(&buffer.base),
                }
                for b in values {
                    match b {
                        Base::Value(v) if *v as usize >= plan.values.len() => {
                            return fail(format!("refers to value {v}, which plan `{name}` does not have"));
                        }
                        Base::Table(i) if *i as usize >= dp.tables.len() => {
                            return fail(format!("reads table {i}, which it does not have"));
                        }
                        Base::Persistent(n) => {
                            let param = n.strip_prefix("master:").unwrap_or("");
                            if !self.program.params.iter().any(|p| p.name == param) {
                                return fail(format!("refers to `{n}`, which is no parameter's master copy"));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    pub fn write(&self, path: &Path) -> Result<(), BundleError> {
        let tmp = path.with_extension("bundle.tmp");
        std::fs::write(&tmp, self.to_bytes())
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| BundleError(format!("cannot write {}: {e}", path.display())))
    }

    pub fn read(path: &Path) -> Result<Bundle, BundleError> {
        let bytes = crate::io::read_bounded(path, crate::io::limits::BUNDLE, "bundle").map_err(BundleError)?;
        Bundle::from_bytes(&bytes).map_err(|BundleError(m)| BundleError(format!("{}: {m}", path.display())))
    }

    pub fn kernel(&self, name: &str) -> Option<&KernelModule> {
        self.kernels.iter().find(|k| k.name == name)
    }
}
