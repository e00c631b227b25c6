//! Each credential kind end to end through the gateway to the simulator, with
//! the gateway's logs captured: no secret or token may ever appear in them.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use progress_gateway::tools::simulator::{Behaviour, IamUser, SimAuth};

const AK: &str = "HPUAGATEWAYAK0000001";
const SK: &str = "gatewaySecretKey0123456789abcdefghijKLMN";
const STS: &str = "gQpjbi1ub3J0aC00STSTOKENVALUE";
const PASSWORD: &str = "iam-Passw0rd-never-logged";

/// Every log line of this test binary, at TRACE, without colours.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .init();
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fails if any secret, or any token the simulator's IAM issued, was logged.
fn assert_logs_hold_no_secret() {
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(logs.contains("progress_gateway"), "logs were captured");
    for secret in [SK, STS, PASSWORD, TOKEN, "MIIsim", "Signature="] {
        assert!(!logs.contains(secret), "{secret} appeared in the logs");
    }
}

/// The reasons `/readyz` (admin listener) gives for unready projects.
async fn unready_reasons(h: &Harness) -> String {
    let ready = h.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    ready.json()["unready"].to_string()
}

fn iam_user(lifetime: Duration) -> SimAuth {
    SimAuth {
        token: Some(TOKEN.into()),
        iam: Some(IamUser {
            name: "gateway-bot".into(),
            domain: "acme".into(),
            password: PASSWORD.into(),
            token_lifetime: lifetime,
        }),
        ..SimAuth::default()
    }
}

fn iam_credential(margin: &str, backoff: &str) -> String {
    format!(
        "kind = \"iam-password\"\niam_url = \"http://{{sim}}\"\nuser = \"gateway-bot\"\ndomain = \"acme\"\npassword_file = \"{{dir}}/password\"\nrefresh_margin = \"{margin}\"\nretry_backoff = \"{backoff}\""
    )
}

async fn start_iam(lifetime: Duration, margin: &str, behaviour: Behaviour) -> Harness {
    logs();
    start_spec(Spec {
        auth: iam_user(lifetime),
        behaviour,
        sections: "[cache]\nrunning_ttl = \"0s\"".into(),
        credential: Some(iam_credential(margin, "50ms")),
        files: vec![("password".into(), PASSWORD.into())],
        ..Spec::default()
    })
    .await
}

fn aksk_spec() -> Spec {
    Spec {
        auth: SimAuth {
            aksk: Some((AK.into(), SK.into())),
            ..SimAuth::default()
        },
        credential: Some("kind = \"aksk\"\nak_file = \"{dir}/ak\"\nsk_file = \"{dir}/sk\"".into()),
        ..Spec::default()
    }
}

async fn start_aksk(sk: &str) -> Harness {
    logs();
    start_spec(Spec {
        files: vec![("ak".into(), AK.into()), ("sk".into(), sk.into())],
        ..aksk_spec()
    })
    .await
}

