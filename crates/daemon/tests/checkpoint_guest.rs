//! Checkpoints of a running guest, end to end through a real `viridiand`, real workers
//! and QEMU (TCG here): the test guest counts, printing `count N` on its console and
//! writing N to its data disk every ~0.3 s. A checkpoint of the running VM keeps its
//! memory; apply on a running VM is refused and changes nothing; applied to the
//! stopped VM, the checkpoint resumes the guest where it was (the counter continues
//! from the checkpoint's value, without a boot) and the data disk reads as then.
//! Generation 1 (IDE boot disk) and generation 2 (every disk synthetic, the
//! memory saved while the guest runs and dirties its memory), and the way
//! back to pausing the guest when background checkpoints are turned off.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::disk_data::post_job as run_job;
use common::guest::{
    config_disk, console, counts, disk_count, ensure_worker_binary, gen1_vm_with_disks, guest_dir,
    state, vm, wait_console, wait_count, wait_state, KillWorkersOnDrop,
};
use common::Daemon;
use serde_json::{json, Value};

/// Counts forever: writes `count N` (one sector, flushed) to the data disk (the only
/// virtio disk, /dev/vda), then prints it.
const COUNTER: &str = "n=0\n\
    while true; do\n\
    n=$((n+1))\n\
    echo \"count $n\" | dd of=/dev/vda bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null\n\
    echo \"count $n\"\n\
    sleep 0.3\n\
    done\n";

const DATA_SIZE: u64 = 8 << 20;

/// The first SCSI disk's file: generation 1's data disk.
fn data_disk(d: &Daemon, name: &str) -> PathBuf {
    scsi_disk(d, name, 0)
}

/// The file of the disk at SCSI 0:`location`.
fn scsi_disk(d: &Daemon, name: &str, location: u64) -> PathBuf {
    let v = vm(d, name);
    v["settings"]["drives"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["slot"]["controller"] == "scsi" || x["controller"] == "scsi")
        .find(|x| x["slot"]["location"] == location || x["location"] == location)
        .map(|x| PathBuf::from(x["media"]["path"].as_str().unwrap()))
        .expect("the VM has its data disk")
}

fn affected<'a>(job: &'a Value, kind: &str) -> Option<&'a str> {
    job["affected_elements"]
        .as_array()?
        .iter()
        .find(|a| a["kind"] == kind)
        .and_then(|a| a["id"].as_str())
}

