//! `POST /v1/vms/{vm}/move-storage`: every disk and checkpoint layer of a VM moves
//! into the destination (here on another file system when /dev/shm is one), the
//! chains keep reading the same at the current state and at every checkpoint, new
//! checkpoints land at the destination, refused requests change nothing, and a
//! daemon killed (SIGKILL) before the commit leaves everything at the source, after
//! it everything at the destination (`VIRIDIAN_TEST_STALL_MOVE_AT`).

mod common;

use std::path::{Path, PathBuf};

use common::disk_data::{
    affected, checkpoint, content_hash, disks, files_under, run_job, vm_with_vhd_and_vhdx,
    wait_stalled, write_noise_to_disks,
};
use common::Daemon;
use serde_json::{json, Value};

/// A destination folder, on another file system when the host has a tmpfs at /dev/shm.
fn destination(d: &Daemon, name: &str) -> (Option<tempfile::TempDir>, PathBuf) {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(t) => {
            let p = t.path().join(name);
            (Some(t), p)
        }
        Err(_) => (None, d.dir.path().join(name)),
    }
}

/// A daemon that may also use /dev/shm, where [`destination`] puts its folders.
fn daemon() -> Daemon {
    if Path::new("/dev/shm").is_dir() {
        Daemon::start(&["--storage-root", "/dev/shm"])
    } else {
        Daemon::start(&[])
    }
}

fn vm_id(d: &Daemon, vm: &str) -> String {
    d.get(&format!("/v1/vms/{vm}")).body["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What the VM's disks read: the current state's, then every checkpoint's (by name).
fn reads(d: &Daemon, vm: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = disks(d, vm)
        .iter()
        .map(|p| ("current".to_string(), content_hash(p)))
        .collect();
    let t = d.get(&format!("/v1/vms/{vm}/checkpoints")).body;
    for c in t["checkpoints"].as_array().unwrap() {
        for disk in c["disks"].as_array().unwrap() {
            let p = PathBuf::from(disk["path"].as_str().unwrap());
            out.push((c["name"].as_str().unwrap().to_string(), content_hash(&p)));
        }
    }
    out
}

/// Every disk file the VM names (drives and checkpoint disks).
fn named_files(d: &Daemon, vm: &str) -> Vec<PathBuf> {
    let mut out = disks(d, vm);
    let t = d.get(&format!("/v1/vms/{vm}/checkpoints")).body;
    for c in t["checkpoints"].as_array().unwrap() {
        for disk in c["disks"].as_array().unwrap() {
            out.push(PathBuf::from(disk["path"].as_str().unwrap()));
        }
    }
    out
}

/// A VM with a VHD and a VHDX disk and checkpoints A → B, data written between.
fn vm_with_checkpoints(d: &Daemon, vm: &str) -> Vec<PathBuf> {
    let bases = vm_with_vhd_and_vhdx(d, vm, 6 << 20);
    checkpoint(d, vm, "A");
    write_noise_to_disks(d, vm, 10, 4 << 20, 8 << 20);
    checkpoint(d, vm, "B");
    write_noise_to_disks(d, vm, 20, 16 << 20, 2 << 20);
    bases
}

fn move_to(d: &Daemon, vm: &str, dest: &Path) -> Value {
    run_job(
        d,
        "POST",
        &format!("/v1/vms/{vm}/move-storage"),
        Some(json!({ "destination": dest })),
    )
}

#[test]
fn move_storage_takes_every_disk_and_checkpoint_layer_and_the_data_reads_the_same() {
    let d = daemon();
    let bases = vm_with_checkpoints(&d, "web");
    let id = vm_id(&d, "web");
    let before = reads(&d, "web");
    let old_files = named_files(&d, "web");
    let (_keep, dest) = destination(&d, "moved");

    let job = move_to(&d, "web", &dest);
    assert_eq!(job["type"], "MoveVmStorage");
    assert_eq!(job["cancellable"], true);
    assert_eq!(affected(&job, "disk").len(), 6, "{job}");
    assert_eq!(
        reads(&d, "web"),
        before,
        "every point in time reads the same"
    );
    for f in named_files(&d, "web") {
        assert!(
            f.starts_with(&dest),
            "{} is not at the destination",
            f.display()
        );
    }
    for b in &bases {
        let moved = dest.join("Virtual Hard Disks").join(b.file_name().unwrap());
        assert!(moved.exists(), "{}", moved.display());
        assert!(!b.exists(), "the source {} is removed", b.display());
    }
    for f in old_files {
        assert!(!f.exists(), "the source {} is removed", f.display());
    }
    let vm_dir = d.data.join("vms").join(&id);
    let left: Vec<PathBuf> = files_under(&vm_dir)
        .into_iter()
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.to_string_lossy().contains("vhd"))
        })
        .collect();
    assert!(left.is_empty(), "disks left in the VM folder: {left:?}");
    assert_eq!(d.get("/v1/vms/web").body["runtime"]["state"], "Off");

    // Checkpoints keep working at the new place: a new one lands there, applying
    // one reads as it did.
    let c = checkpoint(&d, "web", "C");
    assert!(dest.join("Snapshots").join(&c).is_dir());
    assert!(disks(&d, "web").iter().all(|p| p.starts_with(&dest)));
    // A checkpoint deleted there merges and its layers go from the destination.
    let current: Vec<u64> = disks(&d, "web").iter().map(|p| content_hash(p)).collect();
    let layers_before = files_under(&dest).len();
    run_job(&d, "DELETE", "/v1/vms/web/checkpoints/C", None);
    let t = d.get("/v1/vms/web/checkpoints").body;
    assert_eq!(t["pending_merges"], json!([]), "{t}");
    let now: Vec<u64> = disks(&d, "web").iter().map(|p| content_hash(p)).collect();
    assert_eq!(now, current);
    assert_eq!(
        files_under(&dest).len(),
        layers_before - 2,
        "{:?}",
        files_under(&dest)
    );
    assert!(!dest.join("Snapshots").join(&c).exists());
    let a_reads: Vec<u64> = before
        .iter()
        .filter(|(n, _)| n == "A")
        .map(|(_, h)| *h)
        .collect();
    run_job(&d, "POST", "/v1/vms/web/checkpoints/A/apply", None);
    let now: Vec<u64> = disks(&d, "web").iter().map(|p| content_hash(p)).collect();
    assert_eq!(now, a_reads);

    // And a delete with its disks leaves nothing at the destination.
    run_job(&d, "DELETE", "/v1/vms/web?delete_disks=true", None);
    assert_eq!(files_under(&dest), Vec::<PathBuf>::new());
}

