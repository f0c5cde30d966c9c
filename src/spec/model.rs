//! The resolved model: what the graph builder elaborates.

use super::layers::LayerKind;
use crate::diag::Span;
use weft_runtime::DType;

/// Expanded layer sequences longer than this are refused (the largest paper model has 64).
pub const MAX_LAYERS: u64 = 4096;

/// Which initialisation rules of reference section 1.7 apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitScheme {
    /// `mamba_init=True`: N(0, 0.02²) embeddings, PyTorch-default linears, residual outputs
    /// divided by sqrt(number of residual sub-layers).
    Samba,
    /// GPT-NeoX: N(0, 2/(5·d)) embeddings and linears, residual outputs N(0, (1/(√d·blocks))²).
    Neox,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub name: String,
    pub vocab: u64,
    pub width: u64,
    pub tied_embeddings: bool,
    pub norm_eps: f64,
    pub dtype: DType,
    pub init: InitScheme,
    /// Layer definitions in the order they were written; `LayerUse::def` indexes this.
    pub defs: Vec<LayerDef>,
    /// The expanded sequence of residual sub-layers.
    pub layers: Vec<LayerUse>,
    /// Where the model block was written.
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerDef {
    pub name: String,
    pub kind: LayerKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerUse {
    pub def: usize,
    /// Where this layer appears in `layers = ...` (a name, or a symbol of a pattern string).
    pub span: Span,
}

impl Model {
    /// This model with Self-Extend on every full-attention layer with RoPE (at inference: the
    /// training graph ignores it); an error where no layer takes it.
    pub fn with_self_extend(mut self, se: weft_runtime::op::SelfExtend) -> Result<Model, String> {
        if se.group < 1 || se.neighbours < 1 {
            return Err(format!(
                "Self-Extend needs a neighbour window and a group size of at least 1, not {} and {}",
                se.neighbours, se.group
            ));
        }
        let mut any = false;
        for d in &mut self.defs {
            if let super::layers::LayerKind::Attention(a) = &mut d.kind {
                if a.window.is_none() && a.rope.is_some() {
                    a.self_extend = Some(se);
                    any = true;
                }
            }
        }
        if !any {
            return Err(format!("`{}` has no full-attention layer with RoPE for Self-Extend to extend", self.name));
        }
        Ok(self)
    }

    pub fn def(&self, layer: &LayerUse) -> &LayerDef {
        &self.defs[layer.def]
    }
}
