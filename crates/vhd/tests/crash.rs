//! Crash tests: the engine's writes are cut off after the N-th write or flush,
//! for every N through create, allocating writes, merge and compact. After each
//! cut the files are reopened with the real storage: the image must open,
//! `check` must be clean, every write flushed before the cut must read back,
//! and every other sector must read as its old or one of its new contents.
//!
//! Each test prints how many crash points it tried (`--nocapture` to see them).

use std::path::{Path, PathBuf};

use vhd::ops::check::check;
use vhd::vhd1::create::{create_on, CreateOptions, NewDisk};
use vhd::{NoProgress, Storage};

mod common;
use common::{
    at_every_crash_point_in_every_mode, create_at_every_crash_point, new_disk, patterned_parent,
    read_all, report_crash_points, workload_at_every_crash_point, Format, Kind, Step, SECTOR,
};

/// VHD disks of 4 MiB, dynamic ones in 64 KiB blocks.
struct Vhd;

impl Format for Vhd {
    const EXT: &'static str = "vhd";
    const SIZE: u64 = 4 << 20;
    const BLOCK: u64 = 64 << 10;

    fn create_on(storage: &dyn Storage, path: &Path, kind: Kind) -> vhd::Result<()> {
        let kind = match kind {
            Kind::Fixed => NewDisk::Fixed { size: Self::SIZE },
            Kind::Dynamic => NewDisk::Dynamic {
                size: Self::SIZE,
                block_size: Self::BLOCK as u32,
            },
            Kind::Differencing { parent } => NewDisk::Differencing {
                parent: parent.to_path_buf(),
            },
        };
        let opts = CreateOptions {
            kind,
            exact_size: true,
        };
        create_on(storage, path, &opts, &mut NoProgress).map(drop)
    }

    fn assert_consistent(path: &Path, n: u64) {
        let report = check(path, false).unwrap();
        assert!(
            report.clean(),
            "crash point {n}: check of {} found {:?}",
            path.display(),
            report.problems
        );
    }
}

#[test]
fn create_leaves_no_disk_or_a_complete_one_at_every_crash_point() {
    report_crash_points("create", create_at_every_crash_point::<Vhd>(), 20);
}

/// Writes of every shape the engine treats differently: whole blocks, parts of
/// new and of allocated blocks, runs across blocks, rewrites; flushes between.
fn workload() -> Vec<Step> {
    use Step::*;
    let spb = Vhd::BLOCK as usize / SECTOR;
    vec![
        Write(0, spb),     // whole new block
        Write(spb + 3, 5), // part of a new block
        Flush,
        Write(spb + 10, 2),      // more of an allocated block
        Write(3 * spb - 4, 8),   // across two new blocks
        Write(5 * spb, 2 * spb), // two whole blocks
        Flush,
        Write(spb + 3, 1),         // rewrite
        Write(7 * spb, spb),       // whole block, unflushed at the end
        Write(20 * spb + 100, 30), // part of a far block
        Flush,
        Write(spb + 4, spb - 4), // the rest of block 1
        Write(40 * spb + 7, 1),  // a single sector, never flushed
    ]
}

#[test]
fn allocating_writes_keep_flushed_data_at_every_crash_point() {
    let tried = workload_at_every_crash_point::<Vhd>(&workload());
    report_crash_points("allocating writes", tried, 100);
}

/// base <- mid <- child, each layer with data of its own, flushed.
fn chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.avhd");
    let child = dir.join("child.avhd");
    patterned_parent::<Vhd>(&base);
    new_disk::<Vhd>(&mid, Kind::Differencing { parent: &base });
    new_disk::<Vhd>(&child, Kind::Differencing { parent: &mid });
    let spb = Vhd::BLOCK as usize / SECTOR;
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
    for into_base in [false, true] {
        tried += at_every_crash_point_in_every_mode(|storage, n| {
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
            Vhd::assert_consistent(target, n);
            Vhd::assert_consistent(leaf, n);
            assert!(
                read_all(leaf) == expected,
                "crash point {n}: {} reads differently after the crash",
                leaf.display()
            );
        });
    }
    report_crash_points("merge", tried, 30);
}

#[test]
fn compact_leaves_the_old_or_the_compacted_disk_at_every_crash_point() {
    let tried = at_every_crash_point_in_every_mode(|storage, n| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vhd");
        new_disk::<Vhd>(&path, Kind::Dynamic);
        {
            let disk = vhd::open(&path, false).unwrap();
            let block = Vhd::BLOCK as usize;
            disk.write_at(&vec![7; block], 0).unwrap();
            disk.write_at(&vec![0; 3 * block], Vhd::BLOCK).unwrap();
            disk.write_at(&[9; SECTOR], 10 * Vhd::BLOCK + 512).unwrap();
            disk.flush().unwrap();
        }
        let child = dir.path().join("child.avhd");
        new_disk::<Vhd>(&child, Kind::Differencing { parent: &path });
        let expected = read_all(&path);
        let result = vhd::ops::compact::compact_on(storage, &path, &mut NoProgress);
        storage.power_cut().unwrap();
        if !storage.tripped() {
            let r = result.unwrap();
            assert!(r.file_size_after < r.file_size_before);
        }
        Vhd::assert_consistent(&path, n);
        assert!(
            read_all(&path) == expected,
            "crash point {n}: content changed"
        );
        // Same unique ID, so the child still opens on it.
        assert!(read_all(&child) == expected, "crash point {n}: child broke");
    });
    report_crash_points("compact", tried, 10);
}

#[test]
fn a_first_block_placed_right_after_the_bat_keeps_the_old_footer_until_the_new_one_is_flushed() {
    // 15,872 BAT entries (512-byte blocks): the footer copy, header and BAT end
    // one sector before a 64 KiB boundary, so the old trailing footer sits
    // where a 64 KiB-aligned block's bitmap goes. The bitmap written over it
    // could reach the disk before the new footer did: a file ending in a bitmap.
    const BLOCK: u32 = 512;
    const SIZE: u64 = 15_872 * BLOCK as u64;
    let tried = at_every_crash_point_in_every_mode(|storage, n| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.vhd");
        let opts = CreateOptions {
            kind: NewDisk::Dynamic {
                size: SIZE,
                block_size: BLOCK,
            },
            exact_size: true,
        };
        create_on(&vhd::HostStorage, &path, &opts, &mut NoProgress).unwrap();
        {
            let disk = vhd::open_on(storage, &path, false).unwrap();
            let _ = disk.write_at(&[0x5a; SECTOR], 0);
            let _ = disk.flush();
        }
        storage.power_cut().unwrap();
        Vhd::assert_consistent(&path, n);
        let first = read_all(&path)[..SECTOR].to_vec();
        assert!(
            first.iter().all(|&b| b == 0) || first.iter().all(|&b| b == 0x5a),
            "crash point {n}: the first sector reads neither its old nor its new bytes"
        );
    });
    report_crash_points("first block after the BAT", tried, 5);
}
