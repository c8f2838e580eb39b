//! The job lifecycle under stress: cancel, timeouts, retries, idempotency,
//! graceful shutdown, retention, backpressure, API keys and event streams.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

fn worker_processes(server: &TestServer) -> Vec<(u32, char, String)> {
    server.tagged_processes().into_iter().filter(|(_, _, cmd)| cmd.contains(" worker")).collect()
}

async fn cancel(server: &TestServer, id: &str) -> (u16, Value) {
    let response = server.client.post(server.url(&format!("/v1/jobs/{id}/cancel"))).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn canceling_a_running_processes_job_kills_its_workers_and_frees_its_cores(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = json!({"range": {"start": 0, "end": 100}, "strategy": "processes", "cores": 2, "chunk_size": 1, "simulate": {"sleep_ms": 200}});
    let id = server.submit(&body).await;
    wait_progress(&server, &id, 1).await;
    assert_eq!(worker_processes(&server).len(), 2);

    let (status, doc) = cancel(&server, &id).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["status"], "canceled");
    assert_eq!(doc["error"]["type"], "/problems/canceled");
    assert!(worker_processes(&server).is_empty(), "workers left after cancel: {:?}", worker_processes(&server));
    assert_eq!(server.get_json(&format!("/v1/jobs/{id}/result")).await.0, 409, "partial results are discarded");

    // Canceling again is a conflict; the cores are free for the next job.
    let (status, problem) = cancel(&server, &id).await;
    assert_eq!(status, 409);
    assert_eq!(problem["type"], "/problems/job-ended");
    let next = server.submit(&json!({"numbers": [3], "cores": 2})).await;
    assert_eq!(server.squares(&next).await, [9]);
    let doc = server.job(&id).await;
    assert_eq!(doc["status"], "canceled", "the cancel stuck: {doc}");
}

async fn a_canceled_queued_job_never_starts(backend: Backend) {
    let server = TestServer::start(backend).await;
    let blocker =
        server.submit(&json!({"numbers": [1, 2], "cores": 2, "chunk_size": 1, "simulate": {"sleep_ms": 600}})).await;
    let queued = server.submit(&json!({"numbers": [5], "cores": 2})).await;
    assert_eq!(server.job(&queued).await["status"], "queued");
    let (status, doc) = cancel(&server, &queued).await;
    assert_eq!((status, doc["status"].as_str()), (200, Some("canceled")));
    assert_eq!(server.wait_end(&blocker, 30).await["status"], "succeeded");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let doc = server.job(&queued).await;
    assert_eq!(
        (doc["status"].as_str(), doc["started_at"].as_str(), doc["attempts"].as_u64()),
        (Some("canceled"), None, Some(0))
    );
}

async fn canceling_a_threads_job_stops_it_at_the_next_item(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = server
        .submit(&json!({"range": {"start": 0, "end": 50}, "strategy": "threads", "cores": 2, "simulate": {"sleep_ms": 100}}))
        .await;
    wait_progress(&server, &id, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, doc) = cancel(&server, &id).await;
    assert_eq!((status, doc["status"].as_str()), (200, Some("canceled")));
    assert!(started.elapsed() < Duration::from_secs(2), "cancel waited for the whole job: {:?}", started.elapsed());
    // Its lanes have stopped; each returns its core once its own claim for
    // more work (one store round trip) finds none.
    server.wait_cores_free(5, "the canceled job's cores were not returned").await;
}

async fn a_job_over_its_timeout_fails_with_the_timeout_problem_and_no_workers_left(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-job-duration", "30s"]).await;
    let body = json!({"range": {"start": 0, "end": 100}, "strategy": "processes", "cores": 2, "simulate": {"sleep_ms": 100}, "timeout_ms": 400});
    let id = server.submit(&body).await;
    let doc = server.wait_end(&id, 30).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert_eq!(doc["error"]["type"], "/problems/timeout");
    let wall = doc["timing"]["wall_ms"].as_f64().unwrap();
    assert!((400.0..5000.0).contains(&wall), "stopped at {wall} ms");
    assert!(eventually(5, || worker_processes(&server).is_empty()).await);
    assert_eq!(server.get_json(&format!("/v1/jobs/{id}/result")).await.0, 409);
}

