//! Run settings: defaults, and errors with their line and column.

use weft::config::{parse, RunConfig};
use weft::diag::SourceMap;

fn errors(src: &str) -> String {
    let mut sources = SourceMap::new();
    let file = sources.add("run.toml", src.to_string());
    match parse(src, file) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(d) => d.render(&sources),
    }
}

#[test]
fn defaults_follow_the_reference_recipe() {
    let mut sources = SourceMap::new();
    let file = sources.add("run.toml", String::new());
    let c = parse("", file).unwrap();
    assert_eq!(c, RunConfig::default());
    assert_eq!((c.optimizer.beta1, c.optimizer.beta2, c.optimizer.eps), (0.9, 0.95, 1e-8));
    assert_eq!((c.optimizer.weight_decay, c.optimizer.grad_clip, c.optimizer.min_lr_ratio), (0.1, 1.0, 0.1));
    assert_eq!(c.train.seq_len, 4096);
}

#[test]
fn settings_are_read() {
    let src = "spec = \"tiny.weft\"\n[train]\nseq_len = 512\nbatch_size = 4\n[optimizer]\nlr = 1e-3\n[data]\ntrain = [\"a.txt\"]\ntokenizer = \"byte\"\n";
    let mut sources = SourceMap::new();
    let file = sources.add("run.toml", src.to_string());
    let mut c = parse(src, file).unwrap();
    assert_eq!((c.train.seq_len, c.train.batch_size, c.optimizer.lr), (512, 4, 1e-3));
    c.resolve_paths(std::path::Path::new("runs/run.toml"));
    assert_eq!(c.spec, Some("runs/tiny.weft".into()));
    assert_eq!(c.data.train, vec![std::path::PathBuf::from("runs/a.txt")]);
    assert_eq!(c.data.tokenizer.as_deref(), Some("byte"));
}

#[test]
fn example_run_settings_are_valid() {
    for name in ["samba-micro.toml", "samba-tiny.toml"] {
        let path = crate::root().join("examples").join(name);
        if let Err((sources, diags)) = weft::config::load(&path) {
            panic!("{}", diags.render(&sources));
        }
    }
}

#[test]
fn unknown_key_is_an_error_at_its_place() {
    insta::assert_snapshot!(errors("[train]\nseq_len = 512\nbatchsize = 4\n"));
}

#[test]
fn mistyped_value_is_an_error_at_its_place() {
    insta::assert_snapshot!(errors("[optimizer]\nlr = \"fast\"\n"));
}

#[test]
fn out_of_range_values_are_all_reported() {
    insta::assert_snapshot!(errors("[optimizer]\nlr = -1.0\nbeta2 = 1.5\n\n[generate]\ntop_p = 0\n"));
}

#[test]
fn broken_toml_is_an_error_at_its_place() {
    insta::assert_snapshot!(errors("[train\nseq_len = 512\n"));
}

/// The generation batch sizes the prefill and decode plans: zero, more than the engine's slots,
/// and a product with the context past the prefill's token limit are refused where they are
/// written, with the limit named.
#[test]
fn generation_batch_is_bounded_before_anything_is_sized_by_it() {
    let zero = errors("[generate]\nbatch = 0\n");
    assert!(zero.contains("run.toml:2:") && zero.contains("between 1 and 4096"), "{zero}");
    let many = errors("[generate]\nbatch = 5000\n");
    assert!(many.contains("between 1 and 4096"), "{many}");
    // 4096 sequences of 1M + 200 tokens: under the count limit, over 2^26 prompt tokens.
    let long = errors("[train]\nseq_len = 1048576\nbatch_size = 1\n\n[generate]\nbatch = 4096\n");
    assert!(long.contains("at most 63 sequences") && long.contains("67108864 tokens"), "{long}");
}
