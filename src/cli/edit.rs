//! `emend edit`: apply edits to a fresh session of the model and print their metrics;
//! `emend stats`: precompute the key statistics ROME/MEMIT need.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{
    self, EditContext, EditRequest, EditingEnv, MeasureOptions, Method, Resource,
};
use emend::engine::model::generate::{generate, GenParams};
use emend::engine::overlay::{Edited, Overlay};
use emend::setup;

use super::{load, Global};

#[derive(Args)]
pub struct EditArgs {
    /// The editing method (see `emend methods`).
    #[arg(long, default_value = "rome")]
    pub method: String,
    /// Edit requests: a JSON array or JSONL of `{prompt, subject, target_new, …}` or
    /// `{"dataset": "counterfact", "id": N}` records.
    #[arg(long, conflicts_with = "dataset")]
    pub file: Option<PathBuf>,
    /// Take the requests from a dataset (counterfact or zsre) instead.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Dataset record ids (comma-separated); default: the first `--first` records.
    #[arg(long, value_delimiter = ',')]
    pub ids: Vec<u64>,
    #[arg(long, default_value_t = 1)]
    pub first: usize,
    /// Hyper-parameter overrides as a JSON object, e.g. '{"layer": 5}'.
    #[arg(long)]
    pub hparams: Option<String>,
    /// Dataset directory (laid out like shared/data) [default: $EMEND_DATA_DIR, else
    /// $EMEND_SHARED_DIR/data, else ../shared/data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Also measure fluency (n-gram entropy of generations).
    #[arg(long)]
    pub fluency: bool,
    /// Prompts to continue greedily before and after the edits (repeatable).
    #[arg(long)]
    pub probe: Vec<String>,
    /// Context templates (a JSON array of strings with `{}`) instead of sampling them, e.g. to
    /// reproduce another run's edit.
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Write what the edit used and made into DIR: `edit.json` (first request, hyper-parameters,
    /// context templates, statistics file and provenance) and `step-N.safetensors` (deltas).
    /// `scripts/rome_reference.py` reads it.
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

#[derive(Args)]
pub struct StatsArgs {
    /// Layers (comma-separated); default: the layers every method's defaults declare.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Corpus sequences (of up to 128 tokens) [default: the methods' `mom2_samples`].
    #[arg(long)]
    pub samples: Option<usize>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// `methods` without those that need a trained editor none of which is stored for `info`'s
/// model (a default all-methods run leaves them out, saying so, rather than failing).
pub fn trained_or_skipped(
    methods: Vec<emend::engine::editing::Method>,
    ctx: &emend::engine::editing::EditContext,
    m: &emend::engine::model::LoadedModel,
) -> Vec<emend::engine::editing::Method> {
    use emend::engine::editing::{hparams, Resource};
    methods
        .into_iter()
        .filter(|method| {
            let defaults = hparams::defaults(*method, m.model.spec());
            let needs: Vec<Resource> = method
                .imp()
                .resources(&defaults)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| matches!(r, Resource::TrainedEditor { .. }))
                .collect();
            if needs.is_empty() {
                return true;
            }
            match ctx.acquire(m.model.as_ref(), &m.tokenizer, &needs) {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("skipping {method}: {e}");
                    false
                }
            }
        })
        .collect()
}

pub fn env(data_dir: Option<PathBuf>) -> EditingEnv {
    EditingEnv {
        stats_dir: setup::cache_dir().join("stats"),
        editors_dir: std::env::var_os("EMEND_EDITORS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| setup::cache_dir().join("editors")),
        data_dir: data_dir.or_else(setup::default_datasets_dir),
    }
}

/// Edit requests from a file: a JSON array or JSONL whose items are edit requests
/// (`{prompt, subject, target_new, …}`) or dataset records (`{"dataset": "counterfact", "id": N}`).
pub fn read_edit_file(f: &Path, data_dir: Option<&Path>) -> Result<Vec<EditRequest>> {
    let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
    let trimmed = text.trim_start();
    let items: Vec<(String, serde_json::Value)> = if trimmed.starts_with('[') {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(trimmed).with_context(|| format!("parsing {}", f.display()))?;
        v.into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{} item {}", f.display(), i), v))
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let at = format!("{} line {}", f.display(), i + 1);
                let v = serde_json::from_str(l).with_context(|| at.clone())?;
                Ok((at, v))
            })
            .collect::<Result<_>>()?
    };
    // Each dataset is parsed once, however many of its records the file names.
    let mut loaded: HashMap<&'static str, Vec<datasets::Record>> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for (at, v) in items {
        if v.get("dataset").is_none() {
            out.push(serde_json::from_value(v).with_context(|| at.clone())?);
            continue;
        }
        let ds: EditDataset = v["dataset"]
            .as_str()
            .with_context(|| format!("{at}: `dataset` must be a string"))?
            .parse()
            .with_context(|| at.clone())?;
        let id = v
            .get("id")
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("{at}: `id` must be a non-negative integer"))?;
        let Some(dir) = data_dir else {
            bail!("{at}: names a dataset record but there is no dataset directory (--data-dir)");
        };
        if !loaded.contains_key(ds.name()) {
            loaded.insert(ds.name(), datasets::load(ds, dir)?);
        }
        let r = loaded[ds.name()]
            .iter()
            .find(|r| r.id == id)
            .with_context(|| format!("{at}: {} has no record {id}", ds.name()))?;
        out.push(r.request.clone());
    }
    if out.is_empty() {
        bail!("{}: no edits", f.display());
    }
    Ok(out)
}

