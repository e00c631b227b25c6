//! The admin listener, apart from the proxy: `/` (the operator's page, fed
//! by `/events`; see [`crate::dashboard`]), `/metrics` (Prometheus),
//! `/healthz` (the process is alive) and `/readyz` (listening, and every
//! project has a usable credential; otherwise 503 naming those that do not).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cache::SharedState;
use crate::credentials::redact;
use crate::dashboard::Dashboard;
use crate::error::chain;
use crate::metrics::{LogDrops, Metrics};
use crate::proxy::{new_request_id, Body, Gateway};

const PATHS: &str = "/ (the operator's page), /events, /metrics, /healthz and /readyz";

#[derive(Clone)]
pub struct Admin {
    pub gateway: Arc<Gateway>,
    pub metrics: Arc<Metrics>,
    /// The log writer's drop count, where the process has one.
    pub log_drops: Option<LogDrops>,
    pub dashboard: Arc<Dashboard>,
    /// Ends the page's event streams when the gateway stops.
    pub stopping: CancellationToken,
}

impl crate::server::Handler for Admin {
    type Body = Body;

    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Body> {
        if request.uri().path() == "/events" {
            let mut response =
                Response::new(Either::Right(self.dashboard.events(self.stopping.clone())));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            return response;
        }
        self.answer(&request).map(Either::Left)
    }
}

impl Admin {
    pub fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        match request.uri().path() {
            "/" => page(),
            "/metrics" => {
                self.sample_states();
                let text = redact(&self.metrics.encode()).into_owned();
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "alive"})),
            "/readyz" => self.readiness(),
            path => {
                let request_id = new_request_id();
                let mut response = json_response(
                    StatusCode::NOT_FOUND,
                    &json!({
                        "error_code": "PGW.4040",
                        "error_msg": format!("no admin page at {path}: the admin listener serves {PATHS}"),
                        "request_id": request_id,
                    }),
                );
                if let Ok(id) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-request-id", id);
                }
                response
            }
        }
    }

    /// Gauges are states, not events: read them just before they are exported.
    fn sample_states(&self) {
        let cache = self.gateway.cache();
        let (entries, bytes) = cache.usage();
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_bytes.set(bytes as i64);
        if let Some(drops) = &self.log_drops {
            self.metrics.log_lines_dropped.set(drops.get() as i64);
        }
        let (throttled, failing) = cache.backoffs_in_force();
        self.metrics.set_backoffs(throttled, failing);
        let shared = match cache.shared().map(|s| s.state()) {
            None => 0,
            Some(SharedState::Up | SharedState::Connecting) => 1,
            Some(SharedState::LocalOnly) => 2,
        };
        self.metrics.shared_state.set(shared);
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        let unready: Vec<_> = self
            .gateway
            .tenants()
            .unready()
            .into_iter()
            .map(|(project, credential, reason)| {
                json!({"project": project, "credential": credential, "reason": redact(&chain(&reason))})
            })
            .collect();
        let listening = self.gateway.is_listening();
        let ready = listening && unready.is_empty();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        // Redis trouble never makes a replica unready: it serves alone.
        let shared = match self.gateway.cache().shared() {
            None => json!({"state": "off"}),
            Some(shared) => json!({
                "state": shared.state().as_str(),
                "subscribed": shared.subscribed(),
            }),
        };
        json_response(
            status,
            &json!({"ready": ready, "listening": listening, "unready": unready, "shared": shared}),
        )
    }
}

/// The operator's page, with headers that keep it self-contained: it may
/// load nothing from elsewhere, and nothing may frame it.
fn page() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(
        crate::dashboard::PAGE.as_bytes(),
    )));
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-type", "text/html; charset=utf-8"),
        ("cache-control", "no-cache"),
        (
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
