//! `emend bench-edit`: what editing costs on the loaded model. Key statistics, ROME on the
//! cross-check's request beside the PyTorch reference's time, every registered method on
//! CounterFact records (single edits, or one batch for a batched method), a chain of real
//! sequential ROME edits, and the overlay mechanics at 100 and 1,000 stacked edits (memory,
//! preparation, forward latency). Writes a section of BENCHMARKS.md.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use serde_json::{json, Value};

use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{
    self, EditContext, EditRequest, EditStep, EditingEnv, MeasureOptions, Method, Resource,
};
use emend::engine::model::{CausalLm, Forward, LoadedModel};
use emend::engine::overlay::{Edited, Overlay, PreparedOverlay};

use super::bench::peak_rss_mb;
use super::{load, Global};

#[derive(Args)]
pub struct BenchEditArgs {
    /// Runs per single-edit measurement (distinct CounterFact records; the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CounterFact records in one batch of a batched method (MEMIT).
    #[arg(long, default_value_t = 10)]
    pub memit_batch: usize,
    /// Methods to time on CounterFact records (comma-separated) [default: every registered
    /// method].
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Corpus sequences for the key statistics (computed fresh, into a temporary directory).
    #[arg(long, default_value_t = 400)]
    pub stats_samples: usize,
    /// Real sequential ROME edits in one chain.
    #[arg(long, default_value_t = 10)]
    pub sequential: usize,
    /// Depths at which the chain's real deltas, repeated, are stacked for the overlay numbers.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub stack: Vec<usize>,
    /// `scripts/rome_reference.py`'s report (its ROME on the same request, templates and C).
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// The cross-check fixture whose request and templates the peer used.
    #[arg(long, default_value = "tests/fixtures/rome_reference.json")]
    pub fixture: PathBuf,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write the tables into this markdown file (between the edit-bench markers).
    #[arg(long)]
    pub write_md: Option<PathBuf>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn compute_ms(s: &EditStep) -> f64 {
    s.diagnostics["phases_ms"]["compute"]
        .as_f64()
        .unwrap_or(s.duration_ms as f64)
}

struct Bench<'a> {
    m: &'a LoadedModel,
    ctx: &'a EditContext,
    samples: usize,
}

impl Bench<'_> {
    fn apply(
        &self,
        base: &Arc<Overlay>,
        method: Method,
        reqs: &[EditRequest],
    ) -> Result<Vec<EditStep>> {
        let prepared = Arc::new(base.prepare(self.m.model.as_ref())?);
        self.apply_prepared(base, prepared, method, reqs)
    }

    /// `apply` on a `base` already prepared, as the server's overlay cache hands it over.
    fn apply_prepared(
        &self,
        base: &Arc<Overlay>,
        prepared: Arc<PreparedOverlay>,
        method: Method,
        reqs: &[EditRequest],
    ) -> Result<Vec<EditStep>> {
        let _span = tracing::info_span!("bench_edit", %method, requests = reqs.len()).entered();
        // Methods that read key statistics take the bench's sample count.
        let defaults = editing::hparams::defaults(method, self.m.model.spec());
        let h = if defaults.get("mom2_samples").is_some() {
            json!({"mom2_samples": self.samples})
        } else {
            Value::Null
        };
        Ok(editing::apply_prepared(
            self.m,
            base,
            prepared,
            method,
            reqs,
            &h,
            MeasureOptions::default(),
            self.ctx,
        )?)
    }
}

