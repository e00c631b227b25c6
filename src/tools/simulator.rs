//! A simulator of both upstream APIs for tests, the demo and benchmarks.
//!
//! A job appears on its first poll and runs for the configured duration, then
//! ends in success, or in failure when its ID contains `fail`. A job ID ending in
//! `_d{millis}` runs that long instead; one containing `missing` is always 404.
//! It checks the injected token, can add latency and force error statuses, and
//! counts requests per path.
//!
//! Authentication is what [`SimAuth`] enables: a static `X-Auth-Token`, tokens
//! its IAM endpoint (`POST /v3/auth/tokens`) issued for the project and not yet
//! expired, or an `SDK-HMAC-SHA256` signature it verifies itself from what
//! arrived on the wire (date skew at most 15 minutes). Failures get Huawei's 401
//! body with `APIGW.0301`.
//!
//! Control over HTTP: `GET /_sim/stats` gives the counters, `PUT /_sim/behaviour`
//! with a JSON [`Behaviour`] (all fields optional) changes how it answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use subtle::ConstantTimeEq;

use crate::credentials::sign;
use crate::route::{self, Api};
use crate::server::{Handler, Server};
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// How the simulator answers; changeable at run time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Behaviour {
    /// Added before every answer.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// How long a job runs after its first poll.
    #[serde(with = "humantime_serde")]
    pub job_duration: Duration,
    /// IAM answers 503 (APIGW.0613) while set.
    pub iam_down: bool,
    /// Answer every job request with this status instead ...
    pub force_status: Option<u16>,
    /// ... this many times (None: until changed).
    pub force_count: Option<u32>,
    /// `Retry-After` sent with a forced 429.
    pub retry_after: Option<String>,
    /// `error_msg` of a forced error, e.g. Huawei's throttling message
    /// `policy user over ratelimit,limit:100,time:1 minute`.
    pub error_msg: Option<String>,
    /// Quote the request in errors, as careless upstreams and WAFs do: job
    /// requests answer 500 quoting their X-Auth-Token and X-Security-Token,
    /// IAM's 503 (with `iam_down`) quotes the request body, password and all.
    pub echo: bool,
    /// The whole body of a forced answer instead of an error body (a page
    /// that is not JSON is sent as `text/html`, as a captive portal would).
    pub force_body: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            latency: Duration::ZERO,
            job_duration: Duration::from_secs(30),
            iam_down: false,
            force_status: None,
            force_count: None,
            retry_after: None,
            error_msg: None,
            echo: false,
            force_body: None,
        }
    }
}

/// `progress-gateway simulate`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on (port 0 picks one and prints it).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Environment variable holding the X-Auth-Token to require (unset: no check).
    #[arg(long)]
    pub token_env: Option<String>,
    /// How long a job runs after its first poll.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub job_duration: Duration,
    /// Latency added to every answer.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
}

impl Args {
    /// The simulator these arguments describe, or the variable that is not set.
    pub fn simulator(&self) -> Result<Simulator, String> {
        let token = match &self.token_env {
            Some(var) => Some(std::env::var(var).map_err(|_| var.clone())?),
            None => None,
        };
        let auth = SimAuth {
            token,
            ..SimAuth::default()
        };
        let behaviour = Behaviour {
            job_duration: self.job_duration,
            latency: self.latency,
            ..Behaviour::default()
        };
        Ok(Simulator::new(auth, behaviour))
    }
}

/// Which credentials the simulator accepts on job requests (none set: any).
#[derive(Debug, Clone, Default)]
pub struct SimAuth {
    /// A static `X-Auth-Token`.
    pub token: Option<String>,
    /// An AK and its SK for `SDK-HMAC-SHA256` signatures.
    pub aksk: Option<(String, String)>,
    /// A user its IAM endpoint issues project-scoped tokens to.
    pub iam: Option<IamUser>,
}

#[derive(Debug, Clone)]
pub struct IamUser {
    pub name: String,
    pub domain: String,
    pub password: String,
    pub token_lifetime: Duration,
}

