//! Structural changes to an open VHDX file: new metadata (size, parent
//! locator, identity after a merge), resize with a moved BAT, and the
//! DataWriteGuid a compacted copy keeps. Every change of metadata, BAT or
//! region table goes through the log in one entry where it fits, so a crash
//! leaves the old or the new state.

use uuid::Uuid;

use super::bat::{self, BatEntry, Layout};
use super::image::{invalid, write_headers};
use super::metadata::{Metadata, ParentLocator};
use super::region::{RegionEntry, TABLE_OFFSETS};
use super::{VhdxImage, LOG_SECTOR, MIB};
use crate::disk::Disk;
use crate::error::Result;

const PAGE: u64 = LOG_SECTOR as u64;

/// The 4 KiB pages of `new` that differ from `old`, placed at `base`.
fn changed_pages(base: u64, old: &[u8], new: &[u8]) -> Vec<(u64, Vec<u8>)> {
    new.chunks(PAGE as usize)
        .enumerate()
        .filter(|(i, page)| {
            old.get(i * PAGE as usize..i * PAGE as usize + page.len()) != Some(*page)
        })
        .map(|(i, page)| {
            let mut p = page.to_vec();
            p.resize(PAGE as usize, 0);
            (base + i as u64 * PAGE, p)
        })
        .collect()
}

impl VhdxImage {
    /// Pages that turn the metadata region into `new`.
    fn metadata_pages(&self, new: &Metadata) -> Result<Vec<(u64, Vec<u8>)>> {
        let len = self.meta_region.length as usize;
        let bytes = new
            .serialize(len)
            .map_err(|fault| super::Error::Structure {
                path: self.path.clone(),
                fault,
            })?;
        let mut old = vec![0u8; len];
        self.read_meta(&mut old, self.meta_region.file_offset)?;
        Ok(changed_pages(self.meta_region.file_offset, &old, &bytes))
    }

    /// Writes `pages` (and the BAT pages already dirty) through the log after
    /// flushing everything before them.
    fn log_update(&self, pages: Vec<(u64, Vec<u8>)>, data: bool) -> Result<()> {
        self.check_writable()?;
        self.begin_session(data)?;
        self.flush()?;
        let mut s = self.session.lock().map_err(|_| self.lock_err())?;
        let (file_len, end) = {
            let st = self.state.read().map_err(|_| self.lock_err())?;
            (st.file_len, st.end)
        };
        self.sync()?;
        self.log_pages(&mut s, &pages, file_len, end)
    }

    /// Replaces the metadata (every item, through the log).
    pub(crate) fn rewrite_metadata(&mut self, new: Metadata) -> Result<()> {
        let pages = self.metadata_pages(&new)?;
        if !pages.is_empty() {
            self.log_update(pages, false)?;
        }
        self.metadata = new;
        Ok(())
    }

    /// Points a differencing disk at a parent described by `locator`.
    pub(crate) fn relink_parent(&mut self, locator: ParentLocator) -> Result<()> {
        if !self.metadata.has_parent {
            return Err(invalid(
                &self.path,
                "is not a differencing disk: it has no parent",
            ));
        }
        let mut m = self.metadata.clone();
        m.parent_locator = Some(locator);
        self.rewrite_metadata(m)
    }

    /// After a merge: the virtual-disk metadata (IsVirtualDisk items: ID, sector
    /// sizes, and any others so marked) becomes the merged child's, as
    /// MS-VHDX 2.6.1.2 asks. The size was matched by a resize before.
    pub(crate) fn adopt_virtual_disk_metadata(&mut self, child: &Metadata) -> Result<()> {
        let mut m = self.metadata.clone();
        m.virtual_disk_id = child.virtual_disk_id;
        m.physical_sector_size = child.physical_sector_size;
        m.other.retain(|o| !o.entry.is_virtual_disk);
        m.other.extend(
            child
                .other
                .iter()
                .filter(|o| o.entry.is_virtual_disk)
                .cloned(),
        );
        self.rewrite_metadata(m)
    }

    /// Ends the session (metadata flushed, log emptied) and writes the headers
    /// with `guid` as DataWriteGuid: for a copy whose content is the original's.
    pub(crate) fn finish_with_data_write_guid(&mut self, guid: Uuid) -> Result<()> {
        self.flush()?;
        let mut s = self.session.lock().map_err(|_| self.lock_err())?;
        let mut h = s.header.clone();
        h.data_write_guid = guid;
        h.log_guid = Uuid::nil();
        write_headers(self.file.as_ref(), &self.path, &mut s, h)?;
        self.end_session(&mut s);
        Ok(())
    }

