//! The admin listener, apart from the proxy: `/metrics` (Prometheus),
//! `/healthz` (the process is alive) and `/readyz` (listening, and every
//! project has a usable credential; otherwise 503 naming those that do not).

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::error::GatewayError;
use crate::proxy::Gateway;

pub fn handle<B>(gateway: &Gateway, request: &Request<B>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(gateway.metrics().encode())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/healthz" => json_response(StatusCode::OK, &json!({"status": "alive"})),
        "/readyz" => {
            let state = gateway.state();
            let mut unready: Vec<_> = state
                .config
                .projects
                .values()
                .filter_map(|p| {
                    let reason = p.credential.unready(&p.id)?;
                    Some(
                        json!({"project": p.id, "credential": p.credential.name, "reason": reason}),
                    )
                })
                .collect();
            unready.sort_by(|a, b| a["project"].as_str().cmp(&b["project"].as_str()));
            let listening = gateway.is_listening();
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
        _ => GatewayError::NoRoute.to_response("admin"),
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
