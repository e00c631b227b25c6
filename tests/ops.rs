//! What an operator relies on, over real sockets: metrics, health and
//! readiness, consumer keys, connection limits, HTTP/2 and TLS.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn metrics_count_requests_upstream_calls_and_cache_state() {
    let h = start("[cache]\nrunning_ttl = \"10s\"").await;
    h.get(&drs_path("m")).await;
    h.get(&drs_path("m")).await;
    h.get("/nope").await;
    let reply = h.admin_get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .starts_with("application/openmetrics-text"));
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    for line in [
        r#"pgw_requests_total{route="drs",status="200",cache="MISS"} 1"#,
        r#"pgw_requests_total{route="drs",status="200",cache="HIT"} 1"#,
        r#"pgw_requests_total{route="-",status="404",cache="-"} 1"#,
        r#"pgw_upstream_requests_total{api="drs",status="200",outcome="answered"} 1"#,
        r#"pgw_upstream_latency_seconds_count{api="drs"} 1"#,
        "pgw_cache_entries 1",
        "pgw_cache_evictions_total 0",
        "pgw_coalesced_waiters_total 0",
        r#"pgw_upstream_backoffs{cause="throttled"} 0"#,
        r#"pgw_upstream_backoffs{cause="failing"} 0"#,
        r#"pgw_credential_failures_total{credential="main",kind="token"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(!text.contains(TOKEN));
}

