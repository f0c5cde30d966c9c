//! The generation engine: a pool of slots, one per live sequence, all decoded together one
//! token per step (continuous batching). A request waits in a queue until a slot is free. It
//! joins by a prefill of its prompt alone, whose layer states go into its slot's rows of the
//! decode plan's carried states (constant bytes per sequence: Mamba's conv and SSM states,
//! each attention layer's ring of keys and values). Each step decodes the first slots up to
//! the last live one, padded to a power of two (fewer sequences take a smaller, faster step),
//! each at its own position (a free slot among them on a dummy token at position 0: its rows
//! are read by no one); it samples each live sequence with its own settings and draw counter,
//! and frees the slots of finished sequences for the next waiting requests. A sequence's tokens are those [`generate`] gives it
//! alone: on the CPU reference exactly, since no row of a batch reads another's.
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

pub struct Engine<'b> {
    backend: &'b mut dyn Backend,
    decode: Plan,
    carried: Vec<String>,
    vocab: usize,
    context: usize,
    slots: Vec<Option<Live>>,
    queue: VecDeque<(usize, Request)>,
    next_id: usize,
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
        Ok(Engine { backend, decode, carried, vocab, context, slots, queue: VecDeque::new(), next_id: 0 })
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
        match self.slots.iter_mut().find(|s| s.as_ref().is_some_and(|l| l.id == id)) {
            Some(s) => {
                *s = None;
                true
            }
            None => false,
        }
    }

    /// Sequences in slots.
    pub fn live(&self) -> usize {
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

    /// One step: waiting requests take the free slots (each prefilled, giving its first
    /// token), then one decode step for every live sequence.
    pub fn step(&mut self) -> Result<Vec<Event>, String> {
        let mut events = Vec::new();
        while let Some(slot) = self.slots.iter().position(Option::is_none) {
            let Some((id, r)) = self.queue.pop_front() else { break };
            self.join(slot, id, r, &mut events)?;
        }
        if self.live() > 0 {
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

    fn join(&mut self, slot: usize, id: usize, r: Request, events: &mut Vec<Event>) -> Result<(), String> {
        let ids: Vec<i32> = r.prompt.iter().map(|&t| t as i32).collect();
        let tokens = || vec![("tokens".to_string(), Tensor::ints(vec![1, ids.len()], ids.clone()))];
        if let Some(n) = r.echo {
            // Every position's logits: each prompt token scored given those before it.
            let out = self.backend.run("logits", tokens())?;
            let l = out.get("logits").and_then(|t| t.reals()).ok_or("the logits plan gave no logits")?;
            if l.len() != ids.len() * self.vocab {
                return Err(format!("the logits plan gave {} logits for {} tokens", l.len(), ids.len()));
            }
            let rows = l.chunks(self.vocab);
            let scored = rows.zip(&r.prompt[1..]).map(|(row, &t)| Some(Logprobs::of(row, t, n)));
            events.push(Event::Prompt { id, logprobs: std::iter::once(None).chain(scored).collect() });
        }
        let max_new = r.max_new.min(self.context - r.prompt.len());
        if max_new == 0 {
            events.push(Event::Done { id, finish: Finish::Length });
            return Ok(());
        }
        // The prompt's states go straight into the slot's rows (on the GPU, device to device);
        // a sequence that ends at its first token leaves them unread.
        let batch = self.slots.len();
        let out = self.backend.run_joining("prefill", tokens(), &self.carried, "decode", batch, slot)?;
        let row = last_row(&out, self.vocab)?;
        let mut live = Live {
            id,
            pos: r.prompt.len(),
            next: 0,
            produced: 0,
            max_new,
            sampling: r.sampling,
            stop: r.stop,
            min_new: r.min_new,
            logprobs: r.logprobs,
        };
        let first = live.pick(row);
        let lp = r.logprobs.map(|n| Logprobs::of(row, first, n));
        if self.emit(&mut live, first, lp, events) {
            return Ok(());
        }
        self.slots[slot] = Some(live);
        Ok(())
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

/// The last position's logits of a plan's output.
fn last_row(out: &BTreeMap<String, Tensor<f32>>, vocab: usize) -> Result<&[f32], String> {
    let l = out.get("logits").and_then(|t| t.reals()).ok_or("the plan gave no logits")?;
    l.get(l.len().saturating_sub(vocab)..).filter(|r| r.len() == vocab).ok_or_else(|| "too few logits".to_string())
}
