//! No input may panic, overflow the stack, hang or exhaust memory in the parser or checker.
//! Property tests feed the whole front end random text, token soup and mutated real specs;
//! targeted tests push each limit.

use proptest::prelude::*;
use std::path::Path;

/// Runs the whole front end; any panic fails the property.
fn front_end(src: &str) {
    match weft::check_str(Path::new("fuzz.weft"), src) {
        Ok(c) => assert!(!c.diags.has_errors()),
        Err(f) => {
            assert!(f.diags.has_errors());
            // Rendering must not panic either, whatever the spans.
            let _ = f.render();
        }
    }
}

const TOKENS: &[&str] = &[
    "model",
    "layer",
    "layers",
    "extends",
    "pattern",
    "x",
    "*",
    "=",
    ",",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "\"M-*-\"",
    "\"",
    "mamba",
    "attention",
    "swiglu",
    "mlp",
    "gla",
    "retnet",
    "m",
    "a",
    "M",
    "-",
    "heads",
    "width",
    "vocab",
    "hidden",
    "window",
    "full",
    "none",
    "0",
    "1",
    "7",
    "64",
    "4096",
    "99999999999999999999999",
    "1e-5",
    "-3",
    "2.5",
    "//c\n",
    "/*",
    "*/",
    "#",
    "\n",
    " ",
    "§",
    "_",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..80).prop_map(|t| t.join(" "))
}

fn samba_tiny() -> String {
    std::fs::read_to_string(crate::root().join("specs/tiny/samba-tiny.weft")).unwrap()
}

