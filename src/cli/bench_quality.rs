//! `emend bench-quality`: what each method's edit does, on the first CounterFact records of the
//! data folder, one fresh session (the base model) per edit: mean reliability, generalization,
//! locality and success, and the median compute seconds. Peers' reports on the same records
//! (`scripts/peers/easyedit_quality.py`) go beside them. Writes a section of BENCHMARKS.md.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use emend::engine::editing::datasets::{self, EditDataset};
use emend::engine::editing::{self, EditContext, MeasureOptions, Method};
use emend::engine::overlay::Overlay;

use super::bench::write_marked;
use super::edit::env;
use super::{load, Global};

#[derive(Args)]
pub struct BenchQualityArgs {
    /// Records, from the first (each edited alone on the base model).
    #[arg(long, default_value_t = 50)]
    pub records: usize,
    /// `counterfact` or `zsre` (the portability file: its table has a portability column).
    #[arg(long, default_value = "counterfact")]
    pub dataset: String,
    /// Methods (comma-separated) [default: every registered method].
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// A peer's report on the same records (JSON with `peer`, `method`, `records` and the
    /// means), repeatable.
    #[arg(long)]
    pub peer: Vec<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write every record's metrics (JSON lines) into this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the table into this markdown file (between the quality-bench markers;
    /// quality-bench-zsre for zsRE).
    #[arg(long)]
    pub write_md: Option<PathBuf>,
}

/// One method's means over the records.
struct Row {
    who: String,
    method: String,
    records: usize,
    reliability: f64,
    generalization: Option<f64>,
    locality: Option<f64>,
    success: Option<f64>,
    portability: Option<f64>,
    seconds: Option<f64>,
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

pub fn run(g: &Global, a: BenchQualityArgs) -> Result<()> {
    if a.records == 0 {
        bail!("--records must be at least 1");
    }
    let methods: Vec<Method> = if a.methods.is_empty() {
        Method::all()
    } else {
        a.methods
            .iter()
            .map(|s| s.parse())
            .collect::<std::result::Result<_, _>>()?
    };
    let env = env(a.data_dir.clone());
    let data = env
        .data_dir
        .clone()
        .context("no dataset directory: pass --data-dir or set EMEND_DATA_DIR")?;
    let dataset: EditDataset = a.dataset.parse()?;
    let records = datasets::load(dataset, &data)?;
    if records.len() < a.records {
        bail!("{} has {} records", dataset.name(), records.len());
    }
    let m = load(g)?;
    // zsRE has records an edit request cannot hold (a locality answer over the token limit):
    // the first `records` that validate are used, and the rest counted.
    let usable: Vec<_> = records
        .iter()
        .filter(|r| editing::validate(std::slice::from_ref(&r.request), &m.tokenizer).is_ok())
        .take(a.records)
        .collect();
    let skipped = records
        .iter()
        .take_while(|r| Some(r.id) <= usable.last().map(|u| u.id))
        .count()
        - usable.len();
    if skipped > 0 {
        eprintln!("{skipped} records before the last one used cannot be edit requests (skipped)");
    }
    if usable.len() < a.records {
        bail!("{} has {} usable records", dataset.name(), usable.len());
    }
    let ctx = EditContext::new(env, &m.info);
    let methods = if a.methods.is_empty() {
        super::edit::trained_or_skipped(methods, &ctx, &m)
    } else {
        methods
    };
    let base = Overlay::base();
    let mut out = a
        .out
        .as_ref()
        .map(std::fs::File::create)
        .transpose()
        .context("--out")?;
    let mut rows = Vec::new();
    for method in methods {
        let (mut rel, mut gen, mut loc, mut suc, mut port, mut secs) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for r in &usable {
            let steps = editing::apply(
                &m,
                &base,
                method,
                std::slice::from_ref(&r.request),
                &Value::Null,
                MeasureOptions::default(),
                &ctx,
            )?;
            let s = &steps[0];
            let post = &s.reports[0].post;
            rel.push(post.reliability);
            gen.extend(post.generalization);
            loc.extend(post.locality);
            suc.extend(post.success);
            port.extend(post.portability);
            let ms = s.diagnostics["phases_ms"]["compute"]
                .as_f64()
                .unwrap_or(s.duration_ms as f64);
            secs.push(ms / 1000.0);
            if let Some(f) = out.as_mut() {
                use std::io::Write;
                writeln!(
                    f,
                    "{}",
                    json!({"method": method.name(), "id": r.id, "post": post, "pre": s.reports[0].pre, "compute_s": ms / 1000.0, "diagnostics": s.diagnostics})
                )?;
            }
        }
        secs.sort_by(|x, y| x.total_cmp(y));
        let row = Row {
            who: "emend".into(),
            method: method.name().into(),
            records: a.records,
            reliability: mean(&rel).unwrap_or(0.0),
            generalization: mean(&gen),
            locality: mean(&loc),
            success: mean(&suc),
            portability: mean(&port),
            seconds: secs.get(secs.len() / 2).copied(),
        };
        eprintln!("{}", render_row(&row, dataset == EditDataset::Zsre));
        rows.push(row);
    }
    for p in &a.peer {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{}: JSON", p.display()))?;
        rows.push(Row {
            who: v["peer"].as_str().unwrap_or("peer").into(),
            method: v["method"].as_str().unwrap_or("?").into(),
            records: v["records"].as_u64().unwrap_or(0) as usize,
            reliability: v["reliability"].as_f64().unwrap_or(f64::NAN),
            generalization: v["generalization"].as_f64(),
            locality: v["locality"].as_f64(),
            success: v["success"].as_f64(),
            portability: v["portability"].as_f64(),
            seconds: v["edit_s_median"].as_f64(),
        });
    }
    let table = render(&rows, dataset, a.records, &m.info.name);
    print!("{table}");
    if let Some(md) = &a.write_md {
        let marker = match dataset {
            EditDataset::Zsre => "quality-bench-zsre",
            _ => "quality-bench",
        };
        write_marked(md, marker, &table)?;
    }
    Ok(())
}

fn f3(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

fn render_row(r: &Row, portability: bool) -> String {
    let port = if portability {
        format!(" {} |", f3(r.portability))
    } else {
        String::new()
    };
    format!(
        "| {} | {} | {} | {:.3} | {} | {} | {} |{port} {} |",
        r.method,
        r.who,
        r.records,
        r.reliability,
        f3(r.generalization),
        f3(r.locality),
        f3(r.success),
        r.seconds.map_or("-".into(), |s| format!("{s:.2}")),
    )
}

fn render(rows: &[Row], dataset: EditDataset, records: usize, model: &str) -> String {
    let zsre = dataset == EditDataset::Zsre;
    let mut s = format!(
        "{}: the first {} records of the data folder that are valid edit requests, each edited \
         alone on the base model ({model}), methods at their defaults; means over the records (teacher-forced token \
         accuracy, EasyEdit's definitions; success: P(new) > P(true){}); seconds: median \
         compute per edit.\n\n",
        dataset.name(),
        records,
        if zsre {
            "; portability: token accuracy of the portability answers"
        } else {
            ""
        }
    );
    if zsre {
        s.push_str("| method | by | records | reliability | generalization | locality | success | portability | s / edit |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    } else {
        s.push_str("| method | by | records | reliability | generalization | locality | success | s / edit |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    }
    for r in rows {
        s.push_str(&render_row(r, zsre));
        s.push('\n');
    }
    s
}
