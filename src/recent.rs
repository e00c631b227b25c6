//! What a few pure functions on the request path returned lately, per
//! thread: pollers send the same few paths again and again, and a lookup
//! here costs a hash of the input and a comparison of its bytes.
//!
//! Direct-mapped: an input has one slot, chosen by a seeded hash, and a new
//! input takes the slot over. A slot answers only for the exact bytes it
//! holds, so a collision costs a recomputation, never a wrong answer.

use std::hash::BuildHasher;

/// Inputs longer than this are not remembered: requests carry short paths.
pub const MAX_INPUT: usize = 256;

pub struct Recent<V> {
    hasher: foldhash::fast::RandomState,
    slots: Vec<Option<(Box<[u8]>, V)>>,
}

impl<V: Copy> Recent<V> {
    pub fn new(slots: usize) -> Self {
        Recent {
            hasher: foldhash::fast::RandomState::default(),
            slots: (0..slots).map(|_| None).collect(),
        }
    }

    /// What `compute` gave for `input` before, or what it gives now; only
    /// `Ok` answers are remembered (a refused request is not worth a slot).
    pub fn get_or<E>(
        &mut self,
        input: &[u8],
        compute: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        if input.len() > MAX_INPUT {
            return compute();
        }
        let slot = self.hasher.hash_one(input) as usize % self.slots.len();
        if let Some((seen, value)) = &self.slots[slot] {
            if **seen == *input {
                return Ok(*value);
            }
        }
        let value = compute()?;
        self.slots[slot] = Some((input.into(), value));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_for_the_exact_input_only() {
        let mut recent = Recent::new(4);
        let computed = std::cell::Cell::new(0);
        let mut length = |input: &[u8]| {
            recent.get_or(input, || {
                computed.set(computed.get() + 1);
                Ok::<_, ()>(input.len())
            })
        };
        // Far more inputs than slots, twice over: every answer is its own.
        let inputs: Vec<String> = (0..100).map(|i| "x".repeat(i)).collect();
        for _ in 0..2 {
            for input in &inputs {
                assert_eq!(length(input.as_bytes()), Ok(input.len()));
            }
        }
        assert!(computed.get() > 100, "slots were shared: {computed:?}");
        // Asked again at once, the same input is remembered.
        let before = computed.get();
        assert_eq!(length(b"again"), Ok(5));
        assert_eq!(length(b"again"), Ok(5));
        assert_eq!(computed.get(), before + 1);
        // Too long to remember: computed every time.
        let long = vec![b'x'; MAX_INPUT + 1];
        length(&long).unwrap();
        length(&long).unwrap();
        assert_eq!(computed.get(), before + 3);
    }

    #[test]
    fn refusals_are_not_remembered() {
        let mut recent: Recent<u8> = Recent::new(8);
        assert_eq!(recent.get_or(b"bad", || Err("no")), Err("no"));
        assert_eq!(recent.get_or(b"bad", || Ok::<_, &str>(1)), Ok(1));
        assert_eq!(recent.get_or(b"bad", || Err("not asked")), Ok(1));
    }
}
