//! HTTP API (actix-web): routes, auth, validation, problem+json errors, OpenAPI. Nothing below
//! this module knows about HTTP.
use std::future::{ready, Ready};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, FromRequest, HttpMessage, HttpRequest, HttpServer, ResponseError};
use futures_util::FutureExt;

use crate::config::{ApiKeys, Config};
use crate::engine::worker::Engine;
use crate::metrics::Metrics;
use crate::sessions::Sessions;

mod damage;
mod edits;
pub mod error;
mod evaluations;
mod inference;
pub mod openai;
pub mod openapi;
mod sessions;
mod sweeps;
mod system;
mod trainings;

pub use error::{ApiError, Code};

/// Limits every request is validated against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_new_tokens: usize,
    pub max_batch_items: usize,
    pub max_stop_sequences: usize,
    pub max_stop_len: usize,
    pub eval_patience: Duration,
    pub max_edits_per_request: usize,
}

impl Limits {
    pub fn from_config(c: &Config) -> Self {
        Self {
            max_new_tokens: c.max_new_tokens,
            max_batch_items: c.max_batch_items,
            max_stop_sequences: c.max_stop_sequences,
            max_stop_len: c.max_stop_len,
            eval_patience: Duration::from_secs(c.eval_patience_secs),
            max_edits_per_request: c.max_edits_per_request,
        }
    }
}

/// Shared by every handler.
pub struct AppState {
    pub engine: Engine,
    pub sessions: Arc<Sessions>,
    pub jobs: Arc<crate::jobs::Jobs>,
    pub metrics: Arc<Metrics>,
    pub keys: ApiKeys,
    pub limits: Limits,
    pub max_body_bytes: usize,
    /// Dataset directory for edits that name dataset records.
    pub data_dir: Option<std::path::PathBuf>,
    pub datasets: edits::DatasetCache,
}

/// The request being served, for problem bodies (`instance`, `request_id`) and logs.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub id: String,
    pub path: String,
}

tokio::task_local! {
    static REQUEST: RequestCtx;
}

pub(crate) fn request_ctx() -> Option<RequestCtx> {
    REQUEST.try_with(Clone::clone).ok()
}

/// The tenant a request acts for: from `Authorization: Bearer <key>`, or `default` when the
/// server runs without keys (loopback only).
#[derive(Debug, Clone)]
pub struct Tenant(pub String);

impl FromRequest for Tenant {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let state = req
            .app_data::<web::Data<AppState>>()
            .expect("AppState is registered");
        if state.keys.is_empty() {
            return ready(Ok(Tenant("default".into())));
        }
        let key = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        ready(match key.and_then(|k| state.keys.tenant_for(k)) {
            Some(t) => Ok(Tenant(t.to_string())),
            None => Err(ApiError::new(
                Code::Unauthorized,
                "send `Authorization: Bearer <api key>` with a configured key",
            )),
        })
    }
}

/// Request id (taken from `x-request-id` or made), tracing span, metrics, and the last line of
/// defence: a panic in a handler becomes a 500 problem, never a dropped connection.
async fn observe(
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let start = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let ctx = RequestCtx {
        id: id.clone(),
        path: req.path().to_string(),
    };
    let method = req.method().to_string();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    req.extensions_mut().insert(ctx.clone());
    let span = tracing::info_span!("request", request_id = %id, method = %method, path = %ctx.path);
    let fut = REQUEST.scope(ctx.clone(), async move {
        std::panic::AssertUnwindSafe(next.call(req))
            .catch_unwind()
            .await
    });
    let res = tracing::Instrument::instrument(fut, span.clone()).await;
    let record = |route: &str, status: actix_web::http::StatusCode| {
        if let Some(s) = &state {
            s.metrics
                .http_requests_total
                .with_label_values(&[route, &method, status.as_str()])
                .inc();
            s.metrics
                .http_request_duration_seconds
                .with_label_values(&[route, &method])
                .observe(start.elapsed().as_secs_f64());
        }
        span.in_scope(|| {
            tracing::info!(
                status = status.as_u16(),
                ms = start.elapsed().as_millis() as u64,
                "served"
            )
        });
    };
    let header = actix_web::http::header::HeaderName::from_static("x-request-id");
    let value = actix_web::http::header::HeaderValue::from_str(&id).ok();
    match res {
        Ok(Ok(mut res)) => {
            if let Some(v) = value {
                res.headers_mut().insert(header, v);
            }
            let route = res
                .request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".into());
            record(&route, res.status());
            Ok(res.map_body(|_, b| b.boxed()))
        }
        Ok(Err(e)) => {
            record("unmatched", e.as_response_error().status_code());
            Err(e)
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            span.in_scope(|| tracing::error!(request_id = %id, panic = %msg, "handler panicked"));
            let mut resp = REQUEST.sync_scope(ctx, || {
                ApiError::new(Code::Internal, "the server failed on this request").error_response()
            });
            if let Some(v) = value {
                resp.headers_mut().insert(header, v);
            }
            record("unmatched", resp.status());
            // The request was moved into the handler that panicked, so answer through an error
            // carrying the finished response.
            Err(actix_web::error::InternalError::from_response("handler panicked", resp).into())
        }
    }
}

