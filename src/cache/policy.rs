//! Cache decisions as pure functions: what an upstream answer means for the job
//! ([`classify`]), how long it stays good ([`freshness`]), how long to back off
//! after a 429 ([`retry_after`]). No I/O and no clock here; callers pass ages.

use std::time::{Duration, SystemTime};

use bytesize::ByteSize;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use crate::route::Api;

/// What a stored upstream answer says about its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 200 with a terminal status: the answer will never change.
    Terminal,
    /// 200 with a running, unknown or unreadable status.
    Running,
    /// 404: a just-created job may be unknown for a moment.
    NotFound,
    /// Anything else (401, 403, 429, 5xx, ...): passed on, never stored.
    Uncacheable,
}

/// How a client's answer was produced; sent as `X-Cache` and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a fresh stored answer.
    Hit,
    /// This request's own upstream fetch produced the answer.
    Miss,
    /// Waited for another request's upstream fetch and shared its answer.
    Coalesced,
    /// A local miss answered by the shared tier: another replica fetched it.
    Shared,
    /// Served a stored answer past its freshness (revalidating, or upstream failing).
    Stale,
}

/// Why a stored answer past its freshness was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// One refresh is under way (`stale_while_revalidate`).
    Revalidating,
    /// Upstream is failing (`stale_if_error`).
    UpstreamError,
    /// Upstream is throttling this API and project (`stale_if_error`).
    Throttled,
}

impl StaleReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StaleReason::Revalidating => "revalidating",
            StaleReason::UpstreamError => "upstream-error",
            StaleReason::Throttled => "throttled",
        }
    }
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Coalesced => "COALESCED",
            CacheStatus::Shared => "SHARED",
            CacheStatus::Stale => "STALE",
        }
    }
}

fn owned(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| s.to_string()).collect()
}

/// Freshness and storage settings: `[cache]` in the config, checked there,
/// swapped whole on a reload. Defaults live here and only here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachePolicy {
    /// How long a running job's answer is served without asking upstream.
    #[serde(with = "humantime_serde")]
    pub running_ttl: Duration,
    /// While a running job is being polled, its answer is refreshed this long
    /// before its freshness ends, so pollers never wait for upstream (at most
    /// half of `running_ttl`; zero turns it off).
    #[serde(with = "humantime_serde")]
    pub refresh_ahead: Duration,
    /// How long a 404 is remembered.
    #[serde(with = "humantime_serde")]
    pub not_found_ttl: Duration,
    /// After freshness ends, serve the old answer at once while one refresh runs.
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// After freshness ends, serve the old answer when upstream fails or throttles.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// Longest a request waits for a shared upstream fetch.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// How long an upstream failure for a job (5xx, timeout, transport error,
    /// unusable answer) is shared by everyone polling it, without a new request.
    #[serde(with = "humantime_serde")]
    pub error_ttl: Duration,
    /// Longest pause after consecutive failures of an API for a project (the
    /// pause doubles from `error_ttl` with each failure, with jitter).
    #[serde(with = "humantime_serde")]
    pub failure_backoff_max: Duration,
    /// Shortest backoff after a 429, whatever `Retry-After` says (0, a past date).
    #[serde(with = "humantime_serde")]
    pub retry_after_min: Duration,
    /// Backoff after a 429 that names no `Retry-After` and no throttling window.
    #[serde(with = "humantime_serde")]
    pub retry_after_default: Duration,
    /// Upper bound on any backoff, whatever upstream asks for.
    #[serde(with = "humantime_serde")]
    pub retry_after_max: Duration,
    /// Drop a terminal answer nobody asked for in this long (None: only capacity evicts).
    #[serde(with = "humantime_serde")]
    pub terminal_idle: Option<Duration>,
    /// Memory budget for stored answers.
    pub max_bytes: ByteSize,
    /// Upstream requests per second the gateway never exceeds per API and
    /// project (a token bucket; bursts up to one second's worth). Misses beyond
    /// it wait for a token. None: no budget.
    pub upstream_rate: Option<f64>,
    /// Upstream fetches per second one consumer (its key, else its address)
    /// may trigger; hits and shared fetches are free. None: no limit.
    pub consumer_fetch_rate: Option<f64>,
    /// Fetches a consumer may trigger at once before `consumer_fetch_rate` applies.
    pub consumer_fetch_burst: u32,
    /// DRS `process_status` values that end a job, compared case-insensitively.
    pub drs_terminal: Vec<String>,
    /// ROMA `status` values that end a job, compared case-insensitively.
    pub roma_terminal: Vec<String>,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            running_ttl: Duration::from_secs(1),
            refresh_ahead: Duration::from_millis(250),
            not_found_ttl: Duration::from_secs(1),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::from_secs(300),
            wait_timeout: Duration::from_secs(15),
            error_ttl: Duration::from_secs(1),
            failure_backoff_max: Duration::from_secs(30),
            retry_after_min: Duration::from_secs(1),
            retry_after_default: Duration::from_secs(5),
            retry_after_max: Duration::from_secs(300),
            terminal_idle: None,
            max_bytes: ByteSize::mib(256),
            upstream_rate: None,
            consumer_fetch_rate: None,
            consumer_fetch_burst: 20,
            // Sibling DRS v5 async APIs answer pending / success / failed.
            drs_terminal: owned(&["success", "succeeded", "failed", "failure", "fail", "error"]),
            // The SDK documents SUCCEEDED/FAILED; older region docs Success/Finished.
            roma_terminal: owned(&["succeeded", "success", "failed", "finished"]),
        }
    }
}

