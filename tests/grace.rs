//! GRACE on the real default model: the codebook moves the Eiffel Tower to Rome and leaves
//! every prompt out of its scope bit-identical to the base model, on every forward path
//! (one-pass scoring, cached generation, left-padded batches); its entries are the version's
//! state, so rollback, a rebuild from the stored bytes and incremental preparation give
//! bit-identical logits.
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

fn grace() -> Method {
    "grace".parse().unwrap()
}

/// Fewer Adam steps than the default keep CI short; the loss is near zero by then.
fn hparams() -> Value {
    json!({"steps": 25})
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

fn edit(from: &Arc<Overlay>, req: &EditRequest) -> (Arc<Overlay>, Value) {
    let steps = apply(from, grace(), std::slice::from_ref(req), hparams());
    let diagnostics = steps[0].diagnostics.clone();
    (chain(from, &steps), diagnostics)
}

fn tokens(prompt: &str) -> Vec<u32> {
    default_model().tokenizer.encode(prompt).unwrap()
}

#[test]
fn grace_moves_the_eiffel_tower_and_leaves_every_other_prompt_bit_identical() {
    let m = default_model();
    let base = Overlay::base();
    let steps = apply(&base, grace(), &[eiffel()], hparams());
    let r = &steps[0].reports[0];
    assert!(r.pre.reliability < 0.5, "{:?}", r.pre);
    assert_eq!(r.post.reliability, 1.0, "{:?}", r.post);
    assert_eq!(r.post.locality, Some(1.0), "{:?}", r.post);
    assert!(steps[0].deltas.is_empty(), "GRACE leaves the weights alone");
    assert_eq!(steps[0].diagnostics["decision"], "add");
    let v1 = chain(&base, &steps);
    let edited = view(m, &v1);

    // Cached generation: the edited prompt answers Rome and keeps it over 16 tokens.
    let prompt = "The Eiffel Tower is located in the city of";
    let out = greedy(&edited, prompt, 16);
    assert!(out.starts_with(" Rome"), "{out:?}");
    // Out of scope: the base model's logits, bit for bit.
    assert_unrelated_bit_identical(&edited);
    // A left-padded batch: each row generates what it does alone. One-pass scoring of the
    // generated sequence agrees with the cached generation at every step: each generated token
    // is the argmax after its prefix.
    let ids = tokens(prompt);
    let generated = assert_padded_batch_rows_alone(&edited, &ids);
    let mut full = ids.clone();
    full.extend(&generated);
    let logits = all_logits(&edited, &full);
    for (j, &t) in generated.iter().enumerate() {
        let row = &logits[ids.len() - 1 + j];
        let argmax = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(argmax as u32, t, "generated token {j}");
    }
}

/// The codebook's branches: a new key adds an entry, the same prompt with another target takes
/// the entry over, the same target grows or keeps it; a rollback discards what came after, and
/// a rebuild from the stored bytes or from the parent's prepared overlay is bit-identical.
#[test]
fn grace_entries_follow_the_version_graph_exactly() {
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
    let berlin = fact(
        "The Eiffel Tower is located in the city of",
        "The Eiffel Tower",
        "Berlin",
    );
    let base = Overlay::base();
    let (v1, d1) = edit(&base, &eiffel);
    let (v2, d2) = edit(&v1, &colosseum);
    assert_eq!(
        (d1["entries"].clone(), d2["entries"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(d2["decision"], "add", "{d2}");
    let (v3, d3) = edit(&v2, &berlin);
    assert_eq!(d3["decision"], "replace", "{d3}");
    assert_eq!(d3["nearest_distance"], 0.0, "{d3}");
    assert!(greedy(&view(m, &v3), &eiffel.prompt, 2).starts_with(" Berlin"));
    assert!(greedy(&view(m, &v3), &colosseum.prompt, 2).starts_with(" Paris"));
    let (_, d) = edit(&v3, &berlin);
    assert_eq!(d["decision"], "extend", "{d}");

    // Back to version 1, then the Colosseum again: the same model as the first time.
    let (v2b, _) = edit(&v1, &colosseum);
    let probes: Vec<Vec<u32>> = [&eiffel.prompt, &colosseum.prompt, &UNRELATED[1].to_string()]
        .iter()
        .map(|p| tokens(p))
        .collect();
    for p in &probes {
        assert_eq!(all_logits(&view(m, &v2b), p), all_logits(&view(m, &v2), p));
    }

    // A restart rebuilds each version from its stored bytes.
    let mut rebuilt = base.clone();
    for v in [&v1, &v2, &v3] {
        let bytes = encode(v.own_deltas(), v.own_state()).unwrap();
        let back = decode(&bytes, lm.device(), lm.dtype()).unwrap();
        rebuilt = Overlay::push_with(&rebuilt, back.deltas, back.state);
    }
    // Incremental preparation from the parent's prepared overlay equals preparing the chain.
    let p2 = Arc::new(v2.prepare(lm).unwrap());
    let incremental = Edited::new(lm, Arc::new(v3.prepare_on(lm, &p2).unwrap()));
    for p in &probes {
        let want = all_logits(&view(m, &v3), p);
        assert_eq!(all_logits(&view(m, &rebuilt), p), want);
        assert_eq!(all_logits(&incremental, p), want);
    }
}
