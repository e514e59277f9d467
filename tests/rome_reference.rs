//! emend's ROME, PMET and AlphaEdit against independent PyTorch implementations
//! (`scripts/rome_reference.py`, `scripts/spread_reference.py`; HF transformers) on the same
//! model, request, layers, context templates and key statistics: each low-rank `Δ` must point
//! the same way (cosine ≥ 0.99) and have the same size.
mod common;

use candle_core::Tensor;
use emend::engine::editing::{self, EditContext, EditRequest, EditingEnv, MeasureOptions, Method};
use emend::engine::overlay::{Delta, Overlay};
use serde_json::Value;

use common::{default_model, fixtures_dir, floats, shared_dir};

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn rome_delta_matches_an_independent_pytorch_rome() {
    let path = fixtures_dir().join("rome_reference.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let req: EditRequest = serde_json::from_value(fx["request"].clone()).unwrap();
    let hp = fx["hparams"].clone();
    let templates: Vec<String> = serde_json::from_value(fx["templates"].clone()).unwrap();
    let m = default_model();
    let ctx = EditContext::new(
        EditingEnv {
            stats_dir: emend::setup::cache_dir().join("stats"),
            editors_dir: emend::setup::cache_dir().join("editors"),
            data_dir: Some(shared_dir().join("data")),
        },
        &m.info,
    );
    let n = hp["context_templates"].as_u64().unwrap() as usize;
    let tokens = hp["context_template_tokens"].as_u64().unwrap() as usize;
    ctx.pin_templates(n, tokens, templates);

    // The reference used statistics over the same corpus; a changed corpus would change C.
    let layer = hp["layer"].as_u64().unwrap() as usize;
    let samples = hp["mom2_samples"].as_u64().unwrap() as usize;
    let st = ctx
        .stats
        .get(
            m.model.as_ref(),
            &m.tokenizer,
            &m.info.sha256,
            &[layer],
            samples,
        )
        .unwrap();
    assert_eq!(
        st[0].provenance.corpus_sha256,
        fx["stats"]["corpus_sha256"].as_str().unwrap(),
        "the corpus behind the reference's statistics changed: rerun scripts/rome_reference.py"
    );
    assert_eq!(st[0].provenance.tokens as u64, fx["stats"]["tokens"]);

    let steps = editing::apply(
        m,
        &Overlay::base(),
        "rome".parse::<Method>().unwrap(),
        &[req],
        &hp,
        MeasureOptions::default(),
        &ctx,
    )
    .unwrap();
    let Delta::LowRank { weight, u, v } = &steps[0].deltas[0] else {
        panic!("ROME makes a rank-one delta");
    };
    assert_eq!(*weight, emend::engine::model::WeightId::mlp_down(layer));
    let (u, v) = (flat(u), flat(v));
    let (ru, rv) = (floats(&fx["reference"]["u"]), floats(&fx["reference"]["v"]));
    // cos(u₁v₁ᵀ, u₂v₂ᵀ) = cos(u₁, u₂)·cos(v₁, v₂).
    let cos = cosine(&u, &ru) * cosine(&v, &rv);
    let ratio = norm(&u) * norm(&v) / (norm(&ru) * norm(&rv));
    assert!(cos >= 0.99, "cosine of Δ with the reference: {cos}");
    assert!((ratio - 1.0).abs() < 0.02, "‖Δ‖ / ‖Δ_ref‖ = {ratio}");
    let ours = steps[0].diagnostics["v_star"]["steps"]
        .as_array()
        .unwrap()
        .len();
    let theirs = fx["reference_steps"].as_array().unwrap().len();
    assert!(
        ours.abs_diff(theirs) <= 2,
        "v* took {ours} steps here, {theirs} in the reference"
    );
}

/// PMET's and AlphaEdit's deltas against `scripts/spread_reference.py`, an independent PyTorch
/// implementation given the same request, templates and statistics: every layer's `ΔW` points
/// the same way (cosine ≥ 0.99) with the same size.
#[test]
fn pmet_and_alphaedit_deltas_match_an_independent_pytorch_implementation() {
    let m = default_model();
    for method in ["pmet", "alphaedit"] {
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(
                fixtures_dir().join(format!("spread_reference_{method}.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let reference = candle_core::safetensors::load(
            fixtures_dir().join(format!("spread_reference_{method}.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let req: EditRequest = serde_json::from_value(meta["request"].clone()).unwrap();
        let hp = meta["hparams"].clone();
        let ctx = EditContext::new(
            EditingEnv {
                stats_dir: emend::setup::cache_dir().join("stats"),
                editors_dir: emend::setup::cache_dir().join("editors"),
                data_dir: Some(shared_dir().join("data")),
            },
            &m.info,
        );
        ctx.pin_templates(
            hp["context_templates"].as_u64().unwrap() as usize,
            hp["context_template_tokens"].as_u64().unwrap() as usize,
            serde_json::from_value(meta["templates"].clone()).unwrap(),
        );
        let steps = editing::apply(
            m,
            &Overlay::base(),
            method.parse::<Method>().unwrap(),
            &[req],
            &hp,
            MeasureOptions::default(),
            &ctx,
        )
        .unwrap();
        let layers: Vec<u64> = serde_json::from_value(hp["layers"].clone()).unwrap();
        assert_eq!(steps[0].deltas.len(), layers.len(), "{method}");
        for (delta, layer) in steps[0].deltas.iter().zip(layers) {
            let Delta::LowRank { weight, u, v } = delta else {
                panic!("{method} makes low-rank deltas");
            };
            assert_eq!(weight.layer as u64, layer);
            let (u, v) = (flat(u), flat(v));
            let (ru, rv) = (
                flat(&reference[&format!("{layer}.u")]),
                flat(&reference[&format!("{layer}.v")]),
            );
            let cos = cosine(&u, &ru) * cosine(&v, &rv);
            let ratio = norm(&u) * norm(&v) / (norm(&ru) * norm(&rv));
            assert!(cos >= 0.99, "{method} layer {layer}: cosine {cos}");
            assert!(
                (ratio - 1.0).abs() < 0.02,
                "{method} layer {layer}: ‖Δ‖ / ‖Δ_ref‖ = {ratio}"
            );
        }
    }
}
