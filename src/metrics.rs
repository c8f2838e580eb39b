//! Prometheus metrics. Names are part of the API contract and stay stable.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StrategyLabel {
    pub strategy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub status: String,
    pub strategy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatusLabels {
    pub route: String,
    pub status: u16,
}

fn wall_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 20))
}

fn http_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric squared exports. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    pub jobs_submitted: Family<StrategyLabel, Counter>,
    pub jobs_finished: Family<FinishedLabels, Counter>,
    pub job_wall_seconds: Family<StrategyLabel, Histogram, fn() -> Histogram>,
    pub jobs_queued: Gauge,
    pub cores_in_use: Gauge,
    pub cores_budget: Gauge,
    pub workers_spawned: Counter,
    pub worker_crashes: Counter,
    pub chunk_seconds: Family<StrategyLabel, Histogram, fn() -> Histogram>,
    pub lane_batch_jobs: Histogram,
    pub webhook_deliveries: Family<OutcomeLabel, Counter>,
    pub http_requests: Family<RouteStatusLabels, Counter>,
    pub http_seconds: Family<RouteLabel, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            jobs_submitted: Family::default(),
            jobs_finished: Family::default(),
            job_wall_seconds: Family::new_with_constructor(wall_buckets),
            jobs_queued: Gauge::default(),
            cores_in_use: Gauge::default(),
            cores_budget: Gauge::default(),
            workers_spawned: Counter::default(),
            worker_crashes: Counter::default(),
            chunk_seconds: Family::new_with_constructor(wall_buckets),
            lane_batch_jobs: Histogram::new(exponential_buckets(1.0, 2.0, 6)),
            webhook_deliveries: Family::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(http_buckets),
            registry: Registry::default(),
        };
        registry.register("squared_jobs_submitted", "Jobs accepted, by strategy", m.jobs_submitted.clone());
        registry.register("squared_jobs_finished", "Jobs ended, by status and strategy", m.jobs_finished.clone());
        registry.register("squared_job_wall_seconds", "Job wall time, by strategy", m.job_wall_seconds.clone());
        registry.register("squared_jobs_queued", "Jobs in the queued state (whole database)", m.jobs_queued.clone());
        registry.register(
            "squared_cores_in_use",
            "Cores of this node's budget held by running jobs",
            m.cores_in_use.clone(),
        );
        registry.register("squared_cores_budget", "This node's core budget", m.cores_budget.clone());
        registry.register("squared_worker_processes_spawned", "Worker subprocesses started", m.workers_spawned.clone());
        registry.register("squared_worker_crashes", "Worker subprocesses that died mid-work", m.worker_crashes.clone());
        registry.register("squared_chunk_seconds", "Chunk run time, by strategy", m.chunk_seconds.clone());
        registry.register(
            "squared_lane_batch_jobs",
            "One-chunk jobs a lane stored in one write (with the claim of its next jobs)",
            m.lane_batch_jobs.clone(),
        );
        registry.register(
            "squared_webhook_deliveries",
            "Webhook delivery attempts, by outcome (delivered, retry, failed)",
            m.webhook_deliveries.clone(),
        );
        registry.register("squared_http_requests", "HTTP requests, by route and status", m.http_requests.clone());
        registry.register("squared_http_request_seconds", "HTTP request latency, by route", m.http_seconds.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn strategy(strategy: &str) -> StrategyLabel {
        StrategyLabel { strategy: strategy.to_string() }
    }
}
