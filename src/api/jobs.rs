//! `/v1/jobs`: submit, read (with long-poll), list and delete jobs.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::Instrument;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::ApiError;
use super::{query_pairs, AppState};
use crate::domain::{now_micros, rfc3339, JobDocument, JobLinks, JobSpec, JobStatus, Problem, Progress};
use crate::metrics::Metrics;
use crate::scheduler::{canceled_problem, Abort};
use crate::store::{Canceled, Deleted, IdempotencyKey, Inserted, ListQuery, NewJob};

/// Bodies above this are parsed on a blocking thread, not the async runtime.
const INLINE_PARSE_BYTES: usize = 64 * 1024;
/// The longest long-poll, in seconds.
const MAX_WAIT_SECONDS: f64 = 60.0;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", get(list_jobs).post(submit_job))
        .route("/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route("/v1/jobs/{id}/result", get(super::results::get_result))
        .route("/v1/jobs/{id}/events", get(super::events::job_events))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
}

/// Parses a job id from the path (400 when it is not a UUID).
pub fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::bad_parameter("id", format!("{raw:?} is not a job id (a UUID)")))
}

pub fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no job {id}"))
}

/// Reads a request body within `--max-body-bytes` (413 beyond it).
pub(super) async fn read_body(app: &AppState, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::TooLarge(crate::domain::FieldError {
            field: "(body)".into(),
            message: format!("the body is over this server's limit of {} bytes", app.max_body_bytes),
        })
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > app.max_body_bytes) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, app.max_body_bytes).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::MalformedJson(format!("could not read the body: {e}"))),
    }
}

/// Whether a Content-Type header declares JSON.
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Checks what needs the server's settings: the callback URL's destination.
pub(super) fn check_callback(spec: &JobSpec, app: &AppState) -> Result<(), ApiError> {
    let Some(url) = &spec.callback_url else { return Ok(()) };
    app.webhooks.check_at_submit(url).map_err(|message| ApiError::Validation {
        errors: vec![crate::domain::FieldError { field: "callback_url".into(), message }],
        more: 0,
    })
}

