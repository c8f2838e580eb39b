//! The scheduler: claims chunks of queued and running jobs — highest priority
//! first, then oldest — while this node's core budget has room, and runs each
//! claimed chunk on a lane (an OS thread, or a worker subprocess it drives).
//!
//! Work is claimed, not assigned: every node claims from the shared store, a
//! job never has more chunks running at once (cluster-wide) than its cores,
//! and a heartbeat extends the leases of this node's chunks. A lane that
//! finishes a chunk claims the next chunk of the same job, keeping its worker;
//! the node that completes a job's last chunk ends the job in the store. Jobs
//! of one chunk are stored several per write, and small ones claimed several
//! per claim (`LANE_BATCH`): a tiny job costs a share of a round trip.
//!
//! Every claim holds the cores it claims for before it runs (`reserve`): the
//! claim loop's, and on SQLite a submission's, whose write claims work for
//! the free cores it found, so a job sent to an idle node starts in the
//! transaction that stores it.
//!
//! Lanes are plain OS threads (kept a while between lanes: `LaneThreads`)
//! that reach the async store through `Handle::block_on`: compute never
//! runs on the async runtime's workers.
//! A job running here can be aborted — canceled, timed out, ended elsewhere,
//! or stopped by a shutdown — through its [`JobControl`]: lanes stop at their
//! next item and worker processes are killed at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::domain::{now_micros, ChunkPlan, JobStatus, Problem, Strategy, Transport, SEGMENT_LEN};
use crate::events::{Events, JobEvent};
use crate::exec::{self, ChunkWork, ExecError, Inputs, Lane, LaneKind, Sink, WorkerCommand};
use crate::metrics::{FinishedLabels, Metrics};
use crate::store::{
    ChunkRecord, Claim, ClaimedJob, Completion, Completions, NextClaim, RanChunk, ResultFile, Store, StoreResult,
};

/// The fallback poll, for work that arrived without a wake-up.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long an idle worker process stays warm before it is stopped.
const POOL_IDLE: Duration = Duration::from_secs(2);
/// How long a lane thread waits for the next lane before it exits.
const LANE_THREAD_IDLE: Duration = Duration::from_secs(10);
/// How long a lane keeps retrying a store call through a database outage.
const STORE_PATIENCE: Duration = Duration::from_secs(600);
/// First retry delay after a worker crash; doubles per attempt.
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// The most jobs a lane claims at once (small ones only: see `Store::complete_chunks`).
const LANE_BATCH: u32 = 8;

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// This node's name, written into chunk records and claims.
    pub node: String,
    /// This node's core budget.
    pub cores: u32,
    pub worker: WorkerCommand,
    /// Bounds every job's run (`--max-job-duration`).
    pub max_job_duration: Option<Duration>,
    /// How long a claim stays valid without a heartbeat.
    pub lease: Duration,
}

impl SchedulerConfig {
    fn heartbeat_interval(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(100))
    }
}

/// Why a running job is being stopped from outside its lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Abort {
    Canceled = 1,
    Timeout = 2,
    Shutdown = 3,
    /// The job ended on another node (failed, timed out, canceled there).
    Ended = 4,
}

