//! The configuration file, checked into plain data. Reading it does no other
//! I/O: no secret is read and no client is built here (the `app` does that).
//!
//! Sections that stand alone deserialize straight into the types that use
//! them, whose serde defaults are the only defaults: [`CachePolicy`],
//! [`UpstreamConfig`], [`ServerConfig`]. Sections that refer to each other
//! (regions, credentials, consumers, projects) are read as written and then
//! resolved. Every error names the key and its line, found from toml's spans.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use toml::Spanned;

use crate::cache::CachePolicy;
use crate::cache::SharedConfig;
use crate::consumers::{ConsumerSpec, KeySpec};
use crate::credentials::{AkSkSpec, CredentialSpec, IamSpec, Origin};
use crate::route;
use crate::server::Limits;
use crate::upstream::UpstreamConfig;
use crate::watch::WatchConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message names the key; one line, for logs.
    #[error("line {line}, column {column}: {message}")]
    Parse {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("line {line}: `{key}`: {message}")]
    Invalid {
        key: String,
        line: usize,
        message: String,
    },
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub server: ServerConfig,
    /// The admin listener (metrics, health); None when `[admin] listen = ""`.
    pub admin: Option<SocketAddr>,
    pub upstream: UpstreamConfig,
    pub cache: CachePolicy,
    pub watch: WatchConfig,
    /// The fleet's shared tier (off unless `redis_url` is set).
    pub shared: SharedConfig,
    /// By name; every one is used by a project or not, as written.
    pub credentials: BTreeMap<String, CredentialSpec>,
    pub consumers: BTreeMap<String, ConsumerSpec>,
    /// By project ID.
    pub projects: BTreeMap<String, ProjectConfig>,
}

/// A served project: its region's base URLs and the credential to use there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectConfig {
    pub id: String,
    /// `scheme://authority`, no trailing slash.
    pub drs: String,
    pub roma: String,
    /// A key of [`Config::credentials`].
    pub credential: String,
}

/// `[server]`: the proxy listener's limits, drain, consumer header and TLS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub max_connections: usize,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_header_bytes: ByteSize,
    /// How long open connections get to finish after SIGTERM or SIGINT.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    pub consumer_key_header: String,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let limits = Limits::default();
        ServerConfig {
            max_connections: limits.max_connections,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            max_header_bytes: ByteSize::b(limits.max_header_bytes as u64),
            drain_timeout: Duration::from_secs(30),
            consumer_key_header: "X-Gateway-Key".into(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl ServerConfig {
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_header_bytes: usize::try_from(self.max_header_bytes.as_u64()).unwrap_or(usize::MAX),
        }
    }

    /// Certificate and key files, when TLS is on (checked to come in pairs).
    pub fn tls(&self) -> Option<(&Path, &Path)> {
        Some((
            self.tls_cert_file.as_deref()?,
            self.tls_key_file.as_deref()?,
        ))
    }

    pub fn consumer_key_header(&self) -> http::HeaderName {
        http::HeaderName::from_bytes(self.consumer_key_header.as_bytes())
            .expect("checked when the config was loaded")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstream: UpstreamConfig,
    #[serde(default)]
    cache: CachePolicy,
    #[serde(default)]
    watch: WatchConfig,
    #[serde(default)]
    shared: SharedConfig,
    #[serde(default)]
    regions: BTreeMap<String, RawRegion>,
    #[serde(default)]
    credentials: BTreeMap<String, Spanned<RawCredential>>,
    #[serde(default)]
    consumers: BTreeMap<String, Spanned<RawConsumer>>,
    #[serde(default)]
    projects: Vec<RawProject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:9091".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    drs: Spanned<String>,
    roma: Spanned<String>,
}

/// Credentials as written: each secret as an `_env` or `_file` pair of keys.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum RawCredential {
    Token {
        token_env: Option<String>,
        token_file: Option<PathBuf>,
    },
    Aksk {
        ak_env: Option<String>,
        ak_file: Option<PathBuf>,
        sk_env: Option<String>,
        sk_file: Option<PathBuf>,
        security_token_env: Option<String>,
        security_token_file: Option<PathBuf>,
        credentials_file: Option<PathBuf>,
    },
    IamPassword {
        iam_url: String,
        user: String,
        domain: String,
        password_env: Option<String>,
        password_file: Option<PathBuf>,
        #[serde(default = "default_refresh_margin", with = "humantime_serde")]
        refresh_margin: Duration,
        #[serde(default = "default_retry_backoff", with = "humantime_serde")]
        retry_backoff: Duration,
        #[serde(default = "default_min_refresh_interval", with = "humantime_serde")]
        min_refresh_interval: Duration,
    },
}

