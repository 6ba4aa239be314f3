//! Disk operations through the service: each a job that ends Completed with the
//! files a user expects, or in Exception with a stable code.

mod common;

use common::{wait_job, Daemon};
use serde_json::json;

fn run(d: &Daemon, op: &str, body: serde_json::Value) -> serde_json::Value {
    let r = d.post(&format!("/v1/disks/{op}"), body);
    assert_eq!(r.status, 202, "{op}: {}", r.raw);
    assert!(r
        .header("location")
        .unwrap_or_default()
        .starts_with("/v1/jobs/"));
    let id = r.body["id"].as_str().unwrap().to_string();
    wait_job(d, &id)
}

#[test]
fn create_differencing_merge_and_convert_run_as_jobs() {
    let d = Daemon::start(&[]);
    let dir = d.dir.path();
    let base = dir.join("base.vhd");
    let child = dir.join("child.avhd");
    let flat = dir.join("flat.raw");

    let job = run(
        &d,
        "create",
        json!({"path": base, "kind": "dynamic", "size_bytes": 8 << 20}),
    );
    assert_eq!(job["state"], "Completed", "{job}");
    assert!(base.exists());
    let job = run(
        &d,
        "create",
        json!({"path": child, "kind": "differencing", "parent": base}),
    );
    assert_eq!(job["state"], "Completed", "{job}");
    {
        let disk = vhd::open(&child, false).unwrap();
        disk.write_at(&[0x5a; 4096], 1 << 20).unwrap();
        disk.flush().unwrap();
    }
    let job = run(&d, "merge", json!({"path": child}));
    assert_eq!(job["state"], "Completed", "{job}");
    assert!(!child.exists(), "the merged child is removed");

    let job = run(&d, "convert", json!({"path": base, "destination": flat}));
    assert_eq!(job["state"], "Completed", "{job}");
    let bytes = std::fs::read(&flat).unwrap();
    assert!(bytes[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x5a));

    // Merging a disk that is not differencing fails as a job with a stable code.
    let job = run(&d, "merge", json!({"path": base}));
    assert_eq!(job["state"], "Exception", "{job}");
    assert_eq!(job["error_code"], "InvalidDisk", "{job}");
}

#[test]
fn compact_and_resize_run_as_jobs_and_a_shrink_fails_with_a_reason() {
    let d = Daemon::start(&[]);
    let disk = d.dir.path().join("grow.vhd");
    let job = run(
        &d,
        "create",
        json!({"path": disk, "kind": "dynamic", "size_bytes": 8 << 20}),
    );
    assert_eq!(job["state"], "Completed", "{job}");
    let job = run(&d, "resize", json!({"path": disk, "size_bytes": 64 << 20}));
    assert_eq!(job["state"], "Completed", "{job}");
    assert!(vhd::open(&disk, true).unwrap().size() >= 64 << 20);
    let job = run(&d, "compact", json!({"path": disk}));
    assert_eq!(job["state"], "Completed", "{job}");
    let job = run(&d, "resize", json!({"path": disk, "size_bytes": 1 << 20}));
    assert_eq!(job["state"], "Exception", "{job}");
    assert!(
        job["error_description"]
            .as_str()
            .unwrap_or("")
            .contains("cannot shrink"),
        "{job}"
    );
}

#[test]
fn a_relative_path_creates_the_disk_in_the_data_dirs_virtual_hard_disks_folder() {
    let d = Daemon::start(&[]);
    let job = run(
        &d,
        "create",
        json!({"path": "web.vhd", "kind": "dynamic", "size_bytes": 4 << 20}),
    );
    assert_eq!(job["state"], "Completed", "{job}");
    assert!(d.data.join("Virtual Hard Disks").join("web.vhd").is_file());
}