/// The handle to one job running on this node: abort it, and know when its
/// last local lane is done.
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
            4 => Some(Abort::Ended),
            _ => None,
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Tracks a worker process; kills it at once if the job is already stopping.
    fn register(&self, pid: u32) {
        let mut pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
        pids.push(pid);
        if self.stopped() {
            // SAFETY: as in `halt`.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    fn unregister(&self, pid: u32) {
        self.pids.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| *p != pid);
    }

    /// Hands a warm worker of this job over to another: unregisters it and
    /// says whether it is safe to use (false once this job is stopping: its
    /// abort may have killed the worker). Under the lock, so an abort either
    /// sees the worker registered (and kills it) or not at all.
    fn hand_over(&self, pid: u32) -> bool {
        let mut pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
        pids.retain(|p| *p != pid);
        !self.stopped()
    }

    /// Resolves once the job has no lane left on this node.
    pub async fn finished(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

/// A warm worker in the pool: since when, the control of the job it served
/// (kept even after that job is gone here: its abort may have killed the
/// worker, and only the control can tell), the worker.
type Warm = (Instant, Arc<JobControl>, Box<dyn Lane>);

/// Drops pooled workers (each waits for its process to exit), unregistering
/// each from the job it served first, so no abort can reach a reaped pid.
fn drop_warm(warm: Vec<Warm>) {
    for (_, served, lane) in warm {
        if let Some(pid) = lane.pid() {
            served.unregister(pid);
        }
        drop(lane);
    }
}

/// Free cores held for a claim about to run ([`Scheduler::reserve`]);
/// dropping it hands them back.
pub struct Reserved {
    permits: Vec<OwnedSemaphorePermit>,
}

impl Reserved {
    /// How many cores are held.
    pub fn lanes(&self) -> u32 {
        self.permits.len() as u32
    }
}

/// A job with lanes on this node.
struct LocalJob {
    job: ClaimedJob,
    control: Arc<JobControl>,
    /// Chunks claimed for this job and not yet picked up by a lane.
    queue: Mutex<VecDeque<ChunkPlan>>,
    /// Lanes of this job alive here (changed under the scheduler's `running` lock).
    lanes: AtomicUsize,
    /// Numbers lanes "thread N" for the job's chunk records.
    next_lane: AtomicUsize,
    /// Serialises retry decisions between this job's lanes.
    retry: Mutex<()>,
    /// The job's input when the claim brought it (see `Claim::input`).
    input: Option<Vec<i64>>,
}

/// Shared by the claim loop, the lanes, the heartbeat and the API.
pub struct Scheduler {
    store: Store,
    events: Events,
    metrics: Arc<Metrics>,
    config: SchedulerConfig,
    /// One permit per core of the budget; each lane holds one.
    cores: Arc<Semaphore>,
    /// Wakes the claim loop: new work, or cores returned.
    wake: Arc<Notify>,
    /// Set once the node shuts down: lanes stop claiming new work.
    draining: AtomicBool,
    /// Jobs with lanes on this node.
    running: Mutex<HashMap<Uuid, Arc<LocalJob>>>,
    /// Idle worker processes kept warm for the next job (at most one per
    /// core), with when each went idle and the job it last served: it stays
    /// registered with that job, so canceling the job kills it too. They
    /// exit after `POOL_IDLE`.
    pool: Mutex<Vec<Warm>>,
    /// Lane threads between lanes.
    threads: Arc<LaneThreads>,
    runtime: Handle,
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
            draining: AtomicBool::new(false),
            running: Mutex::new(HashMap::new()),
            pool: Mutex::new(Vec::new()),
            threads: Arc::new(LaneThreads::new(LANE_THREAD_IDLE)),
            runtime: Handle::current(),
        })
    }

    /// Tells the claim loop that work may be waiting.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The control of a job with lanes on this node.
    pub fn control(&self, id: Uuid) -> Option<ControlHandle> {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned().map(ControlHandle)
    }

    fn local_jobs(&self) -> Vec<Arc<LocalJob>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// What a write that claims for this node needs: its name and a fresh lease.
    pub fn next_claim(&self) -> NextClaim<'_> {
        NextClaim { node: &self.config.node, lease_until: self.lease_until() }
    }

    fn lease_until(&self) -> i64 {
        now_micros() + self.config.lease.as_micros() as i64
    }

    /// The claim loop; returns when `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                self.draining.store(true, Ordering::SeqCst);
                return;
            }
            match self.claim_and_start().await {
                Ok(true) => continue, // there may be more
                Ok(false) => backoff = Duration::from_millis(100),
                Err(e) => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "claiming work failed");
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

    /// Claims chunks for the free cores and starts a lane per chunk. Returns
    /// whether it started anything.
    async fn claim_and_start(self: &Arc<Self>) -> Result<bool, crate::store::StoreError> {
        // The cores are held while the claim runs: a submission's claim
        // (`reserve`) must not take them in between.
        let Some(Reserved { mut permits }) = self.reserve(u32::MAX) else {
            return Ok(false);
        };
        let claims = self.store.claim(&self.config.node, permits.len() as u32, self.lease_until()).await?;
        let started = !claims.is_empty();
        for claim in claims {
            self.start_lanes_with(claim, &mut permits);
        }
        Ok(started)
    }

    /// Up to `most` of the node's free cores, held for a claim that is about
    /// to run: the claim loop's, or a submission's whose write claims work
    /// (`Store::insert_job`), so that a job submitted to a node with a free
    /// core starts in the transaction that stores it, with no trip through
    /// the claim loop. `None` while draining or when no core is free.
    pub fn reserve(&self, most: u32) -> Option<Reserved> {
        if self.draining.load(Ordering::SeqCst) {
            return None;
        }
        let permits: Vec<_> =
            std::iter::from_fn(|| self.cores.clone().try_acquire_owned().ok()).take(most as usize).collect();
        (!permits.is_empty()).then_some(Reserved { permits })
    }

    /// After a submission's write: starts lanes for what it claimed with the
    /// `reserved` cores (`claimed` is `None` when the write did not claim)
    /// and hands back the cores left over. The claim loop is woken unless
    /// every reserved core got a lane: then no core is left free by this
    /// submission, and the lanes claim what waits once they are done.
    pub fn submitted(self: &Arc<Self>, reserved: Option<Reserved>, claimed: Option<Vec<Claim>>) {
        let mut permits = reserved.map(|r| r.permits).unwrap_or_default();
        let claimed_any = claimed.as_ref().is_some_and(|c| !c.is_empty());
        for claim in claimed.unwrap_or_default() {
            self.start_lanes_with(claim, &mut permits);
        }
        if !claimed_any || !permits.is_empty() {
            drop(permits);
            self.wake();
        }
    }

    /// Starts one lane per claimed chunk, joining the job's local state.
    fn start_lanes(self: &Arc<Self>, claim: Claim) {
        self.start_lanes_with(claim, &mut Vec::new());
    }

    /// [`Scheduler::start_lanes`], taking the lanes' cores from `permits`
    /// first and then from the free ones.
    fn start_lanes_with(self: &Arc<Self>, claim: Claim, permits: &mut Vec<OwnedSemaphorePermit>) {
        let (id, lanes) = (claim.job.id, claim.chunks.len());
        let local = self.join(claim);
        for _ in 0..lanes {
            let Some(permit) = permits.pop().or_else(|| self.cores.clone().try_acquire_owned().ok()) else {
                error!(job = %id, "claimed more chunks than free cores");
                self.lane_gone(&local);
                continue;
            };
            self.metrics.cores_in_use.inc();
            let (this, lane_job) = (self.clone(), local.clone());
            let spawned = self.threads.run(Box::new(move || this.run_lane(lane_job, permit)));
            if let Err(e) = spawned {
                // Its chunk stays claimed until its lease runs out and it is rescued.
                error!(job = %id, error = %e, "could not start a lane thread");
                self.metrics.cores_in_use.dec();
                self.lane_gone(&local);
            }
        }
    }

    /// Joins a claim to the job's local state (a new run unless a live one
    /// exists), with one lane counted per claimed chunk; the caller runs them.
    fn join(self: &Arc<Self>, claim: Claim) -> Arc<LocalJob> {
        let (id, lanes) = (claim.job.id, claim.chunks.len());
        let (local, new) = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            // A job whose local run is stopping (aborted, or ended and claimed
            // again) gets a fresh run: new claims must not join lanes that quit.
            let reusable = running.get(&id).filter(|local| !local.control.stopped()).cloned();
            let new = reusable.is_none();
            let local = reusable.unwrap_or_else(|| {
                let local = Arc::new(LocalJob {
                    job: claim.job.clone(),
                    control: Arc::new(JobControl::new()),
                    queue: Mutex::new(VecDeque::new()),
                    lanes: AtomicUsize::new(0),
                    next_lane: AtomicUsize::new(0),
                    retry: Mutex::new(()),
                    input: claim.input,
                });
                running.insert(id, local.clone());
                local
            });
            local.queue.lock().unwrap_or_else(|p| p.into_inner()).extend(claim.chunks);
            local.lanes.fetch_add(lanes, Ordering::SeqCst);
            (local, new)
        };
        if new {
            self.events.publish(JobEvent { id, status: JobStatus::Running });
            self.watch_deadline(&local);
        }
        local
    }

    /// Times the job out at its deadline: the smaller of its `timeout_ms` and
    /// `--max-job-duration`, counted from its start (the same on every node).
    fn watch_deadline(self: &Arc<Self>, local: &Arc<LocalJob>) {
        let limit = match (local.job.timeout_ms.map(Duration::from_millis), self.config.max_job_duration) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return,
        };
        let deadline = local.job.started_at + limit.as_micros() as i64;
        let (this, local) = (self.clone(), local.clone());
        self.runtime.spawn(async move {
            let wait = Duration::from_micros((deadline - now_micros()).max(0) as u64);
            let mut done = local.control.done.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = done.wait_for(|d| *d) => return,
            }
            let job = &local.job;
            let wall_ms = (now_micros() - job.started_at) as f64 / 1000.0;
            let problem = timeout_problem(job, wall_ms);
            let mut delay = Duration::from_millis(100);
            loop {
                match this.store.fail_job(job.id, &problem, now_micros()).await {
                    Ok(true) => {
                        this.count_finished(job, JobStatus::Failed, wall_ms);
                        info!(job = %job.id, wall_ms, "job timed out");
                        this.events.publish(JobEvent { id: job.id, status: JobStatus::Failed });
                    }
                    Ok(false) => {}
                    // Keep trying through an outage: the lanes stop only once it is recorded.
                    Err(e) if e.is_transient() => {
                        warn!(job = %job.id, error = %e, "could not record a timeout yet; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    Err(e) => error!(job = %job.id, error = %e, "could not record a timeout"),
                }
                break;
            }
            local.control.abort(Abort::Timeout);
        });
    }

    /// Book-keeping when a lane of `local` ends; the last one removes the job.
    fn lane_gone(&self, local: &Arc<LocalJob>) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if local.lanes.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Only this run's entry: a fresh run of the job may have replaced it.
            if running.get(&local.job.id).is_some_and(|entry| Arc::ptr_eq(entry, local)) {
                running.remove(&local.job.id);
            }
            drop(running);
            local.control.done.send_replace(true);
        }
    }

    /// Keeps this node's leases alive, stops local jobs that ended elsewhere,
    /// and releases chunks whose node died. Returns when `halted` turns true:
    /// after the shutdown's grace period, not at its start.
    pub async fn heartbeat(self: Arc<Self>, mut halted: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.heartbeat_interval()) => {}
                _ = halted.wait_for(|s| *s) => return,
            }
            let local: Vec<Uuid> = self.local_jobs().iter().map(|j| j.job.id).collect();
            match self.store.heartbeat(&self.config.node, self.lease_until(), &local).await {
                Ok(gone) => {
                    for id in gone {
                        if let Some(job) = self.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                            job.control.abort(Abort::Ended);
                        }
                    }
                }
                Err(e) => warn!(error = %e, "heartbeat failed; retrying"),
            }
            // A chunk is rescued once its lease has been expired for another
            // whole lease: a heartbeat delayed behind a long write is not a death.
            let cutoff = now_micros() - self.config.lease.as_micros() as i64;
            match self.store.rescue_expired(cutoff).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(chunks = n, "released chunks whose node stopped heartbeating");
                    self.wake();
                }
                Err(e) => warn!(error = %e, "rescue of expired chunks failed; retrying"),
            }
        }
    }

    /// Stops idle worker processes once they have been idle for `POOL_IDLE`,
    /// and all of them when `stop` turns true.
    pub async fn reap_idle_workers(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(POOL_IDLE / 4) => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            let expired: Vec<Warm> = {
                let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                let (old, keep): (Vec<_>, Vec<_>) =
                    pool.drain(..).partition(|(idle_since, _, _)| stopping || idle_since.elapsed() >= POOL_IDLE);
                *pool = keep;
                old
            };
            if !expired.is_empty() {
                // Dropping a worker waits for it to exit: not on an async thread.
                let _ = tokio::task::spawn_blocking(move || drop_warm(expired)).await;
            }
            if stopping {
                return;
            }
        }
    }

    /// Graceful stop, after the claim loop has stopped (no new job starts
    /// here): local jobs get `grace` to finish; the rest are stopped and their
    /// chunks released (kept where stored, no attempt counted) for the next
    /// node or start.
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        let all_done = async {
            for job in self.local_jobs() {
                job.control.finished().await;
            }
        };
        if tokio::time::timeout_at(deadline, all_done).await.is_err() {
            let left = self.local_jobs();
            info!(jobs = left.len(), "grace period over: stopping running jobs and re-queueing them");
            for job in &left {
                job.control.abort(Abort::Shutdown);
            }
            for job in &left {
                if tokio::time::timeout(Duration::from_secs(10), job.control.finished()).await.is_err() {
                    warn!(job = %job.job.id, "a job's lanes did not stop within 10 s of the abort");
                }
            }
        }
        let idle: Vec<Warm> = self.pool.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        let _ = tokio::task::spawn_blocking(move || drop_warm(idle)).await;
        match self.store.release_chunks(Some(&self.config.node)).await {
            Ok(0) => {}
            Ok(n) => info!(chunks = n, "released this node's unfinished chunks; their jobs are re-queued"),
            Err(e) => warn!(error = %e, "could not release chunks; they are rescued when their lease expires"),
        }
    }

    /// Runs a store call from a lane, retrying through database outages
    /// (with backoff, up to `STORE_PATIENCE`) unless the job is stopped.
    fn db<T, F, Fut>(&self, control: &JobControl, what: &str, op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        self.db_while(|| !control.stopped(), what, op)
    }

    /// [`Scheduler::db`], retrying while `worth_it` holds.
    fn db_while<T, F, Fut>(&self, worth_it: impl Fn() -> bool, what: &str, mut op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let give_up = Instant::now() + STORE_PATIENCE;
        let mut delay = Duration::from_millis(50);
        let mut warned = false;
        loop {
            match self.runtime.block_on(op()) {
                Err(e) if e.is_transient() && worth_it() && Instant::now() < give_up => {
                    if !warned {
                        warn!(error = %e, what, "database unavailable; retrying");
                        warned = true;
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                result => return result,
            }
        }
    }

    fn count_finished(&self, job: &ClaimedJob, status: JobStatus, wall_ms: f64) {
        let strategy = job.strategy.as_str();
        let labels = FinishedLabels { status: status.as_str().into(), strategy: strategy.into() };
        self.metrics.jobs_finished.get_or_create(&labels).inc();
        self.metrics.job_wall_seconds.get_or_create(&Metrics::strategy(strategy)).observe(wall_ms / 1000.0);
    }

    /// A lane: runs the chunks of one job until none are left; then claims
    /// the next work itself, keeping its core, until there is none (the
    /// claim loop takes over from there). A job that is one chunk is stored
    /// together with the others the lane has run by then, in one write that
    /// also claims the lane's next jobs — several small ones at a time where
    /// the store batches them.
    fn run_lane(self: &Arc<Self>, local: Arc<LocalJob>, permit: OwnedSemaphorePermit) {
        let mut work = VecDeque::from([local]);
        let mut ran: Vec<(Arc<LocalJob>, RanChunk)> = Vec::new();
        loop {
            let Some(local) = work.pop_front() else {
                if !ran.is_empty() {
                    work.extend(self.store_ran(std::mem::take(&mut ran)));
                    if work.is_empty() {
                        break; // the claim found no work
                    }
                    continue;
                }
                match self.claim_for_lane() {
                    Some(next) => work.push_back(next),
                    None => break,
                }
                continue;
            };
            let outcome = job_span(&local.job).in_scope(|| LaneRun { s: self, local: &local }.run());
            match outcome {
                Ran::Deferred(chunk) => ran.push((local, chunk)),
                Ran::Claimed(claim) => {
                    self.lane_gone(&local);
                    match claim {
                        Some(claim) => work.push_back(self.join(claim)),
                        None if work.is_empty() && ran.is_empty() => break, // no work waits
                        None => {}
                    }
                }
                Ran::Stopped => self.lane_gone(&local),
            }
        }
        drop(permit);
        self.metrics.cores_in_use.dec();
        self.wake();
    }

    /// Stores the chunks a lane ran (each its job's only one) in one write,
    /// which also claims the lane's next jobs unless the node is draining;
    /// returns them, joined.
    fn store_ran(self: &Arc<Self>, ran: Vec<(Arc<LocalJob>, RanChunk)>) -> Vec<Arc<LocalJob>> {
        let (jobs, chunks): (Vec<_>, Vec<_>) = ran.into_iter().unzip();
        self.metrics.lane_batch_jobs.observe(jobs.len() as f64);
        let next = (!self.draining.load(Ordering::SeqCst)).then(|| self.next_claim());
        let live = || jobs.iter().any(|local| !local.control.stopped());
        let stored = self
            .db_while(live, "complete chunks", || self.store.complete_chunks(&chunks, now_micros(), next, LANE_BATCH));
        match stored {
            Ok(Completions { done, next }) => {
                for (local, done) in jobs.iter().zip(done) {
                    if let Some(done) = done {
                        job_span(&local.job).in_scope(|| self.completed(&local.job, &done));
                    }
                    self.lane_gone(local);
                }
                next.into_iter().map(|claim| self.join(claim)).collect()
            }
            Err(e) => {
                for local in &jobs {
                    job_span(&local.job).in_scope(|| LaneRun { s: self, local }.fail(&ExecError::Store(e.to_string())));
                    self.lane_gone(local);
                }
                Vec::new()
            }
        }
    }

    /// Reports a stored completion: the job's event, and its end if it ended.
    fn completed(&self, job: &ClaimedJob, done: &Completion) {
        let status = match done.finished_wall_ms {
            Some(wall_ms) => {
                self.count_finished(job, JobStatus::Succeeded, wall_ms);
                info!(job = %job.id, wall_ms, "job succeeded");
                JobStatus::Succeeded
            }
            None => JobStatus::Running,
        };
        self.events.publish(JobEvent { id: job.id, status });
    }

    /// One chunk of whichever job is next, for a lane that finished its job:
    /// a core handed from job to job this way costs no thread and no trip
    /// through the claim loop. `None` when there is no work, the node is
    /// draining, or the claim failed (the claim loop retries).
    fn claim_for_lane(self: &Arc<Self>) -> Option<Arc<LocalJob>> {
        if self.draining.load(Ordering::SeqCst) {
            return None;
        }
        let claims = match self.runtime.block_on(self.store.claim(&self.config.node, 1, self.lease_until())) {
            Ok(claims) => claims,
            Err(e) => {
                warn!(error = %e, "a lane could not claim work; leaving it to the claim loop");
                return None;
            }
        };
        let mut claims = claims.into_iter();
        let claim = claims.next()?;
        for extra in claims {
            // One lane asked for one chunk; should more come, they get lanes of their own.
            self.start_lanes(extra);
        }
        Some(self.join(claim))
    }
}

/// A lane's whole run, handed to a lane thread.
type LaneTask = Box<dyn FnOnce() + Send>;

/// The OS threads lanes run on. A thread whose lane ended waits `keep`
/// ([`LANE_THREAD_IDLE`]) for the next lane before it exits, so a node that
/// keeps getting work starts no thread per job.
struct LaneThreads {
    keep: Duration,
    /// Idle threads, each with its own task channel and an id.
    idle: Mutex<Vec<(u64, mpsc::Sender<LaneTask>)>>,
    next_id: AtomicU64,
}

impl LaneThreads {
    fn new(keep: Duration) -> Self {
        LaneThreads { keep, idle: Mutex::new(Vec::new()), next_id: Default::default() }
    }

    /// Runs `task` on an idle thread, or on a new one.
    fn run(self: &Arc<Self>, mut task: LaneTask) -> std::io::Result<()> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some((_, thread)) = idle else { break };
            match thread.send(task) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(back)) => task = back, // it exited: try the next
            }
        }
        let (tasks, inbox) = mpsc::channel::<LaneTask>();
        let (this, id) = (self.clone(), self.next_id.fetch_add(1, Ordering::Relaxed));
        std::thread::Builder::new().name("squared-lane".into()).spawn(move || {
            let mut next = Some(task);
            while let Some(task) = next.take() {
                task();
                this.idle.lock().unwrap_or_else(|p| p.into_inner()).push((id, tasks.clone()));
                next = match inbox.recv_timeout(this.keep) {
                    Ok(task) => Some(task),
                    Err(_) => {
                        let mut idle = this.idle.lock().unwrap_or_else(|p| p.into_inner());
                        match idle.iter().position(|(i, _)| *i == id) {
                            Some(at) => {
                                idle.swap_remove(at); // nobody took it: exit
                                None
                            }
                            // Taken in the meantime: its task is on the way.
                            None => {
                                drop(idle);
                                inbox.recv().ok()
                            }
                        }
                    }
                };
            }
        })?;
        Ok(())
    }
}

