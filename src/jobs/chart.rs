//! A sweep's curves drawn like the paper's Figure 2: one panel per task metric (its score and,
//! where it has one, its perplexity) and per retention metric (reliability, generalization, locality of the edits so far), one
//! line per method, the number of edits on a log axis, the base model's score dashed.
//!
//! plotters lays text out with ab_glyph, which needs a TrueType font: `EMEND_CHART_FONT`, else
//! DejaVu Sans or Liberation Sans where Debian, Fedora and Arch put them. Without one the
//! charts are refused (`ChartError::NoFont`); the table (CSV/JSON) never needs it.
use std::collections::BTreeSet;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::sweep::CurveRow;

/// A task's score panel shows the first of these it reports: accuracy-like first, then
/// generation exact match.
const SCORES: [&str; 6] = [
    "acc_norm",
    "acc",
    "mc2",
    "exact_match,strict-match",
    "exact_match",
    "em",
];
/// Its perplexity panel (LAMBADA, WikiText), the first of these: at 135M parameters the
/// perplexity moves long before the accuracy does.
const PERPLEXITIES: [&str; 2] = ["word_perplexity", "perplexity"];
/// Retention panels, in this order, where the edits report them.
const RETENTION: [&str; 3] = ["reliability", "generalization", "locality"];

const PANEL_W: u32 = 380;
const PANEL_H: u32 = 270;
const TITLE_H: u32 = 44;
const COLUMNS: usize = 3;
/// Colours of the methods' lines (Tableau 10, readable on white and in print).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("no TrueType font for the chart's text: set EMEND_CHART_FONT to a .ttf file (or install fonts-dejavu-core)")]
    NoFont,
    #[error("drawing the chart: {0}")]
    Draw(String),
}

fn draw_err(e: impl std::fmt::Display) -> ChartError {
    ChartError::Draw(e.to_string())
}

/// Registers the chart font once per process.
fn ensure_font() -> Result<(), ChartError> {
    static FONT: OnceLock<bool> = OnceLock::new();
    let ok = *FONT.get_or_init(|| {
        let mut candidates: Vec<String> = std::env::var("EMEND_CHART_FONT").into_iter().collect();
        candidates.extend(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
            ]
            .map(String::from),
        );
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // plotters keeps fonts for the life of the process; this runs once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                tracing::debug!(font = %path, "chart font registered");
                return true;
            }
            tracing::warn!(font = %path, "not a usable TrueType font");
        }
        false
    });
    ok.then_some(()).ok_or(ChartError::NoFont)
}

/// One panel: where its values come from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Task { task: String, metric: String },
    Edit(String),
}

impl Source {
    fn value(&self, r: &CurveRow) -> Option<f64> {
        match self {
            Source::Task { task, metric } => r.tasks.get(task)?.get(metric).copied(),
            Source::Edit(m) => r.edit.get(m).copied(),
        }
        .filter(|v| v.is_finite())
    }
    fn title(&self) -> String {
        match self {
            Source::Task { task, metric } => format!("{task} {}", metric.replace(",", " ")),
            Source::Edit(m) => format!("edit {m}"),
        }
    }
    /// Whether the metric lives on 0–1 (accuracies, edit metrics), drawn on that full axis.
    fn unit_scale(&self) -> bool {
        match self {
            Source::Task { metric, .. } => !metric.contains("perplexity"),
            Source::Edit(_) => true,
        }
    }
}

/// The panels the rows have data for: tasks in name order (score, then perplexity), then the
/// retention metrics.
fn panels(rows: &[CurveRow]) -> Vec<Source> {
    let tasks: BTreeSet<&String> = rows.iter().flat_map(|r| r.tasks.keys()).collect();
    let mut out = Vec::new();
    for t in tasks {
        let reports = |m: &&str| {
            rows.iter()
                .any(|r| r.tasks.get(t).is_some_and(|x| x.contains_key(*m)))
        };
        for family in [&SCORES[..], &PERPLEXITIES[..]] {
            if let Some(metric) = family.iter().copied().find(reports) {
                out.push(Source::Task {
                    task: t.clone(),
                    metric: metric.to_string(),
                });
            }
        }
    }
    out.extend(
        RETENTION
            .iter()
            .filter(|m| rows.iter().any(|r| r.edit.contains_key(**m)))
            .map(|m| Source::Edit(m.to_string())),
    );
    out
}