fn read_requests(a: &EditArgs, data_dir: Option<&PathBuf>) -> Result<Vec<EditRequest>> {
    if let Some(f) = &a.file {
        return read_edit_file(f, data_dir.map(PathBuf::as_path));
    }
    let Some(ds) = &a.dataset else {
        bail!("give --file or --dataset");
    };
    let ds: EditDataset = ds.parse()?;
    let Some(dir) = data_dir else {
        bail!("no dataset directory: pass --data-dir or set EMEND_DATA_DIR");
    };
    if a.ids.is_empty() {
        let all = datasets::load(ds, dir)?;
        if a.first == 0 || a.first > all.len() {
            bail!("--first must be 1 to {} for {}", all.len(), ds.name());
        }
        Ok(all.into_iter().take(a.first).map(|r| r.request).collect())
    } else {
        Ok(datasets::by_ids(ds, dir, &a.ids)?)
    }
}

fn greedy(
    m: &dyn emend::engine::model::CausalLm,
    tok: &emend::engine::model::Tok,
    p: &str,
) -> Result<String> {
    let ids = tok.encode(p)?;
    let g = generate(
        m,
        tok,
        &[ids],
        &GenParams {
            max_tokens: 8,
            ..GenParams::default()
        },
        &mut |_, _| {},
    )?;
    Ok(g[0].text.clone())
}

