//! RFC 7807 problem details. Every error kind has a stable code, status and title in one table;
//! the `type` URI is `/problems/<code>`, served by the API itself.
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::editing::EditError;
use crate::engine::model::ModelError;
use crate::engine::training::TrainingError;
use crate::engine::worker::EngineError;
use crate::jobs::JobError;
use crate::sessions::SessionError;
use crate::store::StoreError;

macro_rules! codes {
    ($($variant:ident, $code:literal, $status:ident, $title:literal;)*) => {
        /// Stable error kinds.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Code { $($variant,)* }
        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];
            pub fn code(self) -> &'static str { match self { $(Code::$variant => $code,)* } }
            pub fn status(self) -> StatusCode { match self { $(Code::$variant => StatusCode::$status,)* } }
            pub fn title(self) -> &'static str { match self { $(Code::$variant => $title,)* } }
        }
    };
}

codes! {
    MalformedRequest, "malformed_request", BAD_REQUEST, "The request body is not valid JSON of the expected shape";
    InvalidField, "invalid_field", UNPROCESSABLE_ENTITY, "A field is missing, out of range or inconsistent";
    ContextOverflow, "context_overflow", UNPROCESSABLE_ENTITY, "The input does not fit the model's context";
    Unauthorized, "unauthorized", UNAUTHORIZED, "A valid API key is required";
    NotFound, "not_found", NOT_FOUND, "No such resource";
    MethodNotAllowed, "method_not_allowed", METHOD_NOT_ALLOWED, "The path does not accept this method";
    Conflict, "conflict", CONFLICT, "The resource is not in a state that allows this";
    PayloadTooLarge, "payload_too_large", PAYLOAD_TOO_LARGE, "The request body exceeds the size limit";
    Overloaded, "overloaded", TOO_MANY_REQUESTS, "The server is at capacity; retry later";
    Unavailable, "unavailable", SERVICE_UNAVAILABLE, "The service is not ready or is shutting down";
    Internal, "internal", INTERNAL_SERVER_ERROR, "Internal error";
}

/// `application/problem+json` body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `/problems/<code>`.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// An edit refused by the damage guard: the canary reading of the version it would have
    /// made, with the drift measured and the budget limits broken.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::canary::Reading>)]
    pub canary: Option<serde_json::Value>,
}

#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub detail: String,
    pub retry_after: Option<u64>,
    /// The `canary` extension member of the problem body.
    pub canary: Option<Box<serde_json::Value>>,
}

