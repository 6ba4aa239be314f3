//! The storage roots (issue 16, defect 1): the API creates, reads, converts,
//! attaches, exports to and deletes files only inside the host's storage roots,
//! reads only files that carry a disk format's signature, removes only the disk it
//! recorded, and makes its files 0600 and folders 0700.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::disk_data::{make_base, post_completed, run_job};
use common::{Daemon, Reply};
use serde_json::json;

/// A daemon whose only roots are its data dir and `<t>/root`; `<t>/outside` is not one.
struct Host {
    _t: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    d: Daemon,
}

fn host() -> Host {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let d = Daemon::start_confined(&["--storage-root", root.to_str().unwrap()]);
    Host {
        _t: t,
        root,
        outside,
        d,
    }
}

fn forbidden(r: &Reply, naming: &Path) {
    assert_eq!((r.status, r.code()), (403, "Forbidden"), "{}", r.raw);
    let msg = r.body["message"].as_str().unwrap();
    assert!(
        msg.contains(&naming.display().to_string()),
        "the message names the roots: {msg}"
    );
    assert!(msg.contains("--storage-root"), "and how to add one: {msg}");
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_host_shows_its_storage_roots() {
    let h = host();
    let r = h.d.get("/v1/host");
    assert_eq!(r.status, 200, "{}", r.raw);
    let roots: Vec<&str> = r.body["storage_roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        roots,
        [h.d.data.to_str().unwrap(), h.root.to_str().unwrap()]
    );
}

#[test]
fn disks_are_created_only_inside_the_roots() {
    let h = host();
    let target = h.outside.join("sudoers.vhd");
    let r = h.d.post(
        "/v1/disks/create",
        json!({"path": target, "kind": "dynamic", "size_bytes": 1 << 20}),
    );
    forbidden(&r, &h.root);
    assert!(!target.exists());

    // Through a symlinked folder inside the root that leads out of it.
    symlink(&h.outside, h.root.join("escape")).unwrap();
    let r = h.d.post(
        "/v1/disks/create",
        json!({"path": h.root.join("escape/x.vhd"), "kind": "dynamic", "size_bytes": 1 << 20}),
    );
    forbidden(&r, &h.root);
    assert!(r.body["message"].as_str().unwrap().contains("symlink"));
    assert!(std::fs::read_dir(&h.outside).unwrap().next().is_none());

    // `..` stays refused, even where it would land inside a root again.
    let r = h.d.post(
        "/v1/disks/create",
        json!({"path": format!("{}/../root/y.vhd", h.root.display()), "kind": "dynamic", "size_bytes": 1 << 20}),
    );
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);

    // Inside: made, 0600, in a folder of the data dir that is 0700.
    let inside = h.root.join("ok.vhdx");
    post_completed(
        &h.d,
        "/v1/disks/create",
        json!({"path": inside, "kind": "dynamic", "size_bytes": 1 << 20}),
    );
    assert_eq!(mode(&inside), 0o600);
    post_completed(
        &h.d,
        "/v1/disks/create",
        json!({"path": "relative.vhd", "kind": "fixed", "size_bytes": 1 << 20}),
    );
    let relative = h.d.data.join("Virtual Hard Disks/relative.vhd");
    assert_eq!(mode(&relative), 0o600);
    assert_eq!(mode(&h.d.data.join("Virtual Hard Disks")), 0o700);
    assert_eq!(mode(&h.d.data), 0o700);
}

