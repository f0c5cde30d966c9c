//! An OpenAI-compatible completions server over the generation engine.
//!
//! One thread owns the backend and the [`Engine`] (a GPU backend stays on the thread that made
//! it) and runs continuous batching: between decode steps it takes new requests from a
//! channel, and it cancels a request whose client has gone (its reply channel closed) at the
//! next token. HTTP runs on tokio with axum: `POST /v1/completions` (streaming as server-sent
//! events ending in `[DONE]`), `GET /v1/models`, `GET /health`, `GET /tokenizer_info`,
//! `POST /tokenize`, `POST /detokenize` and `GET /metrics` (Prometheus text, with time to
//! first token, inter-token and request latency histograms). Every bad request gets a 4xx
//! with an OpenAI-style JSON error; a full queue answers 429. Connections run on hyper's
//! HTTP/1 directly, so a client that sends no whole request head within the timeout (slow, or
//! idle between requests) is disconnected, and a body must arrive within it too.

use crate::backend::Backend;
use crate::data::Tokenizer;
use crate::engine::{Engine, Event, Finish, Logprobs, Request, MAX_TOP_LOGPROBS};
use crate::generate::{Preset, Sampling, TextStream};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The largest request body.
const MAX_BODY: usize = 8 << 20;
/// The most stop strings a request may give (as OpenAI's API).
const MAX_STOPS: usize = 4;

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// The model name `/v1/models` reports.
    pub model: String,
    /// Prompt and new tokens together, per sequence.
    pub context: usize,
    /// Sequences decoded at once.
    pub slots: usize,
    /// Requests that may wait for a slot; past that, 429.
    pub queue: usize,
    /// How long a connection may take to send a request head (or stay idle between requests),
    /// and a request its body.
    pub timeout: Duration,
    /// Prompt tokens prefilled per step between decode steps (0: each prompt whole); None:
    /// the engine's default for the backend.
    pub prefill_chunk: Option<usize>,
}

/// Where to listen and how long the queue is, as both command lines take them.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeFlags {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 takes any free port (the address is printed when the server listens).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests that may wait for a slot; past that the server answers 429.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub queue: u64,
    /// Seconds a connection may take to send a request head or body, or stay idle between
    /// requests, before it is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Prompt tokens prefilled per step, between the running sequences' decode steps, so a
    /// long prompt does not stall them (0: each prompt whole as it joins). Default 512 where
    /// the backend prefills in chunks: the CPU reference, and the GPU with a bundle's `chunk`
    /// plan (serving one slot fewer than its generation batch: the last row stages prompts).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1 << 24))]
    pub prefill_chunk: Option<u64>,
}

impl ServeFlags {
    /// The options for serving `model` (a context of `context` tokens) with `slots` sequences.
    pub fn options(&self, model: String, context: usize, slots: usize) -> ServeOptions {
        ServeOptions {
            host: self.host.clone(),
            port: self.port,
            model,
            context,
            slots,
            queue: self.queue as usize,
            timeout: Duration::from_secs(self.timeout),
            prefill_chunk: self.prefill_chunk.map(|n| n as usize),
        }
    }
}

/// What the engine thread sends back for one request; tokens stamped when they were made.
enum Msg {
    Prompt(Vec<Option<Logprobs>>),
    Token { token: u32, logprobs: Option<Logprobs>, at: Instant },
    Done(Finish),
    Error(String),
}

/// A Prometheus histogram: counts per upper bound (not cumulative), the sum and the count.
struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, state: Mutex::new((vec![0; bounds.len()], 0.0, 0)) }
    }

    fn observe(&self, d: Duration) {
        let x = d.as_secs_f64();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| x <= b) {
            s.0[i] += 1;
        }
        s.1 += x;
        s.2 += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        let mut below = 0;
        for (b, n) in self.bounds.iter().zip(&s.0) {
            below += n;
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {below}\n"));
        }
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n", s.2, s.1, s.2));
    }
}

