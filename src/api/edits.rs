//! Knowledge edits on a session: apply (one request or a batch), history, one version, rollback,
//! and the methods with their hyper-parameters. Everything is validated before any work is
//! queued, so a rejected request leaves the session's version as it was.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::Problem;
use super::sessions::SessionDto;
use super::{ApiError, AppState, Body, Code, Tenant};
use crate::canary::Reading;
use crate::engine::editing::datasets::{self, EditDataset, Record};
use crate::engine::editing::{self, EditError, EditRequest, MeasureOptions, Method};
use crate::engine::worker::Admission;
use crate::sessions::AppliedVersion;
use crate::store::{LogEntry, LogKind};

pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(
        resource("/v1/sessions/{id}/edits", "POST, GET")
            .route(web::post().to(apply))
            .route(web::get().to(history)),
    )
    .service(resource("/v1/sessions/{id}/edits/{version}", "GET").route(web::get().to(version)))
    .service(resource("/v1/sessions/{id}/rollback", "POST").route(web::post().to(rollback)))
    .service(resource("/v1/methods", "GET").route(web::get().to(methods)));
}

/// The name of a registered editing method: the schema's values come from the registry, so
/// the spec lists exactly the methods `Method::from_str` accepts.
pub struct MethodName;

impl utoipa::PartialSchema for MethodName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "An editing method (`GET /v1/methods` lists them with their hyper-parameters).",
            ))
            .enum_values(Some(Method::all().into_iter().map(|m| m.name())))
            .into()
    }
}

impl ToSchema for MethodName {}

/// A record of an editing dataset, by id (CounterFact `case_id`, zsRE index).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetRecord {
    pub dataset: EditDataset,
    #[schema(minimum = 0)]
    pub id: u64,
}

/// One edit: a request written out, or a dataset record.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // documents the items `parse_item` reads
pub enum EditItem {
    Request(EditRequest),
    Record(DatasetRecord),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyEdits {
    #[schema(value_type = MethodName, example = "rome")]
    pub method: String,
    /// Requests applied one after another (ROME, FT: one version each) or as one batch (MEMIT:
    /// one version). At most `max_edits_per_request` (configuration, default 64).
    #[schema(value_type = Vec<EditItem>, min_items = 1)]
    pub edits: Vec<Value>,
    /// Overrides of the method's defaults (see `GET /v1/methods`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub hparams: Option<Value>,
    /// Also measure fluency (n-gram entropy of generations from each edit prompt; slower).
    #[serde(default)]
    pub fluency: bool,
}

/// One version of a session: the edit that made it.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionDto {
    pub version: u64,
    /// The version this edit was applied on.
    pub parent_version: u64,
    #[schema(value_type = MethodName)]
    pub method: String,
    #[schema(value_type = Vec<EditRequest>)]
    pub requests: Value,
    /// Metrics of each request before (`pre`) and after (`post`) the edit.
    #[schema(value_type = Vec<editing::EditReport>)]
    pub reports: Value,
    /// The hyper-parameters used (defaults merged with the overrides).
    #[schema(value_type = Object)]
    pub hparams: Value,
    /// Method diagnostics (loss curve, norms, layers).
    #[schema(value_type = Object)]
    pub diagnostics: Value,
    pub duration_ms: u64,
    pub created_at: String,
    /// The canary reading of this version, when the session's canary setting ran the probes
    /// (`breaches` not empty: over budget, kept in `measure` mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Reading>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApplyEditsResponse {
    pub session: String,
    /// The new current version.
    pub version: u64,
    pub versions: Vec<VersionDto>,
}

