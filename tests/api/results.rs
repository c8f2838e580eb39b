//! Results: streamed whole, in pages, as JSON or NDJSON.

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

/// Σ i² for i in 0..n.
fn sum_of_squares_below(n: i128) -> i128 {
    (n - 1) * n * (2 * n - 1) / 6
}

async fn a_million_number_range_streams_back_matching_the_sum_of_squares_formula(backend: Backend) {
    let server = TestServer::start(backend).await;
    const N: i64 = 1_000_000;
    for (strategy, transport) in [("threads", None), ("processes", Some("shared_memory")), ("processes", Some("pipe"))]
    {
        let mut body = json!({"range": {"start": 0, "end": N}, "cores": 2, "strategy": strategy});
        if let Some(t) = transport {
            body["transport"] = json!(t);
        }
        let id = server.submit(&body).await;
        assert_eq!(server.wait_end(&id, 300).await["status"], "succeeded");

        // JSON, read as a stream of chunks.
        let response = server.client.get(server.url(&format!("/v1/jobs/{id}/result"))).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert!(response.headers().get("content-length").is_none(), "the whole result is streamed, not sized up front");
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(piece) = stream.next().await {
            body.extend_from_slice(&piece.unwrap());
        }
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((doc["count"].as_i64(), doc["offset"].as_i64()), (Some(N), Some(0)));
        let squares = doc["squares"].as_array().unwrap();
        assert_eq!(squares.len() as i64, N);
        let mut sum = 0i128;
        for (i, s) in squares.iter().enumerate() {
            let s = s.as_i64().unwrap();
            assert_eq!(s, (i as i64) * (i as i64), "position {i}");
            sum += s as i128;
        }
        assert_eq!(sum, sum_of_squares_below(N as i128), "{strategy} {transport:?}");

        // NDJSON: one square a line.
        let response = server
            .client
            .get(server.url(&format!("/v1/jobs/{id}/result")))
            .header("accept", "application/x-ndjson")
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-type"], "application/x-ndjson");
        let text = response.text().await.unwrap();
        let mut lines = 0i64;
        let mut sum = 0i128;
        for line in text.lines() {
            sum += line.parse::<i128>().unwrap();
            lines += 1;
        }
        assert_eq!((lines, sum), (N, sum_of_squares_below(N as i128)));
    }
}

