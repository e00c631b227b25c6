//! Micro-benchmarks of the hot path: route parsing, classification, cache key
//! building, and a whole cache hit served in-process (no sockets).
//!
//! Run: cargo bench --bench hot_path

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use progress_gateway::cache::policy::classify;
use progress_gateway::cache::{CacheKey, CachePolicy};
use progress_gateway::route::{self, Api};
use progress_gateway::tools::simulator::{Behaviour, SimAuth, Simulator};

mod common;

const ROMA: &str = "/v2/0123456789abcdef0123456789abcdef/instances/11111111-2222-3333-4444-555555555555/assets/jobs/ff8080814dbd65d7014dbe0d84db0013";
const BODY: &[u8] = br#"{"id":"ff8080814dbd65d7014dbe0d84db0013","type":"exportAsset","status":"SUCCEEDED","progress_percent":1.0,"begin_time":"2026-11-22T07:00:00Z","end_time":"2026-11-22T07:30:00Z","reasons":[],"archive_id":"a"}"#;

fn hot_path(c: &mut Criterion) {
    c.bench_function("route::parse (ROMA, remembered)", |b| {
        b.iter(|| {
            route::parse(
                std::hint::black_box(&Method::GET),
                std::hint::black_box(ROMA),
            )
            .unwrap()
        })
    });
    // Routes and keys are remembered per thread (256 slots): 4096 distinct
    // jobs in turn find them forgotten, as a request for a new job does.
    let paths: Vec<String> = (0..4096).map(|i| format!("{ROMA}{i}")).collect();
    let mut next = paths.iter().cycle();
    c.bench_function("route::parse (ROMA, first time)", |b| {
        b.iter(|| route::parse(&Method::GET, next.next().unwrap()).unwrap())
    });
    let policy = CachePolicy::default();
    let terminal = policy.terminal(Api::Roma);
    c.bench_function("classify (ROMA, terminal)", |b| {
        b.iter(|| {
            classify(
                Api::Roma,
                StatusCode::OK,
                std::hint::black_box(BODY),
                terminal,
            )
        })
    });
    let parsed = route::parse(&Method::GET, ROMA).unwrap();
    c.bench_function("CacheKey::new (remembered)", |b| {
        b.iter(|| CacheKey::new(std::hint::black_box(&parsed), Some("en-us"), "token:main"))
    });
    let routes: Vec<_> = paths
        .iter()
        .map(|path| route::parse(&Method::GET, path).unwrap())
        .collect();
    let mut next = routes.iter().cycle();
    c.bench_function("CacheKey::new (first time)", |b| {
        b.iter(|| CacheKey::new(next.next().unwrap(), Some("en-us"), "token:main"))
    });

    // A whole hit through Gateway::answer: route, project, key, cache, response.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let running = runtime.block_on(async {
        let sim = Simulator::new(
            SimAuth {
                token: Some("t".into()),
                ..SimAuth::default()
            },
            Behaviour {
                job_duration: Duration::ZERO,
                ..Behaviour::default()
            },
        );
        let addr = sim.spawn("127.0.0.1:0").await.unwrap();
        let running = common::start_gateway(addr, &dir.path().join("token"), "1s").await;
        let first = running
            .app()
            .gateway()
            .answer(Request::get(ROMA).body(Empty::<Bytes>::new()).unwrap())
            .await;
        assert_eq!(first.status(), 200);
        running
    });
    let gateway = running.app().gateway();
    c.bench_function("cache hit served in-process (Gateway::answer)", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = gateway
                .answer(Request::get(ROMA).body(Empty::<Bytes>::new()).unwrap())
                .await;
            assert_eq!(response.headers()["x-cache"], "HIT");
            response
        })
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
