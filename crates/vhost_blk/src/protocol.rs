//! virtio-blk wire formats (virtio 1.2, section 5.2): feature bits, the device
//! configuration space, the request header, and discard/write-zeroes segments.
//! Plain types with `parse`/`serialize`; the I/O logic lives in `backend`.

/// Request types (`virtio_blk_outhdr.type`).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// virtio-blk feature bits.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// Transport and vhost feature bits.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VHOST_F_LOG_ALL: u32 = 26;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Size of the request header that opens every request.
pub const REQUEST_HEADER_SIZE: usize = 16;
/// Size of one discard/write-zeroes segment.
pub const SEGMENT_SIZE: usize = 16;
/// Length of the GET_ID answer (the serial number), not NUL-terminated when full.
pub const ID_BYTES: usize = 20;
/// The unit of `sector` fields, whatever the logical block size.
pub const SECTOR: u64 = 512;
/// Size of `struct virtio_blk_config` up to and including the secure-erase fields;
/// front ends ask for a prefix of it.
pub const CONFIG_SPACE_SIZE: usize = 72;
/// Offset of the `wce` (writeback cache enable) byte in the configuration space.
pub const CONFIG_WCE_OFFSET: usize = 32;

/// `virtio_blk_outhdr`: the request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub request_type: u32,
    pub sector: u64,
}

impl RequestHeader {
    /// Parses the first 16 bytes of a request; `None` when there are fewer.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..REQUEST_HEADER_SIZE)?;
        Some(Self {
            request_type: u32::from_le_bytes(b[0..4].try_into().ok()?),
            sector: u64::from_le_bytes(b[8..16].try_into().ok()?),
        })
    }

    pub fn serialize(&self) -> [u8; REQUEST_HEADER_SIZE] {
        let mut b = [0u8; REQUEST_HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// `virtio_blk_discard_write_zeroes`: one range of a DISCARD or WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    /// Bit 0: the device may unmap (deallocate) instead of writing zeros.
    pub flags: u32,
}

impl Segment {
    pub const FLAG_UNMAP: u32 = 1;

    /// Parses a request's payload into its segments; `None` when the payload is not
    /// a whole number of segments.
    pub fn parse_all(bytes: &[u8]) -> Option<Vec<Self>> {
        if !bytes.len().is_multiple_of(SEGMENT_SIZE) {
            return None;
        }
        bytes
            .chunks_exact(SEGMENT_SIZE)
            .map(|c| {
                Some(Self {
                    sector: u64::from_le_bytes(c[0..8].try_into().ok()?),
                    num_sectors: u32::from_le_bytes(c[8..12].try_into().ok()?),
                    flags: u32::from_le_bytes(c[12..16].try_into().ok()?),
                })
            })
            .collect()
    }

    pub fn serialize(&self) -> [u8; SEGMENT_SIZE] {
        let mut b = [0u8; SEGMENT_SIZE];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// The fields of `struct virtio_blk_config` this device fills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    /// log2(physical block size / logical block size).
    pub physical_block_exp: u8,
    pub wce: bool,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    pub fn serialize(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (8..12) stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // geometry (16..20) stays 0: VIRTIO_BLK_F_GEOMETRY is not offered.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        // alignment_offset (25), min_io_size (26..28), opt_io_size (28..32): 0.
        b[CONFIG_WCE_OFFSET] = u8::from(self.wce);
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = u8::from(self.write_zeroes_may_unmap);
        // secure erase (60..72) stays 0: VIRTIO_BLK_F_SECURE_ERASE is not offered.
        b
    }

    /// The `len` bytes at `offset` of the configuration space, zero beyond its end
    /// (a front end built against newer headers may ask for more).
    pub fn read(&self, offset: u32, len: u32) -> Vec<u8> {
        let all = self.serialize();
        let mut out = vec![0u8; len as usize];
        let start = (offset as usize).min(all.len());
        let end = (offset as usize)
            .saturating_add(len as usize)
            .min(all.len());
        out[..end - start].copy_from_slice(&all[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_short_headers_are_refused() {
        let h = RequestHeader {
            request_type: VIRTIO_BLK_T_OUT,
            sector: 0x0102_0304_0506,
        };
        assert_eq!(RequestHeader::parse(&h.serialize()), Some(h));
        assert_eq!(RequestHeader::parse(&h.serialize()[..15]), None);
    }

    #[test]
    fn segments_parse_only_whole_entries() {
        let s = Segment {
            sector: 8,
            num_sectors: 16,
            flags: Segment::FLAG_UNMAP,
        };
        let mut bytes = s.serialize().to_vec();
        bytes.extend_from_slice(&s.serialize());
        assert_eq!(Segment::parse_all(&bytes), Some(vec![s, s]));
        assert_eq!(Segment::parse_all(&bytes[..20]), None);
        assert_eq!(Segment::parse_all(&[]), Some(vec![]));
    }

    #[test]
    fn config_space_has_the_virtio_layout_and_reads_past_its_end_as_zero() {
        let c = BlkConfig {
            capacity: 2048,
            seg_max: 126,
            blk_size: 4096,
            physical_block_exp: 0,
            wce: true,
            num_queues: 2,
            max_discard_sectors: 0x1234,
            max_discard_seg: 32,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0x5678,
            max_write_zeroes_seg: 32,
            write_zeroes_may_unmap: true,
        };
        let b = c.serialize();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 0x1234);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 0x5678);
        assert_eq!(b[56], 1);
        assert_eq!(c.read(32, 4), vec![1, 0, 2, 0]);
        assert_eq!(c.read(70, 8), vec![0; 8]);
        assert_eq!(c.read(200, 4), vec![0; 4]);
    }
}
