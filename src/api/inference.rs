//! Generation (plain and server-sent events) and log-likelihood scoring against a session.
use actix_web::{web, HttpResponse};
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::Problem;
use super::{ApiError, AppState, Body, Code, Limits, Tenant};
use crate::engine::model::generate::{FinishReason, GenParams, Generation};
use crate::engine::model::sampling::Sampling;
use crate::engine::model::tokenizer::ChatMessage;
use crate::engine::worker::{GenEvent, GenEvents};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        super::resource("/v1/sessions/{id}/generate", "POST").route(web::post().to(generate)),
    )
    .service(
        super::resource("/v1/sessions/{id}/loglikelihood", "POST")
            .route(web::post().to(loglikelihood)),
    );
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    #[schema(example = "user")]
    pub role: String,
    pub content: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Plain-text prompt (give this or `messages`).
    #[schema(example = "The capital of France is")]
    pub prompt: Option<String>,
    /// Chat messages, rendered with the model's chat template.
    pub messages: Option<Vec<Message>>,
    #[serde(default = "default_max_tokens")]
    #[schema(default = 128, minimum = 1)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: f64,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[schema(minimum = 1)]
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Stream text as server-sent events (`token` events, then one `done` event).
    #[serde(default)]
    pub stream: bool,
    /// Generate from this version of the session (default: the current one).
    #[schema(minimum = 0)]
    pub version: Option<u64>,
}

fn default_max_tokens() -> usize {
    128
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub session: String,
    pub version: u64,
    pub text: String,
    /// `length`, `stop` or `cancelled`.
    #[schema(value_type = String)]
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoglikelihoodItem {
    #[schema(example = "The capital of France is")]
    pub context: String,
    /// Word-boundary spaces belong here (lm-evaluation-harness convention).
    #[schema(example = " Paris")]
    pub continuation: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoglikelihoodRequest {
    /// At most `max_batch_items` (configuration, default 256).
    #[schema(min_items = 1)]
    pub requests: Vec<LoglikelihoodItem>,
    /// Score this version of the session (default: the current one).
    #[schema(minimum = 0)]
    pub version: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoglikelihoodResult {
    /// Sum of the continuation tokens' log-probabilities.
    pub logprob: f64,
    /// Whether greedy decoding would produce the continuation.
    pub is_greedy: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoglikelihoodResponse {
    pub results: Vec<LoglikelihoodResult>,
}

/// Sampling fields shared by every generation route.
pub(crate) struct SamplingFields<'a> {
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: &'a [String],
}

/// Checks every bound and returns engine parameters; `prompt_tokens` must already be known.
pub(crate) fn gen_params(
    limits: &Limits,
    ctx_len: usize,
    prompt_tokens: usize,
    f: SamplingFields,
) -> Result<GenParams, ApiError> {
    if f.max_tokens < f.min_tokens || f.max_tokens > limits.max_new_tokens {
        return Err(ApiError::field(
            "max_tokens",
            format_args!(
                "must be between {} and {}. Given: {}",
                f.min_tokens, limits.max_new_tokens, f.max_tokens
            ),
        ));
    }
    if !f.temperature.is_finite() || !(0.0..=2.0).contains(&f.temperature) {
        return Err(ApiError::field(
            "temperature",
            format_args!("must be between 0 and 2. Given: {}", f.temperature),
        ));
    }
    if let Some(p) = f.top_p {
        if !p.is_finite() || p <= 0.0 || p > 1.0 {
            return Err(ApiError::field(
                "top_p",
                format_args!("must be in (0, 1]. Given: {p}"),
            ));
        }
    }
    if f.top_k == Some(0) {
        return Err(ApiError::field("top_k", "must be at least 1. Given: 0"));
    }
    if f.stop.len() > limits.max_stop_sequences {
        return Err(ApiError::field(
            "stop",
            format_args!(
                "must hold at most {} strings. Given: {}",
                limits.max_stop_sequences,
                f.stop.len()
            ),
        ));
    }
    if let Some(s) = f
        .stop
        .iter()
        .find(|s| s.is_empty() || s.len() > limits.max_stop_len)
    {
        return Err(ApiError::field(
            "stop",
            format_args!(
                "strings must be 1 to {} bytes. Given: {} bytes",
                limits.max_stop_len,
                s.len()
            ),
        ));
    }
    if prompt_tokens == 0 {
        return Err(ApiError::field("prompt", "encodes to no tokens"));
    }
    if prompt_tokens + f.max_tokens > ctx_len {
        return Err(ApiError::new(
            Code::ContextOverflow,
            format!(
                "`prompt` tokens + `max_tokens` must be <= {ctx_len} (the context length). Given: {prompt_tokens} prompt tokens and {} `max_tokens`",
                f.max_tokens
            ),
        ));
    }
    Ok(GenParams {
        max_tokens: f.max_tokens,
        sampling: Sampling {
            temperature: f.temperature,
            top_k: f.top_k,
            top_p: f.top_p,
            seed: f.seed.unwrap_or(0),
        },
        stop: f.stop.to_vec(),
        stop_at_eos: true,
    })
}

pub(crate) fn render_messages(state: &AppState, messages: &[Message]) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::field("messages", "must not be empty"));
    }
    let msgs: Vec<ChatMessage> = messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    state
        .engine
        .tokenizer()
        .render_chat(&msgs, true)
        .map_err(|e| ApiError::field("messages", e))
}

