//! Load benchmark: starts the simulator, the gateway and a bare hyper server
//! in-process and prints, in one run:
//!
//! 1. cache-hit throughput and latency on a hot key, against the bare hyper
//!    server answering the same bytes (the ceiling), as a ratio;
//! 2. herd: 100 clients ask for a fresh key at once, upstream latency 20 ms;
//! 3. sustained polling: C clients over K running jobs for D seconds, upstream
//!    requests against the bound K × (D / TTL + 1);
//!    3b. the same against an upstream failing from the start: (a) instant
//!    503s, (b) 429 with `Retry-After: 0`, upstream requests against that bound;
//! 4. memory: RSS per cached terminal entry after filling N entries.
//!
//! Servers run on one single-worker runtime and the load generator on another,
//! so on a 2-core machine each side has a core. Compare ratios within one run.
//! Knobs (environment): PGW_BENCH_SECONDS (hit phase, default 5),
//! PGW_BENCH_CONNECTIONS (64), PGW_BENCH_POLL_SECONDS (10), PGW_BENCH_ENTRIES (1000000).
//!
//! Run: cargo bench --bench load

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use progress_gateway::cache::{Cache, CacheKey, CachePolicy, Scope};
use progress_gateway::credentials::{Credential, CredentialSpec, Origin};
use progress_gateway::fetch::{Fetch, FetchFuture, FetchRequest};
use progress_gateway::metrics::{CredentialCounters, Metrics};
use progress_gateway::route::{Api, Route};
use progress_gateway::upstream::UpstreamResponse;

mod common;

use common::*;

/// The ceiling: hyper answering fixed bytes, with the same server loop.
async fn start_bare(headers: http::HeaderMap, body: Bytes) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_fixed(listener, FixedAnswer { headers, body }));
    addr
}

/// An upstream that answers every fetch with a copy of one terminal body.
struct Terminal(Bytes);

impl Fetch for Terminal {
    fn fetch(self: Arc<Self>, _request: FetchRequest) -> FetchFuture {
        Box::pin(async move {
            Ok(UpstreamResponse {
                status: http::StatusCode::OK,
                headers: [
                    (
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    ),
                    (
                        http::HeaderName::from_static("x-request-id"),
                        http::HeaderValue::from_static("0123456789abcdef0123456789abcdef"),
                    ),
                ]
                .into_iter()
                .collect(),
                // A copy, as an upstream body would be: not shared with other entries.
                body: Bytes::copy_from_slice(&self.0),
            })
        })
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let seconds = env("PGW_BENCH_SECONDS", 5);
    let connections = env("PGW_BENCH_CONNECTIONS", 64) as usize;
    let poll_seconds = env("PGW_BENCH_POLL_SECONDS", 10);
    let entries = env("PGW_BENCH_ENTRIES", 1_000_000);
    let servers = runtime();
    let load = runtime();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "bench-token").unwrap();
    println!(
        "progress-gateway load benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Hit throughput against the ceiling.
    let (_, sim) = servers.block_on(start_simulator(Duration::ZERO, Some("bench-token")));
    let gateway_running = servers.block_on(start_gateway(sim, &token, "1s"));
    let gateway = gateway_running.proxy;
    let hot = format!("http://{gateway}/v2/{PROJECT}/instances/i/assets/jobs/hot_d0");
    let (status, headers, body) = load.block_on(async { get(&client(1), &hot).await });
    assert_eq!(status, 200);
    let bare = servers.block_on(start_bare(headers, body.clone()));
    // Alternate the two servers over three rounds so drift hits both alike.
    let mut rounds: Vec<[(f64, f64, f64); 2]> = Vec::new();
    for _ in 0..3 {
        let mut round = [(0.0, 0.0, 0.0); 2];
        for (i, url) in [format!("http://{bare}/"), hot.clone()]
            .into_iter()
            .enumerate()
        {
            let (rate, lat) = load.block_on(hammer(url, connections, seconds));
            round[i] = (rate, lat.ms(0.5), lat.ms(0.99));
        }
        rounds.push(round);
    }
    let median = |i: usize, f: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(|r| f(&r[i])).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.3}", r[1].0 / r[0].0))
        .collect();
    println!("\n1. cache hit, {connections} connections, 3 alternating rounds of {seconds} s, body {} bytes (medians)", body.len());
    println!(
        "   {:<12} {:>10} {:>9} {:>9}",
        "server", "req/s", "p50 ms", "p99 ms"
    );
    for (i, name) in ["bare hyper", "gateway"].into_iter().enumerate() {
        println!(
            "   {:<12} {:>10.0} {:>9.3} {:>9.3}",
            name,
            median(i, |r| r.0),
            median(i, |r| r.1),
            median(i, |r| r.2)
        );
    }
    println!(
        "   ratio gateway / ceiling: {:.3} (per round: {}; target >= 0.85)",
        median(1, |r| r.0) / median(0, |r| r.0),
        ratios.join(", ")
    );
    println!("   note: this one-core hyper client saturates before either server; benches/compare.sh measures the ceiling with wrk");

