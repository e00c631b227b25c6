//! `progress-gateway demo`: the simulator and the gateway in-process on free
//! ports, a crowd of pollers over jobs that finish at different times, live
//! progress, then a summary of what the gateway saved. Needs no config and no
//! cloud; ends by itself.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
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
    /// Beside the pollers, run the same crowd as watchers (long-polls) over
    /// a second set of jobs, and compare the client requests each costs.
    #[arg(long)]
    pub watch: bool,
}

/// How a crowd's clients learn about their jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crowd {
    /// A GET every poll interval.
    Polling,
    /// A long-poll (`Prefer: wait`) with the last ETag, asked again at once.
    Watching,
}

struct Job {
    path: String,
    duration: Duration,
    /// When a client first saw the terminal answer, and upstream requests by then.
    finished: Mutex<Option<(Duration, u64)>>,
    polls_after_finish: AtomicU64,
}

impl Job {
    /// The job ID, as in `demo-job-03_d4000`.
    fn name(&self) -> &str {
        self.path
            .rsplit('/')
            .find(|s| s.contains("-job-"))
            .unwrap_or("job")
    }
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
            "[cache]\nrunning_ttl = \"{}ms\"\n\
             [watch]\nmax_watchers = {clients}\nmax_watchers_per_consumer = {clients}",
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

    let jobs = Arc::new(make_jobs("demo", &options));
    let watched = Arc::new(if options.watch {
        make_jobs("watch", &options)
    } else {
        Vec::new()
    });
    println!(
        "progress-gateway demo: {} clients polling {} jobs every {} ms through the gateway at http://{gateway_addr} (simulated upstream at http://{sim_addr}, {} ms latency, TTL {} ms)",
        clients,
        jobs_count,
        options.poll_interval.as_millis(),
        options.upstream_latency.as_millis(),
        options.ttl.as_millis()
    );

