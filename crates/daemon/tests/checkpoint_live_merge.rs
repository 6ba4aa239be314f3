//! Deleting checkpoints of a running VM merges their disks live, end to end
//! through a real `viridiand`, workers and QEMU (TCG here): the guest keeps
//! running and writing while its chain gets shorter, without a reboot or a
//! save. The guest counts, writing `count N` into sector 8 + N and then into
//! sector 0 of its data disk (a VHDX) every ~0.3 s, each write flushed, and 8 MiB of random data
//! once at count 12; afterwards every one of its writes must be on the disk.
//!
//! Also killed mid-merge: the daemon (the worker finishes the disk it was
//! merging alone; the restarted daemon finds the worker's marker and only
//! records that one, then merges the other disks) and
//! the worker (the VM is lost as with any crash; the merge completes offline
//! and the disk holds every write the guest made before the kill).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::disk_data::{
    chain, checkpoint, checkpoint_names, disks, finish, make_base_of, run_job,
};
use common::guest::{
    config_disk, console, counts, disk_count, ensure_worker_binary, gen1_vm_with_disks, guest_dir,
    state, vm, wait_console, wait_count, wait_state, KillWorkersOnDrop,
};
use common::{wait_job, Daemon};
use serde_json::{json, Value};

const COUNTER: &str = "n=0\n\
    while true; do\n\
    n=$((n+1))\n\
    echo \"count $n\" | dd of=/dev/vda bs=512 seek=$((n+8)) count=1 conv=notrunc,sync,fsync 2>/dev/null\n\
    echo \"count $n\" | dd of=/dev/vda bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null\n\
    if [ $n -eq 12 ]; then dd if=/dev/urandom of=/dev/vda bs=1M seek=4 count=8 conv=fsync 2>/dev/null; fi\n\
    echo \"count $n\"\n\
    sleep 0.3\n\
    done\n";

const DATA_SIZE: u64 = 64 << 20;

struct Vm {
    name: &'static str,
    data: PathBuf,
    boot: PathBuf,
}

/// A VM with the test guest's boot disk (IDE), its script and a 64 MiB VHDX
/// data disk (synthetic), started and counting.
fn counting_vm(d: &Daemon) -> Vm {
    let guest = guest_dir();
    let name = "live";
    let boot = d.dir.path().join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &boot).unwrap();
    let cfg = config_disk(d.dir.path(), COUNTER);
    let data = d.dir.path().join("data.vhdx");
    make_base_of(&data, DATA_SIZE);
    gen1_vm_with_disks(
        d,
        name,
        &[
            ("ide", 0, 0, &boot),
            ("ide", 0, 1, &cfg),
            ("scsi", 0, 0, &data),
        ],
    );
    let job = run_job(d, "POST", &format!("/v1/vms/{name}/start"), Some(json!({})));
    assert_eq!(job["state"], "Completed", "start: {job}");
    wait_console(d, name, "VIRIDIAN-GUEST: running command");
    Vm { name, data, boot }
}

/// [`counting_vm`], checkpoint A taken after count 3, and counting on past
/// 15 (the 8 MiB written at count 12 land in A's child layer); returns the VM
/// and the count reached.
fn counting_with_checkpoint_a(d: &Daemon) -> (Vm, u64) {
    let v = counting_vm(d);
    wait_count(d, v.name, 3);
    checkpoint(d, v.name, "A");
    let c = wait_count(d, v.name, 15);
    (v, c)
}

fn data_disk(d: &Daemon, name: &str) -> PathBuf {
    disks(d, name)
        .into_iter()
        .find(|p| vhd::is_vhdx_name(p))
        .expect("the VM has its VHDX data disk")
}

fn canon(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths.iter().map(|p| p.canonicalize().unwrap()).collect()
}

fn tree(d: &Daemon, name: &str) -> Value {
    d.get(&format!("/v1/vms/{name}/checkpoints")).body
}

/// Every count the guest wrote, up to the one in sector 0, is in its sector
/// (8 + N) of the data disk at `path`; returns the last count.
fn assert_every_count_on_disk(path: &Path) -> u64 {
    let last = disk_count(path, 0);
    assert!(last > 0);
    for n in 1..=last {
        assert_eq!(
            disk_count(path, 8 + n),
            n,
            "sector {} of {} does not hold count {n}",
            8 + n,
            path.display()
        );
    }
    last
}

