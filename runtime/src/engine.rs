//! The generation engine: a pool of slots, one per live sequence, all decoded together one
//! token per step (continuous batching). A request waits in a queue until a slot is free. It
//! joins by a prefill of its prompt alone, whose layer states go into its slot's rows of the
//! decode plan's carried states (constant bytes per sequence: Mamba's conv and SSM states,
//! each attention layer's ring of keys and values). Each step decodes the first slots up to
//! the last live one, padded to a power of two (fewer sequences take a smaller, faster step),
//! each at its own position (a free slot among them on a dummy token at position 0: its rows
//! are read by no one); it samples each live sequence with its own settings and draw counter,
//! and frees the slots of finished sequences for the next waiting requests. A prompt longer
//! than the prefill chunk (where the backend runs the `chunk` plan) is prefilled one chunk per
//! step in a staging row after the slots, which no decode step runs, between the others' decode
//! steps; its last chunk writes its states into its slot. A sequence's tokens are those
//! [`generate`] gives it alone: on the CPU reference exactly, since no row of a batch reads
//! another's (chunked prompts up to the rounding of a different order of sums).
//!
//! [`generate`]: crate::generate::generate

use crate::backend::Backend;
use crate::cpu::tensor::Tensor;
use crate::generate::{decode_inputs, sample, state_names, Sampling};
use crate::plan::Plan;
use std::collections::{BTreeMap, VecDeque};

/// What a caller asks for: tokens after `prompt`.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// At most this many new tokens (and never past the context).
    pub max_new: usize,
    pub sampling: Sampling,
    /// Tokens that end the sequence (the stop token itself is given out).
    pub stop: Vec<u32>,
    /// The stop tokens are not drawn before this many new tokens.
    pub min_new: usize,
    /// With `Some(n)`, each token comes with its log-probability under the model (before
    /// temperature and truncation) and the `n` most likely tokens' (at most [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// With `Some(n)`, the sequence first gives each prompt token's log-probability given the
    /// tokens before it, with the `n` most likely there ([`Event::Prompt`]).
    pub echo: Option<usize>,
}

impl Request {
    /// Greedy or sampled tokens after `prompt`, ending at `stop`, with nothing else asked.
    pub fn new(prompt: Vec<u32>, max_new: usize, sampling: Sampling, stop: Vec<u32>) -> Request {
        Request { prompt, max_new, sampling, stop, min_new: 0, logprobs: None, echo: None }
    }
}

/// The most alternatives a token's log-probabilities list.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A token's log-probability and the most likely tokens' at its position, most likely first
/// (ties by id).
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Logprobs {
    /// Of `token` under the distribution of the logits `row`, with its `n` most likely tokens.
    pub fn of(row: &[f32], token: u32, n: usize) -> Logprobs {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
        let lp = |z: f32| (z as f64 - lse) as f32;
        let mut ids: Vec<u32> = (0..row.len() as u32).collect();
        let order = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        let n = n.min(row.len());
        if n < ids.len() {
            ids.select_nth_unstable_by(n, order);
        }
        ids.truncate(n);
        ids.sort_by(order);
        let top = ids.into_iter().map(|i| (i, lp(row[i as usize]))).collect();
        Logprobs { logprob: row.get(token as usize).map_or(f32::NEG_INFINITY, |&z| lp(z)), top }
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It produced its `max_new` tokens, or reached the end of the context.
    Length,
    /// It produced a stop token.
    Stop,
}

/// What one step gave out, in slot order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt's log-probabilities (with [`Request::echo`]), before its first token: none
    /// for the first prompt token, which nothing precedes.
    Prompt {
        id: usize,
        logprobs: Vec<Option<Logprobs>>,
    },
    Token {
        id: usize,
        token: u32,
        logprobs: Option<Logprobs>,
    },
    Done {
        id: usize,
        finish: Finish,
    },
}

