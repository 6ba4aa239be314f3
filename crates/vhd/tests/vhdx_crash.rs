//! VHDX crash tests: the engine's writes are cut off after the N-th write or
//! flush, for every N, through create, allocating writes (with discards), log
//! replay itself, merge and resize. After each cut the file is reopened with
//! the real storage: it must open (replaying its log), check clean, hold every
//! write flushed before the cut, and read every other sector as its old or
//! one of its new contents.

use std::path::Path;

use vhd::crash::{for_every_crash_point, AfterCrash, CrashStorage};
use vhd::ops::check::check;
use vhd::vhdx::create::{create, create_on, NewVhdx, VhdxOptions};
use vhd::{Disk, NoProgress};

mod common;
use common::Model;

const MODES: [AfterCrash; 3] = [
    AfterCrash::KeepAllWrites,
    AfterCrash::LoseUnflushedWrites,
    AfterCrash::KeepOnlyLastUnflushedWrite,
];
const SECTOR: usize = 512;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const SPB: usize = (MIB as usize) / SECTOR;
const LIMIT: u64 = 10_000;

fn opts(kind: NewVhdx) -> VhdxOptions {
    let mut o = VhdxOptions::new(kind);
    o.block_size = Some(MIB as u32);
    o
}

fn new_disk(path: &Path, kind: NewVhdx) {
    create(path, &opts(kind), &mut NoProgress).unwrap();
}

/// The file opens (a writable open replays its log) and then checks clean.
fn assert_consistent(path: &Path, n: u64) {
    let repaired = check(path, true).unwrap();
    assert!(
        repaired.clean(),
        "crash point {n}: {} has {:?}",
        path.display(),
        repaired.problems
    );
    let report = check(path, false).unwrap();
    assert!(
        report.problems.is_empty(),
        "crash point {n}: {:?}",
        report.problems
    );
}

