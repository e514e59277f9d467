//! A training run of a trained editor: its configuration, the loop (MEND: EasyEdit's
//! `EditTrainer.edit_step`, an edit from the base model, then `cedit · NLL(edit) + cloc ·
//! KL(locality)`; SERAC: the scope classifier's cross-entropies on a record's rephrasing and
//! on unrelated prompts, see [`super::serac`]), gradients accumulated over `accumulate`
//! records per Adam step, validation on held-back records, and checkpoints every `val_every`
//! steps from which a killed run resumes bit for bit.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::adam::{accumulate, Adam};
use super::artefact::{ArtefactStore, Provenance, TrainedEditor};
use super::mend::{
    factors, hidden_at, logits_from, overlay_of, post_losses, token_accuracy, updates, TargetRow,
};
use super::mend_net::{MendNet, NetShape};
use super::records::{load, TrainingData, TrainingRecord, TrainingSet};
use super::serac::{self, ScopeNet, ScopeShape};
use super::{checkpoint, TrainingError};
use crate::engine::model::{CausalLm, Tok};

/// What a training run does; every field has a default (`{}` trains MEND on zsRE; fields
/// marked MEND or SERAC apply to that method only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The trained editor: `mend` or `serac`.
    pub method: String,
    pub data: TrainingData,
    /// Training steps (one record each).
    #[schema(minimum = 1, maximum = 100000)]
    pub steps: usize,
    /// Adam learning rate of the network (default: MEND 1e-4, SERAC 1e-2; EasyEdit: 1e-6 and
    /// 1e-5 over up to 100k steps, a short CPU run needs more).
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub lr: Option<f64>,
    /// MEND: Adam learning rate of the per-layer edit learning rates (EasyEdit: 1e-4).
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub lr_lr: f64,
    /// MEND: initial edit learning rate (EasyEdit: 1e-4).
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub edit_lr: f64,
    /// Weight of the edit loss (MEND; SERAC: of the in-scope cross-entropy) (EasyEdit: 0.1).
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub cedit: f64,
    /// Weight of the locality KL (MEND; SERAC: of the out-of-scope cross-entropy) (EasyEdit:
    /// 1.0).
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub cloc: f64,
    /// MEND: rank of the network's residual layers (default 512; EasyEdit: 1920 for 7B
    /// models). SERAC: width of the classifier's projection (default 256).
    #[schema(minimum = 1, maximum = 4096)]
    pub rank: Option<usize>,
    /// MEND: layers whose MLP down projection is edited (default: the top three, as EasyEdit).
    /// SERAC: the one layer whose output the classifier pools (default: a third of the way
    /// up).
    pub layers: Option<Vec<usize>>,
    /// Records per Adam step (EasyEdit: `accumulate_bs` 10).
    #[schema(minimum = 1, maximum = 100)]
    pub accumulate: usize,
    /// Records held back at the end of the file for validation.
    #[schema(minimum = 1, maximum = 1000)]
    pub val_records: usize,
    /// Validate and checkpoint every this many steps (a multiple of `accumulate`).
    #[schema(minimum = 1, maximum = 100000)]
    pub val_every: usize,
    pub seed: u64,
    /// Global gradient-norm clip (EasyEdit: 100).
    #[schema(minimum = 0.0)]
    pub grad_clip: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: "mend".into(),
            data: TrainingData::Zsre,
            steps: 1000,
            lr: None,
            lr_lr: 1e-4,
            edit_lr: 1e-4,
            cedit: 0.1,
            cloc: 1.0,
            rank: None,
            layers: None,
            accumulate: 10,
            val_records: 50,
            val_every: 100,
            seed: 42,
            grad_clip: 100.0,
        }
    }
}

/// The methods a run can train.
pub const TRAINABLE: &[&str] = &["mend", "serac"];

impl TrainConfig {
    fn serac(&self) -> bool {
        self.method == "serac"
    }

