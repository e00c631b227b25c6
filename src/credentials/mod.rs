//! Upstream credentials: what each configured credential is ([`CredentialSpec`],
//! plain data from the config), the running object that puts it on an upstream
//! request ([`Credential`]), and the [`Registry`] that keeps those objects, with
//! their IAM tokens and counters, across config reloads that leave them alone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::Full;
use parking_lot::Mutex;
use zeroize::Zeroizing;

use crate::metrics::{CredentialCounters, Metrics};
use crate::upstream::Upstream;

pub mod iam;
pub mod secret;
pub mod sign;

pub use iam::{IamError, IamSpec};
pub use secret::{redact, redact_bytes, Origin, Redacting, Secret, SecretSource};

/// A credential as the config describes it: where its secrets come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSpec {
    /// A static IAM token sent as `X-Auth-Token`.
    Token(Origin),
    /// AK/SK request signing (`SDK-HMAC-SHA256`).
    AkSk(AkSkSpec),
    /// Project-scoped IAM tokens obtained with a password and refreshed.
    IamPassword(IamSpec),
}

/// Where an AK/SK pair (and an optional security token) come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AkSkSpec {
    /// Permanent keys, each from its own source.
    Keys {
        ak: Origin,
        sk: Origin,
        security_token: Option<Origin>,
    },
    /// Temporary keys in one JSON file as IAM issues them
    /// (`{"credential": {"access", "secret", "securitytoken", "expires_at"}}`),
    /// re-read when it changes.
    File(PathBuf),
}

/// Why a credential cannot authenticate a request now. Never holds a secret;
/// displays without its cause, which is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{origin} is not set")]
    NotSet { origin: Origin },
    #[error("cannot read {origin}")]
    Read {
        origin: Origin,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is empty")]
    Empty { origin: Origin },
    #[error("the secret is not a valid HTTP header value")]
    NotHeaderValue,
    /// serde's message could quote the file, so only the expected shape is named.
    #[error(
        "the credentials file is not {{\"credential\": {{\"access\", \"secret\", ...}}}} JSON"
    )]
    CredentialsFile,
    #[error("expires_at {0:?} is not an RFC 3339 time")]
    BadExpiry(String),
    #[error("the temporary credentials expired at {0}")]
    Expired(String),
    #[error("the upstream URL has no host")]
    NoHost,
    #[error("a header to sign is not valid text")]
    Unsignable,
    #[error("no IAM token")]
    Iam(#[source] IamError),
    /// IAM failed recently and is not asked again until its backoff ends.
    #[error("no IAM token; IAM is retried after a pause")]
    IamBackoff(#[source] Arc<CredentialError>),
}

/// What authenticated one request, kept to report a 401 against.
#[derive(Debug)]
pub struct Used(Option<Secret>);

/// How a credential authenticates, with its secret sources open.
#[derive(Debug)]
enum Method {
    Token(SecretSource),
    AkSk(AkSk),
    IamPassword(Box<iam::IamPassword>),
}

#[derive(Debug)]
enum AkSk {
    Keys {
        ak: SecretSource,
        sk: SecretSource,
        security_token: Option<SecretSource>,
    },
    /// The file, and the keys parsed from its current version: kept while
    /// the file is unchanged, so they are parsed once and stay known to the
    /// redactor for as long as they are in use.
    File(SecretSource, Mutex<Option<(Secret, Keys)>>),
}

/// One AK/SK set as it will be used for a request.
#[derive(Debug, Clone)]
struct Keys {
    ak: Secret,
    sk: Secret,
    security_token: Option<Secret>,
    /// Temporary keys: when they expire, and as written.
    expires_at: Option<(SystemTime, String)>,
}

impl AkSk {
    fn unexpired(keys: &Keys) -> Result<(), CredentialError> {
        match &keys.expires_at {
            Some((at, written)) if *at <= SystemTime::now() => {
                Err(CredentialError::Expired(written.clone()))
            }
            _ => Ok(()),
        }
    }

    fn keys(&self) -> Result<Keys, CredentialError> {
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
                expires_at: None,
            }),
            AkSk::File(file, parsed_cache) => {
                let text = file.current()?;
                if let Some((version, keys)) = parsed_cache.lock().as_ref() {
                    if version.same(&text) {
                        Self::unexpired(keys)?;
                        return Ok(keys.clone());
                    }
                }
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
                let parsed: Temporary = serde_json::from_str::<Wrapped>(text.expose())
                    .map(|w| w.credential)
                    .or_else(|_| serde_json::from_str::<Temporary>(text.expose()))
                    .map_err(|_| CredentialError::CredentialsFile)?;
                let expires_at = match &parsed.expires_at {
                    Some(expires_at) => Some((
                        humantime::parse_rfc3339(expires_at)
                            .map_err(|_| CredentialError::BadExpiry(expires_at.clone()))?,
                        expires_at.clone(),
                    )),
                    None => None,
                };
                let keys = Keys {
                    ak: Secret::new(parsed.access),
                    sk: Secret::new(parsed.secret.to_string()),
                    security_token: parsed.securitytoken.map(|t| Secret::new(t.to_string())),
                    expires_at,
                };
                *parsed_cache.lock() = Some((text, keys.clone()));
                Self::unexpired(&keys)?;
                Ok(keys)
            }
        }
    }
}

