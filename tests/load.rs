//! Load test: 20,000 tiny jobs from 64 concurrent clients through the real
//! API, while one job is canceled and the server is sent SIGTERM and
//! restarted once. Every accepted job must end `succeeded` (or `canceled`,
//! for the one canceled) with exact results, and no request may get a 5xx.
//!
//! Clients submit with an `Idempotency-Key`, so a submission cut off by the
//! restart is retried safely. Throughput is printed, not asserted: numbers
//! belong in BENCHMARKS.md. `SQUARED_LOAD_JOBS` overrides the job count.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use helpers::{Backend, TestServer};
use serde_json::{json, Value};

const CLIENTS: usize = 64;
/// The whole test must finish within this.
const TIME_LIMIT: Duration = Duration::from_secs(600);

struct Shared {
    base: RwLock<String>,
    next: AtomicUsize,
    server_errors: AtomicU64,
    retries: AtomicU64,
    restarting: AtomicBool,
}

fn numbers_of(i: usize) -> Vec<i64> {
    let i = i as i64;
    vec![i, -i - 1, (i * 7919) % 3_037_000_499]
}

fn strategy_of(i: usize) -> &'static str {
    match i % 20 {
        0 => "processes",
        1..=9 => "threads",
        _ => "sequential",
    }
}

/// POSTs job `i` until the server answers (the restart refuses connections for a moment).
async fn submit(client: &reqwest::Client, shared: &Shared, i: usize) -> Option<String> {
    let body = json!({"numbers": numbers_of(i), "strategy": strategy_of(i), "cores": 1});
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let base = shared.base.read().unwrap().clone();
        let sent = client
            .post(format!("{base}/v1/jobs"))
            .header("idempotency-key", format!("load-{i}"))
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_server_error() => {
                shared.server_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("job {i}: {} {}", response.status(), response.text().await.unwrap_or_default());
                return None;
            }
            Ok(response) if response.status() == 429 => {}
            Ok(response) => {
                let status = response.status();
                let doc: Value = response.json().await.unwrap();
                assert!(status == 202 || status == 200, "job {i}: {status} {doc}");
                return Some(doc["id"].as_str().unwrap().to_string());
            }
            Err(_) => {}
        }
        shared.retries.fetch_add(1, Ordering::Relaxed);
        assert!(Instant::now() < deadline, "job {i} could not be submitted for 2 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GETs `path` until the server answers; counts 5xx.
async fn get(client: &reqwest::Client, shared: &Shared, path: &str) -> (u16, Value) {
    loop {
        let base = shared.base.read().unwrap().clone();
        match client.get(format!("{base}{path}")).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                if status >= 500 {
                    shared.server_errors.fetch_add(1, Ordering::Relaxed);
                }
                return (status, response.json().await.unwrap_or(Value::Null));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_tiny_jobs_survive_a_cancel_and_a_restart() {
    let total: usize = std::env::var("SQUARED_LOAD_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let test_started = Instant::now();
    let mut server = TestServer::start_with(Backend::Sqlite, &["--shutdown-grace", "2s"]).await;
    let shared = Arc::new(Shared {
        base: RwLock::new(server.base.clone()),
        next: AtomicUsize::new(0),
        server_errors: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        restarting: AtomicBool::new(false),
    });
    let client = reqwest::Client::builder().pool_max_idle_per_host(CLIENTS).build().unwrap();

    let submit_started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (client, shared) = (client.clone(), shared.clone());
        clients.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            loop {
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return accepted;
                }
                if let Some(id) = submit(&client, &shared, i).await {
                    accepted.push((i, id));
                }
            }
        }));
    }

    // One job is canceled while it runs.
    while shared.next.load(Ordering::Relaxed) < total / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let long = json!({"numbers": [1, 2, 3, 4], "cores": 1, "simulate": {"sleep_ms": 1000}});
    let base = shared.base.read().unwrap().clone();
    let response = client.post(format!("{base}/v1/jobs")).json(&long).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let canceled: Value = response.json().await.unwrap();
    let canceled = canceled["id"].as_str().unwrap().to_string();
    let response = client.post(format!("{base}/v1/jobs/{canceled}/cancel")).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // The server is sent SIGTERM mid-stream and started again.
    while shared.next.load(Ordering::Relaxed) < total / 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.restarting.store(true, Ordering::Relaxed);
    server.terminate();
    server.restart();
    *shared.base.write().unwrap() = server.base.clone();

    let mut accepted = Vec::new();
    for c in clients {
        accepted.extend(c.await.unwrap());
    }
    let submit_secs = submit_started.elapsed().as_secs_f64();
    assert_eq!(accepted.len(), total, "every job was accepted exactly once");

    // Every accepted job ends with exact squares.
    let check_started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(accepted);
    let mut checkers = Vec::new();
    for _ in 0..CLIENTS {
        let (client, shared, next, accepted) = (client.clone(), shared.clone(), next.clone(), accepted.clone());
        checkers.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some((i, id)) = accepted.get(k) else { return };
                let doc = loop {
                    let (status, doc) = get(&client, &shared, &format!("/v1/jobs/{id}?wait=30")).await;
                    assert_eq!(status, 200, "job {i}: {doc}");
                    if doc["status"] != "queued" && doc["status"] != "running" {
                        break doc;
                    }
                };
                assert_eq!(doc["status"], "succeeded", "job {i}: {doc}");
                let (status, result) = get(&client, &shared, &format!("/v1/jobs/{id}/result")).await;
                assert_eq!(status, 200);
                let want: Vec<i64> = numbers_of(*i).iter().map(|n| n * n).collect();
                assert_eq!(result["squares"], json!(want), "job {i}");
            }
        }));
    }
    for c in checkers {
        c.await.unwrap();
    }
    let (_, doc) = get(&client, &shared, &format!("/v1/jobs/{canceled}")).await;
    assert_eq!(doc["status"], "canceled", "{doc}");

    let server_errors = shared.server_errors.load(Ordering::Relaxed);
    assert_eq!(server_errors, 0, "requests answered with 5xx");
    let elapsed = test_started.elapsed();
    println!(
        "load: {total} jobs from {CLIENTS} clients accepted in {submit_secs:.1} s ({:.0} jobs/s, including a SIGTERM \
         and restart); {} submissions retried during the restart; all checked in {:.1} s; 0 server errors",
        total as f64 / submit_secs,
        shared.retries.load(Ordering::Relaxed),
        check_started.elapsed().as_secs_f64(),
    );
    assert!(elapsed < TIME_LIMIT, "the load test took {elapsed:?}");
    assert!(shared.restarting.load(Ordering::Relaxed));
}