fn default_refresh_margin() -> Duration {
    Duration::from_secs(3600)
}

fn default_retry_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_min_refresh_interval() -> Duration {
    Duration::from_secs(30)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    key_sha256: Option<String>,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
    projects: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    id: Spanned<String>,
    region: Spanned<String>,
    credential: Spanned<String>,
}

/// Where each key of the plain sections is written, for checks made after
/// parsing; read only when such a check fails.
#[derive(Deserialize, Default)]
struct Positions {
    #[serde(default)]
    server: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    admin: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    upstream: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    cache: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    watch: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    shared: BTreeMap<String, Spanned<toml::Value>>,
}

/// Builds positioned errors over one file's text.
struct Text<'a>(&'a str);

impl Text<'_> {
    fn line(&self, offset: usize) -> usize {
        self.0[..offset.min(self.0.len())].matches('\n').count() + 1
    }

    fn invalid(&self, key: String, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key,
            line: self.line(span.start),
            message: message.into(),
        }
    }

    /// An error on `section.key` of a plain section, at the key's line.
    fn at(&self, section: &str, key: &str, message: impl Into<String>) -> ConfigError {
        let positions: Positions = toml::from_str(self.0).unwrap_or_default();
        let table = match section {
            "server" => &positions.server,
            "admin" => &positions.admin,
            "upstream" => &positions.upstream,
            "watch" => &positions.watch,
            "shared" => &positions.shared,
            _ => &positions.cache,
        };
        let span = table.get(key).map_or(0..0, Spanned::span);
        self.invalid(format!("{section}.{key}"), span, message)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start).min(text.len());
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            ConfigError::Parse {
                line: text[..at].matches('\n').count() + 1,
                column: text[line_start..at].chars().count() + 1,
                message: e.message().trim().to_string(),
            }
        })?;
        let text = Text(text);
        check_plain_sections(&text, &raw)?;
        let admin = match raw.admin.listen.as_str() {
            "" => None,
            addr => Some(addr.parse().map_err(|_| {
                text.at(
                    "admin",
                    "listen",
                    format!("{addr:?} is not an address such as 127.0.0.1:9091"),
                )
            })?),
        };

        let mut credentials = BTreeMap::new();
        for (name, spanned) in &raw.credentials {
            let spec = credential_spec(spanned.get_ref())
                .map_err(|m| text.invalid(format!("credentials.{name}"), spanned.span(), m))?;
            credentials.insert(name.clone(), spec);
        }

        let mut regions = BTreeMap::new();
        for (name, region) in &raw.regions {
            let url = |field: &str, value: &Spanned<String>| {
                base_url(value.get_ref())
                    .map_err(|m| text.invalid(format!("regions.{name}.{field}"), value.span(), m))
            };
            regions.insert(
                name.clone(),
                (url("drs", &region.drs)?, url("roma", &region.roma)?),
            );
        }

        let mut projects = BTreeMap::new();
        for (i, project) in raw.projects.iter().enumerate() {
            let at = |field: &str| format!("projects[{i}].{field}");
            let id = project.id.get_ref();
            if id.is_empty()
                || id.len() > route::MAX_SEGMENT_LEN
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(text.invalid(
                    at("id"),
                    project.id.span(),
                    "a project ID is 1 to 64 characters of [A-Za-z0-9_-]",
                ));
            }
            let region = project.region.get_ref();
            let (drs, roma) = regions.get(region).ok_or_else(|| {
                text.invalid(
                    at("region"),
                    project.region.span(),
                    format!("no [regions.{region}] is defined"),
                )
            })?;
            let credential = project.credential.get_ref();
            if !credentials.contains_key(credential) {
                return Err(text.invalid(
                    at("credential"),
                    project.credential.span(),
                    format!("no [credentials.{credential}] is defined"),
                ));
            }
            let served = ProjectConfig {
                id: id.clone(),
                drs: drs.clone(),
                roma: roma.clone(),
                credential: credential.clone(),
            };
            if projects.insert(id.clone(), served).is_some() {
                return Err(text.invalid(
                    at("id"),
                    project.id.span(),
                    format!("project {id} is listed twice"),
                ));
            }
        }

        if projects.is_empty() {
            return Err(ConfigError::Invalid {
                key: "projects".into(),
                line: 1,
                message: "no [[projects]]: the gateway would serve nothing".into(),
            });
        }

        let mut consumers = BTreeMap::new();
        for (name, spanned) in &raw.consumers {
            let fail = |m: String| text.invalid(format!("consumers.{name}"), spanned.span(), m);
            let spec = consumer_spec(spanned.get_ref()).map_err(|m| fail(m.into()))?;
            if let Some(unknown) = spec
                .projects
                .iter()
                .flatten()
                .find(|p| !projects.contains_key(*p))
            {
                return Err(fail(format!(
                    "projects lists {unknown}, which is not a served project"
                )));
            }
            consumers.insert(name.clone(), spec);
        }

        Ok(Config {
            listen: raw.listen,
            server: raw.server,
            admin,
            upstream: raw.upstream,
            cache: raw.cache,
            watch: raw.watch,
            shared: raw.shared,
            credentials,
            consumers,
            projects,
        })
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Checks on `[server]`, `[upstream]` and `[cache]` that serde cannot express:
/// every duration within a sane range, so that no value from the file can
/// overflow the arithmetic done with it or make the gateway wait for ever.
fn check_plain_sections(text: &Text, raw: &RawConfig) -> Result<(), ConfigError> {
    let (c, u, s, w) = (&raw.cache, &raw.upstream, &raw.server, &raw.watch);
    let sh = &raw.shared;
    let zero = Duration::ZERO;
    let one_ms = Duration::from_millis(1);
    let ranges = [
        ("cache", "running_ttl", c.running_ttl, zero, 7 * DAY),
        ("cache", "refresh_ahead", c.refresh_ahead, zero, HOUR),
        ("cache", "not_found_ttl", c.not_found_ttl, zero, 7 * DAY),
        (
            "cache",
            "stale_while_revalidate",
            c.stale_while_revalidate,
            zero,
            7 * DAY,
        ),
        ("cache", "stale_if_error", c.stale_if_error, zero, 7 * DAY),
        ("cache", "wait_timeout", c.wait_timeout, one_ms, 10 * MINUTE),
        ("cache", "error_ttl", c.error_ttl, zero, HOUR),
        (
            "cache",
            "failure_backoff_max",
            c.failure_backoff_max,
            zero,
            DAY,
        ),
        ("cache", "retry_after_min", c.retry_after_min, zero, DAY),
        (
            "cache",
            "retry_after_default",
            c.retry_after_default,
            zero,
            DAY,
        ),
        ("cache", "retry_after_max", c.retry_after_max, zero, DAY),
        (
            "cache",
            "terminal_idle",
            c.terminal_idle.unwrap_or(zero),
            zero,
            365 * DAY,
        ),
        (
            "upstream",
            "connect_timeout",
            u.connect_timeout,
            one_ms,
            10 * MINUTE,
        ),
        (
            "upstream",
            "request_timeout",
            u.request_timeout,
            one_ms,
            10 * MINUTE,
        ),
        (
            "upstream",
            "pool_idle_timeout",
            u.pool_idle_timeout,
            zero,
            DAY,
        ),
        (
            "server",
            "header_read_timeout",
            s.header_read_timeout,
            one_ms,
            HOUR,
        ),
        ("server", "idle_timeout", s.idle_timeout, one_ms, DAY),
        ("server", "drain_timeout", s.drain_timeout, zero, HOUR),
        ("watch", "max_wait", w.max_wait, zero, HOUR),
        ("watch", "max_stream", w.max_stream, SECOND, DAY),
        ("watch", "keepalive", w.keepalive, 10 * one_ms, HOUR),
        ("watch", "retry", w.retry, zero, HOUR),
        (
            "shared",
            "call_timeout",
            sh.call_timeout,
            one_ms,
            10 * SECOND,
        ),
        (
            "shared",
            "lock_ttl",
            sh.lock_ttl.unwrap_or(SECOND),
            SECOND,
            HOUR,
        ),
        ("shared", "recheck", sh.recheck, one_ms, MINUTE),
        (
            "shared",
            "breaker_cooldown",
            sh.breaker_cooldown,
            zero,
            HOUR,
        ),
        ("shared", "terminal_ttl", sh.terminal_ttl, SECOND, 365 * DAY),
    ];
    for (section, key, value, min, max) in ranges {
        if value < min || value > max {
            let (min, max) = (
                humantime::format_duration(min),
                humantime::format_duration(max),
            );
            return Err(text.at(section, key, format!("must be from {min} to {max}")));
        }
    }
    if sh.enabled() {
        sh.check_url()
            .map_err(|message| text.at("shared", "redis_url", message))?;
    }
    if sh.password_env.is_some() && sh.password_file.is_some() {
        return Err(text.at(
            "shared",
            "password_file",
            "set password_env or password_file, not both",
        ));
    }
    if sh.key_prefix.len() > 64 || sh.key_prefix.contains(char::is_whitespace) {
        return Err(text.at(
            "shared",
            "key_prefix",
            "must be at most 64 bytes, without spaces",
        ));
    }
    if c.retry_after_min > c.retry_after_max {
        return Err(text.at(
            "cache",
            "retry_after_min",
            "must not exceed retry_after_max",
        ));
    }
    for (key, rate) in [
        ("upstream_rate", c.upstream_rate),
        ("consumer_fetch_rate", c.consumer_fetch_rate),
    ] {
        if rate.is_some_and(|r| !(0.001..=1_000_000.0).contains(&r)) {
            return Err(text.at("cache", key, "must be from 0.001 to 1000000 per second"));
        }
    }
    let sizes = [
        (
            "server",
            "max_header_bytes",
            s.max_header_bytes.as_u64(),
            1024,
            1024 * 1024,
        ),
        (
            "cache",
            "max_bytes",
            c.max_bytes.as_u64(),
            16 * 1024,
            1 << 40,
        ),
    ];
    for (section, key, value, min, max) in sizes {
        if !(min..=max).contains(&value) {
            let iec = |bytes| bytesize::ByteSize::b(bytes).to_string_as(true);
            let (min, max) = (iec(min), iec(max));
            return Err(text.at(section, key, format!("must be from {min} to {max}")));
        }
    }
    if s.max_connections > 1_000_000 {
        return Err(text.at("server", "max_connections", "must be at most 1000000"));
    }
    // A stored answer keeps its body length in 32 bits; 64 MiB is plenty.
    if !(1..=64 * 1024 * 1024).contains(&u.max_body.as_u64()) {
        return Err(text.at("upstream", "max_body", "must be from 1 B to 64 MiB"));
    }
    if c.consumer_fetch_burst == 0 {
        return Err(text.at("cache", "consumer_fetch_burst", "must be at least 1"));
    }
    if s.max_connections == 0 {
        return Err(text.at("server", "max_connections", "must be at least 1"));
    }
    if http::HeaderName::from_bytes(s.consumer_key_header.as_bytes()).is_err() {
        return Err(text.at("server", "consumer_key_header", "not a valid header name"));
    }
    match (&s.tls_cert_file, &s.tls_key_file) {
        (Some(_), None) => Err(text.at(
            "server",
            "tls_cert_file",
            "tls_cert_file and tls_key_file go together",
        )),
        (None, Some(_)) => Err(text.at(
            "server",
            "tls_key_file",
            "tls_cert_file and tls_key_file go together",
        )),
        _ => Ok(()),
    }
}

