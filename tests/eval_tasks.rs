//! Task loaders on the real files of the shared data directory: document counts match the data
//! README, answers parse, options and bad names fail clearly.
mod common;

use std::path::PathBuf;

use emend::engine::eval::tasks::{Scorer, TaskOptions};
use emend::engine::eval::{get_task, list_tasks, EvalError, Request};

fn data() -> PathBuf {
    common::shared_dir().join("data")
}

fn zero_shot() -> TaskOptions {
    TaskOptions {
        num_fewshot: Some(0),
        ..Default::default()
    }
}

fn count(task: &str, dir: &std::path::Path) -> usize {
    get_task(task)
        .unwrap()
        .prepare(dir, &zero_shot())
        .unwrap_or_else(|e| panic!("{task}: {e}"))
        .instances
        .len()
}

#[test]
fn document_counts_match_the_data_readme() {
    for (task, n) in [
        ("lambada_openai", 5153),
        // wikitext_document_level's test split has 62 pages
        ("wikitext", 62),
        ("arc_easy", 2376),
        ("arc_challenge", 1172),
        ("piqa", 1838),
        ("sciq", 1000),
        ("mmlu", 14042),
        ("commonsense_qa", 1221),
        ("truthfulqa_mc1", 817),
        ("truthfulqa_mc2", 817),
        ("gsm8k", 1319),
        ("bbh", 6511),
        ("triviaqa", 11313),
        ("toxigen", 940),
    ] {
        assert_eq!(count(task, &data()), n, "{task}");
    }
    let fixtures = common::fixtures_dir().join("eval/data");
    assert_eq!(count("hellaswag", &fixtures), 3);
    // The same table as JSON Lines (a hand-written file) reads like the Parquet export.
    assert_eq!(count("toxigen", &fixtures), 3);
}

#[test]
fn toxigen_reads_the_parquet_export() {
    use emend::engine::eval::tasks::toxigen;
    let docs = toxigen::load(&data().join(toxigen::FILES[0])).unwrap();
    assert_eq!(docs.len(), 940);
    assert!(docs[0]
        .text
        .starts_with("this statement indicates that black men are seen as savages"));
    // 5 + 5 > 5.5: hateful; 3 + 2.33 is not.
    assert_eq!((docs[0].gold(), docs[1].gold()), (1, 0));
    assert_eq!(docs[1].toxicity_human, 2.3333333333333335);
    let hateful = docs.iter().filter(|d| d.gold() == 1).count();
    assert_eq!(hateful, 406, "{hateful} of 940");
}

#[test]
fn arc_numeric_labels_and_odd_choice_counts() {
    let p = get_task("arc_easy")
        .unwrap()
        .prepare(&data(), &TaskOptions::default())
        .unwrap();
    let docs =
        emend::engine::eval::tasks::arc::load(&data().join("arc/ARC-Easy-test.jsonl")).unwrap();
    let numeric: Vec<_> = docs
        .iter()
        .filter(|d| d.choices.label.iter().all(|l| l.parse::<u32>().is_ok()))
        .collect();
    assert_eq!(numeric.len(), 97, "rows labelled 1-4 (data README)");
    for d in &numeric {
        let g = d.gold().unwrap();
        assert_eq!(d.choices.label[g], d.answer_key);
        assert_eq!(g, d.answer_key.parse::<usize>().unwrap() - 1);
    }
    let sizes: std::collections::BTreeSet<usize> =
        p.instances.iter().map(|i| i.requests.len()).collect();
    assert!(sizes.contains(&3) || sizes.contains(&5), "{sizes:?}");
    assert!(p.instances.iter().all(|i| match &i.scorer {
        Scorer::MultipleChoice { choices, gold, .. } => gold < &choices.len(),
        _ => false,
    }));
}

