//! The region table (two copies, at 192 KiB and 256 KiB): where the BAT and
//! the metadata region lie, and which regions a reader must understand.

use uuid::{uuid, Uuid};

use super::crc::{crc32c, crc32c_without};
use super::{field, guid_at, need, put_guid, signature, u32_at, u64_at, Fault, MIB};

pub const SIGNATURE: &[u8; 4] = b"regi";
pub const TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes of a region table (its CRC covers all of them).
pub const TABLE_SIZE: usize = 64 << 10;
pub const MAX_ENTRIES: u32 = 2047;

pub const BAT_GUID: Uuid = uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
pub const METADATA_GUID: Uuid = uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Uuid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

impl RegionEntry {
    pub fn end(&self) -> u64 {
        self.file_offset.saturating_add(u64::from(self.length))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// Parses and validates a region table: signature, CRC-32C over all 64 KiB,
    /// entry count, 1 MiB alignment, unique GUIDs, no overlaps.
    pub fn parse(b: &[u8]) -> Result<Self, Fault> {
        const WHAT: &str = "region table";
        need(WHAT, b, TABLE_SIZE)?;
        let b = &b[..TABLE_SIZE];
        signature(WHAT, b, SIGNATURE)?;
        let stored = u32_at(b, 4);
        let computed = crc32c_without(b, 4);
        if stored != computed {
            return Err(Fault::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        let count = u32_at(b, 8);
        if count > MAX_ENTRIES {
            return Err(field(
                WHAT,
                format!("{count} entries (at most {MAX_ENTRIES})"),
            ));
        }
        let mut entries: Vec<RegionEntry> = Vec::new();
        for i in 0..count as usize {
            let at = 16 + 32 * i;
            let e = RegionEntry {
                guid: guid_at(b, at),
                file_offset: u64_at(b, at + 16),
                length: u32_at(b, at + 24),
                required: u32_at(b, at + 28) & 1 != 0,
            };
            if !e.file_offset.is_multiple_of(MIB)
                || e.file_offset < MIB
                || u64::from(e.length) % MIB != 0
            {
                return Err(field(
                    WHAT,
                    format!(
                        "region {} at offset {} with length {} is not 1 MiB aligned past the header section",
                        e.guid, e.file_offset, e.length
                    ),
                ));
            }
            if entries.iter().any(|o| o.guid == e.guid) {
                return Err(field(WHAT, format!("region {} is listed twice", e.guid)));
            }
            if let Some(o) = entries
                .iter()
                .find(|o| o.file_offset < e.end() && e.file_offset < o.end())
            {
                return Err(field(
                    WHAT,
                    format!("regions {} and {} overlap", o.guid, e.guid),
                ));
            }
            entries.push(e);
        }
        Ok(RegionTable { entries })
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; TABLE_SIZE];
        b[..4].copy_from_slice(SIGNATURE);
        b[8..12].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let at = 16 + 32 * i;
            put_guid(&mut b, at, &e.guid);
            b[at + 16..at + 24].copy_from_slice(&e.file_offset.to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&e.length.to_le_bytes());
            b[at + 28..at + 32].copy_from_slice(&u32::from(e.required).to_le_bytes());
        }
        let crc = crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn find(&self, guid: &Uuid) -> Option<&RegionEntry> {
        self.entries.iter().find(|e| &e.guid == guid)
    }

    /// The first required region this implementation does not know.
    pub fn unknown_required(&self) -> Option<&RegionEntry> {
        self.entries
            .iter()
            .find(|e| e.required && e.guid != BAT_GUID && e.guid != METADATA_GUID)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RegionTable {
        RegionTable {
            entries: vec![
                RegionEntry {
                    guid: BAT_GUID,
                    file_offset: 3 * MIB,
                    length: MIB as u32,
                    required: true,
                },
                RegionEntry {
                    guid: METADATA_GUID,
                    file_offset: 2 * MIB,
                    length: MIB as u32,
                    required: true,
                },
            ],
        }
    }

    #[test]
    fn region_table_round_trips() {
        let t = sample();
        let b = t.serialize();
        assert_eq!(&b[..4], b"regi");
        assert_eq!(RegionTable::parse(&b).unwrap(), t);
        assert!(t.unknown_required().is_none());
    }

    #[test]
    fn bat_guid_is_stored_in_windows_byte_order() {
        let b = sample().serialize();
        assert_eq!(&b[16..20], &[0x66, 0x77, 0xc2, 0x2d]);
    }

    #[test]
    fn region_table_crc_covers_the_whole_64_kib() {
        let mut b = sample().serialize();
        b[TABLE_SIZE - 1] = 1;
        assert!(matches!(
            RegionTable::parse(&b),
            Err(Fault::Checksum { .. })
        ));
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let mut t = sample();
        t.entries[1].file_offset = 3 * MIB;
        assert!(RegionTable::parse(&t.serialize()).is_err());
    }

    #[test]
    fn an_unknown_required_region_is_reported() {
        let mut t = sample();
        t.entries.push(RegionEntry {
            guid: Uuid::from_u128(1),
            file_offset: 9 * MIB,
            length: MIB as u32,
            required: true,
        });
        let t = RegionTable::parse(&t.serialize()).unwrap();
        assert_eq!(t.unknown_required().unwrap().guid, Uuid::from_u128(1));
    }
}
