//! Method state belongs to the version: what a method keeps beside its deltas (AlphaEdit's keys
//! of earlier edits, a memory's entries) follows the version graph through rollback and fork,
//! and a restart rebuilds it from the stored log without recomputing any edit.
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use emend::engine::editing::{EditRequest, EditStep, Method};
use emend::engine::model::WeightId;
use emend::engine::overlay::{Delta, StateEntry};
use emend::metrics::Metrics;
use emend::sessions::{Placement, Sessions};
use emend::store::Store;

const TENANT: &str = "default";

fn request() -> EditRequest {
    serde_json::from_value(serde_json::json!({
        "prompt": "{} is located in", "subject": "The Louvre", "target_new": "Rome"
    }))
    .unwrap()
}

/// A step whose delta and state carry `x`, so that each version's state is recognisable.
fn step(x: f32) -> EditStep {
    let dev = Device::Cpu;
    EditStep {
        deltas: vec![Delta::LowRank {
            weight: WeightId::mlp_down(1),
            u: Tensor::full(x, (4, 1), &dev).unwrap(),
            v: Tensor::full(x, (6, 1), &dev).unwrap(),
        }],
        state: vec![StateEntry::new(
            "test.keys",
            Tensor::full(x, (3, 1), &dev).unwrap(),
        )],
        reports: Vec::new(),
        hparams: serde_json::json!({}),
        diagnostics: serde_json::json!({}),
        duration_ms: 1,
    }
}

async fn open(url: &str) -> Sessions {
    let store = Store::connect(url).await.unwrap();
    let placement = Placement {
        device: Device::Cpu,
        dtype: DType::F32,
    };
    Sessions::restore(store, Arc::new(Metrics::new(&["rome"])), &placement, 4)
        .await
        .unwrap()
}

async fn edit(s: &Sessions, id: &str, x: f32) -> u64 {
    let method: Method = "rome".parse().unwrap();
    let applied = s
        .apply_edit(TENANT, id, method, vec![request()], |_view| async move {
            Ok(vec![step(x)])
        })
        .await
        .unwrap();
    applied.versions[0].version
}

/// The state entries of `version`, oldest first, as their first value.
fn state(s: &Sessions, id: &str, version: Option<u64>) -> Vec<f32> {
    let view = s.view(TENANT, id, version).unwrap();
    view.overlay
        .state("test.keys")
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0])
        .collect()
}

#[tokio::test]
async fn state_follows_rollback_fork_and_restart() {
    let dir = std::env::temp_dir().join(format!("emend-state-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("emend.db").display());
    let s = open(&url).await;
    let id = s.create(TENANT, None, None, None).await.unwrap().id;
    for x in [1.0, 2.0, 3.0] {
        edit(&s, &id, x).await;
    }
    assert_eq!(state(&s, &id, None), [1.0, 2.0, 3.0]);
    s.rollback(TENANT, &id, 1).await.unwrap();
    assert_eq!(state(&s, &id, None), [1.0]);
    let v = edit(&s, &id, 4.0).await;
    assert_eq!(v, 4, "versions are never reused");
    assert_eq!(state(&s, &id, None), [1.0, 4.0]);
    assert_eq!(
        state(&s, &id, Some(3)),
        [1.0, 2.0, 3.0],
        "other branches keep theirs"
    );
    let fork = s
        .create(TENANT, None, Some((id.clone(), 2)), None)
        .await
        .unwrap()
        .id;
    assert_eq!(state(&s, &fork, None), [1.0, 2.0]);
    edit(&s, &fork, 5.0).await;
    assert_eq!(state(&s, &fork, None), [1.0, 2.0, 5.0]);
    drop(s);

    // A restart reads the state back from the log, bit for bit.
    let r = open(&url).await;
    assert_eq!(state(&r, &id, None), [1.0, 4.0]);
    assert_eq!(state(&r, &id, Some(3)), [1.0, 2.0, 3.0]);
    assert_eq!(state(&r, &fork, None), [1.0, 2.0, 5.0]);
    let view = r.view(TENANT, &id, None).unwrap();
    assert_eq!(
        view.overlay.bytes(),
        2 * (4 + 6 + 3) * 4,
        "deltas and state counted"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
