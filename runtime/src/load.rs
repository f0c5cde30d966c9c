//! A load generator for a completions server (weft's or any OpenAI-compatible one with vLLM's
//! `ignore_eos`): N clients, each streaming one request after another, with prompt and output
//! lengths drawn from stated ranges. Prompts are random token ids, so the server's tokenizer
//! plays no part and every request asks for exactly its output length. It reports what
//! `vllm bench serve` reports, by the same names: output tokens/s, time to first token (TTFT),
//! time per output token after the first (TPOT), the gaps between streamed chunks (ITL) and
//! whole-request latency (E2EL), as mean, median and p99, and every error.

use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A length: `N`, or `LO:HI` drawn uniformly (both ends included).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lengths {
    pub lo: usize,
    pub hi: usize,
}

impl std::str::FromStr for Lengths {
    type Err = String;
    fn from_str(s: &str) -> Result<Lengths, String> {
        let num = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("`{s}` is not a length (N or LO:HI)"));
        let (lo, hi) = match s.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if lo == 0 || lo > hi {
            return Err(format!("`{s}`: lengths must be at least 1, and LO at most HI"));
        }
        Ok(Lengths { lo, hi })
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct LoadFlags {
    /// The server's address.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Clients streaming at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub clients: u64,
    /// Requests in all (default: 4 per client).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Prompt tokens per request: N, or LO:HI drawn uniformly.
    #[arg(long, default_value = "512")]
    pub prompt_tokens: Lengths,
    /// New tokens per request (the server is asked to ignore end-of-text): N or LO:HI.
    #[arg(long, default_value = "256")]
    pub output_tokens: Lengths,
    /// Seeds the drawn lengths and prompt tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Once every client is streaming, send one more request with a prompt this long (its
    /// effect on the others' inter-token latency is the point; it is reported apart).
    #[arg(long)]
    pub long_prompt: Option<usize>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Each finished request: its prompt length and timings, or why it failed.
type Results = Arc<Mutex<Vec<Result<(usize, Sample), String>>>>;

/// One request's timings.
#[derive(Clone, Debug, Default)]
struct Sample {
    ttft: f64,
    e2e: f64,
    /// Gaps between chunks that carried text.
    itl: Vec<f64>,
    output_tokens: usize,
}

/// What a load run measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub clients: usize,
    pub requests: usize,
    pub errors: Vec<String>,
    pub seconds: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// (mean, p50, p99) in milliseconds.
    pub ttft_ms: (f64, f64, f64),
    pub tpot_ms: (f64, f64, f64),
    pub itl_ms: (f64, f64, f64),
    pub e2el_ms: (f64, f64, f64),
    /// The long prompt's time to first token and end-to-end latency, when one was sent.
    pub long_prompt_ms: Option<(f64, f64)>,
}

impl Report {
    pub fn output_tokens_per_s(&self) -> f64 {
        self.output_tokens as f64 / self.seconds
    }

    pub fn to_json(&self) -> Value {
        let stat = |s: (f64, f64, f64)| json!({ "mean": s.0, "p50": s.1, "p99": s.2 });
        json!({
            "clients": self.clients, "requests": self.requests, "errors": self.errors.len(),
            "error_messages": self.errors, "duration_s": self.seconds,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "request_throughput": self.requests as f64 / self.seconds,
            "output_throughput": self.output_tokens_per_s(),
            "ttft_ms": stat(self.ttft_ms), "tpot_ms": stat(self.tpot_ms), "itl_ms": stat(self.itl_ms),
            "e2el_ms": stat(self.e2el_ms),
            "long_prompt": self.long_prompt_ms.map(|(t, e)| json!({ "ttft_ms": t, "e2el_ms": e })),
        })
    }

    pub fn to_text(&self) -> String {
        let row = |name: &str, s: (f64, f64, f64)| {
            format!("{name:<6} mean {:9.2}  p50 {:9.2}  p99 {:9.2} ms\n", s.0, s.1, s.2)
        };
        let mut t = format!(
            "{} clients, {} requests ({} failed) in {:.2} s: {:.1} requests/s, {:.0} output tokens/s ({} prompt, {} output tokens)\n",
            self.clients,
            self.requests,
            self.errors.len(),
            self.seconds,
            self.requests as f64 / self.seconds,
            self.output_tokens_per_s(),
            self.prompt_tokens,
            self.output_tokens
        );
        t += &row("TTFT", self.ttft_ms);
        t += &row("TPOT", self.tpot_ms);
        t += &row("ITL", self.itl_ms);
        t += &row("E2EL", self.e2el_ms);
        if let Some((ttft, e2e)) = self.long_prompt_ms {
            t += &format!("long prompt: TTFT {ttft:.2} ms, E2EL {e2e:.2} ms\n");
        }
        for e in self.errors.iter().take(5) {
            t += &format!("error: {e}\n");
        }
        t
    }
}

/// (mean, p50, p99) of `xs` in milliseconds (nearest rank); zeros for none.
fn stats(xs: &mut [f64]) -> (f64, f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1] * 1e3;
    (xs.iter().sum::<f64>() / xs.len() as f64 * 1e3, at(0.5), at(0.99))
}