async fn the_servers_max_job_duration_bounds_every_job(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-job-duration", "300ms"]).await;
    let id = server.submit(&json!({"numbers": [1, 2, 3, 4, 5], "cores": 1, "simulate": {"sleep_ms": 200}})).await;
    let doc = server.wait_end(&id, 30).await;
    assert_eq!((doc["status"].as_str(), doc["error"]["type"].as_str()), (Some("failed"), Some("/problems/timeout")));
    let quick = server.submit(&json!({"numbers": [7]})).await;
    assert_eq!(server.squares(&quick).await, [49]);
}

async fn a_worker_killed_mid_chunk_is_retried_and_the_job_ends_exact(backend: Backend) {
    let server = TestServer::start(backend).await;
    let numbers = Rng::new(5).numbers(24);
    let body = json!({"numbers": numbers, "strategy": "processes", "cores": 2, "chunk_size": 3,
                      "simulate": {"sleep_ms": 60}, "max_attempts": 3});
    let id = server.submit(&body).await;
    wait_progress(&server, &id, 1).await;
    let (victim, _, _) = worker_processes(&server)[0].clone();
    kill(victim, libc::SIGKILL);
    let doc = server.wait_end(&id, 60).await;
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(doc["attempts"], 2);
    let errors = doc["attempt_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["attempt"], 1);
    assert_eq!(errors[0]["error"]["type"], "/problems/worker-crashed");
    assert!(errors[0]["error"]["detail"].as_str().unwrap().contains(&format!("{victim} was killed by signal 9")));
    assert_eq!(server.squares(&id).await, squares_of(&numbers));
    assert!(eventually(5, || worker_processes(&server).is_empty()).await);
}

async fn a_job_that_exhausts_its_attempts_fails_with_the_last_error(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = json!({"range": {"start": 0, "end": 400}, "strategy": "processes", "cores": 1,
                      "simulate": {"sleep_ms": 20}, "max_attempts": 2});
    let id = server.submit(&body).await;
    for round in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let victim = loop {
            let workers = worker_processes(&server);
            if let Some((pid, 'S' | 'R', _)) = workers.first() {
                break *pid;
            }
            assert!(Instant::now() < deadline, "round {round}: no worker to kill");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        kill(victim, libc::SIGKILL);
        assert!(eventually(10, || !worker_processes(&server).iter().any(|(p, _, _)| *p == victim)).await);
    }
    let doc = server.wait_end(&id, 60).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert_eq!(doc["attempts"], 2);
    assert_eq!(doc["error"]["type"], "/problems/worker-crashed");
    assert_eq!(doc["attempt_errors"].as_array().unwrap().len(), 1);
}

async fn fifty_concurrent_submissions_with_one_idempotency_key_make_one_job(backend: Backend) {
    let server = TestServer::start(backend).await;
    let server = &server;
    let body = json!({"numbers": [1, 2, 3], "metadata": {"order": "42"}});
    let posts = (0..50).map(|_| async {
        let response = server
            .client
            .post(server.url("/v1/jobs"))
            .header("idempotency-key", "order-42")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let doc: Value = response.json().await.unwrap();
        (status, doc["id"].as_str().unwrap().to_string())
    });
    let answers = futures_util::future::join_all(posts).await;
    let ids: std::collections::BTreeSet<&str> = answers.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|(s, _)| *s == 202).count(), 1, "one 202, the rest 200: {answers:?}");
    assert!(answers.iter().all(|(s, _)| *s == 202 || *s == 200));
    let (_, list) = server.get_json("/v1/jobs?metadata.order=42").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);

    let other = server
        .client
        .post(server.url("/v1/jobs"))
        .header("idempotency-key", "order-42")
        .json(&json!({"numbers": [9]}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 409);
    let problem: Value = other.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/idempotency-key-reused");
}

