//! The HTTP API: one router per resource, shared state, errors as RFC 9457
//! problem documents, request ids, HTTP metrics, and the OpenAPI document
//! generated from the handlers (`openapi.yaml` is checked against it).

mod comparisons;
pub mod error;
mod events;
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
use sha2::{Digest, Sha256};
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

/// What every handler can reach: one [`AppContext`], shared (every layer
/// and handler takes its own handle, so a clone must cost one count).
#[derive(Clone)]
pub struct AppState(Arc<AppContext>);

impl AppState {
    pub fn new(context: AppContext) -> Self {
        AppState(Arc::new(context))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppContext;
    fn deref(&self) -> &AppContext {
        &self.0
    }
}

/// The server's parts and settings, behind [`AppState`].
pub struct AppContext {
    pub store: Store,
    pub scheduler: Arc<Scheduler>,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub max_body_bytes: usize,
    pub max_queued: Option<u64>,
    pub idempotency_ttl: std::time::Duration,
    /// SHA-256 digests of the API keys; empty: no key needed.
    pub api_keys: Arc<Vec<[u8; 32]>>,
    pub webhooks: crate::webhooks::WebhookConfig,
    /// Turns true when the server starts shutting down: long-polls and event streams answer and end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Digests API keys for [`AppState::api_keys`].
pub fn digest_keys(keys: &[String]) -> Vec<[u8; 32]> {
    keys.iter().filter(|k| !k.is_empty()).map(|k| Sha256::digest(k.as_bytes()).into()).collect()
}

/// Requires `Authorization: Bearer KEY` on `/v1` when keys are configured.
/// Digests are compared in constant time, over every key.
async fn require_key(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if app.api_keys.is_empty() || !request.uri().path().starts_with("/v1") {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|key| -> [u8; 32] { Sha256::digest(key.trim().as_bytes()).into() });
    let allowed = presented.is_some_and(|digest| {
        app.api_keys.iter().fold(false, |found, key| {
            let diff = key.iter().zip(digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found | (diff == 0)
        })
    });
    match allowed {
        true => next.run(request).await,
        false => ApiError::Unauthorized.into_response(),
    }
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(jobs::router())
        .merge(comparisons::router())
        .merge(health::router())
        .fallback(|| async { ApiError::NotFound("no such resource".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .route_layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
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
        jobs::cancel_job,
        results::get_result,
        events::job_events,
        comparisons::create_comparison,
        comparisons::get_comparison,
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
        crate::domain::AttemptError,
        crate::domain::Callback,
        crate::domain::DeliveryAttempt,
        comparisons::ComparisonRequestDoc,
        comparisons::Comparison,
        jobs::JobList,
        results::ResultPage,
        health::Health,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "jobs", description = "Submit jobs, follow them, fetch their squares"),
        (name = "comparisons", description = "Run the same numbers every way and compare the wall times"),
        (name = "service", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// Declares the optional bearer-token scheme of `/v1` (`--api-key`).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Required on /v1 when the server runs with --api-key"))
                    .build(),
            ),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1") {
                continue;
            }
            for op in [&mut item.get, &mut item.post, &mut item.delete].into_iter().flatten() {
                op.security = Some(vec![SecurityRequirement::new("api_key", Vec::<String>::new())]);
            }
        }
    }
}

/// The OpenAPI document as YAML (what `openapi.yaml` must contain).
pub fn openapi_yaml() -> String {
    ApiDoc::openapi().to_yaml().expect("the OpenAPI document serialises")
}
