//! Passkey retrieval (the paper's appendix B, after LongLM and landmark attention): a random
//! number hidden at a depth in filler text and asked for at the end, answered by greedy
//! decoding. The prompt, with `K` the key:
//!
//! ```text
//! There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
//! I will quiz you about the important information there.
//! The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.  (× n)
//! The pass key is K. Remember it. K is the pass key.                        (at depth d of the fillers)
//! ... (the rest of the fillers)
//! What is the pass key? The pass key is
//! ```
//!
//! and the answer is ` K`. A BPE tokenizer would merge a key's digits in ways that differ from
//! key to key, so every digit is written as its own token: the text around each key is encoded
//! piece by piece and each digit alone (`encode("7")`), in the prompt and in the answer alike.
//! Evaluation keys come from a different seed than tuning keys.

use std::path::PathBuf;

use crate::backend::Backend;
use crate::data::tokenizer::Tokenizer;
use crate::generate::{generate, Sampling};

const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. \
                     I will quiz you about the important information there.\n";
const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n";
const QUESTION: &str = "What is the pass key? The pass key is";

/// Digits per key.
pub const KEY_DIGITS: usize = 5;

/// The seed evaluation keys are drawn with, apart from any tuning seed.
pub const EVAL_SEED: u64 = 0x5eed_e7a1;

/// One passkey example: the prompt's tokens and the answer's (a space, then one token per
/// digit).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub key: String,
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

/// Key `i` of a seed: a 5-digit number from the counter-based generator.
pub fn key(seed: u64, i: u64) -> String {
    let u = crate::init::uniform(seed, "passkey", i, 0);
    format!("{}", 10_000 + ((u * 90_000.0) as u64).min(89_999))
}

/// Tokens of text pieces that never merge with their neighbours: each piece encoded alone.
struct Pieces<'t> {
    tok: &'t Tokenizer,
}

impl Pieces<'_> {
    fn text(&self, s: &str) -> Result<Vec<u32>, String> {
        self.tok.encode(s).map_err(|e| e.0)
    }

    /// The key's digits, one token each.
    fn digits(&self, key: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        for c in key.chars() {
            let t = self.text(&c.to_string())?;
            if t.len() != 1 {
                return Err(format!("the tokenizer writes the digit {c} as {} tokens", t.len()));
            }
            out.extend(t);
        }
        Ok(out)
    }
}

/// The example of `key` hidden at `depth` (0: right after the introduction, 1: right before
/// the question) in as many fillers as keep prompt and answer within `length` tokens.
pub fn example(tok: &Tokenizer, length: usize, depth: f64, key: &str) -> Result<Example, String> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(format!("a depth is between 0 and 1, not {depth}"));
    }
    let p = Pieces { tok };
    let digits = p.digits(key)?;
    let needle = [
        p.text("The pass key is ")?,
        digits.clone(),
        p.text(". Remember it. ")?,
        digits.clone(),
        p.text(" is the pass key.\n")?,
    ]
    .concat();
    let (intro, filler, question, space) = (p.text(INTRO)?, p.text(FILLER)?, p.text(QUESTION)?, p.text(" ")?);
    let answer = [space, digits].concat();
    let fixed = intro.len() + needle.len() + question.len() + answer.len();
    if fixed + filler.len() > length {
        return Err(format!(
            "a passkey prompt needs more than {length} tokens with this tokenizer ({fixed} without filler)"
        ));
    }
    let n = (length - fixed) / filler.len();
    let before = (depth * n as f64).round() as usize;
    let mut prompt = intro;
    for i in 0..n {
        if i == before {
            prompt.extend(&needle);
        }
        prompt.extend(&filler);
    }
    if before == n {
        prompt.extend(&needle);
    }
    prompt.extend(question);
    Ok(Example { key: key.to_string(), prompt, answer })
}

/// `count` depths evenly from 0 to 1.
pub fn depths(count: usize) -> Vec<f64> {
    match count {
        0 => vec![],
        1 => vec![0.5],
        n => (0..n).map(|i| i as f64 / (n - 1) as f64).collect(),
    }
}