impl Handler for Simulator {
    type Body = Full<Bytes>;

    async fn handle(&self, request: Request<hyper::body::Incoming>) -> SimResponse {
        self.answer(request).await
    }
}

/// Cloning shares the simulator's state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    auth: SimAuth,
    /// Tokens issued by the IAM endpoint: project and expiry.
    issued: Mutex<HashMap<String, (String, Instant)>>,
    iam_calls: std::sync::atomic::AtomicU64,
    /// std Mutexes: never held across an await.
    behaviour: Mutex<Behaviour>,
    jobs: Mutex<HashMap<String, (Instant, SystemTime)>>,
    requests: Mutex<HashMap<String, u64>>,
    last_headers: Mutex<HashMap<String, HeaderMap>>,
    /// Total job requests; a watch so tests wait for arrivals without polling.
    total: watch::Sender<u64>,
}

type SimResponse = Response<Full<Bytes>>;

impl Simulator {
    pub fn new(auth: SimAuth, behaviour: Behaviour) -> Self {
        Simulator {
            inner: Arc::new(Inner {
                auth,
                issued: Mutex::default(),
                iam_calls: Default::default(),
                behaviour: Mutex::new(behaviour),
                jobs: Mutex::default(),
                requests: Mutex::default(),
                last_headers: Mutex::default(),
                total: watch::Sender::new(0),
            }),
        }
    }

