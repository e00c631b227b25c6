//! The shared tier: answers, the fleet lock, pauses and the upstream budget
//! in Redis, so that a fleet of replicas costs upstream what one gateway
//! costs. Off unless `[shared] redis_url` is set.
//!
//! The local store stays the first tier; Redis is asked only where a replica
//! would otherwise fetch (once per key and window, by the local flight's
//! leader). One script, `CLAIM`, answers with the first that applies:
//! - a fresh answer another replica stored (`Cache-Status: …; detail=shared`);
//! - a pause in force for the API and project (a 429 or failures anywhere);
//! - a failure recorded for the key within its `error_ttl`;
//! - the fleet lock for the key (`SET NX PX`), so this replica fetches;
//! - otherwise: wait. Waiters wake on the lock holder's message on the
//!   fleet channel and ask again every `recheck` in case a message was lost
//!   (a lost message costs a short delay, never a second fetch). When the
//!   holder vanished, its lock expires and the next one to ask takes over.
//!
//! The holder lands its result with `LAND`: stores the answer (or the
//! failure, or the pause), releases the lock if it is still its own token,
//! and publishes. Times are Redis's (`TIME`), so replicas' clocks need not
//! agree, and a window start travels as an age, which each replica turns into
//! its own clock.
//!
//! Nothing secret goes to Redis: keys are the local cache keys' SHA-256
//! digests (which include the credential's principal), values are answers
//! already scrubbed of credentials, project IDs and timings.
//!
//! Redis trouble never fails a request. Every call has a deadline of
//! `call_timeout`; after `breaker_failures` failures in a row the replica is
//! local-only for `breaker_cooldown`, then one call probes. Local-only means
//! exactly the single-gateway behaviour: one fetch per key per window per
//! replica.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisResult, Script, Value};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Cause;
use super::key::CacheKey;
use super::stored::Stored;
use crate::credentials::{Origin, Secret, SecretSource};
use crate::metrics::Metrics;
use crate::route::Api;

/// `[shared]`: where the fleet's Redis is and how patient to be with it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    /// `redis://host:port/db` or `rediss://` for TLS; empty: no shared tier.
    pub redis_url: String,
    /// Where the password is read from (never the URL).
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// With `rediss://`: the CA certificate(s) (PEM) the server's certificate
    /// must chain to, as Huawei DCS offers for download; else the system's
    /// and the Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Prefixes every key and the channel, so fleets can share one Redis.
    pub key_prefix: String,
    /// Deadline of every Redis call; past it the replica acts alone.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How long a fleet lock lives if its holder never releases it; also
    /// how long waiters wait for a vanished holder. Default: the upstream
    /// `request_timeout` plus one second, so a slow fetch keeps its lock.
    #[serde(with = "humantime_serde::option")]
    pub lock_ttl: Option<Duration>,
    /// How often a waiter asks again if no message came.
    #[serde(with = "humantime_serde")]
    pub recheck: Duration,
    /// Failed calls in a row that switch the replica to local-only...
    pub breaker_failures: u32,
    /// ...for this long, before one call probes Redis again.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// How long Redis keeps a finished job's answer.
    #[serde(with = "humantime_serde")]
    pub terminal_ttl: Duration,
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            redis_url: String::new(),
            password_env: None,
            password_file: None,
            ca_file: None,
            key_prefix: "pgw:".into(),
            call_timeout: Duration::from_millis(50),
            lock_ttl: None,
            recheck: Duration::from_millis(200),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(2),
            terminal_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl SharedConfig {
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }

    /// Checks the URL without connecting; the message never repeats it,
    /// since a URL may carry what should not be in a log.
    pub fn check_url(&self) -> Result<(), &'static str> {
        let info = self
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(|_| "is not a redis:// or rediss:// URL")?;
        if info.redis_settings().password().is_some() {
            return Err("must not hold a password: use password_env or password_file");
        }
        if self.ca_file.is_some() && !self.redis_url.starts_with("rediss:") {
            return Err("must be rediss:// when ca_file is set");
        }
        Ok(())
    }
}

/// The shared tier's state, for `/readyz`, the metrics and the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedState {
    /// Redis has not answered yet since start (requests go on alone meanwhile
    /// when a call fails).
    Connecting,
    /// Calls succeed (or none failed lately): fleet-wide guarantees.
    Up,
    /// The breaker is open: this replica acts alone until a probe succeeds.
    LocalOnly,
}