    /// The network's learning rate, its method's default unless set.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(if self.serac() { 1e-2 } else { 1e-4 })
    }

    /// MEND's rank or SERAC's width, its method's default unless set.
    pub fn rank(&self) -> usize {
        self.rank.unwrap_or(if self.serac() { 256 } else { 512 })
    }

    /// Checks what the schema cannot, against the model; returns the edited (MEND) or pooled
    /// (SERAC) layers.
    pub fn check(&self, n_layers: usize) -> Result<Vec<usize>, TrainingError> {
        let bad = |f: &str, m: String| Err(TrainingError::Field(f.into(), m));
        if !TRAINABLE.contains(&self.method.as_str()) {
            return bad(
                "method",
                format!(
                    "`{}` cannot be trained; trainable: {}",
                    self.method,
                    TRAINABLE.join(", ")
                ),
            );
        }
        for (f, v, lo, hi) in [
            ("steps", self.steps, 1, 100_000),
            ("rank", self.rank(), 1, 4096),
            ("accumulate", self.accumulate, 1, 100),
            ("val_records", self.val_records, 1, 1000),
            ("val_every", self.val_every, 1, 100_000),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(f, format!("must be in {lo}..={hi}"));
            }
        }
        for (f, v, hi) in [
            ("lr", self.lr(), 1.0),
            ("lr_lr", self.lr_lr, 1.0),
            ("edit_lr", self.edit_lr, 1.0),
            ("cedit", self.cedit, 100.0),
            ("cloc", self.cloc, 100.0),
            ("grad_clip", self.grad_clip, f64::MAX),
        ] {
            if !(v.is_finite() && (0.0..=hi).contains(&v)) {
                return bad(f, format!("must be a number in [0, {hi}]"));
            }
        }
        // The schema's integers are int64: a seed beyond that is out of range for clients too.
        if self.seed > i64::MAX as u64 {
            return bad("seed", format!("must be at most {}", i64::MAX));
        }
        if !self.val_every.is_multiple_of(self.accumulate) {
            return bad(
                "val_every",
                format!("must be a multiple of accumulate ({})", self.accumulate),
            );
        }
        let layers = self.layers.clone().unwrap_or_else(|| {
            if self.serac() {
                vec![n_layers / 3]
            } else {
                (n_layers.saturating_sub(3)..n_layers).collect()
            }
        });
        if self.serac() && layers.len() != 1 {
            return bad("layers", "SERAC pools exactly one layer".into());
        }
        if layers.is_empty()
            || layers.iter().any(|&l| l >= n_layers)
            || layers.windows(2).any(|w| w[0] >= w[1])
        {
            return bad(
                "layers",
                format!("must be increasing layers below {n_layers}"),
            );
        }
        Ok(layers)
    }
}

/// Validation on the held-back records. MEND: edit success (token accuracy of the new target
/// after the edit, on the edit prompt and on its rephrasing) and locality (share of the
/// unrelated answer's tokens whose greedy prediction is unchanged). SERAC, with every held-back
/// edit in memory: the share of prompts and of rephrasings routed to their own edit, and of
/// unrelated prompts routed to none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Validation {
    pub step: usize,
    pub edit_success: f64,
    pub generalization: f64,
    pub locality: f64,
    /// Mean training losses over the steps since the previous validation.
    pub loss_edit: f64,
    pub loss_loc: f64,
}

/// What a progress callback sees after each step.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
    pub loss_edit: f64,
    pub loss_loc: f64,
    /// Set on the steps that validated.
    pub validation: Option<Validation>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    config: TrainConfig,
    model_sha256: String,
    data_sha256: String,
    step: usize,
    adam_t: u64,
    history: Vec<Validation>,
    elapsed_s: f64,
    window: (f64, f64, usize),
}