#[test]
fn vhdx_names_create_vhdx_disks_and_their_chains_merge_as_jobs() {
    let d = Daemon::start(&[]);
    let dir = d.dir.path();
    let base = dir.join("base.vhdx");
    let child = dir.join("base_1.avhdx");
    let job = run(
        &d,
        "create",
        json!({"path": base, "kind": "dynamic", "size_bytes": 64 << 20}),
    );
    assert_eq!(job["state"], "Completed", "{job}");
    assert_eq!(&std::fs::read(&base).unwrap()[..8], b"vhdxfile");
    let job = run(
        &d,
        "create",
        json!({"path": child, "kind": "differencing", "parent": base}),
    );
    assert_eq!(job["state"], "Completed", "{job}");
    assert_eq!(&std::fs::read(&child).unwrap()[..8], b"vhdxfile");
    {
        let disk = vhd::open(&child, false).unwrap();
        assert_eq!(disk.size(), 64 << 20);
        disk.write_at(&[0x77; 8192], 3 << 20).unwrap();
        disk.flush().unwrap();
    }
    let job = run(&d, "merge", json!({"path": child}));
    assert_eq!(job["state"], "Completed", "{job}");
    assert!(!child.exists());
    let mut got = [0u8; 8192];
    vhd::open(&base, true)
        .unwrap()
        .read_at(&mut got, 3 << 20)
        .unwrap();
    assert!(got.iter().all(|&b| b == 0x77));
}

/// `POST /v1/disks/{op}` answers 422 InvalidParameter naming the limit, starts
/// no job and leaves no file.
fn refused(d: &Daemon, op: &str, body: serde_json::Value, limit: &str) {
    let jobs_before = d.get("/v1/jobs").body.as_array().map_or(0, Vec::len);
    let r = d.post(&format!("/v1/disks/{op}"), body.clone());
    assert_eq!(
        (r.status, r.code()),
        (422, "InvalidParameter"),
        "{body}: {}",
        r.raw
    );
    let message = r.body["message"].as_str().unwrap_or_default();
    assert!(message.contains(limit), "{body}: {message}");
    let jobs_after = d.get("/v1/jobs").body.as_array().map_or(0, Vec::len);
    assert_eq!(jobs_after, jobs_before, "{body} started a job");
}

#[test]
fn create_with_a_size_past_the_formats_maximum_is_refused_before_any_job() {
    let d = Daemon::start(&[]);
    let dir = d.dir.path();
    for size in [u64::MAX, u64::MAX - 1, (64u64 << 40) + 1] {
        for kind in ["dynamic", "fixed"] {
            let path = dir.join("big.vhdx");
            refused(
                &d,
                "create",
                json!({"path": path, "kind": kind, "size_bytes": size}),
                &format!("size {size} bytes is beyond the VHDX maximum of 64 TiB"),
            );
            assert!(!path.exists());
        }
    }
    for size in [u64::MAX, (2040u64 << 30) + 1] {
        let path = dir.join("big.vhd");
        refused(
            &d,
            "create",
            json!({"path": path, "kind": "dynamic", "size_bytes": size, "block_size_bytes": 512}),
            &format!("size {size} bytes is beyond the VHD maximum of 2040 GiB"),
        );
        assert!(!path.exists());
    }
    // Not even a temporary file was made.
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("big."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn resize_to_a_size_past_the_formats_maximum_is_refused_before_any_job() {
    let d = Daemon::start(&[]);
    let dir = d.dir.path();
    for (name, limit) in [
        ("r.vhdx", "beyond the VHDX maximum of 64 TiB"),
        ("r.vhd", "beyond the VHD maximum of 2040 GiB"),
    ] {
        let path = dir.join(name);
        let job = run(
            &d,
            "create",
            json!({"path": path, "kind": "dynamic", "size_bytes": 8 << 20}),
        );
        assert_eq!(job["state"], "Completed", "{job}");
        let size = vhd::open(&path, true).unwrap().size();
        for to in [u64::MAX, u64::MAX - 511, (64u64 << 40) + 1] {
            refused(&d, "resize", json!({"path": path, "size_bytes": to}), limit);
            assert_eq!(vhd::open(&path, true).unwrap().size(), size, "{name}");
        }
    }
}
