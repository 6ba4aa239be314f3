//! What the daemon benchmarks share: a keep-alive HTTP client for viridiand's
//! socket, jobs run to completion, disks filled with data, and the host's load.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    pub fn open(socket: &PathBuf) -> Conn {
        let s = UnixStream::connect(socket).expect("connect to viridiand");
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    pub fn call(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.writer.write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
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
        self.reader.read_exact(&mut buf).unwrap();
        (status, String::from_utf8_lossy(&buf).into_owned())
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Sends the request and waits until its job ends; panics unless it completed.
pub fn job(c: &mut Conn, method: &str, path: &str, body: &str) -> Value {
    let (status, body) = c.call(method, path, body);
    assert_eq!(status, 202, "{method} {path}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    loop {
        let (_, done) = c.call("GET", &format!("/v1/jobs/{id}/wait?timeout=60"), "");
        let v: Value = serde_json::from_str(&done).unwrap();
        match v["state"].as_str() {
            Some("Completed") => return v,
            Some("Exception" | "Terminated" | "Killed") => panic!("job failed: {v}"),
            _ => {}
        }
    }
}

pub fn dynamic(path: &Path, size: u64) {
    vhd::create_dynamic(path, size, None).unwrap();
}

/// Writes `len` bytes of a pseudo-random stream from offset 0.
pub fn write_noise(path: &Path, len: u64) {
    let d = vhd::open(path, false).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        d.write_at(&buf, done).unwrap();
        done += buf.len() as u64;
    }
    d.flush().unwrap();
}

pub fn drives(c: &mut Conn, vm: &str) -> Vec<PathBuf> {
    let (_, body) = c.call("GET", &format!("/v1/vms/{vm}"), "");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["settings"]["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["media"]["path"].as_str().unwrap()))
        .collect()
}

pub fn add_disk(c: &mut Conn, vm: &str, location: usize, path: &Path) {
    let (status, body) = c.call(
        "POST",
        &format!("/v1/vms/{vm}/drives"),
        &serde_json::json!({"controller": "scsi", "controller_number": 0, "location": location,
            "media": {"type": "hard_disk", "path": path}})
        .to_string(),
    );
    assert_eq!(status, 201, "{body}");
}

/// `cp FROM TO`, then fsync TO: what a copy of the data costs, to disk.
pub fn cp_and_sync(from: &Path, to: &Path) -> Duration {
    let _ = std::fs::remove_file(to);
    let t = Instant::now();
    let status = Command::new("cp").arg(from).arg(to).status().unwrap();
    assert!(status.success());
    std::fs::File::open(to).unwrap().sync_all().unwrap();
    t.elapsed()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The daemon a benchmark runs: killed when dropped, also when the benchmark panics.
pub struct DaemonProcess(pub Child);

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl DaemonProcess {
    /// Stops the daemon with SIGTERM (its VMs keep running) and waits for it.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// The cached test guest's folder (builds it when missing: `guest/build.sh`).
pub fn guest_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("guest/build.sh"))
        .output()
        .expect("guest/build.sh runs");
    assert!(out.status.success(), "guest/build.sh failed");
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default(),
    )
}

/// Waits up to 300 s for `needle` on VM `vm`'s console.
pub fn wait_console(c: &mut Conn, vm: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, text) = c.call("GET", &format!("/v1/vms/{vm}/console/log"), "");
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "no {needle:?} on the console");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The id of a job's affected element of this kind.
pub fn affected(job: &Value, kind: &str) -> Option<String> {
    job["affected_elements"]
        .as_array()?
        .iter()
        .find(|a| a["kind"] == kind)
        .and_then(|a| a["id"].as_str().map(str::to_string))
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Starts the `viridiand` built next to the running example on `dir/data`, with
/// `dir` a storage root.
pub fn start_daemon(dir: &Path, extra: &[&str]) -> (DaemonProcess, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let daemon = exe.parent().unwrap().parent().unwrap().join("viridiand");
    let socket = dir.join("v.sock");
    let child = Command::new(&daemon)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket")
        .arg(&socket)
        // The benchmark's own disks live beside the data dir.
        .arg("--storage-root")
        .arg(dir)
        .args(extra)
        .env("VIRIDIAN_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; build it with --bins", daemon.display()));
    while UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    (DaemonProcess(child), socket)
}
