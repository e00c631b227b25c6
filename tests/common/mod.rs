//! Test harness: the simulator and the gateway on 127.0.0.1:0, a token file in a
//! temporary directory, and a small HTTP client over real sockets.
#![allow(dead_code)] // each test binary uses a different part

pub mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use progress_gateway::app::{App, Running};
use progress_gateway::config::Config;
use progress_gateway::tools::simulator::{Behaviour, SimAuth, Simulator};
use progress_gateway::tools::SimFront;

pub use progress_gateway::tools::PROJECT;

pub const TOKEN: &str = "sim-token-4f1d2c9e";
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
    pub running: Running,
    /// The config it was started with (for in-process reloads).
    pub config: Config,
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

/// Starts the simulator on port 0, requiring [`TOKEN`].
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
    pub credential: Option<String>,
    pub upstream_url: Option<String>,
    /// Files to write into the temporary directory before the gateway starts.
    pub files: Vec<(String, Vec<u8>)>,
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
            credential: None,
            upstream_url: None,
            files: Vec::new(),
        }
    }
}

/// Starts the simulator and, through `app` as `serve` does, the gateway in
/// front of it as `spec` says.
pub async fn start_spec(spec: Spec) -> Harness {
    let (sim, sim_addr) = start_simulator_with(spec.auth, spec.behaviour).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    for (name, bytes) in &spec.files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let dir_text = dir.path().display().to_string();
    let fill = |text: &str| {
        text.replace("{dir}", &dir_text)
            .replace("{sim}", &sim_addr.to_string())
    };
    let mut front = SimFront::new(sim_addr, &dir.path().join("token"))
        .section(&fill(&spec.sections))
        .project(OTHER_PROJECT, "second");
    if let Some(credential) = &spec.credential {
        front = front.credential(&fill(credential));
    }
    if let Some(url) = &spec.upstream_url {
        front = front.region(url);
    }
    let config = front
        .config()
        .unwrap_or_else(|e| panic!("{e}\n{}", front.toml()));
    let running = App::new(config.clone()).unwrap().bind().await.unwrap();
    Harness {
        sim,
        sim_addr,
        addr: running.proxy,
        admin: running.admin.expect("the harness has an admin listener"),
        running,
        config,
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
    pub fn app(&self) -> &App {
        self.running.app()
    }

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
        let (parts, body) = self.send(addr, method, path, headers).await;
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// Sends a request; returns as soon as the head arrives.
    async fn send(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (http::response::Parts, hyper::body::Incoming) {
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
        response.into_parts()
    }
}

/// A response whose body is read as it arrives (an event stream).
pub struct Streaming {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: hyper::body::Incoming,
    buffer: String,
}

impl Streaming {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    /// The next block of the stream up to a blank line (an event, a comment,
    /// a `retry:`), or None when the stream ended. At most `within` to wait.
    pub async fn next_block(&mut self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block = self.buffer[..end].to_string();
                    self.buffer.drain(..end + 2);
                    return Some(block);
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.buffer.push_str(std::str::from_utf8(&data).unwrap());
                        }
                    }
                    Some(Err(error)) => panic!("stream broke: {error}"),
                    None => {
                        assert!(self.buffer.is_empty(), "half an event: {:?}", self.buffer);
                        return None;
                    }
                }
            }
        })
        .await
        .expect("the stream moved within its time")
    }
}

impl Harness {
    /// Sends a GET and returns as soon as the head arrives.
    pub async fn open(&self, path: &str, headers: &[(&str, &str)]) -> Streaming {
        let (parts, body) = self.send(self.addr, "GET", path, headers).await;
        Streaming {
            status: parts.status,
            headers: parts.headers,
            body,
            buffer: String::new(),
        }
    }

    /// The value of the metric line starting with `prefix`, 0 if absent.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = String::from_utf8(self.admin_get("/metrics").await.body.to_vec()).unwrap();
        text.lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }
}

/// The first line a started `serve` prints: where it listens.
pub async fn listening_line(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the gateway starts")
        .unwrap()
        .expect("a listening line")
}

/// The address `serve`'s listening line gives for `listener` (`proxy`, `admin`).
pub fn listening(line: &str, listener: &str) -> Option<SocketAddr> {
    let prefix = format!("{listener}=http://");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .map(|addr| addr.parse().unwrap())
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
