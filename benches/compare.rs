//! Side by side: progress-gateway, nginx (proxy_cache with proxy_cache_lock,
//! use_stale updating, background_update) and Varnish (the same in VCL, with
//! grace), each configured as the closest equivalent of the gateway, behind
//! the same simulator, under the same two workloads:
//!
//! 1. cache-hit throughput and latency on a hot (finished) job, with a bare
//!    hyper server answering the same bytes as the ceiling, and the CPU time
//!    each server's processes spend per hit, in user space and in the kernel;
//! 2. herd: 100 clients ask for a fresh key at once, upstream latency 20 ms;
//! 3. expired-key herd: 100 clients arrive just after a polled running job's
//!    1 s TTL lapsed (Varnish serves its grace copy, nginx its stale one while
//!    updating, the gateway has refreshed ahead);
//! 4. sustained polling: 200 clients over 20 running jobs, 50 ms apart, for
//!    PGW_BENCH_POLL_SECONDS (5): upstream requests and client latency.
//!
//! The gateway runs as users run it: default config and logging, its log to
//! a file. nginx and Varnish have their access logs off.
//!
//! Servers are pinned to CPU 0 and this load generator (with the simulator) to
//! CPU 1, so each server gets the same single core. Ports are picked free at
//! run time. Hit throughput is measured with wrk; the herd with a small hyper
//! client (it must fire 100 requests at once and count upstream requests).
//! Run it through benches/compare.sh, which installs nginx, Varnish and wrk
//! from Debian's packages if missing and builds the gateway first.
//! Knobs: PGW_BENCH_SECONDS (one hit round, default 2), PGW_BENCH_HIT_ROUNDS (15),
//! PGW_BENCH_CONNECTIONS (64), PGW_BENCH_ROUNDS (herd rounds, 10), PGW_BIN
//! (the gateway binary).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const TOKEN: &str = "bench-token";

struct Server {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    /// A graceful stop, so nothing outlives the benchmark: nginx's master
    /// stops its workers on SIGQUIT (a SIGKILL would orphan them), Varnish's
    /// manager its child on SIGTERM. SIGKILL only if that takes too long.
    fn drop(&mut self) {
        let signal = if self.name == "nginx" { "QUIT" } else { "TERM" };
        let _ = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(addr: SocketAddr, name: &str) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name} did not start listening on {addr}");
}

/// Runs `program` pinned to CPU 0 (when there are two cores to split).
fn pinned(program: &str, args: &[&str]) -> Child {
    pinned_with(program, args, Stdio::null(), |_| {})
}

fn pinned_with(
    program: &str,
    args: &[&str],
    stderr: Stdio,
    adjust: impl FnOnce(&mut Command),
) -> Child {
    let mut command = if cores() >= 2 {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", program]);
        c
    } else {
        Command::new(program)
    };
    command.args(args).stdout(Stdio::null()).stderr(stderr);
    adjust(&mut command);
    command.spawn().unwrap_or_else(|e| {
        panic!("cannot start {program}: {e} (run benches/compare.sh, which installs it)")
    })
}

/// Cores before this process pins itself (after, it would see only one).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn start_gateway(dir: &Path, sim: SocketAddr) -> Server {
    let bin = gateway_binary();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        gateway_config(&addr.to_string(), sim, &dir.join("token"), "1s"),
    )
    .unwrap();
    // As users run it: the default log level, its lines to a file.
    let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
    let child = pinned_with(
        bin.to_str().unwrap(),
        &["serve", "--config", config.to_str().unwrap()],
        Stdio::from(log),
        |command| {
            command.env_remove("RUST_LOG");
        },
    );
    wait_listening(addr, "progress-gateway");
    Server {
        name: "progress-gateway",
        addr,
        child,
    }
}

