//! The server's life cycle without a front end doing I/O: it stops promptly whether
//! or not a front end came and went, and removes its socket.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn disk(dir: &std::path::Path) -> Arc<dyn vhd::Disk> {
    let path = dir.join("d.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    Arc::new(vhd::RawDisk::open(&path, false).unwrap())
}

fn stop_within(server: vhost_blk::Server, limit: Duration) {
    let socket = server.socket().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(server.stop()).unwrap());
    let result = rx
        .recv_timeout(limit)
        .expect("the server did not stop in time");
    result.unwrap();
    assert!(!socket.exists(), "the socket was left behind");
}

#[test]
fn server_stops_promptly_with_no_front_end_ever() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let server = vhost_blk::Server::start(disk(dir.path()), &sock, Default::default()).unwrap();
    assert!(sock.exists());
    stop_within(server, Duration::from_secs(5));
}

#[test]
fn server_stops_promptly_after_a_front_end_came_and_went() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let server = vhost_blk::Server::start(disk(dir.path()), &sock, Default::default()).unwrap();
    let start = Instant::now();
    drop(UnixStream::connect(&sock).unwrap());
    std::thread::sleep(Duration::from_millis(200));
    // A second front end is accepted after the first left.
    drop(UnixStream::connect(&sock).unwrap());
    std::thread::sleep(Duration::from_millis(200));
    stop_within(server, Duration::from_secs(5));
    assert!(start.elapsed() < Duration::from_secs(6));
}

#[test]
fn server_stops_promptly_while_a_front_end_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let server = vhost_blk::Server::start(disk(dir.path()), &sock, Default::default()).unwrap();
    let _front = UnixStream::connect(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    stop_within(server, Duration::from_secs(5));
}

#[test]
fn a_socket_path_that_cannot_be_bound_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("no-such-dir").join("blk.sock");
    let err = vhost_blk::Server::start(disk(dir.path()), &sock, Default::default())
        .err()
        .expect("binding in a missing folder fails");
    assert!(err.to_string().contains("no-such-dir/blk.sock"), "{err}");
}