/// One named credential from the config; several projects may share it.
#[derive(Debug)]
pub struct Credential {
    pub name: String,
    spec: CredentialSpec,
    /// The principal, for the cache key: stable across token refreshes.
    identity: Arc<str>,
    method: Method,
    counters: CredentialCounters,
}

impl Credential {
    pub fn new(name: &str, spec: CredentialSpec, counters: CredentialCounters) -> Self {
        // Tokens and keys rotate, so the configured name stands for their
        // principal; an IAM user is its own.
        let (identity, method) = match &spec {
            CredentialSpec::Token(origin) => (
                format!("token:{name}"),
                Method::Token(SecretSource::new(origin.clone())),
            ),
            CredentialSpec::AkSk(aksk) => (
                format!("aksk:{name}"),
                Method::AkSk(match aksk {
                    AkSkSpec::Keys {
                        ak,
                        sk,
                        security_token,
                    } => AkSk::Keys {
                        ak: SecretSource::new(ak.clone()),
                        sk: SecretSource::new(sk.clone()),
                        security_token: security_token.clone().map(SecretSource::new),
                    },
                    AkSkSpec::File(path) => AkSk::File(
                        SecretSource::new(Origin::File(path.clone())),
                        Mutex::default(),
                    ),
                }),
            ),
            CredentialSpec::IamPassword(iam) => (
                format!("iam:{}@{}", iam.user, iam.domain),
                Method::IamPassword(Box::new(iam::IamPassword::new(
                    iam.clone(),
                    counters.refreshes.clone(),
                ))),
            ),
        };
        Credential {
            name: name.to_string(),
            spec,
            identity: identity.into(),
            method,
            counters,
        }
    }

    pub fn spec(&self) -> &CredentialSpec {
        &self.spec
    }

    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    pub fn kind(&self) -> &'static str {
        kind(&self.spec)
    }

    /// Why the credential cannot be used for `project` now, if it cannot.
    pub fn unready(&self, project: &str) -> Option<CredentialError> {
        match &self.method {
            Method::Token(source) => source.current().and_then(|t| t.header_value()).err(),
            Method::AkSk(aksk) => aksk.keys().err(),
            Method::IamPassword(iam) => iam.unready(project),
        }
    }

    /// Obtains what the credential needs ahead of the first request (an IAM token).
    pub async fn prepare(&self, project: &str, client: &Upstream) -> Result<(), CredentialError> {
        match &self.method {
            Method::IamPassword(iam) => iam.token(project, client).await.map(drop),
            _ => self.unready(project).map_or(Ok(()), Err),
        }
    }

    /// Authenticates an upstream request for `project` whose other headers
    /// are final. A failure is counted as `pgw_credential_failures_total`.
    pub async fn authorize(
        &self,
        project: &str,
        request: &mut Request<Full<Bytes>>,
        client: &Upstream,
    ) -> Result<Used, CredentialError> {
        let result =
            match &self.method {
                Method::Token(source) => source
                    .current()
                    .and_then(|token| token.header_value())
                    .map(|value| {
                        request.headers_mut().insert("x-auth-token", value);
                        Used(None)
                    }),
                Method::IamPassword(iam) => match iam.token(project, client).await {
                    Ok(token) => token.header_value().map(|value| {
                        request.headers_mut().insert("x-auth-token", value);
                        Used(Some(token))
                    }),
                    Err(error) => Err(error),
                },
                Method::AkSk(aksk) => aksk
                    .keys()
                    .and_then(|keys| sign_request(request, &keys))
                    .map(|()| Used(None)),
            };
        if result.is_err() {
            self.counters.failures.inc();
        }
        result
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

/// `kind` as written in the config.
pub fn kind(spec: &CredentialSpec) -> &'static str {
    match spec {
        CredentialSpec::Token(_) => "token",
        CredentialSpec::AkSk(_) => "aksk",
        CredentialSpec::IamPassword(_) => "iam-password",
    }
}