fn start_nginx(dir: &Path, sim: SocketAddr) -> Server {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = dir.display();
    let user = if is_root() { "user root;" } else { "" };
    let conf = format!(
        r#"{user}
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/client_temp;
  proxy_temp_path {d}/proxy_temp;
  fastcgi_temp_path {d}/fastcgi_temp;
  uwsgi_temp_path {d}/uwsgi_temp;
  scgi_temp_path {d}/scgi_temp;
  proxy_cache_path {d}/nginx-cache levels=1:2 keys_zone=progress:64m max_size=256m inactive=24h use_temp_path=off;
  upstream sim {{ server {sim}; keepalive 64; }}
  server {{
    listen {addr};
    location / {{
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_set_header Cookie "";
      proxy_set_header X-Auth-Token "{TOKEN}";
      proxy_cache progress;
      proxy_cache_key $uri$http_x_language;
      proxy_cache_valid 200 404 1s;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 15s;
      proxy_cache_use_stale updating error timeout http_500 http_502 http_503 http_504;
      proxy_cache_background_update on;
      add_header X-Cache $upstream_cache_status;
    }}
  }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = pinned(
        "nginx",
        &["-c", path.to_str().unwrap(), "-p", dir.to_str().unwrap()],
    );
    wait_listening(addr, "nginx");
    Server {
        name: "nginx",
        addr,
        child,
    }
}

fn start_varnish(dir: &Path, sim: SocketAddr) -> Server {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let vcl = format!(
        r#"vcl 4.1;
backend sim {{ .host = "{}"; .port = "{}"; }}
sub vcl_recv {{
  unset req.http.Authorization;
  unset req.http.Cookie;
  set req.http.X-Auth-Token = "{TOKEN}";
  return (hash);
}}
sub vcl_hash {{
  hash_data(req.url);
  hash_data(req.http.X-Language);
  return (lookup);
}}
sub vcl_backend_response {{
  if (beresp.status == 200 || beresp.status == 404) {{
    set beresp.ttl = 1s;
    set beresp.grace = 5m;
  }} else {{
    set beresp.uncacheable = true;
    set beresp.ttl = 0s;
  }}
  return (deliver);
}}
sub vcl_deliver {{
  if (obj.hits > 0) {{
    set resp.http.X-Cache = "HIT";
  }} else {{
    set resp.http.X-Cache = "MISS";
  }}
}}
"#,
        sim.ip(),
        sim.port()
    );
    let path = dir.join("gateway.vcl");
    std::fs::write(&path, vcl).unwrap();
    let workdir = dir.join("varnish");
    let listen = addr.to_string();
    let child = pinned(
        "varnishd",
        &[
            "-F",
            "-a",
            &listen,
            "-f",
            path.to_str().unwrap(),
            "-s",
            "malloc,256m",
            "-n",
            workdir.to_str().unwrap(),
        ],
    );
    wait_listening(addr, "varnishd");
    Server {
        name: "varnish",
        addr,
        child,
    }
}

/// One wrk run (on this process's core): requests/s, p50 ms, p99 ms.
fn wrk(url: &str, connections: usize, seconds: u64) -> (f64, f64, f64) {
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk runs (benches/compare.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("Non-2xx"), "{url} answered errors:\n{text}");
    let ms = |value: &str| {
        let split = value
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(value.len());
        let (number, unit) = value.split_at(split);
        let number: f64 = number.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => number / 1000.0,
            "s" => number * 1000.0,
            _ => number,
        }
    };
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {prefix} in wrk output:\n{text}"))
    };
    let rate = field("Requests/sec:").parse().unwrap_or(f64::NAN);
    (rate, ms(&field("50%")), ms(&field("99%")))
}

struct Row {
    name: &'static str,
    rate: f64,
    /// Median over rounds of this round's rate / the ceiling's.
    vs_ceiling: f64,
    p50: f64,
    p99: f64,
    /// CPU µs per hit: user, kernel.
    cpu: (f64, f64),
    per_key: f64,
    herd_p50: f64,
    herd_p99: f64,
    /// Expired-key herd: p50 ms, p99 ms, upstream requests per round.
    expired: (f64, f64, f64),
    /// Sustained polling: client requests, upstream requests, p50 ms, p99 ms.
    polling: (u64, u64, f64, f64),
}

