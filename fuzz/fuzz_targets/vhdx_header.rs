//! The VHDX file type identifier and header parsers on arbitrary bytes (padded
//! with zeros to a header's 4 KiB). The first byte is a flags byte: bit 0 puts
//! the right CRC-32C in the header's checksum field first, so mutations reach
//! the field checks behind it. What parses must serialize back to the same
//! value, and a header's serialized fields must be the input's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::vhdx::crc::crc32c_without;
use vhd::vhdx::header::{self, FileIdentifier, Header, FILE_ID_SIZE, HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mut b = [0u8; HEADER_SIZE];
    let n = data.len().min(HEADER_SIZE);
    b[..n].copy_from_slice(&data[..n]);

    if let Ok(id) = FileIdentifier::parse(&b[..FILE_ID_SIZE]) {
        let again = FileIdentifier::parse(&id.serialize()).expect("a serialized identifier parses");
        assert_eq!(again, id);
    }

    if flags & 1 != 0 {
        let crc = crc32c_without(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    let first = Header::parse(&b);
    if let Ok(h) = &first {
        let s = h.serialize();
        assert_eq!(s.len(), HEADER_SIZE);
        assert_eq!(
            s[8..80],
            b[8..80],
            "serialized fields differ from the input's"
        );
        let again = Header::parse(&s).expect("a serialized header parses");
        assert_eq!(&again, h);
        // The next header the engine would write: one sequence number on.
        let mut next = h.clone();
        next.sequence_number = h.sequence_number.wrapping_add(1);
        let second = Header::parse(&next.serialize());
        let slot = header::current(&first, &second).expect("both are valid");
        if next.sequence_number > h.sequence_number {
            assert_eq!(slot, 1, "the newer header is not current");
        }
    } else {
        // The header slot's other half: a broken first header falls back to it.
        let second = Header::parse(data.get(HEADER_SIZE..).unwrap_or_default());
        if let Ok(slot) = header::current(&first, &second) {
            assert_eq!(slot, 1);
        }
    }
});
