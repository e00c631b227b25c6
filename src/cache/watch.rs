//! Who watches which job, and the latest answer for each watched one.
//!
//! A watched key has one `tokio::sync::watch` channel: every answer the cache
//! settles for it (a refresh, a stale stand-in while upstream fails) replaces
//! the channel's value and wakes its watchers. A watcher only ever sees the
//! latest value, so a slow one never makes anything queue up. The channel
//! goes when its last watcher does.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Answer, CacheKey};

/// An answer as published to watchers, with when it was published (for the
/// wake-up latency).
#[derive(Debug, Clone)]
pub struct Update {
    pub answer: Answer,
    pub at: Instant,
}

/// How many may watch at once.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    pub total: usize,
    pub per_consumer: usize,
}

/// Why a watch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    Consumer,
}

#[derive(Default)]
struct State {
    keys: HashMap<CacheKey, (watch::Sender<Option<Update>>, usize)>,
    consumers: HashMap<Arc<str>, usize>,
    total: usize,
}

/// The watch channels, by key. Cloning shares them.
#[derive(Clone, Default)]
pub struct Watches {
    /// parking_lot: held to count or publish, never across an await.
    state: Arc<Mutex<State>>,
}

/// One watcher, counted until dropped.
pub struct Watch {
    receiver: watch::Receiver<Option<Update>>,
    key: CacheKey,
    consumer: Arc<str>,
    watches: Watches,
}

impl Watches {
    /// Counts a watcher of `key` for `consumer`, within `limits`.
    pub fn subscribe(
        &self,
        key: CacheKey,
        consumer: &str,
        limits: WatchLimits,
    ) -> Result<Watch, Full> {
        let mut state = self.state.lock();
        if state.total >= limits.total {
            return Err(Full::Total);
        }
        let consumer: Arc<str> = match state.consumers.get_key_value(consumer) {
            Some((_, count)) if *count >= limits.per_consumer => return Err(Full::Consumer),
            Some((name, _)) => name.clone(),
            None => Arc::from(consumer),
        };
        *state.consumers.entry(consumer.clone()).or_default() += 1;
        state.total += 1;
        let (sender, count) = state
            .keys
            .entry(key)
            .or_insert_with(|| (watch::Sender::new(None), 0));
        *count += 1;
        let mut receiver = sender.subscribe();
        // Only what is published from now on counts as news.
        receiver.mark_unchanged();
        Ok(Watch {
            receiver,
            key,
            consumer,
            watches: self.clone(),
        })
    }

    /// Hands `answer` to the watchers of `key`, if it has any.
    pub fn publish(&self, key: &CacheKey, answer: Answer) {
        let state = self.state.lock();
        if let Some((sender, _)) = state.keys.get(key) {
            sender.send_replace(Some(Update {
                answer,
                at: Instant::now(),
            }));
        }
    }

    pub fn is_watched(&self, key: &CacheKey) -> bool {
        let state = self.state.lock();
        !state.keys.is_empty() && state.keys.contains_key(key)
    }

    /// Watchers now, and the keys they watch.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.total, state.keys.len())
    }
}

impl Watch {
    /// The next answer published for this key (the latest, if several were).
    pub async fn changed(&mut self) -> Update {
        loop {
            // The sender lives while this watcher does: never closed.
            let _ = self.receiver.changed().await;
            if let Some(update) = self.receiver.borrow_and_update().clone() {
                return update;
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut state = self.watches.state.lock();
        state.total -= 1;
        if let Some(count) = state.consumers.get_mut(&self.consumer) {
            *count -= 1;
            if *count == 0 {
                state.consumers.remove(&self.consumer);
            }
        }
        if let Some((_, count)) = state.keys.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                state.keys.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::key;
    use crate::cache::{CacheStatus, Class, Stored};
    use crate::upstream::UpstreamResponse;

    fn answer(body: &'static str) -> Answer {
        let response = UpstreamResponse {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(body.as_bytes()),
        };
        Answer::new(
            Stored::new(&response, Class::Running, Instant::now()),
            CacheStatus::Hit,
        )
    }

    const LIMITS: WatchLimits = WatchLimits {
        total: 3,
        per_consumer: 2,
    };

    #[test]
    fn watchers_are_counted_within_both_limits_and_uncounted_when_dropped() {
        let watches = Watches::default();
        let a = watches.subscribe(key("1"), "alice", LIMITS).unwrap();
        let b = watches.subscribe(key("2"), "alice", LIMITS).unwrap();
        assert_eq!(
            watches.subscribe(key("1"), "alice", LIMITS).err(),
            Some(Full::Consumer)
        );
        let c = watches.subscribe(key("1"), "bob", LIMITS).unwrap();
        assert_eq!(
            watches.subscribe(key("3"), "carol", LIMITS).err(),
            Some(Full::Total)
        );
        assert_eq!(watches.counts(), (3, 2));
        drop((a, c));
        assert!(!watches.is_watched(&key("1")));
        assert!(watches.is_watched(&key("2")));
        drop(b);
        assert_eq!(watches.counts(), (0, 0));
        assert!(watches.state.lock().consumers.is_empty());
    }

    #[tokio::test]
    async fn a_watcher_gets_the_latest_answer_published_after_it_came() {
        let watches = Watches::default();
        watches.publish(&key("1"), answer("{\"a\":0}"));
        let mut watch = watches.subscribe(key("1"), "alice", LIMITS).unwrap();
        watches.publish(&key("1"), answer("{\"a\":1}"));
        watches.publish(&key("1"), answer("{\"a\":2}"));
        let update = watch.changed().await;
        assert_eq!(update.answer.stored.body(), "{\"a\":2}");
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), watch.changed());
        assert!(pending.await.is_err(), "nothing new was published");
    }
}