/// A validation part-way through its held-back records (validation runs a few records per
/// [`Trainer::advance`], so that a caller serving other work between calls waits little).
#[derive(Debug, Clone, Default)]
struct PendingValidation {
    done: usize,
    edit_success: f64,
    generalization: f64,
    locality: f64,
}

/// Held-back records validated per [`Trainer::advance`].
const VALIDATE_PER_CALL: usize = 4;

/// A training run. It holds no model: each call takes the model it runs on, so that the
/// engine can keep a run between its calls.
pub struct Trainer {
    set: TrainingSet,
    data_dir: PathBuf,
    editor: TrainedEditor,
    /// SERAC: the held-back edits' memory keys during a validation.
    val_keys: Option<Tensor>,
    opt: Adam,
    grads: Vec<Option<Tensor>>,
    state: State,
    pending: Option<PendingValidation>,
    checkpoint: PathBuf,
}

impl Trainer {
    /// Opens the run in `run_dir`: resumes from its checkpoint when there is one (with the
    /// same configuration, model and data), else starts fresh.
    pub fn open(
        model: &dyn CausalLm,
        tok: &Tok,
        config: TrainConfig,
        data_dir: &Path,
        run_dir: &Path,
        model_sha256: &str,
    ) -> Result<Self, TrainingError> {
        let layers = config.check(model.spec().n_layers)?;
        let set = load(data_dir, config.data)?;
        if set.records.len() <= config.val_records {
            return Err(TrainingError::Field(
                "val_records".into(),
                format!("must be below the file's {} records", set.records.len()),
            ));
        }
        let dev = model.device();
        let mut editor = fresh(model, &config, layers)?;
        let mut opt = Adam::new(editor.vars(), opt_lrs(&config, editor.vars().len()))?;
        std::fs::create_dir_all(run_dir)?;
        let checkpoint = run_dir.join("checkpoint.safetensors");
        let mut state = State {
            config: config.clone(),
            model_sha256: model_sha256.to_string(),
            data_sha256: set.sha256.clone(),
            step: 0,
            adam_t: 0,
            history: Vec::new(),
            elapsed_s: 0.0,
            window: (0.0, 0.0, 0),
        };
        if let Some((tensors, saved)) = checkpoint::read(&checkpoint, dev)? {
            let saved: State = serde_json::from_value(saved)?;
            if saved.config != config
                || saved.model_sha256 != state.model_sha256
                || saved.data_sha256 != state.data_sha256
            {
                return Err(TrainingError::Mismatch(format!(
                    "{} holds a run with another configuration, model or data; use another run folder",
                    run_dir.display()
                )));
            }
            editor = TrainedEditor::from_tensors(&config.method, &editor.shape(), &tensors, dev)?;
            opt = Adam::new(editor.vars(), opt_lrs(&config, editor.vars().len()))?;
            opt.restore(&tensors, saved.adam_t)?;
            state = saved;
            tracing::info!(step = state.step, "training resumed from its checkpoint");
        }
        if state.step == 0 {
            if let TrainedEditor::Serac(net) = &mut editor {
                let train = &set.records[..set.records.len() - config.val_records];
                serac::fit_fresh(net, model, tok, train)?;
            }
        }
        let grads = vec![None; editor.vars().len()];
        Ok(Self {
            set,
            data_dir: data_dir.to_path_buf(),
            editor,
            val_keys: None,
            opt,
            grads,
            state,
            pending: None,
            checkpoint,
        })
    }

    pub fn step(&self) -> usize {
        self.state.step
    }

    /// The network as trained so far.
    pub fn editor(&self) -> &TrainedEditor {
        &self.editor
    }

    pub fn history(&self) -> &[Validation] {
        &self.state.history
    }

    fn train_count(&self) -> usize {
        self.set.records.len() - self.state.config.val_records
    }

