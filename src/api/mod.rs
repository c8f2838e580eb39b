//! The HTTP API: one router per resource, shared state, errors as RFC 9457
//! problem documents, request ids, HTTP metrics, and the OpenAPI document
//! generated from the handlers (`openapi.yaml` is checked against it).

pub mod error;
mod health;
mod jobs;
mod results;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

pub use error::ApiError;

use crate::domain::Limits;
use crate::events::Events;
use crate::metrics::{Metrics, RouteLabel, RouteStatusLabels};
use crate::scheduler::Scheduler;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub scheduler: Arc<Scheduler>,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub max_body_bytes: usize,
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(jobs::router())
        .merge(health::router())
        .fallback(|| async { ApiError::NotFound("no such resource".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .route_layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let id = req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!("http", method = %req.method(), uri = %req.uri(), request_id = %id)
                }))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
                .layer(CatchPanicLayer::custom(|_| ApiError::Internal("a handler panicked".into()).into_response())),
        )
        .with_state(state)
}

/// Counts and times each request by its route template.
async fn track(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    app.metrics.http_requests.get_or_create(&RouteStatusLabels { route: route.clone(), status }).inc();
    app.metrics.http_seconds.get_or_create(&RouteLabel { route }).observe(started.elapsed().as_secs_f64());
    response
}

/// Query parameters as pairs (400 when the query string cannot be decoded).
fn query_pairs(query: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_parameter("(query)", format!("cannot be decoded: {e}")))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "squared",
        description = "Square numbers sequentially, on threads or on worker processes, and measure which wins. \
                       Errors are RFC 9457 problem documents (application/problem+json)."
    ),
    paths(
        jobs::submit_job,
        jobs::list_jobs,
        jobs::get_job,
        jobs::delete_job,
        results::get_result,
        health::healthz,
        health::readyz,
        health::metrics,
        health::openapi,
    ),
    components(schemas(
        crate::domain::JobRequestDoc,
        crate::domain::RangeDoc,
        crate::domain::JobDocument,
        crate::domain::Problem,
        crate::domain::FieldError,
        jobs::JobList,
        results::ResultPage,
        health::Health,
    )),
    tags(
        (name = "jobs", description = "Submit jobs, follow them, fetch their squares"),
        (name = "service", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document as YAML (what `openapi.yaml` must contain).
pub fn openapi_yaml() -> String {
    ApiDoc::openapi().to_yaml().expect("the OpenAPI document serialises")
}
