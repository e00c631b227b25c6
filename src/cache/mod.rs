//! The progress-aware cache: stored answers within a byte budget, at most one
//! upstream fetch in flight per key shared by every waiter, stale fallbacks when
//! upstream struggles, and a per-project backoff after a 429.
//!
//! - [`key`]: which answers may be shared.
//! - [`near`]: each thread's copies of the answers it just read.
//! - [`stored`]: an answer as kept (one compact allocation).
//! - [`policy`]: pure decisions: classification, freshness, `Retry-After`.
//! - [`flight`]: the single flight, with its named end states.
//! - [`backoff`]: per API and project, a pause after a 429 or after
//!   consecutive failures, then one probe at a time.
//! - [`budget`]: token buckets for the upstream rate and each consumer's fetches.
//! - [`shared`]: the optional second tier in Redis, which makes the single
//!   flight, the backoffs and the budget fleet-wide.
//!
//! A failure is shared like an answer: for `error_ttl` everyone polling that
//! job gets the stale answer (within `stale_if_error`) or the same error, and
//! nothing new goes upstream.
//!
//! Fetches run in their own task through the [`Fetch`] seam, detached from
//! the request that started them, so a client that hangs up never cancels
//! what others are waiting for. Freshness is judged with tokio's clock against
//! the policy; the store's own expiry only frees memory after every stale
//! window has passed.

pub mod activity;
pub mod backoff;
pub mod budget;
pub mod flight;
pub mod key;
pub mod near;
pub mod policy;
pub mod shared;
pub mod stored;
pub mod watch;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::StatusCode;
use parking_lot::Mutex;
use tokio::time::Instant;

pub use key::CacheKey;
pub use policy::{CachePolicy, CacheStatus, Class, Freshness, StaleReason};
pub use shared::{Shared, SharedConfig, SharedState};
pub use stored::Stored;
pub use watch::{Watch, WatchLimits, Watches};

use activity::{Activities, JobActivity};
use backoff::{Admit, Backoffs, Cause};
use budget::Buckets;
use flight::{Flights, Join, WaitError};
use policy::{classify, failure_backoff, freshness, is_json_object, retry_after};
use shared::{Claim, FleetEvent, Landing, Pause};

use crate::error::{retry_after_secs, GatewayError};
use crate::fetch::{Fetch, FetchRequest};
use crate::metrics::Metrics;
use crate::route::Api;
use crate::upstream::{UpstreamError, UpstreamResponse};

/// What a lookup gives the client.
#[derive(Debug, Clone)]
pub struct Answer {
    pub stored: Stored,
    pub status: CacheStatus,
    /// Why a stale answer was served (with [`CacheStatus::Stale`]).
    pub stale: Option<StaleReason>,
}

impl Answer {
    pub fn new(stored: Stored, status: CacheStatus) -> Self {
        Answer {
            stored,
            status,
            stale: None,
        }
    }

    pub fn stale(stored: Stored, reason: StaleReason) -> Self {
        Answer {
            stored,
            status: CacheStatus::Stale,
            stale: Some(reason),
        }
    }
}

/// Who asks, for the backoffs and the budgets.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub api: Api,
    pub project: &'a str,
    /// The consumer's name where keys are configured, else its address:
    /// formatted only when a fetch needs it, never on a hit.
    pub consumer: &'a (dyn std::fmt::Display + Sync),
    /// The label `consumer` goes by in metrics (bounded: names, or `by-address`).
    pub consumer_label: &'a str,
}

/// An upstream failure for one job, shared for `error_ttl`.
#[derive(Debug, Clone)]
enum Failure {
    /// Upstream answered with a 5xx, passed on as it is.
    Answer(Stored),
    Error(Arc<GatewayError>),
}

impl Failure {
    fn answer(self) -> Result<Answer, Arc<GatewayError>> {
        match self {
            // Another request's outcome, shared: collapsed, like a coalesced answer.
            Failure::Answer(stored) => Ok(Answer::new(stored, CacheStatus::Coalesced)),
            Failure::Error(error) => Err(error),
        }
    }
}

/// Failures by key, each until its `error_ttl` ends.
#[derive(Debug, Default)]
struct Failures {
    /// parking_lot: held to read or write the map; never poisoned.
    map: Mutex<HashMap<CacheKey, (Instant, Failure)>>,
}

