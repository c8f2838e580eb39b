//! Executors: the three strategies behind one [`Lane`] abstraction.
//!
//! A lane is one worker — an OS thread or a worker subprocess — that runs
//! chunks one after another. A job runs on `cores` lanes pulling from its
//! chunk queue (`sequential` is one thread lane). A lane cuts each chunk into
//! segments aligned to [`SEGMENT_LEN`] and hands each segment's squares to a
//! [`Sink`] as soon as they exist, so no lane ever holds a whole chunk.
//!
//! Lanes are blocking code: they run on threads of their own, never on the
//! async runtime's workers.

mod kernel;
pub mod processes;
pub mod protocol;
pub mod shm;
mod threads;

use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use kernel::{from_le_bytes, le_bytes, square_into, KernelError, Source};
pub use processes::{ProcessLane, WorkerCommand};
pub use threads::ThreadLane;

use crate::domain::{RangeSpec, Simulate, Transport, SEGMENT_LEN};

/// What a lane needs to know to run one chunk.
#[derive(Debug, Clone, Copy)]
pub struct ChunkWork {
    pub offset: u64,
    pub len: u64,
    /// Set for range jobs; list jobs read their numbers from [`Inputs`].
    pub range: Option<RangeSpec>,
    pub simulate: Simulate,
    /// How a worker process hands squares back (thread lanes ignore it).
    pub transport: Transport,
}

/// Where a list job's numbers are read from.
pub trait Inputs {
    /// The `len` numbers at `offset`; never crosses a segment boundary.
    fn numbers(&mut self, offset: u64, len: usize) -> Result<&[i64], ExecError>;
}

/// Where squares go: called once per segment, in order within a chunk.
pub trait Sink {
    fn segment(&mut self, offset: u64, squares: &[i64]) -> Result<(), ExecError>;
}

/// What a lane reports about a chunk it ran.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkOutcome {
    /// Time spent computing squares (excluding storing them).
    pub compute: Duration,
}

/// Why a chunk did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A worker subprocess died or broke the protocol.
    #[error("{0}")]
    WorkerCrashed(String),
    /// The worker (or thread) refused the work.
    #[error("worker error: {0}")]
    Worker(String),
    #[error("could not start a worker process: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("canceled")]
    Canceled,
    /// Reading inputs or storing results failed.
    #[error("store: {0}")]
    Store(String),
}

/// One worker running chunks: a thread or a worker subprocess.
pub trait Lane: Send {
    /// How chunk records name this worker: "thread N" or "process PID".
    fn worker(&self) -> String;
    /// How long starting this worker took.
    fn spawn_time(&self) -> Duration;
    /// The worker's process id, for a subprocess.
    fn pid(&self) -> Option<u32> {
        None
    }
    /// Whether the worker can serve another job: a live, well-behaved process.
    fn is_reusable(&mut self) -> bool {
        false
    }
    fn run_chunk(
        &mut self,
        work: &ChunkWork,
        inputs: &mut dyn Inputs,
        sink: &mut dyn Sink,
        cancel: &AtomicBool,
    ) -> Result<ChunkOutcome, ExecError>;
}

/// Which kind of lane to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneKind {
    Thread,
    Process,
}

/// Starts lane number `index` of a job.
pub fn start_lane(kind: LaneKind, index: usize, command: &WorkerCommand) -> Result<Box<dyn Lane>, ExecError> {
    Ok(match kind {
        LaneKind::Thread => Box::new(ThreadLane::new(index)),
        LaneKind::Process => Box::new(ProcessLane::spawn(command)?),
    })
}

/// The segments of a chunk: `(offset, len)` pieces cut at multiples of
/// [`SEGMENT_LEN`], so that each lies inside one stored input segment.
pub fn segments(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let stop = ((at / SEGMENT_LEN + 1) * SEGMENT_LEN).min(end);
            let piece = (at, (stop - at) as usize);
            at = stop;
            piece
        })
    })
}

/// Where segment `offset` of a range job starts.
fn range_source(range: &RangeSpec, offset: u64) -> Source<'static> {
    Source::Range { first: range.nth(offset), step: range.step }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_cut_at_segment_boundaries() {
        let s: Vec<_> = segments(SEGMENT_LEN - 2, 5).collect();
        assert_eq!(s, vec![(SEGMENT_LEN - 2, 2), (SEGMENT_LEN, 3)]);
        assert_eq!(segments(0, 2 * SEGMENT_LEN).count(), 2);
        assert_eq!(segments(7, 0).count(), 0);
    }
}
