//! The composition root: turns a checked [`Config`] into the running parts
//! and owns their lifecycle. `serve`, the tests, the benchmarks and the demo
//! all start the gateway here.
//!
//! 1. [`App::new`] builds without binding: metrics, the credential registry,
//!    the upstream exchange, the cache, the consumers, the proxy handler, TLS.
//! 2. [`App::bind`] binds the proxy and admin listeners and serves them, with
//!    one cancellation token for both, and obtains credentials in the background.
//! 3. [`App::reload`] applies a new config to the running parts: credentials
//!    whose specification did not change keep their state (IAM tokens),
//!    counters never reset, cached answers stay.
//! 4. [`Running::stop`] stops accepting and drains; [`serve`] ties it to signals.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::cache::shared::SharedError;
use crate::cache::{Cache, Shared, SharedConfig};
use crate::config::{Config, ConfigError, ServerConfig};
use crate::consumers::{ConsumerError, Consumers};
use crate::credentials::{Credential, Registry};
use crate::dashboard::Dashboard;
use crate::fetch::{Exchange, Fetch};
use crate::metrics::{LogDrops, Metrics};
use crate::proxy::{Gateway, Project, Projects, Tenants};
use crate::server::{Server, Tls, TlsError};
use crate::signal::{Signal, Signals};
use crate::upstream::Upstream;

/// Why the gateway cannot start (or a reload is refused).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("TLS")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("shared tier")]
    Shared(#[from] SharedError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

impl AppError {
    /// Errors an operator fixes in the config file (exit code 78, EX_CONFIG).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            AppError::Config { .. }
                | AppError::Tls(_)
                | AppError::Consumer(_)
                | AppError::Shared(_)
        )
    }
}

/// Listener addresses given on the command line, over the config's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// Reads `path` and applies the overrides: what `serve` and a reload load.
pub fn load(path: &Path, overrides: Overrides) -> Result<Config, AppError> {
    let mut config = Config::load(path).map_err(|source| AppError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    config.listen = overrides.listen.unwrap_or(config.listen);
    config.admin = overrides.admin.or(config.admin);
    Ok(config)
}

/// The gateway's running parts, not yet listening.
pub struct App {
    metrics: Arc<Metrics>,
    registry: Registry,
    exchange: Arc<Exchange>,
    gateway: Arc<Gateway>,
    tls: Option<Arc<Tls>>,
    /// The settings only a restart applies, as started.
    fixed: Fixed,
    log_drops: Option<LogDrops>,
}

struct Fixed {
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    server: ServerConfig,
    max_bytes: bytesize::ByteSize,
    shared: SharedConfig,
}

impl Fixed {
    fn of(config: &Config) -> Self {
        Fixed {
            listen: config.listen,
            admin: config.admin,
            server: config.server.clone(),
            max_bytes: config.cache.max_bytes,
            shared: config.shared.clone(),
        }
    }

    /// The keys that changed but only take effect after a restart.
    fn changes(&self, next: &Fixed) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let (was, now) = (&self.server, &next.server);
        for (changed, key) in [
            (self.listen != next.listen, "listen"),
            (self.admin != next.admin, "admin.listen"),
            (self.max_bytes != next.max_bytes, "cache.max_bytes"),
            (self.shared != next.shared, "shared"),
            (
                was.tls() != now.tls(),
                "server.tls_cert_file / tls_key_file",
            ),
            (was.limits() != now.limits(), "server connection limits"),
            (
                was.drain_timeout != now.drain_timeout,
                "server.drain_timeout",
            ),
        ] {
            if changed {
                keys.push(key);
            }
        }
        keys
    }
}

impl App {
    /// Builds every part from `config`, fetching from the real upstream.
    pub fn new(config: Config) -> Result<App, AppError> {
        App::build(config, None)
    }

    /// Like [`App::new`] with `origin` in place of the upstream exchange:
    /// tests drive the real handler against a scripted upstream.
    pub fn with_origin(config: Config, origin: Arc<dyn Fetch>) -> Result<App, AppError> {
        App::build(config, Some(origin))
    }

    fn build(config: Config, origin: Option<Arc<dyn Fetch>>) -> Result<App, AppError> {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(metrics.clone());
        let exchange = Arc::new(Exchange::new(&config.upstream, metrics.clone()));
        let origin = origin.unwrap_or_else(|| exchange.clone());
        let tls = match config.server.tls() {
            Some((cert, key)) => Some(Tls::load(cert, key)?),
            None => None,
        };
        let consumers = Consumers::build(config.server.consumer_key_header(), &config.consumers)?;
        let credentials = registry.update(&config.credentials);
        let fixed = Fixed::of(&config);
        // Lazy: Redis may be down now; the tier connects when it can.
        let shared = match config.shared.enabled() {
            true => Some(Shared::new(
                &config.shared,
                config.upstream.request_timeout,
                metrics.clone(),
            )?),
            false => None,
        };
        let cache = Cache::with_shared(config.cache.clone(), origin, metrics.clone(), shared);
        let gateway = Arc::new(Gateway::new(
            tenants(&config, &credentials, consumers),
            cache,
            metrics.clone(),
            config.server.limits().max_header_bytes,
            config.watch.clone(),
        ));
        Ok(App {
            metrics,
            registry,
            exchange,
            gateway,
            tls,
            fixed,
            log_drops: None,
        })
    }

