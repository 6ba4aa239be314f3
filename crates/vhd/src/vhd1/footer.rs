//! The VHD footer (512 bytes at the end of every VHD, copied at offset 0 of
//! dynamic and differencing disks) and its CHS geometry.

use super::checksum;

pub const FOOTER_SIZE: usize = 512;
pub const COOKIE: &[u8; 8] = b"conectix";
/// Our creator application. QEMU 7.2 takes the size of a VHD by this creator from
/// its CHS geometry, so sizes we create are rounded to a CHS-exact size by default.
pub const CREATOR_APP: [u8; 4] = *b"vrdn";
pub const CREATOR_VERSION: u32 = 0x0001_0000;
/// "Wi2k": the host OS field Windows writes.
pub const CREATOR_HOST_OS: u32 = 0x5769_326B;
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;
/// The largest geometry (65535 cylinders, 16 heads, 255 sectors per track).
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

/// Cylinders, heads and sectors per track, as stored in the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The geometry for a disk of `size` bytes, by the algorithm of the VHD
    /// specification (appendix "CHS Calculation").
    pub fn for_size(size: u64) -> Self {
        let total = (size / 512).min(MAX_CHS_SECTORS);
        let (spt, heads, cyl_times_heads);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cyl_times_heads = total / spt;
        } else {
            let mut s = 17;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            spt = s;
            heads = h;
            cyl_times_heads = cth;
        }
        Geometry {
            cylinders: (cyl_times_heads / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// Sectors the geometry addresses.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    fn pack(self) -> u32 {
        (u32::from(self.cylinders) << 16)
            | (u32::from(self.heads) << 8)
            | u32::from(self.sectors_per_track)
    }

    fn unpack(v: u32) -> Self {
        Geometry {
            cylinders: (v >> 16) as u16,
            heads: (v >> 8) as u8,
            sectors_per_track: v as u8,
        }
    }
}

/// The smallest size of at least `requested` bytes whose CHS geometry addresses
/// exactly that many sectors, so that readers that go by geometry (QEMU, Virtual PC)
/// and readers that go by the current-size field (Hyper-V) see the same disk.
/// Disks at or beyond the largest geometry keep their size (every reader then
/// takes the current-size field), rounded up to whole sectors. Never less than
/// `requested`: a size too close to `u64::MAX` to round is returned as it is
/// (no VHD can hold it; `create` refuses it).
pub fn chs_exact_size(requested: u64) -> u64 {
    let Some(mut candidate) = requested.checked_next_multiple_of(512) else {
        return requested;
    };
    for _ in 0..16 {
        let g = Geometry::for_size(candidate);
        if g.sectors() >= MAX_CHS_SECTORS || candidate / 512 >= MAX_CHS_SECTORS {
            return candidate;
        }
        if g.sectors() * 512 == candidate {
            return candidate;
        }
        // One more cylinder under this head/sector choice; the choice may change
        // with the new size, so check again.
        candidate = (u64::from(g.cylinders) + 1)
            * u64::from(g.heads)
            * u64::from(g.sectors_per_track)
            * 512;
    }
    candidate
}

/// What is wrong with 512 bytes that should be a footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FooterFault {
    Cookie([u8; 8]),
    Checksum { stored: u32, computed: u32 },
    DiskType(u32),
}

