//! Schemathesis (from PyPI, pinned in scripts/requirements-test.txt) against the
//! daemon's own OpenAPI document over TLS with the token: every operation, every
//! check, a bounded budget, zero failures. scripts/schemathesis.toml says which rules
//! no schema can state; BENCHMARKS.md reports the full (10+ minute) run.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::guest::KillWorkersOnDrop;
use common::Daemon;

/// Seconds of property-based requests (`VIRIDIAN_SCHEMATHESIS_SECONDS` to change).
const BUDGET_SECONDS: u64 = 90;

#[test]
fn schemathesis_finds_no_failure_in_any_operation() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Short waits: a `wait` answers within its time-out, which the test keeps small.
    // In a network namespace of its own: the switches it creates never touch the host.
    let d = Daemon::start_in_netns(&["--listen", &format!("127.0.0.1:{port}"), "--max-wait", "5"]);
    let ns = format!("--net=/proc/{}/ns/net", d.netns.as_ref().unwrap().id());
    // Started VMs (fuzzed settings, no disks) go with the test.
    let _workers = KillWorkersOnDrop(d.data.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    let probe = format!("import socket; socket.create_connection(('127.0.0.1', {port}), 1)");
    while !d.in_netns("python3", &["-c", &probe]).0 {
        assert!(Instant::now() < deadline, "no TCP listener: {}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = std::fs::read_to_string(d.data.join("token")).unwrap();
    let budget = std::env::var("VIRIDIAN_SCHEMATHESIS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(BUDGET_SECONDS);
    // Two thirds for every operation alone (coverage, then fuzzing), a third for
    // sequences that follow the document's links (stateful): with one budget the
    // first phases take all of it.
    let single = run(
        &d,
        &ns,
        port,
        token.trim(),
        "coverage,fuzzing",
        budget * 2 / 3,
    );
    // Every operation of the document was selected and tested.
    let count = |text: &str, label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let selected = count(&single, "Selected:");
    let tested = count(&single, "Tested:");
    let (of, all) = selected.split_once('/').unwrap_or(("", "?"));
    assert!(
        of == all && tested == all,
        "not every operation was tested (selected {selected}, tested {tested}):\n{single}"
    );
    let stateful = run(&d, &ns, port, token.trim(), "stateful", budget / 3);
    assert!(
        stateful.contains("Stateful (in"),
        "the stateful phase did not run:\n{stateful}"
    );
}

/// One schemathesis run of `phases` for about `seconds`; its report when it found
/// no failure (a failure fails the test with the report and the daemon's log).
fn run(d: &Daemon, ns: &str, port: u16, token: &str, phases: &str, seconds: u64) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("nsenter")
        .args([
            ns,
            "--",
            "python3",
            "-m",
            "schemathesis.cli",
            "--config-file",
        ])
        .arg(root.join("scripts/schemathesis.toml"))
        .arg("run")
        .arg(format!("https://127.0.0.1:{port}/v1/openapi.json"))
        .arg("--tls-verify")
        .arg(d.data.join("tls/cert.pem"))
        .args([
            "--checks",
            "all",
            "--workers",
            "2",
            "--no-color",
            "--seed",
            "1",
        ])
        .args(["--max-time", &seconds.to_string()])
        .args(["--phases", phases, "--request-timeout", "30"])
        .env("VIRIDIAN_TOKEN", token)
        .current_dir(d.dir.path())
        .output()
        .expect("python3 runs (scripts/setup.sh installs schemathesis)");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named"),
        "schemathesis is not installed; run scripts/setup.sh: {err}"
    );
    // Zero failures. A network error (a request the loaded test machine did not
    // answer in time) is reported, not counted: it says nothing about the API.
    assert!(
        text.contains("passed") && !text.contains("Failures:"),
        "schemathesis found failures (exit {:?}):\n{text}\n{err}\ndaemon log:\n{}",
        out.status.code(),
        d.log()
    );
    if !out.status.success() {
        eprintln!("schemathesis reported errors but no failures:");
    }
    eprintln!("{text}");
    text.into_owned()
}