#[test]
fn refused_moves_change_nothing() {
    let d = daemon();
    vm_with_checkpoints(&d, "web");
    let id = vm_id(&d, "web");
    let full = d.dir.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("something"), b"x").unwrap();
    let file = d.dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let before = d.snapshot();
    let listing = files_under(d.dir.path());
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("nosuch", json!({"destination": "/tmp/x"}), 404, "NotFound"),
        (
            "web",
            json!({"destination": "relative/place"}),
            422,
            "InvalidParameter",
        ),
        ("web", json!({"destination": full}), 422, "InvalidParameter"),
        (
            "web",
            json!({"destination": file.join("under")}),
            422,
            "InvalidParameter",
        ),
        (
            "web",
            json!({"destination": d.data.join("vms").join(&id).join("elsewhere")}),
            422,
            "InvalidParameter",
        ),
        ("web", json!({"dest": "/tmp/x"}), 400, "MalformedRequest"),
    ];
    for (vm, body, status, code) in cases {
        let r = d.post(&format!("/v1/vms/{vm}/move-storage"), body.clone());
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.raw);
    }
    assert_eq!(d.snapshot(), before);
    assert_eq!(files_under(d.dir.path()), listing);
}

/// Moves with the daemon set to stall at `step`, kills it there, starts it again
/// and checks the VM is fully at the source (`at_destination` false) or fully at
/// the destination, reading the same, with no stray files.
fn killed_mid_move_at(step: &str, at_destination: bool) {
    let mut d = daemon();
    vm_with_checkpoints(&d, "crashy");
    let id = vm_id(&d, "crashy");
    let before = reads(&d, "crashy");
    let sources = named_files(&d, "crashy");
    let source_files = files_under(d.dir.path());
    let (_keep, dest) = destination(&d, "moved");
    d.env = vec![("VIRIDIAN_TEST_STALL_MOVE_AT".into(), step.into())];
    d.restart();
    let r = d.post(
        "/v1/vms/crashy/move-storage",
        json!({ "destination": dest }),
    );
    assert_eq!(r.status, 202, "{}", r.raw);
    wait_stalled(&d, "move stalled for a crash test", step);
    d.kill();
    d.env.clear();
    d.launch();

    assert_eq!(
        reads(&d, "crashy"),
        before,
        "killed at {step}: the data reads the same"
    );
    assert_eq!(d.get("/v1/vms/crashy").body["runtime"]["state"], "Off");
    let vm_dir = d.data.join("vms").join(&id);
    assert!(
        !vm_dir.join("move-intent.json").exists(),
        "killed at {step}"
    );
    let named = named_files(&d, "crashy");
    if at_destination {
        assert!(
            named.iter().all(|f| f.starts_with(&dest)),
            "killed at {step}: {named:?}"
        );
        assert!(
            sources.iter().all(|f| !f.exists()),
            "killed at {step}: a source is left"
        );
        assert_eq!(
            files_under(&dest).len(),
            6,
            "killed at {step}: {:?}",
            files_under(&dest)
        );
    } else {
        assert_eq!(named, sources, "killed at {step}");
        assert_eq!(
            files_under(&dest),
            Vec::<PathBuf>::new(),
            "killed at {step}: copies left"
        );
        assert!(
            !dest.exists(),
            "killed at {step}: the made destination is left"
        );
        let _ = source_files;
    }
    // Either way the VM works on: a checkpoint can be taken.
    checkpoint(&d, "crashy", "after");
}

