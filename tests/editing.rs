//! Editing methods on the real default model: ROME rewrites one fact and leaves its neighbours,
//! MEMIT writes a batch of CounterFact records, FT-M fine-tunes, and overlays give exact
//! rollback (bit-identical logits per version) and survive a round trip through the log's bytes.
mod common;

use std::sync::Arc;

use candle_core::DType;
use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{self, EditRequest, MeasureOptions, Method};
use emend::engine::overlay::{decode, encode, Overlay};
use serde_json::{json, Value};

use common::editing::{apply, chain, ctx, eiffel, greedy, rome, view, STATS, UNRELATED};
use common::{all_logits, default_model, shared_dir};

#[test]
fn rome_moves_the_eiffel_tower_to_rome_and_leaves_the_louvre_in_paris() {
    let m = default_model();
    let base_model = m.model.as_ref();
    assert!(
        greedy(base_model, "The Eiffel Tower is located in the city of", 3).starts_with(" Paris")
    );
    assert!(greedy(base_model, "The Louvre is located in the city of", 3).starts_with(" Paris"));
    let before: Vec<String> = UNRELATED.iter().map(|p| greedy(base_model, p, 4)).collect();

    let base = Overlay::base();
    // Fewer statistics samples than the default keep CI short; the edit is the same method.
    let steps = apply(&base, rome(), &[eiffel()], json!({"mom2_samples": STATS}));
    assert_eq!(steps.len(), 1);
    let r = &steps[0].reports[0];
    assert!(r.pre.reliability < 0.5, "{:?}", r.pre);
    assert_eq!(r.post.reliability, 1.0, "{:?}", r.post);
    assert_eq!(r.post.success, Some(1.0));
    assert_eq!(r.post.locality, Some(1.0), "{:?}", r.post);

    let edited_overlay = chain(&base, &steps);
    let edited = view(m, &edited_overlay);
    let out = greedy(&edited, "The Eiffel Tower is located in the city of", 3);
    assert!(out.starts_with(" Rome"), "{out:?}");
    for (p, b) in UNRELATED.iter().zip(&before) {
        assert_eq!(&greedy(&edited, p, 4), b, "{p}");
    }
    // The base model is untouched.
    assert!(
        greedy(base_model, "The Eiffel Tower is located in the city of", 3).starts_with(" Paris")
    );
}

#[test]
fn memit_writes_ten_counterfact_records_at_once() {
    let all = datasets::load(EditDataset::Counterfact, &shared_dir().join("data")).unwrap();
    let reqs: Vec<EditRequest> = all.into_iter().take(10).map(|r| r.request).collect();
    let base = Overlay::base();
    let steps = apply(
        &base,
        "memit".parse().unwrap(),
        &reqs,
        json!({"mom2_samples": STATS}),
    );
    assert_eq!(steps.len(), 1, "MEMIT makes one version for the batch");
    let n = steps[0].reports.len() as f64;
    let rel: f64 = steps[0]
        .reports
        .iter()
        .map(|r| r.post.reliability)
        .sum::<f64>()
        / n;
    let loc: f64 = steps[0]
        .reports
        .iter()
        .map(|r| r.post.locality.unwrap())
        .sum::<f64>()
        / n;
    let pre: f64 = steps[0]
        .reports
        .iter()
        .map(|r| r.pre.reliability)
        .sum::<f64>()
        / n;
    assert!(rel >= 0.9, "reliability {rel} (pre-edit {pre})");
    assert!(loc >= 0.9, "locality {loc}");
    // One low-rank delta per MEMIT layer, rank = batch size.
    assert_eq!(steps[0].deltas.len(), 5);
    assert!(steps[0].deltas.iter().all(|d| d.rank() == Some(10)));
}

