//! Benchmark of viridiand over its unix socket: quick-request latency, submit-to-
//! completed latency of a no-op job, and the daemon's memory while 100,000 jobs pass.
//!
//! cargo build --release -p daemon --bins --examples
//! target/release/examples/api_bench [JOBS]
//!
//! Runs the `viridiand` built next to this example on a temporary data dir.

#[path = "bench_client/mod.rs"]
mod bench_client;

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench_client::{percentile, Conn};

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{what:<52} n={:<6} p50={:>7.0} us  p99={:>7.0} us  max={:>7.0} us",
        samples.len(),
        us(percentile(&samples, 0.5)),
        us(percentile(&samples, 0.99)),
        us(*samples.last().unwrap())
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn job_id(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["id"].as_str().unwrap().to_string()
}

fn main() {
    let jobs_total: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let exe = std::env::current_exe().unwrap();
    let daemon = exe.parent().unwrap().parent().unwrap().join("viridiand");
    let dir = std::env::temp_dir().join(format!("viridian-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("v.sock");
    let mut child = Command::new(&daemon)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket")
        .arg(&socket)
        .env("VIRIDIAN_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; build it with --bins", daemon.display()));
    while UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.id();
    let mut c = Conn::open(&socket);
    for i in 0..10 {
        c.call(
            "POST",
            "/v1/vms",
            &format!("{{\"name\":\"bench{i}\",\"memory_mib\":256}}"),
        );
    }

    // Warm-up, then quick requests on one keep-alive connection.
    for _ in 0..500 {
        c.call("GET", "/v1/vms/bench5", "");
    }
    let samples = (0..10_000)
        .map(|_| {
            let t = Instant::now();
            let (status, _) = c.call("GET", "/v1/vms/bench5", "");
            assert_eq!(status, 200);
            t.elapsed()
        })
        .collect();
    report("GET /v1/vms/{name}, keep-alive connection", samples);
    let samples = (0..2_000)
        .map(|_| {
            let t = Instant::now();
            let mut fresh = Conn::open(&socket);
            let (status, _) = fresh.call("GET", "/v1/vms/bench5", "");
            assert_eq!(status, 200);
            t.elapsed()
        })
        .collect();
    report(
        "GET /v1/vms/{name}, new connection each (like the CLI)",
        samples,
    );

    let samples = (0..5_000)
        .map(|_| {
            let t = Instant::now();
            let (status, body) =
                c.call("POST", "/v1/diagnostics/sleep-job", "{\"milliseconds\":0}");
            assert_eq!(status, 202);
            let (_, done) = c.call(
                "GET",
                &format!("/v1/jobs/{}/wait?timeout=10", job_id(&body)),
                "",
            );
            assert!(done.contains("\"Completed\""));
            t.elapsed()
        })
        .collect();
    report("no-op job: submit + wait until Completed", samples);

    println!("daemon RSS while {jobs_total} no-op jobs pass (default limit 4096 kept):");
    let start = Instant::now();
    let step = jobs_total / 10;
    println!("  {:>7} jobs  {:>7} KiB", 0, rss_kib(pid));
    for round in 1..=10 {
        std::thread::scope(|s| {
            for _ in 0..4 {
                let socket = &socket;
                s.spawn(move || {
                    let mut c = Conn::open(socket);
                    for _ in 0..step / 4 {
                        let (status, _) =
                            c.call("POST", "/v1/diagnostics/sleep-job", "{\"milliseconds\":0}");
                        assert_eq!(status, 202);
                    }
                });
            }
        });
        println!("  {:>7} jobs  {:>7} KiB", round * step, rss_kib(pid));
    }
    println!(
        "  ({:.1} s, {:.0} jobs/s)",
        start.elapsed().as_secs_f64(),
        jobs_total as f64 / start.elapsed().as_secs_f64()
    );
    let (_, list) = c.call("GET", "/v1/jobs", "");
    let kept = serde_json::from_str::<serde_json::Value>(&list).unwrap()["jobs"]
        .as_array()
        .unwrap()
        .len();
    println!("  jobs held in full at the end: {kept}");

    // SAFETY: kill(2) on the pid of the child this program spawned and has not reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
