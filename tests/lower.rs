//! Lowering: device plans, generated kernels, PTX checked by ptxas, bundles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use weft::build::{build_bundle, lower_program, render_plans, Lowered, Shapes};
use weft::config::RunConfig;
use weft::lower::cache::Cache;
use weft::snapshot::{kernel_snapshots, ptxas_path, ptxas_report};
use weft_runtime::bundle::{Bundle, FORMAT_VERSION};
use weft_runtime::device::{DeviceStep, Table};
use weft_runtime::plan::Program;

/// Small shapes keep arenas small; kernels do not depend on them.
fn shapes() -> Shapes {
    Shapes { batch: 2, seq: 256, gen_batch: 1, max_prompt: 320 }
}

fn program(rel: &str) -> Program {
    let c = crate::checked(rel);
    let settings = RunConfig::default();
    let opt = weft::program::OptimizerSettings::from_config(&settings);
    weft::program::build_program(&c.model, &opt, 320).expect("program")
}

/// Content-hashed, so sharing it between tests and runs is safe.
fn cache() -> Cache {
    Cache::at(&crate::root().join("target/test-kernel-cache"))
}

fn spec_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for dir in ["specs", "specs/tiny"] {
        for e in std::fs::read_dir(crate::root().join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "weft") {
                v.push(Path::new(dir).join(e.file_name()));
            }
        }
    }
    v.sort();
    v
}

/// GLA and RetNet layers run on the CPU backend only, for now.
fn waits_for_gpu_kernels(spec: &Path) -> bool {
    let s = spec.to_string_lossy();
    s.contains("gla") || s.contains("retnet")
}