#[test]
fn sequential_edits_roll_back_bit_identically_and_survive_serialisation() {
    let m = default_model();
    let lm = m.model.as_ref();
    let all = datasets::load(EditDataset::Counterfact, &shared_dir().join("data")).unwrap();
    let reqs: Vec<EditRequest> = all
        .into_iter()
        .skip(20)
        .take(5)
        .map(|r| r.request)
        .collect();
    let probe = m
        .tokenizer
        .encode("The mother tongue of Danielle Darrieux is French, and")
        .unwrap();
    let base = Overlay::base();
    let base_logits = all_logits(lm, &probe);
    // FT-M keeps the test quick; the overlay mechanics are the same for every method.
    let steps = apply(&base, "ft-m".parse().unwrap(), &reqs, json!({"steps": 5}));
    assert_eq!(steps.len(), 5, "one version per sequential edit");
    let mut versions = vec![base.clone()];
    let mut recorded = vec![base_logits.clone()];
    for s in &steps {
        let v = s.version_on(versions.last().unwrap());
        recorded.push(all_logits(&view(m, &v), &probe));
        versions.push(v);
    }
    assert_ne!(recorded[5], recorded[0], "the edits change the model");
    // Roll back to version 2: the same chain, prepared anew, gives the same bits.
    assert_eq!(all_logits(&view(m, &versions[2]), &probe), recorded[2]);
    assert_eq!(all_logits(&view(m, &versions[0]), &probe), base_logits);
    // Rebuilt from the stored bytes (what a restart does): identical logits at every version.
    let mut rebuilt = Overlay::base();
    for (k, s) in steps.iter().enumerate() {
        let bytes = encode(&s.deltas, &s.state).unwrap();
        let data = decode(&bytes, lm.device(), DType::F32).unwrap();
        rebuilt = Overlay::push_with(&rebuilt, data.deltas, data.state);
        assert_eq!(
            all_logits(&view(m, &rebuilt), &probe),
            recorded[k + 1],
            "version {}",
            k + 1
        );
    }
    // Another session (the base model) is unaffected throughout.
    assert_eq!(all_logits(lm, &probe), base_logits);
}

#[test]
fn bad_requests_and_hyper_parameters_name_the_field() {
    let m = default_model();
    let tok = &m.tokenizer;
    let mut r = eiffel();
    r.subject = "Big Ben".into();
    let e = editing::validate(&[r], tok).unwrap_err().to_string();
    assert!(e.starts_with("edits[0].subject:"), "{e}");
    let mut r = eiffel();
    r.target_new = " ".into();
    let e = editing::validate(&[r], tok).unwrap_err().to_string();
    assert!(e.starts_with("edits[0].target_new:"), "{e}");
    let mut r = eiffel();
    r.target_new = "word ".repeat(60);
    let e = editing::validate(&[r], tok).unwrap_err().to_string();
    assert!(e.starts_with("edits[0].target_new:"), "{e}");
    let e = editing::validate(&[], tok).unwrap_err().to_string();
    assert!(e.starts_with("edits:"), "{e}");
    assert!("bogus".parse::<Method>().is_err());
    let e = editing::apply(
        m,
        &Overlay::base(),
        rome(),
        &[eiffel()],
        &json!({"layer": 99}),
        MeasureOptions::default(),
        ctx(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("hparams.layer:"), "{e}");
}

fn alphaedit() -> Method {
    "alphaedit".parse().unwrap()
}

fn alphaedit_hparams() -> Value {
    json!({"mom2_samples": STATS})
}

#[test]
fn alphaedit_moves_the_eiffel_tower_and_keeps_its_neighbours() {
    let m = default_model();
    let base_model = m.model.as_ref();
    let before: Vec<String> = UNRELATED.iter().map(|p| greedy(base_model, p, 4)).collect();
    let base = Overlay::base();
    let steps = apply(&base, alphaedit(), &[eiffel()], alphaedit_hparams());
    let r = &steps[0].reports[0];
    assert_eq!(r.post.reliability, 1.0, "{:?}", r.post);
    assert_eq!(r.post.locality, Some(1.0), "{:?}", r.post);
    let edited = view(m, &chain(&base, &steps));
    let out = greedy(&edited, "The Eiffel Tower is located in the city of", 3);
    assert!(out.starts_with(" Rome"), "{out:?}");
    for (p, b) in UNRELATED.iter().zip(&before) {
        assert_eq!(&greedy(&edited, p, 4), b, "{p}");
    }
    // The version records the keys it wrote, one column per request, at every layer.
    let keys = chain(&base, &steps);
    for layer in [3, 4, 5, 6, 7] {
        let k = keys.state(&format!("alphaedit.keys.{layer}"));
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].dims(), [1536, 1]);
    }

    // A batch of CounterFact records.
    let all = datasets::load(EditDataset::Counterfact, &shared_dir().join("data")).unwrap();
    let reqs: Vec<EditRequest> = all.into_iter().take(4).map(|r| r.request).collect();
    let steps = apply(&base, alphaedit(), &reqs, alphaedit_hparams());
    let n = reqs.len() as f64;
    let rel = steps[0]
        .reports
        .iter()
        .map(|r| r.post.reliability)
        .sum::<f64>()
        / n;
    let loc = steps[0]
        .reports
        .iter()
        .map(|r| r.post.locality.unwrap())
        .sum::<f64>()
        / n;
    assert!(rel >= 0.9, "reliability {rel}");
    assert!(loc >= 0.9, "locality {loc}");
    assert!(steps[0].deltas.iter().all(|d| d.rank() == Some(4)));
}

