//! The `progress-gateway` command: parses arguments, sets up logging and runs
//! the gateway, a config check, or the upstream simulator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use progress_gateway::config::Config;
use progress_gateway::proxy::Gateway;
use progress_gateway::server;
use progress_gateway::simulator::{Behaviour, SimAuth, Simulator};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    version,
    about = "A caching gateway for Huawei Cloud job-progress APIs"
)]
struct Cli {
    /// Log line format (filter with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PGW_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides `listen` from the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Check a config file and exit non-zero naming the key (and line) at fault.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the simulator of both upstream APIs.
    Simulate {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Environment variable holding the X-Auth-Token to require (unset: no check).
        #[arg(long)]
        token_env: Option<String>,
        /// How long a job runs after its first poll.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        job_duration: Duration,
        /// Latency added to every answer.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        latency: Duration,
    },
}

/// How long open connections get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(checked) => {
                println!(
                    "{}: ok ({} projects)",
                    config.display(),
                    checked.projects.len()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{}: {error}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Serve { config, listen } => {
            let mut checked = match Config::load(&config) {
                Ok(checked) => checked,
                Err(error) => {
                    eprintln!("{}: {error}", config.display());
                    return ExitCode::from(2);
                }
            };
            if let Some(listen) = listen {
                checked.listen = listen;
            }
            let listener = match TcpListener::bind(checked.listen).await {
                Ok(l) => l,
                Err(error) => {
                    eprintln!("cannot listen on {}: {error}", checked.listen);
                    return ExitCode::FAILURE;
                }
            };
            let gateway = Gateway::new(checked);
            tokio::spawn(gateway.clone().prepare_credentials());
            tracing::info!(addr = %listener.local_addr().map_or(checked_addr(&gateway), |a| a), "progress-gateway listening");
            server::serve(
                listener,
                move |request| {
                    let gateway = gateway.clone();
                    async move { gateway.handle(request).await }
                },
                shutdown_signal(),
                DRAIN,
            )
            .await;
            ExitCode::SUCCESS
        }
        Command::Simulate {
            listen,
            token_env,
            job_duration,
            latency,
        } => {
            let token = match token_env.map(|var| std::env::var(&var).map_err(|_| var)) {
                Some(Err(var)) => {
                    eprintln!("environment variable {var} is not set");
                    return ExitCode::from(2);
                }
                Some(Ok(token)) => Some(token),
                None => None,
            };
            let listener = match TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(error) => {
                    eprintln!("cannot listen on {listen}: {error}");
                    return ExitCode::FAILURE;
                }
            };
            // Printed on stdout so scripts that bind port 0 learn the address.
            println!(
                "simulator listening on http://{}",
                listener.local_addr().expect("bound")
            );
            let simulator = Simulator::new(
                SimAuth {
                    token,
                    ..SimAuth::default()
                },
                Behaviour {
                    job_duration,
                    latency,
                    ..Behaviour::default()
                },
            );
            server::serve(
                listener,
                move |request| {
                    let simulator = simulator.clone();
                    async move { simulator.handle(request).await }
                },
                shutdown_signal(),
                Duration::from_secs(1),
            )
            .await;
            ExitCode::SUCCESS
        }
    }
}

fn checked_addr(gateway: &Gateway) -> SocketAddr {
    gateway.config().listen
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: no new connections, draining open ones");
}
