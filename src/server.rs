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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a listener serves: one answer per request, never an error (errors
/// are answers too).
pub trait Handler: Send + Sync + 'static {
    /// `Full<Bytes>` for whole answers; a stream for server-sent events.
    type Body: hyper::body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static;

    fn handle(
        &self,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Self::Body>> + Send;
}

/// A response body that keeps its request counted as in flight until the
/// body is done, so a connection streaming events is never taken for idle
/// (by the idle timeout, or by a full house looking for one to close).
pub struct Tracked<B> {
    body: B,
    _busy: Busy,
}

impl<B> hyper::body::Body for Tracked<B>
where
    B: hyper::body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
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
            // Head deadlines are this module's (see `Activity`): hyper's
            // would also close idle keep-alive connections at that deadline.
            .header_read_timeout(None)
            // Room beyond the gateway's own limit, so the gateway answers an
            // oversized head itself (431 in Huawei's shape, logged); hyper
            // answers only heads past twice the limit. Its floor is 8 KiB.
            .max_buf_size(hyper_head_limit(limits.max_header_bytes).max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            // A PING after this long without frames, and a deadline for its
            // answer, so a silent HTTP/2 client cannot hold a connection.
            .keep_alive_interval(limits.idle_timeout)
            .keep_alive_timeout(limits.header_read_timeout)
            .max_header_list_size(
                u32::try_from(hyper_head_limit(limits.max_header_bytes)).unwrap_or(u32::MAX),
            );
        let builder = Arc::new(builder);
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let open = Arc::new(Open::default());
        let connections = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
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
            // A full house admits a real client by closing the oldest
            // connection that is idle or has sent no request (as nginx reuses
            // idle keep-alive connections); only busy ones make it wait.
            let slot = loop {
                if let Ok(slot) = slots.clone().try_acquire_owned() {
                    break Some(slot);
                }
                if open.evict_one() {
                    tracing::debug!("full house: closed the oldest idle connection");
                }
                // Busy connections become idle: look again shortly.
                tokio::select! {
                    slot = slots.clone().acquire_owned() => break Some(slot.expect("never closed")),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    () = shutdown.cancelled() => break None,
                }
            };
            let Some(slot) = slot else { break };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            let activity = Arc::new(Activity::new());
            let id = open.add(activity.clone());
            let tracked = activity.clone();
            let service = service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ClientAddr(peer));
                let busy = tracked.begin();
                let handler = handler.clone();
                async move {
                    let response = handler.handle(request).await;
                    Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: busy }))
                }
            });
            let (builder, tls, limits) = (builder.clone(), tls.clone(), limits.clone());
            let (stop, open) = (shutdown.clone(), open.clone());
            let task = async move {
                let _slot = slot;
                // Reads are observed above TLS: what counts is request bytes.
                let serve = async {
                    match tls {
                        None => {
                            let io = Observed::new(stream, &activity);
                            connection(io, &builder, service, &limits, &activity, stop, drain).await
                        }
                        // Boxed: a TLS connection's state is several KiB
                        // larger, and every plain connection's task would
                        // otherwise be sized for it.
                        Some(tls) => {
                            Box::pin(async {
                                let acceptor = tls.acceptor.load_full();
                                match acceptor.accept(stream).await {
                                    Ok(stream) => {
                                        let io = Observed::new(stream, &activity);
                                        connection(
                                            io, &builder, service, &limits, &activity, stop, drain,
                                        )
                                        .await
                                    }
                                    Err(error) => tracing::debug!(%error, "TLS handshake failed"),
                                }
                            })
                            .await
                        }
                    }
                };
                // The head deadline runs from the accept, TLS handshake included;
                // an eviction closes at once.
                tokio::select! {
                    () = serve => {}
                    () = activity.evicted.cancelled() => {}
                    () = head_deadline(&activity, limits.header_read_timeout) => {
                        tracing::debug!("closed: no complete request head within header_read_timeout");
                    }
                }
                open.remove(id);
            };
            connections.spawn(task);
        }
        drop(listener);
        connections.close();
        tokio::select! {
            () = connections.wait() => tracing::debug!("all connections drained"),
            () = tokio::time::sleep(drain) => tracing::warn!(deadline = ?drain, "drain deadline passed; closing the rest"),
        }
    }
}

/// What hyper accepts before answering 431 itself: twice the gateway's limit.
fn hyper_head_limit(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_mul(2).saturating_add(8192)
}

/// How long a connection closing gracefully (idle) gets before it is closed
/// hard, e.g. an HTTP/2 client that never answers the GOAWAY's PING.
const IDLE_GRACE: Duration = Duration::from_secs(5);

/// No pending head: see [`Activity::head_since_ms`].
const NO_HEAD: u64 = u64::MAX;

