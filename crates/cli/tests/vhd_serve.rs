//! `viridian vhd serve` exports a disk over NBD that QEMU's own tools read and write.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the server if a test fails before it stopped it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops the server with `signal` and returns whether it exited successfully.
fn stop(server: &mut KillOnDrop, signal: i32) -> bool {
    // SAFETY: kill only sends a signal to the child this test spawned.
    unsafe { libc::kill(server.0.id() as i32, signal) };
    server.0.wait().unwrap().success()
}

/// `viridian vhd serve <options> <image> --socket <sock>`.
fn serve_command(options: &[&str], image: &Path, sock: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_viridian"));
    command
        .args(["vhd", "serve"])
        .args(options)
        .arg(image)
        .arg("--socket")
        .arg(sock);
    command
}

/// Starts [`serve_command`], waits for the socket to appear, and returns the
/// server and its NBD URI.
fn serve(options: &[&str], image: &Path, sock: &Path) -> (KillOnDrop, String) {
    let server = KillOnDrop(
        serve_command(options, image, sock)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(sock);
    (server, format!("nbd+unix://?socket={}", sock.display()))
}

fn qemu_io(args: &[&str], uri: &str) -> std::process::Output {
    qemu_io_with(&[], args, uri)
}

fn qemu_io_with(options: &[&str], args: &[&str], uri: &str) -> std::process::Output {
    Command::new("qemu-io")
        .args(options)
        .args(["-f", "raw"])
        .args(args.iter().flat_map(|a| ["-c", a]))
        .arg(uri)
        .output()
        .expect("qemu-io runs (qemu-utils)")
}

#[test]
fn serve_exports_a_disk_that_qemu_io_writes_and_qemu_img_compares() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let sock = dir.path().join("nbd.sock");
    let (mut server, uri) = serve(&[], &image, &sock);

    let out = qemu_io(
        &["write -P 0x5a 1M 256k", "flush", "read -P 0x5a 1M 256k"],
        &uri,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verification failed"),
        "{text}"
    );

    // A second client sees the first one's writes (one shared disk, multi-conn).
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&uri)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "{}",
        String::from_utf8_lossy(&compare.stdout)
    );

    // SIGTERM stops the server cleanly and removes the socket.
    assert!(stop(&mut server, libc::SIGTERM), "serve exits 0 on SIGTERM");
    assert!(!sock.exists(), "the socket is removed on exit");
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[1 << 20..(1 << 20) + (256 << 10)]
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn serve_read_only_refuses_writes_and_leaves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![9u8; 1 << 20]).unwrap();
    let sock = dir.path().join("nbd.sock");
    let (mut server, uri) = serve(&["--read-only"], &image, &sock);
    let write = qemu_io(&["write -P 1 0 4096"], &uri);
    assert!(
        !write.status.success(),
        "a write to a read-only export fails"
    );
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&write.stderr)
    );
    let read = qemu_io_with(&["-r"], &["read -P 9 0 4096"], &uri);
    assert!(String::from_utf8_lossy(&read.stdout).contains("read 4096/4096"));
    assert!(stop(&mut server, libc::SIGINT), "serve exits 0 on SIGINT");
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 9));
}

#[test]
fn serve_refuses_a_socket_path_that_exists() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("taken");
    std::fs::write(&sock, b"").unwrap();
    let out = serve_command(&[], &image, &sock).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}
