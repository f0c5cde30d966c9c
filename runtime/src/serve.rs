//! An OpenAI-compatible completions server over the generation engine.
//!
//! One thread owns the backend and the [`Engine`] (a GPU backend stays on the thread that made
//! it) and runs continuous batching: between decode steps it takes new requests from a
//! channel, and it cancels a request whose client has gone (its reply channel closed) at the
//! next token. HTTP runs on tokio with axum: `POST /v1/completions` (streaming as server-sent
//! events ending in `[DONE]`), `GET /v1/models`, `GET /health`, `POST /tokenize`,
//! `POST /detokenize` and `GET /metrics` (Prometheus text). Every bad request gets a 4xx with
//! an OpenAI-style JSON error; a full queue answers 429.

use crate::backend::Backend;
use crate::data::Tokenizer;
use crate::engine::{Engine, Event, Finish, Logprobs, Request, MAX_TOP_LOGPROBS};
use crate::generate::{Sampling, TextStream};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
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
}

/// What the engine thread sends back for one request.
enum Msg {
    Token { token: u32, logprobs: Option<Logprobs> },
    Done(Finish),
    Error(String),
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
    let (slots, context, live_e) = (o.slots, o.context, live.clone());
    let engine = std::thread::spawn(move || engine_thread(make, slots, context, rx, live_e, up_tx));
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
    });
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({})) }))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
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
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(|e| format!("the server stopped: {e}"))
    });
    // Dropping the app closed the jobs channel: the engine thread finishes its step and ends.
    drop(rt);
    let _ = engine.join();
    served
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
    slots: usize,
    context: usize,
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
    let mut engine = match Engine::new(backend.as_mut(), slots, context) {
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
        for e in events {
            let (id, msg) = match e {
                Event::Token { id, token, logprobs } => (id, Msg::Token { token, logprobs }),
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
    let kind = if status == StatusCode::TOO_MANY_REQUESTS { "rate_limit_error" } else { "invalid_request_error" };
    (status, Json(json!({ "error": { "message": message, "type": kind, "param": null, "code": null } })))
        .into_response()
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message.into())
}

/// The JSON object of a request body, or the error response.
fn object(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, (StatusCode, String)> {
    let body = body.map_err(|e| (e.status(), e.body_text()))?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err((StatusCode::BAD_REQUEST, "the request body must be a JSON object".into())),
        Err(e) => Err((StatusCode::BAD_REQUEST, format!("the request body is not valid JSON: {e}"))),
    }
}

/// A completion request, checked.
struct Completion {
    prompts: Vec<(String, Vec<u32>)>,
    max_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    logprobs: Option<usize>,
    echo: bool,
    ignore_eos: bool,
}

const FIELDS: [&str; 16] = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "logprobs",
    "echo",
    "n",
    "ignore_eos",
    "user",
    "frequency_penalty",
    "presence_penalty",
];

