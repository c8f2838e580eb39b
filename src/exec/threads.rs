//! A lane that computes on the OS thread it runs on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{
    range_source, segments, square_into, ChunkOutcome, ChunkWork, ExecError, Inputs, KernelError, Lane, Sink, Source,
};
use crate::domain::SEGMENT_LEN;

/// Thread lane `index` of a job ("thread N"); its one segment buffer is reused.
pub struct ThreadLane {
    index: usize,
    buf: Vec<i64>,
}

impl ThreadLane {
    pub fn new(index: usize) -> Self {
        ThreadLane { index, buf: Vec::new() }
    }
}

impl Lane for ThreadLane {
    fn worker(&self) -> String {
        format!("thread {}", self.index)
    }

    fn spawn_time(&self) -> Duration {
        Duration::ZERO
    }

    fn run_chunk(
        &mut self,
        work: &ChunkWork,
        inputs: &mut dyn Inputs,
        sink: &mut dyn Sink,
        cancel: &AtomicBool,
    ) -> Result<ChunkOutcome, ExecError> {
        let mut outcome = ChunkOutcome::default();
        if self.buf.is_empty() {
            self.buf = vec![0; work.len.min(SEGMENT_LEN) as usize];
        }
        for (offset, len) in segments(work.offset, work.len) {
            if cancel.load(Ordering::Relaxed) {
                return Err(ExecError::Canceled);
            }
            if self.buf.len() < len {
                self.buf.resize(len, 0);
            }
            let source = match &work.range {
                Some(range) => range_source(range, offset),
                None => Source::List(inputs.numbers(offset, len)?),
            };
            let out = &mut self.buf[..len];
            let started = Instant::now();
            square_into(source, out, work.simulate, Some(cancel)).map_err(|e| match e {
                KernelError::Canceled => ExecError::Canceled,
                e => ExecError::Worker(e.to_string()),
            })?;
            outcome.compute += started.elapsed();
            sink.segment(offset, out)?;
        }
        Ok(outcome)
    }
}
