//! The PostgreSQL backend: several `squared serve` nodes share one database.
//! Claims lock a job's row with `FOR UPDATE SKIP LOCKED`, so nodes never wait
//! on each other; LISTEN/NOTIFY wakes idle schedulers and long-polls on other
//! nodes (see [`PgStore::listen`]); migrations take sqlx's advisory lock, so
//! nodes starting at once apply them once. A lane stores the one-chunk jobs
//! it ran in one transaction and claims its next small jobs, up to eight, in
//! one more ([`PgStore::complete_chunks`]). Every statement is a round trip,
//! so the hot ones are writeable CTEs: a job's insert ([`first_insert`]),
//! a claim's chunks, start and input ([`CLAIM_AND_START`]) and a chunk's
//! completion ([`COMPLETE_CHUNK`]) are one statement each.

use std::fmt::Write as _;
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgListener, PgPoolOptions, PgRow};
use sqlx::{Arguments, PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::sql::*;
use super::*;
use crate::domain::{ChunkTiming, DeliveryAttempt, Input, Problem, Progress, SEGMENT_LEN};
use crate::exec::le_bytes;

/// The PostgreSQL-backed store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    writer: PgPool,
    /// The same pool: PostgreSQL serves readers and writers side by side.
    readers: PgPool,
    url: String,
}

impl PgStore {
    /// Connects (a pool of `pool_size`) and applies migrations.
    pub async fn open(url: &str, pool_size: u32) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PgStore { writer: pool.clone(), readers: pool, url: url.to_string() })
    }

    /// A listener on the work and job channels (a connection of its own).
    pub async fn listen(&self) -> StoreResult<PgListener> {
        let mut listener = PgListener::connect(&self.url).await?;
        listener.listen_all([WORK_CHANNEL, JOBS_CHANNEL]).await?;
        Ok(listener)
    }
}

/// The reads, on the shared pool.
impl PgStore {
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    pub async fn job(&self, id: Uuid) -> StoreResult<Option<JobDocument>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.readers)
            .await?;
        match row {
            Some(row) => Ok(Some(self.document(&row).await?)),
            None => Ok(None),
        }
    }

    pub async fn status_and_count(&self, id: Uuid) -> StoreResult<Option<(JobStatus, u64)>> {
        let row = sqlx::query(q::STATUS_AND_COUNT).bind(id.to_string()).fetch_optional(&self.readers).await?;
        row.map(|r| Ok((parse_status(r.get("status"))?, r.get::<i64, _>("count") as u64))).transpose()
    }

    pub async fn list_jobs(&self, query: &ListQuery) -> StoreResult<Vec<JobDocument>> {
        let mut sql = QueryBuilder::<Postgres>::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1"));
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

    async fn document(&self, r: &PgRow) -> StoreResult<JobDocument> {
        let row = JobRow {
            id: r.get("id"),
            status: r.get("status"),
            created_at: r.get("created_at"),
            started_at: r.get("started_at"),
            finished_at: r.get("finished_at"),
            request: r.get("request"),
            attempts: r.get("attempts"),
            attempt_errors: r.get("attempt_errors"),
            chunks_total: r.get("chunks_total"),
            chunks_done: r.get("chunks_done"),
            numbers_done: r.get("numbers_done"),
            timing: r.get("timing"),
            error: r.get("error"),
            version: r.get("version"),
            callback_url: r.get("callback_url"),
        };
        let (mut doc, needs) = row.into_document()?;
        if let (true, Some(timing)) = (needs.chunk_timings, doc.timing.as_mut()) {
            timing.chunks = self.chunk_timings(doc.id).await?;
        }
        if let Some(url) = needs.callback {
            let webhook = sqlx::query_as(q::WEBHOOK_STATE).bind(doc.id.to_string()).fetch_optional(&self.readers);
            doc.callback = Some(callback(url, webhook.await?)?);
        }
        Ok(doc)
    }

    /// The chunk timings of a job that ended before the document kept them.
    async fn chunk_timings(&self, id: Uuid) -> StoreResult<Vec<ChunkTiming>> {
        Ok(done_chunks(&self.readers, &id.to_string()).await?.into_iter().map(|c| c.timing).collect())
    }

    pub async fn queued_count(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar(q::QUEUED_COUNT).fetch_one(&self.readers).await?;
        Ok(n as u64)
    }

    /// Which of `ids` are no longer running.
    async fn not_running(&self, ids: &[Uuid]) -> StoreResult<Vec<Uuid>> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let gone: Vec<String> = sqlx::query_scalar("SELECT id FROM jobs WHERE status <> 'running' AND id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.readers)
            .await?;
        gone.iter().map(|s| parse_uuid(s)).collect()
    }

    pub async fn input_segment(&self, id: Uuid, pos: u64) -> StoreResult<Vec<i64>> {
        let data: Vec<u8> = sqlx::query_scalar(q::INPUT_SEGMENT)
            .bind(id.to_string())
            .bind(pos as i64)
            .fetch_optional(&self.readers)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("job {id} has no input segment at {pos}")))?;
        Ok(crate::exec::from_le_bytes(&data).collect())
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
        let rows = sqlx::query(q::RESULT_SEGMENTS)
            .bind(id.to_string())
            .bind(from as i64)
            .bind(to as i64)
            .bind(max_rows as i64)
            .fetch_all(&self.readers)
            .await?;
        rows.into_iter().map(|r| segment(r.get("pos"), r.get("len"), r.get("data"))).collect()
    }

    pub async fn comparison(&self, id: Uuid) -> StoreResult<Option<StoredComparison>> {
        let row = sqlx::query(q::COMPARISON).bind(id.to_string()).fetch_optional(&self.readers).await?;
        Ok(row.map(|r| StoredComparison {
            id,
            created_at: r.get("created_at"),
            request: r.get("request"),
            cells: r.get("cells"),
        }))
    }

    pub async fn job_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<JobSummary>> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let rows = sqlx::query("SELECT id, status, timing FROM jobs WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.readers)
            .await?;
        rows.iter().map(|r| job_summary(r.get("id"), r.get("status"), r.get("timing"))).collect()
    }
}