/// A sequence in a slot: the token it decodes next, at position `pos`.
struct Live {
    id: usize,
    pos: usize,
    next: u32,
    produced: usize,
    max_new: usize,
    sampling: Sampling,
    stop: Vec<u32>,
    min_new: usize,
    logprobs: Option<usize>,
}

impl Live {
    /// The next token from its logits `row`: stop tokens are out of the draw until `min_new`.
    fn pick(&self, row: &[f32]) -> u32 {
        if self.produced >= self.min_new || self.stop.is_empty() {
            return sample(row, &self.sampling, self.produced as u64);
        }
        let mut row = row.to_vec();
        for &t in &self.stop {
            if let Some(z) = row.get_mut(t as usize) {
                *z = f32::NEG_INFINITY;
            }
        }
        sample(&row, &self.sampling, self.produced as u64)
    }
}

/// A prompt longer than a chunk, prefilled one chunk per step in the staging row (the row
/// after the slots, which no decode step runs), its last chunk writing its states into the
/// slot it then decodes in.
struct Staged {
    id: usize,
    slot: usize,
    request: Request,
    /// Prompt tokens prefilled so far.
    done: usize,
}

/// Prompt tokens prefilled per chunk where the backend runs the `chunk` plan.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

pub struct Engine<'b> {
    backend: &'b mut dyn Backend,
    decode: Plan,
    carried: Vec<String>,
    vocab: usize,
    context: usize,
    slots: Vec<Option<Live>>,
    queue: VecDeque<(usize, Request)>,
    next_id: usize,
    /// Longest prefill per step (0: every prompt whole, at once).
    chunk: usize,
    staged: Option<Staged>,
}

