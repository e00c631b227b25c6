//! Project-scoped IAM tokens obtained with a user's password, cached and
//! refreshed ahead of expiry with a single request in flight per project.
//!
//! A token is kept until `margin` before it expires; the first request inside
//! the margin refreshes it while everyone else keeps using the current one. If
//! IAM fails, the current token is used while it is valid and IAM is retried
//! with exponential backoff, so a struggling IAM is not hammered.
//!
//! The HTTP client is passed in on each call rather than kept, so a reload
//! that changes `[upstream]` and keeps this credential uses the new client.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Full;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::time::Instant;

use super::{CredentialError, Origin, Secret, SecretSource};
use crate::upstream::{Upstream, UpstreamError};

/// Longest pause between IAM attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// An `iam-password` credential as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamSpec {
    /// `scheme://authority` of IAM, no trailing slash.
    pub url: String,
    pub user: String,
    pub domain: String,
    pub password: Origin,
    /// Refresh this long before the token expires.
    pub refresh_margin: Duration,
    /// First pause after a failed IAM call (doubling up to a minute).
    pub retry_backoff: Duration,
    /// After an upstream 401, at most one forced refresh per this interval:
    /// an upstream that refuses every token must not hammer IAM (IAM locks
    /// accounts that log in too often).
    pub min_refresh_interval: Duration,
}

/// Why IAM gave no token. Displays without its cause.
#[derive(Debug, thiserror::Error)]
pub enum IamError {
    #[error("IAM request failed")]
    Exchange(#[source] UpstreamError),
    #[error("IAM answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error("IAM answered without X-Subject-Token")]
    NoSubjectToken,
    #[error("IAM answer has no valid token.expires_at")]
    NoExpiry,
    #[error("IAM issued a token that has already expired")]
    AlreadyExpired,
    #[error("no IAM token obtained yet")]
    NotYet,
}

#[derive(Debug)]
pub struct IamPassword {
    spec: IamSpec,
    password: SecretSource,
    /// Tokens obtained so far (`pgw_credential_refreshes_total`).
    issued: Counter,
    /// Only to find or add a project's slot.
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// When an upstream 401 last forced a refresh (for any project).
    last_forced: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct Slot {
    /// Read or replaced, never held across an await.
    current: Mutex<Option<Issued>>,
    /// Held by the one request talking to IAM for this project.
    refresh: tokio::sync::Mutex<Backoff>,
}

#[derive(Debug, Clone)]
struct Issued {
    token: Secret,
    /// Converted from IAM's wall-clock `expires_at` when received.
    valid_until: Instant,
}

#[derive(Debug, Default)]
struct Backoff {
    next_attempt: Option<Instant>,
    delay: Duration,
    last_error: Option<Arc<CredentialError>>,
}

impl IamPassword {
    pub fn new(spec: IamSpec, issued: Counter) -> Self {
        IamPassword {
            password: SecretSource::new(spec.password.clone()),
            spec,
            issued,
            slots: Mutex::default(),
            last_forced: Mutex::default(),
        }
    }

    fn slot(&self, project: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .entry(project.to_string())
            .or_default()
            .clone()
    }

    /// A valid token for `project`, refreshed first if it is near expiry.
    pub async fn token(&self, project: &str, client: &Upstream) -> Result<Secret, CredentialError> {
        let slot = self.slot(project);
        let margin = self.spec.refresh_margin;
        let now = Instant::now();
        let current = slot.current.lock().clone();
        let valid = current.filter(|t| t.valid_until > now);
        if let Some(t) = &valid {
            if t.valid_until > now + margin {
                return Ok(t.token.clone());
            }
        }
        // Inside the margin with a valid token: whoever is not refreshing keeps it.
        let mut backoff = match &valid {
            Some(t) => match slot.refresh.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(t.token.clone()),
            },
            None => slot.refresh.lock().await,
        };
        // Someone else may have refreshed while this request waited.
        let now = Instant::now();
        if let Some(t) = slot.current.lock().as_ref() {
            if t.valid_until > now + margin {
                return Ok(t.token.clone());
            }
        }
        if backoff.next_attempt.is_some_and(|at| now < at) {
            return match valid {
                Some(t) => Ok(t.token),
                None => Err(CredentialError::IamBackoff(
                    backoff
                        .last_error
                        .clone()
                        .unwrap_or_else(|| Arc::new(CredentialError::Iam(IamError::NotYet))),
                )),
            };
        }
        match self.issue(project, client).await {
            Ok(issued) => {
                self.issued.inc();
                *slot.current.lock() = Some(issued.clone());
                *backoff = Backoff::default();
                Ok(issued.token)
            }
            Err(error) => {
                backoff.delay = (backoff.delay * 2).clamp(self.spec.retry_backoff, MAX_BACKOFF);
                // Jitter, so credentials and replicas do not retry in step.
                let pause = backoff.delay.mul_f64(0.5 + fastrand::f64() / 2.0);
                backoff.next_attempt = Some(Instant::now() + pause);
                let cause = std::error::Error::source(&error).map(ToString::to_string);
                tracing::warn!(project, %error, ?cause, retry_in = ?backoff.delay, "IAM token refresh failed");
                let error = Arc::new(error);
                backoff.last_error = Some(error.clone());
                match valid {
                    Some(t) => Ok(t.token),
                    None => Err(CredentialError::IamBackoff(error)),
                }
            }
        }
    }

