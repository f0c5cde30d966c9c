//! The CPU reference running whole programs: a tiny model's gradient against directional
//! finite differences in f64, and a few optimizer steps lowering the loss.

use std::path::Path;
use weft::program::{build_program, OptimizerSettings};
use weft_runtime::cpu::exec::{run, Store};
use weft_runtime::cpu::tensor::Tensor;
use weft_runtime::plan::Program;

/// Every mixer kind in one small model: Mamba, sliding and full attention (GQA, RoPE and NoPE),
/// GLA, RetNet and SwiGLU, with an untied head.
const EVERY_KIND: &str = "model every-kind { vocab = 32  width = 16  embeddings = untied }
layer m = mamba(d_state = 4)
layer swa = attention(heads = 4, kv_heads = 2, window = 3)
layer full = attention(heads = 2, rope = none)
layer g = gla(heads = 2)
layer r = retnet(heads = 2)
layer f = mlp(hidden = 24)
layers = [m, f, swa, g, full, r, f]
";

fn program(src: &str) -> (Program, weft::Checked) {
    program_for(src, 64)
}

/// The program of `src` with caches for `context` tokens of full attention.
fn program_for(src: &str, context: u64) -> (Program, weft::Checked) {
    let c = weft::check_str(Path::new("every-kind.weft"), src).unwrap_or_else(|f| panic!("{}", f.render()));
    let settings = OptimizerSettings::from_config(&weft::config::RunConfig::default());
    (build_program(&c.model, &settings, context).unwrap(), c)
}

fn batch(b: usize, t: usize, vocab: i32, seed: u64) -> Vec<(String, Tensor<f64>)> {
    let mut x = seed;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) % vocab as u64) as i32
    };
    let tokens: Vec<i32> = (0..b * t).map(|_| next()).collect();
    let targets: Vec<i32> = (0..b * t).map(|_| next()).collect();
    vec![("tokens".into(), Tensor::ints(vec![b, t], tokens)), ("targets".into(), Tensor::ints(vec![b, t], targets))]
}

fn eval_loss(p: &Program, store: &mut Store<f64>, inputs: &[(String, Tensor<f64>)]) -> f64 {
    let out = run(p.plan("eval").unwrap(), store, inputs.to_vec()).unwrap();
    out["loss"].item().unwrap()
}

#[test]
fn whole_model_gradient_matches_directional_finite_differences() {
    let (p, _) = program(EVERY_KIND);
    let mut store: Store<f64> = Store::init(&p, 11);
    let inputs = batch(2, 7, 32, 5);
    let mut train_inputs = inputs.clone();
    train_inputs.push(("loss_scale".into(), Tensor::scalar(1.0)));
    run(p.plan("train_step").unwrap(), &mut store, train_inputs).unwrap();

    // One random direction per parameter tensor; check each tensor's directional derivative.
    let mut worst: f64 = 0.0;
    for (i, spec) in p.params.iter().enumerate() {
        let grad = store.get(&format!("grad_acc:{}", spec.name)).unwrap().reals().unwrap().to_vec();
        let n = grad.len();
        let dir: Vec<f64> = (0..n).map(|k| ((k * 7919 + i * 104729) as f64 * 0.618).sin()).collect();
        let analytic: f64 = grad.iter().zip(&dir).map(|(g, d)| g * d).sum();
        let base = store.get(&spec.name).unwrap().clone();
        // Central differences: truncation O(eps²) and rounding ~1e-16·loss/eps ≈ 4e-10, which
        // bounds how well a tiny derivative can be checked.
        let eps = 1e-6;
        let mut at = |sign: f64| {
            let mut moved = base.clone();
            for (x, d) in moved.reals_mut().unwrap().iter_mut().zip(&dir) {
                *x += sign * eps * d;
            }
            store.tensors.insert(spec.name.clone(), moved);
            eval_loss(&p, &mut store, &inputs)
        };
        let fd = (at(1.0) - at(-1.0)) / (2.0 * eps);
        store.tensors.insert(spec.name.clone(), base);
        let err = (analytic - fd).abs() / fd.abs();
        assert!(
            (analytic - fd).abs() <= 1e-5 * fd.abs() + 2e-9,
            "{}: analytic {analytic:e} vs finite differences {fd:e} (rel {err:e})",
            spec.name
        );
        worst = worst.max(err);
    }
    eprintln!("worst directional-derivative rel error over {} tensors: {worst:e}", p.params.len());
}

#[test]
fn optimizer_steps_lower_the_loss_on_a_repeated_batch() {
    let (p, _) = program(EVERY_KIND);
    let mut store: Store<f64> = Store::init(&p, 3);
    let inputs = batch(2, 8, 32, 9);
    let mut losses = Vec::new();
    for step in 0..8 {
        let mut ti = inputs.clone();
        ti.push(("loss_scale".into(), Tensor::scalar(1.0)));
        let out = run(p.plan("train_step").unwrap(), &mut store, ti).unwrap();
        losses.push(out["loss"].item().unwrap());
        let o =
            run(p.plan("optimizer_step").unwrap(), &mut store, vec![("step".into(), Tensor::ints(vec![], vec![step]))])
                .unwrap();
        // The accumulators were reset for the next step.
        assert!(store.get("grad_acc:embed.weight").unwrap().reals().unwrap().iter().all(|&x| x == 0.0));
        assert!(o["lr"].item().unwrap() > 0.0);
    }
    assert!(losses[7] < losses[0] - 0.1, "{losses:?}");
}

#[test]
fn plans_refuse_wrong_inputs_with_clear_errors() {
    let (p, _) = program(EVERY_KIND);
    let mut store: Store<f64> = Store::init(&p, 3);
    let eval = p.plan("eval").unwrap();
    let e = run(eval, &mut store, vec![]).unwrap_err();
    assert_eq!(e.0, "plan `eval` needs input `tokens`");
    let mut bad = batch(2, 4, 32, 1);
    bad[1].1 = Tensor::ints(vec![2, 5], vec![0; 10]);
    let e = run(eval, &mut store, bad).unwrap_err();
    assert_eq!(e.0, "input `targets`: T is 5 here but 4 elsewhere");
    let mut bad = batch(2, 4, 32, 1);
    bad[0].1 = Tensor::ints(vec![2, 4], vec![40; 8]);
    let e = run(eval, &mut store, bad).unwrap_err();
    assert!(e.0.contains("token id 40 at position 0 is outside the vocabulary of 32"), "{}", e.0);
}