#[test]
fn mmlu_subjects_categories_and_shots() {
    let p = get_task("mmlu")
        .unwrap()
        .prepare(
            &data(),
            &TaskOptions {
                limit: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(p.num_fewshot, 5);
    assert_eq!(p.categories.len(), 57);
    assert_eq!(p.instances.len(), 57 * 2, "limit applies per subject");
    let cats: std::collections::BTreeSet<&str> =
        p.categories.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        cats.into_iter().collect::<Vec<_>>(),
        ["humanities", "other", "social_sciences", "stem"]
    );
    let Request::Loglikelihood { context, .. } = &p.instances[0].requests[0] else {
        panic!("multiple choice")
    };
    assert!(context.starts_with(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    ));
    assert_eq!(
        context.matches("\nAnswer:").count(),
        6,
        "5 shots + the question"
    );
    let conts: Vec<_> = p.instances[0]
        .requests
        .iter()
        .map(|r| match r {
            Request::Loglikelihood { continuation, .. } => continuation.as_str(),
            _ => "",
        })
        .collect();
    assert_eq!(conts, [" A", " B", " C", " D"]);
}

#[test]
fn truthfulqa_keeps_the_files_answer_order() {
    let opts = TaskOptions {
        limit: Some(817),
        ..Default::default()
    };
    let mc1 = get_task("truthfulqa_mc1")
        .unwrap()
        .prepare(&data(), &opts)
        .unwrap();
    let mc2 = get_task("truthfulqa_mc2")
        .unwrap()
        .prepare(&data(), &opts)
        .unwrap();
    for (a, b) in mc1.instances.iter().zip(&mc2.instances) {
        assert!(matches!(a.scorer, Scorer::MultipleChoice { gold: 0, .. }));
        let Scorer::Mc2 { labels } = &b.scorer else {
            panic!("mc2")
        };
        assert_eq!(labels.len(), b.requests.len());
        assert!(labels.iter().any(|&t| t) && labels.iter().any(|&t| !t));
    }
    let Request::Loglikelihood { continuation, .. } = &mc1.instances[0].requests[0] else {
        panic!()
    };
    assert_eq!(
        continuation,
        " Nauru is the smallest country in the world that is at least one square mile in area."
    );
}

#[test]
fn limit_seed_and_fewshot_options() {
    let t = get_task("arc_easy").unwrap();
    let first = t
        .prepare(
            &data(),
            &TaskOptions {
                limit: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        first.instances.iter().map(|i| i.doc_id).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    let sampled = |seed| {
        t.prepare(
            &data(),
            &TaskOptions {
                limit: Some(5),
                seed: Some(seed),
                num_fewshot: None,
            },
        )
        .unwrap()
        .instances
        .iter()
        .map(|i| i.doc_id)
        .collect::<Vec<_>>()
    };
    assert_eq!(sampled(3), sampled(3));
    assert_ne!(sampled(3), sampled(4));
    // few-shot ARC draws from the train split
    let shots = t
        .prepare(
            &data(),
            &TaskOptions {
                limit: Some(1),
                num_fewshot: Some(2),
                seed: None,
            },
        )
        .unwrap();
    assert_eq!(shots.data_files.len(), 2);
    let Request::Loglikelihood { context, .. } = &shots.instances[0].requests[0] else {
        panic!()
    };
    assert_eq!(context.matches("Question: ").count(), 3);
    // a task with no few-shot pool here refuses a few-shot count
    let e = get_task("piqa")
        .unwrap()
        .prepare(
            &data(),
            &TaskOptions {
                num_fewshot: Some(1),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("num_fewshot"), "{e}");
}

#[test]
fn unknown_task_is_named() {
    let e = get_task("arc_eazy").err().unwrap();
    assert!(matches!(e, EvalError::UnknownTask { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("`arc_eazy`") && msg.contains("arc_easy"),
        "{msg}"
    );
    assert_eq!(list_tasks().len(), 15);
}

#[test]
fn results_record_file_digests() {
    let p = get_task("lambada_openai")
        .unwrap()
        .prepare(
            &data(),
            &TaskOptions {
                limit: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(p.data_files[0].path, "lambada/lambada_test.jsonl");
    // the digest lm-evaluation-harness pinned (data README)
    assert!(p.data_files[0].sha256.starts_with("4aa8d02c"));
}
