//! The OpenAPI document (`emend openapi`, `/openapi.json`, `openapi/openapi.json`).
use utoipa::OpenApi;

use super::edits::{
    ApplyEdits, ApplyEditsResponse, DatasetRecord, EditHistory, EditItem, HistoryEntry, MethodDto,
    MethodList, MethodName, RollbackRequest, VersionDto,
};
use super::error::Problem;
use super::evaluations::JobList;
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
use super::sweeps::SweepList;
use super::system::{Health, ModelDto};
use super::trainings::{ArtefactList, TrainingList};
use crate::canary::{BaseReading, Breach, Budget, CanaryMode, CanarySettings, Drift, Reading};
use crate::engine::editing::datasets::EditDataset;
use crate::engine::editing::{EditMetrics, EditReport, EditRequest, PromptAnswer, PromptScore};
use crate::engine::training::{Provenance, TrainConfig, TrainingData, Validation};
use crate::jobs::{
    CurveRow, FinishedTask, Job, JobProgress, JobStatus, NewEvaluation, NewSweep, Sweep, Training,
};
use crate::sessions::{DamageCurve, DamagePoint};

#[derive(OpenApi)]
#[openapi(
    info(title = "emend", description = "Serve a language model, edit the knowledge inside it, and measure what the edits cost. \
        Errors are RFC 7807 problem details (`application/problem+json`) on emend's own routes and OpenAI's `{error}` envelope \
        on the OpenAI-compatible ones. With API keys configured, send `Authorization: Bearer <key>`."),
    paths(
        super::system::healthz, super::system::readyz, super::system::metrics, super::system::model, super::system::problem_type,
        super::sessions::create, super::sessions::list, super::sessions::get, super::sessions::delete,
        super::sessions::get_canary, super::sessions::put_canary, super::damage::damage,
        super::edits::apply, super::edits::history, super::edits::version, super::edits::rollback, super::edits::methods,
        super::evaluations::create, super::evaluations::list, super::evaluations::get, super::evaluations::cancel,
        super::sweeps::create, super::sweeps::list, super::sweeps::get, super::sweeps::cancel, super::sweeps::curve,
        super::sweeps::results_csv, super::sweeps::chart_svg, super::sweeps::chart_png,
        super::trainings::create, super::trainings::list, super::trainings::get, super::trainings::cancel,
        super::trainings::artefacts, super::trainings::artefact,
        super::inference::generate, super::inference::loglikelihood,
        super::openai::completions, super::openai::chat_completions, super::openai::models,
        super::openai::tokenizer_info, super::openai::tokenize, super::openai::detokenize,
    ),
    components(schemas(
        Problem, Health, ModelDto, CreateSession, ForkFrom, SessionDto, ParentDto, SessionList,
        CanarySettings, CanaryMode, Budget, Reading, Drift, Breach, BaseReading, DamageCurve, DamagePoint,
        ApplyEdits, ApplyEditsResponse, EditItem, DatasetRecord, EditDataset, MethodName, VersionDto, HistoryEntry, EditHistory,
        RollbackRequest, MethodDto, MethodList, EditRequest, PromptAnswer, EditReport, EditMetrics, PromptScore,
        NewEvaluation, Job, JobStatus, JobProgress, FinishedTask, JobList, NewSweep, Sweep, CurveRow, SweepList,
        TrainConfig, TrainingData, Validation, Training, TrainingList, Provenance, ArtefactList,
        GenerateRequest, GenerateResponse, Message, Usage, LoglikelihoodItem, LoglikelihoodRequest, LoglikelihoodResult, LoglikelihoodResponse,
        CompletionRequest, CompletionResponse, CompletionChoice, Logprobs, OpenAiUsage, PromptInput, StopInput,
        ChatCompletionRequest, ChatCompletionResponse, ChatChoice, ChatMessageOut, ModelList, ModelCard,
        TokenizerInfo, TokenizeRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse,
        OpenAiErrorBody, OpenAiErrorDetail,
    )),
    modifiers(&BearerAuth, &CommonResponses),
    tags(
        (name = "sessions", description = "A session is the base model plus an ordered edit log; its canary setting runs probes after each edit and guards a damage budget"),
        (name = "edits", description = "Knowledge edits as session versions: apply, history, rollback, methods"),
        (name = "evaluations", description = "Benchmark jobs on a session version: queued one at a time, resumable, cancellable"),
        (name = "sweeps", description = "The paper's protocol: edits one by one on a fresh session, benchmarks at checkpoints, curves"),
        (name = "trainings", description = "Trained editors (MEND): training jobs against the resident model, resumable and cancellable, and their artefacts"),
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

/// OpenAI's error envelope, used on the OpenAI-compatible routes.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documents the JSON built in `error.rs`
pub struct OpenAiErrorBody {
    error: OpenAiErrorDetail,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct OpenAiErrorDetail {
    message: String,
    #[schema(rename = "type")]
    kind: String,
    code: String,
}

/// Every operation documents the error statuses any request can meet (malformed body, auth,
/// size, validation, overload, outage) with the body each route family sends, and problem
/// bodies carry `application/problem+json`.
struct CommonResponses;

pub(crate) const OPENAI_PATHS: [&str; 6] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenizer_info",
    "/tokenize",
    "/detokenize",
];

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        for (path, item) in openapi.paths.paths.iter_mut() {
            let openai = OPENAI_PATHS.contains(&path.as_str());
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                for resp in op.responses.responses.values_mut() {
                    if let RefOr::T(r) = resp {
                        let problem = r.content.get("application/json").and_then(|c| c.schema.as_ref()).is_some_and(
                            |s| matches!(s, RefOr::Ref(r) if r.ref_location.ends_with("/Problem")),
                        );
                        if problem {
                            let c = r
                                .content
                                .shift_remove("application/json")
                                .expect("checked above");
                            r.content.insert("application/problem+json".into(), c);
                        }
                    }
                }
                for (code, what) in [
                    ("400", "Malformed JSON"),
                    ("401", "Missing or unknown API key"),
                    ("404", "No such resource"),
                    ("405", "Method not allowed"),
                    ("413", "Body too large"),
                    ("422", "Invalid field"),
                    ("429", "Overloaded; see Retry-After"),
                    ("500", "Internal error"),
                    ("503", "Not ready or shutting down"),
                ] {
                    // 405 comes from the router, before any route family: always a problem body.
                    let (ctype, schema) = if openai && code != "405" {
                        ("application/json", "OpenAiErrorBody")
                    } else {
                        ("application/problem+json", "Problem")
                    };
                    op.responses
                        .responses
                        .entry(code.into())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .description(what)
                                    .content(
                                        ctype,
                                        ContentBuilder::new()
                                            .schema(Some(Ref::from_schema_name(schema)))
                                            .build(),
                                    )
                                    .build(),
                            )
                        });
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Generators and validators reject a spec with repeated operation ids; utoipa
    /// defaults them to the handler's function name, which repeats across modules.
    #[test]
    fn operation_ids_are_unique() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let mut seen = std::collections::BTreeMap::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if let Some(id) = op.get("operationId").and_then(|v| v.as_str()) {
                    if let Some(prev) = seen.insert(id.to_string(), format!("{method} {path}")) {
                        panic!("operationId {id:?} used by {prev} and {method} {path}");
                    }
                }
            }
        }
        assert!(seen.len() > 20, "only {} operations", seen.len());
    }
}