fn logits_of(out: &std::collections::BTreeMap<String, Tensor<f64>>) -> Vec<f64> {
    out["logits"].reals().unwrap().to_vec()
}

#[test]
fn step_by_step_decoding_matches_the_full_forward_pass() {
    // A window of 3 makes the SWA ring buffer wrap; the full-attention cache holds 16.
    let (p, _) = program(EVERY_KIND);
    let mut store: Store<f64> = Store::init(&p, 21);
    let (b, t, t0, vocab) = (2, 11, 4, 32);
    let inputs = batch(b, t, 32, 77);
    let tokens = inputs[0].1.ints_ref().unwrap().to_vec();
    let full = logits_of(&run(p.plan("logits").unwrap(), &mut store, vec![inputs[0].clone()]).unwrap());
    let at = |pos: usize, row: usize| &full[(row * t + pos) * vocab..(row * t + pos + 1) * vocab];

    let prompt: Vec<i32> = (0..b).flat_map(|r| tokens[r * t..r * t + t0].to_vec()).collect();
    let mut out =
        run(p.plan("prefill").unwrap(), &mut store, vec![("tokens".into(), Tensor::ints(vec![b, t0], prompt))])
            .unwrap();
    // The prefill returns each sequence's last position only.
    let prefill = logits_of(&out);
    assert_eq!(prefill.len(), b * vocab);
    for row in 0..b {
        let got = &prefill[row * vocab..(row + 1) * vocab];
        assert!(got.iter().zip(at(t0 - 1, row)).all(|(a, b)| (a - b).abs() < 1e-10), "prefill row {row}");
    }
    let decode = p.plan("decode").unwrap();
    let state_names: Vec<String> =
        decode.inputs.iter().map(|(n, _)| n.clone()).filter(|n| n.starts_with("state:")).collect();
    assert_eq!(state_names.len(), 2 + 2 + 2 + 1 + 1, "{state_names:?}");
    for pos in t0..t {
        let mut inp: Vec<(String, Tensor<f64>)> =
            state_names.iter().map(|n| (n.clone(), out.remove(n).unwrap())).collect();
        let step: Vec<i32> = (0..b).map(|r| tokens[r * t + pos]).collect();
        inp.push(("tokens".into(), Tensor::ints(vec![b, 1], step)));
        inp.push(("pos".into(), Tensor::ints(vec![b], vec![pos as i32; b])));
        out = run(decode, &mut store, inp).unwrap();
        let got = logits_of(&out);
        for row in 0..b {
            let err = got[row * vocab..(row + 1) * vocab]
                .iter()
                .zip(at(pos, row))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-10, "decode row {row} position {pos}: max abs difference {err:e}");
        }
    }
}

/// Generation keeps the layer states inside the backend from step to step (on the GPU, on
/// the device): the steps must be exactly those of states handed back and forth by the caller,
/// past the sliding window's wrap, and nothing may be carried before it was given once.
#[test]
fn carried_states_give_the_steps_of_states_passed_by_the_caller() {
    use weft_runtime::backend::{Backend, CpuBackend};
    use weft_runtime::generate::{decode_inputs, state_names};
    let (p, _) = program(EVERY_KIND);
    let decode = p.plan("decode").unwrap().clone();
    let carried = state_names(&decode);
    assert_eq!(carried.len(), 8, "{carried:?}");
    let mut by_caller = CpuBackend::new(p.clone(), 5);
    let mut kept = CpuBackend::new(p, 5);
    let step = |toks: Vec<i32>, pos: i32| {
        vec![
            ("tokens".to_string(), Tensor::ints(vec![2, 1], toks)),
            ("pos".to_string(), Tensor::ints(vec![], vec![pos])),
        ]
    };
    let e = kept.run_carried("decode", step(vec![1, 2], 0), &carried).unwrap_err();
    assert!(e.contains("no carried `state:"), "{e}");
    let prompt = Tensor::ints(vec![2, 5], (0..10).map(|i| i * 7 % 32).collect());
    let mut a = by_caller.run("prefill", vec![("tokens".into(), prompt.clone())]).unwrap();
    let mut b = kept.run("prefill", vec![("tokens".into(), prompt)]).unwrap();
    // The window of 3 wraps three times in nine steps.
    for i in 0..9 {
        let toks = vec![(i * 5 % 32) as i32, (i * 11 % 32) as i32];
        a = by_caller.run("decode", decode_inputs(&decode, &mut a, toks.clone(), &[5 + i]).unwrap()).unwrap();
        b = kept.run_carried("decode", decode_inputs(&decode, &mut b, toks, &[5 + i]).unwrap(), &carried).unwrap();
        assert_eq!(a["logits"], b["logits"], "step {i}");
        assert!(b.keys().all(|k| !k.starts_with("state:")), "{:?}", b.keys());
    }
}

/// Token ids are checked where they enter a plan, naming the input, the place, the id and the
/// vocabulary (the GPU executor calls the same check before it uploads anything).
#[test]
fn token_ids_outside_the_vocabulary_are_refused_where_they_enter() {
    use weft_runtime::backend::{Backend, CpuBackend};
    let (p, _) = program(EVERY_KIND);
    let mut be = CpuBackend::new(p.clone(), 1);
    let mut inputs: Vec<(String, Tensor<f32>)> = batch(2, 5, 32, 3).into_iter().map(|(n, t)| (n, t.cast())).collect();
    assert!(be.run("eval", inputs.clone()).is_ok());
    let set = |inputs: &mut Vec<(String, Tensor<f32>)>, which: usize, at: usize, id: i32| {
        if let weft_runtime::cpu::tensor::Data::Int(v) = &mut inputs[which].1.data {
            v[at] = id;
        }
    };
    set(&mut inputs, 0, 7, 32);
    let e = be.run("eval", inputs.clone()).unwrap_err();
    assert!(e.contains("input `tokens`") && e.contains("token id 32 at sequence 1, position 2"), "{e}");
    assert!(e.contains("vocabulary of 32 ids"), "{e}");
    set(&mut inputs, 0, 7, -1);
    let e = be.run("eval", inputs.clone()).unwrap_err();
    assert!(e.contains("token id -1"), "{e}");
    // Targets may be -1 (no target there), nothing else outside the vocabulary.
    set(&mut inputs, 0, 7, 3);
    set(&mut inputs, 1, 0, -1);
    assert!(be.run("eval", inputs.clone()).is_ok());
    set(&mut inputs, 1, 0, -2);
    let e = be.run("eval", inputs.clone()).unwrap_err();
    assert!(e.contains("input `targets`") && e.contains("token id -2") && e.contains("or -1 for no target"), "{e}");
    // The decode plan's one token per sequence.
    let decode = p.plan("decode").unwrap();
    let t = weft_runtime::plan::TokenInput { name: "tokens".into(), vocab: 32, targets: false };
    assert!(decode.token_inputs().contains(&t));
    let bad = vec![("tokens".to_string(), Tensor::<f32>::ints(vec![1, 1], vec![99]))];
    let e = decode.check_token_ids(&bad).unwrap_err().0;
    assert!(e.contains("token id 99"), "{e}");
}

