//! MEND training on the default model, in process: a run stopped after its first checkpoint
//! and reopened (what a kill -9 leaves) ends with the same network, bit for bit, as a run that
//! was never stopped, and the network learns (its edit learning rates move); a reopened folder
//! with another configuration is refused.
mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::server::temp_dir;
use emend::engine::training::{TrainConfig, Trainer};

fn config() -> TrainConfig {
    serde_json::from_value(serde_json::json!({
        "steps": 20, "accumulate": 5, "val_every": 10, "val_records": 2, "rank": 8,
        "lr": 1e-3, "edit_lr": 1e-3, "seed": 7
    }))
    .unwrap()
}

fn open(run_dir: &Path, cfg: TrainConfig) -> Trainer {
    let m = common::default_model();
    Trainer::open(
        m.model.as_ref(),
        cfg,
        &common::shared_dir().join("data"),
        run_dir,
        &m.info.sha256,
    )
    .unwrap()
}

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = t
        .net()
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, x)| (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_stopped_run_resumes_to_the_same_network_bit_for_bit() {
    let m = common::default_model();
    let (lm, tok) = (m.model.as_ref(), &m.tokenizer);
    let dir = temp_dir("mend-resume");
    let no = AtomicBool::new(false);

    let mut whole = open(&dir.join("whole"), config());
    assert!(whole.run(lm, tok, &no, |_| {}).unwrap());
    // Gradients reach the network: its edit learning rates moved from their start.
    let lrs = whole.net().edit_lrs().unwrap();
    assert!(lrs.iter().all(|&lr| (lr - 1e-3).abs() > 1e-6), "{lrs:?}");

    let mut first = open(&dir.join("stopped"), config());
    while first.history().is_empty() {
        first.advance(lm, tok).unwrap();
    }
    // Two more steps past the checkpoint are lost with the process.
    first.advance(lm, tok).unwrap();
    first.advance(lm, tok).unwrap();
    drop(first);
    let mut resumed = open(&dir.join("stopped"), config());
    assert_eq!(resumed.step(), 10, "resumes at the checkpoint");
    assert!(resumed.run(lm, tok, &no, |_| {}).unwrap());
    let (a, b) = (weights(&whole), weights(&resumed));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after resuming");
    }
    // The checkpoint's JSON keeps the history's floats to within a rounding step.
    for (x, y) in whole.history().iter().zip(resumed.history()) {
        assert_eq!(
            (x.step, x.edit_success, x.locality),
            (y.step, y.edit_success, y.locality)
        );
        assert!((x.loss_loc - y.loss_loc).abs() < 1e-12, "{x:?} {y:?}");
    }

    // The same folder with another configuration is refused, not mixed.
    let mut other = config();
    other.seed = 8;
    let m = common::default_model();
    let e = Trainer::open(
        m.model.as_ref(),
        other,
        &common::shared_dir().join("data"),
        &dir.join("stopped"),
        &m.info.sha256,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("another configuration"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