impl ApiError {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            retry_after: None,
            canary: None,
        }
    }
    /// A field violation; the detail names the field in backticks.
    pub fn field(field: &str, msg: impl std::fmt::Display) -> Self {
        Self::new(Code::InvalidField, format!("`{field}` {msg}"))
    }
    pub fn problem(&self) -> Problem {
        let ctx = super::request_ctx();
        Problem {
            type_: format!("/problems/{}", self.code.code()),
            title: self.code.title().into(),
            status: self.code.status().as_u16(),
            detail: self.detail.clone(),
            instance: ctx.as_ref().map(|c| c.path.clone()),
            code: self.code.code().into(),
            request_id: ctx.map(|c| c.id),
            canary: self.canary.as_deref().cloned(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.code(), self.detail)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }
    fn error_response(&self) -> HttpResponse {
        let mut b = HttpResponse::build(self.status_code());
        b.content_type("application/problem+json");
        if let Some(s) = self.retry_after {
            b.insert_header(("Retry-After", s.to_string()));
        }
        b.json(self.problem())
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::NotFound(_) => Self::new(Code::NotFound, e.to_string()),
            SessionError::VersionNotFound { field, .. } => Self::field(field, e.to_string()),
            SessionError::Busy { .. } => Self {
                code: Code::Overloaded,
                detail: e.to_string(),
                retry_after: Some(1),
                canary: None,
            },
            SessionError::Engine(e) => e.into(),
            SessionError::Store(StoreError::SessionGone(_)) => {
                Self::new(Code::NotFound, e.to_string())
            }
            SessionError::Delta { .. } | SessionError::Corrupt { .. } => {
                tracing::error!(error = %e, "session delta error");
                Self::new(Code::Internal, "the session's edit could not be stored")
            }
            SessionError::OverBudget { ref reading, .. } => Self {
                canary: serde_json::to_value(reading).ok().map(Box::new),
                ..Self::new(Code::Conflict, e.to_string())
            },
            SessionError::NoCanary => Self::field("canary.mode", e.to_string()),
            SessionError::Canary(c) => {
                tracing::error!(error = %c, "canary probes failed");
                Self {
                    code: Code::Unavailable,
                    detail: format!("the edit is not applied: {c}"),
                    retry_after: Some(5),
                    canary: None,
                }
            }
            SessionError::Store(s) => {
                tracing::error!(error = %s, "store error");
                Self {
                    code: Code::Unavailable,
                    detail: "the session store is unavailable".into(),
                    retry_after: Some(5),
                    canary: None,
                }
            }
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid { field, message } => Self::field(&field, message),
            JobError::NotFound(_) => Self::new(Code::NotFound, e.to_string()),
            JobError::Finished { .. } => Self::new(Code::Conflict, e.to_string()),
            JobError::Full(_) => Self {
                code: Code::Overloaded,
                detail: e.to_string(),
                retry_after: Some(30),
                canary: None,
            },
            JobError::NoData => Self::field(
                "tasks",
                "cannot be evaluated: the server has no dataset directory (configure `data_dir`)",
            ),
            JobError::Session(s) => s.into(),
            JobError::Store(s) => SessionError::Store(s).into(),
            JobError::Corrupt { .. } => {
                tracing::error!(error = %e, "stored job unreadable");
                Self::new(Code::Internal, "the stored job is unreadable")
            }
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::ContextOverflow { .. } => Self::new(Code::ContextOverflow, e.to_string()),
            ModelError::InvalidInput(m) => Self::new(Code::InvalidField, m),
            ModelError::Tokenizer(m) => Self::new(Code::InvalidField, m),
            other => {
                tracing::error!(error = %other, "model error");
                Self::new(Code::Internal, "the model failed on this request")
            }
        }
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> Self {
        match e {
            EditError::Invalid { field, message } => Self::field(&field, message),
            EditError::Model(m) => m.into(),
            EditError::Stats(m) => {
                tracing::error!(error = %m, "editing statistics failed");
                Self::new(Code::Internal, format!("statistics: {m}"))
            }
            EditError::Editor(t) => t.into(),
        }
    }
}

impl From<TrainingError> for ApiError {
    fn from(e: TrainingError) -> Self {
        match e {
            TrainingError::NoArtefact { .. } => Self::new(Code::Conflict, e.to_string()),
            TrainingError::UnknownArtefact(_) | TrainingError::Mismatch(_) => {
                Self::field("hparams.artefact", e.to_string())
            }
            TrainingError::Field(field, message) => Self::field(&field, message),
            TrainingError::Data(m) | TrainingError::Invalid(m) => Self::new(Code::InvalidField, m),
            TrainingError::Model(m) => m.into(),
            other => {
                tracing::error!(error = %other, "trained editor failed");
                Self::new(Code::Internal, other.to_string())
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded { .. } => Self {
                code: Code::Overloaded,
                detail: e.to_string(),
                retry_after: Some(1),
                canary: None,
            },
            EngineError::ShuttingDown => Self {
                code: Code::Unavailable,
                detail: e.to_string(),
                retry_after: Some(5),
                canary: None,
            },
            EngineError::Dropped => Self::new(Code::Internal, e.to_string()),
            EngineError::Model(m) => m.into(),
            EngineError::Edit(e) => e.into(),
            EngineError::Panicked(_) | EngineError::Failed(_) => {
                tracing::error!(error = %e, "engine failure");
                Self::new(Code::Internal, "the engine failed on this request")
            }
        }
    }
}

/// The same errors in OpenAI's envelope, for `/v1/completions` and friends.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl std::fmt::Display for OpenAiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ResponseError for OpenAiError {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }
    fn error_response(&self) -> HttpResponse {
        let kind = match self.0.code {
            Code::InvalidField
            | Code::MalformedRequest
            | Code::ContextOverflow
            | Code::PayloadTooLarge => "invalid_request_error",
            Code::Unauthorized => "authentication_error",
            Code::NotFound => "not_found_error",
            Code::MethodNotAllowed | Code::Conflict => "invalid_request_error",
            Code::Overloaded => "rate_limit_error",
            Code::Unavailable | Code::Internal => "server_error",
        };
        let mut b = HttpResponse::build(self.status_code());
        if let Some(s) = self.0.retry_after {
            b.insert_header(("Retry-After", s.to_string()));
        }
        b.json(serde_json::json!({"error": {"message": self.0.detail, "type": kind, "code": self.0.code.code()}}))
    }
}
