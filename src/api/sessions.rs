//! `/v1/sessions`: create (optionally forked), list, get, delete.
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::Problem;
use super::{ApiError, AppState, Body, Tenant};
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
        }
    }
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
    let s = state
        .sessions
        .create(
            &tenant.0,
            body.name,
            body.from.map(|f| (f.session, f.version)),
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
