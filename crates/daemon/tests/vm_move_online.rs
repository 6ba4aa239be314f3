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
    let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let mut d = Daemon::start(&["--storage-root", shm.path().to_str().unwrap()]);
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
    let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let mut d = Daemon::start(&["--storage-root", shm.path().to_str().unwrap()]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let name = "crashy";
    let (src, before) = counting_vm(&d, name);
    let pid = vm(&d, name)["runtime"]["worker_pid"].as_u64().unwrap();
    d.env = vec![("VIRIDIAN_TEST_STALL_MOVE_AT".into(), "committed".into())];
    d.restart();
    wait_state(&d, name, "Running");
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

/// Marks of the data disks (sector 0), so the guest finds each by content.
const VHD_MARK: &[u8] = b"#vhd-data";
const DIFF_MARK: &[u8] = b"#vhdx-dif";
const DYN_MARK: &[u8] = b"#vhdx-dyn";
/// MiB of each VHDX data disk; the guest writes each count into a new block.
const VHDX_MIB: u64 = 64;

/// Counts forever on three disks at once: `count N`, each write flushed, at
/// sector 1 of the VHD (IDE) and of both VHDX disks (SCSI), and on the VHDX
/// disks also at MiB (N mod 60) + 1, so blocks keep being allocated (VHDX
/// metadata changes through the log) while the storage moves.
const COUNTER3: &str = "ide=; dif=; dyn=\n\
    for dev in /dev/sd? /dev/vd?; do\n\
    case \"$(head -c 9 $dev)\" in\n\
    '#vhd-data') ide=$dev;;\n\
    '#vhdx-dif') dif=$dev;;\n\
    '#vhdx-dyn') dyn=$dev;;\n\
    esac\n\
    done\n\
    echo \"data disks vhd=$ide dif=$dif dyn=$dyn\"\n\
    n=0\n\
    while true; do\n\
    n=$((n+1))\n\
    far=$(( (n % 60) * 2048 + 2048 ))\n\
    for dev in $ide $dif $dyn; do\n\
    echo \"count $n\" | dd of=$dev bs=512 seek=1 count=1 conv=notrunc,sync,fsync 2>/dev/null\n\
    done\n\
    for dev in $dif $dyn; do\n\
    echo \"count $n\" | dd of=$dev bs=512 seek=$far count=1 conv=notrunc,sync,fsync 2>/dev/null\n\
    done\n\
    echo \"count $n\"\n\
    sleep 0.2\n\
    done\n";

fn new_marked(path: &Path, mark: &[u8]) {
    if path.extension().is_some_and(|e| e == "vhdx") {
        use vhd::vhdx::create::{create, NewVhdx, VhdxOptions};
        let mut o = VhdxOptions::new(NewVhdx::Dynamic {
            size: VHDX_MIB << 20,
        });
        o.block_size = Some(1 << 20);
        create(path, &o, &mut vhd::NoProgress).unwrap();
    } else {
        new_dynamic(path, 8 << 20);
    }
    let disk = vhd::open(path, false).unwrap();
    disk.write_at(mark, 0).unwrap();
    disk.flush().unwrap();
}

/// Every disk file (VHD, VHDX and their checkpoint layers) under `dir`.
fn disk_files_in(dir: &Path) -> Vec<PathBuf> {
    files_in(dir)
        .into_iter()
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "avhd" || e == "avhdx" || e == "vhd" || e == "vhdx")
        })
        .collect()
}

/// The count of every one of the last 60 writes to the far sectors of a VHDX
/// data disk is there: at MiB (n mod 60) + 1 each n of the last 60 (or, for
/// the one the guest wrote after it printed its last, that next n).
fn assert_far_counts(path: &Path, printed: u64) {
    let disk = vhd::open(path, true).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for n in printed.saturating_sub(59).max(1)..=printed {
        let mut buf = [0u8; 512];
        disk.read_at(&mut buf, ((n % 60) * 2048 + 2048) * 512)
            .unwrap();
        let text = String::from_utf8_lossy(&buf);
        let got: Option<u64> = text
            .trim_end_matches('\0')
            .trim()
            .strip_prefix("count ")
            .and_then(|x| x.parse().ok());
        assert!(
            got == Some(n) || got == Some(n + 60),
            "{} holds {got:?} at MiB {}, not count {n}",
            path.display(),
            n % 60 + 1
        );
    }
}

