//! OpenAI-compatible routes, shaped for lm-evaluation-harness's `local-completions` client
//! (STYLE.md §5.4): `echo` + `logprobs` + `max_tokens` 0 or 1 score a prompt, token-id prompts
//! are used as given (no BOS added), `token_logprobs` has `len(prompt) + max_tokens` entries,
//! and `top_logprobs` always holds the argmax from the same log-softmax row. Unknown fields are
//! accepted. `model` selects the model: `session:<id>` for a session, the base model's id
//! (or `base`) for the base model. Tokenizer probes live at the server root.
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::OpenAiError;
use super::inference::{finish, gen_params, render_messages, sse, Message, SamplingFields};
use super::{ApiError, AppState, Body, Code, Tenant};
use crate::engine::model::generate::{FinishReason, Generation};
use crate::engine::model::score::TokenScores;
use crate::engine::worker::{Admission, ModelView};

pub fn routes(cfg: &mut web::ServiceConfig) {
    use super::resource;
    cfg.service(resource("/v1/completions", "POST").route(web::post().to(completions)))
        .service(resource("/v1/chat/completions", "POST").route(web::post().to(chat_completions)))
        .service(resource("/v1/models", "GET").route(web::get().to(models)))
        .service(resource("/tokenizer_info", "GET").route(web::get().to(tokenizer_info)))
        .service(resource("/tokenize", "POST").route(web::post().to(tokenize)))
        .service(resource("/detokenize", "POST").route(web::post().to(detokenize)));
}

/// A prompt as text, texts, token ids, or batches of token ids.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl StopInput {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// `session:<id>`, or the base model's id (see `/v1/models`); `base` also names it.
    #[schema(example = "base")]
    pub model: String,
    pub prompt: PromptInput,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    /// Return the prompt (and its log-probs) before the completion.
    #[serde(default)]
    pub echo: bool,
    /// Return log-probs with this many alternatives per position.
    pub logprobs: Option<usize>,
    /// Only 1 is supported.
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: usize,
    #[serde(default)]
    pub stream: bool,
}

fn default_max_tokens() -> usize {
    16
}
fn one() -> usize {
    1
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// `session:<id>`, or the base model's id; `base` also names it.
    #[schema(example = "base")]
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default = "default_chat_max_tokens")]
    pub max_tokens: usize,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    /// Only 1 is supported.
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: usize,
    #[serde(default)]
    pub stream: bool,
}

