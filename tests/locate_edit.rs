//! PMET and KN on the real default model: PMET rewrites the Eiffel Tower and a CounterFact batch
//! and leaves the neighbours; KN attributes neurons by integrated gradients (checked against a
//! finite difference) and moves their values exactly as EasyEdit does. What KN's edit does to
//! the fact is reported, not asserted: the method is reproduced, not tuned.
mod common;

use candle_core::{DType, Tensor};
use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{EditRequest, Method};
use emend::engine::model::score::encode_pair;
use emend::engine::model::{
    CausalLm, Forward, Hooks, PatchMode, Positions, Site, SiteKind, WeightId,
};
use emend::engine::overlay::{decode, encode, Delta, Overlay};
use serde_json::json;

use common::editing::{apply, chain, eiffel, greedy, view, STATS, UNRELATED};
use common::{all_logits, default_model, shared_dir};

fn method(name: &str) -> Method {
    name.parse().unwrap()
}

#[test]
fn pmet_moves_the_eiffel_tower_and_writes_a_counterfact_batch() {
    let m = default_model();
    let base_model = m.model.as_ref();
    let before: Vec<String> = UNRELATED.iter().map(|p| greedy(base_model, p, 4)).collect();
    let base = Overlay::base();
    let h = json!({"mom2_samples": STATS});
    let steps = apply(&base, method("pmet"), &[eiffel()], h.clone());
    let r = &steps[0].reports[0];
    assert_eq!(r.post.reliability, 1.0, "{:?}", r.post);
    assert_eq!(r.post.locality, Some(1.0), "{:?}", r.post);
    // Only the down projections of the edited layers change, one rank per request.
    let layers: Vec<usize> = steps[0]
        .deltas
        .iter()
        .map(|d| {
            assert_eq!(d.rank(), Some(1));
            let w = d.weight();
            assert_eq!(w, WeightId::mlp_down(w.layer));
            w.layer
        })
        .collect();
    assert_eq!(layers, [3, 4, 5, 6, 7]);
    // Both values were optimised, the attention's and the MLP's.
    let sites = &steps[0].diagnostics["z_star"][0]["sites"];
    assert_eq!(sites[0]["site"], "layers.7.attn.out", "{sites}");
    assert_eq!(sites[1]["site"], "layers.7.mlp.out", "{sites}");
    let edited = view(m, &chain(&base, &steps));
    let out = greedy(&edited, "The Eiffel Tower is located in the city of", 3);
    assert!(out.starts_with(" Rome"), "{out:?}");
    for (p, b) in UNRELATED.iter().zip(&before) {
        assert_eq!(&greedy(&edited, p, 4), b, "{p}");
    }

    let all = datasets::load(EditDataset::Counterfact, &shared_dir().join("data")).unwrap();
    let reqs: Vec<EditRequest> = all.into_iter().take(4).map(|r| r.request).collect();
    let steps = apply(&base, method("pmet"), &reqs, h);
    assert_eq!(steps.len(), 1, "PMET edits a batch in one version");
    let n = reqs.len() as f64;
    let mean = |f: &dyn Fn(&emend::engine::editing::EditReport) -> f64| {
        steps[0].reports.iter().map(f).sum::<f64>() / n
    };
    let rel = mean(&|r| r.post.reliability);
    let loc = mean(&|r| r.post.locality.unwrap());
    assert!(rel >= 0.9, "reliability {rel}");
    assert!(loc >= 0.9, "locality {loc}");
}

