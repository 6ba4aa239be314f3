//! Switches across export and import, without a guest: an export records the
//! name of every switch its adapters (and its checkpoints' adapters) are on; an
//! import on another host matches them by id, else by name, or as `switch_mapping`
//! says, and reports a switch it cannot find as `MissingSwitch`. Each daemon runs
//! in a network namespace of its own (its switches are bridges there).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::disk_data::post_completed as completed;
use common::Daemon;
use serde_json::{json, Value};

fn make_disk(path: &Path) {
    use vhd::vhd1::create::{create, CreateOptions, NewDisk};
    let o = CreateOptions {
        kind: NewDisk::Dynamic {
            size: 8 << 20,
            block_size: 1 << 20,
        },
        exact_size: true,
    };
    create(path, &o, &mut vhd::NoProgress).unwrap();
}

fn switch(d: &Daemon, name: &str) -> String {
    let r = d.post("/v1/switches", json!({"name": name}));
    assert_eq!(r.status, 201, "{}", r.raw);
    r.body["id"].as_str().unwrap().to_string()
}

/// The switch each adapter of `settings` records, by MAC.
fn adapter_switches(settings: &Value) -> Vec<(String, Option<String>)> {
    settings["network_adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["mac"].as_str().unwrap().to_string(),
                a["switch"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn problems(report: &Value) -> Vec<(String, String, String)> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_string(),
                p["message"].as_str().unwrap().to_string(),
                p["fix"].as_str().unwrap().to_string(),
            )
        })
        .collect()
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

const A1: &str = "52:54:00:00:bb:01";
const A2: &str = "52:54:00:00:bb:02";

/// `viridian` beside `viridiand`, built every time (a no-op when fresh).
fn cli() -> PathBuf {
    let daemon = Path::new(env!("CARGO_BIN_EXE_viridiand"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "cli", "--bin", "viridian"]);
    if daemon.to_string_lossy().contains("/release/") {
        cmd.arg("--release");
    }
    assert!(cmd.status().unwrap().success(), "cannot build viridian");
    daemon.with_file_name("viridian")
}