/// Evaluation of a number of windows that is not a multiple of the batch: the last batch is
/// padded with rows that have no target, and the result is the mean over the real windows.
#[test]
fn evaluation_takes_any_number_of_windows() {
    use weft_runtime::backend::{Backend, CpuBackend};
    use weft_runtime::data::Windows;
    let (p, _) = program(EVERY_KIND);
    let mut be = CpuBackend::new(p, 4);
    let (seq, batch) = (6, 4);
    // 5 windows of 6 tokens (+1): batches of 4 and 1 (padded with 3 empty rows).
    let tokens: Vec<u32> = (0..5 * seq as u32 + 1).map(|i| (i * 7 + i / 3) % 32).collect();
    let w = Windows::new(tokens, seq, Path::new("test windows")).unwrap();
    assert_eq!(w.count(), 5);
    let got = weft_runtime::train::evaluate(&mut be, &w, batch, seq, 2).unwrap();
    // Each window alone.
    let mut sum = 0.0;
    for i in 0..5 {
        let (x, y) = w.window(i);
        let inputs = vec![
            ("tokens".to_string(), Tensor::ints(vec![1, seq], x.iter().map(|&v| v as i32).collect())),
            ("targets".to_string(), Tensor::ints(vec![1, seq], y.iter().map(|&v| v as i32).collect())),
        ];
        sum += be.run("eval", inputs).unwrap()["loss"].item().unwrap() as f64;
    }
    let want = sum / 5.0;
    // Each window's loss is the same sum of the same terms alone or in a batch; the means
    // differ only by f32 rounding of the per-batch means (a few ulps of a value near ln 32).
    assert!((got - want).abs() <= 8.0 * f32::EPSILON as f64 * want, "{got} vs {want}");
    // The padded last batch alone: one window plus three empty rows is that window's loss.
    let (x, y) = w.window(4);
    let mut xs: Vec<i32> = x.iter().map(|&v| v as i32).collect();
    let mut ys: Vec<i32> = y.iter().map(|&v| v as i32).collect();
    xs.resize(batch * seq, 0);
    ys.resize(batch * seq, -1);
    let padded = be
        .run(
            "eval",
            vec![
                ("tokens".into(), Tensor::ints(vec![batch, seq], xs)),
                ("targets".into(), Tensor::ints(vec![batch, seq], ys)),
            ],
        )
        .unwrap()["loss"]
        .item()
        .unwrap();
    let alone = be
        .run(
            "eval",
            vec![
                ("tokens".into(), Tensor::ints(vec![1, seq], x.iter().map(|&v| v as i32).collect())),
                ("targets".into(), Tensor::ints(vec![1, seq], y.iter().map(|&v| v as i32).collect())),
            ],
        )
        .unwrap()["loss"]
        .item()
        .unwrap();
    assert_eq!(padded.to_bits(), alone.to_bits(), "padded {padded} vs alone {alone}");
    // A batch with no target at all has loss 0 (not NaN).
    let none = be
        .run(
            "eval",
            vec![
                ("tokens".into(), Tensor::ints(vec![1, seq], vec![0; seq])),
                ("targets".into(), Tensor::ints(vec![1, seq], vec![-1; seq])),
            ],
        )
        .unwrap()["loss"]
        .item()
        .unwrap();
    assert_eq!(none, 0.0);
}

/// The GPU check's rule, run on the CPU: a run rounding to bf16 where the GPU does errs against
/// f64 by about bf16's rounding (and every value it stores as bf16 is one), the exact f32
/// reference errs far less and passes the rule against it, and a wrong last row fails the rule
/// through the worst-row error even where the norm-relative error hides it.
#[test]
fn the_gpu_checks_rule_measures_rounding_and_catches_a_wrong_row() {
    use weft_runtime::backend::{Backend, CpuBackend};
    use weft_runtime::cpu::exec::{run_rounded, Rounding};
    use weft_runtime::cuda::check::{errors, Errors, Row};
    // Tensor-core-shaped attention (heads of 64) with a window shorter than the 70 tokens.
    let src = "model check-rule { vocab = 64  width = 64 }
layer m = mamba(d_state = 4)
layer a = attention(heads = 1, head_dim = 64, window = 24)
layer f = mlp(hidden = 96)
layers = [m, f, a, f]
";
    let (p, _) = program(src);
    let inputs: Vec<(String, Tensor<f32>)> = batch(2, 70, 64, 9).into_iter().map(|(n, t)| (n, t.cast())).collect();
    let logits = |be: &mut CpuBackend| {
        be.run("logits", vec![inputs[0].clone()]).unwrap()["logits"]
            .reals()
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect::<Vec<f64>>()
    };
    let (mut emu, mut exact, mut f32) =
        (CpuBackend::new_like_gpu(p.clone(), 3), CpuBackend::new_f64(p.clone(), 3), CpuBackend::new(p.clone(), 3));
    let (e, x, f) = (logits(&mut emu), logits(&mut exact), logits(&mut f32));
    let row = |got: &[f64], emu_err: Errors| Row { what: "logits".into(), gpu: errors(got, &x, 64), emu: emu_err };
    let emu_err = errors(&e, &x, 64);
    // bf16 keeps 8 bits: rounding alone costs between 2^-12 and 2^-6 here.
    assert!(emu_err.norm_rel > 2f64.powi(-12) && emu_err.norm_rel < 2f64.powi(-6), "{emu_err:?}");
    let exact_f32 = row(&f, emu_err);
    assert!(exact_f32.gpu.norm_rel < 2f64.powi(-16), "{:?}", exact_f32.gpu);
    assert!(exact_f32.passed());
    // The last position of the second sequence computed from a wrong key range: off by 5%.
    let mut wrong = f.clone();
    let n = wrong.len();
    for v in &mut wrong[n - 64..] {
        *v *= 1.05;
    }
    let bad = row(&wrong, emu_err);
    assert!(bad.gpu.norm_rel < 4.0 * emu_err.norm_rel, "the norm hides one row: {:?}", bad.gpu);
    assert!(!bad.passed(), "{:?} vs {:?}", bad.gpu, emu_err);

    // Every value the training step stores as bf16 is a bf16 number in the emulating run.
    let plan = p.plan("train_step").unwrap();
    let mut store = weft_runtime::cpu::exec::Store::<f32>::init(&p, 3);
    let mut train = inputs.clone();
    train.push(("loss_scale".into(), Tensor::scalar(1.0)));
    let mut checked = 0;
    let mut observe = |i: usize, _: &[&Tensor<f32>], outs: &[Tensor<f32>]| {
        for (v, t) in plan.steps[i].outputs.iter().zip(outs) {
            if plan.values[*v as usize].dtype == weft_runtime::DType::BF16 {
                for &x in t.reals().unwrap() {
                    assert_eq!(x, half::bf16::from_f32(x).to_f32(), "step {i} stores a value bf16 cannot hold");
                }
                checked += 1;
            }
        }
    };
    run_rounded(plan, &mut store, train, Rounding::LikeGpu, &mut observe).unwrap();
    assert!(checked > 20, "{checked} bf16 outputs");
    // The tensor-core attention rounds its operands; heads of 256 run in f32 on the GPU.
    let attn = |hd| weft_runtime::op::AttentionAttrs {
        heads: 1,
        kv_heads: 1,
        head_dim: hd,
        window: None,
        rope: None,
        self_extend: None,
    };
    assert!(attn(64).on_tensor_cores(true) && attn(128).on_tensor_cores(true));
    assert!(!attn(256).on_tensor_cores(true) && !attn(64).on_tensor_cores(false));
}