fn parse(s: &Shared, m: &Map<String, Value>) -> Result<Completion, String> {
    if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("unknown field `{k}`"));
    }
    let num = |k: &str, default: f64| -> Result<f64, String> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or(format!("`{k}` must be a number")),
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
        if num(k, 0.0)? != 0.0 {
            return Err(format!("`{k}` is not supported (only 0)"));
        }
    }
    if int("n", 1)? != 1 {
        return Err("`n` must be 1 (give several prompts for several completions)".into());
    }
    let temperature = num("temperature", 1.0)?;
    let top_p = num("top_p", 1.0)?;
    let top_k = int("top_k", -1)?;
    if top_k < -1 {
        return Err("`top_k` must be -1 (no limit) or more".into());
    }
    let seed = int("seed", 0)?;
    let sampling = Sampling { temperature, top_p, top_k: top_k.max(0) as usize, seed: seed as u64 };
    sampling.validate()?;
    let max_tokens = int("max_tokens", 16)?;
    if max_tokens < 0 {
        return Err("`max_tokens` must be 0 or more".into());
    }
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(a)) if a.len() <= MAX_STOPS => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or("`stop` must be a string or a list of strings".to_string()))
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => return Err(format!("at most {MAX_STOPS} stop strings")),
        Some(_) => return Err("`stop` must be a string or a list of strings".into()),
    };
    let logprobs = match int("logprobs", -1)? {
        -1 => None,
        n if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
        _ => return Err(format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}")),
    };
    let prompts = prompts(s, m.get("prompt"))?;
    for (i, (_, ids)) in prompts.iter().enumerate() {
        if ids.len() + max_tokens as usize > s.o.context {
            return Err(format!(
                "prompt {i} is {} tokens and asks for {max_tokens} more, past the model's context of {}",
                ids.len(),
                s.o.context
            ));
        }
    }
    Ok(Completion {
        prompts,
        max_tokens: max_tokens as usize,
        sampling,
        stop,
        stream: flag("stream")?,
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

/// One choice's text and log-probabilities as they build up.
struct Choice<'t> {
    text: TextStream<'t>,
    tokens: usize,
    logprobs: Vec<(u32, Logprobs)>,
}

impl Choice<'_> {
    fn logprobs_json(&self, tok: &Tokenizer) -> Value {
        let piece = |t: u32| tok.decode(&[t]).unwrap_or_default();
        let mut offset = 0;
        let mut offsets = Vec::new();
        for (t, _) in &self.logprobs {
            offsets.push(offset);
            offset += piece(*t).len();
        }
        json!({
            "tokens": self.logprobs.iter().map(|(t, _)| piece(*t)).collect::<Vec<_>>(),
            "token_logprobs": self.logprobs.iter().map(|(_, l)| l.logprob).collect::<Vec<_>>(),
            "top_logprobs": self.logprobs.iter().map(|(_, l)| {
                l.top.iter().map(|(t, p)| (piece(*t), json!(p))).collect::<Map<String, Value>>()
            }).collect::<Vec<_>>(),
            "text_offset": offsets,
        })
    }
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

async fn completions(State(s): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    let m = match object(body) {
        Ok(m) => m,
        Err((status, message)) => return error(status, message),
    };
    let c = match parse(&s, &m) {
        Ok(c) => c,
        Err(e) => return bad(e),
    };
    let n = c.prompts.len();
    if s.pending.fetch_add(n, Ordering::SeqCst) + n > s.o.queue + s.o.slots {
        s.pending.fetch_sub(n, Ordering::SeqCst);
        return error(StatusCode::TOO_MANY_REQUESTS, "the server's queue is full: try again later".into());
    }
    s.requests.fetch_add(1, Ordering::Relaxed);
    let eot = s.tokenizer.eot();
    let mut receivers = Vec::new();
    for (_, ids) in &c.prompts {
        s.tokens_in.fetch_add(ids.len() as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let request = Request {
            prompt: ids.clone(),
            max_new: c.max_tokens,
            sampling: c.sampling.clone(),
            stop: if c.ignore_eos { Vec::new() } else { vec![eot] },
            logprobs: c.logprobs,
        };
        if s.jobs.send(Job { request, reply: tx }).is_err() {
            s.pending.fetch_sub(n, Ordering::SeqCst);
            return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down".into());
        }
        receivers.push(rx);
    }
    let id = format!("cmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if c.stream {
        return stream(s, c, receivers, id, created).into_response();
    }
    // Counted out when this future ends, however it ends (a client that goes away drops it).
    let _pending = Pending(Arc::clone(&s), n);
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    let mut failed = None;
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let mut ch = Choice { text: TextStream::new(&s.tokenizer, &c.stop), tokens: 0, logprobs: Vec::new() };
        let mut finish = Finish::Length;
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Token { token, logprobs } => {
                    ch.tokens += 1;
                    if let Some(l) = logprobs {
                        ch.logprobs.push((token, l));
                    }
                    ch.text.push(token);
                    if ch.text.stopped() {
                        break;
                    }
                }
                Msg::Done(f) => {
                    finish = f;
                    break;
                }
                Msg::Error(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Dropping the receiver cancels a sequence stopped by a stop string.
        drop(rx);
        completion_tokens += ch.tokens;
        let prefix = if c.echo { c.prompts[i].0.as_str() } else { "" };
        let lp = if c.logprobs.is_some() { ch.logprobs_json(&s.tokenizer) } else { Value::Null };
        choices.push(json!({
            "index": i,
            "text": format!("{prefix}{}", ch.text.text()),
            "logprobs": lp,
            "finish_reason": finish_reason(finish, ch.text.stopped()),
        }));
    }
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
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// Server-sent events: a chunk per piece of text of each choice, a last chunk with its finish
/// reason, then `[DONE]`. A client that goes away ends its choices' tasks at their next chunk,
/// which drops their reply channels: the engine frees the slots at its next step.
fn stream(
    s: Arc<Shared>,
    c: Completion,
    receivers: Vec<mpsc::UnboundedReceiver<Msg>>,
    id: String,
    created: u64,
) -> Sse<tokio_stream::wrappers::ReceiverStream<Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let (c, id) = (Arc::new(c), Arc::new(id));
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for (i, mut replies) in receivers.into_iter().enumerate() {
            let (tx, c, s, id) = (tx.clone(), Arc::clone(&c), Arc::clone(&s), Arc::clone(&id));
            tasks.push(tokio::spawn(async move {
                let chunk = |text: &str, finish: Option<&str>| {
                    let v = json!({
                        "id": *id, "object": "text_completion", "created": created, "model": s.o.model,
                        "choices": [{ "index": i, "text": text, "logprobs": null, "finish_reason": finish }],
                    });
                    Ok(SseEvent::default().data(v.to_string()))
                };
                let mut text = TextStream::new(&s.tokenizer, &c.stop);
                let (mut tokens, mut finish, mut gone) = (0u64, Finish::Length, false);
                if c.echo {
                    gone = tx.send(chunk(&c.prompts[i].0, None)).await.is_err();
                }
                while !gone {
                    match replies.recv().await {
                        Some(Msg::Token { token, .. }) => {
                            tokens += 1;
                            let piece = text.push(token);
                            if !piece.is_empty() {
                                gone = tx.send(chunk(&piece, None)).await.is_err();
                            }
                            if text.stopped() {
                                break;
                            }
                        }
                        Some(Msg::Done(f)) => {
                            finish = f;
                            break;
                        }
                        Some(Msg::Error(e)) => {
                            let v = json!({ "error": { "message": e, "type": "server_error", "param": null, "code": null } });
                            let _ = tx.send(Ok(SseEvent::default().data(v.to_string()))).await;
                            gone = true;
                        }
                        None => break,
                    }
                }
                drop(replies);
                if !gone {
                    let rest = text.finish();
                    let _ = tx.send(chunk(&rest, Some(finish_reason(finish, text.stopped())))).await;
                }
                s.pending.fetch_sub(1, Ordering::SeqCst);
                s.tokens_out.fetch_add(tokens, Ordering::Relaxed);
            }));
        }
        for t in tasks {
            let _ = t.await;
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

/// `{"prompt": text}` -> its token ids (as vLLM's route).
async fn tokenize(State(s): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    let m = match object(body) {
        Ok(m) => m,
        Err((status, message)) => return error(status, message),
    };
    let Some(text) = m.get("prompt").and_then(Value::as_str) else {
        return bad("`prompt` must be a string");
    };
    match s.tokenizer.encode(text) {
        Ok(ids) => Json(json!({ "tokens": ids, "count": ids.len(), "max_model_len": s.o.context })).into_response(),
        Err(e) => bad(e.0),
    }
}

/// `{"tokens": [ids]}` -> their text.
async fn detokenize(State(s): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    let m = match object(body) {
        Ok(m) => m,
        Err((status, message)) => return error(status, message),
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
    out
}