/// Tuning data: `count` examples of exactly `length` tokens each (prompts of `length` minus the
/// answer, keys from `seed`, depths drawn evenly), one after another with an end-of-text token
/// at the end, and the mask of the tokens whose prediction counts (the answer's).
pub fn tuning_stream(tok: &Tokenizer, length: usize, count: usize, seed: u64) -> Result<(Vec<u32>, Vec<bool>), String> {
    let mut tokens = Vec::with_capacity(count * length + 1);
    let mut mask = Vec::with_capacity(count * length + 1);
    for i in 0..count as u64 {
        let depth = crate::init::uniform(seed, "passkey-depth", i, 0);
        let e = example(tok, length, depth, &key(seed, i))?;
        // End-of-text tokens before the prompt make every example `length` tokens, so windows
        // align with examples.
        let pad = length - e.prompt.len() - e.answer.len();
        tokens.extend(std::iter::repeat_n(tok.eot(), pad));
        tokens.extend(&e.prompt);
        tokens.extend(&e.answer);
        mask.extend(std::iter::repeat_n(false, pad + e.prompt.len()));
        mask.extend(std::iter::repeat_n(true, e.answer.len()));
    }
    tokens.push(tok.eot());
    mask.push(false);
    Ok((tokens, mask))
}

/// What `weft eval passkey` and `weft-run eval passkey` are asked, as both take it.
#[derive(clap::Args, Clone, Debug)]
pub struct PasskeyFlags {
    /// Prompt lengths, comma-separated (`2k,8k`).
    #[arg(long, value_delimiter = ',', default_value = "512,2k,8k")]
    pub lengths: Vec<String>,
    /// Depths per length, evenly from the start of the filler (0) to its end (1).
    #[arg(long, default_value_t = 11, value_parser = clap::value_parser!(u64).range(1..=101))]
    pub depths: u64,
    /// Keys per depth (drawn with the evaluation seed, never a tuning key's).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub keys: u64,
    /// Write the heat map (accuracy per length and depth) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// Retrieval at one length and depth.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub length: usize,
    pub depth: f64,
    pub correct: usize,
    pub keys: usize,
}

impl PasskeyFlags {
    /// The lengths, parsed, and the longest.
    pub fn lengths(&self) -> Result<(Vec<usize>, usize), String> {
        let lengths =
            self.lengths.iter().map(|s| crate::eval::parse_length(s)).collect::<Result<Vec<usize>, String>>()?;
        let longest = *lengths.iter().max().ok_or("no lengths: give --lengths 2k,8k,...")?;
        Ok((lengths, longest))
    }

    /// Every (length, depth, key): the prompt, then as many tokens as the answer by greedy
    /// decoding, right when they are the answer's. Prints the table, writes the heat map
    /// (titled `title`) where asked.
    pub fn run(&self, backend: &mut dyn Backend, tokenizer: &Tokenizer, title: &str) -> Result<Vec<Cell>, String> {
        let (lengths, _) = self.lengths()?;
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
        let mut cells = Vec::new();
        for &length in &lengths {
            for depth in depths(self.depths as usize) {
                let mut correct = 0;
                for i in 0..self.keys {
                    let e = example(tokenizer, length, depth, &key(EVAL_SEED, i))?;
                    let got = generate(backend, &e.prompt, e.answer.len(), &greedy, None, |_| true)?;
                    correct += usize::from(got == e.answer);
                }
                cells.push(Cell { length, depth, correct, keys: self.keys as usize });
            }
        }
        print!("{}", table(&cells));
        if let Some(path) = &self.svg {
            std::fs::write(path, heat_map(&cells, title))
                .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
        }
        Ok(cells)
    }
}

/// Accuracy per length (rows) and depth (columns), and per length over all depths.
pub fn table(cells: &[Cell]) -> String {
    let mut lengths: Vec<usize> = cells.iter().map(|c| c.length).collect();
    lengths.dedup();
    let depths: Vec<f64> = cells.iter().filter(|c| c.length == lengths[0]).map(|c| c.depth).collect();
    let mut s = format!("{:>8}", "length");
    for d in &depths {
        s += &format!(" {:>5.2}", d);
    }
    s += "    all\n";
    for l in &lengths {
        let row: Vec<&Cell> = cells.iter().filter(|c| c.length == *l).collect();
        s += &format!("{l:>8}");
        for c in &row {
            s += &format!(" {:>5.2}", c.correct as f64 / c.keys as f64);
        }
        let (ok, n) = row.iter().fold((0, 0), |(a, b), c| (a + c.correct, b + c.keys));
        s += &format!(" {:>6.3}\n", ok as f64 / n as f64);
    }
    s
}