fn read_all(path: &Path) -> Vec<u8> {
    let disk = vhd::open(path, true).unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

fn assert_still_writable(path: &Path, n: u64) {
    let disk = vhd::open(path, false).unwrap();
    let last = disk.size() - SECTOR as u64;
    disk.write_at(&[0x5a; SECTOR], last).unwrap();
    disk.flush().unwrap();
    drop(disk);
    assert_consistent(path, n);
    let disk = vhd::open(path, true).unwrap();
    let mut buf = [0u8; SECTOR];
    disk.read_at(&mut buf, last).unwrap();
    assert_eq!(
        buf, [0x5a; SECTOR],
        "crash point {n}: write after the crash lost"
    );
}

#[test]
fn vhdx_create_leaves_no_disk_or_a_complete_one_at_every_crash_point() {
    let mut tried = 0;
    for mode in MODES {
        for kind in ["fixed", "dynamic", "differencing"] {
            tried += for_every_crash_point(mode, LIMIT, |storage, n| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("new.vhdx");
                let base = dir.path().join("base.vhdx");
                let k = match kind {
                    "fixed" => NewVhdx::Fixed { size: SIZE },
                    "dynamic" => NewVhdx::Dynamic { size: SIZE },
                    _ => {
                        new_disk(&base, NewVhdx::Dynamic { size: SIZE });
                        NewVhdx::Differencing {
                            parent: base.clone(),
                        }
                    }
                };
                let result = create_on(storage, &path, &opts(k), &mut NoProgress);
                storage.power_cut().unwrap();
                if !storage.tripped() {
                    assert!(result.is_ok(), "{kind}: {result:?}");
                }
                if path.exists() {
                    assert_consistent(&path, n);
                    assert!(read_all(&path) == vec![0u8; SIZE as usize], "{kind} at {n}");
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
    assert!(tried > 20, "only {tried} crash points");
}

enum Step {
    Write(usize, usize),
    Discard(usize, usize),
    Flush,
}

/// Writes of every shape the engine treats differently, discards of whole
/// and partial blocks, flushes between.
fn workload() -> Vec<Step> {
    use Step::*;
    vec![
        Write(0, SPB),
        Write(SPB + 3, 5),
        Flush,
        Write(SPB + 10, 2),
        Write(3 * SPB - 4, 8),
        Write(5 * SPB, 2 * SPB),
        Discard(2 * SPB, SPB),
        Flush,
        Write(SPB + 3, 1),
        Discard(5 * SPB + 16, 32),
        Write(7 * SPB, SPB),
        Write(12 * SPB + 100, 30),
        Flush,
        Write(SPB + 4, SPB - 4),
        Write(14 * SPB + 7, 1),
    ]
}

fn run_workload(disk: &dyn Disk, model: &mut Model) {
    for (i, step) in workload().into_iter().enumerate() {
        let ok = match step {
            Step::Flush => {
                let ok = disk.flush().is_ok();
                if ok {
                    model.flushed();
                }
                ok
            }
            Step::Write(first, count) => {
                let value = 1 + (i as u8 % 100);
                model.writing(first, count, value);
                disk.write_at(&vec![value; count * SECTOR], (first * SECTOR) as u64)
                    .is_ok()
            }
            Step::Discard(first, count) => {
                model.writing(first, count, 0);
                disk.discard((first * SECTOR) as u64, (count * SECTOR) as u64)
                    .is_ok()
            }
        };
        if !ok {
            return;
        }
    }
}

/// A parent whose every other block reads as 0xc0 + block number.
fn patterned_parent(path: &Path) -> Vec<u8> {
    new_disk(path, NewVhdx::Dynamic { size: SIZE });
    let disk = vhd::open(path, false).unwrap();
    for b in (0..SIZE / MIB).step_by(2) {
        disk.write_at(&vec![0xc0 + b as u8; MIB as usize], b * MIB)
            .unwrap();
    }
    disk.flush().unwrap();
    drop(disk);
    read_all(path)
}

#[test]
fn vhdx_allocating_writes_and_discards_keep_flushed_data_at_every_crash_point() {
    let mut tried = 0;
    for mode in MODES {
        for differencing in [false, true] {
            tried += for_every_crash_point(mode, LIMIT, |storage: &CrashStorage, n| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("disk.avhdx");
                let initial = if differencing {
                    let base = dir.path().join("base.vhdx");
                    let content = patterned_parent(&base);
                    new_disk(&path, NewVhdx::Differencing { parent: base });
                    content
                } else {
                    new_disk(&path, NewVhdx::Dynamic { size: SIZE });
                    vec![0; SIZE as usize]
                };
                let mut model = Model::new(initial.chunks(SECTOR).map(|s| s[0]).collect());
                let disk = vhd::open_on(storage, &path, false).unwrap();
                run_workload(disk.as_ref(), &mut model);
                drop(disk);
                storage.power_cut().unwrap();
                assert_consistent(&path, n);
                model.assert_matches(&read_all(&path), n);
                assert_still_writable(&path, n);
            });
        }
    }
    println!("allocating writes: {tried} crash points tried");
    assert!(tried > 100, "only {tried} crash points");
}

/// A dynamic VHDX with an unapplied log entry, and what it must read as.
fn crashed_with_log(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let src = dir.join("src.vhdx");
    new_disk(&src, NewVhdx::Dynamic { size: SIZE });
    let mut model = vec![0u8; SIZE as usize];
    model[(MIB / 2) as usize..(MIB / 2 + 3 * MIB) as usize].fill(0x3c);
    for n in 0.. {
        let path = dir.join("crashed.vhdx");
        let _ = std::fs::remove_file(&path);
        std::fs::copy(&src, &path).unwrap();
        let storage = CrashStorage::cut_after(n, AfterCrash::KeepAllWrites);
        if let Ok(d) = vhd::open_on(&storage, &path, false) {
            let _ = d.write_at(&vec![0x3c; 3 * MIB as usize], MIB / 2);
            let _ = d.flush();
        }
        storage.power_cut().unwrap();
        if vhd::vhdx::VhdxImage::inspect(&path)
            .unwrap()
            .log_found()
            .is_some()
        {
            return (path, model);
        }
    }
    unreachable!()
}

#[test]
fn vhdx_log_replay_survives_a_crash_at_every_point() {
    let mut tried = 0;
    let dir = tempfile::tempdir().unwrap();
    let (crashed, model) = crashed_with_log(dir.path());
    for mode in MODES {
        tried += for_every_crash_point(mode, LIMIT, |storage, n| {
            let path = dir.path().join("replay.vhdx");
            let _ = std::fs::remove_file(&path);
            std::fs::copy(&crashed, &path).unwrap();
            // The open replays the log; drop closes.
            let _ = vhd::open_on(storage, &path, false);
            storage.power_cut().unwrap();
            assert!(read_all(&path) == model, "crash point {n}: content differs");
            assert_consistent(&path, n);
            assert!(
                read_all(&path) == model,
                "crash point {n}: content differs after repair"
            );
        });
    }
    println!("log replay: {tried} crash points tried");
    assert!(tried > 10, "only {tried} crash points");
}

#[test]
fn vhdx_merge_leaves_a_chain_that_reads_the_same_at_every_crash_point() {
    let mut tried = 0;
    for mode in MODES {
        tried += for_every_crash_point(mode, LIMIT, |storage, n| {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("base.vhdx");
            let child = dir.path().join("child.avhdx");
            patterned_parent(&base);
            new_disk(
                &child,
                NewVhdx::Differencing {
                    parent: base.clone(),
                },
            );
            {
                let d = vhd::open(&child, false).unwrap();
                d.write_at(&vec![0x11; 3 * MIB as usize], MIB / 2).unwrap();
                d.write_at(&vec![0x22; 4096], 9 * MIB + 512).unwrap();
                d.discard(12 * MIB, MIB).unwrap();
            }
            let expected = read_all(&child);
            let result = vhd::ops::merge::merge_on(storage, &child, None, &mut NoProgress);
            storage.power_cut().unwrap();
            if !storage.tripped() {
                result.unwrap();
            }
            let top = if child.exists() { &child } else { &base };
            assert_consistent(top, n);
            assert!(
                read_all(top) == expected,
                "crash point {n}: {} reads differently",
                top.display()
            );
        });
    }
    println!("merge: {tried} crash points tried");
    assert!(tried > 20, "only {tried} crash points");
}

#[test]
fn vhdx_resize_leaves_the_old_or_the_new_size_at_every_crash_point() {
    let mut tried = 0;
    for mode in MODES {
        // Grow past the BAT region (it moves), then shrink back.
        for (from, to) in [(SIZE, 200u64 << 30), (SIZE, 8 * MIB)] {
            tried += for_every_crash_point(mode, LIMIT, |storage, n| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("d.vhdx");
                new_disk(&path, NewVhdx::Dynamic { size: from });
                {
                    let d = vhd::open(&path, false).unwrap();
                    d.write_at(&vec![0x42; 2 * MIB as usize], MIB).unwrap();
                }
                let result = vhd::ops::resize::resize_vhdx(storage, &path, to);
                storage.power_cut().unwrap();
                if !storage.tripped() {
                    result.unwrap();
                }
                assert_consistent(&path, n);
                let d = vhd::open(&path, true).unwrap();
                assert!(
                    d.size() == from || d.size() == to,
                    "crash point {n}: size {}",
                    d.size()
                );
                let mut buf = vec![0u8; 8 * MIB as usize];
                d.read_at(&mut buf, 0).unwrap();
                assert!(
                    buf[..MIB as usize].iter().all(|&b| b == 0),
                    "crash point {n}"
                );
                assert!(
                    buf[MIB as usize..3 * MIB as usize]
                        .iter()
                        .all(|&b| b == 0x42),
                    "crash point {n}"
                );
                assert!(
                    buf[3 * MIB as usize..].iter().all(|&b| b == 0),
                    "crash point {n}"
                );
                drop(d);
                assert_still_writable(&path, n);
            });
        }
    }
    println!("resize: {tried} crash points tried");
    assert!(tried > 20, "only {tried} crash points");
}

/// A flush with nothing new written skips its fdatasync; data a merge copies
/// in through `prepare_extent_write` is written beside the engine, so it must
/// still count as new: once the flush after it returns, it survives a crash.
#[test]
fn data_written_through_an_extent_survives_a_crash_once_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    new_disk(&path, NewVhdx::Dynamic { size: SIZE });
    {
        let d = vhd::open(&path, false).unwrap();
        d.write_at(&vec![0x11; MIB as usize], 0).unwrap();
    }
    let storage = CrashStorage::cut_after(LIMIT, AfterCrash::LoseUnflushedWrites);
    let d = vhd::open_on(&storage, &path, false).unwrap();
    let ext = d.prepare_extent_write(0, 4096).unwrap().unwrap();
    // Everything so far is durable; nothing new is written by the engine
    // from here on.
    d.flush().unwrap();
    ext.file.write_at(&[0x77; 4096], ext.offset).unwrap();
    d.commit_extent_write(0, 4096).unwrap();
    d.flush().unwrap();
    storage.power_cut().unwrap();
    drop((ext, d));
    let got = read_all(&path);
    assert!(
        got[..4096].iter().all(|&b| b == 0x77),
        "the flushed copy was lost"
    );
    assert!(got[4096..MIB as usize].iter().all(|&b| b == 0x11));
}
