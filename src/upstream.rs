//! The client toward Huawei Cloud: pooled keep-alive connections, TLS with
//! certificate verification (webpki roots, so it works in a bare container),
//! a connect timeout and one overall deadline per request.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use crate::route::Api;

/// An upstream answer, read whole: the cache classifies it by its body.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
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
            max_body: config.max_body,
        }
    }

    /// Sends `request` and reads the whole answer within the request timeout.
    pub async fn send(
        &self,
        api: Api,
        request: Request<Full<Bytes>>,
    ) -> Result<UpstreamResponse, GatewayError> {
        self.exchange(api.as_str(), request).await
    }

    /// Like [`Upstream::send`] for any service (`label` names it in errors).
    pub async fn exchange(
        &self,
        label: &'static str,
        request: Request<Full<Bytes>>,
    ) -> Result<UpstreamResponse, GatewayError> {
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                GatewayError::UpstreamUnreachable {
                    api: label,
                    source: e.into(),
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, self.max_body)
                .collect()
                .await
                .map_err(|e| GatewayError::UpstreamInvalid {
                    api: label,
                    reason: format!("reading the body failed: {e}"),
                })?
                .to_bytes();
            Ok(UpstreamResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| GatewayError::UpstreamTimeout {
                api: label,
                timeout: self.request_timeout,
            })?
    }
}
