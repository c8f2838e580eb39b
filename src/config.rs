//! The command line. Every server option is also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

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

    /// Database URL: sqlite://PATH (created when missing).
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
    /// Options with every default, as `squared serve` with no flags would have.
    pub fn defaults() -> Self {
        match Cli::parse_from(["squared", "serve"]).command {
            Command::Serve(args) => *args,
            _ => unreachable!("parsed `serve`"),
        }
    }
}
