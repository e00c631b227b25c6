//! Answers this thread read from the store a moment ago, kept at hand: a hit
//! that finds its answer here skips the store's lookup, which records the
//! read for the eviction policy and the idle timer of finished jobs, and costs
//! a good part of a cache hit (moka's `get`, about 150 ns).
//!
//! A copy answers only while nothing has been written to the store since it
//! was read: every insert and every removal moves the store's generation on
//! ([`Writes::changed`]), and a copy read at another generation is not used.
//! So a copy never stands in for an answer the store no longer holds. It
//! also answers for [`NEAR_FOR`] at most: then the store is asked again, so
//! the store still sees a hot key read several times a second from each
//! thread and keeps it (LRU order, TinyLFU frequency, `terminal_idle`).
//!
//! Per thread and direct-mapped, like [`crate::recent`]: a key has one slot,
//! and another key takes it over. A slot keeps its answer's bytes alive until
//! taken over, so the slots are few.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{CacheKey, Stored};

/// Slots per thread.
const SLOTS: usize = 32;

/// How long a copy answers before the store is read again.
pub const NEAR_FOR: Duration = Duration::from_millis(100);

/// One store's identity and write count, which copies are checked against.
#[derive(Debug)]
pub struct Writes {
    /// Unique in the process: copies from a store since dropped never answer
    /// for another one.
    store: u64,
    generation: AtomicU64,
}

struct Copy {
    store: u64,
    key: CacheKey,
    generation: u64,
    read_at: Instant,
    stored: Stored,
}

thread_local! {
    static SLOTS_HERE: RefCell<[Option<Copy>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

impl Default for Writes {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Writes {
            store: NEXT.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
        }
    }
}

impl Writes {
    /// To be called after every insert into the store and every removal from
    /// it (eviction, expiry, replacement).
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// What the store holds for `key` at `now`: this thread's copy when it is
    /// current, else what `read` (the store's lookup) gives, kept as the copy.
    pub fn get(
        &self,
        key: &CacheKey,
        now: Instant,
        read: impl FnOnce() -> Option<Stored>,
    ) -> Option<Stored> {
        // Loaded before the store is read: a write after this load moves the
        // generation on, so a copy of what it replaced is never used.
        let generation = self.generation.load(Ordering::Acquire);
        let slot = key.spread() as usize % SLOTS;
        SLOTS_HERE.with_borrow_mut(|slots| {
            if let Some(copy) = &slots[slot] {
                if copy.store == self.store
                    && copy.key == *key
                    && copy.generation == generation
                    && now.saturating_duration_since(copy.read_at) < NEAR_FOR
                {
                    return Some(copy.stored.clone());
                }
            }
            let stored = read()?;
            slots[slot] = Some(Copy {
                store: self.store,
                key: *key,
                generation,
                read_at: now,
                stored: stored.clone(),
            });
            Some(stored)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::Class;
    use crate::cache::tests::{key, response};
    use bytes::Bytes;
    use std::cell::Cell;

    fn stored(body: &str, at: Instant) -> Stored {
        Stored::new(&response(200, body), Class::Terminal, at)
    }

    /// Reads through `writes`, counting the store's lookups.
    fn read(
        writes: &Writes,
        key: &CacheKey,
        now: Instant,
        store: &Option<Stored>,
        lookups: &Cell<u32>,
    ) -> Option<Bytes> {
        writes
            .get(key, now, || {
                lookups.set(lookups.get() + 1);
                store.clone()
            })
            .map(|s| s.body())
    }

    #[test]
    fn a_copy_answers_until_the_store_changes_or_it_is_too_old() {
        let (writes, lookups, now) = (Writes::default(), Cell::new(0), Instant::now());
        let k = key("j");
        let mut store = Some(stored("first", now));
        assert_eq!(read(&writes, &k, now, &store, &lookups).unwrap(), "first");
        assert_eq!(read(&writes, &k, now, &store, &lookups).unwrap(), "first");
        assert_eq!(lookups.get(), 1, "the second read is the copy's");

        // Replaced: the next read is the store's, and sees the new answer.
        store = Some(stored("second", now));
        writes.changed();
        assert_eq!(read(&writes, &k, now, &store, &lookups).unwrap(), "second");
        assert_eq!(lookups.get(), 2);

        // Removed: gone at once, not served from the copy.
        store = None;
        writes.changed();
        assert_eq!(read(&writes, &k, now, &store, &lookups), None);
        assert_eq!(read(&writes, &k, now, &store, &lookups), None);
        assert_eq!(lookups.get(), 4, "absence is not kept");

        // Too old: asked again, so the store sees a hot key's reads.
        store = Some(stored("third", now));
        read(&writes, &k, now, &store, &lookups);
        let later = now + NEAR_FOR - Duration::from_millis(1);
        read(&writes, &k, later, &store, &lookups);
        assert_eq!(lookups.get(), 5);
        read(&writes, &k, now + NEAR_FOR, &store, &lookups);
        assert_eq!(lookups.get(), 6);
    }

    #[test]
    fn copies_are_per_key_and_per_store() {
        let (lookups, now) = (Cell::new(0), Instant::now());
        let (one, other) = (Writes::default(), Writes::default());
        let store = Some(stored("one", now));
        let nothing = None;
        read(&one, &key("a"), now, &store, &lookups);
        // The same key in another store, and another key in this one.
        assert_eq!(read(&other, &key("a"), now, &nothing, &lookups), None);
        assert_eq!(read(&one, &key("b"), now, &nothing, &lookups), None);
        assert_eq!(lookups.get(), 3);
        // Far more keys than slots: each answer is its own.
        for i in 0..4 * SLOTS {
            let job = format!("job{i}");
            let store = Some(stored(&job, now));
            for _ in 0..2 {
                assert_eq!(read(&one, &key(&job), now, &store, &lookups).unwrap(), job);
            }
        }
    }
}
