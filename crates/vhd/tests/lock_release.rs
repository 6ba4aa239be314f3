//! A closed disk is unlocked at once, even while a process forked by another
//! thread still holds copies of its descriptors (until that process execs).

use vhd::vhd1::create::{create, CreateOptions, NewDisk};

#[test]
fn a_closed_disk_opens_again_while_a_forked_child_still_holds_its_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let o = CreateOptions {
        kind: NewDisk::Dynamic {
            size: 8 << 20,
            block_size: 2 << 20,
        },
        exact_size: true,
    };
    create(&path, &o, &mut vhd::NoProgress).unwrap();
    let raw = dir.path().join("r.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();

    let disk = vhd::open(&path, false).unwrap();
    let raw_disk = vhd::RawDisk::open(&raw, false).unwrap();
    // SAFETY: the child only sleeps and exits (async-signal-safe calls), holding
    // the inherited descriptors the way a child between fork and exec does.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: as above; _exit never returns.
        unsafe {
            libc::sleep(3);
            libc::_exit(0);
        }
    }
    drop(disk);
    drop(raw_disk);
    let again = vhd::open(&path, false);
    let raw_again = vhd::RawDisk::open(&raw, false);
    // SAFETY: reaping the child this test forked.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    again.expect("the VHD is free once closed");
    raw_again.expect("the raw file is free once closed");
}
