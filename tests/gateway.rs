//! The gateway core over real sockets: forwarding, credential injection and
//! stripping, routing errors, upstream failures.

mod common;

use std::time::Duration;

use common::*;
use progress_gateway::tools::simulator::Behaviour;

#[tokio::test]
async fn drs_progress_is_forwarded_with_the_gateways_token_only() {
    let h = start("").await;
    let path = drs_path("62a055ae-ce03-4232-beb6-46c83b8ef2b2");
    let reply = h
        .request(
            "GET",
            &format!("{path}?marker=1"),
            &[
                (
                    "authorization",
                    "SDK-HMAC-SHA256 Access=CLIENTAK, SignedHeaders=host, Signature=00",
                ),
                ("x-auth-token", "client-token"),
                ("x-sdk-date", "20261122T074440Z"),
                ("x-security-token", "client-sts"),
                ("cookie", "session=client"),
                ("x-project-id", "not-the-project"),
                ("x-language", "en-US"),
                ("x-request-id", "client-req-1"),
                ("proxy-authorization", "Basic abc"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["process_status"], "pending");
    assert!(reply.header("content-type").starts_with("application/json"));

    let seen = h
        .sim
        .last_headers(&path)
        .expect("the simulator saw the request");
    assert_eq!(seen["x-auth-token"], TOKEN);
    assert_eq!(seen["x-project-id"], PROJECT);
    assert_eq!(seen["x-language"], "en-us");
    assert_eq!(seen["x-request-id"], "client-req-1");
    assert_eq!(seen["accept-encoding"], "identity");
    for stripped in [
        "authorization",
        "x-sdk-date",
        "x-security-token",
        "cookie",
        "proxy-authorization",
    ] {
        assert!(!seen.contains_key(stripped), "{stripped} reached upstream");
    }
    // The query string is not forwarded: the simulator counted the bare path.
    assert_eq!(h.sim.requests(&path), 1);
}

#[tokio::test]
async fn roma_job_status_is_forwarded_with_upstream_request_id() {
    let h = start("").await;
    let reply = h.get(&roma_path("ff8080814dbd65d7014dbe0d84db0013")).await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["status"], "RUNNING");
    assert_eq!(body["id"], "ff8080814dbd65d7014dbe0d84db0013");
    assert!(body["reasons"].is_array());
    let upstream_id = reply.header("x-request-id");
    assert_eq!(
        upstream_id.len(),
        32,
        "the simulator's request id is passed on"
    );
    assert_ne!(upstream_id, reply.header("x-gateway-request-id"));
}

#[tokio::test]
async fn a_generated_request_id_reaches_upstream_when_the_client_sends_none() {
    let h = start("").await;
    let path = drs_path("j1");
    h.get(&path).await;
    let id = h.sim.last_headers(&path).unwrap()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 32);
}

#[tokio::test]
async fn head_answers_headers_without_a_body() {
    let h = start("").await;
    let get = h.get(&drs_path("j1")).await;
    let head = h.request("HEAD", &drs_path("j1"), &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    assert_eq!(head.header("etag"), get.header("etag"));
}

#[tokio::test]
async fn unknown_paths_get_404_in_huawei_shape() {
    let h = start("").await;
    for path in [
        "/",
        "/v3/auth/tokens",
        "/v5/p/jobs",
        &format!("{}/x", drs_path("j")),
    ] {
        assert_gateway_error(&h.get(path).await, 404, "PGW.4040");
    }
    assert_eq!(h.sim.total(), 0);
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let h = start("").await;
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let reply = h.request(method, &drs_path("j"), &[]).await;
        assert_gateway_error(&reply, 405, "PGW.4050");
        assert_eq!(reply.header("allow"), "GET, HEAD");
    }
}

#[tokio::test]
async fn malformed_identifiers_and_headers_get_400() {
    let h = start("").await;
    let long = "a".repeat(65);
    for path in [
        format!("/v5/{PROJECT}/jobs/..%2F..%2Fx/export/progress"),
        format!("/v5/{PROJECT}/jobs/a.b/export/progress"),
        format!("/v5/{PROJECT}//export/progress").replace("//", "/jobs//"),
        format!("/v5/{PROJECT}/jobs/{long}/export/progress"),
        format!("{}/", drs_path("j")),
    ] {
        assert_gateway_error(&h.get(&path).await, 400, "PGW.4000");
    }
    let reply = h
        .request("GET", &drs_path("j"), &[("x-language", "en-us,zh-cn")])
        .await;
    assert_gateway_error(&reply, 400, "PGW.4000");
    assert_eq!(h.sim.total(), 0);
}

#[tokio::test]
async fn a_project_not_configured_gets_403_and_never_reaches_upstream() {
    let h = start("").await;
    let reply = h
        .get("/v5/99999999999999999999999999999999/jobs/j/export/progress")
        .await;
    assert_gateway_error(&reply, 403, "PGW.4030");
    assert_eq!(h.sim.total(), 0);
}

#[tokio::test]
async fn a_client_request_id_is_echoed_on_gateway_errors() {
    let h = start("").await;
    let reply = h
        .request("GET", "/nope", &[("x-request-id", "trace-42")])
        .await;
    assert_gateway_error(&reply, 404, "PGW.4040");
    assert_eq!(reply.header("x-request-id"), "trace-42");
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = start_with(Behaviour::default(), "", Some(format!("http://{closed}"))).await;
    assert_gateway_error(&h.get(&drs_path("j")).await, 502, "PGW.5020");
}

#[tokio::test]
async fn a_slow_upstream_gets_504() {
    let behaviour = Behaviour {
        latency: Duration::from_secs(5),
        ..Behaviour::default()
    };
    let h = start_with(behaviour, "[upstream]\nrequest_timeout = \"200ms\"", None).await;
    let started = std::time::Instant::now();
    assert_gateway_error(&h.get(&roma_path("j")).await, 504, "PGW.5040");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn upstream_403_and_404_pass_through_unchanged() {
    let h = start("").await;
    h.sim.set_behaviour(|b| b.force_status = Some(403));
    let reply = h.get(&roma_path("j")).await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.json(),
        serde_json::json!({"error_code": "SIM.0001", "error_msg": "status forced by the simulator"})
    );
    assert_eq!(reply.header("cache-control"), "no-store");
    assert_eq!(reply.header("x-request-id").len(), 32);

    h.sim.set_behaviour(|b| b.force_status = None);
    let reply = h.get(&roma_path("missing-1")).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error_code"], "SIM.0404");
}

#[tokio::test]
async fn a_missing_token_file_gets_503_and_other_errors_stay_clear() {
    let h = start("").await;
    std::fs::remove_file(h.token_path()).unwrap();
    // The token was never read, so the missing file is noticed on first use.
    let reply = h.get(&drs_path("j")).await;
    assert_gateway_error(&reply, 503, "PGW.5030");
    let message = reply.json()["error_msg"].as_str().unwrap().to_string();
    assert!(message.contains(PROJECT), "{message}");
    // Where the token comes from is the operator's business, not the client's.
    let path = h.token_path().display().to_string();
    assert!(
        !message.contains(&path) && !message.contains("token"),
        "{message}"
    );
}
