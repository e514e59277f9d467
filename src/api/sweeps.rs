//! `/v1/sweeps`: the paper's protocol as a job (edits one by one on a fresh session per
//! method, the benchmarks at checkpoints), its table as JSON or CSV and its charts as SVG or
//! PNG.
use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::edits::page;
use super::error::Code;
use super::error::Problem;
use super::{ApiError, AppState, Body, Tenant};
use crate::jobs::chart::{self, ChartError};
use crate::jobs::curve::{curve_csv, curve_json};
use crate::jobs::CurveRow;
use crate::jobs::{NewSweep, Sweep};

pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(
        resource("/v1/sweeps", "POST, GET")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(
        resource("/v1/sweeps/{id}", "GET, DELETE")
            .route(web::get().to(get))
            .route(web::delete().to(cancel)),
    )
    .service(resource("/v1/sweeps/{id}/curve", "GET").route(web::get().to(curve)))
    .service(resource("/v1/sweeps/{id}/results.csv", "GET").route(web::get().to(results_csv)))
    .service(resource("/v1/sweeps/{id}/chart.svg", "GET").route(web::get().to(chart_svg)))
    .service(resource("/v1/sweeps/{id}/chart.png", "GET").route(web::get().to(chart_png)));
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SweepList {
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// Oldest first.
    pub sweeps: Vec<Sweep>,
}

#[utoipa::path(post, operation_id = "create_sweep", path = "/v1/sweeps", tag = "sweeps", request_body = NewSweep,
    responses((status = 202, description = "Queued", body = Sweep), (status = 422, body = Problem),
              (status = 429, body = Problem)))]
async fn create(
    state: web::Data<AppState>,
    tenant: Tenant,
    body: Body<NewSweep>,
) -> Result<HttpResponse, ApiError> {
    let sweep = state.jobs.submit_sweep(&tenant.0, body.0).await?;
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/sweeps/{}", sweep.id)))
        .json(sweep))
}

#[utoipa::path(get, operation_id = "list_sweeps", path = "/v1/sweeps", tag = "sweeps",
    params(("offset" = Option<u64>, Query, minimum = 0, description = "sweeps to skip (default 0)"),
           ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "sweeps to return (default 100)")),
    responses((status = 200, body = SweepList), (status = 422, body = Problem)))]
async fn list(
    state: web::Data<AppState>,
    tenant: Tenant,
    query: web::Query<HashMap<String, String>>,
) -> Result<web::Json<SweepList>, ApiError> {
    let (offset, limit) = page(&query)?;
    let (sweeps, total) = state.jobs.list_sweeps(&tenant.0, offset, limit).await?;
    Ok(web::Json(SweepList {
        total,
        offset,
        limit,
        sweeps,
    }))
}

#[utoipa::path(get, operation_id = "get_sweep", path = "/v1/sweeps/{id}", tag = "sweeps", params(("id" = String, Path)),
    responses((status = 200, body = Sweep), (status = 404, body = Problem)))]
async fn get(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<web::Json<Sweep>, ApiError> {
    Ok(web::Json(state.jobs.get_sweep(&tenant.0, &id).await?))
}

#[utoipa::path(delete, operation_id = "cancel_sweep", path = "/v1/sweeps/{id}", tag = "sweeps", params(("id" = String, Path)),
    responses((status = 200, description = "Cancelled", body = Sweep),
              (status = 202, description = "Running: cancelled after the edit or chunk in hand", body = Sweep),
              (status = 404, body = Problem), (status = 409, description = "Already finished", body = Problem)))]
async fn cancel(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let done = state.jobs.cancel(&tenant.0, "sweep", &id).await?;
    let sweep = state.jobs.get_sweep(&tenant.0, &id).await?;
    Ok(if done {
        HttpResponse::Ok().json(sweep)
    } else {
        HttpResponse::Accepted().json(sweep)
    })
}

/// What a curve is rendered as.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Format {
    Json,
    Csv,
    Svg,
    Png,
}

impl Format {
    /// The `format` query parameter of a route that takes no other.
    pub(crate) fn from_query(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        if let Some(k) = query.keys().find(|k| *k != "format") {
            return Err(ApiError::field(
                k,
                "is not a query parameter of this route (`format`)",
            ));
        }
        Self::parse(query.get("format").map(String::as_str))
    }

