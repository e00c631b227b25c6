//! The upstream exchange for one job: what the cache runs on a miss.
//!
//! [`Exchange`] builds the upstream request from scratch (nothing the client
//! sent reaches upstream except the validated path and a normalised
//! `X-Language`), has the project's credential authorise it, sends it, records
//! it in the metrics, and on a 401 to a refreshable credential (an IAM token)
//! refreshes once and retries once. The cache sees it only through the
//! [`Fetch`] trait, so tests can put a script in its place.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Full;

use crate::credentials::Credential;
use crate::error::GatewayError;
use crate::metrics::{Metrics, Outcome};
use crate::route::Api;
use crate::upstream::{Upstream, UpstreamConfig, UpstreamError, UpstreamResponse};

const USER_AGENT: &str = concat!("progress-gateway/", env!("CARGO_PKG_VERSION"));

/// Everything one upstream fetch needs, owned: it runs detached from the
/// request that started it.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub api: Api,
    /// The region's base URL and the validated upstream path.
    pub url: String,
    pub project: String,
    /// The job ID (`instance/job` for ROMA), as the operator's page names it.
    pub job: String,
    pub credential: Arc<Credential>,
    /// Normalised `X-Language` (part of the cache key, so it may be sent).
    pub language: Option<String>,
    pub request_id: String,
}

pub type FetchFuture = Pin<Box<dyn Future<Output = Result<UpstreamResponse, GatewayError>> + Send>>;

/// The cache's seam toward upstream.
pub trait Fetch: Send + Sync + 'static {
    fn fetch(self: Arc<Self>, request: FetchRequest) -> FetchFuture;
}

/// The production [`Fetch`]: the pooled client (replaced when `[upstream]`
/// changes on a reload) and the metrics it records exchanges in.
#[derive(Debug)]
pub struct Exchange {
    upstream: ArcSwap<Upstream>,
    config: ArcSwap<UpstreamConfig>,
    metrics: Arc<Metrics>,
}

impl Exchange {
    pub fn new(config: &UpstreamConfig, metrics: Arc<Metrics>) -> Self {
        Exchange {
            upstream: ArcSwap::from_pointee(Upstream::new(config)),
            config: ArcSwap::from_pointee(config.clone()),
            metrics,
        }
    }

    /// Applies a reloaded `[upstream]`; an unchanged one keeps the pool.
    pub fn reconfigure(&self, config: &UpstreamConfig) {
        if **self.config.load() != *config {
            self.upstream.store(Arc::new(Upstream::new(config)));
            self.config.store(Arc::new(config.clone()));
        }
    }

    /// The current client (also IAM's).
    pub fn client(&self) -> Arc<Upstream> {
        self.upstream.load_full()
    }

    /// One fetch: authorise, send, and on a 401 that a refresh can cure,
    /// refresh and retry once.
    pub async fn run(&self, request: &FetchRequest) -> Result<UpstreamResponse, GatewayError> {
        let client = self.client();
        let credential = &request.credential;
        let mut upstream_request = build(request);
        let used = self
            .authorize(request, &mut upstream_request, &client)
            .await?;
        let response = self.send(request.api, &client, upstream_request).await?;
        // A revoked or expired token: refresh once and retry once.
        if response.status == StatusCode::UNAUTHORIZED
            && credential.rejected(&request.project, &used)
        {
            tracing::info!(project = %request.project, credential = %credential.name, "upstream 401: retrying once with a fresh credential");
            let mut retry = build(request);
            self.authorize(request, &mut retry, &client).await?;
            return self.send(request.api, &client, retry).await;
        }
        Ok(response)
    }

    async fn authorize(
        &self,
        request: &FetchRequest,
        upstream_request: &mut Request<Full<Bytes>>,
        client: &Upstream,
    ) -> Result<crate::credentials::Used, GatewayError> {
        request
            .credential
            .authorize(&request.project, upstream_request, client)
            .await
            .map_err(|source| {
                self.metrics
                    .upstream(request.api.as_str(), 0, Outcome::Credential, Duration::ZERO);
                GatewayError::CredentialUnavailable {
                    project: request.project.clone(),
                    source,
                }
            })
    }

    /// Every exchange is counted and timed, retries included.
    async fn send(
        &self,
        api: Api,
        client: &Upstream,
        request: Request<Full<Bytes>>,
    ) -> Result<UpstreamResponse, GatewayError> {
        let started = Instant::now();
        let result = client.send(request).await;
        let (status, outcome) = match &result {
            Ok(response) => (response.status.as_u16(), Outcome::Answered),
            Err(UpstreamError::Timeout(_)) => (0, Outcome::Timeout),
            Err(UpstreamError::Unreachable(_)) => (0, Outcome::Unreachable),
            Err(UpstreamError::Invalid(_)) => (0, Outcome::Invalid),
        };
        self.metrics
            .upstream(api.as_str(), status, outcome, started.elapsed());
        result.map_err(|source| GatewayError::Upstream {
            api: api.as_str(),
            source,
        })
    }
}

impl Fetch for Exchange {
    fn fetch(self: Arc<Self>, request: FetchRequest) -> FetchFuture {
        Box::pin(async move { self.run(&request).await })
    }
}

