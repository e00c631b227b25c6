//! The cache key: which answers may be shared.

use sha2::{Digest, Sha256};

use crate::route::Route;

/// Identifies one cached answer: API, project, instance, job, language and the
/// credential's principal, so tenants and languages never share answers.
///
/// Stored as 128 bits of SHA-256 over those parts (as Varnish keys its cache
/// by a SHA-256 digest): 16 bytes inline instead of a ~140-byte string per
/// entry, and a collision is as unlikely as guessing a random 128-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(u128);

impl CacheKey {
    pub fn new(route: &Route, language: Option<&str>, credential: &str) -> Self {
        let mut digest = Sha256::new();
        // Each part ends in a byte no part can contain, so the join is unambiguous.
        for part in [
            route.api.as_str(),
            route.project,
            route.instance.unwrap_or(""),
            route.job,
            language.unwrap_or(""),
            credential,
        ] {
            digest.update(part.as_bytes());
            digest.update([0]);
        }
        let digest = digest.finalize();
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