fn default_chat_max_tokens() -> usize {
    256
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Logprobs {
    pub tokens: Vec<String>,
    /// `log P(token_j | tokens_<j)`; the first prompt position has none (`null`).
    pub token_logprobs: Vec<Option<f32>>,
    /// The best alternatives at each position (always including the argmax).
    pub top_logprobs: Vec<Option<std::collections::BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: OpenAiUsage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatMessageOut {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub finish_reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: OpenAiUsage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizerInfo {
    pub eos_token: String,
    pub bos_token: Option<String>,
    pub pad_token: Option<String>,
    pub chat_template: Option<String>,
    pub model_max_length: usize,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub prompt: String,
    #[serde(default)]
    pub add_special_tokens: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub tokens: Vec<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// The base model's id in `model` fields: the model file's stem.
pub fn base_model_id(state: &AppState) -> String {
    let name = &state.engine.info().name;
    name.strip_suffix(".gguf").unwrap_or(name).to_string()
}

fn resolve_model(state: &AppState, tenant: &Tenant, model: &str) -> Result<ModelView, ApiError> {
    if let Some(id) = model.strip_prefix("session:") {
        return Ok(state.sessions.view(&tenant.0, id, None)?);
    }
    if model == "base" || model == base_model_id(state) {
        return Ok(ModelView::base());
    }
    Err(ApiError::new(
        Code::NotFound,
        format!(
            "model `{model}` does not exist: use `session:<id>` or `{}`",
            base_model_id(state)
        ),
    ))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn finish_reason(r: FinishReason) -> String {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Cancelled => "cancelled",
    }
    .into()
}

/// Prompts as token ids: token-id prompts exactly as given, text encoded as the model expects.
fn prompt_ids(state: &AppState, p: PromptInput) -> Result<Vec<Vec<u32>>, ApiError> {
    let tok = state.engine.tokenizer();
    let vocab = state.engine.info().spec.vocab_size as u32;
    let out = match p {
        PromptInput::Text(t) => vec![tok.encode(&t)?],
        PromptInput::Texts(v) => v.iter().map(|t| tok.encode(t)).collect::<Result<_, _>>()?,
        PromptInput::Tokens(ids) => vec![ids],
        PromptInput::TokenBatches(b) => b,
    };
    if out.is_empty() || out.len() > state.limits.max_batch_items {
        return Err(ApiError::field(
            "prompt",
            format_args!(
                "must hold 1 to {} prompts. Given: {}",
                state.limits.max_batch_items,
                out.len()
            ),
        ));
    }
    for (i, ids) in out.iter().enumerate() {
        if ids.is_empty() {
            return Err(ApiError::field(
                &format!("prompt[{i}]"),
                "encodes to no tokens",
            ));
        }
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(ApiError::field(
                &format!("prompt[{i}]"),
                format_args!("holds token id {bad}; the vocabulary has {vocab}"),
            ));
        }
    }
    Ok(out)
}

#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest,
    responses((status = 200, description = "JSON, or server-sent events when `stream` is true",
               content((CompletionResponse = "application/json"), (String = "text/event-stream")))))]
async fn completions(
    state: web::Data<AppState>,
    tenant: Tenant,
    body: Body<CompletionRequest>,
) -> Result<HttpResponse, OpenAiError> {
    let req = body.0;
    let view = resolve_model(&state, &tenant, &req.model)?;
    if req.n != 1 {
        return Err(ApiError::field("n", format_args!("must be 1. Given: {}", req.n)).into());
    }
    let prompts = prompt_ids(&state, req.prompt.clone())?;
    let ctx_len = state.engine.info().spec.context_length;
    let stop = req
        .stop
        .clone()
        .map(StopInput::into_vec)
        .unwrap_or_default();
    let temperature = req.temperature.unwrap_or(1.0);
    let scoring = req.echo && req.logprobs.is_some();
    let top_n = req.logprobs.unwrap_or(0).clamp(0, 20);
    let model_name = req.model.clone();
    if req.logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::field("logprobs", "must be at most 20").into());
    }
    let params: Vec<_> = prompts
        .iter()
        .map(|p| {
            gen_params(
                &state.limits,
                ctx_len,
                p.len(),
                SamplingFields {
                    max_tokens: req.max_tokens,
                    min_tokens: if req.echo { 0 } else { 1 },
                    temperature,
                    top_p: req.top_p,
                    top_k: req.top_k,
                    seed: req.seed,
                    stop: &stop,
                },
            )
        })
        .collect::<Result<_, _>>()?;

    if req.stream {
        if prompts.len() != 1 || req.echo || req.logprobs.is_some() {
            return Err(ApiError::field(
                "stream",
                "works with one prompt and without `echo`/`logprobs`",
            )
            .into());
        }
        let rx = state
            .engine
            .generate(view, prompts[0].clone(), params[0].clone())?;
        let id = format!("cmpl-{}", uuid::Uuid::new_v4());
        let (id2, m2) = (id.clone(), model_name.clone());
        return Ok(sse(
            rx,
            move |t| {
                chunk(
                    &id,
                    &model_name,
                    serde_json::json!({"index": 0, "text": t, "logprobs": null, "finish_reason": null}),
                )
            },
            move |r| match r {
                Ok(g) => format!(
                    "{}data: [DONE]\n\n",
                    chunk(
                        &id2,
                        &m2,
                        serde_json::json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason(g.finish_reason)})
                    )
                ),
                Err(e) => format!(
                    "data: {}\n\ndata: [DONE]\n\n",
                    serde_json::json!({"error": {"message": e.detail, "code": e.code.code()}})
                ),
            },
        ));
    }

    // Greedy one-token continuations (lm-eval's scoring requests) need no generation: the
    // argmax after the prompt is read off the same forward pass, scored with a placeholder.
    let greedy_one = params
        .iter()
        .all(|p| p.max_tokens <= 1 && p.sampling.temperature == 0.0)
        && stop.is_empty();
    let mut generated: Vec<Option<Generation>> = vec![None; prompts.len()];
    if !(scoring && greedy_one) {
        let mut pending = Vec::new();
        for (p, gp) in prompts.iter().zip(&params) {
            if gp.max_tokens == 0 {
                pending.push(None);
            } else {
                pending.push(Some(state.engine.generate(
                    view.clone(),
                    p.clone(),
                    gp.clone(),
                )?));
            }
        }
        for (slot, rx) in generated.iter_mut().zip(pending) {
            if let Some(rx) = rx {
                *slot = Some(finish(rx).await?);
            }
        }
    }
    let tok = state.engine.tokenizer();
    let mut choices = Vec::with_capacity(prompts.len());
    let mut completion_tokens = 0;
    let needs_scores = req.logprobs.is_some();
    let scores = if needs_scores {
        let mut seqs = Vec::new();
        let mut from = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let mut s = p.clone();
            match &generated[i] {
                Some(g) => s.extend_from_slice(&g.token_ids),
                // placeholder: the last row's argmax is the greedy next token
                None if params[i].max_tokens == 1 => s.push(0),
                None => {}
            }
            if s.len() < 2 || (!req.echo && s.len() == p.len()) {
                // nothing after the prompt (one-token echo, or generation stopped at once):
                // a placeholder keeps the scored span non-empty; it is never rendered
                s.push(0);
            }
            from.push(if req.echo { 1 } else { p.len() });
            seqs.push(s);
        }
        let admission = Admission::Patient(state.limits.eval_patience);
        Some(
            state
                .engine
                .score(view.clone(), seqs, from, top_n.max(1), admission)
                .await?,
        )
    } else {
        None
    };
    for (i, p) in prompts.iter().enumerate() {
        let gen = generated[i].as_ref();
        let mut ids: Vec<u32> = if req.echo { p.clone() } else { Vec::new() };
        let mut finish_r = gen.map_or(FinishReason::Length, |g| g.finish_reason);
        let mut gen_ids: Vec<u32> = gen.map(|g| g.token_ids.clone()).unwrap_or_default();
        let mut logprobs = None;
        if let Some(sc) = scores.as_ref().map(|s| &s[i]) {
            if gen.is_none() && params[i].max_tokens == 1 {
                // the greedy token is the placeholder row's argmax
                let last = sc.top_ids.len() - 1;
                gen_ids = vec![sc.top_ids[last]];
                finish_r = FinishReason::Length;
            }
            logprobs = Some(render_logprobs(
                tok,
                p,
                &gen_ids,
                sc,
                req.echo,
                top_n.max(1),
            )?);
        }
        ids.extend_from_slice(&gen_ids);
        completion_tokens += gen_ids.len();
        let text = if req.echo {
            tok.decode(&ids, false)?
        } else {
            gen.map(|g| g.text.clone())
                .unwrap_or_else(|| tok.decode(&gen_ids, false).unwrap_or_default())
        };
        choices.push(CompletionChoice {
            index: i,
            text,
            logprobs,
            finish_reason: finish_reason(finish_r),
        });
    }
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    Ok(HttpResponse::Ok().json(CompletionResponse {
        id: format!("cmpl-{}", uuid::Uuid::new_v4()),
        object: "text_completion".into(),
        created: now(),
        model: model_name,
        choices,
        usage: OpenAiUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
    }))
}

