//! Documents, token streams and training windows.
//!
//! Documents are read from text files (a directory means every `.txt` file in it, sorted by
//! name), tokenized, and each followed by the end-of-text token; the packed stream is cut into
//! aligned, non-overlapping windows of `seq_len + 1` tokens (input and shifted target) that may
//! cross document boundaries (reference 1.6). The order of windows is a seeded permutation per
//! epoch, so a step's batch depends only on (seed, step) and a resumed run sees exactly the data
//! an uninterrupted one would.

use super::shards;
use super::tokenizer::Tokenizer;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct DataError(pub String);

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// The files a list of paths names: files as given, directories as their `.txt` files.
pub fn text_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| DataError(format!("cannot read `{}`: {e}", p.display())))?;
        if meta.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| DataError(format!("cannot list `{}`: {e}", p.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "txt"))
                .collect();
            inner.sort();
            if inner.is_empty() {
                return Err(DataError(format!("`{}` has no .txt files", p.display())));
            }
            files.extend(inner);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err(DataError("no training data: set `data.train` in the run settings".into()));
    }
    Ok(files)
}

/// Reads every file as one document.
pub fn read_documents(files: &[PathBuf]) -> Result<Vec<String>, DataError> {
    files.iter().map(|f| crate::io::read_text(f, crate::io::limits::TEXT, "text file").map_err(DataError)).collect()
}

/// Tokenizes documents and packs them, each followed by end-of-text.
pub fn pack(docs: &[String], tok: &Tokenizer) -> Result<Vec<u32>, DataError> {
    let mut out = Vec::new();
    for d in docs {
        out.extend(tok.encode(d).map_err(|e| DataError(e.0))?);
        out.push(tok.eot());
    }
    Ok(out)
}

/// Loads a stream from token shards (`format = "tokens"`).
pub fn load_shards(files: &[PathBuf], vocab: usize) -> Result<Vec<u32>, DataError> {
    let mut out = Vec::new();
    for f in files {
        out.extend(shards::read(f, vocab).map_err(|e| DataError(e.to_string()))?);
    }
    Ok(out)
}

/// Entropy in nats of the unigram distribution of a token stream.
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for &t in tokens {
        *counts.entry(t).or_insert(0u64) += 1;
    }
    let n = tokens.len() as f64;
    counts.values().map(|&c| c as f64 / n).map(|p| -p * p.ln()).sum()
}

/// Aligned windows of `seq_len + 1` tokens over a stream.
#[derive(Clone, Debug)]
pub struct Windows {
    tokens: Vec<u32>,
    seq_len: usize,
    /// Which tokens' predictions count (the loss mask): a masked target is -1, which the loss
    /// leaves out of its sum and its count. None: all.
    mask: Option<Vec<bool>>,
}

impl Windows {
    pub fn new(tokens: Vec<u32>, seq_len: usize, what: &Path) -> Result<Windows, DataError> {
        if tokens.len() < seq_len + 1 {
            return Err(DataError(format!(
                "{} has {} tokens, fewer than one window of {} (seq_len + 1)",
                what.display(),
                tokens.len(),
                seq_len + 1
            )));
        }
        Ok(Windows { tokens, seq_len, mask: None })
    }

    /// Windows whose targets count only where `mask` is true (tokens and mask of one length).
    pub fn masked(tokens: Vec<u32>, mask: Vec<bool>, seq_len: usize, what: &Path) -> Result<Windows, DataError> {
        if mask.len() != tokens.len() {
            return Err(DataError(format!("{}: a mask of {} for {} tokens", what.display(), mask.len(), tokens.len())));
        }
        Ok(Windows { mask: Some(mask), ..Windows::new(tokens, seq_len, what)? })
    }

