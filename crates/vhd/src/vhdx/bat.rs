//! The block allocation table: 64-bit entries (state in bits 0-2, file offset
//! in MiB in bits 20-63), payload entries interleaved with one sector-bitmap
//! entry after every `chunk_ratio` of them; and the sector bitmaps (one bit
//! per logical sector, least significant bit first).

use super::MIB;

pub const PAYLOAD_BLOCK_NOT_PRESENT: u8 = 0;
pub const PAYLOAD_BLOCK_UNDEFINED: u8 = 1;
pub const PAYLOAD_BLOCK_ZERO: u8 = 2;
pub const PAYLOAD_BLOCK_UNMAPPED: u8 = 3;
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u8 = 6;
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u8 = 7;
pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
pub const SB_BLOCK_PRESENT: u8 = 6;

/// Sectors one sector bitmap block (1 MiB) describes: 2^23.
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;
/// Bytes of a sector bitmap block.
pub const BITMAP_BLOCK: u64 = MIB;

/// One BAT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatEntry {
    pub state: u8,
    /// File offset in 1 MiB units (44 bits).
    pub offset_mb: u64,
}

impl BatEntry {
    pub fn parse(raw: u64) -> Self {
        BatEntry {
            state: (raw & 7) as u8,
            offset_mb: raw >> 20,
        }
    }

    pub fn raw(self) -> u64 {
        u64::from(self.state & 7) | self.offset_mb << 20
    }

    pub fn new(state: u8, offset: u64) -> Self {
        BatEntry {
            state,
            offset_mb: offset / MIB,
        }
    }

    /// The file offset in bytes.
    pub fn offset(self) -> u64 {
        self.offset_mb << 20
    }

    /// Whether the low bits hold reserved values (bits 3-19).
    pub fn reserved_bits(raw: u64) -> u64 {
        raw & 0xF_FFF8
    }
}

/// Decodes the table from its bytes (a trailing partial entry is ignored).
pub fn parse(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

pub fn serialize(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// The shape of a BAT, from the metadata that determines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub block_size: u64,
    pub logical_sector_size: u64,
    pub disk_size: u64,
    pub has_parent: bool,
}

impl Layout {
    /// Payload blocks per sector bitmap block: 2^23 × logical sector size ÷ block size.
    pub fn chunk_ratio(&self) -> u64 {
        (SECTORS_PER_BITMAP * self.logical_sector_size / self.block_size).max(1)
    }

    pub fn payload_blocks(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size)
    }

    pub fn bitmap_blocks(&self) -> u64 {
        self.payload_blocks().div_ceil(self.chunk_ratio())
    }

    /// Entries the BAT must hold (MS-VHDX 2.5): through the last payload entry
    /// for fixed and dynamic disks, through the last bitmap entry for
    /// differencing disks.
    pub fn required_entries(&self) -> u64 {
        let blocks = self.payload_blocks();
        if self.has_parent {
            self.bitmap_blocks() * (self.chunk_ratio() + 1)
        } else if blocks == 0 {
            0
        } else {
            blocks + (blocks - 1) / self.chunk_ratio()
        }
    }

    /// Entries for every chunk, bitmap entries included: what we allocate, so
    /// a dynamic disk can become differencing without moving its BAT.
    pub fn full_entries(&self) -> u64 {
        self.bitmap_blocks() * (self.chunk_ratio() + 1)
    }

    /// Index in the BAT of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio()
    }

    /// Index in the BAT of the sector bitmap of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio() + 1) + self.chunk_ratio()
    }

    /// Bytes the BAT region needs, rounded to 1 MiB.
    pub fn region_bytes(&self) -> u64 {
        (self.full_entries() * 8).div_ceil(MIB).max(1) * MIB
    }

    /// Logical sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector_size
    }
}

/// Whether bit `i` (least significant bit first) is set.
pub fn bit(bitmap: &[u8], i: u64) -> bool {
    bitmap
        .get((i / 8) as usize)
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Sets `count` bits from `first`.
pub fn set_bits(bitmap: &mut [u8], first: u64, count: u64) {
    for i in first..first + count {
        if let Some(b) = bitmap.get_mut((i / 8) as usize) {
            *b |= 1 << (i % 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_state_and_offset() {
        let e = BatEntry::new(PAYLOAD_BLOCK_FULLY_PRESENT, 8 * MIB);
        assert_eq!(e.raw(), 0x0080_0006);
        assert_eq!(BatEntry::parse(e.raw()), e);
        assert_eq!(e.offset(), 8 * MIB);
    }

    #[test]
    fn chunk_ratio_follows_block_and_sector_size() {
        let l = |block_size, logical_sector_size| Layout {
            block_size,
            logical_sector_size,
            disk_size: 1 << 40,
            has_parent: false,
        };
        assert_eq!(l(32 << 20, 512).chunk_ratio(), 128);
        assert_eq!(l(1 << 20, 512).chunk_ratio(), 4096);
        assert_eq!(l(256 << 20, 4096).chunk_ratio(), 128);
        assert_eq!(l(2 << 20, 4096).chunk_ratio(), 16384);
    }

    #[test]
    fn bitmap_entries_follow_each_chunk() {
        let l = Layout {
            block_size: 32 << 20,
            logical_sector_size: 512,
            disk_size: 200 * (32 << 20),
            has_parent: false,
        };
        assert_eq!(l.payload_index(0), 0);
        assert_eq!(l.payload_index(127), 127);
        assert_eq!(l.bitmap_index(0), 128);
        assert_eq!(l.payload_index(128), 129);
        // Dynamic: 200 payload entries and the one bitmap entry between them.
        assert_eq!(l.required_entries(), 201);
        let d = Layout {
            has_parent: true,
            ..l
        };
        assert_eq!(d.required_entries(), 2 * 129);
    }

    #[test]
    fn sector_bitmap_is_least_significant_bit_first() {
        let mut b = vec![0u8; 2];
        set_bits(&mut b, 1, 2);
        assert_eq!(b, vec![0b0000_0110, 0]);
        set_bits(&mut b, 8, 1);
        assert!(bit(&b, 8) && bit(&b, 1) && !bit(&b, 0));
        assert!(!bit(&b, 1000));
    }
}
