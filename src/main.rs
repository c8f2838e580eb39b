//! The `squared` binary: parse the command line, then serve, run a worker,
//! act as a client of a server, or print the OpenAPI document. Everything
//! else lives in the library.

use clap::Parser;
use squared::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            squared::telemetry::init(args.log_format);
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("squared-async").build()?;
            runtime.block_on(squared::server::serve(*args))
        }
        Command::Openapi => {
            print!("{}", squared::api::openapi_yaml());
            Ok(())
        }
        Command::Worker(args) => squared::worker::run(&args),
        Command::Client(verb) => match squared::cli::run(verb) {
            Ok(()) => Ok(()),
            Err(failure) => {
                eprintln!("squared: {}", failure.message());
                std::process::exit(failure.exit_code());
            }
        },
    }
}
