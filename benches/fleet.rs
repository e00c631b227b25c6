//! A fleet: 1, 2 and 3 replicas of the gateway binary (default config and
//! logging, to a file), with and without the shared tier on a real
//! `redis-server`, in front of the simulator (20 ms upstream).
//!
//! Reports, for each fleet: upstream requests per job per window while 60
//! pollers poll 10 running jobs through every replica (TTL 1 s); the latency
//! of a local miss that Redis answers against a local hit and an upstream
//! fetch; and with Redis killed mid-run and back, the same cost and latency.
//!
//! Run: cargo build --release && cargo bench --bench fleet
//! Knobs: PGW_BENCH_SECONDS (per polling phase, 5), PGW_BIN (the binary).

mod common;
#[path = "../tests/common/redis.rs"]
mod redis_server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use progress_gateway::tools::simulator::Simulator;
use progress_gateway::tools::SimFront;
use redis_server::RedisServer;
use std::io::{BufRead, BufReader};

const JOBS: usize = 10;
const POLLERS: usize = 60;

/// One gateway process, stopped with SIGTERM when dropped.
struct Replica {
    child: Child,
    proxy: SocketAddr,
}

impl Replica {
    fn spawn(bin: &Path, dir: &Path, name: &str, config: &str) -> Replica {
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("the release binary (cargo build --release)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let proxy = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("proxy=http://"))
            .unwrap_or_else(|| panic!("no listening line: {line}"))
            .parse()
            .unwrap();
        Replica { child, proxy }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

struct Bench {
    bin: PathBuf,
    dir: tempfile::TempDir,
    sim: Simulator,
    sim_addr: SocketAddr,
    seconds: u64,
}

impl Bench {
    fn fleet(&self, n: usize, redis: Option<&RedisServer>) -> Vec<Replica> {
        let shared = redis.map_or(String::new(), |r| {
            format!("[shared]\nredis_url = \"{}\"", r.url())
        });
        let config = SimFront::new(self.sim_addr, &self.dir.path().join("token"))
            .admin("")
            .section(&shared)
            .section("[cache]\nrunning_ttl = \"1s\"")
            .toml();
        (0..n)
            .map(|i| Replica::spawn(&self.bin, self.dir.path(), &format!("replica{i}"), &config))
            .collect()
    }

    /// Pollers spread evenly over the replicas poll `JOBS` running jobs
    /// named after `tag`, 50 ms apart: upstream requests per job per
    /// window, failed requests, and latencies (first polls left out).
    async fn poll(&self, replicas: &[SocketAddr], tag: &str) -> (f64, u64, Latencies) {
        let paths: Vec<_> = (0..JOBS)
            .map(|j| format!("/v2/{PROJECT}/instances/i/assets/jobs/{tag}-{j}"))
            .collect();
        // Every job is polled through every replica.
        let urls = (0..POLLERS)
            .map(|i| {
                let replica = replicas[(i / JOBS) % replicas.len()];
                format!("http://{replica}{}", paths[i % JOBS])
            })
            .collect();
        let (samples, failed) = poll_urls(urls, self.seconds).await;
        let upstream: u64 = paths.iter().map(|p| self.sim.requests(p)).sum();
        // Each job's first window is a cold miss; then one refresh per TTL.
        let per_window = upstream as f64 / (JOBS as f64 * (self.seconds + 1) as f64);
        (per_window, failed, Latencies::new(samples))
    }
}

/// For `n` jobs: fetched through `a` (an upstream fetch), then asked of
/// `b` (a local miss Redis answers), then of `b` again (a local hit).
/// Latencies in ms: (upstream miss, shared, hit).
async fn shared_hit_latency(a: SocketAddr, b: SocketAddr, n: usize) -> [Latencies; 3] {
    let client = client(2);
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for job in 0..n {
        let path = format!("/v2/{PROJECT}/instances/i/assets/jobs/latency-{job}");
        for (i, replica) in [a, b, b].into_iter().enumerate() {
            let asked = Instant::now();
            let (status, headers, _) = get(&client, &format!("http://{replica}{path}")).await;
            samples[i].push(asked.elapsed().as_micros() as u32);
            let expected = ["MISS", "SHARED", "HIT"][i];
            assert_eq!(
                (status, headers["x-cache"].to_str().unwrap()),
                (200, expected)
            );
        }
    }
    samples.map(Latencies::new)
}

fn main() {
    let seconds = env("PGW_BENCH_SECONDS", 5);
    let bin = gateway_binary();
    let runtime = runtime();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "bench-token").unwrap();
        let (sim, sim_addr) = start_simulator(Duration::from_millis(20), Some("bench-token")).await;
        let bench = Bench { bin, dir, sim, sim_addr, seconds };
        let mut redis = RedisServer::start();

        println!("{POLLERS} pollers, {JOBS} running jobs, TTL 1 s, {seconds} s, upstream 20 ms");
        println!("upstream requests per job per window: 1.00 is one gateway's cost (a cold miss, then one per TTL)");
        println!("| replicas | shared tier | upstream / job / window | client p50 / p99 |");
        println!("|---:|---|---:|---:|");
        for n in 1..=3 {
            for shared in [false, true] {
                let fleet = bench.fleet(n, shared.then_some(&redis));
                let addrs: Vec<_> = fleet.iter().map(|r| r.proxy).collect();
                let tag = format!("poll-{n}-{shared}");
                let (per_window, failed, lat) = bench.poll(&addrs, &tag).await;
                assert_eq!(failed, 0);
                println!(
                    "| {n} | {} | {per_window:.2} | {:.2} / {:.2} ms |",
                    if shared { "on" } else { "off" },
                    lat.ms(0.5),
                    lat.ms(0.99)
                );
            }
        }

        let fleet = bench.fleet(3, Some(&redis));
        let addrs: Vec<_> = fleet.iter().map(|r| r.proxy).collect();
        let [miss, shared, hit] = shared_hit_latency(addrs[0], addrs[1], 300).await;
        println!();
        println!("a local miss answered by Redis, 300 jobs, p50 / p99:");
        println!("  local hit            {:.3} / {:.3} ms", hit.ms(0.5), hit.ms(0.99));
        println!("  shared (Redis)       {:.3} / {:.3} ms", shared.ms(0.5), shared.ms(0.99));
        println!("  upstream fetch       {:.3} / {:.3} ms", miss.ms(0.5), miss.ms(0.99));
        println!("  added by the shared tier over a local hit: {:.3} ms at p50", shared.ms(0.5) - hit.ms(0.5));

        println!();
        println!("3 replicas, shared tier on; Redis killed, then started again:");
        redis.kill();
        let (per_window, failed, lat) = bench.poll(&addrs, "redis-down").await;
        println!(
            "  Redis down:     {per_window:.2} upstream / job / window, {failed} failed, p50 / p99 {:.2} / {:.2} ms",
            lat.ms(0.5),
            lat.ms(0.99)
        );
        redis.restart();
        // Each replica probes Redis every second while its breaker is open.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (per_window, failed, lat) = bench.poll(&addrs, "redis-back").await;
        println!(
            "  Redis back:     {per_window:.2} upstream / job / window, {failed} failed, p50 / p99 {:.2} / {:.2} ms",
            lat.ms(0.5),
            lat.ms(0.99)
        );
        drop(fleet);
    });
}