    // 2. Herd: 100 clients on a fresh key at once, 20 ms upstream.
    let (herd_sim, herd_sim_addr) = servers.block_on(start_simulator(
        Duration::from_millis(20),
        Some("bench-token"),
    ));
    let herd_gateway_running = servers.block_on(start_gateway(herd_sim_addr, &token, "1s"));
    let herd_gateway = herd_gateway_running.proxy;
    // The same herd sent straight to a 20 ms simulator is the reference: what
    // 100 concurrent clients see of the upstream latency on this machine.
    let (_, direct_sim) = servers.block_on(start_simulator(Duration::from_millis(20), None));
    let rounds = 20;
    let herd_client = client(100);
    load.block_on(async {
        for w in 0..100 {
            get(
                &herd_client,
                &format!("http://{herd_gateway}/v5/{PROJECT}/jobs/warm{w}_d0/export/progress"),
            )
            .await;
            get(
                &herd_client,
                &format!("http://{direct_sim}/v5/{PROJECT}/jobs/warm{w}_d0/export/progress"),
            )
            .await;
        }
    });
    let herd = |base: SocketAddr, round: usize| {
        let url = format!("http://{base}/v5/{PROJECT}/jobs/herd{round}/export/progress");
        load.block_on(common::herd(&herd_client, &url, 100))
    };
    let before = herd_sim.total();
    let (mut gw, mut direct) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        gw.push(herd(herd_gateway, round));
        direct.push(herd(direct_sim, round));
    }
    let med = |v: &Vec<(f64, f64)>, f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let upstream = herd_sim.total() - before;
    println!("\n2. herd: 100 clients at once on a fresh key, upstream latency 20 ms, {rounds} rounds (medians)");
    println!(
        "   upstream requests per key: {:.2} (target 1)",
        upstream as f64 / rounds as f64
    );
    println!("   {:<28} {:>8} {:>8}", "", "p50 ms", "p99 ms");
    println!(
        "   {:<28} {:>8.2} {:>8.2}",
        "straight to the simulator",
        med(&direct, |x| x.0),
        med(&direct, |x| x.1)
    );
    println!(
        "   {:<28} {:>8.2} {:>8.2}",
        "through the gateway",
        med(&gw, |x| x.0),
        med(&gw, |x| x.1)
    );
    println!(
        "   added by the gateway at p99: {:.2} ms (target <= 5 ms; nginx's lock adds up to 500 ms)",
        med(&gw, |x| x.1) - med(&direct, |x| x.1)
    );

    // 3. Sustained polling: C clients over K running jobs for D seconds.
    let (poll_sim, poll_sim_addr) = servers.block_on(start_simulator(
        Duration::from_millis(20),
        Some("bench-token"),
    ));
    let ttl = 1.0;
    let poll_gateway_running = servers.block_on(start_gateway(poll_sim_addr, &token, "1s"));
    let poll_gateway = poll_gateway_running.proxy;
    let (c, k) = (200usize, 20usize);
    let (served, latency) = load.block_on(poll(poll_gateway, c, k, poll_seconds));
    let bound = k as f64 * (poll_seconds as f64 / ttl + 1.0);
    println!("\n3. sustained polling: C={c} clients over K={k} running jobs for D={poll_seconds} s, TTL {ttl} s, upstream latency 20 ms");
    println!("   client requests {served}, upstream requests {} (bound K*(D/TTL+1) = {bound:.0}), saved {:.1}%", poll_sim.total(), 100.0 * (1.0 - poll_sim.total() as f64 / served as f64));
    println!(
        "   client latency p50 {:.2} ms, p99 {:.2} ms (target p99 <= 2 ms: polled jobs are refreshed ahead)",
        latency.ms(0.5),
        latency.ms(0.99)
    );

    // 3b. The same polling against an upstream that fails from the start.
    println!("\n3b. upstream failing: C={c} clients over K={k} jobs for D={poll_seconds} s, TTL {ttl} s, no stale answer to fall back on");
    for (label, status, retry_after) in [
        ("instant 503", 503u16, None),
        ("429, Retry-After: 0", 429, Some("0")),
    ] {
        let (sim, sim_addr) =
            servers.block_on(start_simulator(Duration::ZERO, Some("bench-token")));
        sim.set_behaviour(|b| {
            b.force_status = Some(status);
            b.retry_after = retry_after.map(str::to_string);
        });
        let running = servers.block_on(start_gateway(sim_addr, &token, "1s"));
        let (served, _) = load.block_on(poll(running.proxy, c, k, poll_seconds));
        println!(
            "   {label:<22} client requests {served}, upstream requests {} (healthy bound {bound:.0})",
            sim.total()
        );
    }

    // 4. Memory per cached terminal entry.
    let body = Bytes::from(format!(
        r#"{{"id":"{}","type":"exportAsset","status":"SUCCEEDED","progress_percent":1.0,"begin_time":"2026-11-22T07:00:00Z","end_time":"2026-11-22T07:30:00Z","reasons":[],"archive_id":"archive-0"}}"#,
        "f".repeat(32)
    ));
    let (per_entry, overhead) = servers.block_on(async {
        let cache = Cache::new(
            CachePolicy {
                max_bytes: bytesize::ByteSize::gib(64),
                ..CachePolicy::default()
            },
            Arc::new(Terminal(body.clone())),
            Arc::new(Metrics::new()),
        );
        let credential = Arc::new(Credential::new(
            "main",
            CredentialSpec::Token(Origin::Env("UNUSED".into())),
            CredentialCounters::default(),
        ));
        let before = rss_bytes();
        for i in 0..entries {
            let job = format!("{i:032x}");
            let route = Route {
                api: Api::Roma,
                project: PROJECT,
                instance: Some("11111111-2222-3333-4444-555555555555"),
                job: &job,
            };
            let request = || FetchRequest {
                api: Api::Roma,
                url: String::new(),
                project: PROJECT.into(),
                job: job.clone(),
                credential: credential.clone(),
                language: None,
                request_id: String::new(),
            };
            cache
                .get(
                    CacheKey::new(&route, None, "token:main"),
                    Scope {
                        api: Api::Roma,
                        project: PROJECT,
                        consumer: &"bench",
                        consumer_label: "bench",
                    },
                    request,
                )
                .await
                .unwrap();
        }
        let (stored, _) = cache.usage();
        assert_eq!(stored, entries);
        // As floats: with few entries the allocator may hand memory back and RSS shrink.
        let per_entry = (rss_bytes() as f64 - before as f64) / entries as f64;
        (per_entry, per_entry - body.len() as f64)
    });
    println!(
        "\n4. memory: {entries} terminal entries, body {} bytes",
        body.len()
    );
    println!("   RSS per entry {per_entry:.0} bytes, overhead beyond the body {overhead:.0} bytes (target <= 400)");
}
