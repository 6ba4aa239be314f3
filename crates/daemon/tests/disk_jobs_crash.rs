//! The daemon SIGKILLed in the middle of a disk job, at 10 % steps of a convert,
//! a compact, a resize and a create (`VIRIDIAN_TEST_STALL_DISK_JOB_AT` holds the
//! job at that percent), then started again on the same data dir: no partial file
//! under the final name (or the original disk as it was), no temporary file left,
//! the job listed as Killed with the reason, and the same request, sent again,
//! succeeds with the right data. Steps alternate between VHD and VHDX. A merge,
//! which changes its target in place, is killed mid-way too: the chain through the
//! child reads the same, and the retry merges it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::disk_data::{content_hash, finish, make_base_of, write_noise};
use common::Daemon;
use serde_json::{json, Value};

const STALL: &str = "VIRIDIAN_TEST_STALL_DISK_JOB_AT";
const REASON: &str = "interrupted by a restart of the service";
/// Small disks in 2 MiB blocks: ten blocks, so the copies move in 10 % steps.
const SIZE: u64 = 20 << 20;

fn disks_dir(d: &Daemon) -> PathBuf {
    d.data.join("Virtual Hard Disks")
}

fn ext(step: u8) -> &'static str {
    if step.is_multiple_of(20) {
        "vhdx"
    } else {
        "vhd"
    }
}

/// Starts the daemon held at `percent` of every disk job, submits `op` with
/// `body`, waits until the job is held there, and SIGKILLs the daemon; then
/// starts it again without the seam. Returns the job's id.
fn kill_at(d: &mut Daemon, percent: u8, op: &str, body: &Value) -> String {
    d.env = vec![(STALL.into(), percent.to_string())];
    d.launch();
    let r = d.post(&format!("/v1/disks/{op}"), body.clone());
    assert_eq!(r.status, 202, "{op} at {percent} %: {}", r.raw);
    let id = r.body["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("the disk job stalled for a crash test") {
        let job = d.get(&format!("/v1/jobs/{id}")).body;
        assert!(
            (job["state"] == "New" || job["state"] == "Running") && Instant::now() < deadline,
            "{op} never stalled at {percent} %: {job}\nlog:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let job = d.get(&format!("/v1/jobs/{id}")).body;
    assert_eq!(job["state"], "Running", "{job}");
    let shown = job["percent_complete"].as_u64().unwrap();
    assert!(
        shown >= u64::from(percent.min(99)),
        "{op} held at {shown} %, not at {percent} %"
    );
    d.kill();
    d.env.clear();
    d.launch();
    id
}

/// The job is listed, in full and in the listing, as Killed with the reason.
fn assert_killed(d: &Daemon, id: &str, op: &str) {
    let job = d.get(&format!("/v1/jobs/{id}"));
    assert_eq!(job.status, 200, "{}", job.raw);
    assert_eq!(job.body["state"], "Killed", "{}", job.raw);
    assert_eq!(job.body["error_description"], REASON, "{}", job.raw);
    assert_eq!(job.body["type"], format!("disk-{op}"), "{}", job.raw);
    let list = d.get("/v1/jobs").body;
    let listed = list["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs in {list}"))
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("job {id} not listed: {list}"))
        .clone();
    assert_eq!(listed["state"], "Killed");
}

/// No hidden temporary file in the disks folder, and no running-job record.
fn assert_no_leftovers(d: &Daemon) {
    let hidden: Vec<_> = std::fs::read_dir(disks_dir(d))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "leftovers: {hidden:?}");
    let records = std::fs::read_dir(d.data.join("jobs/running"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(records, 0, "running-job records left");
}

fn run(d: &Daemon, op: &str, body: &Value) -> Value {
    let r = d.post(&format!("/v1/disks/{op}"), body.clone());
    assert_eq!(r.status, 202, "{op}: {}", r.raw);
    let job = finish(d, r.body["id"].as_str().unwrap());
    assert_eq!(job["state"], "Completed", "{op}: {job}\nlog:\n{}", d.log());
    job
}

/// Our check and (for VHDX; it cannot check VHD) `qemu-img check` find nothing wrong.
fn assert_checks_clean(path: &Path) {
    let report = vhd::ops::check::check(path, false).unwrap();
    assert!(report.clean(), "{}: {}", path.display(), report.summary());
    let (format, verb) = if vhd::is_vhdx_name(path) {
        ("vhdx", "check")
    } else {
        ("vpc", "info")
    };
    let q = std::process::Command::new("qemu-img")
        .args([verb, "-f", format])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        q.status.success(),
        "qemu-img {verb} {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&q.stderr)
    );
}