/// The span of a lane's work on a job: every log line names the job and the
/// request that created it.
fn job_span(job: &ClaimedJob) -> tracing::Span {
    let request_id = job.request_id.as_deref().unwrap_or("");
    tracing::info_span!("job", job = %job.id, request_id = %request_id)
}

/// A handle to a local job's control that keeps the job alive.
pub struct ControlHandle(Arc<LocalJob>);

impl std::ops::Deref for ControlHandle {
    type Target = JobControl;
    fn deref(&self) -> &JobControl {
        &self.0.control
    }
}

/// The problem a timed-out job carries.
fn timeout_problem(job: &ClaimedJob, wall_ms: f64) -> Problem {
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

/// One lane's run over one job's chunks.
struct LaneRun<'a> {
    s: &'a Scheduler,
    local: &'a Arc<LocalJob>,
}

impl LaneRun<'_> {
    fn job(&self) -> &ClaimedJob {
        &self.local.job
    }

    fn control(&self) -> &JobControl {
        &self.local.control
    }

    fn kind(&self) -> LaneKind {
        match self.job().strategy {
            Strategy::Processes => LaneKind::Process,
            _ => LaneKind::Thread,
        }
    }

    /// The next chunk: one already claimed for this job here, or a new claim.
    fn next_chunk(&self) -> Option<ChunkPlan> {
        if self.control().stopped() {
            return None;
        }
        if let Some(chunk) = self.local.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() {
            return Some(chunk);
        }
        let s = self.s;
        let id = self.job().id;
        match s.db(self.control(), "claim", || s.store.claim_next(id, &s.config.node, s.lease_until())) {
            Ok(chunk) => chunk,
            Err(e) => {
                warn!(job = %self.job().id, error = %e, "could not claim the next chunk; leaving it to the claim loop");
                None
            }
        }
    }

    /// A worker for this lane: a warm one from the pool, or a new one. The
    /// second value is how long starting it took (zero for a warm one).
    fn start_worker(&self, index: usize) -> Result<(Box<dyn Lane>, Duration), ExecError> {
        let kind = self.kind();
        if kind == LaneKind::Process {
            while let Some((_, served, mut warm)) = self.s.pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                let safe = warm.pid().is_none_or(|pid| served.hand_over(pid));
                if safe && warm.is_reusable() {
                    if let Some(pid) = warm.pid() {
                        self.control().register(pid);
                    }
                    return Ok((warm, Duration::ZERO));
                }
            }
        }
        let lane = exec::start_lane(kind, index, &self.s.config.worker)?;
        if let Some(pid) = lane.pid() {
            self.s.metrics.workers_spawned.inc();
            self.control().register(pid);
        }
        let spawn = lane.spawn_time();
        Ok((lane, spawn))
    }

    /// Done with a worker: a healthy process goes back to the pool (while
    /// it has room), still registered with this job, whose abort (a cancel
    /// that lands just after the lane let go) kills it like the others;
    /// anything else is stopped and reaped.
    fn retire(&self, mut lane: Box<dyn Lane>) {
        if let Some(pid) = lane.pid() {
            if !self.control().stopped() && lane.is_reusable() {
                let mut pool = self.s.pool.lock().unwrap_or_else(|p| p.into_inner());
                if pool.len() < self.s.config.cores as usize {
                    pool.push((Instant::now(), Arc::clone(&self.local.control), lane));
                    return;
                }
            }
            self.control().unregister(pid);
        }
        drop(lane); // reaps a worker process
    }

    /// Ends the job as failed with `e` (the first ending wins) and stops its lanes here.
    fn fail(&self, e: &ExecError) {
        let s = self.s;
        let job = self.job();
        let problem = problem_for(e);
        match s.db(self.control(), "fail job", || s.store.fail_job(job.id, &problem, now_micros())) {
            Ok(true) => {
                let wall_ms = (now_micros() - job.started_at) as f64 / 1000.0;
                s.count_finished(job, JobStatus::Failed, wall_ms);
                info!(job = %job.id, error = %e, "job failed");
                s.events.publish(JobEvent { id: job.id, status: JobStatus::Failed });
            }
            Ok(false) => {}
            Err(store) => error!(job = %job.id, error = %store, failure = %e, "could not record a job's failure"),
        }
        self.control().halt();
    }

    /// After a worker crash: whether an attempt remains. If so the crash is
    /// recorded as a failed attempt and the caller retries after the returned delay.
    fn retry_after(&self, e: &ExecError) -> Option<Duration> {
        let _one_at_a_time = self.local.retry.lock().unwrap_or_else(|p| p.into_inner());
        if self.control().stopped() {
            return None;
        }
        let s = self.s;
        let (id, problem) = (self.job().id, problem_for(e));
        let attempts = s
            .db(self.control(), "record attempt", || s.store.record_attempt_error(id, &problem, now_micros()))
            .ok()??;
        warn!(job = %self.job().id, attempt = attempts, error = %e, "worker crashed; retrying its chunk");
        let exp = attempts.saturating_sub(2).min(16);
        Some((RETRY_BASE * 2u32.pow(exp)).min(RETRY_MAX))
    }

    /// Sleeps for a retry delay, waking early if the job stops.
    fn backoff(&self, delay: Duration) {
        let until = Instant::now() + delay;
        while Instant::now() < until && !self.control().stopped() {
            std::thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
        }
    }

    /// Runs the job's chunks here until none are left, or hands back the
    /// job's only chunk, run, for the lane to store with others.
    fn run(&self) -> Ran {
        let s = self.s;
        let job = self.job();
        let index = self.local.next_lane.fetch_add(1, Ordering::SeqCst);
        let Some(mut chunk) = self.next_chunk() else { return Ran::Stopped };
        let (mut worker, mut spawn) = match self.start_worker(index) {
            Ok(started) => started,
            Err(e) => {
                self.fail(&e);
                return Ran::Stopped;
            }
        };
        let cached = self.local.input.clone().map(|numbers| (0, numbers));
        let mut inputs = StoreInputs { s, control: self.control(), job: job.id, cached };
        // A big job on SQLite: the lane writes its squares into the job's file itself.
        let mut file = match s.store.result_file(job.id, job.count) {
            Ok(file) => file,
            Err(e) => {
                self.retire(worker);
                self.fail(&ExecError::Store(e.to_string()));
                return Ran::Stopped;
            }
        };
        let strategy = Metrics::strategy(job.strategy.as_str());
        let mut claimed = None;
        loop {
            let chunk_start = now_micros();
            let started = Instant::now();
            let mut sink = StoreSink {
                s,
                control: self.control(),
                job: job.id,
                chunk: chunk.index,
                file: file.as_mut(),
                spent: Duration::ZERO,
                held: None,
            };
            let work = ChunkWork {
                offset: chunk.offset,
                len: chunk.len,
                range: job.range,
                simulate: job.simulate,
                transport: job.transport.unwrap_or(Transport::SharedMemory),
            };
            let outcome = match worker.run_chunk(&work, &mut inputs, &mut sink, &self.control().stop) {
                Ok(outcome) => match sink.sync() {
                    Ok(()) => outcome,
                    Err(e) => {
                        self.fail(&e);
                        break;
                    }
                },
                Err(_) if self.control().reason().is_some() => break,
                Err(ExecError::Canceled) => break, // the job ended or the chunk is no longer ours
                Err(e @ ExecError::WorkerCrashed(_)) => {
                    s.metrics.worker_crashes.inc();
                    let Some(delay) = self.retry_after(&e) else {
                        self.fail(&e);
                        break;
                    };
                    self.retire(worker);
                    self.backoff(delay);
                    let (fresh, took) = match self.start_worker(index) {
                        Ok(started) => started,
                        Err(e) => {
                            self.fail(&e);
                            return Ran::Stopped;
                        }
                    };
                    worker = fresh;
                    spawn += took;
                    continue; // the same chunk, still ours
                }
                Err(e) => {
                    self.fail(&e);
                    break;
                }
            };
            let duration = started.elapsed();
            s.metrics.chunk_seconds.get_or_create(&strategy).observe(duration.as_secs_f64());
            let record = ChunkRecord {
                worker: worker.worker(),
                node: s.config.node.clone(),
                start_ms: (chunk_start - job.started_at) as f64 / 1000.0,
                duration_ms: duration.as_secs_f64() * 1000.0,
                spawn_ms: std::mem::take(&mut spawn).as_secs_f64() * 1000.0,
                compute_ms: outcome.compute.as_secs_f64() * 1000.0,
                store_ms: sink.spent.as_secs_f64() * 1000.0,
            };
            if chunk.offset == 0 && chunk.len == job.count {
                // The job's only chunk: stored with the lane's other jobs (`Scheduler::store_ran`).
                let squares = sink.held.take();
                self.retire(worker);
                return Ran::Deferred(RanChunk { id: job.id, chunk, record, squares });
            }
            let last = sink.held.as_ref().map(|(pos, squares)| (*pos, squares.as_slice()));
            // Once the job is done, its lane goes on to the next job: claim it in the same round trip.
            let next = (!s.draining.load(Ordering::SeqCst)).then(|| s.next_claim());
            let completed = s.db(self.control(), "complete chunk", || {
                s.store.complete_chunk(job.id, &chunk, &record, last, now_micros(), next)
            });
            let mut finished = false;
            match completed {
                Ok(Some(done)) => {
                    finished = done.finished_wall_ms.is_some();
                    s.completed(job, &done);
                    if finished && next.is_some() {
                        claimed = Some(done.next);
                    }
                }
                Ok(None) => {} // the chunk was taken from us (the job ended, or our lease lapsed)
                Err(e) => {
                    self.fail(&ExecError::Store(e.to_string()));
                    break;
                }
            }
            // A finished job has nothing left to claim: skip the round trip.
            match if finished { None } else { self.next_chunk() } {
                Some(next) => chunk = next,
                None => break,
            }
        }
        self.retire(worker);
        match claimed {
            Some(claim) => Ran::Claimed(claim),
            None => Ran::Stopped,
        }
    }
}

