//! Export and import without a guest: what the folder holds, flattened exports,
//! refused requests that change nothing, the compatibility report of a damaged
//! export, and settings written by an older Viridian.

mod common;

use std::path::{Path, PathBuf};

use common::disk_data::{checkpoint_names, post_completed as completed};
use common::Daemon;
use serde_json::{json, Value};

fn make_disk(path: &Path, size: u64) {
    if vhd::is_vhdx_name(path) {
        use vhd::vhdx::create::{NewVhdx, VhdxOptions};
        vhd::vhdx::create::create(
            path,
            &VhdxOptions::new(NewVhdx::Dynamic { size }),
            &mut vhd::NoProgress,
        )
        .unwrap();
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

fn write(path: &Path, offset: u64, bytes: &[u8]) {
    let disk = vhd::open(path, false).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    disk.write_at(bytes, offset).unwrap();
    disk.flush().unwrap();
}

fn read(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let disk = vhd::open(path, true).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, offset).unwrap();
    buf
}

fn drive_paths(d: &Daemon, vm: &str) -> Vec<PathBuf> {
    let v = d.get(&format!("/v1/vms/{vm}")).body;
    v["settings"]["drives"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["media"]["type"] == "hard_disk")
        .map(|x| PathBuf::from(x["media"]["path"].as_str().unwrap()))
        .collect()
}

/// A VM "web" with an IDE VHD and a SCSI VHDX: each disk holds "one" at 1 MiB when
/// checkpoint "first" is taken and "two" after it (plus a second checkpoint "second").
fn vm_with_history(d: &Daemon) -> Vec<PathBuf> {
    let disks = d.dir.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let os = disks.join("os.vhd");
    let data = disks.join("data.vhdx");
    make_disk(&os, 16 << 20);
    make_disk(&data, 16 << 20);
    let r = d.post(
        "/v1/vms",
        json!({"name": "web", "generation": 1, "processor_count": 1, "memory_mib": 128}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    for (c, path) in [("ide", &os), ("scsi", &data)] {
        let r = d.post("/v1/vms/web/drives", json!({"controller": c, "media": {"type": "hard_disk", "path": path.display().to_string()}}));
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    let r = d.post(
        "/v1/vms/web/network-adapters",
        json!({"mac": "52:54:00:00:aa:01", "vlan_id": 10}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    for p in drive_paths(d, "web") {
        write(&p, 1 << 20, b"one");
    }
    completed(d, "/v1/vms/web/checkpoints", json!({"name": "first"}));
    for p in drive_paths(d, "web") {
        write(&p, 1 << 20, b"two");
    }
    completed(d, "/v1/vms/web/checkpoints", json!({"name": "second"}));
    vec![os, data]
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Exports VM "web" (Off) into `<test dir>/out`; returns the folder and its manifest.
fn export_web(d: &Daemon) -> (PathBuf, Value) {
    let out = d.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    completed(
        d,
        "/v1/vms/web/export",
        json!({"destination": out.display().to_string()}),
    );
    let folder = out.join("web");
    let manifest =
        serde_json::from_slice(&std::fs::read(folder.join("export.json")).unwrap()).unwrap();
    (folder, manifest)
}

#[test]
fn full_export_is_self_contained_and_imports_by_copy_with_its_tree() {
    let d = Daemon::start(&[]);
    vm_with_history(&d);
    let (folder, manifest) = export_web(&d);
    assert_eq!(manifest["kind"], "full");
    assert_eq!(manifest["saved"], false);
    // Nothing in the folder refers outside it: every path is relative, and every
    // differencing disk's parent resolves inside the folder.
    let vm_json = std::fs::read_to_string(folder.join("vm.json")).unwrap();
    let tree_json = std::fs::read_to_string(folder.join("checkpoints.json")).unwrap();
    for text in [&vm_json, &tree_json] {
        assert!(
            !text.contains(&d.dir.path().display().to_string()),
            "an absolute source path in the export:\n{text}"
        );
    }
    for f in manifest["files"].as_array().unwrap() {
        let p = folder.join(f["path"].as_str().unwrap());
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            f["bytes"].as_u64().unwrap()
        );
        if f["role"] == "disk" {
            let info = vhd::ops::info::info(&p).unwrap();
            if let Some(parent) = info.parent {
                let resolved =
                    std::fs::canonicalize(parent.resolved_path.expect("resolves")).unwrap();
                assert!(
                    resolved.starts_with(std::fs::canonicalize(&folder).unwrap()),
                    "{}",
                    resolved.display()
                );
                assert!(parent.problem.is_none(), "{:?}", parent.problem);
            }
            assert!(
                vhd::ops::check::check(&p, false).unwrap().clean(),
                "{}",
                p.display()
            );
        }
    }
    // Moved elsewhere, then imported by copy under another name and a new id.
    let moved = d.dir.path().join("elsewhere");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::rename(&folder, moved.join("web")).unwrap();
    let job = completed(
        &d,
        "/v1/vms/import",
        json!({"source": moved.join("web").display().to_string(), "mode": "copy", "new_id": true, "name": "web-copy"}),
    );
    assert_eq!(job["type"], "ImportVm");
    let tree = d.get("/v1/vms/web-copy/checkpoints").body;
    let names = checkpoint_names(&tree);
    assert_eq!(names, ["first", "second"]);
    for p in drive_paths(&d, "web-copy") {
        assert!(p.starts_with(&d.data), "{}", p.display());
        assert_eq!(read(&p, 1 << 20, 3), b"two");
    }
    completed(&d, "/v1/vms/web-copy/checkpoints/first/apply", json!({}));
    for p in drive_paths(&d, "web-copy") {
        assert_eq!(read(&p, 1 << 20, 3), b"one");
    }
    // The original is untouched and differs in id and MAC.
    let a = d.get("/v1/vms/web").body;
    let b = d.get("/v1/vms/web-copy").body;
    assert_ne!(a["id"], b["id"]);
    assert_ne!(
        a["settings"]["network_adapters"][0]["mac"],
        b["settings"]["network_adapters"][0]["mac"]
    );
    assert_eq!(
        a["settings"]["network_adapters"][0]["pci_slot"],
        b["settings"]["network_adapters"][0]["pci_slot"]
    );
    // The adapter's VLAN went through export, import and a checkpoint's apply.
    for v in [&a, &b] {
        let nic = &v["settings"]["network_adapters"][0];
        assert_eq!(
            (nic["vlan_mode"].as_str(), nic["vlan_id"].as_u64()),
            (Some("access"), Some(10)),
            "{nic}"
        );
    }
}

#[test]
fn flattened_exports_hold_one_disk_per_drive_at_their_point_in_time() {
    let d = Daemon::start(&[]);
    vm_with_history(&d);
    for p in drive_paths(&d, "web") {
        write(&p, 2 << 20, b"now");
    }
    let out = d.dir.path().join("out");
    for (req, want_1m, want_2m, dir) in [
        (json!({"checkpoint": "first"}), b"one", [0u8; 3], "cp"),
        (json!({"no_checkpoints": true}), b"two", *b"now", "now"),
    ] {
        let dest = out.join(dir);
        std::fs::create_dir_all(&dest).unwrap();
        let mut body = req.clone();
        body["destination"] = json!(dest.display().to_string());
        completed(&d, "/v1/vms/web/export", body);
        let folder = dest.join("web");
        assert!(!folder.join("checkpoints.json").exists());
        assert!(!folder.join("Snapshots").exists());
        let mut names: Vec<String> = std::fs::read_dir(folder.join("Virtual Hard Disks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["data.vhdx", "os.vhd"],
            "one disk per drive, named as its base"
        );
        for n in &names {
            let p = folder.join("Virtual Hard Disks").join(n);
            let info = vhd::ops::info::info(&p).unwrap();
            assert!(info.parent.is_none(), "{n} is flattened");
            assert_eq!(&read(&p, 1 << 20, 3), want_1m, "{req}: {n}");
            assert_eq!(read(&p, 2 << 20, 3), want_2m, "{req}: {n}");
        }
        // QEMU reads the flattened VHDX too (it cannot open differencing disks).
        let q = std::process::Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(folder.join("Virtual Hard Disks/data.vhdx"))
            .output()
            .unwrap();
        assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stdout));
    }
    // A flattened export imports as a VM without checkpoints.
    let job = completed(
        &d,
        "/v1/vms/import",
        json!({"source": out.join("cp").display().to_string(), "new_id": true, "name": "web-at-first"}),
    );
    assert_eq!(job["state"], "Completed");
    assert_eq!(
        d.get("/v1/vms/web-at-first/checkpoints").body["checkpoints"],
        json!([])
    );
    for p in drive_paths(&d, "web-at-first") {
        assert_eq!(read(&p, 1 << 20, 3), b"one");
    }
}

#[test]
fn refused_exports_change_nothing() {
    let d = Daemon::start(&[]);
    vm_with_history(&d);
    let before = d.snapshot();
    let out = d.dir.path().join("out");
    std::fs::create_dir_all(out.join("web")).unwrap();
    std::fs::write(out.join("web/keep.txt"), b"mine").unwrap();
    let cases = [
        (
            json!({"destination": "relative/dir"}),
            422,
            "InvalidParameter",
        ),
        (
            json!({"destination": "/nonexistent/dir"}),
            422,
            "InvalidParameter",
        ),
        (
            json!({"destination": out.display().to_string()}),
            409,
            "AlreadyExists",
        ),
        (
            json!({"destination": "/tmp", "no_checkpoints": true, "checkpoint": "first"}),
            422,
            "InvalidParameter",
        ),
        (
            json!({"destination": d.dir.path(), "checkpoint": "nope"}),
            404,
            "NotFound",
        ),
        (
            json!({"destination": d.data.join("vms").display().to_string()}),
            422,
            "InvalidParameter",
        ),
    ];
    for (body, status, code) in cases {
        let r = d.post("/v1/vms/web/export", body.clone());
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.raw);
    }
    let r = d.post("/v1/vms/nobody/export", json!({"destination": "/tmp"}));
    assert_eq!(r.status, 404);
    assert_eq!(d.snapshot(), before);
    assert_eq!(std::fs::read(out.join("web/keep.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(out.join("web")).unwrap().count(), 1);
}

#[test]
fn damaged_export_is_reported_whole_and_nothing_changes() {
    let d = Daemon::start(&[]);
    vm_with_history(&d);
    let (folder, manifest) = export_web(&d);
    let disk_files: Vec<String> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["role"] == "disk")
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    // Damage: a base disk gone, a layer cut short, a checkpoint's settings garbled.
    let gone = disk_files.iter().find(|p| p.ends_with("os.vhd")).unwrap();
    std::fs::remove_file(folder.join(gone)).unwrap();
    let cut = disk_files.iter().find(|p| p.ends_with(".avhdx")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(folder.join(cut))
        .unwrap();
    f.set_len(1024).unwrap();
    drop(f);
    let garbled = std::fs::read_dir(folder.join("Snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("settings.json"))
        .find(|p| p.exists())
        .unwrap();
    std::fs::write(&garbled, b"{\"schema_version\": 1, \"settings\": {tru").unwrap();

    let data_before = d.snapshot();
    let export_before = files(&folder);
    let vms_before = d.get("/v1/vms").body;
    // Same id and name as the VM still here: two more problems.
    let r = d.post(
        "/v1/vms/import",
        json!({"source": folder.display().to_string(), "mode": "copy"}),
    );
    assert_eq!(
        (r.status, r.code()),
        (422, "ImportIncompatible"),
        "{}",
        r.raw
    );
    let problems = r.body["details"]["problems"]
        .as_array()
        .expect("the report comes along");
    let kinds: Vec<&str> = problems
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    for want in [
        "MissingFile",
        "TruncatedFile",
        "UnreadableSettings",
        "BrokenChain",
        "IdInUse",
        "NameInUse",
    ] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}:\n{}", r.raw);
    }
    assert!(
        problems
            .iter()
            .all(|p| !p["fix"].as_str().unwrap().is_empty()),
        "every problem says what to do"
    );
    assert!(problems
        .iter()
        .any(|p| p["message"].as_str().unwrap().contains(gone.as_str())));
    // The check endpoint gives the same report, and neither changed anything.
    let report = d.post(
        "/v1/vms/import/check",
        json!({"source": folder.display().to_string(), "mode": "copy"}),
    );
    assert_eq!(report.status, 200);
    assert_eq!(
        report.body["problems"].as_array().unwrap().len(),
        problems.len()
    );
    assert_eq!(d.snapshot(), data_before);
    assert_eq!(files(&folder), export_before);
    assert_eq!(d.get("/v1/vms").body, vms_before);

    // Not an export at all.
    let r = d.post(
        "/v1/vms/import",
        json!({"source": d.dir.path().join("disks").display().to_string()}),
    );
    assert_eq!(r.code(), "ImportIncompatible");
    assert_eq!(
        r.body["details"]["problems"][0]["kind"], "UnreadableExport",
        "{}",
        r.raw
    );
}

/// A request no export could satisfy (a relative path, a bad new name) is an
/// `InvalidParameter` from import and from its check alike, not a report.
#[test]
fn import_and_its_check_refuse_a_malformed_request_before_reading_anything() {
    let d = Daemon::start(&[]);
    vm_with_history(&d);
    let (folder, _) = export_web(&d);
    let source = folder.display().to_string();
    let before = d.snapshot();
    for (body, says) in [
        (json!({"source": "relative/export"}), "not an absolute path"),
        (json!({"source": source, "name": ""}), "name"),
        (
            json!({"source": source, "new_id": true, "name": "9f0c1f6e-7a51-4f3e-9d3c-3a3f0b7c2d11"}),
            "UUID",
        ),
        (
            json!({"source": source, "mode": "copy", "destination": "copies"}),
            "destination \"copies\" is not an absolute path",
        ),
        (json!({"source": "/tmp/a\u{1}b"}), "control character"),
    ] {
        for path in ["/v1/vms/import", "/v1/vms/import/check"] {
            let r = d.post(path, body.clone());
            assert_eq!(r.status, 422, "{path} {body}: {}", r.raw);
            assert_eq!(r.code(), "InvalidParameter", "{path} {body}: {}", r.raw);
            assert!(
                r.body["message"].as_str().unwrap().contains(says),
                "{path} {body}: {}",
                r.raw
            );
        }
    }
    assert_eq!(d.snapshot(), before, "nothing changed");
}

#[test]
fn registering_an_export_twice_is_refused_and_a_newer_format_is_named() {
    let d = Daemon::start(&[]);
    vm_with_history(&d);
    let (folder, _) = export_web(&d);
    completed(
        &d,
        "/v1/vms/import",
        json!({"source": folder.display().to_string(), "new_id": true, "name": "web-2"}),
    );
    let r = d.post(
        "/v1/vms/import",
        json!({"source": folder.display().to_string(), "new_id": true, "name": "web-3"}),
    );
    assert_eq!(r.code(), "ImportIncompatible");
    assert!(
        r.body["details"]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["kind"] == "DiskInUse"),
        "{}",
        r.raw
    );

    let text = std::fs::read_to_string(folder.join("export.json")).unwrap();
    let other = d.dir.path().join("newer");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("export.json"),
        text.replace("\"format_version\": 2", "\"format_version\": 9"),
    )
    .unwrap();
    let r = d.post(
        "/v1/vms/import/check",
        json!({"source": other.display().to_string()}),
    );
    assert_eq!(r.body["problems"][0]["kind"], "SchemaTooNew", "{}", r.raw);
}

/// Settings written by schema-1 Viridian (tests/data/v1 of vm_config) load in the
/// daemon and import, their adapters in the PCI slots they had.
#[test]
fn schema1_settings_load_and_import_upgraded() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vm_config/tests/data/v1");
    let d = Daemon::start(&[]);
    // An export made by hand around the schema-1 db01 settings.
    let folder = d.dir.path().join("old-export");
    std::fs::create_dir_all(folder.join("Virtual Hard Disks")).unwrap();
    let text = std::fs::read_to_string(fixtures.join("db01-gen2-scsi.vm.json")).unwrap();
    let text = text.replace(
        "/tmp/v1gen/disks/db-os.vhdx",
        "Virtual Hard Disks/db-os.vhdx",
    );
    assert!(text.contains("\"schema_version\": 1"));
    std::fs::write(folder.join("vm.json"), &text).unwrap();
    let disk = folder.join("Virtual Hard Disks/db-os.vhdx");
    make_disk(&disk, 8 << 20);
    let bytes = std::fs::metadata(&disk).unwrap().len();
    let manifest = json!({
        "format": "viridian-vm-export", "format_version": 1,
        "vm_id": "887befbb-6f5a-4cbb-a6d3-c0bd6b93acbf", "vm_name": "db01",
        "kind": "current", "saved": false, "exported_ms": 0, "viridian_version": "0.1.0",
        "files": [{"path": "Virtual Hard Disks/db-os.vhdx", "bytes": bytes, "role": "disk"}]
    });
    std::fs::write(
        folder.join("export.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    completed(
        &d,
        "/v1/vms/import",
        json!({"source": folder.display().to_string()}),
    );
    let v = d.get("/v1/vms/db01").body;
    assert_eq!(v["settings"]["network_adapters"][0]["pci_slot"], 2, "{v}");
    assert_eq!(
        v["settings"]["network_adapters"][0]["mac"],
        "52:54:00:ab:cd:01"
    );
    let on_disk: Value = serde_json::from_slice(
        &std::fs::read(
            d.data
                .join("vms/887befbb-6f5a-4cbb-a6d3-c0bd6b93acbf/vm.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(on_disk["schema_version"], vm_config::file::SCHEMA_VERSION);

    // A schema-1 VM folder in the data dir loads at start (its disks are missing
    // here, so it is Damaged, but its settings read and upgrade).
    let id = "f8381224-6cc1-48fd-a93c-35f2cd46f38f";
    let vm_dir = d.data.join("vms").join(id);
    std::fs::create_dir_all(&vm_dir).unwrap();
    // (Its disk paths are made to miss on every host: /tmp/v1gen may exist here.)
    let text =
        std::fs::read_to_string(fixtures.join("web01-gen1-two-checkpoints.vm.json")).unwrap();
    std::fs::write(
        vm_dir.join("vm.json"),
        text.replace("/tmp/v1gen/", "/nonexistent/v1gen/"),
    )
    .unwrap();
    let mut d = d;
    d.restart();
    let v = d.get("/v1/vms/web01").body;
    assert_eq!(v["runtime"]["state"], "Damaged", "{v}");
    let slots: Vec<u64> = v["settings"]["network_adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["pci_slot"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, [3, 4, 5]);
}
