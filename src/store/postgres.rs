//! The PostgreSQL backend: several `squared serve` nodes share one database.
//! Claims lock a job's row with `FOR UPDATE SKIP LOCKED`, so nodes never wait
//! on each other; LISTEN/NOTIFY wakes idle schedulers and long-polls on other
//! nodes (see [`PgStore::listen`]); migrations take sqlx's advisory lock, so
//! nodes starting at once apply them once.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::sql::*;
use super::*;
use crate::domain::{
    rfc3339, AttemptError, Callback, ChunkTiming, DeliveryAttempt, Input, JobLinks, Problem, Progress, RequestEcho,
    Timing, SEGMENT_LEN,
};
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
    const DIALECT: Dialect = Dialect::Postgres;

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

sql_store!(PgStore, Postgres);