/// vLLM's bounds, in seconds.
const TTFT_BOUNDS: [f64; 19] =
    [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BOUNDS: [f64; 19] =
    [0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5];
const E2E_BOUNDS: [f64; 19] =
    [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0];

/// One sequence's latencies, observed into the server's histograms as its tokens arrive.
struct Clock {
    start: Instant,
    last: Option<Instant>,
}

impl Clock {
    fn token(&mut self, s: &Shared, at: Instant) {
        match self.last {
            None => s.ttft.observe(at.saturating_duration_since(self.start)),
            Some(last) => s.itl.observe(at.saturating_duration_since(last)),
        }
        self.last = Some(at);
    }

    fn done(&self, s: &Shared) {
        s.e2e.observe(self.start.elapsed());
    }
}

struct Job {
    request: Request,
    reply: mpsc::UnboundedSender<Msg>,
}

/// State every handler shares.
struct Shared {
    o: ServeOptions,
    tokenizer: Tokenizer,
    vocab: usize,
    jobs: std::sync::mpsc::Sender<Job>,
    /// Requests submitted and not finished (waiting or live).
    pending: AtomicUsize,
    live: Arc<AtomicUsize>,
    requests: AtomicU64,
    tokens_in: AtomicU64,
    tokens_out: AtomicU64,
    next_id: AtomicU64,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
}

/// Serves until SIGINT or SIGTERM. `make` builds the backend on the engine thread; `ready` is
/// called with the address once the server listens.
pub fn serve(
    o: ServeOptions,
    tokenizer: Tokenizer,
    vocab: usize,
    make: Box<dyn FnOnce() -> Result<Box<dyn Backend>, String> + Send>,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), String> {
    let (jobs, rx) = std::sync::mpsc::channel::<Job>();
    let live = Arc::new(AtomicUsize::new(0));
    let (up_tx, up_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (slots, context, chunk, live_e) = (o.slots, o.context, o.prefill_chunk, live.clone());
    let engine = std::thread::spawn(move || engine_thread(make, (slots, context, chunk), rx, live_e, up_tx));
    up_rx.recv().map_err(|_| "the engine thread ended before it started".to_string())??;
    let shared = Arc::new(Shared {
        o: o.clone(),
        tokenizer,
        vocab,
        jobs,
        pending: AtomicUsize::new(0),
        live,
        requests: AtomicU64::new(0),
        tokens_in: AtomicU64::new(0),
        tokens_out: AtomicU64::new(0),
        next_id: AtomicU64::new(0),
        ttft: Histogram::new(&TTFT_BOUNDS),
        itl: Histogram::new(&ITL_BOUNDS),
        e2e: Histogram::new(&E2E_BOUNDS),
    });
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({})) }))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .with_state(shared);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the server's runtime: {e}"))?;
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((o.host.as_str(), o.port))
            .await
            .map_err(|e| format!("cannot listen on {}:{}: {e}", o.host, o.port))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        ready(addr);
        accept(listener, app, o.timeout).await;
        Ok(())
    });
    // Dropping the app closed the jobs channel: the engine thread finishes its step and ends.
    drop(rt);
    let _ = engine.join();
    served
}

/// Serves connections until SIGINT or SIGTERM, then lets open ones finish (streams run to
/// their end) for at most [`DRAIN`].
async fn accept(listener: tokio::net::TcpListener, app: Router, timeout: Duration) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(shutdown());
    loop {
        let stream = tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: wait, do not spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

/// How long open requests may run on after SIGINT or SIGTERM before the server exits.
const DRAIN: Duration = Duration::from_secs(30);

/// A request body, read whole within `timeout`, at most [`MAX_BODY`] bytes.
async fn read_body(body: Body, timeout: Duration) -> Result<Bytes, Response> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(error(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {MAX_BODY} bytes")))
        }
        Ok(Err(e)) => Err(bad(format!("the request body could not be read: {e}"))),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {} s", timeout.as_secs()),
        )),
    }
}

async fn shutdown() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return int.await.unwrap_or(()),
        };
        tokio::select! {
            _ = int => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = int.await;
}

