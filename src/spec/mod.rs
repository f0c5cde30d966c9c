//! The model description: a spec after inheritance is merged, names are resolved, parameters are
//! checked against their kinds and the layer sequence is expanded.

mod args;
mod layers;
mod load;
mod model;
mod pattern;
mod resolve;
mod suggest;

pub use layers::{Attention, Gla, LayerKind, Mamba, RetNet, SwiGlu, LAYER_KINDS};
pub use load::{load_file, load_stored, load_str, Loaded};
pub use model::{InitScheme, LayerDef, LayerUse, Model, MAX_LAYERS};
