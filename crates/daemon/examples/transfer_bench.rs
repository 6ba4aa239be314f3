//! Export and import through a real viridiand, side by side in one run:
//! - export of an off VM (two dynamic disks of DATA_MIB written each, one checkpoint
//!   whose layers hold a quarter of that again) against `cp -r` of the same files
//!   followed by `sync -f`; rounds alternate, best and median are reported; before
//!   every timed copy the file system is synced and left a moment (on a volume
//!   mounted with `discard`, trimming the blocks a removed copy freed would
//!   otherwise land in the next timed copy); both sides write every round into a
//!   new folder and keep it (a side that deletes its last copy first writes into
//!   page cache memory just freed, which on a VM host can be several times faster
//!   than memory the guest has not touched yet);
//! - import by copy of that export against `cp -r` of the export folder + sync;
//! - import by register of a VM with 20 checkpoints (POST until Completed; target
//!   under 1 s).
//!
//! cargo build --release -p daemon -p cli --bins --examples
//! target/release/examples/transfer_bench [DATA_MIB] [DIR] [ROUNDS]

#[path = "bench_client/mod.rs"]
mod bench_client;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bench_client::{add_disk, drives, dynamic, job, loadavg, start_daemon, write_noise, Conn};
use serde_json::json;

/// Syncs the file system of `dir` and gives it a moment: a volume mounted with
/// `discard` trims freed blocks after the commit, and that work must not land in
/// the next timed copy (whichever side it is).
fn settle(dir: &Path) {
    let status = Command::new("sync").arg("-f").arg(dir).status().unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(1500));
}

fn cp_r(sources: &[PathBuf], dest: &Path) -> Duration {
    let _ = std::fs::remove_dir_all(dest);
    std::fs::create_dir_all(dest).unwrap();
    settle(dest);
    let t = Instant::now();
    let status = Command::new("cp")
        .arg("-r")
        .args(sources)
        .arg(dest)
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("sync").arg("-f").arg(dest).status().unwrap();
    assert!(status.success());
    t.elapsed()
}

fn bytes_under(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| bytes_under(&e.path()))
            .sum()
    } else {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(what: &str, bytes: u64, ours: Vec<Duration>, cp: Vec<Duration>) {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    let (o, c) = (median(ours.clone()), median(cp.clone()));
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    println!(
        "{what}: {mib:.0} MiB; ours median {:.2} s ({:.0} MiB/s, best {:.2} s), cp -r + sync median {:.2} s ({:.0} MiB/s, best {:.2} s): ours at {:.0} % of cp's rate (median), {:.0} % (best vs best) (target >= 90 %)",
        o.as_secs_f64(),
        mib / o.as_secs_f64(),
        best(&ours).as_secs_f64(),
        c.as_secs_f64(),
        mib / c.as_secs_f64(),
        best(&cp).as_secs_f64(),
        100.0 * c.as_secs_f64() / o.as_secs_f64(),
        100.0 * best(&cp).as_secs_f64() / best(&ours).as_secs_f64(),
    );
}

fn main() {
    let data_mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    let base_dir = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let rounds: usize = std::env::args()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let dir = base_dir.join(format!("viridian-transfer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (daemon, socket) = start_daemon(&dir, &["--checkpoint-limit", "100"]);
    let mut c = Conn::open(&socket);
    println!("load average at start: {}", loadavg());

    // The VM: two disks with data, a checkpoint, more data in the layers.
    let disks = dir.join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    c.call("POST", "/v1/vms", r#"{"name":"big","memory_mib":256}"#);
    for (i, name) in ["a.vhd", "b.vhdx"].iter().enumerate() {
        let p = disks.join(name);
        dynamic(&p, 4 << 30);
        write_noise(&p, data_mib << 20);
        add_disk(&mut c, "big", i, &p);
    }
    job(
        &mut c,
        "POST",
        "/v1/vms/big/checkpoints",
        r#"{"name":"one"}"#,
    );
    for layer in drives(&mut c, "big") {
        write_noise(&layer, (data_mib / 4) << 20);
    }
    let (_, body) = c.call("GET", "/v1/vms/big", "");
    let vm: serde_json::Value = serde_json::from_str(&body).unwrap();
    let vm_dir = dir.join("data/vms").join(vm["id"].as_str().unwrap());
    let sources = vec![disks.clone(), vm_dir.join("Snapshots")];
    let bytes: u64 = sources.iter().map(|p| bytes_under(p)).sum();

    // Export vs cp -r of the same files; rounds alternate, the first warms the cache.
    cp_r(&sources, &dir.join("warm"));
    let (mut ours, mut cp) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let dest = dir.join(format!("export-{r}"));
        std::fs::create_dir_all(&dest).unwrap();
        settle(&dest);
        let t = Instant::now();
        job(
            &mut c,
            "POST",
            "/v1/vms/big/export",
            &json!({"destination": dest}).to_string(),
        );
        ours.push(t.elapsed());
        cp.push(cp_r(&sources, &dir.join(format!("cp-export-{r}"))));
    }
    report("export (off VM, 2 disks + 1 checkpoint)", bytes, ours, cp);

    // Import by copy vs cp -r of the export folder.
    let folder = dir.join("export-0/big");
    let export_bytes = bytes_under(&folder);
    let (mut ours, mut cp) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let dest = dir.join(format!("import-{r}"));
        std::fs::create_dir_all(&dest).unwrap();
        settle(&dest);
        let t = Instant::now();
        let done = job(
            &mut c,
            "POST",
            "/v1/vms/import",
            &json!({"source": folder, "mode": "copy", "destination": dest, "new_id": true, "name": format!("copy-{r}")}).to_string(),
        );
        ours.push(t.elapsed());
        eprintln!(
            "import round {r}: {:.2} s in all; job created {} started {} finished {}",
            t.elapsed().as_secs_f64(),
            done["created"],
            done["started"],
            done["finished"]
        );
        cp.push(cp_r(
            std::slice::from_ref(&folder),
            &dir.join(format!("cp-import-{r}")),
        ));
    }
    report("import --copy", export_bytes, ours, cp);

    // Register of a VM with 20 checkpoints.
    c.call("POST", "/v1/vms", r#"{"name":"many","memory_mib":256}"#);
    let p = disks.join("many.vhd");
    dynamic(&p, 1 << 30);
    add_disk(&mut c, "many", 0, &p);
    for i in 0..20 {
        job(
            &mut c,
            "POST",
            "/v1/vms/many/checkpoints",
            &format!(r#"{{"name":"cp{i}"}}"#),
        );
    }
    let many_out = dir.join("many-export");
    std::fs::create_dir_all(&many_out).unwrap();
    job(
        &mut c,
        "POST",
        "/v1/vms/many/export",
        &json!({"destination": many_out}).to_string(),
    );
    let mut times = Vec::new();
    for r in 0..5 {
        let copy = dir.join(format!("many-{r}"));
        cp_r(&[many_out.join("many")], &copy);
        let t = Instant::now();
        job(
            &mut c,
            "POST",
            "/v1/vms/import",
            &json!({"source": copy.join("many"), "new_id": true, "name": format!("many-{r}")})
                .to_string(),
        );
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "import --register, 20 checkpoints: median {:.0} ms, max {:.0} ms (target < 1 s)",
        median(times.clone()).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3
    );
    println!("load average at end: {}", loadavg());
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