/// Sequences at different positions decode together exactly as each decodes alone: every
/// layer that reads a position (attention's RoPE, ring slot and window; retention's RoPE)
/// reads its own sequence's, and the window of 3 wraps at different steps for the two.
#[test]
fn sequences_at_different_positions_decode_together_as_each_alone() {
    use std::collections::BTreeMap;
    use weft_runtime::backend::{Backend, CpuBackend};
    use weft_runtime::generate::{decode_inputs, state_names};
    let (p, _) = program(EVERY_KIND);
    let decode = p.plan("decode").unwrap().clone();
    let names = state_names(&decode);
    let mut be = CpuBackend::new(p, 9);
    let prompts: [Vec<i32>; 2] = [(0..3).map(|i| i * 5 % 32).collect(), (0..8).map(|i| i * 3 % 32 + 1).collect()];
    let next = |s: usize, i: usize| ((s * 7 + i * 11) % 32) as i32;
    let steps = 6;
    let prefilled: Vec<BTreeMap<String, Tensor<f32>>> = prompts
        .iter()
        .map(|pr| be.run("prefill", vec![("tokens".into(), Tensor::ints(vec![1, pr.len()], pr.clone()))]).unwrap())
        .collect();
    let mut alone = Vec::new();
    for (s, pr) in prompts.iter().enumerate() {
        let mut out = prefilled[s].clone();
        let mut logits = Vec::new();
        for i in 0..steps {
            let inputs = decode_inputs(&decode, &mut out, vec![next(s, i)], &[pr.len() + i]).unwrap();
            out = be.run("decode", inputs).unwrap();
            logits.push(out["logits"].reals().unwrap().to_vec());
        }
        alone.push(logits);
    }
    // Both sequences' states stacked along the batch, decoded as one batch of two.
    let mut out: BTreeMap<String, Tensor<f32>> = names
        .iter()
        .map(|n| {
            let (a, b) = (&prefilled[0][n], &prefilled[1][n]);
            let mut shape = a.shape.clone();
            shape[0] = 2;
            (n.clone(), Tensor::real(shape, [a.reals().unwrap(), b.reals().unwrap()].concat()))
        })
        .collect();
    for (i, (first, second)) in alone[0].iter().zip(&alone[1]).enumerate() {
        let pos = [prompts[0].len() + i, prompts[1].len() + i];
        out = be.run("decode", decode_inputs(&decode, &mut out, vec![next(0, i), next(1, i)], &pos).unwrap()).unwrap();
        let l = out["logits"].reals().unwrap();
        let v = l.len() / 2;
        assert_eq!(&l[..v], &first[..], "sequence 0, step {i}");
        assert_eq!(&l[v..], &second[..], "sequence 1, step {i}");
    }
}

/// The engine's continuous batching gives every request exactly the tokens it gets alone:
/// four requests of different prompt lengths (one sampled, one that meets a stop token, one
/// that the context cuts short) through two slots, so requests wait, join as others finish,
/// and decode beside sequences at other positions.
#[test]
fn the_engine_gives_each_request_the_tokens_it_gets_alone() {
    use weft_runtime::backend::CpuBackend;
    use weft_runtime::engine::{Engine, Event, Finish, Request};
    use weft_runtime::generate::{generate, Sampling};
    let (p, _) = program(EVERY_KIND);
    let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
    let warm = Sampling { temperature: 0.9, top_p: 0.9, top_k: 0, seed: 17 };
    let prompt = |n: usize, k: u32| (0..n as u32).map(|i| (i * k + 1) % 32).collect::<Vec<u32>>();
    // What the first request produces alone, to pick a stop token it meets before its end.
    let alone = |r: &Request| {
        let mut be = CpuBackend::new(p.clone(), 3);
        let stop = r.stop.first().copied();
        generate(&mut be, &r.prompt, r.max_new.min(64 - r.prompt.len()), &r.sampling, stop, |_| true).unwrap()
    };
    let mut reqs = vec![
        Request::new(prompt(5, 3), 12, greedy.clone(), vec![]),
        Request::new(prompt(9, 5), 7, warm, vec![]),
        Request::new(prompt(3, 7), 20, greedy.clone(), vec![]),
        // 60 of the 64 positions: the context leaves 4 new tokens.
        Request::new(prompt(60, 11), 30, greedy, vec![]),
    ];
    let third = alone(&reqs[2]);
    reqs[2].stop = vec![third[4]];
    let want: Vec<Vec<u32>> = reqs.iter().map(alone).collect();
    assert!(want[2].len() <= 5 && want[2].len() < 20, "the stop token ends request 2 early: {:?}", want[2]);
    assert_eq!(want[3].len(), 4);
    // Two slots (requests wait), three (a step of three), five (a step of four while all are
    // live, of fewer as the shorter ones end and the last live slot moves down).
    for slots in [2, 3, 5] {
        let mut be = CpuBackend::new(p.clone(), 3);
        let mut engine = Engine::new(&mut be, slots, 64).unwrap();
        for r in &reqs {
            engine.submit(r.clone()).unwrap();
        }
        let mut done = Vec::new();
        let mut most_live = 0;
        let mut got: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
        while !engine.idle() {
            for e in engine.step().unwrap() {
                match e {
                    Event::Token { id, token, .. } => got.entry(id).or_default().push(token),
                    Event::Done { id, finish } => done.push((id, finish)),
                    Event::Prompt { .. } => panic!("no request asked for its prompt's log-probabilities"),
                }
            }
            most_live = most_live.max(engine.live());
        }
        for (id, w) in want.iter().enumerate() {
            assert_eq!(&got[&id], w, "request {id}, {slots} slots");
        }
        assert_eq!(most_live, slots.min(4));
        done.sort_by_key(|d| d.0);
        assert_eq!(done, vec![(0, Finish::Length), (1, Finish::Length), (2, Finish::Stop), (3, Finish::Length)]);
    }
}

