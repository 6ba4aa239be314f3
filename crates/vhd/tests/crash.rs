//! Crash tests: the engine's writes are cut off after the N-th write or flush,
//! for every N through create, allocating writes, merge and compact. After each
//! cut the files are reopened with the real storage: the image must open,
//! `check` must be clean, every write flushed before the cut must read back,
//! and every other sector must read as its old or one of its new contents.
//!
//! Each test prints how many crash points it tried (`--nocapture` to see them).

use std::path::{Path, PathBuf};

use vhd::crash::{for_every_crash_point, AfterCrash, CrashStorage};
use vhd::ops::check::check;
use vhd::vhd1::create::{create, create_on, CreateOptions, NewDisk};
use vhd::{Disk, NoProgress};

mod common;
use common::Model;

const MODES: [AfterCrash; 3] = [
    AfterCrash::KeepAllWrites,
    AfterCrash::LoseUnflushedWrites,
    AfterCrash::KeepOnlyLastUnflushedWrite,
];
const SECTOR: usize = 512;
const SIZE: u64 = 4 << 20;
const BLOCK: u32 = 64 << 10;
const LIMIT: u64 = 10_000;

fn new_disk(path: &Path, kind: NewDisk) {
    let opts = CreateOptions {
        kind,
        exact_size: true,
    };
    create(path, &opts, &mut NoProgress).unwrap();
}

fn dynamic(size: u64) -> NewDisk {
    NewDisk::Dynamic {
        size,
        block_size: BLOCK,
    }
}

fn assert_clean(path: &Path, n: u64) {
    let report = check(path, false).unwrap();
    assert!(
        report.clean(),
        "crash point {n}: check of {} found {:?}",
        path.display(),
        report.problems
    );
}

fn read_all(path: &Path) -> Vec<u8> {
    let disk = vhd::open(path, true).unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

/// After a crash, the disk still takes new allocating writes that survive a reopen.
fn assert_still_writable(path: &Path, n: u64) {
    let disk = vhd::open(path, false).unwrap();
    let last = disk.size() - SECTOR as u64;
    disk.write_at(&[0x5a; SECTOR], last).unwrap();
    disk.flush().unwrap();
    drop(disk);
    assert_clean(path, n);
    let disk = vhd::open(path, true).unwrap();
    let mut buf = [0u8; SECTOR];
    disk.read_at(&mut buf, last).unwrap();
    assert_eq!(
        buf, [0x5a; SECTOR],
        "crash point {n}: write after the crash lost"
    );
}

#[test]
fn create_leaves_no_disk_or_a_complete_one_at_every_crash_point() {
    let mut tried = 0;
    for mode in MODES {
        for kind in ["fixed", "dynamic", "differencing"] {
            tried += for_every_crash_point(mode, LIMIT, |storage, n| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("new.vhd");
                let base = dir.path().join("base.vhd");
                let opts = CreateOptions {
                    kind: match kind {
                        "fixed" => NewDisk::Fixed { size: SIZE },
                        "dynamic" => dynamic(SIZE),
                        _ => {
                            new_disk(&base, dynamic(SIZE));
                            NewDisk::Differencing {
                                parent: base.clone(),
                            }
                        }
                    },
                    exact_size: true,
                };
                let result = create_on(storage, &path, &opts, &mut NoProgress);
                storage.power_cut().unwrap();
                if !storage.tripped() {
                    assert!(result.is_ok(), "{kind}: {result:?}");
                }
                if path.exists() {
                    assert_clean(&path, n);
                    assert_eq!(read_all(&path), vec![0u8; SIZE as usize], "{kind} at {n}");
                    assert_still_writable(&path, n);
                } else {
                    assert!(
                        result.is_err(),
                        "{kind} at {n}: create said Ok without a file"
                    );
                }
            });
        }
    }
    println!("create: {tried} crash points tried");
    assert!(
        tried > 20,
        "only {tried} crash points: the harness cut nothing"
    );
}

/// Writes of every shape the engine treats differently: whole blocks, parts of
/// new and of allocated blocks, runs across blocks, rewrites; flushes between.
fn workload() -> Vec<Option<(usize, usize)>> {
    let spb = BLOCK as usize / SECTOR;
    vec![
        Some((0, spb)),           // whole new block
        Some((spb + 3, 5)),       // part of a new block
        None,                     // flush
        Some((spb + 10, 2)),      // more of an allocated block
        Some((3 * spb - 4, 8)),   // across two new blocks
        Some((5 * spb, 2 * spb)), // two whole blocks
        None,
        Some((spb + 3, 1)),         // rewrite
        Some((7 * spb, spb)),       // whole block, unflushed at the end
        Some((20 * spb + 100, 30)), // part of a far block
        None,
        Some((spb + 4, spb - 4)), // the rest of block 1
        Some((40 * spb + 7, 1)),  // a single sector, never flushed
    ]
}

/// Runs the workload on `disk` from the chain at `path`, recording in `model`
/// what each completed step made possible. Stops at the first failure (the cut).
fn run_workload(disk: &dyn Disk, model: &mut Model) {
    for (i, step) in workload().into_iter().enumerate() {
        let ok = match step {
            None => {
                let ok = disk.flush().is_ok();
                if ok {
                    model.flushed();
                }
                ok
            }
            Some((first, count)) => {
                let value = 1 + (i as u8 % 100);
                model.writing(first, count, value);
                let buf = vec![value; count * SECTOR];
                disk.write_at(&buf, (first * SECTOR) as u64).is_ok()
            }
        };
        if !ok {
            return;
        }
    }
}

