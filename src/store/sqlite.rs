//! The SQLite backend: one file in WAL mode. Writes go to one writer thread
//! that commits them in batches ([`sqlite_writer`](super::sqlite_writer));
//! reads go to reader threads with read-only connections that never wait for
//! it ([`sqlite_readers`](super::sqlite_readers)). sqlx only applies the
//! migrations. Big jobs' squares go to files beside the database
//! ([`result_files`](super::result_files)).

use std::str::FromStr;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection as _};
use uuid::Uuid;

use super::result_files::{self, ResultFiles};
use super::sql::*;
use super::sqlite_readers::Readers;
use super::sqlite_writer::{in_savepoint, stmt, Writer};
use super::*;
use crate::domain::{now_micros, Input, Problem, Progress, SEGMENT_LEN};
use crate::exec::le_bytes;

/// The SQLite-backed store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    readers: Readers,
    files: ResultFiles,
}

/// Process-wide SQLite settings, made before SQLite initialises (the first
/// connection): no memory statistics, which squared never reads and which
/// cost a global mutex around every allocation SQLite makes. Later calls,
/// or calls after another library initialised SQLite, change nothing.
fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one int; before initialisation
        // nothing else is using SQLite, and after it the call only returns
        // SQLITE_MISUSE.
        let _ = unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int) };
    });
}

impl SqliteStore {
    /// Opens (creating when missing) the database at `url` and applies migrations.
    pub async fn open(url: &str, readers: u32) -> StoreResult<Self> {
        configure_sqlite();
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let mut migrator = options.connect().await?;
        sqlx::migrate!("migrations/sqlite").run(&mut migrator).await?;
        migrator.close().await?;
        let path = options.get_filename();
        let files = ResultFiles::open(path)?;
        let store = SqliteStore { writer: Writer::start(path)?, readers: Readers::start(path, readers)?, files };
        store.sweep_result_files().await?;
        Ok(store)
    }

    /// Removes the result files of jobs that are gone or ended without
    /// success: left by a crash between such a job's last write and the
    /// removal that follows it.
    async fn sweep_result_files(&self) -> StoreResult<()> {
        let files = self.files.clone();
        let orphans = self
            .readers
            .read(move |c| {
                let mut orphans = Vec::new();
                for id in files.jobs()? {
                    let status: Option<String> =
                        stmt(c, q::JOB_STATUS)?.query_row(params![id.to_string()], |r| r.get(0)).optional()?;
                    let keep = match status {
                        Some(status) => !matches!(parse_status(&status)?, JobStatus::Failed | JobStatus::Canceled),
                        None => false,
                    };
                    if !keep {
                        orphans.push(id);
                    }
                }
                Ok(orphans)
            })
            .await?;
        if !orphans.is_empty() {
            tracing::info!(files = orphans.len(), "removing result files of jobs that are gone");
        }
        self.remove_result_files(orphans).await;
        Ok(())
    }

    /// Removes the result files of `jobs` (those that have one), on a blocking thread.
    async fn remove_result_files(&self, jobs: Vec<Uuid>) {
        if jobs.is_empty() {
            return;
        }
        let files = self.files.clone();
        let removed = tokio::task::spawn_blocking(move || jobs.into_iter().for_each(|id| files.remove(id))).await;
        if let Err(e) = removed {
            tracing::warn!(error = %e, "removing result files failed");
        }
    }

    /// Job `id`'s result file, open for writing, if it has one.
    pub fn result_file(&self, id: Uuid) -> StoreResult<Option<ResultFile>> {
        Ok(self.files.writer(id)?)
    }
}

