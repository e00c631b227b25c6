//! `progress-gateway demo` runs by itself in a plain (non-TTY) log and reports
//! that finished jobs stopped costing upstream requests.

use std::time::Duration;

#[tokio::test]
async fn the_demo_ends_by_itself_with_a_summary() {
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
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await
    .expect("the demo ends")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
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