/// splitmix64: the draws of lengths and prompt tokens.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn draw(l: Lengths, seed: u64) -> usize {
    l.lo + (mix(seed) % (l.hi - l.lo + 1) as u64) as usize
}

/// `http://host:port` -> (host, port).
fn authority(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("`{url}`: only http:// addresses are supported"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("`{url}`: the port is not a number"))?),
        None => (rest, 80),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("`{url}`: give the server as http://HOST:PORT"));
    }
    Ok((host.to_string(), port))
}

/// One HTTP/1.1 request on a fresh connection; the response's status and body, read as it
/// arrives through `on_bytes`.
async fn request(
    addr: &(String, u16),
    method: &str,
    path: &str,
    body: Option<Value>,
    mut on_bytes: impl FnMut(&[u8]),
) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect((addr.0.as_str(), addr.1))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", addr.0, addr.1))?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("{}:{}", addr.0, addr.1))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(bytes)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| format!("{method} {path}: {e}"))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{method} {path}: the response broke off: {e}"))?;
        if let Some(data) = frame.data_ref() {
            on_bytes(data);
        }
    }
    Ok(status)
}

async fn get_json(addr: &(String, u16), path: &str) -> Result<Value, String> {
    let mut body = Vec::new();
    let status = request(addr, "GET", path, None, |b| body.extend_from_slice(b)).await?;
    if status != 200 {
        return Err(format!("GET {path}: status {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))
}

/// Streams one completion; its timings.
async fn stream_one(addr: &(String, u16), model: &str, prompt: Vec<u32>, max_tokens: usize) -> Result<Sample, String> {
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": { "include_usage": true },
    });
    let start = Instant::now();
    let mut s = Sample::default();
    let mut last: Option<Instant> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut error: Option<String> = None;
    let mut done = false;
    let mut raw = Vec::new();
    let status = request(addr, "POST", "/v1/completions", Some(body), |bytes| {
        if raw.len() < 4096 {
            raw.extend_from_slice(&bytes[..bytes.len().min(4096 - raw.len())]);
        }
        buf.extend_from_slice(bytes);
        // Each event ends with a blank line.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for data in text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    error.get_or_insert(format!("a chunk is not JSON: {data}"));
                    continue;
                };
                if let Some(e) = v.get("error") {
                    error.get_or_insert(format!("the stream reported an error: {e}"));
                }
                let has_text = v["choices"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["text"].as_str().is_some_and(|t| !t.is_empty())));
                if has_text {
                    let now = Instant::now();
                    match last {
                        None => s.ttft = (now - start).as_secs_f64(),
                        Some(l) => s.itl.push((now - l).as_secs_f64()),
                    }
                    last = Some(now);
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    s.output_tokens = n as usize;
                }
            }
        }
    })
    .await?;
    if status != 200 {
        return Err(format!("status {status}: {}", String::from_utf8_lossy(&raw).trim()));
    }
    if let Some(e) = error {
        return Err(e);
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    if s.output_tokens != max_tokens {
        return Err(format!("asked for {max_tokens} tokens (ignoring end-of-text), got {}", s.output_tokens));
    }
    s.e2e = start.elapsed().as_secs_f64();
    Ok(s)
}

/// Runs the load and prints the report (as JSON with `--json`); whether no request failed.
pub fn run_and_report(f: &LoadFlags) -> Result<bool, String> {
    let r = run(f)?;
    if f.json {
        println!("{}", r.to_json());
    } else {
        print!("{}", r.to_text());
    }
    Ok(r.errors.is_empty())
}

/// Runs the load; fails only when the server cannot be asked what it serves.
pub fn run(f: &LoadFlags) -> Result<Report, String> {
    let addr = authority(&f.url)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the load generator's runtime: {e}"))?;
    rt.block_on(run_async(f.clone(), addr))
}

