//! The client verbs, run as subprocesses against a live server: output,
//! results and exit codes.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::helpers::*;

/// Runs `squared ARGS` against `server` (stdin optional); returns the output.
fn squared(server: &TestServer, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_squared"))
        .args(args)
        .env("SQUARED_URL", &server.base)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn json_out(out: &Output) -> Value {
    assert!(out.status.success(), "exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

async fn every_client_verb_works_against_a_live_server(backend: Backend) {
    let server = TestServer::start(backend).await;
    // submit from arguments, wait, result
    let doc =
        json_out(&squared(&server, &["submit", "3", "-4", "5", "--strategy", "processes", "--output", "json"], None));
    let id = doc["id"].as_str().unwrap().to_string();
    let out = squared(&server, &["wait", &id, "--output", "json"], None);
    assert_eq!(json_out(&out)["status"], "succeeded");
    let result = json_out(&squared(&server, &["result", &id], None));
    assert_eq!(result["squares"], serde_json::json!([9, 16, 25]));

    // stdin and a range, NDJSON into a file, paging
    let doc = json_out(&squared(&server, &["submit", "-", "--output", "json"], Some("7, 8\n9")));
    assert_eq!(doc["request"]["count"], 3);
    let doc = json_out(&squared(&server, &["submit", "--range", "10:0:-2", "--output", "json"], None));
    let id = doc["id"].as_str().unwrap().to_string();
    assert!(squared(&server, &["wait", &id], None).status.success());
    let file = tempfile::NamedTempFile::new().unwrap();
    let out = squared(&server, &["result", &id, "--ndjson", "-o", file.path().to_str().unwrap()], None);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(file.path()).unwrap(), "100\n64\n36\n16\n4\n");
    let page = json_out(&squared(&server, &["result", &id, "--offset", "1", "--limit", "2"], None));
    assert_eq!(page["squares"], serde_json::json!([64, 36]));

    // status and list, as JSON and as a table
    let status = json_out(&squared(&server, &["status", &id, "--output", "json"], None));
    assert_eq!(status["id"], id.as_str());
    let table = squared(&server, &["list", "--limit", "10"], None);
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    assert!(table.contains(&id), "{table}");

    // cancel: the job ends canceled, and wait says so with exit 1
    let doc = json_out(&squared(
        &server,
        &["submit", "1", "2", "--sleep-ms", "500", "--cores", "1", "--output", "json"],
        None,
    ));
    let slow = doc["id"].as_str().unwrap().to_string();
    assert!(squared(&server, &["cancel", &slow], None).status.success());
    let out = squared(&server, &["wait", &slow], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("canceled"), "{err}");

    // compare prints the table
    let out = squared(&server, &["compare", "--range", "0:500", "--repeats", "1", "--cores", "1"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("| strategy | cores |"), "{table}");
    assert_eq!(table.lines().count(), 5, "{table}");
}

async fn client_errors_exit_nonzero_with_one_line(backend: Backend) {
    let server = TestServer::start(backend).await;
    let out = squared(&server, &["status", "0193a5e4-0000-7000-8000-000000000000"], None);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("404"), "{err}");
    let out = squared(&server, &["submit", "4000000000"], None);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8(out.stderr).unwrap().contains("numbers[0]"));
    let out =
        Command::new(env!("CARGO_BIN_EXE_squared")).args(["list", "--server", "http://127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8(out.stderr).unwrap().starts_with("squared: cannot reach"));
}

crate::backend_tests!(every_client_verb_works_against_a_live_server, client_errors_exit_nonzero_with_one_line);
