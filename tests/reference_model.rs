//! The default model against HF transformers' outputs in `../shared/reference` (f32, CPU):
//! tokenizer ids, top-10 log-probs at every position, greedy continuations, log-likelihoods.
mod common;

use candle_core::Tensor;
use common::*;
use emend::engine::model::generate::{generate, GenParams};
use emend::engine::model::score::{loglikelihood, score_tokens, DEFAULT_TOKEN_BUDGET};
use emend::engine::model::{Forward, KvCache};

const TOL: f32 = 1e-3;

#[test]
fn tokenizer_matches_the_smollm_pipeline() {
    let m = default_model();
    let ids = m.tokenizer.encode("The 2024 Eiffel Tower!").unwrap();
    assert_eq!(ids, vec![504, 216, 34, 32, 34, 36, 414, 46682, 18669, 17]);
    let toks: Vec<String> = ids
        .iter()
        .map(|&i| m.tokenizer.id_to_token(i).unwrap())
        .collect();
    assert_eq!(
        toks,
        ["The", "Ġ", "2", "0", "2", "4", "ĠE", "iffel", "ĠTower", "!"]
    );
    assert_eq!(
        m.tokenizer.decode(&ids, false).unwrap(),
        "The 2024 Eiffel Tower!"
    );
    assert_eq!(m.tokenizer.eos_token, "<|im_end|>");
    assert!(!m.tokenizer.add_bos);
    for case in reference()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            m.tokenizer.encode(prompt).unwrap(),
            ids_of(&case["input_ids"]),
            "{prompt:?}"
        );
    }
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    ids(v)
}

#[test]
fn chat_template_renders_like_transformers() {
    let m = default_model();
    let msg = emend::engine::model::tokenizer::ChatMessage {
        role: "user".into(),
        content: "What is the capital of Germany?".into(),
    };
    let text = m.tokenizer.render_chat(&[msg], true).unwrap();
    let case = &reference()["cases"][4];
    assert_eq!(text, case["prompt"].as_str().unwrap());
}

#[test]
fn top10_logprobs_match_transformers_at_every_position() {
    let m = default_model();
    for case in reference()["cases"].as_array().unwrap() {
        let ids = ids(&case["input_ids"]);
        let logits = all_logits(m.model.as_ref(), &ids);
        for (pos, top) in case["top10_next"].as_array().unwrap().iter().enumerate() {
            let lp = log_softmax(&logits[pos]);
            let ref_ids = common::ids(&top["ids"]);
            let ref_lp = floats(&top["logprobs"]);
            for (id, want) in ref_ids.iter().zip(&ref_lp) {
                let got = lp[*id as usize];
                assert!(
                    (got - want).abs() < TOL,
                    "{:?} pos {pos} id {id}: {got} vs {want}",
                    case["prompt"]
                );
            }
            // the argmax agrees too
            assert_eq!(
                emend::engine::model::sampling::argmax(&logits[pos]),
                ref_ids[0],
                "pos {pos}"
            );
        }
    }
}

#[test]
fn greedy_continuations_equal_transformers() {
    let m = default_model();
    let cases = reference()["cases"].as_array().unwrap().clone();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
    let params = GenParams {
        max_tokens: 16,
        ..Default::default()
    };
    // All five prompts in one left-padded batch: padding must not change any row.
    let gens = generate(
        m.model.as_ref(),
        &m.tokenizer,
        &prompts,
        &params,
        &mut |_, _| {},
    )
    .unwrap();
    for (c, g) in cases.iter().zip(&gens) {
        let mut got = g.token_ids.clone();
        if got.len() < 16 {
            got.push(m.tokenizer.eos_id); // transformers keeps the EOS it stopped on
        }
        assert_eq!(got, ids(&c["greedy16_ids"]), "{:?}", c["prompt"]);
        let want = c["greedy16_text"]
            .as_str()
            .unwrap()
            .trim_end_matches("<|im_end|>");
        assert_eq!(g.text, want);
    }
}

