//! Watching instead of polling, over real sockets: long-polls (`Prefer: wait`
//! with `If-None-Match`) and server-sent events, in front of the simulator.
//! A DRS job's answer stays `pending` until it ends, so it is the job that
//! does not change; a ROMA job's progress moves every 1 % of its duration.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

/// Short windows so that changes come quickly; keepalives every 300 ms.
const WATCH: &str = "[cache]\nrunning_ttl = \"200ms\"\nrefresh_ahead = \"50ms\"\n\
                     [watch]\nkeepalive = \"300ms\"\nretry = \"1500ms\"";

async fn etag_of(h: &Harness, path: &str) -> String {
    let reply = h.get(path).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.header("etag").to_string()
}

async fn long_poll(h: &Harness, path: &str, etag: &str, wait: &str) -> (Reply, Duration) {
    let started = Instant::now();
    let prefer = format!("wait={wait}");
    let reply = h
        .request(
            "GET",
            path,
            &[("if-none-match", etag), ("prefer", prefer.as_str())],
        )
        .await;
    (reply, started.elapsed())
}

#[tokio::test]
async fn a_long_poll_is_held_until_the_answer_changes() {
    let h = start(WATCH).await;
    // Pending for 1.5 s, then success: the only change this answer makes.
    let path = drs_path("lp-change_d1500");
    let etag = etag_of(&h, &path).await;
    let (reply, took) = long_poll(&h, &path, &etag, "20").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["process_status"], "success");
    assert_ne!(reply.header("etag"), etag);
    assert_eq!(reply.header("preference-applied"), "wait=20");
    assert!(reply.header("vary").contains("Prefer"));
    assert!(took >= Duration::from_millis(900), "held: {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "answered at the change: {took:?}"
    );
    // Held, it cost upstream one request per window like any poller.
    let upstream = h.sim.requests(&path);
    assert!(
        upstream <= 2 + 1500 / 200 + 2,
        "{upstream} upstream requests"
    );
}

