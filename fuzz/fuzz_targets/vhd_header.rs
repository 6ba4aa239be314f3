//! The dynamic-header parser on arbitrary 1024 bytes. A header that parses
//! must serialize back to one that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::vhd1::header::{DynamicHeader, HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; HEADER_SIZE];
    let n = data.len().min(HEADER_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    if let Ok(header) = DynamicHeader::parse(&b) {
        for loc in &header.locators {
            let _ = loc.space_bytes();
        }
        let again = DynamicHeader::parse(&header.serialize()).expect("a serialized header parses");
        assert_eq!(again, header);
    }
});
