//! The SQLite store: one file, WAL mode, one writer connection (SQLite allows
//! one writer at a time; queueing in the pool beats retrying on `SQLITE_BUSY`)
//! and a pool of readers that never wait for it.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use super::{
    Canceled, ChunkRecord, Deleted, Finish, Inserted, ListQuery, NewJob, QueuedJob, Segment, StartedJob, StoreError,
    StoreResult,
};
use crate::domain::{
    rfc3339, AttemptError, ChunkPlan, ChunkTiming, Input, JobDocument, JobLinks, JobStatus, Problem, Progress,
    RangeSpec, RequestEcho, Simulate, Strategy, Timing, Transport, SEGMENT_LEN,
};
use crate::exec::le_bytes;

/// Rows per multi-row INSERT (SQLite allows 32,766 bound parameters).
const INSERT_BATCH: usize = 1000;

const JOB_COLUMNS: &str = "id, status, created_at, started_at, finished_at, request, attempts, \
     attempt_errors, chunks_total, chunks_done, numbers_done, timing, error, version";

/// The SQLite-backed store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: SqlitePool,
    readers: SqlitePool,
}

/// Totals kept in `jobs.timing` once a job has run.
#[derive(serde::Serialize, serde::Deserialize)]
struct TimingTotals {
    queue_ms: f64,
    wall_ms: f64,
    spawn_ms: f64,
    compute_ms: f64,
    store_ms: f64,
}

