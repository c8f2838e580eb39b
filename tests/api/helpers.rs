//! Test helpers: a real `squared serve` process on port 0 with a fresh SQLite
//! file, and a real HTTP client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const MAX_ABS: i64 = 3_037_000_499;

/// Which database a test server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server tests create their databases on (trust auth).
pub fn postgres_admin_url() -> String {
    std::env::var("SQUARED_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs `sql` on the admin database (blocking; used from sync and async code alike).
fn admin_sql(sql: String) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            use sqlx::Connection;
            let url = postgres_admin_url();
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap_or_else(|e| {
                panic!("PostgreSQL tests need a server at {url} (set SQUARED_TEST_POSTGRES_URL): {e}")
            });
            sqlx::Executor::execute(&mut conn, sql.as_str()).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        });
    })
    .join()
    .unwrap_or_else(|_| panic!("admin SQL failed"));
}

/// A fresh PostgreSQL database for one test server (or cluster); dropped with it.
pub struct TestDatabase {
    name: String,
    pub url: String,
}

impl TestDatabase {
    pub fn create(tag: &str) -> Self {
        let name = format!("squared_test_{}", tag.replace('-', "_"));
        admin_sql(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        admin_sql(format!("CREATE DATABASE {name}"));
        let admin = postgres_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
        TestDatabase { url: format!("{base}/{name}"), name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        admin_sql(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// A running server, its data directory, and a client for it.
pub struct TestServer {
    child: Option<Child>,
    pub base: String,
    pub client: reqwest::Client,
    /// A marker in the environment of the server and its workers, to find them in /proc.
    pub tag: String,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Set for PostgreSQL servers; dropped after the server.
    database: Option<TestDatabase>,
    /// A database shared with other servers (a cluster node).
    shared_url: Option<String>,
}

static NEXT_TAG: AtomicU64 = AtomicU64::new(0);

impl TestServer {
    /// A server with a 2-core budget on a fresh database.
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, &[]).await
    }

    /// A server with extra `serve` arguments on a fresh database.
    pub async fn start_with(backend: Backend, args: &[&str]) -> TestServer {
        Self::start_with_env(backend, args, &[]).await
    }

    /// A server with extra arguments and environment variables.
    pub async fn start_with_env(backend: Backend, args: &[&str], env: &[(&str, &str)]) -> TestServer {
        let tempdir = tempfile::tempdir().expect("temp dir");
        let dir = tempdir.path().to_path_buf();
        let tag = format!("{}-{}", std::process::id(), NEXT_TAG.fetch_add(1, Ordering::Relaxed));
        let mut server = TestServer {
            child: None,
            base: String::new(),
            client: reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap(),
            tag,
            dir,
            _tempdir: Some(tempdir),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            database: None,
            shared_url: None,
        };
        if backend == Backend::Postgres {
            server.database = Some(TestDatabase::create(&server.tag));
        }
        server.launch();
        server
    }

    /// A cluster node: a server on a database other nodes share.
    pub async fn start_node(database_url: &str, args: &[&str]) -> TestServer {
        let tempdir = tempfile::tempdir().expect("temp dir");
        let mut server = TestServer {
            child: None,
            base: String::new(),
            client: reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap(),
            tag: format!("{}-{}", std::process::id(), NEXT_TAG.fetch_add(1, Ordering::Relaxed)),
            dir: tempdir.path().to_path_buf(),
            _tempdir: Some(tempdir),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            database: None,
            shared_url: Some(database_url.to_string()),
        };
        server.launch();
        server
    }

    pub fn database_url(&self) -> String {
        match (&self.shared_url, &self.database) {
            (Some(url), _) => url.clone(),
            (None, Some(db)) => db.url.clone(),
            (None, None) => format!("sqlite://{}", self.dir.join("squared.db").display()),
        }
    }

    /// The directory of a SQLite server's result files (big jobs' squares).
    pub fn result_files_dir(&self) -> PathBuf {
        self.dir.join("squared.db-results")
    }

    /// The names in [`TestServer::result_files_dir`], sorted (none when it is missing).
    pub fn result_files(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.result_files_dir()) else { return Vec::new() };
        let mut names: Vec<String> = entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        // Two cores unless the test asks for another budget.
        let cores = match self.args.iter().any(|a| a == "--max-cores") {
            true => &[][..],
            false => &["--max-cores", "2"][..],
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_squared"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database", &self.database_url()])
            .args(cores)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("SQUARED_TEST_TAG", &self.tag)
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start squared serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("squared listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; log: {}", self.log()));
        self.base = addr.to_string();
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL, like a crash or power loss of the process.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and wait for the process to exit.
    pub fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        kill(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Adds `serve` arguments for the next (re)start.
    pub fn add_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|s| s.to_string()));
    }

    /// Starts the server again on the same database.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        self.launch();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post_job(&self, body: &Value) -> reqwest::Response {
        self.client.post(self.url("/v1/jobs")).json(body).send().await.expect("POST /v1/jobs")
    }

    /// Submits a job that must be accepted; returns its id.
    pub async fn submit(&self, body: &Value) -> String {
        let response = self.post_job(body).await;
        let status = response.status();
        let doc: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "submit {body}: {doc}");
        doc["id"].as_str().unwrap().to_string()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, doc) = self.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "{doc}");
        doc
    }

    /// Long-polls until the job ends (or panics after `secs`).
    pub async fn wait_end(&self, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (status, doc) = self.get_json(&format!("/v1/jobs/{id}?wait=5")).await;
            assert_eq!(status, 200, "{doc}");
            if ["succeeded", "failed", "canceled"].contains(&doc["status"].as_str().unwrap()) {
                return doc;
            }
            assert!(Instant::now() < deadline, "job {id} did not end in {secs}s: {doc}");
        }
    }

    /// Waits (up to `secs`) until every core of the node is free again
    /// (`squared_cores_in_use 0`); panics with `what` if one never comes back.
    pub async fn wait_cores_free(&self, secs: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let metrics = self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
            if metrics.contains("squared_cores_in_use 0") {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {metrics}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for success and returns the whole result.
    pub async fn squares(&self, id: &str) -> Vec<i64> {
        let doc = self.wait_end(id, 120).await;
        assert_eq!(doc["status"], "succeeded", "{doc}");
        let (status, result) = self.get_json(&format!("/v1/jobs/{id}/result")).await;
        assert_eq!(status, 200, "{result}");
        assert_eq!(result["id"], id);
        result["squares"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
    }

    /// Processes (server and workers) carrying this server's tag, with their state letter.
    pub fn tagged_processes(&self) -> Vec<(u32, char, String)> {
        tagged_processes(&self.tag)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Worker processes die with the server; give the kernel a moment
        // before the database goes.
        drop(self.database.take());
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log());
        }
    }
}

