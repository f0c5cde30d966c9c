//! Attention entropy and S6 selection entropy per layer (the paper's appendix C, reference
//! section 4.9), on the CPU reference in f64 from one forward pass of the `logits` plan over a
//! held-out window:
//! - H_a of an attention layer: the entropy of the attention weights of the last `l` query rows,
//!   averaged over rows and heads, `-1/(l h) Σ_heads Σ_{rows > n-l} Σ_keys A log A`, the weights
//!   recomputed from the layer's q and k (rotated by their positions, under its window);
//! - H_s of a Mamba layer: its Δ = softplus(δ + dt_bias), normalised over time per channel
//!   (`D'_ij = Δ_ij / Σ_i Δ_ij`), `-1/d_e Σ_j Σ_i D'_ij log D'_ij`.
//!
//! Both are at most `ln n` (uniform weights, or a Δ constant in time): lower means sharper.

use std::path::PathBuf;

use crate::cpu::exec::{run_observed, Store};
use crate::cpu::rope::RopeTable;
use crate::cpu::tensor::Tensor;
use crate::data::corpus;
use crate::data::tokenizer::Tokenizer;
use crate::op::{AttentionAttrs, Op};
use crate::plan::Program;

/// What `weft eval entropy` and `weft-run eval entropy` are asked, as both take it.
#[derive(clap::Args, Clone, Debug)]
pub struct EntropyFlags {
    /// Held-out text: files, or directories of .txt files (one document each).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Tokens per window (`2k` is 2048).
    #[arg(long, default_value = "2048")]
    pub length: String,
    /// Query rows at the end of each window whose attention entropy is taken.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub last: u64,
    /// Windows averaged (the first of the stream).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub windows: u64,
    /// Write the plot here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

impl EntropyFlags {
    /// Reads the held-out text, measures every layer on the CPU reference (f64), prints the
    /// table and writes the plot (titled `title`) where asked.
    pub fn run(
        &self,
        program: &Program,
        params: &std::collections::BTreeMap<String, Tensor<f32>>,
        tokenizer: &Tokenizer,
        title: &str,
    ) -> Result<Vec<LayerEntropy>, String> {
        let n = crate::eval::parse_length(&self.length)?;
        if self.last as usize > n {
            return Err(format!("--last {} is longer than the window of {n} tokens", self.last));
        }
        let files = corpus::text_files(&self.data).map_err(|e| e.0)?;
        let stream = corpus::pack(&corpus::read_documents(&files).map_err(|e| e.0)?, tokenizer).map_err(|e| e.0)?;
        let count = (stream.len() / n).min(self.windows as usize);
        if count == 0 {
            return Err(format!("the data holds {} tokens: too few for one window of {n}", stream.len()));
        }
        let windows: Vec<Vec<u32>> = (0..count).map(|w| stream[w * n..(w + 1) * n].to_vec()).collect();
        let rows = entropies(program, params, &windows, self.last as usize)?;
        if rows.is_empty() {
            return Err("the model has no attention or Mamba layer".into());
        }
        print!("{}", table(&rows, n, self.last as usize, count));
        if let Some(path) = &self.svg {
            std::fs::write(path, svg(&rows, title)).map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
        }
        Ok(rows)
    }
}

/// The rows as a text table, with each entropy's ceiling `ln n` (uniform weights).
pub fn table(rows: &[LayerEntropy], n: usize, last: usize, windows: usize) -> String {
    let mut s = format!(
        "{windows} windows of {n} tokens; attention over the last {last} rows (H_a), Mamba's Δ over the window (H_s); at most ln {n} = {:.4}\n{:>12} {:>6} {:>10}\n",
        (n as f64).ln(),
        "layer",
        "kind",
        "entropy"
    );
    for r in rows {
        let kind = if r.kind == "attention" { "H_a" } else { "H_s" };
        s += &format!("{:>12} {kind:>6} {:>10.4}\n", format!("{} {}", r.kind, r.index), r.entropy);
    }
    s
}

/// The rows as an SVG bar chart, one bar per layer in the order they run.
pub fn svg(rows: &[LayerEntropy], title: &str) -> String {
    let (w, h, left, bottom, top) = (80.0 + 40.0 * rows.len() as f64, 360.0, 60.0, 90.0, 40.0);
    let hi = rows.iter().map(|r| r.entropy).fold(1e-9, f64::max) * 1.1;
    let mut s = crate::svg::page(w, h, 12, title);
    s += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">entropy (nats)</text>\n",
        h - bottom,
        w - 10.0,
        h - bottom,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
    );
    for (i, r) in rows.iter().enumerate() {
        let x = left + 10.0 + 40.0 * i as f64;
        let bar = (h - bottom - top) * r.entropy / hi;
        let fill = if r.kind == "attention" { "steelblue" } else { "darkorange" };
        s += &format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"28\" height=\"{bar:.1}\" fill=\"{fill}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.2}</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" transform=\"rotate(-60 {:.1} {:.1})\">{} {}</text>\n",
            h - bottom - bar,
            x + 14.0,
            h - bottom - bar - 4.0,
            r.entropy,
            x + 14.0,
            h - bottom + 14.0,
            x + 14.0,
            h - bottom + 14.0,
            r.kind,
            r.index
        );
    }
    s + "</svg>\n"
}

