//! Reads the fast paths of issue 23 take, checked against a model of the bytes
//! written: requests spanning adjacent allocated blocks, an unallocated block,
//! a differencing block whose sector bitmap is partly present, and the disk's
//! end; the first read of a block after opening (its bitmap read with its
//! data); and the layout that lets the kernel read a VHD like a raw file.

use std::os::fd::AsRawFd;
use std::path::Path;

use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::vhdx::create::{NewVhdx, VhdxOptions};
use vhd::{Disk, NoProgress};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Block size of every disk here (the smallest a VHDX takes).
const BLOCK: u64 = MIB;
/// Six blocks, the last cut short, so a read can end at the disk's end
/// inside a block.
const SIZE: u64 = 6 * BLOCK - 64 * KIB;

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn new_disk(path: &Path, parent: Option<&Path>) {
    if vhd::is_vhdx_name(path) {
        let kind = match parent {
            Some(p) => NewVhdx::Differencing {
                parent: p.to_path_buf(),
            },
            None => NewVhdx::Dynamic { size: SIZE },
        };
        let mut opts = VhdxOptions::new(kind);
        opts.block_size = Some(BLOCK as u32);
        vhd::vhdx::create::create(path, &opts, &mut NoProgress).unwrap();
        return;
    }
    let kind = match parent {
        Some(p) => NewDisk::Differencing {
            parent: p.to_path_buf(),
        },
        None => NewDisk::Dynamic {
            size: SIZE,
            block_size: BLOCK as u32,
        },
    };
    let opts = CreateOptions {
        kind,
        exact_size: true,
    };
    create(path, &opts, &mut NoProgress).unwrap();
}

/// Writes `data` at `off` both to the disk and to the model.
fn put(disk: &dyn Disk, model: &mut [u8], off: u64, data: &[u8]) {
    disk.write_at(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// `len` bytes at `off`, read from a freshly opened disk (no bitmap cached).
fn read_fresh(path: &Path, off: u64, len: u64) -> Vec<u8> {
    let disk = vhd::open(path, true).unwrap();
    let mut buf = vec![0xAAu8; len as usize];
    disk.read_at(&mut buf, off).unwrap();
    buf
}

/// Reads that start and end anywhere: inside a block, at block starts, across
/// several blocks, up to the disk's end.
fn spans() -> Vec<(u64, u64)> {
    let mut spans = vec![(0, SIZE)];
    for b in 0..6 {
        for len in [512, 64 * KIB, BLOCK] {
            spans.push((b * BLOCK, len.min(SIZE - b * BLOCK)));
        }
    }
    spans.extend([
        (BLOCK / 2, 2 * BLOCK),        // blocks 0, 1 and 2: all allocated
        (2 * BLOCK + 4096, 2 * BLOCK), // block 2 into 3 (unallocated) into 4
        (3 * BLOCK - 512, 1024),       // the last sector of 2, the first of 3
        (4 * BLOCK - 512, 2 * BLOCK - 64 * KIB + 512), // 3's last sector to the end
        (SIZE - 512, 512),             // the disk's last sector
    ]);
    spans
}

fn assert_spans_read_as_model(path: &Path, model: &[u8]) {
    for (off, len) in spans() {
        let got = read_fresh(path, off, len);
        let want = &model[off as usize..(off + len) as usize];
        assert!(
            got == want,
            "{}: {len} bytes at {off} differ from what was written (first at {})",
            path.display(),
            off + got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0) as u64
        );
    }
}

/// Blocks 0, 1, 2 and 5 written whole, 3 never, 4 in part (a dynamic disk's
/// new block reads as zeros where it was not written).
fn dynamic_with_gaps(path: &Path) -> Vec<u8> {
    new_disk(path, None);
    let mut model = vec![0u8; SIZE as usize];
    let disk = vhd::open(path, false).unwrap();
    for b in [0, 2, 1] {
        put(
            disk.as_ref(),
            &mut model,
            b * BLOCK,
            &pattern(BLOCK, b as u8),
        );
    }
    put(
        disk.as_ref(),
        &mut model,
        4 * BLOCK + 8192,
        &pattern(100 * KIB, 4),
    );
    put(
        disk.as_ref(),
        &mut model,
        5 * BLOCK,
        &pattern(SIZE - 5 * BLOCK, 5),
    );
    disk.flush().unwrap();
    model
}

#[test]
fn reads_across_allocated_unallocated_and_partly_written_blocks_return_what_was_written() {
    for ext in ["vhd", "vhdx"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("d.{ext}"));
        let model = dynamic_with_gaps(&path);
        assert_spans_read_as_model(&path, &model);
    }
}

