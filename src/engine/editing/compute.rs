//! Dispatch: acquires what a method declares it needs, runs its steps against the session's
//! model, one version per step, and measures each request before and after its step.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use super::method::{EditInput, Resource, Resources};
use super::metrics::measure;
use super::nullspace::NullSpaceCache;
use super::primitives::context_templates;
use super::stats::StatsCache;
use super::{
    hparams, validate, EditError, EditMetrics, EditReport, EditRequest, EditStep, EditingEnv,
    Method,
};
use crate::engine::model::loader::ModelInfo;
use crate::engine::model::{CausalLm, LoadedModel, Tok};
use crate::engine::overlay::{Edited, Overlay, PreparedOverlay};
use crate::engine::training::ArtefactStore;

/// What the engine keeps for editing between jobs: the resources methods declare (statistics
/// and context templates), computed on the base model once.
pub struct EditContext {
    pub stats: StatsCache,
    pub(super) null_spaces: NullSpaceCache,
    pub model_sha256: String,
    /// Trained editors (MEND), loaded on first use.
    pub editors: ArtefactStore,
    templates: Mutex<TemplateCache>,
}

/// Context templates by `(count, tokens)`.
type TemplateCache = HashMap<(usize, usize), Arc<Vec<String>>>;

impl EditContext {
    pub fn new(env: EditingEnv, info: &ModelInfo) -> Self {
        Self {
            stats: StatsCache::new(env.stats_dir.clone(), env.data_dir.clone()),
            null_spaces: NullSpaceCache::default(),
            model_sha256: info.sha256.clone(),
            editors: ArtefactStore::new(env.editors_dir.clone()),
            templates: Mutex::new(HashMap::new()),
        }
    }

    /// Uses `templates` wherever `n` templates of `tokens` tokens are asked for, instead of
    /// sampling them: for comparing engines on identical inputs, or reproducing an edit.
    pub fn pin_templates(&self, n: usize, tokens: usize, templates: Vec<String>) {
        self.templates
            .lock()
            .expect("templates lock")
            .insert((n, tokens), Arc::new(templates));
    }

    /// Whether the `(n, tokens)` context templates are sampled already.
    pub(super) fn has_templates(&self, n: usize, tokens: usize) -> bool {
        self.templates
            .lock()
            .expect("templates lock")
            .contains_key(&(n, tokens))
    }

    /// The context templates ROME and MEMIT average keys over (sampled once per process).
    pub fn templates(
        &self,
        base: &dyn CausalLm,
        tok: &Tok,
        n: usize,
        tokens: usize,
    ) -> Result<Arc<Vec<String>>, EditError> {
        if let Some(t) = self
            .templates
            .lock()
            .expect("templates lock")
            .get(&(n, tokens))
        {
            return Ok(t.clone());
        }
        let t = Arc::new(context_templates(base, tok, n, tokens)?);
        self.templates
            .lock()
            .expect("templates lock")
            .insert((n, tokens), t.clone());
        Ok(t)
    }

