//! The HTTP client toward Huawei Cloud (the job APIs and IAM): pooled
//! keep-alive connections, TLS with certificate verification (webpki roots, so
//! it works in a bare container), a connect timeout and one overall deadline
//! per exchange, and a bounded body read whole.

use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `[upstream]` in the config: how the client connects and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// One deadline for the whole exchange: connect, send, headers, body.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Largest answer body read; a larger one is an unusable answer.
    pub max_body: ByteSize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 64,
            max_body: ByteSize::mib(1),
        }
    }
}

/// An upstream answer, read whole: the cache classifies it by its body.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why an exchange produced no answer. Displays without its cause; the cause
/// chain is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("unreachable")]
    Unreachable(#[source] BoxError),
    #[error("sent an unusable answer")]
    Invalid(#[source] BoxError),
    #[error("did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// Shared by every request; cloning shares the connection pool.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    request_timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        // The https connector decides per URI; plain http stays allowed for local use.
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(https);
        Upstream {
            client,
            request_timeout: config.request_timeout,
            max_body: usize::try_from(config.max_body.as_u64()).unwrap_or(usize::MAX),
        }
    }

    /// Sends `request` and reads the whole answer within the request timeout.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                // Connected and then got something that is not HTTP (garbage,
                // an SSH banner, a bad header block): unusable, not unreachable.
                .map_err(|e| {
                    if e.is_connect() {
                        UpstreamError::Unreachable(e.into())
                    } else {
                        UpstreamError::Invalid(e.into())
                    }
                })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, self.max_body)
                .collect()
                .await
                .map_err(UpstreamError::Invalid)?
                .to_bytes();
            Ok(UpstreamResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.request_timeout))?
    }
}