    /// Forgets `rejected` if it is still the current token (upstream said 401),
    /// so the next [`IamPassword::token`] fetches a new one; at most once per
    /// `min_refresh_interval`. True if a retry is worthwhile.
    pub fn reject(&self, project: &str, rejected: &Secret) -> bool {
        let slot = self.slot(project);
        let mut current = slot.current.lock();
        if current
            .as_ref()
            .is_some_and(|t| t.token.expose() == rejected.expose())
        {
            let now = Instant::now();
            let mut last = self.last_forced.lock();
            if last.is_some_and(|at| now.duration_since(at) < self.spec.min_refresh_interval) {
                // Refreshed moments ago and refused again: the token is not
                // the problem. Keep it and pass the 401 on.
                return false;
            }
            *last = Some(now);
            *current = None;
            return true;
        }
        // Already replaced by a concurrent refresh: retrying is still worthwhile.
        current.is_some()
    }

    /// Why `project` has no valid token, if it has none.
    pub fn unready(&self, project: &str) -> Option<CredentialError> {
        let slot = self.slot(project);
        let valid = slot
            .current
            .lock()
            .as_ref()
            .is_some_and(|t| t.valid_until > Instant::now());
        if valid {
            return None;
        }
        let reason = slot
            .refresh
            .try_lock()
            .ok()
            .and_then(|b| b.last_error.clone());
        Some(match reason {
            Some(last) => CredentialError::IamBackoff(last),
            None => CredentialError::Iam(IamError::NotYet),
        })
    }

    /// One `POST /v3/auth/tokens` for a project-scoped token.
    async fn issue(&self, project: &str, client: &Upstream) -> Result<Issued, CredentialError> {
        let password = self.password.current()?;
        let spec = &self.spec;
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": spec.user, "password": password.expose(), "domain": {"name": spec.domain}}}},
            "scope": {"project": {"id": project}},
        }});
        let request = Request::post(format!("{}/v3/auth/tokens?nocatalog=true", spec.url))
            .header(header::CONTENT_TYPE, "application/json;charset=utf8")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a checked base URL and fixed headers make a valid request");
        let iam = |e| CredentialError::Iam(e);
        let response = client
            .send(request)
            .await
            .map_err(|e| iam(IamError::Exchange(e)))?;
        if response.status != StatusCode::CREATED && response.status != StatusCode::OK {
            return Err(iam(IamError::Refused {
                status: response.status,
                message: iam_error(&response.body),
            }));
        }
        let token = response
            .headers
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or(iam(IamError::NoSubjectToken))?;
        #[derive(Deserialize)]
        struct Answer {
            token: TokenBody,
        }
        #[derive(Deserialize)]
        struct TokenBody {
            expires_at: String,
        }
        let answer: Answer =
            serde_json::from_slice(&response.body).map_err(|_| iam(IamError::NoExpiry))?;
        let expires_at = humantime::parse_rfc3339(&answer.token.expires_at)
            .map_err(|_| iam(IamError::NoExpiry))?;
        let lifetime = expires_at
            .duration_since(SystemTime::now())
            .map_err(|_| iam(IamError::AlreadyExpired))?;
        tracing::info!(project, expires_in = ?lifetime, "obtained an IAM token");
        Ok(Issued {
            token: Secret::new(token.to_string()),
            valid_until: Instant::now() + lifetime,
        })
    }
}

/// IAM's error message, bounded, and scrubbed of secrets: IAM, or a WAF in
/// front of it, may quote the request body with the password in it.
fn iam_error(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let value: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    let message = value
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().or(v["error_msg"].as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| text.into_owned());
    let message: String = message.chars().take(200).collect();
    super::redact(&message).into_owned()
}
