//! The block allocation table (BAT) and the layout of a block in the file: a
//! sector bitmap (one bit per sector, most significant bit first, padded to
//! whole sectors) followed by the block's data.

/// A BAT entry for a block with no data in this file.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
pub const SECTOR: u64 = 512;

/// Bytes the table of `entries` entries occupies in the file (whole sectors).
pub fn table_bytes(entries: u32) -> u64 {
    (u64::from(entries) * 4).div_ceil(SECTOR) * SECTOR
}

/// Bytes of a block's sector bitmap in the file (whole sectors).
pub fn bitmap_bytes(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// The name of the first of `regions` (file offset, length, name) that the
/// file range `[start, start + len)` overlaps. A block's bitmap and data must
/// not overlap the file's metadata (the footer copy, the dynamic header, the
/// BAT): writes to the block would overwrite it.
pub fn overlap<'a>(start: u64, len: u64, regions: &[(u64, u64, &'a str)]) -> Option<&'a str> {
    let end = start.saturating_add(len);
    regions
        .iter()
        .find(|&&(at, n, _)| n > 0 && len > 0 && start < at.saturating_add(n) && at < end)
        .map(|&(_, _, name)| name)
}

/// Decodes big-endian entries (a trailing partial entry is ignored).
pub fn parse(raw: &[u8]) -> Vec<u32> {
    raw.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Encodes entries big-endian.
pub fn serialize(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Whether sector `sector` of a block is marked present in `bitmap`.
pub fn bit(bitmap: &[u8], sector: u64) -> bool {
    bitmap
        .get((sector / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
}

/// Marks `count` sectors from `first` present.
pub fn set_bits(bitmap: &mut [u8], first: u64, count: u64) {
    for s in first..first + count {
        if let Some(b) = bitmap.get_mut((s / 8) as usize) {
            *b |= 0x80 >> (s % 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_big_endian_and_round_trip() {
        let entries = [3, BAT_UNUSED, 0x0102_0304];
        let raw = serialize(&entries);
        assert_eq!(&raw[8..12], &[1, 2, 3, 4]);
        assert_eq!(parse(&raw), entries);
        assert_eq!(table_bytes(3), 512);
        assert_eq!(table_bytes(129), 1024);
    }

    #[test]
    fn overlap_names_the_metadata_a_range_touches() {
        let regions = [(0, 512, "the footer copy"), (512, 1024, "the header")];
        assert_eq!(overlap(0, 4608, &regions), Some("the footer copy"));
        assert_eq!(overlap(1000, 10, &regions), Some("the header"));
        assert_eq!(overlap(1535, 1, &regions), Some("the header"));
        assert_eq!(overlap(1536, 4608, &regions), None);
        assert_eq!(overlap(u64::MAX - 1, 100, &regions), None);
        assert_eq!(
            overlap(100, 0, &regions),
            None,
            "an empty range overlaps nothing"
        );
    }

    #[test]
    fn bitmaps_are_msb_first_and_padded_to_sectors() {
        // 2 MiB blocks: 4096 sectors, 512 bytes of bitmap; 512 KiB: 128 bytes -> 512.
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(512 << 10), 512);
        assert_eq!(bitmap_bytes(16 << 20), 4096);
        let mut b = vec![0u8; 2];
        set_bits(&mut b, 1, 2);
        assert_eq!(b, [0b0110_0000, 0]);
        assert!(bit(&b, 1) && bit(&b, 2) && !bit(&b, 0) && !bit(&b, 3));
        assert!(!bit(&b, 100), "out of range reads as absent");
    }
}