impl SharedState {
    pub fn as_str(self) -> &'static str {
        match self {
            SharedState::Connecting => "connecting",
            SharedState::Up => "up",
            SharedState::LocalOnly => "local-only",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared.redis_url is not usable")]
    Url(#[source] redis::RedisError),
    #[error("the Redis password could not be read")]
    Password(#[source] crate::credentials::CredentialError),
    #[error("shared.ca_file {} cannot be read", .0.display())]
    CaFile(PathBuf, #[source] std::io::Error),
}

/// What the fleet says about a key this replica would fetch.
#[derive(Debug)]
pub enum Claim {
    /// A fresh answer another replica stored.
    Answer(Stored),
    /// The API and project are paused fleet-wide for `remaining`.
    Paused {
        cause: Cause,
        remaining: Duration,
        standby: Option<Stored>,
    },
    /// Another replica's fetch failed moments ago: the 5xx answer it got
    /// (None: no answer at all) shared for `remaining`.
    Failed {
        answer: Option<Stored>,
        remaining: Duration,
        standby: Option<Stored>,
    },
    /// This replica holds the fleet lock: fetch, then [`Shared::land`].
    Lead(Lock),
    /// Redis cannot tell now: act alone. With a lock when a call failed
    /// without an answer: it may have taken the lock all the same, so the
    /// result is landed anyway (releasing it, waking the others).
    Local(Option<Lock>),
    /// Another replica held the lock past the deadline.
    TimedOut,
}

/// The fleet lock for one key, released by [`Shared::land`].
#[derive(Debug)]
pub struct Lock {
    key: CacheKey,
    token: String,
}

/// What a fetch under the lock leaves for the fleet.
#[derive(Debug)]
pub enum Landing {
    /// Kept `keep` in Redis, fresh for `fresh`, its window starting `offset`
    /// from now (ahead of now for a refresh ahead).
    Answer {
        stored: Stored,
        fresh: Duration,
        keep: Duration,
        offset: Duration,
    },
    /// A failure shared for `keep` (the 5xx answer, or None).
    Failure {
        answer: Option<Stored>,
        keep: Duration,
    },
    /// Nothing worth sharing (an answer never stored).
    Nothing,
}

/// A pause to apply fleet-wide, or a pause to lift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    Begin(Cause, Duration),
    End,
}

/// What other replicas tell this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    Paused {
        api: Api,
        project: String,
        cause: Cause,
        remaining: Duration,
    },
    Resumed {
        api: Api,
        project: String,
    },
}

/// Returns, first that applies: `{'answer', age_ms, data}`, `{'paused',
/// pttl, cause, age_ms, data}`, `{'failed', pttl, failure, age_ms, data}`,
/// `{'lead'}` or `{'wait', pttl}`. The answer counts as fresh only if it
/// stays fresh for ARGV[3] ms more (a refresh ahead needs the next window's).
/// KEYS: answer, lock, pause, failure. ARGV: token, lock ms, need ms.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = redis.call('HMGET', KEYS[1], 'at', 'fresh', 'data')
local age = 0
if a[1] then
  age = now - tonumber(a[1])
  if tonumber(a[1]) + tonumber(a[2]) > now + tonumber(ARGV[3]) then
    return {'answer', age, a[3]}
  end
end
local standby = a[3] or ''
local cause = redis.call('GET', KEYS[3])
if cause then
  return {'paused', redis.call('PTTL', KEYS[3]), cause, age, standby}
end
local failure = redis.call('GET', KEYS[4])
if failure then
  return {'failed', redis.call('PTTL', KEYS[4]), failure, age, standby}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'lead'}
end
return {'wait', redis.call('PTTL', KEYS[2])}
";

/// Lands a fetch's result, releases the lock if still held by ARGV[1], and
/// publishes. KEYS: answer, lock, pause, failure. ARGV: token, mode
/// (answer|failure|none), data, fresh ms, keep ms, window offset ms, pause
/// (cause, `end` or empty), pause ms, channel, key message, pause message.
const LAND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == 'answer' then
  redis.call('HSET', KEYS[1], 'at', now + tonumber(ARGV[6]), 'fresh', ARGV[4], 'data', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('DEL', KEYS[4])
elseif ARGV[2] == 'failure' then
  redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[5])