#[test]
fn daemon_killed_half_way_through_copying_leaves_everything_at_the_source() {
    killed_mid_move_at("copy-50", false);
}

#[test]
fn daemon_killed_while_verifying_leaves_everything_at_the_source() {
    killed_mid_move_at("verify", false);
}

#[test]
fn daemon_killed_just_before_the_commit_leaves_everything_at_the_source() {
    killed_mid_move_at("commit", false);
}

#[test]
fn daemon_killed_just_after_the_commit_finishes_the_move() {
    killed_mid_move_at("committed", true);
}

#[test]
fn daemon_killed_between_the_two_settings_files_finishes_the_move() {
    killed_mid_move_at("settings", true);
}

#[test]
fn daemon_killed_before_removing_the_sources_finishes_the_move() {
    killed_mid_move_at("remove-sources", true);
}

#[test]
fn cancelling_a_move_before_the_commit_leaves_everything_at_the_source() {
    let mut d = daemon();
    vm_with_checkpoints(&d, "web");
    let before = reads(&d, "web");
    let sources = named_files(&d, "web");
    let (_keep, dest) = destination(&d, "moved");
    d.env = vec![("VIRIDIAN_TEST_STALL_MOVE_AT".into(), "copy-50".into())];
    d.restart();
    let r = d.post("/v1/vms/web/move-storage", json!({ "destination": dest }));
    assert_eq!(r.status, 202, "{}", r.raw);
    let id = r.body["id"].as_str().unwrap().to_string();
    wait_stalled(&d, "move stalled for a crash test", "copy-50");
    let c = d.req("DELETE", &format!("/v1/jobs/{id}"), None);
    assert!(c.status == 200 || c.status == 202, "{}", c.raw);
    let job = common::disk_data::finish(&d, &id);
    assert_eq!(job["state"], "Terminated", "{job}");
    assert_eq!(named_files(&d, "web"), sources);
    assert_eq!(reads(&d, "web"), before);
    assert!(
        !dest.exists(),
        "the copies and the folder the move made are gone"
    );
    assert_eq!(d.get("/v1/vms/web").body["runtime"]["state"], "Off");
}