/// `P(token)` at the last position of `ids` with `mlp.pre` of `layer` there set to `value`.
fn prob_with(lm: &dyn CausalLm, ids: &[u32], layer: usize, value: &Tensor, token: u32) -> f64 {
    let dev = lm.device();
    let last = ids.len() - 1;
    let mut hooks = Hooks::new().patch(
        Site::new(layer, SiteKind::MlpPre),
        vec![(0, last)],
        value.clone(),
        PatchMode::Set,
    );
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), dev).unwrap();
    let mut fwd = Forward::new(1, ids.len(), dev).with_hooks(&mut hooks);
    let logits = lm.forward(&input, &mut fwd).unwrap().get(0).unwrap();
    let row = logits.get(last).unwrap().to_dtype(DType::F64).unwrap();
    let p = candle_nn::ops::softmax(&row, 0).unwrap();
    p.get(token as usize).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn kn_finds_neurons_by_integrated_gradients_and_moves_their_values() {
    let m = default_model();
    let lm = m.model.as_ref();
    let tok = &m.tokenizer;
    let base = Overlay::base();
    let steps = apply(&base, method("kn"), &[eiffel()], json!({}));
    let d = &steps[0].diagnostics;
    let n: usize = d["neurons"].as_u64().unwrap() as usize;
    assert!(n >= 1, "{d}");
    assert_eq!(d["old_tokens"], json!([" Paris"]), "{d}");
    assert_eq!(d["new_tokens"], json!([" Rome"]), "{d}");

    // The top neuron's score is its activation times ∂P(" Paris")/∂a' at the zero baseline
    // (one step): a central finite difference agrees.
    let (l, j) = (
        d["top"][0]["layer"].as_u64().unwrap() as usize,
        d["top"][0]["neuron"].as_u64().unwrap() as usize,
    );
    let score = d["top"][0]["score"].as_f64().unwrap();
    let (ids, paris) = encode_pair(tok, "The Eiffel Tower is located in the city of", " Paris")
        .map(|(c, a)| (c, a[0]))
        .unwrap();
    let ff = lm.spec().intermediate_size;
    let site = Site::new(l, SiteKind::MlpPre);
    let mut read = Hooks::new().read(site, Positions::Rows(vec![(0, ids.len() - 1)]));
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), lm.device()).unwrap();
    let mut fwd = Forward::new(1, ids.len(), lm.device()).with_hooks(&mut read);
    lm.hidden(&input, &mut fwd).unwrap();
    let a: Vec<f32> = read
        .take(site)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let eps = 1e-2f32;
    let at = |x: f32| {
        let mut v = vec![0f32; ff];
        v[j] = x;
        Tensor::from_vec(v, (1, ff), lm.device()).unwrap()
    };
    let fd = (prob_with(lm, &ids, l, &at(eps), paris) - prob_with(lm, &ids, l, &at(-eps), paris))
        / (2.0 * eps as f64);
    let expect = a[j] as f64 * fd;
    assert!(
        (expect - score).abs() <= 0.02 * score.abs() + 1e-5,
        "score {score}, activation × finite difference {expect}"
    );

    // Every kept neuron's column moves by E[" Rome"] − 2·E[" Paris"] (one-token target).
    let e = |t: u32| {
        lm.token_embeddings(&Tensor::new(&[t], lm.device()).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
    };
    let rome = encode_pair(tok, "The Eiffel Tower is located in the city of", " Rome")
        .unwrap()
        .1[0];
    let want: Vec<f32> = (e(rome) - (e(paris) * 2.0).unwrap())
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut columns = 0.0;
    for delta in &steps[0].deltas {
        let Delta::LowRank { weight, u, v } = delta else {
            panic!("KN writes low-rank deltas")
        };
        assert_eq!(weight.linear, WeightId::mlp_down(weight.layer).linear);
        assert_eq!(u.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        let ind: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        assert!(ind.iter().all(|&x| x == 0.0 || x == 1.0));
        columns += ind.iter().sum::<f32>();
    }
    assert_eq!(columns as usize, n, "one column per kept neuron");
    let r = &steps[0].reports[0];
    eprintln!(
        "KN on the Eiffel Tower: {n} neurons, rewrite log P(Rome) {:.3} → {:.3}, reliability {}, locality {:?}",
        r.pre.rewrite.logprob_new, r.post.rewrite.logprob_new, r.post.reliability, r.post.locality
    );
}

#[test]
fn kn_refuses_a_request_without_its_true_answer() {
    let m = default_model();
    let mut r = eiffel();
    r.target_true = None;
    let e = emend::engine::editing::apply(
        m,
        &Overlay::base(),
        method("kn"),
        &[r],
        &json!({}),
        Default::default(),
        common::editing::ctx(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("edits[0].target_true:"), "{e}");
}

#[test]
fn kn_attribution_matches_easyedit() {
    // tests/fixtures/kn_reference.json: EasyEdit's KnowledgeNeurons.get_scores on this prompt
    // (scripts/kn_reference.py).
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures_dir().join("kn_reference.json")).unwrap(),
    )
    .unwrap();
    let mut r = eiffel();
    r.target_true = Some(fx["answer"].as_str().unwrap().into());
    let base = Overlay::base();
    for run in fx["runs"].as_array().unwrap() {
        let steps = run["steps"].as_u64().unwrap();
        // Every positive score kept: the diagnostics list the 20 highest.
        let all = apply(
            &base,
            method("kn"),
            std::slice::from_ref(&r),
            json!({"steps": steps, "adaptive_threshold": 0.0}),
        );
        let ours = all[0].diagnostics["top"].as_array().unwrap().clone();
        let key = |v: &serde_json::Value| (v["layer"].as_u64(), v["neuron"].as_u64());
        let mut matched = 0;
        for theirs in run["top"].as_array().unwrap() {
            let Some(o) = ours.iter().find(|o| key(o) == key(theirs)) else {
                continue;
            };
            matched += 1;
            let (a, b) = (
                o["score"].as_f64().unwrap(),
                theirs["score"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 2e-3 * b.abs() + 1e-4,
                "steps {steps}: {theirs} scored {a} here"
            );
        }
        assert!(
            matched >= 18,
            "steps {steps}: {matched} of EasyEdit's top 20 in ours: {ours:?}"
        );
        assert_eq!(key(&ours[0]), key(&run["top"][0]), "steps {steps}");
        // EasyEdit's adaptive threshold keeps the same neurons.
        let kept = apply(
            &base,
            method("kn"),
            std::slice::from_ref(&r),
            json!({"steps": steps}),
        );
        assert_eq!(
            kept[0].diagnostics["neurons"], run["above_0_2"],
            "steps {steps}"
        );
    }
}

#[test]
fn pmet_and_kn_versions_roll_back_and_rebuild_bit_identically() {
    let m = default_model();
    let lm = m.model.as_ref();
    let all = datasets::load(EditDataset::Counterfact, &shared_dir().join("data")).unwrap();
    let reqs: Vec<EditRequest> = all
        .into_iter()
        .skip(30)
        .take(2)
        .map(|r| r.request)
        .collect();
    let probe = m
        .tokenizer
        .encode("The mother tongue of Danielle Darrieux is French, and")
        .unwrap();
    let base = Overlay::base();
    let base_logits = all_logits(lm, &probe);
    for (name, h) in [
        ("pmet", json!({"mom2_samples": STATS, "v_steps": 5})),
        ("kn", json!({})),
    ] {
        let mut versions = vec![base.clone()];
        let mut recorded = vec![base_logits.clone()];
        let mut steps = Vec::new();
        for r in &reqs {
            let s = apply(
                versions.last().unwrap(),
                method(name),
                std::slice::from_ref(r),
                h.clone(),
            );
            let v = chain(versions.last().unwrap(), &s);
            recorded.push(all_logits(&view(m, &v), &probe));
            versions.push(v);
            steps.extend(s);
        }
        assert_ne!(
            recorded[2], recorded[0],
            "{name}: the edits change the model"
        );
        // Back to version 1, prepared anew: the same bits.
        assert_eq!(
            all_logits(&view(m, &versions[1]), &probe),
            recorded[1],
            "{name}"
        );
        // Rebuilt from the stored bytes, as a restart does.
        let mut rebuilt = Overlay::base();
        for (k, s) in steps.iter().enumerate() {
            let data = decode(
                &encode(&s.deltas, &s.state).unwrap(),
                lm.device(),
                DType::F32,
            )
            .unwrap();
            rebuilt = Overlay::push_with(&rebuilt, data.deltas, data.state);
            assert_eq!(
                all_logits(&view(m, &rebuilt), &probe),
                recorded[k + 1],
                "{name} version {}",
                k + 1
            );
        }
    }
}
