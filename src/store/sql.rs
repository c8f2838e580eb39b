//! The SQL both backends share, written once with `$N` placeholders (SQLite
//! accepts them too) and instantiated per backend by [`sql_store!`]: concrete
//! types keep sqlx's type checks simple, one text keeps the backends from
//! drifting. Where the dialects differ, the code branches on `Self::DIALECT`.

use uuid::Uuid;

use super::{StoreError, StoreResult};
use crate::domain::{JobStatus, Strategy, Transport};

/// Totals kept in `jobs.timing` once a job has ended.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct TimingTotals {
    pub queue_ms: f64,
    pub wall_ms: f64,
    pub spawn_ms: f64,
    pub compute_ms: f64,
    pub store_ms: f64,
}

/// Columns the job document is built from.
pub(super) const JOB_COLUMNS: &str = "id, status, created_at, started_at, finished_at, request, attempts, \
     attempt_errors, chunks_total, chunks_done, numbers_done, timing, error, version, callback_url";

/// Columns a claim returns about its job.
pub(super) const CLAIM_COLUMNS: &str = "count, cores, strategy, transport, sleep_ms, spin, range_start, range_end, \
     range_step, created_at, started_at, attempts, max_attempts, timeout_ms, request_id";

/// Rows per multi-row INSERT (well under both backends' parameter limits).
pub(super) const INSERT_BATCH: usize = 1000;

/// How many candidate jobs one claim pass looks at.
pub(super) const CLAIM_CANDIDATES: i64 = 16;

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