impl<'b> Engine<'b> {
    /// An engine of `slots` sequences on `backend` (its parameters in place), for a model
    /// built for `context` tokens (prompt and new tokens together).
    pub fn new(backend: &'b mut dyn Backend, slots: usize, context: usize) -> Result<Engine<'b>, String> {
        if slots == 0 {
            return Err("a generation engine needs at least one slot".into());
        }
        let decode = backend.program().plan("decode").map_err(|e| e.0)?.clone();
        let vocab = backend.program().vocab().ok_or("the model has no embedding table")?;
        let carried = state_names(&decode);
        let slots = (0..slots).map(|_| None).collect();
        let queue = VecDeque::new();
        let mut e =
            Engine { backend, decode, carried, vocab, context, slots, queue, next_id: 0, chunk: 0, staged: None };
        if e.can_chunk().is_ok() {
            e.chunk = DEFAULT_PREFILL_CHUNK;
        }
        Ok(e)
    }

    /// Whether prompts can be prefilled in chunks: the backend runs the `chunk` plan and the
    /// decode plan's states have the staging row after the slots.
    fn can_chunk(&self) -> Result<(), String> {
        if !self.backend.runs("chunk") {
            return Err(format!("the {} backend cannot prefill in chunks (no `chunk` plan)", self.backend.name()));
        }
        match self.backend.plan_shape("decode") {
            Some((rows, _)) if rows <= self.slots.len() => Err(format!(
                "prefilling in chunks needs a staging row after the slots: the decode plan holds {rows} sequences, so serve at most {} slots",
                rows.saturating_sub(1)
            )),
            _ => Ok(()),
        }
    }

    /// Prefills at most `tokens` prompt tokens per step, between decode steps (0: each prompt
    /// whole as it joins, stalling the others while it runs). A prompt longer than that is
    /// prefilled a chunk per step from the carried states (the `chunk` plan), so no prompt
    /// needs activations of its whole length.
    pub fn set_prefill_chunk(&mut self, tokens: usize) -> Result<(), String> {
        if tokens > 0 {
            self.can_chunk()?;
        }
        if self.staged.is_some() {
            return Err("a prompt is being prefilled in chunks".into());
        }
        self.chunk = tokens;
        Ok(())
    }

    /// Rows of the decode plan's carried states: the slots, and the staging row when prompts
    /// are prefilled in chunks.
    fn pool(&self) -> usize {
        self.slots.len() + usize::from(self.chunk > 0)
    }

    /// A slot neither decoding nor waiting for a staged prompt.
    fn free_slot(&self) -> Option<usize> {
        let reserved = self.staged.as_ref().map(|s| s.slot);
        (0..self.slots.len()).find(|&i| self.slots[i].is_none() && Some(i) != reserved)
    }

    /// Queues a request; returns its id (ids count up from 0 in submission order).
    pub fn submit(&mut self, r: Request) -> Result<usize, String> {
        if r.prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if r.prompt.len() >= self.context {
            return Err(format!(
                "the prompt is {} tokens; the model was built for a context of {}",
                r.prompt.len(),
                self.context
            ));
        }
        if let Some(&t) = r.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(format!("token id {t} is outside the vocabulary of {}", self.vocab));
        }
        r.sampling.validate()?;
        if [r.logprobs, r.echo].iter().flatten().any(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(format!("at most {MAX_TOP_LOGPROBS} alternatives per token's log-probabilities"));
        }
        if r.min_new > r.max_new {
            return Err(format!("at least {} new tokens cannot be at most {}", r.min_new, r.max_new));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back((id, r));
        Ok(id)
    }

    /// Drops request `id`, waiting or live (a client that went away): its slot is free for
    /// the next step. Whether it was there.
    pub fn cancel(&mut self, id: usize) -> bool {
        if let Some(i) = self.queue.iter().position(|(q, _)| *q == id) {
            self.queue.remove(i);
            return true;
        }
        if self.staged.as_ref().is_some_and(|s| s.id == id) {
            self.staged = None;
            return true;
        }
        match self.slots.iter_mut().find(|s| s.as_ref().is_some_and(|l| l.id == id)) {
            Some(s) => {
                *s = None;
                true
            }
            None => false,
        }
    }

    /// Sequences in slots, decoding or being prefilled.
    pub fn live(&self) -> usize {
        self.decoding() + usize::from(self.staged.is_some())
    }

    fn decoding(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is live or waiting.
    pub fn idle(&self) -> bool {
        self.live() == 0 && self.queue.is_empty()
    }

    /// One step: the next chunk of a prompt being prefilled in chunks, waiting requests in
    /// the free slots (each prefilled, giving its first token) while the step's prefill budget
    /// (one chunk) lasts, then one decode step for every decoding sequence.
    pub fn step(&mut self) -> Result<Vec<Event>, String> {
        let mut events = Vec::new();
        let mut budget = if self.chunk > 0 { self.chunk } else { usize::MAX };
        if self.staged.is_some() {
            budget -= self.advance_staged(&mut events)?;
        }
        while budget > 0 {
            let (Some(slot), Some((_, r))) = (self.free_slot(), self.queue.front()) else { break };
            let long = self.chunk > 0 && r.prompt.len() > self.chunk;
            if long && self.staged.is_some() {
                break;
            }
            let (id, r) = self.queue.pop_front().expect("looked at");
            budget = budget.saturating_sub(r.prompt.len().min(if long { self.chunk } else { usize::MAX }));
            match long {
                true => self.stage(slot, id, r, &mut events)?,
                false => self.join(slot, id, r, &mut events)?,
            }
        }
        if self.decoding() > 0 {
            self.decode_step(&mut events)?;
        }
        Ok(events)
    }

    /// Runs until every submitted request is done; returns each request's tokens by id.
    pub fn run_to_end(&mut self, mut on_event: impl FnMut(&Event)) -> Result<BTreeMap<usize, Vec<u32>>, String> {
        let mut out: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        while !self.idle() {
            for e in self.step()? {
                if let Event::Token { id, token, .. } = e {
                    out.entry(id).or_default().push(token);
                }
                on_event(&e);
            }
        }
        Ok(out)
    }

    /// With [`Request::echo`], every prompt token's log-probability given those before it
    /// (the whole prompt's logits at once); then whether the request asks for no tokens at all
    /// (the context is full), which ends it.
    fn open(&mut self, id: usize, r: &Request, events: &mut Vec<Event>) -> Result<bool, String> {
        if let Some(n) = r.echo {
            let ids: Vec<i32> = r.prompt.iter().map(|&t| t as i32).collect();
            let tokens = vec![("tokens".to_string(), Tensor::ints(vec![1, ids.len()], ids))];
            let out = self.backend.run("logits", tokens)?;
            let l = out.get("logits").and_then(|t| t.reals()).ok_or("the logits plan gave no logits")?;
            if l.len() != r.prompt.len() * self.vocab {
                return Err(format!("the logits plan gave {} logits for {} tokens", l.len(), r.prompt.len()));
            }
            let rows = l.chunks(self.vocab);
            let scored = rows.zip(&r.prompt[1..]).map(|(row, &t)| Some(Logprobs::of(row, t, n)));
            events.push(Event::Prompt { id, logprobs: std::iter::once(None).chain(scored).collect() });
        }
        if r.max_new.min(self.context - r.prompt.len()) == 0 {
            events.push(Event::Done { id, finish: Finish::Length });
            return Ok(false);
        }
        Ok(true)
    }

    fn join(&mut self, slot: usize, id: usize, r: Request, events: &mut Vec<Event>) -> Result<(), String> {
        if !self.open(id, &r, events)? {
            return Ok(());
        }
        // The prompt's states go straight into the slot's rows (on the GPU, device to device);
        // a sequence that ends at its first token leaves them unread.
        let out = self.backend.run_joining(
            "prefill",
            prompt_tokens(&r.prompt),
            &self.carried,
            "decode",
            self.pool(),
            slot,
        )?;
        self.begin(slot, id, r, last_row(&out, self.vocab)?, events);
        Ok(())
    }

    /// Starts prefilling a long prompt in chunks: its first chunk from nothing, into the
    /// staging row, for `slot`.
    fn stage(&mut self, slot: usize, id: usize, r: Request, events: &mut Vec<Event>) -> Result<(), String> {
        if !self.open(id, &r, events)? {
            return Ok(());
        }
        let staging = self.slots.len();
        let first = prompt_tokens(&r.prompt[..self.chunk]);
        self.backend.run_joining("prefill", first, &self.carried, "decode", self.pool(), staging)?;
        self.staged = Some(Staged { id, slot, done: self.chunk, request: r });
        Ok(())
    }

    /// The staged prompt's next chunk, from the staging row's states; the last one writes into
    /// its slot, where it starts decoding. Returns the chunk's tokens.
    fn advance_staged(&mut self, events: &mut Vec<Event>) -> Result<usize, String> {
        let Staged { id, slot, request, done } = self.staged.take().expect("called with a staged prompt");
        let n = self.chunk.min(request.prompt.len() - done);
        let last = done + n == request.prompt.len();
        let mut inputs = prompt_tokens(&request.prompt[done..done + n]);
        if self.backend.program().plan("chunk").map_err(|e| e.0)?.input_type("pos").is_some() {
            inputs.push(("pos".to_string(), Tensor::ints(vec![1], vec![done as i32])));
        }
        let staging = self.slots.len();
        let into = if last { slot } else { staging };
        let out = self.backend.run_in_slot("chunk", inputs, &self.carried, "decode", self.pool(), staging, into)?;
        if last {
            self.begin(slot, id, request, last_row(&out, self.vocab)?, events);
        } else {
            self.staged = Some(Staged { id, slot, request, done: done + n });
        }
        Ok(n)
    }

    /// A prefilled prompt's first token, drawn from its last position's logits `row`; the
    /// sequence then decodes in `slot` unless that token ended it.
    fn begin(&mut self, slot: usize, id: usize, r: Request, row: &[f32], events: &mut Vec<Event>) {
        let mut live = Live {
            id,
            pos: r.prompt.len(),
            next: 0,
            produced: 0,
            max_new: r.max_new.min(self.context - r.prompt.len()),
            sampling: r.sampling,
            stop: r.stop,
            min_new: r.min_new,
            logprobs: r.logprobs,
        };
        let first = live.pick(row);
        let lp = r.logprobs.map(|n| Logprobs::of(row, first, n));
        if !self.emit(&mut live, first, lp, events) {
            self.slots[slot] = Some(live);
        }
    }

    /// Gives out `token`; whether the sequence ended with it.
    fn emit(&self, live: &mut Live, token: u32, logprobs: Option<Logprobs>, events: &mut Vec<Event>) -> bool {
        live.produced += 1;
        live.next = token;
        events.push(Event::Token { id: live.id, token, logprobs });
        let finish = if live.stop.contains(&token) {
            Some(Finish::Stop)
        } else if live.produced >= live.max_new {
            Some(Finish::Length)
        } else {
            None
        };
        if let Some(finish) = finish {
            events.push(Event::Done { id: live.id, finish });
        }
        finish.is_some()
    }

    /// The sequences a decode step runs: the first slots up to the last live one, padded to a
    /// power of two (so a GPU captures at most log2(slots) + 1 step graphs), at most the pool.
    fn step_batch(&self) -> usize {
        let last = self.slots.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        last.next_power_of_two().min(self.slots.len())
    }

    fn decode_step(&mut self, events: &mut Vec<Event>) -> Result<(), String> {
        let b = self.step_batch();
        let live = &self.slots[..b];
        let tokens: Vec<i32> = live.iter().map(|s| s.as_ref().map_or(0, |l| l.next as i32)).collect();
        let positions: Vec<usize> = live.iter().map(|s| s.as_ref().map_or(0, |l| l.pos)).collect();
        let inputs = decode_inputs(&self.decode, &mut BTreeMap::new(), tokens, &positions)?;
        let out = self.backend.run_carried("decode", inputs, &self.carried)?;
        let logits = out.get("logits").and_then(|t| t.reals()).ok_or("the decode plan gave no logits")?;
        let v = self.vocab;
        if logits.len() != b * v {
            return Err(format!("the decode plan gave {} logits for {b} sequences", logits.len()));
        }
        // Each row drawn on its own core (a full vocabulary per sequence: milliseconds for a
        // batch on one), each with its own counter, so the order of work changes nothing.
        let picks: Vec<Option<(u32, Option<Logprobs>)>> = {
            use rayon::prelude::*;
            self.slots[..b]
                .par_iter()
                .zip(logits.par_chunks(v))
                .map(|(slot, row)| {
                    slot.as_ref().map(|live| {
                        let token = live.pick(row);
                        (token, live.logprobs.map(|n| Logprobs::of(row, token, n)))
                    })
                })
                .collect()
        };
        for (s, pick) in picks.into_iter().enumerate() {
            let (Some(mut live), Some((token, lp))) = (self.slots[s].take(), pick) else { continue };
            live.pos += 1;
            if !self.emit(&mut live, token, lp, events) {
                self.slots[s] = Some(live);
            }
        }
        Ok(())
    }
}

/// A prompt as a plan's `tokens` input of one sequence.
fn prompt_tokens(prompt: &[u32]) -> Vec<(String, Tensor<f32>)> {
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    vec![("tokens".to_string(), Tensor::ints(vec![1, ids.len()], ids))]
}

/// The last position's logits of a plan's output.
fn last_row(out: &BTreeMap<String, Tensor<f32>>, vocab: usize) -> Result<&[f32], String> {
    let l = out.get("logits").and_then(|t| t.reals()).ok_or("the plan gave no logits")?;
    l.get(l.len().saturating_sub(vocab)..).filter(|r| r.len() == vocab).ok_or_else(|| "too few logits".to_string())
}
