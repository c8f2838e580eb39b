//! Job statuses and the job document clients see.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::numbers::RangeSpec;
use super::spec::{FieldError, Simulate, Strategy, Transport};

/// Where a job is in its life. `queued → running → succeeded | failed | canceled`
/// (and `queued → canceled`); a running job whose node died goes back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the job has ended for good.
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled)
    }
}

/// The request as the job document echoes it (`request`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RequestEcho {
    pub count: u64,
    /// Cores as asked; the chunks show what ran.
    pub cores: u32,
    pub strategy: Strategy,
    /// The chunk size given, or the largest chunk of the default split.
    pub chunk_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulate: Option<Simulate>,
    /// The range, for a range job.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<super::RangeDoc>)]
    pub range: Option<RangeSpec>,
    pub priority: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    pub max_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// How far a job has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub chunks_done: u64,
    pub chunks_total: u64,
    pub numbers_done: u64,
}

/// One chunk's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChunkTiming {
    pub index: u32,
    pub offset: u64,
    pub len: u64,
    /// "process PID" or "thread N".
    pub worker: String,
    /// The node that ran it.
    pub node: String,
    /// When the chunk started, in ms after the job started.
    pub start_ms: f64,
    pub duration_ms: f64,
    /// How many times the chunk was claimed: more than 1 only when a node
    /// died (or stopped) while running it, before its result was stored.
    pub runs: u32,
}

/// Where a job's time went. All in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Timing {
    /// From submission to the (last) start.
    pub queue_ms: f64,
    /// From the (last) start to the end.
    pub wall_ms: f64,
    /// Starting workers: spawning worker subprocesses or threads.
    pub spawn_ms: f64,
    /// Time workers spent computing squares, summed over chunks.
    pub compute_ms: f64,
    /// Time spent writing results to the store, summed over chunks.
    pub store_ms: f64,
    pub chunks: Vec<ChunkTiming>,
}

/// An RFC 9457 problem document, as errors and in `error` of a failed job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI reference naming the problem type, such as `/problems/validation`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The bad fields, for validation problems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Links from a job document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobLinks {
    #[serde(rename = "self")]
    pub this: String,
    pub result: String,
}

impl JobLinks {
    pub fn for_job(id: Uuid) -> Self {
        JobLinks { this: format!("/v1/jobs/{id}"), result: format!("/v1/jobs/{id}/result") }
    }
}

/// The job document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobDocument {
    /// A UUID v7.
    pub id: Uuid,
    pub status: JobStatus,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub request: RequestEcho,
    /// How many attempts the job has made: its first run, plus one per retry
    /// after a worker crash. A restart after a node's death is not an attempt.
    pub attempts: u32,
    /// The error of each attempt that failed, oldest first.
    pub attempt_errors: Vec<AttemptError>,
    pub progress: Progress,
    /// Null until the job has run.
    pub timing: Option<Timing>,
    /// A problem document when the job failed or was canceled.
    pub error: Option<Problem>,
    /// The webhook of a job submitted with a `callback_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    pub links: JobLinks,
    /// Bumped on every stored change; the ids of the event stream.
    #[serde(skip)]
    pub version: u64,
}

/// The delivery of a job's final document to its `callback_url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Callback {
    pub url: String,
    /// `waiting` (the job has not ended), `pending`, `delivered` or `failed`.
    pub state: String,
    /// Every delivery attempt, oldest first.
    pub attempts: Vec<DeliveryAttempt>,
}

/// One POST to a `callback_url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryAttempt {
    /// When it was made (RFC 3339).
    pub at: String,
    /// The receiver's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why it failed, when no status came back (or the address was refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AttemptError {
    pub attempt: u32,
    /// When it failed (RFC 3339).
    pub at: String,
    pub error: Problem,
}

/// Microseconds since the Unix epoch as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(micros: i64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH + time::Duration::microseconds(micros);
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s, milli) = (t.hour(), t.minute(), t.second(), t.millisecond());
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// Now, in microseconds since the Unix epoch (how the store keeps time).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_623_647_123_456), "2026-11-25T16:20:47.123Z");
    }
}
