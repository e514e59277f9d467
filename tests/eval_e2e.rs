//! End to end on the default model: a few documents of three tasks (multiple choice,
//! last-word log-likelihood, generation) through `ModelBackend`; scores are in range and equal
//! across two independent runs.
mod common;

use emend::engine::eval::{evaluate, EvalOptions, ModelBackend};

#[test]
fn small_slices_score_in_range_and_deterministically() {
    let m = common::default_model();
    let data = common::shared_dir().join("data");
    let tasks: Vec<String> = ["arc_easy", "lambada_openai", "triviaqa"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let opts = EvalOptions {
        limit: Some(5),
        ..Default::default()
    };
    let run = || {
        let mut backend = ModelBackend::new(m.model.as_ref(), &m.tokenizer);
        let mut calls = Vec::new();
        let r = evaluate(&tasks, &opts, &data, &mut backend, &mut |done, total| {
            calls.push((done, total));
            true
        })
        .unwrap();
        (r, calls)
    };
    let (a, calls) = run();
    let (b, _) = run();
    // 5 ARC questions × 4 choices + 5 LAMBADA passages + 5 questions
    assert_eq!(a.requests.total, 30);
    assert_eq!(calls.last(), Some(&(a.requests.unique, a.requests.unique)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    for (task, key) in [
        ("arc_easy", "acc"),
        ("arc_easy", "acc_norm"),
        ("lambada_openai", "acc"),
        ("triviaqa", "exact_match,remove_whitespace"),
    ] {
        let v = a.results[task].metrics[key];
        assert!((0.0..=1.0).contains(&v), "{task} {key} = {v}");
    }
    let ppl = a.results["lambada_openai"].metrics["perplexity"];
    assert!(ppl.is_finite() && ppl > 1.0, "perplexity {ppl}");
    assert!(a.results["triviaqa"].meta.note.is_some());
    assert_eq!(
        serde_json::to_value(&a.results).unwrap(),
        serde_json::to_value(&b.results).unwrap(),
        "two runs agree"
    );
}
