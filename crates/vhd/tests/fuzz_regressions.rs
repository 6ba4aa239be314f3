//! Files the fuzzers (`fuzz/`, see the README) found the engine mishandling,
//! each rebuilt here from a clean image and the fault the fuzzer made.

use std::path::Path;

use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::vhd1::header::DynamicHeader;
use vhd::NoProgress;

fn dynamic(path: &Path) -> Vec<u8> {
    let kind = NewDisk::Dynamic {
        size: 64 << 10,
        block_size: 4096,
    };
    let opts = CreateOptions {
        kind,
        exact_size: true,
    };
    create(path, &opts, &mut NoProgress).unwrap();
    write_4k(path, 4096, 7);
    std::fs::read(path).unwrap()
}

fn set_bat_entry(bytes: &mut [u8], block: usize, sector: u32) {
    let header = DynamicHeader::parse(bytes[512..1536].try_into().unwrap()).unwrap();
    let at = header.table_offset as usize + 4 * block;
    bytes[at..at + 4].copy_from_slice(&sector.to_be_bytes());
}

fn open_error(path: &Path, bytes: &[u8]) -> String {
    std::fs::write(path, bytes).unwrap();
    match vhd::open(path, false) {
        Ok(_) => panic!("a damaged image opened for writing"),
        Err(e) => e.to_string(),
    }
}

/// Writes 4 KiB of `byte` at `offset` of the disk at `path` and flushes.
fn write_4k(path: &Path, offset: u64, byte: u8) {
    let disk = vhd::open(path, false).unwrap();
    disk.write_at(&[byte; 4096], offset).unwrap();
    disk.flush().unwrap();
}

/// The disk at `path` opens again and reads 4 KiB of `byte` at `offset`.
fn assert_reopens_reading(path: &Path, offset: u64, byte: u8) {
    let disk = vhd::open(path, true).expect("the written file opens again");
    let mut b = [0u8; 4096];
    disk.read_at(&mut b, offset).unwrap();
    assert_eq!(b, [byte; 4096]);
}

/// Puts the undamaged file made by `dynamic` or `vhdx_dynamic` back at
/// `path`: it opens and reads the data written into it.
fn assert_clean_file_still_reads(path: &Path, clean: &[u8]) {
    std::fs::write(path, clean).unwrap();
    assert_reopens_reading(path, 4096, 7);
}

/// A BAT entry pointing at the start of the file put block 0's bitmap on the
/// footer copy and its data on the dynamic header and the BAT: the first
/// write to it destroyed the image (vhd_image target). Now refused at open.
#[test]
fn block_over_the_header_or_bat_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let clean = dynamic(&path);
    for (sector, what) in [
        (0, "the footer copy"),
        (1, "the dynamic header"),
        (3, "the BAT"),
    ] {
        let mut bad = clean.clone();
        set_bat_entry(&mut bad, 0, sector);
        let err = open_error(&path, &bad);
        assert!(
            err.contains(what) && err.contains("BAT entry 0"),
            "sector {sector}: {err}"
        );
    }
    assert_clean_file_still_reads(&path, &clean);
}

/// A BAT placed over the dynamic header: a flush of the BAT would overwrite
/// the header. Refused at open.
#[test]
fn bat_over_the_header_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let mut bytes = dynamic(&path);
    let mut header = DynamicHeader::parse(bytes[512..1536].try_into().unwrap()).unwrap();
    header.table_offset = 1024;
    bytes[512..1536].copy_from_slice(&header.serialize());
    let err = open_error(&path, &bytes);
    assert!(
        err.contains("the BAT at offset 1024 overlaps the dynamic header"),
        "{err}"
    );
}

/// A differencing disk whose absolute locator claims more bytes than the file
/// holds: the first block allocated past the end "overlapped" it, so the file
/// the engine had just written and flushed no longer opened (vhd_image
/// target). Blocks are checked against the footer copy, header and BAT only.
#[test]
fn locator_claiming_past_the_end_does_not_block_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhd");
    dynamic(&parent);
    let child = dir.path().join("c.avhd");
    let opts = CreateOptions {
        kind: NewDisk::Differencing {
            parent: parent.clone(),
        },
        exact_size: true,
    };
    create(&child, &opts, &mut NoProgress).unwrap();
    let mut bytes = std::fs::read(&child).unwrap();
    let mut header = DynamicHeader::parse(bytes[512..1536].try_into().unwrap()).unwrap();
    let loc = header
        .locators
        .iter_mut()
        .find(|l| l.platform_code == vhd::vhd1::header::PLATFORM_W2KU)
        .expect("an absolute locator");
    loc.data_length = 1 << 20;
    bytes[512..1536].copy_from_slice(&header.serialize());
    std::fs::write(&child, &bytes).unwrap();
    write_4k(&child, 8 * 4096, 9);
    assert_reopens_reading(&child, 8 * 4096, 9);
}

