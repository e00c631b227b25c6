//! `progress-gateway demo` runs by itself in a plain (non-TTY) log and reports
//! that finished jobs stopped costing upstream requests.

use std::time::Duration;

/// Runs the demo with short jobs and `extra` arguments: its output.
async fn demo(extra: &[&str]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_progress-gateway"))
            .args([
                "demo",
                "--clients",
                "40",
                "--jobs",
                "3",
                "--shortest",
                "300ms",
                "--longest",
                "600ms",
            ])
            .args([
                "--ttl",
                "200ms",
                "--poll-interval",
                "50ms",
                "--linger",
                "300ms",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await
    .expect("the demo ends")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_demo_ends_by_itself_with_a_summary() {
    let stdout = demo(&[]).await;
    assert!(
        stdout.contains("jobs finished"),
        "plain progress lines: {stdout}"
    );
    assert!(stdout.contains("Summary after"), "{stdout}");
    assert!(
        stdout.contains("3 of 3 finished jobs cost no upstream request"),
        "{stdout}"
    );
    let line = |label: &str| -> u64 {
        let l = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap();
        l.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert!(
        line("client requests") > 10 * line("upstream requests"),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_watching_demo_compares_the_same_crowd_polling_and_watching() {
    let stdout = demo(&["--watch"]).await;
    assert!(stdout.contains("watchers  jobs finished"), "{stdout}");
    let row = |label: &str| -> Vec<String> {
        let l = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} row: {stdout}"));
        l[label.len() + 2..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let requests: Vec<u64> = row("client requests")
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        requests[1] * 2 < requests[0],
        "watchers ask far less often: {stdout}"
    );
    assert_eq!(row("errors"), ["0", "0"], "{stdout}");
    assert!(stdout.contains("fewer; upstream requests"), "{stdout}");
}
