//! Structural changes to an open VHD file: rewriting the footer, growing the
//! disk, re-linking a differencing disk's parent. Each takes the image
//! exclusively and orders its writes so a crash leaves the old or the new
//! state, never half of one.

use super::bat::{self, BAT_UNUSED, SECTOR};
use super::footer::{Footer, Geometry, FOOTER_SIZE};
use super::header::{DynamicHeader, Locator};
use super::image::Meta;
use super::{Error as VhdError, VhdImage};
use crate::backing::io_error;
use crate::disk::Disk;
use crate::error::Result;

impl VhdImage {
    fn poisoned(&self) -> crate::Error {
        self.lock_err()
    }

    /// Replaces the footer (at the end, and its copy at offset 0 for sparse
    /// images), e.g. after a resize or a repair. The trailing footer goes first
    /// and is made durable before the copy changes.
    pub(crate) fn rewrite_footer(&mut self, footer: Footer) -> Result<()> {
        self.check_writable()?;
        let bytes = footer.serialize();
        let end = self.data_end();
        self.write_file(&bytes, end)?;
        self.file
            .set_len(end + FOOTER_SIZE as u64)
            .map_err(io_error(&self.path))?;
        self.sync()?;
        if self.sparse.is_some() {
            self.write_file(&bytes, 0)?;
            self.sync()?;
        }
        self.footer = footer;
        self.footer_recovered = false;
        Ok(())
    }

    /// Grows the virtual disk to `new_size` bytes (the caller has rounded it).
    /// A fixed disk's footer moves; a sparse disk's BAT moves to the end of the
    /// file when it has no room for the new blocks. Each step leaves a valid file.
    pub(crate) fn grow(&mut self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        let old_size = self.footer.current_size;
        let mut footer = self.footer.clone();
        footer.current_size = new_size;
        footer.geometry = Geometry::for_size(new_size);
        if self.sparse.is_none() {
            // New footer past the new end first, then clear the old one (now data).
            self.write_file(&footer.serialize(), new_size)?;
            self.sync()?;
            self.write_file(&[0u8; FOOTER_SIZE], old_size)?;
            self.sync()?;
            self.footer = footer;
            return Ok(());
        }
        let header = self.grow_bat(new_size)?;
        self.write_file(&header.serialize(), self.footer.data_offset)?;
        self.sync()?;
        if let Some(sp) = &mut self.sparse {
            sp.header = header;
        }
        self.rewrite_footer(footer)
    }

    /// Makes the BAT big enough for `new_size`; returns the header to write.
    fn grow_bat(&mut self, new_size: u64) -> Result<DynamicHeader> {
        let path = self.path.clone();
        let footer_bytes = self.footer.serialize();
        let poisoned = self.poisoned();
        let Some(sp) = &mut self.sparse else {
            return Err(VhdError::Invalid {
                path,
                what: "a fixed VHD has no BAT to grow".into(),
            }
            .into());
        };
        let needed =
            u32::try_from(new_size.div_ceil(sp.block_size)).map_err(|_| VhdError::Invalid {
                path: path.clone(),
                what: format!("{new_size} bytes needs more blocks than a VHD can address"),
            })?;
        let meta: &mut Meta = sp.meta.get_mut().map_err(|_| poisoned)?;
        let room = bat::table_bytes(sp.header.max_table_entries) / 4;
        let mut header = sp.header.clone();
        if u64::from(needed) > room {
            // Copy the BAT to the end of the file, then point the header at it.
            let mut entries = meta.bat.clone();
            entries.resize(needed as usize, BAT_UNUSED);
            let bytes = bat::serialize(&entries);
            let at = meta.end;
            let new_end = at + (bytes.len() as u64).div_ceil(SECTOR) * SECTOR;
            self.file.write_at(&bytes, at).map_err(io_error(&path))?;
            self.file
                .write_at(&footer_bytes, new_end)
                .map_err(io_error(&path))?;
            self.file.flush().map_err(io_error(&path))?;
            header.table_offset = at;
            meta.end = new_end;
            meta.bat = entries;
        } else {
            meta.bat.resize(needed as usize, BAT_UNUSED);
        }
        header.max_table_entries = header.max_table_entries.max(needed);
        Ok(header)
    }

    /// Points a differencing disk at another parent: new locator data is written
    /// past the last block (then a footer after it), and only then the header that
    /// refers to it, so a crash leaves the old or the new link, never half of one.
    pub(crate) fn relink_parent(
        &mut self,
        parent_id: [u8; 16],
        parent_timestamp: u32,
        parent_name: String,
        locators: Vec<(u32, Vec<u8>)>,
    ) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        let footer = self.footer.serialize();
        let data_offset = self.footer.data_offset;
        let path = self.path.clone();
        let poisoned = self.poisoned();
        let Some(sp) = &mut self.sparse else {
            return Err(VhdError::Invalid {
                path,
                what: "a fixed VHD has no parent".into(),
            }
            .into());
        };
        let meta: &mut Meta = sp.meta.get_mut().map_err(|_| poisoned)?;
        let mut header = sp.header.clone();
        header.parent_unique_id = parent_id;
        header.parent_timestamp = parent_timestamp;
        header.parent_name = parent_name;
        header.locators = Default::default();
        let mut at = meta.end;
        for (i, (code, data)) in locators.into_iter().enumerate().take(header.locators.len()) {
            let space = (data.len() as u64).div_ceil(SECTOR).max(1) * SECTOR;
            self.file.write_at(&data, at).map_err(io_error(&path))?;
            header.locators[i] = Locator {
                platform_code: code,
                data_space: space as u32,
                data_length: data.len() as u32,
                data_offset: at,
            };
            at += space;
        }
        self.file.write_at(&footer, at).map_err(io_error(&path))?;
        self.file.flush().map_err(io_error(&path))?;
        meta.end = at;
        self.file
            .write_at(&header.serialize(), data_offset)
            .map_err(io_error(&path))?;
        self.file.flush().map_err(io_error(&path))?;
        sp.header = header;
        Ok(())
    }
}