/// A cancelled request frees its slot for the next one at once, and bad requests are refused
/// with the reason.
#[test]
fn the_engine_frees_a_cancelled_slot_and_refuses_bad_requests() {
    use weft_runtime::backend::CpuBackend;
    use weft_runtime::engine::{Engine, Event, Request};
    use weft_runtime::generate::Sampling;
    let (p, _) = program(EVERY_KIND);
    let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
    let req = |prompt: Vec<u32>| Request::new(prompt, 10, greedy.clone(), vec![]);
    let mut be = CpuBackend::new(p, 3);
    let mut engine = Engine::new(&mut be, 1, 64).unwrap();
    let bad = |e: Result<usize, String>| e.unwrap_err();
    assert!(bad(engine.submit(req(vec![]))).contains("empty"));
    assert!(bad(engine.submit(req(vec![1, 32]))).contains("token id 32"));
    assert!(bad(engine.submit(req(vec![1; 64]))).contains("context of 64"));
    let bad_sampling = Request { sampling: Sampling { top_p: 0.0, ..greedy.clone() }, ..req(vec![1]) };
    assert!(bad(engine.submit(bad_sampling)).contains("top-p"));
    assert!(bad(engine.submit(Request { logprobs: Some(21), ..req(vec![1]) })).contains("at most 20"));
    let a = engine.submit(req(vec![1, 2, 3])).unwrap();
    let b = engine.submit(req(vec![4, 5])).unwrap();
    let first = engine.step().unwrap();
    assert!(first.iter().all(|e| matches!(e, Event::Token { id, .. } if *id == a)));
    assert_eq!((engine.live(), engine.waiting()), (1, 1));
    assert!(engine.cancel(a));
    assert!(!engine.cancel(a));
    let next = engine.step().unwrap();
    assert!(!next.is_empty() && next.iter().all(|e| matches!(e, Event::Token { id, .. } if *id == b)));
    assert!(engine.cancel(b));
    assert!(engine.idle());
}

/// The `score` plan gives each position's log-probability of its target: the log-softmax of
/// the `logits` plan's row at the target, 0 where the target is masked (-1), over more
/// positions than one chunk of the head holds.
#[test]
fn the_score_plan_gives_each_targets_log_probability() {
    let (p, _) = program(EVERY_KIND);
    let mut store: Store<f64> = Store::init(&p, 5);
    let vocab = 32;
    // 300 positions: the head's chunks of 256 rows end mid-batch.
    let (b, t) = (5, 60);
    let mut inputs = batch(b, t, vocab as i32, 41);
    let tokens = inputs[0].clone();
    let targets = inputs[1].1.ints_ref().unwrap().to_vec();
    let mut masked = targets.clone();
    masked[3] = -1;
    masked[b * t - 1] = -1;
    inputs[1] = ("targets".into(), Tensor::ints(vec![b, t], masked.clone()));
    let logits = logits_of(&run(p.plan("logits").unwrap(), &mut store, vec![tokens]).unwrap());
    let out = run(p.plan("score").unwrap(), &mut store, inputs).unwrap();
    let lp = out["logprobs"].reals().unwrap();
    assert_eq!(out["logprobs"].shape, vec![b, t]);
    for (i, &target) in masked.iter().enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
        let want = if target < 0 { 0.0 } else { row[target as usize] - lse };
        assert!((lp[i] - want).abs() < 1e-12, "position {i}: {} against {want}", lp[i]);
        assert!(target < 0 || lp[i] < 0.0);
    }
}

