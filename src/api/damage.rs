//! `/v1/sessions/{id}/damage`: a session's damage curve, version → canary probe scores, as JSON,
//! CSV, or the sweep chart's layout (one panel per probe score, edits on a log axis, the base
//! model dashed).
use std::collections::{BTreeMap, BTreeSet, HashMap};

use actix_web::{web, HttpResponse};

use super::error::Problem;
use super::sweeps::Format;
use super::{ApiError, AppState, Tenant};
use crate::jobs::CurveRow;
use crate::sessions::DamageCurve;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(super::resource("/v1/sessions/{id}/damage", "GET").route(web::get().to(damage)));
}

/// The CSV: one row per version with a reading (the base model first), drift then scores.
pub fn damage_csv(c: &DamageCurve) -> String {
    let keys: BTreeSet<&String> = c
        .base
        .iter()
        .flat_map(|b| b.scores.keys())
        .chain(c.points.iter().flat_map(|p| p.reading.scores.keys()))
        .collect();
    let mut out = String::from(
        "version,parent_version,edits,method,on_current_path,perplexity_ratio,accuracy_drop,neighbour_flips,neighbours,breaches",
    );
    for k in &keys {
        out.push(',');
        out.push_str(k);
    }
    out.push('\n');
    let num = |v: Option<&f64>| v.map(|v| v.to_string()).unwrap_or_default();
    if let Some(b) = &c.base {
        out.push_str(&format!(",,0,base,true,1,0,0,{},", b.neighbours));
        for k in &keys {
            out.push(',');
            out.push_str(&num(b.scores.get(*k)));
        }
        out.push('\n');
    }
    for p in &c.points {
        let r = &p.reading;
        let breaches: Vec<&str> = r.breaches.iter().map(|b| b.limit.as_str()).collect();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}",
            p.version,
            p.parent_version,
            p.edits,
            p.method,
            c.current_path.contains(&p.version),
            r.drift.perplexity_ratio,
            r.drift.accuracy_drop,
            r.drift.neighbour_flips,
            r.neighbours,
            breaches.join(" ")
        ));
        for k in &keys {
            out.push(',');
            out.push_str(&num(r.scores.get(*k)));
        }
        out.push('\n');
    }
    out
}

/// `task.metric` scores as a chart row's tasks; neighbour stability (1 − flips / checked) as a
/// panel of its own.
fn tasks(
    scores: &BTreeMap<String, f64>,
    flips: u32,
    checked: u32,
) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut t: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for (k, v) in scores {
        if let Some((task, metric)) = k.split_once('.') {
            t.entry(task.into()).or_default().insert(metric.into(), *v);
        }
    }
    if checked > 0 {
        let kept = 1.0 - f64::from(flips) / f64::from(checked);
        t.entry("neighbours".into())
            .or_default()
            .insert("acc".into(), kept);
    }
    t
}

/// The current path's points as chart rows (the base model as 0 edits).
fn chart_rows(c: &DamageCurve) -> Vec<CurveRow> {
    let mut rows = Vec::new();
    if let Some(b) = &c.base {
        rows.push(CurveRow {
            method: "canary".into(),
            n_edits: 0,
            version: 0,
            edit: BTreeMap::new(),
            edit_at_apply: BTreeMap::new(),
            tasks: tasks(&b.scores, 0, b.neighbours),
            finished_at: String::new(),
        });
    }
    for p in c
        .points
        .iter()
        .filter(|p| c.current_path.contains(&p.version))
    {
        rows.push(CurveRow {
            method: "canary".into(),
            n_edits: p.edits as usize,
            version: p.version,
            edit: BTreeMap::new(),
            edit_at_apply: BTreeMap::new(),
            tasks: tasks(
                &p.reading.scores,
                p.reading.drift.neighbour_flips,
                p.reading.neighbours,
            ),
            finished_at: p.created_at.clone(),
        });
    }
    rows
}

#[utoipa::path(get, operation_id = "session_damage", path = "/v1/sessions/{id}/damage", tag = "sessions",
    params(("id" = String, Path),
           ("format" = Option<String>, Query, description = "`json` (default), `csv`, `svg` or `png`")),
    responses((status = 200, description = "The canary readings of the session's versions: JSON, CSV (one row per version, the base model first), or the chart of the current path as SVG or PNG",
               content((DamageCurve = "application/json"), (String = "text/csv"), (String = "image/svg+xml"), (String = "image/png"))),
              (status = 404, body = Problem), (status = 422, body = Problem),
              (status = 503, description = "No font for the chart (`EMEND_CHART_FONT`), or the base reading failed", body = Problem)))]
async fn damage(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let format = Format::from_query(&query)?;
    let curve = state.sessions.damage(&tenant.0, &id).await?;
    let title = format!("Damage curve of session {}", curve.session);
    Ok(match format {
        Format::Json => HttpResponse::Ok().json(curve),
        Format::Csv => HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .body(damage_csv(&curve)),
        Format::Svg | Format::Png => {
            super::sweeps::chart_response(chart_rows(&curve), title, format).await?
        }
    })
}
