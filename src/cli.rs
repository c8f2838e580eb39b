//! The client verbs of the `squared` binary: `submit`, `status`, `wait`,
//! `result`, `cancel`, `list` and `compare`, over the HTTP API.
//!
//! Exit status: 0 when the verb succeeded (for `wait`, when the job
//! succeeded); 1 when the job failed or was canceled; 3 when the server could
//! not be reached or refused the request — with a one-line reason on stderr.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

/// Options every client verb takes.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The squared server.
    #[arg(long, env = "SQUARED_URL", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "SQUARED_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How to print answers.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Json,
    Table,
}

/// The client verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Submit a job: numbers as arguments, `-` for stdin, `--file`, or `--range`.
    Submit(Box<SubmitArgs>),
    /// Show a job.
    Status {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a job to its end with a progress bar; exit 0 only if it succeeded.
    Wait {
        id: String,
        /// Give up after this many seconds (exit 3).
        #[arg(long)]
        timeout: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a job's squares (JSON lines of one square each with --ndjson).
    Result {
        id: String,
        /// Write to this file instead of stdout.
        #[arg(long, short = 'o')]
        out: Option<std::path::PathBuf>,
        #[arg(long)]
        offset: Option<u64>,
        #[arg(long)]
        limit: Option<u64>,
        /// One square per line instead of the JSON document.
        #[arg(long)]
        ndjson: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job.
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Filter by metadata: KEY=VALUE (repeatable).
        #[arg(long = "metadata", value_parser = key_value)]
        metadata: Vec<(String, String)>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Compare strategies and core counts on the same numbers; prints the table.
    Compare(Box<CompareArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct Numbers {
    /// Numbers to square; `-` reads them from stdin (whitespace or comma separated).
    #[arg(allow_negative_numbers = true)]
    pub numbers: Vec<String>,
    /// Read numbers from this file.
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// A range START:END[:STEP] (Python semantics) instead of numbers.
    #[arg(long, allow_hyphen_values = true)]
    pub range: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct JobOptions {
    #[arg(long)]
    pub chunk_size: Option<u64>,
    /// shared_memory or pipe (with --strategy processes).
    #[arg(long)]
    pub transport: Option<String>,
    /// Per-number sleep, milliseconds.
    #[arg(long)]
    pub sleep_ms: Option<u64>,
    /// Per-number busy-loop iterations.
    #[arg(long)]
    pub spin: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i64>,
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
    #[arg(long)]
    pub callback_url: Option<String>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_parser = key_value)]
    pub metadata: Vec<(String, String)>,
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub numbers: Numbers,
    #[arg(long)]
    pub cores: Option<u32>,
    /// sequential, threads or processes.
    #[arg(long)]
    pub strategy: Option<String>,
    #[command(flatten)]
    pub options: JobOptions,
    /// Send this Idempotency-Key (a retry with the same key returns the same job).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub numbers: Numbers,
    /// Strategies, comma separated [default: all three].
    #[arg(long, value_delimiter = ',')]
    pub strategies: Vec<String>,
    /// Core counts, comma separated [default: 1 and the server's budget].
    #[arg(long, value_delimiter = ',')]
    pub cores: Vec<u32>,
    #[arg(long)]
    pub repeats: Option<u32>,
    #[command(flatten)]
    pub options: JobOptions,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Why a verb did not succeed, and the exit status that says so.
#[derive(Debug)]
pub enum Failure {
    /// The job ended, but not in success (exit 1).
    Job(String),
    /// The server was unreachable or refused (exit 3).
    Request(String),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Job(_) => 1,
            Failure::Request(_) => 3,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Failure::Job(m) | Failure::Request(m) => m,
        }
    }
}

type Outcome = Result<(), Failure>;

struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Failure::Request(format!("HTTP client: {e}")))?;
        Ok(Client { http, base: args.server.trim_end_matches('/').to_string(), key: args.api_key.clone() })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends, and turns any non-2xx answer into a one-line failure.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let response =
            request.send().await.map_err(|e| Failure::Request(format!("cannot reach {}: {e}", self.base)))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let problem: Value = response.json().await.unwrap_or(Value::Null);
        let detail = problem["detail"].as_str().or(problem["title"].as_str()).unwrap_or("no details").to_string();
        Err(Failure::Request(format!("{} {}: {detail}", status.as_u16(), status.canonical_reason().unwrap_or(""))))
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value, Failure> {
        self.send(request).await?.json().await.map_err(|e| Failure::Request(format!("unreadable answer: {e}")))
    }
}

