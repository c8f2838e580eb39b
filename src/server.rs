//! `squared serve`: opens the store, recovers interrupted jobs, starts the
//! scheduler and the HTTP server, and supervises both until a signal.

use std::future::IntoFuture;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::api::{self, AppState};
use crate::config::ServeArgs;
use crate::domain::Limits;
use crate::events::Events;
use crate::exec::WorkerCommand;
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::store::Store;

/// This machine's host name, for default node names.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Runs the service until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cores =
        args.max_cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)).max(1);
    let store =
        Store::open(&args.database, 8).await.with_context(|| format!("opening the database {}", args.database))?;
    let recovered = store.recover().await.context("recovering interrupted jobs")?;
    if recovered > 0 {
        info!(jobs = recovered, "re-queued jobs that were running when the server stopped");
    }
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let node = args.node_name.clone().unwrap_or_else(|| format!("{}:{}", hostname(), addr.port()));
    let worker = match &args.worker_exe {
        Some(exe) => WorkerCommand { exe: exe.clone() },
        None => WorkerCommand::current_exe().context("finding the squared executable for workers")?,
    };

    let events = Events::default();
    let metrics = Arc::new(Metrics::default());
    let scheduler = Scheduler::new(
        store.clone(),
        events.clone(),
        metrics.clone(),
        SchedulerConfig { node: node.clone(), cores, worker, max_job_duration: args.max_job_duration },
    );
    let (stop, stopped) = watch::channel(false);
    let state = AppState {
        store: store.clone(),
        scheduler: scheduler.clone(),
        events,
        metrics,
        limits: Limits {
            default_cores: cores,
            max_cores_per_job: args.max_cores_per_job,
            max_numbers: args.max_numbers,
            max_chunks: args.max_chunks,
            max_sleep_ms: args.max_sleep_ms,
            max_spin: args.max_spin,
        },
        max_body_bytes: args.max_body_bytes,
        max_queued: args.max_queued,
        idempotency_ttl: args.idempotency_ttl,
        api_keys: Arc::new(api::digest_keys(&args.api_keys)),
        shutdown: stopped.clone(),
    };

    let scheduler_task = tokio::spawn(scheduler.clone().run(stopped.clone()));
    let retention_task = tokio::spawn(retention(store, args.retention, stopped.clone()));
    info!(%addr, %node, cores, database = %args.database, "squared is serving");
    // The one line on stdout: scripts (and the tests) read the address from it.
    println!("squared listening on http://{addr}");

    // On a signal: stop admitting, let long-polls and event streams answer,
    // drain in-flight requests, give running jobs their grace, then stop and
    // re-queue what is left. Nothing accepted is lost.
    let http = tokio::spawn(
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                info!("shutting down: no new jobs start; draining requests");
                let _ = stop.send(true);
            })
            .into_future(),
    );
    let mut stopping = stopped.clone();
    let _ = stopping.wait_for(|s| *s).await;
    let _ = scheduler_task.await;
    scheduler.shutdown(args.shutdown_grace).await;
    let _ = retention_task.await;
    match tokio::time::timeout(std::time::Duration::from_secs(10), http).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e).context("serving HTTP"),
        Ok(Err(e)) => return Err(e).context("the HTTP task"),
        Err(_) => info!("some HTTP connections were still open after 10 s; closing them"),
    }
    info!("stopped");
    Ok(())
}

/// How often retention sweeps, and how many jobs one sweep deletes at most
/// (small batches keep the writer free for the API).
const RETENTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
const RETENTION_BATCH: u32 = 100;

/// Deletes finished jobs older than `keep`, and expired idempotency keys.
async fn retention(store: Store, keep: std::time::Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let now = crate::domain::now_micros();
        let cutoff = now.saturating_sub(keep.as_micros().min(i64::MAX as u128) as i64);
        loop {
            match store.purge_finished(cutoff, now, RETENTION_BATCH).await {
                Ok(n) if n == u64::from(RETENTION_BATCH) => tokio::task::yield_now().await,
                Ok(n) => {
                    if n > 0 {
                        info!(jobs = n, "retention deleted finished jobs");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention sweep failed; retrying later");
                    break;
                }
            }
            if *stop.borrow() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
