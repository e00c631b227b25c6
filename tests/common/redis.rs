//! A real `redis-server` on a free loopback port, in a temporary directory,
//! stopped when dropped. Shared by the fleet tests and the fleet bench.
#![allow(dead_code)] // each user uses a different part

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    /// Extra `redis-server` arguments (`--requirepass ...`).
    args: Vec<String>,
    /// Serves TLS only, with this certificate and key (PEM files).
    tls: Option<(PathBuf, PathBuf)>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one, failing (never skipping) when `redis-server` is missing.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> RedisServer {
        RedisServer::start_as(args, None)
    }

    /// A server that speaks only TLS, with `cert` and `key`.
    pub fn start_tls(cert: PathBuf, key: PathBuf) -> RedisServer {
        RedisServer::start_as(&[], Some((cert, key)))
    }

    fn start_as(args: &[&str], tls: Option<(PathBuf, PathBuf)>) -> RedisServer {
        // A port the kernel just gave out is free unless another process
        // takes it in between: then try another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = RedisServer {
                child: None,
                args: args.iter().map(|a| a.to_string()).collect(),
                tls: tls.clone(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                dir: tempfile::tempdir().unwrap(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on a free port in 5 tries");
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}/0", self.addr)
    }

    /// Kills it at once, as a crash would (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server restarts on {}", self.addr);
    }

    /// Starts the process; true once it accepts connections.
    fn spawn(&mut self) -> bool {
        let port = self.addr.port().to_string();
        let listen = match &self.tls {
            None => vec!["--port".into(), port],
            Some((cert, key)) => vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port,
                "--tls-cert-file".into(),
                cert.display().to_string(),
                "--tls-key-file".into(),
                key.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(&listen)
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server is installed (Debian package redis-server; tests/run installs it)",
            );
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            if TcpStream::connect(self.addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
