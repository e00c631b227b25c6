//! The operator's page: `GET /` on the admin listener, fed once a second over
//! server-sent events (`GET /events`) with a [`Snapshot`]: client requests
//! against upstream requests, the busiest jobs, and what is wrong (backoffs,
//! budget refusals, unusable credentials).
//!
//! One sampler task builds the snapshot each second and publishes it on a
//! `watch` channel; every open page reads the latest one, so a slow page
//! never makes anything queue up and ten open pages cost what one does.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http_body_util::StreamBody;
use hyper::body::Frame;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::activity::JobActivity;
use crate::cache::{Class, SharedState, Stored};
use crate::credentials::redact;
use crate::error::chain;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::route::Api;
use crate::watch::EventStream;

/// The page itself: one self-contained file, no external resources.
pub const PAGE: &str = include_str!("dashboard.html");

/// Seconds of history the chart shows.
const HISTORY: usize = 300;
/// Seconds the headline rates are averaged over.
const RECENT: usize = 60;
/// Jobs the page lists, busiest first.
const TOP_JOBS: usize = 25;
/// A job nobody asked for, watches or fetched for this long leaves the list.
const IDLE_DROP: Duration = Duration::from_secs(30);

/// What the page shows, as sent to it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub uptime_s: u64,
    /// Since the gateway started.
    pub client_requests: u64,
    pub upstream_requests: u64,
    /// Over the last minute (or since start, if shorter).
    pub recent: Recent,
    /// Client and upstream requests per second, oldest first.
    pub history: Vec<[f64; 2]>,
    pub jobs: Vec<JobView>,
    pub trouble: Trouble,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Recent {
    pub seconds: usize,
    pub client_rate: f64,
    pub upstream_rate: f64,
    /// Share of client requests that cost no upstream request.
    pub saved_percent: Option<f64>,
    /// Share answered without a fetch of their own.
    pub hit_percent: Option<f64>,
    pub upstream_latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub api: &'static str,
    pub project: String,
    pub job: String,
    /// The job's own status word (`RUNNING`, `pending`, ...), or the HTTP
    /// status of an error answer.
    pub status: String,
    pub finished: bool,
    /// ROMA's `progress_percent`, as a percentage.
    pub progress: Option<f64>,
    /// Client requests per second over the last sampling period.
    pub requests_per_s: f64,
    pub watchers: u32,
    pub upstream_requests: u64,
    /// Age of the answer held now.
    pub age_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Trouble {
    pub backoffs: Vec<BackoffView>,
    /// Budget refusals since start, by consumer.
    pub refusals: Vec<(String, u64)>,
    pub credentials: Vec<CredentialView>,
    /// The shared tier's trouble, when there is a shared tier in trouble:
    /// `local-only` (Redis failing), `connecting` (not reached since start)
    /// or `unsubscribed` (no wake-ups).
    pub shared: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackoffView {
    pub api: &'static str,
    pub project: String,
    /// `throttled` (a 429) or `failing`.
    pub cause: &'static str,
    pub remaining_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CredentialView {
    pub project: String,
    pub credential: String,
    pub reason: String,
}

/// The totals one sample is taken from.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    hits: u64,
    upstream: u64,
    answered: u64,
    latency_us: u64,
}

impl Counts {
    fn of(metrics: &Metrics) -> Self {
        let t = &metrics.totals;
        Counts {
            requests: t.requests.load(Ordering::Relaxed),
            hits: t.hits.load(Ordering::Relaxed),
            upstream: t.upstream.load(Ordering::Relaxed),
            answered: t.answered.load(Ordering::Relaxed),
            latency_us: t.latency_us.load(Ordering::Relaxed),
        }
    }

    fn minus(self, earlier: Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            hits: self.hits.saturating_sub(earlier.hits),
            upstream: self.upstream.saturating_sub(earlier.upstream),
            answered: self.answered.saturating_sub(earlier.answered),
            latency_us: self.latency_us.saturating_sub(earlier.latency_us),
        }
    }
}

/// A job on the list, with what it was at the last sample.
struct Tracked {
    job: Arc<JobActivity>,
    requests: u64,
    upstream: u64,
    rate: f64,
    idle: Duration,
}

struct State {
    /// The totals at each of the last samples (newest last), with the
    /// seconds since the one before.
    samples: VecDeque<(Counts, f64)>,
    jobs: HashMap<usize, Tracked>,
}

pub struct Dashboard {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    started: Instant,
    state: Mutex<State>,
    /// The latest snapshot, as a server-sent event.
    latest: watch::Sender<Bytes>,
}

impl Dashboard {
    pub fn new(gateway: Arc<Gateway>, metrics: Arc<Metrics>) -> Self {
        let first = Counts::of(&metrics);
        Dashboard {
            gateway,
            metrics,
            started: Instant::now(),
            state: Mutex::new(State {
                samples: VecDeque::from([(first, 0.0)]),
                jobs: HashMap::new(),
            }),
            latest: watch::Sender::new(Bytes::new()),
        }
    }

    /// Samples once a second until `stop`, publishing each snapshot.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        // The first sample a whole period after start, not at once: a rate
        // over the first millisecond would show one request as hundreds a second.
        let period = Duration::from_secs(1);
        let mut last = Instant::now();
        let mut ticks = tokio::time::interval_at(last + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            let now = Instant::now();
            let snapshot = self.tick(now.duration_since(last));
            last = now;
            let json = serde_json::to_string(&snapshot).expect("a snapshot serializes");
            self.latest
                .send_replace(Bytes::from(format!("event: snapshot\ndata: {json}\n\n")));
        }
    }

    /// Takes a sample `elapsed` after the previous one and builds the snapshot.
    pub fn tick(&self, elapsed: Duration) -> Snapshot {
        let now_counts = Counts::of(&self.metrics);
        let cache = self.gateway.cache();
        let listed = cache.activities().drain();
        let mut state = self.state.lock();
        let seconds = elapsed.as_secs_f64().max(0.001);
        state.samples.push_back((now_counts, seconds));
        if state.samples.len() > HISTORY + 1 {
            state.samples.pop_front();
        }
        let history = state
            .samples
            .iter()
            .zip(state.samples.iter().skip(1))
            .map(|((before, _), (after, dt))| {
                let d = after.minus(*before);
                [d.requests as f64 / dt, d.upstream as f64 / dt]
            })
            .collect();
        let recent = recent(&state.samples);

        for job in listed {
            let id = Arc::as_ptr(&job) as usize;
            state.jobs.entry(id).or_insert_with(|| Tracked {
                requests: 0,
                upstream: job.upstream.load(Ordering::Relaxed),
                job,
                rate: 0.0,
                idle: Duration::ZERO,
            });
        }
        for tracked in state.jobs.values_mut() {
            let requests = tracked.job.requests.load(Ordering::Relaxed);
            let upstream = tracked.job.upstream.load(Ordering::Relaxed);
            let asked = requests.saturating_sub(tracked.requests);
            tracked.rate = asked as f64 / seconds;
            let busy = asked > 0
                || upstream != tracked.upstream
                || tracked.job.watchers.load(Ordering::Relaxed) > 0;
            tracked.idle = if busy {
                Duration::ZERO
            } else {
                tracked.idle + elapsed
            };
            (tracked.requests, tracked.upstream) = (requests, upstream);
        }
        state.jobs.retain(|_, t| t.idle < IDLE_DROP);
        let mut busiest: Vec<&Tracked> = state.jobs.values().collect();
        let load = |t: &Tracked| t.rate + f64::from(t.job.watchers.load(Ordering::Relaxed));
        busiest.sort_by(|a, b| load(b).total_cmp(&load(a)).then(a.job.job.cmp(&b.job.job)));
        let now = Instant::now();
        let jobs = busiest
            .into_iter()
            .take(TOP_JOBS)
            .map(|t| job_view(t, cache.peek(&t.job.key), now))
            .collect();
        drop(state);

        Snapshot {
            uptime_s: self.started.elapsed().as_secs(),
            client_requests: now_counts.requests,
            upstream_requests: now_counts.upstream,
            recent,
            history,
            jobs,
            trouble: self.trouble(),
        }
    }

    fn trouble(&self) -> Trouble {
        let backoffs = self
            .gateway
            .cache()
            .backoffs()
            .into_iter()
            .map(|b| BackoffView {
                api: b.api.as_str(),
                project: b.project,
                cause: b.cause.as_str(),
                remaining_s: b.remaining.as_secs_f64(),
            })
            .collect();
        let credentials = self
            .gateway
            .tenants()
            .unready()
            .into_iter()
            .map(|(project, credential, reason)| CredentialView {
                project,
                credential,
                reason: redact(&chain(&reason)).into_owned(),
            })
            .collect();
        let shared = self.gateway.cache().shared().and_then(|shared| {
            match (shared.state(), shared.subscribed()) {
                (SharedState::Up, true) => None,
                (SharedState::Up, false) => Some("unsubscribed"),
                (state, _) => Some(state.as_str()),
            }
        });
        Trouble {
            backoffs,
            refusals: self.metrics.refusals().into_iter().collect(),
            credentials,
            shared,
        }
    }

    /// `GET /events`: the latest snapshot now, then each new one, until `stop`.
    pub fn events(&self, stop: CancellationToken) -> EventStream {
        let receiver = self.latest.subscribe();
        let frames = stream::unfold(
            (receiver, stop, true),
            |(mut receiver, stop, first)| async move {
                if !first {
                    tokio::select! {
                        changed = receiver.changed() => changed.ok()?,
                        () = stop.cancelled() => return None,
                    }
                }
                let mut frame = receiver.borrow_and_update().clone();
                if first {
                    // A page that lost the stream comes back within two seconds;
                    // the field joins the first snapshot, or stands alone.
                    let mut head = b"retry: 2000\n".to_vec();
                    head.extend_from_slice(if frame.is_empty() { b"\n" } else { &frame });
                    frame = Bytes::from(head);
                }
                Some((
                    Ok::<_, Infallible>(Frame::data(frame)),
                    (receiver, stop, false),
                ))
            },
        );
        StreamBody::new(frames.boxed())
    }
}