/// The VHDX data disk, read by QEMU (it is no differencing disk any more),
/// holds `count last` in sector 0.
fn qemu_reads_count(path: &Path, last: u64) {
    let raw = path.with_extension("raw");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img convert {}", path.display());
    let bytes = std::fs::read(&raw).unwrap();
    let text = String::from_utf8_lossy(&bytes[..512]);
    assert_eq!(
        text.trim_end_matches('\0').trim(),
        format!("count {last}"),
        "QEMU reads sector 0 of {}",
        path.display()
    );
    let _ = std::fs::remove_file(raw);
}

#[test]
fn deleting_checkpoints_of_a_running_guest_merges_their_disks_live() {
    ensure_worker_binary();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let (v, c) = counting_with_checkpoint_a(&d);
    let name = v.name;
    let b = checkpoint(&d, name, "B");
    wait_count(&d, name, c + 3);
    let leaf = data_disk(&d, name);
    let layers = chain(&leaf);
    assert_eq!(layers.len(), 3, "{layers:?}");
    let a_layer = layers[1].clone();

    // Delete A (one descendant, B; the running leaf sits on B's layer): A's
    // layer is merged into the base under the running leaf.
    let before = wait_count(&d, name, 0);
    let job = run_job(&d, "DELETE", &format!("/v1/vms/{name}/checkpoints/A"), None);
    assert_eq!(state(&d, name), "Running", "{job}");
    let t = tree(&d, name);
    assert_eq!(t["pending_merges"], json!([]), "{t}");
    let names = checkpoint_names(&t);
    assert_eq!(names, ["B"], "{t}");
    assert_eq!(t["current_parent"], b.as_str());
    assert_eq!(data_disk(&d, name), leaf, "the VM stays on its leaf");
    assert_eq!(
        canon(&chain(&leaf)),
        canon(&[leaf.clone(), v.data.clone()]),
        "the running leaf sits on the base now"
    );
    assert!(!a_layer.exists(), "A's layer {} is gone", a_layer.display());
    assert!(
        d.log().contains("checkpoint layer merged live"),
        "{}",
        d.log()
    );
    let mid = wait_count(&d, name, before + 3);
    assert!(mid > before, "the guest counts on");

    // Delete B (its descendant is the current state): the running leaf itself
    // is merged into the base, and the VM runs on its original disks again.
    let job = run_job(&d, "DELETE", &format!("/v1/vms/{name}/checkpoints/B"), None);
    assert_eq!(state(&d, name), "Running", "{job}");
    let t = tree(&d, name);
    assert_eq!(t["checkpoints"], json!([]), "{t}");
    assert_eq!(t["pending_merges"], json!([]), "{t}");
    assert_eq!(data_disk(&d, name), v.data, "back on the base VHDX");
    assert!(disks(&d, name).contains(&v.boot), "back on the boot VHD");
    assert!(!leaf.exists(), "the merged leaf {} is gone", leaf.display());
    let end = wait_count(&d, name, mid + 3);

    // Turn it off: every write the guest made is on the base, which QEMU reads too.
    let job = run_job(&d, "POST", &format!("/v1/vms/{name}/stop"), Some(json!({})));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    wait_state(&d, name, "Off");
    let last = assert_every_count_on_disk(&v.data);
    assert!(
        last >= end,
        "the disk holds count {last}, the console showed {end}"
    );
    qemu_reads_count(&v.data, last);
    let text = console(&d, name);
    assert_eq!(
        text.matches("VIRIDIAN-GUEST: booted").count(),
        1,
        "the guest booted again:\n{text}"
    );
    let printed = counts(&text);
    assert!(
        printed.windows(2).all(|w| w[1] == w[0] + 1),
        "the guest's counts skip or repeat: {printed:?}"
    );
    d.stop();
}