#[test]
fn import_resolves_exported_switches_by_name_or_mapping_and_reports_missing_ones() {
    let shared = tempfile::tempdir().unwrap();
    let root = shared.path().display().to_string();
    let a = Daemon::start_in_netns(&["--storage-root", &root]);
    let b = Daemon::start_in_netns(&["--storage-root", &root]);

    // On host A: VM "web" with adapter A1 on "lab" and A2 on "backend" when
    // checkpoint "first" is taken; then A2 is disconnected, so "backend" is on
    // an adapter of the checkpoint only.
    let lab_a = switch(&a, "lab");
    let backend_a = switch(&a, "backend");
    let disk = shared.path().join("os.vhd");
    make_disk(&disk);
    let r = a.post(
        "/v1/vms",
        json!({"name": "web", "generation": 1, "processor_count": 1, "memory_mib": 128}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let r = a.post("/v1/vms/web/drives", json!({"controller": "ide", "media": {"type": "hard_disk", "path": disk.display().to_string()}}));
    assert_eq!(r.status, 201, "{}", r.raw);
    for (mac, sw) in [(A1, "lab"), (A2, "backend")] {
        let r = a.post(
            "/v1/vms/web/network-adapters",
            json!({"mac": mac, "switch": sw}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    completed(&a, "/v1/vms/web/checkpoints", json!({"name": "first"}));
    let r = a.post(
        &format!("/v1/vms/web/network-adapters/{A2}/disconnect"),
        json!({}),
    );
    assert!(r.status < 300, "{}", r.raw);
    let out = shared.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    completed(
        &a,
        "/v1/vms/web/export",
        json!({"destination": out.display().to_string()}),
    );
    let folder = out.join("web");
    let source = folder.display().to_string();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(folder.join("export.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 2, "{manifest}");
    let mut recorded: Vec<(String, String)> = manifest["switches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        vec![
            ("backend".to_string(), backend_a.clone()),
            ("lab".to_string(), lab_a.clone())
        ],
        "{manifest}"
    );

    // Host B has neither: the report names both switches and their adapters,
    // and neither the check nor a refused import changes anything.
    let export_before = files(&folder);
    let data_before = b.snapshot();
    let r = b.post("/v1/vms/import/check", json!({"source": source}));
    assert_eq!(r.status, 200, "{}", r.raw);
    let p = problems(&r.body);
    assert_eq!(p.len(), 2, "{}", r.raw);
    let lab = p
        .iter()
        .find(|x| x.1.contains("\"lab\""))
        .unwrap_or_else(|| panic!("{}", r.raw));
    assert_eq!(lab.0, "MissingSwitch");
    assert!(lab.1.contains(A1) && !lab.1.contains(A2), "{}", lab.1);
    assert_eq!(
        lab.2,
        "map it with --switch lab=NEW (or --switch lab=none to import it disconnected), or create a switch named lab"
    );
    let backend = p
        .iter()
        .find(|x| x.1.contains("\"backend\""))
        .unwrap_or_else(|| panic!("{}", r.raw));
    assert_eq!(backend.0, "MissingSwitch");
    assert!(
        backend.1.contains(&format!("{A2} in checkpoint \"first\"")),
        "{}",
        backend.1
    );
    let r = b.post("/v1/vms/import", json!({"source": source, "mode": "copy"}));
    assert_eq!(r.code(), "ImportIncompatible", "{}", r.raw);
    assert_eq!(problems(&r.body["details"]).len(), 2, "{}", r.raw);
    assert!(b.get("/v1/vms/web").status == 404);

    // Bad mappings: a switch this host lacks, an exported switch no adapter is on.
    let here = switch(&b, "here");
    let r = b.post(
        "/v1/vms/import/check",
        json!({"source": source, "switch_mapping": {"lab": "nowhere", "frontend": "here", "backend": "none"}}),
    );
    let p = problems(&r.body);
    assert_eq!(p.len(), 2, "{}", r.raw);
    let unknown = p.iter().find(|x| x.0 == "UnknownSwitch").unwrap();
    assert!(
        unknown.1.contains("lab=nowhere") && unknown.1.contains("this host does not have"),
        "{}",
        unknown.1
    );
    let unused = p.iter().find(|x| x.0 == "UnusedSwitchMapping").unwrap();
    assert!(
        unused.1.contains("frontend=here") && unused.1.contains("no network adapter"),
        "{}",
        unused.1
    );
    let r = b.post(
        "/v1/vms/import",
        json!({"source": source, "mode": "copy", "switch_mapping": {"lab": "nowhere", "backend": "none"}}),
    );
    assert_eq!(r.code(), "ImportIncompatible", "{}", r.raw);
    assert_eq!(files(&folder), export_before, "the export folder changed");
    let mut data_after = b.snapshot();
    // The switch "here" made meanwhile is outside `vms/`; nothing else is new.
    data_after.retain(|(p, _)| !p.starts_with(b.data.join("switches")));
    assert_eq!(data_after, data_before, "the data dir changed");

    // The CLI's --switch: lab=here, backend=none imports; the VM's adapter A1 is
    // on "here", A2 stays disconnected, and in the checkpoint A2 is disconnected.
    let cli = cli();
    let run = |args: &[&str]| {
        let out = Command::new(&cli)
            .arg("--socket")
            .arg(&b.socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, text) = run(&["vm", "import", &source, "--check"]);
    assert_eq!(code, Some(5), "{text}");
    assert!(text.contains("[MissingSwitch]"), "{text}");
    let (code, text) = run(&["vm", "import", &source, "--check", "--switch", "lab"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("is not OLD=NEW"), "{text}");
    let mapped = ["--copy", "--switch", "lab=here", "--switch", "backend=none"];
    let (code, text) = run(&[&["vm", "import", &source, "--check"][..], &mapped[..]].concat());
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("lab -> switch here (by mapping)")
            && text.contains("backend -> disconnected (by mapping)"),
        "{text}"
    );
    let (code, text) = run(&[&["vm", "import", &source][..], &mapped[..]].concat());
    assert_eq!(code, Some(0), "{text}");
    let vm = b.get("/v1/vms/web").body;
    assert_eq!(
        adapter_switches(&vm["settings"]),
        vec![(A1.to_string(), Some(here.clone())), (A2.to_string(), None)],
        "{vm}"
    );
    let (code, text) = run(&["vm", "show", "web"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("switch {here}")), "{text}");
    completed(&b, "/v1/vms/web/checkpoints/first/apply", json!({}));
    let vm = b.get("/v1/vms/web").body;
    assert_eq!(
        adapter_switches(&vm["settings"]),
        vec![(A1.to_string(), Some(here.clone())), (A2.to_string(), None)],
        "the checkpoint's adapters: {vm}"
    );

    // A switch named "lab" on B (its own id) is matched by name without a mapping.
    let lab_b = switch(&b, "lab");
    assert_ne!(lab_b, lab_a);
    let req = json!({"source": source, "mode": "copy", "new_id": true, "name": "web2",
        "switch_mapping": {"backend": "none"}});
    let r = b.post("/v1/vms/import/check", req.clone());
    assert!(problems(&r.body).is_empty(), "{}", r.raw);
    let line = r.body["switches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["exported"] == "lab")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (line["matched_by"].as_str(), line["switch"].as_str()),
        (Some("name"), Some(lab_b.as_str())),
        "{}",
        r.raw
    );
    // Mapped twice, by name and by id, to different switches: refused.
    let r = b.post(
        "/v1/vms/import/check",
        json!({"source": source, "mode": "copy", "new_id": true, "name": "web2",
            "switch_mapping": {"backend": "none", "lab": "here", lab_a.clone(): "lab"}}),
    );
    let p = problems(&r.body);
    assert_eq!(p.len(), 1, "{}", r.raw);
    assert_eq!(p[0].0, "ConflictingSwitchMapping", "{}", r.raw);
    assert!(p[0].1.contains("lab=here"), "{}", p[0].1);
    completed(&b, "/v1/vms/import", req);
    let vm = b.get("/v1/vms/web2").body;
    let got = adapter_switches(&vm["settings"]);
    assert_eq!(got.len(), 2, "{vm}");
    assert_eq!(
        (&got[0].1, &got[1].1),
        (&Some(lab_b.clone()), &None),
        "{vm}"
    );

    // An export of an older Viridian (format 1) has switch ids only: matched by
    // id where it can be, else a MissingSwitch that says the name is unknown.
    let old = shared.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    let copied = old.join("web");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&folder)
        .arg(&copied)
        .status()
        .unwrap();
    assert!(status.success());
    let mut m = manifest.clone();
    m["format_version"] = json!(1);
    m.as_object_mut().unwrap().remove("switches");
    std::fs::write(copied.join("export.json"), m.to_string()).unwrap();
    let r = b.post(
        "/v1/vms/import/check",
        json!({"source": copied.display().to_string(), "mode": "copy", "new_id": true, "name": "web3"}),
    );
    let p = problems(&r.body);
    assert_eq!(p.len(), 2, "{}", r.raw);
    assert!(
        p.iter().all(|x| x.0 == "MissingSwitch"
            && x.1.contains("does not record its name")
            && (x.1.contains(&lab_a) || x.1.contains(&backend_a))),
        "{}",
        r.raw
    );
    let r = b.post(
        "/v1/vms/import/check",
        json!({"source": copied.display().to_string(), "mode": "copy", "new_id": true, "name": "web3",
            "switch_mapping": {lab_a.clone(): "lab", backend_a.clone(): "none"}}),
    );
    assert!(problems(&r.body).is_empty(), "{}", r.raw);
}
