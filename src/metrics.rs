//! Prometheus metrics. Each counter moves where its event happens (a request
//! answered, an upstream exchange, a waiter coalesced, an eviction, a credential
//! refreshed or missing); the few values that are states rather than events
//! (entries, bytes, backoffs in force) are gauges the admin listener sets just
//! before it encodes. This module knows nothing of the gateway: the parts that
//! count hold the handles they need. One `Metrics` lives for the whole process,
//! so a config reload never resets a counter.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    api: &'static str,
    /// 0 when no answer arrived.
    status: u16,
    /// `answered`, or why not: `unreachable`, `timeout`, `invalid`, `credential`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    credential: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    /// A consumer's name; `by-address` where no keys are configured, since
    /// client addresses would make the label unbounded.
    consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    /// `long-poll` or `stream`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    /// `progress`, `terminal`, `stale`, `error` or `keepalive`.
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeldLabels {
    /// How a held long-poll ended: `changed`, `timeout` or `shutdown`.
    outcome: &'static str,
}

/// Running totals for the operator's page, which shows rates from their
/// differences (the labelled families are for Prometheus).
#[derive(Debug, Default)]
pub struct Totals {
    pub requests: AtomicU64,
    /// Answered without a fetch of their own: hits, shared fetches, stale answers.
    pub hits: AtomicU64,
    pub upstream: AtomicU64,
    /// Upstream exchanges that brought an answer, and their summed latency.
    pub answered: AtomicU64,
    pub latency_us: AtomicU64,
}

/// Counts one watcher of its kind while it lives.
pub struct Watching(Gauge);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type LatencyFamily = Family<ApiLabels, Histogram, fn() -> Histogram>;

/// Why an upstream exchange produced no answer, or that it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Unreachable,
    Timeout,
    /// Connected, but what came back was not a usable HTTP answer.
    Invalid,
    /// Never sent: no usable credential.
    Credential,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Unreachable => "unreachable",
            Outcome::Timeout => "timeout",
            Outcome::Invalid => "invalid",
            Outcome::Credential => "credential",
        }
    }
}

/// A credential's own counters, handed to it when it is built.
#[derive(Debug, Clone, Default)]
pub struct CredentialCounters {
    /// Credentials obtained or renewed (IAM tokens issued).
    pub refreshes: Counter,
    /// Upstream requests that found no usable credential.
    pub failures: Counter,
}

/// Reads how many log lines the log writer has dropped so far.
#[derive(Clone)]
pub struct LogDrops(Arc<dyn Fn() -> u64 + Send + Sync>);

impl LogDrops {
    pub fn new(read: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        LogDrops(Arc::new(read))
    }

    pub fn get(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for LogDrops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogDrops({})", self.get())
    }
}

thread_local! {
    /// The request counters this thread moved last, with their metrics' id
    /// and labels: a family's lookup takes its lock and hashes the labels
    /// with SipHash on every request. A counter is shared, so moving a copy
    /// moves the family's.
    static RECENT_COUNTERS: RefCell<[Option<(u64, RequestLabels, Counter)>; 4]> =
        const { RefCell::new([const { None }; 4]) };
}