/// The writes, in sqlx transactions; rows are locked job row first, then its
/// chunks (in id order when several jobs), as every writer here does.
impl PgStore {
    /// Claims nothing: a claim here is transactions of its own (see `claim`),
    /// which the claim loop, woken by the insert's notification, makes anyway.
    ///
    /// A job without an idempotency key or a queue limit, whose rows fit
    /// [`first_insert`] (every job of one input segment and at most
    /// [`INSERT_BATCH`] chunks), is one statement and its own transaction:
    /// one round trip instead of six for a tiny job.
    pub async fn insert_job(&self, job: &NewJob<'_>) -> StoreResult<(Inserted, Option<Vec<Claim>>)> {
        let id = job.id.to_string();
        let first = first_insert(job, &id)?;
        if job.idempotency.is_none() && job.max_queued.is_none() && !has_more_inserts(job) {
            sqlx::query_with(&first.sql, first.args).execute(&self.writer).await?;
            return Ok((Inserted::New, None));
        }
        let mut tx = self.writer.begin().await?;
        if let Some(key) = &job.idempotency {
            // Serialises submissions under one key across nodes.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(&key.key).execute(&mut *tx).await?;
            let known =
                sqlx::query(q::IDEMPOTENCY_GET).bind(&key.key).bind(job.created_at).fetch_optional(&mut *tx).await?;
            if let Some(known) = known {
                let hash: String = known.get("body_hash");
                let known = match hash == key.body_hash {
                    true => Inserted::Existing(parse_uuid(known.get("job_id"))?),
                    false => Inserted::KeyReused,
                };
                return Ok((known, None));
            }
            sqlx::query(q::IDEMPOTENCY_PUT)
                .bind(&key.key)
                .bind(&key.body_hash)
                .bind(&id)
                .bind(key.expires_at)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(max) = job.max_queued {
            let queued: i64 = sqlx::query_scalar(q::QUEUED_COUNT).fetch_one(&mut *tx).await?;
            if queued as u64 >= max {
                return Ok((Inserted::QueueFull, None));
            }
        }
        sqlx::query_with(&first.sql, first.args).execute(&mut *tx).await?;
        // One at a time, so a big input is never encoded twice over at once.
        for more in more_inserts(job, &id) {
            let more = more?;
            sqlx::query_with(&more.sql, more.args).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok((Inserted::New, None))
    }

    pub async fn claim_webhooks(&self, now: i64, limit: u32, lease: i64) -> StoreResult<Vec<(Uuid, String, u32)>> {
        let rows = sqlx::query(&claim_webhooks_sql(" FOR UPDATE SKIP LOCKED"))
            .bind(now)
            .bind(limit as i64)
            .bind(lease)
            .fetch_all(&self.writer)
            .await?;
        rows.iter()
            .map(|r| Ok((parse_uuid(r.get("job_id"))?, r.get("url"), r.get::<i64, _>("attempts") as u32)))
            .collect()
    }

    pub async fn record_webhook(
        &self,
        id: Uuid,
        attempt: &DeliveryAttempt,
        outcome: WebhookOutcome,
    ) -> StoreResult<()> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let history: Option<String> = sqlx::query_scalar(&format!("{} FOR UPDATE", q::WEBHOOK_HISTORY))
            .bind(&id_text)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(history) = history else { return Ok(()) }; // the job was deleted
        let (state, attempts, next_at, history) = webhook_record(&history, attempt, outcome)?;
        sqlx::query(q::WEBHOOK_RECORD)
            .bind(&id_text)
            .bind(state)
            .bind(attempts)
            .bind(next_at)
            .bind(history)
            .execute(&mut *tx)
            .await?;
        sqlx::query(q::BUMP_VERSION).bind(&id_text).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn claim(&self, node: &str, lanes: u32, lease_until: i64) -> StoreResult<Vec<Claim>> {
        let mut claims = Vec::new();
        let mut free = lanes;
        for id in self.candidates().await? {
            if free == 0 {
                break;
            }
            let id = parse_uuid(&id)?;
            let claimed = self.claim_job(id, node, free, lease_until, ClaimMode::Skip).await;
            add_claim(&mut claims, &mut free, id, claimed)?;
        }
        Ok(claims)
    }

    pub async fn claim_next(&self, id: Uuid, node: &str, lease_until: i64) -> StoreResult<Option<ChunkPlan>> {
        let claim = self.claim_job(id, node, 1, lease_until, ClaimMode::Wait).await?;
        Ok(claim.and_then(|c| c.chunks.into_iter().next()))
    }

    /// Claims up to `max` chunks of one job in a transaction of its own (see [`claim_in`]).
    async fn claim_job(
        &self,
        id: Uuid,
        node: &str,
        max: u32,
        lease_until: i64,
        mode: ClaimMode,
    ) -> StoreResult<Option<Claim>> {
        let mut tx = self.writer.begin().await?;
        let Some((claim, _)) = claim_in(&mut tx, id, node, max, lease_until, mode).await? else { return Ok(None) };
        tx.commit().await?;
        Ok(Some(claim))
    }

    /// A lane's next work, in one transaction: the next claimable job and,
    /// when it is small ([`batchable`]), up to `jobs - 1` small jobs right
    /// behind it in claim order, one chunk each (see [`add_to_batch`]; a
    /// corrupt job's claim writes nothing, so the others' stand).
    async fn claim_batch(&self, node: &str, jobs: u32, lease_until: i64) -> StoreResult<Vec<Claim>> {
        let candidates = self.candidates().await?;
        let mut tx = self.writer.begin().await?;
        let mut claims = Vec::new();
        for id in candidates {
            let id = parse_uuid(&id)?;
            let mode = if claims.is_empty() { ClaimMode::Skip } else { ClaimMode::SkipUnlessSmall };
            let claimed = claim_in(&mut tx, id, node, 1, lease_until, mode).await;
            if !add_to_batch(&mut claims, jobs, id, claimed)? {
                break;
            }
        }
        tx.commit().await?;
        Ok(claims)
    }

    /// The ids of the next claimable jobs, in claim order (see `Store::claim`).
    async fn candidates(&self) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(&CANDIDATES).bind(CLAIM_WINDOW).fetch_all(&self.writer).await?)
    }

