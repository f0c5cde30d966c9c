//! Token shards: a stream of token ids in a small binary format.
//!
//! Layout (little-endian): the 8 bytes `WEFTTOK1`, a u32 format version (1), a u32 vocabulary
//! size, a u64 token count, then that many u32 token ids. Readers check every field, the file
//! length and every id against the vocabulary.

use std::fmt;
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"WEFTTOK1";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8;

#[derive(Clone, Debug, PartialEq)]
pub struct ShardError(pub String);

impl fmt::Display for ShardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn write(path: &Path, vocab: u32, tokens: &[u32]) -> Result<(), ShardError> {
    let mut bytes = Vec::with_capacity(HEADER + 4 * tokens.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&vocab.to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    let tmp = path.with_extension("tokens.tmp");
    let io = |e: std::io::Error| ShardError(format!("cannot write `{}`: {e}", path.display()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a shard whose ids must be below `vocab` (the model's vocabulary).
pub fn read(path: &Path, vocab: usize) -> Result<Vec<u32>, ShardError> {
    let name = path.display();
    let bytes = crate::io::read_bounded(path, crate::io::limits::SHARD, "token shard").map_err(ShardError)?;
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(ShardError(format!("`{name}` is not a weft token shard (no WEFTTOK1 header)")));
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
    let version = u32_at(8);
    if version != VERSION {
        return Err(ShardError(format!(
            "`{name}` is token-shard version {version}; this weft reads version {VERSION}"
        )));
    }
    let shard_vocab = u32_at(12) as usize;
    let count = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    let expected = (count as u128) * 4 + HEADER as u128;
    if expected != bytes.len() as u128 {
        return Err(ShardError(format!(
            "`{name}` says {count} tokens but holds {} bytes of ids: truncated or damaged",
            bytes.len() - HEADER
        )));
    }
    if shard_vocab > vocab {
        return Err(ShardError(format!(
            "`{name}` was made for a vocabulary of {shard_vocab}, larger than the model's {vocab}"
        )));
    }
    let tokens: Vec<u32> =
        bytes[HEADER..].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= shard_vocab) {
        return Err(ShardError(format!(
            "`{name}`: token {i} is id {t}, outside the shard's vocabulary of {shard_vocab}"
        )));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip_and_refuse_damage() {
        let dir = std::env::temp_dir().join(format!("weft-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.tokens");
        write(&p, 50, &[1, 2, 49, 0]).unwrap();
        assert_eq!(read(&p, 64).unwrap(), vec![1, 2, 49, 0]);
        assert!(read(&p, 40).unwrap_err().0.contains("vocabulary of 50, larger than the model's 40"));
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.pop();
        std::fs::write(&p, &bytes).unwrap();
        assert!(read(&p, 64).unwrap_err().0.contains("truncated or damaged"));
        std::fs::write(&p, b"hello").unwrap();
        assert!(read(&p, 64).unwrap_err().0.contains("not a weft token shard"));
    }
}
