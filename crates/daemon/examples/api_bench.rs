//! Benchmark of viridiand over its unix socket: quick-request latency, submit-to-
//! completed latency of a no-op job, and the daemon's memory while 100,000 jobs pass.
//!
//! cargo build --release -p daemon --bins --examples
//! target/release/examples/api_bench [JOBS]
//!
//! Runs the `viridiand` built next to this example on a temporary data dir.
//!
//! target/release/examples/api_bench caps OTHER_VIRIDIAND [ROUNDS]
//! target/release/examples/api_bench paths OTHER_VIRIDIAND [ROUNDS]
//!
//! Latency of `GET /v1/vms` and `GET /v1/host` over the unix socket and TCP+TLS (one
//! keep-alive connection, and a new connection per request), for OTHER_VIRIDIAND
//! (e.g. a build without the connection caps) and the `viridiand` next to this
//! example, in alternating rounds of the same run. `paths`: the same comparison for
//! requests that name files (a drive's disk set again, a disk created), which the
//! storage roots check (openat2 beneath a root, the file's signature, its chain).

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
    if std::env::args().nth(1).as_deref() == Some("caps") {
        return caps::compare();
    }
    if std::env::args().nth(1).as_deref() == Some("paths") {
        return paths::compare();
    }
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
    let mut kept = 0;
    let mut path = "/v1/jobs".to_string();
    loop {
        let (_, list) = c.call("GET", &path, "");
        let page: serde_json::Value = serde_json::from_str(&list).unwrap();
        kept += page["jobs"].as_array().unwrap().len();
        match page["next_after"].as_u64() {
            Some(after) => path = format!("/v1/jobs?after={after}"),
            None => break,
        }
    }
    println!("  jobs held in full at the end: {kept}");

    // SAFETY: kill(2) on the pid of the child this program spawned and has not reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `api_bench caps`: request latency with the connection caps in place vs another build.
mod caps {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::bench_client::percentile;

    /// One keep-alive HTTP/1.1 connection over any stream.
    pub(super) struct Http<S: Read + Write> {
        r: BufReader<S>,
        auth: String,
    }

    impl<S: Read + Write> Http<S> {
        fn get(&mut self, path: &str) -> u16 {
            self.send("GET", path, "").0
        }

        /// One request; the status and the body.
        pub(super) fn send(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: b\r\n{}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                self.auth,
                body.len()
            );
            self.r.get_mut().write_all(req.as_bytes()).unwrap();
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            let status = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let mut len = 0usize;
            loop {
                line.clear();
                self.r.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut buf = vec![0; len];
            self.r.read_exact(&mut buf).unwrap();
            (status, String::from_utf8_lossy(&buf).into_owned())
        }
    }

    pub(super) struct Running {
        child: Child,
        pub(super) dir: PathBuf,
        socket: PathBuf,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        auth: String,
    }