fn engine_thread(
    make: Box<dyn FnOnce() -> Result<Box<dyn Backend>, String> + Send>,
    (slots, context, chunk): (usize, usize, Option<usize>),
    jobs: std::sync::mpsc::Receiver<Job>,
    live: Arc<AtomicUsize>,
    up: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut backend = match make() {
        Ok(b) => b,
        Err(e) => {
            let _ = up.send(Err(e));
            return;
        }
    };
    let engine = Engine::new(backend.as_mut(), slots, context)
        .and_then(|mut e| chunk.map_or(Ok(()), |n| e.set_prefill_chunk(n)).map(|()| e));
    let mut engine = match engine {
        Ok(e) => e,
        Err(e) => {
            let _ = up.send(Err(e));
            return;
        }
    };
    let _ = up.send(Ok(()));
    let mut replies: HashMap<usize, mpsc::UnboundedSender<Msg>> = HashMap::new();
    let take = |engine: &mut Engine, job: Job, replies: &mut HashMap<usize, mpsc::UnboundedSender<Msg>>| match engine
        .submit(job.request)
    {
        Ok(id) => {
            replies.insert(id, job.reply);
        }
        Err(e) => {
            let _ = job.reply.send(Msg::Error(e));
        }
    };
    loop {
        if engine.idle() {
            match jobs.recv() {
                Ok(job) => take(&mut engine, job, &mut replies),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            take(&mut engine, job, &mut replies);
        }
        // Clients that went away free their slots before the step.
        let gone: Vec<usize> = replies.iter().filter(|(_, r)| r.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            engine.cancel(id);
            replies.remove(&id);
        }
        let events = match engine.step() {
            Ok(e) => e,
            Err(e) => {
                // A failed step fails every request it carried; the engine starts empty.
                for (id, r) in replies.drain() {
                    engine.cancel(id);
                    let _ = r.send(Msg::Error(format!("generation failed: {e}")));
                }
                continue;
            }
        };
        let at = Instant::now();
        for e in events {
            let (id, msg) = match e {
                Event::Prompt { id, logprobs } => (id, Msg::Prompt(logprobs)),
                Event::Token { id, token, logprobs } => (id, Msg::Token { token, logprobs, at }),
                Event::Done { id, finish } => (id, Msg::Done(finish)),
            };
            let done = matches!(msg, Msg::Done(_));
            let sent = replies.get(&id).is_some_and(|r| r.send(msg).is_ok());
            if done {
                replies.remove(&id);
            } else if !sent {
                engine.cancel(id);
                replies.remove(&id);
            }
        }
        live.store(engine.live(), Ordering::Relaxed);
    }
}

fn error(status: StatusCode, message: String) -> Response {
    let kind = match status {
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::NOT_FOUND => "not_found_error",
        _ => "invalid_request_error",
    };
    (status, Json(json!({ "error": { "message": message, "type": kind, "param": null, "code": null } })))
        .into_response()
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message.into())
}

/// The JSON object of a request body, or the error response.
async fn object(body: Body, timeout: Duration) -> Result<Map<String, Value>, Response> {
    let body = read_body(body, timeout).await?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("the request body must be a JSON object")),
        Err(e) => Err(bad(format!("the request body is not valid JSON: {e}"))),
    }
}

/// A completion request, checked.
struct Completion {
    prompts: Vec<(String, Vec<u32>)>,
    max_tokens: usize,
    min_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    logprobs: Option<usize>,
    echo: bool,
    ignore_eos: bool,
}

const FIELDS: [&str; 19] = [
    "model",
    "prompt",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "preset",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "n",
    "ignore_eos",
    "user",
    "frequency_penalty",
    "presence_penalty",
];

/// Why a request was refused: 404 for a model this server does not serve, else 400.
enum Refusal {
    NoModel(String),
    Bad(String),
}

impl From<String> for Refusal {
    fn from(e: String) -> Refusal {
        Refusal::Bad(e)
    }
}

impl From<&str> for Refusal {
    fn from(e: &str) -> Refusal {
        Refusal::Bad(e.to_string())
    }
}

