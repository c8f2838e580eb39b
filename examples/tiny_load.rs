//! The tiny-jobs load client of `bench/run.py`: many 10-number jobs from many
//! concurrent keep-alive HTTP/1.1 connections, in one process on one tokio
//! thread, so that the client costs little of the cores it shares with the
//! server under test.
//!
//! ```sh
//! cargo build --release --example tiny_load
//! target/release/examples/tiny_load --url http://127.0.0.1:PORT --jobs 10000 --strategy threads --mode closed
//! ```
//!
//! It does what `_tiny_client` in `bench/run.py` does in Python: job *i*'s
//! body is `{"numbers": [10i .. 10i+10], "strategy": S, "cores": C}`; every
//! client opens its connection with `GET /healthz`, then all start at one
//! instant. Closed loop (`--mode closed`): each of the `--clients` submits its
//! share (jobs `c`, `c + clients`, …) as fast as it can, then long-polls each of
//! its jobs with `GET /v1/jobs/{id}?wait=60` until it ended. Open loop
//! (`--mode open`): job *i* is due at *start + i/rate*; each client takes the
//! next index, waits for that instant on a timerfd (to the microsecond), then
//! submits and long-polls the job, so a job whose instant passes while all the
//! clients are busy goes out late and its latency shows it.
//!
//! All `--clients` requests in flight at once need as many connections, and
//! the pool keeps that many idle (`pool_max_idle_per_host`), so after the
//! warm-up no connection is opened or closed: `bench/run.py` runs it with 64
//! clients on one thread.
//!
//! It prints one JSON object: `results` holds one
//! `[index, intended, sent, done, status, created_at, finished_at, id]` per job
//! that ended (times in seconds on `CLOCK_MONOTONIC`, the clock of Python's
//! `time.monotonic()`, so `tiny_run` compares them with its own), `start_at`,
//! `cpu` (this process's user + system CPU seconds from just before the start
//! instant to the end), `n_errors` and the first five `errors`. A failed submit
//! or poll is counted and the client goes on with its next job; nothing is
//! dropped silently.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use reqwest::header::CONTENT_TYPE;
use reqwest::{RequestBuilder, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

#[derive(Parser, Debug)]
#[command(about = "Tiny-jobs load client for bench/run.py")]
struct Args {
    /// Base URL of the server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// How many jobs to submit in all.
    #[arg(long)]
    jobs: usize,
    /// Concurrent clients, each with its own keep-alive connection.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// The jobs' `strategy`.
    #[arg(long, value_enum, default_value_t = Strategy::Threads)]
    strategy: Strategy,
    /// The jobs' `cores`.
    #[arg(long, default_value_t = 1)]
    cores: u32,
    /// Closed loop (as fast as the server answers) or open loop (at `--rate`).
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    mode: Mode,
    /// Jobs per second in the open loop.
    #[arg(long, required_if_eq("mode", "open"))]
    rate: Option<f64>,
    /// Tokio worker threads; 1 runs everything on the main thread.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds from launch to the common start instant (later if warming the connections takes longer).
    #[arg(long, default_value_t = 0.2)]
    start_delay: f64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Strategy {
    Threads,
    Processes,
}

impl Strategy {
    fn as_str(self) -> &'static str {
        match self {
            Strategy::Threads => "threads",
            Strategy::Processes => "processes",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Closed,
    Open,
}

/// The fields of a job document the benchmark reads.
#[derive(Deserialize)]
struct JobDoc {
    id: String,
    status: String,
    created_at: Option<String>,
    finished_at: Option<String>,
}

/// `[index, intended, sent, done, status, created_at, finished_at, id]`, the
/// tuple `_tiny_client` builds, serialized as a JSON array.
type Record = (usize, f64, f64, f64, String, Option<String>, Option<String>, String);

#[derive(Serialize)]
struct Output {
    results: Vec<Record>,
    start_at: f64,
    cpu: f64,
    errors: Vec<String>,
    n_errors: usize,
    clients: usize,
    threads: usize,
}

/// What one client task hands back.
#[derive(Default)]
struct Part {
    results: Vec<Record>,
    errors: Vec<String>,
}

/// Maps `Instant`s onto `CLOCK_MONOTONIC` seconds, the clock Python's
/// `time.monotonic()` reads on Linux (and `Instant` too).
#[derive(Clone, Copy)]
struct Clock {
    origin: Instant,
    origin_secs: f64,
}

impl Clock {
    fn new() -> Clock {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock { origin: Instant::now(), origin_secs: ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9 }
    }

    fn secs(&self, t: Instant) -> f64 {
        self.origin_secs + t.saturating_duration_since(self.origin).as_secs_f64()
    }

    fn now(&self) -> f64 {
        self.secs(Instant::now())
    }
}

/// User + system CPU seconds of this process, all threads.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Everything the client tasks share.
struct Ctx {
    http: reqwest::Client,
    submit_url: String,
    job_url: String,
    strategy: &'static str,
    cores: u32,
    clock: Clock,
}

impl Ctx {
    /// Job `i`'s body, byte for byte what Python's `json.dumps` makes of it.
    fn body(&self, i: usize) -> String {
        let numbers: Vec<String> = (i * 10..i * 10 + 10).map(|n| n.to_string()).collect();
        format!(r#"{{"numbers": [{}], "strategy": "{}", "cores": {}}}"#, numbers.join(", "), self.strategy, self.cores)
    }

    /// `POST /v1/jobs`; anything but 202 is an error.
    async fn submit(&self, i: usize) -> anyhow::Result<String> {
        let req = self.http.post(&self.submit_url).header(CONTENT_TYPE, "application/json").body(self.body(i));
        Ok(call(req, StatusCode::ACCEPTED, || format!("POST /v1/jobs (job {i})")).await?.id)
    }

    /// Long-polls `GET /v1/jobs/{id}?wait=60` until the job ended; anything but 200 is an error.
    async fn wait_done(&self, id: &str) -> anyhow::Result<JobDoc> {
        let url = format!("{}{id}?wait=60", self.job_url);
        loop {
            let doc = call(self.http.get(&url), StatusCode::OK, || format!("GET /v1/jobs/{id}")).await?;
            if matches!(doc.status.as_str(), "succeeded" | "failed" | "canceled") {
                return Ok(doc);
            }
        }
    }

    fn record(&self, i: usize, intended: f64, sent: f64, doc: JobDoc) -> Record {
        (i, intended, sent, self.clock.now(), doc.status, doc.created_at, doc.finished_at, doc.id)
    }
}

/// Sends `req` and reads the whole answer: a job document if the status is
/// `want`, else an error quoting the start of the body. `what` names the
/// request in errors (built only when there is one).
async fn call(req: RequestBuilder, want: StatusCode, what: impl Fn() -> String) -> anyhow::Result<JobDoc> {
    let resp = req.send().await.with_context(&what)?;
    let status = resp.status();
    let bytes = resp.bytes().await.with_context(|| format!("{}: reading the answer", what()))?;
    if status != want {
        bail!("{} answered {status}: {}", what(), String::from_utf8_lossy(&bytes[..bytes.len().min(300)]));
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{}: parsing the answer", what()))
}

/// Closed loop for client `c`: submit jobs `c, c + clients, …` back to back, then long-poll each.
async fn closed_client(ctx: Arc<Ctx>, c: usize, clients: usize, jobs: usize, start: Instant) -> Part {
    tokio::time::sleep_until(start.into()).await;
    let mut part = Part::default();
    let mut submitted = Vec::new();
    for i in (c..jobs).step_by(clients) {
        let sent = ctx.clock.now();
        match ctx.submit(i).await {
            Ok(id) => submitted.push((i, sent, id)),
            Err(e) => part.errors.push(format!("{e:#}")),
        }
    }
    for (i, sent, id) in submitted {
        match ctx.wait_done(&id).await {
            Ok(doc) => part.results.push(ctx.record(i, sent, sent, doc)),
            Err(e) => part.errors.push(format!("{e:#}")),
        }
    }
    part
}

/// Open loop, as many clients: take the next job index, wait for its instant
/// `start + index/rate`, submit it, long-poll it; until no index is left.
async fn open_client(ctx: Arc<Ctx>, next: Arc<AtomicUsize>, jobs: usize, start_secs: f64, rate: f64) -> Part {
    let mut part = Part::default();
    let timer = match PreciseTimer::new() {
        Ok(t) => t,
        Err(e) => {
            part.errors.push(format!("creating a timerfd: {e}"));
            return part;
        }
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= jobs {
            return part;
        }
        let intended = start_secs + i as f64 / rate;
        if let Err(e) = timer.sleep_until(&ctx.clock, intended).await {
            part.errors.push(format!("waiting for job {i}'s instant: {e}"));
        }
        let sent = ctx.clock.now();
        let done = async {
            let id = ctx.submit(i).await?;
            ctx.wait_done(&id).await
        };
        match done.await {
            Ok(doc) => part.results.push(ctx.record(i, intended, sent, doc)),
            Err(e) => part.errors.push(format!("{e:#}")),
        }
    }
}

/// A `CLOCK_MONOTONIC` timerfd that the runtime polls: it wakes the client
/// within microseconds of a deadline, where tokio's own timer rounds up to the
/// next millisecond, and without a pacing thread to switch to and from.
struct PreciseTimer {
    fd: AsyncFd<OwnedFd>,
}

impl PreciseTimer {
    fn new() -> io::Result<PreciseTimer> {
        // SAFETY: plain syscall; the result is checked below.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the `OwnedFd` moves into the `AsyncFd` and is closed only when it drops.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
        Ok(PreciseTimer { fd })
    }

    /// Returns at `deadline` (seconds on `CLOCK_MONOTONIC`), at once if it has passed.
    async fn sleep_until(&self, clock: &Clock, deadline: f64) -> io::Result<()> {
        if deadline <= clock.now() {
            return Ok(());
        }
        let when = libc::timespec {
            tv_sec: deadline.trunc() as libc::time_t,
            tv_nsec: (deadline.fract() * 1e9) as libc::c_long,
        };
        let spec = libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value: when };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) }
            < 0
        {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into an 8-byte buffer.
            let read =
                ready.try_io(|fd| match unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) } {
                    n if n < 0 => Err(io::Error::last_os_error()),
                    _ => Ok(()),
                });
            if let Ok(result) = read {
                // A timerfd read takes every expiration, so the fd is now
                // known not to be ready: wait for the next edge next time.
                ready.clear_ready();
                return result;
            }
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Output> {
    let launched = Instant::now();
    let clock = Clock::new();
    let base = args.url.trim_end_matches('/');
    let http = reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let ctx = Arc::new(Ctx {
        http,
        submit_url: format!("{base}/v1/jobs"),
        job_url: format!("{base}/v1/jobs/"),
        strategy: args.strategy.as_str(),
        cores: args.cores,
        clock,
    });

    // Open every connection before the start: all warm-ups are in flight at
    // once, so the pool cannot hand one connection to two of them.
    let healthz = format!("{base}/healthz");
    let warm: Vec<_> = (0..args.clients)
        .map(|_| {
            let (http, url) = (ctx.http.clone(), healthz.clone());
            tokio::spawn(async move { http.get(&url).send().await?.error_for_status()?.bytes().await })
        })
        .collect();
    for w in warm {
        w.await.context("warm-up task")?.context("warming a connection with GET /healthz")?;
    }
    let start = (launched + Duration::from_secs_f64(args.start_delay)).max(Instant::now() + Duration::from_millis(5));
    let start_secs = clock.secs(start);

    let cpu0 = cpu_seconds();
    let tasks: Vec<_> = match args.mode {
        Mode::Closed => (0..args.clients)
            .map(|c| tokio::spawn(closed_client(ctx.clone(), c, args.clients, args.jobs, start)))
            .collect(),
        Mode::Open => {
            let rate = args.rate.context("--rate is required with --mode open")?;
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be a positive number, not {rate}");
            }
            let next = Arc::new(AtomicUsize::new(0));
            (0..args.clients)
                .map(|_| tokio::spawn(open_client(ctx.clone(), next.clone(), args.jobs, start_secs, rate)))
                .collect()
        }
    };
    let mut out = Output {
        results: Vec::with_capacity(args.jobs),
        start_at: start_secs,
        cpu: 0.0,
        errors: Vec::new(),
        n_errors: 0,
        clients: args.clients,
        threads: args.threads,
    };
    for t in tasks {
        let part = t.await.context("a client task panicked")?;
        out.results.extend(part.results);
        out.n_errors += part.errors.len();
        out.errors.extend(part.errors.into_iter().take(5usize.saturating_sub(out.errors.len())));
    }
    out.cpu = cpu_seconds() - cpu0;
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.threads == 0 {
        bail!("--clients and --threads must be at least 1");
    }
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    }
    .context("starting the tokio runtime")?;
    let out = runtime.block_on(run(args))?;
    println!("{}", serde_json::to_string(&out).context("writing the results")?);
    Ok(())
}