impl Verb {
    fn client(&self) -> &ClientArgs {
        match self {
            Verb::Submit(a) => &a.client,
            Verb::Compare(a) => &a.client,
            Verb::Status { client, .. }
            | Verb::Wait { client, .. }
            | Verb::Result { client, .. }
            | Verb::Cancel { client, .. }
            | Verb::List { client, .. } => client,
        }
    }
}

/// Runs a client verb; the caller turns the outcome into the exit status.
pub fn run(verb: Verb) -> Outcome {
    let args = &verb.client().clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Request(format!("runtime: {e}")))?;
    runtime.block_on(async {
        let client = Client::new(args)?;
        match verb {
            Verb::Submit(submit) => {
                let mut body = job_body(&submit.numbers, &submit.options)?;
                if let Some(cores) = submit.cores {
                    body.insert("cores".into(), json!(cores));
                }
                if let Some(strategy) = &submit.strategy {
                    body.insert("strategy".into(), json!(strategy));
                }
                let mut request = client.request(reqwest::Method::POST, "/v1/jobs").json(&body);
                if let Some(key) = &submit.idempotency_key {
                    request = request.header("idempotency-key", key);
                }
                let doc = client.json(request).await?;
                print_job(args.output, &doc);
                Ok(())
            }
            Verb::Status { id, .. } => {
                let doc = client.json(client.request(reqwest::Method::GET, &format!("/v1/jobs/{id}"))).await?;
                print_job(args.output, &doc);
                Ok(())
            }
            Verb::Wait { id, timeout, .. } => {
                let waiting = wait(&client, &id);
                let doc = match timeout {
                    Some(secs) => tokio::time::timeout(Duration::from_secs(secs), waiting)
                        .await
                        .map_err(|_| Failure::Request(format!("job {id} did not end within {secs} s")))??,
                    None => waiting.await?,
                };
                print_job(args.output, &doc);
                match doc["status"].as_str() {
                    Some("succeeded") => Ok(()),
                    status => Err(Failure::Job(format!(
                        "job {id} {}: {}",
                        status.unwrap_or("ended"),
                        doc["error"]["detail"].as_str().unwrap_or("no details")
                    ))),
                }
            }
            Verb::Result { id, out, offset, limit, ndjson, .. } => {
                let mut path = format!("/v1/jobs/{id}/result?");
                if let Some(o) = offset {
                    path.push_str(&format!("offset={o}&"));
                }
                if let Some(l) = limit {
                    path.push_str(&format!("limit={l}&"));
                }
                let mut request = client.request(reqwest::Method::GET, path.trim_end_matches(['?', '&']));
                if ndjson {
                    request = request.header("accept", "application/x-ndjson");
                }
                let response = client.send(request).await?;
                let mut sink: Box<dyn Write> = match &out {
                    Some(path) => Box::new(std::io::BufWriter::new(
                        std::fs::File::create(path)
                            .map_err(|e| Failure::Request(format!("{}: {e}", path.display())))?,
                    )),
                    None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
                };
                let mut stream = response.bytes_stream();
                while let Some(piece) = stream.next().await {
                    let piece = piece.map_err(|e| Failure::Request(format!("the result stream broke: {e}")))?;
                    sink.write_all(&piece).map_err(|e| Failure::Request(format!("writing: {e}")))?;
                }
                sink.flush().map_err(|e| Failure::Request(format!("writing: {e}")))?;
                Ok(())
            }
            Verb::Cancel { id, .. } => {
                let doc = client.json(client.request(reqwest::Method::POST, &format!("/v1/jobs/{id}/cancel"))).await?;
                print_job(args.output, &doc);
                Ok(())
            }
            Verb::List { status, limit, metadata, .. } => {
                let mut query = vec![("limit".to_string(), limit.to_string())];
                if let Some(s) = status {
                    query.push(("status".into(), s));
                }
                query.extend(metadata.into_iter().map(|(k, v)| (format!("metadata.{k}"), v)));
                let page = client.json(client.request(reqwest::Method::GET, "/v1/jobs").query(&query)).await?;
                match args.output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&page).unwrap_or_default()),
                    Output::Table => {
                        println!(
                            "{:<36}  {:<9}  {:<10}  {:>5}  {:>10}  {:>10}",
                            "ID", "STATUS", "STRATEGY", "CORES", "COUNT", "WALL_MS"
                        );
                        for job in page["jobs"].as_array().into_iter().flatten() {
                            println!("{}", job_row(job));
                        }
                    }
                }
                Ok(())
            }
            Verb::Compare(compare) => {
                let mut body = job_body(&compare.numbers, &compare.options)?;
                if !compare.strategies.is_empty() {
                    body.insert("strategies".into(), json!(compare.strategies));
                }
                if !compare.cores.is_empty() {
                    body.insert("cores".into(), json!(compare.cores));
                }
                if let Some(r) = compare.repeats {
                    body.insert("repeats".into(), json!(r));
                }
                let created = client.json(client.request(reqwest::Method::POST, "/v1/comparisons").json(&body)).await?;
                let id = created["id"].as_str().unwrap_or_default().to_string();
                eprintln!("comparison {id}: running");
                let table = loop {
                    let table =
                        client.json(client.request(reqwest::Method::GET, &format!("/v1/comparisons/{id}"))).await?;
                    if table["status"] != "running" {
                        break table;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                };
                match args.output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&table).unwrap_or_default()),
                    Output::Table => {
                        let path = format!("/v1/comparisons/{id}?format=markdown");
                        let text = client.send(client.request(reqwest::Method::GET, &path)).await?.text().await;
                        print!("{}", text.map_err(|e| Failure::Request(format!("unreadable answer: {e}")))?);
                    }
                }
                match table["status"].as_str() {
                    Some("succeeded") => Ok(()),
                    _ => Err(Failure::Job(format!("comparison {id} failed: some of its jobs did not succeed"))),
                }
            }
        }
    })
}