/// Where one connection stands, shared by its task, its requests, its reads
/// and the listener. Updated per request and per read burst, with atomics.
struct Activity {
    /// When it was accepted.
    epoch: Instant,
    /// When the last request finished (ms since `epoch`).
    last_ms: AtomicU64,
    in_flight: AtomicU64,
    /// When bytes of a request head began to arrive with no request in flight
    /// (ms since `epoch`; 0 from the accept, for the first request); a
    /// complete head must follow within header_read_timeout. [`NO_HEAD`]: none.
    head_since_ms: AtomicU64,
    /// HTTP/2: frames between requests are not request heads.
    h2: std::sync::atomic::AtomicBool,
    /// Cancelled to close the connection at once (a full house).
    evicted: CancellationToken,
}

/// Marks a request in flight until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(0),
            h2: std::sync::atomic::AtomicBool::new(false),
            evicted: CancellationToken::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Bytes arrived: with no request in flight, they begin a request head.
    fn read(&self) {
        if self.head_since_ms.load(Ordering::Relaxed) != NO_HEAD
            || self.in_flight.load(Ordering::Relaxed) > 0
            || self.h2.load(Ordering::Relaxed)
        {
            return;
        }
        self.head_since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long a request head has been pending, if one is.
    fn head_pending_for(&self) -> Option<Duration> {
        let since = self.head_since_ms.load(Ordering::Relaxed);
        (since != NO_HEAD && self.in_flight.load(Ordering::Relaxed) == 0)
            .then(|| Duration::from_millis(self.now_ms().saturating_sub(since)))
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
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves when a request head has been pending longer than `timeout`:
/// silent since the accept, a partial HTTP/1 head, a partial HTTP/2 preface,
/// or nothing after the TLS handshake.
async fn head_deadline(activity: &Activity, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let wait = match activity.head_pending_for() {
            Some(pending) if pending >= timeout => return,
            Some(pending) => (timeout - pending).min(tick),
            None => tick,
        };
        tokio::time::sleep(wait).await;
    }
}

/// The open connections, for closing idle ones when the house is full.
#[derive(Default)]
struct Open {
    next: AtomicU64,
    /// parking_lot: held to add, remove or scan; never across an await.
    all: parking_lot::Mutex<std::collections::HashMap<u64, Arc<Activity>>>,
}

impl Open {
    fn add(&self, activity: Arc<Activity>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.all.lock().insert(id, activity);
        id
    }

    fn remove(&self, id: u64) {
        self.all.lock().remove(&id);
    }

    /// Closes the oldest connection with no request in flight. True if one was.
    fn evict_one(&self) -> bool {
        let all = self.all.lock();
        let oldest = all
            .values()
            .filter(|a| a.in_flight.load(Ordering::Relaxed) == 0 && !a.evicted.is_cancelled())
            .min_by_key(|a| a.epoch);
        match oldest {
            Some(activity) => {
                activity.evicted.cancel();
                true
            }
            None => false,
        }
    }
}

/// The connection's stream, reporting when bytes arrive (see [`Activity::read`]).
struct Observed<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO> Observed<IO> {
    fn new(io: IO, activity: &Arc<Activity>) -> Self {
        Observed {
            io,
            activity: activity.clone(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Observed<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        let fresh = &buf.filled()[before..];
        if !fresh.is_empty() {
            // HTTP/2 by prior knowledge or after TLS ALPN starts with the preface.
            if before == 0 && fresh.starts_with(b"PRI * HTTP/2.0") {
                this.activity.h2.store(true, Ordering::Relaxed);
            }
            this.activity.read();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Observed<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves one connection until it ends, closing it gracefully when it has been
/// idle too long or the server stops (a request in progress still completes),
/// and hard when a graceful close takes longer than its grace period.
async fn connection<IO, S, B>(
    io: IO,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    limits: &Limits,
    activity: &Activity,
    stop: CancellationToken,
    drain: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Tracked<B>>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static,
{
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut check = tokio::time::interval(limits.idle_timeout.max(Duration::from_millis(20)) / 4);
    // When a graceful close must be over.
    let mut hard_close_at: Option<Instant> = None;
    if stop.is_cancelled() {
        conn.as_mut().graceful_shutdown();
        hard_close_at = Some(Instant::now() + drain);
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    // A head hyper refused before the gateway saw it (past twice
                    // max_header_bytes, or not HTTP): hyper answered 400 or 431
                    // with an empty body. Logged beside the access lines.
                    let refused = error
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(|e| e.is_parse() || e.is_parse_too_large());
                    if refused {
                        tracing::info!(target: crate::logging::ACCESS, %error, "request refused by the HTTP layer");
                    } else {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                return;
            }
            () = stop.cancelled(), if hard_close_at.is_none() => {
                conn.as_mut().graceful_shutdown();
                hard_close_at = Some(Instant::now() + drain);
            }
            _ = check.tick() => match hard_close_at {
                Some(at) if Instant::now() >= at => return,
                Some(_) => {}
                None if activity.idle_for() >= limits.idle_timeout => {
                    conn.as_mut().graceful_shutdown();
                    hard_close_at = Some(Instant::now() + IDLE_GRACE);
                }
                None => {}
            },
        }
    }
}