/// The reads, each one closure on a reader thread (see `sqlite_readers`).
impl SqliteStore {
    /// A reader answers, and the writer thread is running.
    pub async fn ping(&self) -> StoreResult<()> {
        self.readers.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?)).await?;
        match self.writer.is_running() {
            true => Ok(()),
            false => Err(StoreError::Thread("the writer thread has stopped".into())),
        }
    }

    pub async fn job(&self, id: Uuid) -> StoreResult<Option<JobDocument>> {
        let id = id.to_string();
        self.readers
            .read(move |c| {
                let _snapshot = c.unchecked_transaction()?; // the job's rows as of one commit
                let row = stmt(c, &JOB_BY_ID)?.query_row(params![id], job_row).optional()?;
                row.map(|row| document(c, row)).transpose()
            })
            .await
    }

    pub async fn status_and_count(&self, id: Uuid) -> StoreResult<Option<(JobStatus, u64)>> {
        let id = id.to_string();
        self.readers
            .read(move |c| {
                let row = stmt(c, q::STATUS_AND_COUNT)?
                    .query_row(params![id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .optional()?;
                row.map(|(status, count)| Ok((parse_status(&status)?, count as u64))).transpose()
            })
            .await
    }

    pub async fn list_jobs(&self, query: &ListQuery) -> StoreResult<Vec<JobDocument>> {
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut arg = |sql: &mut String, value: rusqlite::types::Value| {
            args.push(value);
            sql.push_str(&format!("${}", args.len()));
        };
        if let Some(status) = query.status {
            sql.push_str(" AND status = ");
            arg(&mut sql, status.as_str().to_string().into());
        }
        if let Some(before) = query.before {
            sql.push_str(" AND id < ");
            arg(&mut sql, before.to_string().into());
        }
        for (key, value) in &query.metadata {
            sql.push_str(" AND id IN (SELECT job_id FROM job_metadata WHERE key = ");
            arg(&mut sql, key.clone().into());
            sql.push_str(" AND value = ");
            arg(&mut sql, value.clone().into());
            sql.push(')');
        }
        sql.push_str(" ORDER BY id DESC LIMIT ");
        arg(&mut sql, i64::from(query.limit).into());
        self.readers
            .read(move |c| {
                let _snapshot = c.unchecked_transaction()?; // the jobs' rows as of one commit
                let rows = stmt(c, &sql)?
                    .query_map(rusqlite::params_from_iter(args), job_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                rows.into_iter().map(|row| document(c, row)).collect()
            })
            .await
    }

    pub async fn queued_count(&self) -> StoreResult<u64> {
        self.readers.read(|c| Ok(stmt(c, q::QUEUED_COUNT)?.query_row([], |r| r.get::<_, i64>(0))? as u64)).await
    }

    /// Which of `ids` are no longer running.
    async fn not_running(&self, ids: &[Uuid]) -> StoreResult<Vec<Uuid>> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        self.readers
            .read(move |c| {
                let mut status = stmt(c, q::JOB_STATUS)?;
                let mut gone = Vec::new();
                for id in ids {
                    let s: Option<String> = status.query_row(params![id], |r| r.get(0)).optional()?;
                    if s.as_deref().is_some_and(|s| s != "running") {
                        gone.push(parse_uuid(&id)?);
                    }
                }
                Ok(gone)
            })
            .await
    }

    pub async fn input_segment(&self, id: Uuid, pos: u64) -> StoreResult<Vec<i64>> {
        self.readers
            .read(move |c| {
                let data: Vec<u8> = stmt(c, q::INPUT_SEGMENT)?
                    .query_row(params![id.to_string(), pos as i64], |r| r.get(0))
                    .optional()?
                    .ok_or_else(|| StoreError::Corrupt(format!("job {id} has no input segment at {pos}")))?;
                Ok(crate::exec::from_le_bytes(&data).collect())
            })
            .await
    }

    pub async fn result_segments(
        &self,
        id: Uuid,
        from: u64,
        to: u64,
        max_rows: u32,
        max_numbers: u64,
    ) -> StoreResult<Vec<Segment>> {
        let to = to.min(from.saturating_add(max_numbers));
        let files = self.files.clone();
        self.readers
            .read(move |c| {
                if from >= to {
                    return Ok(Vec::new());
                }
                if let Some(segment) = files.read(id, from, to)? {
                    return Ok(vec![segment]);
                }
                let args = params![id.to_string(), from as i64, to as i64, i64::from(max_rows)];
                let rows = stmt(c, q::RESULT_SEGMENTS)?
                    .query_map(args, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                rows.into_iter().map(|(pos, len, data)| segment(pos, len, data)).collect()
            })
            .await
    }

    pub async fn comparison(&self, id: Uuid) -> StoreResult<Option<StoredComparison>> {
        self.readers
            .read(move |c| {
                let row = stmt(c, q::COMPARISON)?.query_row(params![id.to_string()], |r| {
                    Ok(StoredComparison { id, created_at: r.get(0)?, request: r.get(1)?, cells: r.get(2)? })
                });
                Ok(row.optional()?)
            })
            .await
    }

    pub async fn job_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<JobSummary>> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        self.readers
            .read(move |c| {
                let mut read = stmt(c, "SELECT id, status, timing FROM jobs WHERE id = $1")?;
                let mut summaries = Vec::with_capacity(ids.len());
                for id in ids {
                    let row = read
                        .query_row(params![id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?)))
                        .optional()?;
                    if let Some((id, status, timing)) = row {
                        summaries.push(job_summary(&id, &status, timing)?);
                    }
                }
                Ok(summaries)
            })
            .await
    }
}