end
if ARGV[7] == 'end' then
  redis.call('DEL', KEYS[3])
elseif ARGV[7] ~= '' then
  redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[8])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
redis.call('PUBLISH', ARGV[9], ARGV[10])
if ARGV[11] ~= '' then
  redis.call('PUBLISH', ARGV[9], ARGV[11])
end
return 1
";

/// The upstream budget as a GCRA reservation in Redis's clock: returns the
/// microseconds to wait before the reserved request may go. KEYS: budget.
/// ARGV: microseconds per request, burst.
const BUDGET: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now) + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return math.max(0, tat - now - tonumber(ARGV[2]) * interval)
";

/// Opens after `threshold` failures in a row, for `cooldown`; then lets one
/// call probe (half-open) and closes on its success.
#[derive(Debug)]
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    /// parking_lot: held for a comparison; never across an await.
    state: Mutex<BreakerState>,
}

#[derive(Debug, Clone, Copy)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    /// Until then no call goes to Redis.
    Open {
        until: Instant,
    },
    /// One call probes; past `until` another may (the probe was dropped).
    Probing {
        until: Instant,
    },
}

impl Breaker {
    fn allow(&self, now: Instant, probe_for: Duration) -> bool {
        let mut state = self.state.lock();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::Probing { until } if now >= until => {
                *state = BreakerState::Probing {
                    until: now + probe_for,
                };
                true
            }
            _ => false,
        }
    }

    fn succeeded(&self) {
        *self.state.lock() = BreakerState::Closed { failures: 0 };
    }

    fn failed(&self, now: Instant) {
        let mut state = self.state.lock();
        let failures = match *state {
            BreakerState::Closed { failures } => failures + 1,
            _ => self.threshold,
        };
        *state = if failures >= self.threshold {
            BreakerState::Open {
                until: now + self.cooldown,
            }
        } else {
            BreakerState::Closed { failures }
        };
    }

    fn is_open(&self) -> bool {
        !matches!(*self.state.lock(), BreakerState::Closed { .. })
    }
}