/// How a lane's run over a job ended.
enum Ran {
    /// No claim came with it: the job stopped, failed, or has no chunk left for this lane.
    Stopped,
    /// The job's last chunk was stored with a claim of the next job (`None`: no work waits).
    Claimed(Option<Claim>),
    /// The job's only chunk ran and waits to be stored (`Scheduler::store_ran`).
    Deferred(RanChunk),
}

/// Stores each segment as a lane produces it, timing the writes. Into the
/// job's result file when it has one (made durable by [`StoreSink::sync`]
/// before the chunk is completed); otherwise the newest segment is held
/// back: if it is the chunk's last, it is stored in the same transaction that
/// marks the chunk done (a one-segment chunk — every tiny job — costs one
/// write transaction instead of two).
struct StoreSink<'a> {
    s: &'a Scheduler,
    control: &'a JobControl,
    job: Uuid,
    chunk: u32,
    file: Option<&'a mut ResultFile>,
    spent: Duration,
    held: Option<(u64, Vec<i64>)>,
}

impl StoreSink<'_> {
    /// Makes the squares written to the result file durable.
    fn sync(&mut self) -> Result<(), ExecError> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let t = Instant::now();
        let synced = file.sync();
        self.spent += t.elapsed();
        synced.map_err(|e| ExecError::Store(format!("result file: {e}")))
    }

    fn write(&mut self, offset: u64, squares: &[i64]) -> Result<(), ExecError> {
        let t = Instant::now();
        let s = self.s;
        let (job, chunk, node) = (self.job, self.chunk, &s.config.node);
        let result = s.db(self.control, "store segment", || s.store.put_segment(job, chunk, node, offset, squares));
        self.spent += t.elapsed();
        match result {
            Ok(true) => Ok(()),
            // The chunk is no longer ours (the job ended, or the lease lapsed): stop quietly.
            Ok(false) => Err(ExecError::Canceled),
            Err(e) => Err(ExecError::Store(e.to_string())),
        }
    }
}

