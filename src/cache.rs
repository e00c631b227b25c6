//! The progress-aware cache: stored answers within a byte budget, at most one
//! upstream fetch in flight per key shared by every waiter, stale fallbacks when
//! upstream struggles, and a per-project backoff after a 429.
//!
//! Fetches run in their own task, detached from the request that started them,
//! so a client that hangs up never cancels what others are waiting for. Waiters
//! are woken by a `watch` channel the moment the fetch settles: no polling.
//!
//! Freshness is judged with tokio's clock against the policy (see `policy`); the
//! store's own expiry only frees memory after every stale window has passed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{retry_after_secs, GatewayError};
use crate::policy::{classify, freshness, retry_after, CachePolicy, CacheStatus, Class, Freshness};
use crate::route::{Api, Route};
use crate::upstream::UpstreamResponse;

/// Identifies one cached answer: API, project, instance, job, language and the
/// credential's principal, so tenants and languages never share answers.
///
/// Stored as 128 bits of SHA-256 over those parts (as Varnish keys its cache
/// by a SHA-256 digest): 16 bytes inline instead of a ~140-byte string per
/// entry, and a collision is as unlikely as guessing a random 128-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(u128);

impl CacheKey {
    pub fn new(route: &Route, language: Option<&str>, credential: &str) -> Self {
        let mut digest = Sha256::new();
        // Each part ends in a byte no part can contain, so the join is unambiguous.
        for part in [
            route.api.as_str(),
            route.project,
            route.instance.unwrap_or(""),
            route.job,
            language.unwrap_or(""),
            credential,
        ] {
            digest.update(part.as_bytes());
            digest.update([0]);
        }
        let digest = digest.finalize();
        CacheKey(u128::from_be_bytes(
            digest[..16].try_into().expect("16 bytes"),
        ))
    }
}

/// An upstream answer as kept and served. Everything variable lives in one
/// allocation copied from the upstream response: the body, then the ETag,
/// Content-Type and X-Request-Id values. Copying means a stored answer never
/// pins hyper's connection buffer, and one allocation keeps entries small.
#[derive(Debug, Clone)]
pub struct Stored {
    data: Bytes,
    body_len: u32,
    etag_len: u8,
    content_type_len: u8,
    request_id_len: u8,
    pub status: StatusCode,
    pub class: Class,
    /// `Retry-After` seconds, set on a 429 passed to the client (0: none).
    retry_after: u32,
    pub stored_at: Instant,
}

impl Stored {
    fn new(response: &UpstreamResponse, class: Class, stored_at: Instant) -> Self {
        let digest = Sha256::digest(&response.body);
        let etag = format!("\"{}\"", hex::encode(&digest[..16]));
        // Values longer than 255 bytes are dropped rather than stored.
        let short = |name: &str| {
            response
                .headers
                .get(name)
                .map(HeaderValue::as_bytes)
                .filter(|v| v.len() <= usize::from(u8::MAX))
                .unwrap_or_default()
        };
        let content_type = short("content-type");
        let request_id = short("x-request-id");
        let mut data = Vec::with_capacity(
            response.body.len() + etag.len() + content_type.len() + request_id.len(),
        );
        for part in [
            &response.body[..],
            etag.as_bytes(),
            content_type,
            request_id,
        ] {
            data.extend_from_slice(part);
        }
        Stored {
            data: Bytes::from(data),
            body_len: u32::try_from(response.body.len()).expect("bodies are bounded by max_body"),
            etag_len: etag.len() as u8,
            content_type_len: content_type.len() as u8,
            request_id_len: request_id.len() as u8,
            status: response.status,
            class,
            retry_after: 0,
            stored_at,
        }
    }

    pub fn body(&self) -> Bytes {
        self.data.slice(..self.body_len as usize)
    }

    /// Strong validator over the body bytes (RFC 9110 §8.8.3).
    pub fn etag(&self) -> HeaderValue {
        self.value(0, self.etag_len)
            .expect("a hex ETag is a valid header value")
    }

    pub fn content_type(&self) -> Option<HeaderValue> {
        self.value(1, self.content_type_len)
    }

