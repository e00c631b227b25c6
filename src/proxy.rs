//! One client request's way through the gateway: request id, route, project,
//! cache (which fetches upstream with the project's credential), response.
//!
//! [`Gateway::answer`] logs and turns errors into Huawei-shaped answers around
//! `Gateway::serve`, which returns `Result` and uses `?` freely.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::budget::Buckets;
use crate::cache::{Answer, Cache, CacheKey, CachePolicy, CacheStatus, Class, Scope, StaleReason};
use crate::consumers::Consumers;
use crate::credentials::Credential;
use crate::error::GatewayError;
use crate::fetch::FetchRequest;
use crate::logging::Access;
use crate::metrics::Metrics;
use crate::route::{self, Api, Route};
use crate::server::ClientAddr;
use crate::watch::{self, EventStream, Mode, Subject, WatchConfig, Watcher};

mod head;

use head::Varying;

/// A whole answer, or a stream of server-sent events.
pub type Body = Either<Full<Bytes>, EventStream>;

/// A terminal answer will not change, but a day keeps clients from holding
/// it past a config change of the terminal sets. Answers are per credential
/// (and consumer), so no shared cache may keep them: `private`.
const TERMINAL_CACHE_CONTROL: &str = "private, max-age=86400, immutable";

const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_GATEWAY_REQUEST_ID: HeaderName = HeaderName::from_static("x-gateway-request-id");
const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");
/// Looked up on every request: a `&str` name would be parsed each time.
const X_LANGUAGE: HeaderName = HeaderName::from_static("x-language");

/// A served project as the request path needs it.
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

/// The projects served, by ID.
pub type Projects = HashMap<String, Project, foldhash::fast::RandomState>;

/// Who is served and how: swapped whole on a config reload.
#[derive(Debug)]
pub struct Tenants {
    /// By project ID, looked up on every request: foldhash, several times
    /// faster than SipHash on a 32-character ID, and seeded per process.
    pub projects: Projects,
    pub consumers: Consumers,
    /// What answers vary by: the language, and the consumer key when keys
    /// are configured (both are part of the cache key), and what asks to
    /// watch (`Prefer`, RFC 7240 §2, and `Accept` for event streams).
    vary: HeaderValue,
}

impl Tenants {
    pub fn new(projects: Projects, consumers: Consumers) -> Self {
        let vary = match consumers.header() {
            Some(key) => HeaderValue::from_str(&format!("X-Language, Prefer, Accept, {key}"))
                .expect("a header name is a valid header value"),
            None => HeaderValue::from_static("X-Language, Prefer, Accept"),
        };
        Tenants {
            projects,
            consumers,
            vary,
        }
    }

    /// Projects whose credential cannot be used now: (project, credential
    /// name, why), by project.
    pub fn unready(&self) -> Vec<(String, String, crate::credentials::CredentialError)> {
        let mut unready: Vec<_> = self
            .projects
            .values()
            .filter_map(|p| {
                let reason = p.credential.unready(&p.id)?;
                Some((p.id.clone(), p.credential.name.clone(), reason))
            })
            .collect();
        unready.sort_by(|a, b| a.0.cmp(&b.0));
        unready
    }
}

/// Failed consumer-key attempts allowed per client address: this many at
/// once, then this many per minute; beyond, 429 without checking the key.
const KEY_FAILURES_PER_MINUTE: f64 = 10.0;

/// The proxy's request handler: the tenants (swapped on reload), the cache
/// (kept across reloads) and the metrics.
pub struct Gateway {
    tenants: ArcSwap<Tenants>,
    /// Failed consumer-key attempts per client address, so that keys cannot
    /// be guessed at the speed the gateway answers.
    key_failures: Buckets<IpAddr>,
    /// Largest request head accepted (`server.max_header_bytes`).
    max_header_bytes: usize,
    cache: Cache,
    metrics: Arc<Metrics>,
    /// Set once the proxy listener is bound (for `/readyz`).
    listening: AtomicBool,
    /// `[watch]`, swapped on reload.
    watch: ArcSwap<WatchConfig>,
    /// Cancelled when the gateway stops: held long-polls answer at once and
    /// event streams end, so their clients go to another replica.
    stopping: CancellationToken,
}

/// A request's route, project, language and cache key, checked.
struct Prepared<'a> {
    route: Route<'a>,
    project: &'a Project,
    language: Option<String>,
    key: CacheKey,
}

