//! From a merged spec to a [`Model`]: model settings, layer definitions and the layer sequence,
//! each checked, every error reported.

use super::args::ArgReader;
use super::layers::{read_layer, LAYER_KINDS};
use super::load::Merged;
use super::model::{InitScheme, LayerDef, Model};
use super::pattern::expand;
use super::suggest::did_you_mean;
use crate::diag::{Diagnostic, Diagnostics, Span};
use weft_runtime::DType;

pub(super) fn resolve(m: &Merged, diags: &mut Diagnostics) -> Option<Model> {
    let file_start = m.root.map(|f| Span::new(f, 0, 0));
    let Some(name) = &m.name else {
        let mut d = Diagnostic::error("the spec has no `model` block")
            .note("every spec names its model and sets its width and vocabulary, e.g.\n    model tiny { vocab = 4096  width = 256 }");
        if let Some(s) = file_start {
            d = d.at(s, "expected `model NAME { ... }` in this file or a base spec");
        }
        diags.push(d);
        return None;
    };
    let owner = m.model_span.unwrap_or(name.span);

    let mut r = ArgReader::new("model setting", String::new(), &m.settings, owner, diags);
    let vocab = r.int("vocab", None, 2, "the vocabulary size, e.g. `vocab = 32000`");
    let width = r.int("width", None, 1, "the model width d_m, e.g. `width = 1536`");
    let embeddings = r.word("embeddings", &["tied", "untied"], "tied");
    r.word("norm", &["rmsnorm"], "rmsnorm");
    let norm_eps = r.positive("norm_eps", 1e-5);
    let dtype = r.word("dtype", &["bf16", "f16", "f32"], "bf16");
    let init = r.word("init", &["samba", "neox"], "samba");
    r.finish();

    let mut defs = Vec::new();
    let mut defs_ok = true;
    for def in &m.defs {
        let kind = def.kind.value.as_str();
        if !LAYER_KINDS.contains(&kind) {
            let mut d = Diagnostic::error(format!("unknown layer kind `{kind}`")).at(def.kind.span, "not a layer kind");
            if let Some(hint) = did_you_mean(kind, LAYER_KINDS.iter().copied()) {
                d = d.note(hint);
            }
            diags.push(d.note(format!("layer kinds: {}", LAYER_KINDS.join(", "))));
            defs_ok = false;
            continue;
        }
        defs_ok &= width.is_some();
        let mut r = ArgReader::new("parameter", format!(" of `{kind}`"), &def.args, def.kind.span, diags);
        let parsed = read_layer(kind, &mut r, width, def.kind.span);
        r.finish();
        match parsed {
            Some(kind) => defs.push(LayerDef { name: def.name.value.clone(), kind, span: def.name.span }),
            None => defs_ok = false,
        }
    }

    let names: Vec<&str> = m.defs.iter().map(|d| d.name.value.as_str()).collect();
    let layers = match &m.layers {
        Some(item) => expand(&item.terms, &names, diags),
        None => {
            diags.push(
                Diagnostic::error("the spec has no `layers = ...` line")
                    .at(owner, "model defined here")
                    .note("say how the layers interleave, e.g. `layers = [mamba, mlp, swa, mlp] x 6`"),
            );
            None
        }
    };
    if let Some(layers) = &layers {
        // Definitions inherited from a base spec may go unused on purpose; only the root file's
        // own definitions are worth a warning.
        for (i, def) in m.defs.iter().enumerate() {
            if Some(def.name.span.file) == m.root && !layers.iter().any(|l| l.def == i) {
                diags.push(
                    Diagnostic::warning(format!("layer `{}` is defined but not used", def.name.value))
                        .at(def.name.span, "not in `layers`"),
                );
            }
        }
    }

    let model = Model {
        name: name.value.clone(),
        vocab: vocab?,
        width: width?,
        tied_embeddings: embeddings == "tied",
        norm_eps,
        dtype: DType::parse(dtype).unwrap_or(DType::BF16),
        init: if init == "neox" { InitScheme::Neox } else { InitScheme::Samba },
        defs,
        layers: layers?,
        span: owner,
    };
    (defs_ok && !diags.has_errors()).then_some(model)
}
