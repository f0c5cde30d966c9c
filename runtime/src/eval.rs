//! Perplexity against context length (the paper's Table 3 and its length-extrapolation
//! figure): held-out documents joined by the end-of-text token into one stream
//! (`data::corpus::pack`), cut into windows of each length. Each window is scored from an
//! empty state a chunk at a time where the backend has the `chunk_score` plan (the CPU
//! reference, and the GPU with a bundle's `chunk_score` plan), so memory stays flat with the
//! length for recurrent and sliding-window layers; elsewhere in one pass of the `score` plan,
//! whose activations grow with the length.

use std::path::PathBuf;

use crate::backend::Backend;
use crate::cpu::tensor::Tensor;
use crate::data::corpus;
use crate::data::tokenizer::Tokenizer;

/// What `weft eval ppl` and `weft-run eval ppl` are asked, as both take it.
#[derive(clap::Args, Clone, Debug)]
pub struct PplFlags {
    /// Held-out text: files, or directories of .txt files (one document each).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Context lengths, comma-separated (`512,2k,8k,32k`).
    #[arg(long, value_delimiter = ',', default_value = "512,2k,8k,32k")]
    pub lengths: Vec<String>,
    /// At most this many windows at the longest length (the first of the stream); each
    /// shorter length scores the same tokens, in more windows.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub windows: u64,
    /// Tokens scored per call, where the backend scores in chunks.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub chunk: u64,
    /// Write the plot here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Self-Extend on full-attention layers: the neighbour window and the group size (`W,G`,
    /// e.g. `128,8`); each window then scored whole on the CPU reference.
    #[arg(long, value_name = "W,G")]
    pub self_extend: Option<String>,
}

impl PplFlags {
    /// The Self-Extend settings asked for, if any.
    pub fn self_extend(&self) -> Result<Option<crate::op::SelfExtend>, String> {
        self.self_extend.as_deref().map(crate::op::SelfExtend::parse).transpose()
    }

    /// The lengths, parsed, and the longest.
    pub fn lengths(&self) -> Result<(Vec<usize>, usize), String> {
        let lengths = self.lengths.iter().map(|s| parse_length(s)).collect::<Result<Vec<usize>, String>>()?;
        let longest = *lengths.iter().max().ok_or("no lengths: give --lengths 512,2k,...")?;
        Ok((lengths, longest))
    }

    /// Reads the held-out documents and evaluates every length; prints the table and writes
    /// the plot (titled `title`) where asked.
    pub fn run(
        &self,
        backend: &mut dyn Backend,
        tokenizer: &Tokenizer,
        title: &str,
    ) -> Result<Vec<Perplexity>, String> {
        let (lengths, longest) = self.lengths()?;
        let files = corpus::text_files(&self.data).map_err(|e| e.0)?;
        let docs = corpus::read_documents(&files).map_err(|e| e.0)?;
        let stream = corpus::pack(&docs, tokenizer).map_err(|e| e.0)?;
        // Every length scores the same text: as many windows as cover `windows` of the longest.
        let budget = self.windows as usize * longest;
        let rows = lengths
            .iter()
            .map(|&l| perplexity(backend, &stream, l, budget / l, self.chunk as usize, self.self_extend.is_some()))
            .collect::<Result<Vec<_>, String>>()?;
        print!("{}", table(&rows));
        if let Some(path) = &self.svg {
            std::fs::write(path, svg(&rows, title)).map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
        }
        Ok(rows)
    }
}

/// Perplexity at one length.
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    pub length: usize,
    pub windows: usize,
    /// Mean negative log-likelihood per token, nats.
    pub nll: f64,
    pub ppl: f64,
    /// The 95% interval of the perplexity over windows (normal approximation on the windows'
    /// mean log-likelihoods); None with one window.
    pub interval: Option<(f64, f64)>,
}

/// A length as written on command lines: `512`, `2k` (2048), `1m` (2^20).
pub fn parse_length(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, scale) = match t.strip_suffix('k') {
        Some(d) => (d, 1 << 10),
        None => match t.strip_suffix('m') {
            Some(d) => (d, 1 << 20),
            None => (t.as_str(), 1),
        },
    };
    match digits.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n * scale),
        _ => Err(format!("`{s}` is not a length (a positive number, optionally with k or m)")),
    }
}

