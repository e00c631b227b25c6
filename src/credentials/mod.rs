//! Upstream credentials: where each secret comes from, how it is put on an
//! upstream request, and which principal it stands for (part of the cache key).
//!
//! Secrets are never in the config file itself, only the name of an environment
//! variable or a file; they live in [`Secret`], which redacts `Debug` and zeroes
//! its memory on drop.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::Full;
use tokio::time::Instant;
use zeroize::Zeroizing;

pub mod iam;
pub mod sign;

/// A secret value. `Debug` never shows it; its memory is zeroed when dropped.
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<String>>);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(Arc::new(Zeroizing::new(value)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// As a header value flagged sensitive, so HTTP/2 never indexes it.
    pub fn header_value(&self) -> Result<HeaderValue, String> {
        let mut value = HeaderValue::from_str(self.expose())
            .map_err(|_| "the secret is not a valid HTTP header value".to_string())?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Env(String),
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// How often a secret file's size and mtime are checked for a rotation.
const FILE_RECHECK: Duration = Duration::from_secs(1);

/// A secret read from its origin; a file is re-read when it changes, so an
/// outside agent can rotate it without a restart.
#[derive(Debug)]
pub struct SecretSource {
    origin: Origin,
    /// std Mutex: held for a stat or a small read, never across an await.
    cached: Mutex<Option<Cached>>,
}

#[derive(Debug)]
struct Cached {
    secret: Secret,
    stamp: Option<(SystemTime, u64)>,
    checked_at: Instant,
}

impl SecretSource {
    pub fn new(origin: Origin) -> Self {
        SecretSource {
            origin,
            cached: Mutex::new(None),
        }
    }

    /// The current secret, or why there is none (never the secret itself).
    pub fn current(&self) -> Result<Secret, String> {
        let mut cached = self.cached.lock().unwrap();
        let now = Instant::now();
        if let Some(c) = cached.as_ref() {
            if c.stamp.is_none() || now.duration_since(c.checked_at) < FILE_RECHECK {
                return Ok(c.secret.clone());
            }
        }
        let stamp = match &self.origin {
            Origin::Env(_) => None,
            Origin::File(path) => {
                let meta = std::fs::metadata(path)
                    .map_err(|e| format!("cannot read {}: {e}", self.origin))?;
                Some((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                ))
            }
        };
        if let Some(c) = cached.as_mut() {
            if c.stamp == stamp {
                c.checked_at = now;
                return Ok(c.secret.clone());
            }
        }
        let secret = self.read()?;
        *cached = Some(Cached {
            secret: secret.clone(),
            stamp,
            checked_at: now,
        });
        Ok(secret)
    }

    fn read(&self) -> Result<Secret, String> {
        let raw = match &self.origin {
            Origin::Env(var) => {
                std::env::var(var).map_err(|_| format!("{} is not set", self.origin))?
            }
            Origin::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", self.origin))?,
        };
        let raw = Zeroizing::new(raw);
        let value = raw.trim();
        if value.is_empty() {
            return Err(format!("{} is empty", self.origin));
        }
        Ok(Secret::new(value.to_string()))
    }
}

/// How a credential authenticates upstream requests.
#[derive(Debug)]
pub enum Method {
    /// A static IAM token sent as `X-Auth-Token`.
    Token(SecretSource),
    /// AK/SK request signing (`SDK-HMAC-SHA256`).
    AkSk(AkSk),
    /// Project-scoped IAM tokens obtained with a password and refreshed.
    IamPassword(Box<iam::IamPassword>),
}

/// Where an AK/SK pair (and an optional security token) come from.
#[derive(Debug)]
pub enum AkSk {
    /// Permanent keys, each from its own source.
    Keys {
        ak: SecretSource,
        sk: SecretSource,
        security_token: Option<SecretSource>,
    },
    /// Temporary keys in one JSON file as IAM issues them
    /// (`{"credential": {"access", "secret", "securitytoken", "expires_at"}}`),
    /// re-read when it changes.
    File(SecretSource),
}

/// One AK/SK set as it will be used for a request.
struct Keys {
    ak: Secret,
    sk: Secret,
    security_token: Option<Secret>,
}

impl AkSk {
    fn keys(&self) -> Result<Keys, String> {
        match self {
            AkSk::Keys {
                ak,
                sk,
                security_token,
            } => Ok(Keys {
                ak: ak.current()?,
                sk: sk.current()?,
                security_token: security_token
                    .as_ref()
                    .map(SecretSource::current)
                    .transpose()?,
            }),
            AkSk::File(file) => {
                #[derive(serde::Deserialize)]
                struct Wrapped {
                    credential: Temporary,
                }
                #[derive(serde::Deserialize)]
                struct Temporary {
                    access: String,
                    secret: Zeroizing<String>,
                    securitytoken: Option<Zeroizing<String>>,
                    expires_at: Option<String>,
                }
                let text = file.current()?;
                let parsed: Temporary = serde_json::from_str::<Wrapped>(text.expose())
                    .map(|w| w.credential)
                    .or_else(|_| serde_json::from_str::<Temporary>(text.expose()))
                    // serde's message could quote the file; name only the problem.
                    .map_err(|_| "the credentials file is not {\"credential\": {\"access\", \"secret\", ...}} JSON".to_string())?;
                if let Some(expires_at) = &parsed.expires_at {
                    let at = humantime::parse_rfc3339(expires_at).map_err(|_| {
                        format!("expires_at {expires_at:?} is not an RFC 3339 time")
                    })?;
                    if at <= SystemTime::now() {
                        return Err(format!("the temporary credentials expired at {expires_at}"));
                    }
                }
                Ok(Keys {
                    ak: Secret::new(parsed.access),
                    sk: Secret::new(parsed.secret.to_string()),
                    security_token: parsed.securitytoken.map(|t| Secret::new(t.to_string())),
                })
            }
        }
    }
}

/// Largest clock skew Huawei accepts on `X-Sdk-Date`.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// What authenticated one request, kept to report a 401 against.
#[derive(Debug)]
pub struct Used(Option<Secret>);

/// One named credential from the config; several projects may share it.
#[derive(Debug)]
pub struct Credential {
    pub name: String,
    /// The principal, for the cache key: stable across token refreshes.
    identity: Arc<str>,
    method: Method,
    /// Requests that found no usable credential (for metrics).
    failures: AtomicU64,
}

impl Credential {
    pub fn new(name: &str, method: Method) -> Self {
        // Permanent AK/SK: the AK names the principal. Tokens and temporary
        // keys rotate, so the configured name stands for their principal.
        let identity = match &method {
            Method::Token(_) => format!("token:{name}"),
            Method::AkSk(AkSk::Keys { .. }) | Method::AkSk(AkSk::File(_)) => format!("aksk:{name}"),
            Method::IamPassword(iam) => format!("iam:{}@{}", iam.user, iam.domain),
        };
        Credential {
            name: name.to_string(),
            identity: identity.into(),
            method,
            failures: AtomicU64::new(0),
        }
    }

    /// Credentials obtained (IAM tokens issued) and requests left without one.
    pub fn stats(&self) -> (u64, u64) {
        let refreshes = match &self.method {
            Method::IamPassword(iam) => iam.issued(),
            _ => 0,
        };
        (refreshes, self.failures.load(Ordering::Relaxed))
    }

    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    pub fn kind(&self) -> &'static str {
        match self.method {
            Method::Token(_) => "token",
            Method::AkSk(_) => "aksk",
            Method::IamPassword(_) => "iam-password",
        }
    }

    /// Why the credential cannot be used for `project` now, if it cannot.
    pub fn unready(&self, project: &str) -> Option<String> {
        match &self.method {
            Method::Token(source) => source.current().err(),
            Method::AkSk(aksk) => aksk.keys().err(),
            Method::IamPassword(iam) => iam.unready(project),
        }
    }

    /// Obtains what the credential needs ahead of the first request (an IAM token).
    pub async fn prepare(&self, project: &str) -> Result<(), String> {
        match &self.method {
            Method::IamPassword(iam) => iam.token(project).await.map(drop),
            _ => self.unready(project).map_or(Ok(()), Err),
        }
    }

    /// Authenticates an upstream request for `project` whose other headers are final.
    pub async fn authorize(
        &self,
        project: &str,
        request: &mut Request<Full<Bytes>>,
    ) -> Result<Used, String> {
        match &self.method {
            Method::Token(source) => {
                let token = source.current()?;
                request
                    .headers_mut()
                    .insert("x-auth-token", token.header_value()?);
                Ok(Used(None))
            }
            Method::IamPassword(iam) => {
                let token = iam.token(project).await?;
                request
                    .headers_mut()
                    .insert("x-auth-token", token.header_value()?);
                Ok(Used(Some(token)))
            }
            Method::AkSk(aksk) => {
                let keys = aksk.keys()?;
                sign_request(request, &keys)?;
                Ok(Used(None))
            }
        }
    }

    /// Upstream answered 401 to a request authenticated with `used`: true if a
    /// fresh credential was arranged and one retry is worthwhile.
    pub fn rejected(&self, project: &str, used: &Used) -> bool {
        match (&self.method, &used.0) {
            (Method::IamPassword(iam), Some(token)) => iam.reject(project, token),
            _ => false,
        }
    }
}

/// Adds Host, X-Sdk-Date and X-Security-Token, then the signature over them.
fn sign_request(request: &mut Request<Full<Bytes>>, keys: &Keys) -> Result<(), String> {
    let host = request
        .uri()
        .authority()
        .ok_or("the upstream URL has no host")?
        .as_str()
        .to_string();
    let headers = request.headers_mut();
    headers.insert(
        http::header::HOST,
        HeaderValue::from_str(&host).map_err(|e| e.to_string())?,
    );
    let date = sign::sdk_date(SystemTime::now());
    headers.insert("x-sdk-date", HeaderValue::from_str(&date).expect("digits"));
    if let Some(token) = &keys.security_token {
        headers.insert("x-security-token", token.header_value()?);
    }
    let uri = request.uri().clone();
    let value = sign::authorization(
        keys.ak.expose(),
        keys.sk.expose().as_bytes(),
        request.method().as_str(),
        uri.path(),
        uri.query().unwrap_or(""),
        request.headers(),
        b"",
    )
    .ok_or("a header to sign is not valid text")?;
    let mut value = HeaderValue::from_str(&value)
        .map_err(|_| "the AK is not a valid header value".to_string())?;
    value.set_sensitive(true);
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("super-secret-token".into());
        assert!(!format!("{s:?}").contains("super-secret"));
        let source = SecretSource::new(Origin::Env("PGW_TEST_NEVER_SET_VAR".into()));
        let err = source.current().unwrap_err();
        assert!(err.contains("PGW_TEST_NEVER_SET_VAR is not set"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_token_file_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let source = SecretSource::new(Origin::File(path.clone()));
        assert_eq!(source.current().unwrap().expose(), "first");
        // A different length changes the stamp even where mtime granularity is coarse.
        std::fs::write(&path, "second-token").unwrap();
        assert_eq!(
            source.current().unwrap().expose(),
            "first",
            "rechecked at most once a second"
        );
        tokio::time::advance(FILE_RECHECK).await;
        assert_eq!(source.current().unwrap().expose(), "second-token");
    }

    #[test]
    fn an_empty_or_missing_file_is_a_reason_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let source = SecretSource::new(Origin::File(path.clone()));
        assert!(source.current().unwrap_err().contains("cannot read file"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(source.current().unwrap_err().contains("is empty"));
    }
}
