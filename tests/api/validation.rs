//! Bad input gets a clear problem document that names the bad field, and loses nothing.

use serde_json::{json, Value};

use crate::helpers::*;

/// Sends a raw body and returns (status, content type, problem).
async fn send_raw(server: &TestServer, content_type: Option<&str>, body: Vec<u8>) -> (u16, String, Value) {
    let mut request = server.client.post(server.url("/v1/jobs")).body(body);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let ct = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, ct, response.json().await.unwrap_or(Value::Null))
}

fn fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map_or(vec![], |e| e.iter().map(|e| e["field"].as_str().unwrap().to_string()).collect())
}

async fn every_validation_error_names_its_field(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-cores-per-job", "64"]).await;
    let cases: Vec<(Value, &[&str])> = vec![
        (json!({"numbers": [1, 2, 3, 4_000_000_000_i64]}), &["numbers[3]"]),
        (json!({"numbers": [-3037000500_i64, 0, 3037000500_i64]}), &["numbers[0]", "numbers[2]"]),
        (
            json!({"numbers": [1, "two", 3.5, null, [4], {"n": 5}]}),
            &["numbers[1]", "numbers[2]", "numbers[3]", "numbers[4]", "numbers[5]"],
        ),
        (json!({"numbers": []}), &["numbers"]),
        (json!({"numbers": "1,2,3"}), &["numbers"]),
        (json!({}), &["numbers"]),
        (json!({"numbers": [1], "range": {"start": 0, "end": 3}}), &["range"]),
        (json!({"range": {"start": 0, "end": 10, "step": 0}}), &["range.step"]),
        (json!({"range": {"start": 0, "end": -10}}), &["range"]),
        (json!({"range": {"end": 10}}), &["range.start"]),
        (json!({"range": {"start": 0, "end": 10, "stride": 2}}), &["range.stride"]),
        (json!({"range": {"start": -3037000600_i64, "end": -3037000590_i64}}), &["range.start", "range.end"]),
        (json!({"range": [0, 10]}), &["range"]),
        (json!({"numbers": [1], "cores": 0}), &["cores"]),
        (json!({"numbers": [1], "cores": 65}), &["cores"]),
        (json!({"numbers": [1], "cores": "2"}), &["cores"]),
        (json!({"numbers": [1], "strategy": "fibers"}), &["strategy"]),
        (json!({"numbers": [1], "chunk_size": 0}), &["chunk_size"]),
        (json!({"numbers": [1], "transport": "pipe"}), &["transport"]),
        (json!({"numbers": [1], "strategy": "processes", "transport": "carrier-pigeon"}), &["transport"]),
        (json!({"numbers": [1], "simulate": {"sleep_ms": 100000}}), &["simulate.sleep_ms"]),
        (json!({"numbers": [1], "simulate": {"spin": -1}}), &["simulate.spin"]),
        (json!({"numbers": [1], "simulate": {"nap": 1}}), &["simulate.nap"]),
        (json!({"numbers": [1], "priority": 1.5}), &["priority"]),
        (json!({"numbers": [1], "max_attempts": 0}), &["max_attempts"]),
        (json!({"numbers": [1], "timeout_ms": 0}), &["timeout_ms"]),
        (json!({"numbers": [1], "callback_url": "ftp://example.com/hook"}), &["callback_url"]),
        (json!({"numbers": [1], "metadata": {"team": 7}}), &["metadata.team"]),
        (json!({"numbers": [1], "metadata": "team=red"}), &["metadata"]),
        (json!({"numbers": [1], "colour": "blue"}), &["colour"]),
        (json!([1, 2, 3]), &["(body)"]),
        (json!({"numbers": [1, "x"], "cores": 0, "strategy": "fibers"}), &["numbers[1]", "cores", "strategy"]),
    ];
    for (body, want) in cases {
        let (status, ct, problem) =
            send_raw(&server, Some("application/json"), serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(status, 422, "{body} -> {problem}");
        assert_eq!(ct, "application/problem+json", "{body}");
        assert_eq!(problem["type"], "/problems/validation");
        assert_eq!(problem["status"], 422);
        assert_eq!(fields(&problem), want, "{body} -> {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(want.iter().all(|f| detail.contains(f)), "the detail names every field: {detail}");
    }
    // Nothing was stored by all that.
    let (_, list) = server.get_json("/v1/jobs").await;
    assert_eq!(list["jobs"], json!([]));
}

async fn a_bad_number_is_named_with_its_index_and_value(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (status, _, problem) =
        send_raw(&server, Some("application/json"), br#"{"numbers": [1, 2, 3, 4000000000]}"#.to_vec()).await;
    assert_eq!(status, 422);
    assert_eq!(
        problem["errors"],
        json!([{"field": "numbers[3]", "message": "4000000000 is outside ±3037000499 (its square would not fit in 64 bits)"}])
    );
}

async fn malformed_json_is_400_and_other_media_types_are_415(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (status, ct, problem) = send_raw(&server, Some("application/json"), b"{\"numbers\": [1,".to_vec()).await;
    assert_eq!((status, ct.as_str()), (400, "application/problem+json"));
    assert_eq!(problem["type"], "/problems/malformed-json");
    let (status, ct, problem) = send_raw(&server, Some("text/plain"), b"{\"numbers\": [1]}".to_vec()).await;
    assert_eq!((status, ct.as_str()), (415, "application/problem+json"));
    assert_eq!(problem["status"], 415);
    let (status, _, _) = send_raw(&server, None, b"{\"numbers\": [1]}".to_vec()).await;
    assert_eq!(status, 415);
    let (status, _, _) =
        send_raw(&server, Some("application/json; charset=utf-8"), b"{\"numbers\": [1]}".to_vec()).await;
    assert_eq!(status, 202);
}

async fn too_many_numbers_or_bytes_is_413(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-numbers", "100", "--max-body-bytes", "2000"]).await;
    let (status, ct, problem) =
        send_raw(&server, Some("application/json"), serde_json::to_vec(&range_job(0, 101, 1)).unwrap()).await;
    assert_eq!((status, ct.as_str()), (413, "application/problem+json"));
    assert_eq!(fields(&problem), ["range"]);
    let numbers: Vec<i64> = (0..101).collect();
    let (status, _, problem) =
        send_raw(&server, Some("application/json"), serde_json::to_vec(&json!({"numbers": numbers})).unwrap()).await;
    assert_eq!(status, 413, "{problem}");
    assert_eq!(fields(&problem), ["numbers"]);
    let big: Vec<i64> = vec![MAX_ABS; 190];
    let (status, _, problem) =
        send_raw(&server, Some("application/json"), serde_json::to_vec(&json!({"numbers": big})).unwrap()).await;
    assert_eq!(status, 413, "{problem}");
    assert_eq!(fields(&problem), ["(body)"]);
    assert_eq!(server.submit(&range_job(0, 100, 1)).await.len(), 36);
}

async fn too_many_chunks_is_422_on_chunk_size(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-chunks", "10"]).await;
    let (status, _, problem) = send_raw(
        &server,
        Some("application/json"),
        serde_json::to_vec(&json!({"range": {"start": 0, "end": 100}, "chunk_size": 9})).unwrap(),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(fields(&problem), ["chunk_size"]);
}

async fn unknown_and_malformed_ids_are_404_and_400(backend: Backend) {
    let server = TestServer::start(backend).await;
    for path in
        ["/v1/jobs/0193a5e4-0000-7000-8000-000000000000", "/v1/jobs/0193a5e4-0000-7000-8000-000000000000/result"]
    {
        let (status, problem) = server.get_json(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(problem["type"], "/problems/not-found");
    }
    let (status, problem) = server.get_json("/v1/jobs/not-a-uuid").await;
    assert_eq!(status, 400);
    assert_eq!(fields(&problem), ["id"]);
    let (status, problem) = server.get_json("/v1/jobs?limit=5000").await;
    assert_eq!(status, 400);
    assert_eq!(fields(&problem), ["limit"]);
    let (status, problem) = server.get_json("/v1/jobs?status=done").await;
    assert_eq!((status, fields(&problem)), (400, vec!["status".to_string()]));
    let (status, problem) = server.get_json("/v1/jobs?colour=blue").await;
    assert_eq!((status, fields(&problem)), (400, vec!["colour".to_string()]));
    let id = server.submit(&json!({"numbers": [1]})).await;
    let (status, problem) = server.get_json(&format!("/v1/jobs/{id}?wait=61")).await;
    assert_eq!((status, fields(&problem)), (400, vec!["wait".to_string()]));
    let (status, problem) = server.get_json(&format!("/v1/jobs/{id}/result?offset=-1")).await;
    assert_eq!((status, fields(&problem)), (400, vec!["offset".to_string()]));
    let (status, problem) = server.get_json("/nowhere").await;
    assert_eq!((status, problem["status"].as_u64()), (404, Some(404)));
}

async fn a_callback_without_a_webhook_secret_is_refused_not_ignored(backend: Backend) {
    let server = TestServer::start(backend).await;
    let response = server.post_job(&json!({"numbers": [1], "callback_url": "https://example.com/hook"})).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(fields(&problem), ["callback_url"]);
}

crate::backend_tests!(
    every_validation_error_names_its_field,
    a_bad_number_is_named_with_its_index_and_value,
    malformed_json_is_400_and_other_media_types_are_415,
    too_many_numbers_or_bytes_is_413,
    too_many_chunks_is_422_on_chunk_size,
    unknown_and_malformed_ids_are_404_and_400,
    a_callback_without_a_webhook_secret_is_refused_not_ignored,
);
