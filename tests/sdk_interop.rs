//! Runs tests/sdk_interop.py (the official Python SDKs) against the gateway.
//!
//! The interpreter comes from `PGW_SDK_PYTHON` (set by .ci/run to its
//! virtualenv) or `.venv/bin/python`. Without one the test says so and passes,
//! except under CI=true, where a missing SDK environment is a failure.

mod common;

use std::path::PathBuf;

use common::*;

fn python() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PGW_SDK_PYTHON") {
        return Some(path.into());
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    venv.exists().then_some(venv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdks_parse_answers_and_errors() {
    let Some(python) = python() else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must provide the SDK virtualenv (PGW_SDK_PYTHON)"
        );
        eprintln!("skipped: no SDK virtualenv; run .ci/run or set PGW_SDK_PYTHON");
        return;
    };
    let h = start("").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk_interop.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .env("PGW_GATEWAY_URL", format!("http://{}", h.addr))
        .env("PGW_PROJECT", PROJECT)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "SDK interop failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"));
}