/// Median seconds of a 32-token forward (logits at every position) on `model`.
fn forward_seconds(model: &dyn CausalLm, runs: usize) -> Result<f64> {
    let ids: Vec<u32> = (0..32).map(|i| 1000 + i * 37).collect();
    let input = Tensor::from_vec(ids, (1, 32), model.device())?;
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let mut fwd = Forward::new(1, 32, model.device());
        let h = model.hidden(&input, &mut fwd)?;
        model.head(&h, false)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

pub fn run(g: &Global, a: BenchEditArgs) -> Result<()> {
    if a.runs == 0 || a.sequential == 0 || a.memit_batch == 0 {
        bail!("--runs, --sequential and --memit-batch must be at least 1");
    }
    let data_dir = a
        .data_dir
        .clone()
        .or_else(emend::setup::default_datasets_dir)
        .context("no dataset directory: pass --data-dir or set EMEND_DATA_DIR")?;
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(&a.fixture)
            .with_context(|| format!("reading {}", a.fixture.display()))?,
    )?;
    let peer: Option<Value> = match &a.peer {
        Some(p) => Some(serde_json::from_str(&std::fs::read_to_string(p)?)?),
        None => None,
    };
    let records = datasets::load(EditDataset::Counterfact, &data_dir)?;
    // The sequential chain's next record is the edit timed on top of each depth.
    let need = a.runs.max(a.memit_batch).max(a.sequential + 1);
    if records.len() < need {
        bail!("CounterFact has {} records, {need} needed", records.len());
    }
    let cf: Vec<EditRequest> = records.into_iter().take(need).map(|r| r.request).collect();

    let m = load(g)?;
    let stats_dir = std::env::temp_dir().join(format!("emend-bench-stats-{}", std::process::id()));
    let ctx = EditContext::new(
        EditingEnv {
            stats_dir: stats_dir.clone(),
            editors_dir: emend::setup::cache_dir().join("editors"),
            data_dir: Some(data_dir),
        },
        &m.info,
    );
    let b = Bench {
        m: &m,
        ctx: &ctx,
        samples: a.samples_or(),
    };
    let lm = m.model.as_ref();
    let mut rows: Vec<(String, String, String)> = Vec::new();

    let methods: Vec<Method> = if a.methods.is_empty() {
        super::edit::trained_or_skipped(Method::all(), &ctx, &m)
    } else {
        a.methods
            .iter()
            .map(|n| n.parse())
            .collect::<Result<_, _>>()?
    };
    let rome = Method::named("rome").context("ROME is registered")?;
    // Key statistics: the layers every method's defaults declare, in one pass, then C⁻¹.
    let mut layers: Vec<usize> = Vec::new();
    for method in Method::all() {
        let defaults = editing::hparams::defaults(method, lm.spec());
        for r in method.imp().resources(&defaults)? {
            if let Resource::KeyStats { layers: l, .. } = r {
                layers.extend(l);
            }
        }
    }
    layers.sort_unstable();
    layers.dedup();
    let t = Instant::now();
    let st = ctx
        .stats
        .get(lm, &m.tokenizer, &m.info.sha256, &layers, b.samples)?;
    let stats_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&stats_dir);
    rows.push((
        format!(
            "key statistics, layers {layers:?}, {} sequences ({} tokens), incl. C⁻¹",
            st[0].provenance.sequences, st[0].provenance.tokens
        ),
        format!("{stats_s:.1} s"),
        "—".into(),
    ));

    // ROME on the cross-check's request with its templates: the peer's exact input.
    let req: EditRequest = serde_json::from_value(fixture["request"].clone())?;
    let h = &fixture["hparams"];
    let templates: Vec<String> = serde_json::from_value(fixture["templates"].clone())?;
    let (n, tok_n) = (
        h["context_templates"].as_u64().unwrap_or(5) as usize,
        h["context_template_tokens"].as_u64().unwrap_or(10) as usize,
    );
    ctx.pin_templates(n, tok_n, templates);
    let base = Overlay::base();
    let mut same = Vec::new();
    let mut same_total = Vec::new();
    for _ in 0..a.runs {
        let s = b.apply(&base, rome, std::slice::from_ref(&req))?;
        same.push(compute_ms(&s[0]) / 1e3);
        same_total.push(s[0].duration_ms as f64 / 1e3);
    }
    let peer_s = peer
        .as_ref()
        .and_then(|p| p["reference_median_seconds"].as_f64());
    rows.push((
        format!(
            "ROME edit, cross-check request (\"{}\" → {}), k* + v* + Δ",
            req.subject, req.target_new
        ),
        format!("{:.2} s", median(same)),
        peer_s.map_or("—".into(), |p| format!("{p:.2} s")),
    ));
    rows.push((
        "same, with pre- and post-edit metrics".into(),
        format!("{:.2} s", median(same_total)),
        "—".into(),
    ));

    // Every method on CounterFact records (sampled templates, as served).
    for &method in &methods {
        rows.push(method_row(&b, &base, method, &cf, &a)?);
    }

    // Real sequential ROME edits in one chain.
    let seq = b.apply(&base, rome, &cf[..a.sequential])?;
    let first = seq[0].duration_ms as f64 / 1e3;
    let last = seq[seq.len() - 1].duration_ms as f64 / 1e3;
    let seq_med = median(seq.iter().map(|s| s.duration_ms as f64 / 1e3).collect());
    rows.push((
        format!(
            "{} sequential ROME edits in one session: first / median / last",
            a.sequential
        ),
        format!("{first:.2} / {seq_med:.2} / {last:.2} s"),
        "—".into(),
    ));

    // Overlay mechanics at depth: the chain's real deltas repeated; then one more real ROME
    // edit (the next CounterFact record) on top, as a session at that depth would serve it.
    let steps: Vec<&EditStep> = seq.iter().collect();
    let next = std::slice::from_ref(&cf[a.sequential]);
    let base_fwd = forward_seconds(lm, 5)?;
    let base_edit = b.apply(&base, rome, next)?;
    let mut depth_rows = Vec::new();
    depth_rows.push(
        json!({"depth": 0, "forward_s": base_fwd, "prepare_s": 0.0, "prepare_on_s": 0.0,
        "edit_s": base_edit[0].duration_ms as f64 / 1e3, "overlay_mb": 0.0, "prepared_mb": 0.0}),
    );
    for &depth in &a.stack {
        let mut parent = Overlay::base();
        for i in 0..depth.saturating_sub(1) {
            parent = steps[i % steps.len()].version_on(&parent);
        }
        let o = if depth == 0 {
            parent.clone()
        } else {
            steps[(depth - 1) % steps.len()].version_on(&parent)
        };
        let t = Instant::now();
        let prepared = Arc::new(o.prepare(lm)?);
        let prepare_s = t.elapsed().as_secs_f64();
        let parent_prepared = parent.prepare(lm)?;
        let t = Instant::now();
        o.prepare_on(lm, &parent_prepared)?;
        let prepare_on_s = t.elapsed().as_secs_f64();
        let view = Edited::new(lm, prepared.clone());
        let forward_s = forward_seconds(&view, 5)?;
        let edit = b.apply_prepared(&o, prepared.clone(), rome, next)?;
        depth_rows.push(json!({
            "depth": depth,
            "forward_s": forward_s,
            "prepare_s": prepare_s,
            "prepare_on_s": prepare_on_s,
            "edit_s": edit[0].duration_ms as f64 / 1e3,
            "overlay_mb": o.bytes() as f64 / 1e6,
            "prepared_mb": prepared.bytes() as f64 / 1e6,
        }));
    }
    let rss = peak_rss_mb();

    let md = render(&m, &a, &rows, &depth_rows, rss, peer.as_ref());
    print!("{md}");
    if let Some(path) = &a.write_md {
        super::bench::write_marked(path, "edit-bench", &md)?;
    }
    Ok(())
}

