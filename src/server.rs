//! Listening: accept connections (optionally over TLS), serve HTTP/1.1 and
//! HTTP/2 on each (h2c by prior knowledge, h2 by ALPN), enforce the limits a
//! public-facing server needs, and drain gracefully on shutdown. Shared by the
//! gateway, its admin listener and the simulator: each is a [`Handler`].

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The client's address, put into every request's extensions (the proxy
/// keys fair use by it where no consumer keys are configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// What a listener serves: one answer per request, never an error (errors
/// are answers too).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Connection limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and finish a TLS handshake).
    pub header_read_timeout: Duration,
    /// A keep-alive connection without traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request head accepted (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: not a PEM certificate chain", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a PEM private key", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the certificate and key are not usable together")]
    Rustls(#[source] tokio_rustls::rustls::Error),
}

/// TLS for a listener: cert and key files, re-read by [`Tls::reload`].
pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    acceptor: ArcSwap<TlsAcceptor>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Tls>, TlsError> {
        let acceptor = acceptor(cert_file, key_file)?;
        Ok(Arc::new(Tls {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            acceptor: ArcSwap::from_pointee(acceptor),
        }))
    }

    /// Re-reads the files; new connections use them, open ones keep theirs.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = acceptor(&self.cert_file, &self.key_file)?;
        self.acceptor.store(Arc::new(acceptor));
        Ok(())
    }
}

fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificate {
            path: cert_file.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::Key {
        path: key_file.to_path_buf(),
        source,
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener and how to serve it: `Server::new(listener).limits(..).serve(..)`.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    drain: Duration,
}

impl Server {
    /// Default limits, no TLS, no drain time.
    pub fn new(listener: TcpListener) -> Self {
        Server {
            listener,
            tls: None,
            limits: Limits::default(),
            drain: Duration::ZERO,
        }
    }

    pub fn tls(mut self, tls: Option<Arc<Tls>>) -> Self {
        self.tls = tls;
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long open connections get to finish once shutdown begins.
    pub fn drain(mut self, drain: Duration) -> Self {
        self.drain = drain;
        self
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, closes
    /// connections gracefully and waits up to the drain time for them.
    pub async fn serve<H: Handler>(self, handler: Arc<H>, shutdown: CancellationToken) {
        let Server {
            listener,
            tls,
            limits,
            drain,
        } = self;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // hyper's floor for the read buffer is 8 KiB.
            .max_buf_size(limits.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        let builder = Arc::new(builder);
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let connections = TaskTracker::new();
        loop {
            // Waiting for a slot before accepting leaves excess clients in the backlog.
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                () = shutdown.cancelled() => break,
            };
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let (stream, peer) = stream;
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            let activity = Arc::new(Activity::new());
            let tracked = activity.clone();
            let service = service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ClientAddr(peer));
                let busy = tracked.begin();
                let handler = handler.clone();
                async move {
                    let response = handler.handle(request).await;
                    drop(busy);
                    Ok::<_, Infallible>(response)
                }
            });
            let (builder, tls, limits) = (builder.clone(), tls.clone(), limits.clone());
            let stop = shutdown.clone();
            connections.spawn(async move {
                let _slot = slot;
                match tls {
                    None => connection(stream, &builder, service, &limits, &activity, stop).await,
                    Some(tls) => {
                        let acceptor = tls.acceptor.load_full();
                        match tokio::time::timeout(
                            limits.header_read_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(stream)) => {
                                connection(stream, &builder, service, &limits, &activity, stop)
                                    .await
                            }
                            Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
            });
        }
        drop(listener);
        connections.close();
        tokio::select! {
            () = connections.wait() => tracing::debug!("all connections drained"),
            () = tokio::time::sleep(drain) => tracing::warn!(deadline = ?drain, "drain deadline passed; closing the rest"),
        }
    }
}

/// When a connection last finished a request, and how many it has in flight:
/// idle means none in flight for the idle timeout. Updated per request, not
/// per read or write, so the hot path reads the clock twice per request.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicU64,
}

/// Marks a request in flight until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        self.0.last_ms.store(now, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection until it ends, closing it gracefully when it has been
/// idle too long or the server stops (a request in progress still completes).
async fn connection<IO, S>(
    io: IO,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    limits: &Limits,
    activity: &Activity,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut check = tokio::time::interval(limits.idle_timeout.max(Duration::from_millis(20)) / 4);
    let mut closing = stop.is_cancelled();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.tick(), if !closing => {
                if activity.idle_for() >= limits.idle_timeout {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