/// Each token's log-probability as the engine reports it is the score plan's for the same
/// text (a full forward pass instead of decode steps), and its alternatives are the most
/// likely tokens in order, the greedy token first. On the f64 reference both sides differ by
/// the f32 rounding of the logits the engine reads (each within |z|·2⁻²⁴, so the log-softmax
/// within 2·max|z|·2⁻²⁴) and of the two results.
#[test]
fn the_engine_reports_each_tokens_log_probability() {
    use weft_runtime::backend::{Backend, CpuBackend};
    use weft_runtime::engine::{Engine, Event, Request};
    use weft_runtime::generate::Sampling;
    let (p, _) = program(EVERY_KIND);
    let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
    let prompt: Vec<u32> = vec![3, 9, 27, 17, 4, 12];
    let mut be = CpuBackend::new_f64(p, 8);
    let mut engine = Engine::new(&mut be, 2, 64).unwrap();
    let r = Request { logprobs: Some(3), echo: Some(2), ..Request::new(prompt.clone(), 9, greedy, vec![]) };
    engine.submit(r).unwrap();
    let mut got = Vec::new();
    let mut scored = Vec::new();
    while !engine.idle() {
        for e in engine.step().unwrap() {
            match e {
                Event::Token { token, logprobs, .. } => got.push((token, logprobs.unwrap())),
                Event::Prompt { logprobs, .. } => scored = logprobs,
                Event::Done { .. } => {}
            }
        }
    }
    drop(engine);
    assert_eq!(got.len(), 9);
    let text: Vec<i32> = prompt.iter().chain(got.iter().map(|g| &g.0)).map(|&t| t as i32).collect();
    let n = text.len() - 1;
    let tokens = Tensor::ints(vec![1, n], text[..n].to_vec());
    let logits = be.run("logits", vec![("tokens".into(), tokens.clone())]).unwrap();
    let zmax = logits["logits"].reals().unwrap().iter().fold(0f32, |m, z| m.max(z.abs())) as f64;
    let targets = Tensor::ints(vec![1, n], text[1..].to_vec());
    let out = be.run("score", vec![("tokens".into(), tokens), ("targets".into(), targets)]).unwrap();
    let score = out["logprobs"].reals().unwrap();
    for (i, (token, lp)) in got.iter().enumerate() {
        let want = score[prompt.len() - 1 + i] as f64;
        let tol = 2.0 * zmax * 2f64.powi(-24) + 2.0 * want.abs() * 2f64.powi(-24) + 1e-9;
        assert!((lp.logprob as f64 - want).abs() <= tol, "token {i}: {} against {want}", lp.logprob);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0], (*token, lp.logprob), "token {i}: greedy takes the most likely");
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "token {i}: {:?}", lp.top);
        assert!(lp.top.iter().map(|t| (t.1 as f64).exp()).sum::<f64>() <= 1.0 + 1e-6);
    }
    // With echo, each prompt token's log-probability given those before it (none for the
    // first), before any new token.
    assert_eq!(scored.len(), prompt.len());
    assert!(scored[0].is_none());
    for (j, lp) in scored.iter().enumerate().skip(1) {
        let lp = lp.as_ref().unwrap();
        let want = score[j - 1] as f64;
        let tol = 2.0 * zmax * 2f64.powi(-24) + 2.0 * want.abs() * 2f64.powi(-24) + 1e-9;
        assert!((lp.logprob as f64 - want).abs() <= tol, "prompt token {j}: {} against {want}", lp.logprob);
        assert_eq!(lp.top.len(), 2);
        assert!(lp.top[0].1 >= lp.logprob);
    }
}

/// Stop tokens are out of the draw until `min_new` tokens are out: a stop token the sequence
/// meets at once alone is not drawn before then, and the tokens before it do not change.
#[test]
fn the_engine_draws_no_stop_token_before_min_new() {
    use weft_runtime::backend::CpuBackend;
    use weft_runtime::engine::{Engine, Request};
    use weft_runtime::generate::Sampling;
    let (p, _) = program(EVERY_KIND);
    let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
    let prompt: Vec<u32> = vec![3, 9, 27, 17];
    let run = |r: Request| {
        let mut be = CpuBackend::new(p.clone(), 3);
        let mut engine = Engine::new(&mut be, 1, 64).unwrap();
        engine.submit(r).unwrap();
        engine.run_to_end(|_| {}).unwrap().remove(&0).unwrap()
    };
    let free = run(Request::new(prompt.clone(), 12, greedy.clone(), vec![]));
    let stop = free[1];
    let k = free.iter().position(|&t| t == stop).unwrap();
    assert_eq!(run(Request::new(prompt.clone(), 12, greedy.clone(), vec![stop])), free[..=k]);
    let min = 6;
    let late = run(Request { min_new: min, ..Request::new(prompt.clone(), 12, greedy.clone(), vec![stop]) });
    assert!(late.len() >= min && !late[..min].contains(&stop), "{late:?} (stop {stop})");
    assert_eq!(late[..k], free[..k]);
    assert!(late.len() == 12 || late.last() == Some(&stop), "{late:?}");
    let bad = Request { min_new: 13, ..Request::new(prompt, 12, greedy, vec![stop]) };
    let mut be = CpuBackend::new(p, 3);
    assert!(Engine::new(&mut be, 1, 64).unwrap().submit(bad).unwrap_err().contains("at least 13"));
}

/// Zeros for each state input of `plan` at `b` sequences: where a sequence starts.
fn zero_states(plan: &weft_runtime::plan::Plan, b: usize) -> Vec<(String, Tensor<f64>)> {
    plan.inputs
        .iter()
        .filter(|(n, _)| n.starts_with("state:"))
        .map(|(n, _)| {
            let ty = plan.input_type(n).unwrap();
            let shape: Vec<usize> =
                std::iter::once(b).chain(ty.shape.0[1..].iter().map(|d| d.to_string().parse().unwrap())).collect();
            let len = shape.iter().product();
            (n.clone(), Tensor::real(shape, vec![0.0; len]))
        })
        .collect()
}

/// A prompt prefilled a chunk at a time from the carried states gives, at every chunk's end,
/// the logits of the whole prompt's forward pass, and each position's log-probability of its
/// target as the score plan gives it, for chunks of 1, of the window ± 1 (the ring of 3 wraps
/// inside a chunk and across chunks), of 63, 64 and 100 (ends that are not multiples of the
/// 230-token prompt). Both sides compute in f64 and differ only in the order of their sums
/// (token by token against whole-sequence kernels), each within a few ulps of values of order
/// 10 after some hundred terms: 1e-10 leaves a margin of 10⁴ over that.
#[test]
fn chunked_prefill_reproduces_the_unchunked_logits() {
    let (p, _) = program_for(EVERY_KIND, 256);
    let mut store: Store<f64> = Store::init(&p, 13);
    let (b, t, vocab) = (2, 230, 32);
    let inputs = batch(b, t, vocab as i32, 91);
    let tokens = inputs[0].1.ints_ref().unwrap().to_vec();
    let targets = inputs[1].1.ints_ref().unwrap().to_vec();
    let full = logits_of(&run(p.plan("logits").unwrap(), &mut store, vec![inputs[0].clone()]).unwrap());
    let scored =
        run(p.plan("score").unwrap(), &mut store, inputs.clone()).unwrap()["logprobs"].reals().unwrap().to_vec();
    let (chunk, chunk_score) = (p.plan("chunk").unwrap(), p.plan("chunk_score").unwrap());
    let cols = |v: &[i32], from: usize, n: usize| -> Vec<i32> {
        (0..b).flat_map(|r| v[r * t + from..r * t + from + n].to_vec()).collect()
    };
    for size in [1, 2, 4, 63, 64, 100] {
        let mut states = zero_states(chunk, b);
        let mut start = 0;
        while start < t {
            let n = size.min(t - start);
            let mut inp = states.clone();
            inp.push(("tokens".into(), Tensor::ints(vec![b, n], cols(&tokens, start, n))));
            inp.push(("pos".into(), Tensor::ints(vec![b], vec![start as i32; b])));
            let mut with_targets = inp.clone();
            with_targets.push(("targets".into(), Tensor::ints(vec![b, n], cols(&targets, start, n))));
            let mut out = run(chunk, &mut store, inp).unwrap();
            let mut sout = run(chunk_score, &mut store, with_targets).unwrap();
            let last = logits_of(&out);
            let lp = sout["logprobs"].reals().unwrap().to_vec();
            for r in 0..b {
                let at = r * t + start + n - 1;
                let want = &full[at * vocab..(at + 1) * vocab];
                let err =
                    last[r * vocab..(r + 1) * vocab].iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(err < 1e-10, "chunks of {size}, row {r}, position {}: logits differ by {err:e}", start + n - 1);
                for i in 0..n {
                    let (got, want) = (lp[r * n + i], scored[r * t + start + i]);
                    assert!(
                        (got - want).abs() < 1e-10,
                        "chunks of {size}, row {r}, position {}: {got} against {want}",
                        start + i
                    );
                }
            }
            states = states
                .iter()
                .map(|(name, _)| {
                    let s = out.remove(name).unwrap();
                    assert_eq!(sout.remove(name).unwrap(), s, "both chunk plans leave the same `{name}`");
                    (name.clone(), s)
                })
                .collect();
            start += n;
        }
    }
}

