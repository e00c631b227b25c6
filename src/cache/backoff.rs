//! Backoff after a 429: no upstream request for an (API, project) pair until
//! the instant upstream asked for has passed.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::route::Api;

/// Far enough to mean "until a restart", near enough never to overflow.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[derive(Debug, Default)]
pub struct Backoffs {
    /// parking_lot: held only to read or write the map; never poisoned.
    until: Mutex<HashMap<(Api, String), Instant>>,
}

impl Backoffs {
    /// How long (API, project) must still wait, if it must.
    pub fn remaining(&self, api: Api, project: &str, now: Instant) -> Option<Duration> {
        let mut until = self.until.lock();
        if until.is_empty() {
            return None;
        }
        let key = (api, project.to_string());
        let at = *until.get(&key)?;
        if at <= now {
            until.remove(&key);
            return None;
        }
        Some(at - now)
    }

    /// Starts (or replaces) a backoff of `wait` from `now`; saturates rather
    /// than overflow whatever `wait` upstream asked for.
    pub fn start(&self, api: Api, project: &str, now: Instant, wait: Duration) {
        let at = now
            .checked_add(wait.min(FOREVER))
            .unwrap_or(now + Duration::from_secs(3600));
        self.until.lock().insert((api, project.to_string()), at);
    }

    /// Pairs still backing off at `now`.
    pub fn in_force(&self, now: Instant) -> usize {
        self.until.lock().values().filter(|at| **at > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backoff_ends_when_its_time_has_passed() {
        let backoffs = Backoffs::default();
        let now = Instant::now();
        backoffs.start(Api::Drs, "p", now, Duration::from_secs(3));
        assert_eq!(
            backoffs.remaining(Api::Drs, "p", now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(backoffs.remaining(Api::Roma, "p", now), None, "per API");
        assert_eq!(backoffs.remaining(Api::Drs, "q", now), None, "per project");
        assert_eq!(backoffs.in_force(now), 1);
        let later = now + Duration::from_secs(3);
        assert_eq!(backoffs.remaining(Api::Drs, "p", later), None);
        assert_eq!(backoffs.in_force(later), 0);
    }

    #[test]
    fn an_absurd_wait_saturates_instead_of_overflowing() {
        let backoffs = Backoffs::default();
        let now = Instant::now();
        backoffs.start(Api::Drs, "p", now, Duration::from_secs(u64::MAX));
        assert!(backoffs.remaining(Api::Drs, "p", now).is_some());
    }
}
