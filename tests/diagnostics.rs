//! Data-driven error tests: every spec under `tests/data/errors` fails, and what the user sees
//! (file:line:column, the line, a caret, what was expected) is a reviewed snapshot.

#[test]
fn broken_specs_report_every_error_at_its_place() {
    insta::glob!("data/errors/*.weft", |path| {
        let rel = path.strip_prefix(crate::root()).expect("under the repository");
        let failed = match weft::check_file(rel) {
            Ok(_) => panic!("{} checked without errors", rel.display()),
            Err(f) => f,
        };
        assert!(failed.diags.has_errors());
        // Every error points at a place in a file, except errors about a file as a whole.
        let rendered = failed.render();
        assert!(rendered.contains(".weft:"), "{rendered}");
        insta::assert_snapshot!(rendered);
    });
}

#[test]
fn warnings_do_not_fail_a_spec() {
    let src =
        "model m { vocab = 64  width = 16 }\nlayer a = swiglu(hidden = 8)\nlayer b = swiglu(hidden = 8)\nlayers = a\n";
    let c = weft::check_str(std::path::Path::new("inline.weft"), src).unwrap_or_else(|f| panic!("{}", f.render()));
    let text = c.diags.render(&c.sources);
    assert!(text.contains("warning: layer `b` is defined but not used"), "{text}");
    assert!(text.contains("inline.weft:3:7"), "{text}");
}
