//! Comparisons: the matrix runs as ordinary jobs, one at a time, and the
//! table agrees with those jobs cell by cell.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn a_comparison_table_agrees_with_its_jobs_cell_by_cell(backend: Backend) {
    let server = TestServer::start(backend).await;
    let body = json!({"range": {"start": 0, "end": 3000}, "strategies": ["sequential", "threads", "processes"],
                      "cores": [1, 2], "repeats": 2, "transport": "pipe"});
    let response = server.client.post(server.url("/v1/comparisons")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let created: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/v1/comparisons/{}", created["id"].as_str().unwrap()));
    assert_eq!(
        created["request"],
        json!({"strategies": ["sequential", "threads", "processes"], "cores": [1, 2], "repeats": 2, "count": 3000})
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let table = loop {
        let (status, table) = server.get_json(&location).await;
        assert_eq!(status, 200);
        if table["status"] != "running" {
            break table;
        }
        assert!(Instant::now() < deadline, "the comparison did not finish: {table}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(table["status"], "succeeded", "{table}");
    let cells = table["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6);
    let want_sum: i128 = (0..3000i128).map(|n| n * n).sum();
    let mut intervals = Vec::new();
    let mut medians = Vec::new();
    for cell in cells {
        let ids = cell["job_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 2);
        let mut walls = Vec::new();
        for id in ids {
            let doc = server.job(id.as_str().unwrap()).await;
            assert_eq!(doc["status"], "succeeded");
            assert_eq!(doc["request"]["strategy"], cell["strategy"]);
            assert_eq!(doc["request"]["cores"], cell["cores"]);
            let transport = if cell["strategy"] == "processes" { json!("pipe") } else { Value::Null };
            assert_eq!(doc["request"]["transport"], transport);
            assert_eq!(doc["request"]["metadata"]["comparison"], created["id"]);
            walls.push(doc["timing"]["wall_ms"].as_f64().unwrap());
            intervals.push((
                doc["started_at"].as_str().unwrap().to_string(),
                doc["finished_at"].as_str().unwrap().to_string(),
            ));
            let squares = server.squares(id.as_str().unwrap()).await;
            assert_eq!(squares.iter().map(|s| *s as i128).sum::<i128>(), want_sum);
        }
        assert_eq!(cell["runs"], 2);
        let m = median(walls.clone());
        assert_eq!(cell["median_wall_ms"].as_f64().unwrap(), round3(m), "{cell}");
        assert_eq!(cell["min_wall_ms"].as_f64().unwrap(), round3(walls.iter().copied().fold(f64::MAX, f64::min)));
        assert_eq!(cell["max_wall_ms"].as_f64().unwrap(), round3(walls.iter().copied().fold(f64::MIN, f64::max)));
        medians.push((cell["strategy"].as_str().unwrap().to_string(), cell["cores"].as_u64().unwrap(), round3(m)));
    }
    let base = medians.iter().find(|(s, c, _)| s == "sequential" && *c == 1).unwrap().2;
    for (cell, (_, cores, m)) in cells.iter().zip(&medians) {
        let speedup = round3(base / m);
        assert_eq!(cell["speedup"].as_f64().unwrap(), speedup, "{cell}");
        assert_eq!(cell["efficiency"].as_f64().unwrap(), round3(base / m / *cores as f64), "{cell}");
    }
    // The runs did not overlap: a series runs one job at a time.
    intervals.sort();
    for pair in intervals.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "jobs overlapped: {pair:?}");
    }

    let csv = server.client.get(server.url(&format!("{location}?format=csv"))).send().await.unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "strategy,cores,runs,median_wall_ms,min_wall_ms,max_wall_ms,speedup,efficiency");
    assert_eq!(lines.len(), 7);
    assert!(lines[1].starts_with(&format!("sequential,1,2,{base},")), "{}", lines[1]);
    let md = server
        .client
        .get(server.url(&format!("{location}?format=markdown")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(md.starts_with("| strategy | cores | runs |"), "{md}");
    assert_eq!(md.lines().count(), 8);
}

async fn bad_comparisons_name_the_field(backend: Backend) {
    let server = TestServer::start(backend).await;
    for (body, field) in [
        (json!({"numbers": [1], "strategies": ["fibers"]}), "strategies[0]"),
        (json!({"numbers": [1], "strategies": []}), "strategies"),
        (json!({"numbers": [1], "cores": [0]}), "cores[0]"),
        (json!({"numbers": [1], "cores": 2}), "cores"),
        (json!({"numbers": [1], "repeats": 11}), "repeats"),
        (json!({"numbers": [1], "strategy": "threads"}), "strategy"),
        (json!({"numbers": [1, 4000000000_i64]}), "numbers[1]"),
    ] {
        let response = server.client.post(server.url("/v1/comparisons")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 422, "{body}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{body}: {problem}");
    }
    let (status, _) = server.get_json("/v1/comparisons/0193a5e4-0000-7000-8000-000000000000").await;
    assert_eq!(status, 404);
}

crate::backend_tests!(a_comparison_table_agrees_with_its_jobs_cell_by_cell, bad_comparisons_name_the_field);
