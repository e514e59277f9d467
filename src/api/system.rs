//! Health, readiness, metrics, model facts, and the problem-type pages.
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::Problem;
use super::{ApiError, AppState, Code, Tenant};

pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(resource("/healthz", "GET").route(web::get().to(healthz)))
        .service(resource("/readyz", "GET").route(web::get().to(readyz)))
        .service(resource("/metrics", "GET").route(web::get().to(metrics)))
        .service(resource("/v1/model", "GET").route(web::get().to(model)))
        .service(resource("/problems/{code}", "GET").route(web::get().to(problem_type)));
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelDto {
    pub name: String,
    /// `session:<id>` or this id selects a model on the OpenAI routes.
    pub id: String,
    pub architecture: String,
    pub parameters: usize,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub dtype: String,
    pub device: String,
    pub format: String,
    /// sha256 of the model file (or of config + weights for a directory).
    pub sha256: String,
    pub tokenizer: String,
    pub load_seconds: f64,
}

#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = Health)))]
async fn healthz() -> web::Json<Health> {
    web::Json(Health {
        status: "ok".into(),
    })
}

#[utoipa::path(get, path = "/readyz", tag = "system",
    responses((status = 200, body = Health), (status = 503, body = Problem)))]
async fn readyz(state: web::Data<AppState>) -> Result<web::Json<Health>, ApiError> {
    if !state.engine.is_running() {
        return Err(ApiError::new(
            Code::Unavailable,
            "the engine is shutting down",
        ));
    }
    state.sessions.store().ping().await.map_err(|e| {
        tracing::warn!(error = %e, "store ping failed");
        ApiError {
            code: Code::Unavailable,
            detail: "the session store is unreachable".into(),
            retry_after: Some(5),
            canary: None,
        }
    })?;
    Ok(web::Json(Health {
        status: "ready".into(),
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

#[utoipa::path(get, path = "/v1/model", tag = "system", responses((status = 200, body = ModelDto), (status = 401, body = Problem)))]
async fn model(state: web::Data<AppState>, _tenant: Tenant) -> web::Json<ModelDto> {
    let i = state.engine.info();
    web::Json(ModelDto {
        name: i.name.clone(),
        id: super::openai::base_model_id(&state),
        architecture: i.spec.architecture.to_string(),
        parameters: i.spec.parameters,
        n_layers: i.spec.n_layers,
        hidden_size: i.spec.hidden_size,
        vocab_size: i.spec.vocab_size,
        context_length: i.spec.context_length,
        dtype: i.dtype.clone(),
        device: i.device.clone(),
        format: i.format.into(),
        sha256: i.sha256.clone(),
        tokenizer: i.tokenizer.clone(),
        load_seconds: i.load_seconds,
    })
}

/// Human-readable page for a problem `type` URI.
#[utoipa::path(get, path = "/problems/{code}", tag = "system", params(("code" = String, Path)),
    responses((status = 200, description = "What the error kind means", content_type = "text/plain"), (status = 404, body = Problem)))]
async fn problem_type(code: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let c = Code::ALL
        .iter()
        .find(|c| c.code() == code.as_str())
        .ok_or_else(|| ApiError::new(Code::NotFound, format!("no problem type `{code}`")))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(format!(
            "{} ({}): {}\n",
            c.code(),
            c.status().as_u16(),
            c.title()
        )))
}