fn credential_spec(raw: &RawCredential) -> Result<CredentialSpec, String> {
    let source = |what: &str, env: &Option<String>, file: &Option<PathBuf>| {
        one_origin(env, file).map_err(|m| format!("{m} ({what}_env or {what}_file)"))
    };
    Ok(match raw {
        RawCredential::Token {
            token_env,
            token_file,
        } => CredentialSpec::Token(source("token", token_env, token_file)?),
        RawCredential::Aksk {
            ak_env,
            ak_file,
            sk_env,
            sk_file,
            security_token_env,
            security_token_file,
            credentials_file,
        } => {
            let others_named = [
                ak_env.is_some(),
                ak_file.is_some(),
                sk_env.is_some(),
                sk_file.is_some(),
                security_token_env.is_some(),
                security_token_file.is_some(),
            ]
            .contains(&true);
            CredentialSpec::AkSk(match credentials_file {
                Some(_) if others_named => {
                    return Err(
                        "credentials_file replaces ak_*, sk_* and security_token_*; keep one way"
                            .into(),
                    )
                }
                Some(path) => AkSkSpec::File(path.clone()),
                None => AkSkSpec::Keys {
                    ak: source("ak", ak_env, ak_file)?,
                    sk: source("sk", sk_env, sk_file)?,
                    security_token: match (security_token_env, security_token_file) {
                        (None, None) => None,
                        (env, file) => Some(source("security_token", env, file)?),
                    },
                },
            })
        }
        RawCredential::IamPassword {
            iam_url,
            user,
            domain,
            password_env,
            password_file,
            refresh_margin,
            retry_backoff,
            min_refresh_interval,
        } => CredentialSpec::IamPassword(IamSpec {
            url: base_url(iam_url).map_err(|m| format!("iam_url: {m}"))?,
            user: user.clone(),
            domain: domain.clone(),
            password: source("password", password_env, password_file)?,
            refresh_margin: *refresh_margin,
            retry_backoff: (*retry_backoff).max(Duration::from_millis(10)),
            min_refresh_interval: *min_refresh_interval,
        }),
    })
}