#[test]
fn convert_reads_only_disks_and_writes_only_inside_the_roots() {
    let h = host();
    // A secret in a root, named like a disk or not: never copied as if it were one.
    let secret = h.root.join("shadow");
    std::fs::write(&secret, "root:$6$secret:19000:0:99999:7:::\n".repeat(100)).unwrap();
    let r = h.d.post(
        "/v1/disks/convert",
        json!({"path": secret, "destination": h.root.join("copy.vhd")}),
    );
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    assert!(r.body["message"].as_str().unwrap().contains("signature"));
    assert!(!h.root.join("copy.vhd").exists());

    // Outside the roots it is refused before anything is read.
    let outside_secret = h.outside.join("shadow.vhd");
    std::fs::write(&outside_secret, "x").unwrap();
    let r = h.d.post(
        "/v1/disks/convert",
        json!({"path": outside_secret, "destination": h.root.join("copy2.vhd")}),
    );
    forbidden(&r, &h.root);

    // A real disk may not be converted to a place outside.
    let disk = h.root.join("disk.vhd");
    make_base(&disk);
    let out = h.outside.join("out.vhdx");
    let r = h.d.post(
        "/v1/disks/convert",
        json!({"path": disk, "destination": out}),
    );
    forbidden(&r, &h.root);
    assert!(!out.exists());

    // A raw image is read when asked for, and the copy is 0600.
    let raw = h.root.join("image.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let r = h.d.post(
        "/v1/disks/convert",
        json!({"path": raw, "destination": h.root.join("from-raw.vhd")}),
    );
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    post_completed(
        &h.d,
        "/v1/disks/convert",
        json!({"path": raw, "destination": h.root.join("from-raw.vhd"), "source_format": "raw"}),
    );
    assert_eq!(mode(&h.root.join("from-raw.vhd")), 0o600);
    let r = h.d.post(
        "/v1/disks/convert",
        json!({"path": disk, "destination": h.root.join("x.vhdx"), "source_format": "raw"}),
    );
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("VHD image, not raw"));
}

#[test]
fn a_chain_may_not_reach_a_parent_outside_the_roots() {
    let h = host();
    let base = h.outside.join("base.vhd");
    make_base(&base);
    let child = h.root.join("child.avhd");
    vhd::create_child(&child, &base).unwrap();
    for op in ["compact", "merge"] {
        let r = h.d.post(&format!("/v1/disks/{op}"), json!({"path": child}));
        assert_eq!((r.status, r.code()), (403, "Forbidden"), "{op}: {}", r.raw);
        assert!(r.body["message"].as_str().unwrap().contains("parent"));
    }
    let r = h.d.post(
        "/v1/disks/create",
        json!({"path": h.root.join("grandchild.avhd"), "kind": "differencing", "parent": base}),
    );
    forbidden(&r, &h.root);
}

#[test]
fn attaching_refuses_files_that_are_not_disks_and_symlinks_out_of_the_roots() {
    let h = host();
    h.d.create_vm("web");
    let attach = |path: &Path| {
        h.d.post(
            "/v1/vms/web/drives",
            json!({"controller": "scsi", "controller_number": 0, "location": 0,
                   "media": {"type": "hard_disk", "path": path}}),
        )
    };
    let text = h.root.join("notes.vhd");
    std::fs::write(&text, "just text\n".repeat(1000)).unwrap();
    let r = attach(&text);
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    assert!(r.body["message"].as_str().unwrap().contains("signature"));

    let target = h.outside.join("real.vhd");
    make_base(&target);
    let link = h.root.join("link.vhd");
    symlink(&target, &link).unwrap();
    forbidden(&attach(&link), &h.root);
    forbidden(&attach(&target), &h.root);

    let r = h.d.post(
        "/v1/vms/web/drives",
        json!({"controller": "scsi", "controller_number": 0, "location": 1,
               "media": {"type": "dvd", "iso": h.outside.join("x.iso")}}),
    );
    assert_eq!(r.status / 100, 4, "{}", r.raw);
    let r = h.d.get("/v1/vms/web");
    assert_eq!(r.body["settings"]["drives"], json!([]), "nothing attached");

    let good = h.root.join("good.vhd");
    make_base(&good);
    assert_eq!(attach(&good).status, 201);
}

