//! Durable state: jobs, their inputs, chunks and result segments. The only
//! module that writes SQL.
//!
//! The model is built around chunks: each chunk has its own state, its
//! squares are stored segment by segment as they are computed, and it turns
//! `done` once all of them are stored. Nodes *claim* chunks (under a lease
//! their heartbeat extends); a chunk whose node died is released when its
//! lease expires and re-run by whichever node claims it next, and a chunk that
//! is `done` is never run again. The node that completes a job's last chunk
//! ends the job.
//!
//! Two backends share one text of SQL ([`sql`]): SQLite (one machine, the
//! default; writes run on one thread in batched transactions, see
//! [`sqlite_writer`], reads on a few threads of their own, see
//! [`sqlite_readers`]) and PostgreSQL (several nodes on one database, claiming
//! with `FOR UPDATE SKIP LOCKED`, woken by LISTEN/NOTIFY). On SQLite, the
//! squares of a job bigger than one segment live in a file of their own
//! beside the database ([`result_files`]).

mod postgres;
mod result_files;
mod sql;
mod sqlite;
mod sqlite_readers;
mod sqlite_writer;

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::domain::{
    ChunkPlan, DeliveryAttempt, JobDocument, JobSpec, JobStatus, Problem, Progress, RangeSpec, Simulate, Strategy,
    Transport,
};

pub use postgres::PgStore;
pub use result_files::{ResultFile, ResultFiles};
use sql::Release;
pub use sql::{JOBS_CHANNEL, WORK_CHANNEL};
pub use sqlite::SqliteStore;

/// Store failures. Details are logged, never sent to clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("SQLite thread: {0}")]
    Thread(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("result file: {0}")]
    File(#[from] std::io::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// Whether retrying later may succeed: the database is unreachable,
    /// restarting, or busy, rather than the request being wrong.
    pub fn is_transient(&self) -> bool {
        if let StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) = self {
            return matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked);
        }
        if let StoreError::Overloaded(_) = self {
            return true;
        }
        let StoreError::Database(e) = self else { return false };
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // PostgreSQL: connection exceptions (08…), shutdown and
                // restart (57P…), serialisation and deadlock retries.
                // SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6); sqlx reports
                // extended codes, whose low byte is the primary code.
                let sqlite_primary = code.parse::<i32>().ok().map(|c| c & 0xff);
                code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "40001"
                    || code == "40P01"
                    || matches!(sqlite_primary, Some(5 | 6))
            }),
            _ => false,
        }
    }
}

/// Which SQL dialect a backend speaks, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A job to insert, with everything the 202 answer promises is stored.
pub struct NewJob<'a> {
    pub id: Uuid,
    pub spec: &'a JobSpec,
    pub created_at: i64,
    pub chunks: &'a [ChunkPlan],
    pub idempotency: Option<IdempotencyKey>,
    /// Refuse the job if this many jobs are already queued.
    pub max_queued: Option<u64>,
    /// Jobs of one series run one at a time, oldest first (a comparison's runs).
    pub series: Option<Uuid>,
    /// The submission's `x-request-id`, carried into the job's logs.
    pub request_id: Option<String>,
    /// Claim work for this many free cores of a node in the same write,
    /// where the backend can (SQLite; see `Store::insert_job`).
    pub claim: Option<(NextClaim<'a>, u32)>,
}

/// An `Idempotency-Key` with the hash of the body it came with.
pub struct IdempotencyKey {
    pub key: String,
    pub body_hash: String,
    pub expires_at: i64,
}

/// What inserting a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    New,
    /// The idempotency key was used before with the same body: that job.
    Existing(Uuid),
    /// The idempotency key was used before with another body.
    KeyReused,
    /// `max_queued` jobs are already waiting.
    QueueFull,
}

/// What canceling a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canceled {
    NotFound,
    /// It had already ended.
    Ended(JobStatus),
    /// It is canceled now; `was_running` says whether workers must be stopped.
    Now {
        was_running: bool,
        strategy: Strategy,
    },
}