/// Implements the shared store methods for `$store`, whose fields are
/// `writer` and `readers` pools of database `$db`.
macro_rules! sql_store {
    ($store:ident, $db:ty) => {
        impl $store {
            pub async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.readers).await?;
                Ok(())
            }

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
                    if Self::DIALECT == Dialect::Postgres {
                        // Serialises submissions under one key across nodes.
                        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                            .bind(&key.key)
                            .execute(&mut *tx)
                            .await?;
                    }
                    let known =
                        sqlx::query("SELECT body_hash, job_id FROM idempotency_keys WHERE key = $1 AND expires_at > $2")
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
                        "INSERT INTO idempotency_keys (key, body_hash, job_id, expires_at) VALUES ($1, $2, $3, $4) \
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
                    let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
                        .fetch_one(&mut *tx)
                        .await?;
                    if queued as u64 >= max {
                        return Ok(Inserted::QueueFull);
                    }
                }
                sqlx::query(
                    "INSERT INTO jobs (id, status, priority, created_at, count, cores, strategy, transport, sleep_ms, \
                     spin, range_start, range_end, range_step, chunks_total, chunks_ready, max_attempts, timeout_ms, \
                     request, callback_url, series, request_id) VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9, \
                     $10, $11, $12, $13, $13, $14, $15, $16, $17, $18, $19)",
                )
                .bind(&id)
                .bind(spec.priority as i64)
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
                .bind(spec.callback_url.as_deref())
                .bind(job.series.map(|s| s.to_string()))
                .bind(job.request_id.as_deref())
                .execute(&mut *tx)
                .await?;
                for (key, value) in &spec.metadata {
                    sqlx::query("INSERT INTO job_metadata (job_id, key, value) VALUES ($1, $2, $3)")
                        .bind(&id)
                        .bind(key)
                        .bind(value)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Input::List(numbers) = &spec.input {
                    for (i, segment) in numbers.chunks(SEGMENT_LEN as usize).enumerate() {
                        sqlx::query("INSERT INTO job_inputs (job_id, pos, data) VALUES ($1, $2, $3)")
                            .bind(&id)
                            .bind((i as u64 * SEGMENT_LEN) as i64)
                            .bind(&*le_bytes(segment))
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                for batch in job.chunks.chunks(INSERT_BATCH) {
                    let mut insert = QueryBuilder::<$db>::new("INSERT INTO chunks (job_id, idx, pos, len) ");
                    insert.push_values(batch, |mut row, chunk| {
                        row.push_bind(id.clone())
                            .push_bind(chunk.index as i64)
                            .push_bind(chunk.offset as i64)
                            .push_bind(chunk.len as i64);
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                Self::notify(&mut tx, WORK_CHANNEL, "").await?;
                tx.commit().await?;
                Ok(Inserted::New)
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

            pub async fn status(&self, id: Uuid) -> StoreResult<Option<JobStatus>> {
                let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&self.readers)
                    .await?;
                status.map(|s| parse_status(&s)).transpose()
            }

            pub async fn status_and_count(&self, id: Uuid) -> StoreResult<Option<(JobStatus, u64)>> {
                let row = sqlx::query("SELECT status, count FROM jobs WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&self.readers)
                    .await?;
                row.map(|r| Ok((parse_status(r.get("status"))?, r.get::<i64, _>("count") as u64))).transpose()
            }

            pub async fn list_jobs(&self, query: &ListQuery) -> StoreResult<Vec<JobDocument>> {
                let mut sql = QueryBuilder::<$db>::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE 1 = 1"));
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

            async fn document(&self, row: &<$db as sqlx::Database>::Row) -> StoreResult<JobDocument> {
                let id = parse_uuid(row.get("id"))?;
                let status = parse_status(row.get("status"))?;
                let request: RequestEcho = parse_json(row.get("request"))?;
                let timing: Option<String> = row.get("timing");
                let timing = match timing {
                    None => None,
                    Some(json) => {
                        let t: TimingTotals = parse_json(&json)?;
                        Some(Timing {
                            queue_ms: round_ms(t.queue_ms),
                            wall_ms: round_ms(t.wall_ms),
                            spawn_ms: round_ms(t.spawn_ms),
                            compute_ms: round_ms(t.compute_ms),
                            store_ms: round_ms(t.store_ms),
                            chunks: self.chunk_timings(id).await?,
                        })
                    }
                };
                let callback_url: Option<String> = row.get("callback_url");
                let callback = match callback_url {
                    None => None,
                    Some(url) => Some(self.callback(id, url).await?),
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
                    callback,
                })
            }

            async fn callback(&self, id: Uuid, url: String) -> StoreResult<Callback> {
                let row = sqlx::query("SELECT state, history FROM webhooks WHERE job_id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&self.readers)
                    .await?;
                Ok(match row {
                    None => Callback { url, state: "waiting".into(), attempts: Vec::new() },
                    Some(row) => Callback { url, state: row.get("state"), attempts: parse_json(row.get("history"))? },
                })
            }

            pub async fn claim_webhooks(
                &self,
                now: i64,
                limit: u32,
                lease: i64,
            ) -> StoreResult<Vec<(Uuid, String, u32)>> {
                let lock = if Self::DIALECT == Dialect::Postgres { " FOR UPDATE SKIP LOCKED" } else { "" };
                let rows = sqlx::query(&format!(
                    "UPDATE webhooks SET next_at = $1 + $3 WHERE job_id IN (SELECT job_id FROM webhooks \
                     WHERE state = 'pending' AND next_at <= $1 ORDER BY next_at LIMIT $2{lock}) \
                     RETURNING job_id, url, attempts"
                ))
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
                let lock = if Self::DIALECT == Dialect::Postgres { " FOR UPDATE" } else { "" };
                let history: Option<String> =
                    sqlx::query_scalar(&format!("SELECT history FROM webhooks WHERE job_id = $1{lock}"))
                        .bind(&id_text)
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some(history) = history else { return Ok(()) }; // the job was deleted
                let mut attempts: Vec<DeliveryAttempt> = parse_json(&history)?;
                attempts.push(attempt.clone());
                let (state, next_at) = match outcome {
                    WebhookOutcome::Delivered => ("delivered", 0),
                    WebhookOutcome::Retry { next_at } => ("pending", next_at),
                    WebhookOutcome::Failed => ("failed", 0),
                };
                sqlx::query(
                    "UPDATE webhooks SET state = $2, attempts = $3, next_at = $4, history = $5 WHERE job_id = $1",
                )
                .bind(&id_text)
                .bind(state)
                .bind(attempts.len() as i64)
                .bind(next_at)
                .bind(serde_json::to_string(&attempts).expect("attempts serialise"))
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE jobs SET version = version + 1 WHERE id = $1").bind(&id_text).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn chunk_timings(&self, id: Uuid) -> StoreResult<Vec<ChunkTiming>> {
                let rows = sqlx::query(
                    "SELECT idx, pos, len, worker, node, start_ms, duration_ms, runs FROM chunks \
                     WHERE job_id = $1 AND state = 'done' ORDER BY idx",
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
                        start_ms: round_ms(r.get::<Option<f64>, _>("start_ms").unwrap_or(0.0)),
                        duration_ms: round_ms(r.get::<Option<f64>, _>("duration_ms").unwrap_or(0.0)),
                        runs: r.get::<i64, _>("runs") as u32,
                    })
                    .collect())
            }

            pub async fn queued_count(&self) -> StoreResult<u64> {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
                    .fetch_one(&self.readers)
                    .await?;
                Ok(n as u64)
            }

            pub async fn claim(&self, node: &str, lanes: u32, lease_until: i64) -> StoreResult<Vec<Claim>> {
                // Only jobs that can take a chunk now: below their cores, and not
                // waiting behind a running job of their series.
                let candidates: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM jobs j WHERE chunks_ready > 0 AND status IN ('queued', 'running') \
                     AND chunks_running < CASE WHEN strategy = 'sequential' THEN 1 ELSE cores END \
                     AND (series IS NULL OR status = 'running' OR NOT EXISTS \
                     (SELECT 1 FROM jobs s WHERE s.series = j.series AND s.status = 'running')) \
                     ORDER BY priority DESC, created_at, id LIMIT $1",
                )
                .bind(CLAIM_CANDIDATES)
                .fetch_all(&self.writer)
                .await?;
                let mut claims = Vec::new();
                let mut free = lanes;
                for id in candidates {
                    if free == 0 {
                        break;
                    }
                    let id = parse_uuid(&id)?;
                    match self.claim_job(id, node, free, lease_until, true).await {
                        Ok(Some(claim)) => {
                            free -= claim.chunks.len() as u32;
                            claims.push(claim);
                        }
                        Ok(None) => {}
                        // One bad job must not stop every other job from being claimed.
                        Err(e @ StoreError::Corrupt(_)) => tracing::error!(job = %id, error = %e, "skipping a job"),
                        Err(e) => return Err(e),
                    }
                }
                Ok(claims)
            }

            pub async fn claim_next(
                &self,
                id: Uuid,
                node: &str,
                lease_until: i64,
            ) -> StoreResult<Option<ChunkPlan>> {
                let claim = self.claim_job(id, node, 1, lease_until, false).await?;
                Ok(claim.and_then(|c| c.chunks.into_iter().next()))
            }

            /// Claims up to `max` chunks of one job in one transaction, with the
            /// job's row locked. With `skip_locked` (the claim loop's scan),
            /// PostgreSQL skips a job another claim holds instead of waiting.
            async fn claim_job(
                &self,
                id: Uuid,
                node: &str,
                max: u32,
                lease_until: i64,
                skip_locked: bool,
            ) -> StoreResult<Option<Claim>> {
                let id_text = id.to_string();
                let mut tx = self.writer.begin().await?;
                let lock = match (Self::DIALECT, skip_locked) {
                    (Dialect::Sqlite, _) => "",
                    (Dialect::Postgres, true) => " FOR UPDATE SKIP LOCKED",
                    (Dialect::Postgres, false) => " FOR UPDATE",
                };
                let row = sqlx::query(&format!(
                    "SELECT cores, strategy, chunks_ready, chunks_running, series, status FROM jobs \
                     WHERE id = $1 AND status IN ('queued', 'running') AND chunks_ready > 0{lock}"
                ))
                .bind(&id_text)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let series: Option<String> = row.get("series");
                if let (Some(series), "queued") = (series, row.get::<String, _>("status").as_str()) {
                    // A series runs one job at a time: start this one only when
                    // no other is running (serialised across nodes by a lock).
                    if Self::DIALECT == Dialect::Postgres {
                        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                            .bind(&series)
                            .execute(&mut *tx)
                            .await?;
                    }
                    let busy: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM jobs WHERE series = $1 AND status = 'running' AND id <> $2",
                    )
                    .bind(&series)
                    .bind(&id_text)
                    .fetch_one(&mut *tx)
                    .await?;
                    if busy > 0 {
                        return Ok(None);
                    }
                }
                let cores = match parse_strategy(row.get("strategy"))? {
                    Strategy::Sequential => 1,
                    _ => row.get::<i64, _>("cores"),
                };
                let room = (cores - row.get::<i64, _>("chunks_running")).min(row.get::<i64, _>("chunks_ready"));
                let take = room.min(i64::from(max));
                if take <= 0 {
                    return Ok(None);
                }
                let rows = sqlx::query(
                    "UPDATE chunks SET state = 'running', owner = $2, lease_until = $3, runs = runs + 1 \
                     WHERE job_id = $1 AND idx IN \
                     (SELECT idx FROM chunks WHERE job_id = $1 AND state = 'pending' ORDER BY idx LIMIT $4) \
                     RETURNING idx, pos, len",
                )
                .bind(&id_text)
                .bind(node)
                .bind(lease_until)
                .bind(take)
                .fetch_all(&mut *tx)
                .await?;
                let mut chunks: Vec<ChunkPlan> = rows
                    .iter()
                    .map(|r| ChunkPlan {
                        index: r.get::<i64, _>("idx") as u32,
                        offset: r.get::<i64, _>("pos") as u64,
                        len: r.get::<i64, _>("len") as u64,
                    })
                    .collect();
                chunks.sort_by_key(|c| c.index);
                if chunks.is_empty() {
                    tx.rollback().await?;
                    return Err(StoreError::Corrupt(format!("job {id} counts ready chunks it does not have")));
                }
                let got = chunks.len() as i64;
                // Read the clock only now: the job's insert has committed, so
                // its start is never before its creation.
                let now = crate::domain::now_micros();
                let row = sqlx::query(&format!(
                    "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, $2), \
                     attempts = CASE WHEN attempts = 0 THEN 1 ELSE attempts END, \
                     chunks_ready = chunks_ready - $3, chunks_running = chunks_running + $3, version = version + 1 \
                     WHERE id = $1 RETURNING {CLAIM_COLUMNS}"
                ))
                .bind(&id_text)
                .bind(now)
                .bind(got)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                let range = match (row.get("range_start"), row.get("range_end"), row.get("range_step")) {
                    (Some(start), Some(end), Some(step)) => Some(RangeSpec { start, end, step }),
                    _ => None,
                };
                let transport: Option<String> = row.get("transport");
                let job = ClaimedJob {
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
                    started_at: row.get::<Option<i64>, _>("started_at").unwrap_or(now),
                    attempts: row.get::<i64, _>("attempts") as u32,
                    max_attempts: row.get::<i64, _>("max_attempts") as u32,
                    timeout_ms: row.get::<Option<i64>, _>("timeout_ms").map(|t| t as u64),
                    request_id: row.get("request_id"),
                };
                Ok(Some(Claim { job, chunks }))
            }

            pub async fn heartbeat(&self, node: &str, lease_until: i64, local: &[Uuid]) -> StoreResult<Vec<Uuid>> {
                if local.is_empty() {
                    return Ok(Vec::new());
                }
                // Only chunks of jobs with live lanes here: a chunk a lane let go
                // of without finishing (its job stopped) must expire and be rescued.
                let mut renew = QueryBuilder::<$db>::new("UPDATE chunks SET lease_until = ");
                renew.push_bind(lease_until).push(" WHERE owner = ").push_bind(node.to_string());
                renew.push(" AND state = 'running' AND job_id IN (");
                let mut ids = renew.separated(", ");
                for id in local {
                    ids.push_bind(id.to_string());
                }
                renew.push(")");
                renew.build().execute(&self.writer).await?;
                let mut sql = QueryBuilder::<$db>::new("SELECT id FROM jobs WHERE status <> 'running' AND id IN (");
                let mut ids = sql.separated(", ");
                for id in local {
                    ids.push_bind(id.to_string());
                }
                sql.push(")");
                let gone: Vec<String> = sql.build_query_scalar().fetch_all(&self.readers).await?;
                gone.iter().map(|s| parse_uuid(s)).collect()
            }

            pub async fn rescue_expired(&self, now: i64) -> StoreResult<u64> {
                self.release_where(Release::ExpiredBefore(now)).await
            }

            pub async fn release_chunks(&self, owner: Option<&str>) -> StoreResult<u64> {
                match owner {
                    Some(owner) => self.release_where(Release::Owner(owner)).await,
                    None => self.release_where(Release::All).await,
                }
            }

            /// Puts running chunks back to pending, in jobs that are still
            /// running, and fixes their jobs' counters; a job with no chunk left
            /// running goes back to `queued`.
            async fn release_where(&self, which: Release<'_>) -> StoreResult<u64> {
                let condition = match which {
                    Release::ExpiredBefore(_) => "lease_until < $1",
                    Release::Owner(_) => "owner = $1",
                    Release::All => "$1 = $1",
                };
                let sql = format!(
                    "UPDATE chunks SET state = 'pending', owner = NULL, lease_until = NULL \
                     WHERE state = 'running' AND {condition} \
                     AND job_id IN (SELECT id FROM jobs WHERE status = 'running') RETURNING job_id"
                );
                let query = sqlx::query(&sql);
                let query = match which {
                    Release::ExpiredBefore(now) => query.bind(now),
                    Release::Owner(owner) => query.bind(owner.to_string()),
                    Release::All => query.bind(0i64),
                };
                let mut tx = self.writer.begin().await?;
                if Self::DIALECT == Dialect::Postgres {
                    // Job rows before chunk rows (in id order), as every other writer locks them.
                    let lock = format!(
                        "SELECT id FROM jobs WHERE status = 'running' AND id IN \
                         (SELECT job_id FROM chunks WHERE state = 'running' AND {condition}) ORDER BY id FOR UPDATE"
                    );
                    let lock = sqlx::query(&lock);
                    let lock = match which {
                        Release::ExpiredBefore(now) => lock.bind(now),
                        Release::Owner(owner) => lock.bind(owner.to_string()),
                        Release::All => lock.bind(0i64),
                    };
                    lock.execute(&mut *tx).await?;
                }
                let rows = query.fetch_all(&mut *tx).await?;
                let mut per_job = std::collections::BTreeMap::<String, i64>::new();
                for row in &rows {
                    *per_job.entry(row.get::<String, _>("job_id")).or_default() += 1;
                }
                for (job, n) in &per_job {
                    sqlx::query(
                        "UPDATE jobs SET chunks_running = chunks_running - $2, chunks_ready = chunks_ready + $2, \
                         status = CASE WHEN chunks_running - $2 <= 0 THEN 'queued' ELSE status END, \
                         version = version + 1 WHERE id = $1 AND status = 'running'",
                    )
                    .bind(job)
                    .bind(*n)
                    .execute(&mut *tx)
                    .await?;
                }
                if !per_job.is_empty() {
                    Self::notify(&mut tx, WORK_CHANNEL, "").await?;
                }
                tx.commit().await?;
                Ok(rows.len() as u64)
            }

            pub async fn input_segment(&self, id: Uuid, pos: u64) -> StoreResult<Vec<i64>> {
                let data: Vec<u8> = sqlx::query_scalar("SELECT data FROM job_inputs WHERE job_id = $1 AND pos = $2")
                    .bind(id.to_string())
                    .bind(pos as i64)
                    .fetch_optional(&self.readers)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt(format!("job {id} has no input segment at {pos}")))?;
                Ok(crate::exec::from_le_bytes(&data).collect())
            }

            pub async fn put_segment(
                &self,
                id: Uuid,
                chunk: u32,
                node: &str,
                pos: u64,
                squares: &[i64],
            ) -> StoreResult<bool> {
                let stored = sqlx::query(
                    "INSERT INTO results (job_id, pos, len, data) \
                     SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM chunks WHERE job_id = $1 AND idx = $5 \
                     AND owner = $6 AND state = 'running') \
                     ON CONFLICT (job_id, pos) DO UPDATE SET len = excluded.len, data = excluded.data",
                )
                .bind(id.to_string())
                .bind(pos as i64)
                .bind(squares.len() as i64)
                .bind(&*le_bytes(squares))
                .bind(chunk as i64)
                .bind(node)
                .execute(&self.writer)
                .await?
                .rows_affected();
                Ok(stored > 0)
            }

            pub async fn complete_chunk(
                &self,
                id: Uuid,
                chunk: &ChunkPlan,
                record: &ChunkRecord,
                last: Option<(u64, &[i64])>,
                now: i64,
            ) -> StoreResult<Option<Completion>> {
                let id_text = id.to_string();
                let mut tx = self.writer.begin().await?;
                if Self::DIALECT == Dialect::Postgres {
                    // Job row before chunk rows, as every other writer locks them.
                    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE").bind(&id_text).execute(&mut *tx).await?;
                }
                let updated = sqlx::query(
                    "UPDATE chunks SET state = 'done', owner = NULL, lease_until = NULL, worker = $3, node = $4, \
                     start_ms = $5, duration_ms = $6, spawn_ms = $7, compute_ms = $8, store_ms = $9 \
                     WHERE job_id = $1 AND idx = $2 AND owner = $4 AND state = 'running'",
                )
                .bind(&id_text)
                .bind(chunk.index as i64)
                .bind(&record.worker)
                .bind(&record.node)
                .bind(record.start_ms)
                .bind(record.duration_ms)
                .bind(record.spawn_ms)
                .bind(record.compute_ms)
                .bind(record.store_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if updated == 0 {
                    return Ok(None); // no longer ours: canceled, failed or rescued
                }
                if let Some((pos, squares)) = last {
                    sqlx::query(
                        "INSERT INTO results (job_id, pos, len, data) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (job_id, pos) DO UPDATE SET len = excluded.len, data = excluded.data",
                    )
                    .bind(&id_text)
                    .bind(pos as i64)
                    .bind(squares.len() as i64)
                    .bind(&*le_bytes(squares))
                    .execute(&mut *tx)
                    .await?;
                }
                let row = sqlx::query(
                    "UPDATE jobs SET chunks_done = chunks_done + 1, chunks_running = chunks_running - 1, \
                     numbers_done = numbers_done + $2, version = version + 1 WHERE id = $1 \
                     RETURNING chunks_done, chunks_total, numbers_done",
                )
                .bind(&id_text)
                .bind(chunk.len as i64)
                .fetch_one(&mut *tx)
                .await?;
                let progress = Progress {
                    chunks_done: row.get::<i64, _>("chunks_done") as u64,
                    chunks_total: row.get::<i64, _>("chunks_total") as u64,
                    numbers_done: row.get::<i64, _>("numbers_done") as u64,
                };
                let mut finished_wall_ms = None;
                if progress.chunks_done == progress.chunks_total {
                    finished_wall_ms = Self::finish(&mut tx, &id_text, JobStatus::Succeeded, None, now).await?;
                }
                tx.commit().await?;
                Ok(Some(Completion { progress, finished_wall_ms }))
            }

            /// Ends a job that is queued or running, inside `tx`: stores its
            /// status, error and timing totals, and releases its running chunks.
            /// Returns the wall time, or `None` if the job had already ended.
            async fn finish(
                tx: &mut sqlx::Transaction<'static, $db>,
                id: &str,
                status: JobStatus,
                error: Option<&Problem>,
                now: i64,
            ) -> StoreResult<Option<f64>> {
                let row = sqlx::query(
                    "SELECT j.created_at, j.started_at, \
                     COALESCE((SELECT SUM(spawn_ms) FROM chunks WHERE job_id = $1 AND state = 'done'), 0.0) AS spawn_ms, \
                     COALESCE((SELECT SUM(compute_ms) FROM chunks WHERE job_id = $1 AND state = 'done'), 0.0) AS compute_ms, \
                     COALESCE((SELECT SUM(store_ms) FROM chunks WHERE job_id = $1 AND state = 'done'), 0.0) AS store_ms \
                     FROM jobs j WHERE j.id = $1",
                )
                .bind(id)
                .fetch_one(&mut **tx)
                .await?;
                let created_at: i64 = row.get("created_at");
                let started_at: Option<i64> = row.get("started_at");
                let wall_ms = started_at.map_or(0.0, |s| (now - s) as f64 / 1000.0);
                let totals = TimingTotals {
                    queue_ms: started_at.map_or(0.0, |s| (s - created_at) as f64 / 1000.0),
                    wall_ms,
                    spawn_ms: row.get::<f64, _>("spawn_ms"),
                    compute_ms: row.get::<f64, _>("compute_ms"),
                    store_ms: row.get::<f64, _>("store_ms"),
                };
                let timing = started_at.map(|_| serde_json::to_string(&totals).expect("timing serialises"));
                let ended = sqlx::query(
                    "UPDATE jobs SET status = $2, finished_at = $3, timing = $4, error = $5, chunks_running = 0, \
                     chunks_ready = 0, version = version + 1 WHERE id = $1 AND status IN ('queued', 'running')",
                )
                .bind(id)
                .bind(status.as_str())
                .bind(now)
                .bind(timing)
                .bind(error.map(|e| serde_json::to_string(e).expect("problem serialises")))
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if ended == 0 {
                    return Ok(None);
                }
                if status != JobStatus::Succeeded {
                    sqlx::query("DELETE FROM results WHERE job_id = $1").bind(id).execute(&mut **tx).await?;
                }
                // The webhook is due now, and durable with the job's end.
                sqlx::query(
                    "INSERT INTO webhooks (job_id, url, state, attempts, next_at) \
                     SELECT id, callback_url, 'pending', 0, $2 FROM jobs WHERE id = $1 AND callback_url IS NOT NULL \
                     ON CONFLICT (job_id) DO NOTHING",
                )
                .bind(id)
                .bind(now)
                .execute(&mut **tx)
                .await?;
                sqlx::query(
                    "UPDATE chunks SET state = 'pending', owner = NULL, lease_until = NULL \
                     WHERE job_id = $1 AND state = 'running'",
                )
                .bind(id)
                .execute(&mut **tx)
                .await?;
                Self::notify(tx, JOBS_CHANNEL, &format!("{id} {}", status.as_str())).await?;
                Ok(Some(wall_ms))
            }

            pub async fn fail_job(&self, id: Uuid, problem: &Problem, now: i64) -> StoreResult<bool> {
                let mut tx = self.writer.begin().await?;
                let ended = Self::finish(&mut tx, &id.to_string(), JobStatus::Failed, Some(problem), now).await?;
                tx.commit().await?;
                Ok(ended.is_some())
            }

            pub async fn cancel_job(&self, id: Uuid, now: i64, problem: &Problem) -> StoreResult<Canceled> {
                let id_text = id.to_string();
                let mut tx = self.writer.begin().await?;
                let lock = if Self::DIALECT == Dialect::Postgres { " FOR UPDATE" } else { "" };
                let row = sqlx::query(&format!("SELECT status, strategy FROM jobs WHERE id = $1{lock}"))
                    .bind(&id_text)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(row) = row else { return Ok(Canceled::NotFound) };
                let status = parse_status(row.get("status"))?;
                let strategy = parse_strategy(row.get("strategy"))?;
                if status.is_final() {
                    return Ok(Canceled::Ended(status));
                }
                Self::finish(&mut tx, &id_text, JobStatus::Canceled, Some(problem), now).await?;
                tx.commit().await?;
                Ok(Canceled::Now { was_running: status == JobStatus::Running, strategy })
            }

            pub async fn record_attempt_error(&self, id: Uuid, error: &Problem, now: i64) -> StoreResult<Option<u32>> {
                let id_text = id.to_string();
                let mut tx = self.writer.begin().await?;
                let lock = if Self::DIALECT == Dialect::Postgres { " FOR UPDATE" } else { "" };
                let row = sqlx::query(&format!(
                    "SELECT attempts, max_attempts, attempt_errors FROM jobs WHERE id = $1 AND status = 'running'{lock}"
                ))
                .bind(&id_text)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let attempts = row.get::<i64, _>("attempts") as u32;
                if attempts >= row.get::<i64, _>("max_attempts") as u32 {
                    return Ok(None); // exhausted: the caller fails the job
                }
                let mut errors: Vec<AttemptError> = parse_json(row.get("attempt_errors"))?;
                errors.push(AttemptError { attempt: attempts, at: rfc3339(now), error: error.clone() });
                sqlx::query("UPDATE jobs SET attempts = $2, attempt_errors = $3, version = version + 1 WHERE id = $1")
                    .bind(&id_text)
                    .bind(i64::from(attempts + 1))
                    .bind(serde_json::to_string(&errors).expect("attempt errors serialise"))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Some(attempts + 1))
            }

            pub async fn purge_finished(&self, cutoff: i64, now: i64, batch: u32) -> StoreResult<u64> {
                let mut tx = self.writer.begin().await?;
                let deleted = sqlx::query(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL \
                     AND finished_at < $1 AND status IN ('succeeded', 'failed', 'canceled') \
                     ORDER BY finished_at LIMIT $2)",
                )
                .bind(cutoff)
                .bind(batch as i64)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                sqlx::query(
                    "DELETE FROM idempotency_keys WHERE key IN \
                     (SELECT key FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2)",
                )
                .bind(now)
                .bind(batch as i64)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(deleted)
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
                // Start at the segment holding `from`: the last one starting at or before it.
                let rows = sqlx::query(
                    "SELECT pos, len, data FROM results WHERE job_id = $1 \
                     AND pos >= (SELECT COALESCE(MAX(pos), 0) FROM results WHERE job_id = $1 AND pos <= $2) \
                     AND pos < $3 ORDER BY pos LIMIT $4",
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
                            return Err(StoreError::Corrupt(format!(
                                "segment of {len} squares has {} bytes",
                                data.len()
                            )));
                        }
                        Ok(Segment { pos: r.get::<i64, _>("pos") as u64, data })
                    })
                    .collect()
            }

            pub async fn insert_comparison(&self, c: &StoredComparison) -> StoreResult<()> {
                sqlx::query("INSERT INTO comparisons (id, created_at, request, cells) VALUES ($1, $2, $3, $4)")
                    .bind(c.id.to_string())
                    .bind(c.created_at)
                    .bind(&c.request)
                    .bind(&c.cells)
                    .execute(&self.writer)
                    .await?;
                Ok(())
            }

            pub async fn comparison(&self, id: Uuid) -> StoreResult<Option<StoredComparison>> {
                let row = sqlx::query("SELECT created_at, request, cells FROM comparisons WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&self.readers)
                    .await?;
                Ok(row.map(|r| StoredComparison {
                    id,
                    created_at: r.get("created_at"),
                    request: r.get("request"),
                    cells: r.get("cells"),
                }))
            }

            pub async fn job_summaries(&self, ids: &[Uuid]) -> StoreResult<Vec<JobSummary>> {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut sql = QueryBuilder::<$db>::new("SELECT id, status, timing FROM jobs WHERE id IN (");
                let mut list = sql.separated(", ");
                for id in ids {
                    list.push_bind(id.to_string());
                }
                sql.push(")");
                let rows = sql.build().fetch_all(&self.readers).await?;
                rows.iter()
                    .map(|r| {
                        let timing: Option<String> = r.get("timing");
                        let wall_ms = timing.map(|t| parse_json::<TimingTotals>(&t)).transpose()?.map(|t| t.wall_ms);
                        Ok(JobSummary { id: parse_uuid(r.get("id"))?, status: parse_status(r.get("status"))?, wall_ms })
                    })
                    .collect()
            }

            pub async fn delete_job(&self, id: Uuid) -> StoreResult<Deleted> {
                let id_text = id.to_string();
                let mut tx = self.writer.begin().await?;
                let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
                    .bind(&id_text)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(status) = status else { return Ok(Deleted::NotFound) };
                let status = parse_status(&status)?;
                if !status.is_final() {
                    return Ok(Deleted::Busy(status));
                }
                sqlx::query("DELETE FROM jobs WHERE id = $1").bind(&id_text).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(Deleted::Yes)
            }

            /// Queues a notification, delivered on commit (PostgreSQL only).
            async fn notify(
                tx: &mut sqlx::Transaction<'static, $db>,
                channel: &str,
                payload: &str,
            ) -> StoreResult<()> {
                if Self::DIALECT == Dialect::Postgres {
                    sqlx::query("SELECT pg_notify($1, $2)").bind(channel).bind(payload).execute(&mut **tx).await?;
                }
                Ok(())
            }
        }
    };
}

pub(super) use sql_store;

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