/// User and kernel CPU seconds used so far by process `root` and its
/// descendants (nginx's workers, Varnish's child), from `/proc`.
fn cpu_seconds(root: u32) -> (f64, f64) {
    // After the command name in parentheses: state, ppid, ..., utime (12th),
    // stime (13th), in clock ticks.
    let stats: Vec<(u32, u32, u64, u64)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((
                pid,
                fields[1].parse().ok()?,
                fields[11].parse().ok()?,
                fields[12].parse().ok()?,
            ))
        })
        .collect();
    let mut tree = vec![root];
    // Each pass adds at least one generation, whatever order /proc lists
    // processes in; these trees are one or two deep.
    for _ in 0..3 {
        for (pid, parent, _, _) in &stats {
            if tree.contains(parent) && !tree.contains(pid) {
                tree.push(*pid);
            }
        }
    }
    let ticks = clock_ticks();
    stats
        .iter()
        .filter(|(pid, ..)| tree.contains(pid))
        .fold((0.0, 0.0), |(user, kernel), (_, _, u, k)| {
            (user + *u as f64 / ticks, kernel + *k as f64 / ticks)
        })
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times.
fn clock_ticks() -> f64 {
    let output = Command::new("getconf").arg("CLK_TCK").output();
    output
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The ceiling: this same program re-run as a bare hyper server answering the
/// gateway's hit bytes, pinned like the others.
fn start_bare(dir: &Path, headers: &http::HeaderMap, body: &[u8]) -> Server {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let head: String = headers
        .iter()
        .filter(|(name, _)| *name != "content-length" && *name != "date")
        .map(|(name, value)| format!("{name}: {}\n", value.to_str().unwrap_or_default()))
        .collect();
    std::fs::write(dir.join("bare.head"), head).unwrap();
    std::fs::write(dir.join("bare.body"), body).unwrap();
    let me = std::env::current_exe().unwrap();
    let child = pinned(
        me.to_str().unwrap(),
        &["--bare-server", &addr.to_string(), dir.to_str().unwrap()],
    );
    wait_listening(addr, "bare hyper");
    Server {
        name: "bare hyper",
        addr,
        child,
    }
}

fn bare_server(addr: &str, dir: &str) -> ! {
    let dir = Path::new(dir);
    let mut headers = http::HeaderMap::new();
    for line in std::fs::read_to_string(dir.join("bare.head"))
        .unwrap()
        .lines()
    {
        let (name, value) = line.split_once(": ").unwrap();
        headers.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let body = bytes::Bytes::from(std::fs::read(dir.join("bare.body")).unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        serve_fixed(listener, FixedAnswer { headers, body }).await;
    });
    std::process::exit(0)
}

fn hot_url(server: &Server) -> String {
    let slug = server.name.replace(' ', "-");
    format!(
        "http://{}/v2/{PROJECT}/instances/i/assets/jobs/hot-{slug}_d0",
        server.addr
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--bare-server") {
        bare_server(&args[i + 1], &args[i + 2]);
    }
    // Many short rounds, not a few long ones: on a shared machine the speed
    // of the core drifts by ±15 % over seconds, so one server's round reads
    // high and another's low by when they ran. Short rounds put the ceiling
    // and each server back to back within the same few seconds, and fifteen
    // of them give a median that runs agree on: five rounds of 5 s read the
    // same build at 0.83 to 0.93 of the ceiling from one run to the next.
    let seconds = env("PGW_BENCH_SECONDS", 2);
    let hit_rounds = env("PGW_BENCH_HIT_ROUNDS", 15);
    let connections = env("PGW_BENCH_CONNECTIONS", 64) as usize;
    let rounds = env("PGW_BENCH_ROUNDS", 10) as usize;
    let poll_seconds = env("PGW_BENCH_POLL_SECONDS", 5);
    if cores() >= 2 {
        // cores() is first read just above, before pinning; pin before any
        // runtime thread exists, so every thread inherits it.
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
    }
    let load = runtime();
    let dir = tempfile::tempdir().unwrap();
    // Varnish's and nginx's workers may run as another user.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (sim, sim_addr) = load.block_on(start_simulator(Duration::from_millis(20), Some(TOKEN)));

    let gateway = start_gateway(dir.path(), sim_addr);
    let probe = format!(
        "http://{}/v2/{PROJECT}/instances/i/assets/jobs/probe_d0",
        gateway.addr
    );
    let (_, headers, body) = load.block_on(async { get(&client(1), &probe).await });
    let servers = [
        start_bare(dir.path(), &headers, &body),
        gateway,
        start_nginx(dir.path(), sim_addr),
        start_varnish(dir.path(), sim_addr),
    ];
    // Hit throughput with wrk, the servers alternating over many rounds so
    // drift on a shared machine hits them alike; medians are reported, and a
    // server's share of the ceiling is the median of its rounds' shares,
    // each against the ceiling's run in the same round.
    let mut hits: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); servers.len()];
    let mut cpu: Vec<Vec<(f64, f64)>> = vec![Vec::new(); servers.len()];
    for server in &servers {
        let url = hot_url(server);
        let (status, _, _) = load.block_on(async { get(&client(1), &url).await });
        assert_eq!(status, 200, "{} answers the hot key", server.name);
    }
    for _ in 0..hit_rounds {
        for (i, server) in servers.iter().enumerate() {
            let before = cpu_seconds(server.child.id());
            let hit = wrk(&hot_url(server), connections, seconds);
            let after = cpu_seconds(server.child.id());
            let per_hit = |s: f64| s * 1e6 / (hit.0 * seconds as f64);
            cpu[i].push((per_hit(after.0 - before.0), per_hit(after.1 - before.1)));
            hits[i].push(hit);
        }
    }
    // Each round's rate over the ceiling's in that round, per server.
    let shares: Vec<Vec<f64>> = hits
        .iter()
        .map(|rounds| {
            rounds
                .iter()
                .zip(&hits[0])
                .map(|(h, ceiling)| h.0 / ceiling.0)
                .collect()
        })
        .collect();
    let mut rows = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        let pick = |f: fn(&(f64, f64, f64)) -> f64| median(hits[i].iter().map(f).collect());
        let mut row = Row {
            name: server.name,
            rate: pick(|h| h.0),
            vs_ceiling: median(shares[i].clone()),
            p50: pick(|h| h.1),
            p99: pick(|h| h.2),
            cpu: (
                median(cpu[i].iter().map(|c| c.0).collect()),
                median(cpu[i].iter().map(|c| c.1).collect()),
            ),
            per_key: f64::NAN,
            herd_p50: f64::NAN,
            herd_p99: f64::NAN,
            expired: (f64::NAN, f64::NAN, f64::NAN),
            polling: (0, 0, f64::NAN, f64::NAN),
        };
        // The ceiling serves fixed bytes; a herd means nothing there.
        if server.name != "bare hyper" {
            let base = format!("http://{}", server.addr);
            let slug = server.name.replace(' ', "-");
            let herd_client = client(100);
            // Open the 100 connections first, so the herd measures waiting, not handshakes.
            load.block_on(async {
                for w in 0..100 {
                    get(
                        &herd_client,
                        &format!("{base}/v5/{PROJECT}/jobs/warm-{slug}-{w}_d0/export/progress"),
                    )
                    .await;
                }
            });
            let (mut p50s, mut p99s, mut upstream) = (Vec::new(), Vec::new(), 0);
            for round in 0..rounds {
                let path = format!("/v5/{PROJECT}/jobs/herd-{slug}-{round}/export/progress");
                let (p50, p99) = load.block_on(herd(&herd_client, &format!("{base}{path}"), 100));
                p50s.push(p50);
                p99s.push(p99);
                upstream += sim.requests(&path);
            }
            row.per_key = upstream as f64 / rounds as f64;
            row.herd_p50 = median(p50s);
            row.herd_p99 = median(p99s);

            // A running job polled by one client; 100 arrive just after its
            // 1 s TTL lapsed (the scenario is a time, not a synchronisation).
            let (mut p50s, mut p99s, mut upstream) = (Vec::new(), Vec::new(), 0);
            for round in 0..rounds {
                let path = format!("/v5/{PROJECT}/jobs/expired-{slug}-{round}/export/progress");
                let url = format!("{base}{path}");
                load.block_on(async {
                    for _ in 0..5 {
                        get(&herd_client, &url).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                });
                let before = sim.requests(&path);
                let (p50, p99) = load.block_on(herd(&herd_client, &url, 100));
                upstream += sim.requests(&path) - before;
                p50s.push(p50);
                p99s.push(p99);
            }
            row.expired = (median(p50s), median(p99s), upstream as f64 / rounds as f64);

            let before = sim.total();
            let (served, latency) = load.block_on(poll(server.addr, 200, 20, poll_seconds));
            row.polling = (
                served,
                sim.total() - before,
                latency.ms(0.5),
                latency.ms(0.99),
            );
        }
        rows.push(row);
    }
    drop(servers);

    println!("\nprogress-gateway vs nginx vs Varnish ({} cores; servers pinned to one core, load on the other)", cores());
    println!("hit (wrk): {connections} connections, {hit_rounds} alternating rounds of {seconds} s on a finished job (vs ceiling: the median of each round's ratio); herd: 100 clients at once on a fresh key, upstream 20 ms, {rounds} rounds (medians)\n");
    println!(
        "| {:<16} | {:>10} | {:>8} | {:>8} | {:>10} | {:>24} | {:>13} | {:>15} |",
        "server",
        "hit req/s",
        "p50 ms",
        "p99 ms",
        "vs ceiling",
        "CPU µs/hit user + kernel",
        "herd upstream",
        "herd p50/p99 ms"
    );
    println!(
        "|{:-<18}|{:->12}|{:->10}|{:->10}|{:->12}|{:->26}|{:->15}|{:->17}|",
        "", "", "", "", "", "", "", ""
    );
    let or_dash = |r: &Row, text: String| {
        if r.per_key.is_nan() {
            "-".to_string()
        } else {
            text
        }
    };
    for r in &rows {
        println!(
            "| {:<16} | {:>10.0} | {:>8.2} | {:>8.2} | {:>10.2} | {:>24} | {:>13} | {:>15} |",
            r.name,
            r.rate,
            r.p50,
            r.p99,
            r.vs_ceiling,
            format!("{:.2} + {:.2}", r.cpu.0, r.cpu.1),
            or_dash(r, format!("{:.2}", r.per_key)),
            or_dash(r, format!("{:.1} / {:.1}", r.herd_p50, r.herd_p99)),
        );
    }
    // The spread behind each median, for judging a ratio on a noisy machine.
    println!("\nhit req/s by round:");
    for (r, rounds) in rows.iter().zip(&hits) {
        let each: Vec<String> = rounds.iter().map(|h| format!("{:.0}", h.0)).collect();
        println!("  {:<16} {}", r.name, each.join(" "));
    }
    println!("vs ceiling by round:");
    for (r, rounds) in rows.iter().zip(&shares).skip(1) {
        let each: Vec<String> = rounds.iter().map(|share| format!("{share:.2}")).collect();
        println!("  {:<16} {}", r.name, each.join(" "));
    }
    println!("\nexpired-key herd: 100 clients just after a polled running job's 1 s TTL lapsed, {rounds} rounds (medians);");
    println!("sustained polling: 200 clients over 20 running jobs, 50 ms apart, {poll_seconds} s, TTL 1 s, upstream 20 ms\n");
    println!(
        "| {:<16} | {:>17} | {:>16} | {:>15} | {:>16} | {:>17} |",
        "server",
        "expired p50/p99 ms",
        "expired upstream",
        "polling clients",
        "polling upstream",
        "polling p50/p99 ms"
    );
    println!(
        "|{:-<18}|{:->19}|{:->18}|{:->17}|{:->18}|{:->19}|",
        "", "", "", "", "", ""
    );
    for r in rows.iter().filter(|r| !r.per_key.is_nan()) {
        println!(
            "| {:<16} | {:>18} | {:>16.2} | {:>15} | {:>16} | {:>18} |",
            r.name,
            format!("{:.2} / {:.2}", r.expired.0, r.expired.1),
            r.expired.2,
            r.polling.0,
            r.polling.1,
            format!("{:.2} / {:.2}", r.polling.2, r.polling.3),
        );
    }
}