    if options.watch {
        println!(
            "and {clients} clients watching {jobs_count} more jobs like them with long-polls (Prefer: wait=25, If-None-Match)"
        );
    }
    let tally = Arc::new(Tally::default());
    let watch_tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client: HttpClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients * 2)
        .build_http();
    let crowd = Client {
        http: client,
        gateway: gateway_addr,
        started,
        interval: options.poll_interval,
        stop: stop.clone(),
        sim: sim.clone(),
        stop_at_end: options.watch,
    };
    let mut pollers = Vec::new();
    for c in 0..clients {
        pollers.push(tokio::spawn(crowd.clone().run(
            Crowd::Polling,
            jobs.clone(),
            c,
            clients,
            tally.clone(),
        )));
        if options.watch {
            pollers.push(tokio::spawn(crowd.clone().run(
                Crowd::Watching,
                watched.clone(),
                c,
                clients,
                watch_tally.clone(),
            )));
        }
    }

    // With watchers, their jobs get the bars: they are what is new.
    let shown = if options.watch { &watched } else { &jobs };
    let live = Live::new(shown);
    let mut all_done_at = None;
    loop {
        tokio::time::sleep(live.period).await;
        let done = |jobs: &[Job]| {
            jobs.iter()
                .filter(|j| j.finished.lock().unwrap().is_some())
                .count()
        };
        let (polled_done, watched_done) = (done(&jobs), done(&watched));
        let mut lines = vec![live.line(
            "pollers",
            &jobs,
            polled_done,
            &tally,
            upstream_of(&sim, &jobs),
        )];
        if options.watch {
            lines.push(live.line(
                "watchers",
                &watched,
                watched_done,
                &watch_tally,
                upstream_of(&sim, &watched),
            ));
        }
        live.show(shown, started.elapsed(), lines);
        if polled_done == jobs.len() && watched_done == watched.len() && all_done_at.is_none() {
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
    if options.watch {
        compare(
            &jobs,
            &tally,
            &watched,
            &watch_tally,
            &sim,
            started.elapsed(),
        );
    } else {
        summary(&jobs, &tally, &sim, started.elapsed());
    }
    Ok(())
}

/// Jobs finishing evenly between `--shortest` and `--longest`, alternating
/// the two APIs; IDs start with `prefix`.
fn make_jobs(prefix: &str, options: &Options) -> Vec<Job> {
    let count = options.jobs as usize;
    (0..count)
        .map(|i| {
            let spread = options.longest.saturating_sub(options.shortest);
            let duration = options.shortest + spread.mul_f64(i as f64 / (count.max(2) - 1) as f64);
            let id = format!("{prefix}-job-{i:02}_d{}", duration.as_millis());
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
        .collect()
}

fn upstream_of(sim: &Simulator, jobs: &[Job]) -> u64 {
    jobs.iter().map(|job| sim.requests(&job.path)).sum()
}

/// What every client of a crowd shares.
#[derive(Clone)]
struct Client {
    http: HttpClient,
    gateway: std::net::SocketAddr,
    started: Instant,
    interval: Duration,
    stop: Arc<AtomicBool>,
    sim: Simulator,
    /// Pollers too stop at the end (when compared with watchers, which do).
    stop_at_end: bool,
}

type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Empty<Bytes>>;

impl Client {
    /// Client `c` of `clients`: follows its job until the demo stops. A
    /// poller asks every interval (and goes on after the end, to show the
    /// cache answering, unless compared with watchers); a watcher holds a
    /// long-poll with its last ETag and stops once it has seen the end.
    async fn run(
        self,
        crowd: Crowd,
        jobs: Arc<Vec<Job>>,
        c: usize,
        clients: usize,
        tally: Arc<Tally>,
    ) {
        let job = &jobs[c % jobs.len()];
        let url = format!("http://{}{}", self.gateway, job.path);
        // Spread the first requests over one interval, as real clients are.
        tokio::time::sleep(self.interval.mul_f64(c as f64 / clients as f64)).await;
        let mut etag: Option<HeaderValue> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            let mut request = Request::get(&url);
            if let (Crowd::Watching, Some(etag)) = (crowd, &etag) {
                request = request
                    .header("if-none-match", etag.clone())
                    .header("prefer", "wait=25");
            }
            let request = request.body(Empty::new()).expect("valid request");
            let Ok(response) = self.http.request(request).await else {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.interval).await;
                continue;
            };
            let status = response.status();
            let hit = response
                .headers()
                .get("x-cache")
                .is_some_and(|v| v != "MISS");
            etag = response.headers().get("etag").cloned().or(etag);
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
            if !status.is_success() && status != http::StatusCode::NOT_MODIFIED {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
            let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
            if ["succeeded", "\"success\"", "failed"]
                .iter()
                .any(|t| text.contains(t))
            {
                let mut finished = job.finished.lock().unwrap();
                if finished.is_none() {
                    *finished = Some((self.started.elapsed(), self.sim.requests(&job.path)));
                } else {
                    job.polls_after_finish.fetch_add(1, Ordering::Relaxed);
                }
                if crowd == Crowd::Watching || self.stop_at_end {
                    return;
                }
            }
            if crowd == Crowd::Polling
                || !status.is_success() && status != http::StatusCode::NOT_MODIFIED
            {
                tokio::time::sleep(self.interval).await;
            }
        }
    }
}

/// The two crowds side by side.
fn compare(
    polled: &[Job],
    polling: &Tally,
    watched: &[Job],
    watching: &Tally,
    sim: &Simulator,
    elapsed: Duration,
) {
    // When clients learnt of each end, after the job ended upstream (its
    // clock starts at its first poll, within one interval of the start).
    let noticed = |jobs: &[Job]| {
        let mut after: Vec<f64> = jobs
            .iter()
            .filter_map(|job| {
                let (at, _) = (*job.finished.lock().unwrap())?;
                Some(at.saturating_sub(job.duration).as_secs_f64() * 1000.0)
            })
            .collect();
        after.sort_by(f64::total_cmp);
        after.get(after.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let row = |name: &str, a: String, b: String| println!("  {name:<34} {a:>12} {b:>12}");
    let requests = |t: &Tally| t.requests.load(Ordering::Relaxed);
    println!(
        "\nSummary after {:.1} s: the same crowd polling and watching",
        elapsed.as_secs_f64()
    );
    row("", "polling".into(), "watching".into());
    row(
        "client requests",
        requests(polling).to_string(),
        requests(watching).to_string(),
    );
    row(
        "upstream requests",
        upstream_of(sim, polled).to_string(),
        upstream_of(sim, watched).to_string(),
    );
    row(
        "end noticed after it happened, p50",
        format!("{:.0} ms", noticed(polled)),
        format!("{:.0} ms", noticed(watched)),
    );
    row(
        "errors",
        polling.errors.load(Ordering::Relaxed).to_string(),
        watching.errors.load(Ordering::Relaxed).to_string(),
    );
    let (p, w) = (requests(polling), requests(watching));
    println!(
        "\n  Watching took {w} client requests where polling took {p}: {:.1}% fewer; upstream requests {} against {}.",
        100.0 * (1.0 - w as f64 / p.max(1) as f64),
        upstream_of(sim, watched),
        upstream_of(sim, polled),
    );
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
                // `watch-job-03_d4000` shows as `watch-job-03`.
                let name = job.name();
                bar.set_prefix(name.split('_').next().unwrap_or(name).to_string());
                bar
            })
            .collect();
        Live {
            bars: Some((multi, counts, bars)),
            period: Duration::from_millis(200),
        }
    }

    /// One crowd's counters on one line.
    fn line(&self, crowd: &str, jobs: &[Job], done: usize, tally: &Tally, upstream: u64) -> String {
        let requests = tally.requests.load(Ordering::Relaxed);
        let saved = if requests == 0 {
            0.0
        } else {
            100.0 * (1.0 - upstream as f64 / requests as f64)
        };
        format!(
            "{crowd:<8}  jobs finished {done}/{}  client requests {requests}  upstream requests {upstream}  saved {saved:.1}%",
            jobs.len()
        )
    }

    fn show(&self, jobs: &[Job], elapsed: Duration, lines: Vec<String>) {
        let line = format!(
            "t={:>5.1}s  {}",
            elapsed.as_secs_f64(),
            // Later lines line up under the first crowd's name, past the
            // time (and the spinner, on a terminal).
            lines.join(&format!(
                "\n{:width$}",
                "",
                width = if self.bars.is_some() { 12 } else { 10 }
            ))
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
                                "finished at {:.1}s; answered from the cache since",
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
        let name = job.name();
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