/// The accuracies as an SVG heat map: lengths down, depths across, green for retrieved.
pub fn heat_map(cells: &[Cell], title: &str) -> String {
    let mut lengths: Vec<usize> = cells.iter().map(|c| c.length).collect();
    lengths.dedup();
    let depths: Vec<f64> = cells.iter().filter(|c| c.length == lengths[0]).map(|c| c.depth).collect();
    let (cw, ch, left, top) = (36.0, 28.0, 80.0, 40.0);
    let (w, h) = (left + cw * depths.len() as f64 + 20.0, top + ch * lengths.len() as f64 + 50.0);
    let mut s = crate::svg::page(w, h, 11, title);
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">depth of the key in the prompt</text>\n",
        left + cw * depths.len() as f64 / 2.0,
        h - 8.0
    );
    for (r, l) in lengths.iter().enumerate() {
        let y = top + ch * r as f64;
        s += &format!("<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{l}</text>\n", left - 6.0, y + ch / 2.0 + 4.0);
        for (c, cell) in cells.iter().filter(|c| c.length == *l).enumerate() {
            let a = cell.correct as f64 / cell.keys as f64;
            // Red (0) to green (1).
            let (red, green) = ((220.0 * (1.0 - a)) as u8, (170.0 * a + 40.0) as u8);
            s += &format!(
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{cw}\" height=\"{ch}\" fill=\"rgb({red},{green},60)\" stroke=\"white\"/>\n",
                left + cw * c as f64
            );
        }
    }
    for (c, d) in depths.iter().enumerate() {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{d:.1}</text>\n",
            left + cw * c as f64 + cw / 2.0,
            top + ch * lengths.len() as f64 + 14.0
        );
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_five_digits_and_the_eval_seed_draws_others() {
        let a: Vec<String> = (0..50).map(|i| key(1, i)).collect();
        assert!(a.iter().all(|k| k.len() == KEY_DIGITS && k.chars().all(|c| c.is_ascii_digit())));
        let b: Vec<String> = (0..50).map(|i| key(EVAL_SEED, i)).collect();
        assert!(a.iter().filter(|k| b.contains(k)).count() < 3);
        assert_eq!(key(1, 7), key(1, 7));
    }

    #[test]
    fn the_prompt_hides_the_key_at_its_depth_with_one_token_per_digit() {
        let tok = Tokenizer::Bytes;
        for depth in [0.0, 0.5, 1.0] {
            let e = example(&tok, 2000, depth, "71432").unwrap();
            assert!(e.prompt.len() + e.answer.len() <= 2000);
            // Byte-level: every digit is one token.
            assert_eq!(tok.decode(&e.answer).unwrap(), " 71432");
            assert_eq!(e.answer.len(), 1 + KEY_DIGITS);
            let text = tok.decode(&e.prompt).unwrap();
            assert!(text.starts_with("There is an important info"));
            assert!(text.ends_with("What is the pass key? The pass key is"));
            let at = text.find("The pass key is 71432. Remember it. 71432 is the pass key.\n").unwrap();
            let fillers_before = text[..at].matches("The grass is green.").count();
            let fillers = text.matches("The grass is green.").count();
            assert_eq!(fillers_before, (depth * fillers as f64).round() as usize, "depth {depth}");
            // As many fillers as fit: one more would pass the length.
            assert!(e.prompt.len() + e.answer.len() + FILLER.len() > 2000);
        }
        assert!(example(&tok, 100, 0.5, "71432").is_err());
        assert!(example(&tok, 2000, 1.5, "71432").is_err());
    }

    #[test]
    fn tuning_examples_are_windows_whose_answer_alone_is_scored() {
        let tok = Tokenizer::Bytes;
        let (tokens, mask) = tuning_stream(&tok, 600, 3, 9).unwrap();
        assert_eq!((tokens.len(), mask.len()), (3 * 600 + 1, 3 * 600 + 1));
        for i in 0..3 {
            let w = &tokens[i * 600..(i + 1) * 600];
            let m = &mask[i * 600..(i + 1) * 600];
            assert_eq!(m.iter().filter(|&&x| x).count(), 1 + KEY_DIGITS);
            assert!(m[600 - 1 - KEY_DIGITS..].iter().all(|&x| x), "the answer ends the window");
            let text = tok.decode(w).unwrap();
            assert!(text.ends_with(&format!("The pass key is {}", key(9, i as u64))), "{text}");
        }
    }

    #[test]
    fn depths_span_the_prompt() {
        assert_eq!(depths(3), [0.0, 0.5, 1.0]);
        assert_eq!(depths(11).len(), 11);
        assert_eq!(depths(1), [0.5]);
    }
}
