//! Durability and process hygiene: restarts, `kill -9`, crashed workers,
//! no orphans, no zombies; and the service endpoints.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

fn worker_processes(server: &TestServer) -> Vec<(u32, char, String)> {
    server.tagged_processes().into_iter().filter(|(_, _, cmd)| cmd.contains(" worker")).collect()
}

async fn a_restart_keeps_every_job_and_result(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let numbers: Vec<i64> = Rng::new(3).numbers(5000);
    let done = server.submit(&json!({"numbers": numbers, "strategy": "processes", "cores": 2})).await;
    assert_eq!(server.squares(&done).await, squares_of(&numbers));
    let before = server.job(&done).await;

    server.terminate();
    server.restart();

    assert_eq!(server.job(&done).await, before, "the job document survives a restart unchanged");
    assert_eq!(server.squares(&done).await, squares_of(&numbers));
}

async fn kill_9_during_a_processes_job_then_restart_completes_it_exactly_with_no_worker_left(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let numbers: Vec<i64> = Rng::new(11).numbers(40);
    // 40 one-number chunks sleeping 100 ms each on 2 workers: about 2 s of work.
    let body = json!({"numbers": numbers, "strategy": "processes", "cores": 2, "chunk_size": 1, "simulate": {"sleep_ms": 100}});
    let id = server.submit(&body).await;
    let mut progressed = false;
    for _ in 0..200 {
        let doc = server.job(&id).await;
        if doc["progress"]["chunks_done"].as_u64().unwrap() >= 4 {
            progressed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(progressed, "the job should be under way");
    assert_eq!(worker_processes(&server).len(), 2, "two worker processes run the job");

    server.kill9();
    assert!(
        eventually(5, || worker_processes(&server).is_empty()).await,
        "workers outlived the server: {:?}",
        worker_processes(&server)
    );

    server.restart();
    let doc = server.wait_end(&id, 60).await;
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(doc["attempts"], 1, "a node's death is not the job's failure");
    assert_eq!(server.squares(&id).await, squares_of(&numbers));
    let chunks = doc["timing"]["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 40);
    let mut workers: Vec<&str> = chunks.iter().map(|c| c["worker"].as_str().unwrap()).collect();
    workers.sort();
    workers.dedup();
    assert!(workers.len() >= 3, "chunks stored before the kill kept their first workers: {workers:?}");
    assert!(eventually(5, || worker_processes(&server).is_empty()).await, "workers are gone after the job");
}

async fn a_worker_killed_mid_job_fails_the_job_naming_the_signal_and_leaves_no_zombie(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body =
        json!({"range": {"start": 0, "end": 40}, "strategy": "processes", "cores": 2, "simulate": {"sleep_ms": 100}});
    let id = server.submit(&body).await;
    assert!(eventually(10, || worker_processes(&server).len() == 2).await, "workers should start");
    let (victim, _, _) = worker_processes(&server)[0].clone();
    kill(victim, libc::SIGKILL);
    let doc = server.wait_end(&id, 30).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert_eq!(doc["error"]["type"], "/problems/worker-crashed");
    let detail = doc["error"]["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("worker process {victim} was killed by signal 9 (SIGKILL)")), "{detail}");
    assert_eq!(server.get_json(&format!("/v1/jobs/{id}/result")).await.0, 409);
    assert!(
        eventually(5, || worker_processes(&server).is_empty()).await,
        "every worker is reaped: {:?}",
        worker_processes(&server)
    );
    let zombies: Vec<_> = server.tagged_processes().into_iter().filter(|(_, state, _)| *state == 'Z').collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");

    // The server keeps working.
    let ok = server.submit(&json!({"numbers": [5, -6], "strategy": "processes"})).await;
    assert_eq!(server.squares(&ok).await, [25, 36]);
}

async fn service_endpoints_answer(backend: Backend) {
    let server = TestServer::start(backend).await;
    assert_eq!(server.get_json("/healthz").await, (200, json!({"status": "ok"})));
    assert_eq!(server.get_json("/readyz").await, (200, json!({"status": "ok"})));
    let id = server.submit(&json!({"numbers": [1, 2, 3], "strategy": "processes"})).await;
    let processes_job = server.wait_end(&id, 30).await;
    // Its two chunks ran on one worker or two, as the lanes raced for them; the pool started empty.
    let workers: std::collections::BTreeSet<&str> =
        processes_job["timing"]["chunks"].as_array().unwrap().iter().map(|c| c["worker"].as_str().unwrap()).collect();
    let response =
        server.client.get(server.url("/healthz")).header("x-request-id", "trace-me-42").send().await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let response = server.client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.headers()["x-request-id"].len(), 36, "a request id is made up when none is given");

    // The request id reaches the logs of the request and of the job it created.
    let traced = server
        .client
        .post(server.url("/v1/jobs"))
        .header("x-request-id", "req-trace-77")
        .json(&json!({"numbers": [8], "strategy": "threads"}))
        .send()
        .await
        .unwrap();
    assert_eq!(traced.headers()["x-request-id"], "req-trace-77");
    let traced: serde_json::Value = traced.json().await.unwrap();
    server.wait_end(traced["id"].as_str().unwrap(), 30).await;
    // The lane logs its success after the commit a client may see first.
    eventually(10, || server.log().lines().any(|l| l.contains("req-trace-77") && l.contains("job succeeded"))).await;
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("req-trace-77")).collect();
    assert!(lines.iter().any(|l| l.contains("job accepted")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("job succeeded")), "{lines:?}");

    // Parsed with a Prometheus text-format parser, checked after known work.
    let text = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"));
        match &sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is {other:?}"),
        }
    };
    assert_eq!(value("squared_jobs_submitted_total", &[("strategy", "processes")]), 1.0);
    assert_eq!(value("squared_jobs_submitted_total", &[("strategy", "threads")]), 1.0);
    assert_eq!(value("squared_jobs_finished_total", &[("status", "succeeded"), ("strategy", "processes")]), 1.0);
    assert_eq!(value("squared_worker_processes_spawned_total", &[]), workers.len() as f64, "{workers:?}");
    assert_eq!(value("squared_worker_crashes_total", &[]), 0.0);
    assert_eq!(value("squared_cores_budget", &[]), 2.0);
    assert_eq!(value("squared_cores_in_use", &[]), 0.0);
    assert_eq!(value("squared_jobs_queued", &[]), 0.0);
    assert_eq!(value("squared_http_requests_total", &[("route", "/v1/jobs"), ("status", "202")]), 2.0);
    let wall = scrape
        .samples
        .iter()
        .find(|s| s.metric == "squared_job_wall_seconds" && s.labels.get("strategy") == Some("threads"));
    match wall.map(|s| &s.value) {
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            assert_eq!(buckets.last().unwrap().count, 1.0, "one threads job observed");
        }
        other => panic!("squared_job_wall_seconds is {other:?}"),
    }
    assert!(scrape.samples.iter().any(|s| s.metric == "squared_http_request_seconds"));

    let served = server.client.get(server.url("/openapi.yaml")).send().await.unwrap().text().await.unwrap();
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert_eq!(served, checked_in, "openapi.yaml is stale: run `cargo run -- openapi > openapi.yaml`");
}

