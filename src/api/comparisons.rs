//! `/v1/comparisons`: "which is better here: processes or threads?" — a
//! matrix of strategies × core counts × repeats, run as ordinary jobs of one
//! series (one at a time, so runs do not disturb each other), answered as a
//! table of wall times, speedups and efficiencies.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::ApiError;
use super::jobs::{is_json, read_body};
use super::{query_pairs, AppState};
use crate::domain::{now_micros, rfc3339, FieldError, JobSpec, JobStatus, Strategy};
use crate::metrics::Metrics;
use crate::store::{Inserted, NewJob, StoredComparison};

const MAX_REPEATS: u64 = 10;
const MAX_JOBS: usize = 100;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/comparisons", post(create_comparison)).route("/v1/comparisons/{id}", get(get_comparison))
}

/// `POST /v1/comparisons` body: the job fields (no `strategy`, `cores` is a list) plus the matrix.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ComparisonRequestDoc {
    /// Strategies to compare; default all three.
    pub strategies: Option<Vec<Strategy>>,
    /// Core counts to compare; default `[1, the node's core budget]`.
    pub cores: Option<Vec<u32>>,
    /// Runs per cell, 1 to 10; default 3.
    pub repeats: Option<u32>,
    /// The numbers (or give `range`), as for a job; every other job field applies too.
    pub numbers: Option<Vec<i64>>,
    pub range: Option<crate::domain::RangeDoc>,
}

/// The comparison's matrix, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComparisonMatrix {
    pub strategies: Vec<Strategy>,
    pub cores: Vec<u32>,
    pub repeats: u32,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCell {
    strategy: Strategy,
    cores: u32,
    job_ids: Vec<Uuid>,
}

/// One cell of the table.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Cell {
    pub strategy: Strategy,
    pub cores: u32,
    /// Runs that succeeded so far.
    pub runs: u32,
    pub median_wall_ms: Option<f64>,
    pub min_wall_ms: Option<f64>,
    pub max_wall_ms: Option<f64>,
    /// Median wall time of `sequential` on 1 core over this cell's; null without that baseline.
    pub speedup: Option<f64>,
    /// `speedup / cores`.
    pub efficiency: Option<f64>,
    pub job_ids: Vec<Uuid>,
}

/// A comparison and its table.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Comparison {
    pub id: Uuid,
    /// `running`, `succeeded` (every job succeeded) or `failed` (some job did not).
    pub status: String,
    pub created_at: String,
    pub request: ComparisonMatrix,
    pub cells: Vec<Cell>,
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::Validation { errors: vec![FieldError { field: field.into(), message: message.into() }], more: 0 }
}

/// Takes the matrix fields out of the body, leaving the job fields.
fn matrix(
    body: &mut serde_json::Map<String, Value>,
    default_cores: u32,
) -> Result<(Vec<Strategy>, Vec<u32>, u32), ApiError> {
    if body.contains_key("strategy") {
        return Err(invalid("strategy", "a comparison takes `strategies`, a list"));
    }
    let strategies = match body.remove("strategies") {
        None => vec![Strategy::Sequential, Strategy::Threads, Strategy::Processes],
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let s = item.as_str().and_then(Strategy::parse).ok_or_else(|| {
                    invalid(&format!("strategies[{i}]"), "is not one of sequential, threads, processes")
                })?;
                if out.contains(&s) {
                    return Err(invalid(&format!("strategies[{i}]"), "is listed twice"));
                }
                out.push(s);
            }
            out
        }
        Some(_) => return Err(invalid("strategies", "must be a non-empty list of strategies")),
    };
    let cores = match body.remove("cores") {
        None => {
            let mut c = vec![1, default_cores.max(1)];
            c.dedup();
            c
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let n = item
                    .as_u64()
                    .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
                    .ok_or_else(|| invalid(&format!("cores[{i}]"), "must be a whole number of cores, at least 1"))?
                    as u32;
                if out.contains(&n) {
                    return Err(invalid(&format!("cores[{i}]"), "is listed twice"));
                }
                out.push(n);
            }
            out
        }
        Some(_) => return Err(invalid("cores", "must be a non-empty list of core counts")),
    };
    let repeats = match body.remove("repeats") {
        None => 3,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_REPEATS).contains(n))
            .ok_or_else(|| invalid("repeats", format!("must be a whole number from 1 to {MAX_REPEATS}")))?
            as u32,
    };
    let jobs = strategies.len() * cores.len() * repeats as usize;
    if jobs > MAX_JOBS {
        return Err(invalid("repeats", format!("the matrix makes {jobs} jobs; at most {MAX_JOBS}")));
    }
    Ok((strategies, cores, repeats))
}

