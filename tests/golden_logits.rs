//! Every architecture against golden logits from HF transformers (`scripts/golden.py`): tiny
//! random-weight llama, mistral (sliding window), gpt2 and gpt_neox checkpoints committed under
//! `tests/fixtures/golden/`, and the default GGUF model.
mod common;

use common::*;
use emend::engine::model::{Architecture, LoadOptions, LoadedModel, ModelSource};

const TOL: f32 = 1e-3;

fn check(m: &LoadedModel, golden: &serde_json::Value) {
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = ids(&case["input_ids"]);
        assert_eq!(
            m.tokenizer.encode(prompt).unwrap(),
            ids,
            "tokenization of {prompt:?}"
        );
        let logits = all_logits(m.model.as_ref(), &ids);
        let tops = case["top10_next"].as_array().unwrap();
        assert_eq!(tops.len(), ids.len(), "one row per position");
        let mut worst = 0f32;
        for (pos, top) in tops.iter().enumerate() {
            let lp = log_softmax(&logits[pos]);
            for (id, want) in common::ids(&top["ids"])
                .iter()
                .zip(floats(&top["logprobs"]))
            {
                worst = worst.max((lp[*id as usize] - want).abs());
            }
        }
        assert!(worst < TOL, "{prompt:?}: max |Δ log-prob| {worst}");
    }
}

fn golden(name: &str) -> serde_json::Value {
    let p = fixtures_dir().join("golden").join(name).join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn tiny(name: &str, arch: Architecture) {
    let dir = fixtures_dir().join("golden").join(name);
    let m = LoadedModel::load(
        &ModelSource::from_path(&dir).unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(m.model.spec().architecture, arch);
    check(&m, &golden(name));
}

#[test]
fn tiny_llama_matches_transformers() {
    tiny("llama", Architecture::Llama);
}

#[test]
fn tiny_mistral_with_sliding_window_matches_transformers() {
    // window 8 < prompt lengths (~25 tokens): the mask must drop old keys
    tiny("mistral", Architecture::Llama);
}

#[test]
fn tiny_gpt2_matches_transformers() {
    tiny("gpt2", Architecture::Gpt2);
}

#[test]
fn tiny_gpt_neox_matches_transformers() {
    tiny("gpt_neox", Architecture::GptNeox);
}

#[test]
fn default_gguf_model_matches_transformers() {
    check(default_model(), &golden("smollm2"));
}

#[test]
fn sharded_safetensors_with_an_index_load_like_one_file() {
    use std::collections::HashMap;
    let src = fixtures_dir().join("golden/llama");
    let dir = std::env::temp_dir().join(format!("emend-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let all =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names: Vec<String> = all.keys().cloned().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: HashMap<String, candle_core::Tensor> =
            part.iter().map(|n| (n.clone(), all[n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for n in part {
            map.insert(n.clone(), file.into());
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let m = LoadedModel::load(
        &ModelSource::from_path(&dir).unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    check(&m, &golden("llama"));
}
