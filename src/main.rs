//! The `progress-gateway` command: parses arguments, sets up logging and calls
//! into the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(feature = "tools")]
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use progress_gateway::app::{self, Overrides};
use progress_gateway::config::Config;
use progress_gateway::error::chain;

/// Exit code for a config the operator must fix (sysexits' EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    version,
    about = "A caching gateway for Huawei Cloud job-progress APIs",
    after_help = "Exit codes: 0 done; 1 a runtime failure (a port in use, a signal handler); \
                  2 bad command-line arguments; 78 a config the operator must fix."
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
    /// Run the gateway (SIGHUP reloads the config, SIGTERM or SIGINT drains).
    Serve {
        /// The config file (see config/gateway.toml).
        #[arg(long, short, env = "PGW_CONFIG")]
        config: PathBuf,
        /// Overrides `listen` from the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides `[admin] listen` from the config.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Check a config file; exit 78 naming the key and line at fault.
    CheckConfig {
        /// The config file to check.
        #[arg(long, short, env = "PGW_CONFIG")]
        config: PathBuf,
    },
    /// Show what the gateway does: simulator, gateway and a crowd of pollers,
    /// live progress and a summary. No config, no cloud; ends by itself.
    #[cfg(feature = "tools")]
    Demo(DemoArgs),
    /// Run the simulator of both upstream APIs.
    #[cfg(feature = "tools")]
    Simulate {
        /// Address to listen on (port 0 picks one and prints it).
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

#[cfg(feature = "tools")]
#[derive(clap::Args)]
struct DemoArgs {
    /// Polling clients.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    clients: u32,
    /// Jobs they poll.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    jobs: u32,
    /// When the first job finishes.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    shortest: Duration,
    /// When the last job finishes (not before `--shortest`).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    longest: Duration,
    /// How often each client polls.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// The gateway's running_ttl.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Latency the simulated upstream adds.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    upstream_latency: Duration,
    /// Keep polling this long after the last job finished.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    linger: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::CheckConfig { config } => {
            return match Config::load(&config) {
                Ok(checked) => {
                    println!(
                        "{}: ok ({} projects)",
                        config.display(),
                        checked.projects.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("{}: {}", config.display(), chain(&error));
                    ExitCode::from(EXIT_CONFIG)
                }
            };
        }
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => {
            let overrides = Overrides {
                listen,
                admin: admin_listen,
            };
            app::serve(&config, overrides).await
        }
        #[cfg(feature = "tools")]
        Command::Demo(args) => return demo(args).await,
        #[cfg(feature = "tools")]
        Command::Simulate {
            listen,
            token_env,
            job_duration,
            latency,
        } => {
            use progress_gateway::tools::simulator::{Behaviour, SimAuth, Simulator};
            let token = match token_env.map(|var| std::env::var(&var).map_err(|_| var)) {
                Some(Err(var)) => {
                    eprintln!("environment variable {var} is not set");
                    return ExitCode::from(EXIT_CONFIG);
                }
                Some(Ok(token)) => Some(token),
                None => None,
            };
            let auth = SimAuth {
                token,
                ..SimAuth::default()
            };
            let behaviour = Behaviour {
                job_duration,
                latency,
                ..Behaviour::default()
            };
            Simulator::new(auth, behaviour).run(listen).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", chain(&error));
            ExitCode::from(if error.is_config() { EXIT_CONFIG } else { 1 })
        }
    }
}

#[cfg(feature = "tools")]
async fn demo(args: DemoArgs) -> ExitCode {
    use clap::CommandFactory;
    if args.longest < args.shortest {
        Cli::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "--longest must not be shorter than --shortest",
            )
            .exit();
    }
    let options = progress_gateway::tools::demo::Options {
        clients: args.clients as usize,
        jobs: args.jobs as usize,
        shortest: args.shortest,
        longest: args.longest,
        poll_interval: args.poll_interval,
        ttl: args.ttl,
        upstream_latency: args.upstream_latency,
        linger: args.linger,
    };
    match progress_gateway::tools::demo::run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo: {error}");
            ExitCode::FAILURE
        }
    }
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
