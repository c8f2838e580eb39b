//! Jobs run to exact results with every strategy and transport.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

/// Every way to run a job: (strategy, transport).
const WAYS: [(&str, Option<&str>); 4] =
    [("sequential", None), ("threads", None), ("processes", Some("shared_memory")), ("processes", Some("pipe"))];

fn with_way(mut body: Value, strategy: &str, transport: Option<&str>) -> Value {
    body["strategy"] = json!(strategy);
    if let Some(t) = transport {
        body["transport"] = json!(t);
    }
    body
}

async fn every_strategy_and_transport_squares_random_numbers_exactly(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut rng = Rng::new(7);
    for (strategy, transport) in WAYS {
        for (count, cores, chunk_size) in [(1, 1, None), (37, 3, None), (1000, 2, Some(7)), (70_000, 2, None)] {
            let numbers = rng.numbers(count);
            let mut body = with_way(json!({"numbers": numbers, "cores": cores}), strategy, transport);
            if let Some(size) = chunk_size {
                body["chunk_size"] = json!(size);
            }
            let id = server.submit(&body).await;
            let got = server.squares(&id).await;
            assert_eq!(got, squares_of(&numbers), "{strategy} {transport:?} count {count}");
        }
    }
}

async fn the_extremes_square_to_exact_64_bit_values(backend: Backend) {
    let server = TestServer::start(backend).await;
    let numbers = [MAX_ABS, -MAX_ABS, 0, -1, 1, -2];
    for (strategy, transport) in WAYS {
        let id = server.submit(&with_way(json!({"numbers": numbers, "cores": 2}), strategy, transport)).await;
        let got = server.squares(&id).await;
        assert_eq!(got, [9_223_372_030_926_249_001, 9_223_372_030_926_249_001, 0, 1, 1, 4]);
    }
}

async fn ranges_with_negative_steps_square_like_python(backend: Backend) {
    let server = TestServer::start(backend).await;
    for (strategy, transport) in WAYS {
        for (start, end, step) in [(10, -11, -3), (MAX_ABS, MAX_ABS - 100_000, -7), (-5, 6, 1), (0, 200_001, 2)] {
            let id = server.submit(&with_way(range_job(start, end, step), strategy, transport)).await;
            let expected: Vec<i64> = python_range(start, end, step).iter().map(|n| n * n).collect();
            assert_eq!(server.squares(&id).await, expected, "{strategy} range({start}, {end}, {step})");
        }
    }
}

fn python_range(start: i64, end: i64, step: i64) -> Vec<i64> {
    let mut v = Vec::new();
    let mut x = start;
    while (step > 0 && x < end) || (step < 0 && x > end) {
        v.push(x);
        x += step;
    }
    v
}

async fn ten_numbers_on_three_cores_split_four_three_three_like_the_seed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = server.submit(&json!({"numbers": (1..=10).collect::<Vec<i64>>(), "cores": 3})).await;
    let doc = server.wait_end(&id, 30).await;
    assert_eq!(doc["status"], "succeeded");
    let chunks = doc["timing"]["chunks"].as_array().unwrap();
    let split: Vec<(u64, u64)> =
        chunks.iter().map(|c| (c["offset"].as_u64().unwrap(), c["len"].as_u64().unwrap())).collect();
    assert_eq!(split, [(0, 4), (4, 3), (7, 3)]);
    assert_eq!(doc["request"]["cores"], 3);
    assert_eq!(doc["request"]["chunk_size"], 4);
    assert_eq!(doc["progress"], json!({"chunks_done": 3, "chunks_total": 3, "numbers_done": 10}));
}

