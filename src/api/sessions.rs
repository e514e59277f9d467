//! `/v1/sessions`: create (optionally forked), list, get, delete.
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::Problem;
use super::{ApiError, AppState, Body, Tenant};
use crate::canary::budget::MAX_FLIPS;
use crate::canary::CanarySettings;
use crate::sessions::Session;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        super::resource("/v1/sessions", "POST, GET")
            .route(web::post().to(create))
            .route(web::get().to(list)),
    )
    .service(
        super::resource("/v1/sessions/{id}", "GET, DELETE")
            .route(web::get().to(get))
            .route(web::delete().to(delete)),
    )
    .service(
        super::resource("/v1/sessions/{id}/canary", "GET, PUT")
            .route(web::get().to(get_canary))
            .route(web::put().to(put_canary)),
    );
}

/// Where a fork starts.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkFrom {
    pub session: String,
    pub version: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// Free-form label, at most 128 characters.
    #[schema(example = "counterfact-sweep")]
    pub name: Option<String>,
    /// Fork from a version of one of your sessions.
    pub from: Option<ForkFrom>,
    /// Canary probes after each edit and the damage budget (default: off; a fork keeps its
    /// parent's setting).
    #[schema(value_type = Option<CanarySettings>)]
    pub canary: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionDto {
    pub id: String,
    pub owner: String,
    pub name: Option<String>,
    pub created_at: String,
    /// 0 is the base model.
    pub version: u64,
    pub edit_count: u64,
    pub parent: Option<ParentDto>,
    pub canary: CanarySettings,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParentDto {
    pub session: String,
    pub version: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionDto>,
}

impl From<Session> for SessionDto {
    fn from(s: Session) -> Self {
        Self {
            id: s.id,
            owner: s.owner,
            name: s.name,
            created_at: s.created_at,
            version: s.version,
            edit_count: s.edit_count,
            parent: s.parent.map(|p| ParentDto {
                session: p.session,
                version: p.version,
            }),
            canary: s.canary,
        }
    }
}

/// A canary setting from JSON, each bad value named by its field under `prefix` (`canary.` in
/// a session's creation, empty in `PUT /v1/sessions/{id}/canary`).
pub(crate) fn parse_canary(prefix: &str, v: serde_json::Value) -> Result<CanarySettings, ApiError> {
    use serde_json::Value;
    let at = |f: &str| format!("{prefix}{f}");
    let Value::Object(obj) = &v else {
        let name = prefix.trim_end_matches('.');
        return Err(ApiError::field(
            if name.is_empty() { "body" } else { name },
            "must be an object with `mode` and `budget`",
        ));
    };
    if let Some(k) = obj.keys().find(|k| *k != "mode" && *k != "budget") {
        return Err(ApiError::field(
            &at(k),
            "is not a field of a canary setting (`mode`, `budget`)",
        ));
    }
    if let Some(m) = obj.get("mode") {
        if !matches!(m.as_str(), Some("off" | "measure" | "guard")) {
            return Err(ApiError::field(
                &at("mode"),
                format_args!("must be `off`, `measure` or `guard`. Given: {m}"),
            ));
        }
    }
    const LIMITS: [&str; 3] = ["perplexity_ratio", "accuracy_drop", "neighbour_flips"];
    if let Some(b) = obj.get("budget") {
        let Value::Object(b) = b else {
            return Err(ApiError::field(&at("budget"), "must be an object"));
        };
        for (k, x) in b {
            let field = at(&format!("budget.{k}"));
            if !LIMITS.contains(&k.as_str()) {
                return Err(ApiError::field(
                    &field,
                    "is not a budget limit (`perplexity_ratio`, `accuracy_drop`, `neighbour_flips`)",
                ));
            }
            let ok = match k.as_str() {
                "neighbour_flips" => {
                    x.is_null() || x.as_u64().is_some_and(|n| n <= u64::from(MAX_FLIPS))
                }
                _ => x.is_null() || x.is_number(),
            };
            if !ok {
                let want = if k == "neighbour_flips" {
                    format!("an integer from 0 to {MAX_FLIPS}")
                } else {
                    "a number".into()
                };
                return Err(ApiError::field(
                    &field,
                    format_args!("must be {want}. Given: {x}"),
                ));
            }
        }
    }
    let settings: CanarySettings =
        serde_json::from_value(v).map_err(|e| ApiError::field(prefix.trim_end_matches('.'), e))?;
    settings
        .budget
        .validate()
        .map_err(|e| ApiError::field(&at(&e.field), e.message))?;
    Ok(settings)
}

pub const MAX_NAME: usize = 128;

#[utoipa::path(post, operation_id = "create_session", path = "/v1/sessions", tag = "sessions", request_body = CreateSession,
    responses((status = 201, body = SessionDto), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn create(
    state: web::Data<AppState>,
    tenant: Tenant,
    body: Body<CreateSession>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    if let Some(n) = &body.name {
        if n.chars().count() > MAX_NAME {
            return Err(ApiError::field(
                "name",
                format_args!(
                    "must be at most {MAX_NAME} characters. Given: {}",
                    n.chars().count()
                ),
            ));
        }
    }
    let canary = body
        .canary
        .map(|v| parse_canary("canary.", v))
        .transpose()?;
    let s = state
        .sessions
        .create(
            &tenant.0,
            body.name,
            body.from.map(|f| (f.session, f.version)),
            canary,
        )
        .await?;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/v1/sessions/{}", s.id)))
        .json(SessionDto::from(s)))
}

#[utoipa::path(get, operation_id = "list_sessions", path = "/v1/sessions", tag = "sessions", responses((status = 200, body = SessionList)))]
async fn list(state: web::Data<AppState>, tenant: Tenant) -> web::Json<SessionList> {
    web::Json(SessionList {
        sessions: state
            .sessions
            .list(&tenant.0)
            .into_iter()
            .map(Into::into)
            .collect(),
    })
}

#[utoipa::path(get, operation_id = "get_session", path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path)),
    responses((status = 200, body = SessionDto), (status = 404, body = Problem)))]
async fn get(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<web::Json<SessionDto>, ApiError> {
    Ok(web::Json(state.sessions.get(&tenant.0, &id)?.into()))
}

#[utoipa::path(delete, operation_id = "delete_session", path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)))]
async fn delete(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.sessions.delete(&tenant.0, &id).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, operation_id = "get_session_canary", path = "/v1/sessions/{id}/canary", tag = "sessions",
    params(("id" = String, Path)),
    responses((status = 200, body = CanarySettings), (status = 404, body = Problem)))]
async fn get_canary(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
) -> Result<web::Json<CanarySettings>, ApiError> {
    Ok(web::Json(state.sessions.get(&tenant.0, &id)?.canary))
}

/// Replaces the session's canary setting; edits after it are read against the new one.
#[utoipa::path(put, operation_id = "set_session_canary", path = "/v1/sessions/{id}/canary", tag = "sessions",
    params(("id" = String, Path)), request_body = CanarySettings,
    responses((status = 200, body = SessionDto), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn put_canary(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    body: Body<serde_json::Value>,
) -> Result<web::Json<SessionDto>, ApiError> {
    state.sessions.get(&tenant.0, &id)?;
    let settings = parse_canary("", body.0)?;
    let s = state.sessions.set_canary(&tenant.0, &id, settings).await?;
    tracing::info!(session = %s.id, mode = ?s.canary.mode, "canary setting changed");
    Ok(web::Json(s.into()))
}
