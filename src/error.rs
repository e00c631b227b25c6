//! Errors the gateway itself answers with, each mapped to a status and a
//! Huawei-shaped `error_code` in one place.
//!
//! The official SDKs read `error_code`/`error_msg` from the body and the request id
//! from the `X-Request-Id` header, so every gateway error carries both.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::credentials::CredentialError;
use crate::route::RouteError;
use crate::upstream::UpstreamError;

/// Everything that makes the gateway answer with an error of its own. Each
/// variant's text includes its direct cause; [`GatewayError::message`] adds
/// the rest of the chain.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no such route: only GET /v5/{{project_id}}/jobs/{{async_job_id}}/export/progress and GET /v2/{{project_id}}/instances/{{instance_id}}/assets/jobs/{{job_id}} are served")]
    NoRoute,
    #[error("method not allowed: use GET or HEAD")]
    MethodNotAllowed,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("the request head is {size} bytes; at most {limit} are accepted")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("project {0} is not served by this gateway")]
    ProjectNotServed(String),
    #[error("missing or unknown consumer key")]
    ConsumerUnauthorized,
    #[error("too many requests with unknown consumer keys from this address; retry after {} s", retry_after_secs(*.retry_after))]
    KeyGuessing { retry_after: Duration },
    #[error("consumer may not use project {0}")]
    ConsumerForbidden(String),
    #[error("no usable upstream credential for project {project}: {source}")]
    CredentialUnavailable {
        project: String,
        #[source]
        source: CredentialError,
    },
    #[error("upstream {api} {source}")]
    Upstream {
        api: &'static str,
        #[source]
        source: UpstreamError,
    },
    #[error("timed out after {} waiting for the shared upstream request", humantime::format_duration(*.0))]
    WaitTimeout(Duration),
    #[error("upstream {api} is throttling this project; retry after {} s", retry_after_secs(*.retry_after))]
    Throttled {
        api: &'static str,
        retry_after: Duration,
    },
    #[error("upstream {api} is failing for this project; retry after {} s", retry_after_secs(*.retry_after))]
    UpstreamFailing {
        api: &'static str,
        retry_after: Duration,
    },
    #[error("this consumer has triggered too many upstream requests; retry after {} s", retry_after_secs(*.retry_after))]
    ConsumerOverBudget { retry_after: Duration },
    #[error("too many watchers {scope}; watch again after {} s, or poll", retry_after_secs(*.retry_after))]
    TooManyWatchers {
        /// `for this consumer` or `on this gateway`.
        scope: &'static str,
        retry_after: Duration,
    },
    /// A bug: the shared upstream fetch ended without an outcome (it panicked).
    #[error("internal error: the upstream fetch was aborted")]
    FetchAborted,
}