/// The job fields common to `submit` and `compare`.
fn job_body(numbers: &Numbers, options: &JobOptions) -> Result<Map<String, Value>, Failure> {
    let mut body = Map::new();
    match (&numbers.range, numbers.numbers.is_empty(), &numbers.file) {
        (Some(range), true, None) => {
            let parts: Vec<i64> = range
                .split(':')
                .map(|p| p.trim().parse::<i64>())
                .collect::<Result<_, _>>()
                .map_err(|_| Failure::Request(format!("--range {range:?} is not START:END[:STEP]")))?;
            let (start, end, step) = match parts.as_slice() {
                [s, e] => (*s, *e, 1),
                [s, e, st] => (*s, *e, *st),
                _ => return Err(Failure::Request(format!("--range {range:?} is not START:END[:STEP]"))),
            };
            body.insert("range".into(), json!({"start": start, "end": end, "step": step}));
        }
        (None, false, None) | (None, true, Some(_)) => {
            let text = match (&numbers.file, numbers.numbers.as_slice()) {
                (Some(path), _) => {
                    std::fs::read_to_string(path).map_err(|e| Failure::Request(format!("{}: {e}", path.display())))?
                }
                (None, [dash]) if dash == "-" => {
                    let mut text = String::new();
                    std::io::stdin().read_to_string(&mut text).map_err(|e| Failure::Request(format!("stdin: {e}")))?;
                    text
                }
                (None, args) => args.join(" "),
            };
            let list: Vec<i64> = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|t| !t.is_empty())
                .map(|t| t.parse::<i64>().map_err(|_| Failure::Request(format!("{t:?} is not an integer"))))
                .collect::<Result<_, _>>()?;
            body.insert("numbers".into(), json!(list));
        }
        _ => return Err(Failure::Request("give numbers, `-`, --file or --range (one of them)".into())),
    }
    let o = options;
    for (key, value) in [
        ("chunk_size", o.chunk_size.map(|v| json!(v))),
        ("transport", o.transport.as_ref().map(|v| json!(v))),
        ("priority", o.priority.map(|v| json!(v))),
        ("timeout_ms", o.timeout_ms.map(|v| json!(v))),
        ("max_attempts", o.max_attempts.map(|v| json!(v))),
        ("callback_url", o.callback_url.as_ref().map(|v| json!(v))),
    ] {
        if let Some(value) = value {
            body.insert(key.into(), value);
        }
    }
    if o.sleep_ms.is_some() || o.spin.is_some() {
        body.insert("simulate".into(), json!({"sleep_ms": o.sleep_ms.unwrap_or(0), "spin": o.spin.unwrap_or(0)}));
    }
    if !o.metadata.is_empty() {
        body.insert("metadata".into(), json!(o.metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()));
    }
    Ok(body)
}

