//! An upstream that fails, over real sockets, counted at the simulator: the
//! gateway shares failures, backs off, and never reports an unreadable
//! answer as an unreachable upstream. The timing rules themselves are tested
//! on paused time in `src/cache`.

mod common;

use std::time::Duration;

use common::*;
use progress_gateway::tools::simulator::Behaviour;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// 20 pollers poll one job 10 times each, as fast as they can.
async fn poll_hard(h: &std::sync::Arc<Harness>, path: &str) -> Vec<u16> {
    let pollers: Vec<_> = (0..20)
        .map(|_| {
            let (h, path) = (h.clone(), path.to_string());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..10 {
                    statuses.push(h.get(&path).await.status.as_u16());
                }
                statuses
            })
        })
        .collect();
    let mut all = Vec::new();
    for poller in pollers {
        all.extend(poller.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_503_is_shared_not_multiplied() {
    let h = std::sync::Arc::new(start("[cache]\nerror_ttl = \"1h\"").await);
    h.sim.set_behaviour(|b| b.force_status = Some(503));
    let path = drs_path("failing");
    let statuses = poll_hard(&h, &path).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    assert_eq!(h.sim.requests(&path), 1, "200 polls, one upstream request");
    // Another job of the same API and project: held back, not sent.
    let other = h.get(&drs_path("other")).await;
    assert_gateway_error(&other, 503, "PGW.5031");
    assert!(!other.header("retry-after").is_empty());
    assert_eq!(h.sim.total(), 1);
}

#[tokio::test]
async fn a_429_saying_retry_now_or_naming_a_past_date_still_backs_off() {
    for retry_after in ["0", "Thu, 01 Jan 2004 00:00:00 GMT"] {
        let h = start("[cache]\nretry_after_min = \"1h\"\nretry_after_max = \"1h\"").await;
        h.sim.set_behaviour(|b| {
            b.force_status = Some(429);
            b.retry_after = Some(retry_after.into());
        });
        assert_eq!(h.get(&drs_path("a")).await.status, 429);
        for job in ["b", "c", "d"] {
            let reply = h.get(&drs_path(job)).await;
            assert_gateway_error(&reply, 429, "PGW.4290");
            assert_eq!(reply.header("retry-after"), "3600", "{retry_after}");
            let message = reply.json()["error_msg"].as_str().unwrap().to_string();
            assert!(
                message.contains("3600 s"),
                "the same N as the header: {message}"
            );
        }
        assert_eq!(h.sim.total(), 1, "{retry_after}");
    }
}

#[tokio::test]
async fn huaweis_throttling_message_sets_the_window_when_retry_after_is_absent() {
    let h = start("").await;
    h.sim.set_behaviour(|b| {
        b.force_status = Some(429);
        b.error_msg = Some("policy user over ratelimit,limit:100,time:1 minute".into());
    });
    assert_eq!(h.get(&roma_path("a")).await.status, 429);
    let reply = h.get(&roma_path("b")).await;
    assert_gateway_error(&reply, 429, "PGW.4290");
    assert_eq!(reply.header("retry-after"), "60");
    assert_eq!(h.sim.total(), 1);
}

#[tokio::test]
async fn an_html_200_is_unusable_and_never_served_later() {
    let h = start("[cache]\nrunning_ttl = \"1ms\"\nerror_ttl = \"1h\"").await;
    let path = roma_path("portal");
    let good = h.get(&path).await;
    assert_eq!(good.status, 200);
    h.sim.set_behaviour(|b| {
        b.force_status = Some(200);
        b.force_body = Some("<html><body>Sign in to the hotel Wi-Fi</body></html>".into());
    });
    tokio::time::sleep(Duration::from_millis(5)).await; // past the 1 ms TTL
    let stale = h.get(&path).await;
    assert_eq!(
        (stale.status.as_u16(), stale.header("x-cache")),
        (200, "STALE")
    );
    assert_eq!(stale.body, good.body, "the last good answer, not the page");
    let fresh_job = h.get(&roma_path("never-seen")).await;
    // Held back by the failing API, or the unusable answer itself: never the page.
    assert!(
        ["PGW.5031", "PGW.5021"].contains(&fresh_job.json()["error_code"].as_str().unwrap()),
        "{:?}",
        fresh_job.body
    );
}

/// A TCP server that answers every connection with `bytes` and closes.
async fn raw_upstream(bytes: &'static [u8]) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(bytes).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_that_answers_something_not_http_is_unusable_not_unreachable() {
    let huge_header: &'static [u8] = Box::leak(
        format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(600_000))
            .into_bytes()
            .into_boxed_slice(),
    );
    for bytes in [
        &b"\x00\x01\x02garbage\xff\xfe"[..],
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        huge_header,
    ] {
        let addr = raw_upstream(bytes).await;
        let h = start_with(Behaviour::default(), "", Some(format!("http://{addr}"))).await;
        let reply = h.get(&drs_path("j")).await;
        assert_gateway_error(&reply, 502, "PGW.5021");
    }
    // A port nobody listens on is unreachable.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let h = start_with(Behaviour::default(), "", Some(format!("http://{addr}"))).await;
    assert_gateway_error(&h.get(&drs_path("j")).await, 502, "PGW.5020");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_consumer_cannot_crowd_out_the_others() {
    let greedy_key = "greedy-key-0123456789";
    let polite_key = "polite-key-0123456789";
    let digest = |key: &str| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    };
    let sections = format!(
        "[cache]\nrunning_ttl = \"1h\"\nupstream_rate = 50\nconsumer_fetch_rate = 20\nconsumer_fetch_burst = 20\n\n\
         [consumers.greedy]\nkey_sha256 = \"{}\"\n\n[consumers.polite]\nkey_sha256 = \"{}\"",
        digest(greedy_key),
        digest(polite_key)
    );
    let h = std::sync::Arc::new(start(&sections).await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Random job IDs of the same API and project, as fast as it can.
    let greedy = tokio::spawn({
        let (h, stop) = (h.clone(), stop.clone());
        async move {
            let mut refused = 0;
            for i in 0..5000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let path = drs_path(&format!("random-{i}"));
                let reply = h
                    .request("GET", &path, &[("x-gateway-key", greedy_key)])
                    .await;
                if reply.status == 429 {
                    assert_eq!(reply.json()["error_code"], "PGW.4291");
                    refused += 1;
                }
            }
            refused
        }
    });
    // A legitimate client: a new job now and then, and its running jobs polled.
    let mut first_polls_ok = 0;
    for i in 0..30 {
        let new = drs_path(&format!("new-job-{i}"));
        let reply = h
            .request("GET", &new, &[("x-gateway-key", polite_key)])
            .await;
        first_polls_ok += usize::from(reply.status == 200);
        let running = h
            .request(
                "GET",
                &drs_path("new-job-0"),
                &[("x-gateway-key", polite_key)],
            )
            .await;
        assert_eq!(running.status, 200);
        assert_eq!(running.header("x-cache"), "HIT", "a fresh answer");
        tokio::time::sleep(Duration::from_millis(100)).await; // the client's own pace
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = greedy.await.unwrap();
    assert!(
        first_polls_ok >= 29,
        "{first_polls_ok} of 30 first polls answered"
    );
    assert!(refused > 0, "the greedy consumer was held to its budget");
    let metrics = String::from_utf8(h.admin_get("/metrics").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains(&format!(
            "pgw_consumer_refusals_total{{consumer=\"greedy\"}} {refused}"
        )),
        "{metrics}"
    );
    assert!(!metrics.contains("consumer=\"polite\""));
    assert!(
        !metrics.contains(r#"cause="throttled"} 1"#),
        "no 429 backoff"
    );
}