/// Methods in order of first appearance.
fn methods(rows: &[CurveRow]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in rows {
        if !out.contains(&r.method.as_str()) {
            out.push(&r.method);
        }
    }
    out
}

/// Pixel size of the chart for these rows.
fn size(rows: &[CurveRow]) -> (u32, u32) {
    let n = panels(rows).len().max(1);
    let cols = n.min(COLUMNS) as u32;
    let lines = n.div_ceil(COLUMNS) as u32;
    (cols * PANEL_W, TITLE_H + lines * PANEL_H)
}

/// The chart as an SVG document.
pub fn svg(rows: &[CurveRow], title: &str) -> Result<String, ChartError> {
    ensure_font()?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size(rows)).into_drawing_area();
        draw(&root, rows, title)?;
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

/// The chart as PNG bytes.
pub fn png(rows: &[CurveRow], title: &str) -> Result<Vec<u8>, ChartError> {
    ensure_font()?;
    let (w, h) = size(rows);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, rows, title)?;
        root.present().map_err(draw_err)?;
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(draw_err)?;
    writer.write_image_data(&rgb).map_err(draw_err)?;
    writer.finish().map_err(draw_err)?;
    Ok(out)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    rows: &[CurveRow],
    title: &str,
) -> Result<(), ChartError> {
    root.fill(&WHITE).map_err(draw_err)?;
    let (head, body) = root.split_vertically(TITLE_H);
    head.draw(&Text::new(
        title.to_string(),
        (12, 12),
        ("sans-serif", 20).into_font(),
    ))
    .map_err(draw_err)?;
    let panels = panels(rows);
    if panels.is_empty() {
        body.draw(&Text::new(
            "no finished checkpoint yet".to_string(),
            (12, 12),
            ("sans-serif", 15).into_font(),
        ))
        .map_err(draw_err)?;
        return Ok(());
    }
    let cols = panels.len().min(COLUMNS);
    let areas = body.split_evenly((panels.len().div_ceil(COLUMNS), cols));
    let methods = methods(rows);
    for (i, (src, area)) in panels.iter().zip(areas.iter()).enumerate() {
        panel(area, rows, src, &methods, i == 0)?;
    }
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    rows: &[CurveRow],
    src: &Source,
    methods: &[&str],
    legend: bool,
) -> Result<(), ChartError> {
    // The base model is the 0-edit checkpoint (the same for every method).
    let base = rows
        .iter()
        .find(|r| r.n_edits == 0)
        .and_then(|r| src.value(r));
    let lines: Vec<(&str, Vec<(f64, f64)>)> = methods
        .iter()
        .map(|m| {
            let pts = rows
                .iter()
                .filter(|r| r.method == *m && r.n_edits > 0)
                .filter_map(|r| Some((r.n_edits as f64, src.value(r)?)))
                .collect();
            (*m, pts)
        })
        .collect();
    let ys: Vec<f64> = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .chain(base)
        .collect();
    let (y0, y1) = if src.unit_scale() && ys.iter().all(|v| (0.0..=1.0).contains(v)) {
        (0.0, 1.0)
    } else {
        let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() {
            let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.01).max(1e-6);
            (lo - pad, hi + pad)
        } else {
            (0.0, 1.0)
        }
    };
    let max_n = rows.iter().map(|r| r.n_edits).max().unwrap_or(1).max(2) as f64;
    let (x0, x1) = (0.8, max_n * 1.25);
    let mut chart = ChartBuilder::on(area)
        .caption(src.title(), ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(48)
        .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("edits")
        .x_label_formatter(&|x| format!("{}", x.round()))
        .y_labels(6)
        .y_label_formatter(&|y| format!("{y:.*}", decimals(y1 - y0)))
        .label_style(("sans-serif", 11))
        .light_line_style(WHITE)
        .draw()
        .map_err(draw_err)?;
    if let Some(b) = base {
        let grey = RGBColor(90, 90, 90);
        chart
            .draw_series(DashedLineSeries::new(
                [(x0, b), (x1, b)],
                6,
                4,
                grey.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label("base")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], grey.stroke_width(2)));
    }
    for (i, (m, pts)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(*m)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(draw_err)?;
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Decimals a tick label needs on an axis spanning `range`.
fn decimals(range: f64) -> usize {
    match range {
        r if r >= 20.0 => 0,
        r if r >= 2.0 => 1,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn row(method: &str, n: usize, acc: f64, ppl: f64, rel: Option<f64>) -> CurveRow {
        CurveRow {
            method: method.into(),
            n_edits: n,
            version: n as u64,
            edit: rel
                .map(|r| [("reliability".to_string(), r)].into())
                .unwrap_or_default(),
            edit_at_apply: BTreeMap::new(),
            tasks: [
                (
                    "arc_easy".to_string(),
                    [("acc".to_string(), acc), ("acc_norm".to_string(), acc)].into(),
                ),
                (
                    "lambada_openai".to_string(),
                    [("perplexity".to_string(), ppl), ("acc".to_string(), acc)].into(),
                ),
            ]
            .into(),
            finished_at: "t".into(),
        }
    }

    fn rows() -> Vec<CurveRow> {
        vec![
            row("rome", 0, 0.5, 30.0, None),
            row("rome", 10, 0.4, 35.0, Some(0.9)),
            row("rome", 100, 0.3, 80.0, Some(0.7)),
            row("memit", 0, 0.5, 30.0, None),
            row("memit", 10, 0.45, 32.0, Some(0.95)),
        ]
    }

    #[test]
    fn panels_pick_each_tasks_headline_then_retention() {
        let p = panels(&rows());
        assert_eq!(
            p,
            vec![
                Source::Task {
                    task: "arc_easy".into(),
                    metric: "acc_norm".into()
                },
                Source::Task {
                    task: "lambada_openai".into(),
                    metric: "acc".into()
                },
                Source::Task {
                    task: "lambada_openai".into(),
                    metric: "perplexity".into()
                },
                Source::Edit("reliability".into()),
            ]
        );
        assert_eq!(methods(&rows()), ["rome", "memit"]);
        assert_eq!(size(&rows()), (3 * PANEL_W, TITLE_H + 2 * PANEL_H));
    }

    #[test]
    fn svg_and_png_draw_every_panel_and_method() {
        let rows = rows();
        let s = svg(&rows, "rome, memit on counterfact <100 edits>").expect("svg");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        for text in [
            "arc_easy acc_norm",
            "lambada_openai acc",
            "lambada_openai perplexity",
            "edit reliability",
            // plotters writes each text on a line of its own.
            ">\nrome\n<",
            ">\nmemit\n<",
            ">\nbase\n<",
            "&lt;100 edits&gt;",
        ] {
            assert!(s.contains(text), "{text} missing");
        }
        let p = png(&rows, "t").expect("png");
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(std::io::Cursor::new(&p));
        let mut reader = dec.read_info().expect("png header");
        let (w, h) = size(&rows);
        assert_eq!((reader.info().width, reader.info().height), (w, h));
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).expect("png data");
        // rome's colour is drawn somewhere (the line), not only white and greys.
        let rome = COLORS[0];
        assert!(buf
            .chunks(3)
            .any(|p| (p[0], p[1], p[2]) == (rome.0, rome.1, rome.2)));
    }

    #[test]
    fn an_empty_curve_still_draws_its_title() {
        let s = svg(&[], "waiting").expect("svg");
        assert!(s.contains("waiting") && s.contains("no finished checkpoint yet"));
    }
}