#[test]
fn checkpoint_of_a_running_guest_resumes_its_memory_and_disks_when_applied() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let name = "counter";
    let boot = d.dir.path().join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &boot).unwrap();
    let cfg = config_disk(d.dir.path(), COUNTER);
    let data = d.dir.path().join("data.vhd");
    {
        use vhd::vhd1::create::{create, CreateOptions, NewDisk};
        let o = CreateOptions {
            kind: NewDisk::Dynamic {
                size: DATA_SIZE,
                block_size: 1 << 20,
            },
            exact_size: true,
        };
        create(&data, &o, &mut vhd::NoProgress).unwrap();
    }
    gen1_vm_with_disks(
        &d,
        name,
        &[
            ("ide", 0, 0, &boot),
            ("ide", 0, 1, &cfg),
            ("scsi", 0, 0, &data),
        ],
    );
    let job = run_job(&d, &format!("/v1/vms/{name}/start"), json!({}));
    assert_eq!(job["state"], "Completed", "start: {job}");
    wait_console(&d, name, "VIRIDIAN-GUEST: running command");
    let before_checkpoint = wait_count(&d, name, 5);

    // Checkpoint the running VM: it completes, names the checkpoint and the downtime,
    // and the VM runs again, on new layers, in the same worker and QEMU (taken in
    // place: paused, saved beside QEMU, switched, resumed).
    let worker_before = vm(&d, name)["runtime"]["worker_pid"].clone();
    assert!(worker_before.is_u64(), "{}", vm(&d, name));
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/checkpoints"),
        json!({"name": "counting"}),
    );
    assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());
    let cp = affected(&job, "checkpoint").expect("the job names the checkpoint");
    let downtime: u64 = affected(&job, "guest-downtime-ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no guest-downtime-ms in {job}"));
    assert!(downtime > 0, "{job}");
    // Its IDE disks (boot and config) cannot be held at a snapshot's instant:
    // the guest was paused while its memory was saved, and the job says why.
    assert_eq!(affected(&job, "checkpoint-method"), Some("pause"), "{job}");
    assert!(
        affected(&job, "checkpoint-method-reason").is_some_and(|r| r.contains("IDE")),
        "{job}"
    );
    wait_state(&d, name, "Running");
    assert_eq!(
        vm(&d, name)["runtime"]["worker_pid"],
        worker_before,
        "the checkpoint restarted the VM's worker\n{}",
        d.log()
    );
    let tree = d.get(&format!("/v1/vms/{name}/checkpoints")).body;
    assert_eq!(tree["checkpoints"][0]["id"], cp, "{tree}");
    assert_eq!(tree["checkpoints"][0]["has_memory_state"], true, "{tree}");
    let layer = data_disk(&d, name);
    assert_ne!(layer, data, "the running VM continues on a new layer");

    // It counts on, well past the checkpoint.
    let later = wait_count(&d, name, before_checkpoint + 15);

    // Apply on the running VM: InvalidState, and nothing changed.
    let tree_before = d.get(&format!("/v1/vms/{name}/checkpoints")).body;
    let settings_before = vm(&d, name)["settings"].clone();
    let r = d.post(&format!("/v1/vms/{name}/checkpoints/{cp}/apply"), json!({}));
    assert_eq!((r.status, r.code()), (409, "InvalidState"), "{}", r.raw);
    assert_eq!(state(&d, name), "Running");
    assert_eq!(
        d.get(&format!("/v1/vms/{name}/checkpoints")).body,
        tree_before
    );
    assert_eq!(vm(&d, name)["settings"], settings_before);
    assert!(
        wait_count(&d, name, later + 2) > later,
        "the guest still counts"
    );

    // Turn it off: its disk holds a count past the checkpoint's.
    let job = run_job(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    wait_state(&d, name, "Off");
    let at_stop = disk_count(&data_disk(&d, name), 0);
    assert!(at_stop >= later, "disk {at_stop}, console {later}");
    let printed_before_apply = counts(&console(&d, name));

    // Apply: the VM is Saved, and its data disk reads as at the checkpoint: the count
    // the guest had printed when the checkpoint began, or the one it was writing.
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/checkpoints/{cp}/apply"),
        json!({}),
    );
    assert_eq!(job["state"], "Completed", "apply: {job}");
    wait_state(&d, name, "Saved");
    let at_checkpoint = disk_count(&data_disk(&d, name), 0);
    assert!(
        (before_checkpoint..before_checkpoint + 15).contains(&at_checkpoint),
        "the data disk reads {at_checkpoint}; the checkpoint was taken after count {before_checkpoint} and well before {later}"
    );
    assert!(at_checkpoint < at_stop);

    // Start: the guest resumes from the checkpoint's memory. Its next count follows
    // the checkpoint's (not 1: no boot), and it boots only once in the whole log.
    let job = run_job(&d, &format!("/v1/vms/{name}/start"), json!({}));
    assert_eq!(job["state"], "Completed", "start: {job}");
    wait_state(&d, name, "Running");
    let deadline = Instant::now() + Duration::from_secs(300);
    let (text, resumed) = loop {
        let text = console(&d, name);
        let all = counts(&text);
        if all.len() > printed_before_apply.len() + 3 {
            break (text, all[printed_before_apply.len()..].to_vec());
        }
        assert!(
            Instant::now() < deadline,
            "the resumed guest does not count:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        resumed[0] == at_checkpoint || resumed[0] == at_checkpoint + 1,
        "after the apply the guest counts {resumed:?}; the checkpoint's disk holds {at_checkpoint}\n{text}"
    );
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
    assert_eq!(
        text.matches("VIRIDIAN-GUEST: booted").count(),
        1,
        "the guest booted again:\n{text}"
    );
    // Before the apply the counts only went up: the checkpoint's own save and start
    // resumed the same memory.
    assert!(
        printed_before_apply.windows(2).all(|w| w[1] > w[0]),
        "{printed_before_apply:?}"
    );

    // Its writes go on into the applied layer; the checkpoint's disk keeps its value.
    let job = run_job(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    wait_state(&d, name, "Off");
    let now = data_disk(&d, name);
    assert!(disk_count(&now, 0) >= *resumed.last().unwrap());
    // The checkpoint froze the data disk the VM had then: the base file.
    assert_eq!(disk_count(&data, 0), at_checkpoint);
    d.stop();
}

/// Generation 2's counter: finds its data disk by serial (every disk is
/// synthetic: vd*), dirties 48 MiB of memory as fast as it can in the
/// background, and counts like [`COUNTER`].
const BUSY_COUNTER: &str = "data=\n\
    for b in /sys/block/vd*; do\n\
    [ \"$(cat $b/serial 2>/dev/null)\" = scsi0-2 ] && data=/dev/${b##*/}\n\
    done\n\
    [ -n \"$data\" ] || { echo 'no data disk'; exit 1; }\n\
    (while true; do dd if=/dev/zero of=/tmp/dirt bs=1M count=48 conv=notrunc 2>/dev/null; done) &\n\
    n=0\n\
    while true; do\n\
    n=$((n+1))\n\
    echo \"count $n\" | dd of=$data bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null\n\
    echo \"count $n\"\n\
    sleep 0.3\n\
    done\n";

fn ms(job: &Value, kind: &str) -> u64 {
    affected(job, kind)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {kind} in {job}"))
}

#[test]
fn background_checkpoint_of_a_busy_generation2_guest_resumes_exactly_there_and_off_pauses_it() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let name = "busy";
    let boot = d.dir.path().join("boot.vhd");
    std::fs::copy(guest.join("boot.vhd"), &boot).unwrap();
    let cfg = config_disk(d.dir.path(), BUSY_COUNTER);
    let data = d.dir.path().join("data.vhd");
    {
        use vhd::vhd1::create::{create, CreateOptions, NewDisk};
        let o = CreateOptions {
            kind: NewDisk::Dynamic {
                size: DATA_SIZE,
                block_size: 1 << 20,
            },
            exact_size: true,
        };
        create(&data, &o, &mut vhd::NoProgress).unwrap();
    }
    let r = d.post(
        "/v1/vms",
        json!({"name": name, "generation": 2, "processor_count": 1, "memory_mib": 256}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    for (location, path) in [(0, &boot), (1, &cfg), (2, &data)] {
        let r = d.post(
            &format!("/v1/vms/{name}/drives"),
            json!({"controller": "scsi", "controller_number": 0, "location": location,
                   "media": {"type": "hard_disk", "path": path.display().to_string()}}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    let job = run_job(&d, &format!("/v1/vms/{name}/start"), json!({}));
    assert_eq!(job["state"], "Completed", "start: {job}");
    wait_console(&d, name, "VIRIDIAN-GUEST: running command");
    let before_checkpoint = wait_count(&d, name, 5);

    // The memory is saved while the guest runs: it stopped only for the
    // switch-over, far shorter than a pause for the whole save (about a
    // second for this guest under TCG), and the job says how it went.
    let worker_before = vm(&d, name)["runtime"]["worker_pid"].clone();
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/checkpoints"),
        json!({"name": "busy"}),
    );
    assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());
    let cp = affected(&job, "checkpoint")
        .expect("the job names the checkpoint")
        .to_string();
    assert_eq!(
        affected(&job, "checkpoint-method"),
        Some("background"),
        "{job}\n{}",
        d.log()
    );
    assert_eq!(affected(&job, "checkpoint-method-reason"), None, "{job}");
    let downtime = ms(&job, "guest-downtime-ms");
    assert!(downtime < 500, "the guest stopped for {downtime} ms: {job}");
    assert!(ms(&job, "saved-bytes") > 1 << 20, "{job}");
    let background = ms(&job, "background-save-ms");
    let held = ms(&job, "disk-io-held-ms");
    assert!(held >= background, "{job}");
    wait_state(&d, name, "Running");
    assert_eq!(vm(&d, name)["runtime"]["worker_pid"], worker_before);
    let tree = d.get(&format!("/v1/vms/{name}/checkpoints")).body;
    assert_eq!(tree["checkpoints"][0]["has_memory_state"], true, "{tree}");
    assert_ne!(
        scsi_disk(&d, name, 2),
        data,
        "the VM continues on a new layer"
    );
    let later = wait_count(&d, name, before_checkpoint + 15);

    // Turned off, checkpoints of running VMs pause the guest again, and say why.
    d.stop();
    d.extra
        .extend(["--background-checkpoints".to_string(), "off".to_string()]);
    d.launch();
    wait_state(&d, name, "Running");
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/checkpoints"),
        json!({"name": "paused"}),
    );
    assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());
    assert_eq!(affected(&job, "checkpoint-method"), Some("pause"), "{job}");
    assert!(
        affected(&job, "checkpoint-method-reason")
            .is_some_and(|r| r.contains("--background-checkpoints off")),
        "{job}"
    );
    assert!(ms(&job, "guest-downtime-ms") > 0, "{job}");
    let later = wait_count(&d, name, later + 3);

    let job = run_job(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    wait_state(&d, name, "Off");
    let at_stop = disk_count(&scsi_disk(&d, name, 2), 0);
    assert!(at_stop >= later, "disk {at_stop}, console {later}");
    let printed_before_apply = counts(&console(&d, name));

    // Applied: memory and disk are of one instant. The guest's next count is
    // the one on the disk or the one it was writing then, never an older or a
    // later one, and it does not boot again.
    let job = run_job(
        &d,
        &format!("/v1/vms/{name}/checkpoints/{cp}/apply"),
        json!({}),
    );
    assert_eq!(job["state"], "Completed", "apply: {job}");
    wait_state(&d, name, "Saved");
    let at_checkpoint = disk_count(&scsi_disk(&d, name, 2), 0);
    assert!(
        (before_checkpoint..before_checkpoint + 15).contains(&at_checkpoint),
        "the data disk reads {at_checkpoint}; the checkpoint was taken after count {before_checkpoint}"
    );
    let job = run_job(&d, &format!("/v1/vms/{name}/start"), json!({}));
    assert_eq!(job["state"], "Completed", "start: {job}");
    wait_state(&d, name, "Running");
    let deadline = Instant::now() + Duration::from_secs(300);
    let (text, resumed) = loop {
        let text = console(&d, name);
        let all = counts(&text);
        if all.len() > printed_before_apply.len() + 3 {
            break (text, all[printed_before_apply.len()..].to_vec());
        }
        assert!(
            Instant::now() < deadline,
            "the resumed guest does not count:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        resumed[0] == at_checkpoint || resumed[0] == at_checkpoint + 1,
        "after the apply the guest counts {resumed:?}; the checkpoint's disk holds {at_checkpoint}\n{text}"
    );
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
    assert_eq!(
        text.matches("VIRIDIAN-GUEST: booted").count(),
        1,
        "the guest booted again:\n{text}"
    );
    let job = run_job(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    assert_eq!(job["state"], "Completed", "stop: {job}");
    wait_state(&d, name, "Off");
    assert_eq!(disk_count(&data, 0), at_checkpoint);
    d.stop();
}
