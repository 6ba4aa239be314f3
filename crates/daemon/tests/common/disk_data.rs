//! Disks with known data for the delete and move tests: bases made through `vhd`,
//! pseudo-random writes, digests of what a chain reads, jobs run to their end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{wait_job, Daemon};

pub const SIZE: u64 = 32 << 20;

/// A dynamic VHD or VHDX (by the name's extension) of `SIZE` with 2 MiB blocks.
pub fn make_base(path: &Path) {
    make_base_of(path, SIZE)
}

/// [`make_base`] of `size` bytes.
pub fn make_base_of(path: &Path, size: u64) {
    vhd::create_dynamic(path, size, Some(2 << 20)).unwrap();
}

/// A differencing disk on `parent`.
pub fn make_child(path: &Path, parent: &Path) {
    vhd::create_child(path, parent).unwrap();
}

/// Writes `len` bytes of a pseudo-random stream seeded by `seed` at `offset`.
pub fn write_noise(path: &Path, seed: u64, offset: u64, len: u64) {
    let d = vhd::open(path, false).unwrap();
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = (len - done).min(buf.len() as u64) as usize;
        d.write_at(&buf[..n], offset + done).unwrap();
        done += n as u64;
    }
    d.flush().unwrap();
}

/// Writes noise into every disk the VM has now, in drive order: `len` bytes at
/// `offset`, seeded `seed` for the first drive, `seed + 1` for the next, and so on.
pub fn write_noise_to_disks(d: &Daemon, vm: &str, seed: u64, offset: u64, len: u64) {
    for (i, p) in disks(d, vm).iter().enumerate() {
        write_noise(p, seed + i as u64, offset, len);
    }
}

/// A digest of everything the chain under `leaf` reads.
pub fn content_hash(leaf: &Path) -> u64 {
    use std::hash::Hasher;
    let d = vhd::open(leaf, true).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < d.size() {
        let n = (d.size() - off).min(buf.len() as u64) as usize;
        d.read_at(&mut buf[..n], off).unwrap();
        h.write(&buf[..n]);
        off += n as u64;
    }
    h.finish()
}

pub fn chain(leaf: &Path) -> Vec<PathBuf> {
    vhd::ops::info::info(leaf).unwrap().chain
}

/// The VM's hard-disk paths, in drive order.
pub fn disks(d: &Daemon, vm: &str) -> Vec<PathBuf> {
    let r = d.get(&format!("/v1/vms/{vm}"));
    assert_eq!(r.status, 200, "{}", r.raw);
    r.body["settings"]["drives"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["media"]["path"].as_str().map(PathBuf::from))
        .collect()
}

pub fn add_disk(d: &Daemon, vm: &str, location: u8, path: &Path) {
    let r = d.post(
        &format!("/v1/vms/{vm}/drives"),
        json!({"controller": "scsi", "controller_number": 0, "location": location,
               "media": {"type": "hard_disk", "path": path}}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
}

/// Creates the VM `vm` with two base disks in the daemon's folder, `{vm}-0.vhd` at
/// SCSI 0:0 and `{vm}-1.vhdx` at SCSI 0:1, each with `len` bytes of noise at its
/// start (seeds 1 and 2); returns the bases.
pub fn vm_with_vhd_and_vhdx(d: &Daemon, vm: &str, len: u64) -> Vec<PathBuf> {
    d.create_vm(vm);
    let bases = vec![
        d.dir.path().join(format!("{vm}-0.vhd")),
        d.dir.path().join(format!("{vm}-1.vhdx")),
    ];
    for (i, b) in bases.iter().enumerate() {
        make_base(b);
        write_noise(b, 1 + i as u64, 0, len);
        add_disk(d, vm, i as u8, b);
    }
    bases
}

/// Sends a request that answers 202 and waits for its job to end; returns the job.
pub fn run_job_any(d: &Daemon, method: &str, path: &str, body: Option<Value>) -> Value {
    let r = d.req(method, path, body.map(|b| b.to_string()).as_deref());
    assert_eq!(r.status, 202, "{method} {path}: {}", r.raw);
    assert!(r
        .header("location")
        .is_some_and(|l| l.starts_with("/v1/jobs/")));
    finish(d, r.body["id"].as_str().unwrap())
}

/// Waits for job `id` to end.
pub fn finish(d: &Daemon, id: &str) -> Value {
    let mut job = wait_job(d, id);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !matches!(
        job["state"].as_str(),
        Some("Completed" | "Exception" | "Terminated" | "Killed")
    ) {
        assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
        job = wait_job(d, id);
    }
    job
}

/// Like [`run_job_any`], and the job must complete.
pub fn run_job(d: &Daemon, method: &str, path: &str, body: Option<Value>) -> Value {
    let job = run_job_any(d, method, path, body);
    assert_eq!(job["state"], "Completed", "{job}\nlog:\n{}", d.log());
    job
}

/// POSTs `body` to `path` (a job) and waits for the job to end; returns the job.
pub fn post_job(d: &Daemon, path: &str, body: Value) -> Value {
    run_job_any(d, "POST", path, Some(body))
}

/// Like [`post_job`], and the job must complete.
pub fn post_completed(d: &Daemon, path: &str, body: Value) -> Value {
    run_job(d, "POST", path, Some(body))
}

/// The names of the checkpoints in a `GET /v1/vms/{vm}/checkpoints` answer, in order.
pub fn checkpoint_names(tree: &Value) -> Vec<&str> {
    tree["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

/// Takes checkpoint `name`; returns its id.
pub fn checkpoint(d: &Daemon, vm: &str, name: &str) -> String {
    let job = run_job(
        d,
        "POST",
        &format!("/v1/vms/{vm}/checkpoints"),
        Some(json!({ "name": name })),
    );
    affected(&job, "checkpoint")[0].clone()
}

/// The ids of the job's affected elements of `kind`.
pub fn affected(job: &Value, kind: &str) -> Vec<String> {
    job["affected_elements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind)
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

/// Every file under `dir` (recursively), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Waits until the daemon's log says a job stalled for a crash test.
pub fn wait_stalled(d: &Daemon, needle: &str, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !d.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "never stalled at {step}; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