fn parse(s: &Shared, m: &Map<String, Value>) -> Result<Completion, Refusal> {
    if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("unknown field `{k}`").into());
    }
    match m.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(x)) if *x == s.o.model => {}
        Some(Value::String(x)) => {
            return Err(Refusal::NoModel(format!(
                "the model `{x}` does not exist here (this server has `{}`)",
                s.o.model
            )))
        }
        Some(_) => return Err("`model` must be a string".to_string().into()),
    }
    let num = |k: &str| -> Result<Option<f64>, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or(format!("`{k}` must be a number")),
        }
    };
    let int = |k: &str, default: i64| -> Result<i64, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_i64().ok_or(format!("`{k}` must be an integer")),
        }
    };
    let flag = |k: &str| -> Result<bool, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(v) => v.as_bool().ok_or(format!("`{k}` must be true or false")),
        }
    };
    for k in ["frequency_penalty", "presence_penalty"] {
        if num(k)?.unwrap_or(0.0) != 0.0 {
            return Err(format!("`{k}` is not supported (only 0)").into());
        }
    }
    if int("n", 1)? != 1 {
        return Err("`n` must be 1 (give several prompts for several completions)".into());
    }
    let top_k = int("top_k", -1)?;
    if top_k < -1 {
        return Err("`top_k` must be -1 (no limit) or more".into());
    }
    let seed = int("seed", 0)?;
    let (temperature, top_p) = (num("temperature")?, num("top_p")?);
    let sampling = match m.get("preset") {
        None | Some(Value::Null) => Sampling {
            temperature: temperature.unwrap_or(1.0),
            top_p: top_p.unwrap_or(1.0),
            top_k: top_k.max(0) as usize,
            seed: seed as u64,
        },
        Some(Value::String(name)) => {
            if temperature.is_some() || top_p.is_some() {
                return Err("give `preset` or `temperature` and `top_p`, not both".into());
            }
            let p = Preset::from_name(name)
                .ok_or_else(|| format!("no sampling preset `{name}` (there are {})", Preset::NAMES.join(", ")))?;
            Sampling { top_k: top_k.max(0) as usize, ..p.sampling(seed as u64) }
        }
        Some(_) => return Err("`preset` must be a string".to_string().into()),
    };
    sampling.validate()?;
    let max_tokens = int("max_tokens", 16)?;
    if max_tokens < 0 {
        return Err("`max_tokens` must be 0 or more".into());
    }
    let min_tokens = int("min_tokens", 0)?;
    if !(0..=max_tokens).contains(&min_tokens) {
        return Err(format!("`min_tokens` must be between 0 and `max_tokens` ({max_tokens})").into());
    }
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(a)) if a.len() <= MAX_STOPS => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or("`stop` must be a string or a list of strings".to_string()))
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => return Err(format!("at most {MAX_STOPS} stop strings").into()),
        Some(_) => return Err("`stop` must be a string or a list of strings".to_string().into()),
    };
    let logprobs = match int("logprobs", -1)? {
        -1 => None,
        n if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
        _ => return Err(format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}").into()),
    };
    let include_usage = match m.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| *k != "include_usage") {
                return Err(format!("unknown field `stream_options.{k}`").into());
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(v) => v.as_bool().ok_or("`stream_options.include_usage` must be true or false")?,
            }
        }
        Some(_) => return Err("`stream_options` must be an object".to_string().into()),
    };
    let stream = flag("stream")?;
    if include_usage && !stream {
        return Err("`stream_options` is only for `stream: true`".into());
    }
    let prompts = prompts(s, m.get("prompt"))?;
    for (i, (_, ids)) in prompts.iter().enumerate() {
        if ids.len() + max_tokens as usize > s.o.context {
            return Err(format!(
                "prompt {i} is {} tokens and asks for {max_tokens} more, past the model's context of {}",
                ids.len(),
                s.o.context
            )
            .into());
        }
    }
    Ok(Completion {
        prompts,
        max_tokens: max_tokens as usize,
        min_tokens: min_tokens as usize,
        sampling,
        stop,
        stream,
        include_usage,
        logprobs,
        echo: flag("echo")?,
        ignore_eos: flag("ignore_eos")?,
    })
}

/// The prompts of a request, as text and token ids: a string, a list of strings, a list of
/// ids, or a list of lists of ids.
fn prompts(s: &Shared, p: Option<&Value>) -> Result<Vec<(String, Vec<u32>)>, String> {
    let text = |x: &str| -> Result<(String, Vec<u32>), String> {
        let ids = s.tokenizer.encode(x).map_err(|e| e.0)?;
        if ids.is_empty() {
            return Err("a prompt is empty".into());
        }
        Ok((x.to_string(), ids))
    };
    let ids = |a: &[Value]| -> Result<(String, Vec<u32>), String> {
        if a.is_empty() {
            return Err("a prompt is empty".into());
        }
        let ids: Vec<u32> = a
            .iter()
            .map(|v| match v.as_u64() {
                Some(t) if (t as usize) < s.vocab => Ok(t as u32),
                _ => Err(format!("token id {v} is not in the vocabulary of {}", s.vocab)),
            })
            .collect::<Result<_, _>>()?;
        let text = s.tokenizer.decode(&ids).map_err(|e| e.0)?;
        Ok((text, ids))
    };
    match p {
        Some(Value::String(x)) => Ok(vec![text(x)?]),
        Some(Value::Array(a)) if a.is_empty() => Err("`prompt` is an empty list".into()),
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .map(|x| x.as_str().ok_or("`prompt` mixes strings and other values".to_string()).and_then(text))
                .collect(),
            Value::Array(_) => a
                .iter()
                .map(|x| x.as_array().ok_or("`prompt` mixes lists and other values".to_string()).and_then(|a| ids(a)))
                .collect(),
            _ => Ok(vec![ids(a)?]),
        },
        None | Some(Value::Null) => Err("`prompt` is required".into()),
        Some(_) => Err("`prompt` must be a string, a list of strings, or token ids".into()),
    }
}

