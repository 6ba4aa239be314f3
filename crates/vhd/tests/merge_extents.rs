//! Merge copies whole runs file to file (`copy_file_range`) where it can and
//! through a buffer elsewhere: layers mixing fully present blocks, partly
//! present ones, sectors cut by unaligned writes and zeroed ranges read the
//! same after the merge as before it, byte for byte, and the target passes our
//! `check` and, where QEMU can open it (not differencing), `qemu-img check` and
//! `qemu-img compare` against the expected bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use vhd::ops::merge::{merge_with, CopyPath, MergeOptions};
use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::vhdx::create::{create as create_vhdx, NewVhdx, VhdxOptions};
use vhd::{HostStorage, NoProgress};

const MIB: u64 = 1 << 20;

/// Held by every test of this file for its whole run. A `qemu-img` spawned by
/// one test thread holds copies of every descriptor the process has open
/// until it execs, so a disk another thread closed in that moment still
/// holds its flock, and reopening it fails with `Locked`. (Seen in
/// `tests/ops.rs` too; the tests here are few and short, so they run one at
/// a time instead.)
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
const FILE_TO_FILE: MergeOptions = MergeOptions {
    copy: CopyPath::FileToFile,
    keep_layers: false,
};
const BUFFERED: MergeOptions = MergeOptions {
    copy: CopyPath::Buffered,
    keep_layers: false,
};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) as u8).wrapping_mul(13) ^ (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Sizes rounded up to what QEMU's vpc driver (going by CHS) sees too.
fn vhd(path: &Path, kind: NewDisk) {
    let opts = CreateOptions {
        kind,
        exact_size: false,
    };
    create(path, &opts, &mut NoProgress).unwrap();
}

fn vhdx(path: &Path, kind: NewVhdx) {
    let mut opts = VhdxOptions::new(kind);
    opts.block_size = Some(MIB as u32);
    create_vhdx(path, &opts, &mut NoProgress).unwrap();
}

fn write(path: &Path, off: u64, data: &[u8]) {
    let d = vhd::open(path, false).unwrap();
    d.write_at(data, off).unwrap();
    d.flush().unwrap();
}

fn discard(path: &Path, off: u64, len: u64) {
    let d = vhd::open(path, false).unwrap();
    d.discard(off, len).unwrap();
    d.flush().unwrap();
}

fn read_all(path: &Path) -> Vec<u8> {
    let d = vhd::open(path, true).unwrap();
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Our `check` is clean, and for a disk QEMU can open (not differencing),
/// `qemu-img check` is too and `qemu-img compare` finds `expected` in it.
fn assert_sound(target: &Path, expected: &[u8], qemu_opens_it: bool) {
    let report = vhd::ops::check::check(target, false).unwrap();
    assert!(
        report.clean(),
        "{}: {:?}",
        target.display(),
        report.problems
    );
    if !qemu_opens_it {
        return;
    }
    if vhd::is_vhdx_name(target) {
        // QEMU's vpc driver has no check.
        let (ok, out) = qemu_img(&["check", s(target)]);
        assert!(ok, "qemu-img check {}: {out}", target.display());
    }
    let raw = target.with_extension("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    let (ok, out) = qemu_img(&["compare", "-f", "raw", s(&raw), s(target)]);
    assert!(ok, "qemu-img compare {}: {out}", target.display());
}

/// base (dynamic, 2 MiB blocks, 24 MiB or a little more, written all over) <- mid <- top.
/// Each layer holds whole blocks (fully present), runs of sectors in blocks
/// otherwise read from below (partly present), and sectors cut by unaligned
/// writes; top and mid overlap in places.
fn vhd_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.avhd");
    let top = dir.join("top.avhd");
    vhd(
        &base,
        NewDisk::Dynamic {
            size: 24 * MIB,
            block_size: 2 * MIB as u32,
        },
    );
    write(&base, 0, &pattern(20 * MIB as usize, 0x01));
    vhd(
        &mid,
        NewDisk::Differencing {
            parent: base.clone(),
        },
    );
    write(&mid, 2 * MIB, &pattern(4 * MIB as usize, 0x02)); // blocks 1, 2 whole
    write(&mid, 8 * MIB + 4096, &pattern(64 << 10, 0x03)); // block 4, partly
    write(&mid, 8 * MIB + 300_000, &pattern(10_000, 0x04)); // cut sectors
    write(&mid, 22 * MIB, &pattern(2 * MIB as usize, 0x05)); // last block whole
    vhd(
        &top,
        NewDisk::Differencing {
            parent: mid.clone(),
        },
    );
    write(&top, 4 * MIB, &pattern(2 * MIB as usize, 0x06)); // block 2 again, whole
    write(&top, 2 * MIB + 512, &pattern(1536, 0x07)); // inside mid's whole block 1
    write(&top, 12 * MIB, &pattern(3 * MIB as usize, 0x08)); // block 6 whole, 7 half
    write(&top, 8 * MIB, &pattern(512, 0x09)); // block 4, before mid's run
    write(&top, 17 * MIB + 100, &pattern(777, 0x0a)); // block 8, one cut run
    (base, mid, top)
}

#[test]
fn vhd_merge_into_the_base_reads_every_byte_as_before() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = vhd_chain(dir.path());
    let expected = read_all(&top);
    let r = merge_with(
        &HostStorage,
        &top,
        Some(&base),
        FILE_TO_FILE,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(r.removed, vec![top.clone(), mid.clone()]);
    assert!(read_all(&base) == expected, "the base reads differently");
    assert_sound(&base, &expected, true);
}

#[test]
fn vhd_merge_into_a_differencing_parent_reads_every_byte_as_before() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = vhd_chain(dir.path());
    let expected = read_all(&top);
    let base_before = read_all(&base);
    merge_with(&HostStorage, &top, None, FILE_TO_FILE, &mut NoProgress).unwrap();
    assert!(!top.exists());
    assert!(read_all(&mid) == expected, "mid reads differently");
    assert!(read_all(&base) == base_before, "the base changed");
    assert_sound(&mid, &expected, false);
}

#[test]
fn vhd_merge_file_to_file_writes_the_same_file_as_the_buffered_copy() {
    let _serial = serial();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (base_a, mid_a, top_a) = vhd_chain(a.path());
    // The same files (same IDs) in another folder; children find their
    // parents there by the relative locator.
    let [base_b, mid_b, top_b] = [&base_a, &mid_a, &top_a].map(|p| {
        let q = b.path().join(p.file_name().unwrap());
        std::fs::copy(p, &q).unwrap();
        q
    });
    merge_with(
        &HostStorage,
        &top_a,
        Some(&base_a),
        FILE_TO_FILE,
        &mut NoProgress,
    )
    .unwrap();
    merge_with(
        &HostStorage,
        &top_b,
        Some(&base_b),
        BUFFERED,
        &mut NoProgress,
    )
    .unwrap();
    assert!(!mid_b.exists());
    assert!(
        std::fs::read(&base_a).unwrap() == std::fs::read(&base_b).unwrap(),
        "the two copy paths left different files"
    );
}

/// base (dynamic VHDX, 1 MiB blocks, 16 MiB, written all over) <- child with
/// whole blocks, partly present blocks, cut sectors and a discarded block.
fn vhdx_chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.avhdx");
    vhdx(&base, NewVhdx::Dynamic { size: 16 * MIB });
    write(&base, 0, &pattern(16 * MIB as usize, 0x11));
    vhdx(
        &child,
        NewVhdx::Differencing {
            parent: base.clone(),
        },
    );
    write(&child, MIB, &pattern(3 * MIB as usize, 0x12)); // blocks 1-3 whole
    write(&child, 5 * MIB + 8192, &pattern(100 << 10, 0x13)); // block 5, partly
    write(&child, 5 * MIB + 400_000, &pattern(3000, 0x14)); // cut sectors
    write(&child, 7 * MIB + (MIB / 2), &pattern(MIB as usize, 0x15)); // half of 7 and 8
    discard(&child, 10 * MIB, MIB);
    write(&child, 15 * MIB, &pattern(MIB as usize, 0x16)); // the last block whole
    (base, child)
}

