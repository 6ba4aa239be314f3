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
    {
        let disk = vhd::open(path, false).unwrap();
        disk.write_at(&[7u8; 4096], 4096).unwrap();
        disk.flush().unwrap();
    }
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
    // The clean file still opens and reads.
    std::fs::write(&path, &clean).unwrap();
    let disk = vhd::open(&path, true).unwrap();
    let mut b = [0u8; 4096];
    disk.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [7u8; 4096]);
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
    {
        let disk = vhd::open(&child, false).expect("opens");
        disk.write_at(&[9u8; 4096], 8 * 4096).unwrap();
        disk.flush().unwrap();
    }
    let disk = vhd::open(&child, true).expect("the written file opens again");
    let mut b = [0u8; 4096];
    disk.read_at(&mut b, 8 * 4096).unwrap();
    assert_eq!(b, [9u8; 4096]);
}
