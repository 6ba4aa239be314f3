//! One open disk used from several threads at once, as vhost-user multiqueue
//! and the NBD server use it: writes into the same blocks (different sectors),
//! reads, and flushes all racing. Afterwards every write reads back, in the open
//! disk and after a reopen, and the file checks clean.

use std::sync::{Arc, Barrier};
use std::thread;

use vhd::ops::check::check;
use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::{Disk, NoProgress};

const SIZE: u64 = 16 << 20;
const BLOCK: u32 = 256 << 10;
const THREADS: u64 = 4;
const SECTOR: u64 = 512;

fn new_disk(path: &std::path::Path, kind: NewDisk) {
    let opts = CreateOptions {
        kind,
        exact_size: true,
    };
    create(path, &opts, &mut NoProgress).unwrap();
}

/// Thread `t` owns every sector `s` with `s % THREADS == t`, 8 sectors at a
/// time, so the threads keep allocating and marking the same blocks.
fn owned_runs(t: u64) -> impl Iterator<Item = u64> {
    (0..SIZE / SECTOR / 8)
        .filter(move |run| run % THREADS == t)
        .map(|run| run * 8 * SECTOR)
}

fn value(t: u64, offset: u64) -> u8 {
    (1 + t * 50 + (offset / 4096) % 50) as u8
}

fn hammer(disk: Arc<dyn Disk>) {
    // In step: every round, all threads write into the same block together.
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let disk = disk.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                for (i, off) in owned_runs(t).enumerate() {
                    barrier.wait();
                    let buf = vec![value(t, off); 8 * SECTOR as usize];
                    disk.write_at(&buf, off).unwrap();
                    let mut back = vec![0u8; buf.len()];
                    disk.read_at(&mut back, off).unwrap();
                    assert!(back == buf, "thread {t} lost its write at {off}");
                    if i % 97 == 0 {
                        disk.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    disk.flush().unwrap();
}

fn assert_all_writes_read_back(disk: &dyn Disk) {
    let mut data = vec![0u8; SIZE as usize];
    disk.read_at(&mut data, 0).unwrap();
    for t in 0..THREADS {
        for off in owned_runs(t) {
            let run = &data[off as usize..(off + 8 * SECTOR) as usize];
            assert!(
                run.iter().all(|&b| b == value(t, off)),
                "bytes at {off} (thread {t}) are wrong"
            );
        }
    }
}

#[test]
fn threads_writing_the_same_blocks_of_a_differencing_disk_keep_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.avhd");
    new_disk(
        &base,
        NewDisk::Dynamic {
            size: SIZE,
            block_size: BLOCK,
        },
    );
    {
        let b = vhd::open(&base, false).unwrap();
        b.write_at(&vec![0xee; SIZE as usize], 0).unwrap();
        b.flush().unwrap();
    }
    new_disk(
        &child,
        NewDisk::Differencing {
            parent: base.clone(),
        },
    );
    let disk: Arc<dyn Disk> = Arc::from(vhd::open(&child, false).unwrap());
    hammer(disk.clone());
    assert_all_writes_read_back(disk.as_ref());
    drop(disk);
    assert!(check(&child, false).unwrap().clean());
    assert_all_writes_read_back(vhd::open(&child, true).unwrap().as_ref());
}

#[test]
fn threads_allocating_blocks_of_a_dynamic_disk_at_once_keep_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.vhd");
    new_disk(
        &path,
        NewDisk::Dynamic {
            size: SIZE,
            block_size: BLOCK,
        },
    );
    let disk: Arc<dyn Disk> = Arc::from(vhd::open(&path, false).unwrap());
    hammer(disk.clone());
    drop(disk);
    assert!(check(&path, false).unwrap().clean());
    let disk = vhd::open(&path, true).unwrap();
    assert_all_writes_read_back(disk.as_ref());
    // Every block was allocated exactly once: the file holds 64 blocks, no more.
    let blocks = SIZE / u64::from(BLOCK);
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert!(
        // Each block: its data and its bitmap sector, the data on a 64 KiB boundary.
        file_len < (blocks + 1) * (u64::from(BLOCK) + 64 * 1024) + 64 * 1024,
        "file of {file_len} bytes: blocks were allocated twice"
    );
}
