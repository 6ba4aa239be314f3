//! The VHDX region table parser on arbitrary bytes (padded with zeros to the
//! table's 64 KiB). The first byte is a flags byte: bit 0 puts the right
//! CRC-32C in the checksum field first. A table that parses holds aligned,
//! distinct, non-overlapping regions, and serializes back to the same table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::vhdx::crc::crc32c_without;
use vhd::vhdx::region::{RegionTable, BAT_GUID, METADATA_GUID, TABLE_SIZE};
use vhd::vhdx::MIB;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mut b = vec![0u8; TABLE_SIZE];
    let n = data.len().min(TABLE_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    if flags & 1 != 0 {
        let crc = crc32c_without(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(table) = RegionTable::parse(&b) else {
        return;
    };
    for (i, e) in table.entries.iter().enumerate() {
        assert!(e.file_offset >= MIB && e.file_offset % MIB == 0, "{e:?}");
        assert_eq!(u64::from(e.length) % MIB, 0, "{e:?}");
        for o in &table.entries[..i] {
            assert_ne!(o.guid, e.guid);
            assert!(
                o.end() <= e.file_offset || e.end() <= o.file_offset,
                "{o:?} {e:?}"
            );
        }
    }
    let _ = table.find(&BAT_GUID);
    let _ = table.find(&METADATA_GUID);
    if let Some(u) = table.unknown_required() {
        assert!(u.required && u.guid != BAT_GUID && u.guid != METADATA_GUID);
    }
    let again = RegionTable::parse(&table.serialize()).expect("a serialized table parses");
    assert_eq!(again, table);
});
