//! The SQLite writer: one OS thread owns the database's only read-write
//! connection and runs every write, many per transaction.
//!
//! SQLite has one writer at a time. Driving it statement by statement from
//! async tasks costs two thread hand-offs per statement while the write lock
//! is held (a tiny job needs about twenty statements), so writes are closures
//! sent here instead: the thread runs each in a savepoint of one
//! `BEGIN IMMEDIATE` transaction, taking writes as long as more are waiting
//! (up to [`MAX_BATCH`]), commits once, and only then answers each caller — a
//! caller never hears "stored" before its write is committed (group commit). A write
//! that fails rolls back to its savepoint alone; a failed commit fails the
//! whole batch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{CachedStatement, Connection, OpenFlags};

use super::{StoreError, StoreResult};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 256;

/// Answers a caller once the batch's commit succeeded or failed.
type Reply = Box<dyn FnOnce(Result<(), &rusqlite::Error>) + Send>;
/// One write: runs on the connection (or learns the transaction could not
/// begin) and returns how to answer its caller.
type Op = Box<dyn FnOnce(Result<&Connection, &rusqlite::Error>) -> Reply + Send>;

/// A handle on the writer thread. Cheap to clone; the thread ends when the
/// last handle is dropped.
#[derive(Clone)]
pub(super) struct Writer {
    ops: mpsc::Sender<Op>,
}

impl Writer {
    /// Opens the database file (which migrations have created) and starts the thread.
    pub fn start(path: &Path) -> StoreResult<Writer> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
        conn.set_prepared_statement_cache_capacity(64);
        let (ops, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("squared-sqlite-writer".into())
            .spawn(move || run(conn, queue))
            .map_err(|e| StoreError::Writer(format!("cannot start the writer thread: {e}")))?;
        Ok(Writer { ops })
    }

    /// Runs `write` in the next transaction and answers once it committed.
    /// An `Ok` keeps everything `write` did (an `Err` undoes it): a write
    /// that may refuse must do so before its first change.
    pub async fn write<T, F>(&self, write: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let op: Op = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => in_savepoint(conn, write),
                Err(e) => Err(copy_error(e)),
            };
            Box::new(move |committed| {
                let _ = answer.send(match committed {
                    Ok(()) => result,
                    Err(e) => Err(copy_error(e)),
                });
            })
        });
        self.ops.send(op).map_err(|_| StoreError::Writer("the writer thread has stopped".into()))?;
        answered.await.map_err(|_| StoreError::Writer("the writer thread dropped a write".into()))?
    }
}

/// The thread: one transaction per batch. A batch is every write waiting
/// when it begins and every write that arrives while it runs (up to
/// [`MAX_BATCH`]): nothing waits for company, yet under load the commits, and
/// the pages each one writes to the WAL, are shared by many writes.
fn run(conn: Connection, queue: mpsc::Receiver<Op>) {
    while let Ok(first) = queue.recv() {
        let begun = conn.execute_batch("BEGIN IMMEDIATE");
        let mut replies: Vec<Reply> = Vec::with_capacity(16);
        let mut next = Some(first);
        while let Some(op) = next {
            replies.push(match &begun {
                Ok(()) => op(Ok(&conn)),
                Err(e) => op(Err(e)),
            });
            next = if replies.len() < MAX_BATCH { queue.try_recv().ok() } else { None };
        }
        let committed = begun.and_then(|()| conn.execute_batch("COMMIT"));
        if committed.is_err() && !conn.is_autocommit() {
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::error!(error = %e, "rolling back a failed SQLite commit failed");
            }
        }
        for reply in replies {
            reply(committed.as_ref().map(|_| ()));
        }
    }
}

/// Runs one write in a savepoint: kept on success, undone on error or panic.
fn in_savepoint<T>(conn: &Connection, write: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
    conn.prepare_cached("SAVEPOINT write")?.execute([])?;
    let result = catch_unwind(AssertUnwindSafe(|| write(conn)))
        .unwrap_or_else(|_| Err(StoreError::Writer("a write panicked; it was rolled back".into())));
    if result.is_err() {
        conn.prepare_cached("ROLLBACK TO write")?.execute([])?;
    }
    conn.prepare_cached("RELEASE write")?.execute([])?;
    result
}

/// A cached statement for SQL written with `$N` placeholders (shared with
/// PostgreSQL); SQLite reads them as `?N`, bound by position.
pub(super) fn stmt<'c>(conn: &'c Connection, sql: &str) -> rusqlite::Result<CachedStatement<'c>> {
    conn.prepare_cached(&sql.replace('$', "?"))
}

/// The same error again, for each caller of a batch that failed as a whole.
fn copy_error(e: &rusqlite::Error) -> StoreError {
    let copy = match e {
        rusqlite::Error::SqliteFailure(code, message) => rusqlite::Error::SqliteFailure(*code, message.clone()),
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    };
    StoreError::Sqlite(copy)
}
