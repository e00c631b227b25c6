//! Configuration, read in two steps: the TOML file as written (`Raw*` serde
//! structs, unknown keys refused) and the checked [`Config`] the gateway uses.
//! Every error names the key and, where it can, the line.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use toml::Spanned;

use sha2::{Digest, Sha256};

use crate::consumers::{Consumer, Consumers};
use crate::credentials::iam::IamPassword;
use crate::credentials::{AkSk, Credential, Method, Origin, SecretSource};
use crate::policy::{CachePolicy, TerminalSets};
use crate::route::{self, Api};
use crate::server::Limits;
use crate::upstream::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
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
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub server: ServerConfig,
    /// The admin listener (metrics, health); None when `[admin] listen = ""`.
    pub admin: Option<SocketAddr>,
    pub upstream: UpstreamConfig,
    pub consumers: Consumers,
    pub cache: CachePolicy,
    /// By project ID.
    pub projects: HashMap<String, Project>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub limits: Limits,
    /// How long open connections get to finish after SIGTERM or SIGINT.
    pub drain_timeout: Duration,
    /// Certificate and key files for TLS on the proxy listener.
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub max_body: usize,
}

/// A served project: the region's base URLs and the credential to use there.
#[derive(Debug)]
pub struct Project {
    pub id: String,
    /// `scheme://authority`, no trailing slash.
    pub drs: String,
    pub roma: String,
    pub credential: Arc<Credential>,
}

