//! Who may use the gateway: consumers identified by an API key sent in a
//! header of the operator's choice (beside the SDK's own `Authorization`, which
//! the gateway discards), each optionally limited to a list of projects.
//!
//! Keys are kept only as SHA-256 digests and compared in constant time; a key
//! never reaches a log line. With no consumer configured the gateway is open.

use std::collections::{BTreeMap, HashSet};

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::credentials::{CredentialError, Origin, Secret, SecretSource};
use crate::error::GatewayError;

/// A consumer as the config describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub key: KeySpec,
    /// None: every served project.
    pub projects: Option<Vec<String>>,
}

/// How a consumer's key is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// The SHA-256 digest of the key, written in the config.
    Sha256([u8; 32]),
    /// The key itself, read from an environment variable or a file.
    Secret(Origin),
}

/// A consumer whose key could not be read.
#[derive(Debug, thiserror::Error)]
#[error("consumers.{name}: the key cannot be read")]
pub struct ConsumerError {
    pub name: String,
    #[source]
    pub source: CredentialError,
}

#[derive(Debug)]
pub struct Consumer {
    pub name: String,
    digest: [u8; 32],
    /// None: every served project.
    projects: Option<HashSet<String>>,
}

impl Consumer {
    pub fn new(name: &str, digest: [u8; 32], projects: Option<Vec<String>>) -> Self {
        Consumer {
            name: name.to_string(),
            digest,
            projects: projects.map(|p| p.into_iter().collect()),
        }
    }
}

#[derive(Debug)]
pub struct Consumers {
    header: HeaderName,
    list: Vec<Consumer>,
    /// Keys read from the environment or files, kept only so the redactor
    /// knows them while they are in use; checks use the digests.
    _keys: Vec<Secret>,
}

impl Consumers {
    pub fn new(header: HeaderName, list: Vec<Consumer>) -> Self {
        Consumers {
            header,
            list,
            _keys: Vec::new(),
        }
    }

    /// Reads the keys the specs name (digests only are kept).
    pub fn build(
        header: HeaderName,
        specs: &BTreeMap<String, ConsumerSpec>,
    ) -> Result<Consumers, ConsumerError> {
        let mut list = Vec::with_capacity(specs.len());
        let mut keys = Vec::new();
        for (name, spec) in specs {
            let digest = match &spec.key {
                KeySpec::Sha256(digest) => *digest,
                KeySpec::Secret(origin) => {
                    let key = SecretSource::new(origin.clone())
                        .current()
                        .map_err(|source| ConsumerError {
                            name: name.clone(),
                            source,
                        })?;
                    let digest = Sha256::digest(key.expose().as_bytes()).into();
                    keys.push(key);
                    digest
                }
            };
            list.push(Consumer::new(name, digest, spec.projects.clone()));
        }
        Ok(Consumers {
            _keys: keys,
            ..Consumers::new(header, list)
        })
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The header clients send their key in, when keys are configured (an
    /// answer then varies by it).
    pub fn header(&self) -> Option<&HeaderName> {
        (!self.list.is_empty()).then_some(&self.header)
    }

    /// The consumer that may use `project` (None when the gateway is open).
    pub fn check(&self, headers: &HeaderMap, project: &str) -> Result<Option<&str>, GatewayError> {
        if self.list.is_empty() {
            return Ok(None);
        }
        let presented = headers
            .get(&self.header)
            .map(|key| Sha256::digest(key.as_bytes()))
            .ok_or(GatewayError::ConsumerUnauthorized)?;
        // Compare with every consumer, so timing says nothing about which matched.
        let mut found = None;
        for consumer in &self.list {
            if bool::from(consumer.digest.ct_eq(presented.as_slice())) {
                found = Some(consumer);
            }
        }
        let consumer = found.ok_or(GatewayError::ConsumerUnauthorized)?;
        match &consumer.projects {
            Some(allowed) if !allowed.contains(project) => {
                Err(GatewayError::ConsumerForbidden(project.to_string()))
            }
            _ => Ok(Some(&consumer.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumers() -> Consumers {
        let digest = |key: &str| Sha256::digest(key.as_bytes()).into();
        Consumers::new(
            HeaderName::from_static("x-gateway-key"),
            vec![
                Consumer::new("ci", digest("ci-key"), Some(vec!["p1".into()])),
                Consumer::new("ops", digest("ops-key"), None),
            ],
        )
    }

    fn with_key(key: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-gateway-key", key.parse().unwrap());
        h
    }

    #[test]
    fn known_keys_name_their_consumer_within_its_projects() {
        let c = consumers();
        assert_eq!(c.check(&with_key("ci-key"), "p1").unwrap(), Some("ci"));
        assert_eq!(c.check(&with_key("ops-key"), "p9").unwrap(), Some("ops"));
        assert!(matches!(
            c.check(&with_key("ci-key"), "p2"),
            Err(GatewayError::ConsumerForbidden(_))
        ));
    }

    #[test]
    fn missing_or_unknown_keys_are_unauthorized() {
        let c = consumers();
        assert!(matches!(
            c.check(&HeaderMap::new(), "p1"),
            Err(GatewayError::ConsumerUnauthorized)
        ));
        assert!(matches!(
            c.check(&with_key("nope"), "p1"),
            Err(GatewayError::ConsumerUnauthorized)
        ));
    }

    #[test]
    fn no_consumers_means_open() {
        let open = Consumers::new(HeaderName::from_static("x-gateway-key"), vec![]);
        assert_eq!(open.check(&HeaderMap::new(), "p").unwrap(), None);
    }
}