/// An entry of a session's log: an edit (a new version) or a rollback (to `version`).
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// `edit` or `rollback`.
    #[schema(example = "edit")]
    pub kind: String,
    pub version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<MethodName>)]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<EditRequest>>)]
    pub requests: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<editing::EditReport>>)]
    pub reports: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub hparams: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub diagnostics: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Reading>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EditHistory {
    pub session: String,
    /// Entries in the whole log.
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    pub entries: Vec<HistoryEntry>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Any version of the session (0 is the base model).
    #[schema(minimum = 0)]
    pub version: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MethodDto {
    #[schema(value_type = MethodName)]
    pub name: String,
    pub description: String,
    /// A batch is one update (`true`, MEMIT) or requests are applied one by one.
    pub batched: bool,
    /// JSON Schema of the hyper-parameters.
    #[schema(value_type = Object)]
    pub hparams_schema: Value,
    /// Defaults for the loaded model.
    #[schema(value_type = Object)]
    pub defaults: Value,
    /// What the defaults need acquired before an edit, e.g.
    /// `{"kind": "key_stats", "layers": [4], "samples": 1000}` or
    /// `{"kind": "context_templates", "count": 5, "tokens": 10}`.
    #[schema(value_type = Vec<Object>)]
    pub resources: Vec<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MethodList {
    pub methods: Vec<MethodDto>,
}

/// Parsed editing datasets, by dataset: the files are megabytes of JSON, parsed once.
#[derive(Default)]
pub struct DatasetCache {
    loaded: Mutex<HashMap<&'static str, Arc<Vec<Record>>>>,
}

impl DatasetCache {
    async fn get(&self, ds: EditDataset, dir: PathBuf) -> Result<Arc<Vec<Record>>, EditError> {
        if let Some(r) = self.lock().get(ds.name()) {
            return Ok(r.clone());
        }
        let records = web::block(move || datasets::load(ds, &dir))
            .await
            .map_err(|e| EditError::invalid("dataset", e.to_string()))??;
        let records = Arc::new(records);
        self.lock().insert(ds.name(), records.clone());
        Ok(records)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Arc<Vec<Record>>>> {
        // The map holds only complete entries, so a poisoned lock's data is still good.
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `edits[i]` as a request: written out, or a dataset record (resolved later).
enum Item {
    Request(Box<EditRequest>),
    Record(EditDataset, u64),
}

/// Names the field serde complained about (`missing field `x``) under `prefix`.
fn serde_field(prefix: &str, e: &serde_json::Error) -> ApiError {
    let msg = e.to_string();
    let field = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.contains("field `"))
        .map(|f| format!("{prefix}.{f}"))
        .unwrap_or_else(|| prefix.to_string());
    ApiError::field(&field, msg)
}

fn parse_item(i: usize, v: Value) -> Result<Item, ApiError> {
    let at = format!("edits[{i}]");
    let Some(obj) = v.as_object() else {
        return Err(ApiError::field(
            &at,
            "must be an edit request or a `{dataset, id}` record",
        ));
    };
    if !obj.contains_key("dataset") {
        return serde_json::from_value::<EditRequest>(v)
            .map(|r| Item::Request(Box::new(r)))
            .map_err(|e| serde_field(&at, &e));
    }
    if let Some(k) = obj.keys().find(|k| *k != "dataset" && *k != "id") {
        return Err(ApiError::field(
            &format!("{at}.{k}"),
            "is not a field of a dataset record (`dataset`, `id`)",
        ));
    }
    let ds = obj["dataset"]
        .as_str()
        .ok_or_else(|| ApiError::field(&format!("{at}.dataset"), "must be a string"))?
        .parse::<EditDataset>()
        .map_err(|e| match e {
            EditError::Invalid { message, .. } => {
                ApiError::field(&format!("{at}.dataset"), message)
            }
            other => other.into(),
        })?;
    let id = obj
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| ApiError::field(&format!("{at}.id"), "must be a non-negative integer"))?;
    Ok(Item::Record(ds, id))
}

/// Everything checked before the edit is queued: method, batch size, dataset records, requests,
/// hyper-parameters.
async fn prepare(
    state: &AppState,
    body: ApplyEdits,
) -> Result<(Method, Vec<EditRequest>, Value), ApiError> {
    let method: Method = body.method.parse()?;
    let max = state.limits.max_edits_per_request;
    if body.edits.is_empty() || body.edits.len() > max {
        return Err(ApiError::field(
            "edits",
            format_args!("must hold 1 to {max} edits. Given: {}", body.edits.len()),
        ));
    }
    let items = body
        .edits
        .into_iter()
        .enumerate()
        .map(|(i, v)| parse_item(i, v))
        .collect::<Result<Vec<_>, _>>()?;
    let mut requests = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Item::Request(r) => requests.push(*r),
            Item::Record(ds, id) => {
                let Some(dir) = state.data_dir.clone() else {
                    return Err(ApiError::field(
                        &format!("edits[{i}].dataset"),
                        "cannot be read: the server has no dataset directory (configure `data_dir`)",
                    ));
                };
                let records = state.datasets.get(ds, dir).await.map_err(|e| match e {
                    EditError::Invalid { message, .. } => {
                        ApiError::field(&format!("edits[{i}].dataset"), message)
                    }
                    other => other.into(),
                })?;
                let r = records.iter().find(|r| r.id == id).ok_or_else(|| {
                    ApiError::field(
                        &format!("edits[{i}].id"),
                        format_args!("{} has no record {id}", ds.name()),
                    )
                })?;
                requests.push(r.request.clone());
            }
        }
    }
    editing::validate(&requests, state.engine.tokenizer())?;
    let overrides = body.hparams.unwrap_or(Value::Null);
    editing::hparams::resolve(method, state.engine.spec(), &overrides)?;
    Ok((method, requests, overrides))
}

fn version_dto(a: AppliedVersion, method: &str) -> VersionDto {
    VersionDto {
        version: a.version,
        parent_version: a.parent_version,
        method: method.to_string(),
        requests: serde_json::to_value(&a.requests).unwrap_or_default(),
        reports: serde_json::to_value(&a.reports).unwrap_or_default(),
        hparams: a.hparams,
        diagnostics: a.diagnostics,
        duration_ms: a.duration_ms,
        created_at: a.created_at,
        canary: a.canary,
    }
}

#[utoipa::path(post, path = "/v1/sessions/{id}/edits", tag = "edits", params(("id" = String, Path)),
    request_body = ApplyEdits,
    responses((status = 201, body = ApplyEditsResponse), (status = 404, body = Problem), (status = 422, body = Problem),
              (status = 409, body = Problem, description = "refused by the damage guard: the problem's `canary` holds the reading"),
              (status = 429, body = Problem), (status = 503, body = Problem)))]