/// What the access log line reports beyond the response status.
#[derive(Default)]
struct Trace<'a> {
    api: Option<Api>,
    project: Option<&'a str>,
    consumer: Option<&'a str>,
    cache: Option<CacheStatus>,
    stale: Option<StaleReason>,
    error: Option<&'static str>,
}

impl crate::server::Handler for Gateway {
    type Body = Body;

    fn handle(
        &self,
        request: Request<hyper::body::Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send {
        self.answer(request)
    }
}

impl Gateway {
    pub fn new(
        tenants: Tenants,
        cache: Cache,
        metrics: Arc<Metrics>,
        max_header_bytes: usize,
        watch: WatchConfig,
    ) -> Self {
        Gateway {
            tenants: ArcSwap::from_pointee(tenants),
            key_failures: Buckets::default(),
            max_header_bytes,
            cache,
            metrics,
            listening: AtomicBool::new(false),
            watch: ArcSwap::from_pointee(watch),
            stopping: CancellationToken::new(),
        }
    }

    pub fn set_watch(&self, watch: WatchConfig) {
        self.watch.store(Arc::new(watch));
    }

    /// Answers every held long-poll and ends every event stream.
    pub fn stop_watchers(&self) {
        self.stopping.cancel();
    }

    /// The current tenants; a reload does not change an `Arc` already taken.
    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants.load_full()
    }

    /// Replaces the tenants at once: requests in progress finish with the old ones.
    pub fn set_tenants(&self, tenants: Tenants) {
        self.tenants.store(Arc::new(tenants));
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// Answers one request; never fails (errors become Huawei-shaped answers).
    ///
    /// Most requests are plain cache hits, answered here without awaiting
    /// anything: a hit's future is then little more than its request. Only a
    /// request that must wait (for upstream, or as a watcher) builds the
    /// larger future of `serve`, boxed.
    pub fn answer<'a, B: Send + Sync + 'a>(
        &'a self,
        request: Request<B>,
    ) -> impl Future<Output = Response<Body>> + Send + 'a {
        // The one clock reading before the answer: a hit's freshness and Age
        // are judged at this instant too.
        let started = Instant::now();
        let request_id = request_id(request.headers());
        let at_once = self.at_once(&request, &request_id, started);
        async move {
            match at_once {
                Some(response) => response,
                None => Box::pin(self.wait_for_answer(request, request_id, started)).await,
            }
        }
    }

    /// The answer if it needs no waiting: a plain cache hit, or an error in
    /// the request itself. `None` when it must go upstream or be held.
    fn at_once<B>(
        &self,
        request: &Request<B>,
        request_id: &str,
        started: Instant,
    ) -> Option<Response<Body>> {
        let tenants = self.tenants.load();
        let mut trace = Trace::default();
        let response = match self.prepare(&tenants, request, &mut trace) {
            Err(error) => self.failed(error.into(), request_id, &mut trace),
            Ok(prepared) => {
                if self.mode(request) != Mode::Plain {
                    return None;
                }
                // One policy for the freshness and the head.
                let policy = self.cache.policy();
                let answer = self.cache.fresh(prepared.key, started, &policy)?;
                self.cache.asked(&answer);
                trace.cache = Some(answer.status);
                self.respond(
                    &answer,
                    request,
                    request_id,
                    &tenants.vary,
                    started,
                    &policy,
                )
                .map(Either::Left)
            }
        };
        self.finish(request, &trace, &response, started, request_id);
        Some(response)
    }

    /// The answer of a request that waits: [`Self::serve`], then the log line.
    async fn wait_for_answer<B: Sync>(
        &self,
        request: Request<B>,
        request_id: String,
        started: Instant,
    ) -> Response<Body> {
        let mut trace = Trace::default();
        let tenants = self.tenants.load();
        let response = match self
            .serve(&tenants, &request, &request_id, &mut trace)
            .await
        {
            Ok(response) => response,
            Err(error) => self.failed(error, &request_id, &mut trace),
        };
        self.finish(&request, &trace, &response, started, &request_id);
        response
    }

    /// The Huawei-shaped answer for `error`, noted in the trace.
    fn failed(
        &self,
        error: Arc<GatewayError>,
        request_id: &str,
        trace: &mut Trace,
    ) -> Response<Body> {
        trace.error = Some(error.code());
        if error.status().is_server_error() {
            tracing::warn!(request_id = %request_id, error = %error.message(), "gateway error");
        }
        error.to_response(request_id).map(Either::Left)
    }