async fn idempotency_keys_expire_after_their_window(backend: Backend) {
    let server = TestServer::start_with(backend, &["--idempotency-ttl", "300ms"]).await;
    let post = || async {
        let response = server
            .client
            .post(server.url("/v1/jobs"))
            .header("idempotency-key", "k1")
            .json(&json!({"numbers": [2]}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let doc: Value = response.json().await.unwrap();
        (status, doc["id"].as_str().unwrap().to_string())
    };
    let (first_status, first) = post().await;
    let (again_status, again) = post().await;
    assert_eq!((first_status, again_status), (202, 200));
    assert_eq!(first, again);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (later_status, later) = post().await;
    assert_eq!(later_status, 202);
    assert_ne!(later, first);
}

async fn sigterm_during_a_long_job_requeues_it_and_the_next_start_completes_it(backend: Backend) {
    let mut server = TestServer::start_with(backend, &["--shutdown-grace", "200ms"]).await;
    let numbers = Rng::new(9).numbers(30);
    let body = json!({"numbers": numbers, "strategy": "processes", "cores": 2, "chunk_size": 1, "simulate": {"sleep_ms": 100}});
    let id = server.submit(&body).await;
    wait_progress(&server, &id, 2).await;
    let stopping = Instant::now();
    server.terminate();
    assert!(stopping.elapsed() < Duration::from_secs(15), "shutdown took {:?}", stopping.elapsed());
    assert!(worker_processes(&server).is_empty());
    server.restart();
    let doc = server.wait_end(&id, 60).await;
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(doc["attempts"], 1, "a shutdown is not a failed attempt");
    assert_eq!(server.squares(&id).await, squares_of(&numbers));
    assert!(server.log().contains("re-queue"), "the log says what happened: {}", server.log());
}

async fn a_job_that_finishes_within_the_grace_period_is_not_interrupted(backend: Backend) {
    let mut server = TestServer::start_with(backend, &["--shutdown-grace", "10s"]).await;
    let id = server.submit(&json!({"numbers": [1, 2, 3, 4], "cores": 2, "simulate": {"sleep_ms": 200}})).await;
    wait_progress(&server, &id, 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.terminate();
    server.restart();
    let doc = server.job(&id).await;
    assert_eq!(doc["status"], "succeeded", "it finished during the grace period: {doc}");
}

async fn retention_deletes_finished_jobs_and_their_results(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let id = server.submit(&json!({"numbers": [1, 2]})).await;
    server.wait_end(&id, 30).await;
    let body = json!({"numbers": [3], "strategies": ["threads"], "cores": [1], "repeats": 1});
    let comparison: Value =
        server.client.post(server.url("/v1/comparisons")).json(&body).send().await.unwrap().json().await.unwrap();
    let comparison = format!("/v1/comparisons/{}", comparison["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.get_json(&comparison).await.1["status"] == "running" {
        assert!(Instant::now() < deadline, "the comparison did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.get_json(&comparison).await.1["status"], "succeeded");
    restart_with_retention_of_1ms(&mut server).await;
    assert_eq!(server.get_json(&format!("/v1/jobs/{id}")).await.0, 404);
    assert_eq!(server.get_json(&comparison).await.0, 404, "the comparison goes with its jobs");
}

async fn a_full_queue_answers_429_with_retry_after(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-queued", "2"]).await;
    let blocker =
        server.submit(&json!({"numbers": [1, 2], "cores": 2, "chunk_size": 1, "simulate": {"sleep_ms": 500}})).await;
    wait_progress(&server, &blocker, 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued = [server.submit(&json!({"numbers": [1]})).await, server.submit(&json!({"numbers": [2]})).await];
    let refused = || {
        server.client.post(server.url("/v1/jobs")).header("idempotency-key", "retry-me").json(&json!({"numbers": [3]}))
    };
    let response = refused().send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/queue-full");
    server.wait_end(&blocker, 30).await;
    for id in &queued {
        server.wait_end(id, 30).await;
    }
    // A refused submission stored nothing, its idempotency key included: the retry is a new job.
    let response = refused().send().await.unwrap();
    assert_eq!(response.status(), 202);
    let retried: Value = response.json().await.unwrap();
    let doc = server.wait_end(retried["id"].as_str().unwrap(), 30).await;
    assert_eq!(doc["status"], "succeeded");
}

async fn api_keys_guard_v1_but_not_health(backend: Backend) {
    let server = TestServer::start_with(backend, &["--api-key", "s3cret-one", "--api-key", "s3cret-two"]).await;
    let response = server.post_job(&json!({"numbers": [2]})).await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/unauthorized");
    let wrong = server.client.get(server.url("/v1/jobs")).bearer_auth("s3cret-three").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = server
        .client
        .post(server.url("/v1/jobs"))
        .bearer_auth("s3cret-two")
        .json(&json!({"numbers": [2]}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    let listed = server.client.get(server.url("/v1/jobs")).bearer_auth("s3cret-one").send().await.unwrap();
    assert_eq!(listed.status(), 200);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(server.client.get(server.url(open)).send().await.unwrap().status(), 200, "{open}");
    }
    assert!(!server.log().contains("s3cret"), "keys never appear in logs");
}

async fn the_api_keys_environment_variable_takes_a_comma_separated_list(backend: Backend) {
    let server = TestServer::start_with_env(backend, &[], &[("SQUARED_API_KEYS", "alpha,beta")]).await;
    assert_eq!(server.client.get(server.url("/v1/jobs")).send().await.unwrap().status(), 401);
    assert_eq!(server.client.get(server.url("/v1/jobs")).bearer_auth("beta").send().await.unwrap().status(), 200);
}

/// Reads server-sent events until the stream closes: (event, id, data).
async fn read_events(server: &TestServer, id: &str, last_event_id: Option<&str>) -> Vec<(String, u64, Value)> {
    let mut request = server.client.get(server.url(&format!("/v1/jobs/{id}/events")));
    if let Some(last) = last_event_id {
        request = request.header("last-event-id", last);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut stream = response.bytes_stream();
    let read = async {
        while let Some(piece) = stream.next().await {
            text.push_str(std::str::from_utf8(&piece.unwrap()).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("the stream closes after the end");
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let (mut kind, mut eid, mut data) = (String::new(), 0, String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_string();
            } else if let Some(v) = line.strip_prefix("id: ") {
                eid = v.parse().unwrap();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        if !kind.is_empty() {
            events.push((kind, eid, serde_json::from_str(&data).unwrap()));
        }
    }
    events
}

async fn the_event_stream_follows_a_job_to_its_end_and_reconnects_do_not_miss_it(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = server
        .submit(&json!({"numbers": [1, 2, 3, 4], "cores": 2, "chunk_size": 1, "simulate": {"sleep_ms": 150}}))
        .await;
    let events = read_events(&server, &id, None).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"status"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"end"), "{kinds:?}");
    assert!(kinds.contains(&"progress"), "{kinds:?}");
    let ids: Vec<u64> = events.iter().map(|(_, i, _)| *i).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let (_, end_id, last) = events.last().unwrap();
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["progress"]["chunks_done"], 4);
    let done: Vec<u64> = events.iter().map(|(_, _, d)| d["progress"]["chunks_done"].as_u64().unwrap()).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");

    // Reconnecting after the end still gets the end, and only that.
    let again = read_events(&server, &id, Some(&end_id.to_string())).await;
    let kinds: Vec<&str> = again.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(kinds, ["end"]);
    // Reconnecting from an early id gets the final state and the end.
    let from_start = read_events(&server, &id, Some(&ids[0].to_string())).await;
    let kinds: Vec<&str> = from_start.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"end"));
    assert_eq!(from_start.last().unwrap().2["status"], "succeeded");
    let (status, _) = server.get_json("/v1/jobs/0193a5e4-0000-7000-8000-000000000000/events").await;
    assert_eq!(status, 404);
}

crate::backend_tests!(
    canceling_a_running_processes_job_kills_its_workers_and_frees_its_cores,
    a_canceled_queued_job_never_starts,
    canceling_a_threads_job_stops_it_at_the_next_item,
    a_job_over_its_timeout_fails_with_the_timeout_problem_and_no_workers_left,
    the_servers_max_job_duration_bounds_every_job,
    a_worker_killed_mid_chunk_is_retried_and_the_job_ends_exact,
    a_job_that_exhausts_its_attempts_fails_with_the_last_error,
    fifty_concurrent_submissions_with_one_idempotency_key_make_one_job,
    idempotency_keys_expire_after_their_window,
    sigterm_during_a_long_job_requeues_it_and_the_next_start_completes_it,
    a_job_that_finishes_within_the_grace_period_is_not_interrupted,
    retention_deletes_finished_jobs_and_their_results,
    a_full_queue_answers_429_with_retry_after,
    api_keys_guard_v1_but_not_health,
    the_api_keys_environment_variable_takes_a_comma_separated_list,
    the_event_stream_follows_a_job_to_its_end_and_reconnects_do_not_miss_it,
);