/// Perplexity of `stream` at `length`: its first `max_windows` windows of `length` + 1 tokens
/// (each scores `length` next tokens), each from an empty state, `chunk` tokens per call (or
/// each window in one call of the `score` plan with `whole`).
pub fn perplexity(
    backend: &mut dyn Backend,
    stream: &[u32],
    length: usize,
    max_windows: usize,
    chunk: usize,
    whole: bool,
) -> Result<Perplexity, String> {
    let chunked = backend.runs("chunk_score") && !whole;
    if !chunked && !backend.runs("score") {
        return Err(format!("the {} backend has neither a `chunk_score` nor a `score` plan", backend.name()));
    }
    if length == 0 || chunk == 0 {
        return Err("the length and the chunk must be at least one token".into());
    }
    let windows = (stream.len().saturating_sub(1) / length).min(max_windows);
    if windows == 0 {
        return Err(format!("the data holds {} tokens: too few for one window of {length}", stream.len()));
    }
    // Tokens and targets padded to `to` tokens (id 0 without a target: a log-probability of 0,
    // after every real token, so read by none of them), for backends that run a scoring plan
    // at exactly its planned length.
    let padded = |v: &[u32], to: usize, fill: i32| {
        let mut ids: Vec<i32> = v.iter().map(|&t| t as i32).collect();
        ids.resize(to.max(v.len()), fill);
        Tensor::ints(vec![1, ids.len()], ids)
    };
    let logprob_sum = |out: &std::collections::BTreeMap<String, Tensor<f32>>, plan: &str| -> Result<f64, String> {
        let lp = out.get("logprobs").and_then(|t| t.reals()).ok_or(format!("the {plan} plan gave no logprobs"))?;
        Ok(lp.iter().map(|&x| x as f64).sum())
    };
    let mut per_window = Vec::with_capacity(windows);
    if !chunked {
        for w in 0..windows {
            let span = &stream[w * length..w * length + length + 1];
            let to = backend.plan_shape("score").map_or(length, |(_, t)| t);
            if to < length {
                return Err(format!("the {} backend scores windows of at most {to} tokens", backend.name()));
            }
            let inputs =
                vec![("tokens".into(), padded(&span[..length], to, 0)), ("targets".into(), padded(&span[1..], to, -1))];
            let out = backend.run("score", inputs)?;
            per_window.push(-logprob_sum(&out, "score")? / length as f64);
        }
        return Ok(summary(length, &per_window));
    }
    let plan = backend.program().plan("chunk_score").map_err(|e| e.0)?.clone();
    let zeros = crate::generate::zero_states(&plan, 1);
    let has_pos = plan.input_type("pos").is_some();
    // A backend that runs the plan at exactly its planned chunk scores chunks of that size.
    let (chunk, exact) = match backend.plan_shape("chunk_score") {
        Some((_, t)) => (t, true),
        None => (chunk, false),
    };
    for w in 0..windows {
        let span = &stream[w * length..w * length + length + 1];
        let mut states = zeros.clone();
        let (mut sum, mut start) = (0.0f64, 0);
        while start < length {
            let n = chunk.min(length - start);
            let mut inputs = std::mem::take(&mut states);
            let to = if exact { chunk } else { n };
            inputs.push(("tokens".into(), padded(&span[start..start + n], to, 0)));
            inputs.push(("targets".into(), padded(&span[start + 1..start + n + 1], to, -1)));
            if has_pos {
                inputs.push(("pos".into(), Tensor::ints(vec![1], vec![start as i32])));
            }
            let mut out = backend.run("chunk_score", inputs)?;
            sum -= logprob_sum(&out, "chunk_score")?;
            states = zeros
                .iter()
                .map(|(n, _)| out.remove(n).map(|t| (n.clone(), t)))
                .collect::<Option<_>>()
                .ok_or("the chunk_score plan did not give back every state it takes")?;
            start += n;
        }
        per_window.push(sum / length as f64);
    }
    Ok(summary(length, &per_window))
}

