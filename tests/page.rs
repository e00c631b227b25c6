//! The operator's page in a real browser: headless Chromium, driven over the
//! DevTools protocol (a page holding an `EventSource` never "settles" for
//! `--dump-dom`), opens the admin listener's `/` while pollers and a watcher
//! use the gateway, and the test reads the rendered DOM as it changes, then
//! saves a screenshot in the test's temporary directory (and at
//! `$PGW_SCREENSHOT`, when set, to refresh the README's image; with
//! `PGW_SCREENSHOT_AFTER=<seconds>` the traffic runs that long first).
//!
//! Needs `chromium` (Debian's package; `tests/run` installs it) or the
//! browser named by `$PGW_CHROMIUM`.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium and one of its pages, over the DevTools protocol.
struct Browser {
    child: tokio::process::Child,
    page: Socket,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let binary = std::env::var("PGW_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let mut child = tokio::process::Command::new(&binary)
            .args([
                "--headless",
                // Root in a container has no user namespace to sandbox with.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1280,1000",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{binary} did not start ({e}): bash tests/run installs Debian's chromium")
            });
        // Chromium says where its DevTools endpoint listens on stderr.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let endpoint = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_string();
                }
            }
            panic!("chromium exited without a DevTools endpoint");
        })
        .await
        .expect("chromium started within 30 s");
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let host = endpoint
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let list: Value = serde_json::from_str(&http_get(&host, "/json/list").await).unwrap();
        let page_url = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (page, _) = tokio_tungstenite::connect_async(page_url).await.unwrap();
        Browser {
            child,
            page,
            next_id: 0,
            _profile: profile,
        }
    }

    /// Calls a DevTools method and returns its result (events are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::text(message)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let message = self.page.next().await.expect("the page is open").unwrap();
                let Message::Text(text) = message else {
                    continue;
                };
                let reply: Value = serde_json::from_str(&text).unwrap();
                if reply["id"] == id {
                    assert!(reply["error"].is_null(), "{method}: {reply}");
                    return reply["result"].clone();
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method} answered within 20 s"))
    }

    /// Evaluates `expression` in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page, up to `within`.
    async fn wait_for(&mut self, expression: &str, within: Duration) {
        let started = Instant::now();
        while self.eval(expression).await != json!(true) {
            let dom = self.eval("document.body.innerText").await;
            assert!(
                started.elapsed() < within,
                "not true within {within:?}: {expression}\npage text:\n{}",
                dom.as_str().unwrap_or("")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self) -> Vec<u8> {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }

    async fn close(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// A plain HTTP/1.1 GET over a socket: the body, as long as its
/// Content-Length says (Chromium keeps the connection open).
async fn http_get(host: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse().ok())
                    .expect("a Content-Length");
                if body.len() >= length {
                    return body[..length].to_string();
                }
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early");
            bytes.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("chromium answered within 10 s")
}

/// Polls `path` every 50 ms until `stop`.
fn poller(h: &Arc<Harness>, path: String, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let (h, stop) = (h.clone(), stop.clone());
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            assert_eq!(h.get(&path).await.status, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_polled_jobs_and_what_is_saved_live_in_a_browser() {
    let h = Arc::new(start("[cache]\nrunning_ttl = \"500ms\"").await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for job in [
        "page-job-a_d60000",
        "page-job-a_d60000",
        "page-job-b_d60000",
    ] {
        clients.push(poller(&h, roma_path(job), &stop));
    }
    clients.push(poller(&h, drs_path("page-export-c"), &stop));
    let mut stream = h
        .open(
            &roma_path("page-job-a_d60000"),
            &[("accept", "text/event-stream")],
        )
        .await;
    stream.next_block(Duration::from_secs(5)).await.unwrap();

    let mut browser = Browser::launch().await;
    browser.call("Page.enable", json!({})).await;
    let url = format!("http://{}/", h.admin);
    browser.call("Page.navigate", json!({"url": url})).await;

    // The polled jobs appear, busiest first, with their status and cost.
    browser
        .wait_for(
            "['page-job-a', 'page-job-b', 'page-export-c'].every(j => \
             document.querySelector('#jobs tbody').innerText.includes(j))",
            Duration::from_secs(15),
        )
        .await;
    let rows = browser
        .eval(
            "[...document.querySelectorAll('#jobs tbody tr')].map(r => [...r.cells].map(c => c.innerText))",
        )
        .await;
    let rows = rows.as_array().unwrap();
    let first = rows[0].as_array().unwrap();
    assert_eq!(
        first[2], "inst-1/page-job-a_d60000",
        "busiest first: {rows:?}"
    );
    assert_eq!(first[3], "RUNNING");
    assert_eq!(first[6], "1", "one watcher: {rows:?}");
    let drs = rows
        .iter()
        .find(|r| r[2] == "page-export-c")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(
        (drs[0].as_str(), drs[3].as_str()),
        (Some("drs"), Some("pending"))
    );
    let bars = browser
        .eval("document.querySelectorAll('#jobs .bar i').length")
        .await;
    assert!(bars.as_u64().unwrap() >= 2, "ROMA jobs get a progress bar");
    assert_eq!(
        browser
            .eval("document.getElementById('live').innerText")
            .await,
        "live"
    );

    // The share saved is shown, and it all moves without a reload.
    let saved = browser
        .eval("document.querySelector('#saved .value').innerText")
        .await;
    let saved: f64 = saved
        .as_str()
        .and_then(|s| s.trim_end_matches(" %").parse().ok())
        .unwrap_or_else(|| panic!("saved share: {saved}"));
    assert!(saved > 50.0, "{saved}");
    let before = browser
        .eval("document.getElementById('uptime').innerText")
        .await;
    browser
        .wait_for(
            &format!("document.getElementById('uptime').innerText !== {before}"),
            Duration::from_secs(5),
        )
        .await;
    let drawn = browser
        .eval("document.getElementById('client-line').getAttribute('points').split(' ').length")
        .await;
    assert!(drawn.as_u64().unwrap() >= 2, "the chart has points");

    // For the README's image: let the chart fill for a while first.
    if let Some(secs) = std::env::var("PGW_SCREENSHOT_AFTER")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    let png = browser.screenshot().await;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a real screenshot"
    );
    std::fs::write(h.dir().join("page.png"), &png).unwrap();
    if let Ok(path) = std::env::var("PGW_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }

    // On a phone's width, nothing but the jobs table scrolls sideways.
    browser
        .call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}),
        )
        .await;
    let overflow = browser
        .eval("document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    assert_eq!(overflow, json!(true), "the page fits a phone's width");

    browser.close().await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    drop(stream);
}

#[tokio::test]
async fn the_page_is_one_small_self_contained_file() {
    let h = start("").await;
    let page = h.admin_get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert!(page
        .header("content-security-policy")
        .contains("default-src 'none'"));
    let html = std::str::from_utf8(&page.body).unwrap();
    assert!(page.body.len() < 32 * 1024, "{} bytes", page.body.len());
    for external in ["src=\"http", "href=\"http", "@import", "url(http", "//cdn"] {
        assert!(!html.contains(external), "loads {external}");
    }
    // The other admin paths stay as they were.
    assert_eq!(h.admin_get("/healthz").await.status, StatusCode::OK);
    assert!(std::str::from_utf8(&h.admin_get("/metrics").await.body)
        .unwrap()
        .contains("# TYPE pgw_requests counter"));
}