fn chunk(id: &str, model: &str, choice: serde_json::Value) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({"id": id, "object": "text_completion", "created": now(), "model": model, "choices": [choice]})
    )
}

/// Log-probs for the echoed prompt (from position 1; position 0 is `null`) and the generated
/// tokens. `sc` scored `prompt ++ generated` from 1 (echo) or from `len(prompt)`.
fn render_logprobs(
    tok: &crate::engine::model::Tok,
    prompt: &[u32],
    gen: &[u32],
    sc: &TokenScores,
    echo: bool,
    top_n: usize,
) -> Result<Logprobs, ApiError> {
    let mut all: Vec<u32> = if echo { prompt.to_vec() } else { Vec::new() };
    all.extend_from_slice(gen);
    let mut out = Logprobs {
        tokens: Vec::new(),
        token_logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        text_offset: Vec::new(),
    };
    let mut offset = 0;
    // scores[k] is the prediction of sequence position `start + k`
    let start = if echo { 1 } else { prompt.len() };
    for (j, &id) in all.iter().enumerate() {
        let piece = tok.decode(&[id], false)?;
        out.tokens.push(piece.clone());
        out.text_offset.push(offset);
        offset += piece.len();
        let pos = if echo { j } else { prompt.len() + j };
        if pos < start {
            out.token_logprobs.push(None);
            out.top_logprobs.push(None);
            continue;
        }
        let k = pos - start;
        // a generated greedy token read off a placeholder row: its log-prob is the row's max
        let lp = if sc.top_ids[k] == id {
            sc.top_logprobs[k]
        } else {
            sc.logprobs[k]
        };
        out.token_logprobs.push(Some(lp));
        let mut top = std::collections::BTreeMap::new();
        for &(alt, alp) in sc.alternatives[k].iter().take(top_n) {
            top.entry(tok.decode(&[alt], false)?).or_insert(alp);
        }
        // the argmax, exactly as in `token_logprobs` when the token is greedy
        let best = tok.decode(&[sc.top_ids[k]], false)?;
        top.insert(best, sc.top_logprobs[k]);
        out.top_logprobs.push(Some(top));
    }
    Ok(out)
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatCompletionRequest,
    responses((status = 200, description = "JSON, or server-sent events when `stream` is true",
               content((ChatCompletionResponse = "application/json"), (String = "text/event-stream")))))]