/// A resource whose unlisted methods answer 405 with `Allow` and a problem body.
pub(crate) fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || async move {
        let mut r = ApiError::new(Code::MethodNotAllowed, format!("this path accepts {allow}"))
            .error_response();
        r.headers_mut().insert(
            actix_web::http::header::ALLOW,
            actix_web::http::header::HeaderValue::from_static(allow),
        );
        r
    }))
}

/// Registers every route (the OpenAPI document lists the same set; a test checks it).
pub fn routes(cfg: &mut web::ServiceConfig) {
    system::routes(cfg);
    sessions::routes(cfg);
    damage::routes(cfg);
    edits::routes(cfg);
    evaluations::routes(cfg);
    sweeps::routes(cfg);
    trainings::routes(cfg);
    inference::routes(cfg);
    openai::routes(cfg);
    cfg.service(utoipa_swagger_ui::SwaggerUi::new("/docs/{_:.*}").url(
        "/openapi.json",
        <openapi::ApiDoc as utoipa::OpenApi>::openapi(),
    ));
    cfg.route(
        "/docs",
        web::get().to(|| async {
            actix_web::HttpResponse::Found()
                .insert_header(("Location", "/docs/"))
                .finish()
        }),
    );
}

/// A JSON request body that must be an object (serde would also read a struct from an array).
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned + 'static> FromRequest for Body<T> {
    type Error = actix_web::Error;
    type Future = futures_util::future::LocalBoxFuture<'static, Result<Self, actix_web::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let value = web::Json::<serde_json::Value>::from_request(req, payload);
        let path = req.path().to_string();
        Box::pin(async move {
            let v = value.await?.into_inner();
            let parsed = if v.is_object() {
                serde_json::from_value(v)
                    .map_err(|e| ApiError::new(Code::InvalidField, e.to_string()))
            } else {
                Err(ApiError::new(
                    Code::InvalidField,
                    "the body must be a JSON object",
                ))
            };
            parsed.map(Body).map_err(|e| family_error(&path, e))
        })
    }
}

/// An error in the envelope of the route family the path belongs to.
fn family_error(path: &str, e: ApiError) -> actix_web::Error {
    if openapi::OPENAI_PATHS.contains(&path) {
        error::OpenAiError(e).into()
    } else {
        e.into()
    }
}

fn json_error(err: actix_web::error::JsonPayloadError, req: &HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let e = match &err {
        J::OverflowKnownLength { length, limit } => ApiError::new(
            Code::PayloadTooLarge,
            format!("body has {length} bytes; the limit is {limit}"),
        ),
        J::Overflow { limit } => ApiError::new(
            Code::PayloadTooLarge,
            format!("body exceeds the limit of {limit} bytes"),
        ),
        J::ContentType => ApiError::new(
            Code::MalformedRequest,
            "send `Content-Type: application/json`",
        ),
        J::Deserialize(d) if d.is_data() => ApiError::new(Code::InvalidField, d.to_string()),
        _ => ApiError::new(Code::MalformedRequest, err.to_string()),
    };
    family_error(req.path(), e)
}

fn query_error(err: actix_web::error::QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::new(Code::MalformedRequest, format!("query string: {err}")).into()
}

fn path_error(err: actix_web::error::PathError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::new(Code::NotFound, err.to_string()).into()
}

/// Binds and starts the server; returns it with the address it listens on.
pub fn serve(
    state: web::Data<AppState>,
    listener: TcpListener,
    workers: usize,
    grace_secs: u64,
) -> std::io::Result<Server> {
    let body_limit = state.max_body_bytes;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(body_limit)
                    .error_handler(json_error),
            )
            .app_data(web::PathConfig::default().error_handler(path_error))
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .wrap(from_fn(observe))
            .configure(routes)
            .default_service(web::to(|| async {
                Err::<actix_web::HttpResponse, _>(ApiError::new(Code::NotFound, "no such route"))
            }))
    })
    .workers(workers)
    .shutdown_timeout(grace_secs)
    .listen(listener)?
    .run();
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test as atest;

    #[actix_web::test]
    async fn a_panicking_handler_answers_500_with_a_problem() {
        let app = atest::init_service(App::new().wrap(from_fn(observe)).route(
            "/boom",
            web::get().to(|| async { panic!("boom") as actix_web::HttpResponse }),
        ))
        .await;
        let req = atest::TestRequest::get()
            .uri("/boom")
            .insert_header(("x-request-id", "req-42"))
            .to_request();
        // The server turns a middleware error into its response, as done here.
        let res = match atest::try_call_service(&app, req).await {
            Ok(r) => r.into_parts().1,
            Err(e) => e.error_response(),
        };
        assert_eq!(res.status(), 500);
        assert_eq!(res.headers().get("x-request-id").unwrap(), "req-42");
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "application/problem+json"
        );
        let bytes = actix_web::body::to_bytes(res.into_body()).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["code"], "internal");
        assert_eq!(body["request_id"], "req-42");
        assert_eq!(body["instance"], "/boom");
        assert!(
            !body["detail"].as_str().unwrap().contains("boom"),
            "panic text is not shown to clients"
        );
    }

    #[test]
    fn every_code_has_a_distinct_slug() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.code()), "duplicate {}", c.code());
            assert!(c.status().is_client_error() || c.status().is_server_error());
        }
    }
}
