//! Parent-locator parsing: the input's first 1024 bytes become a differencing
//! disk's dynamic header (its parent name and eight locator entries as given;
//! cookie, block size, BAT fields and checksum made valid), the rest is the
//! file's data that the locators point into. The engine then lists the
//! locator paths and the parent candidates, as it does to find a parent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::vhd1::footer::{DiskType, Footer};
use vhd::vhd1::header::{decode_locator_path, DynamicHeader, HEADER_SIZE};
use vhd::vhd1::{chain, VhdImage};
use viridian_fuzz::MemStorage;

const BLOCK: u32 = 4096;
const SIZE: u64 = 16 * BLOCK as u64;
const TABLE_AT: u64 = 1536;

fuzz_target!(|data: &[u8]| {
    let _ = decode_locator_path(data);
    let mut hb = [0u8; HEADER_SIZE];
    let n = data.len().min(HEADER_SIZE);
    hb[..n].copy_from_slice(&data[..n]);
    hb[0..8].copy_from_slice(b"cxsparse");
    hb[16..24].copy_from_slice(&TABLE_AT.to_be_bytes());
    hb[28..32].copy_from_slice(&((SIZE / u64::from(BLOCK)) as u32).to_be_bytes());
    hb[32..36].copy_from_slice(&BLOCK.to_be_bytes());
    // The checksum: one's complement of the byte sum without its own field.
    let sum = hb
        .iter()
        .enumerate()
        .filter(|(i, _)| !(36..40).contains(i))
        .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
    hb[36..40].copy_from_slice(&(!sum).to_be_bytes());
    let header = DynamicHeader::parse(&hb).expect("the fixed-up header parses");

    let footer = Footer::new(DiskType::Differencing, SIZE, [1; 16]).serialize();
    let mut file = Vec::new();
    file.extend_from_slice(&footer);
    file.extend_from_slice(&hb);
    file.extend_from_slice(&[0xff; 512]); // the BAT: no blocks
    file.extend_from_slice(data.get(HEADER_SIZE..).unwrap_or_default());
    file.resize(file.len().div_ceil(512) * 512, 0);
    file.extend_from_slice(&footer);

    let storage = MemStorage::new(&file);
    let path = std::path::Path::new("/nonexistent/viridian-fuzz/child.avhd");
    let image = VhdImage::open_layer_on(&storage, path, true).expect("the built image opens");
    assert_eq!(image.header(), Some(&header));
    for loc in &header.locators {
        let _ = loc.space_bytes();
    }
    let _ = chain::locator_paths(&image, &header);
    let _ = chain::parent_candidates(&image);
});