/// Waits for the final event, discarding streamed text.
pub(crate) async fn finish(mut rx: GenEvents) -> Result<Generation, ApiError> {
    while let Some(ev) = rx.recv().await {
        if let GenEvent::Done(r) = ev {
            return r.map_err(Into::into);
        }
    }
    Err(ApiError::new(
        Code::Internal,
        "the engine dropped the request",
    ))
}

/// Server-sent events from the engine's events: `render_text` turns a delta into an event,
/// `render_done` the final generation.
pub(crate) fn sse<T, D>(rx: GenEvents, render_text: T, render_done: D) -> HttpResponse
where
    T: Fn(&str) -> String + 'static,
    D: Fn(Result<Generation, ApiError>) -> String + 'static,
{
    let body = stream::unfold(Some((rx, render_text, render_done)), |st| async move {
        let (mut rx, t, d) = st?;
        match rx.recv().await {
            Some(GenEvent::Text(s)) => {
                let ev = t(&s);
                Some((
                    Ok::<_, actix_web::Error>(web::Bytes::from(ev)),
                    Some((rx, t, d)),
                ))
            }
            Some(GenEvent::Done(r)) => Some((Ok(web::Bytes::from(d(r.map_err(Into::into)))), None)),
            None => Some((
                Ok(web::Bytes::from(d(Err(ApiError::new(
                    Code::Internal,
                    "the engine dropped the request",
                ))))),
                None,
            )),
        }
    });
    stream_response(body)
}

fn stream_response<S>(body: S) -> HttpResponse
where
    S: Stream<Item = Result<web::Bytes, actix_web::Error>> + 'static,
{
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

#[utoipa::path(post, path = "/v1/sessions/{id}/generate", tag = "inference", params(("id" = String, Path)),
    request_body = GenerateRequest,
    responses((status = 200, description = "JSON, or server-sent events when `stream` is true",
               content((GenerateResponse = "application/json"), (String = "text/event-stream"))),
              (status = 404, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem)))]
async fn generate(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    body: Body<GenerateRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.0;
    // 404 for a missing session, 422 naming `version` for a missing version, before the rest.
    let view = state.sessions.view(&tenant.0, &id, body.version)?;
    let text = match (&body.prompt, &body.messages) {
        (Some(p), None) => p.clone(),
        (None, Some(m)) => render_messages(&state, m)?,
        _ => {
            return Err(ApiError::field(
                "prompt",
                "give exactly one of `prompt` and `messages`",
            ))
        }
    };
    let ids = state.engine.tokenizer().encode(&text)?;
    let ctx_len = state.engine.info().spec.context_length;
    let params = gen_params(
        &state.limits,
        ctx_len,
        ids.len(),
        SamplingFields {
            max_tokens: body.max_tokens,
            min_tokens: 1,
            temperature: body.temperature,
            top_p: body.top_p,
            top_k: body.top_k,
            seed: body.seed,
            stop: &body.stop,
        },
    )?;
    let (sid, version) = (id.into_inner(), view.version);
    let rx = state.engine.generate(view, ids, params)?;
    if body.stream {
        return Ok(sse(
            rx,
            |t| {
                format!(
                    "event: token\ndata: {}\n\n",
                    serde_json::json!({ "text": t })
                )
            },
            move |r| match r {
                Ok(g) => format!(
                    "event: done\ndata: {}\n\n",
                    serde_json::to_string(&response(&sid, version, g)).unwrap_or_default()
                ),
                Err(e) => format!(
                    "event: error\ndata: {}\n\n",
                    serde_json::to_string(&e.problem()).unwrap_or_default()
                ),
            },
        ));
    }
    let g = finish(rx).await?;
    Ok(HttpResponse::Ok().json(response(&sid, version, g)))
}

fn response(session: &str, version: u64, g: Generation) -> GenerateResponse {
    GenerateResponse {
        session: session.to_string(),
        version,
        usage: Usage {
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.token_ids.len(),
        },
        text: g.text,
        finish_reason: g.finish_reason,
    }
}

#[utoipa::path(post, path = "/v1/sessions/{id}/loglikelihood", tag = "inference", params(("id" = String, Path)),
    request_body = LoglikelihoodRequest,
    responses((status = 200, body = LoglikelihoodResponse), (status = 404, body = Problem), (status = 422, body = Problem),
              (status = 429, body = Problem)))]
async fn loglikelihood(
    state: web::Data<AppState>,
    tenant: Tenant,
    id: web::Path<String>,
    body: Body<LoglikelihoodRequest>,
) -> Result<web::Json<LoglikelihoodResponse>, ApiError> {
    let body = body.0;
    let view = state.sessions.view(&tenant.0, &id, body.version)?;
    let reqs = body.requests;
    let max = state.limits.max_batch_items;
    if reqs.is_empty() || reqs.len() > max {
        return Err(ApiError::field(
            "requests",
            format_args!("must hold 1 to {max} items. Given: {}", reqs.len()),
        ));
    }
    if let Some(i) = reqs.iter().position(|r| r.continuation.is_empty()) {
        return Err(ApiError::field(
            &format!("requests[{i}].continuation"),
            "must not be empty",
        ));
    }
    let pairs = reqs
        .into_iter()
        .map(|r| (r.context, r.continuation))
        .collect();
    let out = state.engine.loglikelihood(view, pairs).await?;
    Ok(web::Json(LoglikelihoodResponse {
        results: out
            .into_iter()
            .map(|l| LoglikelihoodResult {
                logprob: l.logprob,
                is_greedy: l.is_greedy,
            })
            .collect(),
    }))
}