impl CachePolicy {
    /// The status values that end a job of `api`.
    pub fn terminal(&self, api: Api) -> &[String] {
        match api {
            Api::Drs => &self.drs_terminal,
            Api::Roma => &self.roma_terminal,
        }
    }
}

/// Classifies an upstream answer by its status code and, for 200, its JSON body.
pub fn classify(api: Api, status: StatusCode, body: &[u8], terminal: &[String]) -> Class {
    match status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Class::NotFound,
        _ => return Class::Uncacheable,
    }
    // Borrowed where the JSON has no escapes; an unreadable body is simply "running".
    #[derive(Deserialize)]
    struct Progress<'a> {
        #[serde(borrow, default)]
        process_status: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default)]
        status: Option<std::borrow::Cow<'a, str>>,
    }
    let Ok(progress) = serde_json::from_slice::<Progress>(body) else {
        return Class::Running;
    };
    let value = match api {
        Api::Drs => progress.process_status,
        Api::Roma => progress.status,
    };
    match value {
        Some(v) if terminal.iter().any(|t| t.eq_ignore_ascii_case(v.trim())) => Class::Terminal,
        _ => Class::Running,
    }
}

/// Where a stored answer of a given age stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it; `remaining` is left (`None`: forever).
    Fresh { remaining: Option<Duration> },
    /// Serve it at once, but start one background refresh.
    Revalidate,
    /// Too old to serve, except when upstream fails.
    StaleIfError,
    /// Useless: fetch, and do not fall back to it.
    Expired,
}

impl CachePolicy {
    /// How long an answer of this class is fresh (`None`: forever; zero: never stored).
    pub fn fresh_for(&self, class: Class) -> Option<Duration> {
        match class {
            Class::Terminal => None,
            Class::Running => Some(self.running_ttl),
            Class::NotFound => Some(self.not_found_ttl),
            Class::Uncacheable => Some(Duration::ZERO),
        }
    }

    /// How long the store must keep an answer, freshness plus stale windows.
    pub fn keep_for(&self, class: Class) -> Option<Duration> {
        self.fresh_for(class)
            .map(|fresh| fresh + self.stale_while_revalidate.max(self.stale_if_error))
    }
}

/// Where an answer of `class` stands `age` after it was stored.
pub fn freshness(policy: &CachePolicy, class: Class, age: Duration) -> Freshness {
    let Some(fresh) = policy.fresh_for(class) else {
        return Freshness::Fresh { remaining: None };
    };
    if class == Class::Uncacheable {
        return Freshness::Expired;
    }
    if age < fresh {
        return Freshness::Fresh {
            remaining: Some(fresh - age),
        };
    }
    let over = age - fresh;
    if over < policy.stale_while_revalidate {
        Freshness::Revalidate
    } else if over < policy.stale_if_error {
        Freshness::StaleIfError
    } else {
        Freshness::Expired
    }
}

/// The backoff a 429 asks for: `Retry-After` as seconds or an HTTP date
/// (RFC 9110 §10.2.3); else the window of Huawei's throttling message in the
/// body; else `default`. Never less than `min` (a `0` or a date already past
/// must not mean "hammer on") nor more than `max`.
pub fn retry_after(
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
    policy: &CachePolicy,
) -> Duration {
    let header = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let v = v.trim();
            match v.parse::<u64>() {
                Ok(secs) => Some(Duration::from_secs(secs)),
                Err(_) => httpdate::parse_http_date(v)
                    .ok()
                    .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO)),
            }
        });
    header
        .or_else(|| throttle_window(body))
        .unwrap_or(policy.retry_after_default)
        .clamp(
            policy.retry_after_min,
            policy.retry_after_max.max(policy.retry_after_min),
        )
}