/// A digest of the first `len` bytes the disk reads.
fn hash_prefix(path: &Path, len: u64) -> u64 {
    use std::hash::Hasher;
    let d = vhd::open(path, true).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        d.read_at(&mut buf[..n], off).unwrap();
        h.write(&buf[..n]);
        off += n as u64;
    }
    h.finish()
}

fn size_of(path: &Path) -> u64 {
    vhd::open(path, true).unwrap().size()
}

/// A dynamic disk of `SIZE` in 2 MiB blocks, noise in the first `noise` bytes.
fn disk_with_noise(path: &Path, seed: u64, noise: u64) {
    make_base_of(path, SIZE);
    write_noise(path, seed, 0, noise);
}

fn start() -> Daemon {
    let d = Daemon::start(&[]);
    std::fs::create_dir_all(d.data.join("Virtual Hard Disks")).unwrap();
    d
}

#[test]
fn a_convert_killed_at_every_10_percent_leaves_no_file_under_its_name_and_a_retry_succeeds() {
    let mut d = start();
    let src = disks_dir(&d).join("source.vhd");
    disk_with_noise(&src, 7, SIZE);
    let want = content_hash(&src);
    for percent in (10..=90u8).step_by(10) {
        let name = format!("converted.{}", ext(percent));
        let dst = disks_dir(&d).join(&name);
        let body = json!({"path": "source.vhd", "destination": name});
        d.stop();
        let id = kill_at(&mut d, percent, "convert", &body);
        assert!(
            !dst.exists(),
            "{} exists after a kill at {percent} %",
            dst.display()
        );
        assert_killed(&d, &id, "convert");
        assert_no_leftovers(&d);
        run(&d, "convert", &body);
        assert_eq!(
            content_hash(&dst),
            want,
            "the retry at {percent} % copied the data"
        );
        assert_checks_clean(&dst);
        std::fs::remove_file(&dst).unwrap();
    }
}

#[test]
fn a_compact_killed_at_every_10_percent_leaves_the_disk_as_it_was_and_a_retry_succeeds() {
    let mut d = start();
    for percent in (10..=90u8).step_by(10) {
        let name = format!("sparse-{percent}.{}", ext(percent));
        let disk = disks_dir(&d).join(&name);
        // Data in the first half; zeros written (allocated) in the second.
        disk_with_noise(&disk, u64::from(percent), SIZE / 2);
        {
            let v = vhd::open(&disk, false).unwrap();
            v.write_at(&vec![0u8; (SIZE / 2) as usize], SIZE / 2)
                .unwrap();
            v.flush().unwrap();
        }
        let (want, bytes) = (content_hash(&disk), std::fs::read(&disk).unwrap());
        let body = json!({"path": name});
        d.stop();
        let id = kill_at(&mut d, percent, "compact", &body);
        assert_eq!(
            std::fs::read(&disk).unwrap(),
            bytes,
            "the disk changed after a kill at {percent} %"
        );
        assert_checks_clean(&disk);
        assert_killed(&d, &id, "compact");
        assert_no_leftovers(&d);
        run(&d, "compact", &body);
        assert_eq!(content_hash(&disk), want);
        assert_eq!(size_of(&disk), SIZE);
        assert!(
            std::fs::metadata(&disk).unwrap().len() < bytes.len() as u64,
            "the retry at {percent} % compacted the disk"
        );
        assert_checks_clean(&disk);
    }
}