/// Submit a job.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body(content = crate::domain::JobRequestDoc, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted and durably stored", body = JobDocument,
         headers(("Location" = String, description = "/v1/jobs/{id}"))),
        (status = 200, description = "The job this Idempotency-Key already created (same body)", body = JobDocument),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or number count over a server limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency-Key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid: `errors` names every bad field", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The queue is full (`--max-queued`); retry after `Retry-After` seconds", body = Problem, content_type = "application/problem+json",
         headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ),
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and body: the original job (200), not a second one"))
)]
pub async fn submit_job(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    if !is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = read_body(&app, &headers, body).await?;
    let idempotency = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| ApiError::bad_parameter("Idempotency-Key", "must be 1 to 255 visible ASCII characters"))?
                .to_string(),
        ),
    };
    let body_hash = match idempotency {
        Some(_) => hex(&Sha256::digest(&bytes)),
        None => String::new(),
    };
    let limits = app.limits.clone();
    let spec = if bytes.len() <= INLINE_PARSE_BYTES {
        JobSpec::parse(&bytes, &limits)
    } else {
        tokio::task::spawn_blocking(move || JobSpec::parse(&bytes, &limits))
            .await
            .map_err(|e| ApiError::Internal(format!("parser task: {e}")))?
    }
    .map_err(ApiError::from)?;
    check_callback(&spec, &app)?;

    let id = Uuid::now_v7();
    let created_at = now_micros();
    let chunks = spec.chunks();
    let idempotency = idempotency.map(|key| IdempotencyKey {
        key,
        body_hash,
        expires_at: created_at.saturating_add(app.idempotency_ttl.as_micros().min(i64::MAX as u128) as i64),
    });
    // The node's free cores, for work the submission's write claims (held
    // until the lanes start; a refusal hands them back).
    let reserved = match app.store.claims_with_insert() {
        true => app.scheduler.reserve(spec.cores.min(chunks.len() as u32)),
        false => None,
    };
    // The write and the start of what it claimed run as one task: a client
    // that goes away mid-request must not strand claimed chunks until their
    // lease runs out.
    let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let task = {
        let app = app.clone();
        async move {
            let new_job = NewJob {
                id,
                spec: &spec,
                created_at,
                chunks: &chunks,
                idempotency,
                max_queued: app.max_queued,
                series: None,
                request_id,
                claim: reserved.as_ref().map(|r| (app.scheduler.next_claim(), r.lanes())),
            };
            let (inserted, claimed) = match app.store.insert_job(&new_job).await {
                Ok((inserted, claimed)) => (Ok(inserted), claimed),
                Err(e) => (Err(e), None),
            };
            let new = matches!(inserted, Ok(Inserted::New));
            if new {
                app.metrics.jobs_submitted.get_or_create(&Metrics::strategy(spec.strategy.as_str())).inc();
                let (count, strategy, cores) = (spec.count, spec.strategy.as_str(), spec.cores);
                tracing::info!(job = %id, count, strategy, cores, "job accepted");
            }
            // Cores held for a refused or failed write go back with a wake-up:
            // the claim loop may have found none free meanwhile.
            if new || reserved.is_some() {
                app.scheduler.submitted(reserved, claimed);
            }
            (inserted, spec, chunks)
        }
    };
    let (inserted, spec, chunks) = tokio::spawn(task.instrument(tracing::Span::current()))
        .await
        .map_err(|e| ApiError::Internal(format!("the submission task failed: {e}")))?;
    match inserted? {
        Inserted::New => {}
        Inserted::Existing(existing) => {
            let doc = app.store.job(existing).await?.ok_or_else(|| not_found(existing))?;
            return Ok((StatusCode::OK, [(header::LOCATION, doc.links.this.clone())], Json(doc)).into_response());
        }
        Inserted::KeyReused => {
            return Err(ApiError::Conflict {
                kind: "/problems/idempotency-key-reused",
                title: "Idempotency-Key reused with another body",
                detail: "this Idempotency-Key was used with a different request body; use a new key".into(),
            })
        }
        Inserted::QueueFull => return Err(ApiError::QueueFull { max: app.max_queued.unwrap_or(0) }),
    }

    let doc = JobDocument {
        id,
        status: JobStatus::Queued,
        created_at: rfc3339(created_at),
        started_at: None,
        finished_at: None,
        request: spec.echo(),
        attempts: 0,
        attempt_errors: vec![],
        progress: Progress { chunks_done: 0, chunks_total: chunks.len() as u64, numbers_done: 0 },
        timing: None,
        error: None,
        links: JobLinks::for_job(id),
        version: 0,
        callback: spec.callback_url.clone().map(|url| crate::domain::Callback {
            url,
            state: "waiting".into(),
            attempts: vec![],
        }),
    };
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, doc.links.this.clone())], Json(doc)).into_response())
}