impl Project {
    pub fn base(&self, api: Api) -> &str {
        match api {
            Api::Drs => &self.drs,
            Api::Roma => &self.roma,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    consumers: BTreeMap<String, Spanned<RawConsumer>>,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    regions: BTreeMap<String, RawRegion>,
    #[serde(default)]
    credentials: BTreeMap<String, Spanned<RawCredential>>,
    #[serde(default)]
    projects: Vec<RawProject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    max_connections: usize,
    #[serde(with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    max_header_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    drain_timeout: Duration,
    consumer_key_header: String,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
}

impl Default for RawServer {
    fn default() -> Self {
        let limits = Limits::default();
        RawServer {
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
struct RawConsumer {
    key_sha256: Option<String>,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
    projects: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    max_body: ByteSize,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle_per_host: 64,
            max_body: ByteSize::mib(1),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    #[serde(with = "humantime_serde")]
    running_ttl: Duration,
    #[serde(with = "humantime_serde")]
    not_found_ttl: Duration,
    #[serde(with = "humantime_serde")]
    stale_while_revalidate: Duration,
    #[serde(with = "humantime_serde")]
    stale_if_error: Duration,
    #[serde(with = "humantime_serde")]
    wait_timeout: Duration,
    #[serde(with = "humantime_serde")]
    retry_after_default: Duration,
    #[serde(with = "humantime_serde")]
    retry_after_max: Duration,
    #[serde(with = "humantime_serde")]
    terminal_idle: Option<Duration>,
    max_bytes: ByteSize,
    drs_terminal: Vec<String>,
    roma_terminal: Vec<String>,
}

impl Default for RawCache {
    fn default() -> Self {
        let p = CachePolicy::default();
        RawCache {
            running_ttl: p.running_ttl,
            not_found_ttl: p.not_found_ttl,
            stale_while_revalidate: p.stale_while_revalidate,
            stale_if_error: p.stale_if_error,
            wait_timeout: p.wait_timeout,
            retry_after_default: p.retry_after_default,
            retry_after_max: p.retry_after_max,
            terminal_idle: p.terminal_idle,
            max_bytes: ByteSize::b(p.max_bytes),
            drs_terminal: p.terminal.drs,
            roma_terminal: p.terminal.roma,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    drs: Spanned<String>,
    roma: Spanned<String>,
}

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
    },
}

fn default_refresh_margin() -> Duration {
    Duration::from_secs(3600)
}

fn default_retry_backoff() -> Duration {
    Duration::from_secs(1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    id: Spanned<String>,
    region: Spanned<String>,
    credential: Spanned<String>,
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
        let invalid = |key: String, span: std::ops::Range<usize>, message: String| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            ConfigError::Invalid { key, line, message }
        };

        let u = &raw.upstream;
        let upstream = UpstreamConfig {
            connect_timeout: u.connect_timeout,
            request_timeout: u.request_timeout,
            pool_idle_timeout: u.pool_idle_timeout,
            pool_max_idle_per_host: u.pool_max_idle_per_host,
            max_body: usize::try_from(u.max_body.as_u64()).unwrap_or(usize::MAX),
        };
        let mut credentials = HashMap::new();
        for (name, raw_credential) in &raw.credentials {
            let fail = |message: String| {
                invalid(
                    format!("credentials.{name}"),
                    raw_credential.span(),
                    message,
                )
            };
            let source = |what: &str, env: &Option<String>, file: &Option<PathBuf>| {
                one_origin(env, file)
                    .map(SecretSource::new)
                    .map_err(|m| fail(format!("{m} ({what}_env or {what}_file)")))
            };
            let method = match raw_credential.get_ref() {
                RawCredential::Token {
                    token_env,
                    token_file,
                } => Method::Token(source("token", token_env, token_file)?),
                RawCredential::Aksk {
                    ak_env,
                    ak_file,
                    sk_env,
                    sk_file,
                    security_token_env,
                    security_token_file,
                    credentials_file,
                } => {
                    let keys_named = [
                        ak_env.is_some(),
                        ak_file.is_some(),
                        sk_env.is_some(),
                        sk_file.is_some(),
                    ]
                    .into_iter()
                    .any(|named| named);
                    match credentials_file {
                        Some(_) if keys_named || security_token_env.is_some() || security_token_file.is_some() => {
                            return Err(fail("credentials_file replaces ak_*, sk_* and security_token_*; keep one way".into()))
                        }
                        Some(path) => Method::AkSk(AkSk::File(SecretSource::new(Origin::File(path.clone())))),
                        None => Method::AkSk(AkSk::Keys {
                            ak: source("ak", ak_env, ak_file)?,
                            sk: source("sk", sk_env, sk_file)?,
                            security_token: match (security_token_env, security_token_file) {
                                (None, None) => None,
                                (env, file) => Some(source("security_token", env, file)?),
                            },
                        }),
                    }
                }
                RawCredential::IamPassword {
                    iam_url,
                    user,
                    domain,
                    password_env,
                    password_file,
                    refresh_margin,
                    retry_backoff,
                } => Method::IamPassword(Box::new(IamPassword::new(
                    base_url(iam_url).map_err(|m| fail(format!("iam_url: {m}")))?,
                    user.clone(),
                    domain.clone(),
                    source("password", password_env, password_file)?,
                    *refresh_margin,
                    (*retry_backoff).max(Duration::from_millis(10)),
                    Upstream::new(&upstream),
                ))),
            };
            credentials.insert(name.clone(), Arc::new(Credential::new(name, method)));
        }

        let mut regions = HashMap::new();
        for (name, region) in &raw.regions {
            let drs = base_url(region.drs.get_ref())
                .map_err(|m| invalid(format!("regions.{name}.drs"), region.drs.span(), m))?;
            let roma = base_url(region.roma.get_ref())
                .map_err(|m| invalid(format!("regions.{name}.roma"), region.roma.span(), m))?;
            regions.insert(name.clone(), (drs, roma));
        }

        let mut projects = HashMap::new();
        for (i, project) in raw.projects.iter().enumerate() {
            let at = |field: &str| format!("projects[{i}].{field}");
            let id = project.id.get_ref();
            if id.is_empty()
                || id.len() > route::MAX_SEGMENT_LEN
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    at("id"),
                    project.id.span(),
                    "a project ID is 1 to 64 characters of [A-Za-z0-9_-]".into(),
                ));
            }
            let (drs, roma) = regions.get(project.region.get_ref()).ok_or_else(|| {
                invalid(
                    at("region"),
                    project.region.span(),
                    format!("no [regions.{}] is defined", project.region.get_ref()),
                )
            })?;
            let credential = credentials
                .get(project.credential.get_ref())
                .ok_or_else(|| {
                    invalid(
                        at("credential"),
                        project.credential.span(),
                        format!(
                            "no [credentials.{}] is defined",
                            project.credential.get_ref()
                        ),
                    )
                })?;
            let served = Project {
                id: id.clone(),
                drs: drs.clone(),
                roma: roma.clone(),
                credential: credential.clone(),
            };
            if projects.insert(id.clone(), served).is_some() {
                return Err(invalid(
                    at("id"),
                    project.id.span(),
                    format!("project {id} is listed twice"),
                ));
            }
        }

        let mut consumers = Vec::new();
        for (name, raw_consumer) in &raw.consumers {
            let fail = |message: String| {
                invalid(format!("consumers.{name}"), raw_consumer.span(), message)
            };
            let c = raw_consumer.get_ref();
            let digest = match (&c.key_sha256, &c.key_env, &c.key_file) {
                (Some(hex_digest), None, None) => {
                    let bytes = hex::decode(hex_digest.trim())
                        .ok()
                        .filter(|b| b.len() == 32);
                    bytes.ok_or_else(|| {
                        fail("key_sha256 must be 64 hex digits (sha256sum of the key)".into())
                    })?
                }
                (None, env, file) if env.is_some() != file.is_some() => {
                    let key = SecretSource::new(one_origin(env, file).map_err(|m| fail(m.into()))?)
                        .current()
                        .map_err(fail)?;
                    Sha256::digest(key.expose().as_bytes()).to_vec()
                }
                _ => {
                    return Err(fail(
                        "name exactly one of key_sha256, key_env or key_file".into(),
                    ))
                }
            };
            if let Some(unknown) = c
                .projects
                .iter()
                .flatten()
                .find(|p| !projects.contains_key(*p))
            {
                return Err(fail(format!(
                    "projects lists {unknown}, which is not a served project"
                )));
            }
            consumers.push(Consumer::new(
                name,
                digest.try_into().expect("32 bytes"),
                c.projects.clone(),
            ));
        }
        let header = http::HeaderName::from_bytes(raw.server.consumer_key_header.as_bytes())
            .map_err(|_| ConfigError::Invalid {
                key: "server.consumer_key_header".into(),
                line: key_line(text, "consumer_key_header"),
                message: "not a valid header name".into(),
            })?;
        let admin = match raw.admin.listen.as_str() {
            "" => None,
            addr => Some(addr.parse().map_err(|_| ConfigError::Invalid {
                key: "admin.listen".into(),
                line: key_line(text, "listen = \"").max(1),
                message: format!("{addr:?} is not an address such as 127.0.0.1:9091"),
            })?),
        };
        let s = raw.server;
        let tls = match (s.tls_cert_file, s.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "server.tls_cert_file".into(),
                    line: key_line(text, "tls_"),
                    message: "tls_cert_file and tls_key_file go together".into(),
                })
            }
        };

        let c = raw.cache;
        let whole = |key: &str, message: &str| ConfigError::Invalid {
            key: key.into(),
            line: key_line(text, key),
            message: message.into(),
        };
        if c.wait_timeout.is_zero() {
            return Err(whole("wait_timeout", "must be more than zero"));
        }
        if raw.upstream.request_timeout.is_zero() {
            return Err(whole("request_timeout", "must be more than zero"));
        }
        Ok(Config {
            listen: raw.listen,
            server: ServerConfig {
                limits: Limits {
                    max_connections: s.max_connections.max(1),
                    header_read_timeout: s.header_read_timeout,
                    idle_timeout: s.idle_timeout,
                    max_header_bytes: usize::try_from(s.max_header_bytes.as_u64())
                        .unwrap_or(usize::MAX),
                },
                drain_timeout: s.drain_timeout,
                tls,
            },
            admin,
            consumers: Consumers::new(header, consumers),
            upstream,
            cache: CachePolicy {
                running_ttl: c.running_ttl,
                not_found_ttl: c.not_found_ttl,
                stale_while_revalidate: c.stale_while_revalidate,
                stale_if_error: c.stale_if_error,
                wait_timeout: c.wait_timeout,
                retry_after_default: c.retry_after_default,
                retry_after_max: c.retry_after_max,
                terminal_idle: c.terminal_idle,
                max_bytes: c.max_bytes.as_u64(),
                terminal: TerminalSets {
                    drs: c.drs_terminal,
                    roma: c.roma_terminal,
                },
            },
            projects,
        })
    }
}