impl Store {
    /// Opens (creating when missing) the database at `url` and applies migrations.
    pub async fn open(url: &str, readers: u32) -> StoreResult<Store> {
        if !url.starts_with("sqlite:") {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(readers.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Store { writer, readers })
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    /// Stores a new job with its input and chunks, in one transaction; or,
    /// for a known idempotency key or a full queue, says why not.
    pub async fn insert_job(&self, job: &NewJob<'_>) -> StoreResult<Inserted> {
        let spec = job.spec;
        let echo = serde_json::to_string(&spec.echo()).expect("the echo serialises");
        let range = match &spec.input {
            Input::Range(r) => Some(*r),
            Input::List(_) => None,
        };
        let id = job.id.to_string();
        let mut tx = self.writer.begin().await?;
        if let Some(key) = &job.idempotency {
            let known = sqlx::query("SELECT body_hash, job_id FROM idempotency_keys WHERE key = ? AND expires_at > ?")
                .bind(&key.key)
                .bind(job.created_at)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(known) = known {
                let hash: String = known.get("body_hash");
                return Ok(match hash == key.body_hash {
                    true => Inserted::Existing(parse_uuid(known.get("job_id"))?),
                    false => Inserted::KeyReused,
                });
            }
            sqlx::query(
                "INSERT INTO idempotency_keys (key, body_hash, job_id, expires_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (key) DO UPDATE SET body_hash = excluded.body_hash, job_id = excluded.job_id, \
                 expires_at = excluded.expires_at",
            )
            .bind(&key.key)
            .bind(&key.body_hash)
            .bind(&id)
            .bind(key.expires_at)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(max) = job.max_queued {
            let queued: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetch_one(&mut *tx).await?;
            if queued as u64 >= max {
                return Ok(Inserted::QueueFull);
            }
        }
        sqlx::query(
            "INSERT INTO jobs (id, status, priority, created_at, count, cores, strategy, transport, sleep_ms, spin, \
             range_start, range_end, range_step, chunks_total, max_attempts, timeout_ms, request) \
             VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(spec.priority)
        .bind(job.created_at)
        .bind(spec.count as i64)
        .bind(spec.cores as i64)
        .bind(spec.strategy.as_str())
        .bind(spec.transport.map(Transport::as_str))
        .bind(spec.simulate.sleep_ms as i64)
        .bind(spec.simulate.spin as i64)
        .bind(range.map(|r| r.start))
        .bind(range.map(|r| r.end))
        .bind(range.map(|r| r.step))
        .bind(job.chunks.len() as i64)
        .bind(spec.max_attempts as i64)
        .bind(spec.timeout_ms.map(|t| t as i64))
        .bind(echo)
        .execute(&mut *tx)
        .await?;
        for (key, value) in &spec.metadata {
            sqlx::query("INSERT INTO job_metadata (job_id, key, value) VALUES (?, ?, ?)")
                .bind(&id)
                .bind(key)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        if let Input::List(numbers) = &spec.input {
            for (i, segment) in numbers.chunks(SEGMENT_LEN as usize).enumerate() {
                sqlx::query("INSERT INTO job_inputs (job_id, pos, data) VALUES (?, ?, ?)")
                    .bind(&id)
                    .bind((i as u64 * SEGMENT_LEN) as i64)
                    .bind(&*le_bytes(segment))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        for batch in job.chunks.chunks(INSERT_BATCH) {
            let mut insert = QueryBuilder::<Sqlite>::new("INSERT INTO chunks (job_id, idx, pos, len) ");
            insert.push_values(batch, |mut row, chunk| {
                row.push_bind(&id)
                    .push_bind(chunk.index as i64)
                    .push_bind(chunk.offset as i64)
                    .push_bind(chunk.len as i64);
            });
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Inserted::New)
    }

    /// The job document, or `None` for an unknown id.
    pub async fn job(&self, id: Uuid) -> StoreResult<Option<JobDocument>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.readers)
            .await?;
        match row {
            Some(row) => Ok(Some(self.document(&row).await?)),
            None => Ok(None),
        }
    }

    /// A job's status, or `None` for an unknown id.
    pub async fn status(&self, id: Uuid) -> StoreResult<Option<JobStatus>> {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.readers)
            .await?;
        status.map(|s| parse_status(&s)).transpose()
    }

    /// A job's status and number count, or `None` for an unknown id.
    pub async fn status_and_count(&self, id: Uuid) -> StoreResult<Option<(JobStatus, u64)>> {
        let row = sqlx::query("SELECT status, count FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.readers)
            .await?;
        row.map(|r| Ok((parse_status(r.get("status"))?, r.get::<i64, _>("count") as u64))).transpose()
    }

    /// A page of jobs, newest first.
    pub async fn list_jobs(&self, query: &ListQuery) -> StoreResult<Vec<JobDocument>> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1"));
        if let Some(status) = query.status {
            sql.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(before) = query.before {
            sql.push(" AND id < ").push_bind(before.to_string());
        }
        for (key, value) in &query.metadata {
            sql.push(" AND id IN (SELECT job_id FROM job_metadata WHERE key = ")
                .push_bind(key.clone())
                .push(" AND value = ")
                .push_bind(value.clone())
                .push(")");
        }
        sql.push(" ORDER BY id DESC LIMIT ").push_bind(query.limit as i64);
        let rows = sql.build().fetch_all(&self.readers).await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            jobs.push(self.document(row).await?);
        }
        Ok(jobs)
    }

    async fn document(&self, row: &SqliteRow) -> StoreResult<JobDocument> {
        let id = parse_uuid(row.get("id"))?;
        let status = parse_status(row.get("status"))?;
        let request: RequestEcho = parse_json(row.get("request"))?;
        let timing: Option<String> = row.get("timing");
        let timing = match timing {
            None => None,
            Some(json) => {
                let totals: TimingTotals = parse_json(&json)?;
                let chunks = self.chunk_timings(id).await?;
                Some(Timing {
                    queue_ms: totals.queue_ms,
                    wall_ms: totals.wall_ms,
                    spawn_ms: totals.spawn_ms,
                    compute_ms: totals.compute_ms,
                    store_ms: totals.store_ms,
                    chunks,
                })
            }
        };
        let error: Option<String> = row.get("error");
        let started_at: Option<i64> = row.get("started_at");
        let finished_at: Option<i64> = row.get("finished_at");
        Ok(JobDocument {
            id,
            status,
            created_at: rfc3339(row.get("created_at")),
            started_at: started_at.map(rfc3339),
            finished_at: finished_at.map(rfc3339),
            request,
            attempts: row.get::<i64, _>("attempts") as u32,
            attempt_errors: parse_json(row.get("attempt_errors"))?,
            progress: Progress {
                chunks_done: row.get::<i64, _>("chunks_done") as u64,
                chunks_total: row.get::<i64, _>("chunks_total") as u64,
                numbers_done: row.get::<i64, _>("numbers_done") as u64,
            },
            timing,
            error: error.map(|e| parse_json::<Problem>(&e)).transpose()?,
            links: JobLinks::for_job(id),
            version: row.get::<i64, _>("version") as u64,
        })
    }

    async fn chunk_timings(&self, id: Uuid) -> StoreResult<Vec<ChunkTiming>> {
        let rows = sqlx::query(
            "SELECT idx, pos, len, worker, node, start_ms, duration_ms FROM chunks \
             WHERE job_id = ? AND state = 'done' ORDER BY idx",
        )
        .bind(id.to_string())
        .fetch_all(&self.readers)
        .await?;
        Ok(rows
            .iter()
            .map(|r| ChunkTiming {
                index: r.get::<i64, _>("idx") as u32,
                offset: r.get::<i64, _>("pos") as u64,
                len: r.get::<i64, _>("len") as u64,
                worker: r.get::<Option<String>, _>("worker").unwrap_or_default(),
                node: r.get::<Option<String>, _>("node").unwrap_or_default(),
                start_ms: r.get::<Option<f64>, _>("start_ms").unwrap_or(0.0),
                duration_ms: r.get::<Option<f64>, _>("duration_ms").unwrap_or(0.0),
            })
            .collect())
    }

    /// The next queued jobs: highest priority first, then oldest.
    pub async fn queued(&self, limit: u32) -> StoreResult<Vec<QueuedJob>> {
        let rows = sqlx::query(
            "SELECT id, cores, strategy, chunks_total FROM jobs WHERE status = 'queued' \
             ORDER BY priority DESC, created_at, id LIMIT ?",
        )
        .bind(limit as i64)
        .fetch_all(&self.writer)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(QueuedJob {
                    id: parse_uuid(r.get("id"))?,
                    cores: r.get::<i64, _>("cores") as u32,
                    strategy: parse_strategy(r.get("strategy"))?,
                    chunks_total: r.get::<i64, _>("chunks_total") as u64,
                })
            })
            .collect()
    }

    /// How many jobs are queued.
    pub async fn queued_count(&self) -> StoreResult<u64> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetch_one(&self.readers).await?;
        Ok(n as u64)
    }

    /// Moves a queued job to running and claims its unfinished chunks for
    /// `node`. `None` if the job is no longer queued.
    pub async fn start_job(&self, id: Uuid, node: &str, now: i64) -> StoreResult<Option<StartedJob>> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1 - resume, resume = 0, \
             version = version + 1 WHERE id = ? AND status = 'queued' \
             RETURNING count, cores, strategy, transport, sleep_ms, spin, range_start, range_end, range_step, \
             created_at, attempts, max_attempts, timeout_ms",
        )
        .bind(now)
        .bind(&id_text)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let chunk_rows = sqlx::query(
            "UPDATE chunks SET state = 'running', owner = ?, runs = runs + 1 \
             WHERE job_id = ? AND state != 'done' RETURNING idx, pos, len",
        )
        .bind(node)
        .bind(&id_text)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut chunks: Vec<ChunkPlan> = chunk_rows
            .iter()
            .map(|r| ChunkPlan {
                index: r.get::<i64, _>("idx") as u32,
                offset: r.get::<i64, _>("pos") as u64,
                len: r.get::<i64, _>("len") as u64,
            })
            .collect();
        chunks.sort_by_key(|c| c.index);
        let range = match (row.get("range_start"), row.get("range_end"), row.get("range_step")) {
            (Some(start), Some(end), Some(step)) => Some(RangeSpec { start, end, step }),
            _ => None,
        };
        let transport: Option<String> = row.get("transport");
        Ok(Some(StartedJob {
            id,
            count: row.get::<i64, _>("count") as u64,
            cores: row.get::<i64, _>("cores") as u32,
            strategy: parse_strategy(row.get("strategy"))?,
            transport: transport.as_deref().map(parse_transport).transpose()?,
            simulate: Simulate {
                sleep_ms: row.get::<i64, _>("sleep_ms") as u64,
                spin: row.get::<i64, _>("spin") as u64,
            },
            range,
            created_at: row.get("created_at"),
            started_at: now,
            attempts: row.get::<i64, _>("attempts") as u32,
            max_attempts: row.get::<i64, _>("max_attempts") as u32,
            timeout_ms: row.get::<Option<i64>, _>("timeout_ms").map(|t| t as u64),
            chunks,
        }))
    }

    /// The stored input segment starting at `pos` (a multiple of the segment length).
    pub async fn input_segment(&self, id: Uuid, pos: u64) -> StoreResult<Vec<i64>> {
        let data: Vec<u8> = sqlx::query_scalar("SELECT data FROM job_inputs WHERE job_id = ? AND pos = ?")
            .bind(id.to_string())
            .bind(pos as i64)
            .fetch_optional(&self.readers)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("job {id} has no input segment at {pos}")))?;
        Ok(crate::exec::from_le_bytes(&data).collect())
    }

    /// Stores one result segment (replacing one left by an interrupted run),
    /// only while the job is running: a canceled job gains no squares.
    /// Returns false when the job is not running any more.
    pub async fn put_segment(&self, id: Uuid, pos: u64, squares: &[i64]) -> StoreResult<bool> {
        let id = id.to_string();
        let stored = sqlx::query(
            "INSERT INTO results (job_id, pos, len, data) \
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?1 AND status = 'running') \
             ON CONFLICT (job_id, pos) DO UPDATE SET len = excluded.len, data = excluded.data",
        )
        .bind(&id)
        .bind(pos as i64)
        .bind(squares.len() as i64)
        .bind(&*le_bytes(squares))
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(stored > 0)
    }

    /// Marks a chunk done (all its segments are stored) and counts it on the job.
    pub async fn complete_chunk(&self, id: Uuid, chunk: &ChunkPlan, record: &ChunkRecord) -> StoreResult<Progress> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let updated = sqlx::query(
            "UPDATE chunks SET state = 'done', owner = NULL, lease_until = NULL, worker = ?, node = ?, \
             start_ms = ?, duration_ms = ?, compute_ms = ?, store_ms = ? \
             WHERE job_id = ? AND idx = ? AND state = 'running'",
        )
        .bind(&record.worker)
        .bind(&record.node)
        .bind(record.start_ms)
        .bind(record.duration_ms)
        .bind(record.compute_ms)
        .bind(record.store_ms)
        .bind(&id_text)
        .bind(chunk.index as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let row = sqlx::query(
            "UPDATE jobs SET chunks_done = chunks_done + ?, numbers_done = numbers_done + ?, version = version + 1 \
             WHERE id = ? RETURNING chunks_done, chunks_total, numbers_done",
        )
        .bind(updated as i64)
        .bind(if updated > 0 { chunk.len as i64 } else { 0 })
        .bind(&id_text)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Progress {
            chunks_done: row.get::<i64, _>("chunks_done") as u64,
            chunks_total: row.get::<i64, _>("chunks_total") as u64,
            numbers_done: row.get::<i64, _>("numbers_done") as u64,
        })
    }

    /// Ends a running job. Returns false if it was not running any more.
    pub async fn finish_job(&self, id: Uuid, finish: &Finish) -> StoreResult<bool> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let sums = sqlx::query(
            "SELECT COALESCE(SUM(compute_ms), 0.0) AS compute_ms, COALESCE(SUM(store_ms), 0.0) AS store_ms \
             FROM chunks WHERE job_id = ? AND state = 'done'",
        )
        .bind(&id_text)
        .fetch_one(&mut *tx)
        .await?;
        let times = sqlx::query("SELECT created_at, started_at FROM jobs WHERE id = ?")
            .bind(&id_text)
            .fetch_one(&mut *tx)
            .await?;
        let created_at: i64 = times.get("created_at");
        let started_at: Option<i64> = times.get("started_at");
        let started_at = started_at.unwrap_or(finish.finished_at);
        let totals = TimingTotals {
            queue_ms: (started_at - created_at) as f64 / 1000.0,
            wall_ms: finish.wall_ms,
            spawn_ms: finish.spawn_ms,
            compute_ms: sums.get("compute_ms"),
            store_ms: sums.get("store_ms"),
        };
        let done = sqlx::query(
            "UPDATE jobs SET status = ?, finished_at = ?, timing = ?, error = ?, version = version + 1 \
             WHERE id = ? AND status = 'running'",
        )
        .bind(finish.status.as_str())
        .bind(finish.finished_at)
        .bind(serde_json::to_string(&totals).expect("timing serialises"))
        .bind(finish.error.as_ref().map(|e| serde_json::to_string(e).expect("problem serialises")))
        .bind(&id_text)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done > 0 && finish.status != JobStatus::Succeeded {
            // A failed job keeps no partial result.
            sqlx::query("DELETE FROM results WHERE job_id = ?").bind(&id_text).execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE chunks SET state = 'pending', owner = NULL WHERE job_id = ? AND state = 'running'")
            .bind(&id_text)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done > 0)
    }

    /// At start-up: jobs this node was running when it died go back to the
    /// queue (without counting an attempt); their `done` chunks stay done.
    pub async fn recover(&self) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await?;
        let jobs = sqlx::query(
            "UPDATE jobs SET status = 'queued', resume = 1, version = version + 1 WHERE status = 'running'",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE chunks SET state = 'pending', owner = NULL, lease_until = NULL WHERE state = 'running'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(jobs)
    }

    /// Cancels a job that has not ended, dropping any partial result.
    pub async fn cancel_job(&self, id: Uuid, now: i64, problem: &Problem) -> StoreResult<Canceled> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query("SELECT status, strategy FROM jobs WHERE id = ?")
            .bind(&id_text)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(Canceled::NotFound) };
        let status = parse_status(row.get("status"))?;
        let strategy = parse_strategy(row.get("strategy"))?;
        if status.is_final() {
            return Ok(Canceled::Ended(status));
        }
        sqlx::query(
            "UPDATE jobs SET status = 'canceled', finished_at = ?, error = ?, version = version + 1 WHERE id = ?",
        )
        .bind(now)
        .bind(serde_json::to_string(problem).expect("problem serialises"))
        .bind(&id_text)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM results WHERE job_id = ?").bind(&id_text).execute(&mut *tx).await?;
        sqlx::query("UPDATE chunks SET state = 'pending', owner = NULL WHERE job_id = ? AND state = 'running'")
            .bind(&id_text)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Canceled::Now { was_running: status == JobStatus::Running, strategy })
    }

    /// Puts a running job back in the queue (a shutdown stopped it): its done
    /// chunks stay done and the next start is not a new attempt.
    pub async fn requeue_job(&self, id: Uuid) -> StoreResult<bool> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let requeued = sqlx::query(
            "UPDATE jobs SET status = 'queued', resume = 1, version = version + 1 WHERE id = ? AND status = 'running'",
        )
        .bind(&id_text)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE chunks SET state = 'pending', owner = NULL WHERE job_id = ? AND state = 'running'")
            .bind(&id_text)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(requeued > 0)
    }

    /// Records a failed attempt of a running job and starts the next one.
    /// Returns the new attempt count, or `None` if the job is not running.
    pub async fn record_attempt_error(&self, id: Uuid, error: &Problem, now: i64) -> StoreResult<Option<u32>> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query("SELECT attempts, attempt_errors FROM jobs WHERE id = ? AND status = 'running'")
            .bind(&id_text)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let attempts = row.get::<i64, _>("attempts") as u32;
        let mut errors: Vec<AttemptError> = parse_json(row.get("attempt_errors"))?;
        errors.push(AttemptError { attempt: attempts, at: rfc3339(now), error: error.clone() });
        sqlx::query("UPDATE jobs SET attempts = ?, attempt_errors = ?, version = version + 1 WHERE id = ?")
            .bind(i64::from(attempts + 1))
            .bind(serde_json::to_string(&errors).expect("attempt errors serialise"))
            .bind(&id_text)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(attempts + 1))
    }

    /// Deletes up to `batch` jobs that finished before `cutoff` (with their
    /// results), and expired idempotency keys. Returns how many jobs went.
    pub async fn purge_finished(&self, cutoff: i64, now: i64, batch: u32) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await?;
        let deleted = sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? \
             AND status IN ('succeeded', 'failed', 'canceled') ORDER BY finished_at LIMIT ?)",
        )
        .bind(cutoff)
        .bind(batch as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)")
            .bind(now)
            .bind(batch as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// Result segments that overlap `[from, to)`, in order: at most `max_rows`
    /// of them, covering at most `max_numbers` positions after `from`.
    pub async fn result_segments(
        &self,
        id: Uuid,
        from: u64,
        to: u64,
        max_rows: u32,
        max_numbers: u64,
    ) -> StoreResult<Vec<Segment>> {
        let to = to.min(from.saturating_add(max_numbers));
        // Start at the segment holding `from`: the last one starting at or before it.
        let rows = sqlx::query(
            "SELECT pos, len, data FROM results WHERE job_id = ?1 \
             AND pos >= (SELECT COALESCE(MAX(pos), 0) FROM results WHERE job_id = ?1 AND pos <= ?2) \
             AND pos < ?3 ORDER BY pos LIMIT ?4",
        )
        .bind(id.to_string())
        .bind(from as i64)
        .bind(to as i64)
        .bind(max_rows as i64)
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter()
            .map(|r| {
                let data: Vec<u8> = r.get("data");
                let len: i64 = r.get("len");
                if data.len() as i64 != len * 8 {
                    return Err(StoreError::Corrupt(format!("segment of {len} squares has {} bytes", data.len())));
                }
                Ok(Segment { pos: r.get::<i64, _>("pos") as u64, data })
            })
            .collect()
    }

    /// Deletes a job that has ended, with its result.
    pub async fn delete_job(&self, id: Uuid) -> StoreResult<Deleted> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?").bind(&id_text).fetch_optional(&mut *tx).await?;
        let Some(status) = status else { return Ok(Deleted::NotFound) };
        let status = parse_status(&status)?;
        if !status.is_final() {
            return Ok(Deleted::Busy(status));
        }
        sqlx::query("DELETE FROM jobs WHERE id = ?").bind(&id_text).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Deleted::Yes)
    }
}

fn parse_uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("job id {s:?}: {e}")))
}

fn parse_status(s: &str) -> StoreResult<JobStatus> {
    JobStatus::parse(s).ok_or_else(|| StoreError::Corrupt(format!("status {s:?}")))
}

fn parse_strategy(s: &str) -> StoreResult<Strategy> {
    Strategy::parse(s).ok_or_else(|| StoreError::Corrupt(format!("strategy {s:?}")))
}

fn parse_transport(s: &str) -> StoreResult<Transport> {
    Transport::parse(s).ok_or_else(|| StoreError::Corrupt(format!("transport {s:?}")))
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{e} in {s:?}")))
}