static JOB_BY_ID: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"));

/// A [`JOB_COLUMNS`] row.
fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get("id")?,
        status: r.get("status")?,
        created_at: r.get("created_at")?,
        started_at: r.get("started_at")?,
        finished_at: r.get("finished_at")?,
        request: r.get("request")?,
        attempts: r.get("attempts")?,
        attempt_errors: r.get("attempt_errors")?,
        chunks_total: r.get("chunks_total")?,
        chunks_done: r.get("chunks_done")?,
        numbers_done: r.get("numbers_done")?,
        timing: r.get("timing")?,
        error: r.get("error")?,
        version: r.get("version")?,
        callback_url: r.get("callback_url")?,
    })
}

/// The columns of a claimed job (see [`q::CLAIMABLE_JOB`]).
fn claim_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClaimRow> {
    Ok(ClaimRow {
        count: r.get("count")?,
        cores: r.get("cores")?,
        strategy: r.get("strategy")?,
        transport: r.get("transport")?,
        sleep_ms: r.get("sleep_ms")?,
        spin: r.get("spin")?,
        range: (r.get("range_start")?, r.get("range_end")?, r.get("range_step")?),
        created_at: r.get("created_at")?,
        started_at: r.get("started_at")?,
        attempts: r.get("attempts")?,
        max_attempts: r.get("max_attempts")?,
        timeout_ms: r.get("timeout_ms")?,
        request_id: r.get("request_id")?,
    })
}

/// The document of a job row, with the rows it refers to.
fn document(c: &Connection, row: JobRow) -> StoreResult<JobDocument> {
    let (mut doc, needs) = row.into_document()?;
    let id = doc.id.to_string();
    if let (true, Some(timing)) = (needs.chunk_timings, doc.timing.as_mut()) {
        timing.chunks = done_chunks(c, &id)?.into_iter().map(|c| c.timing).collect();
    }
    if let Some(url) = needs.callback {
        let webhook = stmt(c, q::WEBHOOK_STATE)?.query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        doc.callback = Some(callback(url, webhook)?);
    }
    Ok(doc)
}