async fn the_job_document_reports_timing_per_chunk_and_worker(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = server.submit(&json!({"range": {"start": 0, "end": 5000}, "cores": 4, "strategy": "processes"})).await;
    let doc = server.wait_end(&id, 30).await;
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(doc["request"]["chunk_size"], 1250);
    assert_eq!(doc["request"]["transport"], "shared_memory");
    assert_eq!(doc["attempts"], 1);
    let timing = &doc["timing"];
    for key in ["queue_ms", "wall_ms", "spawn_ms", "compute_ms", "store_ms"] {
        assert!(timing[key].as_f64().unwrap() >= 0.0, "{key} in {timing}");
    }
    assert!(timing["spawn_ms"].as_f64().unwrap() > 0.0, "starting worker processes takes time: {timing}");
    let chunks = timing["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 4);
    let workers: Vec<&str> = chunks.iter().map(|c| c["worker"].as_str().unwrap()).collect();
    assert!(workers.iter().all(|w| w.starts_with("process ")), "{workers:?}");
    for c in chunks {
        assert!(c["node"].as_str().unwrap().contains(':'), "{c}");
        assert!(c["duration_ms"].as_f64().unwrap() >= 0.0);
    }
    // Chunks slow enough that both lanes get some: a 2-core node runs a 4-core job on 2 workers.
    let body =
        json!({"range": {"start": 0, "end": 8}, "cores": 4, "strategy": "processes", "simulate": {"sleep_ms": 40}});
    let doc = server.wait_end(&server.submit(&body).await, 30).await;
    let mut workers: Vec<&str> =
        doc["timing"]["chunks"].as_array().unwrap().iter().map(|c| c["worker"].as_str().unwrap()).collect();
    workers.sort();
    workers.dedup();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let id = server.submit(&json!({"numbers": [1, 2, 3], "cores": 2, "strategy": "threads"})).await;
    let doc = server.wait_end(&id, 30).await;
    let workers: Vec<&str> =
        doc["timing"]["chunks"].as_array().unwrap().iter().map(|c| c["worker"].as_str().unwrap()).collect();
    assert!(workers.iter().all(|w| *w == "thread 0" || *w == "thread 1"), "{workers:?}");
}

async fn three_hundred_concurrent_tiny_jobs_all_succeed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let server = &server;
    // Submissions, the claim loop and lanes all take free cores (a submission
    // claims work in its own write): none may claim a chunk without a core.
    // Ten clients submit thirty jobs each, one after another, so that cores
    // keep coming free while submissions arrive.
    let clients = (0..10).map(|c| async move {
        let mut submitted = Vec::new();
        for i in (c..300).step_by(10) {
            let strategy = ["sequential", "threads", "processes"][i % 3];
            let numbers = [i as i64, -(i as i64) - 1, 3];
            let id = server.submit(&json!({"numbers": numbers, "strategy": strategy, "cores": 1 + i % 2})).await;
            submitted.push((id, squares_of(&numbers)));
        }
        submitted
    });
    let submitted: Vec<_> = futures_util::future::join_all(clients).await.into_iter().flatten().collect();
    assert_eq!(submitted.len(), 300);
    let checks = submitted.iter().map(|(id, want)| async move {
        assert_eq!(&server.squares(id).await, want, "job {id}");
    });
    futures_util::future::join_all(checks).await;
    server.wait_cores_free(5, "the cores did not all come back once the jobs ended").await;
    let log = server.log();
    assert!(!log.contains("ERROR"), "errors in the server log: {log}");
}

async fn a_long_poll_answers_as_soon_as_the_job_ends(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = server.submit(&json!({"numbers": [1, 2], "cores": 1, "simulate": {"sleep_ms": 400}})).await;
    let started = Instant::now();
    let (status, doc) = server.get_json(&format!("/v1/jobs/{id}?wait=30")).await;
    let waited = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert!(waited >= Duration::from_millis(700), "two items sleep 400 ms each: answered after {waited:?}");
    assert!(waited < Duration::from_secs(10), "the long-poll waited for its timeout: {waited:?}");

    // A long-poll on a job that does not end in time answers with the running job.
    let id = server.submit(&json!({"numbers": [1], "cores": 1, "simulate": {"sleep_ms": 1000}})).await;
    let (status, doc) = server.get_json(&format!("/v1/jobs/{id}?wait=0.2")).await;
    assert_eq!(status, 200);
    assert!(["queued", "running"].contains(&doc["status"].as_str().unwrap()), "{doc}");
}