/// Tokens with their log-probabilities (none for a prompt's first token) in the API's shape:
/// each token's text, its log-probability, its alternatives', and where its text starts,
/// counting from `offset` (returned advanced past them).
fn logprobs_json(tok: &Tokenizer, entries: &[(u32, Option<Logprobs>)], offset: &mut usize) -> Value {
    let piece = |t: u32| tok.decode(&[t]).unwrap_or_default();
    let mut offsets = Vec::new();
    for (t, _) in entries {
        offsets.push(*offset);
        *offset += piece(*t).len();
    }
    json!({
        "tokens": entries.iter().map(|(t, _)| piece(*t)).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|(_, l)| l.as_ref().map(|l| l.logprob)).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|(_, l)| l.as_ref().map(|l| {
            l.top.iter().map(|(t, p)| (piece(*t), json!(p))).collect::<Map<String, Value>>()
        })).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// Requests counted in `pending` until this is dropped.
struct Pending(Arc<Shared>, usize);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(self.1, Ordering::SeqCst);
    }
}

fn finish_reason(f: Finish, stopped: bool) -> &'static str {
    if stopped || f == Finish::Stop {
        "stop"
    } else {
        "length"
    }
}

/// One choice as it is built: its text, its tokens' log-probabilities (the prompt's first,
/// with echo and logprobs) not yet sent, and where the next token's text starts.
struct Choice<'t> {
    text: TextStream<'t>,
    tokens: usize,
    logprobs: Vec<(u32, Option<Logprobs>)>,
    offset: usize,
    clock: Clock,
}

