//! Prometheus metrics: counters and a histogram the request path updates, and
//! a collector that reads the cache and the credentials at scrape time.

use std::sync::Weak;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::Registry;

use crate::proxy::Gateway;

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

type LatencyFamily = Family<ApiLabels, Histogram, fn() -> Histogram>;

/// Records upstream exchanges; cloned into each detached fetch.
#[derive(Clone, Debug)]
pub struct UpstreamRecorder {
    requests: Family<UpstreamLabels, Counter>,
    latency: LatencyFamily,
}

impl UpstreamRecorder {
    pub fn record(&self, api: &'static str, status: u16, outcome: &'static str, took: Duration) {
        self.requests
            .get_or_create(&UpstreamLabels {
                api,
                status,
                outcome,
            })
            .inc();
        if outcome == "answered" {
            self.latency
                .get_or_create(&ApiLabels { api })
                .observe(took.as_secs_f64());
        }
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream: UpstreamRecorder,
}

impl Metrics {
    pub fn new(gateway: Weak<Gateway>) -> Self {
        let mut registry = Registry::with_prefix("pgw");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Client requests by route, status and cache outcome",
            requests.clone(),
        );
        let upstream = UpstreamRecorder {
            requests: Family::default(),
            // 1 ms to about 16 s.
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
        };
        registry.register(
            "upstream_requests",
            "Upstream requests by API, status and outcome",
            upstream.requests.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Upstream answer latency by API",
            upstream.latency.clone(),
        );
        registry.register_collector(Box::new(Scraped(gateway)));
        Metrics {
            registry,
            requests,
            upstream,
        }
    }

    pub fn request(&self, route: &'static str, status: u16, cache: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                status,
                cache,
            })
            .inc();
    }

    pub fn upstream(&self) -> UpstreamRecorder {
        self.upstream.clone()
    }

    /// The exposition in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Values read from the gateway's state at scrape time.
#[derive(Debug)]
struct Scraped(Weak<Gateway>);

fn one<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, M::TYPE)?)
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(gateway) = self.0.upgrade() else {
            return Ok(());
        };
        let stats = gateway.cache().stats();
        let e = &mut encoder;
        one(
            e,
            "cache_entries",
            "Answers stored",
            ConstGauge::new(stats.entries as i64),
        )?;
        one(
            e,
            "cache_bytes",
            "Bytes weighed against the budget",
            ConstGauge::new(stats.bytes as i64),
        )?;
        one(
            e,
            "cache_evictions",
            "Answers evicted to stay within the budget",
            ConstCounter::new(stats.evictions),
        )?;
        one(
            e,
            "coalesced_waiters",
            "Requests that shared another request's upstream fetch",
            ConstCounter::new(stats.coalesced),
        )?;
        one(
            e,
            "upstream_backoffs",
            "API and project pairs backing off after a 429",
            ConstGauge::new(stats.backoffs as i64),
        )?;

        let state = gateway.state();
        let mut credentials: Vec<_> = state
            .config
            .projects
            .values()
            .map(|p| p.credential.clone())
            .collect();
        credentials.sort_by(|a, b| a.name.cmp(&b.name));
        credentials.dedup_by(|a, b| a.name == b.name);
        for (name, help, pick) in [
            (
                "credential_refreshes",
                "Credentials obtained or renewed (IAM tokens)",
                0,
            ),
            (
                "credential_failures",
                "Upstream requests that found no usable credential",
                1,
            ),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstCounter::<u64>::TYPE)?;
            for credential in &credentials {
                let (refreshes, failures) = credential.stats();
                let labels = CredentialLabels {
                    credential: credential.name.clone(),
                    kind: credential.kind(),
                };
                let value = if pick == 0 { refreshes } else { failures };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