impl Failures {
    fn recent(&self, key: &CacheKey, now: Instant) -> Option<Failure> {
        let mut map = self.map.lock();
        if map.is_empty() {
            return None;
        }
        match map.get(key) {
            Some((until, failure)) if now < *until => Some(failure.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, key: CacheKey, until: Instant, failure: Failure) {
        let mut map = self.map.lock();
        if map.len() >= 4096 {
            let now = Instant::now();
            map.retain(|_, (until, _)| *until > now);
        }
        map.insert(key, (until, failure));
    }

    fn clear(&self, key: &CacheKey) {
        let mut map = self.map.lock();
        if !map.is_empty() {
            map.remove(key);
        }
    }
}

/// How a shared fetch settled, as every waiter sees it.
#[derive(Debug, Clone)]
enum Outcome {
    /// Upstream answered (stored or not, as its class decides).
    Fetched(Stored),
    /// Another replica's answer, from the shared tier.
    Shared(Stored),
    /// The fleet paused the API and project just now: ask again (the
    /// request is then held or answered as the pause decides).
    Paused,
    /// Upstream failed or throttled and an earlier answer stands in for it.
    Stale(Stored, StaleReason),
    Failed(Arc<GatewayError>),
}

/// What [`Inner::ask_fleet`] found.
enum Fleet {
    /// Another replica's answer, pause or failure, or a wait that timed out.
    Settled(Outcome),
    /// This replica fetches: under the fleet lock, or alone (Redis failing;
    /// with a lock the failed call may have taken all the same).
    Fetch {
        lock: Option<shared::Lock>,
        alone: bool,
    },
}

/// What one fetch left behind, for the fleet to share.
#[derive(Debug, Default)]
struct Report {
    /// The answer stored.
    stored: Option<Stored>,
    /// A failure recorded: the 5xx answer, or None for no answer at all.
    failure: Option<Option<Stored>>,
    /// The pause it began (or ended) for its API and project.
    pause: Option<Pause>,
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
    /// Keys are already digests: foldhash spreads them as well as SipHash,
    /// the default, and several times faster.
    store: moka::sync::Cache<CacheKey, Stored, foldhash::fast::RandomState>,
    /// Moved on by every write to `store`, which [`near`] copies check.
    writes: Arc<near::Writes>,
    flights: Flights<CacheKey, Outcome>,
    backoffs: Backoffs,
    failures: Failures,
    /// Upstream requests per (API, project), when `upstream_rate` is set.
    upstream_budget: Buckets<(Api, String)>,
    /// Fetches each consumer triggered, when `consumer_fetch_rate` is set.
    consumer_budget: Buckets<String>,
    /// Watched keys get every answer settled for them, and are kept warm.
    watches: Watches,
    /// The jobs asked for lately, for the operator's page.
    activities: Activities,
    /// The fleet's tier in Redis, when `[shared]` is configured.
    shared: Option<Arc<Shared>>,
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
        Cache::with_shared(policy, origin, metrics, None)
    }

    /// Like [`Cache::new`], with the fleet's shared tier when there is one.
    pub fn with_shared(
        policy: CachePolicy,
        origin: Arc<dyn Fetch>,
        metrics: Arc<Metrics>,
        shared: Option<Shared>,
    ) -> Self {
        let max_bytes = policy.max_bytes.as_u64();
        let policy = Arc::new(ArcSwap::from_pointee(policy));
        let evictions = metrics.evictions.clone();
        let writes = Arc::new(near::Writes::default());
        let store = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &CacheKey, value: &Stored| {
                let bytes = std::mem::size_of_val(key) + value.weight() + ENTRY_OVERHEAD;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(KeepFor(policy.clone()))
            .eviction_listener({
                let writes = writes.clone();
                move |_key, _value, cause| {
                    // Any removal (evicted, expired, replaced): copies are stale.
                    writes.changed();
                    if cause == moka::notification::RemovalCause::Size {
                        evictions.inc();
                    }
                }
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        let shared = shared.map(Arc::new);
        let inner = Arc::new(Inner {
            policy,
            store,
            writes,
            flights: Flights::default(),
            backoffs: Backoffs::default(),
            failures: Failures::default(),
            upstream_budget: Buckets::default(),
            consumer_budget: Buckets::default(),
            watches: Watches::default(),
            activities: Activities::default(),
            shared: shared.clone(),
            origin,
            metrics,
        });
        if let Some(shared) = shared {
            // Weak: the subscriber must not keep the cache alive.
            let cache = Arc::downgrade(&inner);
            shared.listen(move |event| {
                if let Some(inner) = cache.upgrade() {
                    inner.heard(event);
                }
            });
        }
        Cache { inner }
    }

    /// The fleet's tier, when configured.
    pub fn shared(&self) -> Option<&Shared> {
        self.inner.shared.as_deref()
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

    /// Who watches which key; see [`watch`].
    pub fn watches(&self) -> &Watches {
        &self.inner.watches
    }

    /// The jobs asked for lately; see [`activity`].
    pub fn activities(&self) -> &Activities {
        &self.inner.activities
    }

    /// Counts a client answered with `answer` against its job.
    pub fn asked(&self, answer: &Answer) {
        if let Some(activity) = &answer.stored.activity {
            activity.requests.fetch_add(1, Ordering::Relaxed);
            self.inner.activities.touch(activity);
        }
    }

    /// The stored answer for `key`, fresh or not.
    pub fn peek(&self, key: &CacheKey) -> Option<Stored> {
        self.inner.store.get(key)
    }

    /// The pauses in force now, per API and project.
    pub fn backoffs(&self) -> Vec<backoff::InForce> {
        self.inner.backoffs.list(Instant::now())
    }

    /// (API, project) pairs held back now: (throttled, failing).
    pub fn backoffs_in_force(&self) -> (usize, usize) {
        self.inner.backoffs.in_force(Instant::now())
    }

    /// The stored answer for `key` if it is fresh: a hit, without the rest
    /// of [`Self::get`].
    pub fn fresh(&self, key: CacheKey, now: Instant, policy: &CachePolicy) -> Option<Answer> {
        self.hit(&key, now, policy).ok()
    }

    /// The stored answer for `key` if it is fresh at `now`: all a cache hit
    /// does. Otherwise what is stored, and how it stands.
    fn hit(
        &self,
        key: &CacheKey,
        now: Instant,
        policy: &CachePolicy,
    ) -> Result<Answer, (Option<Stored>, Option<Freshness>)> {
        // A copy this thread read a moment ago, when nothing was written since.
        let stored = self
            .inner
            .writes
            .get(key, now, || self.inner.store.get(key));
        let standing = stored
            .as_ref()
            .map(|s| freshness(policy, s.class, now.duration_since(s.stored_at)));
        match (stored, standing) {
            (Some(stored), Some(Freshness::Fresh { .. })) => {
                if let (Some(activity), Class::Running) = (&stored.activity, stored.class) {
                    // A load first: most hits find it set and write nothing.
                    if !activity.polled.load(Ordering::Relaxed) {
                        activity.polled.store(true, Ordering::Relaxed);
                    }
                }
                Ok(Answer::new(stored, CacheStatus::Hit))
            }
            (stored, standing) => Err((stored, standing)),
        }
    }

    /// The answer for `key`: stored, shared from a fetch in flight or a recent
    /// failure, or fetched in a detached task. `request` is called only when a
    /// fetch starts, so a hit builds nothing.
    pub async fn get(
        &self,
        key: CacheKey,
        scope: Scope<'_>,
        request: impl FnOnce() -> FetchRequest,
    ) -> Result<Answer, Arc<GatewayError>> {
        let inner = &self.inner;
        let Scope { api, project, .. } = scope;
        let deadline = Instant::now() + inner.policy.load().wait_timeout;
        let mut holds = 0;
        // Built once, on the first fetch, however often the loop comes round.
        let (mut request, mut built) = (Some(request), None);
        let mut request = move || -> FetchRequest {
            built
                .get_or_insert_with(|| request.take().expect("built once")())
                .clone()
        };
        loop {
            let policy = inner.policy.load();
            let now = Instant::now();
            let (stored, standing) = match self.hit(&key, now, &policy) {
                Ok(answer) => return Ok(answer),
                Err(found) => found,
            };
            // Everything below is past a hit: the maps sit behind locks.
            // An answer past freshness that may still stand in for upstream.
            let standby = match standing {
                Some(Freshness::Revalidate | Freshness::StaleIfError) => stored.clone(),
                _ => None,
            };
            if let Some(failure) = inner.failures.recent(&key, now) {
                inner.metrics.failures_shared.inc();
                return match standby {
                    Some(stale) => Ok(Answer::stale(stale, StaleReason::UpstreamError)),
                    None => failure.answer(),
                };
            }
            // Subscribed before asking, so a probe landing in between is seen.
            let mut gate_changes = inner.backoffs.watch();
            match inner.backoffs.admit(api, project, now, policy.wait_timeout) {
                Admit::Open => {}
                Admit::Probe => {
                    inner.metrics.probes.inc();
                }
                Admit::Closed {
                    remaining,
                    cause,
                    probing,
                } => {
                    let reason = match cause {
                        Cause::Throttled => StaleReason::Throttled,
                        Cause::Failing => StaleReason::UpstreamError,
                    };
                    if let Some(stale) = standby {
                        return Ok(Answer::stale(stale, reason));
                    }
                    // Without a stale answer, hold the request while the pause
                    // ends within wait_timeout (or another request probes) and
                    // answer after the probe: the official SDKs turn any 429
                    // into an opaque error, so an answer a little late is better.
                    let left = deadline.saturating_duration_since(now);
                    if (probing || remaining <= left) && !left.is_zero() && holds < 8 {
                        holds += 1;
                        let wait = remaining.min(left);
                        let _ = tokio::time::timeout(wait, gate_changes.changed()).await;
                        continue;
                    }
                    let retry_after = remaining;
                    return Err(Arc::new(match cause {
                        Cause::Throttled => GatewayError::Throttled {
                            api: api.as_str(),
                            retry_after,
                        },
                        Cause::Failing => GatewayError::UpstreamFailing {
                            api: api.as_str(),
                            retry_after,
                        },
                    }));
                }
            }
            if let (Some(stored), Some(Freshness::Revalidate)) = (stored, standing) {
                // The refresh runs on its own; this request does not wait.
                let _ = self.join_or_start(key, scope, &mut request);
                return Ok(Answer::stale(stored, StaleReason::Revalidating));
            }
            let (waiter, leader) = match self.join_or_start(key, scope, &mut request) {
                Started::Found(stored) => return Ok(Answer::new(stored, CacheStatus::Hit)),
                Started::Refused(retry_after) => {
                    inner.metrics.consumer_refused(scope.consumer_label);
                    return Err(Arc::new(GatewayError::ConsumerOverBudget { retry_after }));
                }
                Started::Waiting(waiter, leader) => (waiter, leader),
            };
            if !leader {
                inner.metrics.coalesced.inc();
            }
            let wait = policy.wait_timeout;
            let shared = |stored| {
                let status = if leader {
                    CacheStatus::Shared
                } else {
                    CacheStatus::Coalesced
                };
                Ok(Answer::new(stored, status))
            };
            return match waiter.wait(wait).await {
                Err(WaitError::Timeout) => Err(Arc::new(GatewayError::WaitTimeout(wait))),
                Err(WaitError::Aborted) => Err(Arc::new(GatewayError::FetchAborted)),
                Ok(Outcome::Fetched(stored)) => Ok(Answer::new(
                    stored,
                    if leader {
                        CacheStatus::Miss
                    } else {
                        CacheStatus::Coalesced
                    },
                )),
                Ok(Outcome::Shared(stored)) => shared(stored),
                Ok(Outcome::Stale(stored, reason)) => Ok(Answer::stale(stored, reason)),
                Ok(Outcome::Failed(error)) => Err(error),
                // The pause now in force decides, at the top of the loop.
                Ok(Outcome::Paused) if holds < 8 => {
                    holds += 1;
                    continue;
                }
                Ok(Outcome::Paused) => Err(Arc::new(GatewayError::Throttled {
                    api: api.as_str(),
                    retry_after: policy.retry_after_default,
                })),
            };
        }
    }

    /// Joins the fetch in flight for `key`, or starts one unless a fresh
    /// answer landed meanwhile or the consumer has used up its fetch budget.
    fn join_or_start(
        &self,
        key: CacheKey,
        scope: Scope<'_>,
        request: impl FnOnce() -> FetchRequest,
    ) -> Started {
        let inner = &self.inner;
        let policy = inner.policy.load();
        let joined = inner.flights.join(key, || {
            let now = Instant::now();
            if let Some(stored) = inner.store.get(&key) {
                let age = now.duration_since(stored.stored_at);
                if matches!(
                    freshness(&policy, stored.class, age),
                    Freshness::Fresh { .. }
                ) {
                    return Some(Started::Found(stored));
                }
            }
            // Only a request that would start a fetch spends its consumer's budget.
            let rate = policy.consumer_fetch_rate?;
            let burst = f64::from(policy.consumer_fetch_burst);
            let consumer = scope.consumer.to_string();
            inner
                .consumer_budget
                .take(&consumer, rate, burst, now)
                .err()
                .map(Started::Refused)
        });
        let (leader, waiter) = match joined {
            Join::Found(started) => return started,
            Join::Follow(waiter) => return Started::Waiting(waiter, false),
            Join::Lead(leader, waiter) => (leader, waiter),
        };
        let request = request();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            // A panic below drops `leader` unsettled: the flight is aborted.
            let outcome = inner.fetch(key, request.clone(), None).await;
            let warm = match &outcome {
                Outcome::Fetched(stored) | Outcome::Shared(stored)
                    if stored.class == Class::Running =>
                {
                    stored.activity.clone().map(|a| (stored.stored_at, a))
                }
                _ => None,
            };
            leader.settle(outcome);
            if let Some((window, activity)) = warm {
                // The request is kept for the refreshes ahead of each window's end.
                inner.keep_warm(key, request, window, activity);
            }
        });
        Started::Waiting(waiter, true)
    }
}

/// What [`Cache::join_or_start`] did.
enum Started {
    /// A fresh answer landed while this request looked: no fetch needed.
    Found(Stored),
    /// The consumer may trigger no fetch for this long.
    Refused(Duration),
    /// Waiting on a flight; true if this request started it.
    Waiting(flight::Waiter<Outcome>, bool),
}

impl Inner {
    /// Stores `stored` for `key`; every insert goes through here, so that
    /// [`near`] copies of what it replaces are no longer used.
    fn put(&self, key: CacheKey, stored: Stored) {
        self.store.insert(key, stored);
        self.writes.changed();
    }

    /// Waits for the upstream budget of (API, project), when there is one:
    /// the fleet's while this replica holds the fleet lock, else its own.
    async fn spend_budget(&self, api: Api, project: &str, fleet: bool) {
        let Some(rate) = self.policy.load().upstream_rate else {
            return;
        };
        let shared = self.shared.as_ref().filter(|_| fleet);
        if let Some(shared) = shared {
            if let Some(wait) = shared.reserve(api, project, rate).await {
                if !wait.is_zero() {
                    self.metrics.budget_waits.inc();
                    tokio::time::sleep(wait).await;
                }
                return;
            }
        }
        let budget = (api, project.to_string());
        if self.upstream_budget.acquire(&budget, rate, rate).await {
            self.metrics.budget_waits.inc();
        }
    }

    /// The answer for `key` from upstream, or from the fleet when the shared
    /// tier is on: another replica's answer, pause or failure, or this
    /// replica fetches under the fleet lock and lands the result for the
    /// others. `window`: where a refresh ahead's window starts (None: now).
    async fn fetch(
        self: &Arc<Self>,
        key: CacheKey,
        request: FetchRequest,
        window: Option<Instant>,
    ) -> Outcome {
        let (api, project) = (request.api, request.project.clone());
        let (lock, alone) = match &self.shared {
            None => (None, true),
            Some(shared) => match self.ask_fleet(shared, key, &request, window).await {
                Fleet::Settled(outcome) => return outcome,
                Fleet::Fetch { lock, alone } => (lock, alone),
            },
        };
        self.spend_budget(api, &project, !alone).await;
        let result = self.origin.clone().fetch(request.clone()).await;
        let mut report = Report::default();
        let outcome = self.settle(&key, &request, result, window, &mut report);
        if let (Some(lock), Some(shared)) = (lock, self.shared.clone()) {
            // Landed on the side: this replica's waiters have their answer now.
            let landing = self.landing(&report, window);
            tokio::spawn(async move {
                shared
                    .land(lock, api, &project, landing, report.pause)
                    .await;
            });
        }
        outcome
    }

    /// What the fleet says before this replica fetches `key`: another
    /// replica's answer, pause or failure settles it here; else fetch.
    async fn ask_fleet(
        &self,
        shared: &Shared,
        key: CacheKey,
        request: &FetchRequest,
        window: Option<Instant>,
    ) -> Fleet {
        let (api, project) = (request.api, request.project.as_str());
        let policy = self.policy.load();
        let now = Instant::now();
        // A refresh ahead wants the next window's answer: one fresh well
        // into it, not the current one that ends soon.
        let need = window.map_or(Duration::ZERO, |start| {
            start.saturating_duration_since(now) + policy.running_ttl / 2
        });
        let deadline = now + policy.wait_timeout;
        let outcome = match shared.claim(key, api, project, need, deadline).await {
            Claim::Lead(lock) => {
                return Fleet::Fetch {
                    lock: Some(lock),
                    alone: false,
                }
            }
            // Alone: this replica's own budget; landed if it may hold the lock.
            Claim::Local(lock) => return Fleet::Fetch { lock, alone: true },
            Claim::Answer(stored) => self.adopt(key, request, stored),
            Claim::Paused {
                cause,
                remaining,
                standby,
            } => {
                let now = Instant::now();
                self.backoffs.adopt(api, project, now, cause, remaining);
                let reason = match cause {
                    Cause::Throttled => StaleReason::Throttled,
                    Cause::Failing => StaleReason::UpstreamError,
                };
                match self.standby(key, standby, now) {
                    Some(stale) => self.stand_in(&key, stale, reason),
                    None => Outcome::Paused,
                }
            }
            Claim::Failed {
                answer,
                remaining,
                standby,
            } => {
                let now = Instant::now();
                let failure = match answer {
                    Some(answer) => Failure::Answer(answer),
                    None => Failure::Error(Arc::new(GatewayError::UpstreamFailing {
                        api: api.as_str(),
                        retry_after: remaining,
                    })),
                };
                self.failures.insert(key, now + remaining, failure.clone());
                self.metrics.failures_shared.inc();
                match (self.standby(key, standby, now), failure) {
                    (Some(stale), _) => self.stand_in(&key, stale, StaleReason::UpstreamError),
                    (None, Failure::Answer(answer)) => Outcome::Fetched(answer),
                    (None, Failure::Error(error)) => Outcome::Failed(error),
                }
            }
            Claim::TimedOut => {
                Outcome::Failed(Arc::new(GatewayError::WaitTimeout(policy.wait_timeout)))
            }
        };
        Fleet::Settled(outcome)
    }

    /// What the fleet keeps of a fetch: the answer stored, or the failure.
    fn landing(&self, report: &Report, window: Option<Instant>) -> Landing {
        let policy = self.policy.load();
        if let Some(stored) = &report.stored {
            let fresh = policy.fresh_for(stored.class);
            let keep = match stored.class {
                Class::Terminal => Some(self.shared_terminal_ttl()),
                class => policy.keep_for(class),
            };
            let offset = window.map_or(Duration::ZERO, |w| {
                w.saturating_duration_since(Instant::now())
            });
            return Landing::Answer {
                stored: stored.clone(),
                // A finished job's answer stays fresh while Redis keeps it.
                fresh: fresh.unwrap_or(self.shared_terminal_ttl()),
                keep: keep.unwrap_or(Duration::ZERO),
                offset,
            };
        }
        match &report.failure {
            Some(answer) => Landing::Failure {
                answer: answer.clone(),
                keep: policy.error_ttl,
            },
            None => Landing::Nothing,
        }
    }

    fn shared_terminal_ttl(&self) -> Duration {
        self.shared
            .as_ref()
            .map_or(Duration::ZERO, |s| s.terminal_ttl())
    }

    /// Another replica's fresh answer: stored here, told to this replica's
    /// watchers, and kept warm here as if fetched here.
    fn adopt(&self, key: CacheKey, request: &FetchRequest, mut stored: Stored) -> Outcome {
        stored.activity = Some(self.activity(&key, request));
        self.failures.clear(&key);
        self.put(key, stored.clone());
        self.metrics.shared_hits.inc();
        self.watches
            .publish(&key, Answer::new(stored.clone(), CacheStatus::Hit));
        Outcome::Shared(stored)
    }

    /// An earlier answer to stand in while upstream is paused or failing:
    /// this replica's, else the fleet's (then kept here too).
    fn standby(&self, key: CacheKey, fleet: Option<Stored>, now: Instant) -> Option<Stored> {
        if let Some(local) = self.stale_fallback(&key, now) {
            return Some(local);
        }
        let stored = fleet?;
        let age = now.saturating_duration_since(stored.stored_at);
        if matches!(
            freshness(&self.policy.load(), stored.class, age),
            Freshness::Expired
        ) {
            return None;
        }
        self.put(key, stored.clone());
        Some(stored)
    }

    /// A stale answer standing in, told to the key's watchers.
    fn stand_in(&self, key: &CacheKey, stale: Stored, reason: StaleReason) -> Outcome {
        self.watches
            .publish(key, Answer::stale(stale.clone(), reason));
        Outcome::Stale(stale, reason)
    }

    /// What another replica said: a pause begun or ended there.
    fn heard(&self, event: FleetEvent) {
        match event {
            FleetEvent::Paused {
                api,
                project,
                cause,
                remaining,
            } => self
                .backoffs
                .adopt(api, &project, Instant::now(), cause, remaining),
            FleetEvent::Resumed { api, project } => {
                self.backoffs.succeeded(api, &project);
            }
        }
    }

    /// The job's counters: one record per key, kept by its stored answers.
    fn activity(&self, key: &CacheKey, request: &FetchRequest) -> Arc<JobActivity> {
        self.store
            .get(key)
            .and_then(|s| s.activity)
            .unwrap_or_else(|| {
                Arc::new(JobActivity::new(
                    *key,
                    request.api,
                    &request.project,
                    &request.job,
                ))
            })
    }

    /// Keeps a polled running job warm: shortly before the answer's window
    /// ends, if anyone asked for it during the window, fetches the next one
    /// in the background, so pollers never wait for upstream. One request per
    /// window, and none once nobody asks: within K × (D / TTL + 1).
    fn keep_warm(
        self: Arc<Self>,
        key: CacheKey,
        request: FetchRequest,
        mut window: Instant,
        activity: Arc<JobActivity>,
    ) {
        let (api, project) = (request.api, request.project.clone());
        tokio::spawn(async move {
            loop {
                let policy = self.policy.load_full();
                let ttl = policy.running_ttl;
                let ahead = policy.refresh_ahead.min(ttl / 2);
                if ahead.is_zero() {
                    return;
                }
                let window_end = window + ttl;
                tokio::time::sleep_until(window_end - ahead).await;
                // Nobody asked during this window and nobody watches: the
                // job goes cold.
                if !activity.polled.swap(false, Ordering::Relaxed) && !self.watches.is_watched(&key)
                {
                    return;
                }
                // Replaced meanwhile (a miss, a terminal answer): that
                // answer's own fetch keeps it warm if it is polled.
                match self.store.get(&key) {
                    Some(stored)
                        if stored.stored_at == window && stored.class == Class::Running => {}
                    _ => return,
                }
                match self
                    .backoffs
                    .admit(api, &project, Instant::now(), policy.wait_timeout)
                {
                    Admit::Open => {}
                    Admit::Probe => {
                        self.metrics.probes.inc();
                    }
                    // Paused: stale answers and backoffs take over.
                    Admit::Closed { .. } => return,
                }
                let Join::Lead(leader, _) = self.flights.join(key, || None::<()>) else {
                    return;
                };
                let mut refresh = request.clone();
                refresh.request_id = uuid::Uuid::new_v4().simple().to_string();
                self.metrics.refreshes_ahead.inc();
                let outcome = self.fetch(key, refresh, Some(window_end)).await;
                // The next window starts where this answer's does (another
                // replica's refresh may have set it).
                let landed = match &outcome {
                    Outcome::Fetched(s) | Outcome::Shared(s) if s.class == Class::Running => {
                        Some(s.stored_at)
                    }
                    _ => None,
                };
                leader.settle(outcome);
                let Some(next) = landed else {
                    return;
                };
                window = next;
            }
        });
    }

    /// Turns a fetch result into what waiters get (see [`Inner::outcome`])
    /// and tells the key's watchers: a new stored answer, or an earlier one
    /// standing in while upstream fails.
    fn settle(
        &self,
        key: &CacheKey,
        request: &FetchRequest,
        result: Result<UpstreamResponse, GatewayError>,
        window: Option<Instant>,
        report: &mut Report,
    ) -> Outcome {
        let outcome = self.outcome(key, request, result, window, report);
        let news = match &outcome {
            Outcome::Fetched(stored) if stored.class != Class::Uncacheable => {
                Some(Answer::new(stored.clone(), CacheStatus::Hit))
            }
            Outcome::Stale(stored, reason) => Some(Answer::stale(stored.clone(), *reason)),
            _ => None,
        };
        if let Some(answer) = news {
            self.watches.publish(key, answer);
        }
        outcome
    }

    /// Stores what may be stored, and tells the backoffs and the failures
    /// what happened (and `report`, for the fleet). An answer refreshed
    /// ahead starts its window where the last one ends.
    fn outcome(
        &self,
        key: &CacheKey,
        request: &FetchRequest,
        result: Result<UpstreamResponse, GatewayError>,
        window: Option<Instant>,
        report: &mut Report,
    ) -> Outcome {
        let (api, project) = (request.api, request.project.as_str());
        let activity = self.activity(key, request);
        activity.upstream.fetch_add(1, Ordering::Relaxed);
        self.activities.touch(&activity);
        let now = Instant::now();
        let policy = self.policy.load();
        // A 200 that is not a JSON object (a captive portal, a WAF page) is
        // unusable: never stored, never displacing the last good answer.
        let result = result.and_then(|response| {
            if response.status == StatusCode::OK && !is_json_object(&response.body) {
                return Err(GatewayError::Upstream {
                    api: api.as_str(),
                    source: UpstreamError::Invalid("a 200 whose body is not a JSON object".into()),
                });
            }
            Ok(response)
        });
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                let error = Arc::new(error);
                // No credential is the gateway's own trouble, not upstream's.
                if matches!(*error, GatewayError::Upstream { .. }) {
                    self.failed(key, api, project, now, Failure::Error(error.clone()));
                    report.failure = Some(None);
                    report.pause = self.pause_now(api, project, now);
                }
                return match self.stale_fallback(key, now) {
                    Some(stale) => Outcome::Stale(stale, StaleReason::UpstreamError),
                    None => Outcome::Failed(error),
                };
            }
        };
        let class = classify(api, response.status, &response.body, policy.terminal(api));
        let status = response.status;
        let mut stored = Stored::new(&response, class, window.unwrap_or(now));
        stored.activity = Some(activity);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(
                &response.headers,
                &response.body,
                SystemTime::now(),
                &policy,
            );
            self.backoffs.throttled(api, project, now, wait);
            report.pause = Some(Pause::Begin(Cause::Throttled, wait));
            stored = stored.with_retry_after(retry_after_secs(wait));
            return match self.stale_fallback(key, now) {
                Some(stale) => Outcome::Stale(stale, StaleReason::Throttled),
                None => Outcome::Fetched(stored),
            };
        }
        if status.is_server_error() {
            self.failed(key, api, project, now, Failure::Answer(stored.clone()));
            report.failure = Some(Some(stored.clone()));
            report.pause = self.pause_now(api, project, now);
            return match self.stale_fallback(key, now) {
                Some(stale) => Outcome::Stale(stale, StaleReason::UpstreamError),
                None => Outcome::Fetched(stored),
            };
        }
        if self.backoffs.succeeded(api, project) {
            report.pause = Some(Pause::End);
        }
        self.failures.clear(key);
        if class != Class::Uncacheable {
            self.put(*key, stored.clone());
            report.stored = Some(stored.clone());
        }
        Outcome::Fetched(stored)
    }

