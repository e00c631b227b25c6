//! Backoff per upstream API and project, like a circuit breaker: after a 429
//! (for as long as upstream asked) or after consecutive failures (doubling,
//! with jitter), no request goes upstream for that pair. When the pause ends,
//! exactly one request probes (half-open); the others keep their stale
//! answers or wait for the probe. A success opens the pair again.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::route::Api;

/// Far enough to mean "until a restart", near enough never to overflow.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Why an API and project are held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Upstream answered 429.
    Throttled,
    /// Upstream failed (5xx, timeout, transport error, unusable answer).
    Failing,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Throttled => "throttled",
            Cause::Failing => "failing",
        }
    }
}

/// What a request that would go upstream may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Nothing holds this API and project back.
    Open,
    /// The pause has ended: this request is the one probe.
    Probe,
    /// Held back: for `remaining`, or while another request probes.
    Closed {
        remaining: Duration,
        cause: Cause,
        probing: bool,
    },
}

/// A pause in force, as the operator's page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InForce {
    pub api: Api,
    pub project: String,
    pub cause: Cause,
    pub remaining: Duration,
}

#[derive(Debug)]
struct Gate {
    until: Instant,
    cause: Cause,
    /// Consecutive failures (0 after a 429).
    failures: u32,
    /// A probe is out until then; past it, another may go (the probe's
    /// request may have ended without an outcome).
    probe_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Backoffs {
    /// parking_lot: held only to read or write the map; never poisoned.
    gates: Mutex<HashMap<(Api, String), Gate>>,
    /// Bumped whenever a gate changes, so requests waiting for a probe wake.
    changed: watch::Sender<u64>,
}

impl Default for Backoffs {
    fn default() -> Self {
        Backoffs {
            gates: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl Backoffs {
    /// Whether a request for (API, project) may go upstream now. `probe_for`
    /// bounds how long one probe holds the others back.
    pub fn admit(&self, api: Api, project: &str, now: Instant, probe_for: Duration) -> Admit {
        let mut gates = self.gates.lock();
        if gates.is_empty() {
            return Admit::Open;
        }
        let Some(gate) = gates.get_mut(&(api, project.to_string())) else {
            return Admit::Open;
        };
        if now < gate.until {
            return Admit::Closed {
                remaining: gate.until - now,
                cause: gate.cause,
                probing: false,
            };
        }
        match gate.probe_until {
            Some(until) if now < until => Admit::Closed {
                remaining: until - now,
                cause: gate.cause,
                probing: true,
            },
            _ => {
                gate.probe_until = Some(now + probe_for);
                Admit::Probe
            }
        }
    }

    /// Upstream answered (anything but a 429 or a failure): open again.
    /// True if a pause was lifted.
    pub fn succeeded(&self, api: Api, project: &str) -> bool {
        let removed = {
            let mut gates = self.gates.lock();
            !gates.is_empty() && gates.remove(&(api, project.to_string())).is_some()
        };
        if removed {
            self.changed.send_modify(|n| *n += 1);
        }
        removed
    }

    /// The pause in force for (API, project), if any: its cause and what is left.
    pub fn pause_of(&self, api: Api, project: &str, now: Instant) -> Option<(Cause, Duration)> {
        let gates = self.gates.lock();
        let gate = gates.get(&(api, project.to_string()))?;
        (gate.until > now).then(|| (gate.cause, gate.until - now))
    }

    /// Another replica paused (API, project) for `remaining`: pause here too,
    /// unless a longer pause is already in force.
    pub fn adopt(&self, api: Api, project: &str, now: Instant, cause: Cause, remaining: Duration) {
        let until = saturating_add(now, remaining);
        {
            let mut gates = self.gates.lock();
            let gate = gates.entry((api, project.to_string())).or_insert(Gate {
                until: now,
                cause,
                failures: 0,
                probe_until: None,
            });
            if gate.until >= until {
                return;
            }
            gate.until = until;
            gate.cause = cause;
            gate.probe_until = None;
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Upstream failed: pause for `pause(failures so far)`.
    pub fn failed(
        &self,
        api: Api,
        project: &str,
        now: Instant,
        pause: impl FnOnce(u32) -> Duration,
    ) {
        {
            let mut gates = self.gates.lock();
            let gate = gates.entry((api, project.to_string())).or_insert(Gate {
                until: now,
                cause: Cause::Failing,
                failures: 0,
                probe_until: None,
            });
            gate.failures = gate.failures.saturating_add(1);
            // A 429's pause is upstream's word; a failure never shortens it.
            let until = saturating_add(now, pause(gate.failures));
            if gate.cause == Cause::Failing || until > gate.until {
                gate.until = until;
                gate.cause = Cause::Failing;
            }
            gate.probe_until = None;
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Upstream answered 429: pause for `wait`.
    pub fn throttled(&self, api: Api, project: &str, now: Instant, wait: Duration) {
        {
            let mut gates = self.gates.lock();
            gates.insert(
                (api, project.to_string()),
                Gate {
                    until: saturating_add(now, wait),
                    cause: Cause::Throttled,
                    failures: 0,
                    probe_until: None,
                },
            );
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// A receiver that changes whenever a gate does (a probe landed).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Pairs held back at `now`, by cause: (throttled, failing).
    pub fn in_force(&self, now: Instant) -> (usize, usize) {
        let list = self.list(now);
        let held = |cause| list.iter().filter(|b| b.cause == cause).count();
        (held(Cause::Throttled), held(Cause::Failing))
    }

    /// The pauses in force now, longest first.
    pub fn list(&self, now: Instant) -> Vec<InForce> {
        let gates = self.gates.lock();
        let mut list: Vec<_> = gates
            .iter()
            .filter(|(_, g)| g.until > now)
            .map(|((api, project), g)| InForce {
                api: *api,
                project: project.clone(),
                cause: g.cause,
                remaining: g.until - now,
            })
            .collect();
        list.sort_by_key(|b| std::cmp::Reverse(b.remaining));
        list
    }
}

fn saturating_add(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(FOREVER))
        .unwrap_or(now + Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: Duration = Duration::from_secs(15);

    #[test]
    fn a_429_closes_its_api_and_project_then_one_request_probes() {
        let backoffs = Backoffs::default();
        let now = Instant::now();
        backoffs.throttled(Api::Drs, "p", now, Duration::from_secs(3));
        assert!(matches!(
            backoffs.admit(Api::Drs, "p", now, PROBE),
            Admit::Closed { cause: Cause::Throttled, probing: false, remaining } if remaining == Duration::from_secs(3)
        ));
        assert_eq!(
            backoffs.admit(Api::Roma, "p", now, PROBE),
            Admit::Open,
            "per API"
        );
        assert_eq!(
            backoffs.admit(Api::Drs, "q", now, PROBE),
            Admit::Open,
            "per project"
        );
        assert_eq!(backoffs.in_force(now), (1, 0));

        let later = now + Duration::from_secs(3);
        assert_eq!(backoffs.admit(Api::Drs, "p", later, PROBE), Admit::Probe);
        assert!(matches!(
            backoffs.admit(Api::Drs, "p", later, PROBE),
            Admit::Closed { probing: true, .. }
        ));
        backoffs.succeeded(Api::Drs, "p");
        assert_eq!(backoffs.admit(Api::Drs, "p", later, PROBE), Admit::Open);
    }

    #[test]
    fn consecutive_failures_pause_longer_and_a_lost_probe_is_replaced() {
        let backoffs = Backoffs::default();
        let now = Instant::now();
        let pause = |n: u32| Duration::from_secs(u64::from(n));
        backoffs.failed(Api::Drs, "p", now, pause);
        let after_first = now + Duration::from_secs(1);
        assert_eq!(
            backoffs.admit(Api::Drs, "p", after_first, PROBE),
            Admit::Probe
        );
        backoffs.failed(Api::Drs, "p", after_first, pause);
        assert!(matches!(
            backoffs.admit(Api::Drs, "p", after_first, PROBE),
            Admit::Closed { remaining, cause: Cause::Failing, .. } if remaining == Duration::from_secs(2)
        ));
        let probe_at = after_first + Duration::from_secs(2);
        assert_eq!(backoffs.admit(Api::Drs, "p", probe_at, PROBE), Admit::Probe);
        assert_eq!(
            backoffs.admit(Api::Drs, "p", probe_at + PROBE, PROBE),
            Admit::Probe,
            "a probe that never reported is replaced"
        );
    }

    #[test]
    fn an_absurd_wait_saturates_instead_of_overflowing() {
        let backoffs = Backoffs::default();
        let now = Instant::now();
        backoffs.throttled(Api::Drs, "p", now, Duration::MAX);
        assert!(matches!(
            backoffs.admit(Api::Drs, "p", now, PROBE),
            Admit::Closed { .. }
        ));
    }
}