/// Edits 1, 2, 3; back to 1; edit 4: the same model as a fresh session that made edit 1 then
/// edit 4, because the keys AlphaEdit solves against are the version's state.
#[test]
fn alphaedit_state_rolls_back_with_its_version() {
    let m = default_model();
    let all = datasets::load(EditDataset::Counterfact, &shared_dir().join("data")).unwrap();
    let r: Vec<EditRequest> = all
        .into_iter()
        .skip(10)
        .take(4)
        .map(|r| r.request)
        .collect();
    let one = |from: &Arc<Overlay>, req: &EditRequest| {
        let steps = apply(
            from,
            alphaedit(),
            std::slice::from_ref(req),
            alphaedit_hparams(),
        );
        let earlier = steps[0].diagnostics["per_layer"][0]["earlier_keys"].clone();
        (chain(from, &steps), earlier)
    };
    let base = Overlay::base();
    let (v1, _) = one(&base, &r[0]);
    let (v2, _) = one(&v1, &r[1]);
    let (_v3, earlier) = one(&v2, &r[2]);
    assert_eq!(
        earlier, 2,
        "edit 3 solves against the keys of edits 1 and 2"
    );
    let (v4, earlier) = one(&v1, &r[3]);
    assert_eq!(earlier, 1, "after the rollback only edit 1's keys remain");
    let (f1, _) = one(&base, &r[0]);
    let (f4, _) = one(&f1, &r[3]);
    let probe = m.tokenizer.encode(&r[3].filled().0).unwrap();
    assert_eq!(
        all_logits(&view(m, &v4), &probe),
        all_logits(&view(m, &f4), &probe)
    );
}

/// The two options against sequential collapse: ENCORE's most-probable early stopping ends the
/// value optimisation as soon as the target is the argmax everywhere, and NAS's norm anchoring
/// writes a value with the norm of the one it replaces; on this edit the prompt still answers
/// the new target with both on.
#[test]
fn value_options_stop_at_the_argmax_and_anchor_the_norm() {
    let base = Overlay::base();
    let h = json!({"mom2_samples": STATS, "early_stop_argmax": true, "norm_anchored": true});
    let steps = apply(&base, rome(), &[eiffel()], h);
    let v = &steps[0].diagnostics["v_star"];
    assert_eq!(v["stopped"], "argmax", "{v}");
    assert_eq!(steps[0].reports[0].post.reliability, 1.0);
    let (written, init) = (
        v["written_norm"].as_f64().unwrap(),
        v["v_init_norm"].as_f64().unwrap(),
    );
    assert!((written / init - 1.0).abs() < 1e-4, "{written} vs {init}");
    assert!(v["v_star_norm"].as_f64().unwrap() > init, "{v}");
}
