//! Preparing a version from its parent's prepared overlay (`Overlay::prepare_on`, what a
//! sequential edit and the engine's overlay cache do) gives exactly what preparing the whole
//! chain from scratch gives (what a restart or a cache miss does): the exact-rollback promise
//! rests on it.
mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use emend::engine::overlay::{Delta, Edited, LayerPatch, Overlay, PreparedOverlay};

fn low_rank(layer: usize, rank: usize, seed: f64) -> Delta {
    let dev = Device::Cpu;
    // Deterministic, distinct factors of the default model's down projection shape.
    let u = (Tensor::arange(0u32, (576 * rank) as u32, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        * (0.37 * seed))
        .unwrap()
        .sin()
        .unwrap()
        .reshape((576, rank))
        .unwrap();
    let v = ((Tensor::arange(0u32, (1536 * rank) as u32, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        * (0.11 * seed))
        .unwrap()
        .cos()
        .unwrap()
        * 1e-3)
        .unwrap()
        .reshape((1536, rank))
        .unwrap();
    Delta::LowRank { layer, u, v }
}

fn dense(layer: usize) -> Delta {
    let delta = (Tensor::ones((576, 1536), DType::F32, &Device::Cpu).unwrap() * 1e-4).unwrap();
    Delta::Dense { layer, delta }
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
    for layer in 0..default_model().model.spec().n_layers {
        match (a.layer(layer), b.layer(layer)) {
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
    // version edits two layers at once.
    let versions: Vec<Vec<Delta>> = vec![
        vec![low_rank(4, 1, 1.0)],
        vec![low_rank(4, 1, 2.0)],
        vec![low_rank(4, 200, 3.0)],
        vec![low_rank(4, 1, 4.0), dense(7)],
        vec![low_rank(4, 300, 5.0)],
        vec![low_rank(4, 1, 6.0)],
        vec![low_rank(7, 1, 7.0), low_rank(10, 1, 8.0)],
        vec![low_rank(10, 2, 9.0), low_rank(4, 1, 10.0)],
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
    assert!(matches!(prepared.layer(4), Some(LayerPatch::Dense { .. })));
    assert!(matches!(
        prepared.layer(10),
        Some(LayerPatch::LowRank { .. })
    ));

    // And the forward agrees to the bit.
    let ids = m
        .tokenizer
        .encode("The Eiffel Tower is located in the city of")
        .unwrap();
    let stepped = all_logits(&Edited::new(lm, prepared), &ids);
    let scratch = all_logits(&Edited::new(lm, Arc::new(node.prepare(lm).unwrap())), &ids);
    assert_eq!(stepped, scratch);
    assert_ne!(stepped, all_logits(lm, &ids), "the deltas change the model");
}