async fn run_async(f: LoadFlags, addr: (String, u16)) -> Result<Report, String> {
    let models = get_json(&addr, "/v1/models").await?;
    let model = models["data"][0]["id"].as_str().ok_or("/v1/models lists no model")?.to_string();
    let info = get_json(&addr, "/tokenizer_info").await.unwrap_or(Value::Null);
    // Token ids below the vocabulary; 256 (the byte tokenizer's size) where it is not said.
    let vocab = info["vocab_size"].as_u64().unwrap_or(256).max(1);
    let clients = f.clients as usize;
    let total = f.requests.map_or(4 * clients, |r| r as usize);
    let prompt = move |i: usize, len: usize| -> Vec<u32> {
        (0..len).map(|j| (mix(f.seed ^ mix(i as u64) ^ (j as u64).rotate_left(32)) % vocab) as u32).collect()
    };
    let next = Arc::new(AtomicUsize::new(0));
    let streaming = Arc::new(AtomicUsize::new(0));
    let results: Results = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, streaming, results, addr, model) =
            (next.clone(), streaming.clone(), results.clone(), addr.clone(), model.clone());
        let (pl, ol, seed) = (f.prompt_tokens, f.output_tokens, f.seed);
        tasks.push(tokio::spawn(async move {
            let mut counted = false;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let plen = draw(pl, seed ^ mix(2 * i as u64));
                let olen = draw(ol, seed ^ mix(2 * i as u64 + 1));
                let r = stream_one(&addr, &model, prompt(i, plen), olen).await.map(|s| (plen, s));
                if !counted {
                    counted = true;
                    streaming.fetch_add(1, Ordering::SeqCst);
                }
                results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            }
        }));
    }
    let long = match f.long_prompt {
        Some(n) => {
            let (addr, model, streaming) = (addr.clone(), model.clone(), streaming.clone());
            Some(tokio::spawn(async move {
                // Once every client has had its first answer, or a minute has passed.
                let waited = Instant::now();
                while streaming.load(Ordering::SeqCst) < clients && waited.elapsed() < Duration::from_secs(60) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                stream_one(&addr, &model, prompt(usize::MAX, n), 16).await
            }))
        }
        None => None,
    };
    for t in tasks {
        t.await.map_err(|e| format!("a client failed: {e}"))?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let long_prompt_ms = match long {
        Some(t) => match t.await.map_err(|e| e.to_string())? {
            Ok(s) => Some((s.ttft * 1e3, s.e2e * 1e3)),
            Err(e) => {
                results.lock().unwrap_or_else(|e| e.into_inner()).push(Err(format!("the long prompt: {e}")));
                None
            }
        },
        None => None,
    };
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    let (mut ttft, mut tpot, mut itl, mut e2el) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut errors, mut prompt_tokens, mut output_tokens) = (Vec::new(), 0, 0);
    for r in results {
        match r {
            Ok((plen, s)) => {
                prompt_tokens += plen;
                output_tokens += s.output_tokens;
                ttft.push(s.ttft);
                if s.output_tokens > 1 {
                    tpot.push((s.e2e - s.ttft) / (s.output_tokens - 1) as f64);
                }
                itl.extend(s.itl);
                e2el.push(s.e2e);
            }
            Err(e) => errors.push(e),
        }
    }
    Ok(Report {
        clients,
        requests: total,
        errors,
        seconds,
        prompt_tokens,
        output_tokens,
        ttft_ms: stats(&mut ttft),
        tpot_ms: stats(&mut tpot),
        itl_ms: stats(&mut itl),
        e2el_ms: stats(&mut e2el),
        long_prompt_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_and_refuse() {
        assert_eq!("512".parse::<Lengths>(), Ok(Lengths { lo: 512, hi: 512 }));
        assert_eq!("100:300".parse::<Lengths>(), Ok(Lengths { lo: 100, hi: 300 }));
        assert!("0".parse::<Lengths>().is_err());
        assert!("300:100".parse::<Lengths>().is_err());
        assert!("ten".parse::<Lengths>().unwrap_err().contains("ten"));
        let l = Lengths { lo: 3, hi: 5 };
        let seen: std::collections::BTreeSet<usize> = (0..200).map(|s| draw(l, s)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut xs: Vec<f64> = (1..=200).map(|i| i as f64 / 1e3).collect();
        let (mean, p50, p99) = stats(&mut xs);
        assert!((mean - 100.5).abs() < 1e-9 && (p50 - 100.0).abs() < 1e-9 && (p99 - 198.0).abs() < 1e-9);
        assert_eq!(stats(&mut []), (0.0, 0.0, 0.0));
    }

    #[test]
    fn addresses_are_http_host_port() {
        assert_eq!(authority("http://127.0.0.1:8000/"), Ok(("127.0.0.1".to_string(), 8000)));
        assert_eq!(authority("http://localhost"), Ok(("localhost".to_string(), 80)));
        assert!(authority("https://x:1").unwrap_err().contains("http://"));
        assert!(authority("http://x:port").is_err());
    }
}
