//! The SQLite backend: one file, WAL mode, one writer connection (SQLite
//! allows one writer at a time; queueing in the pool beats retrying on
//! `SQLITE_BUSY`) and a pool of readers that never wait for it.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use super::sql::*;
use super::*;
use crate::domain::{
    rfc3339, AttemptError, Callback, ChunkTiming, DeliveryAttempt, Input, JobLinks, Problem, Progress, RequestEcho,
    Timing, SEGMENT_LEN,
};
use crate::exec::le_bytes;

/// The SQLite-backed store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    readers: SqlitePool,
}

impl SqliteStore {
    const DIALECT: Dialect = Dialect::Sqlite;

    /// Opens (creating when missing) the database at `url` and applies migrations.
    pub async fn open(url: &str, readers: u32) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // Connections are local and checked by use: no ping before each acquire.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(readers.max(1))
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore { writer, readers })
    }
}

sql_store!(SqliteStore, Sqlite);