    /// Exports the log writer's drop count as `pgw_log_lines_dropped`.
    pub fn with_log_drops(mut self, drops: Option<LogDrops>) -> Self {
        self.log_drops = drops;
        self
    }

    /// The proxy's request handler (tests call it in-process).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Applies `config` at once: requests in progress finish with the old
    /// one, connections and cached answers stay. Returns the keys that
    /// changed but only take effect after a restart. On an error nothing
    /// changed.
    pub fn reload(&self, config: Config) -> Result<Vec<&'static str>, AppError> {
        let consumers = Consumers::build(config.server.consumer_key_header(), &config.consumers)?;
        let restart = self.fixed.changes(&Fixed::of(&config));
        let credentials = self.registry.update(&config.credentials);
        self.exchange.reconfigure(&config.upstream);
        self.gateway.cache().set_policy(config.cache.clone());
        self.gateway.set_watch(config.watch.clone());
        self.gateway
            .set_tenants(tenants(&config, &credentials, consumers));
        tokio::spawn(prepare(self.gateway.tenants(), self.exchange.client()));
        Ok(restart)
    }

    /// Re-reads the TLS files, if TLS is on.
    pub fn reload_tls(&self) -> Result<bool, TlsError> {
        match &self.tls {
            Some(tls) => tls.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Binds the listeners and serves them in the background.
    pub async fn bind(self) -> Result<Running, AppError> {
        // The fitted limit is the listener's only: `fixed` stays as configured,
        // so a reload compares the file with the file.
        let mut limits = self.fixed.server.limits();
        let wanted = limits.max_connections;
        if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
            let fits = connections_that_fit(soft, wanted);
            if fits < wanted {
                tracing::warn!(
                    max_connections = wanted,
                    open_files_limit = soft,
                    using = fits,
                    "max_connections does not fit the open-files limit (with room for upstream and admin connections); raise LimitNOFILE"
                );
                limits.max_connections = fits;
            }
        }
        let bind = |addr: SocketAddr| async move {
            listen(addr).map_err(|source| AppError::Bind { addr, source })
        };
        let proxy = bind(self.fixed.listen).await?;
        let admin = match self.fixed.admin {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let app = Arc::new(self);
        let shutdown = CancellationToken::new();
        let servers = TaskTracker::new();
        let proxy_addr = proxy.local_addr().expect("bound");
        let admin_addr = admin.as_ref().map(|a| a.local_addr().expect("bound"));
        if let Some(listener) = admin {
            let dashboard = Arc::new(Dashboard::new(app.gateway.clone(), app.metrics.clone()));
            servers.spawn(dashboard.clone().run(shutdown.clone()));
            let admin = Arc::new(Admin {
                gateway: app.gateway.clone(),
                metrics: app.metrics.clone(),
                log_drops: app.log_drops.clone(),
                dashboard,
                stopping: shutdown.clone(),
            });
            servers.spawn(Server::new(listener).serve(admin, shutdown.clone()));
        }
        let server = &app.fixed.server;
        servers.spawn(
            Server::new(proxy)
                .tls(app.tls.clone())
                .limits(limits)
                .drain(server.drain_timeout)
                .serve(app.gateway.clone(), shutdown.clone()),
        );
        servers.close();
        app.gateway.set_listening();
        tokio::spawn(prepare(app.gateway.tenants(), app.exchange.client()));
        Ok(Running {
            scheme: if app.tls.is_some() { "https" } else { "http" },
            app,
            proxy: proxy_addr,
            admin: admin_addr,
            shutdown,
            servers,
        })
    }
}

/// A gateway that is listening. Dropping it stops the listeners (without
/// waiting); [`Running::stop`] also waits for the drain.
pub struct Running {
    app: Arc<App>,
    pub proxy: SocketAddr,
    pub admin: Option<SocketAddr>,
    scheme: &'static str,
    shutdown: CancellationToken,
    servers: TaskTracker,
}

impl Running {
    pub fn app(&self) -> &App {
        &self.app
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// Stops accepting, closes connections gracefully and waits up to the
    /// drain timeout for them.
    pub async fn stop(self) {
        self.app.gateway.stop_watchers();
        self.shutdown.cancel();
        self.servers.wait().await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.app.gateway.stop_watchers();
        self.shutdown.cancel();
    }
}

/// `progress-gateway serve`: load, bind, announce, then follow signals:
/// SIGHUP reloads the config (and TLS files), SIGTERM or SIGINT drains and ends.
pub async fn serve(
    path: &Path,
    overrides: Overrides,
    log_drops: Option<LogDrops>,
) -> Result<(), AppError> {
    let mut signals = Signals::install().map_err(AppError::Signals)?;
    if let Some(limit) = raise_open_files_limit() {
        tracing::debug!(limit, "open-files limit");
    }
    let running = App::new(load(path, overrides)?)?
        .with_log_drops(log_drops)
        .bind()
        .await?;
    // On stdout, so scripts that bind port 0 learn the addresses.
    println!(
        "listening proxy={}://{} admin={}",
        running.scheme(),
        running.proxy,
        running
            .admin
            .map_or("off".to_string(), |a| format!("http://{a}"))
    );
    tracing::info!(proxy = %running.proxy, admin = ?running.admin, "progress-gateway listening");
    while signals.next().await == Signal::Reload {
        let app = running.app();
        match load(path, overrides).and_then(|config| app.reload(config)) {
            Err(error) => tracing::error!(
                error = %crate::error::chain(&error),
                "config reload refused; the running config stays"
            ),
            Ok(restart) => {
                for key in restart {
                    tracing::warn!(
                        key,
                        "changed in the config file; takes effect after a restart"
                    );
                }
                tracing::info!(path = %path.display(), "config reloaded");
            }
        }
        match app.reload_tls() {
            Ok(true) => tracing::info!("TLS certificate reloaded"),
            Ok(false) => {}
            Err(error) => tracing::error!(
                error = %crate::error::chain(&error),
                "TLS reload refused; the running certificate stays"
            ),
        }
    }
    tracing::info!("shutting down: no new connections, draining open ones");
    tokio::select! {
        () = running.stop() => tracing::info!("stopped"),
        // An operator who signals again does not want to wait for the drain.
        () = async { while signals.next().await != Signal::Stop {} } => {
            tracing::warn!("second signal: exiting without waiting for the drain")
        }
    }
    Ok(())
}

/// Connections the kernel queues for the accept loop. tokio's `bind` asks
/// for 128 on Linux: a burst of pollers reconnecting at once (after a
/// deploy, or thousands of watchers) overflows that, and each refused SYN
/// costs its client a one-second retransmit. The kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As tokio's `bind` does: a restarted gateway can bind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// File descriptors kept for upstream pools, the admin listener, IAM, secret
/// and log files: client connections may use the rest.
const RESERVED_FDS: u64 = 256;

/// How many client connections fit an open-files limit of `limit`.
fn connections_that_fit(limit: u64, wanted: usize) -> usize {
    let room = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    wanted.min(room).max(1)
}

/// Raises the soft open-files limit to the hard one, as far as allowed (the
/// common default of 1,024 holds few connections); returns the soft limit.
pub fn raise_open_files_limit() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX).ok()
}

