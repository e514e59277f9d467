//! `emend train`: trains an editor (MEND or SERAC) against the model, with a progress bar on stderr,
//! validation lines as they come, and the artefact's id on stdout. Checkpoints go to
//! `<cache>/trainings/<run>`; running the same command again after a kill resumes there.
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use emend::engine::training::{ArtefactStore, TrainConfig, Trainer, TrainingData};
use emend::setup;

use super::eval::data_dir;
use super::{load, Global};

#[derive(Args)]
pub struct TrainArgs {
    /// The editor to train.
    #[arg(long, default_value = "mend")]
    pub method: String,
    /// Training records.
    #[arg(long, value_enum, default_value = "zsre")]
    pub data: TrainingData,
    #[arg(long)]
    pub steps: Option<usize>,
    /// Any other field of the training configuration as a JSON object (see `POST /v1/trainings`),
    /// e.g. '{"lr": 1e-4, "val_every": 200}'.
    #[arg(long)]
    pub config: Option<String>,
    /// Run folder name under `<cache>/trainings` [default: derived from the configuration, so
    /// the same command resumes the same run].
    #[arg(long)]
    pub run: Option<String>,
    /// Dataset directory laid out like ../shared/data.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where artefacts are stored [default: <cache>/editors].
    #[arg(long, env = "EMEND_EDITORS_DIR")]
    pub editors_dir: Option<PathBuf>,
}

pub fn config_of(a: &TrainArgs) -> Result<TrainConfig> {
    let mut v: serde_json::Value = match &a.config {
        Some(s) => serde_json::from_str(s).context("--config must be a JSON object")?,
        None => serde_json::json!({}),
    };
    let obj = v
        .as_object_mut()
        .context("--config must be a JSON object")?;
    obj.insert("method".into(), a.method.clone().into());
    obj.insert("data".into(), serde_json::to_value(a.data)?);
    if let Some(s) = a.steps {
        obj.insert("steps".into(), s.into());
    }
    serde_json::from_value(v).context("training configuration")
}

pub fn run(g: &Global, a: TrainArgs) -> Result<()> {
    let config = config_of(&a)?;
    let run_name = a.run.clone().unwrap_or_else(|| {
        use sha2::Digest;
        let d = sha2::Sha256::digest(serde_json::to_vec(&config).unwrap_or_default());
        format!("{}-{}", config.method, &hex::encode(d)[..12])
    });
    let run_dir = setup::cache_dir().join("trainings").join(&run_name);
    let m = load(g)?;
    let dir = data_dir(a.data_dir.clone());
    let mut trainer = Trainer::open(
        m.model.as_ref(),
        &m.tokenizer,
        config.clone(),
        &dir,
        &run_dir,
        &m.info.sha256,
    )?;
    eprintln!(
        "training {} on {} in {} (step {} of {})",
        config.method,
        config.data.file(),
        run_dir.display(),
        trainer.step(),
        config.steps
    );
    let bar = ProgressBar::new(config.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {elapsed} (eta {eta})  {msg}")
            .expect("valid template"),
    );
    bar.set_position(trainer.step() as u64);
    let cancel = AtomicBool::new(false);
    trainer.run(m.model.as_ref(), &m.tokenizer, &cancel, |p| {
        bar.set_position(p.step as u64);
        if p.loss_edit.is_finite() {
            bar.set_message(format!("edit {:.3} loc {:.4}", p.loss_edit, p.loss_loc));
        }
        if let Some(v) = &p.validation {
            let line = format!(
                "step {:>6}: edit success {:.3}, generalization {:.3}, locality {:.3} (losses: edit {:.3}, loc {:.4})",
                v.step, v.edit_success, v.generalization, v.locality, v.loss_edit, v.loss_loc
            );
            // A hidden bar (stderr not a terminal) prints nothing, lines included.
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
    })?;
    bar.finish_and_clear();
    let store = ArtefactStore::new(
        a.editors_dir
            .unwrap_or_else(|| setup::cache_dir().join("editors")),
    );
    let id = trainer.finish(&store)?;
    if g.json {
        println!(
            "{}",
            serde_json::json!({"artefact": id, "run": run_name, "summary": trainer.summary()})
        );
    } else {
        println!("{id}");
    }
    Ok(())
}