    /// The upstream `X-Request-Id` of the request that fetched this answer.
    pub fn request_id(&self) -> Option<HeaderValue> {
        self.value(2, self.request_id_len)
    }

    pub fn retry_after(&self) -> Option<HeaderValue> {
        (self.retry_after > 0).then(|| HeaderValue::from(self.retry_after))
    }

    /// The `index`th value after the body (ETag, Content-Type, X-Request-Id).
    fn value(&self, index: usize, len: u8) -> Option<HeaderValue> {
        if len == 0 {
            return None;
        }
        let lens = [self.etag_len, self.content_type_len, self.request_id_len];
        let start =
            self.body_len as usize + lens[..index].iter().map(|l| usize::from(*l)).sum::<usize>();
        // Bytes that were a valid header value upstream are valid again.
        HeaderValue::from_maybe_shared(self.data.slice(start..start + usize::from(len))).ok()
    }

    /// Bytes weighed against the budget beyond the store's own bookkeeping.
    fn weight(&self) -> usize {
        self.data.len() + std::mem::size_of::<Stored>()
    }
}

/// What a lookup gives the client.
#[derive(Debug, Clone)]
pub struct Answer {
    pub stored: Stored,
    pub status: CacheStatus,
}

/// How a shared fetch settled, as every waiter sees it.
#[derive(Debug, Clone)]
enum Outcome {
    /// Upstream answered (stored or not, as its class decides).
    Fetched(Stored),
    /// Upstream failed and an earlier answer stands in for it.
    Stale(Stored),
    Failed(Arc<GatewayError>),
}

type Flight = watch::Receiver<Option<Outcome>>;

/// Bytes counted for each entry beyond its own data: moka's bookkeeping,
/// measured at about 340 bytes per entry (benches/load.rs, memory phase).
const ENTRY_OVERHEAD: usize = 350;

/// Cloning shares the cache.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

/// Counts read by the metrics collector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    /// Requests that waited for another request's fetch.
    pub coalesced: u64,
    /// Entries dropped to stay within the byte budget.
    pub evictions: u64,
    /// (API, project) pairs currently backing off after a 429.
    pub backoffs: u64,
}

struct Inner {
    /// Swapped whole on a config reload; the store's byte budget stays.
    policy: Arc<ArcSwap<CachePolicy>>,
    coalesced: AtomicU64,
    evictions: Arc<AtomicU64>,
    store: moka::sync::Cache<CacheKey, Stored>,
    /// std Mutex: only held to look up, insert or remove; never across an await.
    flights: Mutex<HashMap<CacheKey, Flight>>,
    /// No upstream request for (API, project) before the instant (after a 429).
    backoff: Mutex<HashMap<(Api, String), Instant>>,
}

/// Frees memory once an answer is past every window in which it could be served.
struct KeepFor(Arc<ArcSwap<CachePolicy>>);