    pub async fn heartbeat(&self, node: &str, lease_until: i64, local: &[Uuid]) -> StoreResult<Vec<Uuid>> {
        if local.is_empty() {
            return Ok(Vec::new());
        }
        // Only chunks of jobs with live lanes here: a chunk a lane let go
        // of without finishing (its job stopped) must expire and be rescued.
        let mut renew = QueryBuilder::<Postgres>::new("UPDATE chunks SET lease_until = ");
        renew.push_bind(lease_until).push(" WHERE owner = ").push_bind(node.to_string());
        renew.push(" AND state = 'running' AND job_id IN (");
        let mut ids = renew.separated(", ");
        for id in local {
            ids.push_bind(id.to_string());
        }
        renew.push(")");
        renew.build().execute(&self.writer).await?;
        self.not_running(local).await
    }

    /// Puts running chunks back to pending, in jobs that are still
    /// running, and fixes their jobs' counters; a job with no chunk left
    /// running goes back to `queued`.
    pub(super) async fn release_where(&self, which: Release<'_>) -> StoreResult<u64> {
        let condition = release_condition(which);
        let mut tx = self.writer.begin().await?;
        // Job rows before chunk rows (in id order), as every other writer locks them.
        let lock = format!(
            "SELECT id FROM jobs WHERE status = 'running' AND id IN \
             (SELECT job_id FROM chunks WHERE state = 'running' AND {condition}) ORDER BY id FOR UPDATE"
        );
        bind_release(sqlx::query(&lock), which).execute(&mut *tx).await?;
        let sql = release_chunks_sql(condition);
        let rows = bind_release(sqlx::query(&sql), which).fetch_all(&mut *tx).await?;
        let mut per_job = std::collections::BTreeMap::<String, i64>::new();
        for row in &rows {
            *per_job.entry(row.get::<String, _>("job_id")).or_default() += 1;
        }
        for (job, n) in &per_job {
            sqlx::query(q::RELEASE_JOB).bind(job).bind(*n).execute(&mut *tx).await?;
        }
        if !per_job.is_empty() {
            notify(&mut tx, WORK_CHANNEL, "").await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    pub async fn put_segment(&self, id: Uuid, chunk: u32, node: &str, pos: u64, squares: &[i64]) -> StoreResult<bool> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        // The job row, shared: an ending (cancel, failure) waits for this
        // segment and then deletes it, or this insert waits for the ending
        // and then finds the chunk no longer running.
        sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR SHARE").bind(&id_text).execute(&mut *tx).await?;
        let stored = sqlx::query(q::PUT_SEGMENT)
            .bind(&id_text)
            .bind(pos as i64)
            .bind(squares.len() as i64)
            .bind(&*le_bytes(squares))
            .bind(chunk as i64)
            .bind(node)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(stored > 0)
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
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        // Job row before chunk rows, as every other writer locks them.
        sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE").bind(&id_text).execute(&mut *tx).await?;
        let Some(mut done) = complete_in(&mut tx, &id_text, chunk, record, last, now).await? else {
            return Ok(None); // no longer ours: canceled, failed or rescued
        };
        tx.commit().await?;
        if let (Some(_), Some(next)) = (done.finished_wall_ms, next) {
            done.next = self.claim_after_completion(next, 1).await.pop();
        }
        Ok(Some(done))
    }

    /// Every chunk in `ran` in one transaction and, once one of their jobs
    /// finished, the lane's next claims: up to `jobs` small jobs in a second
    /// one ([`PgStore::claim_batch`]). A tiny job costs a share of two commits.
    pub async fn complete_chunks(
        &self,
        ran: &[RanChunk],
        now: i64,
        next: Option<NextClaim<'_>>,
        jobs: u32,
    ) -> StoreResult<Completions> {
        let mut tx = self.writer.begin().await?;
        // Job rows before chunk rows, in id order, as every other writer locks them.
        let mut ids: Vec<String> = ran.iter().map(|r| r.id.to_string()).collect();
        ids.sort();
        ids.dedup();
        sqlx::query("SELECT 1 FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        let mut done = Vec::with_capacity(ran.len());
        for RanChunk { id, chunk, record, squares, .. } in ran {
            let last = squares.as_ref().map(|(pos, squares)| (*pos, squares.as_slice()));
            done.push(complete_in(&mut tx, &id.to_string(), chunk, record, last, now).await?);
        }
        tx.commit().await?;
        let finished = done.iter().flatten().any(|d| d.finished_wall_ms.is_some());
        let next = match next {
            Some(next) if finished => self.claim_after_completion(next, jobs).await,
            _ => Vec::new(),
        };
        Ok(Completions { done, next })
    }

    /// A lane's next claims once its completions are stored: a failed claim
    /// only leaves the next jobs to the claim loop.
    async fn claim_after_completion(&self, next: NextClaim<'_>, jobs: u32) -> Vec<Claim> {
        self.claim_batch(next.node, jobs, next.lease_until).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "claiming after a completion failed");
            Vec::new()
        })
    }

    pub async fn fail_job(&self, id: Uuid, problem: &Problem, now: i64) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await?;
        let ended = finish(&mut tx, &id.to_string(), JobStatus::Failed, Some(problem), now).await?;
        tx.commit().await?;
        Ok(ended.is_some())
    }

    pub async fn cancel_job(&self, id: Uuid, now: i64, problem: &Problem) -> StoreResult<Canceled> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!("{} FOR UPDATE", q::JOB_STATUS_STRATEGY))
            .bind(&id_text)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(Canceled::NotFound) };
        let status = parse_status(row.get("status"))?;
        let strategy = parse_strategy(row.get("strategy"))?;
        if status.is_final() {
            return Ok(Canceled::Ended(status));
        }
        finish(&mut tx, &id_text, JobStatus::Canceled, Some(problem), now).await?;
        tx.commit().await?;
        Ok(Canceled::Now { was_running: status == JobStatus::Running, strategy })
    }

    pub async fn record_attempt_error(&self, id: Uuid, error: &Problem, now: i64) -> StoreResult<Option<u32>> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let row =
            sqlx::query(&format!("{} FOR UPDATE", q::JOB_ATTEMPTS)).bind(&id_text).fetch_optional(&mut *tx).await?;
        let Some(row) = row else { return Ok(None) };
        let attempts = row.get::<i64, _>("attempts") as u32;
        let Some(errors) =
            next_attempt(attempts, row.get::<i64, _>("max_attempts") as u32, row.get("attempt_errors"), error, now)?
        else {
            return Ok(None); // exhausted: the caller fails the job
        };
        sqlx::query(q::RECORD_ATTEMPT)
            .bind(&id_text)
            .bind(i64::from(attempts + 1))
            .bind(errors)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(attempts + 1))
    }

    pub async fn purge_finished(&self, cutoff: i64, now: i64, batch: u32) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await?;
        let deleted =
            sqlx::query(q::PURGE_JOBS).bind(cutoff).bind(batch as i64).execute(&mut *tx).await?.rows_affected();
        sqlx::query(q::PURGE_KEYS).bind(now).bind(batch as i64).execute(&mut *tx).await?;
        sqlx::query(q::PURGE_COMPARISONS).bind(cutoff).bind(batch as i64).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    pub async fn insert_comparison(&self, c: &StoredComparison) -> StoreResult<()> {
        sqlx::query(q::INSERT_COMPARISON)
            .bind(c.id.to_string())
            .bind(c.created_at)
            .bind(&c.request)
            .bind(&c.cells)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn delete_job(&self, id: Uuid) -> StoreResult<Deleted> {
        let id_text = id.to_string();
        let mut tx = self.writer.begin().await?;
        let status: Option<String> = sqlx::query_scalar(&format!("{} FOR UPDATE", q::JOB_STATUS))
            .bind(&id_text)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(status) = status else { return Ok(Deleted::NotFound) };
        let status = parse_status(&status)?;
        if !status.is_final() {
            return Ok(Deleted::Busy(status));
        }
        sqlx::query(q::DELETE_JOB).bind(&id_text).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Deleted::Yes)
    }
}