/// The line where a bare `key =` first appears (for checks on whole tables).
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map_or(0, |i| i + 1)
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
        assert_eq!(config.cache.max_bytes, 64 * 1024 * 1024);
        let project = &config.projects["0123456789abcdef0123456789abcdef"];
        assert_eq!(project.drs, "https://drs.cn-north-4.myhuaweicloud.com");
        assert_eq!(project.roma, "http://127.0.0.1:9000");
        assert_eq!(project.credential.identity().as_ref(), "token:main");
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
        assert_eq!(
            Config::parse(&aksk).unwrap().projects[PROJECT]
                .credential
                .kind(),
            "aksk"
        );
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
        let config = Config::parse(&iam).unwrap();
        assert_eq!(
            config.projects[PROJECT].credential.identity().as_ref(),
            "iam:bot@acme"
        );
        assert!(error(&iam.replace("https://iam.example.com", "iam")).contains("iam_url"));
    }

    #[test]
    fn debug_output_never_holds_secrets() {
        std::env::set_var("PGW_TEST_DEBUG_SECRET", "s3cr3t-value-never-shown");
        let text = GOOD.replace("PGW_TOKEN", "PGW_TEST_DEBUG_SECRET");
        let config = Config::parse(&text).unwrap();
        let credential = &config.projects[PROJECT].credential;
        assert_eq!(credential.unready(PROJECT), None);
        let shown = format!("{config:?}");
        assert!(
            shown.contains("PGW_TEST_DEBUG_SECRET") && !shown.contains("s3cr3t"),
            "{shown}"
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
        assert!(e.contains("go together"), "{e}");
        let e = error(&format!("{GOOD}\n[admin]\nlisten = \"nowhere\"\n"));
        assert!(e.contains("admin.listen"), "{e}");
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
