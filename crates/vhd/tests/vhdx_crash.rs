//! VHDX crash tests: the engine's writes are cut off after the N-th write or
//! flush, for every N, through create, allocating writes (with discards), log
//! replay itself, merge and resize. After each cut the file is reopened with
//! the real storage: it must open (replaying its log), check clean, hold every
//! write flushed before the cut, and read every other sector as its old or
//! one of its new contents.

use std::path::{Path, PathBuf};

use vhd::crash::{AfterCrash, CrashStorage};
use vhd::ops::check::check;
use vhd::vhdx::create::{create_on, NewVhdx, VhdxOptions};
use vhd::{NoProgress, Storage};

mod common;
use common::{
    assert_still_writable, at_every_crash_point_in_every_mode, create_at_every_crash_point,
    new_disk, patterned_parent, read_all, report_crash_points, workload_at_every_crash_point,
    Format, Kind, Step, LIMIT,
};

const MIB: u64 = 1 << 20;
/// Sectors per block.
const SPB: usize = (MIB as usize) / common::SECTOR;

/// VHDX disks of 16 MiB, dynamic ones in 1 MiB blocks.
struct Vhdx;

impl Format for Vhdx {
    const EXT: &'static str = "vhdx";
    const SIZE: u64 = 16 * MIB;
    const BLOCK: u64 = MIB;

    fn create_on(storage: &dyn Storage, path: &Path, kind: Kind) -> vhd::Result<()> {
        let kind = match kind {
            Kind::Fixed => NewVhdx::Fixed { size: Self::SIZE },
            Kind::Dynamic => NewVhdx::Dynamic { size: Self::SIZE },
            Kind::Differencing { parent } => NewVhdx::Differencing {
                parent: parent.to_path_buf(),
            },
        };
        let mut opts = VhdxOptions::new(kind);
        opts.block_size = Some(Self::BLOCK as u32);
        create_on(storage, path, &opts, &mut NoProgress).map(drop)
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
}

#[test]
fn vhdx_create_leaves_no_disk_or_a_complete_one_at_every_crash_point() {
    report_crash_points("create", create_at_every_crash_point::<Vhdx>(), 20);
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

#[test]
fn vhdx_allocating_writes_and_discards_keep_flushed_data_at_every_crash_point() {
    let tried = workload_at_every_crash_point::<Vhdx>(&workload());
    report_crash_points("allocating writes", tried, 100);
}

/// A dynamic VHDX with an unapplied log entry, and what it must read as.
fn crashed_with_log(dir: &Path) -> (PathBuf, Vec<u8>) {
    let src = dir.join("src.vhdx");
    new_disk::<Vhdx>(&src, Kind::Dynamic);
    let mut model = vec![0u8; Vhdx::SIZE as usize];
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
    let dir = tempfile::tempdir().unwrap();
    let (crashed, model) = crashed_with_log(dir.path());
    let tried = at_every_crash_point_in_every_mode(|storage, n| {
        let path = dir.path().join("replay.vhdx");
        let _ = std::fs::remove_file(&path);
        std::fs::copy(&crashed, &path).unwrap();
        // The open replays the log; drop closes.
        let _ = vhd::open_on(storage, &path, false);
        storage.power_cut().unwrap();
        assert!(read_all(&path) == model, "crash point {n}: content differs");
        Vhdx::assert_consistent(&path, n);
        assert!(
            read_all(&path) == model,
            "crash point {n}: content differs after repair"
        );
    });
    report_crash_points("log replay", tried, 10);
}

#[test]
fn vhdx_merge_leaves_a_chain_that_reads_the_same_at_every_crash_point() {
    let tried = at_every_crash_point_in_every_mode(|storage, n| {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        let child = dir.path().join("child.avhdx");
        patterned_parent::<Vhdx>(&base);
        new_disk::<Vhdx>(&child, Kind::Differencing { parent: &base });
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
        Vhdx::assert_consistent(top, n);
        assert!(
            read_all(top) == expected,
            "crash point {n}: {} reads differently",
            top.display()
        );
    });
    report_crash_points("merge", tried, 20);
}

#[test]
fn vhdx_resize_leaves_the_old_or_the_new_size_at_every_crash_point() {
    let mut tried = 0;
    let from = Vhdx::SIZE;
    // Grow past the BAT region (it moves), then shrink back.
    for to in [200u64 << 30, 8 * MIB] {
        tried += at_every_crash_point_in_every_mode(|storage, n| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("d.vhdx");
            new_disk::<Vhdx>(&path, Kind::Dynamic);
            {
                let d = vhd::open(&path, false).unwrap();
                d.write_at(&vec![0x42; 2 * MIB as usize], MIB).unwrap();
            }
            let result = vhd::ops::resize::resize_vhdx(storage, &path, to);
            storage.power_cut().unwrap();
            if !storage.tripped() {
                result.unwrap();
            }
            Vhdx::assert_consistent(&path, n);
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
            assert_still_writable::<Vhdx>(&path, n);
        });
    }
    report_crash_points("resize", tried, 20);
}

/// A flush with nothing new written skips its fdatasync; data a merge copies
/// in through `prepare_extent_write` is written beside the engine, so it must
/// still count as new: once the flush after it returns, it survives a crash.
#[test]
fn data_written_through_an_extent_survives_a_crash_once_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    new_disk::<Vhdx>(&path, Kind::Dynamic);
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
