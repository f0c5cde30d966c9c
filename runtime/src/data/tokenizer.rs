//! Tokenizers: raw bytes, or a byte-level BPE (the `tokenizers` crate) trained on the
//! training text or loaded from a `tokenizer.json`. Every tokenizer has an end-of-text token
//! that separates packed documents.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

/// The end-of-text token of BPE tokenizers.
pub const EOT: &str = "<|endoftext|>";

#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerError(pub String);

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TokenizerError {}

fn err<E: fmt::Display>(what: &str) -> impl FnOnce(E) -> TokenizerError + '_ {
    move |e| TokenizerError(format!("{what}: {e}"))
}

pub enum Tokenizer {
    /// Ids 0–255 are bytes; 256 is end-of-text.
    Bytes,
    Bpe {
        inner: Box<HfTokenizer>,
        eot: u32,
    },
}

impl Tokenizer {
    /// Trains a byte-level BPE with `vocab` ids (end-of-text included) on `texts`.
    pub fn train_bpe(texts: &[String], vocab: usize) -> Result<Tokenizer, TokenizerError> {
        if vocab < 257 + 1 {
            return Err(TokenizerError(format!("a byte-level BPE needs a vocabulary of at least 258, not {vocab}")));
        }
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOT, true)])
            .initial_alphabet(alphabet)
            .build()
            .into();
        let mut inner = HfTokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.train(&mut trainer, texts.iter()).map_err(err("training the BPE tokenizer"))?;
        Tokenizer::from_hf(inner)
    }

    fn from_hf(inner: HfTokenizer) -> Result<Tokenizer, TokenizerError> {
        let eot = inner
            .token_to_id(EOT)
            .ok_or_else(|| TokenizerError(format!("the tokenizer has no end-of-text token `{EOT}`")))?;
        Ok(Tokenizer::Bpe { inner: Box::new(inner), eot })
    }

    /// `byte`, or a `tokenizer.json` file.
    pub fn load(spec: &str) -> Result<Tokenizer, TokenizerError> {
        if spec == "byte" {
            return Ok(Tokenizer::Bytes);
        }
        let json =
            crate::io::read_text(Path::new(spec), crate::io::limits::TOKENIZER, "tokenizer").map_err(TokenizerError)?;
        Tokenizer::from_json(&json).map_err(|e| TokenizerError(format!("tokenizer `{spec}`: {}", e.0)))
    }

    /// Writes a BPE tokenizer as `tokenizer.json`, atomically (byte tokenizers have nothing to
    /// write).
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        match self.to_json()? {
            None => Ok(()),
            Some(json) => crate::checkpoint::write_atomic(path, json.as_bytes()).map_err(|e| TokenizerError(e.0)),
        }
    }

    /// The `tokenizer.json` text of a BPE tokenizer (`None` for bytes).
    pub fn to_json(&self) -> Result<Option<String>, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(None),
            Tokenizer::Bpe { inner, .. } => inner.to_string(false).map(Some).map_err(err("serialising the tokenizer")),
        }
    }

    /// A tokenizer from `tokenizer.json` text.
    pub fn from_json(json: &str) -> Result<Tokenizer, TokenizerError> {
        let inner: HfTokenizer =
            json.parse().map_err(|e| TokenizerError(format!("not a valid tokenizer.json: {e}")))?;
        Tokenizer::from_hf(inner)
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 257,
            Tokenizer::Bpe { inner, .. } => inner.get_vocab_size(true),
        }
    }

    pub fn eot(&self) -> u32 {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Bpe { eot, .. } => *eot,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Bpe { inner, .. } => {
                Ok(inner.encode_fast(text, false).map_err(err("encoding"))?.get_ids().to_vec())
            }
        }
    }

    /// Text of `ids`; end-of-text becomes a blank line, invalid UTF-8 is replaced.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| if i == 256 { b'\n' } else { i.min(255) as u8 }).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Bpe { inner, .. } => inner.decode(ids, true).map_err(err("decoding")),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "byte",
            Tokenizer::Bpe { .. } => "bpe",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpe_round_trips_and_compresses() {
        let text =
            "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse. "
                .repeat(50);
        let t = Tokenizer::train_bpe(std::slice::from_ref(&text), 300).unwrap();
        assert_eq!(t.vocab_size(), 300);
        let ids = t.encode(&text).unwrap();
        assert!(ids.len() < text.len() / 2, "{} tokens for {} bytes", ids.len(), text.len());
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert!(ids.iter().all(|&i| i != t.eot()));
    }

    #[test]
    fn bytes_round_trip() {
        let t = Tokenizer::Bytes;
        let ids = t.encode("whale — ship").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "whale — ship");
    }
}