/// A job's done chunks ([`q::DONE_CHUNKS`]), in order, on the pool or in a transaction.
async fn done_chunks<'e>(db: impl sqlx::PgExecutor<'e>, id: &str) -> StoreResult<Vec<DoneChunk>> {
    let rows = sqlx::query(q::DONE_CHUNKS).bind(id).fetch_all(db).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let times = ["start_ms", "duration_ms", "spawn_ms", "compute_ms", "store_ms"].map(|c| r.get(c));
            done_chunk(r.get("idx"), r.get("pos"), r.get("len"), r.get("worker"), r.get("node"), times, r.get("runs"))
        })
        .collect())
}

/// Marks a chunk done inside `tx` (its job's row locked by the caller) with
/// its `last` segment and, for the job's last chunk, ends the job (see
/// `Store::complete_chunk`); `None` if the chunk is no longer `record.node`'s
/// (canceled, failed or rescued).
async fn complete_in(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    id: &str,
    chunk: &ChunkPlan,
    record: &ChunkRecord,
    last: Option<(u64, &[i64])>,
    now: i64,
) -> StoreResult<Option<Completion>> {
    let (pos, len, data) = match last {
        Some((pos, squares)) => (pos as i64, squares.len() as i64, Some(le_bytes(squares))),
        None => (0, 0, None),
    };
    let row = sqlx::query(&COMPLETE_CHUNK)
        .bind(id)
        .bind(chunk.index as i64)
        .bind(&record.worker)
        .bind(&record.node)
        .bind(record.start_ms)
        .bind(record.duration_ms)
        .bind(record.spawn_ms)
        .bind(record.compute_ms)
        .bind(record.store_ms)
        .bind(chunk.len as i64)
        .bind(pos)
        .bind(len)
        .bind(data.as_deref())
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let progress = Progress {
        chunks_done: row.get::<i64, _>("chunks_done") as u64,
        chunks_total: row.get::<i64, _>("chunks_total") as u64,
        numbers_done: row.get::<i64, _>("numbers_done") as u64,
    };
    let mut finished_wall_ms = None;
    if progress.chunks_done == progress.chunks_total {
        // A job of one chunk has just this one done: no need to read it back.
        let chunks = match progress.chunks_total {
            1 => {
                let times = [record.start_ms, record.duration_ms, record.spawn_ms, record.compute_ms, record.store_ms];
                let (worker, node) = (Some(record.worker.clone()), Some(record.node.clone()));
                let (index, offset, len) = (chunk.index.into(), chunk.offset as i64, chunk.len as i64);
                vec![done_chunk(index, offset, len, worker, node, times.map(Some), row.get("runs"))]
            }
            _ => done_chunks(&mut **tx, id).await?,
        };
        finished_wall_ms = end(tx, id, JobStatus::Succeeded, None, now, job_times(&row), chunks).await?;
    }
    Ok(Some(Completion { progress, finished_wall_ms, next: None }))
}