    /// Counts the request and writes its access line.
    fn finish<B>(
        &self,
        request: &Request<B>,
        trace: &Trace,
        response: &Response<Body>,
        started: Instant,
        request_id: &str,
    ) {
        let route = trace.api.map_or("-", Api::as_str);
        let cache = trace.cache.map_or("-", CacheStatus::as_str);
        self.metrics
            .request(route, response.status().as_u16(), cache);
        let ended = Instant::now();
        Access {
            method: request.method(),
            route,
            project: trace.project.unwrap_or("-"),
            consumer: trace.consumer.unwrap_or("-"),
            status: response.status().as_u16(),
            cache,
            stale: trace.stale.map_or("-", StaleReason::as_str),
            error: trace.error.unwrap_or("-"),
            latency_us: ended.duration_since(started).as_micros() as u64,
            request_id,
        }
        .log(ended.into_std());
    }

    /// Whether the client asks to watch (long-poll, event stream) or not.
    fn mode<B>(&self, request: &Request<B>) -> Mode {
        match *request.method() {
            Method::GET => watch::mode(request.headers(), || self.watch.load().max_wait),
            _ => Mode::Plain,
        }
    }

    /// What the request asks for, checked: route, consumer, project,
    /// language, and the cache key they make.
    fn prepare<'a, B>(
        &self,
        tenants: &'a Tenants,
        request: &'a Request<B>,
        trace: &mut Trace<'a>,
    ) -> Result<Prepared<'a>, GatewayError> {
        let size = head_size(request);
        if size > self.max_header_bytes {
            let limit = self.max_header_bytes;
            return Err(GatewayError::HeadersTooLarge { size, limit });
        }
        let route = route::parse(request.method(), request.uri().path())?;
        trace.api = Some(route.api);
        trace.project = Some(route.project);
        trace.consumer = self.consumer(tenants, request, route.project)?;
        let project = tenants
            .projects
            .get(route.project)
            .ok_or_else(|| GatewayError::ProjectNotServed(route.project.to_string()))?;
        let language = language(request.headers())?;
        let key = CacheKey::new(&route, language.as_deref(), project.credential.identity());
        Ok(Prepared {
            route,
            project,
            language,
            key,
        })
    }

    async fn serve<'a, B>(
        &self,
        tenants: &'a Tenants,
        request: &'a Request<B>,
        request_id: &str,
        trace: &mut Trace<'a>,
    ) -> Result<Response<Body>, Arc<GatewayError>> {
        let Prepared {
            route,
            project,
            language,
            key,
        } = self.prepare(tenants, request, trace)?;
        // Fair use: by consumer key where keys are configured, else by address.
        let (named, address) = (trace.consumer, client_ip(request));
        let (consumer, consumer_label): (&(dyn std::fmt::Display + Sync), _) =
            match (&named, &address) {
                (Some(name), _) => (name, *name),
                (None, Some(ip)) => (ip, "by-address"),
                (None, None) => (&"-", "by-address"),
            };
        let scope = Scope {
            api: route.api,
            project: route.project,
            consumer,
            consumer_label,
        };
        // Built only when the cache starts a fetch: a hit builds nothing.
        let fetch = || fetch_request(&route, project, language.as_deref(), request_id);
        let answer = self.cache.get(key, scope, fetch).await?;
        self.cache.asked(&answer);
        trace.cache = Some(answer.status);
        trace.stale = answer.stale;
        let mode = self.mode(request);
        // Only a running job's answer can change; anything else is answered at once.
        let watchable = answer.stored.class == Class::Running && answer.stored.status.is_success();
        let plain = |answer: &Answer| {
            Ok(self
                .respond(
                    answer,
                    request,
                    request_id,
                    &tenants.vary,
                    Instant::now(),
                    &self.cache.policy(),
                )
                .map(Either::Left))
        };
        if mode == Mode::Plain {
            return plain(&answer);
        }
        let etag = answer.stored.etag();
        match mode {
            Mode::LongPoll(_) if !watchable || !etag_matches(request.headers(), &etag) => {
                return plain(&answer)
            }
            Mode::Stream
                if answer.stored.class != Class::Running
                    && answer.stored.class != Class::Terminal =>
            {
                return plain(&answer)
            }
            _ => {}
        }
        let subject = Subject {
            cache: self.cache.clone(),
            key,
            api: route.api,
            project: project.id.clone(),
            consumer: consumer.to_string(),
            consumer_label: consumer_label.to_string(),
            request: fetch(),
        };
        // Boxed: watchers are few, and every miss's future would otherwise be
        // sized for one.
        Box::pin(self.watch(
            subject,
            answer,
            mode,
            etag,
            request,
            request_id,
            &tenants.vary,
        ))
        .await
    }

    /// Holds a long poll until the answer changes, or starts an event stream.
    #[allow(clippy::too_many_arguments)]
    async fn watch<B>(
        &self,
        subject: Subject,
        answer: Answer,
        mode: Mode,
        etag: HeaderValue,
        request: &Request<B>,
        request_id: &str,
        vary: &HeaderValue,
    ) -> Result<Response<Body>, Arc<GatewayError>> {
        let plain = |answer: &Answer| {
            Ok(self
                .respond(
                    answer,
                    request,
                    request_id,
                    vary,
                    Instant::now(),
                    &self.cache.policy(),
                )
                .map(Either::Left))
        };
        let config = self.watch.load();
        let kind = match mode {
            Mode::Stream => "stream",
            _ => "long-poll",
        };
        let started = Watcher::start(
            subject,
            answer.clone(),
            kind,
            &config,
            self.stopping.clone(),
            self.metrics.clone(),
        );
        let mut watcher = match (mode, started) {
            (Mode::LongPoll(_), Err(_)) => return plain(&answer),
            (_, Err(refused)) => return Err(refused.into()),
            (_, Ok(watcher)) => watcher,
        };
        let Mode::LongPoll(wait) = mode else {
            let last_event_id = request
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok());
            let body = watch::event_stream(watcher, last_event_id, &config);
            return Ok(event_stream_response(body, request_id, vary));
        };
        let next = watcher
            .next(watch::hold_until(wait), |latest| {
                latest.stored.etag() != etag
            })
            .await;
        self.metrics.held(match next {
            watch::Next::Changed => "changed",
            watch::Next::Deadline => "timeout",
            watch::Next::Stopping => "shutdown",
        });
        let mut response = self.respond(
            &watcher.latest,
            request,
            request_id,
            vary,
            Instant::now(),
            &self.cache.policy(),
        );
        response
            .headers_mut()
            .insert(PREFERENCE_APPLIED, watch::preference_applied(wait));
        Ok(response.map(Either::Left))
    }

    /// The consumer whose key the request carries, with failed attempts
    /// limited per client address.
    fn consumer<'a, B>(
        &self,
        tenants: &'a Tenants,
        request: &Request<B>,
        project: &str,
    ) -> Result<Option<&'a str>, GatewayError> {
        if tenants.consumers.is_empty() {
            return Ok(None);
        }
        let (rate, burst) = (KEY_FAILURES_PER_MINUTE / 60.0, KEY_FAILURES_PER_MINUTE);
        let address = client_ip(request);
        if let Some(ip) = address {
            self.key_failures
                .peek(&ip, rate, burst, Instant::now())
                .map_err(|retry_after| GatewayError::KeyGuessing { retry_after })?;
        }
        let checked = tenants.consumers.check(request.headers(), project);
        if let (Err(GatewayError::ConsumerUnauthorized), Some(ip)) = (&checked, address) {
            let _ = self.key_failures.take(&ip, rate, burst, Instant::now());
        }
        checked
    }

    fn respond<B>(
        &self,
        answer: &Answer,
        request: &Request<B>,
        request_id: &str,
        vary: &HeaderValue,
        now: Instant,
        policy: &CachePolicy,
    ) -> Response<Full<Bytes>> {
        let stored = &answer.stored;
        let cacheable = stored.class != Class::Uncacheable;
        let age = now.saturating_duration_since(stored.stored_at);
        let fresh_for = policy.fresh_for(stored.class);
        // Conditional requests apply to 2xx answers only (RFC 9110 §13.1.2).
        let not_modified = cacheable
            && stored.status.is_success()
            && request.headers().contains_key(header::IF_NONE_MATCH)
            && etag_matches(request.headers(), &stored.etag());
        // Remaining freshness in whole seconds, rounded down: negative once stale.
        let ttl = fresh_for.map(|lifetime| {
            (lifetime.as_millis() as i64 - age.as_millis() as i64).div_euclid(1000)
        });
        let gateway_request_id = HeaderValue::from_str(request_id).ok();
        let has_gateway_id = gateway_request_id.is_some();
        let build = |varying: Varying| {
            let mut headers = HeaderMap::with_capacity(12);
            headers.insert(X_CACHE, HeaderValue::from_static(answer.status.as_str()));
            headers.insert(CACHE_STATUS, varying.cache_status);
            headers.insert(X_REQUEST_ID, varying.request_id);
            if has_gateway_id {
                headers.insert(X_GATEWAY_REQUEST_ID, varying.gateway_request_id);
            }
            if cacheable {
                // RFC 9111 §4.2: max-age is the freshness lifetime, Age the
                // age; a downstream cache subtracts one from the other.
                headers.insert(header::AGE, varying.age);
            }
            headers.insert(header::VARY, vary.clone());
            if cacheable {
                headers.insert(header::CACHE_CONTROL, cache_control(fresh_for));
                headers.insert(header::ETAG, stored.etag());
            } else {
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            }
            if let Some(retry_after) = stored.retry_after() {
                headers.insert(header::RETRY_AFTER, retry_after);
            }
            if !not_modified {
                if let Some(content_type) = stored.content_type() {
                    headers.insert(header::CONTENT_TYPE, content_type);
                }
                if request.method() == Method::HEAD {
                    let length = HeaderValue::from(stored.body().len());
                    headers.insert(header::CONTENT_LENGTH, length);
                }
            }
            headers
        };
        let placeholder = HeaderValue::from_static("-");
        let varying = Varying {
            cache_status: cache_status(answer, ttl),
            request_id: stored
                .request_id()
                .or_else(|| gateway_request_id.clone())
                .unwrap_or_else(|| placeholder.clone()),
            // Moved, not cloned: a clone of a fresh value allocates.
            gateway_request_id: gateway_request_id.unwrap_or(placeholder),
            age: head::age(age.as_secs()),
        };
        // The common case gets a copy of its answer's prepared head: then
        // the head begins with X-Cache and the varying values, in order.
        let plain_hit = answer.status == CacheStatus::Hit
            && cacheable
            && !not_modified
            && request.method() == Method::GET
            && has_gateway_id;
        let headers = if plain_hit {
            head::hit(stored, fresh_for, vary, varying, build)
        } else {
            build(varying)
        };
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.headers_mut() = headers;
        if not_modified {
            *response.status_mut() = StatusCode::NOT_MODIFIED;
        } else {
            *response.status_mut() = stored.status;
            if request.method() != Method::HEAD {
                *response.body_mut() = Full::new(stored.body());
            }
        }
        response
    }
}