/// Start a comparison: the matrix runs as ordinary jobs, one at a time.
#[utoipa::path(
    post,
    path = "/v1/comparisons",
    tag = "comparisons",
    request_body(content = ComparisonRequestDoc, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted; its jobs are stored", body = Comparison,
         headers(("Location" = String, description = "/v1/comparisons/{id}"))),
        (status = 400, description = "Malformed JSON", body = crate::domain::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over a server limit", body = crate::domain::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = crate::domain::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid", body = crate::domain::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create_comparison(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    if !is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes: Bytes = read_body(&app, &headers, body).await?;
    let mut fields: serde_json::Map<String, Value> = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(invalid("(body)", "must be a JSON object")),
        Err(e) => return Err(ApiError::MalformedJson(e.to_string())),
    };
    let (strategies, cores, repeats) = matrix(&mut fields, app.limits.default_cores)?;
    let id = Uuid::now_v7();
    if fields.get("metadata").is_none_or(|m| m.as_object().is_some_and(|m| m.len() < 16)) {
        let metadata = fields.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(m) = metadata {
            m.insert("comparison".into(), Value::String(id.to_string()));
        }
    }
    // Each cell's job body, validated as any job is.
    let mut specs = Vec::new();
    for &strategy in &strategies {
        for &c in &cores {
            let mut job = fields.clone();
            job.insert("strategy".into(), Value::String(strategy.as_str().into()));
            job.insert("cores".into(), Value::from(c));
            if strategy != Strategy::Processes {
                job.remove("transport");
            }
            let raw = serde_json::to_vec(&job).expect("JSON values serialise");
            let spec = JobSpec::parse(&raw, &app.limits).map_err(ApiError::from)?;
            super::jobs::check_callback(&spec, &app)?;
            specs.push(spec);
        }
    }
    let count = specs[0].count;
    let mut cells: Vec<StoredCell> =
        specs.iter().map(|s| StoredCell { strategy: s.strategy, cores: s.cores, job_ids: Vec::new() }).collect();
    // Repeats interleave (all cells once, then again), so drift hits every cell alike.
    for _ in 0..repeats {
        for (cell, spec) in cells.iter_mut().zip(&specs) {
            let job = Uuid::now_v7();
            let chunks = spec.chunks();
            let new_job = NewJob {
                id: job,
                spec,
                created_at: now_micros(),
                chunks: &chunks,
                idempotency: None,
                max_queued: None,
                series: Some(id),
                request_id: headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string),
                claim: None,
            };
            match app.store.insert_job(&new_job).await?.0 {
                Inserted::New => cell.job_ids.push(job),
                other => return Err(ApiError::Internal(format!("inserting a comparison job: {other:?}"))),
            }
            app.metrics.jobs_submitted.get_or_create(&Metrics::strategy(spec.strategy.as_str())).inc();
        }
    }
    let created_at = now_micros();
    let request = ComparisonMatrix { strategies, cores, repeats, count };
    app.store
        .insert_comparison(&StoredComparison {
            id,
            created_at,
            request: serde_json::to_string(&request).expect("serialises"),
            cells: serde_json::to_string(&cells).expect("serialises"),
        })
        .await?;
    app.scheduler.wake();
    tracing::info!(comparison = %id, jobs = cells.iter().map(|c| c.job_ids.len()).sum::<usize>(), "comparison accepted");
    let doc = load(&app, id).await?;
    let location = format!("/v1/comparisons/{id}");
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(doc)).into_response())
}

fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Builds the table from the comparison's jobs as they stand.
async fn load(app: &AppState, id: Uuid) -> Result<Comparison, ApiError> {
    let stored = app.store.comparison(id).await?.ok_or_else(|| ApiError::NotFound(format!("no comparison {id}")))?;
    let request: ComparisonMatrix =
        serde_json::from_str(&stored.request).map_err(|e| ApiError::Internal(format!("comparison request: {e}")))?;
    let cells: Vec<StoredCell> =
        serde_json::from_str(&stored.cells).map_err(|e| ApiError::Internal(format!("comparison cells: {e}")))?;
    let ids: Vec<Uuid> = cells.iter().flat_map(|c| c.job_ids.iter().copied()).collect();
    let jobs: BTreeMap<Uuid, _> = app.store.job_summaries(&ids).await?.into_iter().map(|j| (j.id, j)).collect();
    let mut status = "succeeded";
    let mut out = Vec::new();
    for cell in &cells {
        let mut walls = Vec::new();
        for job in &cell.job_ids {
            match jobs.get(job) {
                Some(j) if j.status == JobStatus::Succeeded => walls.extend(j.wall_ms),
                Some(j) if !j.status.is_final() => status = if status == "failed" { status } else { "running" },
                _ => status = "failed", // failed, canceled or deleted
            }
        }
        walls.sort_by(f64::total_cmp);
        out.push(Cell {
            strategy: cell.strategy,
            cores: cell.cores,
            runs: walls.len() as u32,
            median_wall_ms: median(&walls).map(round3),
            min_wall_ms: walls.first().copied().map(round3),
            max_wall_ms: walls.last().copied().map(round3),
            speedup: None,
            efficiency: None,
            job_ids: cell.job_ids.clone(),
        });
    }
    let baseline = out
        .iter()
        .find(|c| c.strategy == Strategy::Sequential && c.cores == 1)
        .and_then(|c| c.median_wall_ms)
        .filter(|b| *b > 0.0);
    for cell in &mut out {
        if let (Some(base), Some(m)) = (baseline, cell.median_wall_ms.filter(|m| *m > 0.0)) {
            let speedup = base / m;
            cell.speedup = Some(round3(speedup));
            cell.efficiency = Some(round3(speedup / f64::from(cell.cores)));
        }
    }
    Ok(Comparison { id, status: status.into(), created_at: rfc3339(stored.created_at), request, cells: out })
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(String::new, |v| v.to_string())
}

/// Get a comparison's table: JSON, or `?format=csv` / `?format=markdown` for people.
#[utoipa::path(
    get,
    path = "/v1/comparisons/{id}",
    tag = "comparisons",
    params(
        ("id" = Uuid, Path, description = "Comparison id"),
        ("format" = Option<String>, Query, description = "`json` (default), `csv` or `markdown`"),
    ),
    responses(
        (status = 200, description = "The table", body = Comparison),
        (status = 400, description = "Malformed id or format", body = crate::domain::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown id", body = crate::domain::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_comparison(
    State(app): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let id =
        Uuid::parse_str(&id).map_err(|_| ApiError::bad_parameter("id", format!("{id:?} is not a comparison id")))?;
    let mut format = "json".to_string();
    for (key, value) in query_pairs(query)? {
        match key.as_str() {
            "format" if ["json", "csv", "markdown"].contains(&value.as_str()) => format = value,
            "format" => return Err(ApiError::bad_parameter("format", "must be json, csv or markdown")),
            _ => return Err(ApiError::bad_parameter(key, "is not a known parameter")),
        }
    }
    let doc = load(&app, id).await?;
    let header_row =
        ["strategy", "cores", "runs", "median_wall_ms", "min_wall_ms", "max_wall_ms", "speedup", "efficiency"];
    let rows: Vec<[String; 8]> = doc
        .cells
        .iter()
        .map(|c| {
            [
                c.strategy.as_str().to_string(),
                c.cores.to_string(),
                c.runs.to_string(),
                opt(c.median_wall_ms),
                opt(c.min_wall_ms),
                opt(c.max_wall_ms),
                opt(c.speedup),
                opt(c.efficiency),
            ]
        })
        .collect();
    Ok(match format.as_str() {
        "csv" => {
            let mut text = header_row.join(",") + "\n";
            for row in &rows {
                text.push_str(&row.join(","));
                text.push('\n');
            }
            ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response()
        }
        "markdown" => {
            let mut text = format!("| {} |\n|{}\n", header_row.join(" | "), "---|".repeat(header_row.len()));
            for row in &rows {
                text.push_str(&format!("| {} |\n", row.join(" | ")));
            }
            ([(header::CONTENT_TYPE, "text/markdown; charset=utf-8")], text).into_response()
        }
        _ => Json(doc).into_response(),
    })
}