/// Every metric the gateway exports, under the `pgw_` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Unique in the process: tells apart the counters [`RECENT_COUNTERS`] holds.
    id: u64,
    requests: Family<RequestLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_latency: LatencyFamily,
    credential_refreshes: Family<CredentialLabels, Counter>,
    credential_failures: Family<CredentialLabels, Counter>,
    /// Requests that waited for another request's upstream fetch.
    pub coalesced: Counter,
    /// Answers dropped to stay within the byte budget.
    pub evictions: Counter,
    /// Log lines dropped because the log writer fell behind (since start).
    pub log_lines_dropped: Gauge,
    pub cache_entries: Gauge,
    pub cache_bytes: Gauge,
    /// (API, project) pairs held back, by cause (`throttled`, `failing`).
    backoffs: Family<CauseLabels, Gauge>,
    /// Requests answered from a failure shared within `error_ttl`.
    pub failures_shared: Counter,
    /// Requests let through to find out whether upstream recovered.
    pub probes: Counter,
    /// Fetches that waited for the upstream budget.
    pub budget_waits: Counter,
    /// Background refreshes of polled running jobs ahead of their window's end.
    pub refreshes_ahead: Counter,
    /// Local misses answered from the shared tier (another replica's fetch).
    pub shared_hits: Counter,
    /// Fetches this replica waited for while another replica held the fleet lock.
    pub shared_waits: Counter,
    /// Fleet locks taken over after their holder vanished (lock expired).
    pub shared_takeovers: Counter,
    /// Redis calls that failed or missed their deadline.
    pub shared_errors: Counter,
    /// 0: no shared tier; 1: in use; 2: local-only (breaker open).
    pub shared_state: Gauge,
    consumer_refusals: Family<ConsumerLabels, Counter>,
    watchers: Family<KindLabels, Gauge>,
    watch_refusals: Family<KindLabels, Counter>,
    watch_events: Family<EventLabels, Counter>,
    held: Family<HeldLabels, Counter>,
    /// From an answer landing to a watcher being handed it.
    watch_wakeup: Histogram,
    pub totals: Totals,
    /// Budget refusals by consumer label, for the operator's page.
    refusals: Mutex<BTreeMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut registry = Registry::with_prefix("pgw");
        let metrics = Metrics {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            requests: Family::default(),
            upstream_requests: Family::default(),
            // 1 ms to about 16 s.
            upstream_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            credential_refreshes: Family::default(),
            credential_failures: Family::default(),
            coalesced: Counter::default(),
            evictions: Counter::default(),
            log_lines_dropped: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_bytes: Gauge::default(),
            backoffs: Family::default(),
            failures_shared: Counter::default(),
            probes: Counter::default(),
            budget_waits: Counter::default(),
            refreshes_ahead: Counter::default(),
            shared_hits: Counter::default(),
            shared_waits: Counter::default(),
            shared_takeovers: Counter::default(),
            shared_errors: Counter::default(),
            shared_state: Gauge::default(),
            consumer_refusals: Family::default(),
            watchers: Family::default(),
            watch_refusals: Family::default(),
            watch_events: Family::default(),
            held: Family::default(),
            // 100 µs to about 1.6 s.
            watch_wakeup: Histogram::new(exponential_buckets(0.000_1, 2.0, 15)),
            totals: Totals::default(),
            refusals: Mutex::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        // Metrics of different types, each registered once with its help.
        macro_rules! register {
            ($($name:literal: $metric:ident, $help:literal;)*) => {
                $(registry.register($name, $help, m.$metric.clone());)*
            };
        }
        register! {
            "requests": requests,
                "Client requests by route, status and cache outcome";
            "upstream_requests": upstream_requests,
                "Upstream requests by API, status and outcome";
            "upstream_latency_seconds": upstream_latency,
                "Upstream answer latency by API";
            "upstream_backoffs": backoffs,
                "API and project pairs held back, by cause (throttled: a 429; failing: errors)";
            "consumer_refusals": consumer_refusals,
                "Requests refused because their consumer used up its fetch budget";
            "watchers": watchers,
                "Clients watching a job now, by kind (long-poll: requests held; stream: server-sent event streams)";
            "watch_refusals": watch_refusals,
                "Watches refused for the watcher limits (long-polls answered at once, streams 429)";
            "watch_events": watch_events,
                "Server-sent events written, by event";
            "watch_held": held,
                "Held long-polls answered, by how they ended";
            "watch_wakeup_seconds": watch_wakeup,
                "From an answer landing to a watcher being handed it";
            "coalesced_waiters": coalesced,
                "Requests that shared another request's upstream fetch";
            "cache_evictions": evictions,
                "Answers evicted to stay within the budget";
            "failures_shared": failures_shared,
                "Requests answered from an upstream failure shared within error_ttl";
            "upstream_probes": probes,
                "Requests let upstream to see whether a backed-off API recovered";
            "upstream_budget_waits": budget_waits,
                "Fetches that waited for the upstream_rate budget";
            "refreshes_ahead": refreshes_ahead,
                "Background refreshes of polled running jobs before their window ends";
            "shared_hits": shared_hits,
                "Local misses answered from the shared tier, fetched by another replica";
            "shared_waits": shared_waits,
                "Fetches that waited for another replica holding the fleet lock";
            "shared_lock_takeovers": shared_takeovers,
                "Fleet locks taken over after their holder vanished";
            "shared_errors": shared_errors,
                "Redis calls that failed or missed their deadline";
            "shared_state": shared_state,
                "Shared tier: 0 off, 1 in use, 2 local-only while Redis fails";
            "cache_entries": cache_entries,
                "Answers stored";
            "log_lines_dropped": log_lines_dropped,
                "Log lines dropped since start because the log writer fell behind";
            "cache_bytes": cache_bytes,
                "Bytes weighed against the budget";
            "credential_refreshes": credential_refreshes,
                "Credentials obtained or renewed (IAM tokens)";
            "credential_failures": credential_failures,
                "Upstream requests that found no usable credential";
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn request(&self, route: &'static str, status: u16, cache: &'static str) {
        self.totals.requests.fetch_add(1, Ordering::Relaxed);
        if matches!(cache, "HIT" | "SHARED" | "COALESCED" | "STALE") {
            self.totals.hits.fetch_add(1, Ordering::Relaxed);
        }
        let labels = RequestLabels {
            route,
            status,
            cache,
        };
        RECENT_COUNTERS.with_borrow_mut(|recent| {
            let found = recent
                .iter()
                .flatten()
                .find(|(id, seen, _)| *id == self.id && *seen == labels);
            if let Some((_, _, counter)) = found {
                counter.inc();
                return;
            }
            let counter = self.requests.get_or_create(&labels).clone();
            counter.inc();
            // The oldest makes way: a thread answers few kinds of request.
            recent.rotate_right(1);
            recent[0] = Some((self.id, labels, counter));
        });
    }

    /// One upstream exchange (retries count again); latency only for answers.
    pub fn upstream(&self, api: &'static str, status: u16, outcome: Outcome, took: Duration) {
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                api,
                status,
                outcome: outcome.as_str(),
            })
            .inc();
        self.totals.upstream.fetch_add(1, Ordering::Relaxed);
        if outcome == Outcome::Answered {
            self.totals.answered.fetch_add(1, Ordering::Relaxed);
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            self.totals.latency_us.fetch_add(us, Ordering::Relaxed);
            self.upstream_latency
                .get_or_create(&ApiLabels { api })
                .observe(took.as_secs_f64());
        }
    }

    /// Sets the backoffs in force (a state, sampled before export).
    pub fn set_backoffs(&self, throttled: usize, failing: usize) {
        for (cause, value) in [("throttled", throttled), ("failing", failing)] {
            self.backoffs
                .get_or_create(&CauseLabels { cause })
                .set(value as i64);
        }
    }

    /// A request refused for its consumer's fetch budget.
    pub fn consumer_refused(&self, consumer: &str) {
        *self
            .refusals
            .lock()
            .entry(consumer.to_string())
            .or_default() += 1;
        self.consumer_refusals
            .get_or_create(&ConsumerLabels {
                consumer: consumer.to_string(),
            })
            .inc();
    }

    /// Budget refusals so far, by consumer label.
    pub fn refusals(&self) -> BTreeMap<String, u64> {
        self.refusals.lock().clone()
    }

    /// Counts a watcher of `kind` (`long-poll`, `stream`) until dropped.
    pub fn watching(&self, kind: &'static str) -> Watching {
        let gauge = self.watchers.get_or_create(&KindLabels { kind }).clone();
        gauge.inc();
        Watching(gauge)
    }

    pub fn watch_refused(&self, kind: &'static str) {
        self.watch_refusals
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn watch_event(&self, event: &'static str) {
        self.watch_events
            .get_or_create(&EventLabels { event })
            .inc();
    }

    pub fn held(&self, outcome: &'static str) {
        self.held.get_or_create(&HeldLabels { outcome }).inc();
    }

    pub fn watch_woken(&self, after: Duration) {
        self.watch_wakeup.observe(after.as_secs_f64());
    }

    /// The counters of the credential `name`; the same name gets the same
    /// counters, so a credential rebuilt by a reload continues its counts.
    pub fn credential(&self, name: &str, kind: &'static str) -> CredentialCounters {
        let labels = CredentialLabels {
            credential: name.to_string(),
            kind,
        };
        CredentialCounters {
            refreshes: self.credential_refreshes.get_or_create(&labels).clone(),
            failures: self.credential_failures.get_or_create(&labels).clone(),
        }
    }

    /// The exposition in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counters_count_per_metrics_and_labels() {
        let (one, other) = (Metrics::new(), Metrics::new());
        // More kinds than a thread keeps at hand, in turn, twice over.
        let kinds = [
            (200, "HIT"),
            (200, "MISS"),
            (404, "HIT"),
            (429, "-"),
            (200, "STALE"),
        ];
        for _ in 0..2 {
            for (status, cache) in kinds {
                one.request("roma", status, cache);
                one.request("roma", status, cache);
            }
        }
        other.request("roma", 200, "HIT");
        let text = one.encode();
        for (status, cache) in kinds {
            let line = format!(
                r#"pgw_requests_total{{route="roma",status="{status}",cache="{cache}"}} 4"#
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        let line = r#"pgw_requests_total{route="roma",status="200",cache="HIT"} 1"#;
        assert!(other.encode().contains(line));
    }

    #[test]
    fn credential_counters_are_shared_by_name() {
        let metrics = Metrics::new();
        metrics.credential("main", "token").failures.inc();
        metrics.credential("main", "token").failures.inc();
        let text = metrics.encode();
        assert!(
            text.contains(r#"pgw_credential_failures_total{credential="main",kind="token"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn upstream_latency_is_observed_only_for_answers() {
        let metrics = Metrics::new();
        metrics.upstream("drs", 200, Outcome::Answered, Duration::from_millis(3));
        metrics.upstream("drs", 0, Outcome::Timeout, Duration::from_secs(9));
        let text = metrics.encode();
        assert!(
            text.contains(r#"pgw_upstream_latency_seconds_count{api="drs"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"outcome="timeout"} 1"#), "{text}");
    }
}
