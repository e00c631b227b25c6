//! The `progress-gateway` command: parses arguments, sets up logging and runs
//! the gateway, a config check, or the upstream simulator.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use progress_gateway::config::Config;
use progress_gateway::proxy::Gateway;
use progress_gateway::server::{self, Tls};
use progress_gateway::simulator::{Behaviour, SimAuth, Simulator};
use progress_gateway::{admin, demo};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

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
        /// Overrides `[admin] listen` from the config.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Check a config file and exit non-zero naming the key (and line) at fault.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show what the gateway does: simulator, gateway and a crowd of pollers,
    /// live progress and a summary. No config, no cloud; ends by itself.
    Demo {
        #[arg(long, default_value_t = 500)]
        clients: usize,
        #[arg(long, default_value_t = 50)]
        jobs: usize,
        /// When the first job finishes.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        shortest: Duration,
        /// When the last job finishes.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        longest: Duration,
        #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
        poll_interval: Duration,
        /// The gateway's running_ttl.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        upstream_latency: Duration,
        /// Keep polling this long after the last job finished.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        linger: Duration,
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
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => serve(config, listen, admin_listen).await,
        Command::Demo {
            clients,
            jobs,
            shortest,
            longest,
            poll_interval,
            ttl,
            upstream_latency,
            linger,
        } => {
            let options = demo::Options {
                clients: clients.max(1),
                jobs: jobs.max(1),
                shortest,
                longest: longest.max(shortest),
                poll_interval,
                ttl,
                upstream_latency,
                linger,
            };
            match demo::run(options).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("demo: {error}");
                    ExitCode::FAILURE
                }
            }
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

/// Loads the config and applies the command-line overrides.
fn load(
    path: &Path,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
) -> Result<Config, String> {
    let mut config = Config::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    config.listen = listen.unwrap_or(config.listen);
    config.admin = admin.or(config.admin);
    Ok(config)
}

async fn serve(
    path: PathBuf,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
) -> ExitCode {
    let config = match load(&path, listen, admin_listen) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let tls = match &config.server.tls {
        None => None,
        Some((cert, key)) => match Tls::load(cert, key) {
            Ok(tls) => Some(tls),
            Err(error) => {
                eprintln!("TLS: {error}");
                return ExitCode::from(2);
            }
        },
    };
    let proxy = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(error) => {
            eprintln!("cannot listen on {}: {error}", config.listen);
            return ExitCode::FAILURE;
        }
    };
    let admin = match config.admin {
        None => None,
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(error) => {
                eprintln!("cannot listen on {addr} (admin): {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    let (limits, drain) = (config.server.limits.clone(), config.server.drain_timeout);
    let gateway = Gateway::new(config);
    gateway.set_listening();
    tokio::spawn(gateway.clone().prepare_credentials());

    let scheme = if tls.is_some() { "https" } else { "http" };
    let proxy_addr = proxy.local_addr().expect("bound");
    let admin_addr = admin.as_ref().map(|a| a.local_addr().expect("bound"));
    // On stdout, so scripts that bind port 0 learn the addresses.
    println!(
        "listening proxy={scheme}://{proxy_addr} admin={}",
        admin_addr.map_or("off".to_string(), |a| format!("http://{a}"))
    );
    tracing::info!(%proxy_addr, admin = ?admin_addr, "progress-gateway listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    if let Some(admin) = admin {
        let gateway = gateway.clone();
        tokio::spawn(server::serve(
            admin,
            move |request| {
                let gateway = gateway.clone();
                async move { admin::handle(&gateway, &request) }
            },
            stopped(),
            Duration::from_secs(1),
        ));
    }
    tokio::spawn(signals(
        path,
        listen,
        admin_listen,
        gateway.clone(),
        tls.clone(),
        stop_tx,
    ));
    server::serve_with(
        proxy,
        tls,
        limits,
        move |request| {
            let gateway = gateway.clone();
            async move { gateway.handle(request).await }
        },
        stopped(),
        drain,
    )
    .await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// SIGHUP reloads the config (and TLS files); SIGTERM or SIGINT stops.
async fn signals(
    path: PathBuf,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    gateway: Arc<Gateway>,
    tls: Option<Arc<Tls>>,
    stop: tokio::sync::watch::Sender<bool>,
) {
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    loop {
        tokio::select! {
            _ = hangup.recv() => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        match load(&path, listen, admin) {
            Err(error) => {
                tracing::error!(%error, "config reload refused; the running config stays")
            }
            Ok(config) => {
                for key in gateway.reload(config) {
                    tracing::warn!(
                        key,
                        "changed in the config file; takes effect after a restart"
                    );
                }
                tokio::spawn(gateway.clone().prepare_credentials());
                tracing::info!(path = %path.display(), "config reloaded");
            }
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(error) => {
                    tracing::error!(%error, "TLS reload refused; the running certificate stays")
                }
            }
        }
    }
    tracing::info!("shutting down: no new connections, draining open ones");
    let _ = stop.send(true);
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and shippers get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves on SIGINT or SIGTERM (for the simulator).
async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
