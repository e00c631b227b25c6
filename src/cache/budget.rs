//! Token buckets: the upstream budget per API and project (misses wait for a
//! token, so the gateway never exceeds the rate however many distinct jobs
//! are asked for), and each consumer's budget of fetches it may trigger.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Buckets beyond this many are pruned of the full ones (idle keys).
const PRUNE_AT: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Its tokens at `now`, refilled at `rate` per second up to `burst`.
    fn refilled(&self, rate: f64, burst: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + rate * elapsed).min(burst)
    }
}

/// Ok if a token is there, else how long until one is.
fn until_token(tokens: f64, rate: f64) -> Result<(), Duration> {
    if tokens >= 1.0 {
        Ok(())
    } else {
        Err(Duration::from_secs_f64((1.0 - tokens) / rate))
    }
}

#[derive(Debug)]
pub struct Buckets<K> {
    /// parking_lot: held for a little arithmetic; never poisoned.
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K> Default for Buckets<K> {
    fn default() -> Self {
        Buckets {
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Takes a token from `key`'s bucket (refilled at `rate` per second, up
    /// to `burst`), or says how long until one is there.
    pub fn take(&self, key: &K, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let rate = rate.max(1e-3);
        let burst = burst.max(1.0);
        let mut buckets = self.buckets.lock();
        if buckets.len() >= PRUNE_AT && !buckets.contains_key(key) {
            buckets.retain(|_, b| b.refilled(rate, burst, now) < burst);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = bucket.refilled(rate, burst, now);
        bucket.at = now;
        let wait = until_token(bucket.tokens, rate);
        if wait.is_ok() {
            bucket.tokens -= 1.0;
        }
        wait
    }

    /// Whether `key`'s bucket has a token now, without taking it.
    pub fn peek(&self, key: &K, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let rate = rate.max(1e-3);
        match self.buckets.lock().get(key) {
            Some(bucket) => until_token(bucket.refilled(rate, burst.max(1.0), now), rate),
            None => Ok(()),
        }
    }

    /// Waits until `key`'s bucket has a token and takes it. True if it waited.
    pub async fn acquire(&self, key: &K, rate: f64, burst: f64) -> bool {
        let mut waited = false;
        loop {
            match self.take(key, rate, burst, Instant::now()) {
                Ok(()) => return waited,
                Err(wait) => {
                    waited = true;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let buckets = Buckets::default();
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(buckets.take(&"a", 2.0, 3.0, now), Ok(()));
        }
        assert_eq!(
            buckets.take(&"a", 2.0, 3.0, now),
            Err(Duration::from_millis(500))
        );
        assert_eq!(buckets.take(&"b", 2.0, 3.0, now), Ok(()), "per key");
        let later = now + Duration::from_millis(500);
        assert_eq!(buckets.take(&"a", 2.0, 3.0, later), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_a_token_and_never_exceeds_the_rate() {
        let buckets = Buckets::default();
        let started = Instant::now();
        for _ in 0..10 {
            buckets.acquire(&"api", 5.0, 5.0).await;
        }
        // 5 at once, then 5 more at 5 per second.
        assert_eq!(Instant::now() - started, Duration::from_secs(1));
    }
}
