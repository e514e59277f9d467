//! The OpenAPI document (`emend openapi`, `/openapi.json`, `openapi/openapi.json`).
use utoipa::OpenApi;

use super::error::Problem;
use super::inference::{
    GenerateRequest, GenerateResponse, LoglikelihoodItem, LoglikelihoodRequest,
    LoglikelihoodResponse, LoglikelihoodResult, Message, Usage,
};
use super::openai::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessageOut, CompletionChoice,
    CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, Logprobs,
    ModelCard, ModelList, OpenAiUsage, PromptInput, StopInput, TokenizeRequest, TokenizeResponse,
    TokenizerInfo,
};
use super::sessions::{CreateSession, ForkFrom, ParentDto, SessionDto, SessionList};
use super::system::{Health, ModelDto};

#[derive(OpenApi)]
#[openapi(
    info(title = "emend", description = "Serve a language model, edit the knowledge inside it, and measure what the edits cost. \
        Errors are RFC 7807 problem details (`application/problem+json`) on emend's own routes and OpenAI's `{error}` envelope \
        on the OpenAI-compatible ones. With API keys configured, send `Authorization: Bearer <key>`."),
    paths(
        super::system::healthz, super::system::readyz, super::system::metrics, super::system::model, super::system::problem_type,
        super::sessions::create, super::sessions::list, super::sessions::get, super::sessions::delete,
        super::inference::generate, super::inference::loglikelihood,
        super::openai::completions, super::openai::chat_completions, super::openai::models,
        super::openai::tokenizer_info, super::openai::tokenize, super::openai::detokenize,
    ),
    components(schemas(
        Problem, Health, ModelDto, CreateSession, ForkFrom, SessionDto, ParentDto, SessionList,
        GenerateRequest, GenerateResponse, Message, Usage, LoglikelihoodItem, LoglikelihoodRequest, LoglikelihoodResult, LoglikelihoodResponse,
        CompletionRequest, CompletionResponse, CompletionChoice, Logprobs, OpenAiUsage, PromptInput, StopInput,
        ChatCompletionRequest, ChatCompletionResponse, ChatChoice, ChatMessageOut, ModelList, ModelCard,
        TokenizerInfo, TokenizeRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "A session is the base model plus an ordered edit log"),
        (name = "inference", description = "Generation and scoring against a session"),
        (name = "openai", description = "OpenAI-compatible routes (lm-evaluation-harness `local-completions`)"),
        (name = "tokenizer", description = "Tokenizer probes used by lm-evaluation-harness"),
        (name = "system", description = "Health, readiness, metrics, model"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The spec as pretty JSON with a trailing newline (what `openapi/openapi.json` holds).
pub fn json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    s.push('\n');
    s
}