async fn apply(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    body: Body<ApplyEdits>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    // Client strings never become label values: an unknown method is counted as `unknown`.
    let label = body
        .0
        .method
        .parse::<Method>()
        .map(Method::name)
        .unwrap_or("unknown");
    let r = apply_inner(&state, &tenant, &id, body.0).await;
    let outcome = match &r {
        Ok(_) => "ok",
        Err(e) if e.canary.is_some() => "rejected",
        Err(e) if e.code.status().is_client_error() && e.code != Code::Overloaded => "invalid",
        Err(_) => "failed",
    };
    state
        .metrics
        .edits_total
        .with_label_values(&[label, outcome])
        .inc();
    if r.is_ok() {
        state
            .metrics
            .edit_duration_seconds
            .with_label_values(&[label])
            .observe(start.elapsed().as_secs_f64());
    }
    let resp = r?;
    Ok(HttpResponse::Created()
        .insert_header((
            "Location",
            format!("/v1/sessions/{}/edits/{}", resp.session, resp.version),
        ))
        .json(resp))
}

async fn apply_inner(
    state: &AppState,
    tenant: &Tenant,
    id: &str,
    body: ApplyEdits,
) -> Result<ApplyEditsResponse, ApiError> {
    // 404 before validation: a client with a wrong id learns that first.
    state.sessions.get(&tenant.0, id)?;
    let fluency = body.fluency;
    let (method, requests, overrides) = prepare(state, body).await?;
    let engine = state.engine.clone();
    let reqs = requests.clone();
    let applied = state
        .sessions
        .apply_edit(&tenant.0, id, method, requests, move |view| async move {
            let opts = MeasureOptions { fluency };
            engine
                .edit(view, method, reqs, overrides, opts, Admission::Immediate)
                .await
        })
        .await?;
    tracing::info!(session = %id, method = %method, version = applied.session.version,
        versions = applied.versions.len(), "edit applied");
    Ok(ApplyEditsResponse {
        session: applied.session.id.clone(),
        version: applied.session.version,
        versions: applied
            .versions
            .into_iter()
            .map(|a| version_dto(a, method.name()))
            .collect(),
    })
}