/// The engine prefills a prompt longer than its chunk a chunk per step, between the decode
/// steps of the sequences already running, and each request still gets the tokens it gets
/// with every prompt prefilled whole (on the f64 reference, whose chunked and whole prefills
/// differ by far less than any gap between logits greedy decoding compares); a request
/// cancelled while its prompt is prefilled frees its slot.
#[test]
fn the_engine_prefills_long_prompts_in_chunks_between_decode_steps() {
    use weft_runtime::backend::CpuBackend;
    use weft_runtime::engine::{Engine, Event, Request};
    use weft_runtime::generate::Sampling;
    let (p, _) = program_for(EVERY_KIND, 256);
    let greedy = Sampling { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
    let warm = Sampling { temperature: 0.8, top_p: 0.95, top_k: 0, seed: 4 };
    let prompt = |n: usize, k: u32| (0..n as u32).map(|i| (i * k + 3) % 32).collect::<Vec<u32>>();
    let reqs = [
        Request::new(prompt(5, 3), 24, greedy.clone(), vec![]),
        // 150 tokens: four chunks of 32 and one of 22.
        Request::new(prompt(150, 7), 10, greedy.clone(), vec![]),
        Request::new(prompt(40, 5), 12, warm, vec![]),
        Request::new(prompt(33, 9), 6, greedy, vec![]),
    ];
    let serve = |chunk: usize| {
        let mut be = CpuBackend::new_f64(p.clone(), 6);
        let mut engine = Engine::new(&mut be, 3, 256).unwrap();
        engine.set_prefill_chunk(chunk).unwrap();
        for r in &reqs {
            engine.submit(r.clone()).unwrap();
        }
        let mut got: std::collections::BTreeMap<usize, Vec<(usize, u32)>> = Default::default();
        let mut step = 0;
        while !engine.idle() {
            step += 1;
            for e in engine.step().unwrap() {
                if let Event::Token { id, token, .. } = e {
                    got.entry(id).or_default().push((step, token));
                }
            }
        }
        got
    };
    let whole = serve(0);
    let chunked = serve(32);
    for id in 0..reqs.len() {
        let tokens = |g: &std::collections::BTreeMap<usize, Vec<(usize, u32)>>| -> Vec<u32> {
            g[&id].iter().map(|x| x.1).collect()
        };
        assert_eq!(tokens(&chunked), tokens(&whole), "request {id}");
    }
    // Whole, the long prompt gives its first token at the first step; in chunks at the fifth
    // (one chunk per step), while the first request decodes a token at each of those steps.
    assert_eq!(whole[&1][0].0, 1);
    assert_eq!(chunked[&1][0].0, 5);
    // (Its first token comes with its join, its second from the same step's decode.)
    let first: Vec<usize> = chunked[&0].iter().map(|x| x.0).take(6).collect();
    assert_eq!(first, vec![1, 1, 2, 3, 4, 5]);
    // The 40-token prompt is longer than a chunk too: it waits for the staging row.
    assert!(chunked[&2][0].0 > 5, "{:?}", chunked[&2]);

    // Cancelled mid-prefill: its slot serves the next request.
    let mut be = CpuBackend::new_f64(p.clone(), 6);
    let mut engine = Engine::new(&mut be, 1, 256).unwrap();
    engine.set_prefill_chunk(32).unwrap();
    let long = engine.submit(reqs[1].clone()).unwrap();
    let short = engine.submit(reqs[0].clone()).unwrap();
    assert!(engine.step().unwrap().is_empty());
    assert_eq!((engine.live(), engine.waiting()), (1, 1));
    assert!(engine.cancel(long));
    assert_eq!(engine.live(), 0);
    let events = engine.step().unwrap();
    assert!(events.iter().any(|e| matches!(e, Event::Token { id, .. } if *id == short)), "{events:?}");
}

/// ZeRO-1's shares: each of 3 ranks keeps AdamW's moments of the parameters it owns and updates
/// only those; the shares cover every parameter once, hold about a third of the elements each,
/// and a share's optimizer step leaves the other ranks' parameters alone.
#[test]
fn optimizer_state_shards_cover_every_parameter_once() {
    use weft_runtime::backend::{Backend, CpuBackend};
    let (p, _) = program(EVERY_KIND);
    let z = weft_runtime::zero::Shards::new(&p, 3);
    let elems = |ty: &weft_runtime::TensorType| ty.shape.as_fixed().unwrap().iter().product::<u64>();
    let total: u64 = p.params.iter().map(|q| elems(&q.ty)).sum();
    let largest = p.params.iter().map(|q| elems(&q.ty)).max().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for rank in 0..3 {
        let (own, _) = z.program_for(rank).unwrap();
        let owned = z.owned_by(rank);
        let moments: Vec<&str> =
            own.states.iter().map(|s| s.name.as_str()).filter(|n| n.starts_with("adam_")).collect();
        assert_eq!(moments.len(), 2 * owned.len());
        for q in &owned {
            assert!(seen.insert(q.clone()), "{q} is owned twice");
            assert!(moments.contains(&format!("adam_m:{q}").as_str()));
        }
        let share: u64 = p.params.iter().filter(|q| owned.contains(&q.name)).map(|q| elems(&q.ty)).sum();
        assert!(share <= total / 3 + largest, "rank {rank} owns {share} of {total} elements");
        // The share's optimizer step changes its own parameters and no other.
        let mut be = CpuBackend::new(own.clone(), 5);
        let names: Vec<&str> = p.params.iter().map(|q| q.name.as_str()).collect();
        let before = be.read(&names).unwrap();
        let grads: std::collections::BTreeMap<String, weft_runtime::cpu::tensor::Tensor<f32>> = own
            .states
            .iter()
            .filter(|s| s.name.starts_with("grad_acc:"))
            .map(|s| {
                let shape: Vec<usize> = s.ty.shape.as_fixed().unwrap().iter().map(|&d| d as usize).collect();
                let n = shape.iter().product();
                (s.name.clone(), weft_runtime::cpu::tensor::Tensor::real(shape, vec![0.5; n]))
            })
            .collect();
        be.write(grads).unwrap();
        be.run("optimizer_step", vec![("step".into(), weft_runtime::cpu::tensor::Tensor::ints(vec![], vec![0]))])
            .unwrap();
        let after = be.read(&names).unwrap();
        for n in &names {
            assert_eq!(before[*n] != after[*n], owned.iter().any(|q| q == n), "{n} on rank {rank}");
        }
    }
    assert_eq!(seen.len(), p.params.len());
}

/// Self-Extend in generation: the prefill, decode and chunk plans (whose caches keep keys
/// unrotated, each rotated at its true or grouped position when scored) give the logits the
/// whole-window forward with Self-Extend gives, past the neighbour window (6) with groups of 4,
/// for a prompt shorter and one longer than the window; and Self-Extend changes them.
#[test]
fn self_extend_generation_matches_the_whole_window_forward() {
    let src = "model se { vocab = 32  width = 16 }
layer m = mamba(d_state = 4)
layer full = attention(heads = 4, kv_heads = 2, rope = 10000)
layer f = mlp(hidden = 24)
layers = [m, full, f, full]
";
    let c = weft::check_str(Path::new("se.weft"), src).unwrap_or_else(|f| panic!("{}", f.render()));
    let settings = OptimizerSettings::from_config(&weft::config::RunConfig::default());
    let se = weft_runtime::op::SelfExtend { neighbours: 6, group: 4 };
    let extended = c.model.clone().with_self_extend(se).unwrap();
    let p = build_program(&extended, &settings, 40).unwrap();
    let plain = build_program(&c.model, &settings, 40).unwrap();
    // A bundle built without it, patched by the runtime (`weft-run eval ppl --self-extend`),
    // has the very plans the compiler builds with it.
    let patched = plain.clone().with_self_extend(se).unwrap();
    for (name, plan) in &p.plans {
        assert!(patched.plans[name] == *plan, "plan `{name}` differs");
    }
    let no_rope = weft::check_str(Path::new("nope.weft"), &src.replace("rope = 10000", "rope = none"))
        .unwrap_or_else(|f| panic!("{}", f.render()));
    let e = build_program(&no_rope.model, &settings, 40).unwrap().with_self_extend(se).unwrap_err();
    assert!(e.contains("no full-attention layer with RoPE"), "{e}");
    let mut store: Store<f64> = Store::init(&p, 3);
    let (b, t, vocab) = (2, 30, 32);
    let inputs = batch(b, t, vocab as i32, 5);
    let tokens = inputs[0].1.ints_ref().unwrap().to_vec();
    let full = logits_of(&run(p.plan("logits").unwrap(), &mut store, vec![inputs[0].clone()]).unwrap());
    let unextended = logits_of(&run(plain.plan("logits").unwrap(), &mut store, vec![inputs[0].clone()]).unwrap());
    let gap = full.iter().zip(&unextended).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(gap > 1e-3, "Self-Extend must change the logits past the window ({gap:e})");
    let at = |pos: usize, row: usize| &full[(row * t + pos) * vocab..(row * t + pos + 1) * vocab];
    let close = |got: &[f64], want: &[f64]| got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let cols = |from: usize, n: usize| -> Vec<i32> {
        (0..b).flat_map(|r| tokens[r * t + from..r * t + from + n].to_vec()).collect()
    };
    let decode = p.plan("decode").unwrap();
    let names: Vec<String> = decode.inputs.iter().map(|(n, _)| n.clone()).filter(|n| n.starts_with("state:")).collect();
    for t0 in [3, 11] {
        let mut out = run(
            p.plan("prefill").unwrap(),
            &mut store,
            vec![("tokens".into(), Tensor::ints(vec![b, t0], cols(0, t0)))],
        )
        .unwrap();
        for pos in t0..t {
            let mut inp: Vec<(String, Tensor<f64>)> =
                names.iter().map(|n| (n.clone(), out.remove(n).unwrap())).collect();
            inp.push(("tokens".into(), Tensor::ints(vec![b, 1], cols(pos, 1))));
            inp.push(("pos".into(), Tensor::ints(vec![b], vec![pos as i32; b])));
            out = run(decode, &mut store, inp).unwrap();
            let got = logits_of(&out);
            for row in 0..b {
                // f64 sums of at most 40 terms: rounding far below 1e-10.
                let err = close(&got[row * vocab..(row + 1) * vocab], at(pos, row));
                assert!(err < 1e-10, "prompt {t0}, row {row}, position {pos}: {err:e}");
            }
        }
    }
    // Chunks of 7 (dividing neither the window nor the length) from the carried states.
    let chunk = p.plan("chunk").unwrap();
    let mut states = zero_states(chunk, b);
    let mut start = 0;
    while start < t {
        let n = 7.min(t - start);
        let mut inp = states.clone();
        inp.push(("tokens".into(), Tensor::ints(vec![b, n], cols(start, n))));
        inp.push(("pos".into(), Tensor::ints(vec![b], vec![start as i32; b])));
        let mut out = run(chunk, &mut store, inp).unwrap();
        let last = logits_of(&out);
        for row in 0..b {
            let err = close(&last[row * vocab..(row + 1) * vocab], at(start + n - 1, row));
            assert!(err < 1e-10, "chunk ending at {}, row {row}: {err:e}", start + n - 1);
        }
        states = states.iter().map(|(name, _)| (name.clone(), out.remove(name).unwrap())).collect();
        start += n;
    }
}
