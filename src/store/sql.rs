//! The SQL both backends share, written once with `$N` placeholders: the
//! statements ([`q`]) and the logic around them, with the rows they read
//! (one text keeps the backends from drifting). PostgreSQL runs them on sqlx;
//! SQLite on rusqlite, writes on its writer thread and reads on its reader
//! threads.

use uuid::Uuid;

use super::{JobSummary, Segment, StoreError, StoreResult};
use crate::domain::{
    rfc3339, Callback, ChunkTiming, JobDocument, JobLinks, JobStatus, Problem, Progress, RequestEcho, Strategy, Timing,
    Transport,
};

/// Totals kept in `jobs.timing` once a job has ended.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct TimingTotals {
    pub queue_ms: f64,
    pub wall_ms: f64,
    pub spawn_ms: f64,
    pub compute_ms: f64,
    pub store_ms: f64,
    /// The done chunks' timings (rounded), kept with the totals so reading
    /// an ended job is one query; absent in rows written before they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkTiming>>,
}

/// A done chunk's timing, with what its job's totals add up.
pub(super) struct DoneChunk {
    pub timing: ChunkTiming,
    pub spawn_ms: f64,
    pub compute_ms: f64,
    pub store_ms: f64,
}

/// A job's times, as ending it needs them (each backend's `end`).
pub(super) struct JobTimes {
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub has_callback: bool,
}

/// Columns the job document is built from.
pub(super) const JOB_COLUMNS: &str = "id, status, created_at, started_at, finished_at, request, attempts, \
     attempt_errors, chunks_total, chunks_done, numbers_done, timing, error, version, callback_url";

/// A `jobs` row's [`JOB_COLUMNS`], as either driver reads them.
pub(super) struct JobRow {
    pub id: String,
    pub status: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub request: String,
    pub attempts: i64,
    pub attempt_errors: String,
    pub chunks_total: i64,
    pub chunks_done: i64,
    pub numbers_done: i64,
    pub timing: Option<String>,
    pub error: Option<String>,
    pub version: i64,
    pub callback_url: Option<String>,
}

/// What a job document still needs after its row: read by the caller, one
/// query each, then filled in ([`JobRow::into_document`]).
pub(super) struct DocumentNeeds {
    /// The chunk timings from the chunks table (a job that ended before
    /// `jobs.timing` kept them): `timing.chunks` is empty until filled.
    pub chunk_timings: bool,
    /// The webhook's state ([`q::WEBHOOK_STATE`]), for a job with a callback URL.
    pub callback: Option<String>,
}

impl JobRow {
    pub fn into_document(self) -> StoreResult<(JobDocument, DocumentNeeds)> {
        let id = parse_uuid(&self.id)?;
        let mut needs = DocumentNeeds { chunk_timings: false, callback: self.callback_url };
        let timing = match self.timing {
            None => None,
            Some(json) => {
                let t: TimingTotals = parse_json(&json)?;
                needs.chunk_timings = t.chunks.is_none();
                Some(Timing {
                    queue_ms: round_ms(t.queue_ms),
                    wall_ms: round_ms(t.wall_ms),
                    spawn_ms: round_ms(t.spawn_ms),
                    compute_ms: round_ms(t.compute_ms),
                    store_ms: round_ms(t.store_ms),
                    chunks: t.chunks.unwrap_or_default(),
                })
            }
        };
        let doc = JobDocument {
            id,
            status: parse_status(&self.status)?,
            created_at: rfc3339(self.created_at),
            started_at: self.started_at.map(rfc3339),
            finished_at: self.finished_at.map(rfc3339),
            request: parse_json::<RequestEcho>(&self.request)?,
            attempts: self.attempts as u32,
            attempt_errors: parse_json(&self.attempt_errors)?,
            progress: Progress {
                chunks_done: self.chunks_done as u64,
                chunks_total: self.chunks_total as u64,
                numbers_done: self.numbers_done as u64,
            },
            timing,
            error: self.error.map(|e| parse_json::<Problem>(&e)).transpose()?,
            links: JobLinks::for_job(id),
            version: self.version as u64,
            callback: None,
        };
        Ok((doc, needs))
    }
}

/// A job's callback from its URL and its webhook row (state, history), if any.
pub(super) fn callback(url: String, webhook: Option<(String, String)>) -> StoreResult<Callback> {
    Ok(match webhook {
        None => Callback { url, state: "waiting".into(), attempts: Vec::new() },
        Some((state, history)) => Callback { url, state, attempts: parse_json(&history)? },
    })
}