/// Get a job; with `wait`, long-poll until it ends.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(
        ("id" = Uuid, Path, description = "Job id"),
        ("wait" = Option<f64>, Query, description = "Seconds (≤ 60) to wait for the job to end before answering"),
    ),
    responses(
        (status = 200, description = "The job", body = JobDocument),
        (status = 400, description = "Malformed id or wait", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown id", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_job(
    State(app): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<JobDocument>, ApiError> {
    let id = parse_id(&id)?;
    let mut wait = 0.0f64;
    for (key, value) in query_pairs(query)? {
        match key.as_str() {
            "wait" => {
                wait = value.parse::<f64>().ok().filter(|w| (0.0..=MAX_WAIT_SECONDS).contains(w)).ok_or_else(|| {
                    ApiError::bad_parameter("wait", format!("{value:?} is not a number of seconds from 0 to 60"))
                })?;
            }
            _ => return Err(ApiError::bad_parameter(key, "is not a known parameter")),
        }
    }
    // Watch before reading, so an end between the read and the wait is not missed.
    let mut watch = app.events.watch(id);
    let doc = app.store.job(id).await?.ok_or_else(|| not_found(id))?;
    if doc.status.is_final() || wait == 0.0 {
        return Ok(Json(doc));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
    let mut shutdown = app.shutdown.clone();
    while !*shutdown.borrow() {
        tokio::select! {
            changed = tokio::time::timeout_at(deadline, watch.changed()) => match changed {
                Ok(status) if !status.is_final() => {}
                _ => break, // ended, or the wait is over
            },
            _ = shutdown.changed() => break, // answer now: a shutdown drains requests
        }
    }
    Ok(Json(app.store.job(id).await?.ok_or_else(|| not_found(id))?))
}

/// A page of jobs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobDocument>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// List jobs, newest first. Filter by metadata with `metadata.KEY=VALUE` (repeatable, all must match).
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(
        ("status" = Option<JobStatus>, Query, description = "Only jobs in this status"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "A bad parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list_jobs(State(app): State<AppState>, RawQuery(query): RawQuery) -> Result<Json<JobList>, ApiError> {
    let mut q = ListQuery { limit: DEFAULT_PAGE, ..ListQuery::default() };
    let mut metadata = BTreeMap::new();
    for (key, value) in query_pairs(query)? {
        match key.as_str() {
            "status" => {
                q.status = Some(JobStatus::parse(&value).ok_or_else(|| {
                    ApiError::bad_parameter(
                        "status",
                        format!("{value:?} is not one of queued, running, succeeded, failed, canceled"),
                    )
                })?)
            }
            "limit" => {
                q.limit = value.parse::<u32>().ok().filter(|n| (1..=MAX_PAGE).contains(n)).ok_or_else(|| {
                    ApiError::bad_parameter("limit", format!("{value:?} is not a whole number from 1 to {MAX_PAGE}"))
                })?
            }
            "cursor" => {
                q.before = Some(
                    Uuid::parse_str(&value)
                        .map_err(|_| ApiError::bad_parameter("cursor", "is not a cursor from this API"))?,
                )
            }
            k if k.starts_with("metadata.") && k.len() > "metadata.".len() => {
                metadata.insert(k["metadata.".len()..].to_string(), value);
            }
            _ => return Err(ApiError::bad_parameter(key, "is not a known parameter")),
        }
    }
    q.metadata = metadata;
    let jobs = app.store.list_jobs(&q).await?;
    let next_cursor = (jobs.len() as u32 == q.limit).then(|| jobs.last().map(|j| j.id.to_string())).flatten();
    Ok(Json(JobList { jobs, next_cursor }))
}

/// Delete a job that has ended, with its result.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Still queued or running", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete_job(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    match app.store.delete_job(id).await? {
        Deleted::Yes => Ok(StatusCode::NO_CONTENT),
        Deleted::NotFound => Err(not_found(id)),
        Deleted::Busy(status) => Err(ApiError::Conflict {
            kind: "/problems/job-active",
            title: "The job has not ended",
            detail: format!("job {id} is {}; only ended jobs can be deleted", status.as_str()),
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cancel a job: a queued job never starts; a running job's workers are stopped.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, now canceled (its workers stopped)", body = JobDocument),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job had already ended", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn cancel_job(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<JobDocument>, ApiError> {
    let id = parse_id(&id)?;
    match app.store.cancel_job(id, now_micros(), &canceled_problem()).await? {
        Canceled::NotFound => return Err(not_found(id)),
        Canceled::Ended(status) => {
            return Err(ApiError::Conflict {
                kind: "/problems/job-ended",
                title: "The job has already ended",
                detail: format!("job {id} is {}", status.as_str()),
            })
        }
        Canceled::Now { was_running, strategy } => {
            tracing::info!(job = %id, was_running, "job canceled");
            let labels =
                crate::metrics::FinishedLabels { status: "canceled".into(), strategy: strategy.as_str().into() };
            app.metrics.jobs_finished.get_or_create(&labels).inc();
            if let Some(control) = app.scheduler.control(id) {
                control.abort(Abort::Canceled);
                // Answer once the workers here are stopped (bounded: never hang a client).
                let _ = tokio::time::timeout(Duration::from_secs(10), control.finished()).await;
            }
            app.events.publish(crate::events::JobEvent { id, status: JobStatus::Canceled });
        }
    }
    Ok(Json(app.store.job(id).await?.ok_or_else(|| not_found(id))?))
}