    pub(crate) fn parse(s: Option<&str>) -> Result<Self, ApiError> {
        Ok(match s {
            None | Some("json") => Self::Json,
            Some("csv") => Self::Csv,
            Some("svg") => Self::Svg,
            Some("png") => Self::Png,
            Some(other) => {
                return Err(ApiError::field(
                    "format",
                    format_args!("must be json, csv, svg or png. Given: {other:?}"),
                ))
            }
        })
    }
}

impl From<ChartError> for ApiError {
    fn from(e: ChartError) -> Self {
        match e {
            ChartError::NoFont => ApiError::new(Code::Unavailable, e.to_string()),
            ChartError::Draw(_) => ApiError::new(Code::Internal, e.to_string()),
        }
    }
}

/// The sweep's finished checkpoints in one format (charts drawn off the async runtime).
async fn render(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    format: Format,
) -> Result<HttpResponse, ApiError> {
    let sweep = state.jobs.get_sweep(&tenant.0, id).await?;
    Ok(match format {
        Format::Json => HttpResponse::Ok().json(curve_json(&sweep.curve)),
        Format::Csv => HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .body(curve_csv(&sweep.curve)),
        Format::Svg | Format::Png => {
            let title = sweep.title();
            chart_response(sweep.curve, title, format).await?
        }
    })
}

/// Curve rows drawn as an SVG or PNG response, off the async runtime.
pub(crate) async fn chart_response(
    rows: Vec<CurveRow>,
    title: String,
    format: Format,
) -> Result<HttpResponse, ApiError> {
    let png = matches!(format, Format::Png);
    let bytes = web::block(move || {
        if png {
            chart::png(&rows, &title)
        } else {
            chart::svg(&rows, &title).map(String::into_bytes)
        }
    })
    .await
    .map_err(|e| ApiError::new(Code::Internal, e.to_string()))??;
    let mime = if png { "image/png" } else { "image/svg+xml" };
    Ok(HttpResponse::Ok().content_type(mime).body(bytes))
}

#[utoipa::path(get, operation_id = "sweep_curve", path = "/v1/sweeps/{id}/curve", tag = "sweeps",
    params(("id" = String, Path),
           ("format" = Option<String>, Query, description = "`json` (default), `csv`, `svg` or `png`")),
    responses((status = 200, description = "The finished checkpoints: JSON `{columns, rows}` or CSV (one row per method and checkpoint), or the chart as SVG or PNG",
               content((Object = "application/json"), (String = "text/csv"), (String = "image/svg+xml"), (String = "image/png"))),
              (status = 404, body = Problem), (status = 422, body = Problem),
              (status = 503, description = "No font for the chart (`EMEND_CHART_FONT`)", body = Problem)))]
async fn curve(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let format = Format::from_query(&query)?;
    render(&state, &tenant, &id, format).await
}

/// A route serving the curve in one fixed format, as a file clients can save.
macro_rules! file_route {
    ($name:ident, $op:literal, $path:literal, $format:ident, $mime:literal, $what:literal) => {
        #[utoipa::path(get, operation_id = $op, path = $path, tag = "sweeps", params(("id" = String, Path)),
            responses((status = 200, description = $what, content((String = $mime))),
                      (status = 404, body = Problem),
                      (status = 503, description = "No font for the chart (`EMEND_CHART_FONT`)", body = Problem)))]
        async fn $name(
            state: web::Data<AppState>,
            tenant: Tenant,
            id: web::Path<String>,
        ) -> Result<HttpResponse, ApiError> {
            render(&state, &tenant, &id, Format::$format).await
        }
    };
}

file_route!(
    results_csv,
    "sweep_results_csv",
    "/v1/sweeps/{id}/results.csv",
    Csv,
    "text/csv",
    "The table: one row per method and checkpoint, a column per edit and task metric"
);
file_route!(
    chart_svg,
    "sweep_chart_svg",
    "/v1/sweeps/{id}/chart.svg",
    Svg,
    "image/svg+xml",
    "Figure 2's layout: a panel per task and retention metric, a line per method, log-scale edits, the base model dashed"
);
file_route!(
    chart_png,
    "sweep_chart_png",
    "/v1/sweeps/{id}/chart.png",
    Png,
    "image/png",
    "The chart of `chart.svg` as PNG"
);
