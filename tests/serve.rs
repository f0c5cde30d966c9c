//! `weft serve` over real HTTP on a loopback port, on the CPU reference.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn weft(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(args).current_dir(crate::root()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// One HTTP/1.1 exchange; the status and the body (a chunked body joined).
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before it has read all of a large body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, mut rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return (status, rest.to_string());
    }
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    (status, out)
}

/// A completion request; the status and the JSON answer.
fn ask_at(addr: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = http(addr, "POST", "/v1/completions", body.to_string().as_bytes());
    (status, json(&text))
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(run: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["serve", "--run", run, "--backend", "cpu", "--port", "0"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the server printed its address").unwrap();
        if let Some(a) = line.strip_prefix("listening on http://") {
            break a.to_string();
        }
    };
    Server { child, addr }
}

/// Greedy completions over HTTP, plain and streamed and several at once, give `weft
/// generate`'s text; every bad request gets a 4xx with an OpenAI-style error while the server
/// stays up; `/metrics` shows no live slot afterwards.
#[test]
fn the_server_completes_as_generate_does_and_refuses_bad_requests() {
    let d = std::env::temp_dir().join(format!("weft-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    // A context of 100,032 tokens: room for a request that holds its slot for minutes.
    std::fs::create_dir_all(&d).unwrap();
    let cfg = crate::tiny_run_config(&d, 2, 100_000);
    let (code, _, err) = weft(&["train", "--no-progress", "--backend", "cpu", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let run = d.join("run");
    let run = run.to_str().unwrap();
    let alone = |prompt: &str, n: &str| {
        let (code, out, err) = weft(&[
            "generate",
            "--run",
            run,
            "--backend",
            "cpu",
            "--prompt",
            prompt,
            "--max-new-tokens",
            n,
            "--temperature",
            "0",
        ]);
        assert_eq!(code, 0, "{err}");
        out.strip_prefix(prompt).unwrap().strip_suffix('\n').unwrap().to_string()
    };
    // Prompts of more than two tokens are prefilled two at a time, between decode steps.
    let server = start(run, &["--slots", "2", "--prefill-chunk", "2"]);
    let a = server.addr.as_str();
    assert_eq!(http(a, "GET", "/health", b"").0, 200);
    let models = json(&http(a, "GET", "/v1/models", b"").1);
    assert_eq!(models["data"][0]["id"], "samba-micro");

    let ask = |body: &str| {
        let (status, text) = http(a, "POST", "/v1/completions", body.as_bytes());
        assert_eq!(status, 200, "{text}");
        json(&text)
    };
    let want = alone("the whale", "6");
    let r = ask(r#"{"prompt": "the whale", "max_tokens": 6, "temperature": 0}"#);
    assert_eq!(r["choices"][0]["text"], want.as_str());
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 6);
    // Streamed: the pieces make the same text, the last chunk says why it ended, then [DONE].
    let (status, body) = http(
        a,
        "POST",
        "/v1/completions",
        br#"{"prompt": "the whale", "max_tokens": 6, "temperature": 0, "stream": true}"#,
    );
    assert_eq!(status, 200);
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1].iter().map(|c| json(c)).collect();
    let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, want);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    // Several prompts in one request and several requests at once, through two slots.
    let r = ask(r#"{"prompt": ["the sea", "whale and"], "max_tokens": 5, "temperature": 0}"#);
    assert_eq!(r["choices"][0]["text"], alone("the sea", "5").as_str());
    assert_eq!(r["choices"][1]["text"], alone("whale and", "5").as_str());
    let prompts = ["a whale", "the sea and the", "sea"];
    let texts: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let body = format!(r#"{{"prompt": "{p}", "max_tokens": 7, "temperature": 0}}"#);
                    let (status, text) = http(a, "POST", "/v1/completions", body.as_bytes());
                    assert_eq!(status, 200, "{text}");
                    json(&text)["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (p, t) in prompts.iter().zip(&texts) {
        assert_eq!(t, &alone(p, "7"), "{p}");
    }
    // A stop string (the end of that text) ends the text where it first appears.
    let stop = &want[want.char_indices().nth(2).map_or(want.len(), |c| c.0)..];
    if !stop.is_empty() {
        let cut = &want[..want.find(stop).unwrap()];
        let body = serde_json::json!({ "prompt": "the whale", "max_tokens": 6, "temperature": 0, "stop": stop });
        let r = ask(&body.to_string());
        assert_eq!(r["choices"][0]["text"], cut, "{want:?} stop {stop:?}: {r}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }

    // Bad requests: each a 4xx with a message, the server still up.
    let refused = |path: &str, body: &[u8], status: u16, says: &str| {
        let (got, text) = http(a, "POST", path, body);
        assert_eq!(got, status, "{text}");
        let e = json(&text);
        let m = e["error"]["message"].as_str().unwrap_or_else(|| panic!("no message: {text}"));
        assert!(m.contains(says), "{m}");
    };
    refused("/v1/completions", b"{\"prompt\": ", 400, "not valid JSON");
    refused("/v1/completions", b"[1, 2]", 400, "JSON object");
    refused("/v1/completions", br#"{"prompt": "x", "bogus": 1}"#, 400, "unknown field `bogus`");
    refused("/v1/completions", br#"{"prompt": "x", "max_tokens": "many"}"#, 400, "`max_tokens` must be an integer");
    refused("/v1/completions", br#"{"prompt": "x", "max_tokens": 1000000}"#, 400, "context");
    refused("/v1/completions", br#"{"prompt": ""}"#, 400, "empty");
    refused("/v1/completions", br#"{"prompt": [1, 5000]}"#, 400, "token id 5000");
    refused("/v1/completions", br#"{"prompt": "x", "n": 2}"#, 400, "`n` must be 1");
    refused("/v1/completions", br#"{"prompt": "x", "top_p": 0}"#, 400, "top-p");
    refused("/v1/completions", br#"{"prompt": "x", "logprobs": 99}"#, 400, "`logprobs`");
    refused("/v1/completions", b"{\"prompt\": \"\xff\xfe\"}", 400, "not valid JSON");
    refused("/v1/completions", &vec![b' '; 9 << 20], 413, "");
    assert_eq!(http(a, "GET", "/nowhere", b"").0, 404);
    // Token routes.
    let ids = json(&http(a, "POST", "/tokenize", br#"{"prompt": "the whale"}"#).1);
    let back = serde_json::json!({ "tokens": ids["tokens"] }).to_string();
    assert_eq!(json(&http(a, "POST", "/detokenize", back.as_bytes()).1)["prompt"], "the whale");
    // Still up, and the metrics parse as Prometheus text. The sequence a stop string cut is
    // freed at the engine's next step, after its response: nothing is live soon after.
    let metrics = || {
        let (status, text) = http(a, "GET", "/metrics", b"");
        assert_eq!(status, 200);
        let mut seen = std::collections::BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (name, value) = line.split_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            seen.insert(name.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("not a number: {line}")));
        }
        seen
    };
    let mut seen = metrics();
    for _ in 0..100 {
        if seen["weft_live_slots"] == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        seen = metrics();
    }
    assert_eq!(seen["weft_live_slots"], 0.0);
    assert_eq!(seen["weft_queue_depth"], 0.0);
    assert!(seen["weft_generation_tokens_total"] >= 6.0 * 2.0 + 5.0 * 2.0 + 7.0 * 3.0);
    drop(server);

    // One slot and no queue: while a long streamed request holds the slot (100,000 tokens,
    // minutes of decoding), another gets 429; once its client goes away the engine frees the
    // slot within a step, and the next request is served.
    let server = start(run, &["--slots", "1", "--queue", "0"]);
    let a = server.addr.as_str();
    let mut long = TcpStream::connect(a).unwrap();
    let body = r#"{"prompt": "the whale", "max_tokens": 100000, "temperature": 1.0, "seed": 3, "stream": true, "ignore_eos": true}"#;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    long.write_all(head.as_bytes()).unwrap();
    // Its first chunk: the request holds the slot.
    let mut first = [0u8; 64];
    let n = long.read(&mut first).unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    let (status, text) = http(a, "POST", "/v1/completions", br#"{"prompt": "x", "max_tokens": 2}"#);
    assert_eq!(status, 429, "{text}");
    assert_eq!(json(&text)["error"]["type"], "rate_limit_error");
    drop(long);
    // The server notices the client is gone at its next chunk; then nothing is live or waiting.
    let idle = || {
        let (_, text) = http(a, "GET", "/metrics", b"");
        let value = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
        value("weft_live_slots ").as_deref() == Some("0") && value("weft_queue_depth ").as_deref() == Some("0")
    };
    let mut free = false;
    for _ in 0..200 {
        if idle() {
            free = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(free, "the request of a client that went away is still counted");
    // Had the engine kept decoding it, this would wait behind 100,000 tokens (and time out).
    let (status, text) = http(a, "POST", "/v1/completions", br#"{"prompt": "x", "max_tokens": 2}"#);
    assert_eq!(status, 200, "{text}");
    drop(server);
    let _ = std::fs::remove_dir_all(&d);
}

/// What the evaluation harness and load generators rely on: `echo` with `logprobs` scores every
/// prompt token (exactly the log-softmax of the logits plan's row before it; nothing for the
/// first), `min_tokens` keeps stop strings from ending the text early, presets by name,
/// `include_usage`, `/tokenizer_info`; an unknown model is 404; slow and idle connections are
/// closed at the timeout (a slow body gets 408); the latency histograms count every request;
/// and the load generator's streams all get their tokens.
#[test]
fn the_server_scores_prompts_times_out_slow_clients_and_bears_load() {
    use weft_runtime::backend::{Backend, CpuBackend};
    use weft_runtime::cpu::tensor::Tensor;
    use weft_runtime::engine::Logprobs;
    let d = std::env::temp_dir().join(format!("weft-serve-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = crate::tiny_run_config(&d, 2, 64);
    let (code, _, err) = weft(&["train", "--no-progress", "--backend", "cpu", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let run_dir = d.join("run");
    let run = run_dir.to_str().unwrap();
    let server = start(run, &["--slots", "2", "--timeout", "1"]);
    let a = server.addr.as_str();
    let ask = |body: &serde_json::Value| ask_at(a, body);

    // echo + logprobs, two token-id prompts in one request, as lm-evaluation-harness sends them.
    let prompts = [vec![116u32, 104, 101, 32, 119, 104, 97, 108, 101], vec![115, 101, 97, 32, 97, 110, 100]];
    let (status, r) = ask(&serde_json::json!({
        "prompt": prompts, "max_tokens": 1, "logprobs": 2, "echo": true, "temperature": 0, "seed": 1234,
    }));
    assert_eq!(status, 200, "{r}");
    let opened = weft::run::open_run(&run_dir).unwrap();
    let mut be = CpuBackend::new(opened.program, 0);
    be.write(opened.params).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let lp = &r["choices"][i]["logprobs"];
        assert_eq!(r["choices"][i]["index"], i);
        let tokens = lp["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), p.len() + 1, "the prompt's tokens, then the new one: {lp}");
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
        let ids: Vec<i32> = p.iter().map(|&t| t as i32).collect();
        let out = be.run("logits", vec![("tokens".into(), Tensor::ints(vec![1, ids.len()], ids))]).unwrap();
        let logits = out["logits"].reals().unwrap();
        let vocab = logits.len() / p.len();
        for j in 1..p.len() {
            let want = Logprobs::of(&logits[(j - 1) * vocab..j * vocab], p[j], 2);
            assert_eq!(lp["token_logprobs"][j].as_f64().unwrap() as f32, want.logprob, "prompt {i} token {j}");
            let top = lp["top_logprobs"][j].as_object().unwrap();
            assert_eq!(top.len(), 2);
            let best = top.values().map(|v| v.as_f64().unwrap() as f32).fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(best, want.top[0].1, "prompt {i} token {j}");
        }
        // The text is the prompt's, then the new token's; offsets count through both.
        let text = r["choices"][i]["text"].as_str().unwrap();
        let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(offsets[..3], [0, 1, 2]);
        assert_eq!(*offsets.last().unwrap() as usize, p.len(), "{text:?}");
    }

    // min_tokens: a stop string counts only from the min_tokens-th token on. Byte tokens: one
    // character each, so the text is cut at the first stop at or after that character.
    let plain = |extra: serde_json::Value| {
        let mut body = serde_json::json!({ "prompt": "the whale", "max_tokens": 12, "temperature": 0 });
        let o = body.as_object_mut().unwrap();
        o.extend(extra.as_object().unwrap().clone());
        if o.contains_key("preset") {
            o.remove("temperature");
        }
        let (status, r) = ask(&body);
        assert_eq!(status, 200, "{r}");
        r["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let want = plain(serde_json::json!({}));
    assert!(want.is_ascii() && want.len() == 12, "{want:?}");
    let stop = &want[1..2];
    assert_eq!(plain(serde_json::json!({ "stop": stop })), want[..want.find(stop).unwrap()]);
    let min = 6;
    let cut = want[min - 1..].find(stop).map_or(want.len(), |k| k + min - 1);
    assert_eq!(plain(serde_json::json!({ "stop": stop, "min_tokens": min })), want[..cut], "stop {stop:?}");
    // Presets by name.
    assert_eq!(plain(serde_json::json!({ "preset": "greedy" })), want);
    let (status, e) = ask(&serde_json::json!({ "prompt": "x", "preset": "humaneval", "temperature": 0.5 }));
    assert_eq!(status, 400, "{e}");
    let (status, e) = ask(&serde_json::json!({ "prompt": "x", "preset": "hot" }));
    assert!(status == 400 && e["error"]["message"].as_str().unwrap().contains("greedy, humaneval, mbpp"), "{e}");
    let (status, e) = ask(&serde_json::json!({ "prompt": "x", "max_tokens": 2, "min_tokens": 3 }));
    assert!(status == 400 && e["error"]["message"].as_str().unwrap().contains("min_tokens"), "{e}");
    let (status, e) = ask(&serde_json::json!({ "prompt": "x", "model": "gpt-9" }));
    assert!(status == 404 && e["error"]["message"].as_str().unwrap().contains("gpt-9"), "{e}");
    // include_usage: a last chunk with no choices and the usage, before [DONE].
    let body = serde_json::json!({
        "prompt": "the whale", "max_tokens": 5, "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": { "include_usage": true },
    });
    let (status, text) = http(a, "POST", "/v1/completions", body.to_string().as_bytes());
    assert_eq!(status, 200);
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let usage = json(data[data.len() - 2]);
    assert_eq!(usage["choices"].as_array().map(Vec::len), Some(0), "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let info = json(&http(a, "GET", "/tokenizer_info", b"").1);
    assert_eq!((info["eos_token"].as_str(), info["vocab_size"].as_u64()), (Some("<|endoftext|>"), Some(257)));

    // Timeouts of one second: an idle connection and a half-sent head are closed, a half-sent
    // body gets 408; the server serves on.
    let closed_within = |send: &[u8]| {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(send).unwrap();
        let t = std::time::Instant::now();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        (t.elapsed(), String::from_utf8_lossy(&raw).into_owned())
    };
    let (t, got) = closed_within(b"");
    assert!(got.is_empty() && t < Duration::from_secs(10), "idle: {got:?} after {t:?}");
    let (t, got) = closed_within(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
    assert!(!got.starts_with("HTTP/1.1 200") && t < Duration::from_secs(10), "slow head: {got:?} after {t:?}");
    let (t, got) = closed_within(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"");
    assert!(got.starts_with("HTTP/1.1 408") && got.contains("did not arrive") && t < Duration::from_secs(10), "{got}");

    // The load generator: 3 clients, 7 streamed requests of 8 tokens each.
    let (code, out, err) = weft(&[
        "load",
        "--url",
        &format!("http://{a}"),
        "--clients",
        "3",
        "--requests",
        "7",
        "--prompt-tokens",
        "5:20",
        "--output-tokens",
        "8",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let report = json(out.trim());
    assert_eq!((report["requests"].as_u64(), report["errors"].as_u64()), (Some(7), Some(0)), "{report}");
    assert_eq!(report["output_tokens"], 56);
    let p = report["prompt_tokens"].as_u64().unwrap();
    assert!((35..=140).contains(&p), "{report}");
    assert!(report["ttft_ms"]["p50"].as_f64().unwrap() > 0.0 && report["itl_ms"]["p99"].as_f64().unwrap() > 0.0);

    // Every request is in the latency histograms: cumulative buckets, +Inf equal to the count.
    let (_, text) = http(a, "GET", "/metrics", b"");
    let value = |name: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(-1.0)
    };
    let served = value("weft_e2e_request_latency_seconds_count ");
    // 2 scored + 4 plain + 1 streamed + 7 from the load generator.
    assert!(served >= 14.0, "{text}");
    for h in
        ["weft_time_to_first_token_seconds", "weft_inter_token_latency_seconds", "weft_e2e_request_latency_seconds"]
    {
        let buckets: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{h}_bucket")))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{h}: {buckets:?}");
        assert_eq!(buckets.last().copied(), Some(value(&format!("{h}_count "))), "{h}");
    }
    assert!(value("weft_inter_token_latency_seconds_count ") >= 7.0 * 7.0);
    drop(server);

    // --context: the run's 96 tokens made 48.
    let server = start(run, &["--context", "48"]);
    let a = server.addr.as_str();
    assert_eq!(json(&http(a, "GET", "/v1/models", b"").1)["data"][0]["max_model_len"], 48);
    let (status, e) = ask_at(a, &serde_json::json!({ "prompt": "the whale", "max_tokens": 40 }));
    assert!(status == 400 && e["error"]["message"].as_str().unwrap().contains("context of 48"), "{e}");
    let (status, r) = ask_at(a, &serde_json::json!({ "prompt": "the whale", "max_tokens": 39, "ignore_eos": true }));
    assert_eq!((status, r["usage"]["completion_tokens"].as_u64()), (200, Some(39)), "{r}");
    drop(server);
    let _ = std::fs::remove_dir_all(&d);
}