impl From<RouteError> for GatewayError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotFound => GatewayError::NoRoute,
            RouteError::MethodNotAllowed => GatewayError::MethodNotAllowed,
            RouteError::Malformed(why) => GatewayError::BadRequest(why),
        }
    }
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::ProjectNotServed(_) | GatewayError::ConsumerForbidden(_) => {
                StatusCode::FORBIDDEN
            }
            GatewayError::ConsumerUnauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::CredentialUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Upstream { source, .. } => match source {
                UpstreamError::Unreachable(_) | UpstreamError::Invalid(_) => {
                    StatusCode::BAD_GATEWAY
                }
                UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            },
            GatewayError::WaitTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Throttled { .. }
            | GatewayError::ConsumerOverBudget { .. }
            | GatewayError::KeyGuessing { .. }
            | GatewayError::TooManyWatchers { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamFailing { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::FetchAborted => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error_code`: `PGW.` and a number whose first three digits are the status.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "PGW.4040",
            GatewayError::MethodNotAllowed => "PGW.4050",
            GatewayError::BadRequest(_) => "PGW.4000",
            GatewayError::HeadersTooLarge { .. } => "PGW.4310",
            GatewayError::ProjectNotServed(_) => "PGW.4030",
            GatewayError::ConsumerForbidden(_) => "PGW.4031",
            GatewayError::ConsumerUnauthorized => "PGW.4010",
            GatewayError::CredentialUnavailable { .. } => "PGW.5030",
            GatewayError::Upstream { source, .. } => match source {
                UpstreamError::Unreachable(_) => "PGW.5020",
                UpstreamError::Invalid(_) => "PGW.5021",
                UpstreamError::Timeout(_) => "PGW.5040",
            },
            GatewayError::FetchAborted => "PGW.5000",
            GatewayError::WaitTimeout(_) => "PGW.5041",
            GatewayError::Throttled { .. } => "PGW.4290",
            GatewayError::ConsumerOverBudget { .. } => "PGW.4291",
            GatewayError::KeyGuessing { .. } => "PGW.4292",
            GatewayError::TooManyWatchers { .. } => "PGW.4293",
            GatewayError::UpstreamFailing { .. } => "PGW.5031",
        }
    }

    /// The message with its cause chain, as the client and the log see it.
    /// Causes are transport and credential errors; no secret is part of one.
    pub fn message(&self) -> String {
        use std::error::Error;
        // The text already includes the direct cause.
        let mut msg = self.to_string();
        if let Some(rest) = self.source().and_then(|s| s.source()) {
            msg.push_str(": ");
            msg.push_str(&chain(rest));
        }
        msg
    }

    /// What the client is told: what went wrong for it, never how the
    /// gateway is configured. A credential's trouble names environment
    /// variables, files and IAM's answers: those go to the log and `/readyz`.
    pub fn client_message(&self) -> String {
        match self {
            GatewayError::CredentialUnavailable { project, .. } => format!(
                "no usable upstream credential for project {project} at the moment; \
                 the gateway's operator sees why on its readiness check and in its log"
            ),
            _ => self.message(),
        }
    }

    /// The Huawei-shaped answer for this error.
    pub fn to_response(&self, request_id: &str) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error_code": self.code(),
            "error_msg": crate::credentials::redact(&self.client_message()),
            "request_id": request_id,
        });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert("x-request-id", id);
        }
        match self {
            GatewayError::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            GatewayError::Throttled { retry_after, .. }
            | GatewayError::UpstreamFailing { retry_after, .. }
            | GatewayError::ConsumerOverBudget { retry_after }
            | GatewayError::KeyGuessing { retry_after }
            | GatewayError::TooManyWatchers { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_after_value(*retry_after));
            }
            _ => {}
        }
        response
    }
}

/// An error and its causes on one line, `: `-separated (for logs and `/readyz`).
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `Retry-After` in whole seconds, rounded up so a client never retries early.
pub fn retry_after_value(wait: Duration) -> HeaderValue {
    HeaderValue::from(retry_after_secs(wait))
}

/// Whole seconds to wait, rounded up, at least one.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_body_has_huawei_shape_and_request_id_header() {
        let response = GatewayError::ProjectNotServed("abc".into()).to_response("req-1");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()["x-request-id"], "req-1");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error_code"], "PGW.4030");
        assert_eq!(json["request_id"], "req-1");
        assert!(json["error_msg"].as_str().unwrap().contains("abc"));
    }

    #[test]
    fn codes_start_with_their_status() {
        let errors = [
            GatewayError::NoRoute,
            GatewayError::MethodNotAllowed,
            GatewayError::BadRequest("x"),
            GatewayError::HeadersTooLarge { size: 2, limit: 1 },
            GatewayError::WaitTimeout(Duration::from_secs(1)),
            GatewayError::FetchAborted,
            GatewayError::ConsumerOverBudget {
                retry_after: Duration::from_secs(1),
            },
            GatewayError::KeyGuessing {
                retry_after: Duration::from_secs(1),
            },
            GatewayError::TooManyWatchers {
                scope: "on this gateway",
                retry_after: Duration::from_secs(1),
            },
            GatewayError::UpstreamFailing {
                api: "drs",
                retry_after: Duration::from_secs(1),
            },
            GatewayError::Upstream {
                api: "drs",
                source: UpstreamError::Timeout(Duration::from_secs(1)),
            },
            GatewayError::Throttled {
                api: "drs",
                retry_after: Duration::from_secs(1),
            },
        ];
        for e in errors {
            assert!(e.code()[4..].starts_with(e.status().as_str()), "{e:?}");
        }
    }

    #[test]
    fn messages_carry_the_whole_cause_chain_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = GatewayError::CredentialUnavailable {
            project: "p".into(),
            source: CredentialError::Read {
                origin: crate::credentials::Origin::File("/run/token".into()),
                source: io,
            },
        };
        assert_eq!(
            error.message(),
            "no usable upstream credential for project p: cannot read file /run/token: no such file"
        );
    }

    #[tokio::test]
    async fn a_client_is_not_told_how_credentials_are_configured() {
        let error = GatewayError::CredentialUnavailable {
            project: "p".into(),
            source: CredentialError::NotSet {
                origin: crate::credentials::Origin::Env("PGW_SECRET_TOKEN".into()),
            },
        };
        assert!(
            error.message().contains("PGW_SECRET_TOKEN"),
            "the log has it"
        );
        let body = error
            .to_response("r")
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.contains("project p") && !body.contains("PGW_SECRET_TOKEN"),
            "{body}"
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_value(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_value(Duration::from_secs(3)), "3");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
    }
}
