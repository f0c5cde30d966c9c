//! Exact parameter counts of every paper architecture (reference section 1.9), every tensor
//! counted, norms included.

use crate::checked;

/// (spec, exact count, the paper's figure: exact where the reference gives it to the unit).
const PAPER: &[(&str, u64, f64)] = &[
    ("specs/samba-421m.weft", 421_793_280, 421_793_280.0),
    ("specs/samba-1.3b.weft", 1_330_207_488, 1.330e9),
    ("specs/samba-1.7b.weft", 1_742_194_688, 1.742e9),
    ("specs/samba-3.8b.weft", 3_864_275_712, 3.864e9),
    ("specs/mamba-432m.weft", 432_804_864, 432_804_864.0),
    ("specs/mamba-1.8b.weft", 1_795_295_232, 1.795e9),
    ("specs/mamba-mlp-1.9b.weft", 1_946_224_640, 1.946e9),
    ("specs/mamba-swa-mlp-1.6b.weft", 1_655_330_816, 1.655e9),
    ("specs/llama2-438m.weft", 438_081_024, 438.0e6),
    ("specs/llama2-swa-438m.weft", 438_081_024, 438.0e6),
    ("specs/llama3-1.6b.weft", 1_641_187_328, 1.641e9),
    ("specs/mistral-1.6b.weft", 1_641_187_328, 1.641e9),
];

/// The 421M-scale variants, whose paper figures are rounded labels: within 1 %.
const WITHIN_ONE_PERCENT: &[(&str, u64, f64)] = &[
    ("specs/mlp2-swa-mlp-417m.weft", 417_240_576, 417e6),
    ("specs/samba-nope-421m.weft", 421_793_280, 421e6),
    ("specs/sliding-gla-438m.weft", 438_309_120, 438e6),
    ("specs/sliding-retnet-446m.weft", 445_555_200, 446e6),
];

#[test]
fn paper_specs_have_their_exact_parameter_counts() {
    for &(spec, exact, paper) in PAPER {
        let c = checked(spec);
        assert_eq!(c.graph.parameter_count(), exact, "{spec}");
        // The exact count rounds to the paper's figure at the precision the paper prints.
        let half_unit = if paper == exact as f64 { 0.5 } else { paper * 5e-4 };
        assert!((exact as f64 - paper).abs() <= half_unit, "{spec}: {exact} vs paper {paper}");
    }
}

#[test]
fn smaller_variants_are_within_one_percent_of_the_paper() {
    for &(spec, exact, paper) in WITHIN_ONE_PERCENT {
        let n = checked(spec).graph.parameter_count();
        assert_eq!(n, exact, "{spec}");
        assert!((n as f64 / paper - 1.0).abs() < 0.01, "{spec}: {n} vs {paper}");
    }
}

#[test]
fn mamba_swa_mlp_400m_matches_its_released_config() {
    // 8 × (Mamba 14,914,560 + SWA 9,437,184 + MLP 18,874,368) + 3 × 8 + 1 norms + embedding:
    // 395.0M, which the paper labels "400M" (0.40B at two significant digits).
    let n = checked("specs/mamba-swa-mlp-400m.weft").graph.parameter_count();
    assert_eq!(n, 8 * (14_914_560 + 9_437_184 + 18_874_368) + 25 * 1536 + 32000 * 1536);
    assert_eq!(n, 394_999_296);
}

#[test]
fn untied_specs_count_the_head_separately() {
    let tied = checked("specs/samba-421m.weft").graph.parameter_count();
    let gla = checked("specs/sliding-gla-438m.weft");
    assert!(!gla.model.tied_embeddings);
    let head = gla.graph.params().find(|(_, n, _)| *n == "head.weight").map(|(_, _, n)| n.ty().shape.fixed_elems());
    assert_eq!(head, Some(32000 * 1536));
    assert!(gla.graph.parameter_count() > tied);
}

#[test]
fn tiny_specs_have_a_few_million_parameters() {
    let dir = crate::root().join("specs/tiny");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("specs/tiny") {
        let path = entry.expect("entry").path();
        let c = weft::check_file(&path).unwrap_or_else(|f| panic!("{}", f.render()));
        let p = c.graph.parameter_count();
        if c.model.name == "samba-micro" {
            // The CPU demonstration model.
            assert_eq!(p, 1_036_928);
            continue;
        }
        assert!((5_000_000..12_000_000).contains(&p), "{}: {p}", path.display());
        n += 1;
    }
    assert_eq!(n, 10, "one tiny spec per paper architecture");
}
