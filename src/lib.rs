//! squared — a job-execution service that squares numbers and measures how.
//!
//! It grew out of the classic question "multiprocessing or multithreading?":
//! clients submit a job (a list or a range of numbers, a core count and a
//! strategy), squared splits it into chunks the way the seed note does, runs the
//! chunks on one thread (`sequential`), on a pool of OS threads (`threads`) or on
//! worker subprocesses (`processes`, results back through shared memory or a
//! pipe), stores the squares durably and reports where the time went.
//!
//! # Layout
//!
//! Data flows one way: HTTP → domain (parse) → store → scheduler → exec → store → HTTP.
//!
//! - [`config`]: the command line; every server option is also an environment variable.
//! - [`cli`]: the client verbs (`submit`, `status`, `wait`, `result`, `cancel`, `list`, `compare`).
//! - [`telemetry`]: tracing subscriber set-up (text or JSON logs).
//! - [`domain`]: the parsed job request ([`domain::JobSpec`]), the chunk split,
//!   job statuses and the job document clients see.
//! - [`store`]: durable state: jobs, their inputs, chunks, result segments,
//!   webhooks and comparisons; one text of SQL for SQLite and PostgreSQL
//!   (SQLite's writes group-committed on one writer thread, big jobs' squares
//!   in a file per job beside the database); the only module that writes SQL.
//! - [`scheduler`]: claims chunks within the node's core budget (leases,
//!   heartbeats, rescue of a dead node's chunks), runs them on lanes, keeps a
//!   warm pool of worker processes, and aborts jobs on cancel, timeout or shutdown.
//! - [`exec`]: the three strategies behind one lane abstraction, the squaring
//!   kernel, the worker wire protocol and shared memory.
//! - [`worker`]: the hidden `squared worker` subprocess entry.
//! - [`events`]: in-process notifications of job changes (per-job watches for
//!   long-polls and event streams, a broadcast for whole-node listeners).
//! - [`webhooks`]: signed, retried, SSRF-guarded delivery of final job documents.
//! - [`metrics`]: Prometheus metrics registry.
//! - [`api`]: the axum router, one module per resource (jobs, results, events,
//!   comparisons, health), API keys, errors as RFC 9457 problem documents, and
//!   the generated OpenAPI document.
//! - [`server`]: wires store, scheduler and HTTP together for `squared serve`.

pub mod api;
pub mod cli;
pub mod config;
pub mod domain;
pub mod events;
pub mod exec;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod webhooks;
pub mod worker;