/// The connection to the fleet's Redis. Cloning is not needed: the cache
/// holds it in an `Arc`.
pub struct Shared {
    /// Reconnects by itself; built lazily so a replica starts with Redis down.
    redis: ConnectionManager,
    /// For the subscriber's own connection.
    client: redis::Client,
    prefix: String,
    channel: String,
    call_timeout: Duration,
    lock_ttl: Duration,
    recheck: Duration,
    terminal_ttl: Duration,
    breaker: Breaker,
    /// Keys this replica waits on, woken by the channel's messages.
    /// parking_lot: held to insert, remove or look up; never across an await.
    waiting: Mutex<HashMap<CacheKey, Arc<Notify>>>,
    /// Tags this replica's messages, so it ignores its own.
    replica: String,
    subscribed: AtomicBool,
    /// Redis has answered at least once.
    reached: AtomicBool,
    claim: Script,
    land: Script,
    budget: Script,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    /// Held, not read: while it lives, the redactor scrubs it from every
    /// log line and answer (it only knows secrets that are alive).
    _password: Option<Secret>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Shared {
    /// Builds the client without connecting (Redis may be down at start).
    /// `request_timeout` is upstream's, the default for `lock_ttl`.
    pub fn new(
        config: &SharedConfig,
        request_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Shared, SharedError> {
        let mut info = config
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(SharedError::Url)?;
        let origin = match (&config.password_env, &config.password_file) {
            (Some(var), _) => Some(Origin::Env(var.clone())),
            (None, Some(path)) => Some(Origin::File(path.clone())),
            (None, None) => None,
        };
        let password = match origin {
            Some(origin) => Some(
                SecretSource::new(origin)
                    .current()
                    .map_err(SharedError::Password)?,
            ),
            None => None,
        };
        if let Some(password) = &password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        if config.redis_url.starts_with("rediss:") {
            // rustls needs a process-wide provider; the gateway uses ring.
            let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        }
        let client = match &config.ca_file {
            Some(path) => {
                let root_cert =
                    std::fs::read(path).map_err(|e| SharedError::CaFile(path.clone(), e))?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(info, certificates)
            }
            None => redis::Client::open(info),
        }
        .map_err(SharedError::Url)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager)
            .map_err(SharedError::Url)?;
        metrics.shared_state.set(1);
        Ok(Shared {
            redis,
            client,
            prefix: config.key_prefix.clone(),
            channel: format!("{}fleet", config.key_prefix),
            call_timeout: config.call_timeout,
            lock_ttl: config
                .lock_ttl
                .unwrap_or(request_timeout + Duration::from_secs(1)),
            recheck: config.recheck,
            terminal_ttl: config.terminal_ttl,
            breaker: Breaker {
                threshold: config.breaker_failures.max(1),
                cooldown: config.breaker_cooldown,
                state: Mutex::new(BreakerState::Closed { failures: 0 }),
            },
            waiting: Mutex::default(),
            replica: uuid::Uuid::new_v4().simple().to_string(),
            subscribed: AtomicBool::new(false),
            reached: AtomicBool::new(false),
            claim: Script::new(CLAIM),
            land: Script::new(LAND),
            budget: Script::new(BUDGET),
            metrics,
            stop: CancellationToken::new(),
            _password: password,
        })
    }

    /// How long Redis keeps a finished job's answer.
    pub fn terminal_ttl(&self) -> Duration {
        self.terminal_ttl
    }

    pub fn state(&self) -> SharedState {
        if self.breaker.is_open() {
            SharedState::LocalOnly
        } else if !self.reached.load(Ordering::Relaxed) {
            SharedState::Connecting
        } else {
            SharedState::Up
        }
    }

    /// Whether the subscriber is connected (waiters then wake by message).
    pub fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    /// Subscribes to the fleet channel until the tier is dropped, and hands
    /// other replicas' pauses to `on_event`. Reconnects after a second.
    /// Also connects at once (so the first request finds the connection
    /// made and the scripts loaded), and probes Redis while the breaker is
    /// open, so the fleet is whole again soon after Redis returns, before
    /// any request needs it.
    pub fn listen(self: &Arc<Self>, on_event: impl Fn(FleetEvent) + Send + Sync + 'static) {
        let shared = Arc::downgrade(self);
        let (probing, stop) = (shared.clone(), self.stop.clone());
        let every = (self.breaker.cooldown / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            let mut warm = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let Some(shared) = probing.upgrade() else {
                    return;
                };
                if !warm || shared.breaker.is_open() {
                    warm = shared.warm_up().await;
                }
            }
        });
        let (client, channel, stop) =
            (self.client.clone(), self.channel.clone(), self.stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let connect = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    RedisResult::Ok(pubsub)
                };
                if let Ok(Ok(pubsub)) = tokio::time::timeout(Duration::from_secs(1), connect).await
                {
                    let mut messages = pubsub.into_on_message();
                    set_subscribed(&shared, true);
                    loop {
                        let message = tokio::select! {
                            _ = stop.cancelled() => return,
                            message = messages.next() => message,
                        };
                        let Some(message) = message else { break };
                        let Some(shared) = shared.upgrade() else {
                            return;
                        };
                        if let Some(event) = shared.heard(message.get_payload_bytes()) {
                            on_event(event);
                        }
                    }
                    set_subscribed(&shared, false);
                }
                let pause = Duration::from_millis(500 + fastrand::u64(..500));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        });
    }

    /// Pings Redis and loads the scripts; true if Redis answered.
    async fn warm_up(&self) -> bool {
        let mut redis = self.redis.clone();
        let ping = async move { redis::cmd("PING").query_async::<()>(&mut redis).await };
        if self.call(ping).await.ok().is_none() {
            return false;
        }
        for script in [&self.claim, &self.land, &self.budget] {
            let mut redis = self.redis.clone();
            let load = script.prepare_invoke();
            let _ = tokio::time::timeout(self.call_timeout, load.load_async(&mut redis)).await;
        }
        true
    }

    /// One message from the channel: wakes a waiter, or is a pause to apply.
    fn heard(&self, payload: &[u8]) -> Option<FleetEvent> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.splitn(6, ' ');
        let (kind, from) = (parts.next()?, parts.next()?);
        match kind {
            "L" => {
                let key = CacheKey::from_hex(parts.next()?)?;
                if let Some(notify) = self.waiting.lock().get(&key) {
                    notify.notify_waiters();
                }
                None
            }
            _ if from == self.replica => None,
            "P" => {
                let api = api_named(parts.next()?)?;
                let cause = cause_named(parts.next()?)?;
                let remaining = Duration::from_millis(parts.next()?.parse().ok()?);
                let project = parts.next()?.to_string();
                Some(FleetEvent::Paused {
                    api,
                    project,
                    cause,
                    remaining,
                })
            }
            "R" => Some(FleetEvent::Resumed {
                api: api_named(parts.next()?)?,
                project: parts.next()?.to_string(),
            }),
            _ => None,
        }
    }

    /// Asks the fleet what to do about `key`, waiting while another replica
    /// fetches it, until `deadline`. `need`: how long the answer must stay
    /// fresh to count (zero for a miss).
    pub async fn claim(
        &self,
        key: CacheKey,
        api: Api,
        project: &str,
        need: Duration,
        deadline: Instant,
    ) -> Claim {
        let keys = self.keys(key, api, project);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let notify = self.waiting.lock().entry(key).or_default().clone();
        let _forget = Forget(self, key);
        // Whether this replica waited, and whether the holder said it was done.
        let (mut waited, mut landed) = (false, false);
        loop {
            // Enabled before asking, so a message landing in between counts.
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let mut invocation = self.claim.prepare_invoke();
            for k in &keys {
                invocation.key(k);
            }
            invocation
                .arg(&token)
                .arg(millis(self.lock_ttl))
                .arg(millis(need));
            let mut redis = self.redis.clone();
            let call = self
                .call(async move { invocation.invoke_async::<Vec<Value>>(&mut redis).await })
                .await;
            let reply = match call {
                Call::Answered(reply) => reply,
                Call::Failed => return Claim::Local(Some(Lock { key, token })),
                Call::Skipped => return Claim::Local(None),
            };
            let now = Instant::now();
            let Some(reply) = Reply::parse(&reply, now) else {
                return Claim::Local(None);
            };
            match reply {
                Reply::Settled(claim) => return claim,
                Reply::Lead => {
                    if waited && !landed {
                        // The holder vanished without landing: its lock expired.
                        self.metrics.shared_takeovers.inc();
                    }
                    return Claim::Lead(Lock { key, token });
                }
                Reply::Wait(lock_left) => {
                    if !waited {
                        waited = true;
                        self.metrics.shared_waits.inc();
                    }
                    if now >= deadline {
                        return Claim::TimedOut;
                    }
                    // Until the message, the next recheck, the lock's expiry
                    // (a takeover) or the deadline, whichever comes first.
                    let pause = self
                        .recheck
                        .min(deadline - now)
                        .min(lock_left + Duration::from_millis(1));
                    landed = tokio::select! {
                        _ = woken => true,
                        _ = tokio::time::sleep(pause) => false,
                    };
                }
            }
        }
    }

    /// Lands the fetch made under `lock`, applies `pause` fleet-wide, and
    /// wakes the replicas waiting for it. Best effort: if Redis fails now,
    /// the others take over when the lock expires.
    pub async fn land(
        &self,
        lock: Lock,
        api: Api,
        project: &str,
        landing: Landing,
        pause: Option<Pause>,
    ) {
        let (mode, data, fresh, keep, offset) = match landing {
            Landing::Answer {
                stored,
                fresh,
                keep,
                offset,
            } => ("answer", stored.encode(), fresh, keep, offset),
            Landing::Failure { answer, keep } => {
                let data = answer.map_or_else(Vec::new, |a| a.encode());
                ("failure", data, Duration::ZERO, keep, Duration::ZERO)
            }
            Landing::Nothing => (
                "none",
                Vec::new(),
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO,
            ),
        };
        // PX 0 would be refused: a zero keep shares nothing.
        let mode = if keep.is_zero() { "none" } else { mode };
        let (pause_arg, pause_ms, pause_message) = match pause {
            Some(Pause::Begin(cause, wait)) => (
                cause.as_str(),
                millis(wait).max(1),
                format!(
                    "P {} {} {} {} {project}",
                    self.replica,
                    api.as_str(),
                    cause.as_str(),
                    millis(wait)
                ),
            ),
            Some(Pause::End) => (
                "end",
                0,
                format!("R {} {} {project}", self.replica, api.as_str()),
            ),
            None => ("", 0, String::new()),
        };
        let mut invocation = self.land.prepare_invoke();
        for k in self.keys(lock.key, api, project) {
            invocation.key(k);
        }
        invocation
            .arg(&lock.token)
            .arg(mode)
            .arg(data)
            .arg(millis(fresh))
            .arg(millis(keep))
            .arg(millis(offset))
            .arg(pause_arg)
            .arg(pause_ms)
            .arg(&self.channel)
            .arg(format!("L {} {}", self.replica, lock.key.hex()))
            .arg(pause_message);
        let mut redis = self.redis.clone();
        self.call(async move { invocation.invoke_async::<Value>(&mut redis).await })
            .await;
    }

    /// Reserves one upstream request under the fleet's `rate` for (API,
    /// project): how long to wait before sending it, or None if Redis
    /// cannot tell (the replica's own budget applies then).
    pub async fn reserve(&self, api: Api, project: &str, rate: f64) -> Option<Duration> {
        let key = format!("{}r:{}:{project}", self.prefix, api.as_str());
        let interval = (1e6 / rate.max(1e-3)).round() as u64;
        let burst = rate.max(1.0).floor() as u64;
        let mut invocation = self.budget.prepare_invoke();
        invocation.key(key).arg(interval).arg(burst);
        let mut redis = self.redis.clone();
        let wait = self
            .call(async move { invocation.invoke_async::<u64>(&mut redis).await })
            .await
            .ok()?;
        Some(Duration::from_micros(wait))
    }

    /// Runs one Redis call within its deadline, through the breaker.
    async fn call<T>(&self, call: impl Future<Output = RedisResult<T>>) -> Call<T> {
        let now = Instant::now();
        if !self.breaker.allow(now, self.call_timeout * 2) {
            return Call::Skipped;
        }
        let result = tokio::time::timeout(self.call_timeout, call).await;
        match result {
            Ok(Ok(value)) => {
                if self.breaker.is_open() {
                    tracing::info!("shared tier: Redis answers again; fleet-wide once more");
                }
                self.breaker.succeeded();
                self.reached.store(true, Ordering::Relaxed);
                self.metrics.shared_state.set(1);
                Call::Answered(value)
            }
            failure => {
                self.metrics.shared_errors.inc();
                let was_open = self.breaker.is_open();
                self.breaker.failed(Instant::now());
                if self.breaker.is_open() {
                    self.metrics.shared_state.set(2);
                    if !was_open {
                        let why = match failure {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {:?}", self.call_timeout),
                        };
                        tracing::warn!(error = %why, "shared tier: Redis failing; this replica acts alone for now");
                    }
                }
                Call::Failed
            }
        }
    }

    /// answer, lock, pause and failure keys of `key`.
    fn keys(&self, key: CacheKey, api: Api, project: &str) -> [String; 4] {
        let (p, hex) = (&self.prefix, key.hex());
        [
            format!("{p}a:{hex}"),
            format!("{p}l:{hex}"),
            format!("{p}p:{}:{project}", api.as_str()),
            format!("{p}f:{hex}"),
        ]
    }
}

