//! A fleet: several gateways sharing one real `redis-server` (started here
//! on a free loopback port), in front of one simulator that counts every
//! upstream request. Each replica is the real gateway on its own sockets.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use progress_gateway::app::{App, Running};
use progress_gateway::tools::simulator::{Behaviour, Simulator};
use progress_gateway::tools::SimFront;

use tokio::time::Instant;

use common::redis::RedisServer;
use common::{roma_path, start_simulator, Reply, TOKEN};

/// The simulator, Redis and a temporary directory holding the token file
/// (and config files for replicas run as processes).
struct Fleet {
    sim: Simulator,
    sim_addr: SocketAddr,
    redis: RedisServer,
    replicas: Vec<Running>,
    client: Client<HttpConnector, Empty<Bytes>>,
    dir: tempfile::TempDir,
}

impl Fleet {
    async fn new(behaviour: Behaviour) -> Fleet {
        Fleet::with_redis(behaviour, RedisServer::start()).await
    }

    async fn with_redis(behaviour: Behaviour, redis: RedisServer) -> Fleet {
        let (sim, sim_addr) = start_simulator(behaviour).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
        Fleet {
            sim,
            sim_addr,
            redis,
            replicas: Vec::new(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            dir,
        }
    }

    /// A replica's config: `[shared]` on this fleet's Redis plus `sections`.
    /// Calls get 1 s, not 50 ms: on a loaded test machine a loopback call
    /// may wait that long for a CPU, and the replica would rightly act
    /// alone, which these tests do not expect of a healthy Redis.
    fn toml(&self, redis_url: &str, sections: &str) -> String {
        SimFront::new(self.sim_addr, &self.dir.path().join("token"))
            .section(&format!(
                "[shared]\nredis_url = \"{redis_url}\"\ncall_timeout = \"1s\"\n{}",
                shared_extra(sections)
            ))
            .section(other_sections(sections))
            .toml()
    }

    /// Starts one more replica in this process; returns its index.
    /// A fleet of `n` replicas with `sections`, each connected.
    async fn replicas(n: usize, behaviour: Behaviour, sections: &str) -> Fleet {
        let mut fleet = Fleet::new(behaviour).await;
        for _ in 0..n {
            fleet.add(sections).await;
        }
        fleet
    }

    /// Starts one more replica on this fleet's Redis, once it is connected.
    async fn add(&mut self, sections: &str) -> usize {
        let url = self.redis.url();
        let replica = self.add_on(&url, sections).await;
        self.connected(replica).await;
        replica
    }

    async fn add_on(&mut self, redis_url: &str, sections: &str) -> usize {
        let config = progress_gateway::config::Config::parse(&self.toml(redis_url, sections))
            .unwrap_or_else(|e| panic!("{e}"));
        let running = App::new(config).unwrap().bind().await.unwrap();
        self.replicas.push(running);
        self.replicas.len() - 1
    }

    /// Waits until `replica` has reached Redis and subscribed to the fleet
    /// channel, as its `/readyz` says.
    async fn connected(&self, replica: usize) {
        let since = Instant::now();
        loop {
            let ready = self.admin(replica, "/readyz").await.json();
            if ready["shared"]["state"] == "up" && ready["shared"]["subscribed"] == true {
                return;
            }
            assert!(since.elapsed() < Duration::from_secs(10), "{ready}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get(&self, replica: usize, path: &str) -> Reply {
        get(&self.client, self.replicas[replica].proxy, path).await
    }

    async fn admin(&self, replica: usize, path: &str) -> Reply {
        let admin = self.replicas[replica].admin.expect("an admin listener");
        get(&self.client, admin, path).await
    }

    async fn metric(&self, replica: usize, name: &str) -> f64 {
        metric_in(&self.admin(replica, "/metrics").await, name)
    }

    async fn stop(self) {
        for running in self.replicas {
            running.stop().await;
        }
    }
}

/// `sections` may start with lines for `[shared]` (before any table).
fn shared_extra(sections: &str) -> &str {
    sections.split("\n[").next().unwrap_or("")
}

fn other_sections(sections: &str) -> &str {
    sections.find("\n[").map_or("", |i| &sections[i + 1..])
}

async fn get(client: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr, path: &str) -> Reply {
    get_with(client, addr, path, &[]).await
}

async fn get_with(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::new()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("answered within 30 s")
        .expect("reachable");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn metric_in(reply: &Reply, name: &str) -> f64 {
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    text.lines()
        .find(|line| line.split(' ').next() == Some(name))
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// 30 pollers spread over every replica, each asking for the jobs in turn
/// 100 ms apart, until [`Polling::end`].
struct Polling {
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
    pollers: Vec<tokio::task::JoinHandle<()>>,
}

impl Polling {
    fn start(fleet: &Fleet, paths: &[String]) -> Polling {
        let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = tokio_util::sync::CancellationToken::new();
        let proxies: Vec<_> = fleet.replicas.iter().map(|r| r.proxy).collect();
        let pollers = (0..30)
            .map(|i| {
                let (paths, proxies, client) =
                    (paths.to_vec(), proxies.clone(), fleet.client.clone());
                let (sent, failed, stop) = (sent.clone(), failed.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = i;
                    while !stop.is_cancelled() {
                        let proxy = proxies[n % proxies.len()];
                        let reply = get(&client, proxy, &paths[n % paths.len()]).await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if reply.status != 200 {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
            })
            .collect();
        Polling {
            sent,
            failed,
            stop,
            pollers,
        }
    }

    /// Stops the pollers: (requests sent, requests that failed).
    async fn end(self) -> (u64, u64) {
        self.stop.cancel();
        for poller in self.pollers {
            poller.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn running(latency_ms: u64) -> Behaviour {
    Behaviour {
        latency: Duration::from_millis(latency_ms),
        job_duration: Duration::from_secs(600),
        ..Behaviour::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_and_300_clients_cost_one_upstream_request() {
    let fleet = Fleet::replicas(3, running(300), "").await;
    let fleet = Arc::new(fleet);
    let path = roma_path("fleet-once");
    let clients: Vec<_> = (0..300)
        .map(|i| {
            let (fleet, path) = (fleet.clone(), path.clone());
            tokio::spawn(async move { fleet.get(i % 3, &path).await })
        })
        .collect();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for client in clients {
        let reply = client.await.unwrap();
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.json()["status"], "RUNNING");
        *seen.entry(reply.header("x-cache").to_string()).or_default() += 1;
    }
    assert_eq!(fleet.sim.requests(&path), 1, "{seen:?}");
    // One replica fetched; the other two were answered by the fleet.
    assert_eq!(seen.get("MISS"), Some(&1), "{seen:?}");
    assert_eq!(seen.get("SHARED"), Some(&2), "{seen:?}");
    let mut waits = 0.0;
    for replica in 0..3 {
        waits += fleet.metric(replica, "pgw_shared_waits_total").await;
    }
    assert_eq!(waits, 2.0, "the two other replicas waited for the fetch");
    Arc::into_inner(fleet).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sustained_polling_through_three_replicas_costs_what_one_gateway_costs() {
    let fleet = Fleet::replicas(3, running(20), "\n[cache]\nrunning_ttl = \"1s\"").await;
    let fleet = Arc::new(fleet);
    let (jobs, seconds) = (4, 6);
    let paths: Vec<_> = (0..jobs)
        .map(|j| roma_path(&format!("fleet-poll-{j}")))
        .collect();
    let polling = Polling::start(&fleet, &paths);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (_, failed) = polling.end().await;
    let upstream: u64 = paths.iter().map(|p| fleet.sim.requests(p)).sum();
    let bound = jobs * (seconds + 1);
    assert_eq!(failed, 0);
    assert!(
        upstream <= bound,
        "{upstream} upstream requests for {jobs} jobs over {seconds} s: more than {bound}"
    );
    Arc::into_inner(fleet).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_fetched_through_one_replica_is_served_by_all_even_one_started_later() {
    let behaviour = Behaviour {
        job_duration: Duration::ZERO,
        ..Behaviour::default()
    };
    let mut fleet = Fleet::replicas(3, behaviour, "").await;
    let path = roma_path("fleet-done");
    let first = fleet.get(0, &path).await;
    assert_eq!(first.json()["status"], "SUCCEEDED");
    assert_eq!(first.header("x-cache"), "MISS");
    for replica in [1, 2] {
        let reply = fleet.get(replica, &path).await;
        assert_eq!(reply.body, first.body);
        assert_eq!(reply.header("etag"), first.header("etag"));
        assert_eq!(reply.header("x-cache"), "SHARED");
        assert_eq!(
            reply.header("cache-status"),
            "progress-gateway; hit; detail=shared"
        );
    }
    let late = fleet.add("").await;
    let reply = fleet.get(late, &path).await;
    assert_eq!(
        (reply.body.clone(), reply.header("x-cache")),
        (first.body.clone(), "SHARED")
    );
    assert_eq!(fleet.sim.requests(&path), 1);
    fleet.stop().await;
}

/// Upstream answers `status` through replica 0: the other replicas send
/// nothing more for that API and project while the pause lasts, and answer
/// `error` (status and code) at once (their clients wait 1 s at most).
async fn a_pause_begun_through_one_replica_holds_all(status: u16, error: (u16, &str)) {
    let behaviour = Behaviour {
        force_status: Some(status),
        retry_after: Some("30".into()),
        ..running(0)
    };
    let sections = "\n[cache]\nwait_timeout = \"1s\"\nerror_ttl = \"20s\"\nstale_if_error = \"0s\"";
    let fleet = Fleet::replicas(3, behaviour, sections).await;
    let first = fleet.get(0, &roma_path("fleet-paused-a")).await;
    assert_eq!(first.status, status);
    assert_eq!(fleet.sim.total(), 1);
    // Other jobs of the same API and project, through the other replicas.
    for (replica, job) in [(1, "b"), (2, "c"), (1, "d"), (2, "e")] {
        let reply = fleet
            .get(replica, &roma_path(&format!("fleet-paused-{job}")))
            .await;
        common::assert_gateway_error(&reply, error.0, error.1);
        let wait: u64 = reply.header("retry-after").parse().unwrap();
        assert!((5..=30).contains(&wait), "Retry-After {wait}");
    }
    assert_eq!(
        fleet.sim.total(),
        1,
        "no replica sent while the fleet is paused"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_seen_through_one_replica_stops_the_others_from_sending() {
    a_pause_begun_through_one_replica_holds_all(429, (429, "PGW.4290")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_seen_through_one_replica_backs_the_others_off_too() {
    a_pause_begun_through_one_replica_holds_all(503, (503, "PGW.5031")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upstream_budget_is_the_fleets_not_each_replicas() {
    let sections = "\n[cache]\nupstream_rate = 10.0\nwait_timeout = \"20s\"";
    let fleet = Fleet::replicas(3, running(0), sections).await;
    let fleet = Arc::new(fleet);
    let started = Instant::now();
    // 60 distinct jobs at once, 20 through each replica.
    let clients: Vec<_> = (0..60)
        .map(|i| {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                fleet
                    .get(i % 3, &roma_path(&format!("fleet-budget-{i}")))
                    .await
            })
        })
        .collect();
    tokio::time::sleep_until(started + Duration::from_secs(1)).await;
    // A burst of 10, then 10 a second: about 20 by now, fleet-wide. Each
    // replica on its own budget would have sent all 60.
    let sent = fleet.sim.total();
    assert!(
        sent <= 23,
        "{sent} upstream requests in the first second at 10/s"
    );
    for client in clients {
        assert_eq!(client.await.unwrap().status, 200);
    }
    assert_eq!(fleet.sim.total(), 60);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "60 requests at 10/s after a burst of 10 took {took:?}"
    );
    Arc::into_inner(fleet).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_run_fails_no_request_and_the_fleet_recovers_when_it_returns() {
    let fleet = Fleet::replicas(3, running(20), "\n[cache]\nrunning_ttl = \"1s\"").await;
    let fleet = Arc::new(tokio::sync::Mutex::new(fleet));
    let jobs = 3;
    let paths: Vec<_> = (0..jobs)
        .map(|j| roma_path(&format!("fleet-kill-{j}")))
        .collect();
    let (polling, sim) = {
        let fleet = fleet.lock().await;
        (Polling::start(&fleet, &paths), fleet.sim.clone())
    };
    let upstream = || paths.iter().map(|p| sim.requests(p)).sum::<u64>();
    let phase = Duration::from_secs(4);
    let bound = jobs * (phase.as_secs() + 1);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = upstream();
    fleet.lock().await.redis.kill();
    tokio::time::sleep(phase).await;
    let while_down = upstream() - before;

    fleet.lock().await.redis.restart();
    // Back to fleet-wide within seconds: each replica's breaker probes
    // after its cooldown (2 s) and the subscriber reconnects within 1 s.
    let back = Instant::now();
    loop {
        let fleet = fleet.lock().await;
        let mut up = true;
        for replica in 0..3 {
            let ready = fleet.admin(replica, "/readyz").await.json();
            up &= ready["shared"]["state"] == "up" && ready["shared"]["subscribed"] == true;
        }
        if up {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "the fleet is not back"
        );
        drop(fleet);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = upstream();
    tokio::time::sleep(phase).await;
    let after_return = upstream() - before;
    let (sent, failed) = polling.end().await;
    assert!(sent > 1000);
    assert_eq!(failed, 0, "no client request failed");
    assert!(
        while_down <= 3 * bound,
        "{while_down} upstream requests while Redis was down: more than 3 × {bound}"
    );
    assert!(
        after_return <= bound,
        "{after_return} upstream requests after Redis returned: more than {bound}"
    );
    let fleet = Arc::into_inner(fleet).unwrap().into_inner();
    assert!(fleet.metric(0, "pgw_shared_errors_total").await > 0.0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starts_and_serves_alone_when_redis_is_unreachable() {
    let mut fleet = Fleet::new(running(0)).await;
    // A port nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let replica = fleet.add_on(&format!("redis://{closed}/0"), "").await;
    for job in 0..4 {
        let path = roma_path(&format!("fleet-alone-{job}"));
        let reply = fleet.get(replica, &path).await;
        assert_eq!(
            (reply.status.as_u16(), reply.header("x-cache")),
            (200, "MISS")
        );
        let again = fleet.get(replica, &path).await;
        assert_eq!(again.header("x-cache"), "HIT");
    }
    let ready = fleet.admin(replica, "/readyz").await;
    assert_eq!(
        ready.status, 200,
        "Redis trouble never makes a replica unready"
    );
    assert_eq!(ready.json()["shared"]["state"], "local-only");
    assert_eq!(fleet.metric(replica, "pgw_shared_state").await, 2.0);
    fleet.stop().await;
}

/// The binary as a process, for a replica that is killed.
struct Process {
    child: tokio::process::Child,
    proxy: SocketAddr,
}

async fn spawn_replica(config: &std::path::Path) -> Process {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_progress-gateway"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = common::listening_line(&mut child).await;
    let proxy = common::listening(&line, "proxy").unwrap_or_else(|| panic!("{line}"));
    Process { child, proxy }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_killed_mid_fetch_is_taken_over_once_after_its_lock_expires() {
    let mut fleet = Fleet::new(running(1500)).await;
    let sections = "lock_ttl = \"2s\"\n[cache]\nwait_timeout = \"10s\"";
    let config = fleet.dir.path().join("a.toml");
    std::fs::write(&config, fleet.toml(&fleet.redis.url(), sections)).unwrap();
    let mut holder = spawn_replica(&config).await;
    let b = fleet.add(sections).await;
    let c = fleet.add(sections).await;
    let path = roma_path("fleet-takeover");

    // The holder takes the lock and asks upstream; it dies mid-fetch.
    let asking = tokio::spawn({
        let (client, proxy, path) = (fleet.client.clone(), holder.proxy, path.clone());
        async move {
            client
                .request(
                    Request::get(format!("http://{proxy}{path}"))
                        .body(Empty::new())
                        .unwrap(),
                )
                .await
        }
    });
    fleet.sim.arrived(1).await;
    let killed_at = Instant::now();
    holder.child.kill().await.unwrap();
    assert!(
        asking.await.unwrap().is_err(),
        "the holder died before answering"
    );

    // B and C ask meanwhile: both wait for the lock; nothing goes upstream
    // until it expires, then one takes over and the other is woken.
    let (b_asks, c_asks) = {
        let fleet = &fleet;
        tokio::join!(
            async {
                let (reply_b, reply_c) = tokio::join!(fleet.get(b, &path), fleet.get(c, &path));
                (reply_b, reply_c)
            },
            async {
                // Both replicas waiting, by their counters, before the expiry.
                loop {
                    let waiting = fleet.metric(b, "pgw_shared_waits_total").await
                        + fleet.metric(c, "pgw_shared_waits_total").await;
                    if waiting == 2.0 {
                        break;
                    }
                    assert!(
                        killed_at.elapsed() < Duration::from_secs(10),
                        "B and C never waited"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(killed_at.elapsed() < Duration::from_millis(1500));
                assert_eq!(
                    fleet.sim.requests(&path),
                    1,
                    "no second fetch while the lock lives"
                );
            }
        )
        .0
    };
    let (reply_b, reply_c) = (b_asks, c_asks);
    for reply in [&reply_b, &reply_c] {
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(reply.json()["status"], "RUNNING");
    }
    assert_eq!(
        fleet.sim.requests(&path),
        2,
        "the holder's fetch and one takeover"
    );
    let takeovers = fleet.metric(b, "pgw_shared_lock_takeovers_total").await
        + fleet.metric(c, "pgw_shared_lock_takeovers_total").await;
    assert_eq!(takeovers, 1.0);
    let mut answers = [reply_b.header("x-cache"), reply_c.header("x-cache")];
    answers.sort();
    assert_eq!(answers, ["MISS", "SHARED"]);
    fleet.stop().await;
}

/// Every key in the Redis at `url` and all their values, as text.
async fn redis_contents(url: &str) -> (Vec<String>, String) {
    let mut redis = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut text = String::new();
    for key in &keys {
        // A key may expire between KEYS and here: then it reads as nothing.
        let hash: Vec<Vec<u8>> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        let string: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        for value in hash.into_iter().chain(string) {
            text.push_str(&String::from_utf8_lossy(&value));
            text.push('\n');
        }
    }
    (keys, text)
}

/// No token or password in keys or values; keys are digests, naming no
/// job, instance or credential.
fn assert_nothing_secret((keys, text): &(Vec<String>, String), password: &str) {
    for secret in [TOKEN, password] {
        assert!(!text.contains(secret), "{secret} is in Redis: {text}");
    }
    for key in keys {
        for part in ["fleet-secret", "inst-1", "main", TOKEN] {
            assert!(!key.contains(part), "{part} in the key {key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_reaches_redis_whose_password_comes_from_a_file() {
    const PASSWORD: &str = "redis-pass-7c1e9b2a";
    // Upstream quotes the request's token back in its 500s.
    let behaviour = Behaviour {
        echo: true,
        force_status: Some(500),
        ..running(0)
    };
    let redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let mut fleet = Fleet::with_redis(behaviour, redis).await;
    let password_file = fleet.dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    // The failure is shared for 30 s; the pause it begins lasts 1 s at most.
    let sections = format!(
        "password_file = \"{}\"\n[cache]\nerror_ttl = \"30s\"\nfailure_backoff_max = \"1s\"",
        password_file.display()
    );
    for _ in 0..2 {
        fleet.add(&sections).await;
    }
    let url = format!("redis://:{PASSWORD}@{}/0", fleet.redis.addr);
    let failing = roma_path("fleet-secret-failing");
    let failed = fleet.get(0, &failing).await;
    assert_eq!(failed.status, 500);
    assert_eq!(
        fleet.get(1, &failing).await.body,
        failed.body,
        "the failure is shared"
    );
    let stored = redis_contents(&url).await;
    assert!(
        stored.1.contains("SIM.0500"),
        "the failure is in Redis: {stored:?}"
    );
    assert_nothing_secret(&stored, PASSWORD);

    fleet.sim.set_behaviour(|b| {
        b.force_status = None;
        b.echo = false;
    });
    let path = roma_path("fleet-secret-running");
    // Past the failure's pause: the fleet lets the probe through.
    let mut first = fleet.get(0, &path).await;
    for _ in 0..100 {
        if first.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        first = fleet.get(0, &path).await;
    }
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(fleet.get(1, &path).await.header("x-cache"), "SHARED");
    let stored = redis_contents(&url).await;
    assert!(
        stored.1.contains("RUNNING"),
        "the answer is in Redis: {stored:?}"
    );
    assert_nothing_secret(&stored, PASSWORD);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_on_one_replica_is_woken_by_refreshes_the_fleet_shares() {
    let behaviour = Behaviour {
        job_duration: Duration::from_secs(60),
        ..running(20)
    };
    let fleet = Fleet::replicas(2, behaviour, "\n[cache]\nrunning_ttl = \"1s\"").await;
    let path = roma_path("fleet-watched");
    let seconds = 5;
    let until = Instant::now() + Duration::from_secs(seconds);
    // Replica 0 is polled; replica 1 only watched, by a client long-polling
    // with the last ETag it saw. Both keep the job warm, through one lock.
    let polled = async {
        while Instant::now() < until {
            assert_eq!(fleet.get(0, &path).await.status, 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let watched = async {
        let mut etag = fleet.get(1, &path).await.header("etag").to_string();
        let mut changes = 0;
        while Instant::now() < until {
            let proxy = fleet.replicas[1].proxy;
            let headers = [("if-none-match", etag.as_str()), ("prefer", "wait=3")];
            let reply = get_with(&fleet.client, proxy, &path, &headers).await;
            if reply.status == 200 {
                assert_ne!(reply.header("etag"), etag);
                etag = reply.header("etag").to_string();
                changes += 1;
            } else {
                assert_eq!(reply.status, 304);
            }
        }
        changes
    };
    let ((), changes) = tokio::join!(polled, watched);
    assert!(
        changes >= 3,
        "the watcher saw {changes} changes in {seconds} s"
    );
    // One fetch per window for the fleet, however the two replicas share it.
    let upstream = fleet.sim.requests(&path);
    assert!(
        upstream <= seconds + 2,
        "{upstream} upstream requests in {seconds} s at TTL 1 s"
    );
    let shared = fleet.metric(0, "pgw_shared_hits_total").await
        + fleet.metric(1, "pgw_shared_hits_total").await;
    assert!(shared >= 3.0, "refreshes taken from the fleet: {shared}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_shares_over_tls_to_a_redis_whose_ca_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key, ca) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    // The server's certificate is its own CA, as a private CA would be.
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let redis = RedisServer::start_tls(cert, key);
    let mut fleet = Fleet::with_redis(running(0), redis).await;
    let sections = format!("ca_file = \"{}\"", ca.display());
    let (a, b) = (fleet.add(&sections).await, fleet.add(&sections).await);
    let path = roma_path("fleet-tls");
    assert_eq!(fleet.get(a, &path).await.header("x-cache"), "MISS");
    assert_eq!(fleet.get(b, &path).await.header("x-cache"), "SHARED");
    assert_eq!(fleet.sim.requests(&path), 1);

    // Without the CA the certificate is not trusted: the replica acts alone.
    let url = fleet.redis.url();
    let c = fleet.add_on(&url, "").await;
    let other = roma_path("fleet-tls-untrusted");
    assert_eq!(fleet.get(c, &other).await.header("x-cache"), "MISS");
    assert_eq!(
        fleet.get(a, &other).await.header("x-cache"),
        "MISS",
        "nothing shared by C"
    );
    assert_ne!(
        fleet.admin(c, "/readyz").await.json()["shared"]["state"],
        "up"
    );
    fleet.stop().await;
}
