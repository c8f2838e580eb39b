//! The command line. Every server option is also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::worker::WorkerArgs;

/// squared — square numbers sequentially, on threads or on worker processes, and measure which wins.
#[derive(Debug, Parser)]
#[command(name = "squared", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (scheduler and workers included).
    Serve(Box<ServeArgs>),
    /// Print the OpenAPI document generated from the code (YAML).
    Openapi,
    #[command(flatten)]
    Client(crate::cli::Verb),
    /// A worker subprocess; started by `squared serve`, not by people.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Options of `squared serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "SQUARED_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Database URL: sqlite://PATH (created when missing) or postgres://USER@HOST/DB.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://squared.db")]
    pub database: String,

    /// This node's core budget: the cores all running jobs may use together [default: available cores].
    #[arg(long, env = "SQUARED_MAX_CORES")]
    pub max_cores: Option<u32>,

    /// The most cores one job may ask for (422 above it).
    #[arg(long, env = "SQUARED_MAX_CORES_PER_JOB", default_value_t = 1024)]
    pub max_cores_per_job: u32,

    /// The most numbers one job may have (413 above it).
    #[arg(long, env = "SQUARED_MAX_NUMBERS", default_value_t = 10_000_000)]
    pub max_numbers: u64,

    /// The most chunks one job may be split into (422 above it).
    #[arg(long, env = "SQUARED_MAX_CHUNKS", default_value_t = 100_000)]
    pub max_chunks: u64,

    /// The largest request body in bytes (413 above it).
    #[arg(long, env = "SQUARED_MAX_BODY_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// The most `simulate.sleep_ms` per number (422 above it).
    #[arg(long, env = "SQUARED_MAX_SLEEP_MS", default_value_t = 1000)]
    pub max_sleep_ms: u64,

    /// The most `simulate.spin` iterations per number (422 above it).
    #[arg(long, env = "SQUARED_MAX_SPIN", default_value_t = 10_000_000)]
    pub max_spin: u64,

    /// Refuse new jobs with 429 while this many are queued (whole database) [default: no limit].
    #[arg(long, env = "SQUARED_MAX_QUEUED")]
    pub max_queued: Option<u64>,

    /// Bounds every job's run, like a server-wide timeout_ms (e.g. 90s, 30m) [default: none].
    #[arg(long, env = "SQUARED_MAX_JOB_DURATION", value_parser = parse_duration)]
    pub max_job_duration: Option<Duration>,

    /// On SIGTERM/SIGINT, how long running jobs may take to finish before they are stopped and re-queued.
    #[arg(long, env = "SQUARED_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,

    /// Finished jobs and their results are deleted this long after they end.
    #[arg(long, env = "SQUARED_RETENTION", value_parser = parse_duration, default_value = "7d")]
    pub retention: Duration,

    /// How long an Idempotency-Key is remembered.
    #[arg(long, env = "SQUARED_IDEMPOTENCY_TTL", value_parser = parse_duration, default_value = "24h")]
    pub idempotency_ttl: Duration,

    /// An API key; repeat for several. When any is set, every /v1 call needs `Authorization: Bearer KEY`.
    #[arg(long = "api-key", env = "SQUARED_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,

    /// The key that signs webhook deliveries (Squared-Signature); required for jobs with a callback_url.
    #[arg(long, env = "SQUARED_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// A callback host exempt from the address checks (loopback, private, link-local, metadata); repeatable.
    #[arg(long = "allow-callback-host", env = "SQUARED_ALLOW_CALLBACK_HOSTS", value_delimiter = ',')]
    pub allow_callback_hosts: Vec<String>,

    /// Webhook delivery attempts before giving up (exponential backoff between them).
    #[arg(long, env = "SQUARED_WEBHOOK_MAX_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=30))]
    pub webhook_max_attempts: u32,

    /// How long a node's claim on a chunk lasts without a heartbeat; after it, another node re-runs the chunk.
    #[arg(long, env = "SQUARED_LEASE", value_parser = parse_duration, default_value = "15s")]
    pub lease: Duration,

    /// Database connections: PostgreSQL's pool size, or SQLite's reader threads
    /// [default: 16 for PostgreSQL; for SQLite, the machine's cores, at least 2].
    #[arg(long, env = "SQUARED_DB_POOL_SIZE", value_parser = clap::value_parser!(u32).range(1..))]
    pub db_pool_size: Option<u32>,

    /// This node's name in chunk records [default: hostname:port].
    #[arg(long, env = "SQUARED_NODE_NAME")]
    pub node_name: Option<String>,

    /// Log format.
    #[arg(long, env = "SQUARED_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The executable started for worker subprocesses [default: this binary].
    #[arg(long, env = "SQUARED_WORKER_EXE", hide = true)]
    pub worker_exe: Option<PathBuf>,
}

impl ServeArgs {
    /// `--db-pool-size`, or its default for the database. SQLite reads are
    /// short (a document, a page of results) and each reader is a thread: one
    /// per core keeps them in parallel, where more only add thread wake-ups
    /// under load (16 readers ran ~15 % fewer tiny jobs per second than 2, on 2 cores).
    pub fn db_pool_size(&self) -> u32 {
        self.db_pool_size.unwrap_or_else(|| match self.database.starts_with("sqlite:") {
            true => std::thread::available_parallelism().map_or(2, |n| n.get() as u32).max(2),
            false => 16,
        })
    }
}

/// Parses a duration such as `250ms`, `30s`, `15m`, `24h` or `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30s, 15m, 24h or 7d"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use ms, s, m, h or d")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        // Environment variables would override the defaults under test.
        let argv = ["squared", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv).expect("the arguments parse").command {
            Command::Serve(args) => *args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn the_pool_size_defaults_per_database_and_refuses_zero() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get() as u32).max(2);
        assert_eq!(serve_args(&["--database", "sqlite://x.db"]).db_pool_size(), cores);
        assert_eq!(serve_args(&["--database", "postgres://u@h/d"]).db_pool_size(), 16);
        assert_eq!(serve_args(&["--database", "sqlite://x.db", "--db-pool-size", "5"]).db_pool_size(), 5);
        let zero = ["squared", "serve", "--db-pool-size", "0"];
        assert!(Cli::try_parse_from(zero).unwrap_err().to_string().contains("--db-pool-size"));
    }
}