/// A job's status and its `jobs.timing` (JSON) as a comparison sees them.
pub(super) fn job_summary(id: &str, status: &str, timing: Option<String>) -> StoreResult<JobSummary> {
    let wall_ms = timing.map(|t| parse_json::<TimingTotals>(&t)).transpose()?.map(|t| t.wall_ms);
    Ok(JobSummary { id: parse_uuid(id)?, status: parse_status(status)?, wall_ms })
}

/// A result segment from its row, checked for its length.
pub(super) fn segment(pos: i64, len: i64, data: Vec<u8>) -> StoreResult<Segment> {
    if data.len() as i64 != len * 8 {
        return Err(StoreError::Corrupt(format!("segment of {len} squares has {} bytes", data.len())));
    }
    Ok(Segment { pos: pos as u64, data })
}

/// Statements both backends run as they are (SQLite runs them with `$N`
/// turned into `?N`). Where PostgreSQL must lock rows, it appends the lock.
pub(super) mod q {
    pub const IDEMPOTENCY_GET: &str =
        "SELECT body_hash, job_id FROM idempotency_keys WHERE key = $1 AND expires_at > $2";
    pub const IDEMPOTENCY_PUT: &str = "INSERT INTO idempotency_keys (key, body_hash, job_id, expires_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO UPDATE SET body_hash = excluded.body_hash, \
         job_id = excluded.job_id, expires_at = excluded.expires_at";
    pub const QUEUED_COUNT: &str = "SELECT COUNT(*) FROM jobs WHERE status = 'queued'";
    pub const INSERT_JOB: &str = "INSERT INTO jobs (id, status, priority, created_at, count, cores, strategy, \
         transport, sleep_ms, spin, range_start, range_end, range_step, chunks_total, chunks_ready, max_attempts, \
         timeout_ms, request, callback_url, series, request_id) VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, \
         $9, $10, $11, $12, $13, $13, $14, $15, $16, $17, $18, $19)";
    pub const INSERT_METADATA: &str = "INSERT INTO job_metadata (job_id, key, value) VALUES ($1, $2, $3)";
    pub const INSERT_INPUT: &str = "INSERT INTO job_inputs (job_id, pos, data) VALUES ($1, $2, $3)";
    pub const INPUT_SEGMENT: &str = "SELECT data FROM job_inputs WHERE job_id = $1 AND pos = $2";
    pub const INSERT_CHUNK: &str = "INSERT INTO chunks (job_id, idx, pos, len) VALUES ($1, $2, $3, $4)";
    /// A job that can take chunks, with all a node needs to run them: the
    /// row as it is before [`START_JOB`] (see [`ClaimRow::into_job`]).
    pub const CLAIMABLE_JOB: &str = "SELECT cores, strategy, chunks_ready, chunks_running, chunks_total, \
         series, status, count, transport, sleep_ms, spin, range_start, range_end, range_step, created_at, started_at, \
         attempts, max_attempts, timeout_ms, request_id \
         FROM jobs WHERE id = $1 AND status IN ('queued', 'running') AND chunks_ready > 0";
    pub const SERIES_BUSY: &str = "SELECT COUNT(*) FROM jobs WHERE series = $1 AND status = 'running' AND id <> $2";
    pub const CLAIM_CHUNKS: &str = "UPDATE chunks SET state = 'running', owner = $2, lease_until = $3, \
         runs = runs + 1 WHERE job_id = $1 AND idx IN \
         (SELECT idx FROM chunks WHERE job_id = $1 AND state = 'pending' ORDER BY idx LIMIT $4) \
         RETURNING idx, pos, len";
    /// SQLite's [`CLAIM_CHUNKS`], in two steps: the first `$2` pending chunks,
    /// then each claimed by its key (SQLite builds a temporary b-tree for an
    /// `IN (subquery)` and another for a `RETURNING`).
    pub const PENDING_CHUNKS: &str =
        "SELECT idx, pos, len FROM chunks WHERE job_id = $1 AND state = 'pending' ORDER BY idx LIMIT $2";
    pub const CLAIM_CHUNK: &str = "UPDATE chunks SET state = 'running', owner = $3, lease_until = $4, \
         runs = runs + 1 WHERE job_id = $1 AND idx = $2 AND state = 'pending'";
    /// Starts the job (once) and moves `$3` chunks from ready to running.
    pub const START_JOB: &str = "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, $2), \
         attempts = CASE WHEN attempts = 0 THEN 1 ELSE attempts END, chunks_ready = chunks_ready - $3, \
         chunks_running = chunks_running + $3, version = version + 1 WHERE id = $1";
    pub const RELEASE_JOB: &str = "UPDATE jobs SET chunks_running = chunks_running - $2, \
         chunks_ready = chunks_ready + $2, status = CASE WHEN chunks_running - $2 <= 0 THEN 'queued' ELSE status END, \
         version = version + 1 WHERE id = $1 AND status = 'running'";
    /// Stores a segment only while `$6` owns the chunk, running.
    pub const PUT_SEGMENT: &str = "INSERT INTO results (job_id, pos, len, data) \
         SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM chunks WHERE job_id = $1 AND idx = $5 \
         AND owner = $6 AND state = 'running') \
         ON CONFLICT (job_id, pos) DO UPDATE SET len = excluded.len, data = excluded.data";
    pub const INSERT_RESULT: &str = "INSERT INTO results (job_id, pos, len, data) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (job_id, pos) DO UPDATE SET len = excluded.len, data = excluded.data";
    pub const CHUNK_DONE: &str = "UPDATE chunks SET state = 'done', owner = NULL, lease_until = NULL, \
         worker = $3, node = $4, start_ms = $5, duration_ms = $6, spawn_ms = $7, compute_ms = $8, store_ms = $9 \
         WHERE job_id = $1 AND idx = $2 AND owner = $4 AND state = 'running'";
    /// A chunk's completion adds to its job's counts in two steps (SQLite; a
    /// `RETURNING` costs it a temporary b-tree, and PostgreSQL does it in one
    /// statement): the job's counts and times before the chunk counts, then
    /// the count.
    pub const JOB_STATE: &str = "SELECT chunks_done, chunks_total, numbers_done, created_at, started_at, \
         callback_url IS NOT NULL AS has_callback FROM jobs WHERE id = $1";
    pub const ADD_PROGRESS: &str = "UPDATE jobs SET chunks_done = chunks_done + 1, \
         chunks_running = chunks_running - 1, numbers_done = numbers_done + $2, version = version + 1 WHERE id = $1";
    /// The done chunks' timings, in order ([`DoneChunk`] columns).
    pub const DONE_CHUNKS: &str = "SELECT idx, pos, len, worker, node, start_ms, duration_ms, runs, spawn_ms, \
         compute_ms, store_ms FROM chunks WHERE job_id = $1 AND state = 'done' ORDER BY idx";
    pub const JOB_TIMES: &str =
        "SELECT created_at, started_at, callback_url IS NOT NULL AS has_callback FROM jobs WHERE id = $1";
    pub const FINISH_JOB: &str = "UPDATE jobs SET status = $2, finished_at = $3, timing = $4, error = $5, \
         chunks_running = 0, chunks_ready = 0, version = version + 1 \
         WHERE id = $1 AND status IN ('queued', 'running')";
    pub const DELETE_RESULTS: &str = "DELETE FROM results WHERE job_id = $1";
    /// The webhook is due now, and durable with the job's end.
    pub const WEBHOOK_DUE: &str = "INSERT INTO webhooks (job_id, url, state, attempts, next_at) \
         SELECT id, callback_url, 'pending', 0, $2 FROM jobs WHERE id = $1 AND callback_url IS NOT NULL \
         ON CONFLICT (job_id) DO NOTHING";
    pub const RELEASE_JOB_CHUNKS: &str = "UPDATE chunks SET state = 'pending', owner = NULL, lease_until = NULL \
         WHERE job_id = $1 AND state = 'running'";
    pub const JOB_STATUS_STRATEGY: &str = "SELECT status, strategy FROM jobs WHERE id = $1";
    pub const JOB_ATTEMPTS: &str =
        "SELECT attempts, max_attempts, attempt_errors FROM jobs WHERE id = $1 AND status = 'running'";
    pub const RECORD_ATTEMPT: &str =
        "UPDATE jobs SET attempts = $2, attempt_errors = $3, version = version + 1 WHERE id = $1";
    pub const PURGE_JOBS: &str = "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL \
         AND finished_at < $1 AND status IN ('succeeded', 'failed', 'canceled') ORDER BY finished_at LIMIT $2)";
    /// Of the jobs [`PURGE_JOBS`] deletes, those bigger than `$3` numbers
    /// (SQLite: those with a result file).
    pub const PURGEABLE_WITH_FILES: &str = "SELECT id FROM (SELECT id, count FROM jobs \
         WHERE finished_at IS NOT NULL AND finished_at < $1 AND status IN ('succeeded', 'failed', 'canceled') \
         ORDER BY finished_at LIMIT $2) WHERE count > $3";
    pub const PURGE_KEYS: &str = "DELETE FROM idempotency_keys WHERE key IN \
         (SELECT key FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2)";
    /// Comparisons older than the cutoff none of whose jobs is left (their
    /// jobs carry `metadata.comparison`).
    pub const PURGE_COMPARISONS: &str = "DELETE FROM comparisons WHERE id IN (SELECT c.id FROM comparisons c \
         WHERE c.created_at < $1 AND NOT EXISTS (SELECT 1 FROM job_metadata m \
         WHERE m.key = 'comparison' AND m.value = c.id) LIMIT $2)";
    pub const INSERT_COMPARISON: &str =
        "INSERT INTO comparisons (id, created_at, request, cells) VALUES ($1, $2, $3, $4)";
    pub const JOB_STATUS: &str = "SELECT status FROM jobs WHERE id = $1";
    pub const DELETE_JOB: &str = "DELETE FROM jobs WHERE id = $1";
    pub const WEBHOOK_HISTORY: &str = "SELECT history FROM webhooks WHERE job_id = $1";
    pub const WEBHOOK_RECORD: &str =
        "UPDATE webhooks SET state = $2, attempts = $3, next_at = $4, history = $5 WHERE job_id = $1";
    pub const BUMP_VERSION: &str = "UPDATE jobs SET version = version + 1 WHERE id = $1";
    pub const WEBHOOK_STATE: &str = "SELECT state, history FROM webhooks WHERE job_id = $1";
    pub const STATUS_AND_COUNT: &str = "SELECT status, count FROM jobs WHERE id = $1";
    /// From the segment holding `$2` (the last one starting at or before it)
    /// to `$3`, at most `$4` rows.
    pub const RESULT_SEGMENTS: &str = "SELECT pos, len, data FROM results WHERE job_id = $1 \
         AND pos >= (SELECT COALESCE(MAX(pos), 0) FROM results WHERE job_id = $1 AND pos <= $2) \
         AND pos < $3 ORDER BY pos LIMIT $4";
    pub const COMPARISON: &str = "SELECT created_at, request, cells FROM comparisons WHERE id = $1";
}

