//! Several `squared serve` nodes on one PostgreSQL database: work spreads
//! across nodes, survives a node's SIGKILL, and survives PostgreSQL itself
//! restarting. These tests restart the machine's PostgreSQL server, so they
//! run one at a time (and in their own test binary, apart from the suite).

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use helpers::{TestDatabase, TestServer};
use serde_json::{json, Value};

/// The tests here restart the shared PostgreSQL server: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn tag(name: &str) -> String {
    format!("{name}_{}", std::process::id())
}

/// Starts the nodes at the same moment: migrations must be safe when they race.
async fn start_cluster(db: &TestDatabase, nodes: usize) -> Vec<TestServer> {
    let starts = (0..nodes).map(|_| {
        let url = db.url.clone();
        tokio::task::spawn_blocking(move || {
            tokio::runtime::Handle::current().block_on(TestServer::start_node(&url, &["--lease", "2s"]))
        })
    });
    futures_util::future::join_all(starts).await.into_iter().map(|node| node.unwrap()).collect()
}

/// A job of the mix: tiny lists, and every tenth one a job wider than a node.
fn job_body(i: usize) -> (Value, Vec<i64>) {
    if i % 10 == 0 {
        let numbers: Vec<i64> = (0..60).map(|n| n * 1000 + i as i64).collect();
        let strategy = if i % 20 == 0 { "processes" } else { "threads" };
        let body = json!({"numbers": numbers, "cores": 6, "strategy": strategy, "simulate": {"sleep_ms": 15}});
        (body, numbers)
    } else {
        let numbers = vec![i as i64, -(i as i64), 3_037_000_499];
        let strategy = ["sequential", "threads", "processes"][i % 3];
        (json!({"numbers": numbers, "strategy": strategy, "cores": 1}), numbers)
    }
}

/// Long-polls `id` on `node` until it ends.
async fn wait_end(node: &TestServer, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (status, doc) = node.get_json(&format!("/v1/jobs/{id}?wait=10")).await;
        if status == 200 && !["queued", "running"].contains(&doc["status"].as_str().unwrap_or("")) {
            return doc;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {status} {doc}");
        if status != 200 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_jobs_and_finish_every_one_exactly_after_a_node_is_killed() {
    let _serial = SERIAL.lock().await;
    let db = TestDatabase::create(&tag("cluster"));
    let mut cluster = start_cluster(&db, 3).await;

    // 200 jobs submitted round-robin; the victim gets its share too.
    let mut jobs = Vec::new();
    for i in 0..200 {
        let (body, numbers) = job_body(i);
        let id = cluster[i % 3].submit(&body).await;
        jobs.push((id, numbers));
    }
    // Kill node 1 while the wide jobs are still running everywhere.
    let wide = &jobs[190].0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster[0].job(wide).await["status"] == "queued" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster[1].kill9();
    let survivors = [&cluster[0], &cluster[2]];

    let mut spread = 0;
    let mut rerun_chunks = 0;
    for (k, (id, numbers)) in jobs.iter().enumerate() {
        let node = survivors[k % 2];
        let doc = wait_end(node, id).await;
        assert_eq!(doc["status"], "succeeded", "job {k}: {doc}");
        assert_eq!(doc["attempts"], 1, "a node's death is not the job's failure: {doc}");
        let squares = survivors[(k + 1) % 2].squares(id).await;
        let want: Vec<i64> = numbers.iter().map(|n| n * n).collect();
        assert_eq!(squares, want, "job {k}");
        let chunks = doc["timing"]["chunks"].as_array().unwrap();
        let nodes: BTreeSet<&str> = chunks.iter().map(|c| c["node"].as_str().unwrap()).collect();
        spread += usize::from(nodes.len() > 1);
        for c in chunks {
            let runs = c["runs"].as_u64().unwrap();
            assert!(runs == 1 || runs == 2, "chunk ran {runs} times: {c}");
            rerun_chunks += usize::from(runs == 2);
        }
    }
    assert!(spread >= 1, "no job's chunks ran on more than one node");
    // Only chunks the killed node held when it died ran again: at most eight
    // per lane (a lane claims up to eight small jobs at once), on its 2 lanes.
    assert!(rerun_chunks <= 16, "{rerun_chunks} chunks ran twice");

    // Every node answers for every job: submit on one, long-poll on another.
    let id = cluster[2].submit(&json!({"numbers": [12], "simulate": {"sleep_ms": 300}})).await;
    let started = Instant::now();
    let (status, doc) = cluster[0].get_json(&format!("/v1/jobs/{id}?wait=20")).await;
    assert_eq!((status, doc["status"].as_str()), (200, Some("succeeded")), "{doc}");
    assert!(started.elapsed() < Duration::from_secs(5), "the other node was woken: {:?}", started.elapsed());
}

fn postgres_cluster() -> (String, String) {
    let out = Command::new("pg_lsclusters").arg("--no-header").output().expect("pg_lsclusters (PostgreSQL tools)");
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().next().expect("a PostgreSQL cluster on this machine");
    let mut fields = line.split_whitespace();
    (fields.next().unwrap().to_string(), fields.next().unwrap().to_string())
}

fn pg_ctl(action: &str) {
    let (version, cluster) = postgres_cluster();
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, &cluster, action])
        .status()
        .expect("pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster {action} failed");
}