/// One method on CounterFact records with metrics: the median of `--runs` single edits, or
/// one batch of `--memit-batch` records for a batched method.
fn method_row(
    b: &Bench<'_>,
    base: &Arc<Overlay>,
    method: Method,
    cf: &[EditRequest],
    a: &BenchEditArgs,
) -> Result<(String, String, String)> {
    let name = method.name().to_uppercase();
    if method.batched() {
        let s = b.apply(base, method, &cf[..a.memit_batch])?;
        let total = s[0].duration_ms as f64 / 1e3;
        let rel = s[0].reports.iter().map(|r| r.post.reliability).sum::<f64>()
            / s[0].reports.len() as f64;
        return Ok((
            format!(
                "{name} batch of {} CounterFact records (incl. metrics; mean reliability {rel:.2})",
                a.memit_batch
            ),
            format!(
                "{total:.2} s ({:.2} s per edit)",
                total / a.memit_batch as f64
            ),
            "—".into(),
        ));
    }
    let mut secs = Vec::new();
    let mut rel = Vec::new();
    for r in &cf[..a.runs] {
        let s = b.apply(base, method, std::slice::from_ref(r))?;
        secs.push(s[0].duration_ms as f64 / 1e3);
        rel.push(s[0].reports[0].post.reliability);
    }
    Ok((
        format!(
            "{name} edit, CounterFact records 0..{} (incl. metrics; mean reliability {:.2})",
            a.runs,
            rel.iter().sum::<f64>() / rel.len() as f64
        ),
        format!("{:.2} s", median(secs)),
        "—".into(),
    ))
}

