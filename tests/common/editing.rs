//! Editing helpers shared by the editing test binaries: one editing context, greedy probes,
//! applying a method from the base, and the Eiffel-Tower request.
use std::sync::{Arc, OnceLock};

use emend::engine::editing::{
    self, EditContext, EditRequest, EditStep, EditingEnv, MeasureOptions, Method,
};
use emend::engine::model::generate::{generate, GenParams};
use emend::engine::model::{CausalLm, LoadedModel};
use emend::engine::overlay::{Edited, Overlay};
use serde_json::Value;

use super::{default_model, shared_dir};

pub fn rome() -> Method {
    "rome".parse().unwrap()
}

pub fn ctx() -> &'static EditContext {
    static CTX: OnceLock<EditContext> = OnceLock::new();
    CTX.get_or_init(|| {
        EditContext::new(
            EditingEnv {
                stats_dir: emend::setup::cache_dir().join("stats"),
                editors_dir: emend::setup::cache_dir().join("editors"),
                data_dir: Some(shared_dir().join("data")),
            },
            &default_model().info,
        )
    })
}

pub fn greedy(m: &dyn CausalLm, prompt: &str, n: usize) -> String {
    let tok = &default_model().tokenizer;
    let ids = tok.encode(prompt).unwrap();
    let g = generate(
        m,
        tok,
        &[ids],
        &GenParams {
            max_tokens: n,
            ..GenParams::default()
        },
        &mut |_, _| {},
    )
    .unwrap();
    g[0].text.clone()
}

pub fn apply(base: &Arc<Overlay>, method: Method, reqs: &[EditRequest], h: Value) -> Vec<EditStep> {
    editing::apply(
        default_model(),
        base,
        method,
        reqs,
        &h,
        MeasureOptions::default(),
        ctx(),
    )
    .unwrap()
}

pub fn chain(base: &Arc<Overlay>, steps: &[EditStep]) -> Arc<Overlay> {
    steps.iter().fold(base.clone(), |o, s| s.version_on(&o))
}

pub fn view<'a>(m: &'a LoadedModel, o: &Overlay) -> Edited<'a> {
    Edited::new(
        m.model.as_ref(),
        Arc::new(o.prepare(m.model.as_ref()).unwrap()),
    )
}

pub fn eiffel() -> EditRequest {
    EditRequest {
        prompt: "The Eiffel Tower is located in the city of".into(),
        subject: "The Eiffel Tower".into(),
        target_new: "Rome".into(),
        target_true: Some("Paris".into()),
        rephrase_prompts: vec!["Where is the Eiffel Tower? It is in the city of".into()],
        locality_prompts: vec![editing::PromptAnswer {
            prompt: "The Louvre is located in the city of".into(),
            answer: Some("Paris".into()),
        }],
        portability_prompts: vec![],
    }
}

/// Corpus sequences for the key statistics in these tests (the default is 1,000).
pub const STATS: usize = 400;

pub const UNRELATED: [&str; 4] = [
    "The Louvre is located in the city of",
    "The capital of Japan is",
    "The Statue of Liberty is located in",
    "Water is made of hydrogen and",
];

/// Each of [`UNRELATED`] gives `edited` the base model's logits, bit for bit.
pub fn assert_unrelated_bit_identical(edited: &dyn CausalLm) {
    let m = default_model();
    for p in UNRELATED {
        let ids = m.tokenizer.encode(p).unwrap();
        assert_eq!(
            super::all_logits(edited, &ids),
            super::all_logits(m.model.as_ref(), &ids),
            "{p}"
        );
    }
}

/// Generates 16 greedy tokens after `ids` on `edited`, alone and in a left-padded batch beside
/// an unrelated prompt: the batch row equals the lone run and the unrelated row equals the base
/// model's. Returns the lone run's tokens.
pub fn assert_padded_batch_rows_alone(edited: &dyn CausalLm, ids: &[u32]) -> Vec<u32> {
    let m = default_model();
    let tok = &m.tokenizer;
    let params = GenParams {
        max_tokens: 16,
        ..GenParams::default()
    };
    let alone = generate(edited, tok, &[ids.to_vec()], &params, &mut |_, _| {}).unwrap();
    let short = tok.encode("The capital of Japan is").unwrap();
    let batch = generate(
        edited,
        tok,
        &[short.clone(), ids.to_vec()],
        &params,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(batch[1].token_ids, alone[0].token_ids);
    let plain = generate(m.model.as_ref(), tok, &[short], &params, &mut |_, _| {}).unwrap();
    assert_eq!(batch[0].token_ids, plain[0].token_ids);
    alone[0].token_ids.clone()
}
