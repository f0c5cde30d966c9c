//! Training data: tokenizers, the token-shard format, documents packed with end-of-text tokens
//! and cut into training windows in a seeded order.

pub mod corpus;
pub mod shards;
pub mod tokenizer;

pub use corpus::{DataError, Windows};
pub use tokenizer::{Tokenizer, TokenizerError};
