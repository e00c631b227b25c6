//! What connections cost: memory per idle keep-alive connection (the gateway
//! binary's RSS before and after N of them), and how long a new client waits
//! with a full house of idle or silent sockets (`max_connections` of them).
//!
//! Run: cargo build --release && cargo bench --bench connections
//! Knobs: PGW_BENCH_CONNECTIONS (2000), PGW_BIN (the gateway binary).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use progress_gateway::tools::SimFront;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn one_request(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    stream
}

/// Five new clients, one after the other: each one's time to its answer, ms.
async fn new_clients(addr: std::net::SocketAddr, path: &str) -> Vec<f64> {
    let mut waits = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        drop(one_request(addr, path).await);
        waits.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    waits
}

fn main() {
    let n = env("PGW_BENCH_CONNECTIONS", 2000) as usize;
    let bin = gateway_binary();
    let runtime = runtime();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "bench-token").unwrap();
        let (_sim, sim) = start_simulator(Duration::ZERO, Some("bench-token")).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = SimFront::new(sim, &dir.path().join("token"))
            .listen(&addr.to_string())
            .admin("")
            .section(&format!(
                "[server]\nmax_connections = {n}\nidle_timeout = \"1h\"\nheader_read_timeout = \"1h\""
            ))
            .toml();
        std::fs::write(dir.path().join("gateway.toml"), config).unwrap();
        let mut child = Command::new(&bin)
            .args(["serve", "--config"])
            .arg(dir.path().join("gateway.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the release binary (cargo build --release)");
        while TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let path = format!("/v2/{PROJECT}/instances/i/assets/jobs/conn_d0");
        drop(one_request(addr, &path).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_kib(child.id());
        let mut idle = Vec::with_capacity(n);
        for _ in 0..n {
            idle.push(one_request(addr, &path).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = rss_kib(child.id());
        let per = (after.saturating_sub(before)) as f64 / n as f64;
        println!("memory: {n} idle keep-alive connections, RSS {before} KiB -> {after} KiB: {per:.1} KiB per connection");
        println!("        so max_connections = 10000 costs about {:.0} MiB when all are idle", per * 10_000.0 / 1024.0);

        // A full house of idle connections: a new client arrives.
        let waits = new_clients(addr, &path).await;
        println!("full house of {n} idle connections: a new client is served in {:.2} ms (median of 5)", median(waits));
        drop(idle);
        tokio::time::sleep(Duration::from_millis(500)).await;

        // A full house of silent sockets (connected, never a byte).
        let mut silent = Vec::with_capacity(n);
        for _ in 0..n {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waits = new_clients(addr, &path).await;
        println!("full house of {n} silent sockets: a new client is served in {:.2} ms (median of 5)", median(waits));
        drop(silent);
        let _ = Command::new("kill").args(["-s", "TERM", &child.id().to_string()]).status();
        let _ = child.wait();
    });
}
