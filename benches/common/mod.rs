//! Load generation shared by the benchmarks: a pooled hyper client, a
//! closed-loop hammer, and the herd (many clients on one fresh key at once).
#![allow(dead_code)] // each bench uses a different part

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use progress_gateway::app::{App, Running};
use progress_gateway::config::Config;
use progress_gateway::server::{Handler, Server};
use progress_gateway::tools::simulator::{Behaviour, SimAuth, Simulator};
use progress_gateway::tools::SimFront;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)] // not every bench names the project
pub use progress_gateway::tools::PROJECT;

/// A process's resident memory, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A runtime with one worker: with two cores, servers and load get one each.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client(connections: usize) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http()
}

pub async fn get(client: &HttpClient, url: &str) -> (u16, http::HeaderMap, Bytes) {
    let response = client
        .request(Request::get(url).body(Empty::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    (
        parts.status.as_u16(),
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

/// Latency percentiles in milliseconds from microsecond samples.
pub struct Latencies(Vec<u32>);

impl Latencies {
    pub fn new(mut samples: Vec<u32>) -> Self {
        samples.sort_unstable();
        Latencies(samples)
    }

    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let i = ((self.0.len() - 1) as f64 * q).round() as usize;
        f64::from(self.0[i]) / 1000.0
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Closed loop: `connections` clients request `url` for `seconds`;
/// returns requests per second and latencies.
pub async fn hammer(url: String, connections: usize, seconds: u64) -> (f64, Latencies) {
    let client = client(connections);
    // Warm the pool so connection setup is not measured.
    let warm: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    for w in warm {
        w.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(100_000);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let (status, _, _) = get(&client, &url).await;
                    assert_eq!(status, 200);
                    samples.push(t.elapsed().as_micros() as u32);
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    (rate, Latencies::new(all))
}

/// `clients` ask for `url` at once; returns (p50, p99) in ms.
pub async fn herd(client: &HttpClient, url: &str, clients: usize) -> (f64, f64) {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let t = Instant::now();
                get(&client, &url).await;
                t.elapsed().as_micros() as u32
            })
        })
        .collect();
    let mut samples = Vec::new();
    for t in tasks {
        samples.push(t.await.unwrap());
    }
    let lat = Latencies::new(samples);
    (lat.ms(0.5), lat.ms(0.99))
}

/// The gateway binary: `PGW_BIN`, else this checkout's release build.
pub fn gateway_binary() -> std::path::PathBuf {
    std::env::var("PGW_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/release/progress-gateway")
        })
}

/// The simulator on port 0, requiring `token` when given.
pub async fn start_simulator(latency: Duration, token: Option<&str>) -> (Simulator, SocketAddr) {
    let sim = Simulator::new(
        SimAuth {
            token: token.map(str::to_string),
            ..SimAuth::default()
        },
        Behaviour {
            latency,
            job_duration: Duration::from_secs(3600),
            ..Behaviour::default()
        },
    );
    let addr = sim.spawn("127.0.0.1:0").await.unwrap();
    (sim, addr)
}

/// A gateway config in front of the simulator at `sim`, admin listener off.
pub fn gateway_config(
    listen: &str,
    sim: SocketAddr,
    token_file: &std::path::Path,
    running_ttl: &str,
) -> String {
    SimFront::new(sim, token_file)
        .listen(listen)
        .admin("")
        .section(&format!("[cache]\nrunning_ttl = \"{running_ttl}\""))
        .toml()
}

/// The gateway in-process, started through `app` as `serve` starts it.
pub async fn start_gateway(
    sim: SocketAddr,
    token_file: &std::path::Path,
    running_ttl: &str,
) -> Running {
    let config =
        Config::parse(&gateway_config("127.0.0.1:0", sim, token_file, running_ttl)).unwrap();
    App::new(config).unwrap().bind().await.unwrap()
}

/// The ceiling: hyper answering fixed bytes through the gateway's own server loop.
pub struct FixedAnswer {
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Handler for FixedAnswer {
    type Body = http_body_util::Full<Bytes>;

    async fn handle(
        &self,
        _request: http::Request<hyper::body::Incoming>,
    ) -> http::Response<http_body_util::Full<Bytes>> {
        let mut response = http::Response::new(http_body_util::Full::new(self.body.clone()));
        *response.headers_mut() = self.headers.clone();
        response
    }
}

/// Serves `answer` on `listener` until the runtime ends.
pub async fn serve_fixed(listener: tokio::net::TcpListener, answer: FixedAnswer) {
    Server::new(listener)
        .serve(std::sync::Arc::new(answer), CancellationToken::new())
        .await
}

/// `c` clients poll `k` running jobs through `gateway` for `seconds`, pausing
/// 50 ms between polls as real pollers do; returns the requests served and
/// their latencies, each poller's first (cold) request left out.
pub async fn poll(gateway: SocketAddr, c: usize, k: usize, seconds: u64) -> (u64, Latencies) {
    let urls = (0..c)
        .map(|i| {
            format!(
                "http://{gateway}/v2/{PROJECT}/instances/i/assets/jobs/poll{}",
                i % k
            )
        })
        .collect();
    let (samples, _) = poll_urls(urls, seconds).await;
    (samples.len() as u64, Latencies::new(samples))
}

/// A poller per URL, each asking it every 50 ms for `seconds`: latencies in
/// µs, each poller's first (cold) request left out, and how many answers
/// were not 200.
pub async fn poll_urls(urls: Vec<String>, seconds: u64) -> (Vec<u32>, u64) {
    let client = client(urls.len());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut samples, mut failed) = (Vec::new(), 0);
                while Instant::now() < deadline {
                    let asked = Instant::now();
                    let (status, _, _) = get(&client, &url).await;
                    failed += u64::from(status != 200);
                    samples.push(asked.elapsed().as_micros() as u32);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // A poller's first request finds its job cold everywhere: the
                // figures are for the polling that follows.
                (samples.split_off(1.min(samples.len())), failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for task in tasks {
        let (samples, failures) = task.await.unwrap();
        all.extend(samples);
        failed += failures;
    }
    (all, failed)
}
