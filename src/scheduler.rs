//! The scheduler: admits queued jobs by priority, then age, while the cores
//! of running jobs stay within this node's budget, and runs each admitted job
//! on its own driver thread.
//!
//! A driver starts the job's lanes (threads or worker subprocesses), which pull
//! chunks from the job's queue; each segment of squares is stored as soon as it
//! exists, and each chunk is marked done once all its segments are stored.
//! Drivers and lanes are plain OS threads that reach the async store through
//! `Handle::block_on`: compute never runs on the async runtime's workers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::domain::{now_micros, ChunkPlan, JobStatus, Problem, Strategy, Transport, SEGMENT_LEN};
use crate::events::{Events, JobEvent};
use crate::exec::{self, ChunkWork, ExecError, Inputs, LaneKind, Sink, WorkerCommand};
use crate::metrics::Metrics;
use crate::store::{ChunkRecord, Finish, QueuedJob, StartedJob, Store};

/// How many queued jobs one admission pass looks at.
const ADMIT_BATCH: u32 = 64;
/// The fallback poll, for work that arrived without a wake-up.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// This node's name, written into chunk records.
    pub node: String,
    /// This node's core budget.
    pub cores: u32,
    pub worker: WorkerCommand,
}

/// Shared by the admission loop, the drivers and the API (for wake-ups).
pub struct Scheduler {
    store: Store,
    events: Events,
    metrics: Arc<Metrics>,
    config: SchedulerConfig,
    /// One permit per core of the budget; a running job holds one per lane.
    cores: Arc<Semaphore>,
    /// Wakes the admission loop: new work, or cores returned.
    wake: Arc<Notify>,
    runtime: Handle,
}

/// Cores held by a running job; returned (and the scheduler woken) on drop.
struct CoreLease {
    _permit: OwnedSemaphorePermit,
    cores: u32,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Drop for CoreLease {
    fn drop(&mut self) {
        self.metrics.cores_in_use.dec_by(i64::from(self.cores));
        self.wake.notify_one();
    }
}

impl Scheduler {
    pub fn new(store: Store, events: Events, metrics: Arc<Metrics>, config: SchedulerConfig) -> Arc<Self> {
        metrics.cores_budget.set(i64::from(config.cores));
        Arc::new(Scheduler {
            store,
            events,
            metrics,
            cores: Arc::new(Semaphore::new(config.cores as usize)),
            config,
            wake: Arc::new(Notify::new()),
            runtime: Handle::current(),
        })
    }

    /// Tells the admission loop that work may be waiting.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The admission loop; returns when `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.admit().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "admitting jobs failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// Lanes a job runs on here: its cores, within the budget and its chunk count.
    fn lanes_for(&self, job: &QueuedJob) -> u32 {
        let wanted = match job.strategy {
            Strategy::Sequential => 1,
            _ => job.cores,
        };
        wanted.min(self.config.cores).min(job.chunks_total.min(u64::from(u32::MAX)) as u32).max(1)
    }

    /// Starts queued jobs, in order, while their lanes fit in the free cores.
    /// The head of the queue is never overtaken: if it does not fit, nothing
    /// behind it starts until cores are returned.
    async fn admit(self: &Arc<Self>) -> Result<(), crate::store::StoreError> {
        loop {
            let queued = self.store.queued(ADMIT_BATCH).await?;
            let full_batch = queued.len() as u32 == ADMIT_BATCH;
            for job in queued {
                let lanes = self.lanes_for(&job);
                let Ok(permit) = self.cores.clone().try_acquire_many_owned(lanes) else {
                    return Ok(());
                };
                let Some(started) = self.store.start_job(job.id, &self.config.node, now_micros()).await? else {
                    continue; // no longer queued
                };
                self.metrics.cores_in_use.inc_by(i64::from(lanes));
                let lease =
                    CoreLease { _permit: permit, cores: lanes, wake: self.wake.clone(), metrics: self.metrics.clone() };
                self.events.publish(JobEvent { id: job.id, status: JobStatus::Running, progress: None });
                let this = self.clone();
                let spawned = std::thread::Builder::new()
                    .name("squared-job".into())
                    .spawn(move || this.drive(started, lanes as usize, lease));
                if let Err(e) = spawned {
                    error!(job = %job.id, error = %e, "could not start a job driver thread");
                }
            }
            if !full_batch {
                return Ok(());
            }
        }
    }