fn lowered(rel: &str) -> Lowered {
    lower_program(&program(rel), &shapes()).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn every_spec_lowers_or_names_the_operation_that_waits() {
    for spec in spec_files() {
        let rel = spec.to_str().unwrap();
        let r = lower_program(&program(rel), &shapes());
        if waits_for_gpu_kernels(&spec) {
            let e = r.err().unwrap_or_else(|| panic!("{rel} lowered, but GLA/RetNet have no kernels"));
            assert!(e.message.contains("has no GPU kernel yet"), "{rel}: {e}");
            assert!(e.message.contains("gla") || e.message.contains("retention"), "{rel}: {e}");
            continue;
        }
        let l = r.unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(l.plans.len(), 9, "{rel}");
        for (name, (_, dp)) in &l.plans {
            dp.memory.check().unwrap_or_else(|e| panic!("{rel} {name}: {e}"));
            assert_eq!(dp.origin.len(), dp.steps.len());
            for s in &dp.steps {
                if let DeviceStep::Launch(launch) = s {
                    assert!(l.kernels.contains_key(&launch.kernel), "{rel}: {}", launch.kernel);
                }
            }
        }
    }
}

#[test]
fn identical_kernels_are_generated_once() {
    let l = lowered("specs/samba-421m.weft");
    let launches: usize =
        l.plans.values().map(|(_, dp)| dp.steps.iter().filter(|s| matches!(s, DeviceStep::Launch(_))).count()).sum();
    // 12 Samba blocks share one kernel per operation and size: ~75 kernels (the chunk plans'
    // steps over several tokens among them) for ~1200 launches.
    assert!(launches > 900, "{launches} launches");
    assert!(l.kernels.len() < 80, "{} kernels", l.kernels.len());
    // The same name never stands for two different kernels, across specs too.
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for spec in ["specs/samba-421m.weft", "specs/llama2-438m.weft", "specs/mamba-432m.weft"] {
        for (name, k) in lowered(spec).kernels {
            if let Some(old) = by_name.insert(name.clone(), k.mlir.clone()) {
                assert_eq!(old, k.mlir, "{name} differs between specs");
            }
        }
    }
}

#[test]
fn widths_that_break_16_byte_rows_are_padded_in_the_arena() {
    let text = render_plans(&lowered("specs/samba-1.7b.weft").plans);
    // The MLP's 8196-wide activations live in rows of 8200 bf16 (16-byte aligned); the weights
    // keep their dense 8196 columns.
    assert!(text.contains("n=8196 k=2048") && text.contains("[bf16 ld 8200]"), "{}", &text[..2000]);
    assert!(text.contains("swiglu_w8196_b8200b8200b8200"));
    // No activation (B·T rows) is written with the unaligned pitch.
    let unaligned = text
        .lines()
        .filter(|l| l.contains("m=B·T n=8196"))
        .filter(|l| l.split("-> ").nth(1).is_some_and(|o| o.contains("ld 8196]")));
    assert_eq!(unaligned.count(), 0);
}

#[test]
fn rope_tables_are_planned_for_the_positions_a_plan_reaches() {
    let l = lowered("specs/tiny/samba-tiny.weft");
    let (_, train) = &l.plans["train_step"];
    assert!(train
        .tables
        .iter()
        .any(|t| matches!(t, Table::RopeCos { positions, head_dim: 64, .. } if *positions >= 256)));
    let nope = lowered("specs/tiny/samba-nope-tiny.weft");
    let rope = |t: &Table| matches!(t, Table::RopeCos { .. } | Table::RopeSin { .. });
    assert!(nope.plans.values().all(|(_, dp)| !dp.tables.iter().any(rope)));
}

#[test]
fn ptxas_assembles_every_kernel_of_every_spec() {
    let ptxas = ptxas_path().expect("ptxas not found: run scripts/setup.sh (or set WEFT_PTXAS)");
    let mut reports: BTreeMap<String, String> = BTreeMap::new();
    for spec in spec_files().into_iter().filter(|s| !waits_for_gpu_kernels(s)) {
        let rel = spec.to_str().unwrap();
        let (bundle, _) = build_bundle(&program(rel), &shapes(), &cache()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        // Every launch passes what its kernel's PTX declares (reading the bundle checks it).
        Bundle::from_bytes(&bundle.to_bytes()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let mut table = String::new();
        for k in &bundle.kernels {
            let atomics = float_atomics(&k.ptx);
            assert!(
                atomics.is_empty(),
                "{rel}: kernel {} sums with float atomics (order varies run to run): {atomics:?}",
                k.name
            );
            assert_eq!(
                weft_runtime::device::ptx_entry_params(&k.ptx, &k.name).unwrap(),
                k.params,
                "{rel}: kernel {}",
                k.name
            );
            let r = reports.entry(k.name.clone()).or_insert_with(|| {
                let r = ptxas_report(&ptxas, &k.name, &k.ptx).unwrap_or_else(|e| panic!("{rel}: {e}"));
                // Only a kernel whose registers are capped for occupancy may spill, and little.
                if k.ptx.contains(".maxnreg") {
                    assert!(
                        r.spill_bytes <= 128,
                        "{rel}: kernel {} spills {} bytes:\n{}",
                        k.name,
                        r.spill_bytes,
                        r.text
                    );
                } else {
                    assert_eq!(r.spill_bytes, 0, "{rel}: kernel {} spills:\n{}", k.name, r.text);
                }
                format!(
                    "regs {:>3}  stack {:>5}  spill {:>3}  smem {:>6}",
                    r.registers, r.stack_bytes, r.spill_bytes, r.shared_bytes
                )
            });
            table.push_str(&format!("{:<72} {r}\n", k.name));
        }
        let stem = spec.file_stem().unwrap().to_string_lossy().replace('.', "_");
        insta::assert_snapshot!(format!("ptxas__{stem}"), table);
    }
}

/// PTX instructions that add floats atomically (`atom`/`red` on f16, bf16, f32 or f64): their
/// order depends on scheduling, so a sum through them differs between runs.
fn float_atomics(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter(|l| {
            l.split_whitespace().any(|w| {
                (w.starts_with("atom.") || w.starts_with("red."))
                    && [".f16", ".bf16", ".f32", ".f64", ".f16x2", ".bf16x2"].iter().any(|t| w.contains(t))
            })
        })
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn the_float_atomics_scan_finds_them() {
    let ptx = "\tld.global.f32 %f1, [%rd1];\n\t@%p1 atom.global.add.f32 %f2, [%rd2], %f1;\n\tred.global.add.noftz.bf16 [%rd3], %h1;\n\tatom.global.add.u32 %r1, [%rd4], 1;\n";
    assert_eq!(float_atomics(ptx).len(), 2, "{:?}", float_atomics(ptx));
}

#[test]
fn a_signature_mismatch_in_a_bundle_is_refused() {
    let b = tiny_bundle();
    let err = |b: &Bundle| Bundle::from_bytes(&b.to_bytes()).expect_err("mismatch accepted").0;
    // The manifest's parameter list disagrees with the PTX.
    let mut m = b.clone();
    let k = m.kernels.iter_mut().find(|k| k.params.len() > 1).unwrap();
    let name = k.name.clone();
    k.params.pop();
    let e = err(&m);
    assert!(e.contains(&name) && e.contains("PTX declares"), "{e}");
    // A launch passes an argument of the wrong type.
    let mut m = b.clone();
    let launch = m
        .plans
        .values_mut()
        .flat_map(|(_, dp)| dp.steps.iter_mut())
        .find_map(|s| match s {
            DeviceStep::Launch(l) if l.args.iter().any(|a| matches!(a, weft_runtime::device::Arg::I64 { .. })) => {
                Some(l)
            }
            _ => None,
        })
        .unwrap();
    let i = launch.args.iter().position(|a| matches!(a, weft_runtime::device::Arg::I64 { .. })).unwrap();
    launch.args[i] = weft_runtime::device::Arg::F32 { value: 1.0 };
    let name = launch.kernel.clone();
    let e = err(&m);
    assert!(e.contains(&name) && e.contains("with arguments") && e.contains("f32"), "{e}");
    // A launch with one argument too few.
    let mut m = b.clone();
    let launch = m
        .plans
        .values_mut()
        .flat_map(|(_, dp)| dp.steps.iter_mut())
        .find_map(|s| match s {
            DeviceStep::Launch(l) => Some(l),
            _ => None,
        })
        .unwrap();
    launch.args.pop();
    let e = err(&m);
    assert!(e.contains("with arguments") && e.contains("but it takes"), "{e}");
}

#[test]
fn kernels_of_the_tiny_specs_match_their_snapshots() {
    let mut seen = std::collections::BTreeSet::new();
    for spec in spec_files().into_iter().filter(|s| s.starts_with("specs/tiny") && !waits_for_gpu_kernels(s)) {
        let rel = spec.to_str().unwrap();
        let snaps = kernel_snapshots(&program(rel), &shapes(), &cache()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        for s in snaps {
            if seen.insert(s.name.clone()) {
                assert!(s.ptxas.is_some(), "ptxas not found: run scripts/setup.sh");
                insta::assert_snapshot!(format!("kernel__{}", s.name), s.render());
            }
        }
    }
    // A snapshot no kernel produces any more is a stale review record.
    let stale: Vec<String> = std::fs::read_dir(crate::root().join("tests/snapshots"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            let name = f.strip_prefix("integration__lower__kernel__")?.strip_suffix(".snap")?.to_string();
            (!seen.contains(&name)).then_some(f)
        })
        .collect();
    assert!(stale.is_empty(), "kernel snapshots of kernels no tiny spec generates (delete them): {stale:?}");
}

fn tiny_bundle() -> Bundle {
    build_bundle(&program("specs/tiny/samba-tiny.weft"), &shapes(), &cache()).expect("bundle").0
}

#[test]
fn bundles_round_trip_and_damage_is_refused() {
    let b = tiny_bundle();
    let bytes = b.to_bytes();
    let back = Bundle::from_bytes(&bytes).expect("reads back");
    // Compared field by field: a failure prints what differs, not two whole bundles.
    assert!(back.program == b.program, "the program changed in the round trip");
    assert!(back.plans == b.plans, "the device plans changed in the round trip");
    assert!(back.kernels == b.kernels, "the kernels changed in the round trip");

    let err = |bytes: &[u8]| Bundle::from_bytes(bytes).expect_err("damaged bundle accepted").0;
    assert!(err(b"hello").contains("not a weft bundle"));
    let mut v = bytes.clone();
    v[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let e = err(&v);
    assert!(e.contains(&format!("format version {}", FORMAT_VERSION + 1)) && e.contains("weft build"), "{e}");
    let e = err(&bytes[..bytes.len() / 2]);
    assert!(e.contains("truncated") || e.contains("damaged"), "{e}");
    // A flipped byte in the last kernel's PTX.
    let mut v = bytes.clone();
    let n = v.len();
    v[n - 10] ^= 0x20;
    let e = err(&v);
    assert!(e.contains("does not match its checksum") && e.contains("kernel"), "{e}");
    // A manifest that parses but launches a kernel the bundle lacks.
    let mut b2 = b.clone();
    b2.kernels.retain(|k| !k.name.starts_with("rms_norm_w"));
    let e = err(&b2.to_bytes());
    assert!(e.contains("which the bundle does not hold"), "{e}");
}

#[test]
fn ptxas_reports_are_read_with_their_spills() {
    // ptxas 13.0's `-v` output for a kernel that spills: the stack line has no `ptxas info`.
    let text = "ptxas info    : 0 bytes gmem\n\
                ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
                ptxas info    : Function properties for k\n    \
                616 bytes stack frame, 140 bytes spill stores, 136 bytes spill loads\n\
                ptxas info    : Used 168 registers, used 1 barriers, 616 bytes cumulative stack size, 32768 bytes smem\n\
                ptxas info    : Compile time = 147.631 ms\n";
    let r = weft::snapshot::parse_ptxas_report(text);
    assert_eq!((r.registers, r.spill_bytes, r.stack_bytes, r.shared_bytes), (168, 140, 616, 32768));
    assert!(r.text.contains("140 bytes spill stores") && !r.text.contains("Compile time"), "{}", r.text);
}