    /// Listens on `addr` (port 0 for any) and serves in the background until
    /// the runtime ends; returns the bound address.
    pub async fn spawn(&self, addr: &str) -> std::io::Result<std::net::SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let sim = Arc::new(self.clone());
        tokio::spawn(Server::new(listener).serve(sim, CancellationToken::new()));
        Ok(bound)
    }

    /// `progress-gateway simulate`: serves on `addr` until SIGTERM or SIGINT,
    /// announcing the bound address on stdout (for scripts that bind port 0).
    pub async fn run(self, addr: SocketAddr) -> Result<(), crate::app::AppError> {
        use crate::app::AppError;
        let mut signals = crate::signal::Signals::install().map_err(AppError::Signals)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        println!(
            "simulator listening on http://{}",
            listener.local_addr().expect("bound")
        );
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(
            Server::new(listener)
                .drain(Duration::from_secs(1))
                .serve(Arc::new(self), shutdown.clone()),
        );
        while signals.next().await != crate::signal::Signal::Stop {}
        shutdown.cancel();
        let _ = serving.await;
        Ok(())
    }

    pub fn set_behaviour(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.inner.behaviour.lock().unwrap());
    }

    /// Job requests received for `path`.
    pub fn requests(&self, path: &str) -> u64 {
        self.inner
            .requests
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Calls to the IAM endpoint.
    pub fn iam_calls(&self) -> u64 {
        self.inner
            .iam_calls
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Invalidates every issued IAM token (as a password change would).
    pub fn revoke_tokens(&self) {
        self.inner.issued.lock().unwrap().clear();
    }

    /// Job requests received in all.
    pub fn total(&self) -> u64 {
        *self.inner.total.borrow()
    }

    /// Waits until at least `n` job requests have arrived.
    pub async fn arrived(&self, n: u64) {
        let mut total = self.inner.total.subscribe();
        let _ = total.wait_for(|t| *t >= n).await;
    }

    /// The headers of the last request for `path`, as they arrived.
    pub fn last_headers(&self, path: &str) -> Option<HeaderMap> {
        self.inner.last_headers.lock().unwrap().get(path).cloned()
    }

    pub async fn answer<B>(&self, request: Request<B>) -> SimResponse
    where
        B: hyper::body::Body,
    {
        let path = request.uri().path().to_string();
        match (request.method(), path.as_str()) {
            (&Method::GET, "/_sim/stats") => {
                let requests = self.inner.requests.lock().unwrap().clone();
                json_response(
                    StatusCode::OK,
                    &json!({"total": self.total(), "requests": requests}),
                )
            }
            (&Method::PUT, "/_sim/behaviour") => {
                let body = request.into_body().collect().await.map(|b| b.to_bytes());
                let current = serde_json::to_value(&*self.inner.behaviour.lock().unwrap()).unwrap();
                let merged = body.ok().and_then(|b| {
                    let change: serde_json::Value = serde_json::from_slice(&b).ok()?;
                    let mut merged = current;
                    merged.as_object_mut()?.extend(change.as_object()?.clone());
                    serde_json::from_value::<Behaviour>(merged).ok()
                });
                match merged {
                    Some(b) => {
                        *self.inner.behaviour.lock().unwrap() = b;
                        json_response(StatusCode::OK, &json!({"ok": true}))
                    }
                    None => error(
                        StatusCode::BAD_REQUEST,
                        "SIM.0400",
                        "expected a JSON behaviour",
                    ),
                }
            }
            (&Method::POST, "/v3/auth/tokens") => {
                let body = request
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                self.iam(&body)
            }
            _ => {
                self.job(request.method(), request.uri(), request.headers())
                    .await
            }
        }
    }

    async fn job(&self, method: &Method, uri: &http::Uri, headers: &HeaderMap) -> SimResponse {
        let path = uri.path();
        let Ok(route) = route::parse(method, path) else {
            return error(StatusCode::NOT_FOUND, "SIM.0404", "unknown API");
        };
        *self
            .inner
            .requests
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default() += 1;
        self.inner
            .last_headers
            .lock()
            .unwrap()
            .insert(path.to_string(), headers.clone());
        self.inner.total.send_modify(|t| *t += 1);

        let behaviour = self.inner.behaviour.lock().unwrap().clone();
        if !behaviour.latency.is_zero() {
            tokio::time::sleep(behaviour.latency).await;
        }
        if behaviour.echo {
            let quote = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let message = format!(
                "cannot process X-Auth-Token={} X-Security-Token={} Authorization={}",
                quote("x-auth-token"),
                quote("x-security-token"),
                quote("authorization")
            );
            return error(StatusCode::INTERNAL_SERVER_ERROR, "SIM.0500", &message);
        }
        if let Some(forced) = self.take_forced() {
            return forced;
        }
        if let Err(why) = self.authenticate(method, uri, route.project, headers) {
            return error(
                StatusCode::UNAUTHORIZED,
                "APIGW.0301",
                &format!("Incorrect IAM authentication information: {why}"),
            );
        }
        if route.job.contains("missing") {
            return error(StatusCode::NOT_FOUND, "SIM.0404", "the job does not exist");
        }
        let (first_seen, began) = *self
            .inner
            .jobs
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_insert((Instant::now(), SystemTime::now()));
        let duration = job_duration(route.job).unwrap_or(behaviour.job_duration);
        let elapsed = first_seen.elapsed();
        let done = elapsed >= duration;
        let failed = route.job.contains("fail");
        let progress = if done {
            1.0
        } else {
            elapsed.as_secs_f64() / duration.as_secs_f64().max(1e-9)
        };
        let body = match route.api {
            Api::Drs => json!({"process_status": match (done, failed) {
                (false, _) => "pending",
                (true, false) => "success",
                (true, true) => "failed",
            }}),
            Api::Roma => {
                let mut body = json!({
                    "id": route.job,
                    "type": "exportAsset",
                    "status": match (done, failed) {
                        (false, _) => "RUNNING",
                        (true, false) => "SUCCEEDED",
                        (true, true) => "FAILED",
                    },
                    "progress_percent": (progress * 100.0).round() / 100.0,
                    "begin_time": humantime::format_rfc3339_seconds(began).to_string(),
                    "reasons": [],
                });
                if done {
                    body["end_time"] =
                        json!(humantime::format_rfc3339_seconds(began + duration).to_string());
                    if failed {
                        body["reasons"] = json!([{"resource_type": "application", "resource_name": "app", "error_code": "ROMA.00000101", "error_msg": "simulated failure"}]);
                    } else {
                        body["archive_id"] = json!(format!("archive-{}", route.job));
                    }
                }
                body
            }
        };
        json_response(StatusCode::OK, &body)
    }

    /// Accepts a request that any enabled credential kind vouches for.
    fn authenticate(
        &self,
        method: &Method,
        uri: &http::Uri,
        project: &str,
        headers: &HeaderMap,
    ) -> Result<(), &'static str> {
        let auth = &self.inner.auth;
        if auth.token.is_none() && auth.aksk.is_none() && auth.iam.is_none() {
            return Ok(());
        }
        if let Some(sent) = headers.get("x-auth-token").and_then(|v| v.to_str().ok()) {
            if auth.token.as_deref() == Some(sent) {
                return Ok(());
            }
            return match self.inner.issued.lock().unwrap().get(sent) {
                Some((scope, expiry)) if scope == project && *expiry > Instant::now() => Ok(()),
                Some((scope, _)) if scope != project => Err("token is scoped to another project"),
                Some(_) => Err("the token expires"),
                None => Err("verify token failed"),
            };
        }
        let Some((ak, sk)) = &auth.aksk else {
            return Err("no token");
        };
        let parsed = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(sign::parse_authorization)
            .ok_or("no SDK-HMAC-SHA256 Authorization header")?;
        if &parsed.access != ak {
            return Err("unknown access key");
        }
        let date = headers
            .get("x-sdk-date")
            .and_then(|v| v.to_str().ok())
            .and_then(sign::parse_sdk_date)
            .ok_or("missing or malformed X-Sdk-Date")?;
        if !sign::date_within(date, SystemTime::now(), sign::MAX_SKEW) {
            return Err("X-Sdk-Date is more than 15 minutes off");
        }
        if !parsed.signed_headers.iter().any(|h| h == "host") {
            return Err("host is not signed");
        }
        let canonical = sign::canonical_request(
            method.as_str(),
            uri.path(),
            uri.query().unwrap_or(""),
            headers,
            &parsed.signed_headers,
            b"",
        )
        .ok_or("a signed header is missing")?;
        let date_text = headers["x-sdk-date"].to_str().unwrap_or_default();
        let expected = sign::signature(sk.as_bytes(), date_text, &canonical);
        if bool::from(expected.as_bytes().ct_eq(parsed.signature.as_bytes())) {
            Ok(())
        } else {
            Err("signature mismatch")
        }
    }

    /// IAM's `POST /v3/auth/tokens` for password identities.
    fn iam(&self, body: &[u8]) -> SimResponse {
        self.inner
            .iam_calls
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let behaviour = self.inner.behaviour.lock().unwrap().clone();
        if behaviour.iam_down {
            let message = if behaviour.echo {
                format!("IAM is unavailable for {}", String::from_utf8_lossy(body))
            } else {
                "IAM is unavailable".to_string()
            };
            return error(StatusCode::SERVICE_UNAVAILABLE, "APIGW.0613", &message);
        }
        let Some(user) = &self.inner.auth.iam else {
            return error(StatusCode::NOT_FOUND, "SIM.0404", "IAM is not enabled");
        };
        let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let identity = &request["auth"]["identity"]["password"]["user"];
        let project = request["auth"]["scope"]["project"]["id"]
            .as_str()
            .unwrap_or_default();
        if identity["name"] != user.name.as_str()
            || identity["password"] != user.password.as_str()
            || identity["domain"]["name"] != user.domain.as_str()
            || project.is_empty()
        {
            return json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": {"code": 401, "message": "The username or password is wrong.", "title": "Unauthorized"}}),
            );
        }
        let token = format!("MIIsim{}", uuid::Uuid::new_v4().simple());
        let expires_at = SystemTime::now() + user.token_lifetime;
        self.inner.issued.lock().unwrap().insert(
            token.clone(),
            (project.to_string(), Instant::now() + user.token_lifetime),
        );
        let mut response = json_response(
            StatusCode::CREATED,
            &json!({"token": {
                "expires_at": humantime::format_rfc3339_millis(expires_at).to_string(),
                "methods": ["password"],
                "project": {"id": project},
                "user": {"name": user.name, "domain": {"name": user.domain}},
            }}),
        );
        response.headers_mut().insert(
            "x-subject-token",
            HeaderValue::from_str(&token).expect("ascii"),
        );
        response
    }

    fn take_forced(&self) -> Option<SimResponse> {
        let mut behaviour = self.inner.behaviour.lock().unwrap();
        let status = behaviour.force_status?;
        match &mut behaviour.force_count {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None => {}
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = behaviour.error_msg.as_deref();
        let mut response = match status {
            _ if behaviour.force_body.is_some() => {
                let body = behaviour.force_body.clone().unwrap_or_default();
                let json = body.trim_start().starts_with('{');
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(if json {
                        "application/json"
                    } else {
                        "text/html"
                    }),
                );
                response
            }
            StatusCode::TOO_MANY_REQUESTS => error(
                status,
                "APIGW.0308",
                message.unwrap_or("The throttling threshold has been reached"),
            ),
            StatusCode::UNAUTHORIZED => error(
                status,
                "APIGW.0301",
                "Incorrect IAM authentication information",
            ),
            _ => error(
                status,
                "SIM.0001",
                message.unwrap_or("status forced by the simulator"),
            ),
        };
        if let Some(retry_after) = behaviour
            .retry_after
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
        }
        Some(response)
    }
}

