//! Secret values and where they are read from. Secrets are never in the config
//! file itself, only the name of an environment variable or a file; they live
//! in [`Secret`], which redacts `Debug` and zeroes its memory on drop.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::CredentialError;

/// A secret value. `Debug` never shows it; its memory is zeroed when dropped.
/// Every live one is known to [`redact`].
#[derive(Clone)]
pub struct Secret(Arc<Zeroizing<String>>);

impl Secret {
    pub fn new(value: String) -> Self {
        let secret = Arc::new(Zeroizing::new(value));
        LIVE.write().push(Arc::downgrade(&secret));
        Secret(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The very same value (not just equal): read from the same file version.
    pub fn same(&self, other: &Secret) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// As a header value flagged sensitive, so HTTP/2 never indexes it.
    pub fn header_value(&self) -> Result<HeaderValue, CredentialError> {
        let mut value =
            HeaderValue::from_str(self.expose()).map_err(|_| CredentialError::NotHeaderValue)?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Every secret value in use (tokens, SKs, security tokens, IAM passwords),
/// so that text leaving the process can be scrubbed of them even when
/// something upstream echoes one. Weak: a dropped secret is forgotten.
/// Process-wide, because secrets are born in many places and every exit
/// (client bodies, logs, `/readyz`, `/metrics`, panics) must see them all.
static LIVE: RwLock<Vec<Weak<Zeroizing<String>>>> = RwLock::new(Vec::new());

/// Shorter values are not scrubbed: they would match ordinary text.
const MIN_REDACTED_LEN: usize = 6;

const REDACTED: &str = "<redacted>";

/// `text` with every live secret value replaced by `<redacted>`.
pub fn redact(text: &str) -> std::borrow::Cow<'_, str> {
    let mut text = std::borrow::Cow::Borrowed(text);
    let mut dead = false;
    for secret in LIVE.read().iter() {
        let Some(secret) = secret.upgrade() else {
            dead = true;
            continue;
        };
        if secret.len() >= MIN_REDACTED_LEN && text.contains(secret.as_str()) {
            text = std::borrow::Cow::Owned(text.replace(secret.as_str(), REDACTED));
        }
    }
    if dead {
        LIVE.write().retain(|s| s.strong_count() > 0);
    }
    text
}

/// [`redact`] for bytes that may not be text (an upstream body).
pub fn redact_bytes(bytes: &bytes::Bytes) -> bytes::Bytes {
    match std::str::from_utf8(bytes) {
        Ok(text) => match redact(text) {
            std::borrow::Cow::Borrowed(_) => bytes.clone(),
            std::borrow::Cow::Owned(clean) => bytes::Bytes::from(clean),
        },
        // Not UTF-8: scrub the valid text around, never pass a secret on.
        Err(_) => match redact(&String::from_utf8_lossy(bytes)) {
            std::borrow::Cow::Borrowed(_) => bytes.clone(),
            std::borrow::Cow::Owned(clean) => bytes::Bytes::from(clean),
        },
    }
}

/// A writer that scrubs secrets from what passes through it (log lines).
#[derive(Debug)]
pub struct Redacting<W>(pub W);

impl<W: std::io::Write> std::io::Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(redact(text).as_bytes())?,
            Err(_) => self
                .0
                .write_all(&redact_bytes(&bytes::Bytes::copy_from_slice(buf)))?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
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
pub const FILE_RECHECK: Duration = Duration::from_secs(1);

/// A secret read from its origin; a file is re-read when it changes, so an
/// outside agent can rotate it without a restart.
#[derive(Debug)]
pub struct SecretSource {
    origin: Origin,
    /// Held for a stat or a small read, never across an await; parking_lot,
    /// so a panic elsewhere cannot poison it.
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

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The current secret, or why there is none (never the secret itself).
    pub fn current(&self) -> Result<Secret, CredentialError> {
        let mut cached = self.cached.lock();
        let now = Instant::now();
        if let Some(c) = cached.as_ref() {
            if c.stamp.is_none() || now.duration_since(c.checked_at) < FILE_RECHECK {
                return Ok(c.secret.clone());
            }
        }
        let stamp = match &self.origin {
            Origin::Env(_) => None,
            Origin::File(path) => {
                let meta = std::fs::metadata(path).map_err(|source| CredentialError::Read {
                    origin: self.origin.clone(),
                    source,
                })?;
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

    fn read(&self) -> Result<Secret, CredentialError> {
        let raw = match &self.origin {
            Origin::Env(var) => std::env::var(var).map_err(|_| CredentialError::NotSet {
                origin: self.origin.clone(),
            })?,
            Origin::File(path) => {
                std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
                    origin: self.origin.clone(),
                    source,
                })?
            }
        };
        let raw = Zeroizing::new(raw);
        let value = raw.trim();
        if value.is_empty() {
            return Err(CredentialError::Empty {
                origin: self.origin.clone(),
            });
        }
        Ok(Secret::new(value.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_secrets_are_scrubbed_and_dropped_ones_forgotten() {
        let secret = Secret::new("tok-3f9a2c77e1".into());
        let echoed = "upstream says: bad token tok-3f9a2c77e1 (tok-3f9a2c77e1)";
        assert_eq!(
            redact(echoed),
            "upstream says: bad token <redacted> (<redacted>)"
        );
        assert!(matches!(
            redact("nothing secret"),
            std::borrow::Cow::Borrowed(_)
        ));
        let body = bytes::Bytes::from_static(b"{\"msg\":\"tok-3f9a2c77e1\"}");
        assert_eq!(redact_bytes(&body), "{\"msg\":\"<redacted>\"}");
        drop(secret);
        assert_eq!(
            redact("tok-3f9a2c77e1"),
            "tok-3f9a2c77e1",
            "no longer in use"
        );
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("super-secret-token".into());
        assert!(!format!("{s:?}").contains("super-secret"));
        let source = SecretSource::new(Origin::Env("PGW_TEST_NEVER_SET_VAR".into()));
        let err = source.current().unwrap_err().to_string();
        assert!(err.contains("PGW_TEST_NEVER_SET_VAR is not set"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_token_file_is_picked_up_at_the_next_recheck() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let source = SecretSource::new(Origin::File(path.clone()));
        assert_eq!(source.current().unwrap().expose(), "first");
        // A different length changes the stamp even where mtime granularity is coarse.
        std::fs::write(&path, "second-token").unwrap();
        tokio::time::advance(FILE_RECHECK - Duration::from_millis(1)).await;
        assert_eq!(
            source.current().unwrap().expose(),
            "first",
            "rechecked at most once a second"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(source.current().unwrap().expose(), "second-token");
    }

    #[test]
    fn an_empty_or_missing_file_is_a_reason_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let source = SecretSource::new(Origin::File(path.clone()));
        let missing = source.current().unwrap_err();
        assert!(matches!(missing, CredentialError::Read { .. }), "{missing}");
        std::fs::write(&path, "  \n").unwrap();
        let empty = source.current().unwrap_err();
        assert!(matches!(empty, CredentialError::Empty { .. }), "{empty}");
    }
}
