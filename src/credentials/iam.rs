//! Project-scoped IAM tokens obtained with a user's password, cached and
//! refreshed ahead of expiry with a single request in flight per project.
//!
//! A token is kept until `margin` before it expires; the first request inside
//! the margin refreshes it while everyone else keeps using the current one. If
//! IAM fails, the current token is used while it is valid and IAM is retried
//! with exponential backoff, so a struggling IAM is not hammered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use tokio::time::Instant;

use super::{Secret, SecretSource};
use crate::upstream::Upstream;

/// Longest pause between IAM attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct IamPassword {
    /// `scheme://authority` of IAM, no trailing slash.
    pub url: String,
    pub user: String,
    pub domain: String,
    pub password: SecretSource,
    /// Refresh this long before the token expires.
    pub margin: Duration,
    /// First pause after a failed IAM call (doubling up to a minute).
    pub retry_backoff: Duration,
    client: Upstream,
    /// Tokens obtained so far (for metrics).
    issued: AtomicU64,
    /// std Mutex: only to find or add a project's slot.
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

#[derive(Debug, Default)]
struct Slot {
    /// std Mutex: read or replaced, never held across an await.
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
    last_error: Option<String>,
}

impl IamPassword {
    pub fn new(
        url: String,
        user: String,
        domain: String,
        password: SecretSource,
        margin: Duration,
        retry_backoff: Duration,
        client: Upstream,
    ) -> Self {
        IamPassword {
            url,
            user,
            domain,
            password,
            margin,
            retry_backoff,
            client,
            issued: AtomicU64::new(0),
            slots: Mutex::default(),
        }
    }

    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    fn slot(&self, project: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap()
            .entry(project.to_string())
            .or_default()
            .clone()
    }

    /// A valid token for `project`, refreshed first if it is near expiry.
    pub async fn token(&self, project: &str) -> Result<Secret, String> {
        let slot = self.slot(project);
        let now = Instant::now();
        let current = slot.current.lock().unwrap().clone();
        let valid = current.filter(|t| t.valid_until > now);
        if let Some(t) = &valid {
            if t.valid_until > now + self.margin {
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
        if let Some(t) = slot.current.lock().unwrap().as_ref() {
            if t.valid_until > now + self.margin {
                return Ok(t.token.clone());
            }
        }
        if backoff.next_attempt.is_some_and(|at| now < at) {
            return match valid {
                Some(t) => Ok(t.token),
                None => Err(backoff.last_error.clone().unwrap_or_default()),
            };
        }
        match self.issue(project).await {
            Ok(issued) => {
                self.issued.fetch_add(1, Ordering::Relaxed);
                *slot.current.lock().unwrap() = Some(issued.clone());
                *backoff = Backoff::default();
                Ok(issued.token)
            }
            Err(error) => {
                backoff.delay = (backoff.delay * 2).clamp(self.retry_backoff, MAX_BACKOFF);
                backoff.next_attempt = Some(Instant::now() + backoff.delay);
                backoff.last_error = Some(error.clone());
                tracing::warn!(project, %error, retry_in = ?backoff.delay, "IAM token refresh failed");
                match valid {
                    Some(t) => Ok(t.token),
                    None => Err(error),
                }
            }
        }
    }

    /// Forgets `rejected` if it is still the current token (upstream said 401),
    /// so the next [`IamPassword::token`] fetches a new one. True if forgotten.
    pub fn reject(&self, project: &str, rejected: &Secret) -> bool {
        let slot = self.slot(project);
        let mut current = slot.current.lock().unwrap();
        if current
            .as_ref()
            .is_some_and(|t| t.token.expose() == rejected.expose())
        {
            *current = None;
            return true;
        }
        // Already replaced by a concurrent refresh: retrying is still worthwhile.
        current.is_some()
    }

    /// Why `project` has no valid token, if it has none.
    pub fn unready(&self, project: &str) -> Option<String> {
        let slot = self.slot(project);
        let valid = slot
            .current
            .lock()
            .unwrap()
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
        Some(reason.unwrap_or_else(|| "no IAM token obtained yet".into()))
    }

    /// One `POST /v3/auth/tokens` for a project-scoped token.
    async fn issue(&self, project: &str) -> Result<Issued, String> {
        let password = self.password.current()?;
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": self.user, "password": password.expose(), "domain": {"name": self.domain}}}},
            "scope": {"project": {"id": project}},
        }});
        let request = Request::post(format!("{}/v3/auth/tokens?nocatalog=true", self.url))
            .header(header::CONTENT_TYPE, "application/json;charset=utf8")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| format!("cannot build the IAM request: {e}"))?;
        let response = self
            .client
            .exchange("iam", request)
            .await
            .map_err(|e| e.message())?;
        if response.status != StatusCode::CREATED && response.status != StatusCode::OK {
            return Err(format!(
                "IAM answered {}: {}",
                response.status,
                iam_error(&response.body)
            ));
        }
        let token = response
            .headers
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .ok_or("IAM answered without X-Subject-Token")?;
        #[derive(Deserialize)]
        struct Answer {
            token: TokenBody,
        }
        #[derive(Deserialize)]
        struct TokenBody {
            expires_at: String,
        }
        let answer: Answer = serde_json::from_slice(&response.body)
            .map_err(|e| format!("IAM answer has no token.expires_at: {e}"))?;
        let expires_at = humantime::parse_rfc3339(&answer.token.expires_at)
            .map_err(|e| format!("IAM token.expires_at is not a time: {e}"))?;
        let lifetime = expires_at
            .duration_since(SystemTime::now())
            .map_err(|_| "IAM issued a token that has already expired".to_string())?;
        tracing::info!(project, expires_in = ?lifetime, "obtained an IAM token");
        Ok(Issued {
            token: Secret::new(token.to_string()),
            valid_until: Instant::now() + lifetime,
        })
    }
}

/// IAM's error message, bounded; IAM never echoes the password.
fn iam_error(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let value: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    let message = value
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().or(v["error_msg"].as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| text.into_owned());
    message.chars().take(200).collect()
}