/// The window of Huawei's throttling message in a 429 body, e.g.
/// `{"error_msg": "policy user over ratelimit,limit:100,time:1 minute"}`.
pub fn throttle_window(body: &[u8]) -> Option<Duration> {
    #[derive(Deserialize)]
    struct Throttled<'a> {
        #[serde(borrow)]
        error_msg: std::borrow::Cow<'a, str>,
    }
    let message = serde_json::from_slice::<Throttled>(body).ok()?.error_msg;
    let time = message
        .split(',')
        .find_map(|part| part.trim().strip_prefix("time:"))?;
    let (count, unit) = time.trim().split_once(' ')?;
    let count: u64 = count.trim().parse().ok()?;
    let unit = match unit.trim().trim_end_matches('s') {
        "second" => 1,
        "minute" => 60,
        "hour" => 3600,
        "day" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(count.saturating_mul(unit)))
}

/// Whether a 200's body is a JSON object, as every answer of both APIs is.
/// Anything else (an HTML page from a captive portal or a WAF) is unusable.
pub fn is_json_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

/// The pause after `failures` consecutive failures: `base` doubling with each,
/// at most `cap`. Callers add jitter.
pub fn failure_backoff(failures: u32, base: Duration, cap: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    base.saturating_mul(2u32.saturating_pow(doublings)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(api: Api, status: u16, body: &str) -> Class {
        classify(
            api,
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            CachePolicy::default().terminal(api),
        )
    }

    #[test]
    fn roma_statuses_are_classified_case_insensitively() {
        for status in [
            "SUCCEEDED",
            "Succeeded",
            "FAILED",
            "failed",
            "Success",
            "FINISHED",
        ] {
            let body = format!(r#"{{"id":"j","status":"{status}","progress_percent":1.0}}"#);
            assert_eq!(class(Api::Roma, 200, &body), Class::Terminal, "{status}");
        }
        for status in ["RUNNING", "Running", "QUEUED", ""] {
            let body = format!(r#"{{"status":"{status}"}}"#);
            assert_eq!(class(Api::Roma, 200, &body), Class::Running, "{status}");
        }
    }

    #[test]
    fn drs_reads_process_status_not_status() {
        assert_eq!(
            class(Api::Drs, 200, r#"{"process_status":"pending"}"#),
            Class::Running
        );
        assert_eq!(
            class(Api::Drs, 200, r#"{"process_status":"success"}"#),
            Class::Terminal
        );
        assert_eq!(
            class(Api::Drs, 200, r#"{"process_status":"FAILED"}"#),
            Class::Terminal
        );
        assert_eq!(
            class(Api::Drs, 200, r#"{"status":"success"}"#),
            Class::Running
        );
    }

    #[test]
    fn unreadable_bodies_are_running() {
        for body in [
            "",
            "not json",
            "[]",
            r#"{"status":5}"#,
            r#"{"process_status":null}"#,
        ] {
            assert_eq!(class(Api::Drs, 200, body), Class::Running, "{body}");
            assert_eq!(class(Api::Roma, 200, body), Class::Running, "{body}");
        }
    }

    #[test]
    fn escaped_status_strings_still_classify() {
        assert_eq!(
            class(Api::Roma, 200, r#"{"status":"SUCCE\u0045DED"}"#),
            Class::Terminal
        );
    }

    #[test]
    fn non_200_statuses_classify_by_code() {
        assert_eq!(class(Api::Roma, 404, "{}"), Class::NotFound);
        for status in [401, 403, 429, 500, 502, 503] {
            assert_eq!(
                class(Api::Roma, status, r#"{"status":"SUCCEEDED"}"#),
                Class::Uncacheable
            );
        }
    }

    #[test]
    fn custom_terminal_sets_apply() {
        let drs = ["done".to_string()];
        let ok = StatusCode::OK;
        assert_eq!(
            classify(Api::Drs, ok, br#"{"process_status":"Done"}"#, &drs),
            Class::Terminal
        );
        assert_eq!(
            classify(Api::Drs, ok, br#"{"process_status":"success"}"#, &drs),
            Class::Running
        );
        assert_eq!(
            classify(Api::Roma, ok, br#"{"status":"SUCCEEDED"}"#, &[]),
            Class::Running
        );
    }

    fn policy() -> CachePolicy {
        CachePolicy {
            running_ttl: Duration::from_secs(1),
            not_found_ttl: Duration::from_secs(2),
            stale_while_revalidate: Duration::from_secs(3),
            stale_if_error: Duration::from_secs(10),
            ..CachePolicy::default()
        }
    }

    #[test]
    fn terminal_answers_are_fresh_forever() {
        let age = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(
            freshness(&policy(), Class::Terminal, age),
            Freshness::Fresh { remaining: None }
        );
        assert_eq!(policy().keep_for(Class::Terminal), None);
    }

    #[test]
    fn running_answers_go_fresh_then_revalidate_then_stale_then_expired() {
        let p = policy();
        let at = |ms| freshness(&p, Class::Running, Duration::from_millis(ms));
        assert_eq!(
            at(0),
            Freshness::Fresh {
                remaining: Some(Duration::from_secs(1))
            }
        );
        assert_eq!(
            at(999),
            Freshness::Fresh {
                remaining: Some(Duration::from_millis(1))
            }
        );
        assert_eq!(at(1000), Freshness::Revalidate);
        assert_eq!(at(3999), Freshness::Revalidate);
        assert_eq!(at(4000), Freshness::StaleIfError);
        assert_eq!(at(10_999), Freshness::StaleIfError);
        assert_eq!(at(11_000), Freshness::Expired);
        assert_eq!(p.keep_for(Class::Running), Some(Duration::from_secs(11)));
    }

    #[test]
    fn not_found_uses_its_own_ttl() {
        let p = policy();
        assert!(matches!(
            freshness(&p, Class::NotFound, Duration::from_millis(1500)),
            Freshness::Fresh { .. }
        ));
        assert_eq!(
            freshness(&p, Class::NotFound, Duration::from_secs(2)),
            Freshness::Revalidate
        );
    }

    #[test]
    fn uncacheable_answers_are_never_fresh() {
        assert_eq!(
            freshness(&policy(), Class::Uncacheable, Duration::ZERO),
            Freshness::Expired
        );
    }

    #[test]
    fn retry_after_reads_seconds_dates_messages_default_floor_and_cap() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let policy = CachePolicy {
            retry_after_min: Duration::from_secs(1),
            retry_after_default: Duration::from_secs(5),
            retry_after_max: Duration::from_secs(600),
            ..CachePolicy::default()
        };
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
            retry_after(&h, b"", now, &policy)
        };
        assert_eq!(with("7"), Duration::from_secs(7));
        assert_eq!(
            with(&httpdate::fmt_http_date(now + Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        // A past date and a zero are floored, not "retry at once".
        assert_eq!(
            with(&httpdate::fmt_http_date(now - Duration::from_secs(30))),
            Duration::from_secs(1)
        );
        assert_eq!(with("0"), Duration::from_secs(1));
        assert_eq!(with("18446744073709551615"), Duration::from_secs(600));
        assert_eq!(with("soon"), Duration::from_secs(5));
        let message = br#"{"error_code":"APIGW.0308","error_msg":"policy user over ratelimit,limit:100,time:1 minute"}"#;
        assert_eq!(
            retry_after(&HeaderMap::new(), message, now, &policy),
            Duration::from_secs(60)
        );
        assert_eq!(
            retry_after(&HeaderMap::new(), b"{}", now, &policy),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn throttling_messages_name_their_window() {
        let window = |m: &str| throttle_window(format!(r#"{{"error_msg":"{m}"}}"#).as_bytes());
        assert_eq!(
            window("policy api over ratelimit,limit:2000,time:1 minute"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            window("policy ip over ratelimit,limit:5,time:10 second"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            window("policy user over ratelimit,limit:1,time:2 hours"),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(window("The throttling threshold has been reached"), None);
    }

    #[test]
    fn only_json_objects_are_usable_answers() {
        assert!(is_json_object(br#" {"status":"RUNNING"}"#));
        for body in [
            &b"<html>portal</html>"[..],
            b"",
            b"[]",
            b"{not json",
            b"\"x\"",
        ] {
            assert!(!is_json_object(body), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn failure_backoff_doubles_up_to_its_cap() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(30));
        let at = |n| failure_backoff(n, base, cap).as_secs();
        assert_eq!(
            [at(1), at(2), at(3), at(5), at(6), at(1000)],
            [1, 2, 4, 16, 30, 30]
        );
    }
}