impl BenchEditArgs {
    fn samples_or(&self) -> usize {
        self.stats_samples.max(1)
    }
}

fn render(
    m: &LoadedModel,
    a: &BenchEditArgs,
    rows: &[(String, String, String)],
    depth: &[Value],
    rss: f64,
    peer: Option<&Value>,
) -> String {
    let cpu = super::bench::cpu_name();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let peer_name = peer.map_or("—".to_string(), |p| {
        format!(
            "PyTorch ROME (scripts/rome_reference.py; torch {}, transformers {})",
            p["torch"].as_str().unwrap_or("?"),
            p["transformers"].as_str().unwrap_or("?")
        )
    });
    let mut s = format!(
        "Machine: {cpu}, {} threads, load average at the end {}. Model: `{}` ({:?}, {}). \
         Statistics over `wikitext/AA`, {} sequences; {} runs per single-edit row (median).\n\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        m.info
            .path
            .file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned()),
        m.model.dtype(),
        if m.model.device().is_cpu() {
            "CPU"
        } else {
            "GPU"
        },
        a.stats_samples,
        a.runs,
    );
    s.push_str(&format!(
        "| measurement | emend | {peer_name} |\n|---|---:|---:|\n"
    ));
    for (what, ours, theirs) in rows {
        s.push_str(&format!("| {what} | {ours} | {theirs} |\n"));
    }
    s.push_str(&format!(
        "\nOverlay at depth (the {}-edit chain's real ROME deltas repeated; a 32-token forward, median of 5; \
         prepare: the whole chain from scratch, as after a restart; on parent: from the version \
         below, as a sequential edit and the engine's overlay cache do; edit: one more real ROME edit, \
         CounterFact record {}, with metrics, on that model, one run). Peak RSS of the whole run: {rss:.0} MB.\n\n",
        a.sequential, a.sequential
    ));
    s.push_str("| stacked edits | forward (s) | prepare (s) | prepare on parent (s) | ROME edit on top (s) | deltas (MB) | prepared overlay (MB) |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in depth {
        s.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.4} | {:.2} | {:.2} | {:.2} |\n",
            r["depth"],
            r["forward_s"].as_f64().unwrap_or(0.0),
            r["prepare_s"].as_f64().unwrap_or(0.0),
            r["prepare_on_s"].as_f64().unwrap_or(0.0),
            r["edit_s"].as_f64().unwrap_or(0.0),
            r["overlay_mb"].as_f64().unwrap_or(0.0),
            r["prepared_mb"].as_f64().unwrap_or(0.0),
        ));
    }
    s
}
