//! `GET /v1/jobs/{id}/events`: server-sent events of one job.
//!
//! Event ids are the job's stored `version`, which grows with every change, so
//! a client that reconnects with `Last-Event-ID` gets exactly what it missed;
//! once the job has ended every connection gets the `end` event and closes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::watch;
use uuid::Uuid;

use super::error::ApiError;
use super::jobs::{not_found, parse_id};
use super::AppState;
use crate::domain::{JobDocument, JobStatus};
use crate::events::JobWatch;

/// Re-read the job this often even without a notification (a lost wake-up
/// costs at most this much delay).
const FALLBACK_POLL: Duration = Duration::from_secs(5);

/// Stream a job's status and progress as server-sent events.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(
        ("id" = Uuid, Path, description = "Job id"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: `event: status` / `event: progress` with the job document \
          as `data`, `id` increasing; after the job ends one `event: end` with the final document, then the stream closes",
         body = String, content_type = "text/event-stream"),
        (status = 400, description = "Malformed id", body = crate::domain::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown id", body = crate::domain::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn job_events(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = parse_id(&id)?;
    // An event id is 2 × the job version it showed (+1 for `end`).
    let last_seen =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok()).map(|id| id / 2);
    // Watch before the first read, so no change slips between them.
    let events = app.events.watch(id);
    let doc = app.store.job(id).await?.ok_or_else(|| not_found(id))?;
    let mut stream = EventStream {
        app: app.clone(),
        id,
        events,
        shutdown: app.shutdown.clone(),
        sent_version: last_seen,
        last_status: None,
        pending: VecDeque::new(),
        closed: false,
        next_poll: tokio::time::Instant::now() + FALLBACK_POLL,
    };
    stream.offer(doc);
    Ok(Sse::new(futures_util::stream::unfold(stream, EventStream::next)).keep_alive(KeepAlive::default()))
}

struct EventStream {
    app: AppState,
    id: Uuid,
    events: JobWatch,
    shutdown: watch::Receiver<bool>,
    /// The version of the last document sent (or the client's Last-Event-ID).
    sent_version: Option<u64>,
    last_status: Option<JobStatus>,
    pending: VecDeque<Event>,
    /// Set once `end` is queued (or the job vanished).
    closed: bool,
    /// When to re-read the job even without a notification.
    next_poll: tokio::time::Instant,
}

/// An event for `doc`. Ids are `2 × version` (status, progress) and
/// `2 × version + 1` (end), so they strictly increase along a stream.
fn event(kind: &str, doc: &JobDocument) -> Event {
    let data = serde_json::to_string(doc).expect("job documents serialise");
    let id = 2 * doc.version + u64::from(kind == "end");
    Event::default().event(kind).id(id.to_string()).data(data)
}

impl EventStream {
    /// Queues what a client that has seen `sent_version` needs of `doc`.
    fn offer(&mut self, doc: JobDocument) {
        let newer = self.sent_version.is_none_or(|v| doc.version > v);
        if newer {
            let kind = match self.last_status {
                Some(status) if status == doc.status => "progress",
                _ => "status",
            };
            self.pending.push_back(event(kind, &doc));
            self.sent_version = Some(doc.version);
            self.last_status = Some(doc.status);
        }
        if doc.status.is_final() {
            self.pending.push_back(event("end", &doc));
            self.closed = true;
        }
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.closed || *self.shutdown.borrow() {
                return None;
            }
            tokio::select! {
                _ = self.events.changed() => {}
                _ = tokio::time::sleep_until(self.next_poll) => {}
                _ = self.shutdown.changed() => return None,
            }
            self.next_poll = tokio::time::Instant::now() + FALLBACK_POLL;
            match self.app.store.job(self.id).await {
                Ok(Some(doc)) => self.offer(doc),
                Ok(None) => return None, // deleted
                Err(e) => {
                    tracing::warn!(job = %self.id, error = %e, "event stream could not read the job");
                }
            }
        }
    }
}
