//! progress-gateway: a caching gateway in front of Huawei Cloud's DRS v5
//! export-progress and ROMA Connect asset-job APIs.
//!
//! Many consumers poll the same long-running jobs. The gateway injects its own
//! credentials, shares one upstream request among everyone polling a job in a
//! short window, and keeps a finished job's answer until it is evicted.
//!
//! # Layout
//!
//! A request's way, in module order:
//!
//! - [`server`]: listener, HTTP/1.1 and h2c connections, graceful drain.
//! - [`proxy`]: one request: request id, route, project, cache, response, access log.
//! - [`route`]: the two routes, as a `match` over path segments.
//! - [`cache`]: stored answers, single-flight fetches, stale fallbacks, 429 backoff.
//! - [`policy`]: pure cache decisions: classification, freshness, `Retry-After`.
//! - [`upstream`]: the pooled TLS client toward Huawei Cloud.
//! - [`credentials`]: where secrets come from and how requests are authenticated.
//!
//! Beside it: [`consumers`] (who may use the gateway), [`config`] (file →
//! checked types, reloadable), [`error`] (every gateway error mapped to a status
//! and a Huawei-shaped body), [`admin`] and [`metrics`] (the operator's view),
//! [`simulator`] (both upstream APIs, for tests, the demo and benchmarks) and
//! [`demo`] (`progress-gateway demo`).

pub mod admin;
pub mod cache;
pub mod config;
pub mod consumers;
pub mod credentials;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod server;
pub mod simulator;
pub mod upstream;
