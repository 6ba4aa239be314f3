//! Export and import end to end with a real guest: a VM with two data disks and a
//! branched checkpoint tree is exported while it runs, the export folder is moved,
//! imported by copy on a second host (same id: the guest's adapter keeps its MAC
//! and PCI address) and registered in place on the first under a new id. Both
//! imports run on from the exported moment, and every checkpoint, applied, reads
//! on both disks what the original's did.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::disk_data::{affected, checkpoint_names, post_completed as completed};
use common::guest::{
    config_disk, console, counts, disk_count, ensure_worker_binary, guest_dir, vm, wait_state,
    KillWorkersOnDrop,
};
use common::Daemon;
use serde_json::{json, Value};

/// Counts forever, writing `count N` to both data disks (the virtio disks) and
/// printing it; every tenth count also prints each network adapter's MAC and PCI
/// address as the guest sees them (a virtio adapter's device is a child of its PCI
/// function).
const COUNTER: &str = "n=0\n\
    while true; do\n\
    n=$((n+1))\n\
    for dev in /dev/vda /dev/vdb; do echo \"count $n\" | dd of=$dev bs=512 count=1 conv=notrunc,sync,fsync 2>/dev/null; done\n\
    if [ $((n % 10)) = 1 ]; then for i in /sys/class/net/eth*; do p=$(readlink -f $i/device); case $p in */virtio*) p=$(dirname $p);; esac; echo \"nic $(cat $i/address) $(basename $p)\"; done; fi\n\
    echo \"count $n\"\n\
    sleep 0.3\n\
    done\n";

const MAC: &str = "52:54:00:aa:bb:01";