/// The claim scan (see [`claim_candidates_sql`]).
static CANDIDATES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| claim_candidates_sql("jobs j"));
/// [`q::CLAIMABLE_JOB`], locking the row: waiting for it, or passing over it.
static CLAIMABLE_WAIT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{} FOR UPDATE", q::CLAIMABLE_JOB));
static CLAIMABLE_SKIP_LOCKED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{} FOR UPDATE SKIP LOCKED", q::CLAIMABLE_JOB));

/// How a claim treats a job row another transaction has locked, and which jobs it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimMode {
    /// Wait for the lock (a lane claiming more of its own job).
    Wait,
    /// Skip a locked job (the claim scan).
    Skip,
    /// Skip a locked job, and take only a small one (the rest of a lane's batch).
    SkipUnlessSmall,
}

/// Claims up to `max` chunks of job `id` inside `tx`, with the job's row
/// locked as `mode` says; nothing of the job is written when it returns
/// `None` or a `Corrupt` error (the transaction stays usable). Returns the
/// claim and whether the job is [`batchable`].
async fn claim_in(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    id: Uuid,
    node: &str,
    max: u32,
    lease_until: i64,
    mode: ClaimMode,
) -> StoreResult<Option<(Claim, bool)>> {
    let id_text = id.to_string();
    let sql = if mode == ClaimMode::Wait { &CLAIMABLE_WAIT } else { &CLAIMABLE_SKIP_LOCKED };
    let row = sqlx::query(sql).bind(&id_text).fetch_optional(&mut **tx).await?;
    let Some(row) = row else { return Ok(None) };
    let job = ClaimRow {
        count: row.get("count"),
        cores: row.get("cores"),
        strategy: row.get("strategy"),
        transport: row.get("transport"),
        sleep_ms: row.get("sleep_ms"),
        spin: row.get("spin"),
        range: (row.get("range_start"), row.get("range_end"), row.get("range_step")),
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        attempts: row.get("attempts"),
        max_attempts: row.get("max_attempts"),
        timeout_ms: row.get("timeout_ms"),
        request_id: row.get("request_id"),
    };
    let small = batchable(&job, row.get("chunks_total"));
    if mode == ClaimMode::SkipUnlessSmall && !small {
        return Ok(None);
    }
    let series: Option<String> = row.get("series");
    if let (Some(series), "queued") = (series, row.get::<String, _>("status").as_str()) {
        // A series runs one job at a time: start this one only when
        // no other is running (serialised across nodes by a lock).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(&series).execute(&mut **tx).await?;
        let busy: i64 = sqlx::query_scalar(q::SERIES_BUSY).bind(&series).bind(&id_text).fetch_one(&mut **tx).await?;
        if busy > 0 {
            return Ok(None);
        }
    }
    let take = chunks_to_take(
        parse_strategy(&job.strategy)?,
        row.get("cores"),
        row.get("chunks_running"),
        row.get("chunks_ready"),
        max,
    );
    if take <= 0 {
        return Ok(None);
    }
    // Read the clock only now: the job's insert has committed, so its start
    // is never before its creation. A corrupt row fails here, before any write.
    let now = crate::domain::now_micros();
    let job = job.into_job(id, now)?;
    let rows = sqlx::query(&CLAIM_AND_START)
        .bind(&id_text)
        .bind(node)
        .bind(lease_until)
        .bind(take)
        .bind(now)
        .bind(prefetch_input(&job))
        .fetch_all(&mut **tx)
        .await?;
    let mut chunks = Vec::with_capacity(rows.len());
    let mut input = None;
    for row in &rows {
        chunks.push(ChunkPlan {
            index: row.get::<i64, _>("idx") as u32,
            offset: row.get::<i64, _>("pos") as u64,
            len: row.get::<i64, _>("len") as u64,
        });
        if let Some(data) = row.get::<Option<Vec<u8>>, _>("input") {
            input = Some(crate::exec::from_le_bytes(&data).collect());
        }
    }
    chunks.sort_by_key(|c| c.index);
    if chunks.is_empty() {
        return Err(StoreError::Corrupt(format!("job {id} counts ready chunks it does not have")));
    }
    if prefetch_input(&job) && input.is_none() {
        // As a read of the missing segment fails: the whole claim with it.
        return Err(sqlx::Error::RowNotFound.into());
    }
    Ok(Some((Claim { job, chunks, input }, small)))
}