impl Sink for StoreSink<'_> {
    fn segment(&mut self, offset: u64, squares: &[i64]) -> Result<(), ExecError> {
        if let Some(file) = &self.file {
            let t = Instant::now();
            let written = file.write(offset, squares);
            self.spent += t.elapsed();
            return written.map_err(|e| ExecError::Store(format!("result file: {e}")));
        }
        let mut buf = match self.held.take() {
            Some((pos, held)) => {
                self.write(pos, &held)?;
                held
            }
            None => Vec::with_capacity(squares.len()),
        };
        buf.clear();
        buf.extend_from_slice(squares);
        self.held = Some((offset, buf));
        Ok(())
    }
}

/// Reads a list job's numbers, one stored input segment at a time.
struct StoreInputs<'a> {
    s: &'a Scheduler,
    control: &'a JobControl,
    job: Uuid,
    cached: Option<(u64, Vec<i64>)>,
}

impl Inputs for StoreInputs<'_> {
    fn numbers(&mut self, offset: u64, len: usize) -> Result<&[i64], ExecError> {
        let segment = offset / SEGMENT_LEN * SEGMENT_LEN;
        if self.cached.as_ref().map(|(pos, _)| *pos) != Some(segment) {
            let (s, job) = (self.s, self.job);
            let numbers = s
                .db(self.control, "read input", || s.store.input_segment(job, segment))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `task` on `threads` and waits for it; returns the thread it ran on.
    fn run_on(threads: &Arc<LaneThreads>, task: impl FnOnce() + Send + 'static) -> std::thread::ThreadId {
        let (done, finished) = std::sync::mpsc::channel();
        threads
            .run(Box::new(move || {
                task();
                done.send(std::thread::current().id()).unwrap();
            }))
            .unwrap();
        finished.recv_timeout(Duration::from_secs(10)).expect("the task ran")
    }

    #[test]
    fn lane_threads_are_reused_while_work_keeps_coming_and_exit_when_idle() {
        let threads = Arc::new(LaneThreads::new(Duration::from_millis(200)));
        let first = run_on(&threads, || {});
        // The thread lists itself as idle just after the task.
        let listed = Instant::now() + Duration::from_secs(5);
        while threads.idle.lock().unwrap().is_empty() && Instant::now() < listed {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(run_on(&threads, || {}), first, "an idle thread takes the next lane");

        // Two lanes at once need two threads.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel();
        threads
            .run(Box::new(move || {
                started.send(std::thread::current().id()).unwrap();
                wait.recv().unwrap();
            }))
            .unwrap();
        let busy = running.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(run_on(&threads, || {}), busy, "a busy thread is not handed a second lane");
        release.send(()).unwrap();

        // Past `keep`, idle threads exit; a new lane still runs.
        let gone = Instant::now() + Duration::from_secs(10);
        while !threads.idle.lock().unwrap().is_empty() && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(threads.idle.lock().unwrap().is_empty(), "idle threads exit after keep");
        run_on(&threads, || {});
    }
}