pub fn run_edit(g: &Global, a: EditArgs) -> Result<()> {
    let method: Method = a.method.parse()?;
    let env = env(a.data_dir.clone());
    let requests = read_requests(&a, env.data_dir.as_ref())?;
    let overrides: serde_json::Value = match &a.hparams {
        Some(s) => serde_json::from_str(s).context("--hparams must be a JSON object")?,
        None => serde_json::Value::Null,
    };
    let m = load(g)?;
    editing::validate(&requests, &m.tokenizer)?;
    let ctx = EditContext::new(env, &m.info);
    let resolved = editing::hparams::resolve(method, m.model.spec(), &overrides)?;
    let template_key = (
        resolved["context_templates"].as_u64().unwrap_or(0) as usize,
        resolved["context_template_tokens"].as_u64().unwrap_or(0) as usize,
    );
    if let Some(f) = &a.templates {
        let t: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        )
        .with_context(|| format!("{}: a JSON array of strings", f.display()))?;
        if t.len() != template_key.0 + 1 || t.iter().any(|x| !x.contains("{}")) {
            bail!(
                "{}: {} templates with `{{}}` expected (context_templates + the bare prompt)",
                f.display(),
                template_key.0 + 1
            );
        }
        ctx.pin_templates(template_key.0, template_key.1, t);
    }
    let base = Overlay::base();
    let before: Vec<String> = a
        .probe
        .iter()
        .map(|p| greedy(m.model.as_ref(), &m.tokenizer, p))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let steps = editing::apply(
        &m,
        &base,
        method,
        &requests,
        &overrides,
        MeasureOptions { fluency: a.fluency },
        &ctx,
    )?;
    let total = start.elapsed().as_secs_f64();
    if let Some(dir) = &a.dump {
        dump(dir, &m, &ctx, method, &requests[0], &steps, template_key)?;
    }
    let mut overlay = base;
    for s in &steps {
        overlay = s.version_on(&overlay);
    }
    let edited = Edited::new(
        m.model.as_ref(),
        Arc::new(overlay.prepare(m.model.as_ref())?),
    );
    let after: Vec<String> = a
        .probe
        .iter()
        .map(|p| greedy(&edited, &m.tokenizer, p))
        .collect::<Result<_>>()?;
    if g.json {
        let out = json!({
            "method": method.name(),
            "seconds": total,
            "steps": steps.iter().enumerate().map(|(i, s)| json!({
                "version": i + 1,
                "duration_ms": s.duration_ms,
                "reports": s.reports,
                "hparams": s.hparams,
                "diagnostics": s.diagnostics,
            })).collect::<Vec<_>>(),
            "probes": a.probe.iter().zip(before.iter().zip(&after)).map(|(p, (b, x))| json!({
                "prompt": p, "before": b, "after": x,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:>7} {:>9} {:>11} {:>8} {:>14} {:>9}  subject → target",
        "version", "seconds", "reliability", "success", "generalization", "locality"
    );
    let mut version = 0;
    for s in &steps {
        version += 1;
        let reqs: Vec<&EditRequest> = if method.batched() {
            requests.iter().collect()
        } else {
            vec![&requests[version - 1]]
        };
        for (r, rep) in reqs.iter().zip(&s.reports) {
            let p = &rep.post;
            let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
            println!(
                "{:>7} {:>9.2} {:>11.3} {:>8} {:>14} {:>9}  {} → {}",
                version,
                s.duration_ms as f64 / 1000.0,
                p.reliability,
                f(p.success),
                f(p.generalization),
                f(p.locality),
                r.subject,
                r.target_new
            );
        }
    }
    for (p, (b, x)) in a.probe.iter().zip(before.iter().zip(&after)) {
        println!("{p:?}: {b:?} → {x:?}");
    }
    println!("total {total:.2} s");
    Ok(())
}

fn dump(
    dir: &std::path::Path,
    m: &emend::engine::model::LoadedModel,
    ctx: &EditContext,
    method: Method,
    first: &EditRequest,
    steps: &[editing::EditStep],
    (n, tokens): (usize, usize),
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let h = &steps[0].hparams;
    let templates = if n > 0 {
        ctx.templates(m.model.as_ref(), &m.tokenizer, n, tokens)?
            .as_ref()
            .clone()
    } else {
        Vec::new()
    };
    // The statistics the method declared for these hyper-parameters.
    let mut stats_files = Vec::new();
    let mut stats = Vec::new();
    for r in method.imp().resources(h)? {
        // A null space comes from the same statistics.
        if let Resource::KeyStats { layers, samples }
        | Resource::NullSpace {
            layers, samples, ..
        } = r
        {
            let st = ctx.stats.get(
                m.model.as_ref(),
                &m.tokenizer,
                &m.info.sha256,
                &layers,
                samples,
            )?;
            for (&l, st) in layers.iter().zip(st) {
                let f = ctx.stats.file(&m.info.sha256, l, samples);
                stats_files.push(f.display().to_string());
                stats.push(json!(st.provenance));
            }
        }
    }
    let info = json!({
        "method": method.name(),
        "request": {
            "prompt": first.template(),
            "subject": first.subject,
            "target_new": first.target_new,
        },
        "hparams": h,
        "templates": templates,
        "stats_file": stats_files.first(),
        "stats_files": stats_files,
        "stats": stats.first(),
        "diagnostics": steps[0].diagnostics,
        "duration_ms": steps.iter().map(|s| s.duration_ms).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("edit.json"), serde_json::to_string_pretty(&info)?)?;
    for (i, s) in steps.iter().enumerate() {
        let bytes = emend::engine::overlay::encode(&s.deltas, &s.state)?;
        std::fs::write(dir.join(format!("step-{i}.safetensors")), bytes)?;
    }
    Ok(())
}

/// `emend methods`: the registry, with the loaded model's defaults.
pub fn run_methods(g: &Global) -> Result<()> {
    let m = load(g)?;
    let methods = editing::methods(m.model.spec());
    if g.json {
        println!("{}", serde_json::to_string_pretty(&methods)?);
        return Ok(());
    }
    for info in methods {
        let batch = if info.batched { "batch" } else { "one by one" };
        println!("{:<8} {batch:<10} {}", info.name, info.description);
        println!("         defaults  {}", info.defaults);
        for r in &info.resources {
            println!("         needs     {}", serde_json::to_string(r)?);
        }
    }
    Ok(())
}

pub fn run_stats(g: &Global, a: StatsArgs) -> Result<()> {
    let env = env(a.data_dir);
    let m = load(g)?;
    let spec = m.model.spec();
    // (layer, samples) pairs: the key statistics every method's defaults declare, or the
    // layers and sample count given.
    let mut wanted: Vec<(usize, usize)> = Vec::new();
    for method in Method::all() {
        let defaults = editing::hparams::defaults(method, spec);
        for r in method.imp().resources(&defaults).unwrap_or_default() {
            // A null space comes from the same statistics.
            if let Resource::KeyStats { layers, samples }
            | Resource::NullSpace {
                layers, samples, ..
            } = r
            {
                wanted.extend(
                    layers
                        .into_iter()
                        .map(|l| (l, a.samples.unwrap_or(samples))),
                );
            }
        }
    }
    if !a.layers.is_empty() {
        let samples = a
            .samples
            .unwrap_or_else(|| wanted.first().map_or(1000, |w| w.1));
        wanted = a.layers.iter().map(|&l| (l, samples)).collect();
    }
    wanted.sort_unstable();
    wanted.dedup();
    if let Some(&(bad, _)) = wanted.iter().find(|w| w.0 >= spec.n_layers) {
        bail!(
            "layer {bad} does not exist (the model has {})",
            spec.n_layers
        );
    }
    if wanted.iter().any(|w| w.1 == 0) {
        bail!("--samples must be at least 1");
    }
    let ctx = EditContext::new(env, &m.info);
    let mut stats = Vec::with_capacity(wanted.len());
    for (layer, samples) in wanted {
        stats.extend(ctx.stats.get(
            m.model.as_ref(),
            &m.tokenizer,
            &m.info.sha256,
            &[layer],
            samples,
        )?);
    }
    let rows: Vec<_> = stats.iter().map(|s| &s.provenance).collect();
    if g.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for p in rows {
            println!(
                "layer {:>3}  {} sequences, {} tokens, {:.1} s  corpus {}  (cache {})",
                p.layer,
                p.sequences,
                p.tokens,
                p.seconds,
                p.corpus,
                ctx.stats.dir().display()
            );
        }
    }
    Ok(())
}
