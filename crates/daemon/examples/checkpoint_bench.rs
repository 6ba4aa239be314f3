//! Benchmarks of checkpoints through a real viridiand, side by side in one run:
//! - taking a checkpoint of an off VM with 4 disks (POST, then wait until the job is
//!   Completed), 50 times after 3 warm-ups: p50, p90, max;
//! - merging a checkpoint's disk (delete the checkpoint whose only descendant is the
//!   current state: POST until Completed) against `cp` + fsync of the same layer
//!   file (the allocated data), and against `viridian vhd merge` of an equal layer
//!   (the engine alone), for a VHD and a VHDX layer.
//!
//! cargo build --release -p daemon -p cli --bins --examples
//! target/release/examples/checkpoint_bench [MERGE_MIB] [DIR]
//!
//! Runs the `viridiand` built next to this example on a temporary data dir in DIR
//! (default: the system's temp dir; give a folder on the disk you care about).

#[path = "bench_client/mod.rs"]
mod bench_client;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench_client::{
    add_disk, cp_and_sync, drives, dynamic, job, loadavg, percentile, write_noise, Conn,
};

fn main() {
    let merge_mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let base_dir = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let exe = std::env::current_exe().unwrap();
    let daemon = exe.parent().unwrap().parent().unwrap().join("viridiand");
    let dir = base_dir.join(format!("viridian-ckpt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("v.sock");
    let mut child = Command::new(&daemon)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket")
        .arg(&socket)
        .args(["--checkpoint-limit", "100"])
        .env("VIRIDIAN_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; build it with --bins", daemon.display()));
    while UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Conn::open(&socket);
    println!("load average at start: {}", loadavg());

    // 1. A checkpoint of an off VM with 4 disks (1 GiB dynamic VHDs).
    c.call("POST", "/v1/vms", r#"{"name":"four","memory_mib":256}"#);
    for i in 0..4 {
        let p = dir.join(format!("four-{i}.vhd"));
        dynamic(&p, 1 << 30);
        add_disk(&mut c, "four", i, &p);
    }
    for _ in 0..3 {
        job(&mut c, "POST", "/v1/vms/four/checkpoints", "{}");
    }
    let mut samples: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            job(&mut c, "POST", "/v1/vms/four/checkpoints", "{}");
            t.elapsed()
        })
        .collect();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "checkpoint create, off VM, 4 disks: n=50 p50={:.1} ms p90={:.1} ms max={:.1} ms (target p50 < 50 ms)",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.9)),
        ms(*samples.last().unwrap())
    );

    // The floor under it on this file system: one durable small-file write (write a
    // temp file, fsync, rename, fsync the folder), as every settings file is written.
    let mut floor: Vec<Duration> = (0..50)
        .map(|i| {
            let t = Instant::now();
            let tmp = dir.join("floor.tmp");
            std::fs::write(&tmp, format!("{{\"round\":{i}}}").repeat(64)).unwrap();
            std::fs::File::open(&tmp).unwrap().sync_all().unwrap();
            std::fs::rename(&tmp, dir.join("floor.json")).unwrap();
            std::fs::File::open(&dir).unwrap().sync_all().unwrap();
            t.elapsed()
        })
        .collect();
    floor.sort();
    println!(
        "  same run, one durable small-file write (write, fsync, rename, fsync dir): p50={:.1} ms p90={:.1} ms",
        ms(percentile(&floor, 0.5)),
        ms(percentile(&floor, 0.9))
    );

    // 2. A merge against cp of the same allocated data.
    for ext in ["vhd", "vhdx"] {
        let vm = format!("merge-{ext}");
        c.call(
            "POST",
            "/v1/vms",
            &format!(r#"{{"name":"{vm}","memory_mib":256}}"#),
        );
        let base = dir.join(format!("merge-base.{ext}"));
        dynamic(&base, 4 << 30);
        add_disk(&mut c, &vm, 0, &base);
        job(
            &mut c,
            "POST",
            &format!("/v1/vms/{vm}/checkpoints"),
            r#"{"name":"A"}"#,
        );
        let layer = drives(&mut c, &vm)[0].clone();
        write_noise(&layer, merge_mib << 20);
        let bytes = std::fs::metadata(&layer).unwrap().len();
        let copy = dir.join(format!("copy.{ext}"));
        cp_and_sync(&layer, &copy); // warms the page cache for both
        let cp_time = cp_and_sync(&layer, &copy);
        std::fs::remove_file(&copy).unwrap();
        let t = Instant::now();
        job(&mut c, "DELETE", &format!("/v1/vms/{vm}/checkpoints/A"), "");
        let merge_time = t.elapsed();
        assert_eq!(
            drives(&mut c, &vm),
            std::slice::from_ref(&base),
            "merged into the base"
        );
        // The engine alone: `viridian vhd merge` of an equal layer, no daemon, no job.
        let cli = exe.parent().unwrap().parent().unwrap().join("viridian");
        let (obase, ochild) = (
            dir.join(format!("offline-base.{ext}")),
            dir.join(format!("offline-child.a{ext}")),
        );
        dynamic(&obase, 4 << 30);
        let made = Command::new(&cli)
            .args(["vhd", "create"])
            .arg(&ochild)
            .arg("--parent")
            .arg(&obase)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(made.success());
        write_noise(&ochild, merge_mib << 20);
        cp_and_sync(&ochild, &copy); // the same warm cache as above
        std::fs::remove_file(&copy).unwrap();
        let t = Instant::now();
        let merged = Command::new(&cli)
            .args(["vhd", "merge"])
            .arg(&ochild)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(merged.success());
        let offline_time = t.elapsed();
        let mibs = |d: Duration| (merge_mib as f64) / d.as_secs_f64();
        println!(
            "{ext:<4}   same data, `viridian vhd merge` (engine only): {:.2} s ({:.0} MiB/s), {:.0} % of cp's rate",
            offline_time.as_secs_f64(),
            mibs(offline_time),
            100.0 * cp_time.as_secs_f64() / offline_time.as_secs_f64()
        );
        println!(
            "{ext:<4} merge of {merge_mib} MiB written ({:.0} MiB layer file): merge {:.2} s ({:.0} MiB/s), cp+fsync {:.2} s ({:.0} MiB/s): merge at {:.0} % of cp's rate (target >= 80 %)",
            bytes as f64 / (1 << 20) as f64,
            merge_time.as_secs_f64(),
            mibs(merge_time),
            cp_time.as_secs_f64(),
            mibs(cp_time),
            100.0 * cp_time.as_secs_f64() / merge_time.as_secs_f64()
        );
    }
    println!("load average at end: {}", loadavg());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
