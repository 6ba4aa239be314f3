//! Helpers for tests that run real workers and the test guest: the worker binary,
//! the cached guest, lifecycle jobs, VM states and the serial console.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{wait_job, Daemon};

/// `viridiand` finds `viridian-worker` next to itself; a workspace build puts it there,
/// a `cargo test -p daemon` alone does not, so build it then.
pub fn ensure_worker_binary() {
    let daemon = PathBuf::from(env!("CARGO_BIN_EXE_viridiand"));
    let worker = daemon.with_file_name("viridian-worker");
    // viridiand is rebuilt whenever the worker crate changes (it links it), so a worker
    // binary older than viridiand may be stale.
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if matches!((modified(&worker), modified(&daemon)), (Some(w), Some(d)) if w >= d) {
        return;
    }
    let release = daemon.components().any(|c| c.as_os_str() == "release");
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo.args(["build", "-p", "worker", "--bin", "viridian-worker"]);
    if release {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("cargo runs");
    assert!(status.success(), "building viridian-worker failed");
    assert!(worker.exists(), "no {} after building it", worker.display());
}

pub fn vm(d: &Daemon, name: &str) -> Value {
    let r = d.get(&format!("/v1/vms/{name}"));
    assert_eq!(r.status, 200, "{}", r.raw);
    r.body
}

pub fn state(d: &Daemon, name: &str) -> String {
    vm(d, name)["runtime"]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Runs a lifecycle action and waits for its job; returns the finished job.
pub fn act(d: &Daemon, name: &str, action: &str) -> Value {
    let r = d.post(&format!("/v1/vms/{name}/{action}"), json!({}));
    assert_eq!(r.status, 202, "{action}: {}", r.raw);
    assert!(r
        .header("location")
        .is_some_and(|l| l.starts_with("/v1/jobs/")));
    assert_eq!(r.body["affected_elements"][0]["kind"], "vm", "{}", r.raw);
    let id = r.body["id"].as_str().unwrap().to_string();
    let mut job = wait_job(d, &id);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !matches!(
        job["state"].as_str(),
        Some("Completed" | "Exception" | "Terminated" | "Killed")
    ) {
        assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
        job = wait_job(d, &id);
    }
    job
}

pub fn wait_state(d: &Daemon, name: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = vm(d, name);
        if v["runtime"]["state"] == want {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "VM {name} never became {want}: {v}\ndaemon log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Workers outlive their daemon by design; a failing test must not leave its VMs
/// running, so this kills every worker started for `data_dir` when dropped.
pub struct KillWorkersOnDrop(pub PathBuf);

impl Drop for KillWorkersOnDrop {
    fn drop(&mut self) {
        let needle = self.0.display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("viridian-worker") && cmdline.contains(&needle) {
                // SAFETY: kill(2) on a worker this test's daemon started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The cached test guest (guest/build.sh builds it once; later calls are quick).
pub fn guest_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(root.join("guest/build.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("guest/build.sh runs");
    assert!(out.status.success(), "guest/build.sh failed");
    let text = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        text.lines()
            .last()
            .expect("guest/build.sh prints its folder"),
    )
}

pub fn wait_console(d: &Daemon, name: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = d.get(&format!("/v1/vms/{name}/console/log"));
        assert_eq!(r.status, 200, "{}", r.raw);
        if r.raw.contains(needle) {
            return r.raw;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on the console of {name}:\n{}",
            r.raw
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates generation-1 VM `name` (1 vCPU, 192 MiB) with these hard disks:
/// (controller, controller number, location, path).
pub fn gen1_vm_with_disks(d: &Daemon, name: &str, disks: &[(&str, u8, u8, &Path)]) {
    let r = d.post(
        "/v1/vms",
        json!({"name": name, "generation": 1, "processor_count": 1, "memory_mib": 192}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    for (controller, number, location, path) in disks {
        let r = d.post(
            &format!("/v1/vms/{name}/drives"),
            json!({"controller": controller, "controller_number": number, "location": location,
                   "media": {"type": "hard_disk", "path": path.display().to_string()}}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
}

/// A config disk (fixed VHD, 1 MiB) in `dir` whose script the test guest runs at boot.
pub fn config_disk(dir: &Path, script: &str) -> PathBuf {
    let raw = dir.join("cfg.raw");
    let mut bytes = format!("#viridian-guest-script\n{script}").into_bytes();
    assert!(
        bytes.len() <= 65536,
        "the guest reads at most 64 KiB of script"
    );
    bytes.resize(1 << 20, 0);
    std::fs::write(&raw, bytes).unwrap();
    let cfg = dir.join("cfg.vhd");
    let status = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
        ])
        .arg(&raw)
        .arg(&cfg)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "qemu-img convert of the config disk failed"
    );
    cfg
}

/// Generation-1 VM `name` booting a copy of the cached test guest that runs `script`,
/// its disks in a folder `name` of the test's directory.
pub fn scripted_vm(d: &Daemon, guest: &Path, name: &str, script: &str) {
    let dir = d.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let boot = dir.join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &boot).unwrap();
    let cfg = config_disk(&dir, script);
    gen1_vm_with_disks(d, name, &[("ide", 0, 0, &boot), ("ide", 0, 1, &cfg)]);
}

/// Waits (checking every 250 ms) until `f` holds; fails the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The VM's serial console log, as text.
pub fn console(d: &Daemon, name: &str) -> String {
    let r = d.get(&format!("/v1/vms/{name}/console/log"));
    assert_eq!(r.status, 200, "{}", r.raw);
    r.raw
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string()
}

/// Every `count N` line in `text`, in order (the counting guests of the tests).
pub fn counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("count "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Waits until the guest has printed a count of at least `at_least`; returns the last.
pub fn wait_count(d: &Daemon, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = console(d, name);
        if let Some(&last) = counts(&text).last() {
            if last >= at_least {
                return last;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the guest never counted to {at_least}:\n{text}\ndaemon log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The count a guest last wrote into `sector` of a disk, read through the engine
/// (with its chain).
pub fn disk_count(path: &Path, sector: u64) -> u64 {
    let disk = vhd::open(path, true).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = [0u8; 512];
    disk.read_at(&mut buf, sector * 512).unwrap();
    let text = String::from_utf8_lossy(&buf);
    let line = text.trim_end_matches('\0').trim();
    line.strip_prefix("count ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{} holds no count: {line:?}", path.display()))
}
