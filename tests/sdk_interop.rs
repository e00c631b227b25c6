//! Runs tests/sdk_interop.py (the official Python SDKs) against the gateway.
//!
//! It needs the SDK virtualenv, so it is ignored by a plain `cargo test`;
//! `bash tests/run` makes the virtualenv and runs it with `--include-ignored`.
//! The interpreter comes from `PGW_SDK_PYTHON` or `.venv/bin/python`; when
//! the test runs without either, it fails.

mod common;

use std::path::PathBuf;

use common::*;

fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("PGW_SDK_PYTHON") {
        return path.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no SDK virtualenv: run `bash tests/run`, or set PGW_SDK_PYTHON"
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the SDK virtualenv; `bash tests/run` includes it"]
async fn official_python_sdks_parse_answers_and_errors() {
    let python = python();
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