#[test]
fn differencing_reads_take_the_childs_sectors_and_the_parents_elsewhere() {
    for ext in ["vhd", "vhdx"] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(format!("base.{ext}"));
        let child = dir.path().join(format!("child.{ext}"));
        new_disk(&base, None);
        let mut model = vec![0u8; SIZE as usize];
        {
            let d = vhd::open(&base, false).unwrap();
            put(d.as_ref(), &mut model, 0, &pattern(SIZE, 9));
            d.flush().unwrap();
        }
        new_disk(&child, Some(&base));
        {
            let d = vhd::open(&child, false).unwrap();
            // Block 0: only from its first sector on for 4 KiB and a run in the
            // middle (its bitmap partly present, starting present); block 1: the
            // middle only (starting absent); block 2 whole; 3 untouched;
            // the last sector of the disk.
            put(d.as_ref(), &mut model, 0, &pattern(4096, 1));
            put(d.as_ref(), &mut model, 300 * KIB, &pattern(8192, 2));
            put(
                d.as_ref(),
                &mut model,
                BLOCK + 64 * KIB,
                &pattern(64 * KIB, 3),
            );
            put(d.as_ref(), &mut model, 2 * BLOCK, &pattern(BLOCK, 4));
            put(d.as_ref(), &mut model, SIZE - 512, &pattern(512, 5));
            d.flush().unwrap();
        }
        assert_spans_read_as_model(&child, &model);
    }
}

#[test]
fn a_block_read_first_after_writes_in_the_same_session_returns_the_new_bytes() {
    // The bitmap cached by the writes, not the one in the file, decides.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    new_disk(&base, None);
    let mut model = vec![0u8; SIZE as usize];
    let d = vhd::open(&base, false).unwrap();
    put(d.as_ref(), &mut model, 0, &pattern(SIZE, 7));
    d.flush().unwrap();
    drop(d);
    new_disk(&child, Some(&base));
    let d = vhd::open(&child, false).unwrap();
    put(d.as_ref(), &mut model, 512, &pattern(512, 8));
    let mut buf = vec![0u8; 64 * KIB as usize];
    d.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == model[..buf.len()],
        "the first 64 KiB differ from what was written"
    );
}

/// First offset at or after `from` where `path` has a hole.
fn next_hole(path: &Path, from: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: lseek only reads the descriptor, which `f` keeps open, and integers.
    let at = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, libc::SEEK_HOLE) };
    assert!(
        at >= 0,
        "SEEK_HOLE failed: {}",
        std::io::Error::last_os_error()
    );
    at as u64
}

#[test]
fn a_vhd_written_front_to_back_has_no_holes_between_its_blocks() {
    // Holes between blocks make every block a separate extent, which the
    // kernel's read-ahead reads in small pieces (BENCHMARKS.md, issue 23).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    new_disk(&path, None);
    let disk = vhd::open(&path, false).unwrap();
    let data = pattern(BLOCK, 1);
    for b in 0..5 {
        disk.write_at(&data, b * BLOCK).unwrap();
    }
    disk.flush().unwrap();
    drop(disk);
    let image = vhd::vhd1::VhdImage::open_layer(&path, true).unwrap();
    let first = u64::from(image.bat()[0]) * 512;
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        next_hole(&path, first),
        len,
        "a hole between the first block at {first} and the end of the {len}-byte file"
    );
    let mut model = vec![0u8; SIZE as usize];
    for b in 0..5 {
        model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&data);
    }
    assert_spans_read_as_model(&path, &model);
}
