//! Huawei Cloud's `SDK-HMAC-SHA256` request signature, as the official SDKs'
//! signer computes it; pure functions over a request's parts, used by the
//! `aksk` credential to sign and by the simulator to verify.

#[cfg(feature = "tools")]
use std::time::Duration;
use std::time::SystemTime;

use hmac::{Hmac, Mac};
use http::HeaderMap;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

pub const ALGORITHM: &str = "SDK-HMAC-SHA256";

/// Everything but RFC 3986 unreserved characters is encoded.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `X-Sdk-Date`: UTC as `%Y%m%dT%H%M%SZ`.
pub fn sdk_date(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace(['-', ':'], "")
}

/// Largest clock skew Huawei accepts on `X-Sdk-Date`.
#[cfg(feature = "tools")]
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Parses an `X-Sdk-Date` back into a time (the simulator's verifier).
#[cfg(feature = "tools")]
pub fn parse_sdk_date(value: &str) -> Option<SystemTime> {
    let b = value.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &value[0..4],
        &value[4..6],
        &value[6..8],
        &value[9..11],
        &value[11..13],
        &value[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

/// Whether `date` is within `skew` of `now` either way.
#[cfg(feature = "tools")]
pub fn date_within(date: SystemTime, now: SystemTime, skew: Duration) -> bool {
    let diff = now.duration_since(date).unwrap_or_else(|e| e.duration());
    diff <= skew
}

/// Percent-decodes then re-encodes, so `a%2Fb` and `a/b` inside one segment agree.
fn encode(raw: &str) -> String {
    let decoded = percent_decode_str(raw).decode_utf8_lossy();
    utf8_percent_encode(&decoded, ENCODE).to_string()
}

/// Canonical URI: each segment re-encoded, and always a trailing `/`.
fn canonical_uri(path: &str) -> String {
    let mut uri = path.split('/').map(encode).collect::<Vec<_>>().join("/");
    if !uri.ends_with('/') {
        uri.push('/');
    }
    uri
}

/// Canonical query: `key=value` pairs encoded, sorted, joined with `&`.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (encode(k), encode(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The headers that are signed: every name without `_`, lower-cased, sorted.
pub fn signed_header_names(headers: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = headers
        .keys()
        .map(|n| n.as_str().to_string())
        .filter(|n| !n.contains('_'))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The canonical request over `names` (already sorted); `None` if one is missing.
pub fn canonical_request(
    method: &str,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    names: &[String],
    body: &[u8],
) -> Option<String> {
    let mut canonical_headers = String::new();
    for name in names {
        let value = headers.get(name.as_str())?.to_str().ok()?;
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(value.trim());
        canonical_headers.push('\n');
    }
    Some(format!(
        "{method}\n{}\n{}\n{canonical_headers}\n{}\n{}",
        canonical_uri(path),
        canonical_query(query),
        names.join(";"),
        hex::encode(Sha256::digest(body)),
    ))
}

/// Hex HMAC-SHA256 of the string to sign, keyed with the secret key.
pub fn signature(sk: &[u8], date: &str, canonical_request: &str) -> String {
    let string_to_sign = format!(
        "{ALGORITHM}\n{date}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(sk).expect("HMAC takes any key length");
    mac.update(string_to_sign.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The `Authorization` value for a request whose headers (Host and X-Sdk-Date
/// included) are final.
pub fn authorization(
    ak: &str,
    sk: &[u8],
    method: &str,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<String> {
    let date = headers.get("x-sdk-date")?.to_str().ok()?;
    let names = signed_header_names(headers);
    let canonical = canonical_request(method, path, query, headers, &names, body)?;
    Some(format!(
        "{ALGORITHM} Access={ak}, SignedHeaders={}, Signature={}",
        names.join(";"),
        signature(sk, date, &canonical)
    ))
}

/// An `Authorization: SDK-HMAC-SHA256 ...` header taken apart (the
/// simulator's verifier).
#[cfg(feature = "tools")]
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedAuthorization {
    pub access: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

#[cfg(feature = "tools")]
pub fn parse_authorization(value: &str) -> Option<ParsedAuthorization> {
    let rest = value.strip_prefix(ALGORITHM)?.trim_start();
    let (mut access, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k {
            "Access" => access = Some(v.to_string()),
            "SignedHeaders" => signed = Some(v.split(';').map(str::to_string).collect()),
            "Signature" => signature = Some(v.to_string()),
            _ => return None,
        }
    }
    Some(ParsedAuthorization {
        access: access?,
        signed_headers: signed?,
        signature: signature?,
    })
}

#[cfg(all(test, feature = "tools"))]
mod tests {
    use super::*;
    use http::HeaderValue;

    const AK: &str = "HPUAEXAMPLEAK0000001";
    const SK: &[u8] = b"exampleSecretKey0123456789abcdefghijABCD";
    const PROJECT: &str = "0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn vector_v1_drs() {
        let h = headers(&[
            ("host", "drs.cn-north-4.myhuaweicloud.com"),
            ("x-language", "en-us"),
            ("content-type", "application/json"),
            ("user-agent", "huaweicloud-usdk-python/3.0"),
            ("x-project-id", PROJECT),
            ("x-sdk-date", "20240102T030405Z"),
        ]);
        let path =
            format!("/v5/{PROJECT}/jobs/a1b2c3d4-0000-1111-2222-333344445555/export/progress");
        let canonical =
            canonical_request("GET", &path, "", &h, &signed_header_names(&h), b"").unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(canonical.as_bytes())),
            "26637ba97f2def3a931356e0b1ac884fe5ddf7ca3333c3b2bdc18612f862cc60"
        );
        assert_eq!(
            authorization(AK, SK, "GET", &path, "", &h, b"").unwrap(),
            "SDK-HMAC-SHA256 Access=HPUAEXAMPLEAK0000001, SignedHeaders=content-type;host;user-agent;x-language;x-project-id;x-sdk-date, Signature=c6784be3138f3338ef426d2244f9973c58c494948565763b1ab15733bfaadb10"
        );
    }

    #[test]
    fn vector_v2_roma_with_security_token() {
        let h = headers(&[
            ("host", "roma.cn-north-4.myhuaweicloud.com"),
            ("content-type", "application/json"),
            ("user-agent", "huaweicloud-usdk-python/3.0"),
            ("x-project-id", PROJECT),
            ("x-security-token", "gQpjbi1ub3J0aC00EXAMPLETOKEN"),
            ("x-sdk-date", "20240102T030405Z"),
        ]);
        let path = format!("/v2/{PROJECT}/instances/11111111-2222-3333-4444-555555555555/assets/jobs/66666666-7777-8888-9999-000000000000");
        assert_eq!(
            authorization(AK, SK, "GET", &path, "", &h, b"").unwrap(),
            "SDK-HMAC-SHA256 Access=HPUAEXAMPLEAK0000001, SignedHeaders=content-type;host;user-agent;x-project-id;x-sdk-date;x-security-token, Signature=5d33139f556d939ddea8ef828c7d0a428ddec26dab069e65f8cb8522cce304f5"
        );
    }

    #[test]
    fn vector_public_guide_with_query() {
        let h = headers(&[
            ("host", "service.region.example.com"),
            ("content-type", "application/json"),
            ("x-sdk-date", "20191115T033655Z"),
        ]);
        let value = authorization(
            "QTWAOYTTINDUT2QVKYUC",
            b"MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc",
            "GET",
            "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs",
            "marker=13551d6b-755d-4757-b956-536f674975c0&limit=2",
            &h,
            b"",
        )
        .unwrap();
        assert_eq!(
            value,
            "SDK-HMAC-SHA256 Access=QTWAOYTTINDUT2QVKYUC, SignedHeaders=content-type;host;x-sdk-date, Signature=7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
        );
        let parsed = parse_authorization(&value).unwrap();
        assert_eq!(parsed.access, "QTWAOYTTINDUT2QVKYUC");
        assert_eq!(
            parsed.signed_headers,
            ["content-type", "host", "x-sdk-date"]
        );
    }

    #[test]
    fn headers_with_underscores_are_not_signed() {
        let h = headers(&[("x_odd", "1"), ("host", "h")]);
        assert_eq!(signed_header_names(&h), ["host"]);
    }

    #[test]
    fn sdk_dates_round_trip_and_skew_is_bounded() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_164_645);
        assert_eq!(sdk_date(at), "20240102T030405Z");
        assert_eq!(parse_sdk_date("20240102T030405Z"), Some(at));
        assert_eq!(parse_sdk_date("2024-01-02"), None);
        let skew = Duration::from_secs(900);
        assert!(date_within(at, at + skew, skew));
        assert!(date_within(at + skew, at, skew));
        assert!(!date_within(at, at + skew + Duration::from_secs(1), skew));
    }
}
