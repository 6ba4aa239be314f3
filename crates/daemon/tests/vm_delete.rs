//! `DELETE /v1/vms/{vm}` as a job: checkpoints are merged into the kept disks (the
//! current state, as Hyper-V does), other branches and pending merges go, disks go
//! only with `delete_disks` and never one another VM's chain uses; refused requests
//! change nothing; a Damaged VM goes cleanly; and a daemon killed (SIGKILL) at any
//! step finishes the delete when it starts again (`VIRIDIAN_TEST_STALL_DELETE_AT`).

mod common;

use std::path::{Path, PathBuf};

use common::disk_data::{
    add_disk, affected, chain, checkpoint, content_hash, disks, files_under, finish, make_base,
    make_child, run_job, vm_with_vhd_and_vhdx, wait_stalled, write_noise, write_noise_to_disks,
};
use common::Daemon;
use serde_json::json;

/// A VM with a VHD and a VHDX disk, checkpoints A and B (B on its own branch after
/// A was applied), A then deleted (its merge waits: two descendants), and data
/// written at every step. Returns the bases and what the current state reads.
fn branched_vm(d: &Daemon, vm: &str) -> (Vec<PathBuf>, Vec<u64>) {
    let bases = vm_with_vhd_and_vhdx(d, vm, 4 << 20);
    checkpoint(d, vm, "A");
    write_noise_to_disks(d, vm, 10, 2 << 20, 12 << 20);
    checkpoint(d, vm, "B");
    write_noise_to_disks(d, vm, 20, 20 << 20, 2 << 20);
    run_job(
        d,
        "POST",
        &format!("/v1/vms/{vm}/checkpoints/A/apply"),
        None,
    );
    write_noise_to_disks(d, vm, 30, 6 << 20, 8 << 20);
    run_job(d, "DELETE", &format!("/v1/vms/{vm}/checkpoints/A"), None);
    let t = d.get(&format!("/v1/vms/{vm}/checkpoints")).body;
    assert_eq!(t["pending_merges"].as_array().unwrap().len(), 1, "{t}");
    let current = disks(d, vm);
    assert!(current.iter().all(|p| chain(p).len() == 2), "{current:?}");
    let want = current.iter().map(|p| content_hash(p)).collect();
    (bases, want)
}