    pub fn count(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Input and target of window `i`.
    pub fn window(&self, i: usize) -> (&[u32], &[u32]) {
        let s = i * self.seq_len;
        (&self.tokens[s..s + self.seq_len], &self.tokens[s + 1..s + 1 + self.seq_len])
    }

    /// Input and target ids of window `i`, a target -1 where the mask leaves it out.
    pub fn masked_window(&self, i: usize) -> (Vec<i32>, Vec<i32>) {
        let (inp, tgt) = self.window(i);
        let x = inp.iter().map(|&v| v as i32).collect();
        let y = match &self.mask {
            None => tgt.iter().map(|&v| v as i32).collect(),
            Some(m) => {
                let kept = &m[i * self.seq_len + 1..i * self.seq_len + 1 + self.seq_len];
                tgt.iter().zip(kept).map(|(&v, &k)| if k { v as i32 } else { -1 }).collect()
            }
        };
        (x, y)
    }

    /// The window a global sample index maps to: sample `s` of epoch `s / count` at its place in
    /// that epoch's permutation.
    pub fn sample(&self, seed: u64, s: u64) -> usize {
        let n = self.count() as u64;
        let (epoch, pos) = (s / n, s % n);
        permuted(seed, epoch, pos, n) as usize
    }

    /// A batch of `batch` windows starting at global sample `first`: tokens and targets, each
    /// `batch × seq_len`, row-major.
    pub fn batch(&self, seed: u64, first: u64, batch: usize) -> (Vec<i32>, Vec<i32>) {
        let mut x = Vec::with_capacity(batch * self.seq_len);
        let mut y = Vec::with_capacity(batch * self.seq_len);
        for b in 0..batch as u64 {
            let (i, t) = self.masked_window(self.sample(seed, first + b));
            x.extend(i);
            y.extend(t);
        }
        (x, y)
    }
}

/// Position `pos` of a seeded permutation of `0..n` (a Fisher–Yates shuffle drawn from the
/// counter-based generator, rebuilt per call: n is small for the data sets weft trains on here).
fn permuted(seed: u64, epoch: u64, pos: u64, n: u64) -> u64 {
    /// The last permutation built, keyed by (seed, epoch, n).
    type Cached = Option<(u64, u64, u64, Vec<u64>)>;
    thread_local! {
        static CACHE: std::cell::RefCell<Cached> = const { std::cell::RefCell::new(None) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if !matches!(&*c, Some((s, e, m, _)) if *s == seed && *e == epoch && *m == n) {
            let mut p: Vec<u64> = (0..n).collect();
            for i in (1..n).rev() {
                let u = crate::init::uniform(seed, "data-order", epoch.wrapping_mul(1 << 32) ^ i, 0);
                let j = ((u * (i + 1) as f64) as u64).min(i);
                p.swap(i as usize, j as usize);
            }
            *c = Some((seed, epoch, n, p));
        }
        c.as_ref().map_or(pos, |(_, _, _, p)| p[pos as usize])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_each_epoch_once_in_a_seeded_order() {
        let w = Windows::new((0..101).collect(), 10, Path::new("t")).unwrap();
        assert_eq!(w.count(), 10);
        let (x, y) = w.window(3);
        assert_eq!((x[0], y[0], x[9], y[9]), (30, 31, 39, 40));
        let mut seen: Vec<usize> = (0..10).map(|s| w.sample(7, s)).collect();
        let first_epoch = seen.clone();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let second: Vec<usize> = (10..20).map(|s| w.sample(7, s)).collect();
        assert_ne!(first_epoch, second);
        assert_eq!(first_epoch, (0..10).map(|s| w.sample(7, s)).collect::<Vec<_>>());
        assert_ne!(first_epoch, (0..10).map(|s| w.sample(8, s)).collect::<Vec<_>>());
    }

    #[test]
    fn a_loss_mask_leaves_out_the_targets_it_does_not_keep() {
        // Keep every token divisible by 7: window 3 (tokens 30..=40) predicts 31..=40, of which
        // 35 is kept; the batch of one window at a sample that maps to window 3 agrees.
        let tokens: Vec<u32> = (0..101).collect();
        let mask: Vec<bool> = tokens.iter().map(|t| t % 7 == 0).collect();
        let w = Windows::masked(tokens.clone(), mask, 10, Path::new("t")).unwrap();
        let (x, y) = w.masked_window(3);
        assert_eq!(x, (30..40).collect::<Vec<i32>>());
        assert_eq!(y, [-1, -1, -1, -1, 35, -1, -1, -1, -1, -1]);
        let s = (0..10).find(|&s| w.sample(5, s) == 3).unwrap();
        assert_eq!(w.batch(5, s, 1), (x, y));
        assert!(Windows::masked(tokens, vec![true; 3], 10, Path::new("t")).is_err());
    }

    #[test]
    fn entropy_of_uniform_tokens_is_log_n() {
        let t: Vec<u32> = (0..4000).map(|i| i % 4).collect();
        assert!((unigram_entropy(&t) - 4f64.ln()).abs() < 1e-12);
    }
}
