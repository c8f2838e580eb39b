//! `squared serve`: opens the store, recovers interrupted jobs, starts the
//! scheduler and the HTTP server, and supervises both until a signal.

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
        SchedulerConfig { node: node.clone(), cores, worker },
    );
    let state = AppState {
        store,
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
    };

    let (stop, stopped) = watch::channel(false);
    let scheduler_task = tokio::spawn(scheduler.run(stopped));
    info!(%addr, %node, cores, database = %args.database, "squared is serving");
    // The one line on stdout: scripts (and the tests) read the address from it.
    println!("squared listening on http://{addr}");

    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    info!("shutting down");
    let _ = stop.send(true);
    let _ = scheduler_task.await;
    Ok(())
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
