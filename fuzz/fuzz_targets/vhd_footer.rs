//! The VHD footer parser on arbitrary 512 bytes, and the CHS geometry helpers
//! on arbitrary sizes. A footer that parses must serialize back to one that
//! parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::vhd1::footer::{chs_exact_size, Footer, Geometry, FOOTER_SIZE};

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; FOOTER_SIZE];
    let n = data.len().min(FOOTER_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    if let Ok(footer) = Footer::parse(&b) {
        let _ = footer.creator();
        let _ = footer.qemu_size();
        let again = Footer::parse(&footer.serialize()).expect("a serialized footer parses");
        assert_eq!(again, footer);
    }
    // The bytes after the footer, as a size: geometry and CHS rounding.
    if let Some(raw) = data.get(FOOTER_SIZE..FOOTER_SIZE + 8) {
        let size = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
        let g = Geometry::for_size(size);
        assert!(g.sectors() <= vhd::vhd1::footer::MAX_CHS_SECTORS);
        let exact = chs_exact_size(size);
        assert!(exact >= size, "chs_exact_size({size}) = {exact} is smaller");
    }
});