/// The upstream request, built from scratch.
fn build(request: &FetchRequest) -> Request<Full<Bytes>> {
    let mut builder = Request::get(&request.url)
        .header(header::ACCEPT, "application/json")
        // Identity, so the cache can read the body.
        .header(header::ACCEPT_ENCODING, "identity")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, USER_AGENT)
        .header("x-project-id", &request.project)
        .header("x-request-id", &request.request_id);
    if let Some(language) = &request.language {
        builder = builder.header("x-language", language);
    }
    // The URL is a checked base plus validated segments, the values are
    // validated identifiers: nothing here can be refused.
    builder
        .body(Full::new(Bytes::new()))
        .expect("a valid upstream request")
}

#[cfg(all(test, feature = "tools"))]
mod tests {
    use super::*;
    use crate::credentials::{CredentialSpec, IamSpec, Origin};
    use crate::tools::simulator::{Behaviour, IamUser, SimAuth, Simulator};

    const PROJECT: &str = "0123456789abcdef0123456789abcdef";

    fn request(sim: std::net::SocketAddr, credential: Credential) -> FetchRequest {
        FetchRequest {
            api: Api::Drs,
            url: format!("http://{sim}/v5/{PROJECT}/jobs/job-1/export/progress"),
            project: PROJECT.into(),
            job: "job-1".into(),
            credential: Arc::new(credential),
            language: Some("zh-cn".into()),
            request_id: "req-1".into(),
        }
    }

    fn token_credential(dir: &std::path::Path, token: &str, metrics: &Metrics) -> Credential {
        std::fs::write(dir.join("token"), token).unwrap();
        Credential::new(
            "main",
            CredentialSpec::Token(Origin::File(dir.join("token"))),
            metrics.credential("main", "token"),
        )
    }

    #[tokio::test]
    async fn sends_only_what_it_builds_and_records_the_exchange() {
        let sim = Simulator::new(
            SimAuth {
                token: Some("t0k".into()),
                ..SimAuth::default()
            },
            Behaviour::default(),
        );
        let addr = sim.spawn("127.0.0.1:0").await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let dir = tempfile::tempdir().unwrap();
        let exchange = Exchange::new(&UpstreamConfig::default(), metrics.clone());
        let fetch = request(addr, token_credential(dir.path(), "t0k", &metrics));
        let answer = exchange.run(&fetch).await.unwrap();
        assert_eq!(answer.status, 200);
        let path = format!("/v5/{PROJECT}/jobs/job-1/export/progress");
        let sent = sim.last_headers(&path).unwrap();
        let mut names: Vec<_> = sent.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "accept",
                "accept-encoding",
                "content-type",
                "host",
                "user-agent",
                "x-auth-token",
                "x-language",
                "x-project-id",
                "x-request-id"
            ]
        );
        assert_eq!(sent["x-language"], "zh-cn");
        assert_eq!(sent["x-request-id"], "req-1");
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"pgw_upstream_requests_total{api="drs",status="200",outcome="answered"} 1"#
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_missing_credential_never_reaches_upstream_and_is_counted() {
        let sim = Simulator::new(SimAuth::default(), Behaviour::default());
        let addr = sim.spawn("127.0.0.1:0").await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let dir = tempfile::tempdir().unwrap();
        let credential = Credential::new(
            "main",
            CredentialSpec::Token(Origin::File(dir.path().join("absent"))),
            metrics.credential("main", "token"),
        );
        let exchange = Exchange::new(&UpstreamConfig::default(), metrics.clone());
        let error = exchange.run(&request(addr, credential)).await.unwrap_err();
        assert_eq!(error.code(), "PGW.5030");
        assert_eq!(sim.total(), 0);
        let text = metrics.encode();
        assert!(text.contains(r#"outcome="credential"} 1"#), "{text}");
        assert!(
            text.contains(r#"pgw_credential_failures_total{credential="main",kind="token"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_401_to_an_iam_token_refreshes_once_and_retries_once() {
        let sim = Simulator::new(
            SimAuth {
                iam: Some(IamUser {
                    name: "bot".into(),
                    domain: "acme".into(),
                    password: "pw".into(),
                    token_lifetime: Duration::from_secs(3600),
                }),
                ..SimAuth::default()
            },
            Behaviour::default(),
        );
        let addr = sim.spawn("127.0.0.1:0").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "pw").unwrap();
        let metrics = Arc::new(Metrics::new());
        let credential = Credential::new(
            "iam",
            CredentialSpec::IamPassword(IamSpec {
                url: format!("http://{addr}"),
                user: "bot".into(),
                domain: "acme".into(),
                password: Origin::File(dir.path().join("pw")),
                refresh_margin: Duration::from_secs(60),
                retry_backoff: Duration::from_millis(10),
                min_refresh_interval: Duration::from_secs(30),
            }),
            metrics.credential("iam", "iam-password"),
        );
        let exchange = Exchange::new(&UpstreamConfig::default(), metrics.clone());
        let fetch = request(addr, credential);
        assert_eq!(exchange.run(&fetch).await.unwrap().status, 200);
        assert_eq!(sim.iam_calls(), 1);
        sim.revoke_tokens();
        assert_eq!(exchange.run(&fetch).await.unwrap().status, 200);
        assert_eq!(sim.iam_calls(), 2, "one refresh");
        assert_eq!(sim.total(), 3, "one retry");
        assert!(metrics
            .encode()
            .contains(r#"pgw_credential_refreshes_total{credential="iam",kind="iam-password"} 2"#));

        // Refused again right away: no second refresh within the interval.
        sim.revoke_tokens();
        assert_eq!(exchange.run(&fetch).await.unwrap().status, 401);
        assert_eq!(sim.iam_calls(), 2, "IAM is not asked again");
    }
}
