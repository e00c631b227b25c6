//! Watchers on one running job: N long-polls and M event streams held by the
//! gateway binary (default logging, to a file), in front of an upstream
//! whose answer changes on every request.
//!
//! Reports memory per watcher (the gateway's RSS with every watcher held,
//! against before), upstream requests per window while they watch, and the
//! delay from the upstream answer leaving upstream to each watcher holding
//! it (p50/p99), then how long SIGTERM takes with every watcher held.
//!
//! Run: cargo build --release && cargo bench --bench watch
//! Knobs: PGW_BENCH_LONG_POLLS (10000), PGW_BENCH_STREAMS (1000),
//! PGW_BENCH_WINDOWS (10), PGW_BIN (the gateway binary).

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use parking_lot::Mutex;
use progress_gateway::server::{Handler, Server};
use progress_gateway::tools::SimFront;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream whose answer carries a sequence number: frozen at 0 until
/// `moving`, then one more on every request, with when each was sent.
#[derive(Default)]
struct Changing {
    moving: AtomicBool,
    calls: AtomicU64,
    sent: Mutex<Vec<Instant>>,
}

impl Handler for Changing {
    type Body = Full<Bytes>;

    async fn handle(&self, _request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let seq = if self.moving.load(Ordering::Relaxed) {
            let mut sent = self.sent.lock();
            sent.push(Instant::now());
            sent.len()
        } else {
            0
        };
        let body = format!(
            r#"{{"id":"watched","type":"exportAsset","status":"RUNNING","progress_percent":0.5,"seq":{seq}}}"#
        );
        let mut response = Response::new(Full::new(Bytes::from(body)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// Delays (from the upstream answer leaving to a watcher holding it), µs.
type Delays = Arc<Mutex<Vec<u32>>>;

fn seq_of(text: &str) -> Option<usize> {
    let at = text.rfind("\"seq\":")? + 6;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn record(upstream: &Changing, delays: &Delays, seq: usize, arrived: Instant) {
    if seq == 0 {
        return;
    }
    let sent = upstream.sent.lock()[seq - 1];
    let delay = arrived.saturating_duration_since(sent).as_micros();
    delays.lock().push(u32::try_from(delay).unwrap_or(u32::MAX));
}

/// Reads one HTTP/1.1 answer: status, ETag, body.
/// None when the gateway closed the connection (it stopped).
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, String, String)> {
    buf.clear();
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let length: usize = header("content-length:").parse().unwrap_or(0);
    let etag = header("etag:");
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    Some((status, etag, body))
}

/// One long-poller: holds, and asks again with the new ETag after each answer.
async fn long_poller(
    mut stream: TcpStream,
    path: String,
    mut etag: String,
    upstream: Arc<Changing>,
    delays: Delays,
) {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: gw\r\nIf-None-Match: {etag}\r\nPrefer: wait=25\r\n\r\n"
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            return;
        }
        let Some((status, new_etag, body)) = read_answer(&mut stream, &mut buf).await else {
            return;
        };
        let arrived = Instant::now();
        if status == 200 {
            if let Some(seq) = seq_of(&body) {
                record(&upstream, &delays, seq, arrived);
            }
            etag = new_etag;
        }
    }
}

/// One event stream: records each progress event's delay.
async fn streamer(mut stream: TcpStream, path: String, upstream: Arc<Changing>, delays: Delays) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut chunk = vec![0u8; 4096];
    let mut last = 0;
    loop {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        let arrived = Instant::now();
        let text = String::from_utf8_lossy(&chunk[..n]);
        if let Some(seq) = seq_of(&text).filter(|s| *s > last) {
            last = seq;
            record(&upstream, &delays, seq, arrived);
        }
    }
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>;

/// An HTTP/2 connection (h2c by prior knowledge) watchers share.
async fn h2_connection(gateway: SocketAddr) -> H2 {
    let stream = TcpStream::connect(gateway).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

fn h2_request(path: &str, headers: &[(&str, &str)]) -> Request<http_body_util::Empty<Bytes>> {
    let mut request = Request::get(format!("http://gw{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(http_body_util::Empty::new()).unwrap()
}

/// A long-poller on a shared HTTP/2 connection.
async fn h2_long_poller(
    mut sender: H2,
    path: String,
    mut etag: String,
    upstream: Arc<Changing>,
    delays: Delays,
) {
    use http_body_util::BodyExt;
    loop {
        let request = h2_request(&path, &[("if-none-match", &etag), ("prefer", "wait=25")]);
        let Ok(response) = sender.send_request(request).await else {
            return;
        };
        let status = response.status();
        let new_etag = response
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string());
        let Ok(body) = response.into_body().collect().await else {
            return;
        };
        let arrived = Instant::now();
        if status == 200 {
            if let Some(seq) = seq_of(&String::from_utf8_lossy(&body.to_bytes())) {
                record(&upstream, &delays, seq, arrived);
            }
            etag = new_etag.unwrap_or(etag);
        }
    }
}

/// An event stream on a shared HTTP/2 connection.
async fn h2_streamer(mut sender: H2, path: String, upstream: Arc<Changing>, delays: Delays) {
    use http_body_util::BodyExt;
    let request = h2_request(&path, &[("accept", "text/event-stream")]);
    let Ok(response) = sender.send_request(request).await else {
        return;
    };
    let mut body = response.into_body();
    let mut last = 0;
    while let Some(Ok(frame)) = body.frame().await {
        let arrived = Instant::now();
        if let Ok(data) = frame.into_data() {
            if let Some(seq) = seq_of(&String::from_utf8_lossy(&data)).filter(|s| *s > last) {
                last = seq;
                record(&upstream, &delays, seq, arrived);
            }
        }
    }
}

/// Watchers per HTTP/2 connection: hyper's default stream limit.
const STREAMS_PER_H2_CONNECTION: usize = 200;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn metrics(admin: SocketAddr) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// The `q` quantile of the gateway's wake-up histogram: the upper bound of
/// the bucket it falls in, ms.
fn wakeup_quantile(text: &str, q: f64) -> f64 {
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("pgw_watch_wakeup_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            Some((le.parse().ok()?, count.split(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

async fn watchers_now(admin: SocketAddr) -> u64 {
    metrics(admin)
        .await
        .lines()
        .filter(|l| l.starts_with("pgw_watchers{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// One connection per watcher.
    Http1,
    /// Watchers share connections, 200 streams each.
    Http2,
}

fn main() {
    let polls = env("PGW_BENCH_LONG_POLLS", 10_000) as usize;
    let streams = env("PGW_BENCH_STREAMS", 1_000) as usize;
    let windows = env("PGW_BENCH_WINDOWS", 10);
    let bin = gateway_binary();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    for protocol in [Protocol::Http1, Protocol::Http2] {
        println!(
            "== {} ==",
            match protocol {
                Protocol::Http1 => "HTTP/1.1, one connection per watcher",
                Protocol::Http2 => "HTTP/2, 200 watchers per connection",
            }
        );
        runtime().block_on(run(protocol, &bin, polls, streams, windows));
    }
}

async fn run(
    protocol: Protocol,
    bin: &std::path::Path,
    polls: usize,
    streams: usize,
    windows: u64,
) {
    let upstream = Arc::new(Changing::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let stop_upstream = tokio_util::sync::CancellationToken::new();
    tokio::spawn(Server::new(listener).serve(upstream.clone(), stop_upstream.clone()));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "bench-token").unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let total = polls + streams + 100;
    let config = SimFront::new(upstream_addr, &dir.path().join("token"))
        .listen(&proxy.to_string())
        .admin(&admin.to_string())
        .section(&format!(
            "[server]\nmax_connections = {total}\n\
             [watch]\nmax_watchers = {total}\nmax_watchers_per_consumer = {total}"
        ))
        .toml();
    std::fs::write(dir.path().join("gateway.toml"), config).unwrap();
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    // As users run it: default logging (RUST_LOG unset), to a file.
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the release binary (cargo build --release)");
    while TcpStream::connect(admin).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let path = format!("/v2/{PROJECT}/instances/i/assets/jobs/watched");
    let mut first = TcpStream::connect(proxy).await.unwrap();
    first
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, etag, _) = read_answer(&mut first, &mut Vec::new()).await.unwrap();
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(child.id());

    // Phase A: every watcher held on an answer that does not change.
    let delays: Delays = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut shared = None;
    for i in 0..polls + streams {
        let (path, upstream, delays) = (path.clone(), upstream.clone(), delays.clone());
        let task = match protocol {
            // Connected one after the other: a paced ramp.
            Protocol::Http1 => {
                let stream = TcpStream::connect(proxy).await.unwrap();
                if i < polls {
                    tokio::spawn(long_poller(stream, path, etag.clone(), upstream, delays))
                } else {
                    tokio::spawn(streamer(stream, path, upstream, delays))
                }
            }
            Protocol::Http2 => {
                if i % STREAMS_PER_H2_CONNECTION == 0 {
                    shared = Some(h2_connection(proxy).await);
                }
                let sender = shared.clone().expect("connected");
                if i < polls {
                    tokio::spawn(h2_long_poller(sender, path, etag.clone(), upstream, delays))
                } else {
                    tokio::spawn(h2_streamer(sender, path, upstream, delays))
                }
            }
        };
        tasks.push(task);
    }
    let want = (polls + streams) as u64;
    while watchers_now(admin).await < want {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "watchers never all held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramped = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(child.id());
    let per = after.saturating_sub(before) as f64 / want as f64;
    println!(
        "held {polls} long-polls + {streams} event streams in {:.1} s",
        ramped.as_secs_f64()
    );
    println!(
        "memory: RSS {before} KiB -> {after} KiB: {per:.1} KiB per watcher (connection included)"
    );

    // Phase B: the answer changes on every upstream request.
    let calls_before = upstream.calls.load(Ordering::Relaxed);
    upstream.moving.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(windows)).await;
    let calls = upstream.calls.load(Ordering::Relaxed) - calls_before;
    let mut delays = std::mem::take(&mut *delays.lock());
    delays.sort_unstable();
    let expected = want as usize * upstream.sent.lock().len();
    println!(
        "upstream: {calls} requests in {windows} windows of 1 s: {:.2} per window",
        calls as f64 / windows as f64
    );
    println!(
        "delivery: {} answers and events (about {expected} expected); upstream answer -> watcher: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        percentile(&delays, 1.0),
    );

    let text = metrics(admin).await;
    println!(
        "inside the gateway, refresh landing -> watcher task woken: p50 <= {:.2} ms, p99 <= {:.2} ms (histogram buckets)",
        wakeup_quantile(&text, 0.5),
        wakeup_quantile(&text, 0.99)
    );

    // SIGTERM with everyone held: answered and ended at once.
    let signalled = Instant::now();
    let _ = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    println!(
        "SIGTERM with {want} watchers: exited in {:.2} s",
        signalled.elapsed().as_secs_f64()
    );
    for task in tasks {
        task.abort();
    }
    stop_upstream.cancel();
}
