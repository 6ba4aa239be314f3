//! The dynamic disk header (1024 bytes, after the footer copy at offset 0) with
//! its parent name and parent locator entries, and the BAT entry encoding.

use super::checksum;

pub const HEADER_SIZE: usize = 1024;
pub const COOKIE: &[u8; 8] = b"cxsparse";
pub const HEADER_VERSION: u32 = 0x0001_0000;
pub use super::bat::BAT_UNUSED;
pub const LOCATOR_COUNT: usize = 8;
/// Absolute Windows path, UTF-16LE.
pub const PLATFORM_W2KU: u32 = 0x5732_6B75;
/// Relative Windows path, UTF-16LE.
pub const PLATFORM_W2RU: u32 = 0x5732_7275;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locator {
    pub platform_code: u32,
    /// Space reserved for the locator's data, as stored: bytes (Windows) or sectors
    /// (the specification's wording); see [`Locator::space_bytes`].
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

impl Locator {
    /// The reserved space in bytes, reading both conventions: Windows stores bytes
    /// (multiples of 512), the specification says sectors (small numbers).
    pub fn space_bytes(&self) -> u64 {
        let s = u64::from(self.data_space);
        if s != 0 && s < 512 {
            s * 512
        } else {
            s
        }
    }
}

/// What is wrong with 1024 bytes that should be a dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderFault {
    Cookie([u8; 8]),
    Checksum { stored: u32, computed: u32 },
    BlockSize(u32),
}

impl std::fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderFault::Cookie(c) => write!(
                f,
                "no dynamic disk header: the cookie is {:?}, not \"cxsparse\"",
                String::from_utf8_lossy(c)
            ),
            HeaderFault::Checksum { stored, computed } => write!(
                f,
                "VHD dynamic header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            HeaderFault::BlockSize(s) => write!(
                f,
                "VHD block size {s} is not a power of two between 512 bytes and 256 MiB"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// Parent's file name or path (stored as UTF-16BE, at most 256 characters).
    pub parent_name: String,
    pub locators: [Locator; LOCATOR_COUNT],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

pub fn block_size_valid(size: u32) -> bool {
    size.is_power_of_two() && (512..=256 << 20).contains(&size)
}

impl DynamicHeader {
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Result<Self, HeaderFault> {
        if &b[0..8] != COOKIE {
            let mut c = [0u8; 8];
            c.copy_from_slice(&b[0..8]);
            return Err(HeaderFault::Cookie(c));
        }
        let stored = be32(b, 36);
        let computed = checksum(b, 36);
        if stored != computed {
            return Err(HeaderFault::Checksum { stored, computed });
        }
        let block_size = be32(b, 32);
        if !block_size_valid(block_size) {
            return Err(HeaderFault::BlockSize(block_size));
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&b[40..56]);
        let units: Vec<u16> = b[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let parent_name = String::from_utf16_lossy(&units);
        let mut locators: [Locator; LOCATOR_COUNT] = Default::default();
        for (i, loc) in locators.iter_mut().enumerate() {
            let at = 576 + i * 24;
            *loc = Locator {
                platform_code: be32(b, at),
                data_space: be32(b, at + 4),
                data_length: be32(b, at + 8),
                data_offset: be64(b, at + 16),
            };
        }
        Ok(DynamicHeader {
            table_offset: be64(b, 16),
            header_version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size,
            parent_unique_id,
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    pub fn serialize(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_unique_id);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, unit) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&unit.to_be_bytes());
        }
        for (i, loc) in self.locators.iter().enumerate() {
            let at = 576 + i * 24;
            b[at..at + 4].copy_from_slice(&loc.platform_code.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&loc.data_space.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&loc.data_length.to_be_bytes());
            b[at + 16..at + 24].copy_from_slice(&loc.data_offset.to_be_bytes());
        }
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// Encodes a locator path as Windows does: UTF-16LE.
pub fn encode_locator_path(path: &str) -> Vec<u8> {
    path.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Decodes a locator's UTF-16LE data into a path string.
pub fn decode_locator_path(data: &[u8]) -> String {
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DynamicHeader {
        let mut locators: [Locator; LOCATOR_COUNT] = Default::default();
        locators[0] = Locator {
            platform_code: PLATFORM_W2KU,
            data_space: 4096,
            data_length: 40,
            data_offset: 0x2000,
        };
        DynamicHeader {
            table_offset: 1536,
            header_version: HEADER_VERSION,
            max_table_entries: 10,
            block_size: 2 << 20,
            parent_unique_id: [9; 16],
            parent_timestamp: 77,
            parent_name: "C:\\disks\\parent.vhd".into(),
            locators,
        }
    }

    #[test]
    fn header_round_trips_with_utf16be_parent_name() {
        let h = sample();
        let b = h.serialize();
        assert_eq!(&b[64..68], &[0, b'C', 0, b':']);
        assert_eq!(DynamicHeader::parse(&b).unwrap(), h);
    }

    #[test]
    fn header_faults_are_specific() {
        let mut b = sample().serialize();
        b[100] ^= 0xff;
        assert!(matches!(
            DynamicHeader::parse(&b),
            Err(HeaderFault::Checksum { .. })
        ));
        let mut h = sample();
        h.block_size = 3 << 20;
        assert_eq!(
            DynamicHeader::parse(&h.serialize()),
            Err(HeaderFault::BlockSize(3 << 20))
        );
    }

    #[test]
    fn locator_space_reads_bytes_and_sectors() {
        let bytes = Locator {
            data_space: 4096,
            ..Default::default()
        };
        let sectors = Locator {
            data_space: 1,
            ..Default::default()
        };
        assert_eq!(bytes.space_bytes(), 4096);
        assert_eq!(sectors.space_bytes(), 512);
    }

    #[test]
    fn locator_paths_are_utf16le() {
        let enc = encode_locator_path(".\\p.vhd");
        assert_eq!(&enc[..4], &[b'.', 0, b'\\', 0]);
        assert_eq!(decode_locator_path(&enc), ".\\p.vhd");
    }
}
