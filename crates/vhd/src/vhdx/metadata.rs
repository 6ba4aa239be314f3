//! The metadata region: a 64 KiB table of items, then the items. The known
//! items are parsed into [`Metadata`]; unknown ones are kept as bytes (and
//! written back unchanged), and an unknown *required* one is reported.

use uuid::{uuid, Uuid};

use super::{field, guid_at, need, put_guid, signature, u16_at, u32_at, u64_at, Fault, MIB};

pub const SIGNATURE: &[u8; 8] = b"metadata";
pub const TABLE_SIZE: usize = 64 << 10;
pub const MAX_ENTRIES: usize = 2047;

pub const FILE_PARAMETERS: Uuid = uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
pub const VIRTUAL_DISK_SIZE: Uuid = uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
pub const VIRTUAL_DISK_ID: Uuid = uuid!("BECA12AB-B2E6-4523-93EF-C309E000C746");
pub const LOGICAL_SECTOR_SIZE: Uuid = uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
pub const PHYSICAL_SECTOR_SIZE: Uuid = uuid!("CDA348C7-445D-4471-9CC9-E9885251C556");
pub const PARENT_LOCATOR: Uuid = uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/// The one parent locator type MS-VHDX defines: a VHDX parent.
pub const VHDX_LOCATOR_TYPE: Uuid = uuid!("B04AEFB7-D19E-4A81-B789-25B8E9445913");

/// The largest virtual disk (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// One entry of the metadata table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub item_id: Uuid,
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub is_virtual_disk: bool,
    pub is_required: bool,
}

impl Entry {
    fn flags(&self) -> u32 {
        u32::from(self.is_user)
            | u32::from(self.is_virtual_disk) << 1
            | u32::from(self.is_required) << 2
    }
}

/// The metadata table: its entries, validated against a region of `region_len` bytes.
pub fn parse_table(b: &[u8], region_len: u64) -> Result<Vec<Entry>, Fault> {
    const WHAT: &str = "metadata table";
    need(WHAT, b, TABLE_SIZE)?;
    signature(WHAT, b, SIGNATURE)?;
    let count = usize::from(u16_at(b, 10));
    if count > MAX_ENTRIES {
        return Err(field(
            WHAT,
            format!("{count} entries (at most {MAX_ENTRIES})"),
        ));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(count);
    for i in 0..count {
        let at = 32 + 32 * i;
        let flags = u32_at(b, at + 24);
        let e = Entry {
            item_id: guid_at(b, at),
            offset: u32_at(b, at + 16),
            length: u32_at(b, at + 20),
            is_user: flags & 1 != 0,
            is_virtual_disk: flags & 2 != 0,
            is_required: flags & 4 != 0,
        };
        let end = u64::from(e.offset) + u64::from(e.length);
        if e.length == 0 {
            if e.offset != 0 {
                return Err(field(
                    WHAT,
                    format!("empty item {} has offset {}", e.item_id, e.offset),
                ));
            }
        } else if (e.offset as usize) < TABLE_SIZE || end > region_len || u64::from(e.length) > MIB
        {
            return Err(field(
                WHAT,
                format!(
                    "item {} ({} bytes at offset {}) does not lie within the {region_len}-byte region past the table",
                    e.item_id, e.length, e.offset
                ),
            ));
        }
        if entries
            .iter()
            .any(|o| o.item_id == e.item_id && o.is_user == e.is_user)
        {
            return Err(field(WHAT, format!("item {} is listed twice", e.item_id)));
        }
        if let Some(o) = entries.iter().find(|o| {
            o.length != 0
                && e.length != 0
                && o.offset < e.offset + e.length
                && e.offset < o.offset + o.length
        }) {
            return Err(field(
                WHAT,
                format!("items {} and {} overlap", o.item_id, e.item_id),
            ));
        }
        entries.push(e);
    }
    Ok(entries)
}

/// The parent locator item: a type and key/value strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentLocator {
    pub locator_type: Uuid,
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, key: &str, value: Option<String>) {
        self.entries.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.entries.push((key.to_string(), v));
        }
    }

    pub fn parse(b: &[u8]) -> Result<Self, Fault> {
        const WHAT: &str = "parent locator";
        need(WHAT, b, 20)?;
        let count = usize::from(u16_at(b, 18));
        need(WHAT, b, 20 + 12 * count)?;
        let text = |off: u32, len: u16| -> Result<String, Fault> {
            let start = off as usize;
            let end = start + usize::from(len);
            if off == 0 || len == 0 || !len.is_multiple_of(2) || end > b.len() {
                return Err(field(
                    WHAT,
                    format!("string of {len} bytes at offset {off} does not lie within the {}-byte item", b.len()),
                ));
            }
            let units: Vec<u16> = b[start..end]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| field(WHAT, "a string is not valid UTF-16"))
        };
        let mut entries = Vec::with_capacity(count);
        // What the locator takes written back (strings one after another):
        // strings may share bytes here, but written out they must still fit
        // in an item, or a metadata rewrite would build gigabytes.
        let mut serialized = 20 + 12 * count as u64;
        for i in 0..count {
            let at = 20 + 12 * i;
            serialized += u64::from(u16_at(b, at + 8)) + u64::from(u16_at(b, at + 10));
            if serialized > MIB {
                return Err(field(
                    WHAT,
                    format!("its strings add up to more than {MIB} bytes, the largest item"),
                ));
            }
            let key = text(u32_at(b, at), u16_at(b, at + 8))?;
            let value = text(u32_at(b, at + 4), u16_at(b, at + 10))?;
            if entries.iter().any(|(k, _): &(String, String)| *k == key) {
                return Err(field(WHAT, format!("key {key:?} appears twice")));
            }
            entries.push((key, value));
        }
        Ok(ParentLocator {
            locator_type: guid_at(b, 0),
            entries,
        })
    }

    pub fn serialize(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut b = vec![0u8; 20 + 12 * n];
        put_guid(&mut b, 0, &self.locator_type);
        b[18..20].copy_from_slice(&(n as u16).to_le_bytes());
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let mut put = |s: &str| -> (u32, u16) {
                let off = b.len() as u32;
                for u in s.encode_utf16() {
                    b.extend_from_slice(&u.to_le_bytes());
                }
                (off, (b.len() as u32 - off) as u16)
            };
            let (ko, kl) = put(k);
            let (vo, vl) = put(v);
            let at = 20 + 12 * i;
            b[at..at + 4].copy_from_slice(&ko.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&vo.to_le_bytes());
            b[at + 8..at + 10].copy_from_slice(&kl.to_le_bytes());
            b[at + 10..at + 12].copy_from_slice(&vl.to_le_bytes());
        }
        b
    }
}