/// Ends a job that is queued or running, inside `tx`: stores its status,
/// error and timing totals, and releases its running chunks. Returns the wall
/// time, or `None` if the job had already ended.
async fn finish(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    id: &str,
    status: JobStatus,
    error: Option<&Problem>,
    now: i64,
) -> StoreResult<Option<f64>> {
    let row = sqlx::query(q::JOB_TIMES).bind(id).fetch_one(&mut **tx).await?;
    let chunks = done_chunks(&mut **tx, id).await?;
    end(tx, id, status, error, now, job_times(&row), chunks).await
}

/// A job's times from a row with `created_at`, `started_at` and `has_callback`.
fn job_times(row: &PgRow) -> JobTimes {
    JobTimes {
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        has_callback: row.get("has_callback"),
    }
}

/// [`finish`] with the job's times and done chunks already read.
async fn end(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    id: &str,
    status: JobStatus,
    error: Option<&Problem>,
    now: i64,
    times: JobTimes,
    chunks: Vec<DoneChunk>,
) -> StoreResult<Option<f64>> {
    let (timing, wall_ms) = timing_totals(times.created_at, times.started_at, chunks, now);
    // The end and its notification (delivered on commit) in one round trip.
    let ended = sqlx::query(&FINISH_AND_NOTIFY)
        .bind(id)
        .bind(status.as_str())
        .bind(now)
        .bind(timing)
        .bind(error.map(|e| serde_json::to_string(e).expect("problem serialises")))
        .bind(JOBS_CHANNEL)
        .bind(format!("{id} {}", status.as_str()))
        .fetch_optional(&mut **tx)
        .await?;
    if ended.is_none() {
        return Ok(None);
    }
    // A job that succeeded has every chunk done and keeps its results.
    if status != JobStatus::Succeeded {
        sqlx::query(q::RELEASE_JOB_CHUNKS).bind(id).execute(&mut **tx).await?;
        sqlx::query(q::DELETE_RESULTS).bind(id).execute(&mut **tx).await?;
    }
    if times.has_callback {
        sqlx::query(q::WEBHOOK_DUE).bind(id).bind(now).execute(&mut **tx).await?;
    }
    Ok(Some(wall_ms))
}

