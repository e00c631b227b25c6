//! The progress-aware cache over real sockets, counted at the simulator.

mod common;

use std::time::Duration;

use common::*;
use progress_gateway::tools::simulator::Behaviour;
use tokio::io::AsyncWriteExt;

fn slow(latency_ms: u64) -> Behaviour {
    Behaviour {
        latency: Duration::from_millis(latency_ms),
        ..Behaviour::default()
    }
}

/// Sends `n` concurrent GETs for `path`; returns the X-Cache values.
async fn crowd(h: &std::sync::Arc<Harness>, path: &str, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (h, path) = (h.clone(), path.to_string());
            tokio::spawn(async move {
                let reply = h.get(&path).await;
                assert_eq!(reply.status, 200, "{:?}", reply.body);
                reply.header("x-cache").to_string()
            })
        })
        .collect();
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.unwrap());
    }
    seen
}

/// Over real sockets, counted at the simulator; the window logic itself is
/// tested on paused time in `handler.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pollers_over_sockets_cost_one_upstream_request() {
    let h = std::sync::Arc::new(start_with(slow(50), "[cache]\nrunning_ttl = \"1h\"", None).await);
    let path = roma_path("job-crowd");
    let seen = crowd(&h, &path, 1000).await;
    assert_eq!(h.sim.requests(&path), 1);
    assert_eq!(seen.iter().filter(|s| *s == "MISS").count(), 1);
    assert!(seen
        .iter()
        .all(|s| ["MISS", "COALESCED", "HIT"].contains(&s.as_str())));
}

#[tokio::test]
async fn terminal_result_is_fetched_once_and_never_again() {
    let h = start("[cache]\nrunning_ttl = \"50ms\"").await;
    let path = roma_path("finished_d0");
    for window in 0..8 {
        let reply = h.get(&path).await;
        assert_eq!(reply.json()["status"], "SUCCEEDED");
        assert_eq!(
            reply.header("x-cache"),
            if window == 0 { "MISS" } else { "HIT" }
        );
        assert_eq!(
            reply.header("cache-control"),
            "private, max-age=86400, immutable"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(h.sim.requests(&path), 1);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_fetch_does_not_cancel_it() {
    let h = start_with(slow(300), "[cache]\nrunning_ttl = \"10s\"", None).await;
    let path = drs_path("abandoned");
    let mut stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes())
        .await
        .unwrap();
    h.sim.arrived(1).await;
    drop(stream);
    let reply = h.get(&path).await;
    assert_eq!(reply.status, 200);
    assert!(["COALESCED", "HIT"].contains(&reply.header("x-cache")));
    assert_eq!(h.sim.requests(&path), 1);
}

#[tokio::test]
async fn stale_if_error_serves_the_last_answer_marked_stale() {
    let h = start("[cache]\nrunning_ttl = \"100ms\"\nstale_if_error = \"1m\"").await;
    let path = roma_path("flaky");
    let fresh = h.get(&path).await;
    h.sim.set_behaviour(|b| b.force_status = Some(503));
    tokio::time::sleep(Duration::from_millis(120)).await;
    let stale = h.get(&path).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-cache"), "STALE");
    assert_eq!(stale.body, fresh.body);
    assert_eq!(h.sim.requests(&path), 2);

    // Without an earlier answer the upstream error is passed on.
    let reply = h.get(&roma_path("never-seen")).await;
    assert_eq!(reply.status, 503);
}

#[tokio::test]
async fn stale_if_error_window_ends() {
    let h = start("[cache]\nrunning_ttl = \"50ms\"\nstale_if_error = \"100ms\"").await;
    let path = roma_path("flaky");
    h.get(&path).await;
    h.sim.set_behaviour(|b| b.force_status = Some(502));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.get(&path).await.status, 502);
}

#[tokio::test]
async fn upstream_429_backs_off_the_project_and_api() {
    let h = start("[cache]\nrunning_ttl = \"10s\"\nretry_after_default = \"30s\"").await;
    h.sim.set_behaviour(|b| {
        b.force_status = Some(429);
        b.force_count = Some(1);
        b.retry_after = Some("20".into());
    });
    let first = h.get(&drs_path("a")).await;
    assert_eq!(first.status, 429);
    assert_eq!(first.header("retry-after"), "20");
    assert_eq!(first.json()["error_code"], "APIGW.0308");

    // Same API and project: refused by the gateway without asking upstream.
    let second = h.get(&drs_path("b")).await;
    assert_gateway_error(&second, 429, "PGW.4290");
    let wait: u64 = second.header("retry-after").parse().unwrap();
    assert!((19..=20).contains(&wait), "{wait}");
    assert_eq!(h.sim.total(), 1);

    // The other API and the other project are not throttled.
    assert_eq!(h.get(&roma_path("a")).await.status, 200);
    let other = format!("/v5/{OTHER_PROJECT}/jobs/a/export/progress");
    assert_eq!(h.get(&other).await.status, 200);
    assert_eq!(h.sim.total(), 3);
}

#[tokio::test]
async fn languages_and_projects_do_not_share_answers() {
    let h = start("[cache]\nrunning_ttl = \"10s\"").await;
    let path = drs_path("shared-job");
    for language in ["en-us", "zh-cn", "EN-US", "zh_CN"] {
        h.request("GET", &path, &[("x-language", language)]).await;
    }
    assert_eq!(h.sim.requests(&path), 2, "en-us and zh-cn, each once");
    let other = format!("/v5/{OTHER_PROJECT}/jobs/shared-job/export/progress");
    assert_eq!(h.get(&other).await.header("x-cache"), "MISS");
    assert_eq!(h.sim.requests(&other), 1);
}

#[tokio::test]
async fn if_none_match_gets_304_without_a_body() {
    let h = start("[cache]\nrunning_ttl = \"10s\"").await;
    let path = roma_path("etagged");
    let first = h.get(&path).await;
    let etag = first.header("etag").to_string();
    assert!(etag.starts_with('"') && etag.len() > 10);
    let again = h.request("GET", &path, &[("if-none-match", &etag)]).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), etag);
    assert_eq!(again.header("x-cache"), "HIT");
    let changed = h
        .request("GET", &path, &[("if-none-match", "\"other\"")])
        .await;
    assert_eq!(changed.status, 200);
}

