//! Preparing a version from its parent's prepared overlay (`Overlay::prepare_on`, what a
//! sequential edit and the engine's overlay cache do) gives exactly what preparing the whole
//! chain from scratch gives (what a restart or a cache miss does): the exact-rollback promise
//! rests on it.
mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use emend::engine::model::{CausalLm, Linear, WeightId};
use emend::engine::overlay::{Delta, Edited, LayerPatch, Overlay, PreparedOverlay};

/// Deterministic, distinct rank-`rank` factors of a `(d_out, d_in)` weight.
fn factors(d_out: usize, d_in: usize, rank: usize, seed: f64) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let u = (Tensor::arange(0u32, (d_out * rank) as u32, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        * (0.37 * seed))
        .unwrap()
        .sin()
        .unwrap()
        .reshape((d_out, rank))
        .unwrap();
    let v = ((Tensor::arange(0u32, (d_in * rank) as u32, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        * (0.11 * seed))
        .unwrap()
        .cos()
        .unwrap()
        * 1e-3)
        .unwrap()
        .reshape((d_in, rank))
        .unwrap();
    (u, v)
}

/// A low-rank delta of the default model's down projection at `layer`.
fn low_rank(layer: usize, rank: usize, seed: f64) -> Delta {
    low_rank_at(WeightId::mlp_down(layer), rank, seed)
}

/// A low-rank delta of any weight of the default model.
fn low_rank_at(weight: WeightId, rank: usize, seed: f64) -> Delta {
    let (d_out, d_in) = default_model()
        .model
        .weight(weight)
        .unwrap()
        .dims2()
        .unwrap();
    let (u, v) = factors(d_out, d_in, rank, seed);
    Delta::LowRank { weight, u, v }
}

fn dense(layer: usize) -> Delta {
    let delta = (Tensor::ones((576, 1536), DType::F32, &Device::Cpu).unwrap() * 1e-4).unwrap();
    Delta::Dense {
        weight: WeightId::mlp_down(layer),
        delta,
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_same(a: &PreparedOverlay, b: &PreparedOverlay, what: &str) {
    let weights: Vec<WeightId> = a.edited().collect();
    assert_eq!(
        weights,
        b.edited().collect::<Vec<_>>(),
        "{what}: edited weights"
    );
    for layer in weights {
        match (a.weight(layer), b.weight(layer)) {
            (None, None) => {}
            (Some(LayerPatch::Dense { weight: x }), Some(LayerPatch::Dense { weight: y })) => {
                assert_eq!(bits(x), bits(y), "{what}: layer {layer} dense weight");
            }
            (
                Some(LayerPatch::LowRank { v_t: xv, u: xu }),
                Some(LayerPatch::LowRank { v_t: yv, u: yu }),
            ) => {
                assert_eq!(xv.dims(), yv.dims(), "{what}: layer {layer} rank");
                assert_eq!(bits(xv), bits(yv), "{what}: layer {layer} V");
                assert_eq!(bits(xu), bits(yu), "{what}: layer {layer} U");
            }
            (x, y) => panic!(
                "{what}: layer {layer} prepared differently: {:?} vs {:?}",
                x.map(kind),
                y.map(kind)
            ),
        }
    }
}

fn kind(p: &LayerPatch) -> &'static str {
    match p {
        LayerPatch::Dense { .. } => "dense",
        LayerPatch::LowRank { .. } => "low-rank",
    }
}

#[test]
fn prepare_on_parent_equals_prepare_from_scratch() {
    let m = default_model();
    let lm = m.model.as_ref();
    // Layer 4 stays low-rank, crosses to dense (rank 503 > 576·1536/2112) and keeps folding
    // rank-one updates into the dense copy; layer 7 starts dense; layer 10 appears late; one
    // version edits two layers at once; attention and gate projections stack like the down
    // projection does.
    let versions: Vec<Vec<Delta>> = vec![
        vec![low_rank(4, 1, 1.0)],
        vec![low_rank(4, 1, 2.0)],
        vec![low_rank(4, 200, 3.0)],
        vec![low_rank(4, 1, 4.0), dense(7)],
        vec![low_rank(4, 300, 5.0)],
        vec![low_rank(4, 1, 6.0)],
        vec![low_rank(7, 1, 7.0), low_rank(10, 1, 8.0)],
        vec![low_rank(10, 2, 9.0), low_rank(4, 1, 10.0)],
        vec![
            low_rank_at(WeightId::new(5, Linear::AttnO), 1, 11.0),
            low_rank_at(WeightId::new(5, Linear::MlpGate), 2, 12.0),
        ],
        vec![low_rank_at(WeightId::new(5, Linear::AttnO), 1, 13.0)],
        vec![low_rank_at(WeightId::new(2, Linear::AttnK), 1, 14.0)],
    ];
    let mut node = Overlay::base();
    let mut prepared = Arc::new(node.prepare(lm).unwrap());
    for (i, deltas) in versions.into_iter().enumerate() {
        node = Overlay::push(&node, deltas);
        let stepped = node.prepare_on(lm, &prepared).unwrap();
        let scratch = node.prepare(lm).unwrap();
        assert_same(&stepped, &scratch, &format!("version {}", i + 1));
        prepared = Arc::new(stepped);
    }
    assert!(matches!(
        prepared.weight(WeightId::mlp_down(4)),
        Some(LayerPatch::Dense { .. })
    ));
    assert!(matches!(
        prepared.weight(WeightId::mlp_down(10)),
        Some(LayerPatch::LowRank { .. })
    ));
    let o5 = WeightId::new(5, Linear::AttnO);
    assert_eq!(
        prepared.edited().filter(|w| w.layer == 5).count(),
        2,
        "attn.o and mlp.gate of layer 5"
    );

    // And the forward agrees to the bit.
    let ids = m
        .tokenizer
        .encode("The Eiffel Tower is located in the city of")
        .unwrap();
    let stepped = all_logits(&Edited::new(lm, prepared), &ids);
    let scratch = all_logits(&Edited::new(lm, Arc::new(node.prepare(lm).unwrap())), &ids);
    assert_eq!(stepped, scratch);
    assert_ne!(stepped, all_logits(lm, &ids), "the deltas change the model");

    // The edited view reads back W + ΣΔ for a weight with a stacked low-rank patch.
    let view = Edited::new(lm, Arc::new(node.prepare(lm).unwrap()));
    let edited = view.weight(o5).unwrap();
    let mut want = lm.weight(o5).unwrap();
    for d in node.chain().into_iter().filter(|d| d.weight() == o5) {
        want = (want + d.dense().unwrap()).unwrap();
    }
    let diff = (edited - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "edited weight differs by {diff}");
    assert!(lm.weight(WeightId::new(0, Linear::AttnQkv)).is_err());
}

/// An edit of any weight changes the forward exactly where it should: a delta on layer 5's
/// attention output leaves the hidden states below layer 5 untouched and changes the logits.
#[test]
fn deltas_on_attention_and_gate_weights_reach_the_forward() {
    let m = default_model();
    let lm = m.model.as_ref();
    let ids = m.tokenizer.encode("The capital of France is").unwrap();
    let base = all_logits(lm, &ids);
    for linear in [Linear::AttnQ, Linear::AttnV, Linear::MlpGate, Linear::MlpUp] {
        let node = Overlay::push(
            &Overlay::base(),
            vec![low_rank_at(WeightId::new(5, linear), 4, 3.0)],
        );
        let view = Edited::new(lm, Arc::new(node.prepare(lm).unwrap()));
        assert_ne!(all_logits(&view, &ids), base, "{linear}");
    }
    // A delta shaped for another weight is refused, not silently applied.
    let Delta::LowRank { u, v, .. } = low_rank(5, 1, 1.0) else {
        unreachable!("low_rank makes a low-rank delta")
    };
    let wrong = Delta::LowRank {
        weight: WeightId::new(5, Linear::AttnK),
        u,
        v,
    };
    let e = Overlay::push(&Overlay::base(), vec![wrong])
        .prepare(lm)
        .unwrap_err();
    assert!(e.to_string().contains("layers.5.attn.k"), "{e}");
}
