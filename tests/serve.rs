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
    let server = start(run, &["--slots", "2"]);
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
