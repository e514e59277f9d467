//! An edit's missing key statistics are made in pieces on the engine thread: the pieces add
//! up to exactly the one-go pass, and other sessions' requests are served between them
//! instead of waiting for the whole pass.
mod common;

use std::time::Duration;

use emend::engine::editing::stats::StatsCache;
use emend::engine::editing::{EditingEnv, MeasureOptions};
use emend::engine::model::generate::GenParams;
use emend::engine::model::{LoadOptions, LoadedModel, ModelSource};
use emend::engine::worker::{Admission, Engine, EngineLimits, EngineMetrics, GenEvent, ModelView};
use serde_json::json;

use common::editing::{eiffel, rome};
use common::server::temp_dir;
use common::{default_model, default_model_path, shared_dir};

#[test]
fn statistics_made_in_pieces_equal_one_pass() {
    let m = default_model();
    let (lm, tok) = (m.model.as_ref(), &m.tokenizer);
    let data = Some(shared_dir().join("data"));
    let sha = &m.info.sha256;
    let layers = [1, 3];
    let whole = StatsCache::new(temp_dir("stats-whole"), data.clone())
        .get(lm, tok, sha, &layers, 40)
        .unwrap();
    let cache = StatsCache::new(temp_dir("stats-pieces"), data);
    let mut pass = cache.begin(lm, tok, sha, &layers, 40).unwrap();
    let mut pieces = 0;
    while !pass.advance(lm, Duration::ZERO).unwrap() {
        pieces += 1;
        assert!(pass.progress() < 1.0);
    }
    // 40 sequences in batches of at most 16 (runs of equal length), 4 layers (0..=3) each.
    assert!(pieces + 1 >= 3 * 4, "{pieces} pieces");
    let parts = pass.finish();
    assert_eq!(parts.len(), 2);
    for (w, p) in whole.iter().zip(&parts) {
        assert_eq!(w.provenance.layer, p.provenance.layer);
        assert_eq!(w.provenance.tokens, p.provenance.tokens);
        assert!(w.mom2 == p.mom2, "layer {}", p.provenance.layer);
    }
}

#[tokio::test]
async fn requests_are_served_while_an_edit_makes_its_statistics() {
    let model = LoadedModel::load(
        &ModelSource::from_path(&default_model_path()).unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let tok = model.tokenizer.clone();
    let stats_dir = temp_dir("stats-prepare");
    let metrics = EngineMetrics::new();
    let engine = Engine::start(
        model,
        EngineLimits::default(),
        metrics.clone(),
        EditingEnv {
            stats_dir: stats_dir.clone(),
            editors_dir: emend::setup::cache_dir().join("editors"),
            data_dir: Some(shared_dir().join("data")),
        },
    );
    // 96 sequences: six batches of five layers each, about a second of pieces or more.
    let edit = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .edit(
                    ModelView::base(),
                    rome(),
                    vec![eiffel()],
                    json!({"mom2_samples": 96, "v_steps": 2}),
                    MeasureOptions::default(),
                    Admission::Immediate,
                )
                .await
        })
    };
    // Wait until the edit's preparation has run on the engine, so that the generation arrives
    // while it is under way.
    let slices = metrics.preparation_slices_total.clone();
    let waited = std::time::Instant::now();
    while slices.get() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "no preparation slice ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = slices.get();
    let mut events = engine
        .generate(
            ModelView::base(),
            tok.encode("The capital of France is").unwrap(),
            GenParams {
                max_tokens: 4,
                ..GenParams::default()
            },
        )
        .unwrap();
    let generated = loop {
        match events.recv().await.expect("a generation ends") {
            GenEvent::Done(g) => break g.unwrap(),
            GenEvent::Text(_) => {}
        }
    };
    assert!(!generated.token_ids.is_empty());
    let during = slices.get();
    assert!(
        !edit.is_finished(),
        "the generation was answered after the edit, not between its statistics' pieces"
    );
    let steps = edit.await.unwrap().unwrap();
    assert_eq!(steps.len(), 1);
    assert!(
        slices.get() > during && during >= before,
        "slices ran before ({before}) and after ({during} → {}) the generation",
        slices.get()
    );
    // The statistics were kept on disk, with their inverse.
    let files: Vec<_> = std::fs::read_dir(&stats_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(files.iter().any(|f| f.contains("-L4-n96-")), "{files:?}");
    engine.shutdown();
}
