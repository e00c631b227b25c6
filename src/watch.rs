//! Watching a job instead of polling it, on the same two URLs:
//!
//! - **Long-poll** (RFC 7240): `If-None-Match` with the current ETag and
//!   `Prefer: wait=N` holds the request until the answer changes (200) or N
//!   seconds pass (304), both with `Preference-Applied`.
//! - **Server-sent events**: `Accept: text/event-stream` streams the answer
//!   and every change to it, ending after the terminal one.
//!
//! Watchers cost upstream nothing of their own: the cache keeps a watched
//! job warm (one refresh per window, however many watch) and hands each
//! settled answer to the job's watchers ([`crate::cache::watch`]). A watcher
//! also looks itself when no news came by the end of the answer's freshness
//! (a lost refresh, a backoff), through the same cache, so it costs at most
//! a hit.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use http::{header, HeaderMap, HeaderValue};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::activity::JobActivity;
use crate::cache::{Answer, Cache, CacheKey, Class, Scope, StaleReason, Watch};
use crate::error::GatewayError;
use crate::fetch::FetchRequest;
use crate::metrics::{Metrics, Watching};
use crate::route::Api;

/// `[watch]`: how long watchers are held and how many there may be.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// The longest a long-poll is held, whatever `wait` asks: below the 60 s
    /// idle timeout of common load balancers.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// An event stream ends after this long (±10 %), so clients reconnect
    /// and spread over the replicas again.
    #[serde(with = "humantime_serde")]
    pub max_stream: Duration,
    /// A `: keepalive` comment after this long without an event.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// The reconnection delay an event stream asks of its client (`retry:`).
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// Watchers at once, long-polls and streams together.
    pub max_watchers: usize,
    /// Watchers at once per consumer (per client address without keys).
    pub max_watchers_per_consumer: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            max_wait: Duration::from_secs(25),
            max_stream: Duration::from_secs(300),
            keepalive: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            max_watchers: 10_000,
            max_watchers_per_consumer: 1_000,
        }
    }
}

impl WatchConfig {
    pub fn limits(&self) -> crate::cache::WatchLimits {
        crate::cache::WatchLimits {
            total: self.max_watchers,
            per_consumer: self.max_watchers_per_consumer,
        }
    }
}

/// How a GET asks to be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    /// Hold up to this long (the client's `wait`, capped by `max_wait`).
    LongPoll(Duration),
    Stream,
}

/// The mode a request's headers ask for: a stream when it accepts
/// `text/event-stream`; a long-poll with `Prefer: wait=N` and `If-None-Match`
/// (without a validator there is nothing to wait for a change from).
/// `max_wait` (the configured cap) is read only for a long-poll.
pub fn mode(headers: &HeaderMap, max_wait: impl FnOnce() -> Duration) -> Mode {
    let listed = |name: header::HeaderName| {
        headers
            .get_all(name)
            .into_iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    if listed(header::ACCEPT).any(|media| {
        let media = media.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case("text/event-stream")
    }) {
        return Mode::Stream;
    }
    if !headers.contains_key(header::IF_NONE_MATCH) {
        return Mode::Plain;
    }
    const PREFER: header::HeaderName = header::HeaderName::from_static("prefer");
    let wait = listed(PREFER).find_map(|preference| {
        let token = preference.split(';').next()?;
        let (name, value) = token.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("wait") {
            return None;
        }
        value.trim().trim_matches('"').parse::<u64>().ok()
    });
    match wait {
        Some(secs) => Mode::LongPoll(Duration::from_secs(secs).min(max_wait())),
        None => Mode::Plain,
    }
}

/// `Preference-Applied: wait=N`, N the seconds actually allowed.
pub fn preference_applied(wait: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("wait={}", wait.as_secs())).expect("digits")
}

/// `duration` plus up to `share` of it at random (at most a second), so
/// watchers that started together do not all come back together.
fn jittered(duration: Duration, share: f64) -> Duration {
    duration
        + duration
            .mul_f64(share * fastrand::f64())
            .min(Duration::from_secs(1))
}

