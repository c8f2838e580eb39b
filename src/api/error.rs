//! One error type for every handler, answered as an RFC 9457 problem document.
//! 5xx details are logged, never sent to clients.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::domain::{FieldError, Problem, SpecError};
use crate::store::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";
/// What a full queue asks clients to wait, in seconds.
const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 422: the request is JSON but not a valid job; every bad field listed.
    #[error("invalid request")]
    Validation { errors: Vec<FieldError>, more: usize },
    /// 400: the body is not JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// 400: a bad path or query parameter.
    #[error("bad parameter {field}: {message}")]
    BadParameter { field: String, message: String },
    /// 413: the body, or the number count, is over a server limit.
    #[error("too large: {0:?}")]
    TooLarge(FieldError),
    /// 415: the body is not declared as JSON.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 404.
    #[error("not found: {0}")]
    NotFound(String),
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the job is not in a state that allows this.
    #[error("conflict: {detail}")]
    Conflict { kind: &'static str, title: &'static str, detail: String },
    /// 429: `--max-queued` jobs are waiting.
    #[error("queue full")]
    QueueFull { max: u64 },
    /// 401: an API key is required and none (or a wrong one) was given.
    #[error("unauthorized")]
    Unauthorized,
    /// 503: the database is unreachable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// 500: logged with its cause, answered without it.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e.is_transient() {
            true => ApiError::Unavailable(e.to_string()),
            false => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        match e {
            SpecError::Malformed(m) => ApiError::MalformedJson(m),
            SpecError::TooLarge(f) => ApiError::TooLarge(f),
            SpecError::Invalid { errors, more } => ApiError::Validation { errors, more },
        }
    }
}

impl ApiError {
    pub fn bad_parameter(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::BadParameter { field: field.into(), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MalformedJson(_) | ApiError::BadParameter { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document clients see.
    pub fn problem(&self) -> Problem {
        let status = self.status().as_u16();
        let (kind, title, detail, errors): (&str, &str, String, Vec<FieldError>) = match self {
            ApiError::Validation { errors, more } => {
                let mut detail =
                    errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
                if *more > 0 {
                    detail.push_str(&format!("; and {more} more"));
                }
                ("/problems/validation", "Invalid job request", detail, errors.clone())
            }
            ApiError::MalformedJson(m) => (
                "/problems/malformed-json",
                "The body is not valid JSON",
                m.clone(),
                vec![FieldError { field: "(body)".into(), message: m.clone() }],
            ),
            ApiError::BadParameter { field, message } => (
                "/problems/bad-parameter",
                "Invalid parameter",
                format!("{field}: {message}"),
                vec![FieldError { field: field.clone(), message: message.clone() }],
            ),
            ApiError::TooLarge(f) => {
                ("/problems/too-large", "Request too large", format!("{}: {}", f.field, f.message), vec![f.clone()])
            }
            ApiError::UnsupportedMediaType => (
                "/problems/unsupported-media-type",
                "Unsupported media type",
                "send the job as Content-Type: application/json".into(),
                vec![],
            ),
            ApiError::NotFound(what) => ("/problems/not-found", "Not found", what.clone(), vec![]),
            ApiError::MethodNotAllowed => (
                "/problems/method-not-allowed",
                "Method not allowed",
                "this resource does not answer that method".into(),
                vec![],
            ),
            ApiError::Conflict { kind, title, detail } => (kind, title, detail.clone(), vec![]),
            ApiError::QueueFull { max } => (
                "/problems/queue-full",
                "Too many queued jobs",
                format!("{max} jobs are already queued (this server's --max-queued); retry later"),
                vec![],
            ),
            ApiError::Unauthorized => (
                "/problems/unauthorized",
                "Unauthorized",
                "send a valid API key as Authorization: Bearer KEY".into(),
                vec![],
            ),
            ApiError::Unavailable(_) => (
                "/problems/unavailable",
                "Service unavailable",
                "the database is unreachable; try again shortly".into(),
                vec![],
            ),
            ApiError::Internal(_) => (
                "/problems/internal",
                "Internal server error",
                "an internal error occurred; see the server log".into(),
                vec![],
            ),
        };
        Problem { kind: kind.into(), title: title.into(), status, detail: Some(detail), errors }
    }
}

/// A problem document as an HTTP response.
pub fn problem_response(status: StatusCode, problem: &Problem) -> Response {
    let body = serde_json::to_vec(problem).expect("problems serialise");
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = problem_response(status, &self.problem());
        match self {
            ApiError::QueueFull { .. } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
            }
            ApiError::Unauthorized => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}