#[test]
fn the_checked_in_openapi_yaml_matches_the_code() {
    let generated = std::process::Command::new(env!("CARGO_BIN_EXE_squared")).arg("openapi").output().unwrap();
    assert!(generated.status.success());
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    assert!(
        String::from_utf8(generated.stdout).unwrap() == checked_in,
        "openapi.yaml is stale: run `cargo run -- openapi > openapi.yaml`"
    );
    assert!(checked_in.starts_with("openapi: 3."), "an OpenAPI 3 document");
    for path in
        ["/v1/jobs:", "/v1/jobs/{id}:", "/v1/jobs/{id}/result:", "/healthz:", "/readyz:", "/metrics:", "/openapi.yaml:"]
    {
        assert!(checked_in.contains(&format!("  {path}\n")), "{path} is described");
    }
}

async fn warm_workers_serve_the_next_job_and_exit_when_idle(backend: Backend) {
    let server = TestServer::start(backend).await;
    let workers_of = |doc: &serde_json::Value| -> std::collections::BTreeSet<String> {
        doc["timing"]["chunks"].as_array().unwrap().iter().map(|c| c["worker"].as_str().unwrap().to_string()).collect()
    };
    let body =
        json!({"range": {"start": 0, "end": 8}, "cores": 2, "strategy": "processes", "simulate": {"sleep_ms": 30}});
    let first = server.wait_end(&server.submit(&body).await, 30).await;
    assert!(first["timing"]["spawn_ms"].as_f64().unwrap() > 0.0, "{first}");
    let second = server.wait_end(&server.submit(&body).await, 30).await;
    assert_eq!(second["status"], "succeeded");
    assert_eq!(second["timing"]["spawn_ms"].as_f64().unwrap(), 0.0, "warm workers cost no start-up: {second}");
    assert!(
        workers_of(&second).is_subset(&workers_of(&first)),
        "{:?} vs {:?}",
        workers_of(&second),
        workers_of(&first)
    );
    assert!(
        eventually(10, || worker_processes(&server).is_empty()).await,
        "idle workers exit: {:?}",
        worker_processes(&server)
    );
}

crate::backend_tests!(
    warm_workers_serve_the_next_job_and_exit_when_idle,
    a_restart_keeps_every_job_and_result,
    kill_9_during_a_processes_job_then_restart_completes_it_exactly_with_no_worker_left,
    a_worker_killed_mid_job_fails_the_job_naming_the_signal_and_leaves_no_zombie,
    service_endpoints_answer,
);