#[test]
fn a_guest_writing_to_vhdx_and_vhd_disks_moves_online_five_times_and_exports_while_running() {
    ensure_worker_binary();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let d = Daemon::start(&["--storage-root", shm.path().to_str().unwrap()]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let name = "writer";
    let src = d.dir.path().join("source");
    std::fs::create_dir_all(&src).unwrap();
    let boot = src.join("boot.vhd");
    std::fs::copy(guest_dir().join("boot-fixed.vhd"), &boot).unwrap();
    let cfg = config_disk(&src, COUNTER3);
    let vhd_disk = src.join("data.vhd");
    new_marked(&vhd_disk, VHD_MARK);
    let diff = src.join("diff.vhdx");
    new_marked(&diff, DIFF_MARK);
    gen1_vm_with_disks(
        &d,
        name,
        &[
            ("ide", 0, 0, &boot),
            ("ide", 0, 1, &cfg),
            ("ide", 1, 0, &vhd_disk),
            ("scsi", 0, 0, &diff),
        ],
    );
    // The checkpoint makes the VM run on differencing leaves of those; the disk
    // added after it stays a dynamic VHDX.
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/checkpoints"),
        json!({"name": "before"}),
    );
    assert_eq!(job["state"], "Completed", "{job}");
    let dynamic = src.join("dyn.vhdx");
    new_marked(&dynamic, DYN_MARK);
    common::disk_data::add_disk(&d, name, 1, &dynamic);
    assert!(drive_path(&d, name, "scsi", 0, 0)
        .extension()
        .is_some_and(|e| e == "avhdx"));
    let job = run_job(&d, &format!("/v1/vms/{name}/start"), json!({}));
    assert_eq!(job["state"], "Completed", "start: {job}");
    let text = wait_console(&d, name, "data disks vhd=");
    let line = text
        .lines()
        .find(|l| l.contains("data disks vhd="))
        .unwrap()
        .to_string();
    assert!(
        line.contains("vhd=/dev/sd")
            && line.contains("dif=/dev/vd")
            && line.contains("dyn=/dev/vd"),
        "the guest did not find its three data disks: {line}"
    );
    let mut seen = wait_count(&d, name, 5);
    let pid = vm(&d, name)["runtime"]["worker_pid"].as_u64().unwrap();

    let mut sources: Vec<PathBuf> = disk_files_in(&src)
        .into_iter()
        .chain(disk_files_in(&d.data.join("vms")))
        .collect();
    assert!(sources.len() >= 7, "{sources:?}");
    for round in 1..=5 {
        let dest = shm.path().join(format!("round-{round}"));
        let job = run_job(
            &d,
            &format!("/v1/vms/{name}/move-storage"),
            json!({ "destination": dest }),
        );
        assert_eq!(
            job["state"],
            "Completed",
            "move {round}: {job}\n{}",
            d.log()
        );
        assert_eq!(affected(&job, "move-mode"), Some("online"), "{job}");
        downtime(&job);
        assert_eq!(vm(&d, name)["runtime"]["state"], "Running");
        assert_eq!(vm(&d, name)["runtime"]["worker_pid"].as_u64(), Some(pid));
        for f in &sources {
            assert!(!f.exists(), "move {round}: {} was not removed", f.display());
        }
        for slot in [("ide", 1, 0), ("scsi", 0, 0), ("scsi", 0, 1)] {
            let leaf = drive_path(&d, name, slot.0, slot.1, slot.2);
            assert!(leaf.starts_with(&dest), "{slot:?} names {}", leaf.display());
        }
        sources = disk_files_in(&dest);
        // It goes on writing on the moved disks.
        seen = wait_count(&d, name, seen + 3);
    }
    let text = console(&d, name);
    let all = counts(&text);
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "a gap: {all:?}");
    assert_eq!(text.matches("VIRIDIAN-GUEST: booted").count(), 1, "{text}");

    // Exported while it writes: every exported disk checks clean (ours and,
    // where QEMU 7.2 can open it, qemu-img's), holds counts, and imports.
    let out = shm.path().join("exports");
    std::fs::create_dir_all(&out).unwrap();
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/export"),
        json!({"destination": out.display().to_string()}),
    );
    assert_eq!(job["state"], "Completed", "export: {job}\n{}", d.log());
    assert_eq!(vm(&d, name)["runtime"]["state"], "Running");
    let exported = disk_files_in(&out.join(name));
    assert!(exported.len() >= 7, "{exported:?}");
    for f in &exported {
        let report = vhd::ops::check::check(f, false).unwrap();
        assert!(
            report.problems.is_empty(),
            "{}: {}",
            f.display(),
            report.summary()
        );
    }
    let base_of_dyn = exported
        .iter()
        .find(|f| f.file_name().is_some_and(|n| n == "dyn.vhdx"))
        .unwrap_or_else(|| panic!("no dyn.vhdx in {exported:?}"));
    let qemu = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(base_of_dyn)
        .output()
        .unwrap();
    assert!(
        qemu.status.success(),
        "qemu-img check {}: {}",
        base_of_dyn.display(),
        String::from_utf8_lossy(&qemu.stdout)
    );
    let job = run_job(
        &d,
        "/v1/vms/import",
        json!({"source": out.display().to_string(), "mode": "copy", "new_id": true,
               "name": "writer-copy"}),
    );
    assert_eq!(job["state"], "Completed", "import: {job}\n{}", d.log());
    for slot in [("ide", 1, 0), ("scsi", 0, 0), ("scsi", 0, 1)] {
        let leaf = drive_path(&d, "writer-copy", slot.0, slot.1, slot.2);
        let n = disk_count(&leaf, 1);
        assert!(
            n >= seen,
            "{slot:?} of the import holds count {n}, below {seen}"
        );
    }

    // Stopped: every count is on the moved disks.
    let job = run_job(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    wait_state(&d, name, "Off");
    let text = console(&d, name);
    let all = counts(&text);
    let printed = *all.last().unwrap();
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "a gap: {all:?}");
    for slot in [("ide", 1, 0), ("scsi", 0, 0), ("scsi", 0, 1)] {
        let leaf = drive_path(&d, name, slot.0, slot.1, slot.2);
        assert!(
            leaf.starts_with(shm.path().join("round-5")),
            "{}",
            leaf.display()
        );
        let n = disk_count(&leaf, 1);
        assert!(
            n == printed || n == printed + 1,
            "{slot:?} holds {n}; the guest last printed {printed}"
        );
        if slot.0 == "scsi" {
            assert_far_counts(&leaf, printed);
        }
    }
}
