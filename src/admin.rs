//! The admin listener, apart from the proxy: `/metrics` (Prometheus),
//! `/healthz` (the process is alive) and `/readyz` (listening, and every
//! project has a usable credential; otherwise 503 naming those that do not).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::credentials::redact;
use crate::error::chain;
use crate::metrics::{LogDrops, Metrics};
use crate::proxy::{new_request_id, Gateway};

const PATHS: &str = "/metrics, /healthz and /readyz";

#[derive(Clone)]
pub struct Admin {
    pub gateway: Arc<Gateway>,
    pub metrics: Arc<Metrics>,
    /// The log writer's drop count, where the process has one.
    pub log_drops: Option<LogDrops>,
}

impl crate::server::Handler for Admin {
    type Body = Full<Bytes>;

    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        self.answer(&request)
    }
}

impl Admin {
    pub fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        match request.uri().path() {
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
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        let tenants = self.gateway.tenants();
        let mut unready: Vec<_> = tenants
            .projects
            .values()
            .filter_map(|p| {
                let reason = p.credential.unready(&p.id)?;
                Some(json!({"project": p.id, "credential": p.credential.name, "reason": redact(&chain(&reason))}))
            })
            .collect();
        unready.sort_by(|a, b| a["project"].as_str().cmp(&b["project"].as_str()));
        let listening = self.gateway.is_listening();
        let ready = listening && unready.is_empty();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(
            status,
            &json!({"ready": ready, "listening": listening, "unready": unready}),
        )
    }
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
