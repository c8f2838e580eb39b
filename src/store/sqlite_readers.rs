//! The SQLite readers: OS threads, each owning a read-only connection, that
//! take reads from one queue.
//!
//! A read is a closure that runs whole on one thread — a job document with
//! its webhook and chunk rows is one hand-off there and one back — and never
//! waits for the writer: in WAL mode a reader sees the last commit.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{StoreError, StoreResult};

/// How long a read may wait for a reader before its caller gets a 503 (the
/// node is overloaded); a read whose caller gave up is skipped.
const READ_WAIT: Duration = Duration::from_secs(30);

/// One read: runs on a reader's connection and answers its caller.
type Read = Box<dyn FnOnce(&Connection) + Send>;

/// A handle on the reader threads. Cheap to clone; the threads end when the
/// last handle is dropped.
#[derive(Clone)]
pub(super) struct Readers {
    reads: flume::Sender<Read>,
}

impl Readers {
    /// Opens `threads` read-only connections to the database file and starts a thread for each.
    pub fn start(path: &Path, threads: u32) -> StoreResult<Readers> {
        let (reads, queue) = flume::unbounded::<Read>();
        for i in 0..threads.max(1) {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(path, flags)?;
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.set_prepared_statement_cache_capacity(32);
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("squared-read-{i}"))
                .spawn(move || {
                    while let Ok(read) = queue.recv() {
                        read(&conn);
                    }
                })
                .map_err(|e| StoreError::Thread(format!("cannot start a reader thread: {e}")))?;
        }
        Ok(Readers { reads })
    }

    /// Runs `read` on the next free reader.
    pub async fn read<T, F>(&self, read: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let read: Read = Box::new(move |conn| {
            if answer.is_closed() {
                return; // the caller gave up waiting
            }
            let result = catch_unwind(AssertUnwindSafe(|| read(conn)))
                .unwrap_or_else(|_| Err(StoreError::Thread("a read panicked".into())));
            let _ = answer.send(result);
        });
        self.reads.send(read).map_err(|_| StoreError::Thread("the reader threads have stopped".into()))?;
        match tokio::time::timeout(READ_WAIT, answered).await {
            Ok(answer) => answer.map_err(|_| StoreError::Thread("a reader thread dropped a read".into()))?,
            Err(_) => Err(StoreError::Overloaded(format!("no SQLite reader was free for {READ_WAIT:?}"))),
        }
    }
}