/// A job's done chunks ([`q::DONE_CHUNKS`]), in order.
fn done_chunks(c: &Connection, id: &str) -> StoreResult<Vec<DoneChunk>> {
    let chunks = stmt(c, q::DONE_CHUNKS)?
        .query_map(params![id], |r| {
            let times = [r.get(5)?, r.get(6)?, r.get(8)?, r.get(9)?, r.get(10)?];
            Ok(done_chunk(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, times, r.get(7)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(chunks)
}

/// The writes, each one closure on the writer thread (see `sqlite_writer`):
/// arguments are copied in, and nothing else runs between its statements.
impl SqliteStore {
    pub async fn insert_job(&self, job: &NewJob<'_>) -> StoreResult<(Inserted, Option<Vec<Claim>>)> {
        let spec = job.spec;
        let ask = job.claim.map(|(next, lanes)| (next.node.to_string(), next.lease_until, lanes));
        let range = match &spec.input {
            Input::Range(r) => Some(*r),
            Input::List(_) => None,
        };
        let inputs: Vec<Vec<u8>> = match &spec.input {
            Input::List(numbers) => numbers.chunks(SEGMENT_LEN as usize).map(|s| le_bytes(s).into_owned()).collect(),
            Input::Range(_) => Vec::new(),
        };
        let id = job.id.to_string();
        // A big job's result file is created with it (see `result_files`).
        let file = result_files::in_file(spec.count).then(|| (job.id, self.files.clone()));
        let idempotency = job.idempotency.as_ref().map(|k| (k.key.clone(), k.body_hash.clone(), k.expires_at));
        let (created_at, max_queued, chunks) = (job.created_at, job.max_queued, job.chunks.to_vec());
        let row = (
            spec.priority as i64,
            spec.count as i64,
            spec.cores as i64,
            spec.strategy.as_str(),
            spec.transport.map(Transport::as_str),
            spec.simulate.sleep_ms as i64,
            spec.simulate.spin as i64,
            spec.max_attempts as i64,
            spec.timeout_ms.map(|t| t as i64),
        );
        let echo = serde_json::to_string(&spec.echo()).expect("the echo serialises");
        let callback_url = spec.callback_url.clone();
        let series = job.series.map(|s| s.to_string());
        let request_id = job.request_id.clone();
        let metadata: Vec<(String, String)> = spec.metadata.clone().into_iter().collect();
        self.writer
            .write(move |c| {
                // Every refusal returns before the first write: a write kept
                // by an `Ok` answer would outlive the refused submission.
                if let Some((key, body_hash, _)) = &idempotency {
                    let known = stmt(c, q::IDEMPOTENCY_GET)?
                        .query_row(params![key, created_at], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                        .optional()?;
                    if let Some((hash, job_id)) = known {
                        let known = match &hash == body_hash {
                            true => Inserted::Existing(parse_uuid(&job_id)?),
                            false => Inserted::KeyReused,
                        };
                        return Ok((known, None));
                    }
                }
                if let Some(max) = max_queued {
                    let queued: i64 = stmt(c, q::QUEUED_COUNT)?.query_row([], |r| r.get(0))?;
                    if queued as u64 >= max {
                        return Ok((Inserted::QueueFull, None));
                    }
                }
                if let Some((key, body_hash, expires_at)) = idempotency {
                    stmt(c, q::IDEMPOTENCY_PUT)?.execute(params![key, body_hash, id, expires_at])?;
                }
                let (priority, count, cores, strategy, transport, sleep_ms, spin, max_attempts, timeout_ms) = row;
                stmt(c, q::INSERT_JOB)?.execute(params![
                    id,
                    priority,
                    created_at,
                    count,
                    cores,
                    strategy,
                    transport,
                    sleep_ms,
                    spin,
                    range.map(|r| r.start),
                    range.map(|r| r.end),
                    range.map(|r| r.step),
                    chunks.len() as i64,
                    max_attempts,
                    timeout_ms,
                    echo,
                    callback_url,
                    series,
                    request_id,
                ])?;
                for (key, value) in &metadata {
                    stmt(c, q::INSERT_METADATA)?.execute(params![id, key, value])?;
                }
                for (i, data) in inputs.iter().enumerate() {
                    stmt(c, q::INSERT_INPUT)?.execute(params![id, (i as u64 * SEGMENT_LEN) as i64, data])?;
                }
                let mut insert = stmt(c, q::INSERT_CHUNK)?;
                for chunk in &chunks {
                    insert.execute(params![id, chunk.index as i64, chunk.offset as i64, chunk.len as i64])?;
                }
                if let Some((job, files)) = &file {
                    files.create(*job, count as u64)?;
                }
                // A claim that fails leaves the job stored: the claim loop tries again.
                let claimed = ask.and_then(|(node, lease_until, lanes)| {
                    in_savepoint(c, |c| claim(c, &node, lanes, lease_until))
                        .inspect_err(|e| tracing::warn!(error = %e, "claiming work with a submission failed"))
                        .ok()
                });
                Ok((Inserted::New, claimed))
            })
            .await
    }

    pub async fn claim_webhooks(&self, now: i64, limit: u32, lease: i64) -> StoreResult<Vec<(Uuid, String, u32)>> {
        self.writer
            .write(move |c| {
                let rows = stmt(c, &claim_webhooks_sql(""))?
                    .query_map(params![now, limit as i64, lease], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                rows.into_iter().map(|(id, url, attempts)| Ok((parse_uuid(&id)?, url, attempts as u32))).collect()
            })
            .await
    }

    pub async fn record_webhook(
        &self,
        id: Uuid,
        attempt: &DeliveryAttempt,
        outcome: WebhookOutcome,
    ) -> StoreResult<()> {
        let (id, attempt) = (id.to_string(), attempt.clone());
        self.writer
            .write(move |c| {
                let history: Option<String> =
                    stmt(c, q::WEBHOOK_HISTORY)?.query_row(params![id], |r| r.get(0)).optional()?;
                let Some(history) = history else { return Ok(()) }; // the job was deleted
                let (state, attempts, next_at, history) = webhook_record(&history, &attempt, outcome)?;
                stmt(c, q::WEBHOOK_RECORD)?.execute(params![id, state, attempts, next_at, history])?;
                stmt(c, q::BUMP_VERSION)?.execute(params![id])?;
                Ok(())
            })
            .await
    }

    pub async fn claim(&self, node: &str, lanes: u32, lease_until: i64) -> StoreResult<Vec<Claim>> {
        let node = node.to_string();
        self.writer.write(move |c| claim(c, &node, lanes, lease_until)).await
    }

    pub async fn claim_next(&self, id: Uuid, node: &str, lease_until: i64) -> StoreResult<Option<ChunkPlan>> {
        let node = node.to_string();
        self.writer
            .write(move |c| {
                Ok(claim_job(c, id, &node, 1, lease_until, false)?.and_then(|(c, _)| c.chunks.into_iter().next()))
            })
            .await
    }

    pub async fn heartbeat(&self, node: &str, lease_until: i64, local: &[Uuid]) -> StoreResult<Vec<Uuid>> {
        if local.is_empty() {
            return Ok(Vec::new());
        }
        let (node, ids) = (node.to_string(), local.iter().map(Uuid::to_string).collect::<Vec<_>>());
        self.writer
            .write(move |c| {
                // Only chunks of jobs with live lanes here: a chunk a lane let go
                // of without finishing (its job stopped) must expire and be rescued.
                let mut renew = stmt(
                    c,
                    "UPDATE chunks SET lease_until = $1 WHERE owner = $2 AND state = 'running' AND job_id = $3",
                )?;
                for id in &ids {
                    renew.execute(params![lease_until, node, id])?;
                }
                Ok(())
            })
            .await?;
        self.not_running(local).await
    }

    /// Puts running chunks back to pending, in jobs that are still running,
    /// and fixes their jobs' counters; a job with no chunk left running goes
    /// back to `queued`.
    pub(super) async fn release_where(&self, which: Release<'_>) -> StoreResult<u64> {
        let sql = release_chunks_sql(release_condition(which));
        let arg: rusqlite::types::Value = match which {
            Release::ExpiredBefore(now) => now.into(),
            Release::Owner(owner) => owner.to_string().into(),
            Release::All => 0i64.into(),
        };
        self.writer
            .write(move |c| {
                let jobs = stmt(c, &sql)?
                    .query_map(params![arg], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                let mut per_job = std::collections::BTreeMap::<&str, i64>::new();
                for job in &jobs {
                    *per_job.entry(job).or_default() += 1;
                }
                for (job, n) in per_job {
                    stmt(c, q::RELEASE_JOB)?.execute(params![job, n])?;
                }
                Ok(jobs.len() as u64)
            })
            .await
    }

    pub async fn put_segment(&self, id: Uuid, chunk: u32, node: &str, pos: u64, squares: &[i64]) -> StoreResult<bool> {
        let (id, node, len, data) =
            (id.to_string(), node.to_string(), squares.len() as i64, le_bytes(squares).into_owned());
        self.writer
            .write(move |c| {
                let stored =
                    stmt(c, q::PUT_SEGMENT)?.execute(params![id, pos as i64, len, data, chunk as i64, node])?;
                Ok(stored > 0)
            })
            .await
    }

    pub async fn complete_chunk(
        &self,
        id: Uuid,
        chunk: &ChunkPlan,
        record: &ChunkRecord,
        last: Option<(u64, &[i64])>,
        now: i64,
        next: Option<NextClaim<'_>>,
    ) -> StoreResult<Option<Completion>> {
        let (id, chunk, record) = (id.to_string(), *chunk, record.clone());
        let next = next.map(|n| (n.node.to_string(), n.lease_until));
        let last = last.map(|(pos, squares)| (pos, le_bytes(squares).into_owned()));
        self.writer
            .write(move |c| {
                let Some(mut done) = complete(c, &id, &chunk, &record, last, now)? else { return Ok(None) };
                if let (Some(_), Some((node, lease_until))) = (done.finished_wall_ms, next) {
                    done.next = claim(c, &node, 1, lease_until)?.pop();
                }
                Ok(Some(done))
            })
            .await
    }

    pub async fn complete_chunks(
        &self,
        ran: &[RanChunk],
        now: i64,
        next: Option<NextClaim<'_>>,
        jobs: u32,
    ) -> StoreResult<Completions> {
        let next = next.map(|n| (n.node.to_string(), n.lease_until));
        let ran: Vec<_> = ran
            .iter()
            .map(|r| {
                let last = r.squares.as_ref().map(|(pos, squares)| (*pos, le_bytes(squares).into_owned()));
                (r.id.to_string(), r.chunk, r.record.clone(), last)
            })
            .collect();
        self.writer
            .write(move |c| {
                let mut done = Vec::with_capacity(ran.len());
                for (id, chunk, record, last) in ran {
                    done.push(complete(c, &id, &chunk, &record, last, now)?);
                }
                let finished = done.iter().flatten().any(|d| d.finished_wall_ms.is_some());
                let next = match next {
                    Some((node, lease_until)) if finished => claim_batch(c, &node, jobs, lease_until)?,
                    _ => Vec::new(),
                };
                Ok(Completions { done, next })
            })
            .await
    }

    pub async fn fail_job(&self, id: Uuid, problem: &Problem, now: i64) -> StoreResult<bool> {
        let (job, problem) = (id, problem.clone());
        let id = id.to_string();
        let failed =
            self.writer.write(move |c| Ok(finish(c, &id, JobStatus::Failed, Some(&problem), now)?.is_some())).await?;
        if failed {
            self.remove_result_files(vec![job]).await;
        }
        Ok(failed)
    }

    pub async fn cancel_job(&self, id: Uuid, now: i64, problem: &Problem) -> StoreResult<Canceled> {
        let (job, problem) = (id, problem.clone());
        let id = id.to_string();
        let canceled = self
            .writer
            .write(move |c| {
                let row = stmt(c, q::JOB_STATUS_STRATEGY)?
                    .query_row(params![id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                    .optional()?;
                let Some((status, strategy)) = row else { return Ok(Canceled::NotFound) };
                let (status, strategy) = (parse_status(&status)?, parse_strategy(&strategy)?);
                if status.is_final() {
                    return Ok(Canceled::Ended(status));
                }
                finish(c, &id, JobStatus::Canceled, Some(&problem), now)?;
                Ok(Canceled::Now { was_running: status == JobStatus::Running, strategy })
            })
            .await?;
        if let Canceled::Now { .. } = canceled {
            self.remove_result_files(vec![job]).await;
        }
        Ok(canceled)
    }

    pub async fn record_attempt_error(&self, id: Uuid, error: &Problem, now: i64) -> StoreResult<Option<u32>> {
        let (id, error) = (id.to_string(), error.clone());
        self.writer
            .write(move |c| {
                let row = stmt(c, q::JOB_ATTEMPTS)?
                    .query_row(params![id], |r| {
                        Ok((r.get::<_, i64>(0)? as u32, r.get::<_, i64>(1)? as u32, r.get::<_, String>(2)?))
                    })
                    .optional()?;
                let Some((attempts, max_attempts, errors)) = row else { return Ok(None) };
                let Some(errors) = next_attempt(attempts, max_attempts, &errors, &error, now)? else {
                    return Ok(None); // exhausted: the caller fails the job
                };
                stmt(c, q::RECORD_ATTEMPT)?.execute(params![id, i64::from(attempts + 1), errors])?;
                Ok(Some(attempts + 1))
            })
            .await
    }

    pub async fn purge_finished(&self, cutoff: i64, now: i64, batch: u32) -> StoreResult<u64> {
        let (deleted, with_files) = self
            .writer
            .write(move |c| {
                let with_files = stmt(c, q::PURGEABLE_WITH_FILES)?
                    .query_map(params![cutoff, batch as i64, SEGMENT_LEN as i64], |r| r.get::<_, String>(0))?
                    .map(|id| parse_uuid(&id?))
                    .collect::<StoreResult<Vec<_>>>()?;
                let deleted = stmt(c, q::PURGE_JOBS)?.execute(params![cutoff, batch as i64])?;
                stmt(c, q::PURGE_KEYS)?.execute(params![now, batch as i64])?;
                stmt(c, q::PURGE_COMPARISONS)?.execute(params![cutoff, batch as i64])?;
                Ok((deleted as u64, with_files))
            })
            .await?;
        self.remove_result_files(with_files).await;
        Ok(deleted)
    }

    pub async fn insert_comparison(&self, comparison: &StoredComparison) -> StoreResult<()> {
        let c = comparison.clone();
        self.writer
            .write(move |conn| {
                stmt(conn, q::INSERT_COMPARISON)?.execute(params![
                    c.id.to_string(),
                    c.created_at,
                    c.request,
                    c.cells
                ])?;
                Ok(())
            })
            .await
    }

    pub async fn delete_job(&self, id: Uuid) -> StoreResult<Deleted> {
        let job = id;
        let id = id.to_string();
        let deleted = self
            .writer
            .write(move |c| {
                let status: Option<String> = stmt(c, q::JOB_STATUS)?.query_row(params![id], |r| r.get(0)).optional()?;
                let Some(status) = status else { return Ok(Deleted::NotFound) };
                let status = parse_status(&status)?;
                if !status.is_final() {
                    return Ok(Deleted::Busy(status));
                }
                stmt(c, q::DELETE_JOB)?.execute(params![id])?;
                Ok(Deleted::Yes)
            })
            .await?;
        if deleted == Deleted::Yes {
            self.remove_result_files(vec![job]).await;
        }
        Ok(deleted)
    }
}

/// Claims up to `lanes` chunks for `node` (see `Store::claim`).
fn claim(c: &Connection, node: &str, lanes: u32, lease_until: i64) -> StoreResult<Vec<Claim>> {
    let candidates = candidates(c)?;
    let mut claims = Vec::new();
    let mut free = lanes;
    for id in candidates {
        if free == 0 {
            break;
        }
        let id = parse_uuid(&id)?;
        let claimed = claim_job(c, id, node, free, lease_until, false).map(|claimed| claimed.map(|(claim, _)| claim));
        add_claim(&mut claims, &mut free, id, claimed)?;
    }
    Ok(claims)
}

/// A lane's next work: one chunk of the next claimable job and, when that job
/// is [`batchable`], up to `jobs - 1` more batchable jobs right behind it in
/// claim order (see [`add_to_batch`]).
fn claim_batch(c: &Connection, node: &str, jobs: u32, lease_until: i64) -> StoreResult<Vec<Claim>> {
    let mut claims = Vec::new();
    for id in candidates(c)? {
        let id = parse_uuid(&id)?;
        let claimed = claim_job(c, id, node, 1, lease_until, !claims.is_empty());
        if !add_to_batch(&mut claims, jobs, id, claimed)? {
            break;
        }
    }
    Ok(claims)
}

/// The ids of the next claimable jobs, in claim order (see `Store::claim`).
fn candidates(c: &Connection) -> StoreResult<Vec<String>> {
    let mut scan = stmt(c, &CANDIDATES)?;
    let ids = scan.query_map(params![CLAIM_WINDOW], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

/// The claim scan, on the index that yields jobs in claim order.
static CANDIDATES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| claim_candidates_sql("jobs j INDEXED BY jobs_ready"));

/// Claims up to `max` chunks of one job (see `Store::claim`); with
/// `batchable_only`, only a job that [`batchable`] allows. Returns the claim
/// and whether the job is batchable.
fn claim_job(
    c: &Connection,
    id: Uuid,
    node: &str,
    max: u32,
    lease_until: i64,
    batchable_only: bool,
) -> StoreResult<Option<(Claim, bool)>> {
    let id_text = id.to_string();
    let row = stmt(c, q::CLAIMABLE_JOB)?
        .query_row(params![id_text], |r| {
            let counts = (
                r.get::<_, i64>("chunks_ready")?,
                r.get::<_, i64>("chunks_running")?,
                r.get::<_, i64>("chunks_total")?,
            );
            Ok((claim_row(r)?, counts, r.get::<_, Option<String>>("series")?, r.get::<_, String>("status")?))
        })
        .optional()?;
    let Some((row, (ready, running, total), series, status)) = row else { return Ok(None) };
    let small = batchable(&row, total);
    if batchable_only && !small {
        return Ok(None);
    }
    if let (Some(series), "queued") = (series, status.as_str()) {
        // A series runs one job at a time: start this one only when no other is running.
        let busy: i64 = stmt(c, q::SERIES_BUSY)?.query_row(params![series, id_text], |r| r.get(0))?;
        if busy > 0 {
            return Ok(None);
        }
    }
    let take = chunks_to_take(parse_strategy(&row.strategy)?, row.cores, running, ready, max);
    if take <= 0 {
        return Ok(None);
    }
    let chunks = stmt(c, q::PENDING_CHUNKS)?
        .query_map(params![id_text, take], |r| {
            Ok(ChunkPlan {
                index: r.get::<_, i64>(0)? as u32,
                offset: r.get::<_, i64>(1)? as u64,
                len: r.get::<_, i64>(2)? as u64,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    if chunks.is_empty() {
        return Err(StoreError::Corrupt(format!("job {id} counts ready chunks it does not have")));
    }
    let mut claim = stmt(c, q::CLAIM_CHUNK)?;
    for chunk in &chunks {
        claim.execute(params![id_text, chunk.index as i64, node, lease_until])?;
    }
    // Read the clock only now: the job's insert has committed, so its start
    // is never before its creation.
    let now = now_micros();
    stmt(c, q::START_JOB)?.execute(params![id_text, now, chunks.len() as i64])?;
    let job = row.into_job(id, now)?;
    let input = match prefetch_input(&job) {
        true => {
            let data: Vec<u8> = stmt(c, q::INPUT_SEGMENT)?.query_row(params![id_text, 0i64], |r| r.get(0))?;
            Some(crate::exec::from_le_bytes(&data).collect())
        }
        false => None,
    };
    Ok(Some((Claim { job, chunks, input }, small)))
}

/// Marks a chunk done with its `last` segment (position, bytes) and, for
/// the job's last chunk, ends the job (see `Store::complete_chunk`); `None`
/// if the chunk is no longer `record.node`'s.
fn complete(
    c: &Connection,
    id: &str,
    chunk: &ChunkPlan,
    record: &ChunkRecord,
    last: Option<(u64, Vec<u8>)>,
    now: i64,
) -> StoreResult<Option<Completion>> {
    let updated = stmt(c, q::CHUNK_DONE)?.execute(params![
        id,
        chunk.index as i64,
        record.worker,
        record.node,
        record.start_ms,
        record.duration_ms,
        record.spawn_ms,
        record.compute_ms,
        record.store_ms,
    ])?;
    if updated == 0 {
        return Ok(None); // no longer ours: canceled, failed or rescued
    }
    if let Some((pos, data)) = last {
        let len = (data.len() / 8) as i64;
        stmt(c, q::INSERT_RESULT)?.execute(params![id, pos as i64, len, data])?;
    }
    let (before, times) = stmt(c, q::JOB_STATE)?.query_row(params![id], |r| {
        let counts = (r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?);
        Ok((counts, JobTimes { created_at: r.get(3)?, started_at: r.get(4)?, has_callback: r.get(5)? }))
    })?;
    stmt(c, q::ADD_PROGRESS)?.execute(params![id, chunk.len as i64])?;
    let (chunks_done, chunks_total, numbers_done) = before;
    let progress = Progress {
        chunks_done: (chunks_done + 1) as u64,
        chunks_total: chunks_total as u64,
        numbers_done: (numbers_done + chunk.len as i64) as u64,
    };
    let mut finished_wall_ms = None;
    if progress.chunks_done == progress.chunks_total {
        finished_wall_ms = end(c, id, JobStatus::Succeeded, None, now, times)?;
    }
    Ok(Some(Completion { progress, finished_wall_ms, next: None }))
}

/// Ends a job that is queued or running: stores its status, error and timing
/// totals, and releases its running chunks. Returns the wall time, or `None`
/// if the job had already ended.
fn finish(c: &Connection, id: &str, status: JobStatus, error: Option<&Problem>, now: i64) -> StoreResult<Option<f64>> {
    let times = stmt(c, q::JOB_TIMES)?.query_row(params![id], |r| {
        Ok(JobTimes { created_at: r.get(0)?, started_at: r.get(1)?, has_callback: r.get(2)? })
    })?;
    end(c, id, status, error, now, times)
}

/// [`finish`] with the job's times already read.
fn end(
    c: &Connection,
    id: &str,
    status: JobStatus,
    error: Option<&Problem>,
    now: i64,
    times: JobTimes,
) -> StoreResult<Option<f64>> {
    let JobTimes { created_at, started_at, has_callback } = times;
    let (timing, wall_ms) = timing_totals(created_at, started_at, done_chunks(c, id)?, now);
    let error = error.map(|e| serde_json::to_string(e).expect("problem serialises"));
    if stmt(c, q::FINISH_JOB)?.execute(params![id, status.as_str(), now, timing, error])? == 0 {
        return Ok(None);
    }
    // A job that succeeded has every chunk done and keeps its results.
    if status != JobStatus::Succeeded {
        stmt(c, q::RELEASE_JOB_CHUNKS)?.execute(params![id])?;
        stmt(c, q::DELETE_RESULTS)?.execute(params![id])?;
    }
    if has_callback {
        stmt(c, q::WEBHOOK_DUE)?.execute(params![id, now])?;
    }
    Ok(Some(wall_ms))
}