#[tokio::test]
async fn aksk_signatures_are_accepted_by_the_simulators_verifier() {
    let h = start_aksk(SK).await;
    let path = drs_path("signed-job");
    let reply = h.request("GET", &path, &[("x-language", "en-us")]).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let seen = h.sim.last_headers(&path).unwrap();
    let authorization = seen["authorization"].to_str().unwrap();
    assert!(authorization.starts_with(&format!("SDK-HMAC-SHA256 Access={AK}, SignedHeaders=")));
    assert!(authorization.contains("SignedHeaders=accept;accept-encoding;content-type;host;user-agent;x-language;x-project-id;x-request-id;x-sdk-date, Signature="), "{authorization}");
    assert!(!seen.contains_key("x-auth-token"));
    assert_eq!(h.get(&roma_path("signed-job")).await.status, 200);
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn a_wrong_sk_is_rejected_with_a_clear_error() {
    let h = start_aksk("wrongSecretKey0123456789abcdefghijKLMNOP").await;
    let reply = h.get(&drs_path("j")).await;
    assert_eq!(reply.status, 401);
    let body = reply.json();
    assert_eq!(body["error_code"], "APIGW.0301");
    assert!(body["error_msg"]
        .as_str()
        .unwrap()
        .contains("signature mismatch"));
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn temporary_aksk_from_a_credentials_file_sends_the_security_token() {
    logs();
    let h = start_spec(Spec {
        credential: Some("kind = \"aksk\"\ncredentials_file = \"{dir}/temporary.json\"".into()),
        ..aksk_spec()
    })
    .await;
    let file = h.dir().join("temporary.json");
    let write = |expires_at: &str| {
        let json = serde_json::json!({"credential": {"access": AK, "secret": SK, "securitytoken": STS, "expires_at": expires_at}});
        std::fs::write(&file, json.to_string()).unwrap();
    };
    write("2020-01-01T00:00:00.000000Z");
    let reply = h.get(&drs_path("t1")).await;
    assert_gateway_error(&reply, 503, "PGW.5030");
    assert!(!reply.json()["error_msg"]
        .as_str()
        .unwrap()
        .contains("temporary.json"));
    assert!(unready_reasons(&h).await.contains("expired"));

    // An outside agent renews the file: picked up without a restart.
    write("2999-01-01T00:00:00.000000Z");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let path = drs_path("t2");
    assert_eq!(h.get(&path).await.status, 200);
    assert_eq!(h.sim.last_headers(&path).unwrap()["x-security-token"], STS);
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn a_rotated_token_file_is_used_without_restart() {
    logs();
    let h = start("[cache]\nrunning_ttl = \"0s\"").await;
    std::fs::write(h.token_path(), "stale-token-value").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.get(&drs_path("r")).await.status, 401);
    std::fs::write(h.token_path(), TOKEN).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.get(&drs_path("r")).await.status, 200);
    assert_logs_hold_no_secret();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_tokens_are_refreshed_before_expiry_without_a_failed_request() {
    let h = start_iam(Duration::from_secs(2), "1500ms", Behaviour::default()).await;
    let path = roma_path("polled");
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut polls = 0;
    while std::time::Instant::now() < until {
        let reply = h.get(&path).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        polls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(polls > 20);
    assert!(
        h.sim.iam_calls() >= 3,
        "refreshed ahead: {} IAM calls",
        h.sim.iam_calls()
    );
    assert_eq!(
        h.sim.requests(&path),
        polls,
        "no upstream request was retried after a 401"
    );
    assert_logs_hold_no_secret();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_requests_at_expiry_cause_one_iam_call() {
    // Tokens live 2 s: long enough that the hundred requests after the
    // first expiry finish before the second, even on a loaded machine.
    let h = Arc::new(start_iam(Duration::from_secs(2), "0s", Behaviour::default()).await);
    assert_eq!(h.get(&drs_path("warm")).await.status, 200);
    assert_eq!(h.sim.iam_calls(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.get(&drs_path(&format!("job{i}"))).await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(h.sim.iam_calls(), 2);
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn a_reload_while_iam_is_down_keeps_serving_with_the_valid_token() {
    let h = start_iam(Duration::from_secs(3600), "1m", Behaviour::default()).await;
    assert_eq!(h.get(&drs_path("before")).await.status, 200);
    assert_eq!(h.sim.iam_calls(), 1);
    h.sim.set_behaviour(|b| b.iam_down = true);
    // What SIGHUP does with an unchanged file.
    let restart = h.app().reload(h.config.clone()).unwrap();
    assert!(restart.is_empty(), "{restart:?}");
    let reply = h.get(&drs_path("after")).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(h.sim.iam_calls(), 1, "the token survived the reload");
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn an_upstream_refusing_every_token_cannot_make_the_gateway_hammer_iam() {
    let h = start_iam(Duration::from_secs(3600), "1m", Behaviour::default()).await;
    assert_eq!(h.get(&drs_path("warm")).await.status, 200);
    h.sim.set_behaviour(|b| b.force_status = Some(401));
    for i in 0..50 {
        let reply = h.get(&drs_path(&format!("job{i}"))).await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.json()["error_code"], "APIGW.0301");
    }
    // The first token, and one refresh within min_refresh_interval (30 s).
    assert_eq!(h.sim.iam_calls(), 2);
    assert_logs_hold_no_secret();
}

/// Fails if `text` holds any secret this test binary uses.
fn assert_no_secret(what: &str, text: &str) {
    for secret in [SK, STS, PASSWORD, TOKEN, "MIIsim"] {
        assert!(!text.contains(secret), "{secret} in {what}: {text}");
    }
}

/// Every way out a client or an operator sees: the answer's headers and
/// body, `/readyz` and `/metrics`.
async fn assert_nothing_leaks(h: &Harness, reply: &Reply) {
    assert_no_secret("the body", &String::from_utf8_lossy(&reply.body));
    assert_no_secret("the headers", &format!("{:?}", reply.headers));
    assert_no_secret(
        "/readyz",
        &String::from_utf8_lossy(&h.admin_get("/readyz").await.body),
    );
    assert_no_secret(
        "/metrics",
        &String::from_utf8_lossy(&h.admin_get("/metrics").await.body),
    );
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn an_upstream_echoing_the_token_never_passes_it_on() {
    logs();
    let h = start("").await;
    h.sim.set_behaviour(|b| b.echo = true);
    let reply = h.get(&drs_path("echo")).await;
    assert_eq!(reply.status, 500);
    let body = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(body.contains("X-Auth-Token=<redacted>"), "{body}");
    assert_nothing_leaks(&h, &reply).await;
}

#[tokio::test]
async fn temporary_keys_echoed_by_upstream_never_pass_on() {
    logs();
    let h = start_spec(Spec {
        credential: Some("kind = \"aksk\"\ncredentials_file = \"{dir}/temporary.json\"".into()),
        ..aksk_spec()
    })
    .await;
    // A shifted file: the SK where the AK belongs, and the other way round.
    let json = serde_json::json!({"credential": {"access": SK, "secret": AK, "securitytoken": STS, "expires_at": "2999-01-01T00:00:00Z"}});
    std::fs::write(h.dir().join("temporary.json"), json.to_string()).unwrap();
    h.sim.set_behaviour(|b| b.echo = true);
    let reply = h.get(&drs_path("shifted")).await;
    assert_eq!(reply.status, 500);
    assert_nothing_leaks(&h, &reply).await;
    // Not JSON at all: a clear reason, no value quoted.
    std::fs::write(
        h.dir().join("temporary.json"),
        format!("{{\"credential\": {SK}"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // the file is rechecked once a second
    let reply = h.get(&drs_path("broken")).await;
    assert_gateway_error(&reply, 503, "PGW.5030");
    assert_nothing_leaks(&h, &reply).await;
}

#[tokio::test]
async fn an_iam_quoting_the_password_never_passes_it_on() {
    let h = start_iam(
        Duration::from_secs(3600),
        "1m",
        Behaviour {
            iam_down: true,
            echo: true,
            ..Behaviour::default()
        },
    )
    .await;
    let reply = h.get(&drs_path("a")).await;
    assert_gateway_error(&reply, 503, "PGW.5030");
    let readyz = String::from_utf8_lossy(&h.admin_get("/readyz").await.body).into_owned();
    assert!(readyz.contains("IAM is unavailable"), "{readyz}");
    assert_nothing_leaks(&h, &reply).await;
}

#[tokio::test]
async fn an_upstream_401_triggers_one_refresh_and_one_retry() {
    let h = start_iam(Duration::from_secs(3600), "1m", Behaviour::default()).await;
    assert_eq!(h.get(&drs_path("a")).await.status, 200);
    h.sim.revoke_tokens();
    let path = drs_path("b");
    let reply = h.get(&path).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(h.sim.iam_calls(), 2);
    assert_eq!(h.sim.requests(&path), 2, "the 401 and the retry");
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn iam_down_at_start_gives_503_then_recovers_without_restart() {
    let h = start_iam(
        Duration::from_secs(3600),
        "1m",
        Behaviour {
            iam_down: true,
            ..Behaviour::default()
        },
    )
    .await;
    let reply = h.get(&drs_path("a")).await;
    assert_gateway_error(&reply, 503, "PGW.5030");
    assert!(!reply.json()["error_msg"].as_str().unwrap().contains("IAM"));
    assert!(unready_reasons(&h).await.contains("IAM answered 503"));
    // The other project, on a static token, is served all along.
    let other = format!("/v5/{OTHER_PROJECT}/jobs/a/export/progress");
    assert_eq!(h.get(&other).await.status, 200);

    h.sim.set_behaviour(|b| b.iam_down = false);
    tokio::time::sleep(Duration::from_millis(250)).await; // past the retry backoff
    assert_eq!(h.get(&drs_path("a")).await.status, 200);
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn a_wrong_iam_password_is_a_clear_503() {
    let h = start_iam(Duration::from_secs(3600), "1m", Behaviour::default()).await;
    std::fs::write(h.dir().join("password"), "not-the-password").unwrap();
    let reply = h.get(&drs_path("a")).await;
    assert_gateway_error(&reply, 503, "PGW.5030");
    let message = reply.json()["error_msg"].as_str().unwrap().to_string();
    assert!(!message.contains("password"), "{message}");
    let reasons = unready_reasons(&h).await;
    assert!(
        reasons.contains("username or password is wrong"),
        "{reasons}"
    );
    assert!(!reasons.contains("not-the-password"));
    assert_logs_hold_no_secret();
}