impl<'t> Choice<'t> {
    fn new(s: &'t Shared, c: &Completion, start: Instant) -> Choice<'t> {
        Choice {
            text: TextStream::with_min_tokens(&s.tokenizer, &c.stop, c.min_tokens),
            tokens: 0,
            logprobs: Vec::new(),
            offset: 0,
            clock: Clock { start, last: None },
        }
    }

    /// Takes one message; returns the text it makes safe to show, and whether the choice ended
    /// (with its finish reason, or an error).
    fn take(&mut self, s: &Shared, prompt: &[u32], msg: Msg) -> (String, Option<Result<&'static str, String>>) {
        match msg {
            Msg::Prompt(lps) => {
                self.logprobs.extend(prompt.iter().copied().zip(lps));
                (String::new(), None)
            }
            Msg::Token { token, logprobs, at } => {
                self.tokens += 1;
                self.clock.token(s, at);
                if let Some(l) = logprobs {
                    self.logprobs.push((token, Some(l)));
                }
                let piece = self.text.push(token);
                let end = self.text.stopped().then_some(Ok("stop"));
                (piece, end)
            }
            Msg::Done(f) => (self.text.finish(), Some(Ok(finish_reason(f, self.text.stopped())))),
            Msg::Error(e) => (String::new(), Some(Err(e))),
        }
    }
}

async fn completions(State(s): State<Arc<Shared>>, body: Body) -> Response {
    let start = Instant::now();
    let m = match object(body, s.o.timeout).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let c = match parse(&s, &m) {
        Ok(c) => c,
        Err(Refusal::Bad(e)) => return bad(e),
        Err(Refusal::NoModel(e)) => return error(StatusCode::NOT_FOUND, e),
    };
    let n = c.prompts.len();
    if s.pending.fetch_add(n, Ordering::SeqCst) + n > s.o.queue + s.o.slots {
        s.pending.fetch_sub(n, Ordering::SeqCst);
        return error(StatusCode::TOO_MANY_REQUESTS, "the server's queue is full: try again later".into());
    }
    // Counted out when the response is done, however it ends (a client that goes away drops it).
    let pending = Pending(Arc::clone(&s), n);
    s.requests.fetch_add(1, Ordering::Relaxed);
    let eot = s.tokenizer.eot();
    let mut receivers = Vec::new();
    for (_, ids) in &c.prompts {
        s.tokens_in.fetch_add(ids.len() as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let request = Request {
            min_new: c.min_tokens,
            logprobs: c.logprobs,
            echo: if c.echo { c.logprobs } else { None },
            ..Request::new(ids.clone(), c.max_tokens, c.sampling.clone(), if c.ignore_eos { vec![] } else { vec![eot] })
        };
        if s.jobs.send(Job { request, reply: tx }).is_err() {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down".into());
        }
        receivers.push(rx);
    }
    let id = format!("cmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if c.stream {
        return stream(s, c, receivers, id, created, start, pending).into_response();
    }
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    let mut failed = None;
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let mut ch = Choice::new(&s, &c, start);
        let mut finish = "length";
        while let Some(msg) = rx.recv().await {
            match ch.take(&s, &c.prompts[i].1, msg).1 {
                None => {}
                Some(Ok(f)) => {
                    finish = f;
                    break;
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Dropping the receiver cancels a sequence stopped by a stop string.
        drop(rx);
        ch.clock.done(&s);
        completion_tokens += ch.tokens;
        let prefix = if c.echo { c.prompts[i].0.as_str() } else { "" };
        let lp = if c.logprobs.is_some() { logprobs_json(&s.tokenizer, &ch.logprobs, &mut 0) } else { Value::Null };
        choices.push(json!({
            "index": i,
            "text": format!("{prefix}{}", ch.text.text()),
            "logprobs": lp,
            "finish_reason": finish,
        }));
    }
    drop(pending);
    s.tokens_out.fetch_add(completion_tokens as u64, Ordering::Relaxed);
    if let Some(e) = failed {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    let prompt_tokens: usize = c.prompts.iter().map(|p| p.1.len()).sum();
    Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": s.o.model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response()
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

/// Server-sent events: a chunk per piece of text of each choice (with its tokens'
/// log-probabilities when asked), a last chunk with its finish reason, the usage when asked,
/// then `[DONE]`. A client that goes away ends its choices' tasks at their next chunk, which
/// drops their reply channels: the engine frees the slots at its next step.
fn stream(
    s: Arc<Shared>,
    c: Completion,
    receivers: Vec<mpsc::UnboundedReceiver<Msg>>,
    id: String,
    created: u64,
    start: Instant,
    pending: Pending,
) -> Sse<tokio_stream::wrappers::ReceiverStream<Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let (c, id) = (Arc::new(c), Arc::new(id));
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for (i, mut replies) in receivers.into_iter().enumerate() {
            let (tx, c, s, id) = (tx.clone(), Arc::clone(&c), Arc::clone(&s), Arc::clone(&id));
            tasks.push(tokio::spawn(async move {
                let mut ch = Choice::new(&s, &c, start);
                let chunk = |ch: &mut Choice, text: &str, finish: Option<&str>| {
                    let lp = match c.logprobs {
                        Some(_) => logprobs_json(&s.tokenizer, &std::mem::take(&mut ch.logprobs), &mut ch.offset),
                        None => Value::Null,
                    };
                    let v = json!({
                        "id": *id, "object": "text_completion", "created": created, "model": s.o.model,
                        "choices": [{ "index": i, "text": text, "logprobs": lp, "finish_reason": finish }],
                    });
                    Ok(SseEvent::default().data(v.to_string()))
                };
                let mut gone = false;
                if c.echo {
                    // The prompt's log-probabilities come first, when asked for.
                    if c.logprobs.is_some() {
                        if let Some(msg) = replies.recv().await {
                            ch.take(&s, &c.prompts[i].1, msg);
                        }
                    }
                    gone = tx.send(chunk(&mut ch, &c.prompts[i].0, None)).await.is_err();
                }
                while !gone {
                    let Some(msg) = replies.recv().await else { break };
                    let (piece, end) = ch.take(&s, &c.prompts[i].1, msg);
                    match end {
                        None => {
                            if !piece.is_empty() {
                                gone = tx.send(chunk(&mut ch, &piece, None)).await.is_err();
                            }
                        }
                        Some(Ok(finish)) => {
                            let rest = format!("{piece}{}", ch.text.finish());
                            let _ = tx.send(chunk(&mut ch, &rest, Some(finish))).await;
                            break;
                        }
                        Some(Err(e)) => {
                            let v = json!({ "error": { "message": e, "type": "server_error", "param": null, "code": null } });
                            let _ = tx.send(Ok(SseEvent::default().data(v.to_string()))).await;
                            gone = true;
                        }
                    }
                }
                drop(replies);
                ch.clock.done(&s);
                s.tokens_out.fetch_add(ch.tokens as u64, Ordering::Relaxed);
                ch.tokens
            }));
        }
        let mut completion_tokens = 0;
        for t in tasks {
            completion_tokens += t.await.unwrap_or(0);
        }
        drop(pending);
        if c.include_usage {
            let prompt_tokens: usize = c.prompts.iter().map(|p| p.1.len()).sum();
            let v = json!({
                "id": *id, "object": "text_completion", "created": created, "model": s.o.model,
                "choices": [], "usage": usage(prompt_tokens, completion_tokens),
            });
            let _ = tx.send(Ok(SseEvent::default().data(v.to_string()))).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": s.o.model, "object": "model", "created": 0, "owned_by": "weft", "max_model_len": s.o.context }],
    }))
}

/// The tokenizer's special tokens, as vLLM's route (the evaluation harness reads `eos_token`).
async fn tokenizer_info(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "tokenizer_class": s.tokenizer.kind(),
        "eos_token": crate::data::tokenizer::EOT,
        "eos_token_id": s.tokenizer.eot(),
        "bos_token": null,
        "pad_token": null,
        "model_max_length": s.o.context,
        "vocab_size": s.tokenizer.vocab_size(),
    }))
}

