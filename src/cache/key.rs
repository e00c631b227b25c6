//! The cache key: which answers may be shared.

use std::cell::RefCell;
use std::convert::Infallible;

use sha2::{Digest, Sha256};

use crate::recent::{Recent, MAX_INPUT};
use crate::route::Route;

/// Identifies one cached answer: API, project, instance, job, language and the
/// credential's principal, so tenants and languages never share answers.
///
/// Stored as 128 bits of SHA-256 over those parts (as Varnish keys its cache
/// by a SHA-256 digest): 16 bytes inline instead of a ~140-byte string per
/// entry, and a collision is as unlikely as guessing a random 128-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(u128);

thread_local! {
    /// Pollers ask for the same few jobs again and again, and the key's
    /// SHA-256 (two compression blocks for a typical request) costs more
    /// than the rest of a hit's routing.
    static RECENT: RefCell<Recent<CacheKey>> = RefCell::new(Recent::new(256));
}

/// What a key is made of, in order.
fn parts<'a>(route: &Route<'a>, language: Option<&'a str>, credential: &'a str) -> [&'a str; 6] {
    [
        route.api.as_str(),
        route.project,
        route.instance.unwrap_or(""),
        route.job,
        language.unwrap_or(""),
        credential,
    ]
}

impl CacheKey {
    pub fn new(route: &Route, language: Option<&str>, credential: &str) -> Self {
        let parts = parts(route, language, credential);
        // Each part ends in a byte no part can contain (the buffer's zeros),
        // so the join is unambiguous.
        let len: usize = parts.iter().map(|part| part.len() + 1).sum();
        let (mut buffer, mut long) = ([0u8; MAX_INPUT], Vec::new());
        let joined = if len <= MAX_INPUT {
            &mut buffer[..len]
        } else {
            long.resize(len, 0);
            &mut long[..]
        };
        let mut at = 0;
        for part in parts {
            joined[at..at + part.len()].copy_from_slice(part.as_bytes());
            at += part.len() + 1;
        }
        let joined = &*joined;
        let Ok(key) = RECENT.with_borrow_mut(|recent| {
            recent.get_or(joined, || Ok::<_, Infallible>(Self::digest(joined)))
        });
        key
    }

    /// The first 128 bits of SHA-256 over the joined parts.
    fn digest(joined: &[u8]) -> Self {
        let digest = Sha256::digest(joined);
        CacheKey(u128::from_be_bytes(
            digest[..16].try_into().expect("16 bytes"),
        ))
    }
}

impl CacheKey {
    /// As the shared tier names it (32 hex digits).
    pub fn hex(self) -> String {
        format!("{:032x}", self.0)
    }

    /// Bits to pick a slot with: already a digest, so any bits will do.
    pub fn spread(self) -> u64 {
        self.0 as u64
    }

    pub fn from_hex(hex: &str) -> Option<CacheKey> {
        (hex.len() == 32)
            .then(|| u128::from_str_radix(hex, 16).ok())
            .flatten()
            .map(CacheKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Api;

    /// SHA-256 over the parts, each followed by a zero, fed piece by piece:
    /// what the key is, remembered or not (the shared tier's replicas must
    /// agree on it).
    fn reference(route: &Route, language: Option<&str>, credential: &str) -> CacheKey {
        let mut digest = Sha256::new();
        for part in parts(route, language, credential) {
            digest.update(part.as_bytes());
            digest.update([0]);
        }
        CacheKey(u128::from_be_bytes(
            digest.finalize()[..16].try_into().unwrap(),
        ))
    }

    #[test]
    fn remembered_keys_are_the_keys_even_when_slots_are_shared() {
        // Eight times as many jobs as slots, asked for twice in turn: most
        // slots change hands, and every answer must still be its own key.
        let jobs: Vec<String> = (0..256 * 8).map(|i| format!("job-{i}")).collect();
        let route = |job| Route {
            api: Api::Roma,
            project: "0123456789abcdef0123456789abcdef",
            instance: Some("instance"),
            job,
        };
        let mut seen = std::collections::HashSet::new();
        for round in 0..2 {
            for job in &jobs {
                let key = CacheKey::new(&route(job), Some("en-us"), "token:main");
                assert_eq!(key, reference(&route(job), Some("en-us"), "token:main"));
                if round == 0 {
                    assert!(seen.insert(key), "{job}");
                }
            }
        }
        // A principal too long to remember is hashed all the same.
        let long = "user@".repeat(80);
        let key = CacheKey::new(&route("j"), None, &long);
        assert_eq!(key, reference(&route("j"), None, &long));
    }

    #[test]
    fn keys_separate_languages_projects_and_credentials() {
        let route = |project| Route {
            api: Api::Drs,
            project,
            instance: None,
            job: "j",
        };
        let base = CacheKey::new(&route("p"), Some("en-us"), "token:a");
        assert_ne!(base, CacheKey::new(&route("p"), Some("zh-cn"), "token:a"));
        assert_ne!(base, CacheKey::new(&route("q"), Some("en-us"), "token:a"));
        assert_ne!(base, CacheKey::new(&route("p"), Some("en-us"), "token:b"));
        assert_ne!(base, CacheKey::new(&route("p"), None, "token:a"));
        assert_eq!(base, CacheKey::new(&route("p"), Some("en-us"), "token:a"));
        assert_eq!(CacheKey::from_hex(&base.hex()), Some(base));
        assert_eq!(CacheKey::from_hex("+1"), None);
    }
}