    /// The index of the record step `s` trains on: a seeded shuffle of the training part per
    /// epoch.
    fn record_at(&self, s: usize) -> usize {
        let n = self.train_count();
        let epoch = (s / n) as u64;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            self.state
                .config
                .seed
                .wrapping_add(epoch.wrapping_mul(0x9E37_79B9)),
        ));
        order[s % n]
    }

    /// True once every step is trained and validated.
    pub fn done(&self) -> bool {
        self.state.step >= self.state.config.steps && self.pending.is_none()
    }

    /// One piece of work: a training step on one record (the optimiser steps every
    /// `accumulate` records), or a few held-back records of a due validation; a validation's
    /// last piece writes the checkpoint.
    pub fn advance(&mut self, model: &dyn CausalLm, tok: &Tok) -> Result<Progress, TrainingError> {
        let started = Instant::now();
        let progress = if self.pending.is_some() {
            self.validate_some(model, tok)?
        } else {
            self.train_step(model, tok)?
        };
        self.state.elapsed_s += started.elapsed().as_secs_f64();
        Ok(progress)
    }

    fn train_step(&mut self, model: &dyn CausalLm, tok: &Tok) -> Result<Progress, TrainingError> {
        let at = self.record_at(self.state.step);
        let (l_edit, l_loc) = match &self.editor {
            TrainedEditor::Serac(net) => {
                let train = &self.set.records[..self.train_count()];
                serac::losses(net, model, tok, train, at, self.state.step)?
            }
            TrainedEditor::Mend(_) => {
                let rec = self.set.records[at].clone();
                self.losses(model, tok, &rec, true)?
            }
        };
        let (le, ll) = (
            l_edit.to_scalar::<f32>()? as f64,
            l_loc.to_scalar::<f32>()? as f64,
        );
        // A NaN would poison the network, the checkpoint and the job's stored curve.
        if !(le.is_finite() && ll.is_finite()) {
            return Err(TrainingError::Invalid(format!(
                "training diverged at step {}: the loss is not finite; lower `lr` or `edit_lr`",
                self.state.step + 1
            )));
        }
        let cfg = &self.state.config;
        let total = ((l_edit * cfg.cedit)? + (l_loc * cfg.cloc)?)?;
        let total = (total / cfg.accumulate as f64)?;
        let store = total.backward()?;
        accumulate(&mut self.grads, &self.editor.vars(), &store)?;
        self.state.step += 1;
        let step = self.state.step;
        if step.is_multiple_of(cfg.accumulate) || step == cfg.steps {
            self.opt.step(&self.grads, cfg.grad_clip)?;
            self.grads.iter_mut().for_each(|g| *g = None);
        }
        let w = self.state.window;
        self.state.window = (w.0 + le, w.1 + ll, w.2 + 1);
        if step.is_multiple_of(cfg.val_every) || step == cfg.steps {
            self.pending = Some(PendingValidation::default());
        }
        Ok(Progress {
            step,
            steps: cfg.steps,
            loss_edit: le,
            loss_loc: ll,
            validation: None,
        })
    }

    /// MEND's post-edit losses of `rec` (edited from the base model); `observe` updates the
    /// network's running statistics first (training).
    fn losses(
        &mut self,
        model: &dyn CausalLm,
        tok: &Tok,
        rec: &TrainingRecord,
        observe: bool,
    ) -> Result<(Tensor, Tensor), TrainingError> {
        let TrainedEditor::Mend(net) = &mut self.editor else {
            return Err(TrainingError::Invalid("not a MEND run".into()));
        };
        let from = net.shape.layers[0];
        let row = TargetRow::new(tok, &rec.prompt, &rec.target)?;
        let loc = TargetRow::whole(tok, &rec.loc_prompt, &rec.loc_answer)?;
        let h_edit = hidden_at(model, &row.ids, from)?;
        let h_loc = hidden_at(model, &loc, from)?;
        let all: Vec<(usize, usize)> = (0..loc.len()).map(|p| (0, p)).collect();
        let base_loc = logits_from(model, &h_loc, from, None, &all, false)?;
        let fs = factors(model, &h_edit, &row, &net.shape.layers)?;
        if observe {
            for (u, d) in &fs {
                net.observe(u, d)?;
            }
        }
        let overlay = overlay_of(model, &updates(net, &fs)?)?;
        post_losses(model, overlay, from, (&h_edit, &row), (&h_loc, &base_loc))
    }

    /// Validates the next few held-back records (edits from the base model, one at a time);
    /// after the last, records the validation and writes the checkpoint.
    fn validate_some(
        &mut self,
        model: &dyn CausalLm,
        tok: &Tok,
    ) -> Result<Progress, TrainingError> {
        let n = self.set.records.len();
        let val = self.state.config.val_records;
        let mut p = self.pending.take().unwrap_or_default();
        let end = (p.done + VALIDATE_PER_CALL).min(val);
        let held = &self.set.records[n - val..];
        if let (TrainedEditor::Serac(net), 0) = (&self.editor, p.done) {
            self.val_keys = Some(serac::memory_keys(net, model, tok, held)?);
        }
        for (i, rec) in held.iter().enumerate().take(end).skip(p.done) {
            let (es, gen, loc) = match (&self.editor, &self.val_keys) {
                (TrainedEditor::Serac(net), Some(keys)) => {
                    serac::validate_one(net, model, tok, keys, rec, i)?
                }
                _ => self.validate_one(model, tok, rec)?,
            };
            p.edit_success += es;
            p.generalization += gen;
            p.locality += loc;
        }
        p.done = end;
        let step = self.state.step;
        let mut progress = Progress {
            step,
            steps: self.state.config.steps,
            loss_edit: f64::NAN,
            loss_loc: f64::NAN,
            validation: None,
        };
        if p.done < val {
            self.pending = Some(p);
            return Ok(progress);
        }
        self.val_keys = None;
        let w = self.state.window;
        let mean = |x: f64| if w.2 == 0 { 0.0 } else { x / w.2 as f64 };
        let k = val as f64;
        let v = Validation {
            step,
            edit_success: p.edit_success / k,
            generalization: p.generalization / k,
            locality: p.locality / k,
            loss_edit: mean(w.0),
            loss_loc: mean(w.1),
        };
        self.state.history.push(v.clone());
        self.state.window = (0.0, 0.0, 0);
        self.save_checkpoint()?;
        progress.validation = Some(v);
        Ok(progress)
    }

    /// MEND on one held-back record: token accuracy of the target after its edit on the
    /// prompt and on the rephrasing, and the share of the unrelated answer's greedy tokens
    /// kept.
    fn validate_one(
        &self,
        model: &dyn CausalLm,
        tok: &Tok,
        rec: &TrainingRecord,
    ) -> Result<(f64, f64, f64), TrainingError> {
        let net = self.editor.mend()?;
        let from = net.shape.layers[0];
        let pos = |r: &TargetRow| -> Vec<(usize, usize)> {
            r.terms.iter().map(|t| (0, t.position)).collect()
        };
        let row = TargetRow::new(tok, &rec.prompt, &rec.target)?;
        let h_edit = hidden_at(model, &row.ids, from)?;
        let fs = factors(model, &h_edit, &row, &net.shape.layers)?;
        let overlay = overlay_of(model, &updates(net, &fs)?)?;
        let es = token_accuracy(
            &logits_from(
                model,
                &h_edit,
                from,
                Some(overlay.clone()),
                &pos(&row),
                false,
            )?,
            &row,
        )?;
        let reph = TargetRow::new(tok, &rec.rephrase, &rec.target)?;
        let h_reph = hidden_at(model, &reph.ids, from)?;
        let gen = token_accuracy(
            &logits_from(
                model,
                &h_reph,
                from,
                Some(overlay.clone()),
                &pos(&reph),
                false,
            )?,
            &reph,
        )?;
        let lrow = TargetRow::new(tok, &rec.loc_prompt, &rec.loc_answer)?;
        let h_loc = hidden_at(model, &lrow.ids, from)?;
        let p = pos(&lrow);
        let greedy = |o| -> Result<Vec<u32>, TrainingError> {
            Ok(logits_from(model, &h_loc, from, o, &p, false)?
                .argmax(candle_core::D::Minus1)?
                .to_vec1::<u32>()?)
        };
        let (before, after) = (greedy(None)?, greedy(Some(overlay))?);
        let loc =
            before.iter().zip(&after).filter(|(a, b)| a == b).count() as f64 / before.len() as f64;
        Ok((es, gen, loc))
    }

    fn save_checkpoint(&self) -> Result<(), TrainingError> {
        let mut tensors = self.editor.tensors()?;
        tensors.extend(self.opt.tensors());
        let mut state = self.state.clone();
        state.adam_t = self.opt.t;
        checkpoint::write(&self.checkpoint, &tensors, &serde_json::to_value(&state)?)
    }

    /// Runs until done (or until `cancel` is set: `Ok(false)`), reporting each piece.
    pub fn run(
        &mut self,
        model: &dyn CausalLm,
        tok: &Tok,
        cancel: &AtomicBool,
        mut progress: impl FnMut(&Progress),
    ) -> Result<bool, TrainingError> {
        while !self.done() {
            if cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let p = self.advance(model, tok)?;
            progress(&p);
        }
        Ok(true)
    }

    /// Stores the trained network with its provenance; returns the artefact's id.
    pub fn finish(&self, store: &ArtefactStore) -> Result<String, TrainingError> {
        let data_file = self
            .set
            .path
            .strip_prefix(&self.data_dir)
            .unwrap_or(&self.set.path)
            .display()
            .to_string();
        store.save(
            &self.editor,
            Provenance {
                id: String::new(),
                method: self.state.config.method.clone(),
                model_sha256: self.state.model_sha256.clone(),
                data_file,
                data_sha256: self.state.data_sha256.clone(),
                config: self.state.config.clone(),
                net: self.editor.shape(),
                steps: self.state.step,
                validation: self.state.history.clone(),
                duration_s: self.state.elapsed_s,
                created_at: chrono::Utc::now().to_rfc3339(),
            },
        )
    }

    /// A JSON summary of the run so far.
    pub fn summary(&self) -> serde_json::Value {
        json!({"step": self.state.step, "steps": self.state.config.steps, "validation": self.state.history, "elapsed_s": self.state.elapsed_s})
    }
}

