//! VM definitions through a real viridiand: CRUD, validation, drives, restart, damage.

mod common;

use common::Daemon;
use serde_json::{json, Value};

#[test]
fn vm_create_show_update_delete_round_trip() {
    let d = Daemon::start(&[]);
    let vm = d.create_vm("web01");
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["settings"]["processor"]["count"], 1);
    assert_eq!(
        vm["settings"]["configuration_version"],
        vm_config::CURRENT_CONFIGURATION_VERSION
    );
    assert_eq!(vm["runtime"], json!({"state": "Off"}));

    for key in ["web01", id.as_str()] {
        let r = d.get(&format!("/v1/vms/{key}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.body["id"], id.as_str());
    }
    let r = d.req(
        "PATCH",
        "/v1/vms/web01",
        Some(r#"{"name":"web02","memory_mib":1024,"notes":"front end"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["settings"]["memory"]["startup_mib"], 1024);
    assert_eq!(d.get("/v1/vms/web01").code(), "NotFound");
    let list = d.get("/v1/vms").body;
    assert_eq!(list["vms"][0]["name"], "web02");

    let on_disk: Value = serde_json::from_slice(
        &std::fs::read(d.data.join("vms").join(&id).join("vm.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(on_disk["schema_version"], vm_config::file::SCHEMA_VERSION);
    assert_eq!(on_disk["settings"]["notes"], "front end");
    assert_eq!(
        on_disk["settings"]["configuration_version"],
        vm_config::CURRENT_CONFIGURATION_VERSION,
        "an update keeps the version"
    );

    let r = d.req("DELETE", "/v1/vms/web02", None);
    assert_eq!(r.status, 202, "{}", r.raw);
    assert_eq!(
        common::wait_job(&d, r.body["id"].as_str().unwrap())["state"],
        "Completed"
    );
    assert_eq!(d.get(&format!("/v1/vms/{id}")).status, 404);
    assert!(!d.data.join("vms").join(&id).exists());
}

#[test]
fn a_vm_from_before_configuration_versions_is_version_1_until_upgraded() {
    let mut d = Daemon::start(&[]);
    let id = d.create_vm("old")["id"].as_str().unwrap().to_string();
    // A vm.json written before versions existed has no configuration_version.
    d.stop();
    let file = d.data.join("vms").join(&id).join("vm.json");
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    doc["settings"]
        .as_object_mut()
        .unwrap()
        .remove("configuration_version");
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    d.launch();
    let vm = d.get("/v1/vms/old").body;
    assert_eq!(vm["settings"]["configuration_version"], 1, "{vm}");

    // Replacing the settings keeps the version; only an upgrade changes it.
    let mut settings = vm["settings"].clone();
    settings["configuration_version"] = json!(2);
    settings["notes"] = json!("replaced");
    let r = d.req("PUT", "/v1/vms/old/settings", Some(&settings.to_string()));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["settings"]["notes"], "replaced");
    assert_eq!(r.body["settings"]["configuration_version"], 1, "{}", r.raw);

    let r = d.post("/v1/vms/old/upgrade", json!({}));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        r.body["settings"]["configuration_version"],
        vm_config::CURRENT_CONFIGURATION_VERSION
    );
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        on_disk["settings"]["configuration_version"],
        vm_config::CURRENT_CONFIGURATION_VERSION
    );
    // Again: nothing to do, same answer.
    let r = d.post("/v1/vms/old/upgrade", json!({}));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        r.body["settings"]["configuration_version"],
        vm_config::CURRENT_CONFIGURATION_VERSION
    );
    assert_eq!(d.post("/v1/vms/nope/upgrade", json!({})).code(), "NotFound");
}

#[test]
fn validation_errors_carry_stable_codes_and_change_nothing() {
    let d = Daemon::start(&[]);
    d.create_vm("taken");
    let before = d.snapshot();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"name": "taken"}), 409, "AlreadyExists"),
        (
            json!({"name": "x", "generation": 3}),
            422,
            "InvalidParameter",
        ),
        (
            json!({"name": "x", "processor_count": 0}),
            422,
            "InvalidParameter",
        ),
        (
            json!({"name": "x", "processor_count": 100000}),
            422,
            "InvalidParameter",
        ),
        (
            json!({"name": "x", "memory_mib": 1}),
            422,
            "InvalidParameter",
        ),
        (json!({"name": ""}), 422, "InvalidParameter"),
    ];
    for (body, status, code) in cases {
        let r = d.post("/v1/vms", body.clone());
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.raw);
        assert!(!r.body["message"].as_str().unwrap().is_empty());
    }
    for (body, msg) in [
        (r#"{"reserve_percent":101}"#, "reserve 101 %"),
        (r#"{"limit_percent":200}"#, "limit 200 %"),
        (r#"{"relative_weight":0}"#, "weight 0"),
    ] {
        let r = d.req("PATCH", "/v1/vms/taken/processor", Some(body));
        assert_eq!(r.code(), "InvalidParameter");
        assert!(
            r.body["message"].as_str().unwrap().contains(msg),
            "{}",
            r.raw
        );
    }
    assert_eq!(d.snapshot(), before);
}

#[test]
fn drive_rules_slot_generation_in_use_and_missing_files() {
    let d = Daemon::start(&[]);
    let disk_a = d.dir.path().join("a.vhdx");
    let disk_b = d.dir.path().join("b.vhd");
    let iso = d.dir.path().join("install.iso");
    for f in [&disk_a, &disk_b] {
        vhd::create_dynamic(f, 1 << 20, None).unwrap();
    }
    std::fs::write(&iso, b"placeholder").unwrap();
    d.post("/v1/vms", json!({"name": "g2", "generation": 2}));
    d.post("/v1/vms", json!({"name": "g1", "generation": 1}));
    let add = |vm: &str, body: Value| d.post(&format!("/v1/vms/{vm}/drives"), body);
    let hd = |p: &std::path::Path| json!({"type": "hard_disk", "path": p.to_str().unwrap()});

    let r = add("g2", json!({"controller": "scsi", "media": hd(&disk_a)}));
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(
        r.body["slot"],
        json!({"controller": "scsi", "controller_number": 0, "location": 0})
    );

    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "g1",
            json!({"controller": "ide", "media": hd(&disk_a)}),
            "InUse",
            "already attached to VM g2",
        ),
        (
            "g2",
            json!({"controller": "ide", "media": hd(&disk_b)}),
            "InvalidParameter",
            "no IDE controller",
        ),
        (
            "g2",
            json!({"controller": "scsi", "location": 0, "media": hd(&disk_b)}),
            "AlreadyExists",
            "already taken",
        ),
        (
            "g2",
            json!({"controller": "scsi", "controller_number": 4, "location": 0, "media": hd(&disk_b)}),
            "InvalidParameter",
            "SCSI controller 4 does not exist",
        ),
        (
            "g2",
            json!({"controller": "scsi", "location": 64, "media": hd(&disk_b)}),
            "InvalidParameter",
            "location 64",
        ),
        (
            "g1",
            json!({"controller": "scsi", "media": hd(&disk_b)}),
            "InvalidParameter",
            "boot disk",
        ),
        (
            "g1",
            json!({"controller": "scsi", "media": {"type": "dvd", "iso": iso.to_str().unwrap()}}),
            "InvalidParameter",
            "DVD drive on SCSI",
        ),
        (
            "g1",
            json!({"controller": "ide", "media": {"type": "hard_disk", "path": "/nonexistent/x.vhd"}}),
            "InvalidParameter",
            "does not exist",
        ),
        (
            "g1",
            json!({"controller": "ide", "media": {"type": "hard_disk", "path": "relative.vhd"}}),
            "InvalidParameter",
            "not absolute",
        ),
        (
            "g1",
            json!({"controller": "ide", "media": {"type": "pass_through", "device": iso.to_str().unwrap()}}),
            "InvalidParameter",
            "block device",
        ),
    ];
    for (vm, body, code, msg) in cases {
        let r = add(vm, body.clone());
        assert_eq!(r.code(), code, "{body}: {}", r.raw);
        assert!(
            r.body["message"].as_str().unwrap().contains(msg),
            "{body}: {}",
            r.raw
        );
    }
    let r = add(
        "g1",
        json!({"controller": "ide", "media": {"type": "dvd", "iso": iso.to_str().unwrap()}}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let r = add("g1", json!({"controller": "ide", "media": hd(&disk_b)}));
    assert_eq!(r.body["slot"]["location"], 1, "{}", r.raw);
    assert_eq!(
        d.get("/v1/vms/g1/drives").body["drives"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        d.req("DELETE", "/v1/vms/g1/drives/ide/0/1", None).status,
        204
    );
    assert_eq!(
        d.req("DELETE", "/v1/vms/g1/drives/ide/0/1", None).code(),
        "NotFound"
    );

    let r = d.post("/v1/vms/g1/network-adapters", json!({"kind": "legacy"}));
    assert_eq!(r.status, 201);
    let mac = r.body["mac"].as_str().unwrap().to_string();
    let r = d.post("/v1/vms/g2/network-adapters", json!({"mac": mac}));
    assert_eq!(r.code(), "InUse", "{}", r.raw);
    assert_eq!(
        d.post("/v1/vms/g2/network-adapters", json!({"kind": "legacy"}))
            .code(),
        "InvalidParameter"
    );
    assert_eq!(
        d.req(
            "DELETE",
            &format!("/v1/vms/g1/network-adapters/{mac}"),
            None
        )
        .status,
        204
    );
}

#[test]
fn restart_keeps_every_vm_and_its_settings() {
    let mut d = Daemon::start(&[]);
    let disk = d.dir.path().join("keep.vhdx");
    vhd::create_dynamic(&disk, 1 << 20, None).unwrap();
    let mut before = Vec::new();
    for i in 0..5 {
        d.create_vm(&format!("vm{i}"));
    }
    d.post(
        "/v1/vms/vm3/drives",
        json!({"controller": "scsi", "media": {"type": "hard_disk", "path": disk}}),
    );
    for i in 0..5 {
        before.push(d.get(&format!("/v1/vms/vm{i}")).body);
    }
    d.restart();
    assert!(d.socket.exists());
    for (i, vm) in before.iter().enumerate() {
        assert_eq!(&d.get(&format!("/v1/vms/vm{i}")).body, vm);
    }
    d.stop();
    assert!(
        !d.socket.exists(),
        "the socket is removed on clean shutdown"
    );
}

#[test]
fn damaged_vm_folders_are_listed_repairable_and_removable_without_blocking_others() {
    let mut d = Daemon::start(&[]);
    let good = d.create_vm("good")["id"].as_str().unwrap().to_string();
    let corrupt = d.create_vm("corrupt")["id"].as_str().unwrap().to_string();
    let unreadable = d.create_vm("unreadable")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let disk = d.dir.path().join("moved.vhdx");
    vhd::create_dynamic(&disk, 1 << 20, None).unwrap();
    let lost = d.create_vm("lostdisk")["id"].as_str().unwrap().to_string();
    d.post(
        "/v1/vms/lostdisk/drives",
        json!({"controller": "scsi", "media": {"type": "hard_disk", "path": disk}}),
    );
    d.stop();

    let vms = d.data.join("vms");
    let good_bytes = std::fs::read(vms.join(&good).join("vm.json")).unwrap();
    let corrupt_settings = d.dir.path().join("corrupt.json");
    std::fs::copy(vms.join(&corrupt).join("vm.json"), &corrupt_settings).unwrap();
    std::fs::write(
        vms.join(&corrupt).join("vm.json"),
        b"{\"schema_version\": 1, \"settings\": {tru",
    )
    .unwrap();
    // A vm.json that cannot be read at all (a directory in its place: unreadable even for root).
    std::fs::remove_file(vms.join(&unreadable).join("vm.json")).unwrap();
    std::fs::create_dir(vms.join(&unreadable).join("vm.json")).unwrap();
    let moved = d.dir.path().join("moved-again.vhdx");
    std::fs::rename(&disk, &moved).unwrap();
    d.launch();

    let list = d.get("/v1/vms").body;
    let state = |id: &str| {
        let v = list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == id)
            .unwrap()
            .clone();
        (
            v["state"].as_str().unwrap().to_string(),
            v["damaged_reason"].as_str().unwrap_or("").to_string(),
        )
    };
    assert_eq!(state(&good).0, "Off");
    let (s, reason) = state(&corrupt);
    assert_eq!(s, "Damaged");
    assert!(
        reason.contains("vm.json is not valid VM settings"),
        "{reason}"
    );
    let (s, reason) = state(&unreadable);
    assert_eq!(s, "Damaged");
    assert!(reason.contains("cannot read"), "{reason}");
    let (s, reason) = state(&lost);
    assert_eq!(s, "Damaged");
    assert!(reason.contains("moved.vhdx does not exist"), "{reason}");

    let r = d.get(&format!("/v1/vms/{unreadable}"));
    assert_eq!(r.body["settings"], Value::Null);
    assert_eq!(r.body["runtime"]["state"], "Damaged");
    assert_eq!(
        d.req(
            "PATCH",
            &format!("/v1/vms/{corrupt}"),
            Some(r#"{"notes":"x"}"#)
        )
        .code(),
        "Damaged"
    );

    // Repair: replace the corrupt settings with the saved copy; re-point the moved disk.
    let saved: Value = serde_json::from_slice(&std::fs::read(&corrupt_settings).unwrap()).unwrap();
    let r = d.req(
        "PUT",
        &format!("/v1/vms/{corrupt}/settings"),
        Some(&saved["settings"].to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["runtime"]["state"], "Off");
    let r = d.req(
        "PUT",
        "/v1/vms/lostdisk/drives/scsi/0/0",
        Some(&json!({"media": {"type": "hard_disk", "path": moved}}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(d.get("/v1/vms/lostdisk").body["runtime"]["state"], "Off");
    // Remove the unreadable one.
    let r = d.req("DELETE", &format!("/v1/vms/{unreadable}"), None);
    assert_eq!(r.status, 202, "{}", r.raw);
    let job = common::wait_job(&d, r.body["id"].as_str().unwrap());
    assert_eq!(job["state"], "Completed", "{job}");
    assert_eq!(d.get("/v1/vms").body["vms"].as_array().unwrap().len(), 3);
    assert_eq!(
        std::fs::read(vms.join(&good).join("vm.json")).unwrap(),
        good_bytes
    );
}

#[test]
fn hundred_concurrent_clients_all_get_answers() {
    let d = Daemon::start(&[]);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    let r = d.post(
                        "/v1/vms",
                        json!({"name": format!("c{i}"), "memory_mib": 64}),
                    );
                    assert_eq!(r.status, 201, "{}", r.raw);
                    let r = d.get(&format!("/v1/vms/c{i}"));
                    assert_eq!(r.body["name"], format!("c{i}"));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    assert_eq!(d.get("/v1/vms").body["vms"].as_array().unwrap().len(), 100);
}
