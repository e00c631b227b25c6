//! The progress-aware cache: stored answers within a byte budget, at most one
//! upstream fetch in flight per key shared by every waiter, stale fallbacks when
//! upstream struggles, and a per-project backoff after a 429.
//!
//! - [`key`]: which answers may be shared.
//! - [`stored`]: an answer as kept (one compact allocation).
//! - [`policy`]: pure decisions: classification, freshness, `Retry-After`.
//! - [`flight`]: the single flight, with its named end states.
//! - [`backoff`]: no upstream request for an API and project after a 429.
//!
//! Fetches run in their own task through the [`Fetch`] seam, detached from
//! the request that started them, so a client that hangs up never cancels
//! what others are waiting for. Freshness is judged with tokio's clock against
//! the policy; the store's own expiry only frees memory after every stale
//! window has passed.

pub mod backoff;
pub mod flight;
pub mod key;
pub mod policy;
pub mod stored;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::StatusCode;
use tokio::time::Instant;

pub use key::CacheKey;
pub use policy::{CachePolicy, CacheStatus, Class, Freshness};
pub use stored::Stored;

use backoff::Backoffs;
use flight::{Flights, Join, WaitError};
use policy::{classify, freshness, retry_after};

use crate::error::{retry_after_secs, GatewayError};
use crate::fetch::{Fetch, FetchRequest};
use crate::metrics::Metrics;
use crate::route::Api;
use crate::upstream::UpstreamResponse;

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

/// Bytes counted for each entry beyond its own data: moka's bookkeeping,
/// measured at about 340 bytes per entry (benches/load.rs, memory phase).
const ENTRY_OVERHEAD: usize = 350;