#[test]
fn a_resize_killed_at_every_10_percent_leaves_the_old_disk_and_a_retry_grows_it() {
    let mut d = start();
    for percent in (10..=90u8).step_by(10) {
        let name = format!("grow-{percent}.{}", ext(percent));
        let disk = disks_dir(&d).join(&name);
        disk_with_noise(&disk, u64::from(percent), SIZE);
        let (want, bytes) = (content_hash(&disk), std::fs::read(&disk).unwrap());
        let body = json!({"path": name, "size_bytes": 2 * SIZE});
        d.stop();
        let id = kill_at(&mut d, percent, "resize", &body);
        assert_eq!(
            std::fs::read(&disk).unwrap(),
            bytes,
            "the disk changed after a kill at {percent} %"
        );
        assert_eq!(size_of(&disk), SIZE);
        assert_eq!(content_hash(&disk), want);
        assert_checks_clean(&disk);
        assert_killed(&d, &id, "resize");
        assert_no_leftovers(&d);
        run(&d, "resize", &body);
        assert!(
            size_of(&disk) >= 2 * SIZE,
            "the retry at {percent} % grew it"
        );
        assert_eq!(hash_prefix(&disk, SIZE), hash_prefix_of_old(&bytes, &name));
        assert_checks_clean(&disk);
    }
}

/// What the first `SIZE` bytes of the disk read before it grew (from its saved bytes).
fn hash_prefix_of_old(bytes: &[u8], name: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    hash_prefix(&p, SIZE)
}

#[test]
fn a_create_killed_at_every_10_percent_leaves_no_file_under_its_name_and_a_retry_succeeds() {
    let mut d = start();
    for percent in (10..=90u8).step_by(10) {
        let kind = if percent.is_multiple_of(30) {
            "fixed"
        } else {
            "dynamic"
        };
        let name = format!("new-{percent}.{}", ext(percent));
        let disk = disks_dir(&d).join(&name);
        let body = json!({"path": name, "kind": kind, "size_bytes": SIZE});
        d.stop();
        let id = kill_at(&mut d, percent, "create", &body);
        assert!(
            !disk.exists(),
            "{} exists after a kill at {percent} %",
            disk.display()
        );
        assert_killed(&d, &id, "create");
        assert_no_leftovers(&d);
        run(&d, "create", &body);
        assert!(size_of(&disk) >= SIZE);
        assert_eq!(hash_prefix(&disk, SIZE), hash_prefix_of_zeros());
        assert_checks_clean(&disk);
    }
}

fn hash_prefix_of_zeros() -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..SIZE >> 20 {
        h.write(&zeros);
    }
    h.finish()
}

#[test]
fn leftover_temporary_files_of_an_interrupted_create_are_removed_at_start() {
    let mut d = start();
    let folder = disks_dir(&d);
    let stale = [
        folder.join(".old.vhdx.0123abcd.creating"),
        folder.join(".old.vhd.89abcdef.partial"),
    ];
    for f in &stale {
        std::fs::write(f, b"part of a disk").unwrap();
    }
    let kept = folder.join("kept.vhd");
    make_base_of(&kept, SIZE);
    d.restart();
    assert!(stale.iter().all(|f| !f.exists()), "leftovers stay");
    assert!(kept.exists());
}

#[test]
fn a_merge_killed_mid_way_leaves_the_chain_reading_the_same_and_a_retry_merges_it() {
    let mut d = start();
    for percent in [30u8, 60, 90] {
        let e = if percent == 60 { "vhdx" } else { "vhd" };
        let base = disks_dir(&d).join(format!("base-{percent}.{e}"));
        let child = disks_dir(&d).join(format!("child-{percent}.a{e}"));
        disk_with_noise(&base, 1, SIZE);
        common::disk_data::make_child(&child, &base);
        write_noise(&child, 2, 0, SIZE);
        let want = content_hash(&child);
        let body = json!({"path": child.file_name().unwrap().to_str().unwrap()});
        d.stop();
        let id = kill_at(&mut d, percent, "merge", &body);
        assert_eq!(
            content_hash(&child),
            want,
            "the chain changed at {percent} %"
        );
        assert_checks_clean(&base);
        assert_killed(&d, &id, "merge");
        assert_no_leftovers(&d);
        run(&d, "merge", &body);
        assert!(!child.exists());
        assert_eq!(content_hash(&base), want);
        assert_checks_clean(&base);
    }
}