/// An item this implementation does not interpret, kept as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherItem {
    pub entry: Entry,
    pub data: Vec<u8>,
}

/// The known metadata items of a VHDX file, and any others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_disk_size: u64,
    pub virtual_disk_id: Uuid,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub parent_locator: Option<ParentLocator>,
    pub other: Vec<OtherItem>,
}

impl Metadata {
    /// Parses the whole metadata region.
    pub fn parse(region: &[u8]) -> Result<Self, Fault> {
        const WHAT: &str = "metadata";
        let entries = parse_table(region, region.len() as u64)?;
        let item = |id: &Uuid, min: usize, name: &str| -> Result<Option<&[u8]>, Fault> {
            let Some(e) = entries.iter().find(|e| &e.item_id == id && !e.is_user) else {
                return Ok(None);
            };
            let data = &region[e.offset as usize..(e.offset + e.length) as usize];
            if data.len() < min {
                return Err(field(
                    WHAT,
                    format!("the {name} item has {} bytes, needs {min}", data.len()),
                ));
            }
            Ok(Some(data))
        };
        let required = |id: &Uuid, min: usize, name: &str| -> Result<&[u8], Fault> {
            item(id, min, name)?
                .ok_or_else(|| field(WHAT, format!("the required {name} item is missing")))
        };
        let fp = required(&FILE_PARAMETERS, 8, "file parameters")?;
        let block_size = u32_at(fp, 0);
        let bits = u32_at(fp, 4);
        if !block_size.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&block_size) {
            return Err(field(
                WHAT,
                format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
            ));
        }
        let logical = u32_at(required(&LOGICAL_SECTOR_SIZE, 4, "logical sector size")?, 0);
        let physical = u32_at(
            required(&PHYSICAL_SECTOR_SIZE, 4, "physical sector size")?,
            0,
        );
        for (name, v) in [("logical", logical), ("physical", physical)] {
            if v != 512 && v != 4096 {
                return Err(field(
                    WHAT,
                    format!("{name} sector size {v} (must be 512 or 4096)"),
                ));
            }
        }
        let size = u64_at(required(&VIRTUAL_DISK_SIZE, 8, "virtual disk size")?, 0);
        if size == 0 || size > MAX_DISK_SIZE || !size.is_multiple_of(u64::from(logical)) {
            return Err(field(
                WHAT,
                format!("virtual disk size {size} is not a multiple of the {logical}-byte sector up to 64 TiB"),
            ));
        }
        let id = guid_at(required(&VIRTUAL_DISK_ID, 16, "virtual disk ID")?, 0);
        let has_parent = bits & 2 != 0;
        let parent_locator = match item(&PARENT_LOCATOR, 20, "parent locator")? {
            Some(b) => Some(ParentLocator::parse(b)?),
            None if has_parent => {
                return Err(field(
                    WHAT,
                    "HasParent is set but there is no parent locator",
                ))
            }
            None => None,
        };
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            VIRTUAL_DISK_ID,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        let other = entries
            .iter()
            .filter(|e| e.is_user || !known.contains(&e.item_id))
            .map(|e| OtherItem {
                entry: e.clone(),
                data: region[e.offset as usize..(e.offset + e.length) as usize].to_vec(),
            })
            .collect();
        Ok(Metadata {
            block_size,
            leave_blocks_allocated: bits & 1 != 0,
            has_parent,
            virtual_disk_size: size,
            virtual_disk_id: id,
            logical_sector_size: logical,
            physical_sector_size: physical,
            parent_locator,
            other,
        })
    }

    /// The first item marked required that this implementation does not know.
    pub fn unknown_required(&self) -> Option<&OtherItem> {
        self.other.iter().find(|o| o.entry.is_required)
    }

    /// The whole metadata region of `region_len` bytes: table, then items.
    pub fn serialize(&self, region_len: usize) -> Result<Vec<u8>, Fault> {
        let mut items: Vec<(Uuid, bool, bool, bool, Vec<u8>)> = Vec::new();
        let mut fp = self.block_size.to_le_bytes().to_vec();
        let bits = u32::from(self.leave_blocks_allocated) | u32::from(self.has_parent) << 1;
        fp.extend_from_slice(&bits.to_le_bytes());
        items.push((FILE_PARAMETERS, false, false, true, fp));
        items.push((
            VIRTUAL_DISK_SIZE,
            false,
            true,
            true,
            self.virtual_disk_size.to_le_bytes().to_vec(),
        ));
        items.push((
            VIRTUAL_DISK_ID,
            false,
            true,
            true,
            self.virtual_disk_id.to_bytes_le().to_vec(),
        ));
        items.push((
            LOGICAL_SECTOR_SIZE,
            false,
            true,
            true,
            self.logical_sector_size.to_le_bytes().to_vec(),
        ));
        items.push((
            PHYSICAL_SECTOR_SIZE,
            false,
            true,
            true,
            self.physical_sector_size.to_le_bytes().to_vec(),
        ));
        if let Some(pl) = &self.parent_locator {
            items.push((PARENT_LOCATOR, false, false, true, pl.serialize()));
        }
        for o in &self.other {
            let e = &o.entry;
            items.push((
                e.item_id,
                e.is_user,
                e.is_virtual_disk,
                e.is_required,
                o.data.clone(),
            ));
        }
        if items.len() > MAX_ENTRIES {
            return Err(field("metadata", "too many items"));
        }
        let mut b = vec![0u8; region_len];
        b[..8].copy_from_slice(SIGNATURE);
        b[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut at = TABLE_SIZE;
        for (i, (id, user, vd, req, data)) in items.iter().enumerate() {
            let e_at = 32 + 32 * i;
            let offset = if data.is_empty() { 0 } else { at };
            if at + data.len() > region_len {
                return Err(field(
                    "metadata",
                    format!("the items do not fit in the {region_len}-byte region"),
                ));
            }
            b[at..at + data.len()].copy_from_slice(data);
            let entry = Entry {
                item_id: *id,
                offset: offset as u32,
                length: data.len() as u32,
                is_user: *user,
                is_virtual_disk: *vd,
                is_required: *req,
            };
            put_guid(&mut b, e_at, id);
            b[e_at + 16..e_at + 20].copy_from_slice(&entry.offset.to_le_bytes());
            b[e_at + 20..e_at + 24].copy_from_slice(&entry.length.to_le_bytes());
            b[e_at + 24..e_at + 28].copy_from_slice(&entry.flags().to_le_bytes());
            // Items start 8-byte aligned, for readers that like it.
            at += data.len().div_ceil(8) * 8;
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        Metadata {
            block_size: 32 << 20,
            leave_blocks_allocated: false,
            has_parent: true,
            virtual_disk_size: 10 << 30,
            virtual_disk_id: Uuid::new_v4(),
            logical_sector_size: 512,
            physical_sector_size: 4096,
            parent_locator: Some(ParentLocator {
                locator_type: VHDX_LOCATOR_TYPE,
                entries: vec![
                    (
                        "parent_linkage".into(),
                        "{00000000-0000-0000-0000-000000000001}".into(),
                    ),
                    ("relative_path".into(), ".\\base.vhdx".into()),
                ],
            }),
            other: vec![],
        }
    }

    #[test]
    fn metadata_round_trips() {
        let m = sample();
        let b = m.serialize(MIB as usize).unwrap();
        assert_eq!(Metadata::parse(&b).unwrap(), m);
    }

    #[test]
    fn unknown_required_item_is_kept_and_reported() {
        let mut m = sample();
        m.other.push(OtherItem {
            entry: Entry {
                item_id: Uuid::from_u128(9),
                offset: 0,
                length: 3,
                is_user: false,
                is_virtual_disk: true,
                is_required: true,
            },
            data: vec![1, 2, 3],
        });
        let parsed = Metadata::parse(&m.serialize(MIB as usize).unwrap()).unwrap();
        assert_eq!(parsed.unknown_required().unwrap().data, vec![1, 2, 3]);
    }

    #[test]
    fn bad_block_size_and_sector_size_are_refused() {
        let mut m = sample();
        m.block_size = 3 << 20;
        assert!(Metadata::parse(&m.serialize(MIB as usize).unwrap()).is_err());
        let mut m = sample();
        m.logical_sector_size = 1024;
        assert!(Metadata::parse(&m.serialize(MIB as usize).unwrap()).is_err());
    }

    #[test]
    fn has_parent_without_a_locator_is_refused() {
        let mut m = sample();
        m.parent_locator = None;
        assert!(Metadata::parse(&m.serialize(MIB as usize).unwrap()).is_err());
    }

    #[test]
    fn item_past_the_region_is_refused() {
        let mut b = sample().serialize(MIB as usize).unwrap();
        // First entry's offset: far past the region.
        b[32 + 16..32 + 20].copy_from_slice(&(2 * MIB as u32).to_le_bytes());
        assert!(Metadata::parse(&b).is_err());
        assert!(Metadata::parse(&b[..100]).is_err());
    }

    /// Entries sharing one long value string: 40 × 32 KiB written back, from
    /// a 33 KiB item. Up to 65535 entries × 64 KiB would have been built by a
    /// metadata rewrite (found by review while writing the vhdx_metadata target).
    #[test]
    fn parent_locator_whose_strings_add_up_past_an_item_is_refused() {
        let locator = |count: usize| {
            let value_at = 20 + 12 * count + 2 * count;
            let mut b = vec![0u8; value_at + 32768];
            b[18..20].copy_from_slice(&(count as u16).to_le_bytes());
            for i in 0..count {
                let (at, key_at) = (20 + 12 * i, 20 + 12 * count + 2 * i);
                b[key_at..key_at + 2].copy_from_slice(&(0x41 + i as u16).to_le_bytes());
                b[at..at + 4].copy_from_slice(&(key_at as u32).to_le_bytes());
                b[at + 4..at + 8].copy_from_slice(&(value_at as u32).to_le_bytes());
                b[at + 8..at + 10].copy_from_slice(&2u16.to_le_bytes());
                b[at + 10..at + 12].copy_from_slice(&32768u16.to_le_bytes());
            }
            for u in b[value_at..].chunks_exact_mut(2) {
                u.copy_from_slice(&0x61u16.to_le_bytes());
            }
            b
        };
        let err = ParentLocator::parse(&locator(40)).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        let pl = ParentLocator::parse(&locator(20)).unwrap();
        assert!(pl.serialize().len() as u64 <= MIB);
        assert_eq!(ParentLocator::parse(&pl.serialize()).unwrap(), pl);
    }

    #[test]
    fn parent_locator_strings_are_utf16() {
        let pl = sample().parent_locator.unwrap();
        let b = pl.serialize();
        assert_eq!(ParentLocator::parse(&b).unwrap(), pl);
        assert_eq!(pl.get("relative_path"), Some(".\\base.vhdx"));
        let mut bad = b.clone();
        bad[20..24].copy_from_slice(&9999u32.to_le_bytes());
        assert!(ParentLocator::parse(&bad).is_err());
    }
}