#[test]
fn loglikelihoods_match_transformers() {
    let m = default_model();
    let r = reference();
    let items = r["loglikelihood"].as_array().unwrap();
    let pairs: Vec<(String, String)> = items
        .iter()
        .map(|i| {
            (
                i["context"].as_str().unwrap().to_string(),
                i["continuation"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let got = loglikelihood(m.model.as_ref(), &m.tokenizer, &pairs, DEFAULT_TOKEN_BUDGET).unwrap();
    for (g, want) in got.iter().zip(items) {
        let lp = want["logprob"].as_f64().unwrap();
        assert!((g.logprob - lp).abs() < 1e-3, "{g:?} vs {lp}");
        assert_eq!(g.is_greedy, want["is_greedy"].as_bool().unwrap());
    }
}

#[test]
fn batched_scoring_equals_one_at_a_time() {
    let m = default_model();
    let seqs: Vec<Vec<u32>> = reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["input_ids"]))
        .collect();
    let from = vec![1; seqs.len()];
    let batched = score_tokens(m.model.as_ref(), &seqs, &from, DEFAULT_TOKEN_BUDGET).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let single = score_tokens(
            m.model.as_ref(),
            std::slice::from_ref(s),
            &[1],
            DEFAULT_TOKEN_BUDGET,
        )
        .unwrap();
        for (a, b) in batched[i].logprobs.iter().zip(&single[0].logprobs) {
            assert!((a - b).abs() < 1e-4, "row {i}: {a} vs {b}");
        }
        assert_eq!(batched[i].top_ids, single[0].top_ids);
    }
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    let m = default_model();
    let dev = m.model.device();
    let ids = m
        .tokenizer
        .encode("The Eiffel Tower is located in the city of Paris")
        .unwrap();
    let n = ids.len();
    let full = {
        let input = Tensor::from_vec(ids.clone(), (1, n), dev).unwrap();
        let mut fwd = Forward::new(1, n, dev);
        m.model
            .forward(&input, &mut fwd)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let mut cache = KvCache::new(m.model.spec().n_layers);
    let split = n - 3;
    let mut rows = Vec::new();
    let input = Tensor::from_vec(ids[..split].to_vec(), (1, split), dev).unwrap();
    let mut fwd = Forward::new(1, split, dev).with_cache(&mut cache);
    rows.extend(
        m.model
            .forward(&input, &mut fwd)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
    );
    for &id in &ids[split..] {
        let input = Tensor::from_vec(vec![id], (1, 1), dev).unwrap();
        let mut fwd = Forward::new(1, 1, dev).with_cache(&mut cache);
        rows.extend(
            m.model
                .forward(&input, &mut fwd)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), n);
    for (p, (a, b)) in full.iter().zip(&rows).enumerate() {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-3, "position {p}: max |Δlogit| {diff}");
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let m = default_model();
    let ids = m.tokenizer.encode("Once upon a time").unwrap();
    let mut params = GenParams {
        max_tokens: 12,
        ..Default::default()
    };
    params.sampling.temperature = 0.8;
    params.sampling.top_p = Some(0.95);
    params.sampling.seed = 7;
    let a = generate(
        m.model.as_ref(),
        &m.tokenizer,
        std::slice::from_ref(&ids),
        &params,
        &mut |_, _| {},
    )
    .unwrap();
    let b = generate(
        m.model.as_ref(),
        &m.tokenizer,
        std::slice::from_ref(&ids),
        &params,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(a[0].token_ids, b[0].token_ids);
}

#[test]
fn stop_strings_end_generation_before_the_stop() {
    let m = default_model();
    let ids = m.tokenizer.encode("The capital of France is").unwrap();
    let params = GenParams {
        max_tokens: 16,
        stop: vec!["\n".into()],
        ..Default::default()
    };
    let mut streamed = String::new();
    let g = generate(
        m.model.as_ref(),
        &m.tokenizer,
        &[ids],
        &params,
        &mut |_, d| streamed.push_str(d),
    )
    .unwrap();
    assert_eq!(g[0].text, " Paris.");
    assert_eq!(streamed, g[0].text);
    assert_eq!(
        g[0].finish_reason,
        emend::engine::model::generate::FinishReason::Stop
    );
}

#[test]
fn rolling_loglikelihood_with_one_window_equals_an_empty_context_score() {
    use emend::engine::model::score::loglikelihood_rolling;
    let m = default_model();
    let text = "Knowledge editing rewrites facts. It can also damage the model.";
    let n = m.tokenizer.encode_plain(text).unwrap().len();
    let (whole, count) = loglikelihood_rolling(
        m.model.as_ref(),
        &m.tokenizer,
        text,
        None,
        DEFAULT_TOKEN_BUDGET,
    )
    .unwrap();
    assert_eq!(count, n);
    let pair = loglikelihood(
        m.model.as_ref(),
        &m.tokenizer,
        &[(String::new(), text.to_string())],
        DEFAULT_TOKEN_BUDGET,
    )
    .unwrap();
    assert!(
        (whole - pair[0].logprob).abs() < 1e-3,
        "{whole} vs {}",
        pair[0].logprob
    );
    // short windows still score every token once, with less context
    let (windowed, count) = loglikelihood_rolling(
        m.model.as_ref(),
        &m.tokenizer,
        text,
        Some(4),
        DEFAULT_TOKEN_BUDGET,
    )
    .unwrap();
    assert_eq!(count, n);
    assert!(
        windowed.is_finite() && windowed < whole,
        "{windowed} vs {whole}"
    );
}
