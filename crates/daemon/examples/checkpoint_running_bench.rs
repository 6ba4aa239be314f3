//! Checkpoints of a running VM through a real viridiand and real workers (QEMU;
//! TCG on hosts without hardware virtualization), issue 6's benchmark:
//! - guest downtime of a checkpoint of a running 256 MiB VM (the job's
//!   `guest-downtime-ms`), ROUNDS times;
//! - state-save throughput: the size of the saved memory and device state over
//!   the time of a save job (POST save until Completed), ROUNDS times, each
//!   followed by a start that resumes the guest.
//!
//! cargo build --release -p daemon -p cli -p worker --bins --examples
//! target/release/examples/checkpoint_running_bench [ROUNDS] [DIR]
//!
//! Uses the cached test guest (`guest/build.sh`) and the `viridian-worker` built
//! next to `viridiand`.

#[path = "bench_client/mod.rs"]
mod bench_client;

use std::path::PathBuf;
use std::time::Instant;

use bench_client::{affected, guest_dir, job, loadavg, median, start_daemon, wait_console, Conn};
use serde_json::{json, Value};

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
    let dir = base_dir.join(format!(
        "vrc-{}", // short: QEMU's sockets live below it (108-byte limit)
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (daemon, socket) = start_daemon(&dir, &[]);
    let mut c = Conn::open(&socket);
    println!("load average at start: {}", loadavg());

    let boot = dir.join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &boot).unwrap();
    let (status, body) = c.call(
        "POST",
        "/v1/vms",
        r#"{"name":"run","generation":1,"processor_count":1,"memory_mib":256}"#,
    );
    assert_eq!(status, 201, "{body}");
    let vm: Value = serde_json::from_str(&body).unwrap();
    let vm_dir = dir.join("data/vms").join(vm["id"].as_str().unwrap());
    let (status, body) = c.call(
        "POST",
        "/v1/vms/run/drives",
        &json!({"controller": "ide", "controller_number": 0, "location": 0,
                "media": {"type": "hard_disk", "path": boot}})
        .to_string(),
    );
    assert_eq!(status, 201, "{body}");
    job(&mut c, "POST", "/v1/vms/run/start", "{}");
    wait_console(&mut c, "run", "VIRIDIAN-GUEST: ready");

    // 1. Checkpoints of the running VM: the guest's downtime.
    let mut downtimes = Vec::new();
    for i in 0..rounds {
        let done = job(
            &mut c,
            "POST",
            "/v1/vms/run/checkpoints",
            &format!(r#"{{"name":"c{i}"}}"#),
        );
        let ms: f64 = affected(&done, "guest-downtime-ms")
            .and_then(|v| v.parse().ok())
            .expect("the job reports the downtime");
        downtimes.push(ms);
    }

    // 2. Save jobs: the state file's size over the job's time.
    let mut rates = Vec::new();
    let mut sizes = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        job(&mut c, "POST", "/v1/vms/run/save", "{}");
        let secs = t.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(vm_dir.join("saved-state.bin"))
            .map(|m| m.len())
            .unwrap_or(0);
        sizes.push(bytes as f64 / (1u64 << 20) as f64);
        rates.push(bytes as f64 / (1u64 << 20) as f64 / secs);
        job(&mut c, "POST", "/v1/vms/run/start", "{}");
    }
    println!(
        "checkpoint of a running 256 MiB VM: guest downtime median {:.0} ms, min {:.0}, max {:.0} (n={rounds})",
        median(downtimes.clone()),
        downtimes.iter().copied().fold(f64::MAX, f64::min),
        downtimes.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "save of a running 256 MiB VM: state {:.0} MiB, {:.0} MiB/s median (min {:.0}, max {:.0}) over the whole save job",
        median(sizes),
        median(rates.clone()),
        rates.iter().copied().fold(f64::MAX, f64::min),
        rates.iter().copied().fold(0.0, f64::max),
    );
    job(&mut c, "POST", "/v1/vms/run/stop", "{}");
    println!("load average at end: {}", loadavg());
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
