//! `/v1/evaluations`: benchmark jobs on a session version (queued, one at a time, resumable,
//! cancellable). Every field is checked before anything is queued.
use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::edits::page;
use super::error::Problem;
use super::{ApiError, AppState, Body, Tenant};
use crate::jobs::{Job, NewEvaluation};

pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(
        resource("/v1/evaluations", "POST, GET")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(
        resource("/v1/evaluations/{id}", "GET, DELETE")
            .route(web::get().to(get))
            .route(web::delete().to(cancel)),
    );
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// The tenant's evaluations in all.
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// Oldest first; `results` are left out (see `GET /v1/evaluations/{id}`).
    pub jobs: Vec<Job>,
}

#[utoipa::path(post, operation_id = "create_evaluation", path = "/v1/evaluations", tag = "evaluations", request_body = NewEvaluation,
    responses((status = 202, description = "Queued", body = Job), (status = 422, body = Problem),
              (status = 429, body = Problem)))]
async fn create(
    state: web::Data<AppState>,
    tenant: Tenant,
    body: Body<NewEvaluation>,
) -> Result<HttpResponse, ApiError> {
    let job = state.jobs.submit(&tenant.0, body.0).await?;
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/evaluations/{}", job.id)))
        .json(job))
}

#[utoipa::path(get, operation_id = "list_evaluations", path = "/v1/evaluations", tag = "evaluations",
    params(("offset" = Option<u64>, Query, minimum = 0, description = "jobs to skip (default 0)"),
           ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "jobs to return (default 100)")),
    responses((status = 200, body = JobList), (status = 422, body = Problem)))]
async fn list(
    state: web::Data<AppState>,
    tenant: Tenant,
    query: web::Query<HashMap<String, String>>,
) -> Result<web::Json<JobList>, ApiError> {
    let (offset, limit) = page(&query)?;
    let (jobs, total) = state.jobs.list(&tenant.0, offset, limit).await?;
    Ok(web::Json(JobList {
        total,
        offset,
        limit,
        jobs,
    }))
}

#[utoipa::path(get, operation_id = "get_evaluation", path = "/v1/evaluations/{id}", tag = "evaluations", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = Problem)))]
async fn get(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<web::Json<Job>, ApiError> {
    Ok(web::Json(state.jobs.get(&tenant.0, &id).await?))
}

#[utoipa::path(delete, operation_id = "cancel_evaluation", path = "/v1/evaluations/{id}", tag = "evaluations", params(("id" = String, Path)),
    responses((status = 200, description = "Cancelled", body = Job),
              (status = 202, description = "Running: cancelled after the chunk in hand", body = Job),
              (status = 404, body = Problem), (status = 409, description = "Already finished", body = Problem)))]
async fn cancel(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let done = state.jobs.cancel(&tenant.0, "evaluation", &id).await?;
    let job = state.jobs.get(&tenant.0, &id).await?;
    Ok(if done {
        HttpResponse::Ok().json(job)
    } else {
        HttpResponse::Accepted().json(job)
    })
}
