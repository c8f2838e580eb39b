//! Durable state: jobs, their inputs, chunks and result segments. The only
//! module that writes SQL.
//!
//! The model is built around chunks: each chunk has its own state, its
//! squares are stored segment by segment as they are computed, and it turns
//! `done` once all of them are stored. A job that was running when its node
//! died is put back in the queue and only its chunks that are not `done` run
//! again.

mod sqlite;

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::domain::{ChunkPlan, JobSpec, JobStatus, Problem, RangeSpec, Simulate, Strategy, Transport};

pub use sqlite::Store;

/// Store failures. Details are logged, never sent to clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported database URL {0:?}: use sqlite://PATH")]
    UnsupportedUrl(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A job to insert, with everything the 202 answer promises is stored.
pub struct NewJob<'a> {
    pub id: Uuid,
    pub spec: &'a JobSpec,
    pub created_at: i64,
    pub chunks: &'a [ChunkPlan],
    pub idempotency: Option<IdempotencyKey>,
    /// Refuse the job if this many jobs are already queued.
    pub max_queued: Option<u64>,
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

/// The head of the queue, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub id: Uuid,
    pub cores: u32,
    pub strategy: Strategy,
    pub chunks_total: u64,
}

/// A job the scheduler has started, with the chunks it still has to run.
#[derive(Debug, Clone)]
pub struct StartedJob {
    pub id: Uuid,
    pub count: u64,
    pub cores: u32,
    pub strategy: Strategy,
    pub transport: Option<Transport>,
    pub simulate: Simulate,
    pub range: Option<RangeSpec>,
    pub created_at: i64,
    pub started_at: i64,
    pub attempts: u32,
    pub max_attempts: u32,
    pub timeout_ms: Option<u64>,
    pub chunks: Vec<ChunkPlan>,
}

/// What a finished chunk reports.
#[derive(Debug, Clone)]
pub struct ChunkRecord {
    pub worker: String,
    pub node: String,
    pub start_ms: f64,
    pub duration_ms: f64,
    pub compute_ms: f64,
    pub store_ms: f64,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Finish {
    pub status: JobStatus,
    pub finished_at: i64,
    /// Measured by the runner with a monotonic clock.
    pub wall_ms: f64,
    pub spawn_ms: f64,
    pub error: Option<Problem>,
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