/// The tenants `config` describes, with its credentials from the registry.
fn tenants(
    config: &Config,
    credentials: &BTreeMap<String, Arc<Credential>>,
    consumers: Consumers,
) -> Tenants {
    let projects: Projects = config
        .projects
        .values()
        .map(|p| {
            let project = Project {
                id: p.id.clone(),
                drs: p.drs.clone(),
                roma: p.roma.clone(),
                credential: credentials[&p.credential].clone(),
            };
            (p.id.clone(), project)
        })
        .collect();
    Tenants::new(projects, consumers)
}

/// Obtains every project's credential ahead of the first request, logging
/// those that cannot be used yet (their requests get 503 until they can).
async fn prepare(tenants: Arc<Tenants>, client: Arc<Upstream>) {
    for project in tenants.projects.values() {
        if let Err(reason) = project.credential.prepare(&project.id, &client).await {
            tracing::warn!(
                project = %project.id,
                credential = %project.credential.name,
                reason = %crate::error::chain(&reason),
                "credential not usable yet; its requests get 503"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_queues_a_burst_of_connections_beyond_128() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts: every connection waits in the kernel's queue. With
        // tokio's default backlog the 130th would wait for a SYN retransmit.
        let mut queued = Vec::new();
        for i in 0..600 {
            let connect = tokio::net::TcpStream::connect(addr);
            let stream = tokio::time::timeout(std::time::Duration::from_millis(500), connect)
                .await
                .unwrap_or_else(|_| panic!("connection {i} was not queued"))
                .unwrap();
            queued.push(stream);
        }
        drop(listener);
    }

    #[test]
    fn connections_are_fitted_to_the_open_files_limit() {
        assert_eq!(connections_that_fit(1024, 10_000), 768);
        assert_eq!(connections_that_fit(1_048_576, 10_000), 10_000);
        assert_eq!(connections_that_fit(100, 10_000), 1, "never none");
    }
}
