//! Webhooks against a real HTTP receiver: signed, retried, durable across a
//! restart, and never sent to forbidden addresses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::*;

const SECRET: &str = "whsec-test-1";

/// A receiver in the test process: records every delivery, answers 500 to the first `fail_first`.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap(), fail_first).await
    }

    async fn start_on(addr: SocketAddr, fail_first: usize) -> Receiver {
        let hits: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
        let failures = Arc::new(AtomicUsize::new(fail_first));
        let (h, f) = (hits.clone(), failures.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (h, f) = (h.clone(), f.clone());
                async move {
                    h.lock().unwrap().push((headers, body));
                    let fail = f.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                    if fail {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, hits, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks `t=…,v1=…` against HMAC-SHA256(secret, "t.body").
fn verify(headers: &HeaderMap, body: &[u8]) {
    let header = headers["squared-signature"].to_str().unwrap();
    let (t, v1) = header.split_once(',').unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let v1 = v1.strip_prefix("v1=").unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let want: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(v1, want, "signature");
    let age = unix_now() - t.parse::<i64>().unwrap();
    assert!((0..120).contains(&age), "timestamp {t} is {age} s old");
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Waits for the job's callback to reach `state`.
async fn wait_callback(server: &TestServer, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc = server.job(id).await;
        if doc["callback"]["state"] == state {
            return doc;
        }
        assert!(Instant::now() < deadline, "callback never became {state}: {doc}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_finished_job_is_delivered_signed(backend: Backend) {
    let receiver = Receiver::start(0).await;
    let server =
        TestServer::start_with(backend, &["--webhook-secret", SECRET, "--allow-callback-host", "127.0.0.1"]).await;
    let id = server.submit(&json!({"numbers": [3, 4], "callback_url": receiver.url()})).await;
    let doc = wait_callback(&server, &id, "delivered").await;
    assert_eq!(receiver.count(), 1);
    let (headers, body) = receiver.hits.lock().unwrap()[0].clone();
    verify(&headers, &body);
    assert_eq!(headers["content-type"], "application/json");
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((sent["id"].as_str(), sent["status"].as_str()), (Some(id.as_str()), Some("succeeded")));
    let attempts = doc["callback"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["status_code"], 204);
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("squared_webhook_deliveries_total{outcome=\"delivered\"} 1"), "{metrics}");
}

async fn a_failing_receiver_is_retried_with_backoff(backend: Backend) {
    let receiver = Receiver::start(2).await;
    let server =
        TestServer::start_with(backend, &["--webhook-secret", SECRET, "--allow-callback-host", "127.0.0.1"]).await;
    let id = server.submit(&json!({"numbers": [5], "callback_url": receiver.url()})).await;
    let doc = wait_callback(&server, &id, "delivered").await;
    let codes: Vec<u64> =
        doc["callback"]["attempts"].as_array().unwrap().iter().map(|a| a["status_code"].as_u64().unwrap()).collect();
    assert_eq!(codes, [500, 500, 204]);
    assert_eq!(receiver.count(), 3);
    for (headers, body) in receiver.hits.lock().unwrap().iter() {
        verify(headers, body);
    }
}

async fn a_delivery_pending_at_a_restart_is_made_after_it(backend: Backend) {
    // A port with nobody listening: deliveries fail until the receiver starts.
    let addr = Receiver::start(0).await.addr;
    let mut server =
        TestServer::start_with(backend, &["--webhook-secret", SECRET, "--allow-callback-host", "127.0.0.1"]).await;
    let id = server.submit(&json!({"numbers": [6], "callback_url": format!("http://{addr}/hook")})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.job(&id).await["callback"]["attempts"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no attempt was made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.terminate();
    let receiver = Receiver::start_on(addr, 0).await;
    server.restart();
    let doc = wait_callback(&server, &id, "delivered").await;
    let attempts = doc["callback"]["attempts"].as_array().unwrap();
    assert!(attempts[0]["error"].as_str().is_some(), "the first attempt found nobody: {attempts:?}");
    assert_eq!(attempts.last().unwrap()["status_code"], 204);
    assert_eq!(receiver.count(), 1);
}

async fn forbidden_callback_addresses_are_refused(backend: Backend) {
    let receiver = Receiver::start(0).await;
    let server = TestServer::start_with(backend, &["--webhook-secret", SECRET]).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
        "not a url",
        "ftp://example.com/hook",
    ] {
        let response = server.post_job(&json!({"numbers": [1], "callback_url": url})).await;
        assert_eq!(response.status(), 422, "{url}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], "callback_url", "{url}: {problem}");
    }
    // A name that resolves to loopback passes the submit check and is refused after resolution.
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    let id = server.submit(&json!({"numbers": [1], "callback_url": url})).await;
    let doc = wait_callback(&server, &id, "failed").await;
    let error = doc["callback"]["attempts"][0]["error"].as_str().unwrap().to_string();
    assert!(error.contains("resolves to") && error.contains("loopback"), "{error}");
    assert_eq!(receiver.count(), 0, "nothing reached the forbidden address");
}

crate::backend_tests!(
    a_finished_job_is_delivered_signed,
    a_failing_receiver_is_retried_with_backoff,
    a_delivery_pending_at_a_restart_is_made_after_it,
    forbidden_callback_addresses_are_refused,
);
