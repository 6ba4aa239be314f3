//! `vm move-storage` of a running VM, online, with a real guest (QEMU under TCG):
//! the guest keeps writing a counter to a synthetic (SCSI, vhost-user-blk) disk and
//! an emulated IDE disk (NBD) while its storage, with a checkpoint, moves; the
//! worker switches its disk servers to the copies, the guest never reboots and its
//! counts run on without a gap, the worker holds only the copies, the sources are
//! gone, and the disks hold the last counts. The same VM then moves offline
//! (`VIRIDIAN_TEST_MOVE_OFFLINE`, as with a worker that cannot switch) and both
//! jobs' `guest-downtime-ms` are printed.

mod common;

use std::path::{Path, PathBuf};

use common::disk_data::post_job as run_job;
use common::guest::{
    config_disk, console, counts, disk_count, ensure_worker_binary, gen1_vm_with_disks, guest_dir,
    vm, wait_console, wait_count, wait_state, KillWorkersOnDrop,
};
use common::Daemon;
use serde_json::{json, Value};

/// Marks the IDE data disk (sector 0) so the guest can find it among the IDE disks.
const IDE_MARK: &[u8] = b"#ide-data";

/// Counts forever: writes `count N` to the SCSI data disk (the only virtio disk,
/// /dev/vda, sector 0) and to the IDE data disk (the one marked, sector 1), each
/// flushed, then prints it.
const COUNTER: &str = "ide=\n\
    for dev in /dev/sd?; do\n\
    [ \"$(head -c 9 $dev)\" = \"#ide-data\" ] && ide=$dev\n\
    done\n\
    echo \"ide data disk $ide\"\n\
    n=0\n\
    while true; do\n\
    n=$((n+1))\n\
    echo \"count $n\" | dd of=/dev/vda bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null\n\
    echo \"count $n\" | dd of=$ide bs=512 seek=1 count=1 conv=notrunc,sync,fsync 2>/dev/null\n\
    echo \"count $n\"\n\
    sleep 0.2\n\
    done\n";

fn affected<'a>(job: &'a Value, kind: &str) -> Option<&'a str> {
    job["affected_elements"]
        .as_array()?
        .iter()
        .find(|a| a["kind"] == kind)
        .and_then(|a| a["id"].as_str())
}

/// The drive's current file (slot given as controller, number, location).
fn drive_path(d: &Daemon, name: &str, controller: &str, number: u64, location: u64) -> PathBuf {
    let v = vm(d, name);
    v["settings"]["drives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| {
            x["slot"]["controller"] == controller
                && x["slot"]["controller_number"] == number
                && x["slot"]["location"] == location
        })
        .map(|x| PathBuf::from(x["media"]["path"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("no {controller} {number}:{location} drive in {v}"))
}

/// Every file the process has open.
fn open_files(pid: u64) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|r| {
            r.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every file under `dir`, recursively.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn downtime(job: &Value) -> u64 {
    affected(job, "guest-downtime-ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no guest-downtime-ms in {job}"))
}

fn new_dynamic(path: &Path, size: u64) {
    use vhd::vhd1::create::{create, CreateOptions, NewDisk};
    let o = CreateOptions {
        kind: NewDisk::Dynamic {
            size,
            block_size: 1 << 20,
        },
        exact_size: true,
    };
    create(path, &o, &mut vhd::NoProgress).unwrap();
}

/// A VM counting on SCSI 0:0 and IDE 1:0, with a checkpoint taken before it
/// started; its files in the returned folder. Returns the folder and a count seen.
fn counting_vm(d: &Daemon, name: &str) -> (PathBuf, u64) {
    let guest = guest_dir();
    let src = d.dir.path().join("source");
    std::fs::create_dir_all(&src).unwrap();
    let boot = src.join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &boot).unwrap();
    let cfg = config_disk(&src, COUNTER);
    let scsi = src.join("scsi-data.vhd");
    new_dynamic(&scsi, 8 << 20);
    let ide = src.join("ide-data.vhd");
    new_dynamic(&ide, 8 << 20);
    {
        let disk = vhd::open(&ide, false).unwrap();
        disk.write_at(IDE_MARK, 0).unwrap();
        disk.flush().unwrap();
    }
    gen1_vm_with_disks(
        d,
        name,
        &[
            ("ide", 0, 0, &boot),
            ("ide", 0, 1, &cfg),
            ("ide", 1, 0, &ide),
            ("scsi", 0, 0, &scsi),
        ],
    );
    // A checkpoint: the bases are frozen layers, the VM runs on differencing leaves.
    let job = run_job(
        d,
        &format!("/v1/vms/{name}/checkpoints"),
        json!({"name": "before"}),
    );
    assert_eq!(job["state"], "Completed", "{job}");
    let job = run_job(d, &format!("/v1/vms/{name}/start"), json!({}));
    assert_eq!(job["state"], "Completed", "start: {job}");
    wait_console(d, name, "VIRIDIAN-GUEST: running command");
    let text = wait_console(d, name, "ide data disk /dev/sd");
    assert!(
        !text.contains("ide data disk \r"),
        "no IDE data disk found:\n{text}"
    );
    let before = wait_count(d, name, 5);
    (src, before)
}

