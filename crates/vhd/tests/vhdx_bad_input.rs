//! VHDX files damaged in each way the format can be: every one is refused with
//! an error that names the file and the fault, never a panic, and opening it
//! (even for writing) never writes to it.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vhd::crash::{AfterCrash, CrashStorage};
use vhd::vhdx::create::{create, NewVhdx, VhdxOptions, BAT_OFFSET, METADATA_OFFSET};
use vhd::vhdx::metadata::{Entry, Metadata, OtherItem};
use vhd::vhdx::region::{RegionEntry, RegionTable};
use vhd::NoProgress;

const MIB: u64 = 1 << 20;

fn good(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut o = VhdxOptions::new(NewVhdx::Dynamic { size: 8 * MIB });
    o.block_size = Some(MIB as u32);
    create(&p, &o, &mut NoProgress).unwrap();
    let d = vhd::open(&p, false).unwrap();
    d.write_at(&[0xaa; 4096], 0).unwrap();
    drop(d);
    p
}

/// A file with a log entry that still needs replay.
fn crashed(dir: &Path, name: &str) -> PathBuf {
    let src = good(dir, &format!("src-{name}"));
    let path = dir.join(name);
    for n in 0.. {
        let _ = std::fs::remove_file(&path);
        std::fs::copy(&src, &path).unwrap();
        let storage = CrashStorage::cut_after(n, AfterCrash::KeepAllWrites);
        if let Ok(d) = vhd::open_on(&storage, &path, false) {
            let _ = d.write_at(&[0x33; 4096], 5 * MIB);
            let _ = d.flush();
        }
        storage.power_cut().unwrap();
        if vhd::vhdx::VhdxImage::inspect(&path)
            .unwrap()
            .log_found()
            .is_some()
        {
            return path;
        }
    }
    unreachable!()
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn flip(path: &Path, offset: u64) {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    poke(path, offset, &[b[0] ^ 0x5a]);
}

/// Opens read-only and writable: both fail with an error containing every
/// `words` and the path, and the file is byte for byte as before.
fn assert_refused(path: &Path, words: &[&str]) {
    let before = std::fs::read(path).unwrap();
    for read_only in [true, false] {
        let err = match vhd::open(path, read_only) {
            Ok(_) => panic!("{} opened (read_only {read_only})", path.display()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(path.to_str().unwrap()), "no path in: {err}");
        for w in words {
            assert!(err.contains(w), "{w:?} missing from: {err}");
        }
        let i = vhd::ops::info::info(path);
        assert!(i.is_err(), "info accepted {}", path.display());
        let report = vhd::ops::check::check(path, false).unwrap();
        assert!(!report.clean(), "check passed {}", path.display());
    }
    assert!(
        std::fs::read(path).unwrap() == before,
        "{} was written to",
        path.display()
    );
}

fn metadata_region(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; MIB as usize];
    f.read_exact_at(&mut b, METADATA_OFFSET).unwrap();
    b
}

#[test]
fn bad_signature() {
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path(), "sig.vhdx");
    poke(&p, 0, b"notvhdx!");
    assert_refused(&p, &["vhdxfile"]);
}

#[test]
fn one_bad_header_falls_back_to_the_other_and_both_bad_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path(), "hdr.vhdx");
    flip(&p, (64 << 10) + 100);
    let d = vhd::open(&p, true).unwrap();
    let mut b = [0u8; 4096];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0xaa; 4096]);
    drop(d);
    flip(&p, (128 << 10) + 100);
    assert_refused(&p, &["neither VHDX header is valid", "CRC-32C mismatch"]);
}

#[test]
fn region_table_crc() {
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path(), "rt.vhdx");
    flip(&p, (192 << 10) + 40);
    assert!(vhd::open(&p, true).is_ok(), "the second copy should serve");
    flip(&p, (256 << 10) + 40);
    assert_refused(&p, &["region table", "CRC-32C mismatch"]);
}

#[test]
fn unknown_required_region() {
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path(), "region.vhdx");
    let f = std::fs::File::open(&p).unwrap();
    let mut b = vec![0u8; 64 << 10];
    f.read_exact_at(&mut b, 192 << 10).unwrap();
    let mut t = RegionTable::parse(&b).unwrap();
    t.entries.push(RegionEntry {
        guid: uuid::Uuid::from_u128(0x1234),
        file_offset: 100 * MIB,
        length: MIB as u32,
        required: true,
    });
    for at in [192u64 << 10, 256 << 10] {
        poke(&p, at, &t.serialize());
    }
    assert_refused(
        &p,
        &["required region", "00000000-0000-0000-0000-000000001234"],
    );
}

#[test]
fn unknown_required_metadata_item() {
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path(), "meta.vhdx");
    let mut m = Metadata::parse(&metadata_region(&p)).unwrap();
    m.other.push(OtherItem {
        entry: Entry {
            item_id: uuid::Uuid::from_u128(0x77),
            offset: 0,
            length: 4,
            is_user: false,
            is_virtual_disk: false,
            is_required: true,
        },
        data: vec![1, 2, 3, 4],
    });
    poke(&p, METADATA_OFFSET, &m.serialize(MIB as usize).unwrap());
    assert_refused(
        &p,
        &[
            "required metadata item",
            "00000000-0000-0000-0000-000000000077",
        ],
    );
}

#[test]
fn bat_entry_beyond_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = good(dir.path(), "bat.vhdx");
    // Block 3: fully present at 1000 MiB.
    let entry: u64 = (1000 << 20) | 6;
    poke(&p, BAT_OFFSET + 3 * 8, &entry.to_le_bytes());
    assert_refused(&p, &["BAT entry 3", "past the end of the file"]);
}

#[test]
fn log_with_a_broken_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let p = crashed(dir.path(), "log.vhdx");
    // The entry's descriptor sector, past its header: its checksum breaks.
    flip(&p, MIB + 200);
    assert_refused(&p, &["log", "no valid, complete log sequence"]);
}

#[test]
fn file_shorter_than_the_logs_flushed_file_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = crashed(dir.path(), "short.vhdx");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - MIB)
        .unwrap();
    assert_refused(&p, &["FlushedFileOffset", "truncated"]);
}

#[test]
fn garbage_after_the_signature_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    for (i, len) in [8u64, 100, 70_000, 300_000, 2 * MIB]
        .into_iter()
        .enumerate()
    {
        let p = dir.path().join(format!("g{i}.vhdx"));
        let mut b: Vec<u8> = (0..len).map(|x| (x * 7919 % 251) as u8).collect();
        b[..8].copy_from_slice(b"vhdxfile");
        std::fs::write(&p, &b).unwrap();
        assert!(vhd::open(&p, true).is_err());
        assert!(std::fs::read(&p).unwrap() == b);
    }
}