fn vm_id(d: &Daemon, vm: &str) -> String {
    d.get(&format!("/v1/vms/{vm}")).body["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn is_layer(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "avhd" || e == "avhdx")
}

/// The VM is gone: not listed, no folder; its bases hold the current state alone.
fn assert_fully_deleted(d: &Daemon, vm: &str, id: &str, bases: &[PathBuf], want: &[u64]) {
    assert_eq!(d.get(&format!("/v1/vms/{vm}")).status, 404);
    assert_eq!(d.get("/v1/vms").body["vms"], json!([]));
    assert!(!d.data.join("vms").join(id).exists());
    for (b, w) in bases.iter().zip(want) {
        assert_eq!(
            chain(b),
            std::slice::from_ref(b),
            "{} stands alone",
            b.display()
        );
        assert_eq!(
            content_hash(b),
            *w,
            "{} holds the current state",
            b.display()
        );
        assert!(vhd::ops::check::check(b, false).unwrap().clean());
    }
    let layers: Vec<PathBuf> = files_under(d.dir.path())
        .into_iter()
        .filter(|p| is_layer(p))
        .collect();
    assert!(layers.is_empty(), "checkpoint layers left: {layers:?}");
}

#[test]
fn delete_merges_the_current_state_into_the_kept_disks_and_removes_everything_else() {
    let d = Daemon::start(&[]);
    let (bases, want) = branched_vm(&d, "web");
    let id = vm_id(&d, "web");
    let job = run_job(&d, "DELETE", "/v1/vms/web", None);
    assert_eq!(job["type"], "DeleteVm");
    assert!(affected(&job, "deleted-disk").is_empty(), "{job}");
    let kept = affected(&job, "kept-disk");
    assert_eq!(kept.len(), 2, "{job}");
    assert!(
        kept.iter().all(|k| k.contains("--delete-disks")),
        "{kept:?}"
    );
    assert_fully_deleted(&d, "web", &id, &bases, &want);
}

#[test]
fn delete_disks_removes_the_vms_own_disks_but_keeps_one_another_vm_builds_on() {
    let d = Daemon::start(&[]);
    d.create_vm("a");
    d.create_vm("b");
    let own = d.dir.path().join("own.vhdx");
    let shared = d.dir.path().join("shared.vhd");
    let child = d.dir.path().join("child.vhd");
    make_base(&own);
    make_base(&shared);
    write_noise(&shared, 5, 0, 1 << 20);
    make_child(&child, &shared);
    add_disk(&d, "a", 0, &own);
    add_disk(&d, "a", 1, &shared);
    add_disk(&d, "b", 0, &child);

    // With a checkpoint, a's current state would merge into the shared disk: refused.
    checkpoint(&d, "a", "cp");
    let before = d.snapshot();
    let r = d.req("DELETE", "/v1/vms/a?delete_disks=true", None);
    assert_eq!(r.status, 409, "{}", r.raw);
    assert_eq!(r.code(), "InUse", "{}", r.raw);
    assert!(
        r.body["message"].as_str().unwrap().contains("VM b"),
        "{}",
        r.raw
    );
    assert_eq!(d.snapshot(), before, "a refused delete changes nothing");
    run_job(&d, "DELETE", "/v1/vms/a/checkpoints/cp", None);

    let want_b = content_hash(&child);
    let job = run_job(&d, "DELETE", "/v1/vms/a?delete_disks=true", None);
    assert_eq!(
        affected(&job, "deleted-disk"),
        [own.to_string_lossy()],
        "{job}"
    );
    let kept = affected(&job, "kept-disk");
    assert_eq!(kept.len(), 1, "{job}");
    assert!(
        kept[0].starts_with(&*shared.to_string_lossy()) && kept[0].contains("VM b"),
        "{kept:?}"
    );
    assert!(!own.exists());
    assert!(shared.exists());
    assert_eq!(content_hash(&child), want_b, "VM b's disk reads as before");
    assert_eq!(d.get("/v1/vms/b").body["runtime"]["state"], "Off");
}

#[test]
fn refused_deletes_change_nothing_and_a_saved_vm_needs_force() {
    let mut d = Daemon::start(&[]);
    d.create_vm("s");
    let base = d.dir.path().join("s.vhdx");
    make_base(&base);
    add_disk(&d, "s", 0, &base);
    // A saved VM: its state file is there when the daemon starts.
    let id = vm_id(&d, "s");
    d.stop();
    std::fs::write(
        d.data.join("vms").join(&id).join("saved-state.bin"),
        b"state",
    )
    .unwrap();
    d.launch();
    assert_eq!(d.get("/v1/vms/s").body["runtime"]["state"], "Saved");

    let before = d.snapshot();
    let r = d.req("DELETE", "/v1/vms/nosuch", None);
    assert_eq!((r.status, r.code()), (404, "NotFound"), "{}", r.raw);
    let r = d.req("DELETE", "/v1/vms/s?force=perhaps", None);
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    // A value left empty is no boolean either (found by schemathesis).
    let r = d.req("DELETE", "/v1/vms/s?force=", None);
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    let r = d.req("DELETE", "/v1/vms/s", None);
    assert_eq!((r.status, r.code()), (409, "InvalidState"), "{}", r.raw);
    assert!(
        r.body["message"].as_str().unwrap().contains("--force"),
        "{}",
        r.raw
    );
    assert_eq!(d.snapshot(), before, "refused deletes change nothing");

    let job = run_job(&d, "DELETE", "/v1/vms/s?force=true&delete_disks=true", None);
    assert_eq!(
        affected(&job, "deleted-disk"),
        [base.to_string_lossy()],
        "{job}"
    );
    assert!(!d.data.join("vms").join(&id).exists());
    assert!(!base.exists());
}

#[test]
fn a_damaged_vm_is_deleted_cleanly() {
    let d = Daemon::start(&[]);
    // Disks removed by hand, with a checkpoint layer left over.
    d.create_vm("lost");
    let base = d.dir.path().join("lost.vhdx");
    make_base(&base);
    add_disk(&d, "lost", 0, &base);
    checkpoint(&d, "lost", "cp");
    let lost = vm_id(&d, "lost");
    std::fs::remove_file(&base).unwrap();
    // Settings that cannot be read.
    let garbled = d.create_vm("garbled")["id"].as_str().unwrap().to_string();
    let d = {
        let mut d = d;
        d.stop();
        std::fs::write(
            d.data.join("vms").join(&garbled).join("vm.json"),
            b"{ not json",
        )
        .unwrap();
        d.launch();
        d
    };
    for (key, id) in [("lost", &lost), (garbled.as_str(), &garbled)] {
        let r = d.get(&format!("/v1/vms/{key}"));
        assert_eq!(r.body["runtime"]["state"], "Damaged", "{}", r.raw);
        let job = run_job(
            &d,
            "DELETE",
            &format!("/v1/vms/{key}?delete_disks=true"),
            None,
        );
        assert_eq!(job["state"], "Completed");
        assert_eq!(d.get(&format!("/v1/vms/{id}")).status, 404);
        assert!(!d.data.join("vms").join(id).exists(), "{key}: folder left");
    }
    assert_eq!(d.get("/v1/vms").body["vms"], json!([]));
}

#[test]
fn a_running_vm_is_deleted_only_with_force_and_its_storage_moves_while_it_runs() {
    common::guest::ensure_worker_binary();
    let d = Daemon::start(&[]);
    let _cleanup = common::guest::KillWorkersOnDrop(d.data.clone());
    let r = d.post(
        "/v1/vms",
        json!({"name": "runner", "generation": 1, "processor_count": 1, "memory_mib": 128}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let id = r.body["id"].as_str().unwrap().to_string();
    let data = d.dir.path().join("runner-data.vhdx");
    make_base(&data);
    write_noise(&data, 7, 0, 2 << 20);
    let want = content_hash(&data);
    let r = d.post(
        "/v1/vms/runner/drives",
        json!({"controller": "ide", "controller_number": 0, "location": 0,
               "media": {"type": "hard_disk", "path": data}}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    run_job(&d, "POST", "/v1/vms/runner/start", Some(json!({})));
    common::guest::wait_state(&d, "runner", "Running");
    let r = d.req("DELETE", "/v1/vms/runner", None);
    assert_eq!((r.status, r.code()), (409, "InvalidState"), "{}", r.raw);
    assert_eq!(d.get("/v1/vms/runner").body["runtime"]["state"], "Running");

    // A running VM's storage moves online: the worker switches to the copies.
    let dest = d.dir.path().join("elsewhere");
    let job = run_job(
        &d,
        "POST",
        "/v1/vms/runner/move-storage",
        Some(json!({ "destination": dest })),
    );
    assert!(!affected(&job, "guest-downtime-ms").is_empty(), "{job}");
    assert_eq!(affected(&job, "move-mode"), ["online"], "{job}");
    let running = common::guest::wait_state(&d, "runner", "Running");
    let moved = dest.join("Virtual Hard Disks/runner-data.vhdx");
    assert_eq!(disks(&d, "runner"), std::slice::from_ref(&moved));
    assert!(!data.exists());
    let pid = running["runtime"]["worker_pid"].as_u64().unwrap();

    run_job(&d, "DELETE", "/v1/vms/runner?force=true", None);
    assert_eq!(d.get("/v1/vms/runner").status, 404);
    assert!(!d.data.join("vms").join(&id).exists());
    assert!(moved.exists(), "the disk stays without --delete-disks");
    assert_eq!(content_hash(&moved), want);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while common::guest::process_alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Deletes the branched VM with the daemon set to stall at `step`, kills it there,
/// starts it again and checks the delete finished: the VM fully gone, the bases
/// holding the current state.
fn killed_mid_delete_at(step: &str, delete_disks: bool) {
    let mut d = Daemon::start(&[]);
    let (bases, want) = branched_vm(&d, "crashy");
    let id = vm_id(&d, "crashy");
    d.env = vec![("VIRIDIAN_TEST_STALL_DELETE_AT".into(), step.into())];
    d.restart();
    let r = d.req(
        "DELETE",
        &format!("/v1/vms/crashy?delete_disks={delete_disks}"),
        None,
    );
    assert_eq!(r.status, 202, "{}", r.raw);
    wait_stalled(&d, "delete stalled for a crash test", step);
    // Meanwhile the VM is listed, as Damaged: it cannot start.
    let r = d.get(&format!("/v1/vms/{id}"));
    if r.status == 200 {
        assert_eq!(r.body["runtime"]["state"], "Damaged", "{}", r.raw);
    }
    d.kill();
    d.env.clear();
    d.launch();
    let jobs = d.get("/v1/jobs").body;
    let resumed = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["type"] == "DeleteVm")
        .unwrap_or_else(|| panic!("no DeleteVm job after the restart at {step}: {jobs}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let job = finish(&d, &resumed);
    assert_eq!(
        job["state"],
        "Completed",
        "killed at {step}: {job}\n{}",
        d.log()
    );
    if delete_disks {
        assert_eq!(d.get(&format!("/v1/vms/{id}")).status, 404);
        assert!(!d.data.join("vms").join(&id).exists());
        assert!(
            bases.iter().all(|b| !b.exists()),
            "killed at {step}: {job}\n{}",
            d.log()
        );
    } else {
        assert_fully_deleted(&d, "crashy", &id, &bases, &want);
    }
}

#[test]
fn daemon_killed_right_after_the_delete_intent_finishes_the_delete() {
    killed_mid_delete_at("intent", false);
}

#[test]
fn daemon_killed_half_way_through_merging_into_the_kept_disks_finishes_the_delete() {
    killed_mid_delete_at("copy-50", false);
}

#[test]
fn daemon_killed_after_merging_before_vm_json_names_the_kept_disks_finishes_the_delete() {
    killed_mid_delete_at("repoint", false);
}

#[test]
fn daemon_killed_before_removing_files_finishes_the_delete() {
    killed_mid_delete_at("remove", true);
}

#[test]
fn daemon_killed_before_removing_the_settings_finishes_the_delete() {
    killed_mid_delete_at("remove-settings", false);
}

#[test]
fn a_second_delete_while_one_runs_finds_nothing_left_to_do() {
    // Asking twice: the second request while the first runs waits for it and finds
    // nothing left to do, or is answered NotFound once the VM is gone.
    let d = Daemon::start(&[]);
    d.create_vm("twice");
    let r1 = d.req("DELETE", "/v1/vms/twice", None);
    assert_eq!(r1.status, 202, "{}", r1.raw);
    let r2 = d.req("DELETE", "/v1/vms/twice", None);
    assert!(r2.status == 202 || r2.status == 404, "{}", r2.raw);
    assert_eq!(
        finish(&d, r1.body["id"].as_str().unwrap())["state"],
        "Completed"
    );
    if r2.status == 202 {
        finish(&d, r2.body["id"].as_str().unwrap());
    }
    assert_eq!(d.get("/v1/vms/twice").status, 404);
}
