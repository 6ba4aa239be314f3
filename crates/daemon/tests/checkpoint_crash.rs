//! A real `viridiand` killed with SIGKILL in the middle of a checkpoint merge (half
//! way through copying 64 MiB per disk, after the copy before re-pointing the layer
//! above, after the tree names the merged disk but before the old layer is removed)
//! finishes the merge after it restarts on the same data dir, and the VM's disks
//! read exactly as before the delete: VHD and VHDX.
//!
//! The daemon is stopped at those points by `VIRIDIAN_TEST_STALL_MERGE_AT`, which
//! makes the merge wait forever there (see `daemon::checkpoints::StallAt`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::disk_data::{
    chain, checkpoint, checkpoint_names, content_hash, disks, make_base_of, write_noise,
};
use common::{wait_job, Daemon};
use serde_json::json;

const SIZE: u64 = 128 << 20;
/// Written into the layer that gets merged, per disk.
const ALLOCATED: u64 = 64 << 20;

/// Builds base ← A ← B ← current per disk, 64 MiB written into A's child layer (the
/// one a delete of A merges into the base), deletes A with the daemon set to stall at
/// `stall_at`, kills it there, restarts it and checks the merge finished.
fn killed_mid_merge_at(stall_at: &str) {
    let mut d = Daemon::start(&[]);
    let vm = "crashy";
    d.create_vm(vm);
    let bases = [
        d.dir.path().join("base.vhd"),
        d.dir.path().join("base.vhdx"),
    ];
    for (loc, p) in bases.iter().enumerate() {
        make_base_of(p, SIZE);
        write_noise(p, 1 + loc as u64, 0, 4 << 20);
        let r = d.post(
            &format!("/v1/vms/{vm}/drives"),
            json!({"controller": "scsi", "controller_number": 0, "location": loc,
                   "media": {"type": "hard_disk", "path": p}}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    let a = checkpoint(&d, vm, "A");
    for (i, p) in disks(&d, vm).iter().enumerate() {
        // Over the base's own data and beyond it, to the 64 MiB allocated.
        write_noise(p, 10 + i as u64, 2 << 20, ALLOCATED);
    }
    let b = checkpoint(&d, vm, "B");
    for (i, p) in disks(&d, vm).iter().enumerate() {
        write_noise(p, 20 + i as u64, 40 << 20, 1 << 20);
    }
    let current = disks(&d, vm);
    let expected: Vec<u64> = current.iter().map(|p| content_hash(p)).collect();
    let merged_layers: Vec<PathBuf> = current.iter().map(|p| chain(p)[1].clone()).collect();
    assert!(merged_layers
        .iter()
        .all(|l| l.to_string_lossy().contains(&a)));

    // Delete A (its only descendant is B): the merge runs in the delete job and
    // stalls at `stall_at`; the daemon is killed there.
    d.env = vec![("VIRIDIAN_TEST_STALL_MERGE_AT".into(), stall_at.into())];
    d.restart();
    let r = d.req("DELETE", &format!("/v1/vms/{vm}/checkpoints/A"), None);
    assert_eq!(r.status, 202, "{}", r.raw);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !d.log().contains("merge stalled for a crash test") {
        assert!(
            Instant::now() < deadline,
            "the merge never reached {stall_at}; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.kill();

    // Restart on the same data dir: the merge resumes as a MergeCheckpoint job.
    d.env.clear();
    d.launch();
    let deadline = Instant::now() + Duration::from_secs(300);
    let merge_id = loop {
        let jobs = d.get("/v1/jobs").body;
        let found = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["type"] == "MergeCheckpoint")
            .map(|j| j["id"].as_str().unwrap().to_string());
        if let Some(id) = found {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "no MergeCheckpoint job after the restart (killed at {stall_at}): {jobs}\nlog:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut merge = wait_job(&d, &merge_id);
    while !matches!(
        merge["state"].as_str(),
        Some("Completed" | "Exception" | "Terminated" | "Killed")
    ) {
        assert!(
            Instant::now() < deadline,
            "the merge did not finish: {merge}"
        );
        merge = wait_job(&d, &merge_id);
    }
    assert_eq!(merge["state"], "Completed", "killed at {stall_at}: {merge}");
    let t = d.get(&format!("/v1/vms/{vm}/checkpoints")).body;
    assert_eq!(t["pending_merges"], json!([]), "killed at {stall_at}: {t}");

    // A is gone, B stays the current state's parent, and B's disks are the bases.
    let names = checkpoint_names(&t);
    assert_eq!(names, ["B"], "killed at {stall_at}: {t}");
    assert_eq!(t["current_parent"], b.as_str());
    let now = disks(&d, vm);
    assert_eq!(now, current, "the current state keeps its layers");
    for (i, p) in now.iter().enumerate() {
        assert_eq!(
            chain(p)
                .iter()
                .map(|c| c.canonicalize().unwrap())
                .collect::<Vec<_>>(),
            [p.canonicalize().unwrap(), bases[i].canonicalize().unwrap()],
            "killed at {stall_at}: the layer above the base is gone"
        );
        assert!(!merged_layers[i].exists(), "killed at {stall_at}");
        assert_eq!(
            content_hash(p),
            expected[i],
            "killed at {stall_at}: {} reads differently after the merge",
            p.display()
        );
    }
    assert!(!d
        .data
        .join("vms")
        .join(d.get(&format!("/v1/vms/{vm}")).body["id"].as_str().unwrap())
        .join("Snapshots")
        .join(&a)
        .exists());
    d.stop();
}

#[test]
fn daemon_killed_half_way_through_copying_a_merge_finishes_it_after_restart() {
    killed_mid_merge_at("copy-50");
}

#[test]
fn daemon_killed_after_the_merge_copy_before_reparenting_finishes_it_after_restart() {
    killed_mid_merge_at("reparent");
}

#[test]
fn daemon_killed_before_removing_the_merged_layer_finishes_it_after_restart() {
    killed_mid_merge_at("remove-layer");
}