/// Waits until the guest printed at least `more` counts beyond those it had
/// printed when `seen` were; returns the last.
fn wait_counts(d: &Daemon, name: &str, seen: usize, more: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let all = counts(&console(d, name));
        if all.len() >= seen + more {
            return *all.last().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the guest of {name} does not count:\n{}\n{}",
            console(d, name),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The two data disks' counts of the VM's current state.
fn data_counts(d: &Daemon, name: &str) -> (u64, u64) {
    let v = vm(d, name);
    let paths: Vec<PathBuf> = v["settings"]["drives"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["slot"]["controller"] == "scsi")
        .map(|x| PathBuf::from(x["media"]["path"].as_str().unwrap()))
        .collect();
    assert_eq!(paths.len(), 2, "{v}");
    (disk_count(&paths[0], 0), disk_count(&paths[1], 0))
}

fn checkpoint(d: &Daemon, name: &str, cp: &str) {
    completed(
        d,
        &format!("/v1/vms/{name}/checkpoints"),
        json!({"name": cp}),
    );
    wait_state(d, name, "Running");
}

/// Applies every checkpoint in turn and returns what the data disks read.
fn counts_at_checkpoints(d: &Daemon, name: &str) -> BTreeMap<String, (u64, u64)> {
    let tree = d.get(&format!("/v1/vms/{name}/checkpoints")).body;
    let mut out = BTreeMap::new();
    for cp in tree["checkpoints"].as_array().unwrap() {
        let cp_name = cp["name"].as_str().unwrap().to_string();
        completed(
            d,
            &format!("/v1/vms/{name}/checkpoints/{cp_name}/apply"),
            json!({}),
        );
        out.insert(cp_name, data_counts(d, name));
    }
    out
}

fn make_disk(path: &Path) {
    let size = 8 << 20;
    if vhd::is_vhdx_name(path) {
        use vhd::vhdx::create::{NewVhdx, VhdxOptions};
        let o = VhdxOptions::new(NewVhdx::Dynamic { size });
        vhd::vhdx::create::create(path, &o, &mut vhd::NoProgress).unwrap();
    } else {
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
}

/// The guest's view of its adapter: (MAC, PCI address) from the last `nic` line.
fn guest_nic(text: &str) -> Option<(String, String)> {
    text.lines()
        .rev()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("nic "))
        .and_then(|l| l.split_once(' '))
        .map(|(m, p)| (m.to_string(), p.trim().to_string()))
}

#[test]
fn vm_exported_while_running_imports_by_copy_and_by_register_with_its_checkpoints_data_and_nic() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let name = "traveller";
    let disks = d.dir.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let boot = disks.join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &boot).unwrap();
    let cfg = config_disk(&disks, COUNTER);
    let data1 = disks.join("data1.vhd");
    let data2 = disks.join("data2.vhdx");
    make_disk(&data1);
    make_disk(&data2);
    let r = d.post(
        "/v1/vms",
        json!({"name": name, "generation": 1, "processor_count": 1, "memory_mib": 192}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    for (controller, location, path) in [
        ("ide", 0, &boot),
        ("ide", 1, &cfg),
        ("scsi", 0, &data1),
        ("scsi", 1, &data2),
    ] {
        let r = d.post(
            &format!("/v1/vms/{name}/drives"),
            json!({"controller": controller, "controller_number": 0, "location": location,
                   "media": {"type": "hard_disk", "path": path.display().to_string()}}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    let r = d.post(
        &format!("/v1/vms/{name}/network-adapters"),
        json!({"mac": MAC}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let slot = r.body["pci_slot"]
        .as_u64()
        .expect("the adapter has a PCI slot");
    let pci = format!("0000:00:{slot:02x}.0");

    // Run, and grow a branched tree: A -> B, A -> C -> now.
    completed(&d, &format!("/v1/vms/{name}/start"), json!({}));
    wait_counts(&d, name, 0, 3);
    let seen = counts(&console(&d, name)).len();
    checkpoint(&d, name, "A");
    wait_counts(&d, name, seen, 4);
    let seen = counts(&console(&d, name)).len();
    checkpoint(&d, name, "B");
    wait_counts(&d, name, seen, 4);
    completed(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    completed(
        &d,
        &format!("/v1/vms/{name}/checkpoints/A/apply"),
        json!({}),
    );
    completed(&d, &format!("/v1/vms/{name}/start"), json!({}));
    let seen = counts(&console(&d, name)).len();
    wait_counts(&d, name, seen, 4);
    checkpoint(&d, name, "C");
    let seen = counts(&console(&d, name)).len();
    wait_counts(&d, name, seen, 12);
    let (mac_seen, pci_seen) = guest_nic(&console(&d, name)).expect("the guest prints its adapter");
    assert_eq!((mac_seen.as_str(), pci_seen.as_str()), (MAC, pci.as_str()));

    // Export while it runs: the job completes and the VM is still running, on the
    // same three checkpoints (the temporary one is gone).
    let out = d.dir.path().join("exports");
    std::fs::create_dir_all(&out).unwrap();
    let job = completed(
        &d,
        &format!("/v1/vms/{name}/export"),
        json!({"destination": out.display().to_string()}),
    );
    let folder = PathBuf::from(
        affected(&job, "export")
            .first()
            .cloned()
            .expect("the job names the export folder"),
    );
    assert_eq!(folder, out.join(name));
    // Its state was saved as a checkpoint's is: with an IDE boot disk, paused,
    // and the job says why.
    assert_eq!(affected(&job, "checkpoint-method"), ["pause"], "{job}");
    assert!(
        affected(&job, "checkpoint-method-reason")
            .first()
            .is_some_and(|r| r.contains("IDE")),
        "{job}"
    );
    assert_eq!(vm(&d, name)["runtime"]["state"], "Running");
    let seen = counts(&console(&d, name)).len();
    wait_counts(&d, name, seen, 2);
    let tree = d.get(&format!("/v1/vms/{name}/checkpoints")).body;
    let names = checkpoint_names(&tree);
    assert_eq!(names, ["A", "B", "C"], "{tree}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(folder.join("export.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["saved"], true,
        "a running VM's export carries its memory: {manifest}"
    );

    // What the original's checkpoints hold, for comparison.
    completed(&d, &format!("/v1/vms/{name}/stop"), json!({}));
    let original_id = vm(&d, name)["id"].as_str().unwrap().to_string();
    let expected = counts_at_checkpoints(&d, name);
    for (cp, (a, b)) in &expected {
        assert_eq!(a, b, "both disks hold the same count at checkpoint {cp}");
    }
    assert!(expected["A"].0 < expected["B"].0, "{expected:?}");

    // Move the export somewhere else: it is self-contained.
    let moved = d.dir.path().join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::rename(&folder, moved.join(name)).unwrap();
    let moved_folder = moved.join(name);

    // Another host imports it by copy: same id, same adapter (MAC and PCI address).
    // The second host reads the export where it was moved, in the first's folder.
    let d2 = Daemon::start(&["--storage-root", d.dir.path().to_str().unwrap()]);
    let _cleanup2 = KillWorkersOnDrop(d2.data.clone());
    let job = completed(
        &d2,
        "/v1/vms/import",
        json!({"source": moved.display().to_string(), "mode": "copy"}),
    );
    assert_eq!(
        affected(&job, "vm").first().cloned().as_deref(),
        Some(original_id.as_str())
    );
    let imported = vm(&d2, name);
    assert_eq!(imported["id"], original_id.as_str());
    assert_eq!(imported["runtime"]["state"], "Saved", "{imported}");
    let adapter = &imported["settings"]["network_adapters"][0];
    assert_eq!(
        (adapter["mac"].as_str(), adapter["pci_slot"].as_u64()),
        (Some(MAC), Some(slot))
    );
    for drive in imported["settings"]["drives"].as_array().unwrap() {
        if drive["media"]["type"] == "hard_disk" {
            let p = drive["media"]["path"].as_str().unwrap();
            assert!(
                p.starts_with(&d2.data.display().to_string()),
                "a copy lives in the data dir: {p}"
            );
        }
    }
    // It resumes where the export caught it (no boot) and sees the same adapter.
    completed(&d2, &format!("/v1/vms/{name}/start"), json!({}));
    wait_counts(&d2, name, 0, 12);
    let text = console(&d2, name);
    assert!(
        !text.contains("VIRIDIAN-GUEST: booted"),
        "the imported VM booted instead of resuming:\n{text}"
    );
    assert_eq!(
        guest_nic(&text),
        Some((MAC.to_string(), pci.clone())),
        "{text}"
    );
    completed(&d2, &format!("/v1/vms/{name}/stop"), json!({}));
    assert_eq!(counts_at_checkpoints(&d2, name), expected);

    // The first host registers the moved folder in place, under a new id.
    let job = completed(
        &d,
        "/v1/vms/import",
        json!({"source": moved_folder.display().to_string(), "mode": "register", "new_id": true, "name": "traveller-2"}),
    );
    let new_id = affected(&job, "vm").first().cloned().unwrap();
    assert_ne!(new_id, original_id);
    let second = vm(&d, "traveller-2");
    let adapter = &second["settings"]["network_adapters"][0];
    assert_ne!(adapter["mac"], MAC, "a new id gives the adapter a new MAC");
    assert_eq!(adapter["pci_slot"].as_u64(), Some(slot));
    let current = second["settings"]["drives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["slot"]["controller"] == "scsi")
        .unwrap()["media"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        current.starts_with(&moved_folder.display().to_string()),
        "registered in place: {current}"
    );
    completed(&d, "/v1/vms/traveller-2/start", json!({}));
    wait_counts(&d, "traveller-2", 0, 3);
    completed(&d, "/v1/vms/traveller-2/stop", json!({}));
    assert_eq!(counts_at_checkpoints(&d, "traveller-2"), expected);
    drop(d2);
    d.stop();
}