/// The start of an event stream: the events follow as the body.
fn event_stream_response(
    body: EventStream,
    request_id: &str,
    vary: &HeaderValue,
) -> Response<Body> {
    let mut response = Response::new(Either::Right(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx in front would otherwise hold events back in its buffers.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(header::VARY, vary.clone());
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, id);
    }
    response
}

/// The size of a request head as sent in HTTP/1.1: request line and headers.
fn head_size<B>(request: &Request<B>) -> usize {
    // Measured from the parts, without formatting the URI on every request.
    let uri = request.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = request.method().as_str().len() + target + 11;
    request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
}

fn client_ip<B>(request: &Request<B>) -> Option<IpAddr> {
    request.extensions().get::<ClientAddr>().map(|a| a.0.ip())
}

/// What the fetch for `route` needs, owned, since it runs detached.
fn fetch_request(
    route: &Route,
    project: &Project,
    language: Option<&str>,
    request_id: &str,
) -> FetchRequest {
    FetchRequest {
        api: route.api,
        url: format!("{}{}", project.base(route.api), route.upstream_path()),
        project: project.id.clone(),
        job: match route.instance {
            Some(instance) => format!("{instance}/{}", route.job),
            None => route.job.to_string(),
        },
        credential: project.credential.clone(),
        language: language.map(str::to_string),
        request_id: request_id.to_string(),
    }
}

