//! A simulator of both upstream APIs for tests, the demo and benchmarks.
//!
//! A job appears on its first poll and runs for the configured duration, then
//! ends in success, or in failure when its ID contains `fail`. A job ID ending in
//! `_d{millis}` runs that long instead; one containing `missing` is always 404.
//! It checks the injected token, can add latency and force error statuses, and
//! counts requests per path.
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

use crate::route::{self, Api};

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
    /// Answer every job request with this status instead ...
    pub force_status: Option<u16>,
    /// ... this many times (None: until changed).
    pub force_count: Option<u32>,
    /// `Retry-After` sent with a forced 429.
    pub retry_after: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            latency: Duration::ZERO,
            job_duration: Duration::from_secs(30),
            force_status: None,
            force_count: None,
            retry_after: None,
        }
    }
}

/// Cloning shares the simulator's state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    /// The `X-Auth-Token` required on job requests (None: no check).
    token: Option<String>,
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
    pub fn new(token: Option<String>, behaviour: Behaviour) -> Self {
        Simulator {
            inner: Arc::new(Inner {
                token,
                behaviour: Mutex::new(behaviour),
                jobs: Mutex::default(),
                requests: Mutex::default(),
                last_headers: Mutex::default(),
                total: watch::Sender::new(0),
            }),
        }
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

    pub async fn handle<B>(&self, request: Request<B>) -> SimResponse
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
            _ => self.job(request.method(), &path, request.headers()).await,
        }
    }

    async fn job(&self, method: &Method, path: &str, headers: &HeaderMap) -> SimResponse {
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
        if let Some(forced) = self.take_forced() {
            return forced;
        }
        if let Some(expected) = &self.inner.token {
            let sent = headers.get("x-auth-token").map(HeaderValue::as_bytes);
            if sent != Some(expected.as_bytes()) {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "APIGW.0301",
                    "Incorrect IAM authentication information: verify token failed",
                );
            }
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

    fn take_forced(&self) -> Option<SimResponse> {
        let mut behaviour = self.inner.behaviour.lock().unwrap();
        let status = behaviour.force_status?;
        match &mut behaviour.force_count {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None => {}
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = match status {
            StatusCode::TOO_MANY_REQUESTS => error(
                status,
                "APIGW.0308",
                "The throttling threshold has been reached",
            ),
            StatusCode::UNAUTHORIZED => error(
                status,
                "APIGW.0301",
                "Incorrect IAM authentication information",
            ),
            _ => error(status, "SIM.0001", "status forced by the simulator"),
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
        let response = sim.handle(request).await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_run_then_finish_and_failures_fail() {
        let sim = Simulator::new(
            Some("t".into()),
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
        let sim = Simulator::new(Some("t".into()), Behaviour::default());
        let (status, body) = poll(&sim, "/v5/p/jobs/j/export/progress", "wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error_code"], "APIGW.0301");
    }

    #[tokio::test]
    async fn forced_statuses_run_out() {
        let sim = Simulator::new(None, Behaviour::default());
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