/// Jobs that can take a chunk now: below their cores, and not waiting behind
/// a running job of their series; `from` names the table (SQLite is told to
/// walk the `jobs_ready` index, which yields them in claim order, instead of
/// sorting every queued job).
pub(super) fn claim_candidates_sql(from: &str) -> String {
    format!(
        "SELECT id FROM {from} WHERE chunks_ready > 0 AND status IN ('queued', 'running') \
         AND chunks_running < CASE WHEN strategy = 'sequential' THEN 1 ELSE cores END \
         AND (series IS NULL OR status = 'running' OR NOT EXISTS \
         (SELECT 1 FROM jobs s WHERE s.series = j.series AND s.status = 'running')) \
         ORDER BY priority DESC, created_at, id LIMIT $1"
    )
}

/// The SQL of a claim of due webhook deliveries, with PostgreSQL's `lock`.
pub(super) fn claim_webhooks_sql(lock: &str) -> String {
    format!(
        "UPDATE webhooks SET next_at = $1 + $3 WHERE job_id IN (SELECT job_id FROM webhooks \
         WHERE state = 'pending' AND next_at <= $1 ORDER BY next_at LIMIT $2{lock}) \
         RETURNING job_id, url, attempts"
    )
}

/// The condition on `chunks` that picks which running chunks to release (`$1`).
pub(super) fn release_condition(which: Release<'_>) -> &'static str {
    match which {
        Release::ExpiredBefore(_) => "lease_until < $1",
        Release::Owner(_) => "owner = $1",
        Release::All => "$1 = $1",
    }
}

/// Puts running chunks matching `condition` back to pending, in running jobs.
pub(super) fn release_chunks_sql(condition: &str) -> String {
    format!(
        "UPDATE chunks SET state = 'pending', owner = NULL, lease_until = NULL \
         WHERE state = 'running' AND {condition} \
         AND job_id IN (SELECT id FROM jobs WHERE status = 'running') RETURNING job_id"
    )
}

/// The columns of [`q::CLAIMABLE_JOB`] a [`ClaimedJob`](crate::store::ClaimedJob) is built from.
pub(super) struct ClaimRow {
    pub count: i64,
    pub cores: i64,
    pub strategy: String,
    pub transport: Option<String>,
    pub sleep_ms: i64,
    pub spin: i64,
    pub range: (Option<i64>, Option<i64>, Option<i64>),
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub timeout_ms: Option<i64>,
    pub request_id: Option<String>,
}

impl ClaimRow {
    /// The job as [`q::START_JOB`] at `now` leaves it: started (once), its first attempt counted.
    pub fn into_job(self, id: uuid::Uuid, now: i64) -> StoreResult<crate::store::ClaimedJob> {
        let range = match self.range {
            (Some(start), Some(end), Some(step)) => Some(crate::domain::RangeSpec { start, end, step }),
            _ => None,
        };
        Ok(crate::store::ClaimedJob {
            id,
            count: self.count as u64,
            cores: self.cores as u32,
            strategy: parse_strategy(&self.strategy)?,
            transport: self.transport.as_deref().map(parse_transport).transpose()?,
            simulate: crate::domain::Simulate { sleep_ms: self.sleep_ms as u64, spin: self.spin as u64 },
            range,
            created_at: self.created_at,
            started_at: self.started_at.unwrap_or(now),
            attempts: self.attempts.max(1) as u32,
            max_attempts: self.max_attempts as u32,
            timeout_ms: self.timeout_ms.map(|t| t as u64),
            request_id: self.request_id,
        })
    }
}

/// The timing of an ending job from its done chunks, as JSON (`None` if it
/// never started), and its wall time in ms.
pub(super) fn timing_totals(
    created_at: i64,
    started_at: Option<i64>,
    chunks: Vec<DoneChunk>,
    now: i64,
) -> (Option<String>, f64) {
    let wall_ms = started_at.map_or(0.0, |s| (now - s) as f64 / 1000.0);
    let totals = TimingTotals {
        queue_ms: started_at.map_or(0.0, |s| (s - created_at) as f64 / 1000.0),
        wall_ms,
        spawn_ms: chunks.iter().map(|c| c.spawn_ms).sum(),
        compute_ms: chunks.iter().map(|c| c.compute_ms).sum(),
        store_ms: chunks.iter().map(|c| c.store_ms).sum(),
        chunks: Some(chunks.into_iter().map(|c| c.timing).collect()),
    };
    (started_at.map(|_| serde_json::to_string(&totals).expect("timing serialises")), wall_ms)
}

/// A done chunk from a [`q::DONE_CHUNKS`] row, whatever the driver:
/// `worker`, `node` and the times are NULL until a chunk is done.
#[allow(clippy::too_many_arguments)]
pub(super) fn done_chunk(
    idx: i64,
    pos: i64,
    len: i64,
    worker: Option<String>,
    node: Option<String>,
    times: [Option<f64>; 5],
    runs: i64,
) -> DoneChunk {
    let [start_ms, duration_ms, spawn_ms, compute_ms, store_ms] = times.map(|t| t.unwrap_or(0.0));
    DoneChunk {
        timing: ChunkTiming {
            index: idx as u32,
            offset: pos as u64,
            len: len as u64,
            worker: worker.unwrap_or_default(),
            node: node.unwrap_or_default(),
            start_ms: round_ms(start_ms),
            duration_ms: round_ms(duration_ms),
            runs: runs as u32,
        },
        spawn_ms,
        compute_ms,
        store_ms,
    }
}

/// Adds one job's claim to a claim pass. A corrupt job is logged and skipped:
/// one bad job must not stop every other job from being claimed.
pub(super) fn add_claim(
    claims: &mut Vec<crate::store::Claim>,
    free: &mut u32,
    id: Uuid,
    claimed: StoreResult<Option<crate::store::Claim>>,
) -> StoreResult<()> {
    match claimed {
        Ok(Some(claim)) => {
            *free -= claim.chunks.len() as u32;
            claims.push(claim);
        }
        Ok(None) => {}
        Err(e @ StoreError::Corrupt(_)) => tracing::error!(job = %id, error = %e, "skipping a job"),
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Adds what claiming job `id` gave to a lane's batch (each backend's
/// `claim_batch`: one chunk of the next claimable job and, when it is
/// [`batchable`], up to `jobs - 1` batchable jobs right behind it) and says
/// whether to try the next candidate. The first claim passes over a job it
/// cannot take; after it, the batch stops at the first one (so none jumps
/// the queue), at a job that is not batchable, or at `jobs`. A corrupt job
/// is logged and skipped, as in [`add_claim`].
pub(super) fn add_to_batch(
    claims: &mut Vec<crate::store::Claim>,
    jobs: u32,
    id: Uuid,
    claimed: StoreResult<Option<(crate::store::Claim, bool)>>,
) -> StoreResult<bool> {
    let first = claims.is_empty();
    match claimed {
        Ok(Some((claim, batchable))) => {
            claims.push(claim);
            Ok(batchable && claims.len() < jobs as usize)
        }
        Ok(None) => Ok(first),
        Err(e @ StoreError::Corrupt(_)) => {
            tracing::error!(job = %id, error = %e, "skipping a job");
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// How many chunks a claim of up to `max` takes from a job with these counters.
pub(super) fn chunks_to_take(strategy: Strategy, cores: i64, running: i64, ready: i64, max: u32) -> i64 {
    let cores = match strategy {
        Strategy::Sequential => 1,
        _ => cores,
    };
    (cores - running).min(ready).min(i64::from(max))
}

/// A webhook row after one more delivery attempt: state, attempts, next
/// attempt time and history (JSON), from the stored `history`.
pub(super) fn webhook_record(
    history: &str,
    attempt: &crate::domain::DeliveryAttempt,
    outcome: super::WebhookOutcome,
) -> StoreResult<(&'static str, i64, i64, String)> {
    let mut attempts: Vec<crate::domain::DeliveryAttempt> = parse_json(history)?;
    attempts.push(attempt.clone());
    let (state, next_at) = match outcome {
        super::WebhookOutcome::Delivered => ("delivered", 0),
        super::WebhookOutcome::Retry { next_at } => ("pending", next_at),
        super::WebhookOutcome::Failed => ("failed", 0),
    };
    Ok((state, attempts.len() as i64, next_at, serde_json::to_string(&attempts).expect("attempts serialise")))
}

/// The attempt errors (JSON) after attempt `attempts` failed with `error`, or
/// `None` when no attempt remains.
pub(super) fn next_attempt(
    attempts: u32,
    max_attempts: u32,
    errors: &str,
    error: &crate::domain::Problem,
    now: i64,
) -> StoreResult<Option<String>> {
    if attempts >= max_attempts {
        return Ok(None);
    }
    let mut errors: Vec<crate::domain::AttemptError> = parse_json(errors)?;
    errors.push(crate::domain::AttemptError {
        attempt: attempts,
        at: crate::domain::rfc3339(now),
        error: error.clone(),
    });
    Ok(Some(serde_json::to_string(&errors).expect("attempt errors serialise")))
}

/// Whether a claim reads the job's input along (see `Claim::input`).
pub(super) fn prefetch_input(job: &crate::store::ClaimedJob) -> bool {
    job.range.is_none() && job.count <= crate::domain::SEGMENT_LEN
}

/// Rows per multi-row INSERT (well under both backends' parameter limits).
pub(super) const INSERT_BATCH: usize = 1000;

/// The most numbers a job may have to be claimed in a batch behind another.
pub(super) const BATCH_MAX_COUNT: i64 = 4096;

/// Whether a claimable job may go in one lane's batch (see
/// `Store::complete_chunks`): one chunk of a few numbers, with no simulated
/// work, on a thread — microseconds of work, so the jobs behind it in the
/// batch hardly wait, while the batch saves a round trip per job.
pub(super) fn batchable(row: &ClaimRow, chunks_total: i64) -> bool {
    chunks_total == 1
        && row.count <= BATCH_MAX_COUNT
        && row.sleep_ms == 0
        && row.spin == 0
        && row.strategy != Strategy::Processes.as_str()
}

/// How many candidate jobs one claim pass looks at.
pub(super) const CLAIM_WINDOW: i64 = 16;

pub(super) fn parse_uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("job id {s:?}: {e}")))
}

pub(super) fn parse_status(s: &str) -> StoreResult<JobStatus> {
    JobStatus::parse(s).ok_or_else(|| StoreError::Corrupt(format!("status {s:?}")))
}

pub(super) fn parse_strategy(s: &str) -> StoreResult<Strategy> {
    Strategy::parse(s).ok_or_else(|| StoreError::Corrupt(format!("strategy {s:?}")))
}

pub(super) fn parse_transport(s: &str) -> StoreResult<Transport> {
    Transport::parse(s).ok_or_else(|| StoreError::Corrupt(format!("transport {s:?}")))
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{e} in {s:?}")))
}

/// Rounds a duration in ms to microseconds, for readable documents.
pub(super) fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// Which running chunks to release.
#[derive(Clone, Copy)]
pub(super) enum Release<'a> {
    /// Whose lease ran out before this time (their node died).
    ExpiredBefore(i64),
    /// Of this node (it is shutting down or restarting).
    Owner(&'a str),
    /// Every one (a single-node database at start-up).
    All,
}

/// Channel that wakes idle schedulers when work arrives.
pub const WORK_CHANNEL: &str = "squared_work";
/// Channel that tells every node a job ended (payload: "ID STATUS").
pub const JOBS_CHANNEL: &str = "squared_jobs";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{JobSpec, Limits};

    fn row(timing: Option<&str>, callback_url: Option<&str>) -> JobRow {
        let limits = Limits {
            default_cores: 2,
            max_cores_per_job: 16,
            max_numbers: 100,
            max_chunks: 10,
            max_sleep_ms: 0,
            max_spin: 0,
        };
        let spec = JobSpec::parse(br#"{"numbers": [1, 2, 3]}"#, &limits).unwrap();
        JobRow {
            id: "0192f0c4-0000-7000-8000-000000000001".into(),
            status: "succeeded".into(),
            created_at: 1_000_000,
            started_at: Some(1_001_000),
            finished_at: Some(1_003_000),
            request: serde_json::to_string(&spec.echo()).unwrap(),
            attempts: 1,
            attempt_errors: "[]".into(),
            chunks_total: 1,
            chunks_done: 1,
            numbers_done: 3,
            timing: timing.map(str::to_string),
            error: None,
            version: 4,
            callback_url: callback_url.map(str::to_string),
        }
    }

    #[test]
    fn a_row_whose_timing_keeps_its_chunks_needs_nothing_more() {
        let chunk = r#"{"index":0,"offset":0,"len":3,"worker":"thread 0","node":"n","start_ms":0.1,"duration_ms":0.2,"runs":1}"#;
        let timing = format!(
            r#"{{"queue_ms":1.0,"wall_ms":2.0,"spawn_ms":0.0,"compute_ms":0.1,"store_ms":0.3,"chunks":[{chunk}]}}"#
        );
        let (doc, needs) = row(Some(&timing), None).into_document().unwrap();
        assert!(!needs.chunk_timings);
        assert_eq!(needs.callback, None);
        let timing = doc.timing.unwrap();
        assert_eq!((timing.wall_ms, timing.chunks.len(), timing.chunks[0].worker.as_str()), (2.0, 1, "thread 0"));
        assert_eq!((doc.status, doc.version, doc.progress.numbers_done), (JobStatus::Succeeded, 4, 3));
    }

    /// Rows written before `jobs.timing` kept the chunks: the caller reads
    /// them from the chunks table; a callback URL asks for the webhook row.
    #[test]
    fn an_older_row_asks_for_its_chunk_timings_and_a_callback_for_its_webhook() {
        let timing = r#"{"queue_ms":1.0,"wall_ms":2.0,"spawn_ms":0.0,"compute_ms":0.1,"store_ms":0.3}"#;
        let (doc, needs) = row(Some(timing), Some("https://example.com/hook")).into_document().unwrap();
        assert!(needs.chunk_timings);
        assert_eq!(needs.callback.as_deref(), Some("https://example.com/hook"));
        assert!(doc.timing.unwrap().chunks.is_empty());
        let waiting = callback("https://example.com/hook".into(), None).unwrap();
        assert_eq!((waiting.state.as_str(), waiting.attempts.len()), ("waiting", 0));
        let (_, queued) = row(None, None).into_document().unwrap();
        assert!(!queued.chunk_timings, "a job that has not ended has no timing to complete");
    }
}
