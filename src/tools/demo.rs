//! `progress-gateway demo`: the simulator and the gateway in-process on free
//! ports, a crowd of pollers over jobs that finish at different times, live
//! progress, then a summary of what the gateway saved. Needs no config and no
//! cloud; ends by itself.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;

use super::simulator::{Behaviour, SimAuth, Simulator};
use super::{SimFront, PROJECT};
use crate::app::App;
const TOKEN: &str = "demo-token";

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Polling clients.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clients: u32,
    /// Jobs they poll.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub jobs: u32,
    /// When the first job finishes.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub shortest: Duration,
    /// When the last job finishes (not before `--shortest`).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub longest: Duration,
    /// How often each client polls its job.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// The gateway's running_ttl.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Latency the simulated upstream adds.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub upstream_latency: Duration,
    /// Keep polling this long after the last job finished.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub linger: Duration,
    /// Write the gateway's access log too (on stderr; RUST_LOG also sets it).
    #[arg(long)]
    pub verbose: bool,
}

struct Job {
    path: String,
    duration: Duration,
    /// When a client first saw the terminal answer, and upstream requests by then.
    finished: Mutex<Option<(Duration, u64)>>,
    polls_after_finish: AtomicU64,
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    hits: AtomicU64,
    errors: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

pub async fn run(options: Options) -> Result<(), String> {
    let started = Instant::now();
    let (clients, jobs_count) = (options.clients as usize, options.jobs as usize);
    let sim = Simulator::new(
        SimAuth {
            token: Some(TOKEN.into()),
            ..SimAuth::default()
        },
        Behaviour {
            latency: options.upstream_latency,
            ..Behaviour::default()
        },
    );
    let sim_addr = sim.spawn("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    // A temporary directory, removed when the demo ends.
    let dir = TempDir::new()?;
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, TOKEN)
        .map_err(|e| format!("cannot write {}: {e}", token_file.display()))?;
    let config = SimFront::new(sim_addr, &token_file)
        .admin("")
        .section(&format!(
            "[cache]\nrunning_ttl = \"{}ms\"",
            options.ttl.as_millis()
        ))
        .config()
        .map_err(|e| e.to_string())?;
    let running = App::new(config)
        .map_err(|e| e.to_string())?
        .bind()
        .await
        .map_err(|e| e.to_string())?;
    let gateway_addr = running.proxy;

    let jobs: Arc<Vec<Job>> = Arc::new(
        (0..jobs_count)
            .map(|i| {
                let spread = options.longest.saturating_sub(options.shortest);
                let duration =
                    options.shortest + spread.mul_f64(i as f64 / (jobs_count.max(2) - 1) as f64);
                let id = format!("demo-job-{i:02}_d{}", duration.as_millis());
                // Alternate the two APIs.
                let path = if i % 2 == 0 {
                    format!("/v2/{PROJECT}/instances/demo-instance/assets/jobs/{id}")
                } else {
                    format!("/v5/{PROJECT}/jobs/{id}/export/progress")
                };
                Job {
                    path,
                    duration,
                    finished: Mutex::new(None),
                    polls_after_finish: AtomicU64::new(0),
                }
            })
            .collect(),
    );
    println!(
        "progress-gateway demo: {} clients polling {} jobs every {} ms through the gateway at http://{gateway_addr} (simulated upstream at http://{sim_addr}, {} ms latency, TTL {} ms)",
        clients,
        jobs_count,
        options.poll_interval.as_millis(),
        options.upstream_latency.as_millis(),
        options.ttl.as_millis()
    );

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build_http();
    let mut pollers = Vec::new();
    for c in 0..clients {
        let (client, jobs, tally, stop, sim) = (
            client.clone(),
            jobs.clone(),
            tally.clone(),
            stop.clone(),
            sim.clone(),
        );
        let url = format!("http://{gateway_addr}{}", jobs[c % jobs.len()].path);
        let interval = options.poll_interval;
        pollers.push(tokio::spawn(async move {
            let job = &jobs[c % jobs.len()];
            // Spread the first polls over one interval, as real pollers are.
            tokio::time::sleep(interval.mul_f64(c as f64 / clients as f64)).await;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let request = Request::get(&url)
                    .body(Empty::new())
                    .expect("valid request");
                match client.request(request).await {
                    Ok(response) => {
                        let hit = response
                            .headers()
                            .get("x-cache")
                            .is_some_and(|v| v != "MISS");
                        let ok = response.status().is_success();
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        tally.requests.fetch_add(1, Ordering::Relaxed);
                        tally.hits.fetch_add(u64::from(hit), Ordering::Relaxed);
                        tally
                            .latencies_us
                            .lock()
                            .unwrap()
                            .push(sent.elapsed().as_micros() as u32);
                        if !ok {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
                        if ["succeeded", "\"success\"", "failed"]
                            .iter()
                            .any(|t| text.contains(t))
                        {
                            let mut finished = job.finished.lock().unwrap();
                            if finished.is_none() {
                                *finished = Some((started.elapsed(), sim.requests(&job.path)));
                            } else {
                                job.polls_after_finish.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(_) => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(interval).await;
            }
        }));
    }

    let live = Live::new(&jobs);
    let mut all_done_at = None;
    loop {
        tokio::time::sleep(live.period).await;
        let done = jobs
            .iter()
            .filter(|j| j.finished.lock().unwrap().is_some())
            .count();
        live.show(&jobs, started.elapsed(), done, &tally, sim.total());
        if done == jobs.len() && all_done_at.is_none() {
            all_done_at = Some(Instant::now());
        }
        if all_done_at.is_some_and(|at| at.elapsed() >= options.linger) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for poller in pollers {
        let _ = poller.await;
    }
    live.finish();
    summary(&jobs, &tally, &sim, started.elapsed());
    Ok(())
}

/// Live display: progress bars on a terminal, a line a second otherwise.
struct Live {
    bars: Option<(MultiProgress, ProgressBar, Vec<ProgressBar>)>,
    period: Duration,
}

impl Live {
    fn new(jobs: &[Job]) -> Self {
        if !std::io::stdout().is_terminal() {
            return Live {
                bars: None,
                period: Duration::from_secs(1),
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let counts = multi.add(ProgressBar::new_spinner());
        let style = ProgressStyle::with_template("{prefix:>14} [{bar:30.green/white}] {msg}")
            .expect("valid template")
            .progress_chars("=> ");
        let bars = jobs
            .iter()
            .map(|job| {
                let bar = multi.add(ProgressBar::new(100).with_style(style.clone()));
                let name = job
                    .path
                    .rsplit('/')
                    .find(|s| s.starts_with("demo-job"))
                    .unwrap_or("job");
                bar.set_prefix(
                    name.split('_')
                        .next()
                        .unwrap_or(name)
                        .trim_start_matches("demo-")
                        .to_string(),
                );
                bar
            })
            .collect();
        Live {
            bars: Some((multi, counts, bars)),
            period: Duration::from_millis(200),
        }
    }

    fn show(&self, jobs: &[Job], elapsed: Duration, done: usize, tally: &Tally, upstream: u64) {
        let requests = tally.requests.load(Ordering::Relaxed);
        let saved = if requests == 0 {
            0.0
        } else {
            100.0 * (1.0 - upstream as f64 / requests as f64)
        };
        let line = format!(
            "t={:>5.1}s  jobs finished {done}/{}  client requests {requests}  upstream requests {upstream}  saved {saved:.1}%",
            elapsed.as_secs_f64(),
            jobs.len()
        );
        match &self.bars {
            None => println!("{line}"),
            Some((_, counts, bars)) => {
                counts.set_message(line);
                counts.tick();
                for (job, bar) in jobs.iter().zip(bars) {
                    match *job.finished.lock().unwrap() {
                        Some((at, _)) => {
                            bar.set_position(100);
                            bar.set_message(format!(
                                "finished at {:.1}s; since then answered from the cache",
                                at.as_secs_f64()
                            ));
                        }
                        None => {
                            let pct = (100.0 * elapsed.as_secs_f64() / job.duration.as_secs_f64())
                                .min(99.0);
                            bar.set_position(pct as u64);
                            bar.set_message("running");
                        }
                    }
                }
            }
        }
    }

    fn finish(&self) {
        if let Some((multi, counts, bars)) = &self.bars {
            counts.finish();
            for bar in bars {
                bar.finish();
            }
            let _ = multi.clear();
        }
    }
}

fn summary(jobs: &[Job], tally: &Tally, sim: &Simulator, elapsed: Duration) {
    let requests = tally.requests.load(Ordering::Relaxed);
    let upstream = sim.total();
    let hits = tally.hits.load(Ordering::Relaxed);
    let mut latencies = tally.latencies_us.lock().unwrap().clone();
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q) as usize)
            .map_or(0.0, |us| f64::from(*us) / 1000.0)
    };
    println!("\nSummary after {:.1} s", elapsed.as_secs_f64());
    println!("  client requests     {requests}");
    println!("  upstream requests   {upstream}");
    println!(
        "  requests saved      {} ({:.1}%)",
        requests.saturating_sub(upstream),
        100.0 * (1.0 - upstream as f64 / requests.max(1) as f64)
    );
    println!(
        "  hit ratio           {:.1}% (HIT, COALESCED or STALE)",
        100.0 * hits as f64 / requests.max(1) as f64
    );
    println!(
        "  client latency      p50 {:.2} ms, p99 {:.2} ms",
        pct(0.5),
        pct(0.99)
    );
    println!(
        "  errors              {}",
        tally.errors.load(Ordering::Relaxed)
    );
    println!("\n  job                       finished at  upstream requests  polls after finish  upstream after finish");
    let mut free = 0;
    for job in jobs {
        let name = job
            .path
            .rsplit('/')
            .find(|s| s.starts_with("demo-job"))
            .unwrap_or("?");
        let total = sim.requests(&job.path);
        match *job.finished.lock().unwrap() {
            Some((at, by_then)) => {
                let after = total - by_then;
                free += usize::from(after == 0);
                println!(
                    "  {name:<25} {:>9.1} s  {total:>17}  {:>18}  {after:>21}",
                    at.as_secs_f64(),
                    job.polls_after_finish.load(Ordering::Relaxed)
                );
            }
            None => println!("  {name:<25} {:>11}  {total:>17}", "running"),
        }
    }
    println!(
        "\n  {free} of {} finished jobs cost no upstream request after their terminal answer.",
        jobs.len()
    );
}

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Result<Self, String> {
        let path = std::env::temp_dir().join(format!(
            "progress-gateway-demo-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