#[tokio::test]
async fn a_request_without_a_usable_credential_is_counted_as_a_credential_failure() {
    let h = start_spec(Spec {
        credential: Some("kind = \"token\"\ntoken_file = \"{dir}/absent\"".into()),
        ..Spec::default()
    })
    .await;
    assert_gateway_error(&h.get(&drs_path("a")).await, 503, "PGW.5030");
    assert_gateway_error(&h.get(&drs_path("b")).await, 503, "PGW.5030");
    let text = String::from_utf8(h.admin_get("/metrics").await.body.to_vec()).unwrap();
    for line in [
        r#"pgw_credential_failures_total{credential="main",kind="token"} 2"#,
        r#"pgw_upstream_requests_total{api="drs",status="0",outcome="credential"} 2"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert_eq!(h.sim.total(), 0);
}

#[tokio::test]
async fn healthz_is_alive_and_readyz_names_projects_without_credentials() {
    let h = start("").await;
    assert_eq!(h.admin_get("/healthz").await.status, 200);
    let ready = h.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    assert_eq!(ready.json()["ready"], true);

    std::fs::remove_file(h.token_path()).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // the file is rechecked once a second
    let unready = h.admin_get("/readyz").await;
    assert_eq!(unready.status, 503);
    let body = unready.json();
    assert_eq!(body["ready"], false);
    let listed: Vec<_> = body["unready"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["project"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed.len(),
        2,
        "both projects read the removed file: {body}"
    );
    assert!(body["unready"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("cannot read"));
    // A token that cannot be a header value fails every request: not ready.
    std::fs::write(h.token_path(), "tok\u{1}en-with-a-control-byte").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // rechecked once a second
    let unready = h.admin_get("/readyz").await;
    assert_eq!(unready.status, 503);
    assert!(unready.json()["unready"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("not a valid HTTP header value"));
    let missing = h.admin_get("/other").await;
    assert_eq!(missing.status, 404);
    let message = missing.json()["error_msg"].as_str().unwrap().to_string();
    assert!(
        message.contains("/metrics") && !message.contains("/v5/"),
        "{message}"
    );
    assert!(!missing.header("x-request-id").is_empty());
}

fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[tokio::test]
async fn consumer_keys_gate_projects() {
    let sections = format!(
        "[consumers.ci]\nkey_sha256 = \"{}\"\nprojects = [\"{PROJECT}\"]\n\n[consumers.ops]\nkey_sha256 = \"{}\"\n",
        sha256_hex("ci-secret-key"),
        sha256_hex("ops-secret-key")
    );
    let h = start(&sections).await;
    let other = format!("/v5/{OTHER_PROJECT}/jobs/j/export/progress");
    assert_gateway_error(&h.get(&drs_path("j")).await, 401, "PGW.4010");
    let wrong = h
        .request("GET", &drs_path("j"), &[("x-gateway-key", "guess")])
        .await;
    assert_gateway_error(&wrong, 401, "PGW.4010");
    let signed = [
        ("x-gateway-key", "ci-secret-key"),
        (
            "authorization",
            "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature=00",
        ),
    ];
    assert_eq!(h.request("GET", &drs_path("j"), &signed).await.status, 200);
    assert!(
        !h.sim
            .last_headers(&drs_path("j"))
            .unwrap()
            .contains_key("x-gateway-key"),
        "the key is not forwarded"
    );
    assert_gateway_error(
        &h.request("GET", &other, &[("x-gateway-key", "ci-secret-key")])
            .await,
        403,
        "PGW.4031",
    );
    assert_eq!(
        h.request("GET", &other, &[("x-gateway-key", "ops-secret-key")])
            .await
            .status,
        200
    );
    assert_eq!(h.sim.total(), 2);
}

/// Reads until the server closes the connection; returns what arrived.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut all))
        .await
        .expect("the server closed the connection in time")
        .unwrap();
    all
}

async fn start_limited(limits: &str) -> Harness {
    start(&format!("[server]\n{limits}")).await
}

#[tokio::test]
async fn a_slow_header_sender_is_disconnected() {
    let h = start_limited("header_read_timeout = \"300ms\"").await;
    let addr = h.addr;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Closed by the header timeout, long before the 60 s idle timeout.
    let answer = read_to_close(&mut stream, Duration::from_secs(30)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let h = start_limited("idle_timeout = \"300ms\"").await;
    let addr = h.addr;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let path = drs_path("idle");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let h = start_limited("max_header_bytes = \"8KiB\"").await;
    // Over the limit: the gateway answers, in Huawei's shape, with a request id.
    let token = "t".repeat(12_000);
    let reply = h
        .request("GET", &drs_path("j"), &[("x-auth-token", &token)])
        .await;
    assert_gateway_error(&reply, 431, "PGW.4310");
    // Far over it (past hyper's buffer, twice the limit): hyper answers 431
    // bare and closes.
    let addr = h.addr;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let big = "a".repeat(40_000);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n",
        drs_path("j")
    );
    let _ = stream.write_all(request.as_bytes()).await;
    let answer = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(80)])
    );
    assert_eq!(h.sim.total(), 0);
}

#[tokio::test]
async fn busy_connections_beyond_the_limit_make_new_ones_wait() {
    let h = start_spec(Spec {
        behaviour: progress_gateway::tools::simulator::Behaviour {
            latency: Duration::from_millis(500),
            ..Default::default()
        },
        sections: "[server]\nmax_connections = 1".into(),
        ..Spec::default()
    })
    .await;
    let request = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", drs_path("j"));
    let mut first = TcpStream::connect(h.addr).await.unwrap();
    first.write_all(request.as_bytes()).await.unwrap();
    h.sim.arrived(1).await; // the first request is in flight
                            // The second connection is accepted by the kernel but not served ...
    let mut second = TcpStream::connect(h.addr).await.unwrap();
    second.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // ... until the first is no longer busy.
    tokio::time::timeout(Duration::from_secs(10), second.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    assert_eq!(h.sim.total(), 1, "the second shared the first's answer");
}

#[tokio::test]
async fn a_full_house_of_idle_and_silent_sockets_never_locks_out_a_real_client() {
    let h = start(
        "[server]\nmax_connections = 20\nidle_timeout = \"1h\"\nheader_read_timeout = \"1h\"",
    )
    .await;
    let request = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", drs_path("j"));
    let mut held = Vec::new();
    for i in 0..20 {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        if i % 2 == 0 {
            // Idle keep-alive: one request, then nothing.
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut buf = [0u8; 12];
            stream.read_exact(&mut buf).await.unwrap();
        }
        held.push(stream); // odd ones: silent from the start
    }
    let started = std::time::Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(10), h.get(&drs_path("j")))
        .await
        .expect("a real client is served with a full house");
    assert_eq!(reply.status, 200);
    eprintln!("served with a full house in {:?}", started.elapsed());
    // The oldest idle connection made room: the gateway closed it.
    let closed = read_to_close(&mut held[0], Duration::from_secs(10)).await;
    assert!(!closed.starts_with(b"HTTP/1.1 200"), "it only closes");
}

