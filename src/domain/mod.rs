//! The job domain: what a client may ask for, parsed once into a [`JobSpec`];
//! how a job is split into chunks; the statuses a job moves through; and the
//! job document the API returns.

mod job;
mod numbers;
mod spec;
mod split;

pub use job::{
    now_micros, rfc3339, AttemptError, Callback, ChunkTiming, DeliveryAttempt, JobDocument, JobLinks, JobStatus,
    Problem, Progress, RequestEcho, Timing,
};
pub use numbers::{RangeSpec, MAX_ABS};
pub use spec::{FieldError, Input, JobRequestDoc, JobSpec, Limits, RangeDoc, Simulate, SpecError, Strategy, Transport};
pub use split::{chunk_count, split, ChunkPlan};

/// How many numbers one stored result (or input) segment holds at most.
///
/// Segments are the unit of storage and of streaming: a job of any size keeps
/// only a few of them in memory at a time. 64 Ki numbers are 512 KiB of
/// little-endian `i64`s — large enough that per-row overhead vanishes, small
/// enough that a handful per lane stays far below the memory targets.
pub const SEGMENT_LEN: u64 = 65_536;