#[test]
fn a_running_guest_keeps_counting_while_its_storage_moves_online() {
    ensure_worker_binary();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let name = "mover";
    let (src, before) = counting_vm(&d, name);
    let pid = vm(&d, name)["runtime"]["worker_pid"].as_u64().unwrap();
    let is_disk = |p: &PathBuf| {
        p.extension()
            .is_some_and(|e| e == "avhd" || e == "avhdx" || e == "vhd" || e == "vhdx")
    };
    let source_files = files_in(&src)
        .into_iter()
        .chain(files_in(&d.data.join("vms")))
        .filter(is_disk)
        .collect::<Vec<_>>();
    assert!(source_files.len() >= 8, "{source_files:?}");

    // Online move.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let dest = shm.path().join("online");
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/move-storage"),
        json!({ "destination": dest }),
    );
    assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());
    assert_eq!(affected(&job, "move-mode"), Some("online"), "{job}");
    let online_ms = downtime(&job);
    assert_eq!(vm(&d, name)["runtime"]["state"], "Running");
    assert_eq!(
        vm(&d, name)["runtime"]["worker_pid"].as_u64(),
        Some(pid),
        "the same worker runs on"
    );
    for f in &source_files {
        assert!(!f.exists(), "{} was not removed", f.display());
    }
    let moved = files_in(&dest);
    assert!(moved.len() >= 8, "{moved:?}");
    // The worker has the copies open, and no source.
    let open = open_files(pid);
    for slot in [("ide", 0, 0), ("ide", 0, 1), ("ide", 1, 0), ("scsi", 0, 0)] {
        let leaf = drive_path(&d, name, slot.0, slot.1, slot.2);
        assert!(leaf.starts_with(&dest), "{slot:?} names {}", leaf.display());
        assert!(
            open.contains(&leaf),
            "the worker does not have {} open: {open:?}",
            leaf.display()
        );
    }
    for f in &open {
        assert!(
            !f.starts_with(&src),
            "the worker still has {} open",
            f.display()
        );
        let text = f.to_string_lossy();
        assert!(
            !(text.contains("(deleted)") && text.contains("vhd")),
            "the worker holds a removed file: {}",
            f.display()
        );
    }
    // It counts on, without a gap and without a boot.
    let after = wait_count(&d, name, before + 10);
    let text = console(&d, name);
    let all = counts(&text);
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
    assert_eq!(text.matches("VIRIDIAN-GUEST: booted").count(), 1, "{text}");

    // Offline, for comparison (the worker is told nothing: save, move, start).
    d.env = vec![("VIRIDIAN_TEST_MOVE_OFFLINE".into(), "1".into())];
    d.restart();
    wait_state(&d, name, "Running");
    let dest2 = shm.path().join("offline");
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/move-storage"),
        json!({ "destination": dest2 }),
    );
    assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());
    assert!(
        affected(&job, "move-mode").is_some_and(|m| m.starts_with("offline")),
        "{job}"
    );
    let offline_ms = downtime(&job);
    wait_state(&d, name, "Running");
    let last = wait_count(&d, name, after + 5);
    eprintln!("guest-downtime-ms: online {online_ms}, offline {offline_ms}");
    assert!(
        online_ms < offline_ms,
        "online {online_ms} ms is not below offline {offline_ms} ms"
    );

    // Stopped: the disks (through the engine) hold the guest's last counts.
    let job = run_job(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    wait_state(&d, name, "Off");
    let text = console(&d, name);
    let all = counts(&text);
    let printed = *all.last().unwrap();
    assert!(printed >= last);
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
    assert_eq!(text.matches("VIRIDIAN-GUEST: booted").count(), 1, "{text}");
    let on_scsi = disk_count(&drive_path(&d, name, "scsi", 0, 0), 0);
    let on_ide = disk_count(&drive_path(&d, name, "ide", 1, 0), 1);
    for (what, n) in [("SCSI", on_scsi), ("IDE", on_ide)] {
        assert!(
            n == printed || n == printed + 1,
            "the {what} disk holds {n}; the guest last printed {printed}"
        );
    }
}

#[test]
fn daemon_killed_between_the_commit_and_the_switch_switches_the_worker_and_resumes_the_guest() {
    ensure_worker_binary();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let name = "crashy";
    let (src, before) = counting_vm(&d, name);
    let pid = vm(&d, name)["runtime"]["worker_pid"].as_u64().unwrap();
    d.env = vec![("VIRIDIAN_TEST_STALL_MOVE_AT".into(), "committed".into())];
    d.restart();
    wait_state(&d, name, "Running");
    let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let dest = shm.path().join("moved");
    let r = d.post(
        &format!("/v1/vms/{name}/move-storage"),
        json!({ "destination": dest }),
    );
    assert_eq!(r.status, 202, "{}", r.raw);
    common::disk_data::wait_stalled(&d, "move stalled for a crash test", "committed");
    // Committed, the guest paused, the worker still on the sources.
    assert_eq!(vm(&d, name)["runtime"]["state"], "Paused");
    assert!(open_files(pid).iter().any(|f| f.starts_with(&src)));
    d.kill();
    d.env.clear();
    d.launch();
    // The restarted daemon switches the worker to the copies, finishes the move and
    // resumes the guest.
    wait_state(&d, name, "Running");
    assert_eq!(vm(&d, name)["runtime"]["worker_pid"].as_u64(), Some(pid));
    let leaf = drive_path(&d, name, "scsi", 0, 0);
    assert!(leaf.starts_with(&dest), "{}", leaf.display());
    let open = open_files(pid);
    assert!(open.contains(&leaf), "{open:?}");
    assert!(!open.iter().any(|f| f.starts_with(&src)), "{open:?}");
    assert!(
        files_in(&src)
            .iter()
            .all(|p| !p.to_string_lossy().ends_with("vhd")),
        "{:?}",
        files_in(&src)
    );
    let later = wait_count(&d, name, before + 5);
    let all = counts(&console(&d, name));
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
    let job = run_job(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    let printed = *counts(&console(&d, name)).last().unwrap();
    assert!(printed >= later);
    let on_scsi = disk_count(&drive_path(&d, name, "scsi", 0, 0), 0);
    assert!(
        on_scsi == printed || on_scsi == printed + 1,
        "{on_scsi} vs {printed}"
    );
}