    /// The pause now in force for (API, project), to tell the fleet.
    fn pause_now(&self, api: Api, project: &str, now: Instant) -> Option<Pause> {
        let (cause, remaining) = self.backoffs.pause_of(api, project, now)?;
        Some(Pause::Begin(cause, remaining))
    }

    /// Remembers a failure for `key` and backs the API and project off.
    fn failed(&self, key: &CacheKey, api: Api, project: &str, now: Instant, failure: Failure) {
        let policy = self.policy.load();
        self.failures.insert(*key, now + policy.error_ttl, failure);
        let (base, cap) = (policy.error_ttl, policy.failure_backoff_max);
        // Jitter spreads the replicas' and projects' retries apart.
        self.backoffs.failed(api, project, now, |failures| {
            failure_backoff(failures, base, cap).mul_f64(0.5 + fastrand::f64() / 2.0)
        });
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

    /// Without refreshes ahead, which have tests of their own.
    fn policy() -> CachePolicy {
        CachePolicy {
            refresh_ahead: Duration::ZERO,
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

    pub(super) fn key(job: &str) -> CacheKey {
        let route = Route {
            api: Api::Roma,
            project: "p",
            instance: Some("i"),
            job,
        };
        CacheKey::new(&route, None, "token:main")
    }

    pub(super) fn response(status: u16, body: &str) -> UpstreamResponse {
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

    /// An upstream answering a running job after `delay`, under a cache
    /// with the default test policy.
    fn running_upstream(delay: Duration) -> (Script, Cache) {
        let up = Script::new(delay);
        let cache = up.cache(policy());
        up.then(Ok(response(200, RUNNING)));
        (up, cache)
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

        /// Replaces the script: from now on upstream answers this.
        fn now(&self, answer: Result<UpstreamResponse, GatewayError>) {
            *self.answers.lock() = vec![answer];
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
            job: "i/j".into(),
            credential: Arc::new(Credential::new(
                "main",
                CredentialSpec::Token(Origin::Env("UNUSED".into())),
                CredentialCounters::default(),
            )),
            language: None,
            request_id: "r".into(),
        }
    }

    const SCOPE: Scope = Scope {
        api: Api::Roma,
        project: "p",
        consumer: &"127.0.0.1",
        consumer_label: "by-address",
    };

    async fn get(cache: &Cache, job: &str) -> Result<Answer, Arc<GatewayError>> {
        cache.get(key(job), SCOPE, fetch_request).await
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
        let (up, cache) = running_upstream(Duration::ZERO);
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
    async fn a_polled_running_job_is_refreshed_ahead_and_pollers_never_wait() {
        let up = Script::new(Duration::from_millis(20));
        let cache = up.cache(CachePolicy {
            refresh_ahead: Duration::from_millis(250),
            ..policy()
        });
        up.then(Ok(response(200, RUNNING)));
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Miss);
        // One poller every 100 ms for D = 10 s.
        for _ in 0..100 {
            // sleep, not advance: the refresh timers run as time passes.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let asked = Instant::now();
            let answer = get(&cache, "j").await.unwrap();
            assert_eq!(answer.status, CacheStatus::Hit);
            assert_eq!(Instant::now(), asked, "never waited for upstream");
        }
        let (k, d, ttl) = (1, 10, 1);
        assert!(
            up.calls() <= k * (d / ttl + 1),
            "{} upstream requests",
            up.calls()
        );
        assert!(
            up.calls() >= 10,
            "kept warm: {} upstream requests",
            up.calls()
        );
        assert_eq!(
            cache.inner.metrics.refreshes_ahead.get() as usize,
            up.calls() - 1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_nobody_polls_any_more_is_not_refreshed_again() {
        let up = Script::new(Duration::from_millis(20));
        let cache = up.cache(CachePolicy {
            refresh_ahead: Duration::from_millis(250),
            ..policy()
        });
        up.then(Ok(response(200, RUNNING)));
        get(&cache, "j").await.unwrap();
        // Polled during the first window only.
        tokio::time::sleep(Duration::from_millis(500)).await;
        get(&cache, "j").await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            up.calls(),
            2,
            "one refresh for the polled window, none after"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_never_stored_and_never_back_off() {
        for status in [401, 403] {
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
    async fn a_failure_is_shared_for_error_ttl_and_never_stored() {
        for failure in [
            Ok(response(503, r#"{"error_code":"X"}"#)),
            Err(timeout_error()),
        ] {
            let up = Script::new(Duration::ZERO);
            let cache = up.cache(policy());
            up.then(failure);
            let first = get(&cache, "j").await;
            for _ in 0..20 {
                let shared = get(&cache, "j").await;
                match (&first, &shared) {
                    (Ok(a), Ok(b)) => {
                        assert_eq!(
                            (b.stored.status, b.status),
                            (a.stored.status, CacheStatus::Coalesced)
                        )
                    }
                    (Err(a), Err(b)) => assert_eq!(a.code(), b.code()),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(up.calls(), 1);
            assert_eq!(cache.usage().0, 0, "nothing stored");
            assert_eq!(cache.inner.metrics.failures_shared.get(), 20);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_instantly_failing_upstream_costs_no_more_than_a_healthy_one() {
        // 20 pollers of K = 1 job every 50 ms for D = 10 s, TTL 1 s.
        let (up, cache) = running_upstream(Duration::ZERO);
        get(&cache, "j").await.unwrap();
        up.now(Ok(response(503, "{}")));
        let mut stale = 0;
        for _ in 0..200 {
            for _ in 0..20 {
                let answer = get(&cache, "j").await.expect("the last good answer");
                assert_eq!(body(&answer), RUNNING);
                stale += usize::from(answer.status == CacheStatus::Stale);
            }
            tokio::time::advance(Duration::from_millis(50)).await;
        }
        let (k, d, ttl) = (1, 10, 1);
        let bound = k * (d / ttl + 1);
        assert!(
            up.calls() <= bound,
            "{} upstream requests, bound {bound}",
            up.calls()
        );
        assert_eq!(stale, 4000 - 400, "stale once the first second passed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_saying_retry_at_once_still_backs_off_for_the_floor() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(CachePolicy {
            retry_after_min: Duration::from_secs(1),
            // Shorter than the floor: requests are refused, not held.
            wait_timeout: Duration::from_millis(500),
            ..policy()
        });
        let mut throttled = response(429, "{}");
        throttled
            .headers
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("0"));
        up.then(Ok(throttled));
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(answer.stored.retry_after().unwrap(), "1");
        for _ in 0..50 {
            let err = get(&cache, "other").await.unwrap_err();
            assert!(matches!(*err, GatewayError::Throttled { .. }), "{err}");
        }
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn when_a_backoff_ends_one_request_probes_and_the_rest_keep_their_stale_answer() {
        let (up, cache) = running_upstream(Duration::from_millis(100));
        get(&cache, "j").await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        up.now(Ok(response(429, "{}")));
        assert_eq!(get(&cache, "j").await.unwrap().status, CacheStatus::Stale);
        // The 3 s default backoff passes; 100 pollers arrive at once.
        tokio::time::advance(Duration::from_secs(3)).await;
        up.now(Ok(response(200, RUNNING)));
        let pollers: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { get(&cache, "j").await.unwrap() })
            })
            .collect();
        let mut stale = 0;
        for poller in pollers {
            let answer = poller.await.unwrap();
            stale += usize::from(answer.stale == Some(StaleReason::Throttled));
        }
        assert_eq!(up.calls(), 3, "one probe");
        assert_eq!(stale, 99);
        assert_eq!(cache.inner.metrics.probes.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_html_200_never_displaces_the_last_good_answer() {
        let (up, cache) = running_upstream(Duration::ZERO);
        get(&cache, "j").await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        up.now(Ok(response(200, "<html>Please log in to the Wi-Fi</html>")));
        let answer = get(&cache, "j").await.unwrap();
        assert_eq!(
            (answer.status, body(&answer)),
            (CacheStatus::Stale, Bytes::from(RUNNING))
        );
        assert_eq!(answer.stale, Some(StaleReason::UpstreamError));
        // Without an earlier answer it is an unusable answer, 502.
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(policy());
        up.then(Ok(response(200, "<html>Please log in to the Wi-Fi</html>")));
        let err = get(&cache, "j").await.unwrap_err();
        assert_eq!((err.status().as_u16(), err.code()), (502, "PGW.5021"));
        assert_eq!(cache.usage().0, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_over_its_fetch_budget_is_refused_without_touching_upstream() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(CachePolicy {
            consumer_fetch_rate: Some(1.0),
            consumer_fetch_burst: 2,
            ..policy()
        });
        up.then(Ok(response(200, RUNNING)));
        let greedy = Scope {
            consumer: &"10.0.0.1",
            ..SCOPE
        };
        for job in ["a", "b"] {
            cache.get(key(job), greedy, fetch_request).await.unwrap();
        }
        let err = cache
            .get(key("c"), greedy, fetch_request)
            .await
            .unwrap_err();
        assert_eq!((err.status().as_u16(), err.code()), (429, "PGW.4291"));
        // Hits stay free, and other consumers are untouched.
        cache.get(key("a"), greedy, fetch_request).await.unwrap();
        let polite = Scope {
            consumer: &"10.0.0.2",
            ..SCOPE
        };
        assert_eq!(
            cache
                .get(key("c"), polite, fetch_request)
                .await
                .unwrap()
                .status,
            CacheStatus::Miss
        );
        assert_eq!(up.calls(), 3);
        assert_eq!(cache.backoffs_in_force(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_upstream_budget_is_never_exceeded() {
        let up = Script::new(Duration::ZERO);
        let cache = up.cache(CachePolicy {
            upstream_rate: Some(5.0),
            ..policy()
        });
        up.then(Ok(response(200, RUNNING)));
        let started = Instant::now();
        let misses: Vec<_> = (0..15)
            .map(|i| {
                let cache = cache.clone();
                tokio::spawn(async move { get(&cache, &format!("job{i}")).await.unwrap() })
            })
            .collect();
        for miss in misses {
            assert_eq!(miss.await.unwrap().status, CacheStatus::Miss);
        }
        // 5 at once, then 10 more at 5 per second.
        assert_eq!(Instant::now() - started, Duration::from_secs(2));
        assert_eq!(up.calls(), 15);
        assert!(cache.inner.metrics.budget_waits.get() >= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_fetch() {
        let (up, cache) = running_upstream(Duration::from_millis(20));
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
        let (up, cache) = running_upstream(Duration::from_secs(8));
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
        // Waits shorter than the backoff: requests are refused, not held.
        let cache = up.cache(CachePolicy {
            wait_timeout: Duration::from_secs(1),
            ..policy()
        });
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
        assert_eq!(cache.backoffs_in_force(), (1, 0));
        assert_eq!(cache.usage().0, 0);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(cache.backoffs_in_force(), (0, 0));
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