pub const DEFAULT_PAGE: u64 = 100;
pub const MAX_PAGE: u64 = 1000;

/// `offset` and `limit` of a listing, each named when it is not a number in range.
pub(crate) fn page(q: &HashMap<String, String>) -> Result<(u64, u64), ApiError> {
    if let Some(k) = q.keys().find(|k| *k != "offset" && *k != "limit") {
        return Err(ApiError::field(
            k,
            "is not a query parameter of this route (`offset`, `limit`)",
        ));
    }
    let num = |name: &str, default: u64, lo: u64, hi: u64| -> Result<u64, ApiError> {
        match q.get(name) {
            None => Ok(default),
            Some(s) => s
                .parse::<u64>()
                .ok()
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| {
                    ApiError::field(
                        name,
                        format_args!("must be an integer from {lo} to {hi}. Given: {s:?}"),
                    )
                }),
        }
    };
    Ok((
        num("offset", 0, 0, i64::MAX as u64)?,
        num("limit", DEFAULT_PAGE, 1, MAX_PAGE)?,
    ))
}

fn parse_json(text: Option<&str>) -> Option<Value> {
    text.map(|t| serde_json::from_str(t).unwrap_or(Value::Null))
}

fn history_entry(e: LogEntry) -> HistoryEntry {
    HistoryEntry {
        seq: e.seq.max(0) as u64,
        kind: e.kind.as_str().to_string(),
        version: e.version.max(0) as u64,
        parent_version: e.parent_version.map(|v| v.max(0) as u64),
        method: e.method,
        requests: parse_json(e.request.as_deref()),
        reports: parse_json(e.metrics.as_deref()),
        hparams: parse_json(e.hparams.as_deref()),
        diagnostics: parse_json(e.diagnostics.as_deref()),
        duration_ms: e.duration_ms.map(|d| d.max(0) as u64),
        created_at: e.created_at,
        canary: e
            .canary
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok()),
    }
}