/// Cloning shares the cache.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    /// The one copy of the policy at run time; swapped whole on a reload
    /// (the store's byte budget stays until a restart).
    policy: Arc<ArcSwap<CachePolicy>>,
    store: moka::sync::Cache<CacheKey, Stored>,
    flights: Flights<CacheKey, Outcome>,
    backoffs: Backoffs,
    origin: Arc<dyn Fetch>,
    metrics: Arc<Metrics>,
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
    pub fn new(policy: CachePolicy, origin: Arc<dyn Fetch>, metrics: Arc<Metrics>) -> Self {
        let max_bytes = policy.max_bytes.as_u64();
        let policy = Arc::new(ArcSwap::from_pointee(policy));
        let evictions = metrics.evictions.clone();
        let store = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &CacheKey, value: &Stored| {
                let bytes = std::mem::size_of_val(key) + value.weight() + ENTRY_OVERHEAD;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(KeepFor(policy.clone()))
            .eviction_listener(move |_key, _value, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build();
        Cache {
            inner: Arc::new(Inner {
                policy,
                store,
                flights: Flights::default(),
                backoffs: Backoffs::default(),
                origin,
                metrics,
            }),
        }
    }

    pub fn policy(&self) -> arc_swap::Guard<Arc<CachePolicy>> {
        self.inner.policy.load()
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

    /// (API, project) pairs backing off after a 429 now.
    pub fn backoffs_in_force(&self) -> usize {
        self.inner.backoffs.in_force(Instant::now())
    }

    /// The answer for `key`: stored, shared from a fetch in flight, or fetched
    /// in a detached task. `request` is called only when a fetch starts, so a
    /// hit builds nothing.
    pub async fn get(
        &self,
        key: CacheKey,
        api: Api,
        project: &str,
        request: impl FnOnce() -> FetchRequest,
    ) -> Result<Answer, Arc<GatewayError>> {
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
        let backoff = inner.backoffs.remaining(api, project, now);
        match (stored, standing) {
            (Some(stored), Some(Freshness::Revalidate)) => {
                if backoff.is_none() {
                    // The refresh runs on its own; this request does not wait.
                    let _ = self.join_or_start(key, api, project, request);
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

        let (waiter, leader) = match self.join_or_start(key, api, project, request) {
            Started::Found(stored) => {
                return Ok(Answer {
                    stored,
                    status: CacheStatus::Hit,
                })
            }
            Started::Waiting(waiter, leader) => (waiter, leader),
        };
        if !leader {
            inner.metrics.coalesced.inc();
        }
        let wait = policy.wait_timeout;
        match waiter.wait(wait).await {
            Err(WaitError::Timeout) => Err(Arc::new(GatewayError::WaitTimeout(wait))),
            Err(WaitError::Aborted) => Err(Arc::new(GatewayError::FetchAborted)),
            Ok(Outcome::Fetched(stored)) => Ok(Answer {
                stored,
                status: if leader {
                    CacheStatus::Miss
                } else {
                    CacheStatus::Coalesced
                },
            }),
            Ok(Outcome::Stale(stored)) => Ok(Answer {
                stored,
                status: CacheStatus::Stale,
            }),
            Ok(Outcome::Failed(error)) => Err(error),
        }
    }

    /// Joins the fetch in flight for `key`, or starts one unless a fresh
    /// answer landed meanwhile.
    fn join_or_start(
        &self,
        key: CacheKey,
        api: Api,
        project: &str,
        request: impl FnOnce() -> FetchRequest,
    ) -> Started {
        let inner = &self.inner;
        let joined = inner.flights.join(key, || {
            let stored = inner.store.get(&key)?;
            let age = Instant::now().duration_since(stored.stored_at);
            let fresh = matches!(
                freshness(&inner.policy.load(), stored.class, age),
                Freshness::Fresh { .. }
            );
            fresh.then_some(stored)
        });
        let (leader, waiter) = match joined {
            Join::Found(stored) => return Started::Found(stored),
            Join::Follow(waiter) => return Started::Waiting(waiter, false),
            Join::Lead(leader, waiter) => (leader, waiter),
        };
        let fetching = inner.origin.clone().fetch(request());
        let inner = self.inner.clone();
        let project = project.to_string();
        tokio::spawn(async move {
            // A panic below drops `leader` unsettled: the flight is aborted.
            let result = fetching.await;
            let outcome = inner.settle(&key, api, &project, result);
            leader.settle(outcome);
        });
        Started::Waiting(waiter, true)
    }
}

/// What [`Cache::join_or_start`] did.
enum Started {
    /// A fresh answer landed while this request looked: no fetch needed.
    Found(Stored),
    /// Waiting on a flight; true if this request started it.
    Waiting(flight::Waiter<Outcome>, bool),
}

impl Inner {
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
        let class = classify(api, response.status, &response.body, policy.terminal(api));
        let status = response.status;
        let mut stored = Stored::new(&response, class, now);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(
                &response.headers,
                SystemTime::now(),
                policy.retry_after_default,
                policy.retry_after_max,
            );
            self.backoffs.start(api, project, now, wait);
            stored = stored.with_retry_after(retry_after_secs(wait));
        }
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue};
    use parking_lot::Mutex;

    use crate::credentials::{Credential, CredentialSpec, Origin};
    use crate::fetch::FetchFuture;
    use crate::metrics::CredentialCounters;
    use crate::route::Route;
    use crate::upstream::UpstreamError;

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
    struct Script {
        calls: Arc<AtomicUsize>,
        answers: Arc<Mutex<Vec<Result<UpstreamResponse, GatewayError>>>>,
        delay: Duration,
    }

    impl Fetch for Script {
        fn fetch(self: Arc<Self>, _request: FetchRequest) -> FetchFuture {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                let mut answers = self.answers.lock();
                match answers.len() {
                    0 => panic!("no scripted answer"),
                    1 => clone_answer(&answers[0]),
                    _ => answers.pop().unwrap(),
                }
            })
        }
    }

    impl Script {
        fn new(delay: Duration) -> Self {
            Script {
                calls: Arc::default(),
                answers: Arc::default(),
                delay,
            }
        }

        fn cache(&self, policy: CachePolicy) -> Cache {
            Cache::new(policy, Arc::new(self.clone()), Arc::new(Metrics::new()))
        }

        /// Queues answers; the last one repeats.
        fn then(&self, answer: Result<UpstreamResponse, GatewayError>) -> &Self {
            self.answers.lock().insert(0, answer);
            self
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
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
        GatewayError::Upstream {
            api: "roma",
            source: UpstreamError::Timeout(Duration::from_secs(1)),
        }
    }

    fn fetch_request() -> FetchRequest {
        FetchRequest {
            api: Api::Roma,
            url: "http://upstream.invalid/".into(),
            project: "p".into(),
            credential: Arc::new(Credential::new(
                "main",
                CredentialSpec::Token(Origin::Env("UNUSED".into())),
                CredentialCounters::default(),
            )),
            language: None,
            request_id: "r".into(),
        }
    }

    async fn get(cache: &Cache, job: &str) -> Result<Answer, Arc<GatewayError>> {
        cache.get(key(job), Api::Roma, "p", fetch_request).await
    }

    fn body(answer: &Answer) -> Bytes {
        answer.stored.body()
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_that_panics_is_an_internal_error_and_frees_the_key() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(policy());
        let err = get(&cache, "j").await.unwrap_err();
        assert!(matches!(*err, GatewayError::FetchAborted), "{err}");
        assert_eq!((err.status().as_u16(), err.code()), (500, "PGW.5000"));
        up.then(Ok(response(200, RUNNING)));
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Miss);
    }

    #[tokio::test(start_paused = true)]
    async fn running_answer_is_fresh_for_the_ttl_then_refetched() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(policy());
        up.then(Ok(response(200, RUNNING)));
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Miss);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Hit);
        assert_eq!(up.calls(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Miss);
        assert_eq!(up.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn terminal_result_is_never_refetched() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(policy());
        up.then(Ok(response(200, DONE)));
        get(&cache, "j").await.unwrap();
        for _ in 0..100 {
            tokio::time::advance(Duration::from_secs(3600)).await;
            assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Hit);
        }
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_is_remembered_for_the_negative_ttl() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(policy());
        up.then(Ok(response(404, "{}")))
            .then(Ok(response(200, RUNNING)));
        assert_eq!(get(&cache, "j").await.unwrap().stored.status, 404);
        tokio::time::advance(Duration::from_millis(499)).await;
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Hit);
        tokio::time::advance(Duration::from_millis(1)).await;
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(
            (answer.stored.status, answer.status),
            (StatusCode::OK, CacheStatus::Miss)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_refusals_are_never_stored() {
        for status in [401, 403, 500, 502, 503] {
            let up = Script::new(Duration::ZERO);
            let cache = up.cache(policy());
            up.then(Ok(response(status, r#"{"error_code":"X"}"#)));
            for _ in 0..3 {
                let answer = get(&cache, "j").await.unwrap();
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
        let up = Script::new(Duration::from_millis(20));
        let cache = up.cache(policy());
        up.then(Ok(response(200, RUNNING)));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { get(&cache, "j").await.unwrap().status })
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
        let up = Script::new(Duration::from_secs(8));
        let cache = up.cache(policy());
        up.then(Ok(response(200, RUNNING)));
        let err = get(&cache, "j").await.unwrap_err();
        assert!(matches!(*err, GatewayError::WaitTimeout(_)));
        tokio::time::advance(Duration::from_secs(3)).await;
        tokio::task::yield_now().await;
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Hit);
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_requester_does_not_cancel_the_fetch() {
        let up = Script::new(Duration::from_millis(100));
        let cache = up.cache(policy());
        up.then(Ok(response(200, DONE)));
        let first = tokio::spawn({
            let cache = cache.clone();
            async move { get(&cache, "j").await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(answer.status, CacheStatus::Coalesced);
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
        let up = Script::new(Duration::from_millis(50));
        let cache = up.cache(CachePolicy {
            stale_while_revalidate: Duration::from_secs(2),
            ..policy()
        });
        up.then(Ok(response(200, RUNNING)))
            .then(Ok(response(200, DONE)));
        get(&cache, "j").await.unwrap();
        tokio::time::advance(Duration::from_millis(1500)).await;
        for _ in 0..10 {
            let answer = get(&cache, "j").await.unwrap();
            assert_eq!(answer.status, CacheStatus::Stale);
            assert_eq!(body(&answer), RUNNING);
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(up.calls(), 2);
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Hit, Bytes::from(DONE))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_serves_the_last_answer_within_the_window() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(policy());
        up.then(Ok(response(200, RUNNING)))
            .then(Ok(response(503, "{}")))
            .then(Err(timeout_error()));
        get(&cache, "j").await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Stale, Bytes::from(RUNNING))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Stale, Bytes::from(RUNNING))
        );
        // 1 s fresh + 10 s stale-if-error have passed: the error shows.
        tokio::time::advance(Duration::from_secs(7)).await;
        let err = get(&cache, "j").await.unwrap_err();
        assert!(matches!(*err, GatewayError::Upstream { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_429_backs_off_serves_stale_and_then_recovers() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(policy());
        let mut throttled = response(429, r#"{"error_code":"APIGW.0308"}"#);
        throttled
            .headers
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("4"));
        up.then(Ok(response(200, RUNNING)))
            .then(Ok(throttled))
            .then(Ok(response(200, DONE)));
        get(&cache, "j").await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        // The 429 falls back to the stale answer and starts a 4 s backoff.
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Stale);
        assert_eq!(up.calls(), 2);
        // During the backoff: stale where there is one, 429 where there is none.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Stale);
        let err = get(&cache, "other").await.unwrap_err();
        assert!(
            matches!(*err, GatewayError::Throttled { retry_after, .. } if retry_after == Duration::from_secs(3))
        );
        assert_eq!(up.calls(), 2);
        tokio::time::advance(Duration::from_secs(3)).await;
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Miss, Bytes::from(DONE))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_backoff_does_not_pin_a_stale_answer_forever() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(CachePolicy {
            retry_after_max: Duration::from_secs(600),
            ..policy()
        });
        let mut throttled = response(429, "{}");
        throttled
            .headers
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("300"));
        up.then(Ok(response(200, RUNNING))).then(Ok(throttled));
        get(&cache, "j").await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Stale);
        tokio::time::advance(Duration::from_secs(10)).await;
        let err = get(&cache, "j").await.unwrap_err();
        assert!(matches!(*err, GatewayError::Throttled { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_without_stale_answer_passes_with_retry_after() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(policy());
        up.then(Ok(response(429, "{}")));
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(answer.stored.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.stored.retry_after().unwrap(), "3");
    }

    #[tokio::test(start_paused = true)]
    async fn stats_count_coalesced_waiters_and_backoffs() {
        let up = Script::new(Duration::from_millis(10));
        let cache = up.cache(policy());
        up.then(Ok(response(429, "{}")));
        let a = tokio::spawn({
            let cache = cache.clone();
            async move { get(&cache, "j").await }
        });
        tokio::task::yield_now().await;
        get(&cache, "j").await.unwrap();
        a.await.unwrap().unwrap();
        assert_eq!(cache.inner.metrics.coalesced.get(), 1);
        assert_eq!(cache.backoffs_in_force(), 1);
        assert_eq!(cache.usage().0, 0);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(cache.backoffs_in_force(), 0);
    }

    #[tokio::test]
    async fn the_byte_budget_evicts() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(CachePolicy {
            max_bytes: bytesize::ByteSize::kib(64),
            ..policy()
        });
        let big = format!(r#"{{"status":"SUCCEEDED","pad":"{}"}}"#, "x".repeat(4000));
        up.then(Ok(response(200, &big)));
        for i in 0..100 {
            get(&cache, &format!("j{i}")).await.unwrap();
        }
        let (entries, bytes) = cache.usage();
        assert!(bytes <= 64 * 1024, "{bytes} bytes stored");
        assert!(entries < 100 && entries > 0, "{entries} entries");
        assert!(cache.inner.metrics.evictions.get() > 0);
    }
}
