//! `squared serve`: opens the store, recovers interrupted jobs, starts the
//! scheduler and the HTTP server, and supervises both until a signal.

use std::future::IntoFuture;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::api::{self, AppContext, AppState};
use crate::config::ServeArgs;
use crate::domain::JobStatus;
use crate::domain::Limits;
use crate::events::Events;
use crate::events::JobEvent;
use crate::exec::WorkerCommand;
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::store::{Dialect, PgStore, Store, JOBS_CHANNEL, WORK_CHANNEL};
use crate::webhooks::WebhookConfig;

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
    let store = Store::open(&args.database, args.db_pool_size())
        .await
        .with_context(|| format!("opening the database {}", args.database))?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let node = args.node_name.clone().unwrap_or_else(|| format!("{}:{}", hostname(), addr.port()));
    // Chunks this node (or, on SQLite, the only node) was running when it
    // stopped: released now, so their jobs run again at once.
    let owner = match store.dialect() {
        Dialect::Sqlite => None,
        Dialect::Postgres => Some(node.as_str()),
    };
    let released = store.release_chunks(owner).await.context("releasing chunks of an earlier run")?;
    if released > 0 {
        info!(chunks = released, "re-queued work that was running when the server stopped");
    }
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
        SchedulerConfig {
            node: node.clone(),
            cores,
            worker,
            max_job_duration: args.max_job_duration,
            lease: args.lease,
        },
    );
    let (stop, stopped) = watch::channel(false);
    let state = AppState::new(AppContext {
        store: store.clone(),
        scheduler: scheduler.clone(),
        events: events.clone(),
        metrics: metrics.clone(),
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
        webhooks: WebhookConfig {
            secret: args.webhook_secret.clone().filter(|s| !s.is_empty()),
            allowed_hosts: args.allow_callback_hosts.clone(),
            max_attempts: args.webhook_max_attempts,
        },
    });
    let webhook_config = state.webhooks.clone();

    let scheduler_task = tokio::spawn(scheduler.clone().run(stopped.clone()));
    // The heartbeat outlives the grace period: leases of chunks still running
    // during a shutdown must not lapse.
    let (halt, halted) = watch::channel(false);
    let heartbeat_task = tokio::spawn(scheduler.clone().heartbeat(halted));
    let pool_task = tokio::spawn(scheduler.clone().reap_idle_workers(stopped.clone()));
    let retention_task = tokio::spawn(retention(store.clone(), args.retention, stopped.clone()));
    // Without a secret no callback is accepted, so nothing is delivered and
    // no job's end needs to wake anyone.
    if webhook_config.secret.is_some() {
        let webhook_wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(crate::webhooks::run(
            store.clone(),
            webhook_config,
            metrics.clone(),
            webhook_wake.clone(),
            stopped.clone(),
        ));
        // A job that ends (here or, through NOTIFY, elsewhere) may have a webhook due.
        let mut ended = events.subscribe();
        tokio::spawn(async move {
            loop {
                match ended.recv().await {
                    Ok(event) if event.status.is_final() => webhook_wake.notify_one(),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    if let Store::Postgres(pg) = &store {
        tokio::spawn(listen(pg.clone(), scheduler.clone(), events.clone(), stopped.clone()));
    }
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
    let _ = halt.send(true);
    let _ = retention_task.await;
    let _ = heartbeat_task.await;
    let _ = pool_task.await;
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

/// Relays PostgreSQL notifications: new work wakes the scheduler; a job that
/// ended on another node wakes this node's long-polls and event streams.
/// Reconnects with backoff; the scheduler's poll covers what is missed meanwhile.
async fn listen(store: PgStore, scheduler: Arc<Scheduler>, events: Events, mut stop: watch::Receiver<bool>) {
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match store.listen().await {
            Ok(mut listener) => loop {
                backoff = std::time::Duration::from_millis(200);
                let received = tokio::select! {
                    received = listener.recv() => received,
                    _ = stop.wait_for(|s| *s) => return,
                };
                match received {
                    Ok(note) if note.channel() == WORK_CHANNEL => scheduler.wake(),
                    Ok(note) if note.channel() == JOBS_CHANNEL => {
                        let mut parts = note.payload().split(' ');
                        let id = parts.next().and_then(|id| uuid::Uuid::parse_str(id).ok());
                        let status = parts.next().and_then(JobStatus::parse);
                        if let (Some(id), Some(status)) = (id, status) {
                            events.publish(JobEvent { id, status });
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the notification connection; reconnecting");
                        break;
                    }
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot listen for notifications; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
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