/// The running credentials by name. A reload keeps every credential whose
/// name and specification did not change, so its IAM token (still valid while
/// IAM may be down) and its counters survive; changed ones are built anew.
#[derive(Debug)]
pub struct Registry {
    metrics: Arc<Metrics>,
    /// Only swapped on start and reload.
    current: Mutex<BTreeMap<String, Arc<Credential>>>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Registry {
            metrics,
            current: Mutex::default(),
        }
    }

    /// The credentials for `specs`, reusing those that are unchanged.
    pub fn update(
        &self,
        specs: &BTreeMap<String, CredentialSpec>,
    ) -> BTreeMap<String, Arc<Credential>> {
        let mut current = self.current.lock();
        let next: BTreeMap<_, _> = specs
            .iter()
            .map(|(name, spec)| {
                let credential = match current.get(name) {
                    Some(kept) if kept.spec() == spec => kept.clone(),
                    _ => Arc::new(Credential::new(
                        name,
                        spec.clone(),
                        self.metrics.credential(name, kind(spec)),
                    )),
                };
                (name.clone(), credential)
            })
            .collect();
        *current = next.clone();
        next
    }
}

/// Adds Host, X-Sdk-Date and X-Security-Token, then the signature over them.
fn sign_request(request: &mut Request<Full<Bytes>>, keys: &Keys) -> Result<(), CredentialError> {
    let host = request
        .uri()
        .authority()
        .ok_or(CredentialError::NoHost)?
        .as_str()
        .to_string();
    let headers = request.headers_mut();
    headers.insert(
        http::header::HOST,
        HeaderValue::from_str(&host).map_err(|_| CredentialError::NoHost)?,
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
    .ok_or(CredentialError::Unsignable)?;
    let mut value = HeaderValue::from_str(&value).map_err(|_| CredentialError::NotHeaderValue)?;
    value.set_sensitive(true);
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(var: &str) -> CredentialSpec {
        CredentialSpec::Token(Origin::Env(var.into()))
    }

    #[test]
    fn a_reload_keeps_unchanged_credentials_and_rebuilds_changed_ones() {
        let registry = Registry::new(Arc::new(Metrics::new()));
        let specs = BTreeMap::from([("a".to_string(), token("A")), ("b".to_string(), token("B"))]);
        let first = registry.update(&specs);
        let changed = BTreeMap::from([
            ("a".to_string(), token("A")),
            ("b".to_string(), token("B2")),
        ]);
        let second = registry.update(&changed);
        assert!(Arc::ptr_eq(&first["a"], &second["a"]), "unchanged: kept");
        assert!(!Arc::ptr_eq(&first["b"], &second["b"]), "changed: rebuilt");
        let gone = registry.update(&BTreeMap::new());
        assert!(gone.is_empty());
    }

    #[tokio::test]
    async fn a_failed_authorization_is_counted() {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(metrics.clone());
        let specs = BTreeMap::from([("main".to_string(), token("PGW_TEST_NEVER_SET_VAR"))]);
        let credential = registry.update(&specs)["main"].clone();
        let client = Upstream::new(&Default::default());
        let mut request = Request::new(Full::new(Bytes::new()));
        let error = credential
            .authorize("p", &mut request, &client)
            .await
            .unwrap_err();
        assert!(matches!(error, CredentialError::NotSet { .. }), "{error}");
        assert!(metrics
            .encode()
            .contains(r#"pgw_credential_failures_total{credential="main",kind="token"} 1"#));
    }
}
