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

crate::backend_tests!(
    a_million_number_range_streams_back_matching_the_sum_of_squares_formula,
    pages_cut_across_segments_and_chunks_exactly,
    a_result_before_success_is_a_409_problem,
);