/// Follows the event stream to the `end` event, drawing progress on stderr.
async fn wait(client: &Client, id: &str) -> Result<Value, Failure> {
    let bar = std::io::stderr().is_terminal();
    let mut last_id: Option<String> = None;
    loop {
        let mut request = client.request(reqwest::Method::GET, &format!("/v1/jobs/{id}/events"));
        if let Some(last) = &last_id {
            request = request.header("last-event-id", last);
        }
        let response = client.send(request).await?;
        let mut stream = response.bytes_stream();
        let mut buffer = String::new();
        while let Some(piece) = stream.next().await {
            let Ok(piece) = piece else { break }; // reconnect below
            buffer.push_str(&String::from_utf8_lossy(&piece));
            while let Some(at) = buffer.find("\n\n") {
                let block: String = buffer.drain(..at + 2).collect();
                let (mut kind, mut data) = ("", String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = if v.trim() == "end" { "end" } else { "update" };
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        last_id = Some(v.trim().to_string());
                    }
                }
                let Ok(doc) = serde_json::from_str::<Value>(&data) else { continue };
                if bar {
                    draw(&doc);
                }
                if kind == "end" {
                    if bar {
                        eprintln!();
                    }
                    return Ok(doc);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn draw(doc: &Value) {
    let done = doc["progress"]["chunks_done"].as_u64().unwrap_or(0);
    let total = doc["progress"]["chunks_total"].as_u64().unwrap_or(0).max(1);
    let width = 30;
    let filled = (done * width / total) as usize;
    eprint!(
        "\r[{}{}] {done}/{total} chunks, {} numbers, {}   ",
        "#".repeat(filled),
        "-".repeat(width as usize - filled),
        doc["progress"]["numbers_done"].as_u64().unwrap_or(0),
        doc["status"].as_str().unwrap_or("?"),
    );
    let _ = std::io::stderr().flush();
}

fn job_row(job: &Value) -> String {
    format!(
        "{:<36}  {:<9}  {:<10}  {:>5}  {:>10}  {:>10}",
        job["id"].as_str().unwrap_or(""),
        job["status"].as_str().unwrap_or(""),
        job["request"]["strategy"].as_str().unwrap_or(""),
        job["request"]["cores"].as_u64().unwrap_or(0),
        job["request"]["count"].as_u64().unwrap_or(0),
        job["timing"]["wall_ms"].as_f64().map_or_else(|| "-".to_string(), |w| format!("{w:.3}")),
    )
}

fn print_job(output: Output, doc: &Value) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(doc).unwrap_or_default()),
        Output::Table => {
            println!(
                "{:<36}  {:<9}  {:<10}  {:>5}  {:>10}  {:>10}",
                "ID", "STATUS", "STRATEGY", "CORES", "COUNT", "WALL_MS"
            );
            println!("{}", job_row(doc));
            if let Some(detail) = doc["error"]["detail"].as_str() {
                println!("error: {detail}");
            }
        }
    }
}
