//! `GET /v1/jobs/{id}/result`: squares streamed from stored segments, a few
//! segments at a time, as JSON or NDJSON; never built whole in memory.

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::ApiError;
use super::jobs::{not_found, parse_id};
use super::{query_pairs, AppState};
use crate::domain::{JobStatus, SEGMENT_LEN};
use crate::exec::from_le_bytes;
use crate::store::{Segment, Store};

/// Each step of the stream reads (and formats) at most this many squares,
/// from at most this many stored segments.
const NUMBERS_PER_STEP: u64 = 4 * SEGMENT_LEN;
const SEGMENTS_PER_STEP: u32 = 4096;
pub const NDJSON: &str = "application/x-ndjson";

/// A job's squares (the body is streamed; this describes its shape).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResultPage {
    pub id: Uuid,
    /// How many squares the whole result has.
    pub count: u64,
    /// Position of the first square in this answer.
    pub offset: u64,
    /// Squares in input order.
    pub squares: Vec<i64>,
}

/// Get a succeeded job's squares, whole (streamed) or a page with `offset`/`limit`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/result",
    tag = "jobs",
    params(
        ("id" = Uuid, Path, description = "Job id"),
        ("offset" = Option<u64>, Query, description = "First position (default 0)"),
        ("limit" = Option<u64>, Query, description = "How many squares at most (default: all, streamed)"),
    ),
    responses(
        (status = 200, description = "Squares in input order; `Accept: application/x-ndjson` gives one per line",
         content((ResultPage = "application/json"), (String = "application/x-ndjson"))),
        (status = 400, description = "Malformed id or parameter", body = crate::domain::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown id", body = crate::domain::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job has not succeeded", body = crate::domain::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_result(
    State(app): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let (mut offset, mut limit) = (0u64, None);
    for (key, value) in query_pairs(query)? {
        let n =
            value.parse::<u64>().map_err(|_| ApiError::bad_parameter(&key, format!("{value:?} is not a whole number")));
        match key.as_str() {
            "offset" => offset = n?,
            "limit" => limit = Some(n?),
            _ => return Err(ApiError::bad_parameter(key, "is not a known parameter")),
        }
    }
    let ndjson =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|accept| accept.contains(NDJSON));
    let (status, count) = app.store.status_and_count(id).await?.ok_or_else(|| not_found(id))?;
    if status != JobStatus::Succeeded {
        return Err(ApiError::Conflict {
            kind: "/problems/job-not-succeeded",
            title: "The job has no result",
            detail: format!("job {id} is {}; results exist once it has succeeded", status.as_str()),
        });
    }
    let from = offset.min(count);
    let to = limit.map_or(count, |l| from.saturating_add(l).min(count));
    let stream = ResultStream { store: app.store.clone(), id, count, from, next: from, to, ndjson, phase: Phase::Head };
    let body = Body::from_stream(futures_util::stream::unfold(stream, ResultStream::step));
    let content_type = if ndjson { NDJSON } else { "application/json" };
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Body,
    Done,
}

struct ResultStream {
    store: Store,
    id: Uuid,
    count: u64,
    from: u64,
    /// The next position to send.
    next: u64,
    to: u64,
    ndjson: bool,
    phase: Phase,
}

impl ResultStream {
    async fn step(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        match self.phase {
            Phase::Done => None,
            Phase::Head => {
                self.phase = Phase::Body;
                let head = match self.ndjson {
                    true => String::new(),
                    false => {
                        format!(r#"{{"id":"{}","count":{},"offset":{},"squares":["#, self.id, self.count, self.from)
                    }
                };
                Some((Ok(Bytes::from(head)), self))
            }
            Phase::Body if self.next >= self.to => {
                self.phase = Phase::Done;
                let tail = if self.ndjson { "" } else { "]}\n" };
                Some((Ok(Bytes::from_static(tail.as_bytes())), self))
            }
            Phase::Body => {
                let segments = match self
                    .store
                    .result_segments(self.id, self.next, self.to, SEGMENTS_PER_STEP, NUMBERS_PER_STEP)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => return self.abort(format!("reading result segments: {e}")),
                };
                if segments.first().is_none_or(|s| s.pos > self.next) {
                    let why = format!("result of job {} has no segment at {}", self.id, self.next);
                    return self.abort(why);
                }
                let (next, to, first, ndjson) = (self.next, self.to, self.next == self.from, self.ndjson);
                // Formatting megabytes of digits is CPU work: off the async workers.
                let formatted =
                    tokio::task::spawn_blocking(move || format_segments(&segments, next, to, first, ndjson)).await;
                match formatted {
                    Ok((bytes, reached)) => {
                        self.next = reached;
                        Some((Ok(bytes), self))
                    }
                    Err(e) => self.abort(format!("formatting task: {e}")),
                }
            }
        }
    }

    /// Ends the stream with an error: the client sees a truncated body, never a wrong one.
    fn abort(mut self, why: String) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        tracing::error!(job = %self.id, error = %why, "result stream aborted");
        self.phase = Phase::Done;
        Some((Err(std::io::Error::other(why)), self))
    }
}

/// Formats the contiguous squares from `next` (below `to`) that `segments`
/// hold. Returns the text and the position after the last square written.
fn format_segments(segments: &[Segment], mut next: u64, to: u64, mut first: bool, ndjson: bool) -> (Bytes, u64) {
    let mut out = Vec::with_capacity(segments.iter().map(|s| s.data.len() * 3).sum());
    let mut buf = itoa::Buffer::new();
    for segment in segments {
        let len = segment.data.len() as u64 / 8;
        if segment.pos > next || segment.pos + len <= next {
            break; // a gap: the caller notices on its next step
        }
        let skip = (next - segment.pos) as usize;
        let take = (to.min(segment.pos + len) - next) as usize;
        for square in from_le_bytes(&segment.data[skip * 8..]).take(take) {
            if ndjson {
                out.extend_from_slice(buf.format(square).as_bytes());
                out.push(b'\n');
            } else {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(buf.format(square).as_bytes());
            }
        }
        next += take as u64;
        if next >= to {
            break;
        }
    }
    (Bytes::from(out), next)
}