#[tokio::test]
async fn the_byte_budget_evicts() {
    let h = start("[cache]\nmax_bytes = \"16KiB\"").await;
    for i in 0..200 {
        h.get(&roma_path(&format!("done{i}_d0"))).await;
    }
    let (entries, bytes) = h.app().gateway().cache().usage();
    assert!(bytes <= 16 * 1024, "{bytes} bytes");
    assert!(entries > 0 && entries < 200, "{entries} entries");
}

/// Over real sockets with a 20 ms upstream: jobs polled every 50 ms by 10
/// pollers each are refreshed ahead of each window, so their pollers never
/// see a miss after the first (the timing itself is tested on paused time in
/// `src/cache`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_jobs_are_kept_warm_over_sockets() {
    let h = std::sync::Arc::new(
        start_with(
            slow(20),
            "[cache]\nrunning_ttl = \"500ms\"\nrefresh_ahead = \"200ms\"",
            None,
        )
        .await,
    );
    let pollers: Vec<_> = (0..30)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                let path = roma_path(&format!("kept-warm-{}", i % 3));
                let mut seen = Vec::new();
                for _ in 0..40 {
                    seen.push(h.get(&path).await.header("x-cache").to_string());
                    tokio::time::sleep(Duration::from_millis(50)).await; // the poller's own pace
                }
                seen
            })
        })
        .collect();
    let mut misses = 0;
    for poller in pollers {
        let seen = poller.await.unwrap();
        // The first poll of each job may miss or share the first fetch.
        misses += seen[1..].iter().filter(|s| *s != "HIT").count();
    }
    assert_eq!(misses, 0);
}

/// The caching headers as a client receives them over the wire; the rules
/// themselves are tested through the handler in `handler.rs`.
#[tokio::test]
async fn caching_headers_reach_clients_over_sockets() {
    let h = start("[cache]\nrunning_ttl = \"1h\"").await;
    let path = roma_path("headers");
    let miss = h.get(&path).await;
    assert_eq!(
        miss.header("cache-status"),
        "progress-gateway; fwd=miss; fwd-status=200; stored"
    );
    assert_eq!(miss.header("cache-control"), "private, max-age=3600");
    assert_eq!(miss.header("vary"), "X-Language, Prefer, Accept");
    let hit = h.get(&path).await;
    assert!(hit
        .header("cache-status")
        .starts_with("progress-gateway; hit; ttl="));
    // A cached 404 stays a 404 whatever If-None-Match says.
    let missing = drs_path("missing-job");
    let first = h.get(&missing).await;
    assert_eq!(first.status, 404);
    let again = h.request("GET", &missing, &[("if-none-match", "*")]).await;
    assert_eq!((again.status.as_u16(), again.body.is_empty()), (404, false));
}