/// Waits until a job of `kind` exists; returns its id.
fn job_of_type(d: &Daemon, kind: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let jobs = d.get("/v1/jobs").body;
        if let Some(id) = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["type"] == kind)
            .and_then(|j| j["id"].as_str())
        {
            return id.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} job: {jobs}\nlog:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_live_merge_the_daemon_was_killed_in_is_recorded_after_its_restart() {
    ensure_worker_binary();
    // The daemon stalls once the merge reports progress; the worker goes on.
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let (v, c) = counting_with_checkpoint_a(&d);
    let name = v.name;
    let leaf = data_disk(&d, name);
    d.env = vec![("VIRIDIAN_TEST_STALL_MERGE_AT".into(), "copy-1".into())];
    d.restart();
    wait_state(&d, name, "Running");
    let r = d.req("DELETE", &format!("/v1/vms/{name}/checkpoints/A"), None);
    assert_eq!(r.status, 202, "{}", r.raw);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !d.log().contains("merge stalled for a crash test") {
        assert!(Instant::now() < deadline, "no stall; log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    d.kill();

    // The worker finishes the disk it was merging alone and leaves its marker
    // (the daemon asks for one disk at a time: the others wait for it).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !walk(&d.data)
        .iter()
        .any(|p| p.to_string_lossy().contains("merged-live"))
    {
        assert!(
            Instant::now() < deadline,
            "the worker left no marker; files: {:?}",
            walk(&d.data)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    d.env.clear();
    d.launch();
    let job = finish(&d, &job_of_type(&d, "MergeCheckpoint"));
    assert_eq!(job["state"], "Completed", "{job}\nlog:\n{}", d.log());
    assert_eq!(state(&d, name), "Running");
    let t = tree(&d, name);
    assert_eq!(t["checkpoints"], json!([]), "{t}");
    assert_eq!(t["pending_merges"], json!([]), "{t}");
    assert_eq!(data_disk(&d, name), v.data);
    assert!(!leaf.exists(), "the merged leaf {} is gone", leaf.display());
    let markers: Vec<_> = walk(&d.data)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("merged-live"))
        .collect();
    assert!(markers.is_empty(), "markers left: {markers:?}");
    let end = wait_count(&d, name, c + 10);

    let job = run_job(&d, "POST", &format!("/v1/vms/{name}/stop"), Some(json!({})));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    wait_state(&d, name, "Off");
    let last = assert_every_count_on_disk(&v.data);
    assert!(last >= end);
    qemu_reads_count(&v.data, last);
    d.stop();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_worker_killed_mid_live_merge_leaves_a_merge_that_completes_offline() {
    ensure_worker_binary();
    // Workers inherit the daemon's environment: this one's merge stops half way.
    let mut d = Daemon::start(&[]);
    d.env = vec![("VIRIDIAN_TEST_STALL_LIVE_MERGE_AT".into(), "50".into())];
    d.restart();
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let (v, _) = counting_with_checkpoint_a(&d);
    let name = v.name;
    let leaf = data_disk(&d, name);
    let worker_pid = vm(&d, name)["runtime"]["worker_pid"]
        .as_u64()
        .expect("the runtime names its worker");
    let r = d.req("DELETE", &format!("/v1/vms/{name}/checkpoints/A"), None);
    assert_eq!(r.status, 202, "{}", r.raw);
    let id = r.body["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let job = wait_job(&d, &id);
        if job["percent_complete"].as_u64().unwrap_or(0) >= 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the merge never got half way: {job}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on the worker this test's daemon started.
    unsafe { libc::kill(worker_pid as i32, libc::SIGKILL) };

    // The VM is lost as in any crash; the merge finishes offline.
    let job = finish(&d, &id);
    assert_eq!(job["state"], "Completed", "{job}\nlog:\n{}", d.log());
    wait_state(&d, name, "Critical");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !tree(&d, name)["checkpoints"].as_array().unwrap().is_empty()
        || !tree(&d, name)["pending_merges"]
            .as_array()
            .unwrap()
            .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the merge did not complete: {}\nlog:\n{}",
            tree(&d, name),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(data_disk(&d, name), v.data);
    assert!(!leaf.exists(), "the merged leaf {} is gone", leaf.display());
    let last = assert_every_count_on_disk(&v.data);
    qemu_reads_count(&v.data, last);
    let check = vhd::ops::check::check(&v.data, false).unwrap();
    assert!(check.clean(), "{:?}", check.problems);
    let printed = counts(&console(&d, name));
    assert!(
        last + 1 >= *printed.last().unwrap(),
        "the disk holds count {last}; the guest printed {printed:?}"
    );
    d.stop();
}