impl std::fmt::Display for FooterFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FooterFault::Cookie(c) => write!(
                f,
                "no VHD footer: the cookie is {:?}, not \"conectix\"",
                String::from_utf8_lossy(c)
            ),
            FooterFault::Checksum { stored, computed } => write!(
                f,
                "VHD footer checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            FooterFault::DiskType(t) => write!(f, "VHD footer has unknown disk type {t}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub format_version: u32,
    /// Offset of the dynamic header; `u64::MAX` for fixed disks.
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl Footer {
    /// A new footer for a disk of `size` bytes created now.
    pub fn new(disk_type: DiskType, size: u64, unique_id: [u8; 16]) -> Self {
        Footer {
            features: 2, // reserved bit, always set
            format_version: FORMAT_VERSION,
            data_offset: if disk_type == DiskType::Fixed {
                u64::MAX
            } else {
                512
            },
            timestamp: vhd_timestamp_now(),
            creator_app: CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_host_os: CREATOR_HOST_OS,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            unique_id,
            saved_state: 0,
        }
    }

    pub fn parse(b: &[u8; FOOTER_SIZE]) -> Result<Self, FooterFault> {
        if &b[0..8] != COOKIE {
            let mut c = [0u8; 8];
            c.copy_from_slice(&b[0..8]);
            return Err(FooterFault::Cookie(c));
        }
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        if stored != computed {
            return Err(FooterFault::Checksum { stored, computed });
        }
        let type_code = be32(b, 60);
        let disk_type = DiskType::from_code(type_code).ok_or(FooterFault::DiskType(type_code))?;
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[68..84]);
        Ok(Footer {
            features: be32(b, 8),
            format_version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app,
            creator_version: be32(b, 32),
            creator_host_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: Geometry::unpack(be32(b, 56)),
            disk_type,
            unique_id,
            saved_state: b[84],
        })
    }

    pub fn serialize(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.format_version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..60].copy_from_slice(&self.geometry.pack().to_be_bytes());
        b[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// The creator application as text, e.g. "win " or "qemu".
    pub fn creator(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches('\0')
            .to_string()
    }

    /// The size QEMU 7.2 reports for this footer: the current-size field for
    /// creators it knows to mean it (and for the largest geometry), else the
    /// size the CHS geometry addresses.
    pub fn qemu_size(&self) -> u64 {
        let by_size = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];
        if by_size.iter().any(|c| **c == self.creator_app)
            || self.geometry.sectors() == MAX_CHS_SECTORS
        {
            self.current_size / 512 * 512
        } else {
            self.geometry.sectors() * 512
        }
    }
}

pub fn vhd_timestamp_now() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH_OFFSET);
    now.saturating_sub(VHD_EPOCH_OFFSET) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_round_trips_and_checksum_is_ones_complement() {
        let f = Footer::new(DiskType::Dynamic, 10 << 20, [7; 16]);
        let b = f.serialize();
        assert_eq!(Footer::parse(&b).unwrap(), f);
        let sum: u32 = b
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .map(|(_, &x)| u32::from(x))
            .sum();
        assert_eq!(be32(&b, 64), !sum);
    }

    #[test]
    fn corrupt_footer_reports_stored_and_computed_checksums() {
        let mut b = Footer::new(DiskType::Fixed, 1 << 20, [1; 16]).serialize();
        b[50] ^= 1;
        match Footer::parse(&b) {
            Err(FooterFault::Checksum { stored, computed }) => assert_ne!(stored, computed),
            other => panic!("expected checksum fault, got {other:?}"),
        }
        b[0] = b'x';
        assert!(matches!(Footer::parse(&b), Err(FooterFault::Cookie(_))));
    }

    #[test]
    fn geometry_follows_the_specification() {
        // 4 MiB: 8192 sectors -> spt 17, heads 4, 120 cylinders (8160 sectors).
        let g = Geometry::for_size(4 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (120, 4, 17));
        // 127 GiB and beyond: the largest geometry.
        assert_eq!(Geometry::for_size(200 << 30).sectors(), MAX_CHS_SECTORS);
    }

    /// Found by fuzzing (fuzz/, target vhd_footer): rounding a size near
    /// `u64::MAX` up to whole sectors wrapped to 0, so `create` made a 0-byte
    /// disk for a huge requested size instead of refusing it.
    #[test]
    fn chs_exact_size_of_a_huge_size_is_never_smaller() {
        for requested in [u64::MAX, u64::MAX - 511, u64::MAX - 512, 1 << 63] {
            let size = chs_exact_size(requested);
            assert!(size >= requested, "{requested} became {size}");
        }
    }

    #[test]
    fn chs_exact_sizes_are_addressed_exactly_by_their_geometry() {
        for mb in [1u64, 3, 4, 10, 100, 1000, 4096, 65_000] {
            let size = chs_exact_size(mb << 20);
            assert!(size >= mb << 20);
            assert_eq!(Geometry::for_size(size).sectors() * 512, size, "{mb} MiB");
            // Not more than a cylinder's worth bigger than asked.
            assert!(
                size - (mb << 20) <= 16 * 255 * 512,
                "{mb} MiB grew too much"
            );
        }
    }
}