#[tokio::test]
async fn a_silent_connection_or_a_partial_http2_preface_is_closed_at_the_head_deadline() {
    let h = start_limited("header_read_timeout = \"300ms\"\nidle_timeout = \"1h\"").await;
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        // Closed by the 300 ms head deadline, long before the hour-long idle timeout.
        let answer = read_to_close(&mut stream, Duration::from_secs(30)).await;
        assert!(
            answer.is_empty() || !answer.starts_with(b"HTTP/1.1 200"),
            "{opening:?}"
        );
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_lives_past_the_head_deadline() {
    let h = start_limited("header_read_timeout = \"200ms\"\nidle_timeout = \"1h\"").await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let path = drs_path("kept");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    for _ in 0..2 {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = [0u8; 12];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        let mut rest = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut rest)).await;
        // Idle between requests for longer than the head deadline: still open.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An HTTP/2 connection by prior knowledge (h2c) to `addr`.
async fn h2c(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn http2_cleartext_is_served() {
    let h = start("").await;
    let mut sender = h2c(h.addr).await;
    let request = Request::get(format!("http://{}{}", h.addr, roma_path("h2")))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("RUNNING"));
}

fn self_signed(dir: &std::path::Path, name: &str) -> rcgen::CertifiedKey {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), certified.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{name}.key")),
        certified.key_pair.serialize_pem(),
    )
    .unwrap();
    certified
}

/// A TLS client that trusts only `trusted`; returns the negotiated ALPN and status.
/// The gateway on TLS with a self-signed certificate `name` written into
/// `dir`, and more `[server]` keys.
async fn start_tls(
    dir: &std::path::Path,
    name: &str,
    server: &str,
) -> (rcgen::CertifiedKey, Harness) {
    let cert = self_signed(dir, name);
    let h = start(&format!(
        "[server]\n{server}\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        dir.join(format!("{name}.pem")).display(),
        dir.join(format!("{name}.key")).display()
    ))
    .await;
    (cert, h)
}

/// A TLS connection to `addr` trusting `trusted`, handshake done.
async fn tls_connect(
    addr: std::net::SocketAddr,
    trusted: &rcgen::CertifiedKey,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_client_silent_after_the_tls_handshake_is_closed_at_the_head_deadline() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, h) = start_tls(
        certs.path(),
        "silent",
        "header_read_timeout = \"300ms\"\nidle_timeout = \"1h\"",
    )
    .await;
    let mut tls = tls_connect(h.addr, &cert).await.unwrap();
    let mut buf = Vec::new();
    // Nothing sent after the handshake: closed by the 300 ms head deadline,
    // long before the hour-long idle timeout.
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut buf))
        .await
        .expect("the gateway closed the silent TLS connection");
    assert!(buf.is_empty(), "{read:?}");
}

async fn tls_get(
    addr: std::net::SocketAddr,
    trusted: &rcgen::CertifiedKey,
    path: &str,
) -> Result<(Vec<u8>, u16), String> {
    let tls = tls_connect(addr, trusted).await?;
    let alpn = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    Ok((alpn, response.status().as_u16()))
}