/// `{"prompt": text}` -> its token ids (as vLLM's route).
async fn tokenize(State(s): State<Arc<Shared>>, body: Body) -> Response {
    let m = match object(body, s.o.timeout).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    if let Some(k) = m.keys().find(|k| !["prompt", "add_special_tokens", "model"].contains(&k.as_str())) {
        return bad(format!("unknown field `{k}`"));
    }
    let Some(text) = m.get("prompt").and_then(Value::as_str) else {
        return bad("`prompt` must be a string");
    };
    match s.tokenizer.encode(text) {
        Ok(ids) => Json(json!({ "tokens": ids, "count": ids.len(), "max_model_len": s.o.context })).into_response(),
        Err(e) => bad(e.0),
    }
}

/// `{"tokens": [ids]}` -> their text.
async fn detokenize(State(s): State<Arc<Shared>>, body: Body) -> Response {
    let m = match object(body, s.o.timeout).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let ids: Option<Vec<u32>> = m
        .get("tokens")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|v| v.as_u64().filter(|&t| (t as usize) < s.vocab).map(|t| t as u32)).collect());
    let Some(ids) = ids else {
        return bad(format!("`tokens` must be a list of ids below the vocabulary of {}", s.vocab));
    };
    match s.tokenizer.decode(&ids) {
        Ok(text) => Json(json!({ "prompt": text })).into_response(),
        Err(e) => bad(e.0),
    }
}

/// Prometheus text format.
async fn metrics(State(s): State<Arc<Shared>>) -> String {
    let pending = s.pending.load(Ordering::SeqCst);
    let live = s.live.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    };
    put("weft_requests_total", "counter", "Completion requests accepted.", s.requests.load(Ordering::Relaxed));
    put("weft_prompt_tokens_total", "counter", "Prompt tokens received.", s.tokens_in.load(Ordering::Relaxed));
    put("weft_generation_tokens_total", "counter", "Tokens generated.", s.tokens_out.load(Ordering::Relaxed));
    put("weft_live_slots", "gauge", "Sequences being decoded.", live as u64);
    put("weft_queue_depth", "gauge", "Sequences waiting for a slot.", pending.saturating_sub(live) as u64);
    s.ttft.render("weft_time_to_first_token_seconds", "Time from a request to its first token.", &mut out);
    s.itl.render("weft_inter_token_latency_seconds", "Time between a sequence's consecutive tokens.", &mut out);
    s.e2e.render("weft_e2e_request_latency_seconds", "Time from a request to its last token.", &mut out);
    out
}