fn consumer_spec(raw: &RawConsumer) -> Result<ConsumerSpec, &'static str> {
    let key = match (&raw.key_sha256, &raw.key_env, &raw.key_file) {
        (Some(hex_digest), None, None) => hex::decode(hex_digest.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(KeySpec::Sha256)
            .ok_or("key_sha256 must be 64 hex digits (sha256sum of the key)")?,
        (None, env, file) if env.is_some() != file.is_some() => {
            KeySpec::Secret(one_origin(env, file)?)
        }
        _ => return Err("name exactly one of key_sha256, key_env or key_file"),
    };
    Ok(ConsumerSpec {
        key,
        projects: raw.projects.clone(),
    })
}

/// Exactly one of an environment variable or a file.
fn one_origin(env: &Option<String>, file: &Option<PathBuf>) -> Result<Origin, &'static str> {
    match (env, file) {
        (Some(var), None) => Ok(Origin::Env(var.clone())),
        (None, Some(path)) => Ok(Origin::File(path.clone())),
        (None, None) => Err("names no secret source"),
        (Some(_), Some(_)) => Err("names two secret sources; keep one"),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An upstream base URL: http(s), a host, no path, query or credentials.
fn base_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => return Err("the scheme must be https (or http for local use)".into()),
    }
    let authority = uri.authority().ok_or("the URL has no host")?;
    if authority.as_str().contains('@') {
        return Err("credentials do not belong in the URL".into());
    }
    // Tokens and IAM passwords cross the network in clear over plain http.
    if uri.scheme_str() == Some("http") && !is_loopback(authority.host()) {
        return Err("plain http is for a loopback host only (the simulator); use https".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("the URL must be a base without path or query".into());
    }
    Ok(format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("https"),
        authority
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROJECT: &str = "0123456789abcdef0123456789abcdef";
    const GOOD: &str = r#"
listen = "127.0.0.1:0"

[cache]
running_ttl = "250ms"
max_bytes = "64MiB"

[regions.cn-north-4]
drs = "https://drs.cn-north-4.myhuaweicloud.com"
roma = "http://127.0.0.1:9000/"

[credentials.main]
kind = "token"
token_env = "PGW_TOKEN"

[[projects]]
id = "0123456789abcdef0123456789abcdef"
region = "cn-north-4"
credential = "main"
"#;

    #[test]
    fn a_good_config_is_checked_into_types() {
        let config = Config::parse(GOOD).unwrap();
        assert_eq!(config.cache.running_ttl, Duration::from_millis(250));
        assert_eq!(config.cache.max_bytes, ByteSize::mib(64));
        let project = &config.projects[PROJECT];
        assert_eq!(project.drs, "https://drs.cn-north-4.myhuaweicloud.com");
        assert_eq!(project.roma, "http://127.0.0.1:9000");
        assert_eq!(
            config.credentials[&project.credential],
            CredentialSpec::Token(Origin::Env("PGW_TOKEN".into()))
        );
    }

    #[test]
    fn defaults_come_from_the_checked_types() {
        let config = Config::parse(GOOD).unwrap();
        assert_eq!(config.upstream, UpstreamConfig::default());
        assert_eq!(config.server, ServerConfig::default());
        assert_eq!(config.server.limits(), Limits::default());
        assert_eq!(
            config.cache.wait_timeout,
            CachePolicy::default().wait_timeout
        );
        assert_eq!(config.admin, Some("127.0.0.1:9091".parse().unwrap()));
    }

    fn error(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let text = GOOD.replace("running_ttl", "runing_ttl");
        let e = error(&text);
        assert!(e.contains("runing_ttl") && e.contains("line 5"), "{e}");
    }

    #[test]
    fn bad_durations_and_sizes_are_named() {
        let e = error(&GOOD.replace("\"250ms\"", "\"fast\""));
        assert!(e.contains("line 5"), "{e}");
        let e = error(&GOOD.replace("\"64MiB\"", "\"lots\""));
        assert!(e.contains("line 6"), "{e}");
    }

    #[test]
    fn checks_after_parsing_name_the_line_of_their_key() {
        let text =
            format!("{GOOD}\n[upstream]\nconnect_timeout = \"1s\"\nrequest_timeout = \"0s\"\n");
        let e = error(&text);
        assert!(
            e.contains("upstream.request_timeout") && e.contains("line 23"),
            "{e}"
        );
        let text = GOOD.replace("max_bytes", "wait_timeout = \"0ms\"\nmax_bytes");
        let e = error(&text);
        assert!(
            e.contains("cache.wait_timeout") && e.contains("line 6"),
            "{e}"
        );
    }

    #[test]
    fn durations_and_rates_out_of_range_are_refused_with_their_line() {
        for (line, expect) in [
            (
                "retry_after_max = \"300000000000years\"",
                "cache.retry_after_max",
            ),
            ("not_found_ttl = \"30days\"", "cache.not_found_ttl"),
            ("upstream_rate = 0", "cache.upstream_rate"),
            ("consumer_fetch_rate = -1", "cache.consumer_fetch_rate"),
            (
                "retry_after_min = \"10m\"\nretry_after_max = \"1m\"",
                "cache.retry_after_min",
            ),
        ] {
            let text = GOOD.replace("max_bytes", &format!("{line}\nmax_bytes"));
            let e = error(&text);
            assert!(e.contains(expect) && e.contains("line 6"), "{line}: {e}");
        }
    }

    #[test]
    fn an_admin_address_error_names_its_own_line_not_the_top_level_listen() {
        let text = "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"nowhere\"\n";
        let e = error(text);
        assert!(e.contains("admin.listen") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn dangling_references_name_the_key_and_line() {
        let e = error(&GOOD.replace("region = \"cn-north-4\"", "region = \"eu-west-0\""));
        assert!(
            e.contains("projects[0].region") && e.contains("line 18") && e.contains("eu-west-0"),
            "{e}"
        );
        let e = error(&GOOD.replace("credential = \"main\"", "credential = \"other\""));
        assert!(e.contains("projects[0].credential"), "{e}");
    }

    #[test]
    fn base_urls_are_checked() {
        let e = error(&GOOD.replace("https://drs.cn-north-4.myhuaweicloud.com", "ftp://x"));
        assert!(
            e.contains("regions.cn-north-4.drs") && e.contains("line 9"),
            "{e}"
        );
        let e = error(&GOOD.replace("http://127.0.0.1:9000/", "http://127.0.0.1:9000/v2"));
        assert!(e.contains("regions.cn-north-4.roma"), "{e}");
    }

    #[test]
    fn plain_http_is_for_loopback_hosts_only() {
        let e = error(&GOOD.replace(
            "http://127.0.0.1:9000/",
            "http://roma.cn-north-4.myhuaweicloud.com",
        ));
        assert!(
            e.contains("regions.cn-north-4.roma") && e.contains("loopback"),
            "{e}"
        );
        for local in [
            "http://localhost:9000",
            "http://[::1]:9000",
            "http://127.0.0.2:9000",
        ] {
            Config::parse(&GOOD.replace("http://127.0.0.1:9000/", local)).unwrap();
        }
        let iam = GOOD.replace(
            "kind = \"token\"\ntoken_env = \"PGW_TOKEN\"",
            "kind = \"iam-password\"\niam_url = \"http://iam.example.com\"\nuser = \"u\"\ndomain = \"d\"\npassword_env = \"PW\"",
        );
        assert!(error(&iam).contains("loopback"));
    }

    #[test]
    fn a_config_without_projects_is_refused() {
        let text = GOOD.split("[[projects]]").next().unwrap();
        assert!(error(text).contains("no [[projects]]"));
    }

    #[test]
    fn a_credential_needs_exactly_one_source() {
        let e = error(&GOOD.replace("token_env = \"PGW_TOKEN\"", ""));
        assert!(
            e.contains("credentials.main") && e.contains("names no secret source"),
            "{e}"
        );
        let e = error(&GOOD.replace("token_env = \"PGW_TOKEN\"", "token = \"inline\""));
        assert!(e.contains("token"), "{e}");
    }

    #[test]
    fn aksk_and_iam_credentials_are_checked() {
        let aksk = GOOD.replace(
            "kind = \"token\"\ntoken_env = \"PGW_TOKEN\"",
            "kind = \"aksk\"\nak_env = \"AK\"\nsk_file = \"/run/sk\"",
        );
        assert!(matches!(
            Config::parse(&aksk).unwrap().credentials["main"],
            CredentialSpec::AkSk(AkSkSpec::Keys { .. })
        ));
        let both = aksk.replace(
            "sk_file = \"/run/sk\"",
            "sk_file = \"/run/sk\"\ncredentials_file = \"/run/c.json\"",
        );
        assert!(error(&both).contains("keep one way"));
        let no_sk = aksk.replace("sk_file = \"/run/sk\"", "");
        assert!(error(&no_sk).contains("(sk_env or sk_file)"));
        let iam = GOOD.replace(
            "kind = \"token\"\ntoken_env = \"PGW_TOKEN\"",
            "kind = \"iam-password\"\niam_url = \"https://iam.example.com\"\nuser = \"bot\"\ndomain = \"acme\"\npassword_env = \"PW\"\nrefresh_margin = \"10m\"",
        );
        let CredentialSpec::IamPassword(spec) = &Config::parse(&iam).unwrap().credentials["main"]
        else {
            panic!("an IAM credential")
        };
        assert_eq!(spec.refresh_margin, Duration::from_secs(600));
        assert!(error(&iam.replace("https://iam.example.com", "iam")).contains("iam_url"));
    }

    #[test]
    fn parsing_reads_no_secret() {
        // A consumer key from a file that does not exist: parsing only names it.
        let text = format!("{GOOD}\n[consumers.ci]\nkey_file = \"/nonexistent/pgw-key\"\n");
        let config = Config::parse(&text).unwrap();
        assert_eq!(
            config.consumers["ci"].key,
            KeySpec::Secret(Origin::File("/nonexistent/pgw-key".into()))
        );
    }

    #[test]
    fn consumers_and_server_settings_are_checked() {
        let digest = "a".repeat(64);
        let ok = format!(
            "{GOOD}\n[consumers.ci]\nkey_sha256 = \"{digest}\"\nprojects = [\"{PROJECT}\"]\n"
        );
        assert_eq!(Config::parse(&ok).unwrap().consumers.len(), 1);
        let e = error(&ok.replace(&format!("[\"{PROJECT}\"]"), "[\"other\"]"));
        assert!(e.contains("consumers.ci") && e.contains("other"), "{e}");
        let e = error(&ok.replace(&digest, "abc"));
        assert!(e.contains("64 hex digits"), "{e}");
        let e = error(&format!("{GOOD}\n[server]\ntls_cert_file = \"c.pem\"\n"));
        assert!(e.contains("go together") && e.contains("line 22"), "{e}");
        let e = error(&format!(
            "{GOOD}\n[server]\nconsumer_key_header = \"bad header\"\n"
        ));
        assert!(
            e.contains("server.consumer_key_header") && e.contains("line 22"),
            "{e}"
        );
        let e = error(&format!("{GOOD}\n[server]\nmax_connections = 0\n"));
        assert!(e.contains("server.max_connections"), "{e}");
        let off = Config::parse(&format!("{GOOD}\n[admin]\nlisten = \"\"\n")).unwrap();
        assert!(off.admin.is_none());
    }

    #[test]
    fn duplicate_projects_are_refused() {
        let twice = format!("{GOOD}\n[[projects]]\nid = \"0123456789abcdef0123456789abcdef\"\nregion = \"cn-north-4\"\ncredential = \"main\"\n");
        assert!(error(&twice).contains("listed twice"));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../config/gateway.toml");
        Config::parse(text).unwrap();
    }
}
