//! Our task rendering against lm-evaluation-harness's own (tests/fixtures/eval/prompts.json,
//! written by scripts/eval_golden.py with lm-eval 0.4.13 on the same files).
mod common;

use std::collections::HashMap;

use emend::engine::eval::get_task;
use emend::engine::eval::tasks::{Prepared, TaskOptions};
use serde_json::Value;

/// Where two strings first differ, for a readable failure.
fn first_difference(a: &str, b: &str) -> String {
    let i = a
        .chars()
        .zip(b.chars())
        .position(|(x, y)| x != y)
        .unwrap_or(a.chars().count().min(b.chars().count()));
    let around = |s: &str| -> String { s.chars().skip(i.saturating_sub(60)).take(120).collect() };
    format!(
        "at char {i}: ours …{:?}… lm-eval …{:?}…",
        around(a),
        around(b)
    )
}

#[test]
fn rendering_matches_lm_eval() {
    let path = common::fixtures_dir().join("eval/prompts.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut prepared: HashMap<String, Prepared> = HashMap::new();
    let mut checked = 0;
    for (name, g) in golden["tasks"].as_object().unwrap() {
        let task_name = g["emend_task"].as_str().unwrap();
        let subtask = g["subtask"].as_str();
        let task = get_task(task_name).unwrap();
        assert_eq!(
            task.version(),
            g["version"].as_str().unwrap().replace("None", "none"),
            "{name}: version"
        );
        let p = prepared.entry(task_name.to_string()).or_insert_with(|| {
            let opts = TaskOptions {
                limit: Some(if subtask.is_some() { 1 } else { 3 }),
                num_fewshot: Some(g["num_fewshot"].as_u64().unwrap() as usize),
                seed: None,
            };
            task.prepare(&common::eval_data_dir(task_name), &opts)
                .unwrap_or_else(|e| panic!("{task_name}: {e}"))
        });
        assert_eq!(
            p.num_fewshot as u64,
            g["num_fewshot"].as_u64().unwrap(),
            "{name}"
        );
        let ours: Vec<_> = p
            .instances
            .iter()
            .filter(|i| i.subtask.as_deref() == subtask)
            .collect();
        let docs = g["docs"].as_array().unwrap();
        assert_eq!(ours.len(), docs.len(), "{name}: documents");
        for (inst, d) in ours.iter().zip(docs) {
            assert_eq!(inst.doc_id as u64, d["doc_id"].as_u64().unwrap(), "{name}");
            let want = d["requests"].as_array().unwrap();
            assert_eq!(
                inst.requests.len(),
                want.len(),
                "{name} doc {}: requests",
                inst.doc_id
            );
            for (r, w) in inst.requests.iter().zip(want) {
                let r = serde_json::to_value(r).unwrap();
                for key in ["context", "continuation", "text"] {
                    if let (Some(a), Some(b)) = (r[key].as_str(), w[key].as_str()) {
                        assert!(
                            a == b,
                            "{name} doc {} {key}: {}",
                            inst.doc_id,
                            first_difference(a, b)
                        );
                    }
                }
                assert_eq!(&r, w, "{name} doc {}", inst.doc_id);
                checked += 1;
            }
        }
    }
    // 15 tasks; MMLU and BBH contribute the first document of every subject and task.
    let total: usize = golden["tasks"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|t| t["docs"].as_array().unwrap())
        .map(|d| d["requests"].as_array().unwrap().len())
        .sum();
    assert_eq!(checked, total);
    assert!(checked > 300, "only {checked} requests compared");
}
