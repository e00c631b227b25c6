//! Single flight: at most one upstream fetch in flight per key, shared by
//! every request that wants it. Waiters are woken by a `watch` channel the
//! moment the fetch settles, never by polling.
//!
//! A flight ends in one of two named states: [`State::Settled`] with its
//! outcome, or [`State::Aborted`] when the leader went away without one (the
//! fetch task panicked). The key leaves the map before waiters are woken, and
//! whoever starts a flight re-checks the store under the map's lock first, so
//! a request arriving just as a fetch lands finds the stored answer instead
//! of starting a second fetch.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

/// Where a flight stands, as every waiter sees it.
#[derive(Debug, Clone)]
pub enum State<T> {
    Pending,
    Settled(T),
    /// The leader ended without an outcome.
    Aborted,
}

/// Why a waiter got no outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    /// Waited the whole timeout; the fetch goes on for others.
    Timeout,
    Aborted,
}

type Map<K, T> = Arc<Mutex<HashMap<K, watch::Receiver<State<T>>>>>;

/// The flights in progress. parking_lot: the lock is held only to look up,
/// insert or remove (and for the caller's store re-check), never across an
/// await, and a panic elsewhere cannot poison it.
#[derive(Debug)]
pub struct Flights<K, T> {
    map: Map<K, T>,
}

/// What [`Flights::join`] found.
#[derive(Debug)]
pub enum Join<K: Eq + Hash, T, H> {
    /// The re-check found a usable answer: no flight is needed.
    Found(H),
    /// A flight is in progress; wait for it.
    Follow(Waiter<T>),
    /// No flight was in progress: the caller now leads one and must settle it.
    Lead(Leader<K, T>, Waiter<T>),
}

impl<K: Eq + Hash + Copy, T: Clone> Default for Flights<K, T> {
    fn default() -> Self {
        Flights {
            map: Arc::default(),
        }
    }
}

impl<K: Eq + Hash + Copy, T: Clone> Flights<K, T> {
    /// Joins the flight for `key`, or, if `recheck` finds nothing, starts one.
    pub fn join<H>(&self, key: K, recheck: impl FnOnce() -> Option<H>) -> Join<K, T, H> {
        let mut map = self.map.lock();
        if let Some(flight) = map.get(&key) {
            return Join::Follow(Waiter(flight.clone()));
        }
        if let Some(found) = recheck() {
            return Join::Found(found);
        }
        let (tx, rx) = watch::channel(State::Pending);
        map.insert(key, rx.clone());
        let leader = Leader {
            map: self.map.clone(),
            key,
            tx: Some(tx),
        };
        Join::Lead(leader, Waiter(rx))
    }

    /// Flights in progress.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The one request's right and duty to settle a flight. Dropped unsettled
/// (a panic), it aborts the flight, so no key is ever stuck.
#[derive(Debug)]
pub struct Leader<K: Eq + Hash, T> {
    map: Map<K, T>,
    key: K,
    tx: Option<watch::Sender<State<T>>>,
}

impl<K: Eq + Hash, T> Leader<K, T> {
    pub fn settle(mut self, outcome: T) {
        self.finish(State::Settled(outcome));
    }

    fn finish(&mut self, state: State<T>) {
        if let Some(tx) = self.tx.take() {
            // Leave the map before waking waiters: a request arriving now finds
            // the stored answer, or starts a new flight after a failure.
            self.map.lock().remove(&self.key);
            tx.send_replace(state);
        }
    }
}

impl<K: Eq + Hash, T> Drop for Leader<K, T> {
    fn drop(&mut self) {
        self.finish(State::Aborted);
    }
}

/// A handle on a flight's outcome.
#[derive(Debug)]
pub struct Waiter<T>(watch::Receiver<State<T>>);

impl<T: Clone> Waiter<T> {
    pub async fn wait(mut self, timeout: Duration) -> Result<T, WaitError> {
        let settled =
            tokio::time::timeout(timeout, self.0.wait_for(|s| !matches!(s, State::Pending)))
                .await
                .map_err(|_| WaitError::Timeout)?;
        match settled.as_deref() {
            Ok(State::Settled(outcome)) => Ok(outcome.clone()),
            // A closed channel without an outcome is an abort too.
            _ => Err(WaitError::Aborted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lead(
        flights: &Flights<u8, &'static str>,
    ) -> (Leader<u8, &'static str>, Waiter<&'static str>) {
        match flights.join(1, || None::<()>) {
            Join::Lead(leader, waiter) => (leader, waiter),
            other => panic!("expected to lead, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn followers_share_the_leaders_outcome() {
        let flights = Flights::default();
        let (leader, first) = lead(&flights);
        let Join::Follow(second) = flights.join(1, || None::<()>) else {
            panic!("a flight is in progress")
        };
        leader.settle("done");
        assert_eq!(first.wait(Duration::from_secs(1)).await, Ok("done"));
        assert_eq!(second.wait(Duration::from_secs(1)).await, Ok("done"));
        assert!(flights.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_dropped_without_an_outcome_aborts_the_flight() {
        let flights = Flights::default();
        let (leader, waiter) = lead(&flights);
        let task = tokio::spawn(async move {
            let _leader = leader;
            panic!("the fetch panicked");
        });
        assert!(task.await.is_err());
        assert_eq!(
            waiter.wait(Duration::from_secs(1)).await,
            Err(WaitError::Aborted)
        );
        assert!(flights.is_empty(), "the key is not stuck");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_while_the_flight_goes_on() {
        let flights = Flights::default();
        let (leader, waiter) = lead(&flights);
        assert_eq!(
            waiter.wait(Duration::from_secs(1)).await,
            Err(WaitError::Timeout)
        );
        assert_eq!(flights.len(), 1);
        leader.settle("late");
        assert!(flights.is_empty());
    }

    #[test]
    fn a_fresh_answer_found_on_recheck_starts_no_flight() {
        let flights: Flights<u8, &str> = Flights::default();
        assert!(matches!(
            flights.join(1, || Some("stored")),
            Join::Found("stored")
        ));
        assert!(flights.is_empty());
    }
}