    impl Running {
        pub(super) fn start(exe: &Path, tag: &str) -> Running {
            let dir =
                std::env::temp_dir().join(format!("viridian-caps-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let socket = dir.join("v.sock");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new(exe)
                .arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--socket")
                .arg(&socket)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .env("VIRIDIAN_LOG", "warn")
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
            while TcpStream::connect(("127.0.0.1", port)).is_err()
                || UnixStream::connect(&socket).is_err()
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let data = dir.join("data");
            let cert = std::fs::read(data.join("tls/cert.pem")).unwrap();
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut &cert[..]) {
                roots.add(c.unwrap()).unwrap();
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let token = std::fs::read_to_string(data.join("token")).unwrap();
            Running {
                child,
                dir,
                socket,
                port,
                tls: Arc::new(tls),
                auth: format!("Authorization: Bearer {}\r\n", token.trim()),
            }
        }

        pub(super) fn unix(&self) -> Http<UnixStream> {
            Http {
                r: BufReader::new(UnixStream::connect(&self.socket).unwrap()),
                auth: String::new(),
            }
        }

        fn tcp(&self) -> Http<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
            let conn =
                rustls::ClientConnection::new(self.tls.clone(), "localhost".try_into().unwrap())
                    .unwrap();
            let tcp = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            tcp.set_nodelay(true).unwrap();
            Http {
                r: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
                auth: self.auth.clone(),
            }
        }

        pub(super) fn stop(mut self) {
            // SAFETY: kill(2) on the pid of a child this program spawned and has not reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const CASES: [&str; 8] = [
        "unix keep-alive GET /v1/vms",
        "unix keep-alive GET /v1/host",
        "unix new connection GET /v1/vms",
        "unix new connection GET /v1/host",
        "TLS keep-alive GET /v1/vms",
        "TLS keep-alive GET /v1/host",
        "TLS new connection GET /v1/vms",
        "TLS new connection GET /v1/host",
    ];

    /// One round of every case against one daemon: samples per case.
    fn round(d: &Running, keep_alive: usize, fresh: usize) -> Vec<Vec<Duration>> {
        let time = |n: usize, mut f: Box<dyn FnMut() -> u16 + '_>| -> Vec<Duration> {
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    assert_eq!(f(), 200);
                    t.elapsed()
                })
                .collect()
        };
        let mut out = Vec::new();
        for path in ["/v1/vms", "/v1/host"] {
            let mut c = d.unix();
            for _ in 0..200 {
                c.get(path);
            }
            out.push(time(keep_alive, Box::new(move || c.get(path))));
        }
        for path in ["/v1/vms", "/v1/host"] {
            out.push(time(fresh, Box::new(move || d.unix().get(path))));
        }
        for path in ["/v1/vms", "/v1/host"] {
            let mut c = d.tcp();
            for _ in 0..200 {
                c.get(path);
            }
            out.push(time(keep_alive, Box::new(move || c.get(path))));
        }
        for path in ["/v1/vms", "/v1/host"] {
            out.push(time(fresh, Box::new(move || d.tcp().get(path))));
        }
        out
    }

    pub fn compare() {
        let args: Vec<String> = std::env::args().collect();
        let other = PathBuf::from(
            args.get(2)
                .expect("usage: api_bench caps OTHER_VIRIDIAND [ROUNDS]"),
        );
        let rounds: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(3);
        let exe = std::env::current_exe().unwrap();
        let this = exe.parent().unwrap().parent().unwrap().join("viridiand");
        let builds = [("other", other), ("this", this)];
        let mut all: Vec<Vec<Vec<Duration>>> = vec![vec![Vec::new(); CASES.len()]; 2];
        for r in 0..rounds {
            // Alternate which build goes first, so drift of the host's load falls on both.
            let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for b in order {
                let (tag, exe) = &builds[b];
                let d = Running::start(exe, tag);
                for (i, samples) in round(&d, 3000, 300).into_iter().enumerate() {
                    all[b][i].extend(samples);
                }
                d.stop();
            }
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{} rounds; other = {}, this = {}",
            rounds,
            builds[0].1.display(),
            builds[1].1.display()
        );
        println!("| what | n | other p50 | this p50 | other p99 | this p99 |");
        println!("|---|---|---|---|---|---|");
        for (i, case) in CASES.iter().enumerate() {
            let mut o = all[0][i].clone();
            let mut t = all[1][i].clone();
            o.sort();
            t.sort();
            println!(
                "| {case} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
                t.len(),
                us(percentile(&o, 0.5)),
                us(percentile(&t, 0.5)),
                us(percentile(&o, 0.99)),
                us(percentile(&t, 0.99)),
            );
        }
    }
}

/// `api_bench paths`: latency of requests that name host files, this build (storage
/// roots, signature and chain checks) vs another (e.g. the commit before them).
mod paths {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use super::bench_client::percentile;
    use super::caps::Running;