async fn chat_completions(
    state: web::Data<AppState>,
    tenant: Tenant,
    body: Body<ChatCompletionRequest>,
) -> Result<HttpResponse, OpenAiError> {
    let req = body.0;
    let view = resolve_model(&state, &tenant, &req.model)?;
    if req.n != 1 {
        return Err(ApiError::field("n", format_args!("must be 1. Given: {}", req.n)).into());
    }
    let text = render_messages(&state, &req.messages)?;
    let ids = state.engine.tokenizer().encode(&text)?;
    let stop = req
        .stop
        .clone()
        .map(StopInput::into_vec)
        .unwrap_or_default();
    let params = gen_params(
        &state.limits,
        state.engine.info().spec.context_length,
        ids.len(),
        SamplingFields {
            max_tokens: req.max_completion_tokens.unwrap_or(req.max_tokens),
            min_tokens: 1,
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            stop: &stop,
        },
    )?;
    let prompt_tokens = ids.len();
    let rx = state.engine.generate(view, ids, params)?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4());
    let model = req.model.clone();
    if req.stream {
        let (id2, m2) = (id.clone(), model.clone());
        let delta = move |c: serde_json::Value, fin: serde_json::Value| {
            serde_json::json!({"id": id2, "object": "chat.completion.chunk", "created": now(), "model": m2,
                               "choices": [{"index": 0, "delta": c, "finish_reason": fin}]})
        };
        let d2 = delta.clone();
        return Ok(sse(
            rx,
            move |t| {
                format!(
                    "data: {}\n\n",
                    delta(
                        serde_json::json!({"role": "assistant", "content": t}),
                        serde_json::Value::Null
                    )
                )
            },
            move |r| match r {
                Ok(g) => format!(
                    "data: {}\n\ndata: [DONE]\n\n",
                    d2(serde_json::json!({}), finish_reason(g.finish_reason).into())
                ),
                Err(e) => format!(
                    "data: {}\n\ndata: [DONE]\n\n",
                    serde_json::json!({"error": {"message": e.detail, "code": e.code.code()}})
                ),
            },
        ));
    }
    let g = finish(rx).await?;
    let completion_tokens = g.token_ids.len();
    Ok(HttpResponse::Ok().json(ChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created: now(),
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessageOut {
                role: "assistant".into(),
                content: g.text,
            },
            finish_reason: finish_reason(g.finish_reason),
        }],
        usage: OpenAiUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
    }))
}

#[utoipa::path(get, path = "/v1/models", tag = "openai", responses((status = 200, body = ModelList)))]
async fn models(state: web::Data<AppState>, tenant: Tenant) -> web::Json<ModelList> {
    let mut data = vec![ModelCard {
        id: base_model_id(&state),
        object: "model".into(),
        created: 0,
        owned_by: "emend".into(),
    }];
    for s in state.sessions.list(&tenant.0) {
        let created = chrono::DateTime::parse_from_rfc3339(&s.created_at)
            .map(|d| d.timestamp())
            .unwrap_or(0);
        data.push(ModelCard {
            id: format!("session:{}", s.id),
            object: "model".into(),
            created,
            owned_by: s.owner,
        });
    }
    web::Json(ModelList {
        object: "list".into(),
        data,
    })
}

#[utoipa::path(get, path = "/tokenizer_info", tag = "tokenizer", responses((status = 200, body = TokenizerInfo)))]
async fn tokenizer_info(state: web::Data<AppState>) -> web::Json<TokenizerInfo> {
    let t = state.engine.tokenizer();
    web::Json(TokenizerInfo {
        eos_token: t.eos_token.clone(),
        bos_token: t.bos_token.clone(),
        pad_token: t.pad_token.clone(),
        chat_template: t.chat_template.clone(),
        model_max_length: state.engine.info().spec.context_length,
    })
}

#[utoipa::path(post, path = "/tokenize", tag = "tokenizer", request_body = TokenizeRequest, responses((status = 200, body = TokenizeResponse)))]
async fn tokenize(
    state: web::Data<AppState>,
    body: Body<TokenizeRequest>,
) -> Result<web::Json<TokenizeResponse>, OpenAiError> {
    let t = state.engine.tokenizer();
    let tokens = if body.0.add_special_tokens {
        t.encode(&body.0.prompt)?
    } else {
        t.encode_plain(&body.0.prompt)?
    };
    Ok(web::Json(TokenizeResponse { tokens }))
}

#[utoipa::path(post, path = "/detokenize", tag = "tokenizer", request_body = DetokenizeRequest, responses((status = 200, body = DetokenizeResponse)))]
async fn detokenize(
    state: web::Data<AppState>,
    body: Body<DetokenizeRequest>,
) -> Result<web::Json<DetokenizeResponse>, OpenAiError> {
    let vocab = state.engine.info().spec.vocab_size as u32;
    if let Some(bad) = body.0.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::field(
            "tokens",
            format_args!("holds token id {bad}; the vocabulary has {vocab}"),
        )
        .into());
    }
    Ok(web::Json(DetokenizeResponse {
        prompt: state.engine.tokenizer().decode(&body.0.tokens, false)?,
    }))
}