#[tokio::test]
async fn tls_serves_and_a_reload_switches_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let (first, h) = start_tls(dir, "first", "").await;
    assert_eq!(h.running.scheme(), "https");
    let addr = h.addr;
    let (alpn, status) = tls_get(addr, &first, &drs_path("tls")).await.unwrap();
    assert_eq!((alpn.as_slice(), status), (&b"http/1.1"[..], 200));

    // New files in place, then a reload (what SIGHUP does).
    let second = self_signed(dir, "second");
    std::fs::rename(dir.join("second.pem"), dir.join("first.pem")).unwrap();
    std::fs::rename(dir.join("second.key"), dir.join("first.key")).unwrap();
    assert!(h.app().reload_tls().unwrap());
    assert_eq!(
        tls_get(addr, &second, &drs_path("tls")).await.unwrap().1,
        200
    );
    assert!(
        tls_get(addr, &first, &drs_path("tls")).await.is_err(),
        "the old certificate is gone"
    );

    std::fs::write(dir.join("first.pem"), "not a certificate").unwrap();
    assert!(h.app().reload_tls().is_err());
    assert_eq!(
        tls_get(addr, &second, &drs_path("tls")).await.unwrap().1,
        200,
        "a bad reload keeps the running certificate"
    );
}

/// One GET over a fresh connection from `source` (another loopback address
/// stands for another client); returns the status.
async fn get_from(source: &str, to: std::net::SocketAddr, path: &str, key: &str) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(to).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nX-Gateway-Key: {key}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut stream, Duration::from_secs(10)).await;
    String::from_utf8_lossy(&answer[9..12]).parse().unwrap()
}

#[tokio::test]
async fn consumer_keys_cannot_be_guessed_at_speed() {
    let sections = format!(
        "[consumers.ci]\nkey_sha256 = \"{}\"\n",
        sha256_hex("ci-secret-key")
    );
    let h = start(&sections).await;
    let path = drs_path("j");
    for guess in 0..10 {
        let status = get_from("127.0.0.1", h.addr, &path, &format!("guess-{guess}")).await;
        assert_eq!(status, 401);
    }
    // The eleventh attempt from that address is refused without checking,
    // even with the right key; other addresses are not affected.
    let reply = h
        .request("GET", &path, &[("x-gateway-key", "ci-secret-key")])
        .await;
    assert_gateway_error(&reply, 429, "PGW.4292");
    assert!(reply.header("retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(
        get_from("127.0.0.2", h.addr, &path, "ci-secret-key").await,
        200
    );
    assert_eq!(h.sim.total(), 1);
}

#[tokio::test]
async fn a_silent_http2_client_is_disconnected() {
    let h = start_limited("idle_timeout = \"300ms\"\nheader_read_timeout = \"300ms\"").await;
    // A relay between an HTTP/2 client and the gateway that, once the first
    // answer is through, forwards nothing either way: a client gone silent,
    // never answering the gateway's PING.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let silent = std::sync::Arc::new(tokio::sync::Notify::new());
    let gateway = h.addr;
    let relay_task = tokio::spawn({
        let silent = silent.clone();
        async move {
            let (client, _) = relay.accept().await.unwrap();
            let upstream = TcpStream::connect(gateway).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut gw_read, mut gw_write) = upstream.into_split();
            let forward = async {
                let up = tokio::io::copy(&mut client_read, &mut gw_write);
                let down = tokio::io::copy(&mut gw_read, &mut client_write);
                let _ = tokio::join!(up, down);
            };
            tokio::select! {
                () = forward => panic!("the relay ended before the client went silent"),
                () = silent.notified() => {}
            }
            // Keep both sockets open; wait for the gateway to close its side.
            let mut sink = vec![0u8; 65536];
            loop {
                match gw_read.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
    });
    let mut sender = h2c(relay_addr).await;
    let request = Request::get(format!("http://{gateway}{}", roma_path("h2-silent")))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    silent.notify_one();
    tokio::time::timeout(Duration::from_secs(20), relay_task)
        .await
        .expect("the gateway closed the silent HTTP/2 connection")
        .unwrap();
}