/// `Cache-Control` for a stored answer fresh for `fresh_for` (none: finished).
fn cache_control(fresh_for: Option<Duration>) -> HeaderValue {
    match fresh_for {
        None => HeaderValue::from_static(TERMINAL_CACHE_CONTROL),
        Some(lifetime) => {
            HeaderValue::from_str(&format!("private, max-age={}", lifetime.as_secs()))
                .expect("digits")
        }
    }
}

/// `Cache-Status` (RFC 9211): a hit with its remaining freshness in seconds
/// (`ttl`, none for a finished job, negative once stale, with why it was
/// served as `detail`), or a forward to upstream, `collapsed` when the request
/// shared another's fetch.
fn cache_status(answer: &Answer, ttl: Option<i64>) -> HeaderValue {
    const HIT: &str = "progress-gateway; hit";
    let stored = answer.stored.class != Class::Uncacheable;
    match answer.status {
        CacheStatus::Hit => match ttl {
            None => HeaderValue::from_static(HIT),
            Some(ttl) => HeaderValue::from_str(&format!("{HIT}; ttl={ttl}")).expect("digits"),
        },
        // RFC 9211 §2.8: `detail` says where the hit came from.
        CacheStatus::Shared => match ttl {
            None => HeaderValue::from_static("progress-gateway; hit; detail=shared"),
            Some(ttl) => {
                HeaderValue::from_str(&format!("{HIT}; ttl={ttl}; detail=shared")).expect("digits")
            }
        },
        CacheStatus::Stale => {
            let detail = answer.stale.map_or("stale", StaleReason::as_str);
            let ttl = ttl.unwrap_or(-1).min(-1);
            HeaderValue::from_str(&format!("{HIT}; ttl={ttl}; detail={detail}")).expect("tokens")
        }
        CacheStatus::Miss | CacheStatus::Coalesced => {
            let status = answer.stored.status.as_u16();
            let collapsed = if answer.status == CacheStatus::Coalesced {
                "; collapsed"
            } else {
                ""
            };
            let stored = if stored { "; stored" } else { "" };
            HeaderValue::from_str(&format!(
                "progress-gateway; fwd=miss; fwd-status={status}{stored}{collapsed}"
            ))
            .expect("tokens")
        }
    }
}