    const CASES: [&str; 3] = [
        "PUT a drive's media (the same 1 GiB dynamic VHDX again)",
        "POST /v1/disks/create, submitted (202)",
        "POST /v1/disks/create, submitted to completed (wait)",
    ];

    fn round(d: &Running, n: usize) -> Vec<Vec<Duration>> {
        let mut c = d.unix();
        let data = d.dir.join("data");
        let disk = data.join("bench-boot.vhdx");
        let (s, body) = c.send(
            "POST",
            "/v1/disks/create",
            &format!(
                r#"{{"path":"{}","kind":"dynamic","size_bytes":1073741824}}"#,
                disk.display()
            ),
        );
        assert_eq!(s, 202, "{body}");
        let job = job_id(&body);
        let (s, body) = c.send("GET", &format!("/v1/jobs/{job}/wait?timeout=60"), "");
        assert_eq!(s, 200, "{body}");
        let (s, body) = c.send("POST", "/v1/vms", r#"{"name":"bench","generation":2}"#);
        assert_eq!(s, 201, "{body}");
        let media = format!(r#"{{"type":"hard_disk","path":"{}"}}"#, disk.display());
        let (s, body) = c.send(
            "POST",
            "/v1/vms/bench/drives",
            &format!(
                r#"{{"controller":"scsi","controller_number":0,"location":0,"media":{media}}}"#
            ),
        );
        assert_eq!(s, 201, "{body}");
        let put = format!(r#"{{"media":{media}}}"#);
        let mut out = vec![Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..n {
            let t = Instant::now();
            let (s, body) = c.send("PUT", "/v1/vms/bench/drives/scsi/0/0", &put);
            out[0].push(t.elapsed());
            assert_eq!(s, 200, "{body}");
        }
        for i in 0..n / 10 {
            let path = data.join(format!("bench-{i}.vhdx"));
            let req = format!(
                r#"{{"path":"{}","kind":"dynamic","size_bytes":1048576}}"#,
                path.display()
            );
            let t = Instant::now();
            let (s, body) = c.send("POST", "/v1/disks/create", &req);
            out[1].push(t.elapsed());
            assert_eq!(s, 202, "{body}");
            let job = job_id(&body);
            let (s, body) = c.send("GET", &format!("/v1/jobs/{job}/wait?timeout=60"), "");
            out[2].push(t.elapsed());
            assert_eq!(s, 200, "{body}");
            assert!(body.contains("\"state\":\"Completed\""), "{body}");
        }
        out
    }

    fn job_id(body: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    pub fn compare() {
        let args: Vec<String> = std::env::args().collect();
        let other = PathBuf::from(
            args.get(2)
                .expect("usage: api_bench paths OTHER_VIRIDIAND [ROUNDS]"),
        );
        let rounds: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(3);
        let exe = std::env::current_exe().unwrap();
        let this = exe.parent().unwrap().parent().unwrap().join("viridiand");
        let builds = [("other", other), ("this", this)];
        let mut all: Vec<Vec<Vec<Duration>>> = vec![vec![Vec::new(); CASES.len()]; 2];
        for r in 0..rounds {
            let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for b in order {
                let (tag, exe) = &builds[b];
                let d = Running::start(exe, tag);
                for (i, samples) in round(&d, 2000).into_iter().enumerate() {
                    all[b][i].extend(samples);
                }
                d.stop();
            }
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{} rounds; other = {}, this = {}",
            rounds,
            builds[0].1.display(),
            builds[1].1.display()
        );
        println!("| what | n | other p50 | this p50 | other p99 | this p99 |");
        println!("|---|---|---|---|---|---|");
        for (i, case) in CASES.iter().enumerate() {
            let mut o = all[0][i].clone();
            let mut t = all[1][i].clone();
            o.sort();
            t.sort();
            println!(
                "| {case} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
                t.len(),
                us(percentile(&o, 0.5)),
                us(percentile(&t, 0.5)),
                us(percentile(&o, 0.99)),
                us(percentile(&t, 0.99)),
            );
        }
    }
}
