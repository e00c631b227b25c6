//! The real binary under real signals: SIGTERM drains, SIGHUP reloads.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use progress_gateway::tools::simulator::Behaviour;
use progress_gateway::tools::SimFront;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

struct Process {
    child: Child,
    proxy: SocketAddr,
    /// The admin listener, when the config has one.
    admin: Option<SocketAddr>,
    logs: mpsc::UnboundedReceiver<String>,
}

fn config(sim: SocketAddr, dir: &std::path::Path, extra: &str, projects: &[&str]) -> String {
    front(sim, dir, extra, projects).toml()
}

fn front(sim: SocketAddr, dir: &std::path::Path, extra: &str, projects: &[&str]) -> SimFront {
    let mut front = SimFront::new(sim, &dir.join("token"))
        .without_projects()
        .section(extra);
    for project in projects {
        front = front.project(project, "main");
    }
    front
}

async fn spawn_gateway(config: &std::path::Path) -> Process {
    spawn_gateway_with(config, None).await
}

/// Starts the binary, under `prlimit --nofile=N:N` when `open_files` is set.
async fn spawn_gateway_with(config: &std::path::Path, open_files: Option<u32>) -> Process {
    let command = match open_files {
        None => Command::new(env!("CARGO_BIN_EXE_progress-gateway")),
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}"))
                .arg("--")
                .arg(env!("CARGO_BIN_EXE_progress-gateway"));
            c
        }
    };
    let (mut child, proxy, admin) = start(command, config).await;
    let (tx, logs) = mpsc::unbounded_channel();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Process {
        child,
        proxy,
        admin,
        logs,
    }
}

/// Runs `serve` with `RUST_LOG=info`, its stdout and stderr piped, and waits
/// for its listening line: the child, its proxy and admin addresses.
async fn start(
    mut command: Command,
    config: &std::path::Path,
) -> (tokio::process::Child, SocketAddr, Option<SocketAddr>) {
    let mut child = command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = common::listening_line(&mut child).await;
    let proxy = common::listening(&line, "proxy").unwrap_or_else(|| panic!("{line}"));
    (child, proxy, common::listening(&line, "admin"))
}

impl Process {
    fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", name, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Log lines up to and including the first that contains `needle`.
    async fn logs_until(&mut self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), self.logs.recv())
                .await
                .unwrap_or_else(|_| panic!("no log line with {needle:?} after {seen:#?}"))
                .expect("the gateway is running");
            let done = line.contains(needle);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }
}

/// The simulator (requiring [`TOKEN`], which a token file in a temporary
/// directory holds) and where the config file goes.
async fn setup(
    behaviour: Behaviour,
) -> (
    progress_gateway::tools::simulator::Simulator,
    SocketAddr,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let (sim, sim_addr) = start_simulator(behaviour).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let path = dir.path().join("gateway.toml");
    (sim, sim_addr, dir, path)
}

/// The binary in front of the simulator, with 20 s to drain.
async fn draining_gateway(
    behaviour: Behaviour,
) -> (
    progress_gateway::tools::simulator::Simulator,
    tempfile::TempDir,
    Process,
) {
    let (sim, sim_addr, dir, path) = setup(behaviour).await;
    let extra = "[server]\ndrain_timeout = \"20s\"";
    std::fs::write(&path, config(sim_addr, dir.path(), extra, &[PROJECT])).unwrap();
    let gateway = spawn_gateway(&path).await;
    (sim, dir, gateway)
}