/// A real spec with a few byte ranges deleted, duplicated or replaced.
fn mutated_spec() -> impl Strategy<Value = String> {
    let base = samba_tiny();
    let n = base.len();
    prop::collection::vec((0..n, 0..n, 0..4u8, prop::sample::select(TOKENS)), 1..6).prop_map(move |edits| {
        let mut s = base.clone();
        for (a, b, kind, tok) in edits {
            let (mut a, mut b) = (a.min(s.len()), b.min(s.len()));
            if a > b {
                std::mem::swap(&mut a, &mut b);
            }
            while !s.is_char_boundary(a) {
                a -= 1;
            }
            while !s.is_char_boundary(b) {
                b -= 1;
            }
            match kind {
                0 => s.replace_range(a..b, ""),
                1 => {
                    let dup = s[a..b].to_string();
                    s.insert_str(b, &dup)
                }
                2 => s.replace_range(a..b, tok),
                _ => s.insert_str(a, tok),
            }
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(src in ".{0,400}") {
        front_end(&src);
    }

    #[test]
    fn token_soup_never_panics(src in token_soup()) {
        front_end(&src);
    }

    #[test]
    fn mutated_specs_never_panic(src in mutated_spec()) {
        front_end(&src);
    }
}

fn first_error(src: &str) -> String {
    match weft::check_str(Path::new("limits.weft"), src) {
        Ok(_) => panic!("accepted"),
        Err(f) => f.diags.0.iter().find(|d| d.is_error()).unwrap().message.clone(),
    }
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let depth = 100_000;
    let src = format!(
        "model m {{ vocab = 8 width = 8 }}\nlayer a = swiglu(hidden = 4)\nlayers = {}a{}",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert_eq!(first_error(&src), "brackets nest more than 32 deep");
    // Unclosed brackets count too.
    assert_eq!(first_error(&"(".repeat(depth)), "brackets nest more than 32 deep");
}

#[test]
fn nesting_at_the_limit_is_accepted() {
    let src = format!(
        "model m {{ vocab = 8 width = 8 }}\nlayer a = swiglu(hidden = 4)\nlayers = {}a{}",
        "[".repeat(32),
        "]".repeat(32)
    );
    assert!(weft::check_str(Path::new("ok.weft"), &src).is_ok());
}

#[test]
fn huge_repetition_is_refused_without_expanding() {
    let src = "model m { vocab = 8 width = 8 }\nlayer a = swiglu(hidden = 4)\nlayers = [[[[a x 9223372036854775807] x 9223372036854775807] x 1000] x 1000]";
    assert_eq!(first_error(src), "the layer sequence expands to more than 4096 layers");
    let src = "model m { vocab = 8 width = 8 }\nlayer a = swiglu(hidden = 4)\nlayers = a x 99999999999999999999999999";
    assert_eq!(first_error(src), "repetition count is too large");
}

#[test]
fn oversized_input_is_refused() {
    let src = format!("// {}\n", "x".repeat(weft::syntax::MAX_SOURCE_BYTES));
    assert!(first_error(&src).starts_with("spec is 1048580 bytes"));
}

#[test]
fn huge_numbers_are_errors_not_overflows() {
    let src = "model m { vocab = 99999999999999999999999 width = 18446744073709551615 }\nlayer a = swiglu(hidden = 4)\nlayers = a";
    assert!(first_error(src).contains("`vocab` must be a whole number"));
    // Widths that overflow products of shapes are refused by the range checks.
    let src =
        "model m { vocab = 8 width = 4611686018427387904 }\nlayer a = swiglu(hidden = 4611686018427387904)\nlayers = a";
    let r = weft::check_str(Path::new("big.weft"), src);
    assert!(r.is_err());
}

/// Run settings through the reader: parsed, range-checked, rendered, and (when accepted) what is
/// sized from them computed. Any panic fails the property.
fn settings_end_to_end(src: &str) {
    let mut sources = weft::diag::SourceMap::new();
    let file = sources.add("run.toml", src.to_string());
    match weft::config::parse(sources.source(file), file) {
        Ok(mut c) => {
            c.pin_schedule();
            let _ = weft::run::run_settings(&c).hash();
            // Every accepted size is within the stated limits.
            let t = &c.train;
            assert!(t.batch_size * t.seq_len <= weft::config::limits::TOKENS_PER_BATCH, "{t:?}");
            assert!(t.grad_accum <= weft::config::limits::BATCH && c.schedule_steps() <= weft::config::limits::STEPS);
        }
        Err(d) => {
            assert!(d.has_errors());
            let _ = d.render(&sources);
        }
    }
}

const SETTINGS_TOKENS: &[&str] = &[
    "[train]",
    "[optimizer]",
    "[data]",
    "[checkpoint]",
    "[generate]",
    "[[train]]",
    "seq_len",
    "batch_size",
    "grad_accum",
    "steps",
    "seed",
    "eval_batches",
    "lr",
    "warmup",
    "grad_clip",
    "schedule_steps",
    "dir",
    "keep",
    "every",
    "tokenizer",
    "format",
    "train",
    "valid",
    "max_new_tokens",
    "top_p",
    "temperature",
    "spec",
    "=",
    "\n",
    " ",
    "\"",
    "'",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "0",
    "1",
    "-1",
    "65536",
    "65537",
    "16777216",
    "1e308",
    "nan",
    "inf",
    "9223372036854775807",
    "18446744073709551616",
    "1000000000000",
    "0.5",
    "true",
    "\"bpe\"",
    "\"\"",
    "\"/dev/zero\"",
    "#",
    "\u{1b}",
    "\u{feff}",
];

fn settings_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(SETTINGS_TOKENS), 0..60).prop_map(|t| t.join(" "))
}

/// The GPU check's settings with a few byte ranges deleted, duplicated or replaced.
fn mutated_settings() -> impl Strategy<Value = String> {
    let base = std::fs::read_to_string(crate::root().join("examples/samba-micro.toml")).unwrap();
    let n = base.len();
    prop::collection::vec((0..n, 0..n, 0..4u8, prop::sample::select(SETTINGS_TOKENS)), 1..6).prop_map(move |edits| {
        let mut s = base.clone();
        for (a, b, kind, tok) in edits {
            let (mut a, mut b) = (a.min(s.len()), b.min(s.len()));
            if a > b {
                std::mem::swap(&mut a, &mut b);
            }
            while !s.is_char_boundary(a) {
                a -= 1;
            }
            while !s.is_char_boundary(b) {
                b -= 1;
            }
            match kind {
                0 => s.replace_range(a..b, ""),
                1 => {
                    let dup = s[a..b].to_string();
                    s.insert_str(b, &dup)
                }
                2 => s.replace_range(a..b, tok),
                _ => s.insert_str(a, tok),
            }
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_settings_text_never_panics(src in ".{0,400}") {
        settings_end_to_end(&src);
    }

    #[test]
    fn settings_soup_never_panics(src in settings_soup()) {
        settings_end_to_end(&src);
    }

    #[test]
    fn mutated_settings_never_panic(src in mutated_settings()) {
        settings_end_to_end(&src);
    }
}

/// Inputs the fuzzers found crashing, kept so they stay fixed: `settings-*` through the run
/// settings, `spec-*` through the front end.
#[test]
fn fuzz_findings_stay_fixed() {
    for e in std::fs::read_dir(crate::root().join("tests/data/fuzz")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let text = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned();
        if name.starts_with("settings-") {
            settings_end_to_end(&text);
        } else {
            front_end(&text);
        }
    }
}