#[test]
fn vhdx_merge_reads_every_byte_as_before() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = vhdx_chain(dir.path());
    let expected = read_all(&child);
    merge_with(&HostStorage, &child, None, FILE_TO_FILE, &mut NoProgress).unwrap();
    assert!(!child.exists());
    assert!(read_all(&base) == expected, "the base reads differently");
    assert_sound(&base, &expected, true);
}

#[test]
fn vhdx_merge_into_a_differencing_parent_reads_every_byte_as_before() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = vhdx_chain(dir.path());
    let top = dir.path().join("top.avhdx");
    // Hyper-V's default 2 MiB blocks over the child's 1 MiB ones: one block
    // of the layer spans two of the target.
    let opts = VhdxOptions::new(NewVhdx::Differencing {
        parent: child.clone(),
    });
    create_vhdx(&top, &opts, &mut NoProgress).unwrap();
    write(&top, 2 * MIB, &pattern(MIB as usize, 0x17)); // over a whole block
    write(&top, 5 * MIB, &pattern(4096, 0x18)); // into a partly present one
    write(&top, 9 * MIB + 512, &pattern(MIB as usize, 0x19)); // over a block edge
    let expected = read_all(&top);
    let base_before = read_all(&base);
    merge_with(&HostStorage, &top, None, FILE_TO_FILE, &mut NoProgress).unwrap();
    assert!(!top.exists());
    assert!(read_all(&child) == expected, "the child reads differently");
    assert!(read_all(&base) == base_before, "the base changed");
    assert_sound(&child, &expected, false);
}