/// Waits for the process to end and asserts it exited 0.
async fn exits_zero(gateway: &mut Process, within: Duration) {
    let exit = tokio::time::timeout(within, gateway.child.wait())
        .await
        .expect("the gateway exits in time")
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

/// One HTTP/1.1 request on an open keep-alive connection: status, head, body.
async fn raw_get(stream: &mut TcpStream, path: &str) -> (u16, String, String) {
    raw_get_with(stream, path, "").await
}

/// [`raw_get`] with `headers` (each line ending in CRLF) in the request.
async fn raw_get_with(stream: &mut TcpStream, path: &str, headers: &str) -> (u16, String, String) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{headers}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head, String::from_utf8(body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let slow = Behaviour {
        latency: Duration::from_millis(1500),
        ..Behaviour::default()
    };
    let (sim, _dir, mut gateway) = draining_gateway(slow).await;

    let mut in_flight = TcpStream::connect(gateway.proxy).await.unwrap();
    let request = tokio::spawn(async move { raw_get(&mut in_flight, &drs_path("slow")).await });
    sim.arrived(1).await;
    gateway.signal("TERM");
    gateway.logs_until("shutting down").await;

    // The listener closes right after the signal is handled; allow it a moment.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(gateway.proxy).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections are refused during the drain");
    let (status, _, body) = request.await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("pending"));
    exits_zero(&mut gateway, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_counts_dropped_log_lines_in_its_metrics() {
    let (_sim, sim_addr, dir, path) = setup(Behaviour::default()).await;
    std::fs::write(&path, config(sim_addr, dir.path(), "", &[PROJECT])).unwrap();
    let mut gateway = spawn_gateway(&path).await;
    let admin = gateway.admin.expect("an admin listener");
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let (status, _, metrics) = raw_get(&mut stream, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("pgw_log_lines_dropped 0"), "{metrics}");
    gateway.signal("TERM");
    exits_zero(&mut gateway, Duration::from_secs(20)).await;
}

/// Nobody reads the gateway's stderr (a stuck log shipper): once the pipe is
/// full, its log writer blocks, and neither requests nor the exit wait on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_holds_up_neither_requests_nor_the_exit() {
    let (_sim, sim_addr, dir, path) = setup(Behaviour::default()).await;
    std::fs::write(&path, config(sim_addr, dir.path(), "", &[PROJECT])).unwrap();
    let command = Command::new(env!("CARGO_BIN_EXE_progress-gateway"));
    let (mut child, proxy, admin) = start(command, &path).await;
    // Held open, never read.
    let _stderr = child.stderr.take().unwrap();
    let (_no_lines, logs) = mpsc::unbounded_channel();
    let mut gateway = Process {
        child,
        proxy,
        admin,
        logs,
    };
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    // About 250 KiB of access lines, four times what a pipe holds.
    for _ in 0..1000 {
        let (status, _, _) = raw_get(&mut stream, &drs_path("stalled")).await;
        assert_eq!(status, 200);
    }
    drop(stream);
    gateway.signal("TERM");
    exits_zero(&mut gateway, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_writes_an_access_line_per_request_with_secrets_scrubbed() {
    let (_sim, sim_addr, dir, path) = setup(Behaviour::default()).await;
    std::fs::write(&path, config(sim_addr, dir.path(), "", &[PROJECT])).unwrap();
    let mut gateway = spawn_gateway(&path).await;
    let mut stream = TcpStream::connect(gateway.proxy).await.unwrap();
    // A request id is the client's to choose, even the gateway's token.
    for id in ["first-request", TOKEN] {
        let header = format!("X-Request-Id: {id}\r\n");
        let (status, _, _) = raw_get_with(&mut stream, &drs_path("logged"), &header).await;
        assert_eq!(status, 200);
    }
    let mut lines = gateway.logs_until("request_id=first-request").await;
    let first = lines.last().unwrap().clone();
    let expected = format!(
        " INFO progress_gateway::access: method=GET route=\"drs\" project=\"{PROJECT}\" \
         consumer=\"-\" status=200 cache=\"MISS\" stale=\"-\" error=\"-\" latency_us="
    );
    assert!(first.contains(&expected), "{first}");
    lines.extend(gateway.logs_until("request_id=<redacted>").await);
    assert!(
        lines.last().unwrap().contains("cache=\"HIT\""),
        "{lines:#?}"
    );
    assert!(lines.iter().all(|line| !line.contains(TOKEN)), "{lines:#?}");
    gateway.signal("TERM");
    exits_zero(&mut gateway, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_fitted_to_a_low_open_files_limit() {
    let (_sim, sim_addr, dir, path) = setup(Behaviour::default()).await;
    std::fs::write(&path, config(sim_addr, dir.path(), "", &[PROJECT])).unwrap();
    let mut gateway = spawn_gateway_with(&path, Some(512)).await;
    let lines = gateway
        .logs_until("does not fit the open-files limit")
        .await;
    let warning = lines.last().unwrap();
    assert!(
        warning.contains("using=256") && warning.contains("max_connections=10000"),
        "{warning}"
    );
    let mut stream = TcpStream::connect(gateway.proxy).await.unwrap();
    assert_eq!(raw_get(&mut stream, &drs_path("fits")).await.0, 200);
    gateway.signal("TERM");
    exits_zero(&mut gateway, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_the_drain_exits_at_once() {
    let slow = Behaviour {
        latency: Duration::from_secs(120),
        ..Behaviour::default()
    };
    let (sim, sim_addr, dir, path) = setup(slow).await;
    let extra = "[server]\ndrain_timeout = \"1h\"\n[upstream]\nrequest_timeout = \"10m\"\n[cache]\nwait_timeout = \"10m\"";
    std::fs::write(&path, config(sim_addr, dir.path(), extra, &[PROJECT])).unwrap();
    let mut gateway = spawn_gateway(&path).await;
    let mut in_flight = TcpStream::connect(gateway.proxy).await.unwrap();
    let _request = tokio::spawn(async move { raw_get(&mut in_flight, &drs_path("stuck")).await });
    sim.arrived(1).await;
    gateway.signal("TERM");
    gateway.logs_until("shutting down").await;
    gateway.signal("TERM");
    gateway.logs_until("second signal").await;
    // Without the second signal it would wait out the hour-long drain.
    let exit = tokio::time::timeout(Duration::from_secs(30), gateway.child.wait())
        .await
        .expect("exits without waiting for the drain")
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_live_and_refuses_an_invalid_one() {
    let (_sim, sim_addr, dir, path) = setup(Behaviour::default()).await;
    let cache = "[cache]\nrunning_ttl = \"1h\"";
    std::fs::write(&path, config(sim_addr, dir.path(), cache, &[PROJECT])).unwrap();
    let mut gateway = spawn_gateway(&path).await;

    let mut connection = TcpStream::connect(gateway.proxy).await.unwrap();
    let (status, head, _) = raw_get(&mut connection, &drs_path("kept")).await;
    assert_eq!((status, head.contains("x-cache: miss")), (200, true));
    let other = format!("/v5/{OTHER_PROJECT}/jobs/j/export/progress");
    assert_eq!(raw_get(&mut connection, &other).await.0, 403);

    // A second project, and a new listen address that needs a restart.
    let next = front(sim_addr, dir.path(), cache, &[PROJECT, OTHER_PROJECT])
        .listen("127.0.0.1:1")
        .toml();
    std::fs::write(&path, next).unwrap();
    gateway.signal("HUP");
    let lines = gateway.logs_until("config reloaded").await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("after a restart") && l.contains("listen")),
        "{lines:#?}"
    );

    // Same connection, same cache, new projects.
    let (status, head, _) = raw_get(&mut connection, &drs_path("kept")).await;
    assert_eq!(
        (status, head.contains("x-cache: hit")),
        (200, true),
        "{head}"
    );
    assert_eq!(raw_get(&mut connection, &other).await.0, 200);

    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nbogus_key = 1\n").unwrap();
    gateway.signal("HUP");
    let lines = gateway.logs_until("config reload refused").await;
    let refused = lines.last().unwrap();
    assert!(
        refused.contains("bogus_key") && refused.contains("line 2"),
        "{refused}"
    );
    assert_eq!(
        raw_get(&mut connection, &other).await.0,
        200,
        "the old config keeps serving"
    );
    gateway.signal("TERM");
    exits_zero(&mut gateway, Duration::from_secs(20)).await;
}

/// Runs the binary to completion: exit code, stdout, stderr.
fn run(args: &[&str], env: &[(&str, &std::path::Path)]) -> (Option<i32>, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_progress-gateway"));
    command.args(args).env_remove("PGW_CONFIG");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_config_names_the_key_and_line_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"nowhere\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("admin.listen") && stderr.contains("line 3"),
        "{stderr}"
    );

    // PGW_CONFIG stands in for --config.
    let sim: SocketAddr = "127.0.0.1:9".parse().unwrap();
    std::fs::write(&path, config(sim, dir.path(), "", &[PROJECT])).unwrap();
    let (code, stdout, stderr) = run(&["check-config"], &[("PGW_CONFIG", &path)]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ok (1 projects)"), "{stdout}");
}

#[test]
fn invalid_option_values_are_refused_not_clamped() {
    let (code, _, stderr) = run(&["demo", "--clients", "0"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--clients"), "{stderr}");
    let (code, _, stderr) = run(&["demo", "--shortest", "10s", "--longest", "1s"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stdout, _) = run(&["serve", "--help"], &[]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("The config file") && stdout.contains("PGW_CONFIG"),
        "{stdout}"
    );
}

/// Sends `request` on a new connection and reads until the gateway closes it.
async fn exchange_until_closed(addr: SocketAddr, request: String) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("closed within 10 s")
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_held_long_polls_and_ends_event_streams_at_once() {
    let (sim, _dir, mut gateway) = draining_gateway(Behaviour::default()).await;
    let job = drs_path("watched");
    let mut first = TcpStream::connect(gateway.proxy).await.unwrap();
    let (status, head, _) = raw_get(&mut first, &job).await;
    assert_eq!(status, 200);
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .trim()
        .to_string();
    let long_poll = tokio::spawn(exchange_until_closed(
        gateway.proxy,
        format!(
            "GET {job} HTTP/1.1\r\nHost: gw\r\nIf-None-Match: {etag}\r\nPrefer: wait=25\r\nConnection: close\r\n\r\n"
        ),
    ));
    let stream = tokio::spawn(exchange_until_closed(
        gateway.proxy,
        format!("GET {job} HTTP/1.1\r\nHost: gw\r\nAccept: text/event-stream\r\n\r\n"),
    ));
    // Both are being watched once the gauges say so.
    let metrics = gateway.admin.unwrap();
    loop {
        let text = admin_text(metrics).await;
        if text.contains("pgw_watchers{kind=\"long-poll\"} 1")
            && text.contains("pgw_watchers{kind=\"stream\"} 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = std::time::Instant::now();
    gateway.signal("TERM");
    let answer = long_poll.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 304"), "{answer}");
    assert!(answer
        .to_ascii_lowercase()
        .contains("preference-applied: wait=25"));
    let events = stream.await.unwrap();
    assert!(events.contains("event: progress"), "{events}");
    assert!(
        events.ends_with("retry: 3000\n\n\r\n0\r\n\r\n"),
        "ends cleanly after a retry: {events:?}"
    );
    assert!(signalled.elapsed() < Duration::from_secs(5));
    exits_zero(&mut gateway, Duration::from_secs(10)).await;
    drop(sim);
}

async fn admin_text(addr: SocketAddr) -> String {
    exchange_until_closed(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".to_string(),
    )
    .await
}