/// `If-None-Match` uses the weak comparison (RFC 9110 §13.1.2): `W/` is ignored.
fn etag_matches(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours)
}

/// A client's `X-Request-Id` when it is sane, else a fresh one in Huawei's style.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// 32 hex characters like Huawei's: a random per-process prefix and a counter.
/// Unique, not secret, and no system call per request (a v4 UUID costs one).
pub fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Into a buffer: `hex::encode` collects through a char iterator, which
    // shows in profiles of the hit path.
    let mut id = [0u8; 32];
    let bytes = ((u128::from(prefix) << 64) | u128::from(count)).to_be_bytes();
    hex::encode_to_slice(bytes, &mut id).expect("16 bytes make 32 digits");
    String::from_utf8(id.to_vec()).expect("hex digits")
}

/// `X-Language`, normalised (`zh_CN` → `zh-cn`); it is part of the cache key.
fn language(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    let Some(value) = headers.get(X_LANGUAGE) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| GatewayError::BadRequest("X-Language is not ASCII"))?
        .trim()
        .to_ascii_lowercase()
        .replace('_', "-");
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > 16 || !value.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
        return Err(GatewayError::BadRequest(
            "X-Language must be a language tag such as en-us",
        ));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn languages_are_normalised_or_refused() {
        assert_eq!(
            language(&headers("x-language", " zh_CN "))
                .unwrap()
                .as_deref(),
            Some("zh-cn")
        );
        assert_eq!(language(&HeaderMap::new()).unwrap(), None);
        assert!(language(&headers("x-language", "en-us;q=1")).is_err());
    }

    #[test]
    fn generated_request_ids_are_unique_hex() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert!(a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a[..16], b[..16], "one prefix per process");
        let count = |id: &str| u64::from_str_radix(&id[16..], 16).unwrap();
        assert!(count(&b) > count(&a), "{a} then {b}: a counter");
    }

    #[test]
    fn sane_client_request_ids_are_reused() {
        assert_eq!(request_id(&headers("x-request-id", "abc-123")), "abc-123");
        let generated = request_id(&headers("x-request-id", "bad id with spaces"));
        assert_eq!(generated.len(), 32);
        assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn if_none_match_compares_weakly_and_in_lists() {
        let etag = HeaderValue::from_static("\"abc\"");
        assert!(etag_matches(&headers("if-none-match", "\"abc\""), &etag));
        assert!(etag_matches(
            &headers("if-none-match", "\"x\", W/\"abc\""),
            &etag
        ));
        assert!(etag_matches(&headers("if-none-match", "*"), &etag));
        assert!(!etag_matches(&headers("if-none-match", "\"abd\""), &etag));
        assert!(!etag_matches(&HeaderMap::new(), &etag));
    }
}