    /// Runs one started job to its end (on a driver thread of its own).
    fn drive(&self, job: StartedJob, lanes: usize, lease: CoreLease) {
        let started = Instant::now();
        let kind = match (job.strategy, job.transport) {
            (Strategy::Processes, transport) => LaneKind::Process(transport.unwrap_or(Transport::SharedMemory)),
            _ => LaneKind::Thread,
        };
        let run = JobRun {
            scheduler: self,
            job: &job,
            started,
            kind,
            queue: Mutex::new(job.chunks.iter().copied().collect()),
            cancel: AtomicBool::new(false),
            failure: Mutex::new(None),
            spawn: Mutex::new(Duration::ZERO),
        };
        let lanes = lanes.min(job.chunks.len()).max(1);
        std::thread::scope(|scope| {
            for index in 0..lanes {
                let run = &run;
                let spawned = std::thread::Builder::new()
                    .name(format!("squared-lane-{index}"))
                    .spawn_scoped(scope, move || run.lane(index));
                if let Err(e) = spawned {
                    run.fail(ExecError::Spawn(e));
                }
            }
        });
        let failure = run.failure.into_inner().unwrap_or_else(|p| p.into_inner());
        let (status, problem) = match &failure {
            None => (JobStatus::Succeeded, None),
            Some(e) => (JobStatus::Failed, Some(problem_for(e))),
        };
        let finish = Finish {
            status,
            finished_at: now_micros(),
            wall_ms: started.elapsed().as_secs_f64() * 1000.0,
            spawn_ms: run.spawn.into_inner().unwrap_or_default().as_secs_f64() * 1000.0,
            error: problem,
        };
        match self.runtime.block_on(self.store.finish_job(job.id, &finish)) {
            Ok(true) => {
                let strategy = job.strategy.as_str();
                self.metrics
                    .jobs_finished
                    .get_or_create(&crate::metrics::FinishedLabels {
                        status: status.as_str().into(),
                        strategy: strategy.into(),
                    })
                    .inc();
                self.metrics
                    .job_wall_seconds
                    .get_or_create(&Metrics::strategy(strategy))
                    .observe(finish.wall_ms / 1000.0);
                info!(job = %job.id, status = status.as_str(), wall_ms = finish.wall_ms, error = ?failure, "job finished");
            }
            Ok(false) => info!(job = %job.id, "job ended elsewhere before its run finished"),
            Err(e) => {
                error!(job = %job.id, error = %e, "could not record the end of a job; it will run again after a restart")
            }
        }
        drop(lease);
        self.events.publish(JobEvent { id: job.id, status, progress: None });
    }
}

/// The problem document a failed job carries.
fn problem_for(e: &ExecError) -> Problem {
    let (kind, title) = match e {
        ExecError::WorkerCrashed(_) => ("/problems/worker-crashed", "A worker process crashed"),
        ExecError::Worker(_) => ("/problems/worker-failed", "A worker refused the work"),
        ExecError::Spawn(_) => ("/problems/worker-spawn-failed", "A worker could not be started"),
        ExecError::Canceled => ("/problems/canceled", "The job was canceled"),
        ExecError::Store(_) => ("/problems/internal", "The job's results could not be stored"),
    };
    let detail = match e {
        ExecError::Store(_) => "an internal error occurred; see the server log".to_string(),
        e => e.to_string(),
    };
    Problem { kind: kind.into(), title: title.into(), status: 500, detail: Some(detail), errors: vec![] }
}

/// The state one job's lanes share while it runs.
struct JobRun<'a> {
    scheduler: &'a Scheduler,
    job: &'a StartedJob,
    started: Instant,
    kind: LaneKind,
    queue: Mutex<VecDeque<ChunkPlan>>,
    /// Set when any lane fails: the others stop at their next segment.
    cancel: AtomicBool,
    /// The first failure; it is the job's error.
    failure: Mutex<Option<ExecError>>,
    /// Worker start-up time, summed over lanes.
    spawn: Mutex<Duration>,
}