/// How a Redis call went.
enum Call<T> {
    Answered(T),
    /// Failed or past its deadline: it may have run all the same.
    Failed,
    /// Not made: the breaker is open.
    Skipped,
}

impl<T> Call<T> {
    fn ok(self) -> Option<T> {
        match self {
            Call::Answered(value) => Some(value),
            _ => None,
        }
    }
}

fn set_subscribed(shared: &std::sync::Weak<Shared>, on: bool) {
    if let Some(shared) = shared.upgrade() {
        shared.subscribed.store(on, Ordering::Relaxed);
    }
}

/// Drops a key's wake-up entry when its waiter is done.
struct Forget<'a>(&'a Shared, CacheKey);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.waiting.lock().remove(&self.1);
    }
}

/// [`CLAIM`]'s reply, decoded; None if it makes no sense (then act alone).
enum Reply {
    /// An answer, a pause or a failure: what the claim comes to.
    Settled(Claim),
    /// The lock is this replica's.
    Lead,
    /// Another replica holds the lock for this long.
    Wait(Duration),
}

impl Reply {
    fn parse(reply: &[Value], now: Instant) -> Option<Reply> {
        let bytes = |i: usize| match reply.get(i) {
            Some(Value::BulkString(b)) => Some(b.as_slice()),
            _ => None,
        };
        let int = |i: usize| match reply.get(i) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        };
        // An answer's window start, from its age in Redis's clock; negative
        // for a refresh landed ahead of its window.
        let answer = |age: i64, data: &[u8]| {
            let offset = Duration::from_millis(age.unsigned_abs());
            let at = if age < 0 {
                now + offset
            } else {
                now.checked_sub(offset).unwrap_or(now)
            };
            Stored::decode(data, at)
        };
        let standby = |i: usize| answer(int(i)?, bytes(i + 1).filter(|d| !d.is_empty())?);
        let remaining = |i: usize| Duration::from_millis(int(i).unwrap_or(0).max(0) as u64);
        Some(match bytes(0)? {
            b"answer" => Reply::Settled(Claim::Answer(answer(int(1)?, bytes(2)?)?)),
            b"paused" => Reply::Settled(Claim::Paused {
                remaining: remaining(1),
                cause: cause_named(std::str::from_utf8(bytes(2)?).ok()?)?,
                standby: standby(3),
            }),
            b"failed" => Reply::Settled(Claim::Failed {
                remaining: remaining(1),
                answer: bytes(2)
                    .filter(|d| !d.is_empty())
                    .and_then(|d| Stored::decode(d, now)),
                standby: standby(3),
            }),
            b"lead" => Reply::Lead,
            b"wait" => Reply::Wait(remaining(1)),
            _ => return None,
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn api_named(name: &str) -> Option<Api> {
    match name {
        "drs" => Some(Api::Drs),
        "roma" => Some(Api::Roma),
        _ => None,
    }
}

fn cause_named(name: &str) -> Option<Cause> {
    match name {
        "throttled" => Some(Cause::Throttled),
        "failing" => Some(Cause::Failing),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Class;
    use crate::upstream::UpstreamResponse;

    fn shared() -> Shared {
        let config = SharedConfig {
            redis_url: "redis://127.0.0.1:9/0".into(),
            ..SharedConfig::default()
        };
        Shared::new(&config, Duration::from_secs(10), Arc::default()).unwrap()
    }

    fn encoded() -> Vec<u8> {
        let response = UpstreamResponse {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(br#"{"status":"RUNNING"}"#),
        };
        Stored::new(&response, Class::Running, Instant::now()).encode()
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_after_failures_in_a_row_then_lets_one_probe_through() {
        let breaker = Breaker {
            threshold: 3,
            cooldown: Duration::from_secs(2),
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        };
        let probe = Duration::from_millis(100);
        let now = Instant::now();
        breaker.failed(now);
        breaker.failed(now);
        breaker.succeeded();
        breaker.failed(now);
        breaker.failed(now);
        assert!(!breaker.is_open(), "a success in between resets the count");
        breaker.failed(now);
        assert!(breaker.is_open());
        assert!(!breaker.allow(now + Duration::from_millis(1999), probe));
        let later = now + Duration::from_secs(2);
        assert!(breaker.allow(later, probe), "one probe after the cooldown");
        assert!(!breaker.allow(later, probe), "only one");
        assert!(
            breaker.allow(later + probe, probe),
            "another if the probe vanished"
        );
        breaker.failed(later + probe);
        assert!(
            !breaker.allow(later + probe, probe),
            "a failed probe opens it again"
        );
        assert!(breaker.allow(later + probe + Duration::from_secs(2), probe));
        breaker.succeeded();
        assert!(!breaker.is_open());
    }

    #[test]
    fn claim_replies_are_decoded_into_local_time_and_nonsense_is_refused() {
        let now = Instant::now() + Duration::from_secs(60);
        let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
        let answer = Reply::parse(&[bulk(b"answer"), Value::Int(1500), bulk(&encoded())], now);
        let Some(Reply::Settled(Claim::Answer(stored))) = answer else {
            panic!("an answer")
        };
        assert_eq!(now - stored.stored_at, Duration::from_millis(1500));
        // A refresh landed ahead: its window starts later.
        let ahead = Reply::parse(&[bulk(b"answer"), Value::Int(-200), bulk(&encoded())], now);
        let Some(Reply::Settled(Claim::Answer(stored))) = ahead else {
            panic!("an answer")
        };
        assert_eq!(stored.stored_at - now, Duration::from_millis(200));
        let paused = [
            bulk(b"paused"),
            Value::Int(4000),
            bulk(b"throttled"),
            Value::Int(0),
            bulk(b""),
        ];
        let Some(Reply::Settled(Claim::Paused {
            cause,
            remaining,
            standby,
        })) = Reply::parse(&paused, now)
        else {
            panic!("a pause")
        };
        assert_eq!(
            (cause, remaining),
            (Cause::Throttled, Duration::from_secs(4))
        );
        assert!(standby.is_none());
        assert!(Reply::parse(&[bulk(b"answer"), Value::Int(0), bulk(b"junk")], now).is_none());
        assert!(Reply::parse(&[bulk(b"paused"), Value::Int(1), bulk(b"bored")], now).is_none());
        assert!(Reply::parse(&[bulk(b"what")], now).is_none());
        assert!(Reply::parse(&[], now).is_none());
    }

    #[tokio::test]
    async fn messages_wake_waiters_and_pauses_from_others_are_applied_but_not_our_own() {
        let shared = shared();
        let key = CacheKey::from_hex(&"ab".repeat(16)).unwrap();
        let notify = shared.waiting.lock().entry(key).or_default().clone();
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        assert_eq!(
            shared.heard(format!("L other {}", key.hex()).as_bytes()),
            None
        );
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("the waiter is woken");
        assert_eq!(
            shared.heard(b"P other roma throttled 3000 0123abcd"),
            Some(FleetEvent::Paused {
                api: Api::Roma,
                project: "0123abcd".into(),
                cause: Cause::Throttled,
                remaining: Duration::from_secs(3),
            })
        );
        let own = format!("P {} roma throttled 3000 0123abcd", shared.replica);
        assert_eq!(shared.heard(own.as_bytes()), None);
        assert_eq!(
            shared.heard(b"R other drs p1"),
            Some(FleetEvent::Resumed {
                api: Api::Drs,
                project: "p1".into()
            })
        );
        for junk in [
            &b"P other nope throttled 1 p"[..],
            b"X",
            b"",
            b"L other zz",
            &[0xff, 0xfe],
        ] {
            assert_eq!(shared.heard(junk), None);
        }
    }

    #[tokio::test]
    async fn the_redis_password_is_scrubbed_from_text_while_the_tier_lives() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis-password");
        std::fs::write(&file, "redis-pass-5d0c8e1f\n").unwrap();
        let config = SharedConfig {
            redis_url: "redis://127.0.0.1:9/0".into(),
            password_file: Some(file),
            ..SharedConfig::default()
        };
        let shared = Shared::new(&config, Duration::from_secs(10), Arc::default()).unwrap();
        let line = "WRONGPASS for redis-pass-5d0c8e1f";
        assert!(!crate::credentials::redact(line).contains("redis-pass-5d0c8e1f"));
        drop(shared);
    }

    #[test]
    fn urls_with_a_password_or_not_redis_are_refused_without_repeating_them() {
        let check = |url: &str| {
            SharedConfig {
                redis_url: url.into(),
                ..SharedConfig::default()
            }
            .check_url()
        };
        assert_eq!(check("redis://10.0.0.5:6379/0"), Ok(()));
        assert_eq!(check("rediss://dcs.example:6379"), Ok(()));
        let refused = check("redis://:hunter2-pass@10.0.0.5:6379/0").unwrap_err();
        assert!(refused.contains("password_env"), "{refused}");
        assert!(!refused.contains("hunter2"));
        assert!(check("http://10.0.0.5").is_err());
        let plain_with_ca = SharedConfig {
            redis_url: "redis://10.0.0.5:6379/0".into(),
            ca_file: Some("/etc/ca.pem".into()),
            ..SharedConfig::default()
        };
        assert!(plain_with_ca.check_url().unwrap_err().contains("rediss"));
    }
}
