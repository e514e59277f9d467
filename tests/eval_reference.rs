//! emend's engine against lm-evaluation-harness's HF backend on the same documents
//! (tests/fixtures/eval/reference_scores.json, from scripts/eval_reference.py): per-choice
//! log-likelihoods and per-document accuracy on the first few documents of each task.
mod common;

use emend::engine::eval::tasks::{Scorer, TaskOptions};
use emend::engine::eval::{get_task, LmBackend, ModelBackend, Request};
use serde_json::Value;

/// Documents per task checked here (the fixture holds 50; this keeps the test short).
const DOCS: usize = 5;
/// f32 on two runtimes: per-token log-probs agree to ~1e-4, sums over a continuation to ~1e-3.
const TOL: f64 = 2e-2;

#[test]
fn loglikelihoods_match_lm_eval_hf() {
    let path = common::fixtures_dir().join("eval/reference_scores.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let m = common::default_model();
    assert_eq!(
        m.info.sha256,
        reference["model_sha256"].as_str().unwrap(),
        "the reference was made on the default model"
    );
    let mut backend = ModelBackend::new(m.model.as_ref(), &m.tokenizer);
    let data = common::shared_dir().join("data");
    for (task, r) in reference["tasks"].as_object().unwrap() {
        let p = get_task(task)
            .unwrap()
            .prepare(
                &data,
                &TaskOptions {
                    limit: Some(DOCS),
                    ..Default::default()
                },
            )
            .unwrap();
        for (inst, want) in p.instances.iter().zip(r["docs"].as_array().unwrap()) {
            assert_eq!(inst.doc_id as u64, want["doc_id"].as_u64().unwrap());
            let pairs: Vec<(String, String)> = inst
                .requests
                .iter()
                .map(|q| match q {
                    Request::Loglikelihood {
                        context,
                        continuation,
                    } => (context.clone(), continuation.clone()),
                    _ => panic!("{task}: loglikelihood requests only"),
                })
                .collect();
            let ours = backend.loglikelihood(&pairs).unwrap();
            let lls: Vec<f64> = want["lls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(ours.len(), lls.len(), "{task} doc {}", inst.doc_id);
            for ((ll, greedy), (w, wg)) in ours
                .iter()
                .zip(lls.iter().zip(want["is_greedy"].as_array().unwrap()))
            {
                assert!(
                    (ll - w).abs() < TOL,
                    "{task} doc {}: {ll} vs lm-eval {w}",
                    inst.doc_id
                );
                if let Some(wg) = wg.as_bool() {
                    assert_eq!(*greedy, wg, "{task} doc {}: is_greedy", inst.doc_id);
                }
            }
            if let Scorer::MultipleChoice { .. } = inst.scorer {
                let responses: Vec<_> = ours
                    .iter()
                    .map(
                        |&(logprob, is_greedy)| emend::engine::eval::Response::Loglikelihood {
                            logprob,
                            is_greedy,
                        },
                    )
                    .collect();
                for (metric, s) in inst.score(&responses) {
                    if let (Some(w), emend::engine::eval::metrics::Sample::Mean(v)) =
                        (want[&metric].as_f64(), s)
                    {
                        assert_eq!(v, w, "{task} doc {} {metric}", inst.doc_id);
                    }
                }
            }
        }
    }
}
