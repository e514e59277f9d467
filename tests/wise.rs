//! WISE on the real default model: the side memory moves the Eiffel Tower to Rome, the router
//! sends every out-of-scope prompt to the unedited layer (bit-identical logits), a generation
//! keeps the decision its prompt made; the memories are the version's state, so rollback, a
//! rebuild from the stored bytes and incremental preparation give bit-identical logits, and
//! closing and merging shards follow the chain.
mod common;

use std::sync::Arc;

use emend::engine::editing::{EditRequest, Method};
use emend::engine::overlay::{decode, encode, Edited, Overlay};
use serde_json::{json, Value};

use common::editing::{
    apply, assert_padded_batch_rows_alone, assert_unrelated_bit_identical, chain, eiffel, greedy,
    view, UNRELATED,
};
use common::{all_logits, default_model};

fn wise() -> Method {
    "wise".parse().unwrap()
}

fn tokens(prompt: &str) -> Vec<u32> {
    default_model().tokenizer.encode(prompt).unwrap()
}

fn fact(prompt: &str, subject: &str, target: &str) -> EditRequest {
    EditRequest {
        prompt: prompt.into(),
        subject: subject.into(),
        target_new: target.into(),
        target_true: None,
        rephrase_prompts: vec![],
        locality_prompts: vec![],
        portability_prompts: vec![],
    }
}

#[test]
fn wise_moves_the_eiffel_tower_and_routes_other_prompts_to_the_unedited_layer() {
    let m = default_model();
    let base = Overlay::base();
    let steps = apply(&base, wise(), &[eiffel()], json!({}));
    let (r, d) = (&steps[0].reports[0], &steps[0].diagnostics);
    assert!(r.pre.reliability < 0.5, "{:?}", r.pre);
    assert_eq!(r.post.reliability, 1.0, "{:?} {d}", r.post);
    assert_eq!(r.post.locality, Some(1.0), "{:?}", r.post);
    assert!(steps[0].deltas.is_empty(), "WISE leaves the weights alone");
    // The corpus sentence trained against scores below the router's threshold (0.88 of the
    // in-scope rows' smallest score), and so do the request's neighbourhood prompts.
    let out = d["out_of_scope_score"].as_f64().unwrap();
    let least = d["in_scope_scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert!(out < 0.88 * least, "{d}");
    assert_eq!(d["scope"]["prompt"][0]["routed"], true, "{d}");
    assert_eq!(d["scope"]["locality"][0]["routed"], false, "{d}");
    let v1 = chain(&base, &steps);
    let edited = view(m, &v1);

    // Cached generation: the edited prompt answers Rome and keeps it over 16 tokens.
    let prompt = "The Eiffel Tower is located in the city of";
    let text = greedy(&edited, prompt, 16);
    assert!(text.starts_with(" Rome"), "{text:?}");
    // Out of scope: the router sends these to the unedited layer, logits bit for bit.
    assert_unrelated_bit_identical(&edited);
    // A left-padded batch: each row generates what it does alone.
    assert_padded_batch_rows_alone(&edited, &tokens(prompt));
}

/// Cheap settings that close a memory after every edit and merge every two: the first edit
/// closes shard 0, the second closes shard 1 and merges both into one memory.
fn shards() -> Value {
    json!({"steps": 20, "save_freq": 1, "merge_freq": 2})
}

#[test]
fn wise_memories_follow_the_version_graph_exactly() {
    let m = default_model();
    let lm = m.model.as_ref();
    let eiffel = fact(
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        "Rome",
    );
    let colosseum = fact(
        "The Colosseum is located in the city of",
        "The Colosseum",
        "Paris",
    );
    let edit = |from: &Arc<Overlay>, req: &EditRequest| {
        let steps = apply(from, wise(), std::slice::from_ref(req), shards());
        let d = steps[0].diagnostics.clone();
        (chain(from, &steps), d)
    };
    let base = Overlay::base();
    let (v1, d1) = edit(&base, &eiffel);
    let (v2, d2) = edit(&v1, &colosseum);
    assert_eq!(
        (&d1["shard"], &d1["closes_memory"], &d1["merges"]),
        (&json!(0), &json!(true), &json!(0))
    );
    assert_eq!(
        (&d2["shard"], &d2["closes_memory"], &d2["merges"]),
        (&json!(1), &json!(true), &json!(2))
    );
    let layer = d1["layer"].as_u64().unwrap() as usize;
    let p1 = v1.prepare(lm).unwrap();
    let p2 = Arc::new(v2.prepare(lm).unwrap());
    assert_eq!(p1.wise(layer).unwrap().memories(), 1);
    assert_eq!(
        p2.wise(layer).unwrap().memories(),
        1,
        "two shards merged into one"
    );

    // Back to version 1, then the Colosseum again: the same model as the first time.
    let (v2b, _) = edit(&v1, &colosseum);
    let probes: Vec<Vec<u32>> = [&eiffel.prompt, &colosseum.prompt, &UNRELATED[1].to_string()]
        .iter()
        .map(|p| tokens(p))
        .collect();
    for p in &probes {
        assert_eq!(all_logits(&view(m, &v2b), p), all_logits(&view(m, &v2), p));
    }
    // A restart rebuilds each version from its stored bytes; incremental preparation from the
    // parent's prepared overlay equals preparing the chain.
    let mut rebuilt = base.clone();
    for v in [&v1, &v2] {
        let bytes = encode(v.own_deltas(), v.own_state()).unwrap();
        let back = decode(&bytes, lm.device(), lm.dtype()).unwrap();
        rebuilt = Overlay::push_with(&rebuilt, back.deltas, back.state);
    }
    let p1 = Arc::new(p1);
    let incremental = Edited::new(lm, Arc::new(v2.prepare_on(lm, &p1).unwrap()));
    let direct = Edited::new(lm, p2);
    for p in &probes {
        let want = all_logits(&direct, p);
        assert_eq!(all_logits(&view(m, &rebuilt), p), want);
        assert_eq!(all_logits(&incremental, p), want);
    }
}
