//! The header section's first three structures: the file type identifier (at
//! offset 0) and the two headers (at 64 KiB and 128 KiB).

use uuid::Uuid;

use super::crc::{crc32c, crc32c_without};
use super::{field, guid_at, need, put_guid, signature, u16_at, u32_at, u64_at, Fault, MIB};

pub const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Offsets of header 1 and header 2.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes of a header (the rest of its 64 KiB slot is reserved).
pub const HEADER_SIZE: usize = 4096;
/// Bytes of the file type identifier structure we write.
pub const FILE_ID_SIZE: usize = 8 + 512;

/// The file type identifier: the signature and a creator string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentifier {
    pub creator: String,
}

impl FileIdentifier {
    pub fn parse(b: &[u8]) -> Result<Self, Fault> {
        need("file type identifier", b, FILE_ID_SIZE)?;
        signature("file type identifier", b, FILE_ID_SIGNATURE)?;
        let units: Vec<u16> = b[8..FILE_ID_SIZE]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Ok(FileIdentifier {
            creator: String::from_utf16_lossy(&units),
        })
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; FILE_ID_SIZE];
        b[..8].copy_from_slice(FILE_ID_SIGNATURE);
        // 256 units fill the field: a creator read without a terminating
        // zero is written back whole.
        for (i, u) in self.creator.encode_utf16().take(256).enumerate() {
            b[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        b
    }
}

/// One of the two headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    /// Zero when the log is empty.
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses and validates a header: signature, CRC-32C, version, and the
    /// log's placement (1 MiB multiples, past the header section).
    pub fn parse(b: &[u8]) -> Result<Self, Fault> {
        need("header", b, HEADER_SIZE)?;
        let b = &b[..HEADER_SIZE];
        signature("header", b, HEADER_SIGNATURE)?;
        let stored = u32_at(b, 4);
        let computed = crc32c_without(b, 4);
        if stored != computed {
            return Err(Fault::Checksum {
                what: "header",
                stored,
                computed,
            });
        }
        let h = Header {
            sequence_number: u64_at(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: u16_at(b, 64),
            version: u16_at(b, 66),
            log_length: u32_at(b, 68),
            log_offset: u64_at(b, 72),
        };
        if h.version != 1 {
            return Err(field(
                "header",
                format!("version {} (only version 1 is defined)", h.version),
            ));
        }
        if h.log_version != 0 && !h.log_guid.is_nil() {
            return Err(field(
                "header",
                format!(
                    "log version {} with a log to replay (only version 0 is defined)",
                    h.log_version
                ),
            ));
        }
        if u64::from(h.log_length) % MIB != 0
            || !h.log_offset.is_multiple_of(MIB)
            || h.log_offset < MIB
        {
            return Err(field(
                "header",
                format!(
                    "log at offset {} with length {} is not 1 MiB aligned past the header section",
                    h.log_offset, h.log_length
                ),
            ));
        }
        if h.log_offset.checked_add(u64::from(h.log_length)).is_none() {
            return Err(field(
                "header",
                format!(
                    "log at offset {} with length {} ends past the largest file offset",
                    h.log_offset, h.log_length
                ),
            ));
        }
        if h.log_length == 0 && !h.log_guid.is_nil() {
            return Err(field("header", "a log to replay but a log length of 0"));
        }
        Ok(h)
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        put_guid(&mut b, 16, &self.file_write_guid);
        put_guid(&mut b, 32, &self.data_write_guid);
        put_guid(&mut b, 48, &self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let crc = crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Picks the current header from the two slots' parse results: the only valid
/// one, or the valid one with the greater sequence number (header 1 on a tie).
/// Returns its index (0 or 1), or both faults.
pub fn current(
    first: &Result<Header, Fault>,
    second: &Result<Header, Fault>,
) -> Result<usize, Box<(Fault, Fault)>> {
    match (first, second) {
        (Ok(a), Ok(b)) => Ok(if b.sequence_number > a.sequence_number {
            1
        } else {
            0
        }),
        (Ok(_), Err(_)) => Ok(0),
        (Err(_), Ok(_)) => Ok(1),
        (Err(a), Err(b)) => Err(Box::new((a.clone(), b.clone()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            sequence_number: 7,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::parse(&h.serialize()).unwrap(), h);
    }

    #[test]
    fn header_with_a_flipped_bit_fails_its_checksum() {
        let mut b = sample().serialize();
        b[100] ^= 1;
        assert!(matches!(Header::parse(&b), Err(Fault::Checksum { .. })));
    }

    #[test]
    fn header_with_a_wrong_signature_is_refused() {
        let mut b = sample().serialize();
        b[0] = b'x';
        assert!(matches!(Header::parse(&b), Err(Fault::Signature { .. })));
        assert!(matches!(Header::parse(&b[..10]), Err(Fault::Short { .. })));
    }

    /// A log ending past 2^64 (found by review): the open computed the
    /// log's end with an overflowing add when the log was empty.
    #[test]
    fn header_whose_log_ends_past_the_largest_offset_is_refused() {
        let mut h = sample();
        h.log_offset = u64::MAX - (MIB - 1);
        let err = Header::parse(&h.serialize()).unwrap_err();
        assert!(err.to_string().contains("ends past"), "{err}");
        h.log_offset = u64::MAX - (2 * MIB - 1);
        assert_eq!(Header::parse(&h.serialize()).unwrap(), h);
    }

    #[test]
    fn current_header_is_the_valid_one_with_the_higher_sequence() {
        let mut a = sample();
        let mut b = sample();
        a.sequence_number = 5;
        b.sequence_number = 6;
        assert_eq!(current(&Ok(a.clone()), &Ok(b.clone())), Ok(1));
        b.sequence_number = 4;
        assert_eq!(current(&Ok(a.clone()), &Ok(b.clone())), Ok(0));
        let bad = Err(field("header", "x"));
        assert_eq!(current(&bad, &Ok(b)), Ok(1));
        assert_eq!(current(&Ok(a), &bad), Ok(0));
        assert!(current(&bad, &bad).is_err());
    }

    /// A creator filling all 512 bytes, with no terminating zero, lost its
    /// last character when written back (vhdx_header target).
    #[test]
    fn file_identifier_with_a_full_creator_round_trips() {
        let mut b = vec![0u8; FILE_ID_SIZE];
        b[..8].copy_from_slice(FILE_ID_SIGNATURE);
        for u in b[8..].chunks_exact_mut(2) {
            u.copy_from_slice(&0x0101u16.to_le_bytes());
        }
        let id = FileIdentifier::parse(&b).unwrap();
        assert_eq!(id.creator.encode_utf16().count(), 256);
        assert_eq!(id.serialize(), b);
        assert_eq!(FileIdentifier::parse(&id.serialize()).unwrap(), id);
    }

    #[test]
    fn file_identifier_round_trips_its_creator() {
        let id = FileIdentifier {
            creator: "Viridian 0.1".into(),
        };
        assert_eq!(FileIdentifier::parse(&id.serialize()).unwrap(), id);
        assert!(FileIdentifier::parse(&[0u8; 600]).is_err());
    }
}
