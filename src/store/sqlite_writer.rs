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
//!
//! Copying the WAL back into the database file (the checkpoint) is half the
//! work of storing a big result, so it runs on a second thread with its own
//! connection while the writer goes on appending; the writer checkpoints
//! itself only when the WAL outgrows [`WAL_LIMIT_PAGES`], which bounds it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rusqlite::{CachedStatement, Connection, OpenFlags};

use super::{StoreError, StoreResult};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 256;

/// The WAL size (in pages) at which the writer checkpoints itself after a
/// commit, when the checkpoint thread has fallen behind (64 MiB of 4 KiB
/// pages: a 10^7-number result fits).
const WAL_LIMIT_PAGES: u32 = 16_384;
/// The size the WAL file is cut back to once it starts over.
const WAL_KEEP_BYTES: i64 = 64 << 20;
/// How often the checkpoint thread looks at the WAL while it grows.
const CHECKPOINT_BUSY: Duration = Duration::from_millis(20);
/// The longest it waits between looks while the WAL stays as it was.
const CHECKPOINT_IDLE: Duration = Duration::from_millis(250);

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
    /// Cleared when the writer thread ends (only a panic outside a write ends it early).
    running: Arc<AtomicBool>,
    /// Dropped with the last handle, which stops the checkpoint thread.
    _stop_checkpoints: mpsc::Sender<()>,
}

impl Writer {
    /// Opens the database file (which migrations have created) and starts the
    /// writer and checkpoint threads.
    pub fn start(path: &Path) -> StoreResult<Writer> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Savepoint journals (every write is one savepoint) stay in memory:
        // on disk they cost a pwrite per page each write changes.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;",
        )?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_LIMIT_PAGES)?;
        conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
        conn.set_prepared_statement_cache_capacity(64);
        let checkpointer = Connection::open_with_flags(path, flags)?;
        checkpointer.busy_timeout(Duration::from_secs(10))?;
        let (ops, queue) = mpsc::channel();
        let (checkpoints, stop) = mpsc::channel();
        let running = Arc::new(AtomicBool::new(true));
        let alive = Running(running.clone());
        spawn("squared-writer", move || {
            let _alive = alive;
            run(conn, queue)
        })?;
        spawn("squared-checkpt", move || checkpoint(checkpointer, stop))?;
        Ok(Writer { ops, running, _stop_checkpoints: checkpoints })
    }

    /// Whether the writer thread still takes writes (for readiness checks:
    /// asks nothing of the thread, so a long queue of writes cannot fail it).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
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
        self.ops.send(op).map_err(|_| StoreError::Thread("the writer thread has stopped".into()))?;
        answered.await.map_err(|_| StoreError::Thread("the writer thread dropped a write".into()))?
    }
}

/// Clears the flag when the writer thread ends, by return or by panic.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The thread: one transaction per batch. A batch is every write waiting
/// when it begins and every write that arrives while it runs (up to
/// [`MAX_BATCH`]): nothing waits for company, yet under load the commits, and
/// the pages each one writes to the WAL, are shared by many writes.
fn run(conn: Connection, queue: mpsc::Receiver<Op>) {
    while let Ok(first) = queue.recv() {
        let begun = exec_cached(&conn, "BEGIN IMMEDIATE");
        let mut replies: Vec<Reply> = Vec::with_capacity(16);
        let mut next = Some(first);
        while let Some(op) = next {
            replies.push(match &begun {
                Ok(()) => op(Ok(&conn)),
                Err(e) => op(Err(e)),
            });
            next = if replies.len() < MAX_BATCH { queue.try_recv().ok() } else { None };
        }
        let committed = begun.and_then(|()| exec_cached(&conn, "COMMIT"));
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

/// Copies committed pages from the WAL into the database file (a passive
/// checkpoint: it never blocks the writer or a reader) as they arrive, so
/// that the writer's own checkpoint rarely has anything left to do. It looks
/// again soon while there is work and backs off while there is none; it ends
/// when the writer's last handle is dropped.
fn checkpoint(conn: Connection, stop: mpsc::Receiver<()>) {
    let (mut wait, mut seen) = (CHECKPOINT_BUSY, (0, 0));
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(wait) {
        // Columns: busy, pages in the WAL, pages copied (all copied when equal).
        let pages =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
        wait = match pages {
            Ok(pages) if pages != seen => {
                seen = pages;
                CHECKPOINT_BUSY
            }
            Ok(_) => (wait * 2).min(CHECKPOINT_IDLE),
            Err(e) => {
                tracing::warn!(error = %e, "SQLite checkpoint failed; the writer checkpoints instead");
                CHECKPOINT_IDLE
            }
        };
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> StoreResult<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(|_| ())
        .map_err(|e| StoreError::Thread(format!("cannot start the {name} thread: {e}")))
}

/// Runs one write in a savepoint: kept on success, undone on error or panic.
/// Savepoints nest: a part of a write that may fail alone runs in its own.
pub(super) fn in_savepoint<T>(conn: &Connection, write: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
    exec_cached(conn, "SAVEPOINT write")?;
    let result = catch_unwind(AssertUnwindSafe(|| write(conn)))
        .unwrap_or_else(|_| Err(StoreError::Thread("a write panicked; it was rolled back".into())));
    if result.is_err() {
        exec_cached(conn, "ROLLBACK TO write")?;
    }
    exec_cached(conn, "RELEASE write")?;
    result
}

/// Runs a statement without parameters, prepared once per connection
/// (`execute_batch` would parse it on every call).
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The checkpoint thread copies what the writer committed into the
    /// database file by itself: 8 MiB stays far below the writer's own
    /// checkpoint threshold, yet reaches the file.
    #[tokio::test]
    async fn the_checkpoint_thread_copies_commits_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let setup = Connection::open(&path).unwrap();
        setup.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE blobs (data BLOB NOT NULL);").unwrap();
        let writer = Writer::start(&path).unwrap();
        let blob = vec![7u8; 8 << 20];
        writer
            .write(move |c| {
                c.execute("INSERT INTO blobs (data) VALUES (?1)", [blob])?;
                Ok(())
            })
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let file_len = || std::fs::metadata(&path).unwrap().len();
        while file_len() < 8 << 20 {
            assert!(std::time::Instant::now() < deadline, "the database file stayed at {} bytes", file_len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stored: i64 = setup.query_row("SELECT length(data) FROM blobs", [], |r| r.get(0)).unwrap();
        assert_eq!(stored, 8 << 20);
    }
}
