//! The VHDX metadata region: table, known items and parent locator. The input
//! is `table_len: u16 LE`, that many bytes of table (padded with zeros to its
//! 64 KiB), then the bytes after the table, where the items lie; that last
//! part is also parsed on its own as a parent locator. What parses must
//! serialize back to the same value, and the locator's paths and linkages are
//! derived as when the engine looks for a parent.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vhd::vhdx::chain;
use vhd::vhdx::metadata::{self, Metadata, ParentLocator, TABLE_SIZE};
use vhd::vhdx::MIB;

fn locator(pl: &ParentLocator) {
    let b = pl.serialize();
    assert!(
        b.len() as u64 <= MIB,
        "a {}-byte locator does not fit in an item",
        b.len()
    );
    let again = ParentLocator::parse(&b).expect("a serialized locator parses");
    assert_eq!(&again, pl);
    let _ = chain::linkages(pl);
    let child = Path::new("/vms/disks/child.avhdx");
    for p in chain::parent_candidates(child, pl) {
        assert!(!p.as_os_str().is_empty());
    }
}

/// `m` with its unknown items' offsets cleared: where an item lies is the
/// writer's choice (serialize packs them 8-byte aligned), not its value.
fn placed_anywhere(mut m: Metadata) -> Metadata {
    for o in &mut m.other {
        o.entry.offset = 0;
    }
    m
}

fuzz_target!(|data: &[u8]| {
    let Some(t) = data.get(..2) else {
        return;
    };
    let t = usize::from(u16::from_le_bytes([t[0], t[1]]));
    let data = &data[2..];
    let (table, items) = data.split_at(t.min(data.len()));
    let mut region = vec![0u8; TABLE_SIZE];
    region[..table.len().min(TABLE_SIZE)].copy_from_slice(&table[..table.len().min(TABLE_SIZE)]);
    region.extend_from_slice(items);

    if let Ok(pl) = ParentLocator::parse(items) {
        locator(&pl);
    }
    let entries = metadata::parse_table(&region, region.len() as u64);
    let Ok(m) = Metadata::parse(&region) else {
        return;
    };
    assert!(entries.is_ok(), "metadata parses but its table does not");
    assert!(m.block_size.is_power_of_two());
    assert!(m.virtual_disk_size > 0 && m.virtual_disk_size % u64::from(m.logical_sector_size) == 0);
    assert!(!m.has_parent || m.parent_locator.is_some());
    if let Some(pl) = &m.parent_locator {
        locator(pl);
    }
    let _ = m.unknown_required();
    // Back into a region as large as the engine's (at least 1 MiB).
    let len = region.len().max(MIB as usize);
    if let Ok(b) = m.serialize(len) {
        assert_eq!(b.len(), len);
        let again = Metadata::parse(&b).expect("serialized metadata parses");
        assert_eq!(placed_anywhere(again), placed_anywhere(m));
    }
});
