//! Checkpoints of a running VM, the two ways side by side in one run (issue 23):
//! `background` (the memory saved while the guest runs) against `pause` (the
//! guest paused while its memory is saved, `viridiand --background-checkpoints
//! off`), on the same generation 2 guest (every disk synthetic), for a 256 MiB
//! and a 1 GiB guest, ROUNDS rounds each, alternating which way goes first.
//! The daemon is restarted with the other setting between the two (the VM runs
//! on). Per checkpoint: the guest's downtime (the job's `guest-downtime-ms`),
//! the whole job's time, the state's size, and the guest's own counting rate
//! during the job against its rate just before (how much the save slowed it).
//!
//! cargo build --release -p daemon -p cli -p worker --bins --examples
//! target/release/examples/checkpoint_background_bench [ROUNDS] [DIR]
//!
//! DIR needs a short path (QEMU's sockets live below it). Uses the cached test
//! guest (`guest/build.sh`) and the `viridian-worker` built next to `viridiand`.

#[path = "bench_client/mod.rs"]
mod bench_client;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bench_client::{
    affected, guest_dir, job, loadavg, median, start_daemon, wait_console, Conn, DaemonProcess,
};
use serde_json::{json, Value};

/// Counts as fast as the guest can, printing every 200th value.
const COUNTER: &str = "n=0\nwhile true; do n=$((n+1)); \
    [ $((n % 200)) = 0 ] && echo \"count $n\"; done\n";

fn config_disk(dir: &Path) -> PathBuf {
    let raw = dir.join("cfg.raw");
    let mut bytes = format!("#viridian-guest-script\n{COUNTER}").into_bytes();
    bytes.resize(1 << 20, 0);
    std::fs::write(&raw, bytes).unwrap();
    let cfg = dir.join("cfg.vhd");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "vpc"])
        .args(["-o", "subformat=fixed,force_size=on"])
        .arg(&raw)
        .arg(&cfg)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "qemu-img convert of the config disk failed");
    cfg
}