/// The mean over windows of their mean negative log-likelihoods, and its 95% interval.
fn summary(length: usize, per_window: &[f64]) -> Perplexity {
    let n = per_window.len() as f64;
    let nll = per_window.iter().sum::<f64>() / n;
    let interval = (per_window.len() > 1).then(|| {
        let var = per_window.iter().map(|x| (x - nll).powi(2)).sum::<f64>() / (n - 1.0);
        let half = 1.96 * (var / n).sqrt();
        ((nll - half).exp(), (nll + half).exp())
    });
    Perplexity { length, windows: per_window.len(), nll, ppl: nll.exp(), interval }
}

/// The rows as a text table.
pub fn table(rows: &[Perplexity]) -> String {
    let mut s = format!("{:>9} {:>8} {:>10} {:>12}  95% interval\n", "length", "windows", "nll/token", "perplexity");
    for r in rows {
        let interval = r.interval.map_or("-".to_string(), |(lo, hi)| format!("{lo:.3} .. {hi:.3}"));
        s += &format!("{:>9} {:>8} {:>10.4} {:>12.3}  {interval}\n", r.length, r.windows, r.nll, r.ppl);
    }
    s
}

/// The rows as an SVG plot: perplexity (log scale) against length (log scale), with the
/// intervals as bars.
pub fn svg(rows: &[Perplexity], title: &str) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 400.0, 70.0, 20.0, 40.0, 50.0);
    let xs: Vec<f64> = rows.iter().map(|r| (r.length as f64).log2()).collect();
    let ys: Vec<f64> = rows
        .iter()
        .flat_map(|r| {
            let (lo, hi) = r.interval.unwrap_or((r.ppl, r.ppl));
            [lo.max(1e-9).ln(), hi.max(1e-9).ln()]
        })
        .collect();
    let span = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        if hi - lo < 1e-9 {
            (lo - 0.5, hi + 0.5)
        } else {
            (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        }
    };
    let ((x0, x1), (y0, y1)) = (span(&xs), span(&ys));
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| top + (y1 - y) / (y1 - y0) * (h - top - bottom);
    let mut s = crate::svg::page(w, h, 12, title);
    s += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">context length (tokens)</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">perplexity</text>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        (left + w - right) / 2.0,
        h - 12.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
    );
    for (r, &x) in rows.iter().zip(&xs) {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            px(x),
            h - bottom + 16.0,
            r.length
        );
        s += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.2}</text>\n",
            left - 6.0,
            py(r.ppl.ln()) + 4.0,
            r.ppl
        );
        if let Some((lo, hi)) = r.interval {
            s += &format!(
                "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"steelblue\"/>\n",
                px(x),
                py(lo.ln()),
                py(hi.ln())
            );
        }
    }
    let points: Vec<String> =
        rows.iter().zip(&xs).map(|(r, &x)| format!("{:.1},{:.1}", px(x), py(r.ppl.ln()))).collect();
    s +=
        &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\"/>\n", points.join(" "));
    for p in &points {
        let (x, y) = p.split_once(',').expect("formatted above");
        s += &format!("<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"steelblue\"/>\n");
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_with_their_suffixes_and_bad_ones_are_refused() {
        assert_eq!(parse_length("512"), Ok(512));
        assert_eq!(parse_length("2k"), Ok(2048));
        assert_eq!(parse_length("32K"), Ok(32768));
        assert_eq!(parse_length("1m"), Ok(1 << 20));
        for bad in ["", "0", "k", "-3", "2x", "1.5k"] {
            assert!(parse_length(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_plot_places_each_length_and_interval() {
        let rows = [
            Perplexity { length: 512, windows: 8, nll: 2.0, ppl: 2f64.exp(), interval: Some((7.0, 8.0)) },
            Perplexity { length: 2048, windows: 8, nll: 2.5, ppl: 2.5f64.exp(), interval: Some((11.0, 13.5)) },
        ];
        let s = svg(&rows, "a <model>");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("a &lt;model&gt;"));
        assert_eq!(s.matches("<circle").count(), 2);
        assert_eq!(s.matches("stroke=\"steelblue\"/>").count(), 2, "one bar per interval");
        assert!(s.contains(">512<") && s.contains(">2048<"));
        let t = table(&rows);
        assert!(t.contains("7.389") && t.contains("7.000 .. 8.000"), "{t}");
    }
}