#[utoipa::path(get, path = "/v1/sessions/{id}/edits", tag = "edits",
    params(("id" = String, Path),
           ("offset" = Option<u64>, Query, minimum = 0, description = "entries to skip (default 0)"),
           ("limit" = Option<u64>, Query, minimum = 1, maximum = 1000, description = "entries to return (default 100)")),
    responses((status = 200, body = EditHistory), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn history(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
) -> Result<web::Json<EditHistory>, ApiError> {
    let s = state.sessions.get(&tenant.0, &id)?;
    let (offset, limit) = page(&query)?;
    let (rows, total) = state
        .sessions
        .store()
        .log_page(&s.id, offset as i64, limit as i64)
        .await
        .map_err(crate::sessions::SessionError::from)?;
    Ok(web::Json(EditHistory {
        session: s.id,
        total: total.max(0) as u64,
        offset,
        limit,
        entries: rows.into_iter().map(history_entry).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/sessions/{id}/edits/{version}", tag = "edits",
    params(("id" = String, Path), ("version" = u64, Path, minimum = 1)),
    responses((status = 200, body = VersionDto), (status = 404, body = Problem)))]
async fn version(
    state: web::Data<AppState>,
    tenant: Tenant,
    path: web::Path<(String, u64)>,
) -> Result<web::Json<VersionDto>, ApiError> {
    let (id, version) = path.into_inner();
    let s = state.sessions.get(&tenant.0, &id)?;
    let none = || {
        ApiError::new(
            Code::NotFound,
            format!("session `{id}` has no edit that made version {version}"),
        )
    };
    if version == 0 {
        return Err(ApiError::new(
            Code::NotFound,
            "version 0 is the base model; no edit made it",
        ));
    }
    let e = state
        .sessions
        .store()
        .edit_entry(&s.id, version as i64)
        .await
        .map_err(crate::sessions::SessionError::from)?
        .ok_or_else(none)?;
    debug_assert_eq!(e.kind, LogKind::Edit);
    let h = history_entry(e);
    Ok(web::Json(VersionDto {
        version: h.version,
        parent_version: h.parent_version.unwrap_or(0),
        method: h.method.unwrap_or_default(),
        requests: h.requests.unwrap_or(Value::Null),
        reports: h.reports.unwrap_or(Value::Null),
        hparams: h.hparams.unwrap_or(Value::Null),
        diagnostics: h.diagnostics.unwrap_or(Value::Null),
        duration_ms: h.duration_ms.unwrap_or(0),
        created_at: h.created_at,
        canary: h.canary,
    }))
}

#[utoipa::path(post, path = "/v1/sessions/{id}/rollback", tag = "edits", params(("id" = String, Path)),
    request_body = RollbackRequest,
    responses((status = 200, body = SessionDto), (status = 404, body = Problem), (status = 422, body = Problem)))]
async fn rollback(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    body: Body<RollbackRequest>,
) -> Result<web::Json<SessionDto>, ApiError> {
    let s = state
        .sessions
        .rollback(&tenant.0, &id, body.0.version)
        .await?;
    tracing::info!(session = %s.id, version = s.version, "rolled back");
    Ok(web::Json(s.into()))
}

#[utoipa::path(get, path = "/v1/methods", tag = "edits", responses((status = 200, body = MethodList)))]
async fn methods(state: web::Data<AppState>, _tenant: Tenant) -> web::Json<MethodList> {
    web::Json(MethodList {
        methods: editing::methods(state.engine.spec())
            .into_iter()
            .map(|m| MethodDto {
                name: m.name.to_string(),
                description: m.description.to_string(),
                batched: m.batched,
                hparams_schema: m.hparams_schema,
                defaults: m.defaults,
                resources: m
                    .resources
                    .iter()
                    .map(|r| serde_json::to_value(r).unwrap_or_default())
                    .collect(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_name_their_fields() {
        let e = parse_item(2, serde_json::json!({"prompt": "x", "target_new": "y"}))
            .err()
            .unwrap();
        assert!(e.detail.starts_with("`edits[2].subject`"), "{}", e.detail);
        let e = parse_item(0, serde_json::json!({"dataset": "wiki", "id": 1}))
            .err()
            .unwrap();
        assert!(e.detail.starts_with("`edits[0].dataset`"), "{}", e.detail);
        let e = parse_item(1, serde_json::json!({"dataset": "zsre", "id": -1}))
            .err()
            .unwrap();
        assert!(e.detail.starts_with("`edits[1].id`"), "{}", e.detail);
        assert!(matches!(
            parse_item(0, serde_json::json!({"dataset": "counterfact", "id": 7})),
            Ok(Item::Record(EditDataset::Counterfact, 7))
        ));
    }

    #[test]
    fn pages_are_bounded() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(page(&q(&[])).unwrap(), (0, DEFAULT_PAGE));
        assert_eq!(
            page(&q(&[("offset", "5"), ("limit", "2")])).unwrap(),
            (5, 2)
        );
        assert!(page(&q(&[("limit", "0")]))
            .unwrap_err()
            .detail
            .starts_with("`limit`"));
        assert!(page(&q(&[("offset", "x")]))
            .unwrap_err()
            .detail
            .starts_with("`offset`"));
        assert!(page(&q(&[("page", "1")]))
            .unwrap_err()
            .detail
            .starts_with("`page`"));
    }
}
