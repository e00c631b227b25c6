//! Test harness: the simulator and the gateway on 127.0.0.1:0, a token file in a
//! temporary directory, and a small HTTP client over real sockets.
#![allow(dead_code)] // each test binary uses a different part

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use progress_gateway::config::Config;
use progress_gateway::proxy::Gateway;
use progress_gateway::server;
use progress_gateway::simulator::{Behaviour, SimAuth, Simulator};
use tokio::net::TcpListener;

pub const TOKEN: &str = "sim-token-4f1d2c9e";
pub const PROJECT: &str = "0123456789abcdef0123456789abcdef";
pub const OTHER_PROJECT: &str = "fedcba9876543210fedcba9876543210";

pub fn drs_path(job: &str) -> String {
    format!("/v5/{PROJECT}/jobs/{job}/export/progress")
}

pub fn roma_path(job: &str) -> String {
    format!("/v2/{PROJECT}/instances/inst-1/assets/jobs/{job}")
}

pub struct Harness {
    pub sim: Simulator,
    pub sim_addr: SocketAddr,
    pub addr: SocketAddr,
    /// The admin listener (metrics, health).
    pub admin: SocketAddr,
    pub gateway: Arc<Gateway>,
    client: Client<HttpConnector, Empty<Bytes>>,
    _dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

/// Starts the simulator on port 0.
pub async fn start_simulator(behaviour: Behaviour) -> (Simulator, SocketAddr) {
    let auth = SimAuth {
        token: Some(TOKEN.into()),
        ..SimAuth::default()
    };
    start_simulator_with(auth, behaviour).await
}

/// Starts the simulator on port 0 accepting `auth`.
pub async fn start_simulator_with(auth: SimAuth, behaviour: Behaviour) -> (Simulator, SocketAddr) {
    let sim = Simulator::new(auth, behaviour);
    let addr = sim.spawn("127.0.0.1:0").await.unwrap();
    (sim, addr)
}

/// What to start: the simulator's auth and behaviour, extra TOML sections
/// (`[upstream]`, `[cache]` ...), and the `[credentials.main]` body used by
/// the first project (`{dir}` is a temporary directory, `{sim}` the simulator).
pub struct Spec {
    pub auth: SimAuth,
    pub behaviour: Behaviour,
    pub sections: String,
    pub credential: String,
    pub upstream_url: Option<String>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            auth: SimAuth {
                token: Some(TOKEN.into()),
                ..SimAuth::default()
            },
            behaviour: Behaviour::default(),
            sections: String::new(),
            credential: "kind = \"token\"\ntoken_file = \"{dir}/token\"".into(),
            upstream_url: None,
        }
    }
}

/// Starts the simulator and the gateway in front of it as `spec` says.
pub async fn start_spec(spec: Spec) -> Harness {
    let (sim, sim_addr) = start_simulator_with(spec.auth, spec.behaviour).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let dir_text = dir.path().display().to_string();
    let url = spec
        .upstream_url
        .unwrap_or_else(|| format!("http://{sim_addr}"));
    let credential = spec
        .credential
        .replace("{dir}", &dir_text)
        .replace("{sim}", &sim_addr.to_string());
    let sections = spec.sections;
    let text = format!(
        r#"
listen = "127.0.0.1:0"
{sections}

[regions.sim]
drs = "{url}"
roma = "{url}"

[credentials.main]
{credential}

[credentials.second]
kind = "token"
token_file = "{dir_text}/token"

[[projects]]
id = "{PROJECT}"
region = "sim"
credential = "main"

[[projects]]
id = "{OTHER_PROJECT}"
region = "sim"
credential = "second"
"#
    );
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let gateway = Gateway::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    gateway.spawn(listener);
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let handle = gateway.clone();
    tokio::spawn(server::serve(
        admin_listener,
        move |request| {
            let gateway = handle.clone();
            async move { progress_gateway::admin::handle(&gateway, &request) }
        },
        std::future::pending(),
        Duration::ZERO,
    ));
    Harness {
        sim,
        sim_addr,
        addr,
        admin,
        gateway,
        client: Client::builder(TokioExecutor::new()).build_http(),
        _dir: dir,
    }
}

/// Starts the gateway with `sections` in front of the simulator, optionally
/// pointing its region at `upstream_url` instead.
pub async fn start_with(
    behaviour: Behaviour,
    sections: &str,
    upstream_url: Option<String>,
) -> Harness {
    start_spec(Spec {
        behaviour,
        sections: sections.into(),
        upstream_url,
        ..Spec::default()
    })
    .await
}

pub async fn start(sections: &str) -> Harness {
    start_with(Behaviour::default(), sections, None).await
}

impl Harness {
    pub fn token_path(&self) -> std::path::PathBuf {
        self._dir.path().join("token")
    }

    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[]).await
    }

    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request_to(self.addr, method, path, headers).await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        self.request_to(self.admin, "GET", path, &[]).await
    }

    pub async fn request_to(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = tokio::time::timeout(
            Duration::from_secs(30),
            self.client.request(builder.body(Empty::new()).unwrap()),
        )
        .await
        .expect("gateway answered within 30 s")
        .expect("gateway reachable");
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

/// Asserts a gateway error answer: status, Huawei-shaped body, X-Request-Id.
pub fn assert_gateway_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status.as_u16(), status, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(body["error_code"], code, "{body}");
    assert!(
        body["error_msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    let id = reply.header("x-request-id");
    assert!(!id.is_empty(), "X-Request-Id header");
    assert_eq!(body["request_id"], id);
    assert!(reply.header("content-type").starts_with("application/json"));
}
