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
    match scrub(text.as_bytes()) {
        std::borrow::Cow::Borrowed(_) => std::borrow::Cow::Borrowed(text),
        // Whole UTF-8 sequences replaced by ASCII: still UTF-8.
        std::borrow::Cow::Owned(clean) => std::borrow::Cow::Owned(
            String::from_utf8(clean).expect("a secret is replaced whole in valid text"),
        ),
    }
}

/// [`redact`] for bytes that may not be text (an upstream body).
pub fn redact_bytes(bytes: &bytes::Bytes) -> bytes::Bytes {
    match scrub(bytes) {
        std::borrow::Cow::Borrowed(_) => bytes.clone(),
        std::borrow::Cow::Owned(clean) => bytes::Bytes::from(clean),
    }
}

/// `bytes` with every live secret's bytes replaced by `<redacted>`, text or
/// not; borrowed when none occurs (the usual case: one scan per secret).
fn scrub(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let mut bytes = std::borrow::Cow::Borrowed(bytes);
    let mut dead = false;
    for secret in LIVE.read().iter() {
        let Some(secret) = secret.upgrade() else {
            dead = true;
            continue;
        };
        if secret.len() < MIN_REDACTED_LEN {
            continue;
        }
        let finder = memchr::memmem::Finder::new(secret.as_bytes());
        let mut rest = &bytes[..];
        let Some(first) = finder.find(rest) else {
            continue;
        };
        let mut clean = Vec::with_capacity(bytes.len());
        let mut at = first;
        loop {
            clean.extend_from_slice(&rest[..at]);
            clean.extend_from_slice(REDACTED.as_bytes());
            rest = &rest[at + secret.len()..];
            match finder.find(rest) {
                Some(next) => at = next,
                None => break,
            }
        }
        clean.extend_from_slice(rest);
        bytes = std::borrow::Cow::Owned(clean);
    }
    if dead {
        LIVE.write().retain(|s| s.strong_count() > 0);
    }
    bytes
}

/// A writer that scrubs secrets from what passes through it (log lines).
#[derive(Debug)]
pub struct Redacting<W>(pub W);

impl<W: std::io::Write> std::io::Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&scrub(buf))?;
        Ok(buf.len())
    }

    /// Every buffer, scrubbed, in one go (one system call for a log batch).
    /// Each buffer holds whole lines, so no secret spans two.
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let clean: Vec<_> = bufs.iter().map(|buf| scrub(buf)).collect();
        let mut slices: Vec<_> = clean.iter().map(|c| std::io::IoSlice::new(c)).collect();
        crate::logging::write_all_vectored(&mut self.0, &mut slices)?;
        Ok(bufs.iter().map(|buf| buf.len()).sum())
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
    fn bytes_that_are_not_text_are_scrubbed_and_otherwise_kept() {
        let _secret = Secret::new("sk-91c4be07".into());
        // At both ends, twice in a row, beside bytes that are not UTF-8.
        let body = bytes::Bytes::from_static(b"sk-91c4be07\xff\xfesk-91c4be07sk-91c4be07\n\xc3");
        assert_eq!(
            redact_bytes(&body),
            &b"<redacted>\xff\xfe<redacted><redacted>\n\xc3"[..]
        );
        // The log writer scrubs what passes through it the same way.
        let mut out = Redacting(Vec::new());
        std::io::Write::write_all(&mut out, b"a=sk-91c4be07 b=\xff\n").unwrap();
        assert_eq!(out.0, b"a=<redacted> b=\xff\n");
        // A batch of buffers at once, each scrubbed.
        let bufs = [b"x sk-91c4be07\n".as_slice(), b"plain\n", b"sk-91c4be07\n"];
        let slices: Vec<_> = bufs.iter().map(|b| std::io::IoSlice::new(b)).collect();
        let written = std::io::Write::write_vectored(&mut out, &slices).unwrap();
        assert_eq!(written, bufs.iter().map(|b| b.len()).sum::<usize>());
        assert!(out.0.ends_with(b"x <redacted>\nplain\n<redacted>\n"));
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