/// A `_d{millis}` suffix on a job ID sets its own duration.
fn job_duration(job: &str) -> Option<Duration> {
    let (_, millis) = job.rsplit_once("_d")?;
    millis.parse().ok().map(Duration::from_millis)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> SimResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    headers.insert(
        "x-request-id",
        HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string()).expect("hex"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> SimResponse {
    json_response(status, &json!({"error_code": code, "error_msg": message}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    async fn poll(sim: &Simulator, path: &str, token: &str) -> (StatusCode, serde_json::Value) {
        let request = Request::get(path)
            .header("x-auth-token", token)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sim.answer(request).await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_run_then_finish_and_failures_fail() {
        let sim = Simulator::new(
            SimAuth {
                token: Some("t".into()),
                ..SimAuth::default()
            },
            Behaviour {
                job_duration: Duration::from_secs(10),
                ..Behaviour::default()
            },
        );
        let roma = "/v2/p/instances/i/assets/jobs/j1";
        let drs_fail = "/v5/p/jobs/fail-1/export/progress";
        assert_eq!(poll(&sim, roma, "t").await.1["status"], "RUNNING");
        assert_eq!(
            poll(&sim, drs_fail, "t").await.1["process_status"],
            "pending"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let (_, body) = poll(&sim, roma, "t").await;
        assert_eq!(body["status"], "SUCCEEDED");
        assert_eq!(body["progress_percent"], 1.0);
        assert!(body["reasons"].is_array());
        assert_eq!(
            poll(&sim, drs_fail, "t").await.1["process_status"],
            "failed"
        );
        assert_eq!(sim.requests(roma), 2);
        assert_eq!(sim.total(), 4);
    }

    #[tokio::test]
    async fn a_wrong_token_gets_huawei_401() {
        let sim = Simulator::new(
            SimAuth {
                token: Some("t".into()),
                ..SimAuth::default()
            },
            Behaviour::default(),
        );
        let (status, body) = poll(&sim, "/v5/p/jobs/j/export/progress", "wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error_code"], "APIGW.0301");
    }

    #[tokio::test]
    async fn forced_statuses_run_out() {
        let sim = Simulator::new(SimAuth::default(), Behaviour::default());
        sim.set_behaviour(|b| {
            b.force_status = Some(503);
            b.force_count = Some(1);
        });
        let path = "/v5/p/jobs/j_d5/export/progress";
        assert_eq!(
            poll(&sim, path, "").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(poll(&sim, path, "").await.0, StatusCode::OK);
        assert_eq!(job_duration("j_d5"), Some(Duration::from_millis(5)));
    }
}
