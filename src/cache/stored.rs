//! A stored answer: an upstream response copied into one compact allocation.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::activity::JobActivity;
use super::policy::Class;
use crate::credentials::redact_bytes;
use crate::upstream::UpstreamResponse;

/// The shared tier's format: version, status, class, Retry-After, body
/// length and the three value lengths.
const SHARED_HEADER: usize = 15;
const SHARED_VERSION: u8 = 1;

/// An upstream answer as kept and served. Everything variable lives in one
/// allocation copied from the upstream response: the body, then the ETag,
/// Content-Type and X-Request-Id values. Copying means a stored answer never
/// pins hyper's connection buffer, and one allocation keeps entries small.
#[derive(Debug, Clone)]
pub struct Stored {
    data: Bytes,
    body_len: u32,
    etag_len: u8,
    content_type_len: u8,
    request_id_len: u8,
    pub status: StatusCode,
    pub class: Class,
    /// `Retry-After` seconds, set on a 429 passed to the client (0: none).
    retry_after: u32,
    /// When its freshness window began: when it was fetched, or for an answer
    /// refreshed ahead, when the previous one's window ended.
    pub stored_at: Instant,
    /// The job's counters, shared by the answers of one key (see
    /// [`super::activity`]); set when the answer is settled.
    pub activity: Option<Arc<JobActivity>>,
}

impl Stored {
    pub fn new(response: &UpstreamResponse, class: Class, stored_at: Instant) -> Self {
        // An upstream (or a WAF in front of it) may quote the request's
        // credentials back; they never reach a client.
        let body = redact_bytes(&response.body);
        let digest = Sha256::digest(&body);
        let etag = format!("\"{}\"", hex::encode(&digest[..16]));
        // Values longer than 255 bytes are dropped rather than stored.
        let short = |name: &str| {
            response
                .headers
                .get(name)
                .map(HeaderValue::as_bytes)
                .filter(|v| v.len() <= usize::from(u8::MAX))
                .unwrap_or_default()
        };
        // The two upstream header values passed on are scrubbed too.
        let content_type = redact_bytes(&Bytes::copy_from_slice(short("content-type")));
        let request_id = redact_bytes(&Bytes::copy_from_slice(short("x-request-id")));
        let fits = |value: &Bytes| value.len() <= usize::from(u8::MAX);
        let content_type = if fits(&content_type) {
            &content_type[..]
        } else {
            &[][..]
        };
        let request_id = if fits(&request_id) {
            &request_id[..]
        } else {
            &[][..]
        };
        let mut data =
            Vec::with_capacity(body.len() + etag.len() + content_type.len() + request_id.len());
        for part in [&body[..], etag.as_bytes(), content_type, request_id] {
            data.extend_from_slice(part);
        }
        Stored {
            data: Bytes::from(data),
            body_len: u32::try_from(body.len()).expect("bodies are bounded by max_body"),
            etag_len: etag.len() as u8,
            content_type_len: content_type.len() as u8,
            request_id_len: request_id.len() as u8,
            status: response.status,
            class,
            retry_after: 0,
            stored_at,
            activity: None,
        }
    }

    pub fn body(&self) -> Bytes {
        self.data.slice(..self.body_len as usize)
    }

    /// Strong validator over the body bytes (RFC 9110 §8.8.3).
    pub fn etag(&self) -> HeaderValue {
        self.value(0, self.etag_len)
            .expect("a hex ETag is a valid header value")
    }

    pub fn content_type(&self) -> Option<HeaderValue> {
        self.value(1, self.content_type_len)
    }

    /// The upstream `X-Request-Id` of the request that fetched this answer.
    pub fn request_id(&self) -> Option<HeaderValue> {
        self.value(2, self.request_id_len)
    }