/// A parent whose blocks read as 0xc0 + block number, in every other block.
fn patterned_parent(path: &Path) -> Vec<u8> {
    new_disk(path, dynamic(SIZE));
    let disk = vhd::open(path, false).unwrap();
    for b in (0..SIZE / u64::from(BLOCK)).step_by(2) {
        let v = 0xc0 + (b as u8 % 0x30);
        disk.write_at(&vec![v; BLOCK as usize], b * u64::from(BLOCK))
            .unwrap();
    }
    disk.flush().unwrap();
    drop(disk);
    read_all(path)
}

#[test]
fn allocating_writes_keep_flushed_data_at_every_crash_point() {
    let mut tried = 0;
    for mode in MODES {
        for differencing in [false, true] {
            tried += for_every_crash_point(mode, LIMIT, |storage: &CrashStorage, n| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("disk.vhd");
                let initial = if differencing {
                    let base = dir.path().join("base.vhd");
                    let content = patterned_parent(&base);
                    new_disk(&path, NewDisk::Differencing { parent: base });
                    content
                } else {
                    new_disk(&path, dynamic(SIZE));
                    vec![0; SIZE as usize]
                };
                let per_sector: Vec<u8> = initial.chunks(SECTOR).map(|s| s[0]).collect();
                let mut model = Model::new(per_sector);
                let disk = vhd::open_on(storage, &path, false).unwrap();
                run_workload(disk.as_ref(), &mut model);
                drop(disk);
                storage.power_cut().unwrap();
                assert_clean(&path, n);
                model.assert_matches(&read_all(&path), n);
                assert_still_writable(&path, n);
            });
        }
    }
    println!("allocating writes: {tried} crash points tried");
    assert!(tried > 100, "only {tried} crash points");
}

/// base <- mid <- child, each layer with data of its own, flushed.
fn chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.avhd");
    let child = dir.join("child.avhd");
    patterned_parent(&base);
    new_disk(
        &mid,
        NewDisk::Differencing {
            parent: base.clone(),
        },
    );
    new_disk(
        &child,
        NewDisk::Differencing {
            parent: mid.clone(),
        },
    );
    let spb = BLOCK as usize / SECTOR;
    for (path, writes) in [
        (&mid, [(0, spb), (spb + 1, 9), (30 * spb, 3)]),
        (&child, [(2, 3), (spb * 3, spb), (30 * spb + 1, 5)]),
    ] {
        let disk = vhd::open(path, false).unwrap();
        for (i, (first, count)) in writes.into_iter().enumerate() {
            let v = 0x10 * (i as u8 + 1) + if path == &mid { 1 } else { 2 };
            disk.write_at(&vec![v; count * SECTOR], (first * SECTOR) as u64)
                .unwrap();
        }
        disk.flush().unwrap();
    }
    (base, mid, child)
}

#[test]
fn merge_keeps_the_chain_reading_the_same_at_every_crash_point() {
    let mut tried = 0;
    for mode in MODES {
        for into_base in [false, true] {
            tried += for_every_crash_point(mode, LIMIT, |storage, n| {
                let dir = tempfile::tempdir().unwrap();
                let (base, mid, child) = chain(dir.path());
                let expected = read_all(&child);
                let target = if into_base { &base } else { &mid };
                let into = into_base.then_some(base.as_path());
                let result = vhd::ops::merge::merge_on(storage, &child, into, &mut NoProgress);
                storage.power_cut().unwrap();
                if !storage.tripped() {
                    result.unwrap();
                    assert!(!child.exists() && (mid.exists() != into_base));
                }
                let leaf = if child.exists() { &child } else { target };
                assert_clean(target, n);
                assert_clean(leaf, n);
                assert!(
                    read_all(leaf) == expected,
                    "crash point {n}: {} reads differently after the crash",
                    leaf.display()
                );
            });
        }
    }
    println!("merge: {tried} crash points tried");
    assert!(tried > 30, "only {tried} crash points");
}

#[test]
fn compact_leaves_the_old_or_the_compacted_disk_at_every_crash_point() {
    let mut tried = 0;
    for mode in MODES {
        tried += for_every_crash_point(mode, LIMIT, |storage, n| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.vhd");
            new_disk(&path, dynamic(SIZE));
            {
                let disk = vhd::open(&path, false).unwrap();
                let block = BLOCK as usize;
                disk.write_at(&vec![7; block], 0).unwrap();
                disk.write_at(&vec![0; 3 * block], BLOCK.into()).unwrap();
                disk.write_at(&[9; SECTOR], 10 * u64::from(BLOCK) + 512)
                    .unwrap();
                disk.flush().unwrap();
            }
            let child = dir.path().join("child.avhd");
            new_disk(
                &child,
                NewDisk::Differencing {
                    parent: path.clone(),
                },
            );
            let expected = read_all(&path);
            let result = vhd::ops::compact::compact_on(storage, &path, &mut NoProgress);
            storage.power_cut().unwrap();
            if !storage.tripped() {
                let r = result.unwrap();
                assert!(r.file_size_after < r.file_size_before);
            }
            assert_clean(&path, n);
            assert!(
                read_all(&path) == expected,
                "crash point {n}: content changed"
            );
            // Same unique ID, so the child still opens on it.
            assert!(read_all(&child) == expected, "crash point {n}: child broke");
        });
    }
    println!("compact: {tried} crash points tried");
    assert!(tried > 10, "only {tried} crash points");
}
