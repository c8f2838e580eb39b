//! The scheduler: admits queued jobs by priority, then age, while the cores
//! of running jobs stay within this node's budget, and runs each admitted job
//! on its own driver thread.
//!
//! A driver starts the job's lanes (threads or worker subprocesses), which pull
//! chunks from the job's queue; each segment of squares is stored as soon as it
//! exists, and each chunk is marked done once all its segments are stored.
//! Drivers and lanes are plain OS threads that reach the async store through
//! `Handle::block_on`: compute never runs on the async runtime's workers.
//!
//! A running job can be aborted — canceled, timed out, or stopped by a
//! shutdown — through its [`JobControl`]: lanes stop at their next item and
//! worker processes are killed at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::domain::{now_micros, ChunkPlan, JobStatus, Problem, Strategy, Transport, SEGMENT_LEN};
use crate::events::{Events, JobEvent};
use crate::exec::{self, ChunkWork, ExecError, Inputs, Lane, LaneKind, Sink, WorkerCommand};
use crate::metrics::{FinishedLabels, Metrics};
use crate::store::{ChunkRecord, Finish, QueuedJob, StartedJob, Store};

/// How many queued jobs one admission pass looks at.
const ADMIT_BATCH: u32 = 64;
/// The fallback poll, for work that arrived without a wake-up.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// First retry delay after a worker crash; doubles per attempt.
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// This node's name, written into chunk records.
    pub node: String,
    /// This node's core budget.
    pub cores: u32,
    pub worker: WorkerCommand,
    /// Bounds every job's run (`--max-job-duration`).
    pub max_job_duration: Option<Duration>,
}

/// Why a running job is being stopped from outside its lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Abort {
    Canceled = 1,
    Timeout = 2,
    Shutdown = 3,
}

/// The handle to one running job: abort it, and know when its driver is done.
pub struct JobControl {
    /// The first abort reason (0: none).
    reason: AtomicU8,
    /// Lanes stop at their next item when set (an abort, or the job failed).
    stop: AtomicBool,
    /// Live worker processes, killed on abort. A pid leaves this list before
    /// its process is reaped, so a kill never reaches a recycled pid.
    pids: Mutex<Vec<u32>>,
    done: watch::Sender<bool>,
}

impl JobControl {
    fn new() -> Self {
        JobControl {
            reason: AtomicU8::new(0),
            stop: AtomicBool::new(false),
            pids: Mutex::new(Vec::new()),
            done: watch::channel(false).0,
        }
    }

    /// Stops the job for `why`; the first reason wins. Returns whether this call did it.
    pub fn abort(&self, why: Abort) -> bool {
        let first = self.reason.compare_exchange(0, why as u8, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        if first {
            self.halt();
        }
        first
    }

    /// Makes every lane stop and kills every worker process.
    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
        for pid in pids.iter() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is not reaped yet.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }

    pub fn reason(&self) -> Option<Abort> {
        match self.reason.load(Ordering::SeqCst) {
            1 => Some(Abort::Canceled),
            2 => Some(Abort::Timeout),
            3 => Some(Abort::Shutdown),
            _ => None,
        }
    }

    /// Tracks a worker process; kills it at once if the job is already stopping.
    fn register(&self, pid: u32) {
        let mut pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
        pids.push(pid);
        if self.stop.load(Ordering::SeqCst) {
            // SAFETY: as in `halt`.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    fn unregister(&self, pid: u32) {
        self.pids.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| *p != pid);
    }

