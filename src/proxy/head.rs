//! A cache hit's response head, prepared once per stored answer and copied.
//!
//! A head is nine headers, and inserting them one by one (each insert hashes
//! its name and probes the map; the map is sized first) was a third of an
//! in-process hit. A hit now copies the head prepared for its answer and
//! writes the four values that differ per request in place, by position.
//!
//! Per thread and direct-mapped, like [`crate::recent`]: an answer has one
//! slot, and another answer takes it over. A prepared head is used only for
//! the very same stored answer ([`Stored::same`]; the slot holds a clone, so
//! its bytes cannot be freed and reused by another) under the same policy
//! lifetime and `Vary`.

use std::cell::RefCell;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::cache::Stored;

/// Slots per thread.
const SLOTS: usize = 32;

/// What differs per request, in the order these headers follow `X-Cache` at
/// the start of a hit's head.
pub(super) struct Varying {
    pub cache_status: HeaderValue,
    pub request_id: HeaderValue,
    pub gateway_request_id: HeaderValue,
    pub age: HeaderValue,
}

struct Prepared {
    stored: Stored,
    fresh_for: Option<Duration>,
    vary: HeaderValue,
    headers: HeaderMap,
}

thread_local! {
    static PREPARED: RefCell<[Option<Prepared>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
}

/// The head of a plain hit on `stored`: a copy of the one prepared for it
/// with `varying` written in, or else `build()`'s, which must begin with
/// `X-Cache` and then `varying`'s headers in its order.
pub(super) fn hit(
    stored: &Stored,
    fresh_for: Option<Duration>,
    vary: &HeaderValue,
    varying: Varying,
    build: impl FnOnce(Varying) -> HeaderMap,
) -> HeaderMap {
    // Fibonacci hashing: allocations are aligned, so the low bits say little.
    let slot = (stored.spread().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % SLOTS;
    PREPARED.with_borrow_mut(|slots| {
        if let Some(prepared) = &slots[slot] {
            if prepared.stored.same(stored)
                && prepared.fresh_for == fresh_for
                && prepared.vary == vary
            {
                let mut headers = prepared.headers.clone();
                let values = [
                    varying.cache_status,
                    varying.request_id,
                    varying.gateway_request_id,
                    varying.age,
                ];
                for (place, value) in headers.values_mut().skip(1).zip(values) {
                    *place = value;
                }
                return headers;
            }
        }
        let headers = build(varying);
        // The varying places hold static placeholders: copying and then
        // dropping those costs nothing, where a shared value costs two
        // atomic operations.
        let mut prepared = headers.clone();
        for place in prepared.values_mut().skip(1).take(4) {
            *place = HeaderValue::from_static("");
        }
        slots[slot] = Some(Prepared {
            stored: stored.clone(),
            fresh_for,
            vary: vary.clone(),
            headers: prepared,
        });
        headers
    })
}

/// `Age` for `secs`: a value this thread made for the same age, if it has
/// one at hand (a hot answer's age changes once a second; a few answers at
/// different ages take different slots), else a new one. A copy moves a
/// count, where a new value allocates.
pub(super) fn age(secs: u64) -> HeaderValue {
    const AGES: usize = 16;
    thread_local! {
        static MADE: RefCell<[Option<(u64, HeaderValue)>; AGES]> = const { RefCell::new([const { None }; AGES]) };
    }
    MADE.with_borrow_mut(|made| {
        let slot = &mut made[secs as usize % AGES];
        match slot {
            Some((at, value)) if *at == secs => value.clone(),
            _ => {
                let value = HeaderValue::from(secs);
                *slot = Some((secs, value.clone()));
                value
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_are_their_own_numbers_whatever_was_made_before() {
        // 3 and 19 share a slot; each is asked for before and after the other.
        for secs in [3, 3, 19, 3, 0, 86_400, 19, 19, u64::MAX] {
            assert_eq!(super::age(secs).to_str().unwrap(), secs.to_string());
        }
    }
}
