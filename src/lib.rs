//! progress-gateway: a caching gateway in front of Huawei Cloud's DRS v5
//! export-progress and ROMA Connect asset-job APIs.
//!
//! Many consumers poll the same long-running jobs. The gateway injects its own
//! credentials, shares one upstream request among everyone polling a job in a
//! short window, and keeps a finished job's answer until it is evicted.
//!
//! # Layout
//!
//! [`app`] is the composition root: it turns a [`config::Config`] into the
//! running parts and owns serve, reload and drain. A request's way, in order:
//!
//! - [`server`]: listener, HTTP/1.1 and HTTP/2, TLS, limits, graceful drain.
//! - [`proxy`]: one request: request id, route, consumer, project, response, access log.
//! - [`watch`]: long-polls and event streams for clients that watch a job.
//! - [`route`]: the two routes, as a `match` over path segments.
//! - [`cache`]: stored answers, single flight, stale fallbacks, 429 backoff.
//! - [`fetch`]: the upstream exchange for one job (authorise, send, record, retry on 401).
//! - [`upstream`]: the pooled HTTP client toward Huawei Cloud.
//! - [`credentials`]: where secrets come from and how requests are authenticated.
//!
//! Beside it: [`config`] (the file, checked into plain data), [`consumers`]
//! (who may use the gateway), [`error`] (every gateway error mapped to a
//! status and a Huawei-shaped body), [`logging`] (how log lines, the access
//! line above all, are written), [`admin`], [`dashboard`] (the operator's
//! page) and [`metrics`] (the operator's view), [`signal`] (SIGHUP, SIGTERM,
//! SIGINT) and, behind the `tools` feature, `tools` (the upstream simulator
//! and the demo).
//!
//! Dependencies point one way, down that list: no module imports one that
//! imports it back.

pub mod admin;
pub mod app;
pub mod cache;
pub mod config;
pub mod consumers;
pub mod credentials;
pub mod dashboard;
pub mod error;
pub mod fetch;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod recent;
pub mod route;
pub mod server;
pub mod signal;
#[cfg(feature = "tools")]
pub mod tools;
pub mod upstream;
pub mod watch;
