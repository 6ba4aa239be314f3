//! VM lifecycle through a real `viridiand` and real workers running QEMU (TCG here):
//! invalid transitions change nothing, a daemon restart re-attaches to a running VM,
//! a killed worker leaves the VM Critical with the reason, and the next start works.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{wait_job, Daemon};
use serde_json::{json, Value};

/// `viridiand` finds `viridian-worker` next to itself; a workspace build puts it there,
/// a `cargo test -p daemon` alone does not, so build it then.
fn ensure_worker_binary() {
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

fn vm(d: &Daemon, name: &str) -> Value {
    let r = d.get(&format!("/v1/vms/{name}"));
    assert_eq!(r.status, 200, "{}", r.raw);
    r.body
}

fn state(d: &Daemon, name: &str) -> String {
    vm(d, name)["runtime"]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Runs a lifecycle action and waits for its job; returns the finished job.
fn act(d: &Daemon, name: &str, action: &str) -> Value {
    let r = d.post(&format!("/v1/vms/{name}/{action}"), json!({}));
    assert_eq!(r.status, 202, "{action}: {}", r.raw);
    assert!(r
        .header("location")
        .is_some_and(|l| l.starts_with("/v1/jobs/")));
    assert_eq!(r.body["affected_elements"][0]["kind"], "vm", "{}", r.raw);
    let id = r.body["id"].as_str().unwrap().to_string();
    let mut job = wait_job(d, &id);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !matches!(
        job["state"].as_str(),
        Some("Completed" | "Exception" | "Terminated" | "Killed")
    ) {
        assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
        job = wait_job(d, &id);
    }
    job
}

fn wait_state(d: &Daemon, name: &str, want: &str) -> Value {
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

fn process_alive(pid: u64) -> bool {
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
struct KillWorkersOnDrop(PathBuf);

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

#[test]
fn running_vm_survives_daemon_restart_and_a_killed_worker_makes_it_critical_until_restarted() {
    ensure_worker_binary();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let r = d.post(
        "/v1/vms",
        json!({"name": "runner", "generation": 1, "processor_count": 1, "memory_mib": 128}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);

    // Invalid transitions: InvalidState at once, nothing changes.
    let before = d.snapshot();
    for action in ["pause", "resume", "stop", "shutdown", "save", "restart"] {
        let r = d.post(&format!("/v1/vms/runner/{action}"), json!({}));
        assert_eq!(r.status, 409, "{action}: {}", r.raw);
        assert_eq!(r.code(), "InvalidState", "{action}: {}", r.raw);
        assert!(
            r.body["message"].as_str().unwrap().contains("Off"),
            "{}",
            r.raw
        );
    }
    assert_eq!(d.snapshot(), before);
    assert_eq!(state(&d, "runner"), "Off");

    // The host says which accelerator VMs run under, and why.
    let host = d.get("/v1/host");
    let accel = &host.body["accelerator"];
    assert!(
        !accel["reason"].as_str().unwrap_or("").is_empty(),
        "{}",
        host.raw
    );
    if !accel["hardware_virtualization"].as_bool().unwrap_or(true) {
        assert_eq!(accel["kind"], "tcg", "{}", host.raw);
    }

    let job = act(&d, "runner", "start");
    assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());
    let running = wait_state(&d, "runner", "Running");
    let worker_pid = running["runtime"]["worker_pid"]
        .as_u64()
        .expect("worker pid");
    let r = d.post("/v1/vms/runner/start", json!({}));
    assert_eq!(r.code(), "InvalidState", "{}", r.raw);

    // The daemon restarts; the VM keeps running and is controlled again.
    d.restart();
    let after = wait_state(&d, "runner", "Running");
    assert_eq!(after["runtime"]["worker_pid"].as_u64(), Some(worker_pid));
    {
        let job = act(&d, "runner", "pause");
        assert_eq!(job["state"], "Completed", "pause: {job}");
    }
    wait_state(&d, "runner", "Paused");
    {
        let job = act(&d, "runner", "resume");
        assert_eq!(job["state"], "Completed", "resume: {job}");
    }
    wait_state(&d, "runner", "Running");

    // The worker is killed: the VM goes Critical with the reason; QEMU goes too.
    // SAFETY: kill(2) on the worker's pid, which this test's daemon started.
    unsafe { libc::kill(worker_pid as i32, libc::SIGKILL) };
    let critical = wait_state(&d, "runner", "Critical");
    let reason = critical["runtime"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("exited unexpectedly"), "{critical}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(worker_pid) {
        assert!(Instant::now() < deadline, "the worker is still alive");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The next start works, and turning off ends in Off.
    {
        let job = act(&d, "runner", "start");
        assert_eq!(job["state"], "Completed", "start: {job}");
    }
    wait_state(&d, "runner", "Running");
    {
        let job = act(&d, "runner", "stop");
        assert_eq!(job["state"], "Completed", "stop: {job}");
    }
    wait_state(&d, "runner", "Off");
    d.stop();
}

/// The cached test guest (guest/build.sh builds it once; later calls are quick).
fn guest_dir() -> PathBuf {
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

fn wait_console(d: &Daemon, name: &str, needle: &str) -> String {
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

#[test]
fn guest_boots_from_its_vhd_through_the_api_saves_resumes_and_shuts_down() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let disk = d.dir.path().join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &disk).unwrap();
    let r = d.post(
        "/v1/vms",
        json!({"name": "guest", "generation": 1, "processor_count": 1, "memory_mib": 192}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let r = d.post(
        "/v1/vms/guest/drives",
        json!({"controller": "ide", "controller_number": 0, "location": 0,
               "media": {"type": "hard_disk", "path": disk.display().to_string()}}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);

    {
        let job = act(&d, "guest", "start");
        assert_eq!(job["state"], "Completed", "start: {job}");
    }
    wait_console(&d, "guest", "VIRIDIAN-GUEST: ready");

    // Save: state Saved with the state file in the VM's folder; start resumes it.
    {
        let job = act(&d, "guest", "save");
        assert_eq!(job["state"], "Completed", "save: {job}");
    }
    let vm_dir = d
        .data
        .join("vms")
        .join(vm(&d, "guest")["id"].as_str().unwrap());
    wait_state(&d, "guest", "Saved");
    assert!(vm_dir.join("saved-state.bin").exists());
    let r = d.post("/v1/vms/guest/pause", json!({}));
    assert_eq!(r.code(), "InvalidState", "{}", r.raw);
    {
        let job = act(&d, "guest", "start");
        assert_eq!(job["state"], "Completed", "start: {job}");
    }
    wait_state(&d, "guest", "Running");
    assert!(!vm_dir.join("saved-state.bin").exists());

    // The ACPI power button: the guest powers off and the job completes with Off.
    let job = act(&d, "guest", "shutdown");
    assert_eq!(job["state"], "Completed", "{job}");
    wait_state(&d, "guest", "Off");
    let console = wait_console(&d, "guest", "VIRIDIAN-GUEST: poweroff");
    assert_eq!(
        console.matches("VIRIDIAN-GUEST: booted").count(),
        1,
        "{console}"
    );
    d.stop();
}

#[test]
fn shutdown_of_a_guest_that_ignores_acpi_fails_with_timeout_and_the_vm_keeps_running() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let boot = d.dir.path().join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &boot).unwrap();
    // A config disk whose script stops the guest's power-button handler and stays up.
    let raw = d.dir.path().join("cfg.raw");
    let mut script = b"#viridian-guest-script\n\
        for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = head ] && kill ${p#/proc/}; done\n\
        echo acpi-handler-gone\n\
        while true; do sleep 1; done\n"
        .to_vec();
    script.resize(1 << 20, 0);
    std::fs::write(&raw, script).unwrap();
    let cfg = d.dir.path().join("cfg.vhd");
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
    assert!(status.success());
    let r = d.post(
        "/v1/vms",
        json!({"name": "deaf", "generation": 1, "processor_count": 1, "memory_mib": 192}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    for (location, path) in [(0, &boot), (1, &cfg)] {
        let r = d.post(
            "/v1/vms/deaf/drives",
            json!({"controller": "ide", "controller_number": 0, "location": location,
                   "media": {"type": "hard_disk", "path": path.display().to_string()}}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    {
        let job = act(&d, "deaf", "start");
        assert_eq!(job["state"], "Completed", "start: {job}");
    }
    wait_console(&d, "deaf", "acpi-handler-gone");

    // A timeout out of range, or on another action, is refused before anything happens.
    let r = d.post("/v1/vms/deaf/shutdown", json!({"timeout_seconds": 0}));
    assert_eq!(r.code(), "InvalidParameter", "{}", r.raw);
    let r = d.post("/v1/vms/deaf/pause", json!({"timeout_seconds": 5}));
    assert_eq!(r.code(), "InvalidParameter", "{}", r.raw);
    let r = d.post("/v1/vms/deaf/shutdown", json!({"timeout": 5}));
    assert_eq!(r.code(), "MalformedRequest", "{}", r.raw);

    let r = d.post("/v1/vms/deaf/shutdown", json!({"timeout_seconds": 3}));
    assert_eq!(r.status, 202, "{}", r.raw);
    let mut job = wait_job(&d, r.body["id"].as_str().unwrap());
    while job["state"] == "Running" || job["state"] == "New" {
        job = wait_job(&d, job["id"].as_str().unwrap());
    }
    assert_eq!(job["state"], "Exception", "{job}");
    assert_eq!(job["error_code"], "Timeout", "{job}");
    let why = job["error_description"].as_str().unwrap_or("");
    assert!(
        why.contains("did not shut down within 3 s") && why.contains("still running"),
        "{job}"
    );
    // No silent power-off: the VM still runs, and turning it off works.
    wait_state(&d, "deaf", "Running");
    {
        let job = act(&d, "deaf", "stop");
        assert_eq!(job["state"], "Completed", "stop: {job}");
    }
    wait_state(&d, "deaf", "Off");
    d.stop();
}