impl JobRun<'_> {
    fn fail(&self, e: ExecError) {
        self.cancel.store(true, Ordering::Relaxed);
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert(e);
    }

    fn next_chunk(&self) -> Option<ChunkPlan> {
        if self.cancel.load(Ordering::Relaxed) {
            return None;
        }
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    /// One lane: start a worker, then run chunks until none are left.
    fn lane(&self, index: usize) {
        let s = self.scheduler;
        let mut lane = match exec::start_lane(self.kind, index, &s.config.worker) {
            Ok(lane) => lane,
            Err(e) => return self.fail(e),
        };
        if matches!(self.kind, LaneKind::Process(_)) {
            s.metrics.workers_spawned.inc();
        }
        *self.spawn.lock().unwrap_or_else(|p| p.into_inner()) += lane.spawn_time();
        let mut inputs = StoreInputs { s, job: self.job.id, cached: None };
        let strategy = Metrics::strategy(self.job.strategy.as_str());
        while let Some(chunk) = self.next_chunk() {
            let chunk_start = self.started.elapsed();
            let mut sink = StoreSink { s, job: self.job.id, spent: Duration::ZERO };
            let work =
                ChunkWork { offset: chunk.offset, len: chunk.len, range: self.job.range, simulate: self.job.simulate };
            let outcome = match lane.run_chunk(&work, &mut inputs, &mut sink, &self.cancel) {
                Ok(outcome) => outcome,
                Err(e) => {
                    if matches!(e, ExecError::WorkerCrashed(_)) {
                        s.metrics.worker_crashes.inc();
                    }
                    return self.fail(e);
                }
            };
            let duration = self.started.elapsed() - chunk_start;
            s.metrics.chunk_seconds.get_or_create(&strategy).observe(duration.as_secs_f64());
            let record = ChunkRecord {
                worker: lane.worker(),
                node: s.config.node.clone(),
                start_ms: chunk_start.as_secs_f64() * 1000.0,
                duration_ms: duration.as_secs_f64() * 1000.0,
                compute_ms: outcome.compute.as_secs_f64() * 1000.0,
                store_ms: sink.spent.as_secs_f64() * 1000.0,
            };
            match s.runtime.block_on(s.store.complete_chunk(self.job.id, &chunk, &record)) {
                Ok(progress) => {
                    s.events.publish(JobEvent { id: self.job.id, status: JobStatus::Running, progress: Some(progress) })
                }
                Err(e) => return self.fail(ExecError::Store(e.to_string())),
            }
        }
    }
}

/// Stores each segment as a lane produces it, timing the writes.
struct StoreSink<'a> {
    s: &'a Scheduler,
    job: Uuid,
    spent: Duration,
}

impl Sink for StoreSink<'_> {
    fn segment(&mut self, offset: u64, squares: &[i64]) -> Result<(), ExecError> {
        let t = Instant::now();
        let result = self.s.runtime.block_on(self.s.store.put_segment(self.job, offset, squares));
        self.spent += t.elapsed();
        result.map_err(|e| ExecError::Store(e.to_string()))
    }
}

/// Reads a list job's numbers, one stored input segment at a time.
struct StoreInputs<'a> {
    s: &'a Scheduler,
    job: Uuid,
    cached: Option<(u64, Vec<i64>)>,
}

impl Inputs for StoreInputs<'_> {
    fn numbers(&mut self, offset: u64, len: usize) -> Result<&[i64], ExecError> {
        let segment = offset / SEGMENT_LEN * SEGMENT_LEN;
        if self.cached.as_ref().map(|(pos, _)| *pos) != Some(segment) {
            let numbers = self
                .s
                .runtime
                .block_on(self.s.store.input_segment(self.job, segment))
                .map_err(|e| ExecError::Store(e.to_string()))?;
            self.cached = Some((segment, numbers));
        }
        let (_, numbers) = self.cached.as_ref().expect("just cached");
        let start = (offset - segment) as usize;
        numbers
            .get(start..start + len)
            .ok_or_else(|| ExecError::Store(format!("input segment at {segment} is too short")))
    }
}