/// What a node needs to run chunks of a job.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: Uuid,
    pub count: u64,
    pub cores: u32,
    pub strategy: Strategy,
    pub transport: Option<Transport>,
    pub simulate: Simulate,
    pub range: Option<RangeSpec>,
    pub created_at: i64,
    /// When the job first started (any node), in µs since the epoch.
    pub started_at: i64,
    pub attempts: u32,
    pub max_attempts: u32,
    pub timeout_ms: Option<u64>,
    pub request_id: Option<String>,
}

/// Chunks a node claimed, with their job.
#[derive(Debug, Clone)]
pub struct Claim {
    pub job: ClaimedJob,
    pub chunks: Vec<ChunkPlan>,
    /// The job's whole input, read with the claim, when it is a list that
    /// fits one segment (every tiny job): its lanes need not read it again.
    pub input: Option<Vec<i64>>,
}

/// What a finished chunk reports.
#[derive(Debug, Clone)]
pub struct ChunkRecord {
    pub worker: String,
    pub node: String,
    pub start_ms: f64,
    pub duration_ms: f64,
    /// Starting the worker that ran it, when this chunk was the worker's first.
    pub spawn_ms: f64,
    pub compute_ms: f64,
    pub store_ms: f64,
}

/// What completing a chunk did.
#[derive(Debug, Clone)]
pub struct Completion {
    pub progress: Progress,
    /// Set when this was the job's last chunk: the job has succeeded, in this many ms of wall time.
    pub finished_wall_ms: Option<f64>,
    /// When the job finished and the completion asked for it ([`NextClaim`]):
    /// the node's next claim, `None` when no work is waiting.
    pub next: Option<Claim>,
}

/// Asks `complete_chunk` (or `complete_chunks`) to claim the next work for
/// `node` once the job is finished, in the same round trip: the lane that ran
/// the last chunk goes straight on to the next job.
#[derive(Debug, Clone, Copy)]
pub struct NextClaim<'a> {
    pub node: &'a str,
    pub lease_until: i64,
}

/// A job's only chunk, run and waiting to be stored with others by
/// `complete_chunks`.
#[derive(Debug, Clone)]
pub struct RanChunk {
    pub id: Uuid,
    pub chunk: ChunkPlan,
    pub record: ChunkRecord,
    /// The chunk's squares (one segment), from its offset.
    pub squares: Option<(u64, Vec<i64>)>,
}

/// What `complete_chunks` did: one entry per chunk (as `complete_chunk`
/// answers), and the lane's next claims.
#[derive(Debug, Clone)]
pub struct Completions {
    pub done: Vec<Option<Completion>>,
    pub next: Vec<Claim>,
}

/// What a webhook delivery attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    Delivered,
    /// Try again at this time (µs since the epoch).
    Retry {
        next_at: i64,
    },
    /// Given up: attempts exhausted, or the destination is refused.
    Failed,
}

/// A stored comparison: its request and cells (JSON, as the API wrote them).
#[derive(Debug, Clone)]
pub struct StoredComparison {
    pub id: Uuid,
    pub created_at: i64,
    pub request: String,
    pub cells: String,
}

/// What a comparison needs to know of one of its jobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobSummary {
    pub id: Uuid,
    pub status: JobStatus,
    pub wall_ms: Option<f64>,
}

/// A listing request.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<JobStatus>,
    pub metadata: BTreeMap<String, String>,
    /// Only jobs older than this id (the cursor).
    pub before: Option<Uuid>,
    pub limit: u32,
}

/// The answer to deleting a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Yes,
    NotFound,
    /// Still queued or running.
    Busy(JobStatus),
}

/// One stored result segment.
#[derive(Debug, Clone)]
pub struct Segment {
    pub pos: u64,
    pub data: Vec<u8>,
}