    /// Acquires `resources` on the `base` model (from the caches, computing what is missing).
    pub fn acquire(
        &self,
        base: &dyn CausalLm,
        tok: &Tok,
        resources: &[Resource],
    ) -> Result<Resources, EditError> {
        let mut out = Resources::default();
        for r in resources {
            match r {
                Resource::ContextTemplates { count, tokens } => {
                    out.templates = Some(self.templates(base, tok, *count, *tokens)?);
                }
                Resource::KeyStats { layers, samples } => {
                    let st = self
                        .stats
                        .get(base, tok, &self.model_sha256, layers, *samples)?;
                    out.stats
                        .extend(layers.iter().copied().zip(st).collect::<BTreeMap<_, _>>());
                }
                Resource::CorpusSnippets { count } => {
                    out.snippets = Some(Arc::new(self.stats.snippets(base, tok, *count)?));
                }
                Resource::TrainedEditor { method, artefact } => {
                    out.editor = Some(self.editors.get(
                        method,
                        artefact.as_deref(),
                        &self.model_sha256,
                        base.device(),
                    )?);
                }
                Resource::NullSpace {
                    layers,
                    samples,
                    threshold,
                } => {
                    let st = self
                        .stats
                        .get(base, tok, &self.model_sha256, layers, *samples)?;
                    for (&l, s) in layers.iter().zip(st) {
                        let file = self.stats.file(&self.model_sha256, l, *samples);
                        out.null_spaces
                            .insert(l, self.null_spaces.get(&s, &file, *threshold)?);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Options that change what is measured, not what is edited.
#[derive(Debug, Clone, Copy, Default)]
pub struct MeasureOptions {
    /// Also generate from each edit prompt and report n-gram entropy (slower).
    pub fluency: bool,
}

/// Applies `requests` on top of `base` with `method`. Sequential methods make one step per
/// request, each computed against the model the previous step left; MEMIT makes one step.
pub fn apply(
    model: &LoadedModel,
    base: &Arc<Overlay>,
    method: Method,
    requests: &[EditRequest],
    overrides: &Value,
    opts: MeasureOptions,
    ctx: &EditContext,
) -> Result<Vec<EditStep>, EditError> {
    let prepared = Arc::new(base.prepare(model.model.as_ref())?);
    apply_prepared(
        model, base, prepared, method, requests, overrides, opts, ctx,
    )
}

/// [`apply`] with `base` already prepared (the engine keeps prepared overlays per version).
#[allow(clippy::too_many_arguments)] // `apply`'s arguments plus the prepared overlay
pub fn apply_prepared(
    model: &LoadedModel,
    base: &Arc<Overlay>,
    prepared: Arc<PreparedOverlay>,
    method: Method,
    requests: &[EditRequest],
    overrides: &Value,
    opts: MeasureOptions,
    ctx: &EditContext,
) -> Result<Vec<EditStep>, EditError> {
    let lm = model.model.as_ref();
    let tok = &model.tokenizer;
    let spec = lm.spec();
    let imp = method.imp();
    let resolved = hparams::resolve(method, spec, overrides)?;
    validate(requests, tok)?;
    imp.check_requests(requests)?;
    let resources = ctx.acquire(lm, tok, &imp.resources(&resolved)?)?;
    let groups: Vec<Vec<&EditRequest>> = if method.batched() {
        vec![requests.iter().collect()]
    } else {
        requests.iter().map(|r| vec![r]).collect()
    };
    let mut current = base.clone();
    // Each step's edited model is the next step's starting point: prepared once, from the one
    // before it.
    let mut view = Edited::new(lm, prepared);
    let mut steps = Vec::with_capacity(groups.len());
    for group in groups {
        let start = Instant::now();
        let pre = measure(&view, tok, &group, None, opts.fluency)?;
        let measure_pre_ms = start.elapsed().as_secs_f64() * 1e3;
        let compute_start = Instant::now();
        let out = imp.compute(
            &EditInput {
                model: &view,
                current: &current,
                tok,
                requests: &group,
                resources: &resources,
            },
            &resolved,
        )?;
        let compute_ms = compute_start.elapsed().as_secs_f64() * 1e3;
        let post_start = Instant::now();
        let next = Overlay::push_with(&current, out.deltas.clone(), out.state.clone());
        let after = Edited::new(lm, Arc::new(next.prepare_on(lm, &view.overlay)?));
        let post = measure(&after, tok, &group, Some(&pre), opts.fluency)?;
        let reports = pre
            .into_iter()
            .zip(post)
            .map(|(a, b)| EditReport {
                pre: a.metrics,
                post: b.metrics,
            })
            .collect();
        let measure_post_ms = post_start.elapsed().as_secs_f64() * 1e3;
        let duration_ms = start.elapsed().as_millis() as u64;
        let mut diagnostics = out.diagnostics;
        if let Some(d) = diagnostics.as_object_mut() {
            d.insert(
                "phases_ms".into(),
                json!({"measure_pre": measure_pre_ms, "compute": compute_ms, "measure_post": measure_post_ms}),
            );
        }
        tracing::info!(%method, duration_ms, "edit step computed");
        steps.push(EditStep {
            deltas: out.deltas,
            state: out.state,
            reports,
            hparams: resolved.clone(),
            diagnostics,
            duration_ms,
        });
        current = next;
        view = after;
    }
    Ok(steps)
}

/// Earlier edits' metrics measured again on `edited`: the retention a sweep's checkpoint
/// reports (does the model still hold what each edit taught it, after the edits since?).
/// Locality compares with the `base` model's predictions, as EasyEdit's sequential evaluation
/// does; fluency is not measured.
pub fn remeasure(
    base: &dyn CausalLm,
    edited: &dyn CausalLm,
    tok: &Tok,
    requests: &[EditRequest],
) -> Result<Vec<EditMetrics>, EditError> {
    let reqs: Vec<&EditRequest> = requests.iter().collect();
    let pre = measure(base, tok, &reqs, None, false)?;
    let post = measure(edited, tok, &reqs, Some(&pre), false)?;
    Ok(post.into_iter().map(|m| m.metrics).collect())
}