// VHDX (vhdx_* targets).

fn vhdx_dynamic(path: &Path) -> Vec<u8> {
    use vhd::vhdx::create::{create, NewVhdx, VhdxOptions};
    let opts = VhdxOptions {
        block_size: Some(1 << 20),
        ..VhdxOptions::new(NewVhdx::Dynamic { size: 4 << 20 })
    };
    create(path, &opts, &mut NoProgress).unwrap();
    write_4k(path, 4096, 7);
    std::fs::read(path).unwrap()
}

/// Offset of the BAT and of the metadata region of a file the engine made.
fn vhdx_regions(bytes: &[u8]) -> (usize, usize) {
    use vhd::vhdx::region::{RegionTable, BAT_GUID, METADATA_GUID, TABLE_OFFSETS};
    let at = TABLE_OFFSETS[0] as usize;
    let t = RegionTable::parse(&bytes[at..]).unwrap();
    (
        t.find(&BAT_GUID).unwrap().file_offset as usize,
        t.find(&METADATA_GUID).unwrap().file_offset as usize,
    )
}

/// A BAT entry placing block 1 on the metadata region, the BAT or the log:
/// the first write to the block overwrote that structure, so the file the
/// engine had just written and flushed no longer opened (vhdx_image target).
/// Now refused at open, naming what the block lies over.
#[test]
fn vhdx_block_over_metadata_bat_or_log_is_refused_at_open() {
    use vhd::vhdx::bat::{BatEntry, PAYLOAD_BLOCK_FULLY_PRESENT};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let clean = vhdx_dynamic(&path);
    let (bat, meta) = vhdx_regions(&clean);
    for (offset, what) in [
        (meta as u64, "metadata region"),
        (bat as u64, "BAT"),
        (1 << 20, "log"),
    ] {
        let mut bad = clean.clone();
        let e = BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, offset).raw();
        bad[bat + 8..bat + 16].copy_from_slice(&e.to_le_bytes());
        let err = open_error(&path, &bad);
        assert!(
            err.contains("BAT entry 1") && err.contains(what),
            "{what}: {err}"
        );
    }
    assert_clean_file_still_reads(&path, &clean);
}

/// An optional region this version does not know, lying past the end of the
/// file: new blocks went to the file's end, over that region, and with blocks
/// now checked against every region the file no longer opened. New blocks go
/// past every region.
#[test]
fn vhdx_new_block_goes_past_an_unknown_region_beyond_the_end() {
    use vhd::vhdx::region::{RegionEntry, RegionTable, TABLE_OFFSETS, TABLE_SIZE};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let mut bytes = vhdx_dynamic(&path);
    let at = TABLE_OFFSETS[0] as usize;
    let mut table = RegionTable::parse(&bytes[at..]).unwrap();
    let past_end = bytes.len() as u64;
    table.entries.push(RegionEntry {
        guid: uuid::Uuid::from_u128(0x5eed),
        file_offset: past_end,
        length: 1 << 20,
        required: false,
    });
    for at in TABLE_OFFSETS {
        bytes[at as usize..at as usize + TABLE_SIZE].copy_from_slice(&table.serialize());
    }
    std::fs::write(&path, &bytes).unwrap();
    write_4k(&path, 3 << 20, 9);
    assert_reopens_reading(&path, 3 << 20, 9);
}

/// Two BAT entries placing their blocks on the same bytes: writing either would
/// overwrite the other's data. Refused at open, naming both entries.
#[test]
fn vhdx_blocks_sharing_bytes_are_refused_at_open() {
    use vhd::vhdx::bat::{BatEntry, PAYLOAD_BLOCK_FULLY_PRESENT};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let clean = vhdx_dynamic(&path);
    let (bat, _) = vhdx_regions(&clean);
    let first = BatEntry::parse(u64::from_le_bytes(clean[bat..bat + 8].try_into().unwrap()));
    for shift in [0u64, 4096] {
        let mut bad = clean.clone();
        let e = BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, first.offset() + shift).raw();
        bad[bat + 8..bat + 16].copy_from_slice(&e.to_le_bytes());
        // Long enough that the second block lies within the file.
        bad.resize(bad.len() + (2 << 20), 0);
        let err = open_error(&path, &bad);
        assert!(
            err.contains("BAT entry 1") && err.contains("block of BAT entry 0"),
            "shift {shift}: {err}"
        );
    }
}