/// What a watcher asks the cache when no news came: owned, since an event
/// stream outlives the request that started it.
pub struct Subject {
    pub cache: Cache,
    pub key: CacheKey,
    pub api: Api,
    pub project: String,
    pub consumer: String,
    pub consumer_label: String,
    pub request: FetchRequest,
}

impl Subject {
    async fn get(&self) -> Result<Answer, Arc<GatewayError>> {
        let scope = Scope {
            api: self.api,
            project: &self.project,
            consumer: &self.consumer,
            consumer_label: &self.consumer_label,
        };
        let request = &self.request;
        self.cache.get(self.key, scope, || request.clone()).await
    }
}

/// What woke a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// `latest` is news for this watcher.
    Changed,
    /// Its deadline passed.
    Deadline,
    /// The gateway is shutting down.
    Stopping,
}

/// One client watching one job: counted against the limits and in the
/// metrics while it lives.
pub struct Watcher {
    watch: Watch,
    subject: Subject,
    /// The answer as this watcher last saw it.
    pub latest: Answer,
    /// When to ask the cache if no news came.
    check_at: Instant,
    stopping: CancellationToken,
    metrics: Arc<Metrics>,
    _counted: Watching,
    /// The job's counters, where it has some: its watchers include this one.
    job: Option<Arc<JobActivity>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(job) = &self.job {
            job.watchers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Watcher {
    /// Starts watching `subject`, whose answer was `current`; refused with
    /// `TooManyWatchers` beyond the limits.
    pub fn start(
        subject: Subject,
        current: Answer,
        kind: &'static str,
        config: &WatchConfig,
        stopping: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<Watcher, GatewayError> {
        let watches = subject.cache.watches();
        let watch = watches
            .subscribe(subject.key, &subject.consumer, config.limits())
            .map_err(|full| {
                metrics.watch_refused(kind);
                GatewayError::TooManyWatchers {
                    scope: match full {
                        crate::cache::watch::Full::Consumer => "for this consumer",
                        crate::cache::watch::Full::Total => "on this gateway",
                    },
                    retry_after: config.retry,
                }
            })?;
        let job = current.stored.activity.clone();
        if let Some(job) = &job {
            job.watchers.fetch_add(1, Ordering::Relaxed);
            subject.cache.activities().touch(job);
        }
        // An answer stored between the request's lookup and the subscription
        // was published to nobody: take it from the store.
        let current = match subject.cache.peek(&subject.key) {
            Some(stored) if stored.etag() != current.stored.etag() => {
                Answer::new(stored, crate::cache::CacheStatus::Hit)
            }
            _ => current,
        };
        let mut watcher = Watcher {
            watch,
            job,
            check_at: Instant::now(),
            subject,
            latest: current,
            stopping,
            _counted: metrics.watching(kind),
            metrics,
        };
        watcher.check_at = watcher.next_check();
        Ok(watcher)
    }

    /// Waits until `news` says the latest answer is news, `until` passes, or
    /// the gateway stops.
    pub async fn next(&mut self, until: Instant, news: impl Fn(&Answer) -> bool) -> Next {
        // Already news when it started (see `start`).
        if news(&self.latest) {
            return Next::Changed;
        }
        loop {
            tokio::select! {
                biased;
                () = self.stopping.cancelled() => return Next::Stopping,
                update = self.watch.changed() => {
                    self.latest = update.answer;
                    self.check_at = self.next_check();
                    if news(&self.latest) {
                        self.metrics.watch_woken(update.at.elapsed());
                        return Next::Changed;
                    }
                }
                () = tokio::time::sleep_until(self.check_at) => {
                    // A look may wait for a shared fetch: stopping does not.
                    let stopping = self.stopping.clone();
                    tokio::select! {
                        biased;
                        () = stopping.cancelled() => return Next::Stopping,
                        () = self.look() => {}
                    }
                    if news(&self.latest) {
                        return Next::Changed;
                    }
                }
                () = tokio::time::sleep_until(until) => return Next::Deadline,
            }
        }
    }

    /// Asks the cache, as a poller would (a hit, or one shared fetch).
    async fn look(&mut self) {
        match self.subject.get().await {
            Ok(answer) => self.latest = answer,
            // Upstream trouble with no stale answer left: what the watcher
            // has is all there is, and it is stale now.
            Err(error) if self.latest.stale.is_none() => {
                let reason = match *error {
                    GatewayError::Throttled { .. } => StaleReason::Throttled,
                    _ => StaleReason::UpstreamError,
                };
                self.latest = Answer::stale(self.latest.stored.clone(), reason);
            }
            Err(_) => {}
        }
        self.check_at = self.next_check();
    }

    /// When to look if no news comes: just after the latest answer's
    /// freshness ends, and never sooner than a quarter window from now (a
    /// failing upstream is not asked again at once).
    fn next_check(&self) -> Instant {
        let policy = self.subject.cache.policy();
        let ttl = policy.running_ttl;
        let now = Instant::now();
        let fresh_until = self.latest.stored.stored_at + ttl;
        let soonest = now + (ttl / 4).max(Duration::from_millis(250));
        fresh_until.max(soonest) + ttl.mul_f64(0.1 * fastrand::f64())
    }
}

/// The body of an event stream.
pub type EventStream = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// Where a stream stands.
enum Phase {
    /// Nothing written yet; `skip` when the client already has the answer
    /// (its `Last-Event-ID`).
    Start {
        skip: bool,
    },
    Live,
    Done,
}

struct Stream {
    watcher: Watcher,
    /// The ETag and staleness of what the client was last told.
    told: Option<(HeaderValue, bool)>,
    ends_at: Instant,
    keepalive: Duration,
    retry_ms: u128,
    phase: Phase,
}

/// The event stream for `watcher`, whose answer is a running or terminal 2xx.
pub fn event_stream(
    watcher: Watcher,
    last_event_id: Option<&str>,
    config: &WatchConfig,
) -> EventStream {
    let etag = watcher.latest.stored.etag();
    let skip = last_event_id.is_some_and(|id| {
        let id = id.trim();
        id.as_bytes() == etag.as_bytes() || id.as_bytes() == unquoted(etag.as_bytes())
    }) && watcher.latest.stale.is_none();
    let state = Stream {
        watcher,
        told: None,
        ends_at: Instant::now() + config.max_stream.mul_f64(0.9 + 0.2 * fastrand::f64()),
        keepalive: config.keepalive,
        retry_ms: config.retry.as_millis(),
        phase: Phase::Start { skip },
    };
    let frames = stream::unfold(state, |mut state| async move {
        let bytes = state.step().await?;
        Some((Ok(Frame::data(bytes)), state))
    });
    StreamBody::new(frames.boxed())
}

/// `"abc"` without its quotes.
fn unquoted(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"\"")
        .and_then(|s| s.strip_suffix(b"\""))
        .unwrap_or(tag)
}

impl Stream {
    /// The next bytes to write, or None when the stream is over.
    async fn step(&mut self) -> Option<Bytes> {
        let metrics = self.watcher.metrics.clone();
        match self.phase {
            Phase::Done => None,
            Phase::Start { skip } => {
                self.phase = Phase::Live;
                // The first block carries `retry:`, and the answer unless
                // the client has it; a finished job is told again, as the
                // client must learn to stop.
                let retry = format!("retry: {}\n", self.retry_ms);
                if !skip || self.watcher.latest.stored.class != Class::Running {
                    let mut first = retry + &self.event();
                    // A stale answer to start with is said to be stale.
                    if self.watcher.latest.stale.is_some() && matches!(self.phase, Phase::Live) {
                        first.push_str(&self.event());
                    }
                    return Some(Bytes::from(first));
                }
                let latest = &self.watcher.latest;
                self.told = Some((latest.stored.etag(), latest.stale.is_some()));
                Some(Bytes::from(retry + "\n"))
            }
            Phase::Live => {
                let now = Instant::now();
                let until = self.ends_at.min(now + self.keepalive);
                let told = self.told.clone();
                let news = move |answer: &Answer| {
                    told.as_ref().is_none_or(|(etag, stale)| {
                        answer.stored.etag() != etag || answer.stale.is_some() != *stale
                    })
                };
                match self.watcher.next(until, news).await {
                    Next::Changed => Some(Bytes::from(self.event())),
                    Next::Deadline if Instant::now() < self.ends_at => {
                        metrics.watch_event("keepalive");
                        Some(Bytes::from_static(b": keepalive\n\n"))
                    }
                    // The stream's time is up: the client reconnects, maybe
                    // to another replica, with its Last-Event-ID.
                    Next::Deadline => None,
                    Next::Stopping => {
                        self.phase = Phase::Done;
                        Some(Bytes::from(format!("retry: {}\n\n", self.retry_ms)))
                    }
                }
            }
        }
    }

    /// The event telling the client the latest answer; ends the stream after
    /// a final one.
    fn event(&mut self) -> String {
        let answer = &self.watcher.latest;
        let stored = &answer.stored;
        let etag = stored.etag();
        let stale = answer.stale.is_some();
        let unchanged = self.told.as_ref().is_some_and(|(told, _)| *told == etag);
        self.told = Some((etag.clone(), stale));
        let etag = etag.to_str().unwrap_or_default();
        let kind = if !stored.status.is_success() {
            "error"
        } else if stored.class == Class::Terminal {
            "terminal"
        } else if stale && unchanged {
            "stale"
        } else {
            "progress"
        };
        self.watcher.metrics.watch_event(kind);
        if kind != "progress" && kind != "stale" {
            self.phase = Phase::Done;
        }
        if kind == "stale" {
            let age = Instant::now().saturating_duration_since(stored.stored_at);
            let reason = answer.stale.map_or("stale", StaleReason::as_str);
            return format!(
                "event: stale\ndata: {{\"reason\":\"{reason}\",\"age_seconds\":{}}}\n\n",
                age.as_secs()
            );
        }
        format!(
            "event: {kind}\nid: {etag}\ndata: {}\n\n",
            one_line(&stored.body())
        )
    }
}

/// A JSON text on one line: outside strings, CR and LF are only whitespace,
/// and inside them JSON escapes them, so replacing them changes nothing.
fn one_line(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

/// The long-poll deadline for a wait of `wait`.
pub fn hold_until(wait: Duration) -> Instant {
    Instant::now() + jittered(wait, 0.05)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    const CAP: Duration = Duration::from_secs(25);

    #[test]
    fn modes_follow_accept_prefer_and_if_none_match() {
        assert_eq!(mode(&headers(&[]), || CAP), Mode::Plain);
        assert_eq!(
            mode(
                &headers(&[("accept", "text/html, Text/Event-Stream;q=1")]),
                || CAP
            ),
            Mode::Stream
        );
        assert_eq!(
            mode(&headers(&[("prefer", "wait=10")]), || CAP),
            Mode::Plain,
            "nothing to compare with"
        );
        assert_eq!(
            mode(
                &headers(&[
                    ("prefer", "respond-async, Wait=10"),
                    ("if-none-match", "\"a\"")
                ]),
                || CAP
            ),
            Mode::LongPoll(Duration::from_secs(10))
        );
        assert_eq!(
            mode(
                &headers(&[("prefer", "wait=600"), ("if-none-match", "\"a\"")]),
                || CAP
            ),
            Mode::LongPoll(CAP),
            "capped"
        );
        assert_eq!(
            mode(
                &headers(&[("prefer", "wait=soon"), ("if-none-match", "\"a\"")]),
                || CAP
            ),
            Mode::Plain
        );
    }

    #[test]
    fn json_goes_on_one_line_unchanged_in_meaning() {
        let body = b"{\n  \"status\": \"RUNNING\",\r\n  \"msg\": \"a\\nb\"\n}";
        let line = one_line(body);
        assert!(!line.contains('\n') && !line.contains('\r'));
        let a: serde_json::Value = serde_json::from_slice(body).unwrap();
        let b: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn jitter_stays_within_its_share_and_a_second() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10), 0.05);
            assert!(d >= Duration::from_secs(10) && d <= Duration::from_millis(10_500));
            let long = jittered(Duration::from_secs(100), 0.05);
            assert!(long <= Duration::from_secs(101));
        }
    }
}
