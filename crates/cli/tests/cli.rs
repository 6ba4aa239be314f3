//! The `viridian` CLI against a real `viridiand`: output, --json, exit codes, jobs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `viridiand` next to `viridian`; built on demand when only this crate was built.
fn viridiand() -> PathBuf {
    let cli = Path::new(env!("CARGO_BIN_EXE_viridian"));
    let daemon = cli.with_file_name("viridiand");
    if !daemon.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "daemon", "--bin", "viridiand"]);
        if cli.to_string_lossy().contains("/release/") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cannot build viridiand for the CLI tests"
        );
    }
    daemon
}

struct Daemon {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Child,
}

impl Daemon {
    fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("v.sock");
        let child = Command::new(viridiand())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(&socket)
            // The tests keep their disks beside the data dir.
            .arg("--storage-root")
            .arg(dir.path())
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "viridiand did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { dir, socket, child }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_viridian"))
            .env("VIRIDIAN_SOCKET", &self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// A small dynamic disk made by the offline tool (`viridian vhd create`).
    fn disk(&self, path: &std::path::Path) {
        let out = self.cli(&["vhd", "create", path.to_str().unwrap(), "--size", "1M"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Starts the diagnostic sleep job over raw HTTP and returns its id.
    fn sleep_job(&self, ms: u64) -> String {
        let body = format!("{{\"milliseconds\":{ms}}}");
        let mut s = UnixStream::connect(&self.socket).unwrap();
        let req = format!(
            "POST /v1/diagnostics/sleep-job HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let json: Value = serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
        json["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[test]
fn vm_commands_work_by_name_or_id_with_text_and_json_output() {
    let d = Daemon::start();
    let vm = d.json(&[
        "vm",
        "create",
        "web 01",
        "--cpus",
        "2",
        "--memory",
        "1G",
        "--generation",
        "1",
    ]);
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["settings"]["memory"]["startup_mib"], 1024);

    let out = d.cli(&["vm", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("web 01") && text.contains("Off") && text.contains("1 GiB"),
        "{text}"
    );

    let shown = d.json(&["vm", "show", &id]);
    assert_eq!(shown["name"], "web 01");
    let out = d.cli(&["vm", "show", "web 01"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Settings (what is configured)")
            && text.contains("Runtime (what is running now)")
    );

    let p = d.json(&[
        "vm",
        "processor",
        "set",
        "web 01",
        "--reserve",
        "10",
        "--limit",
        "50",
        "--weight",
        "300",
    ]);
    assert_eq!(
        (
            p["reserve_percent"].as_u64(),
            p["limit_percent"].as_u64(),
            p["relative_weight"].as_u64()
        ),
        (Some(10), Some(50), Some(300))
    );

    let disk = d.dir.path().join("boot.vhd");
    d.disk(&disk);
    let drive = d.json(&[
        "vm",
        "disk",
        "add",
        "web 01",
        disk.to_str().unwrap(),
        "--controller",
        "ide",
    ]);
    assert_eq!(drive["slot"]["location"], 0);
    let dvd = d.json(&[
        "vm",
        "dvd",
        "add",
        "web 01",
        "--controller",
        "ide",
        "--number",
        "1",
        "--location",
        "0",
    ]);
    assert_eq!(dvd["media"]["type"], "dvd");
    let moved = d.dir.path().join("moved.vhd");
    std::fs::rename(&disk, &moved).unwrap();
    let repointed = d.json(&[
        "vm",
        "disk",
        "set",
        "web 01",
        moved.to_str().unwrap(),
        "--controller",
        "ide",
        "--number",
        "0",
        "--location",
        "0",
    ]);
    assert_eq!(repointed["media"]["path"], moved.to_str().unwrap());
    let out = d.cli(&[
        "vm",
        "disk",
        "remove",
        "web 01",
        "--controller",
        "ide",
        "--number",
        "0",
        "--location",
        "0",
    ]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "removed the drive at ide 0:0 from web 01\n"
    );

    let renamed = d.json(&["vm", "set", &id, "--name", "web02", "--memory", "512M"]);
    assert_eq!(renamed["settings"]["memory"]["startup_mib"], 512);
    assert_eq!(code(&d.cli(&["vm", "delete", "web02"])), 0);
    assert_eq!(d.json(&["vm", "list"])["vms"], serde_json::json!([]));
}

#[test]
fn exit_codes_tell_scripts_what_went_wrong() {
    let d = Daemon::start();
    d.json(&["vm", "create", "a", "--cpus", "1", "--memory", "256"]);
    d.json(&["vm", "create", "b", "--cpus", "1", "--memory", "256"]);
    let disk = d.dir.path().join("shared.vhdx");
    d.disk(&disk);
    d.json(&[
        "vm",
        "disk",
        "add",
        "a",
        disk.to_str().unwrap(),
        "--controller",
        "scsi",
    ]);

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["vm", "show", "nope"], 4, "NotFound"),
        (
            vec!["vm", "create", "x", "--cpus", "0", "--memory", "256"],
            5,
            "InvalidParameter",
        ),
        (
            vec!["vm", "create", "a", "--cpus", "1", "--memory", "256"],
            7,
            "AlreadyExists",
        ),
        (
            vec![
                "vm",
                "disk",
                "add",
                "b",
                disk.to_str().unwrap(),
                "--controller",
                "scsi",
            ],
            8,
            "InUse",
        ),
        (
            vec!["vm", "processor", "set", "a", "--weight", "0"],
            5,
            "InvalidParameter",
        ),
    ];
    for (args, want, code_name) in cases {
        let mut all = vec!["--json"];
        all.extend(args.iter().copied());
        let out = d.cli(&all);
        assert_eq!(
            code(&out),
            want,
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err: Value = serde_json::from_slice(&out.stderr).unwrap();
        assert_eq!(err["code"], code_name);
    }
    let out = d.cli(&["vm", "create", "x", "--cpus", "1", "--memory", "12Q"]);
    assert_eq!(code(&out), 2, "bad command line");
    let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["--socket", "/nonexistent/v.sock", "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 3, "daemon unreachable");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach viridiand"));
}

#[test]
fn job_wait_cancel_and_timeout_have_their_own_exit_codes() {
    let d = Daemon::start();
    let quick = d.sleep_job(100);
    let done = d.json(&["job", "wait", &quick]);
    assert_eq!(done["state"], "Completed");
    assert_eq!(done["state_number"], 7);

    let long = d.sleep_job(60_000);
    let out = d.cli(&["job", "wait", &long, "--timeout", "0.3"]);
    assert_eq!(code(&out), 12, "{}", String::from_utf8_lossy(&out.stderr));
    let listed = d.json(&["job", "list"]);
    assert!(listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == long.as_str()));
    assert_eq!(code(&d.cli(&["job", "cancel", &long])), 0);
    let out = d.cli(&["job", "wait", &long]);
    assert_eq!(code(&out), 11, "a cancelled job exits 11");
    assert_eq!(d.json(&["job", "show", &long])["state"], "Terminated");
    let out = d.cli(&["job", "cancel", &long]);
    assert_eq!(code(&out), 6, "cancelling a finished job is InvalidState");
}

#[test]
fn host_and_completions() {
    let d = Daemon::start();
    let host = d.json(&["host"]);
    assert!(host["accelerator"]["reason"].as_str().is_some());
    let out = d.cli(&["host"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "firmware:    generation 1: {}",
            host["firmware"]["generation1"].as_str().unwrap()
        )),
        "{text}"
    );
    let out = d.cli(&["completions", "bash"]);
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("viridian"));
}

#[test]
fn remote_host_over_tls_with_token_and_refused_without() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--listen", &addr]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "TCP listener did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = d.dir.path().join("data");
    let token = std::fs::read_to_string(data.join("token"))
        .unwrap()
        .trim()
        .to_string();
    let cert = data.join("tls/cert.pem");
    let remote = |token: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_viridian"))
            .env_remove("VIRIDIAN_SOCKET")
            .args([
                "--host",
                &addr,
                "--token",
                token,
                "--ca-cert",
                cert.to_str().unwrap(),
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = remote(
        &token,
        &[
            "--json", "vm", "create", "remote1", "--cpus", "1", "--memory", "256",
        ],
    );
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let out = remote(&token, &["vm", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("remote1"));
    let out = remote("wrong-token", &["vm", "list"]);
    assert_eq!(code(&out), 9, "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["--host", &addr, "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "--host without --token is a usage error");
}

#[test]
fn host_defaults_reach_new_vms_only_and_processor_set_all_changes_every_vm() {
    let d = Daemon::start();
    d.json(&["vm", "create", "before", "--cpus", "1", "--memory", "64M"]);
    let host = d.json(&[
        "host",
        "set",
        "--default-reserve",
        "20",
        "--default-weight",
        "300",
    ]);
    assert_eq!(host["new_vm_defaults"]["reserve_percent"], 20, "{host}");
    assert_eq!(host["new_vm_defaults"]["limit_percent"], 100, "{host}");
    let out = d.cli(&["host", "set", "--default-weight", "0"]);
    assert_eq!(code(&out), 5, "{}", String::from_utf8_lossy(&out.stderr));
    let vm = d.json(&["vm", "create", "after", "--cpus", "1", "--memory", "64M"]);
    assert_eq!(vm["settings"]["processor"]["reserve_percent"], 20, "{vm}");
    assert_eq!(vm["settings"]["processor"]["relative_weight"], 300, "{vm}");
    // Existing VMs keep theirs.
    let before = d.json(&["vm", "show", "before"]);
    assert_eq!(before["settings"]["processor"]["reserve_percent"], 0);

    let all = d.json(&["vm", "processor", "set", "--all", "--limit", "60"]);
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    for name in ["before", "after"] {
        let vm = d.json(&["vm", "show", name]);
        assert_eq!(vm["settings"]["processor"]["limit_percent"], 60, "{vm}");
    }
    let text = d.cli(&["host"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("new VMs:     reserve 20 %, limit 100 %, weight 300"),
        "{text}"
    );
    assert!(text.contains("running VMs reserve 0 %"), "{text}");
    assert!(d.dir.path().join("data/host.json").exists());
}

#[test]
fn vm_move_storage_and_delete_wait_for_their_jobs_and_say_where_the_disks_went() {
    let d = Daemon::start();
    d.json(&["vm", "create", "m", "--cpus", "1", "--memory", "256"]);
    let disk = d.dir.path().join("m.vhdx");
    let out = d.cli(&["vhd", "create", disk.to_str().unwrap(), "--size", "8M"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    d.json(&[
        "vm",
        "disk",
        "add",
        "m",
        disk.to_str().unwrap(),
        "--controller",
        "scsi",
    ]);
    let full = d.dir.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let out = d.cli(&["vm", "move-storage", "m", full.to_str().unwrap()]);
    assert_eq!(code(&out), 5, "{}", String::from_utf8_lossy(&out.stderr));

    let dest = d.dir.path().join("dest");
    let out = d.cli(&["vm", "move-storage", "m", dest.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let moved = dest.join("Virtual Hard Disks").join("m.vhdx");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("now at {}", moved.display())),
        "{text}"
    );
    assert!(moved.exists() && !disk.exists());

    let out = d.cli(&["vm", "delete", "m", "--delete-disks"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("deleted {}", moved.display())),
        "{text}"
    );
    assert!(!moved.exists());
    assert_eq!(d.json(&["vm", "list"])["vms"], serde_json::json!([]));
}

#[test]
fn vhd_resize_replaces_the_disk_with_a_resized_copy_unless_in_place() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "viridian {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for name in ["d.vhdx", "d.vhd"] {
        let disk = dir.path().join(name);
        let d = disk.to_str().unwrap();
        run(&["vhd", "create", d, "--size", "64M"]);
        // Data in the disk, through QEMU's own driver.
        let io = Command::new("qemu-io")
            .args(["-f", if name.ends_with('x') { "vhdx" } else { "vpc" }])
            .args(["-c", "write -P 0x5a 1M 2M", d])
            .output()
            .unwrap();
        assert!(
            io.status.success(),
            "{}",
            String::from_utf8_lossy(&io.stderr)
        );
        let before = std::fs::metadata(&disk).unwrap().ino();
        let said = run(&["vhd", "resize", d, "--size", "128M"]);
        assert!(said.contains("-> 1342"), "{said}");
        // A new file under the name, nothing left beside it, the data the same.
        assert_ne!(std::fs::metadata(&disk).unwrap().ino(), before);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        let info = run(&["vhd", "info", d, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert!(
            v["virtual_size"].as_u64().unwrap_or(0) >= 128 << 20,
            "{info}"
        );
        run(&["vhd", "check", d]);
        if name.ends_with('x') {
            // QEMU's vpc driver has no check.
            let check = Command::new("qemu-img")
                .args(["check", d])
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{}",
                String::from_utf8_lossy(&check.stdout)
            );
        }
        let read = Command::new("qemu-io")
            .args(["-f", if name.ends_with('x') { "vhdx" } else { "vpc" }])
            .args(["-c", "read -P 0x5a 1M 2M", d])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&read.stdout);
        assert!(
            read.status.success() && !text.contains("Pattern verification failed"),
            "{text}"
        );
        // In place: the same file, grown.
        let inode = std::fs::metadata(&disk).unwrap().ino();
        run(&["vhd", "resize", d, "--size", "192M", "--in-place"]);
        assert_eq!(std::fs::metadata(&disk).unwrap().ino(), inode);
    }
}

/// Output into a pipe whose reader has gone (`viridian ... | head`) ends the CLI
/// by SIGPIPE, as other tools end, not by a panic.
#[test]
fn a_closed_output_pipe_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // The reader is gone before the CLI writes its first byte.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
}