async fn health_answers_while_cpu_heavy_jobs_fill_every_core(backend: Backend) {
    let server = TestServer::start(backend).await;
    for strategy in ["threads", "processes"] {
        let body = json!({"range": {"start": 0, "end": 100}, "cores": 2, "strategy": strategy, "simulate": {"spin": 10_000_000}});
        let id = server.submit(&body).await;
        // Count health checks that began and ended while the job held both cores.
        let mut samples = 0;
        loop {
            let before = server.job(&id).await["status"].clone();
            let started = Instant::now();
            let (status, _) = server.get_json("/healthz").await;
            let took = started.elapsed();
            let after = server.job(&id).await["status"].clone();
            if before == "running" && after == "running" {
                assert_eq!(status, 200);
                assert!(took < Duration::from_millis(500), "healthz took {took:?} under load");
                samples += 1;
            }
            if after != "running" && after != "queued" {
                break;
            }
        }
        assert!(samples >= 3, "only {samples} health checks landed while the {strategy} job ran");
        assert_eq!(server.wait_end(&id, 120).await["status"], "succeeded");
    }
}

async fn listing_filters_by_status_and_metadata_and_pages_newest_first(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let team = if i % 2 == 0 { "red" } else { "blue" };
        ids.push(server.submit(&json!({"numbers": [i], "metadata": {"team": team, "n": i.to_string()}})).await);
    }
    for id in &ids {
        server.wait_end(id, 30).await;
    }
    let (status, page) = server.get_json("/v1/jobs?limit=2").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[4].as_str(), ids[3].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page2) = server.get_json(&format!("/v1/jobs?limit=2&cursor={cursor}")).await;
    let listed2: Vec<&str> = page2["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(listed2, [ids[2].as_str(), ids[1].as_str()]);
    let (_, red) = server.get_json("/v1/jobs?metadata.team=red&status=succeeded").await;
    let red: Vec<&str> = red["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(red, [ids[4].as_str(), ids[2].as_str(), ids[0].as_str()]);
    let (_, one) = server.get_json("/v1/jobs?metadata.team=blue&metadata.n=3").await;
    assert_eq!(one["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(one["jobs"][0]["metadata"], Value::Null);
    assert_eq!(one["jobs"][0]["request"]["metadata"], json!({"team": "blue", "n": "3"}));
    assert_eq!(one["next_cursor"], Value::Null);
    let (_, none) = server.get_json("/v1/jobs?status=failed").await;
    assert_eq!(none, json!({"jobs": [], "next_cursor": null}));
}

async fn deleting_removes_an_ended_job_and_refuses_a_running_one(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = server.submit(&json!({"numbers": [4]})).await;
    server.wait_end(&id, 30).await;
    let response = server.client.delete(server.url(&format!("/v1/jobs/{id}"))).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(server.get_json(&format!("/v1/jobs/{id}")).await.0, 404);
    assert_eq!(server.get_json(&format!("/v1/jobs/{id}/result")).await.0, 404);

    let busy = server.submit(&json!({"numbers": [1], "cores": 1, "simulate": {"sleep_ms": 800}})).await;
    let response = server.client.delete(server.url(&format!("/v1/jobs/{busy}"))).send().await.unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert_eq!(server.wait_end(&busy, 30).await["status"], "succeeded");
}

/// Jobs that ended before `jobs.timing` kept the chunk timings still show
/// them: the document falls back to the chunks table.
async fn an_older_job_row_reads_its_chunk_timings_from_the_chunks_table(backend: Backend) {
    let server = TestServer::start(backend).await;
    // Three chunks, and one (whose end is written without reading its chunk back).
    let three = json!({"range": {"start": 0, "end": 3000}, "cores": 3, "strategy": "threads"});
    let one = json!({"numbers": [4, 5, 6], "cores": 1, "strategy": "threads"});
    for (body, chunks) in [(three, 3), (one, 1)] {
        let id = server.submit(&body).await;
        let doc = server.wait_end(&id, 30).await;
        assert_eq!(doc["status"], "succeeded", "{doc}");
        assert_eq!(doc["timing"]["chunks"].as_array().unwrap().len(), chunks, "{doc}");
        let strip = match backend {
            Backend::Sqlite => format!("UPDATE jobs SET timing = json_remove(timing, '$.chunks') WHERE id = '{id}'"),
            Backend::Postgres => {
                format!("UPDATE jobs SET timing = (timing::jsonb - 'chunks')::text WHERE id = '{id}'")
            }
        };
        execute_sql(&server.database_url(), &strip).await;
        let old = server.job(&id).await;
        assert_eq!(old["timing"], doc["timing"], "the same timings, read from the chunks table");
    }
}

/// Runs one statement on the server's database, as an operator would.
async fn execute_sql(url: &str, sql: &str) {
    use sqlx::{Connection, Executor};
    let affected = match url.starts_with("sqlite:") {
        true => sqlx::SqliteConnection::connect(url).await.unwrap().execute(sql).await.unwrap().rows_affected(),
        false => sqlx::PgConnection::connect(url).await.unwrap().execute(sql).await.unwrap().rows_affected(),
    };
    assert_eq!(affected, 1, "{sql}");
}

/// A histogram's `_count` and `_sum` from the `/metrics` text.
async fn histogram(server: &TestServer, name: &str) -> (u64, f64) {
    let text = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |suffix: &str| {
        let line =
            text.lines().find(|l| l.starts_with(&format!("{name}_{suffix} "))).unwrap_or_else(|| panic!("{text}"));
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    (value("count") as u64, value("sum"))
}

async fn small_jobs_queued_behind_a_busy_lane_are_stored_eight_per_write(backend: Backend) {
    // One core: a slow job holds the only lane while twenty small jobs queue behind it.
    let server = TestServer::start_with(backend, &["--max-cores", "1"]).await;
    let slow = server.submit(&json!({"numbers": [3, 4, 5], "cores": 1, "simulate": {"sleep_ms": 1000}})).await;
    let claimed = Instant::now() + Duration::from_secs(10);
    while server.job(&slow).await["status"] == "queued" && Instant::now() < claimed {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut small = Vec::new();
    for i in 0..20i64 {
        let numbers = [i, -i - 1, 3_037_000_499 - i];
        small.push((numbers, server.submit(&json!({"numbers": numbers, "cores": 1, "strategy": "threads"})).await));
    }
    assert_eq!(server.job(&slow).await["status"], "running", "the small jobs must queue behind the slow one");
    assert_eq!(server.wait_end(&slow, 30).await["status"], "succeeded");
    for (numbers, id) in &small {
        let doc = server.wait_end(id, 30).await;
        assert_eq!(doc["status"], "succeeded", "{doc}");
        assert_eq!(server.squares(id).await, squares_of(numbers));
    }
    // The slow job's write claims the first eight small jobs; their write the
    // next eight; theirs the last four; theirs finds nothing.
    assert_eq!(histogram(&server, "squared_lane_batch_jobs").await, (4, 21.0));
}

/// More chunks than one insert statement takes (1,000 per statement), with
/// metadata and a list input: every row of the job is stored, whichever
/// statement it went in.
async fn a_job_of_more_chunks_than_one_insert_statement_is_stored_whole(backend: Backend) {
    let server = TestServer::start(backend).await;
    let numbers = Rng::new(11).numbers(2_345);
    let body = json!({"numbers": numbers, "cores": 2, "chunk_size": 1, "metadata": {"team": "red", "run": "7"}});
    let id = server.submit(&body).await;
    let doc = server.wait_end(&id, 60).await;
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(doc["progress"], json!({"chunks_done": 2_345, "chunks_total": 2_345, "numbers_done": 2_345}));
    let (_, listed) = server.get_json("/v1/jobs?metadata.team=red&metadata.run=7").await;
    assert_eq!(listed["jobs"].as_array().unwrap().iter().map(|j| &j["id"]).collect::<Vec<_>>(), [&json!(id)]);
    assert_eq!(server.squares(&id).await, squares_of(&numbers));
}

crate::backend_tests!(
    a_job_of_more_chunks_than_one_insert_statement_is_stored_whole,
    small_jobs_queued_behind_a_busy_lane_are_stored_eight_per_write,
    an_older_job_row_reads_its_chunk_timings_from_the_chunks_table,
    every_strategy_and_transport_squares_random_numbers_exactly,
    the_extremes_square_to_exact_64_bit_values,
    ranges_with_negative_steps_square_like_python,
    ten_numbers_on_three_cores_split_four_three_three_like_the_seed,
    the_job_document_reports_timing_per_chunk_and_worker,
    three_hundred_concurrent_tiny_jobs_all_succeed,
    a_long_poll_answers_as_soon_as_the_job_ends,
    health_answers_while_cpu_heavy_jobs_fill_every_core,
    listing_filters_by_status_and_metadata_and_pages_newest_first,
    deleting_removes_an_ended_job_and_refuses_a_running_one,
);