/// [`q::FINISH_JOB`] and, if it ended the job, `pg_notify($6, $7)`: one row then, none otherwise.
static FINISH_AND_NOTIFY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("WITH ended AS ({} RETURNING id) SELECT pg_notify($6, $7) FROM ended", q::FINISH_JOB)
});

/// A chunk's completion in one round trip: [`q::CHUNK_DONE`]; its last
/// segment (`$11` position, `$12` length, `$13` bytes, none when `$13` is
/// null); the job's counts (`$10` numbers). No row when the chunk is no
/// longer the node's; otherwise the job's counts and times, as after it,
/// and the chunk's `runs`.
static COMPLETE_CHUNK: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH done AS ({} RETURNING job_id, runs), \
         stored AS (INSERT INTO results (job_id, pos, len, data) SELECT job_id, $11, $12, $13 FROM done \
         WHERE $13::bytea IS NOT NULL ON CONFLICT (job_id, pos) DO UPDATE SET len = excluded.len, data = excluded.data) \
         UPDATE jobs SET chunks_done = chunks_done + 1, chunks_running = chunks_running - 1, \
         numbers_done = numbers_done + $10, version = version + 1 WHERE id = $1 AND EXISTS (SELECT 1 FROM done) \
         RETURNING chunks_done, chunks_total, numbers_done, created_at, started_at, \
         callback_url IS NOT NULL AS has_callback, (SELECT runs FROM done) AS runs",
        q::CHUNK_DONE
    )
});

/// A claim's writes and reads in one statement: [`q::CLAIM_CHUNKS`] (`$1`
/// job, `$2` node, `$3` lease, `$4` how many), then [`q::START_JOB`] for as
/// many chunks as it claimed (`$5` now; no start when it claimed none) and,
/// when `$6`, the job's input segment at 0 (in the `input` column of the
/// first chunk's row, null in the others).
static CLAIM_AND_START: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let start = q::START_JOB.replace("$2", "$5").replace("$3", "(SELECT COUNT(*) FROM claimed)");
    format!(
        "WITH claimed AS ({}), started AS ({start} AND EXISTS (SELECT 1 FROM claimed)) \
         SELECT idx, pos, len, CASE WHEN $6 AND idx = (SELECT MIN(idx) FROM claimed) \
         THEN (SELECT data FROM job_inputs WHERE job_id = $1 AND pos = 0) END AS input FROM claimed",
        q::CLAIM_CHUNKS
    )
});

/// Queues a notification, delivered on commit.
async fn notify(tx: &mut sqlx::Transaction<'static, Postgres>, channel: &str, payload: &str) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(channel).bind(payload).execute(&mut **tx).await?;
    Ok(())
}

/// Binds `$1` of a release statement.
fn bind_release<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    which: Release<'_>,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    match which {
        Release::ExpiredBefore(now) => query.bind(now),
        Release::Owner(owner) => query.bind(owner.to_string()),
        Release::All => query.bind(0i64),
    }
}

/// One statement's text and its arguments, built together so that each
/// `$N` in the text is the argument added with it.
struct Statement {
    sql: String,
    args: PgArguments,
}

impl Statement {
    fn new(sql: &str) -> Statement {
        Statement { sql: sql.to_owned(), args: PgArguments::default() }
    }

    /// Adds `value` as the next argument, for a `$N` already in the text.
    fn arg<'q, T: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + 'q>(
        &mut self,
        value: T,
    ) -> StoreResult<&mut Self> {
        self.args.add(value).map_err(sqlx::Error::Encode)?;
        Ok(self)
    }

    /// Adds `value` as the next argument and its placeholder to the text.
    fn bind<'q, T: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + 'q>(&mut self, value: T) -> StoreResult<()> {
        self.arg(value)?;
        write!(self.sql, "${}", self.args.len()).expect("writing to a String");
        Ok(())
    }
}