/// Waits until the job reports at least `chunks` chunks done.
pub async fn wait_progress(server: &TestServer, id: &str, chunks: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.job(id).await["progress"]["chunks_done"].as_u64().unwrap() < chunks {
        assert!(std::time::Instant::now() < deadline, "job {id} made no progress");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Restarts the server with `--retention 1ms` and waits until its first purge deleted something.
pub async fn restart_with_retention_of_1ms(server: &mut TestServer) {
    server.terminate();
    server.add_args(&["--retention", "1ms"]);
    server.restart();
    assert!(
        eventually(10, || std::fs::read_to_string(server.log_path()).unwrap().contains("retention deleted")).await,
        "{}",
        server.log()
    );
}

/// Sends a signal to a process.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Every process whose environment has `SQUARED_TEST_TAG=tag`: (pid, state, cmdline).
pub fn tagged_processes(tag: &str) -> Vec<(u32, char, String)> {
    let marker = format!("SQUARED_TEST_TAG={tag}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let path = entry.path();
        let Ok(environ) = std::fs::read(path.join("environ")) else { continue };
        if !environ.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
            continue;
        }
        let state = read_state(&path).unwrap_or('?');
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        found.push((pid, state, cmdline.trim().to_string()));
    }
    found
}

fn read_state(proc_dir: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits until `check` holds or `secs` pass; returns whether it held.
pub async fn eventually(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// A small deterministic generator, so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `-MAX_ABS..=MAX_ABS`.
    pub fn number(&mut self) -> i64 {
        (self.next_u64() % (2 * MAX_ABS as u64 + 1)) as i64 - MAX_ABS
    }

    /// `n` random numbers with the edge cases mixed in.
    pub fn numbers(&mut self, n: usize) -> Vec<i64> {
        let mut v: Vec<i64> = (0..n).map(|_| self.number()).collect();
        for (i, edge) in [MAX_ABS, -MAX_ABS, 0, -1, 1].into_iter().enumerate() {
            if n > i {
                let at = (self.next_u64() % n as u64) as usize;
                v[at] = edge;
            }
        }
        v
    }
}

pub fn squares_of(numbers: &[i64]) -> Vec<i64> {
    numbers.iter().map(|n| n * n).collect()
}

pub fn range_job(start: i64, end: i64, step: i64) -> Value {
    json!({"range": {"start": start, "end": end, "step": step}})
}