impl moka::Expiry<CacheKey, Stored> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Stored,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let policy = self.0.load();
        match value.class {
            Class::Terminal => policy.terminal_idle,
            class => policy.keep_for(class),
        }
    }

    fn expire_after_read(
        &self,
        _key: &CacheKey,
        value: &Stored,
        _read_at: std::time::Instant,
        remaining: Option<Duration>,
        _last_modified_at: std::time::Instant,
    ) -> Option<Duration> {
        match value.class {
            Class::Terminal => self.0.load().terminal_idle,
            _ => remaining,
        }
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        value: &Stored,
        updated_at: std::time::Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

impl Cache {
    pub fn new(policy: CachePolicy) -> Self {
        let max_bytes = policy.max_bytes;
        let policy = Arc::new(ArcSwap::from_pointee(policy));
        let evictions = Arc::new(AtomicU64::new(0));
        let evicted = evictions.clone();
        let store = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &CacheKey, value: &Stored| {
                let bytes = std::mem::size_of_val(key) + value.weight() + ENTRY_OVERHEAD;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(KeepFor(policy.clone()))
            .eviction_listener(move |_key, _value, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evicted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Cache {
            inner: Arc::new(Inner {
                policy,
                coalesced: AtomicU64::new(0),
                evictions,
                store,
                flights: Mutex::new(HashMap::new()),
                backoff: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn policy(&self) -> Arc<CachePolicy> {
        self.inner.policy.load_full()
    }

    /// Applies a reloaded policy; the byte budget cannot change without a restart.
    pub fn set_policy(&self, policy: CachePolicy) {
        self.inner.policy.store(Arc::new(policy));
    }

    /// Entries and weighted bytes currently stored (after pending maintenance).
    pub fn usage(&self) -> (u64, u64) {
        self.inner.store.run_pending_tasks();
        (
            self.inner.store.entry_count(),
            self.inner.store.weighted_size(),
        )
    }

    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = self.usage();
        let now = Instant::now();
        let backoffs = self
            .inner
            .backoff
            .lock()
            .unwrap()
            .values()
            .filter(|until| **until > now)
            .count();
        CacheStats {
            entries,
            bytes,
            coalesced: self.inner.coalesced.load(Ordering::Relaxed),
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            backoffs: backoffs as u64,
        }
    }

    /// The answer for `key`: stored, shared from a fetch in flight, or fetched
    /// in a detached task. `fetch` is called only when a fetch starts (so a hit
    /// builds nothing); the future it returns runs on its own task.
    pub async fn get<F, Fut>(
        &self,
        key: CacheKey,
        api: Api,
        project: &str,
        fetch: F,
    ) -> Result<Answer, Arc<GatewayError>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<UpstreamResponse, GatewayError>> + Send + 'static,
    {
        let inner = &self.inner;
        let policy = inner.policy.load();
        let now = Instant::now();
        let stored = inner.store.get(&key);
        let standing = stored
            .as_ref()
            .map(|s| freshness(&policy, s.class, now.duration_since(s.stored_at)));

        if let (Some(stored), Some(Freshness::Fresh { .. })) = (&stored, standing) {
            return Ok(Answer {
                stored: stored.clone(),
                status: CacheStatus::Hit,
            });
        }
        // Only past a hit: the backoff map sits behind a lock.
        let backoff = inner.backoff_remaining(api, project, now);
        match (stored, standing) {
            (Some(stored), Some(Freshness::Revalidate)) => {
                if backoff.is_none() {
                    self.join_or_start(key, api, project, fetch);
                }
                return Ok(Answer {
                    stored,
                    status: CacheStatus::Stale,
                });
            }
            // Throttled: an answer still within stale-if-error beats a 429; an
            // older one is not served, so a long backoff cannot pin it forever.
            (Some(stored), Some(Freshness::StaleIfError)) if backoff.is_some() => {
                return Ok(Answer {
                    stored,
                    status: CacheStatus::Stale,
                })
            }
            _ => {}
        }
        if let Some(retry_after) = backoff {
            return Err(Arc::new(GatewayError::Throttled {
                api: api.as_str(),
                retry_after,
            }));
        }

        let (mut flight, leader) = self.join_or_start(key, api, project, fetch);
        if !leader {
            inner.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        let wait = policy.wait_timeout;
        let settled = tokio::time::timeout(wait, flight.wait_for(Option::is_some)).await;
        let outcome = match settled {
            Err(_) => return Err(Arc::new(GatewayError::WaitTimeout(wait))),
            // The fetch task ended without settling: it panicked.
            Ok(Err(_)) => {
                return Err(Arc::new(GatewayError::UpstreamInvalid {
                    api: api.as_str(),
                    reason: "the upstream fetch was aborted".into(),
                }))
            }
            Ok(Ok(outcome)) => outcome.clone().expect("waited for Some"),
        };
        match outcome {
            Outcome::Fetched(stored) => Ok(Answer {
                stored,
                status: if leader {
                    CacheStatus::Miss
                } else {
                    CacheStatus::Coalesced
                },
            }),
            Outcome::Stale(stored) => Ok(Answer {
                stored,
                status: CacheStatus::Stale,
            }),
            Outcome::Failed(error) => Err(error),
        }
    }

    /// Joins the fetch in flight for `key`, or starts one. True if started here.
    fn join_or_start<F, Fut>(
        &self,
        key: CacheKey,
        api: Api,
        project: &str,
        fetch: F,
    ) -> (Flight, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<UpstreamResponse, GatewayError>> + Send + 'static,
    {
        let mut flights = self.inner.flights.lock().unwrap();
        if let Some(flight) = flights.get(&key) {
            return (flight.clone(), false);
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key, rx.clone());
        drop(flights);
        let fetching = fetch();

        let inner = self.inner.clone();
        let project = project.to_string();
        tokio::spawn(async move {
            // Removes the flight even if `fetch` panics, so the key is not stuck.
            let landing = Landing {
                inner: &inner,
                key: &key,
            };
            let result = fetching.await;
            let outcome = inner.settle(&key, api, &project, result);
            // Leave the flight map before waking waiters: a request arriving now
            // finds the stored answer, or starts a new fetch after a failure.
            drop(landing);
            tx.send_replace(Some(outcome));
        });
        (rx, true)
    }
}

struct Landing<'a> {
    inner: &'a Inner,
    key: &'a CacheKey,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.inner.flights.lock().unwrap().remove(self.key);
    }
}

impl Inner {
    fn backoff_remaining(&self, api: Api, project: &str, now: Instant) -> Option<Duration> {
        let mut backoff = self.backoff.lock().unwrap();
        if backoff.is_empty() {
            return None;
        }
        let key = (api, project.to_string());
        let until = *backoff.get(&key)?;
        if until <= now {
            backoff.remove(&key);
            return None;
        }
        Some(until - now)
    }

    /// Turns a fetch result into what waiters get, storing what may be stored.
    fn settle(
        &self,
        key: &CacheKey,
        api: Api,
        project: &str,
        result: Result<UpstreamResponse, GatewayError>,
    ) -> Outcome {
        let now = Instant::now();
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                return match self.stale_fallback(key, now) {
                    Some(stale) => Outcome::Stale(stale),
                    None => Outcome::Failed(Arc::new(error)),
                }
            }
        };
        let policy = self.policy.load();
        let class = classify(api, response.status, &response.body, &policy.terminal);
        let status = response.status;
        let mut retry = 0;
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(
                &response.headers,
                SystemTime::now(),
                policy.retry_after_default,
                policy.retry_after_max,
            );
            self.backoff
                .lock()
                .unwrap()
                .insert((api, project.to_string()), now + wait);
            retry = u32::try_from(retry_after_secs(wait)).unwrap_or(u32::MAX);
        }
        let mut stored = Stored::new(&response, class, now);
        stored.retry_after = retry;
        if class != Class::Uncacheable {
            self.store.insert(*key, stored.clone());
            return Outcome::Fetched(stored);
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            if let Some(stale) = self.stale_fallback(key, now) {
                return Outcome::Stale(stale);
            }
        }
        Outcome::Fetched(stored)
    }

    /// An earlier answer that may stand in while upstream fails.
    fn stale_fallback(&self, key: &CacheKey, now: Instant) -> Option<Stored> {
        let stored = self.store.get(key)?;
        let age = now.duration_since(stored.stored_at);
        match freshness(&self.policy.load(), stored.class, age) {
            Freshness::Expired => None,
            _ => Some(stored),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use http::HeaderMap;

    const RUNNING: &str = r#"{"id":"j","status":"RUNNING","progress_percent":0.5}"#;
    const DONE: &str = r#"{"id":"j","status":"SUCCEEDED","progress_percent":1.0}"#;

    fn policy() -> CachePolicy {
        CachePolicy {
            running_ttl: Duration::from_secs(1),
            not_found_ttl: Duration::from_millis(500),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::from_secs(10),
            wait_timeout: Duration::from_secs(5),
            retry_after_default: Duration::from_secs(3),
            retry_after_max: Duration::from_secs(60),
            ..CachePolicy::default()
        }
    }

    fn key(job: &str) -> CacheKey {
        let route = Route {
            api: Api::Roma,
            project: "p",
            instance: Some("i"),
            job,
        };
        CacheKey::new(&route, None, "token:main")
    }

    fn response(status: u16, body: &str) -> UpstreamResponse {
        UpstreamResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    /// A fake upstream that counts calls and answers from a script.
    #[derive(Clone)]
    struct Upstream {
        calls: Arc<AtomicUsize>,
        answers: Arc<Mutex<Vec<Result<UpstreamResponse, GatewayError>>>>,
        delay: Duration,
    }

    impl Upstream {
        fn new(delay: Duration) -> Self {
            Upstream {
                calls: Arc::default(),
                answers: Arc::default(),
                delay,
            }
        }

        /// Queues answers; the last one repeats.
        fn then(&self, answer: Result<UpstreamResponse, GatewayError>) -> &Self {
            self.answers.lock().unwrap().insert(0, answer);
            self
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn fetch(
            &self,
        ) -> impl FnOnce() -> std::pin::Pin<
            Box<dyn Future<Output = Result<UpstreamResponse, GatewayError>> + Send>,
        > + Send
               + 'static {
            let this = self.clone();
            move || {
                Box::pin(async move {
                    this.calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(this.delay).await;
                    let mut answers = this.answers.lock().unwrap();
                    match answers.len() {
                        0 => panic!("no scripted answer"),
                        1 => clone_answer(&answers[0]),
                        _ => answers.pop().unwrap(),
                    }
                })
            }
        }
    }

    fn clone_answer(
        a: &Result<UpstreamResponse, GatewayError>,
    ) -> Result<UpstreamResponse, GatewayError> {
        match a {
            Ok(r) => Ok(r.clone()),
            Err(_) => Err(timeout_error()),
        }
    }

    fn timeout_error() -> GatewayError {
        GatewayError::UpstreamTimeout {
            api: "roma",
            timeout: Duration::from_secs(1),
        }
    }

    async fn get(cache: &Cache, up: &Upstream, job: &str) -> Result<Answer, Arc<GatewayError>> {
        cache.get(key(job), Api::Roma, "p", up.fetch()).await
    }

    fn body(answer: &Answer) -> Bytes {
        answer.stored.body()
    }

    #[tokio::test(start_paused = true)]
    async fn running_answer_is_fresh_for_the_ttl_then_refetched() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::ZERO);
        up.then(Ok(response(200, RUNNING)));
        assert_eq!(
            get(&cache, &up, "j").await.unwrap().status,
            CacheStatus::Miss
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(
            get(&cache, &up, "j").await.unwrap().status,
            CacheStatus::Hit
        );
        assert_eq!(up.calls(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            get(&cache, &up, "j").await.unwrap().status,
            CacheStatus::Miss
        );
        assert_eq!(up.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn terminal_result_is_never_refetched() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::ZERO);
        up.then(Ok(response(200, DONE)));
        get(&cache, &up, "j").await.unwrap();
        for _ in 0..100 {
            tokio::time::advance(Duration::from_secs(3600)).await;
            assert_eq!(
                get(&cache, &up, "j").await.unwrap().status,
                CacheStatus::Hit
            );
        }
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_is_remembered_for_the_negative_ttl() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::ZERO);
        up.then(Ok(response(404, "{}")))
            .then(Ok(response(200, RUNNING)));
        assert_eq!(get(&cache, &up, "j").await.unwrap().stored.status, 404);
        tokio::time::advance(Duration::from_millis(499)).await;
        assert_eq!(
            get(&cache, &up, "j").await.unwrap().status,
            CacheStatus::Hit
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let answer = get(&cache, &up, "j").await.unwrap();
        assert_eq!(
            (answer.stored.status, answer.status),
            (StatusCode::OK, CacheStatus::Miss)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_refusals_are_never_stored() {
        for status in [401, 403, 500, 502, 503] {
            let cache = Cache::new(policy());
            let up = Upstream::new(Duration::ZERO);
            up.then(Ok(response(status, r#"{"error_code":"X"}"#)));
            for _ in 0..3 {
                let answer = get(&cache, &up, "j").await.unwrap();
                assert_eq!(
                    (answer.stored.status.as_u16(), answer.status),
                    (status, CacheStatus::Miss)
                );
            }
            assert_eq!(up.calls(), 3, "status {status}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_fetch() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::from_millis(20));
        up.then(Ok(response(200, RUNNING)));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (cache, up) = (cache.clone(), up.clone());
                tokio::spawn(async move { get(&cache, &up, "j").await.unwrap().status })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        assert_eq!(up.calls(), 1);
        assert_eq!(
            statuses.iter().filter(|s| **s == CacheStatus::Miss).count(),
            1
        );
        assert_eq!(
            statuses
                .iter()
                .filter(|s| **s == CacheStatus::Coalesced)
                .count(),
            99
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_the_wait_timeout_but_the_fetch_lands() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::from_secs(8));
        up.then(Ok(response(200, RUNNING)));
        let err = get(&cache, &up, "j").await.unwrap_err();
        assert!(matches!(*err, GatewayError::WaitTimeout(_)));
        tokio::time::advance(Duration::from_secs(3)).await;
        tokio::task::yield_now().await;
        assert_eq!(
            get(&cache, &up, "j").await.unwrap().status,
            CacheStatus::Hit
        );
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_requester_does_not_cancel_the_fetch() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::from_millis(100));
        up.then(Ok(response(200, DONE)));
        let first = tokio::spawn({
            let (cache, up) = (cache.clone(), up.clone());
            async move { get(&cache, &up, "j").await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        let answer = get(&cache, &up, "j").await.unwrap();
        assert_eq!(answer.status, CacheStatus::Coalesced);
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
        let cache = Cache::new(CachePolicy {
            stale_while_revalidate: Duration::from_secs(2),
            ..policy()
        });
        let up = Upstream::new(Duration::from_millis(50));
        up.then(Ok(response(200, RUNNING)))
            .then(Ok(response(200, DONE)));
        get(&cache, &up, "j").await.unwrap();
        tokio::time::advance(Duration::from_millis(1500)).await;
        for _ in 0..10 {
            let answer = get(&cache, &up, "j").await.unwrap();
            assert_eq!(answer.status, CacheStatus::Stale);
            assert_eq!(body(&answer), RUNNING);
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(up.calls(), 2);
        let answer = get(&cache, &up, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Hit, Bytes::from(DONE))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_serves_the_last_answer_within_the_window() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::ZERO);
        up.then(Ok(response(200, RUNNING)))
            .then(Ok(response(503, "{}")))
            .then(Err(timeout_error()));
        get(&cache, &up, "j").await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let answer = get(&cache, &up, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Stale, Bytes::from(RUNNING))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let answer = get(&cache, &up, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Stale, Bytes::from(RUNNING))
        );
        // 1 s fresh + 10 s stale-if-error have passed: the error shows.
        tokio::time::advance(Duration::from_secs(7)).await;
        let err = get(&cache, &up, "j").await.unwrap_err();
        assert!(matches!(*err, GatewayError::UpstreamTimeout { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_429_backs_off_serves_stale_and_then_recovers() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::ZERO);
        let mut throttled = response(429, r#"{"error_code":"APIGW.0308"}"#);
        throttled
            .headers
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("4"));
        up.then(Ok(response(200, RUNNING)))
            .then(Ok(throttled))
            .then(Ok(response(200, DONE)));
        get(&cache, &up, "j").await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        // The 429 falls back to the stale answer and starts a 4 s backoff.
        assert_eq!(
            get(&cache, &up, "j").await.unwrap().status,
            CacheStatus::Stale
        );
        assert_eq!(up.calls(), 2);
        // During the backoff: stale where there is one, 429 where there is none.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            get(&cache, &up, "j").await.unwrap().status,
            CacheStatus::Stale
        );
        let err = get(&cache, &up, "other").await.unwrap_err();
        assert!(
            matches!(*err, GatewayError::Throttled { retry_after, .. } if retry_after == Duration::from_secs(3))
        );
        assert_eq!(up.calls(), 2);
        tokio::time::advance(Duration::from_secs(3)).await;
        let answer = get(&cache, &up, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Miss, Bytes::from(DONE))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_backoff_does_not_pin_a_stale_answer_forever() {
        let cache = Cache::new(CachePolicy {
            retry_after_max: Duration::from_secs(600),
            ..policy()
        });
        let up = Upstream::new(Duration::ZERO);
        let mut throttled = response(429, "{}");
        throttled
            .headers
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("300"));
        up.then(Ok(response(200, RUNNING))).then(Ok(throttled));
        get(&cache, &up, "j").await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            get(&cache, &up, "j").await.unwrap().status,
            CacheStatus::Stale
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let err = get(&cache, &up, "j").await.unwrap_err();
        assert!(matches!(*err, GatewayError::Throttled { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_without_stale_answer_passes_with_retry_after() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::ZERO);
        up.then(Ok(response(429, "{}")));
        let answer = get(&cache, &up, "j").await.unwrap();
        assert_eq!(answer.stored.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.stored.retry_after().unwrap(), "3");
    }

    #[tokio::test(start_paused = true)]
    async fn stats_count_coalesced_waiters_and_backoffs() {
        let cache = Cache::new(policy());
        let up = Upstream::new(Duration::from_millis(10));
        up.then(Ok(response(429, "{}")));
        let a = tokio::spawn({
            let (cache, up) = (cache.clone(), up.clone());
            async move { get(&cache, &up, "j").await }
        });
        tokio::task::yield_now().await;
        get(&cache, &up, "j").await.unwrap();
        a.await.unwrap().unwrap();
        let stats = cache.stats();
        assert_eq!((stats.coalesced, stats.backoffs, stats.entries), (1, 1, 0));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(cache.stats().backoffs, 0);
    }

    #[tokio::test]
    async fn the_byte_budget_evicts() {
        let cache = Cache::new(CachePolicy {
            max_bytes: 64 * 1024,
            ..policy()
        });
        let up = Upstream::new(Duration::ZERO);
        let big = format!(r#"{{"status":"SUCCEEDED","pad":"{}"}}"#, "x".repeat(4000));
        up.then(Ok(response(200, &big)));
        for i in 0..100 {
            get(&cache, &up, &format!("j{i}")).await.unwrap();
        }
        let stats = cache.stats();
        assert!(stats.bytes <= 64 * 1024, "{} bytes stored", stats.bytes);
        assert!(
            stats.entries < 100 && stats.entries > 0,
            "{} entries",
            stats.entries
        );
        assert!(stats.evictions > 0);
    }

    #[test]
    fn stored_answers_copy_body_and_headers_into_one_allocation() {
        let mut upstream = response(200, RUNNING);
        upstream.headers.insert(
            "content-type",
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        upstream
            .headers
            .insert("x-request-id", HeaderValue::from_static("abc123"));
        let stored = Stored::new(&upstream, Class::Running, Instant::now());
        assert_eq!(stored.body(), RUNNING);
        assert_eq!(
            stored.content_type().unwrap(),
            "application/json;charset=UTF-8"
        );
        assert_eq!(stored.request_id().unwrap(), "abc123");
        assert_eq!(stored.etag().len(), 34);
        assert_eq!(stored.retry_after(), None);
        assert_eq!(stored.data.len(), RUNNING.len() + 34 + 30 + 6);
        let bare = Stored::new(&response(200, ""), Class::Running, Instant::now());
        assert_eq!(
            (bare.content_type(), bare.request_id(), bare.body().len()),
            (None, None, 0)
        );
    }

    #[test]
    fn keys_separate_languages_projects_and_credentials() {
        let route = |project| Route {
            api: Api::Drs,
            project,
            instance: None,
            job: "j",
        };
        let base = CacheKey::new(&route("p"), Some("en-us"), "token:a");
        assert_ne!(base, CacheKey::new(&route("p"), Some("zh-cn"), "token:a"));
        assert_ne!(base, CacheKey::new(&route("q"), Some("en-us"), "token:a"));
        assert_ne!(base, CacheKey::new(&route("p"), Some("en-us"), "token:b"));
        assert_ne!(base, CacheKey::new(&route("p"), None, "token:a"));
        assert_eq!(base, CacheKey::new(&route("p"), Some("en-us"), "token:a"));
    }
}