/// The statement that stores a new job, or begins to: one writeable CTE
/// that inserts the job's row (`$1` its id, reused by every row after it),
/// its metadata, its input's first segment and its first [`INSERT_BATCH`]
/// chunks, and notifies [`WORK_CHANNEL`] (delivered at commit). The rest,
/// if any ([`has_more_inserts`]), comes from [`more_inserts`].
fn first_insert(job: &NewJob<'_>, id: &str) -> StoreResult<Statement> {
    let spec = job.spec;
    let echo = serde_json::to_string(&spec.echo()).expect("the echo serialises");
    let range = match &spec.input {
        Input::Range(r) => Some(*r),
        Input::List(_) => None,
    };
    let mut first = Statement::new(&format!("WITH job AS ({})", q::INSERT_JOB));
    first
        .arg(id)?
        .arg(spec.priority as i64)?
        .arg(job.created_at)?
        .arg(spec.count as i64)?
        .arg(spec.cores as i64)?
        .arg(spec.strategy.as_str())?
        .arg(spec.transport.map(Transport::as_str))?
        .arg(spec.simulate.sleep_ms as i64)?
        .arg(spec.simulate.spin as i64)?
        .arg(range.map(|r| r.start))?
        .arg(range.map(|r| r.end))?
        .arg(range.map(|r| r.step))?
        .arg(job.chunks.len() as i64)?
        .arg(spec.max_attempts as i64)?
        .arg(spec.timeout_ms.map(|t| t as i64))?
        .arg(echo)?
        .arg(spec.callback_url.as_deref())?
        .arg(job.series.map(|s| s.to_string()))?
        .arg(job.request_id.as_deref())?;
    if !spec.metadata.is_empty() {
        first.sql.push_str(", metadata AS (INSERT INTO job_metadata (job_id, key, value) VALUES ");
        for (i, (key, value)) in spec.metadata.iter().enumerate() {
            first.sql.push_str(if i == 0 { "($1, " } else { ", ($1, " });
            first.bind(key.as_str())?;
            first.sql.push_str(", ");
            first.bind(value.as_str())?;
            first.sql.push(')');
        }
        first.sql.push(')');
    }
    if let Some(segment) = input_segments(job).next() {
        first.sql.push_str(", input AS (INSERT INTO job_inputs (job_id, pos, data) VALUES ($1, 0, ");
        first.bind(&*le_bytes(segment))?;
        first.sql.push_str("))");
    }
    if let Some(batch) = job.chunks.chunks(INSERT_BATCH).next() {
        first.sql.push_str(", chunks AS (");
        push_chunk_rows(&mut first, batch)?;
        first.sql.push(')');
    }
    first.sql.push_str(" SELECT pg_notify(");
    first.bind(WORK_CHANNEL)?;
    first.sql.push_str(", '')");
    Ok(first)
}

/// Whether a job's rows need more than [`first_insert`].
fn has_more_inserts(job: &NewJob<'_>) -> bool {
    input_segments(job).nth(1).is_some() || job.chunks.len() > INSERT_BATCH
}

/// The statements that store what [`first_insert`] left of a job, built one
/// at a time: the rest of its input, a segment each, then of its chunks,
/// [`INSERT_BATCH`] each.
fn more_inserts<'a>(job: &'a NewJob<'_>, id: &'a str) -> impl Iterator<Item = StoreResult<Statement>> + 'a {
    let inputs = input_segments(job).enumerate().skip(1).map(move |(i, segment)| {
        let mut next = Statement::new(q::INSERT_INPUT);
        next.arg(id)?.arg((i as u64 * SEGMENT_LEN) as i64)?.arg(&*le_bytes(segment))?;
        Ok(next)
    });
    let chunks = job.chunks.chunks(INSERT_BATCH).skip(1).map(move |batch| {
        let mut next = Statement::new("");
        next.arg(id)?;
        push_chunk_rows(&mut next, batch)?;
        Ok(next)
    });
    inputs.chain(chunks)
}

/// A list job's numbers, a stored input segment at a time (none for a range).
fn input_segments<'a>(job: &'a NewJob<'_>) -> impl Iterator<Item = &'a [i64]> + 'a {
    let numbers: &[i64] = match &job.spec.input {
        Input::List(numbers) => numbers,
        Input::Range(_) => &[],
    };
    numbers.chunks(SEGMENT_LEN as usize)
}

/// `INSERT INTO chunks … VALUES` for `batch`, each row with `$1` as its job.
fn push_chunk_rows(statement: &mut Statement, batch: &[ChunkPlan]) -> StoreResult<()> {
    statement.sql.push_str("INSERT INTO chunks (job_id, idx, pos, len) VALUES ");
    for (i, chunk) in batch.iter().enumerate() {
        statement.sql.push_str(if i == 0 { "($1, " } else { ", ($1, " });
        statement.bind(chunk.index as i64)?;
        statement.sql.push_str(", ");
        statement.bind(chunk.offset as i64)?;
        statement.sql.push_str(", ");
        statement.bind(chunk.len as i64)?;
        statement.sql.push(')');
    }
    Ok(())
}
