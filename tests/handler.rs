//! Time-dependent behaviour through the real request handler, on paused tokio
//! time, with a scripted upstream in place of the fetch: the gateway is built
//! by `app` exactly as `serve` builds it, only no socket is involved.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use parking_lot::Mutex;
use progress_gateway::app::App;
use progress_gateway::config::Config;
use progress_gateway::fetch::{Fetch, FetchFuture, FetchRequest};
use progress_gateway::proxy::Body;
use progress_gateway::tools::{SimFront, PROJECT};
use progress_gateway::upstream::UpstreamResponse;
use tokio::time::Instant;

const RUNNING: &str =
    r#"{"id":"j","type":"exportAsset","status":"RUNNING","progress_percent":0.5}"#;

/// Huawei's shape of a 503 upstream.
const UPSTREAM_DOWN: &str = r#"{"error_code":"APIGW.0101","error_msg":"down"}"#;

/// Answers every fetch from a script (the last answer repeats) after a delay,
/// and counts the fetches.
struct Script {
    answers: Mutex<Vec<(u16, &'static str)>>,
    delay: Duration,
    calls: AtomicUsize,
    /// The gateway's metrics, where exchanges are recorded as the real
    /// upstream exchange records them.
    metrics: std::sync::OnceLock<Arc<progress_gateway::metrics::Metrics>>,
}

impl Script {
    fn new(delay: Duration, answers: &[(u16, &'static str)]) -> Arc<Self> {
        Arc::new(Script {
            answers: Mutex::new(answers.iter().rev().copied().collect()),
            delay,
            calls: AtomicUsize::new(0),
            metrics: std::sync::OnceLock::new(),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Replaces what upstream answers from now on.
    fn then(&self, status: u16, body: &'static str) {
        *self.answers.lock() = vec![(status, body)];
    }
}

impl Fetch for Script {
    fn fetch(self: Arc<Self>, _request: FetchRequest) -> FetchFuture {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let (status, body) = {
                let mut answers = self.answers.lock();
                match answers.len() {
                    0 => panic!("no scripted answer"),
                    1 => answers[0],
                    _ => answers.pop().unwrap(),
                }
            };
            if let Some(metrics) = self.metrics.get() {
                let answered = progress_gateway::metrics::Outcome::Answered;
                metrics.upstream("roma", status, answered, self.delay);
            }
            Ok(UpstreamResponse {
                status: StatusCode::from_u16(status).unwrap(),
                headers: HeaderMap::new(),
                body: Bytes::from_static(body.as_bytes()),
            })
        })
    }
}

/// A config whose upstream is never contacted: the script stands in for it.
fn config(cache: &str) -> Config {
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    SimFront::new(nowhere, Path::new("/nonexistent/token"))
        .admin("")
        .section(cache)
        .config()
        .unwrap()
}

fn app(cache: &str, script: &Arc<Script>) -> App {
    let app = App::with_origin(config(cache), script.clone()).unwrap();
    let _ = script.metrics.set(app.metrics().clone());
    app
}

fn path(job: &str) -> String {
    format!("/v2/{PROJECT}/instances/i/assets/jobs/{job}")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

async fn read(response: Response<Body>) -> Reply {
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn get(app: &App, job: &str) -> Reply {
    let request = Request::get(path(job)).body(Empty::<Bytes>::new()).unwrap();
    read(app.gateway().answer(request).await).await
}

#[tokio::test(start_paused = true)]
async fn a_running_answer_is_fresh_for_its_ttl_then_fetched_again() {
    let script = Script::new(Duration::from_millis(20), &[(200, RUNNING)]);
    let app = app("[cache]\nrunning_ttl = \"2s\"", &script);
    let first = get(&app, "j").await;
    assert_eq!(
        (first.status, first.header("x-cache")),
        (StatusCode::OK, "MISS")
    );
    assert_eq!(first.header("cache-control"), "private, max-age=2");

    tokio::time::advance(Duration::from_millis(1500)).await;
    let hit = get(&app, "j").await;
    assert_eq!(hit.header("x-cache"), "HIT");
    assert_eq!(hit.header("age"), "1");
    assert_eq!(script.calls(), 1);

    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(get(&app, "j").await.header("x-cache"), "MISS");
    assert_eq!(script.calls(), 2);
}

/// A hit is most requests: it must not wait on anything, nor build the
/// future of a request that does (each request's future is written out and
/// moved; at 2.9 KiB it cost 5 % of the hit throughput).
#[tokio::test(start_paused = true)]
async fn a_hit_is_answered_on_the_first_poll_by_a_small_future() {
    use futures_util::FutureExt;
    let script = Script::new(Duration::from_millis(20), &[(200, RUNNING)]);
    let app = app("[cache]\nrunning_ttl = \"2s\"", &script);
    let request = || Request::get(path("j")).body(Empty::<Bytes>::new()).unwrap();
    let gateway = app.gateway();
    // A miss waits for upstream (and this request joins its fetch).
    assert!(gateway.answer(request()).now_or_never().is_none());
    assert_eq!(get(&app, "j").await.header("x-cache"), "COALESCED");

    let hit = gateway.answer(request());
    let size = std::mem::size_of_val(&hit);
    assert!(size <= 512, "a request's future is {size} bytes");
    let hit = hit.now_or_never().expect("a hit answers without waiting");
    assert_eq!(read(hit).await.header("x-cache"), "HIT");
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn thousand_pollers_cost_one_upstream_request_per_window() {
    let script = Script::new(Duration::from_millis(50), &[(200, RUNNING)]);
    let app = Arc::new(app("[cache]\nrunning_ttl = \"2s\"", &script));
    for window in 1..=3 {
        let crowd: Vec<_> = (0..1000)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move { get(&app, "crowd").await })
            })
            .collect();
        let mut misses = 0;
        for poller in crowd {
            let reply = poller.await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
            misses += usize::from(reply.header("x-cache") == "MISS");
        }
        assert_eq!(misses, 1, "window {window}");
        assert_eq!(script.calls(), window);
        tokio::time::advance(Duration::from_secs(2)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_serves_the_last_answer_until_its_window_ends() {
    let script = Script::new(Duration::ZERO, &[(200, RUNNING)]);
    let app = app(
        "[cache]\nrunning_ttl = \"1s\"\nstale_if_error = \"10s\"",
        &script,
    );
    let fresh = get(&app, "j").await;
    script.then(503, UPSTREAM_DOWN);

    tokio::time::advance(Duration::from_secs(5)).await;
    let stale = get(&app, "j").await;
    assert_eq!(
        (stale.status, stale.header("x-cache")),
        (StatusCode::OK, "STALE")
    );
    assert_eq!(stale.body, fresh.body);

    // 1 s fresh + 10 s stale-if-error have passed: the error shows.
    tokio::time::advance(Duration::from_secs(6)).await;
    let failed = get(&app, "j").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(script.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let script = Script::new(Duration::from_millis(200), &[(200, RUNNING)]);
    let app = app(
        "[cache]\nrunning_ttl = \"1s\"\nstale_while_revalidate = \"10s\"",
        &script,
    );
    get(&app, "j").await;
    tokio::time::advance(Duration::from_secs(2)).await;
    let asked = Instant::now();
    for _ in 0..10 {
        assert_eq!(get(&app, "j").await.header("x-cache"), "STALE");
    }
    assert_eq!(Instant::now(), asked, "no request waited for upstream");
    // Past the refresh's landing (at +200 ms) on the paused clock.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(script.calls(), 2, "one refresh for ten requests");
    assert_eq!(get(&app, "j").await.header("x-cache"), "HIT");
}

#[tokio::test(start_paused = true)]
async fn a_429_backs_off_its_api_and_project_until_retry_after_passes() {
    let script = Script::new(Duration::ZERO, &[(429, r#"{"error_code":"APIGW.0308"}"#)]);
    let app = app(
        "[cache]\nretry_after_default = \"20s\"\nwait_timeout = \"5s\"",
        &script,
    );
    assert_eq!(get(&app, "a").await.status, StatusCode::TOO_MANY_REQUESTS);
    script.then(200, RUNNING);
    // The pause ends beyond wait_timeout: refused at once, upstream untouched.
    tokio::time::advance(Duration::from_millis(2500)).await;
    let asked = Instant::now();
    let refused = get(&app, "b").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("retry-after"), "18");
    assert!(!refused.header("x-request-id").is_empty());
    assert_eq!(Instant::now(), asked);
    assert_eq!(script.calls(), 1);
    // Within wait_timeout of its end: held, and answered after the probe.
    tokio::time::advance(Duration::from_millis(14_000)).await;
    let asked = Instant::now();
    let held = get(&app, "b").await;
    assert_eq!(held.status, StatusCode::OK);
    assert_eq!(Instant::now() - asked, Duration::from_millis(3500));
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_cached_answers_and_applies_the_new_ttl() {
    let script = Script::new(Duration::ZERO, &[(200, RUNNING)]);
    let app = app("[cache]\nrunning_ttl = \"1s\"", &script);
    get(&app, "j").await;
    let restart = app.reload(config("[cache]\nrunning_ttl = \"1h\"")).unwrap();
    assert!(restart.is_empty(), "{restart:?}");
    tokio::time::advance(Duration::from_secs(600)).await;
    assert_eq!(get(&app, "j").await.header("x-cache"), "HIT");
    assert_eq!(script.calls(), 1);
    // Counters counted before the reload are still there.
    let text = app.metrics().encode();
    for line in [
        r#"pgw_requests_total{route="roma",status="200",cache="MISS"} 1"#,
        r#"pgw_requests_total{route="roma",status="200",cache="HIT"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_fetch_that_panics_is_a_500_with_its_own_code() {
    let script = Script::new(Duration::ZERO, &[]);
    let app = app("", &script);
    let reply = get(&app, "j").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error_code"], "PGW.5000");
    assert_eq!(body["request_id"], reply.header("x-request-id"));
    // The key is not stuck: the next request fetches again.
    script.then(200, RUNNING);
    assert_eq!(get(&app, "j").await.header("x-cache"), "MISS");
}

async fn get_with(app: &App, job: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::get(path(job));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    read(
        app.gateway()
            .answer(request.body(Empty::<Bytes>::new()).unwrap())
            .await,
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn caching_headers_tell_downstream_caches_and_clients_the_truth() {
    let script = Script::new(Duration::from_millis(10), &[(200, RUNNING)]);
    let app = Arc::new(app("[cache]\nrunning_ttl = \"6s\"", &script));
    let first = get(&app, "j").await;
    assert_eq!(
        first.header("cache-status"),
        "progress-gateway; fwd=miss; fwd-status=200; stored"
    );
    assert_eq!(first.header("vary"), "X-Language, Prefer, Accept");

    // RFC 9111 §4.2: at 3.3 s, Age 3 and max-age the lifetime, not the rest.
    tokio::time::advance(Duration::from_millis(3300)).await;
    let hit = get(&app, "j").await;
    assert_eq!(hit.header("age"), "3");
    assert_eq!(hit.header("cache-control"), "private, max-age=6");
    assert_eq!(hit.header("cache-status"), "progress-gateway; hit; ttl=2");

    // Two requests sharing one fetch: the second says so.
    tokio::time::advance(Duration::from_secs(3)).await;
    let (a, b) = tokio::join!(get(&app, "j"), get(&app, "j"));
    let statuses = [a.header("cache-status"), b.header("cache-status")];
    assert!(
        statuses.iter().any(|s| s.ends_with("; collapsed")),
        "{statuses:?}"
    );
}

/// A hit's head is copied from the one prepared for its answer, with the
/// values of this request written in: it must be the head built afresh.
#[tokio::test(start_paused = true)]
async fn a_copied_hit_head_is_the_head_built_afresh() {
    let script = Script::new(Duration::ZERO, &[(200, RUNNING)]);
    let app = app("[cache]\nrunning_ttl = \"6s\"", &script);
    get(&app, "j").await;
    let names = |headers: &http::HeaderMap| -> Vec<String> {
        headers.keys().map(|n| n.to_string()).collect()
    };
    // The first hit prepares the head; the second is a copy.
    let first = get_with(&app, "j", &[("x-request-id", "first-id")]).await;
    tokio::time::advance(Duration::from_millis(2100)).await;
    let copied = get_with(&app, "j", &[("x-request-id", "second-id")]).await;
    assert_eq!(copied.header("x-cache"), "HIT");
    assert_eq!(copied.header("x-gateway-request-id"), "second-id");
    assert_eq!(copied.header("age"), "2");
    assert_eq!(
        copied.header("cache-status"),
        "progress-gateway; hit; ttl=3"
    );
    assert_eq!(first.header("cache-status"), "progress-gateway; hit; ttl=6");
    assert_eq!(names(&copied.headers), names(&first.headers));
    // A HEAD request's head is always built afresh: the same, plus its length.
    let request = Request::head(path("j"))
        .header("x-request-id", "second-id")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let built = read(app.gateway().answer(request).await).await;
    let mut expected = copied.headers.clone();
    expected.insert("content-length", copied.body.len().into());
    assert_eq!(built.headers, expected);
    assert_eq!(names(&built.headers), names(&expected));

    // A reload's new lifetime shows at once on the same stored answer.
    app.reload(config("[cache]\nrunning_ttl = \"1h\"")).unwrap();
    let reloaded = get(&app, "j").await;
    assert_eq!(reloaded.header("x-cache"), "HIT");
    assert_eq!(reloaded.header("cache-control"), "private, max-age=3600");
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn conditional_requests_apply_to_successful_answers_only() {
    let script = Script::new(Duration::ZERO, &[(404, r#"{"error_code":"DRS.0404"}"#)]);
    let app = app("", &script);
    let missing = get(&app, "gone").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let etag = missing.header("etag").to_string();
    for tag in [etag.as_str(), "*"] {
        let again = get_with(&app, "gone", &[("if-none-match", tag)]).await;
        assert_eq!(again.status, StatusCode::NOT_FOUND, "If-None-Match: {tag}");
        assert!(!again.body.is_empty());
    }
    script.then(200, RUNNING);
    let found = get(&app, "found").await;
    let etag = found.header("etag").to_string();
    let again = get_with(&app, "found", &[("if-none-match", &etag)]).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
}

#[tokio::test(start_paused = true)]
async fn answers_vary_by_the_consumer_key_when_keys_are_configured() {
    use sha2::Digest;
    let script = Script::new(Duration::ZERO, &[(200, RUNNING)]);
    let digest = hex::encode(sha2::Sha256::digest(b"ci-key"));
    let config = config(&format!("[consumers.ci]\nkey_sha256 = \"{digest}\""));
    let app = App::with_origin(config, script.clone()).unwrap();
    let reply = get_with(&app, "j", &[("x-gateway-key", "ci-key")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("vary"),
        "X-Language, Prefer, Accept, x-gateway-key"
    );
}

/// Watching on paused time: when a long-poll is answered, when a stream
/// keeps alive and ends, and that a watched job costs one request a window.
mod watching {
    use super::*;

    const RUNNING_2: &str =
        r#"{"id":"j","type":"exportAsset","status":"RUNNING","progress_percent":0.6}"#;
    const DONE: &str =
        r#"{"id":"j","type":"exportAsset","status":"SUCCEEDED","progress_percent":1.0}"#;

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_is_answered_304_when_its_wait_is_over_not_before() {
        let script = Script::new(Duration::from_millis(10), &[(200, RUNNING)]);
        let app = app("[cache]\nrunning_ttl = \"1s\"", &script);
        let etag = get(&app, "j").await.header("etag").to_string();
        let asked = Instant::now();
        let reply = get_with(&app, "j", &[("if-none-match", &etag), ("prefer", "wait=7")]).await;
        let held = Instant::now() - asked;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
        assert_eq!(reply.header("preference-applied"), "wait=7");
        // The wait, plus at most 5 % of jitter.
        assert!(
            held >= Duration::from_secs(7) && held <= Duration::from_millis(7350),
            "{held:?}"
        );
        // Held for 7 s with a 1 s window: kept warm, one request a window.
        let calls = script.calls();
        assert!((7..=9).contains(&calls), "{calls} upstream requests");
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_is_answered_as_soon_as_the_refresh_brings_news() {
        let script = Script::new(Duration::from_millis(10), &[(200, RUNNING)]);
        let app = Arc::new(app("[cache]\nrunning_ttl = \"1s\"", &script));
        let etag = get(&app, "j").await.header("etag").to_string();
        let asked = Instant::now();
        let held = {
            let app = app.clone();
            tokio::spawn(async move {
                get_with(
                    &app,
                    "j",
                    &[("if-none-match", &etag), ("prefer", "wait=20")],
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(2500)).await;
        script.then(200, RUNNING_2);
        let reply = held.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, RUNNING_2);
        // The next refresh after the change: ahead of the window at 3 s.
        let took = Instant::now() - asked;
        assert!(
            took > Duration::from_millis(2500) && took <= Duration::from_secs(3),
            "{took:?}"
        );
    }

    /// An event stream on `job`'s answer: its body.
    async fn open_stream(app: &App, job: &str) -> Body {
        let request = Request::get(path(job))
            .header("accept", "text/event-stream")
            .body(Empty::<Bytes>::new())
            .unwrap();
        app.gateway().answer(request).await.into_body()
    }

    async fn frame(body: &mut Body) -> Option<String> {
        let frame = body.frame().await?.unwrap();
        Some(String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_opened_on_a_stale_answer_says_so_at_once() {
        let script = Script::new(Duration::ZERO, &[(200, RUNNING)]);
        let app = app(
            "[cache]\nrunning_ttl = \"1s\"\nstale_if_error = \"1h\"\nrefresh_ahead = \"0s\"",
            &script,
        );
        get(&app, "j").await;
        script.then(503, UPSTREAM_DOWN);
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut body = open_stream(&app, "j").await;
        let first = frame(&mut body).await.unwrap();
        let (progress, stale) = first.split_once("\n\n").unwrap();
        assert!(progress.contains("event: progress\n"), "{first}");
        assert!(
            stale.starts_with(
                "event: stale\ndata: {\"reason\":\"upstream-error\",\"age_seconds\":5}"
            ),
            "{first}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_keeps_alive_after_15_s_ends_after_max_stream_and_stops_refreshing() {
        let script = Script::new(Duration::from_millis(10), &[(200, RUNNING)]);
        let app = app(
            "[cache]\nrunning_ttl = \"1s\"\n[watch]\nmax_stream = \"60s\"",
            &script,
        );
        let mut body = open_stream(&app, "j").await;
        let first = frame(&mut body).await.unwrap();
        let opened = Instant::now();
        assert!(
            first.starts_with("retry: 3000\nevent: progress\n"),
            "{first}"
        );
        assert_eq!(frame(&mut body).await.unwrap(), ": keepalive\n\n");
        assert_eq!(Instant::now() - opened, Duration::from_secs(15));
        script.then(200, DONE);
        let last = frame(&mut body).await.unwrap();
        assert!(last.starts_with("event: terminal\n"), "{last}");
        assert!(
            frame(&mut body).await.is_none(),
            "ended after the terminal event"
        );

        // Another job, never changing: its stream ends within 60 s ± 10 %.
        script.then(200, RUNNING);
        let opened = Instant::now();
        let mut body = open_stream(&app, "k").await;
        while frame(&mut body).await.is_some() {}
        let lasted = Instant::now() - opened;
        assert!(
            lasted >= Duration::from_secs(54) && lasted <= Duration::from_secs(66),
            "{lasted:?}"
        );
        drop(body);
        // Nobody watches or polls it any more: the refreshes stop.
        let calls = script.calls();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(script.calls() <= calls + 1, "went cold");
    }
}

/// The data behind the operator's page, sampled on paused time.
mod dashboard {
    use super::*;
    use progress_gateway::dashboard::Dashboard;

    fn dashboard(app: &App) -> Dashboard {
        Dashboard::new(app.gateway().clone(), app.metrics().clone())
    }

    #[tokio::test(start_paused = true)]
    async fn the_snapshot_lists_jobs_by_load_with_rates_and_what_they_cost() {
        let script = Script::new(Duration::from_millis(10), &[(200, RUNNING)]);
        let app = app("[cache]\nrunning_ttl = \"10s\"", &script);
        let page = dashboard(&app);
        for (job, polls) in [("quiet", 1), ("busy", 8), ("middle", 3)] {
            for _ in 0..polls {
                get(&app, job).await;
            }
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        let snapshot = page.tick(Duration::from_secs(2));
        let jobs: Vec<_> = snapshot
            .jobs
            .iter()
            .map(|j| (j.job.as_str(), j.requests_per_s, j.upstream_requests))
            .collect();
        assert_eq!(
            jobs,
            [
                ("i/busy", 4.0, 1),
                ("i/middle", 1.5, 1),
                ("i/quiet", 0.5, 1)
            ]
        );
        let busy = &snapshot.jobs[0];
        assert_eq!((busy.api, busy.status.as_str()), ("roma", "RUNNING"));
        assert_eq!(busy.progress, Some(50.0));
        // Fetched second, at 20 ms (each fetch takes 10 ms), looked at 530 ms.
        assert_eq!(busy.age_s, Some(0.51));
        assert_eq!(
            (snapshot.client_requests, snapshot.upstream_requests),
            (12, 3)
        );
        let recent = &snapshot.recent;
        assert_eq!((recent.client_rate, recent.upstream_rate), (6.0, 1.5));
        assert_eq!(recent.saved_percent, Some(75.0));
        assert_eq!(recent.hit_percent, Some(75.0));
        assert_eq!(snapshot.history, [[6.0, 1.5]]);

        // Nobody asks any more: the jobs leave the list after 30 s.
        let later = page.tick(Duration::from_secs(1));
        assert_eq!(later.jobs.len(), 3);
        assert_eq!(later.jobs[0].requests_per_s, 0.0);
        for _ in 0..30 {
            page.tick(Duration::from_secs(1));
        }
        assert!(page.tick(Duration::from_secs(1)).jobs.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_snapshot_covers_a_whole_second() {
        let script = Script::new(Duration::ZERO, &[(200, RUNNING)]);
        let app = app("", &script);
        let page = Arc::new(dashboard(&app));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut events = page.events(stop.clone());
        let started = Instant::now();
        tokio::spawn(page.clone().run(stop.clone()));
        get(&app, "early").await;
        // The stream opens with its retry field; the first snapshot follows.
        let opening = events.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(opening, "retry: 2000\n\n");
        let first = events.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "sampled after {:?}",
            started.elapsed()
        );
        // One request over a second, not over the first instant.
        let text = String::from_utf8_lossy(&first);
        assert!(text.contains(r#""requests_per_s":1.0"#), "{text}");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn trouble_shows_backoffs_and_budget_refusals() {
        let script = Script::new(Duration::ZERO, &[(429, r#"{"error_code":"APIGW.0308"}"#)]);
        let app = app(
            "[cache]\nretry_after_default = \"20s\"\nwait_timeout = \"1s\"\n\
             consumer_fetch_rate = 0.001\nconsumer_fetch_burst = 1",
            &script,
        );
        let page = dashboard(&app);
        assert_eq!(get(&app, "a").await.status, StatusCode::TOO_MANY_REQUESTS);
        tokio::time::advance(Duration::from_secs(5)).await;
        let trouble = page.tick(Duration::from_secs(1)).trouble;
        assert_eq!(trouble.backoffs.len(), 1);
        let backoff = &trouble.backoffs[0];
        assert_eq!((backoff.api, backoff.cause), ("roma", "throttled"));
        assert_eq!(backoff.project, PROJECT);
        assert_eq!(backoff.remaining_s, 15.0);
        // This config's token file does not exist (the script stands in
        // for upstream): the page names the credential and why, no value.
        let credential = &trouble.credentials[0];
        assert_eq!(
            (credential.credential.as_str(), credential.project.as_str()),
            ("main", PROJECT)
        );
        assert!(
            credential.reason.contains("/nonexistent/token"),
            "{}",
            credential.reason
        );

        // The backoff over, the consumer's one fetch is spent: refused.
        tokio::time::advance(Duration::from_secs(20)).await;
        script.then(200, RUNNING);
        assert_eq!(get(&app, "b").await.status, StatusCode::TOO_MANY_REQUESTS);
        let trouble = page.tick(Duration::from_secs(1)).trouble;
        assert!(trouble.backoffs.is_empty());
        assert_eq!(trouble.refusals, [("by-address".to_string(), 1)]);
    }
}