    /// Changes the virtual size. Growing may move the BAT to the end of the
    /// file (the new copy is written and flushed first, then the region table
    /// and metadata switch to it in one log entry). Shrinking keeps every block
    /// that holds data: the caller checks `new_size` against
    /// [`VhdxImage::used_blocks`].
    pub(crate) fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let ss = u64::from(self.metadata.logical_sector_size);
        if new_size == 0
            || !new_size.is_multiple_of(ss)
            || new_size > super::metadata::MAX_DISK_SIZE
        {
            return Err(invalid(
                &self.path,
                format!("{new_size} bytes is not a whole number of {ss}-byte sectors up to 64 TiB"),
            ));
        }
        self.begin_session(true)?;
        self.flush()?;
        let old = self.layout;
        let new = Layout {
            disk_size: new_size,
            ..old
        };
        let mut pages = Vec::new();
        let cap = u64::from(self.bat_region.length) / 8;
        let needed = new.full_entries().max(new.required_entries());
        let fixed = self.metadata.leave_blocks_allocated && !self.metadata.has_parent;
        let path = self.path.clone();
        let io = crate::backing::io_error(&path);
        let poisoned = self.lock_err();
        let file = self.file.clone();
        let (bat_bytes, move_to) = {
            let st = self.state.get_mut().map_err(|_| poisoned)?;
            // Entries past the new end go; new ones start empty.
            let keep = new.required_entries().min(st.bat.len() as u64) as usize;
            for e in st.bat.iter_mut().skip(keep) {
                *e = 0;
            }
            let target = needed.max(st.bat.len() as u64);
            st.bat.resize(target as usize, 0);
            if fixed {
                // A fixed disk's new blocks are allocated (and read as zeros).
                for b in old.payload_blocks()..new.payload_blocks() {
                    let at = st.end;
                    st.end += new.block_size;
                    let i = new.payload_index(b) as usize;
                    st.bat[i] = BatEntry::new(bat::PAYLOAD_BLOCK_FULLY_PRESENT, at).raw();
                }
            }
            let bat_bytes = bat::serialize(&st.bat);
            let move_to = (needed > cap).then(|| {
                let at = st.end;
                st.end += new.region_bytes();
                at
            });
            if st.end > st.file_len {
                file.set_len(st.end).map_err(&io)?;
                st.file_len = st.end;
            }
            (bat_bytes, move_to)
        };
        let mut region = self.bat_region.clone();
        if let Some(at) = move_to {
            // Move the BAT: a copy past everything, durable before it is used.
            file.write_at(&bat_bytes, at).map_err(&io)?;
            file.flush().map_err(&io)?;
            region = RegionEntry {
                file_offset: at,
                length: u32::try_from(new.region_bytes())
                    .map_err(|_| invalid(&path, "BAT too large"))?,
                ..region
            };
            let mut table = self.regions.clone();
            for e in &mut table.entries {
                if e.guid == region.guid {
                    *e = region.clone();
                }
            }
            let bytes = table.serialize();
            for t in TABLE_OFFSETS {
                let mut old_t = vec![0u8; bytes.len()];
                self.read_meta(&mut old_t, t)?;
                pages.extend(changed_pages(t, &old_t, &bytes));
            }
            self.regions = table;
        } else {
            let mut old_b = vec![0u8; bat_bytes.len()];
            self.read_meta(&mut old_b, region.file_offset)?;
            pages.extend(changed_pages(region.file_offset, &old_b, &bat_bytes));
        }
        let mut m = self.metadata.clone();
        m.virtual_disk_size = new_size;
        pages.extend(self.metadata_pages(&m)?);
        self.log_update(pages, true)?;
        self.bat_region = region;
        self.metadata = m;
        self.layout = new;
        Ok(())
    }

    /// The smallest size a shrink may go to: every block holding data stays.
    pub fn min_size(&self) -> Result<u64> {
        let bs = self.layout.block_size;
        let mut used = self.used_blocks()?;
        // Blocks that only hold zeros may go too.
        let mut buf = vec![0u8; bs.min(4 * MIB) as usize];
        'blocks: while used > 0 {
            let start = (used - 1) * bs;
            let end = (start + bs).min(self.size());
            let mut off = start;
            while off < end {
                let n = (end - off).min(buf.len() as u64) as usize;
                self.read_at(&mut buf[..n], off)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    break 'blocks;
                }
                off += n as u64;
            }
            used -= 1;
        }
        Ok((used * bs).max(u64::from(self.metadata.logical_sector_size)))
    }
}