    /// Marks a 429 passed to the client with the backoff it started.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = u32::try_from(secs).unwrap_or(u32::MAX);
        self
    }

    pub fn retry_after(&self) -> Option<HeaderValue> {
        (self.retry_after > 0).then(|| HeaderValue::from(self.retry_after))
    }

    /// The very same answer (its bytes not just equal but shared), as
    /// served: status and class included.
    pub fn same(&self, other: &Stored) -> bool {
        self.data.as_ptr() == other.data.as_ptr()
            && self.data.len() == other.data.len()
            && self.status == other.status
            && self.class == other.class
            && self.retry_after == other.retry_after
    }

    /// Bits to pick a slot with for [`Self::same`] answers.
    pub fn spread(&self) -> u64 {
        self.data.as_ptr() as u64
    }

    /// The `index`th value after the body (ETag, Content-Type, X-Request-Id).
    fn value(&self, index: usize, len: u8) -> Option<HeaderValue> {
        if len == 0 {
            return None;
        }
        let lens = [self.etag_len, self.content_type_len, self.request_id_len];
        let start =
            self.body_len as usize + lens[..index].iter().map(|l| usize::from(*l)).sum::<usize>();
        // Bytes that were a valid header value upstream are valid again.
        HeaderValue::from_maybe_shared(self.data.slice(start..start + usize::from(len))).ok()
    }

    /// The answer as the shared tier keeps it: a fixed header, then the same
    /// bytes as here. Its window start travels beside it, in Redis's clock.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SHARED_HEADER + self.data.len());
        out.push(SHARED_VERSION);
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        out.push(self.class as u8);
        out.extend_from_slice(&self.retry_after.to_be_bytes());
        out.extend_from_slice(&self.body_len.to_be_bytes());
        out.extend([self.etag_len, self.content_type_len, self.request_id_len]);
        out.extend_from_slice(&self.data);
        out
    }

    /// An answer another replica kept, or None if the bytes are not one
    /// (another version, or damaged): then the shared copy is ignored.
    pub fn decode(bytes: &[u8], stored_at: Instant) -> Option<Stored> {
        let (head, data) = bytes.split_at_checked(SHARED_HEADER)?;
        if head[0] != SHARED_VERSION {
            return None;
        }
        let status = StatusCode::from_u16(u16::from_be_bytes([head[1], head[2]])).ok()?;
        let class = match head[3] {
            0 => Class::Terminal,
            1 => Class::Running,
            2 => Class::NotFound,
            3 => Class::Uncacheable,
            _ => return None,
        };
        let retry_after = u32::from_be_bytes(head[4..8].try_into().ok()?);
        let body_len = u32::from_be_bytes(head[8..12].try_into().ok()?);
        let [etag_len, content_type_len, request_id_len] = [head[12], head[13], head[14]];
        let total = body_len as usize
            + usize::from(etag_len)
            + usize::from(content_type_len)
            + usize::from(request_id_len);
        if total != data.len() || etag_len != 34 {
            return None;
        }
        let stored = Stored {
            data: Bytes::copy_from_slice(data),
            body_len,
            etag_len,
            content_type_len,
            request_id_len,
            status,
            class,
            retry_after,
            stored_at,
            activity: None,
        };
        // Every value must be a valid header value, as when it was stored.
        let valid = (0..3).all(|i| {
            let len = [etag_len, content_type_len, request_id_len][i];
            len == 0 || stored.value(i, len).is_some()
        });
        valid.then_some(stored)
    }

    /// Bytes weighed against the budget beyond the store's own bookkeeping.
    pub fn weight(&self) -> usize {
        let activity = self.activity.as_ref().map_or(0, |a| {
            std::mem::size_of::<JobActivity>() + a.project.len() + a.job.len() + 16
        });
        self.data.len() + std::mem::size_of::<Stored>() + activity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    const RUNNING: &str = r#"{"id":"j","status":"RUNNING","progress_percent":0.5}"#;

    fn response(status: u16, body: &str) -> UpstreamResponse {
        UpstreamResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn stored_answers_copy_body_and_headers_into_one_allocation() {
        let mut upstream = response(200, RUNNING);
        upstream.headers.insert(
            "content-type",
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        upstream
            .headers
            .insert("x-request-id", HeaderValue::from_static("abc123"));
        let stored = Stored::new(&upstream, Class::Running, Instant::now());
        assert_eq!(stored.body(), RUNNING);
        assert_eq!(
            stored.content_type().unwrap(),
            "application/json;charset=UTF-8"
        );
        assert_eq!(stored.request_id().unwrap(), "abc123");
        assert_eq!(stored.etag().len(), 34);
        assert_eq!(stored.retry_after(), None);
        assert_eq!(stored.data.len(), RUNNING.len() + 34 + 30 + 6);
        let shared = Stored::decode(&stored.encode(), stored.stored_at).unwrap();
        assert_eq!(shared.encode(), stored.encode());
        assert_eq!((shared.etag(), shared.class), (stored.etag(), stored.class));
        let mut damaged = stored.encode();
        damaged.pop();
        assert!(Stored::decode(&damaged, stored.stored_at).is_none());
        assert!(Stored::decode(b"", stored.stored_at).is_none());
        let bare = Stored::new(&response(200, ""), Class::Running, Instant::now());
        assert_eq!(
            (bare.content_type(), bare.request_id(), bare.body().len()),
            (None, None, 0)
        );
    }
}