/// Starts PostgreSQL again even if the test fails midway.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let (version, cluster) = postgres_cluster();
        let _ = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, &cluster, "start"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Submits a job, retrying while the database is down; the idempotency key
/// makes a retry of an accepted submission return the same job.
async fn submit_retrying(node: &TestServer, key: &str, body: &Value) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let sent = node.client.post(node.url("/v1/jobs")).header("idempotency-key", key).json(body).send().await;
        if let Ok(response) = sent {
            let status = response.status().as_u16();
            if status == 202 || status == 200 {
                let doc: Value = response.json().await.unwrap();
                return doc["id"].as_str().unwrap().to_string();
            }
            assert_eq!(status, 503, "only 'unavailable' is acceptable while the database is down");
        }
        assert!(Instant::now() < deadline, "could not submit {key}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_ride_out_a_postgresql_restart_without_losing_an_accepted_job() {
    let _serial = SERIAL.lock().await;
    let db = TestDatabase::create(&tag("pgrestart"));
    let mut cluster = start_cluster(&db, 2).await;
    let _guard = RestartGuard;

    let mut accepted = BTreeMap::new();
    for i in 0..40 {
        let body = json!({"numbers": [i, i + 1], "cores": 1, "chunk_size": 1, "simulate": {"sleep_ms": 50}});
        accepted.insert(i, submit_retrying(&cluster[i as usize % 2], &format!("pg-{i}"), &body).await);
    }

    // Stop the database under load: readiness fails, and comes back by itself.
    pg_ctl("stop");
    for node in &cluster {
        let mut unready = false;
        for _ in 0..100 {
            let (status, _) = node.get_json("/readyz").await;
            if status == 503 {
                unready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(unready, "/readyz should fail while PostgreSQL is down");
    }
    let (status, problem) = cluster[0].get_json(&format!("/v1/jobs/{}", accepted[&0])).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["type"], "/problems/unavailable");
    // Lanes meet the outage mid-job and must wait it out, not fail their jobs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg_ctl("start");

    for node in &mut cluster {
        let deadline = Instant::now() + Duration::from_secs(60);
        while node.get_json("/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "/readyz did not recover");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(node.is_running(), "the node recovered without a restart of its own");
    }
    for i in 40..60 {
        let body = json!({"numbers": [i, i + 1], "cores": 1});
        accepted.insert(i, submit_retrying(&cluster[i as usize % 2], &format!("pg-{i}"), &body).await);
    }
    for (i, id) in &accepted {
        let doc = wait_end(&cluster[*i as usize % 2], id).await;
        assert_eq!(doc["status"], "succeeded", "job {i}: {doc}");
        let squares = cluster[(*i as usize + 1) % 2].squares(id).await;
        assert_eq!(squares, [i * i, (i + 1) * (i + 1)], "job {i}");
    }
}
