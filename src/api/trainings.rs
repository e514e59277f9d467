//! `/v1/trainings`: trained editors (MEND, SERAC) trained as resumable jobs; `/v1/artefacts`: the
//! trained editors with their provenance.
use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::edits::page;
use super::error::{Code, Problem};
use super::{ApiError, AppState, Body, Tenant};
use crate::engine::training::{Provenance, TrainConfig};
use crate::jobs::Training;

pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(
        resource("/v1/trainings", "POST, GET")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(
        resource("/v1/trainings/{id}", "GET, DELETE")
            .route(web::get().to(get))
            .route(web::delete().to(cancel)),
    )
    .service(resource("/v1/artefacts", "GET").route(web::get().to(artefacts)))
    .service(resource("/v1/artefacts/{id}", "GET").route(web::get().to(artefact)));
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TrainingList {
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// Oldest first.
    pub trainings: Vec<Training>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ArtefactList {
    /// Newest first.
    pub artefacts: Vec<Provenance>,
}

#[utoipa::path(post, operation_id = "create_training", path = "/v1/trainings", tag = "trainings", request_body = TrainConfig,
    responses((status = 202, description = "Queued", body = Training), (status = 422, body = Problem),
              (status = 429, body = Problem)))]
async fn create(
    state: web::Data<AppState>,
    tenant: Tenant,
    body: Body<TrainConfig>,
) -> Result<HttpResponse, ApiError> {
    let t = state.jobs.submit_training(&tenant.0, body.0).await?;
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/trainings/{}", t.id)))
        .json(t))
}

#[utoipa::path(get, operation_id = "list_trainings", path = "/v1/trainings", tag = "trainings",
    params(("offset" = Option<u64>, Query, minimum = 0, description = "trainings to skip (default 0)"),
           ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "trainings to return (default 100)")),
    responses((status = 200, body = TrainingList), (status = 422, body = Problem)))]
async fn list(
    state: web::Data<AppState>,
    tenant: Tenant,
    query: web::Query<HashMap<String, String>>,
) -> Result<web::Json<TrainingList>, ApiError> {
    let (offset, limit) = page(&query)?;
    let (trainings, total) = state.jobs.list_trainings(&tenant.0, offset, limit).await?;
    Ok(web::Json(TrainingList {
        total,
        offset,
        limit,
        trainings,
    }))
}

#[utoipa::path(get, operation_id = "get_training", path = "/v1/trainings/{id}", tag = "trainings", params(("id" = String, Path)),
    responses((status = 200, body = Training), (status = 404, body = Problem)))]
async fn get(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<web::Json<Training>, ApiError> {
    Ok(web::Json(state.jobs.get_training(&tenant.0, &id).await?))
}

#[utoipa::path(delete, operation_id = "cancel_training", path = "/v1/trainings/{id}", tag = "trainings", params(("id" = String, Path)),
    responses((status = 200, description = "Cancelled", body = Training),
              (status = 202, description = "Running: cancelled after the step in hand", body = Training),
              (status = 404, body = Problem), (status = 409, description = "Already finished", body = Problem)))]
async fn cancel(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let done = state.jobs.cancel(&tenant.0, "training", &id).await?;
    let t = state.jobs.get_training(&tenant.0, &id).await?;
    Ok(if done {
        HttpResponse::Ok().json(t)
    } else {
        HttpResponse::Accepted().json(t)
    })
}

#[utoipa::path(get, operation_id = "list_artefacts", path = "/v1/artefacts", tag = "trainings",
    responses((status = 200, body = ArtefactList)))]
async fn artefacts(state: web::Data<AppState>) -> Result<web::Json<ArtefactList>, ApiError> {
    let jobs = state.jobs.clone();
    let artefacts = web::block(move || jobs.artefacts())
        .await
        .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
    Ok(web::Json(ArtefactList { artefacts }))
}

#[utoipa::path(get, operation_id = "get_artefact", path = "/v1/artefacts/{id}", tag = "trainings", params(("id" = String, Path)),
    responses((status = 200, body = Provenance), (status = 404, body = Problem)))]
async fn artefact(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<web::Json<Provenance>, ApiError> {
    let jobs = state.jobs.clone();
    let list = web::block(move || jobs.artefacts())
        .await
        .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
    list.into_iter()
        .find(|p| p.id == *id)
        .map(web::Json)
        .ok_or_else(|| ApiError::new(Code::NotFound, format!("artefact `{id}` does not exist")))
}