/// The store, on whichever backend the database URL names. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Forwards each listed method to the backend.
macro_rules! delegate {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $(
                $(#[$doc])*
                pub async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match self {
                        Store::Sqlite(s) => s.$name($($arg),*).await,
                        Store::Postgres(s) => s.$name($($arg),*).await,
                    }
                }
            )*
        }
    };
}

impl Store {
    /// Whether `insert_job` claims work for `NewJob::claim` (SQLite: in the
    /// same transaction; PostgreSQL leaves it to the claim loop).
    pub fn claims_with_insert(&self) -> bool {
        matches!(self, Store::Sqlite(_))
    }

    /// Where a lane writes job `id`'s squares itself, when the job has a
    /// result file (SQLite, more than one segment: see [`result_files`]);
    /// `None` when they go through `put_segment`/`complete_chunk`. A chunk
    /// written there must be `sync`ed before it is completed.
    pub fn result_file(&self, id: Uuid, count: u64) -> StoreResult<Option<ResultFile>> {
        match self {
            Store::Sqlite(s) if result_files::in_file(count) => s.result_file(id),
            _ => Ok(None),
        }
    }
}

delegate! {
    /// Whether the database answers.
    fn ping(&self) -> StoreResult<()>;
    /// Stores a new job with its input and chunks, in one transaction; or,
    /// for a known idempotency key or a full queue, says why not. With
    /// `job.claim`, a new job's transaction on SQLite also claims work (this
    /// job or any before it in claim order) for the free cores: `Some` with
    /// the claims when it tried, `None` when it did not or the claim failed.
    fn insert_job(&self, job: &NewJob<'_>) -> StoreResult<(Inserted, Option<Vec<Claim>>)>;
    /// The job document, or `None` for an unknown id.
    fn job(&self, id: Uuid) -> StoreResult<Option<JobDocument>>;
    /// A job's status and number count, or `None` for an unknown id.
    fn status_and_count(&self, id: Uuid) -> StoreResult<Option<(JobStatus, u64)>>;
    /// A page of jobs, newest first.
    fn list_jobs(&self, query: &ListQuery) -> StoreResult<Vec<JobDocument>>;
    /// How many jobs are queued (the whole database).
    fn queued_count(&self) -> StoreResult<u64>;
    /// Claims up to `lanes` chunks for `node`, highest priority first, never
    /// more chunks of one job running at once than its cores.
    fn claim(&self, node: &str, lanes: u32, lease_until: i64) -> StoreResult<Vec<Claim>>;
    /// Claims one more chunk of a job this node is running, if it may.
    fn claim_next(&self, id: Uuid, node: &str, lease_until: i64) -> StoreResult<Option<ChunkPlan>>;
    /// Extends the leases of `node`'s chunks; returns which of `local` jobs are no longer running.
    fn heartbeat(&self, node: &str, lease_until: i64, local: &[Uuid]) -> StoreResult<Vec<Uuid>>;
    /// The stored input segment starting at `pos` (a multiple of the segment length).
    fn input_segment(&self, id: Uuid, pos: u64) -> StoreResult<Vec<i64>>;
    /// Stores one result segment while `node` owns the chunk; false once it does not.
    fn put_segment(&self, id: Uuid, chunk: u32, node: &str, pos: u64, squares: &[i64]) -> StoreResult<bool>;
    /// Stores the chunk's `last` segment (if given), marks the chunk done and,
    /// for the job's last chunk, ends the job — one transaction; `None` if
    /// `node` no longer owns the chunk. With `next`, a finished job's lane
    /// also gets its next claim (see [`Completion::next`]).
    fn complete_chunk(&self, id: Uuid, chunk: &ChunkPlan, record: &ChunkRecord, last: Option<(u64, &[i64])>, now: i64, next: Option<NextClaim<'_>>) -> StoreResult<Option<Completion>>;
    /// `complete_chunk` for many jobs' only chunks in one transaction; with
    /// `next` and once one of them finished, claims up to `jobs` jobs for the
    /// lane: the next claimable job and, when it is small, the small jobs
    /// right behind it in claim order (see `sql::batchable`).
    fn complete_chunks(&self, ran: &[RanChunk], now: i64, next: Option<NextClaim<'_>>, jobs: u32) -> StoreResult<Completions>;
    /// Ends a job as failed (first ending wins); false if it had already ended.
    fn fail_job(&self, id: Uuid, problem: &Problem, now: i64) -> StoreResult<bool>;
    /// Cancels a job that has not ended, dropping any partial result.
    fn cancel_job(&self, id: Uuid, now: i64, problem: &Problem) -> StoreResult<Canceled>;
    /// Records a failed attempt of a running job and starts the next; returns
    /// the new attempt count, or `None` when none remain (or it is not running).
    fn record_attempt_error(&self, id: Uuid, error: &Problem, now: i64) -> StoreResult<Option<u32>>;
    /// Result segments overlapping `[from, to)`, in order, bounded in rows and numbers.
    fn result_segments(&self, id: Uuid, from: u64, to: u64, max_rows: u32, max_numbers: u64) -> StoreResult<Vec<Segment>>;
    /// Claims up to `limit` due webhook deliveries for `lease` µs: (job, url, attempts so far).
    fn claim_webhooks(&self, now: i64, limit: u32, lease: i64) -> StoreResult<Vec<(Uuid, String, u32)>>;
    /// Records one delivery attempt and what follows from it.
    fn record_webhook(&self, id: Uuid, attempt: &DeliveryAttempt, outcome: WebhookOutcome) -> StoreResult<()>;
    /// Stores a comparison whose jobs exist already.
    fn insert_comparison(&self, comparison: &StoredComparison) -> StoreResult<()>;
    /// A comparison, or `None` for an unknown id.
    fn comparison(&self, id: Uuid) -> StoreResult<Option<StoredComparison>>;
    /// Status and wall time of each job in `ids` that exists.
    fn job_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<JobSummary>>;
    /// Deletes a job that has ended, with its result.
    fn delete_job(&self, id: Uuid) -> StoreResult<Deleted>;
    /// Deletes up to `batch` jobs that finished before `cutoff`, expired
    /// idempotency keys, and comparisons from before `cutoff` whose jobs are all gone.
    fn purge_finished(&self, cutoff: i64, now: i64, batch: u32) -> StoreResult<u64>;
}

impl Store {
    /// Puts running chunks back to pending (in jobs still running); returns how many.
    async fn release_where(&self, which: Release<'_>) -> StoreResult<u64> {
        match self {
            Store::Sqlite(s) => s.release_where(which).await,
            Store::Postgres(s) => s.release_where(which).await,
        }
    }

    /// Releases running chunks whose lease expired (their node died); returns how many.
    pub async fn rescue_expired(&self, now: i64) -> StoreResult<u64> {
        self.release_where(Release::ExpiredBefore(now)).await
    }

    /// Releases the running chunks of `owner` (every owner for `None`); returns how many.
    pub async fn release_chunks(&self, owner: Option<&str>) -> StoreResult<u64> {
        match owner {
            Some(owner) => self.release_where(Release::Owner(owner)).await,
            None => self.release_where(Release::All).await,
        }
    }

    /// Opens the database at `url` (`sqlite://PATH`, created when missing, or
    /// `postgres://…`) and applies its migrations.
    pub async fn open(url: &str, pool_size: u32) -> StoreResult<Store> {
        if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(SqliteStore::open(url, pool_size).await?))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Store::Postgres(PgStore::open(url, pool_size).await?))
        } else {
            Err(StoreError::UnsupportedUrl(url.to_string()))
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Store::Sqlite(_) => Dialect::Sqlite,
            Store::Postgres(_) => Dialect::Postgres,
        }
    }
}