/// Headline rates over the last [`RECENT`] samples.
fn recent(samples: &VecDeque<(Counts, f64)>) -> Recent {
    let n = samples.len().saturating_sub(1).min(RECENT);
    if n == 0 {
        return Recent::default();
    }
    let (newest, _) = samples[samples.len() - 1];
    let (oldest, _) = samples[samples.len() - 1 - n];
    let seconds: f64 = samples.iter().rev().take(n).map(|(_, dt)| dt).sum();
    let d = newest.minus(oldest);
    let share = |part: u64, whole: u64| (whole > 0).then(|| 100.0 * part as f64 / whole as f64);
    Recent {
        seconds: n,
        client_rate: d.requests as f64 / seconds.max(0.001),
        upstream_rate: d.upstream as f64 / seconds.max(0.001),
        saved_percent: share(d.requests.saturating_sub(d.upstream), d.requests),
        hit_percent: share(d.hits, d.requests),
        upstream_latency_ms: (d.answered > 0)
            .then(|| d.latency_us as f64 / d.answered as f64 / 1000.0),
    }
}

/// A job as listed: its counters and what its answer says now.
fn job_view(tracked: &Tracked, stored: Option<Stored>, now: Instant) -> JobView {
    let job = &tracked.job;
    let (status, finished, progress, age_s) = match stored {
        Some(stored) => {
            let (status, progress) = read_status(job.api, &stored);
            let age = now
                .saturating_duration_since(stored.stored_at)
                .as_secs_f64();
            (status, stored.class == Class::Terminal, progress, Some(age))
        }
        None => ("-".to_string(), false, None, None),
    };
    JobView {
        api: job.api.as_str(),
        project: job.project.to_string(),
        job: job.job.to_string(),
        status,
        finished,
        progress,
        requests_per_s: tracked.rate,
        watchers: job.watchers.load(Ordering::Relaxed),
        upstream_requests: job.upstream.load(Ordering::Relaxed),
        age_s,
    }
}

/// The status word and ROMA progress of an answer; an error's HTTP status.
fn read_status(api: Api, stored: &Stored) -> (String, Option<f64>) {
    if !stored.status.is_success() {
        return (stored.status.as_u16().to_string(), None);
    }
    let body: serde_json::Value = serde_json::from_slice(&stored.body()).unwrap_or_default();
    let field = match api {
        Api::Drs => "process_status",
        Api::Roma => "status",
    };
    let status = body[field].as_str().unwrap_or("?").to_string();
    let progress = body["progress_percent"].as_f64().map(|p| {
        // ROMA sends a fraction; a value above 1 is already a percentage.
        if p <= 1.0 {
            p * 100.0
        } else {
            p
        }
    });
    (status, progress)
}