/// Adam's learning rate per variable: the network's `lr`; MEND's edit learning rates (its
/// last variable) take `lr_lr`.
fn opt_lrs(config: &TrainConfig, n: usize) -> Vec<f64> {
    let mut lrs = vec![config.lr(); n];
    if config.method == "mend" {
        lrs[n - 1] = config.lr_lr;
    }
    lrs
}

/// A fresh network of `config`'s method for `model` (`layers` as [`TrainConfig::check`] gave
/// them).
fn fresh(
    model: &dyn CausalLm,
    config: &TrainConfig,
    layers: Vec<usize>,
) -> Result<TrainedEditor, TrainingError> {
    let dev = model.device();
    let hidden = model.spec().hidden_size;
    if config.method == "serac" {
        let shape = ScopeShape {
            layer: layers[0],
            hidden,
            width: config.rank(),
        };
        return Ok(TrainedEditor::Serac(ScopeNet::new(
            shape,
            config.seed,
            dev,
        )?));
    }
    let x_dim = model
        .weight(crate::engine::model::WeightId::mlp_down(layers[0]))?
        .dim(1)?;
    let shape = NetShape {
        layers,
        x_dim,
        delta_dim: hidden,
        rank: config.rank(),
    };
    Ok(TrainedEditor::Mend(MendNet::new(
        shape,
        config.edit_lr,
        config.seed,
        dev,
    )?))
}