/// One layer's entropy.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerEntropy {
    /// `attention` (H_a) or `mamba` (H_s), and the layer's place among those of its kind (from 1).
    pub kind: &'static str,
    pub index: usize,
    /// Mean over the windows, nats.
    pub entropy: f64,
}

/// H_a of one sequence of `n` tokens: `q` `[n, heads·head_dim]` and `k` `[n, kv_heads·head_dim]`
/// before RoPE, the last `last` query rows.
pub fn attention_entropy(a: &AttentionAttrs, q: &[f64], k: &[f64], n: usize, last: usize) -> f64 {
    let (h, g, hd) = (a.heads as usize, a.kv_heads as usize, a.head_dim as usize);
    let group = h / g.max(1);
    let rope = a.rope.map(|base| RopeTable::<f64>::new(base, hd, 0..n));
    let rotated = |x: &[f64], width: usize, heads: usize| -> Vec<f64> {
        let mut x = x.to_vec();
        if let Some(r) = &rope {
            for i in 0..n {
                for hh in 0..heads {
                    r.rotate(i, &mut x[i * width + hh * hd..i * width + (hh + 1) * hd]);
                }
            }
        }
        x
    };
    let (q, k) = (rotated(q, h * hd, h), rotated(k, g * hd, g));
    let scale = 1.0 / (hd as f64).sqrt();
    let last = last.clamp(1, n);
    let mut total = 0.0;
    for i in n - last..n {
        let first = a.window.map_or(0, |w| (i + 1).saturating_sub(w as usize));
        for hh in 0..h {
            let qi = &q[i * h * hd + hh * hd..i * h * hd + (hh + 1) * hd];
            let kv = hh / group;
            let scores: Vec<f64> = (first..=i)
                .map(|j| {
                    let kj = &k[j * g * hd + kv * hd..j * g * hd + (kv + 1) * hd];
                    scale * qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f64>()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            // -Σ p log p with p = e^(s-m)/z: log z - Σ p (s - m).
            let mean: f64 = scores.iter().map(|s| (s - m).exp() / z * (s - m)).sum();
            total += z.ln() - mean;
        }
    }
    total / (last * h) as f64
}

/// H_s of one sequence of `n` tokens: `delta` `[n, channels]` before the bias and softplus.
pub fn selection_entropy(delta: &[f64], dt_bias: &[f64], n: usize) -> f64 {
    let channels = dt_bias.len();
    let softplus = |x: f64| if x > 20.0 { x } else { x.exp().ln_1p() };
    let mut total = 0.0;
    for j in 0..channels {
        let d: Vec<f64> = (0..n).map(|i| softplus(delta[i * channels + j] + dt_bias[j])).collect();
        let sum: f64 = d.iter().sum();
        total -= d.iter().filter(|&&x| x > 0.0).map(|&x| x / sum * (x / sum).ln()).sum::<f64>();
    }
    total / channels as f64
}

/// Every attention and Mamba layer's entropy over the windows (each `[1, n]` tokens), in the
/// order the `logits` plan runs them.
pub fn entropies(
    program: &Program,
    params: &std::collections::BTreeMap<String, Tensor<f32>>,
    windows: &[Vec<u32>],
    last: usize,
) -> Result<Vec<LayerEntropy>, String> {
    let plan = program.plan("logits").map_err(|e| e.0)?;
    let mut store = Store::<f64> { tensors: params.iter().map(|(n, t)| (n.clone(), t.cast())).collect() };
    let mut sums: Vec<LayerEntropy> = Vec::new();
    for w in windows {
        let n = w.len();
        let tokens = Tensor::<f64>::ints(vec![1, n], w.iter().map(|&t| t as i32).collect());
        let mut found: Vec<LayerEntropy> = Vec::new();
        let (mut attn, mut mamba) = (0, 0);
        let mut observe = |i: usize, ins: &[&Tensor<f64>], _: &[Tensor<f64>]| match &plan.steps[i].op {
            Op::Attention(a) => {
                attn += 1;
                let (q, k) = (ins[0].reals().unwrap_or(&[]), ins[1].reals().unwrap_or(&[]));
                found.push(LayerEntropy {
                    kind: "attention",
                    index: attn,
                    entropy: attention_entropy(a, q, k, n, last),
                });
            }
            Op::SelectiveScan => {
                mamba += 1;
                let (d, b) = (ins[1].reals().unwrap_or(&[]), ins[6].reals().unwrap_or(&[]));
                found.push(LayerEntropy { kind: "mamba", index: mamba, entropy: selection_entropy(d, b, n) });
            }
            _ => {}
        };
        run_observed(plan, &mut store, vec![("tokens".into(), tokens)], &mut observe).map_err(|e| e.0)?;
        if sums.is_empty() {
            sums = found;
        } else {
            for (s, f) in sums.iter_mut().zip(found) {
                s.entropy += f.entropy;
            }
        }
    }
    for s in &mut sums {
        s.entropy /= windows.len().max(1) as f64;
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(window: Option<u64>, rope: Option<f64>) -> AttentionAttrs {
        AttentionAttrs { heads: 4, kv_heads: 2, head_dim: 8, window, rope, self_extend: None }
    }

    #[test]
    fn uniform_attention_has_the_log_of_the_keys_each_row_sees() {
        // q = 0: every visible key weighs the same, whatever RoPE does to k. A window of 5 over
        // 12 tokens: the last 4 rows see 5 keys each; the last 9 rows reach back to rows that
        // see fewer (row 3 sees 4).
        let (n, a) = (12, attrs(Some(5), Some(10000.0)));
        let q = vec![0.0; n * 4 * 8];
        let k: Vec<f64> = (0..n * 2 * 8).map(|i| (i as f64 * 0.37).sin()).collect();
        let h = attention_entropy(&a, &q, &k, n, 4);
        assert!((h - 5f64.ln()).abs() < 1e-12, "{h}");
        let h = attention_entropy(&a, &q, &k, n, 9);
        let want = (4f64.ln() + 8.0 * 5f64.ln()) / 9.0;
        assert!((h - want).abs() < 1e-12, "{h} against {want}");
        // Full attention: row i sees i + 1 keys.
        let h = attention_entropy(&attrs(None, None), &q, &k, n, 3);
        let want = (10f64.ln() + 11f64.ln() + 12f64.ln()) / 3.0;
        assert!((h - want).abs() < 1e-12, "{h} against {want}");
    }

    #[test]
    fn attention_on_one_key_has_the_entropy_of_its_two_point_weights() {
        // No RoPE, one head group: k_j = e_0 · s_j, q = e_0, so the last row's scores are
        // s_j/√8. Two keys (window 2) with scores 0 and ln 3 · √8 give weights 1/4 and 3/4.
        let a = AttentionAttrs { heads: 1, kv_heads: 1, head_dim: 8, window: Some(2), rope: None, self_extend: None };
        let n = 3;
        let mut q = vec![0.0; n * 8];
        let mut k = vec![0.0; n * 8];
        q[2 * 8] = 1.0;
        k[8] = 0.0;
        k[2 * 8] = 3f64.ln() * 8f64.sqrt();
        let h = attention_entropy(&a, &q, &k, n, 1);
        let want = -(0.25 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
        assert!((h - want).abs() < 1e-12, "{h} against {want}");
    }

    #[test]
    fn selection_entropy_is_the_entropy_of_delta_over_time() {
        // A Δ constant in time gives ln n; channel 1 puts softplus(x) = 1 on one token and
        // softplus(y) = 3 on the other (of two), entropy of (1/4, 3/4).
        let n = 2;
        let inv = |y: f64| y.exp_m1().ln();
        let delta = vec![0.3, inv(1.0), 0.3, inv(3.0)];
        let h = selection_entropy(&delta, &[0.0, 0.0], n);
        let want = (2f64.ln() - (0.25 * 0.25f64.ln() + 0.75 * 0.75f64.ln())) / 2.0;
        assert!((h - want).abs() < 1e-12, "{h} against {want}");
        // The bias is added before the softplus.
        let h = selection_entropy(&[1.0, 2.0, 1.0, 2.0], &[-1.0, -2.0], n);
        assert!((h - 2f64.ln()).abs() < 1e-12, "{h}");
    }
}