#[tokio::test]
async fn an_unchanged_answer_is_304_after_the_wait() {
    let h = start(WATCH).await;
    let path = drs_path("lp-still");
    let etag = etag_of(&h, &path).await;
    let (reply, took) = long_poll(&h, &path, &etag, "1").await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    assert_eq!(reply.header("preference-applied"), "wait=1");
    assert_eq!(reply.header("etag"), etag);
    assert!(reply.body.is_empty());
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_different_etag_a_finished_job_and_no_validator_are_answered_at_once() {
    let h = start(WATCH).await;
    let path = drs_path("lp-now");
    let current = etag_of(&h, &path).await;
    let (reply, took) = long_poll(&h, &path, "\"an-older-one\"", "20").await;
    assert_eq!(
        (reply.status, reply.header("etag")),
        (StatusCode::OK, current.as_str())
    );
    assert!(took < Duration::from_secs(2), "{took:?}");

    let plain = h.request("GET", &path, &[("prefer", "wait=20")]).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.header("preference-applied"), "");

    let done = drs_path("lp-done_d1");
    let mut etag = etag_of(&h, &done).await;
    // Poll until the job's finished answer is the one stored.
    for _ in 0..50 {
        let reply = h.get(&done).await;
        if reply.json()["process_status"] == "success" {
            etag = reply.header("etag").to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let (reply, _) = long_poll(&h, &done, &etag, "20").await;
    assert_eq!(
        reply.status,
        StatusCode::NOT_MODIFIED,
        "a finished job never changes"
    );
    assert_eq!(reply.header("preference-applied"), "");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Reads a stream's events until it ends: (event, id, data) triples.
async fn events(stream: &mut Streaming) -> Vec<(String, String, String)> {
    let mut events = Vec::new();
    while let Some(block) = stream.next_block(Duration::from_secs(10)).await {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or("")
                .to_string()
        };
        if !field("event").is_empty() {
            events.push((field("event"), field("id"), field("data")));
        }
    }
    events
}

#[tokio::test]
async fn an_event_stream_tells_each_change_then_the_end() {
    let h = start(WATCH).await;
    let path = roma_path("sse-run_d1200");
    let mut stream = h.open(&path, &[("accept", "text/event-stream")]).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.header("content-type"), "text/event-stream");
    assert_eq!(stream.header("cache-control"), "no-cache");
    assert_eq!(stream.header("x-accel-buffering"), "no");
    assert!(!stream.header("x-request-id").is_empty());
    let first = stream.next_block(Duration::from_secs(5)).await.unwrap();
    assert!(
        first.starts_with("retry: 1500\nevent: progress\nid: \""),
        "{first}"
    );
    let events = events(&mut stream).await;
    let (last, rest) = events.split_last().expect("events");
    assert_eq!(last.0, "terminal");
    let body: serde_json::Value = serde_json::from_str(&last.2).unwrap();
    assert_eq!(body["status"], "SUCCEEDED");
    assert!(rest.len() >= 2, "progress changes were told: {events:?}");
    let mut seen = std::collections::HashSet::new();
    for (event, id, data) in rest {
        assert_eq!(event, "progress");
        assert!(seen.insert(id.clone()), "each event is news: {events:?}");
        let body: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(body["status"], "RUNNING");
    }
    // One upstream request per window, not one per event or watcher.
    let upstream = h.sim.requests(&path);
    assert!(upstream <= 1200 / 200 + 3, "{upstream} upstream requests");
}

#[tokio::test]
async fn a_reconnecting_stream_does_not_repeat_what_its_client_has_and_keeps_alive() {
    let h = start(WATCH).await;
    let path = drs_path("sse-still");
    let etag = etag_of(&h, &path).await;
    let mut stream = h
        .open(
            &path,
            &[("accept", "text/event-stream"), ("last-event-id", &etag)],
        )
        .await;
    assert_eq!(stream.status, StatusCode::OK);
    let first = stream.next_block(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first, "retry: 1500", "nothing repeated");
    let started = Instant::now();
    let next = stream.next_block(Duration::from_secs(5)).await.unwrap();
    assert_eq!(next, ": keepalive");
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Without Last-Event-ID, the current answer comes first, its id the ETag.
    let mut fresh = h.open(&path, &[("accept", "text/event-stream")]).await;
    let first = fresh.next_block(Duration::from_secs(5)).await.unwrap();
    assert!(
        first.contains("event: progress\n") && first.contains(&format!("id: {etag}\n")),
        "{first}"
    );
    assert!(
        first.contains(r#"data: {"process_status":"pending"}"#),
        "{first}"
    );
}

#[tokio::test]
async fn a_stream_says_when_its_state_is_stale_and_when_it_is_fresh_again() {
    let h = start(
        "[cache]\nrunning_ttl = \"200ms\"\nrefresh_ahead = \"50ms\"\nerror_ttl = \"100ms\"\n\
         failure_backoff_max = \"200ms\"\nstale_if_error = \"1h\"",
    )
    .await;
    let path = drs_path("sse-stale");
    let mut stream = h.open(&path, &[("accept", "text/event-stream")]).await;
    let first = stream.next_block(Duration::from_secs(5)).await.unwrap();
    assert!(first.contains("event: progress"), "{first}");
    h.sim.set_behaviour(|b| b.force_status = Some(503));
    let stale = stream.next_block(Duration::from_secs(5)).await.unwrap();
    assert!(stale.starts_with("event: stale\n"), "{stale}");
    assert!(stale.contains(r#""reason":"upstream-error""#), "{stale}");
    h.sim.set_behaviour(|b| b.force_status = None);
    let back = stream.next_block(Duration::from_secs(5)).await.unwrap();
    assert!(back.starts_with("event: progress\n"), "fresh again: {back}");
}

#[tokio::test]
async fn errors_before_a_stream_are_huawei_shaped() {
    let h = start(WATCH).await;
    let sse = [("accept", "text/event-stream")];
    let reply = h
        .request(
            "GET",
            &format!("/v5/{OTHER_PROJECT}0/jobs/j/export/progress"),
            &sse,
        )
        .await;
    assert_gateway_error(&reply, 403, "PGW.4030");
    let reply = h.request("GET", &drs_path("missing-job"), &sse).await;
    assert_eq!(
        reply.status,
        StatusCode::NOT_FOUND,
        "upstream's 404, as a poller gets it"
    );
    assert!(reply.header("content-type").starts_with("application/json"));
}

#[tokio::test]
async fn beyond_the_watcher_limit_long_polls_are_answered_at_once_and_streams_refused() {
    let h = start("[watch]\nmax_watchers = 10\nmax_watchers_per_consumer = 1").await;
    let path = drs_path("limit");
    let etag = etag_of(&h, &path).await;
    let held = {
        let (h, path, etag) = (&h, path.clone(), etag.clone());
        async move { long_poll(h, &path, &etag, "2").await }
    };
    let others = async {
        // The first watcher is held once the gauge shows it.
        while h.metric("pgw_watchers{kind=\"long-poll\"}").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (second, took) = long_poll(&h, &path, &etag, "2").await;
        assert_eq!(second.status, StatusCode::NOT_MODIFIED);
        assert_eq!(second.header("preference-applied"), "", "not applied");
        assert!(took < Duration::from_secs(1), "{took:?}");
        let refused = h
            .request("GET", &path, &[("accept", "text/event-stream")])
            .await;
        assert_gateway_error(&refused, 429, "PGW.4293");
        assert_eq!(refused.header("retry-after"), "3");
        assert!(h.metric("pgw_watch_refusals_total{kind=\"stream\"}").await >= 1.0);
    };
    let ((first, _), ()) = tokio::join!(held, others);
    assert_eq!(first.header("preference-applied"), "wait=2");
}

#[tokio::test]
async fn stopping_answers_held_long_polls_and_ends_streams_at_once() {
    let h = start(WATCH).await;
    let path = drs_path("stop");
    let etag = etag_of(&h, &path).await;
    let mut stream = h.open(&path, &[("accept", "text/event-stream")]).await;
    stream.next_block(Duration::from_secs(5)).await.unwrap();
    let held = long_poll(&h, &path, &etag, "25");
    let stop = async {
        while h.metric("pgw_watchers{kind=\"long-poll\"}").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        h.app().gateway().stop_watchers();
    };
    let ((reply, took), ()) = tokio::join!(held, stop);
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "the current state");
    assert_eq!(reply.header("preference-applied"), "wait=25");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Keepalives may come first; the stream ends with a retry: and no error.
    let mut last = String::new();
    while let Some(block) = stream.next_block(Duration::from_secs(5)).await {
        last = block;
    }
    assert_eq!(last, "retry: 1500");
}

#[tokio::test]
async fn a_watcher_that_hangs_up_is_no_longer_counted() {
    let h = start(WATCH).await;
    let path = drs_path("hangup");
    let etag = etag_of(&h, &path).await;
    let held = tokio::time::timeout(
        Duration::from_millis(500),
        long_poll(&h, &path, &etag, "25"),
    );
    let stream = h.open(&path, &[("accept", "text/event-stream")]).await;
    assert!(held.await.is_err(), "still held when the client gave up");
    drop(stream);
    let started = Instant::now();
    while h.metric("pgw_watchers{kind=\"long-poll\"}").await > 0.0
        || h.metric("pgw_watchers{kind=\"stream\"}").await > 0.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "watchers left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn many_watchers_cost_upstream_one_request_per_window() {
    let h = start(WATCH).await;
    let path = roma_path("crowd_d2000");
    let etag = etag_of(&h, &path).await;
    let polls = (0..50).map(|_| long_poll(&h, &path, &etag, "20"));
    let streams = (0..20).map(|_| async {
        let mut stream = h.open(&path, &[("accept", "text/event-stream")]).await;
        events(&mut stream).await
    });
    let (polls, streams) = tokio::join!(
        futures_util::future::join_all(polls),
        futures_util::future::join_all(streams)
    );
    for (reply, _) in &polls {
        assert_eq!(reply.status, StatusCode::OK);
        assert_ne!(reply.header("etag"), etag);
    }
    for events in &streams {
        assert_eq!(events.last().unwrap().0, "terminal");
    }
    // K × (D / TTL + 1) with K = 1, D = 2 s, TTL = 200 ms, and the first fetch.
    let upstream = h.sim.requests(&path);
    assert!(
        upstream <= 2000 / 200 + 2,
        "{upstream} upstream requests for 70 watchers"
    );
}