fn last_count(c: &mut Conn, vm: &str) -> u64 {
    let (_, text) = c.call("GET", &format!("/v1/vms/{vm}/console/log"), "");
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("count ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn vm_state(c: &mut Conn, vm: &str) -> String {
    let (_, body) = c.call("GET", &format!("/v1/vms/{vm}"), "");
    serde_json::from_str::<Value>(&body).unwrap_or_default()["runtime"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The guest's counting rate (counts per second) over `over`.
fn rate(c: &mut Conn, vm: &str, over: Duration) -> f64 {
    let (t0, c0) = (Instant::now(), last_count(c, vm));
    std::thread::sleep(over);
    let c1 = last_count(c, vm);
    (c1.saturating_sub(c0)) as f64 / t0.elapsed().as_secs_f64()
}

struct Daemon {
    dir: PathBuf,
    process: Option<DaemonProcess>,
    socket: PathBuf,
    background: bool,
}

impl Daemon {
    fn start(dir: &Path, background: bool) -> Daemon {
        let mode = if background { "auto" } else { "off" };
        let (process, socket) = start_daemon(
            dir,
            &[
                "--checkpoint-limit",
                "100",
                "--background-checkpoints",
                mode,
            ],
        );
        Daemon {
            dir: dir.to_path_buf(),
            process: Some(process),
            socket,
            background,
        }
    }

    /// Restarts the daemon with background checkpoints on or off.
    fn set(&mut self, background: bool) {
        if self.background != background {
            if let Some(p) = self.process.take() {
                p.stop();
            }
            *self = Daemon::start(&self.dir, background);
        }
    }
}

#[derive(Default)]
struct Figures {
    downtime_ms: Vec<f64>,
    job_ms: Vec<f64>,
    state_mib: Vec<f64>,
    rate_percent: Vec<f64>,
    background_ms: Vec<f64>,
    io_held_ms: Vec<f64>,
    methods: Vec<String>,
}

fn show(label: &str, f: &Figures) {
    let range = |v: &[f64]| {
        format!(
            "{:.0}–{:.0}",
            v.iter().copied().fold(f64::MAX, f64::min),
            v.iter().copied().fold(0.0, f64::max)
        )
    };
    let state = if f.state_mib.is_empty() {
        "not reported".to_string()
    } else {
        format!("{:.0} MiB", median(f.state_mib.clone()))
    };
    let held = if f.io_held_ms.is_empty() {
        String::new()
    } else {
        format!(
            ", saved in the background {:.0} ms ({}), disk I/O held {:.0} ms ({})",
            median(f.background_ms.clone()),
            range(&f.background_ms),
            median(f.io_held_ms.clone()),
            range(&f.io_held_ms)
        )
    };
    println!(
        "{label}: downtime median {:.0} ms ({}), job {:.0} ms ({}), state {state}, \
         guest counting rate during the job {:.0} % of before ({}){held}, method {:?}",
        median(f.downtime_ms.clone()),
        range(&f.downtime_ms),
        median(f.job_ms.clone()),
        range(&f.job_ms),
        median(f.rate_percent.clone()),
        range(&f.rate_percent),
        f.methods,
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let base_dir = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let guest = guest_dir();
    let dir = base_dir.join(format!("vcb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config_disk(&dir);
    let mut d = Daemon::start(&dir, true);
    println!("load average at start: {}", loadavg());

    for memory_mib in [256u64, 1024] {
        let vm = format!("g{memory_mib}");
        let mut c = Conn::open(&d.socket);
        let boot = dir.join(format!("{vm}-boot.vhd"));
        std::fs::copy(guest.join("boot.vhd"), &boot).unwrap();
        let (status, body) = c.call(
            "POST",
            "/v1/vms",
            &json!({"name": vm, "generation": 2, "processor_count": 1, "memory_mib": memory_mib})
                .to_string(),
        );
        assert_eq!(status, 201, "{body}");
        for (location, path) in [(0, &boot), (1, &cfg)] {
            let (status, body) = c.call(
                "POST",
                &format!("/v1/vms/{vm}/drives"),
                &json!({"controller": "scsi", "controller_number": 0, "location": location,
                        "media": {"type": "hard_disk", "path": path}})
                .to_string(),
            );
            assert_eq!(status, 201, "{body}");
        }
        job(&mut c, "POST", &format!("/v1/vms/{vm}/start"), "{}");
        wait_console(&mut c, &vm, "VIRIDIAN-GUEST: running command");
        std::thread::sleep(Duration::from_secs(3));

        let (mut background, mut paused) = (Figures::default(), Figures::default());
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for on in order {
                d.set(on);
                let mut c = Conn::open(&d.socket);
                while vm_state(&mut c, &vm) != "Running" {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let before = rate(&mut c, &vm, Duration::from_secs(3));
                let (t0, c0) = (Instant::now(), last_count(&mut c, &vm));
                let done = job(
                    &mut c,
                    "POST",
                    &format!("/v1/vms/{vm}/checkpoints"),
                    &json!({"name": format!("r{round}-{on}")}).to_string(),
                );
                let took = t0.elapsed();
                // The counts printed up to the job's end reach the log a moment later.
                std::thread::sleep(Duration::from_millis(300));
                let during = last_count(&mut c, &vm).saturating_sub(c0) as f64
                    / (took + Duration::from_millis(300)).as_secs_f64();
                let f = if on { &mut background } else { &mut paused };
                f.downtime_ms.push(
                    affected(&done, "guest-downtime-ms")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("no downtime in {done}")),
                );
                f.job_ms.push(took.as_secs_f64() * 1000.0);
                if let Some(bytes) =
                    affected(&done, "saved-bytes").and_then(|v| v.parse::<f64>().ok())
                {
                    f.state_mib.push(bytes / f64::from(1 << 20));
                }
                for (kind, into) in [
                    ("background-save-ms", &mut f.background_ms),
                    ("disk-io-held-ms", &mut f.io_held_ms),
                ] {
                    if let Some(v) = affected(&done, kind).and_then(|v| v.parse().ok()) {
                        into.push(v);
                    }
                }
                f.rate_percent.push(if before > 0.0 {
                    during / before * 100.0
                } else {
                    0.0
                });
                f.methods
                    .push(affected(&done, "checkpoint-method").unwrap_or_default());
            }
        }
        show(&format!("{memory_mib} MiB guest, background"), &background);
        show(
            &format!("{memory_mib} MiB guest, pause (today's way)"),
            &paused,
        );
        let mut c = Conn::open(&d.socket);
        job(&mut c, "POST", &format!("/v1/vms/{vm}/stop"), "{}");
    }
    println!("load average at end: {}", loadavg());
    drop(d.process.take());
    let _ = std::fs::remove_dir_all(&dir);
}
