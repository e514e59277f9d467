//! End to end on the default model: a few documents of three tasks (multiple choice,
//! last-word log-likelihood, generation) through `ModelBackend`; scores are the values the
//! model gives (pinned) and equal across two independent runs.
mod common;

use emend::engine::eval::{evaluate, EvalOptions, ModelBackend};

#[test]
fn small_slices_score_the_pinned_values_deterministically() {
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
    // Five documents per task, so an accuracy is a count of fifths: exact. The model is
    // deterministic on CPU, and no choice here is near a tie, so a different value means the
    // prompts, the scoring or the model changed.
    for (task, key, want) in [
        ("arc_easy", "acc", 0.6),
        ("arc_easy", "acc_norm", 0.8),
        ("lambada_openai", "acc", 0.4),
        // SmolLM2-135M answers none of these five questions.
        ("triviaqa", "exact_match,remove_whitespace", 0.0),
    ] {
        let v = a.results[task].metrics[key];
        assert_eq!(v, want, "{task} {key}");
    }
    // Perplexity sums f32 log-probs whose last bits depend on the GEMM kernels OpenBLAS picks
    // for the CPU; 1e-4 relative covers that, and a real change in scoring (a token more or
    // less in a continuation, another context) moves it far more.
    let ppl = a.results["lambada_openai"].metrics["perplexity"];
    let want = 16.955131087613804;
    assert!(
        ((ppl - want) / want).abs() < 1e-4,
        "perplexity {ppl}, want {want}"
    );
    assert!(a.results["triviaqa"].meta.note.is_some());
    assert_eq!(
        serde_json::to_value(&a.results).unwrap(),
        serde_json::to_value(&b.results).unwrap(),
        "two runs agree"
    );
}