async fn pages_cut_across_segments_and_chunks_exactly(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id =
        server.submit(&json!({"range": {"start": -100_000, "end": 100_000}, "chunk_size": 70_001, "cores": 2})).await;
    assert_eq!(server.wait_end(&id, 120).await["status"], "succeeded");
    let square = |i: u64| {
        let n = -100_000 + i as i64;
        n * n
    };
    for (offset, limit) in
        [(0u64, 5u64), (65_530, 20), (70_000, 3), (131_070, 10), (199_995, 100), (200_000, 10), (250_000, 1)]
    {
        let (status, page) = server.get_json(&format!("/v1/jobs/{id}/result?offset={offset}&limit={limit}")).await;
        assert_eq!(status, 200);
        let want: Vec<i64> = (offset..(offset + limit).min(200_000)).map(square).collect();
        assert_eq!(page["count"], 200_000);
        assert_eq!(page["offset"].as_u64(), Some(offset.min(200_000)));
        let got: Vec<i64> = page["squares"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(got, want, "offset {offset} limit {limit}");
    }
    let (_, page) = server.get_json(&format!("/v1/jobs/{id}/result?offset=199998")).await;
    assert_eq!(page["squares"], json!([square(199_998), square(199_999)]));
}

async fn a_result_before_success_is_a_409_problem(backend: Backend) {
    let server = TestServer::start(backend).await;
    let id = server.submit(&json!({"numbers": [1, 2], "cores": 1, "simulate": {"sleep_ms": 500}})).await;
    let response = server.client.get(server.url(&format!("/v1/jobs/{id}/result"))).send().await.unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/job-not-succeeded");
    assert_eq!(server.squares(&id).await, [1, 4]);
}

/// On SQLite a job of more than one segment (65,536 numbers) keeps its
/// squares in a file beside the database: written by the lanes, kept through
/// `kill -9`, gone with a canceled, deleted or purged job. PostgreSQL stores
/// them as rows: the same API behaviour, no files.
async fn a_big_jobs_squares_survive_kill_9_and_go_with_the_job(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let files = |server: &TestServer| match backend {
        Backend::Sqlite => server.result_files(),
        Backend::Postgres => Vec::new(),
    };
    let expect = |ids: &[&str]| match backend {
        Backend::Sqlite => {
            let mut ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
            ids.sort();
            ids
        }
        Backend::Postgres => Vec::new(),
    };
    let big = server.submit(&json!({"range": {"start": 0, "end": 300_000}, "cores": 2})).await;
    let small = server.submit(&json!({"numbers": [3, -4], "cores": 2})).await;
    assert_eq!(server.squares(&small).await, [9, 16]);
    assert_eq!(server.wait_end(&big, 60).await["status"], "succeeded");
    assert_eq!(server.squares(&big).await, squares_of(&(0..300_000).collect::<Vec<i64>>()));
    assert_eq!(files(&server), expect(&[&big]), "only the big job has a file");
    if backend == Backend::Sqlite {
        let len = std::fs::metadata(server.result_files_dir().join(&big)).unwrap().len();
        assert_eq!(len, 300_000 * 8, "eight bytes a square");
    }

    // Canceled while running: its file goes. Forty chunks of 5,000 numbers
    // spinning 10,000 times each: seconds of work.
    let slow =
        |n: i64| json!({"range": {"start": 0, "end": n}, "chunk_size": 5000, "cores": 2, "simulate": {"spin": 10_000}});
    let canceled = server.submit(&slow(200_000)).await;
    wait_progress(&server, &canceled, 2).await;
    let response = server.client.post(server.url(&format!("/v1/jobs/{canceled}/cancel"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(server.wait_end(&canceled, 30).await["status"], "canceled");
    assert!(eventually(10, || files(&server) == expect(&[&big])).await, "{:?}", files(&server));

    // `kill -9` mid-job: the restart re-runs the unfinished chunks into the same file.
    let killed = server.submit(&slow(200_000)).await;
    wait_progress(&server, &killed, 4).await;
    let stray = "0196b2a4-0000-7000-8000-000000000000"; // a job id the database does not know
    if backend == Backend::Sqlite {
        std::fs::write(server.result_files_dir().join(stray), b"left by a crash").unwrap();
        std::fs::write(server.result_files_dir().join("notes.txt"), b"not a job's").unwrap();
    }
    assert_eq!(server.job(&killed).await["status"], "running", "the job should still be under way at the kill");
    server.kill9();
    server.restart();
    let doc = server.wait_end(&killed, 120).await;
    assert_eq!(doc["status"], "succeeded", "{doc}");
    assert_eq!(server.squares(&killed).await, squares_of(&(0..200_000).collect::<Vec<i64>>()));
    assert_eq!(server.squares(&big).await, squares_of(&(0..300_000).collect::<Vec<i64>>()));
    let mut after_restart = expect(&[&big, &killed]);
    if backend == Backend::Sqlite {
        after_restart.push("notes.txt".to_string()); // only job ids are swept
    }
    assert_eq!(files(&server), after_restart, "the stray job file is swept at start");

    // Deleted: its file goes.
    let response = server.client.delete(server.url(&format!("/v1/jobs/{big}"))).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(server.get_json(&format!("/v1/jobs/{big}/result")).await.0, 404);
    assert!(files(&server).iter().all(|f| f != &big), "{:?}", files(&server));

    // Purged by retention: its file goes.
    restart_with_retention_of_1ms(&mut server).await;
    assert_eq!(server.get_json(&format!("/v1/jobs/{killed}")).await.0, 404);
    let left: Vec<String> = files(&server).into_iter().filter(|f| f != "notes.txt").collect();
    assert!(left.is_empty(), "{left:?}");
}

crate::backend_tests!(
    a_million_number_range_streams_back_matching_the_sum_of_squares_formula,
    pages_cut_across_segments_and_chunks_exactly,
    a_result_before_success_is_a_409_problem,
    a_big_jobs_squares_survive_kill_9_and_go_with_the_job,
);
