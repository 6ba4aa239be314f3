//! The BAT decoder and the sector-bitmap helpers on arbitrary bytes: entries
//! round-trip, and bits set within a block read back as set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhd::vhd1::bat;

fuzz_target!(|data: &[u8]| {
    let entries = bat::parse(data);
    assert_eq!(entries.len(), data.len() / 4);
    assert_eq!(bat::serialize(&entries), data[..entries.len() * 4]);
    let _ = bat::table_bytes(entries.len() as u32);
    assert!(bat::table_bytes(entries.len() as u32) >= entries.len() as u64 * 4);

    // The input as a block's bitmap: every block size a header can carry.
    if let Some((&shift, rest)) = data.split_first() {
        let block_size = 512u64 << (shift % 20); // 512 B ..= 256 MiB
        let sectors = block_size / bat::SECTOR;
        let mut bitmap = rest.to_vec();
        bitmap.resize(bat::bitmap_bytes(block_size).min(1 << 16) as usize, 0);
        let first = entries.first().map_or(0, |&e| u64::from(e)) % sectors;
        let count = entries.get(1).map_or(1, |&e| u64::from(e)) % (sectors - first + 1);
        bat::set_bits(&mut bitmap, first, count);
        for s in first..first + count.min(4096) {
            if (s / 8) < bitmap.len() as u64 {
                assert!(bat::bit(&bitmap, s), "sector {s} set but reads absent");
            }
        }
        let _ = bat::bit(&bitmap, u64::from(entries.last().copied().unwrap_or(0)));
    }
});
