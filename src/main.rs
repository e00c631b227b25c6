//! The `progress-gateway` command: parses arguments, sets up logging and calls
//! into the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use progress_gateway::app::{self, Overrides};
use progress_gateway::config::Config;
use progress_gateway::credentials::{redact, Redacting};
use progress_gateway::error::chain;
use progress_gateway::logging::{write_access_lines_to, FlushGuard, LineWriter};
use progress_gateway::metrics::LogDrops;
use tracing_subscriber::field::MakeExt;

/// Exit code for a config the operator must fix (sysexits' EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

/// Log bytes allowed to wait for a stalled stderr: about 64,000 access lines.
const LOG_BACKLOG: usize = 16 << 20;

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
    Demo(progress_gateway::tools::demo::Options),
    /// Run the simulator of both upstream APIs.
    #[cfg(feature = "tools")]
    Simulate(progress_gateway::tools::simulator::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's terminal shows its live view; its access log is opt-in.
    let quiet = match &cli.command {
        #[cfg(feature = "tools")]
        Command::Demo(options) => !options.verbose,
        _ => false,
    };
    // Flushes buffered log lines when main returns.
    let (_flush, log_drops) = init_logging(cli.log_format, if quiet { "warn" } else { "info" });
    let result = match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(checked) => {
                println!(
                    "{}: ok ({} projects)",
                    config.display(),
                    checked.projects.len()
                );
                return ExitCode::SUCCESS;
            }
            Err(error) => {
                return fail(
                    &format!("{}: {}", config.display(), chain(&error)),
                    EXIT_CONFIG,
                )
            }
        },
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => {
            let overrides = Overrides {
                listen,
                admin: admin_listen,
            };
            app::serve(&config, overrides, Some(log_drops)).await
        }
        #[cfg(feature = "tools")]
        Command::Demo(options) => {
            if options.longest < options.shortest {
                let kind = clap::error::ErrorKind::ValueValidation;
                <Cli as clap::CommandFactory>::command()
                    .error(kind, "--longest must not be shorter than --shortest")
                    .exit();
            }
            return match progress_gateway::tools::demo::run(options).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&format!("demo: {error}"), 1),
            };
        }
        #[cfg(feature = "tools")]
        Command::Simulate(args) => match args.simulator() {
            Ok(simulator) => simulator.run(args.listen).await,
            Err(var) => {
                return fail(
                    &format!("environment variable {var} is not set"),
                    EXIT_CONFIG,
                )
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(
            &chain(&error),
            if error.is_config() { EXIT_CONFIG } else { 1 },
        ),
    }
}

fn fail(message: &str, code: u8) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(code)
}

/// Log lines wait in memory for a background thread that writes them to
/// stderr in batches, so no request waits on the terminal or the log
/// shipper. When the output falls behind by more than [`LOG_BACKLOG`], lines
/// are dropped and counted (`pgw_log_lines_dropped`) rather than slowing
/// requests down.
fn init_logging(format: LogFormat, default: &str) -> (FlushGuard, LogDrops) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Every line is scrubbed of secret values, whatever quoted them: the
    // writer thread scrubs each batch on its way out, off the request path
    // (a secret cannot span lines, nor lines batches).
    let (writer, guard) = LineWriter::spawn(Redacting(std::io::stderr()), LOG_BACKLOG);
    let dropped = writer.clone();
    // Colours only on a terminal: log files and shippers get plain text.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer({
            let writer = writer.clone();
            move || writer.clone()
        });
    match format {
        // Plain `name=value` fields: the default field formatter styles
        // every name even when colours are off, which costs on every line.
        LogFormat::Text if !ansi => {
            // Access lines, one per request, are written by hand (same bytes).
            write_access_lines_to(writer.clone());
            builder
                .fmt_fields(
                    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                        write!(w, "{field}={value:?}")
                    })
                    .delimited(" "),
                )
                .init()
        }
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    // A panic message is scrubbed too.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{}", redact(&info.to_string()));
    }));
    (guard, LogDrops::new(move || dropped.dropped()))
}