#[test]
fn export_and_move_go_only_into_the_roots_and_never_copy_a_symlinks_target() {
    let mut h = host();
    h.d.create_vm("web");
    let disk = h.root.join("web.vhd");
    make_base(&disk);
    let r = h.d.post(
        "/v1/vms/web/drives",
        json!({"controller": "scsi", "controller_number": 0, "location": 0,
               "media": {"type": "hard_disk", "path": disk}}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);

    let r =
        h.d.post("/v1/vms/web/export", json!({"destination": h.outside}));
    forbidden(&r, &h.root);
    let r = h.d.post(
        "/v1/vms/web/move-storage",
        json!({"destination": h.outside.join("moved")}),
    );
    forbidden(&r, &h.root);
    let r = h.d.post(
        "/v1/vms/import/check",
        json!({"source": h.outside, "mode": "register"}),
    );
    forbidden(&r, &h.root);
    assert!(std::fs::read_dir(&h.outside).unwrap().next().is_none());

    // The disk turned into a symlink to a file outside while the daemon was down
    // (settings written before the roots existed look the same).
    h.d.stop();
    let secret = h.outside.join("secret.vhd");
    make_base(&secret);
    std::fs::remove_file(&disk).unwrap();
    symlink(&secret, &disk).unwrap();
    h.d.launch();
    let exports = h.root.join("exports");
    std::fs::create_dir(&exports).unwrap();
    let r =
        h.d.post("/v1/vms/web/export", json!({"destination": exports}));
    forbidden(&r, &h.root);
    assert!(std::fs::read_dir(&exports).unwrap().next().is_none());
}

#[test]
fn an_export_inside_the_roots_is_private_to_root() {
    let h = host();
    h.d.create_vm("web");
    let disk = h.root.join("web.vhd");
    make_base(&disk);
    let r = h.d.post(
        "/v1/vms/web/drives",
        json!({"controller": "scsi", "controller_number": 0, "location": 0,
               "media": {"type": "hard_disk", "path": disk}}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let vm_dir = std::fs::read_dir(h.d.data.join("vms"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&vm_dir), 0o700);
    assert_eq!(mode(&vm_dir.join("vm.json")), 0o600);
    let exports = h.root.join("exports");
    std::fs::create_dir(&exports).unwrap();
    post_completed(&h.d, "/v1/vms/web/export", json!({"destination": exports}));
    let folder = exports.join("web");
    assert_eq!(mode(&folder), 0o700);
    for f in common::disk_data::files_under(&folder) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

#[test]
fn delete_with_disks_removes_only_the_disk_it_recorded() {
    let mut h = host();
    h.d.create_vm("web");
    let disk = h.root.join("web.vhd");
    let other = h.root.join("other.vhdx");
    make_base(&disk);
    make_base(&other);
    for (location, p) in [(0, &disk), (1, &other)] {
        let r = h.d.post(
            "/v1/vms/web/drives",
            json!({"controller": "scsi", "controller_number": 0, "location": location,
                   "media": {"type": "hard_disk", "path": p}}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    // While the daemon is down, the first disk's file becomes someone's notes.
    h.d.stop();
    std::fs::write(&disk, "not a disk any more\n".repeat(100)).unwrap();
    h.d.launch();
    let job = run_job(&h.d, "DELETE", "/v1/vms/web?delete_disks=true", None);
    assert_eq!(
        std::fs::read_to_string(&disk).unwrap(),
        "not a disk any more\n".repeat(100),
        "the text file stays"
    );
    let kept = common::disk_data::affected(&job, "kept-disk");
    assert!(
        kept.iter()
            .any(|k| k.contains("web.vhd") && k.contains("does not read it as a disk")),
        "{job}"
    );
    assert!(!other.exists(), "the real disk is deleted");
    assert_eq!(
        common::disk_data::affected(&job, "deleted-disk"),
        [other.display().to_string()]
    );
}

#[test]
fn a_storage_root_that_cannot_be_used_stops_the_daemon_with_the_reason() {
    let t = tempfile::tempdir().unwrap();
    for (root, says) in [
        ("relative/disks", "not an absolute path"),
        ("/nonexistent/viridian-disks", "create the folder first"),
        ("/", "every file of the host"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_viridiand"))
            .arg("--data-dir")
            .arg(t.path().join("data"))
            .arg("--socket")
            .arg(t.path().join("s.sock"))
            .args(["--storage-root", root])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{root}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{root}: {err}");
    }
}
