//! `/v1/sweeps`: the paper's protocol as a job (edits one by one on a fresh session, the
//! benchmarks at checkpoints) and its curves as CSV, JSON or SVG.
use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::edits::page;
use super::error::Problem;
use super::{ApiError, AppState, Body, Tenant};
use crate::jobs::sweep::{curve_csv, curve_json, curve_svg};
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
    .service(resource("/v1/sweeps/{id}/curve", "GET").route(web::get().to(curve)));
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

#[utoipa::path(get, operation_id = "sweep_curve", path = "/v1/sweeps/{id}/curve", tag = "sweeps",
    params(("id" = String, Path),
           ("format" = Option<String>, Query, description = "`json` (default), `csv` or `svg`")),
    responses((status = 200, description = "The finished checkpoints: JSON `{columns, rows}`, CSV, or an SVG chart of the 0–1 metrics against the number of edits",
               content((Object = "application/json"), (String = "text/csv"), (String = "image/svg+xml"))),
              (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn curve(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    if let Some(k) = query.keys().find(|k| *k != "format") {
        return Err(ApiError::field(
            k,
            "is not a query parameter of this route (`format`)",
        ));
    }
    let sweep = state.jobs.get_sweep(&tenant.0, &id).await?;
    Ok(match query.get("format").map(String::as_str) {
        None | Some("json") => HttpResponse::Ok().json(curve_json(&sweep.curve)),
        Some("csv") => HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .body(curve_csv(&sweep.curve)),
        Some("svg") => {
            let title = format!(
                "{} on {}, {} edits",
                sweep.method,
                sweep.dataset.name(),
                sweep.n_edits
            );
            HttpResponse::Ok()
                .content_type("image/svg+xml")
                .body(curve_svg(&sweep.curve, &title))
        }
        Some(other) => {
            return Err(ApiError::field(
                "format",
                format_args!("must be json, csv or svg. Given: {other:?}"),
            ))
        }
    })
}