    /// Resolves once the job's driver has finished.
    pub async fn finished(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

/// Shared by the admission loop, the drivers and the API.
pub struct Scheduler {
    store: Store,
    events: Events,
    metrics: Arc<Metrics>,
    config: SchedulerConfig,
    /// One permit per core of the budget; a running job holds one per lane.
    cores: Arc<Semaphore>,
    /// Wakes the admission loop: new work, or cores returned.
    wake: Arc<Notify>,
    /// Jobs running on this node.
    running: Mutex<HashMap<Uuid, Arc<JobControl>>>,
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
            running: Mutex::new(HashMap::new()),
            runtime: Handle::current(),
        })
    }

    /// Tells the admission loop that work may be waiting.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The control of a job running on this node.
    pub fn control(&self, id: Uuid) -> Option<Arc<JobControl>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    fn running_controls(&self) -> Vec<Arc<JobControl>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// The admission loop; returns when `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.admit(&shutdown).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "admitting jobs failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Graceful stop, after the admission loop has stopped: running jobs get
    /// `grace` to finish; the rest are stopped and put back in the queue
    /// (their stored chunks kept, no attempt counted).
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        let all_done = async {
            for control in self.running_controls() {
                control.finished().await;
            }
        };
        if tokio::time::timeout_at(deadline, all_done).await.is_ok() {
            return;
        }
        let left = self.running_controls();
        info!(jobs = left.len(), "grace period over: stopping running jobs and re-queueing them");
        for control in &left {
            control.abort(Abort::Shutdown);
        }
        for control in left {
            if tokio::time::timeout(Duration::from_secs(10), control.finished()).await.is_err() {
                warn!("a job driver did not stop within 10 s of its abort");
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
    async fn admit(self: &Arc<Self>, shutdown: &watch::Receiver<bool>) -> Result<(), crate::store::StoreError> {
        loop {
            let queued = self.store.queued(ADMIT_BATCH).await?;
            let full_batch = queued.len() as u32 == ADMIT_BATCH;
            for job in queued {
                if *shutdown.borrow() {
                    return Ok(());
                }
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
                let control = Arc::new(JobControl::new());
                self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(job.id, control.clone());
                self.events.publish(JobEvent { id: job.id, status: JobStatus::Running, progress: None });
                let this = self.clone();
                let spawned = std::thread::Builder::new()
                    .name("squared-job".into())
                    .spawn(move || this.drive(started, lanes as usize, lease, control));
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
    fn drive(&self, job: StartedJob, lanes: usize, lease: CoreLease, control: Arc<JobControl>) {
        let started = Instant::now();
        let limit = match (job.timeout_ms.map(Duration::from_millis), self.config.max_job_duration) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(limit) = limit {
            let control = control.clone();
            self.runtime.spawn(async move {
                let mut done = control.done.subscribe();
                tokio::select! {
                    _ = tokio::time::sleep(limit) => { control.abort(Abort::Timeout); }
                    _ = done.wait_for(|d| *d) => {}
                }
            });
        }
        let kind = match (job.strategy, job.transport) {
            (Strategy::Processes, transport) => LaneKind::Process(transport.unwrap_or(Transport::SharedMemory)),
            _ => LaneKind::Thread,
        };
        let run = JobRun {
            scheduler: self,
            job: &job,
            control: &control,
            started,
            kind,
            queue: Mutex::new(job.chunks.iter().copied().collect()),
            failure: Mutex::new(None),
            attempts: Mutex::new(job.attempts),
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
        let spawn_ms = run.spawn.into_inner().unwrap_or_default().as_secs_f64() * 1000.0;
        let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
        let status = self.conclude(&job, control.reason(), failure, wall_ms, spawn_ms);
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.id);
        drop(lease);
        control.done.send_replace(true);
        self.events.publish(JobEvent { id: job.id, status, progress: None });
    }

    /// Records how a job's run ended; returns the status it is left in.
    fn conclude(
        &self,
        job: &StartedJob,
        abort: Option<Abort>,
        failure: Option<ExecError>,
        wall_ms: f64,
        spawn_ms: f64,
    ) -> JobStatus {
        let (status, error) = match (abort, failure) {
            (Some(Abort::Shutdown), _) => {
                match self.runtime.block_on(self.store.requeue_job(job.id)) {
                    Ok(_) => info!(job = %job.id, "job stopped by shutdown and re-queued"),
                    Err(e) => error!(job = %job.id, error = %e, "could not re-queue; it runs again after a restart"),
                }
                return JobStatus::Queued;
            }
            // The API already stored the cancel; nothing more to record.
            (Some(Abort::Canceled), _) => {
                self.count_finished(job, JobStatus::Canceled, wall_ms);
                info!(job = %job.id, wall_ms, "job canceled");
                return JobStatus::Canceled;
            }
            (Some(Abort::Timeout), _) => (JobStatus::Failed, Some(timeout_problem(job, wall_ms))),
            (None, Some(ExecError::Canceled)) => {
                // Canceled elsewhere (the store refused our segments).
                return JobStatus::Canceled;
            }
            (None, Some(e)) => (JobStatus::Failed, Some(problem_for(&e))),
            (None, None) => (JobStatus::Succeeded, None),
        };
        let finish = Finish { status, finished_at: now_micros(), wall_ms, spawn_ms, error };
        match self.runtime.block_on(self.store.finish_job(job.id, &finish)) {
            Ok(true) => {
                self.count_finished(job, status, wall_ms);
                info!(job = %job.id, status = status.as_str(), wall_ms, error = ?finish.error.map(|e| e.detail), "job finished");
                status
            }
            Ok(false) => {
                info!(job = %job.id, "job ended elsewhere before its run finished");
                self.runtime.block_on(self.store.status(job.id)).ok().flatten().unwrap_or(JobStatus::Canceled)
            }
            Err(e) => {
                error!(job = %job.id, error = %e, "could not record the end of a job; it runs again after a restart");
                JobStatus::Running
            }
        }
    }

    fn count_finished(&self, job: &StartedJob, status: JobStatus, wall_ms: f64) {
        let strategy = job.strategy.as_str();
        let labels = FinishedLabels { status: status.as_str().into(), strategy: strategy.into() };
        self.metrics.jobs_finished.get_or_create(&labels).inc();
        self.metrics.job_wall_seconds.get_or_create(&Metrics::strategy(strategy)).observe(wall_ms / 1000.0);
    }
}

/// The problem a timed-out job carries.
fn timeout_problem(job: &StartedJob, wall_ms: f64) -> Problem {
    let detail = match job.timeout_ms {
        Some(ms) => format!("the job ran {wall_ms:.0} ms; its timeout_ms is {ms} (or the server's --max-job-duration)"),
        None => format!("the job ran {wall_ms:.0} ms, over the server's --max-job-duration"),
    };
    Problem {
        kind: "/problems/timeout".into(),
        title: "The job timed out".into(),
        status: 504,
        detail: Some(detail),
        errors: vec![],
    }
}

/// The problem a canceled job carries.
pub fn canceled_problem() -> Problem {
    Problem {
        kind: "/problems/canceled".into(),
        title: "The job was canceled".into(),
        status: 409,
        detail: Some("canceled by a client".into()),
        errors: vec![],
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
    control: &'a JobControl,
    started: Instant,
    kind: LaneKind,
    queue: Mutex<VecDeque<ChunkPlan>>,
    /// The first failure; it is the job's error.
    failure: Mutex<Option<ExecError>>,
    /// Attempts made so far; guards the retry decision.
    attempts: Mutex<u32>,
    /// Worker start-up time, summed over lanes.
    spawn: Mutex<Duration>,
}

impl JobRun<'_> {
    /// Fails the job: the first failure is kept, every lane stops.
    fn fail(&self, e: ExecError) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert(e);
        drop(failure);
        self.control.halt();
    }

    fn stopped(&self) -> bool {
        self.control.stop.load(Ordering::SeqCst)
    }

    fn next_chunk(&self) -> Option<ChunkPlan> {
        if self.stopped() {
            return None;
        }
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    fn start_lane(&self, index: usize) -> Result<Box<dyn Lane>, ExecError> {
        let lane = exec::start_lane(self.kind, index, &self.scheduler.config.worker)?;
        if let Some(pid) = lane.pid() {
            self.scheduler.metrics.workers_spawned.inc();
            self.control.register(pid);
        }
        *self.spawn.lock().unwrap_or_else(|p| p.into_inner()) += lane.spawn_time();
        Ok(lane)
    }

    fn retire(&self, lane: Box<dyn Lane>) {
        if let Some(pid) = lane.pid() {
            self.control.unregister(pid);
        }
        drop(lane); // reaps a worker process
    }

    /// After a worker crash: whether attempts remain. If so the crash is
    /// recorded as a failed attempt and the caller retries after the returned delay.
    fn retry_after(&self, e: &ExecError) -> Option<Duration> {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if *attempts >= self.job.max_attempts || self.stopped() {
            return None;
        }
        let s = self.scheduler;
        match s.runtime.block_on(s.store.record_attempt_error(self.job.id, &problem_for(e), now_micros())) {
            Ok(Some(n)) => *attempts = n,
            Ok(None) | Err(_) => return None,
        }
        warn!(job = %self.job.id, attempt = *attempts, error = %e, "worker crashed; retrying its chunk");
        let exp = (*attempts).saturating_sub(2).min(16);
        Some((RETRY_BASE * 2u32.pow(exp)).min(RETRY_MAX))
    }

    /// Sleeps for a retry delay, waking early if the job stops.
    fn backoff(&self, delay: Duration) {
        let until = Instant::now() + delay;
        while Instant::now() < until && !self.stopped() {
            std::thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
        }
    }

    /// One lane: start a worker, then run chunks until none are left.
    fn lane(&self, index: usize) {
        let s = self.scheduler;
        let mut lane = match self.start_lane(index) {
            Ok(lane) => lane,
            Err(e) => return self.fail(e),
        };
        let mut inputs = StoreInputs { s, job: self.job.id, cached: None };
        let strategy = Metrics::strategy(self.job.strategy.as_str());
        while let Some(chunk) = self.next_chunk() {
            let chunk_start = self.started.elapsed();
            let mut sink = StoreSink { s, job: self.job.id, spent: Duration::ZERO };
            let work =
                ChunkWork { offset: chunk.offset, len: chunk.len, range: self.job.range, simulate: self.job.simulate };
            let outcome = match lane.run_chunk(&work, &mut inputs, &mut sink, &self.control.stop) {
                Ok(outcome) => outcome,
                Err(_) if self.control.reason().is_some() => break,
                Err(e @ ExecError::WorkerCrashed(_)) => {
                    s.metrics.worker_crashes.inc();
                    let Some(delay) = self.retry_after(&e) else {
                        self.fail(e);
                        break;
                    };
                    self.queue.lock().unwrap_or_else(|p| p.into_inner()).push_front(chunk);
                    self.retire(lane);
                    self.backoff(delay);
                    lane = match self.start_lane(index) {
                        Ok(lane) => lane,
                        Err(e) => return self.fail(e),
                    };
                    continue;
                }
                Err(e) => {
                    self.fail(e);
                    break;
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
                Err(e) => {
                    self.fail(ExecError::Store(e.to_string()));
                    break;
                }
            }
        }
        self.retire(lane);
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
        match result {
            Ok(true) => Ok(()),
            // The job is no longer running (canceled): stop quietly.
            Ok(false) => Err(ExecError::Canceled),
            Err(e) => Err(ExecError::Store(e.to_string())),
        }
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
