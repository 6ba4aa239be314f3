//! I/O on one VHD file: fixed, dynamic or differencing. See the module docs of
//! [`super`] for the write ordering that keeps the file consistent across crashes.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::footer::{DiskType, Footer, FOOTER_SIZE};
use super::header::{DynamicHeader, BAT_UNUSED, HEADER_SIZE};
use super::Error as VhdError;
use crate::disk::{check_range, Allocation, BlockStatus, Disk};
use crate::error::{Error, Result};

const SECTOR: u64 = 512;
/// Block data starts on this boundary in files we write.
const DATA_ALIGN: u64 = 4096;

/// The sparse part of a dynamic or differencing image.
struct Sparse {
    header: DynamicHeader,
    block_size: u64,
    /// Bytes of a block's sector bitmap, rounded up to whole sectors.
    bitmap_size: u64,
    meta: RwLock<Meta>,
}

struct Meta {
    bat: Vec<u32>,
    /// Cached sector bitmaps by block index.
    bitmaps: HashMap<u32, Vec<u8>>,
    dirty_bat: BTreeSet<u32>,
    dirty_bitmaps: BTreeSet<u32>,
    /// Offset of the trailing footer: where the next block goes.
    end: u64,
}

/// One open VHD file, with its parent attached when it is a differencing disk.
pub struct VhdImage {
    file: File,
    path: PathBuf,
    read_only: bool,
    footer: Footer,
    sparse: Option<Sparse>,
    parent: Option<Box<dyn Disk>>,
    /// Whether the trailing footer was unreadable and the copy at offset 0 was used.
    footer_recovered: bool,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_exact(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(io(path))
}

fn bit(bitmap: &[u8], sector: u64) -> bool {
    bitmap[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0
}

fn set_bits(bitmap: &mut [u8], first: u64, count: u64) {
    for s in first..first + count {
        bitmap[(s / 8) as usize] |= 0x80 >> (s % 8);
    }
}

impl VhdImage {
    /// Opens one VHD file without its parent (see [`super::chain`] for chains).
    /// Validates footer, header and BAT; refuses a damaged file with an error naming
    /// the fault. Never writes.
    pub fn open_layer(path: &Path, read_only: bool) -> Result<Self> {
        let file = crate::host_file::open_locked(path, read_only)?;
        Self::from_file(file, path, read_only)
    }

    pub(crate) fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self> {
        let len = file.metadata().map_err(io(path))?.len();
        if len < FOOTER_SIZE as u64 {
            return Err(VhdError::Truncated {
                path: path.into(),
                what: format!("{len} bytes is shorter than a VHD footer"),
            }
            .into());
        }
        let mut buf = [0u8; FOOTER_SIZE];
        read_exact(&file, path, &mut buf, len / SECTOR * SECTOR - SECTOR)?;
        let (footer, recovered) = match Footer::parse(&buf) {
            Ok(f) => (f, false),
            Err(fault) => {
                // A sparse image keeps a copy at offset 0; use it if the end is lost.
                read_exact(&file, path, &mut buf, 0)?;
                match Footer::parse(&buf) {
                    Ok(copy) if copy.disk_type != DiskType::Fixed => (copy, true),
                    _ => {
                        return Err(VhdError::Footer {
                            path: path.into(),
                            fault,
                        }
                        .into())
                    }
                }
            }
        };
        let footer_at = if recovered {
            len
        } else {
            len / SECTOR * SECTOR - SECTOR
        };
        let sparse = match footer.disk_type {
            DiskType::Fixed => {
                if footer_at < footer.current_size {
                    return Err(VhdError::Truncated {
                        path: path.into(),
                        what: format!(
                            "a fixed VHD of {} bytes needs {} bytes of data before its footer, the file has {footer_at}",
                            footer.current_size, footer.current_size
                        ),
                    }
                    .into());
                }
                None
            }
            _ => Some(Self::open_sparse(
                &file, path, &footer, footer_at, recovered,
            )?),
        };
        Ok(VhdImage {
            file,
            path: path.to_path_buf(),
            read_only,
            footer,
            sparse,
            parent: None,
            footer_recovered: recovered,
        })
    }

    fn open_sparse(
        file: &File,
        path: &Path,
        footer: &Footer,
        footer_at: u64,
        recovered: bool,
    ) -> Result<Sparse> {
        let hdr_end = footer.data_offset.checked_add(HEADER_SIZE as u64);
        if hdr_end.is_none_or(|e| e > footer_at) {
            return Err(VhdError::Truncated {
                path: path.into(),
                what: format!(
                    "the dynamic header at offset {} lies past the end of the data",
                    footer.data_offset
                ),
            }
            .into());
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(file, path, &mut hb, footer.data_offset)?;
        let header = DynamicHeader::parse(&hb).map_err(|fault| VhdError::Header {
            path: path.into(),
            fault,
        })?;
        let block_size = u64::from(header.block_size);
        let needed = footer.current_size.div_ceil(block_size);
        if u64::from(header.max_table_entries) < needed {
            return Err(VhdError::BatTooSmall {
                path: path.into(),
                entries: header.max_table_entries,
                size: footer.current_size,
                block_size: header.block_size,
            }
            .into());
        }
        let bat_bytes = u64::from(header.max_table_entries) * 4;
        if header
            .table_offset
            .checked_add(bat_bytes)
            .is_none_or(|e| e > footer_at)
        {
            return Err(VhdError::Truncated {
                path: path.into(),
                what: format!(
                    "the BAT ({bat_bytes} bytes at offset {}) lies past the end of the data",
                    header.table_offset
                ),
            }
            .into());
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        read_exact(file, path, &mut raw, header.table_offset)?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bitmap_size = (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR;
        let span = bitmap_size + block_size;
        // Every used entry must lie within the file and no two blocks may overlap.
        let mut used: Vec<(u64, u32)> = Vec::new();
        for (i, &e) in bat.iter().enumerate().take(needed as usize) {
            if e == BAT_UNUSED {
                continue;
            }
            let start = u64::from(e) * SECTOR;
            // The last block of a disk may be cut short by the disk's end.
            let in_disk = (footer.current_size - i as u64 * block_size).min(block_size);
            if start + bitmap_size + in_disk > footer_at {
                return Err(VhdError::BatEntryPastEnd {
                    path: path.into(),
                    block: i as u32,
                    sector: e,
                    end: footer_at,
                }
                .into());
            }
            used.push((start, i as u32));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[1].0 < w[0].0 + span {
                return Err(VhdError::OverlappingBlocks {
                    path: path.into(),
                    first: w[0].1,
                    second: w[1].1,
                }
                .into());
            }
        }
        let end = if recovered {
            // Recompute where data ends: after the last block or the metadata.
            let meta_end = header.table_offset + bat_bytes.div_ceil(SECTOR) * SECTOR;
            used.last()
                .map(|(s, _)| s + span)
                .unwrap_or(0)
                .max(meta_end)
                .max(locators_end(&header))
        } else {
            footer_at
        };
        Ok(Sparse {
            header,
            block_size,
            bitmap_size,
            meta: RwLock::new(Meta {
                bat,
                bitmaps: HashMap::new(),
                dirty_bat: BTreeSet::new(),
                dirty_bitmaps: BTreeSet::new(),
                end,
            }),
        })
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn header(&self) -> Option<&DynamicHeader> {
        self.sparse.as_ref().map(|s| &s.header)
    }

    pub fn file_path(&self) -> &Path {
        &self.path
    }

    pub fn footer_recovered(&self) -> bool {
        self.footer_recovered
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Attaches the opened parent of a differencing disk.
    pub fn set_parent(&mut self, parent: Box<dyn Disk>) {
        self.parent = Some(parent);
    }

    pub fn parent(&self) -> Option<&dyn Disk> {
        self.parent.as_deref()
    }

    /// Takes the parent back, e.g. to reuse it after this layer is merged away.
    pub fn take_parent(&mut self) -> Option<Box<dyn Disk>> {
        self.parent.take()
    }

    /// The BAT as cached (sector offsets; [`BAT_UNUSED`] for absent blocks).
    pub fn bat(&self) -> Vec<u32> {
        self.sparse
            .as_ref()
            .map(|s| s.meta.read().map(|m| m.bat.clone()).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Bytes of the virtual disk this file holds data for.
    pub fn allocated_bytes(&self) -> u64 {
        match &self.sparse {
            None => self.footer.current_size,
            Some(s) => {
                let used = self.bat().iter().filter(|&&e| e != BAT_UNUSED).count() as u64;
                used * s.block_size
            }
        }
    }

    fn lock_err(&self) -> Error {
        VhdError::Invalid {
            path: self.path.clone(),
            what: "internal metadata lock poisoned by an earlier failure; reopen the disk".into(),
        }
        .into()
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// The bitmap of an allocated block, loaded into the cache on first use.
    fn bitmap(&self, sp: &Sparse, block: u32, entry: u32) -> Result<Vec<u8>> {
        if let Some(b) = sp
            .meta
            .read()
            .map_err(|_| self.lock_err())?
            .bitmaps
            .get(&block)
        {
            return Ok(b.clone());
        }
        let mut b = vec![0u8; sp.bitmap_size as usize];
        read_exact(&self.file, &self.path, &mut b, u64::from(entry) * SECTOR)?;
        let mut meta = sp.meta.write().map_err(|_| self.lock_err())?;
        Ok(meta.bitmaps.entry(block).or_insert(b).clone())
    }

    /// Reads from the parent, or zeros where there is none or it is smaller.
    fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            Some(p) if offset < p.size() => {
                let n = ((p.size() - offset) as usize).min(buf.len());
                p.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads within one block of a sparse image.
    fn read_in_block(&self, sp: &Sparse, buf: &mut [u8], offset: u64) -> Result<()> {
        let block = (offset / sp.block_size) as u32;
        let in_block = offset % sp.block_size;
        let entry = sp.meta.read().map_err(|_| self.lock_err())?.bat[block as usize];
        if entry == BAT_UNUSED {
            return self.read_below(buf, offset);
        }
        let data = u64::from(entry) * SECTOR + sp.bitmap_size;
        let bitmap = self.bitmap(sp, block, entry)?;
        // Runs of sectors that are all present here, or all absent.
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = in_block + pos as u64;
            let sector = at / SECTOR;
            let present = bit(&bitmap, sector);
            let mut end = ((sector + 1) * SECTOR - in_block) as usize;
            while end < buf.len() && bit(&bitmap, (in_block + end as u64) / SECTOR) == present {
                end += SECTOR as usize;
            }
            let end = end.min(buf.len());
            if present {
                read_exact(&self.file, &self.path, &mut buf[pos..end], data + at)?;
            } else if self.footer.disk_type == DiskType::Differencing {
                self.read_below(&mut buf[pos..end], offset + pos as u64)?;
            } else {
                buf[pos..end].fill(0);
            }
            pos = end;
        }
        Ok(())
    }

    /// Places a new block at the end of the file. Returns its BAT entry.
    fn allocate(&self, sp: &Sparse, meta: &mut Meta, block: u32, full: bool) -> Result<u32> {
        let start = (meta.end + sp.bitmap_size).div_ceil(DATA_ALIGN) * DATA_ALIGN - sp.bitmap_size;
        let new_end = start + sp.bitmap_size + sp.block_size;
        let entry = u32::try_from(start / SECTOR).map_err(|_| VhdError::Invalid {
            path: self.path.clone(),
            what: "the file has grown past the 2 TiB a VHD's BAT can address".into(),
        })?;
        // 1. The file ends in a valid footer at every moment.
        self.file
            .write_all_at(&self.footer.serialize(), new_end)
            .map_err(io(&self.path))?;
        // 2. The bitmap: all present for dynamic disks and whole-block writes;
        //    for a differencing disk the written sectors are marked after the data.
        let fill = if full || self.footer.disk_type == DiskType::Dynamic {
            0xff
        } else {
            0
        };
        let bitmap = vec![fill; sp.bitmap_size as usize];
        self.file
            .write_all_at(&bitmap, start)
            .map_err(io(&self.path))?;
        meta.bitmaps.insert(block, bitmap);
        meta.bat[block as usize] = entry;
        meta.dirty_bat.insert(block);
        meta.end = new_end;
        Ok(entry)
    }

    fn write_in_block(&self, sp: &Sparse, buf: &[u8], offset: u64) -> Result<()> {
        let block = (offset / sp.block_size) as u32;
        let in_block = offset % sp.block_size;
        let whole = in_block == 0 && buf.len() as u64 == sp.block_size;
        let mut entry = sp.meta.read().map_err(|_| self.lock_err())?.bat[block as usize];
        // A block this write allocates whole is born with a full bitmap: no
        // bitmap read-modify-write for it.
        let mut born_full = false;
        if entry == BAT_UNUSED {
            let mut meta = sp.meta.write().map_err(|_| self.lock_err())?;
            entry = meta.bat[block as usize];
            if entry == BAT_UNUSED {
                entry = self.allocate(sp, &mut meta, block, whole)?;
                born_full = whole;
            }
        }
        let data = u64::from(entry) * SECTOR + sp.bitmap_size;
        self.file
            .write_all_at(buf, data + in_block)
            .map_err(io(&self.path))?;
        if !born_full {
            // Sectors not yet marked present (in a child, or in a dynamic disk
            // made by a tool that tracks sectors) are marked now.
            let first = in_block / SECTOR;
            let count = (in_block + buf.len() as u64).div_ceil(SECTOR) - first;
            let bitmap = self.bitmap(sp, block, entry)?;
            if (first..first + count).any(|s| !bit(&bitmap, s)) {
                // A partial sector would otherwise expose stale bytes around the write.
                self.fill_partial_sectors(
                    offset - in_block,
                    data,
                    in_block,
                    buf.len() as u64,
                    &bitmap,
                )?;
                let mut meta = sp.meta.write().map_err(|_| self.lock_err())?;
                if let Some(b) = meta.bitmaps.get_mut(&block) {
                    set_bits(b, first, count);
                }
                meta.dirty_bitmaps.insert(block);
            }
        }
        Ok(())
    }

    /// Before marking sectors present that a write covers only partly, copies
    /// the parent's bytes into the parts of those sectors the write left out.
    /// `base` is the block's virtual offset, `data` its data's file offset.
    fn fill_partial_sectors(
        &self,
        base: u64,
        data: u64,
        in_block: u64,
        len: u64,
        bitmap: &[u8],
    ) -> Result<()> {
        let end = in_block + len;
        let first = in_block / SECTOR;
        let last = (end - 1) / SECTOR;
        let mut edges = vec![];
        if !in_block.is_multiple_of(SECTOR) {
            edges.push(first);
        }
        if !end.is_multiple_of(SECTOR) && !edges.contains(&last) {
            edges.push(last);
        }
        for sector in edges {
            if bit(bitmap, sector) {
                continue;
            }
            let lo = sector * SECTOR;
            let hi = lo + SECTOR;
            let mut old = [0u8; SECTOR as usize];
            self.read_below(&mut old, base + lo)?;
            // The parts of the sector before and after the write keep the parent's bytes.
            for (from, to) in [(lo, in_block.max(lo)), (end.min(hi), hi)] {
                if from < to {
                    self.file
                        .write_all_at(&old[(from - lo) as usize..(to - lo) as usize], data + from)
                        .map_err(io(&self.path))?;
                }
            }
        }
        Ok(())
    }

    /// Writes the dirty BAT sectors and bitmaps (after the data is durable).
    fn write_metadata(&self, sp: &Sparse) -> Result<()> {
        let mut meta = sp.meta.write().map_err(|_| self.lock_err())?;
        if meta.dirty_bat.is_empty() && meta.dirty_bitmaps.is_empty() {
            return Ok(());
        }
        self.file.sync_data().map_err(io(&self.path))?;
        let per_sector = (SECTOR / 4) as u32;
        let sectors: BTreeSet<u32> = meta.dirty_bat.iter().map(|b| b / per_sector).collect();
        for s in sectors {
            let first = (s * per_sector) as usize;
            let last = (first + per_sector as usize).min(meta.bat.len());
            let bytes: Vec<u8> = meta.bat[first..last]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            self.file
                .write_all_at(&bytes, sp.header.table_offset + first as u64 * 4)
                .map_err(io(&self.path))?;
        }
        for b in std::mem::take(&mut meta.dirty_bitmaps) {
            let entry = meta.bat[b as usize];
            if let Some(bm) = meta.bitmaps.get(&b) {
                self.file
                    .write_all_at(bm, u64::from(entry) * SECTOR)
                    .map_err(io(&self.path))?;
            }
        }
        meta.dirty_bat.clear();
        Ok(())
    }

    /// Replaces the footer (at the end, and its copy at offset 0 for sparse
    /// images), e.g. after a resize or a repair.
    pub(crate) fn rewrite_footer(&mut self, footer: Footer) -> Result<()> {
        self.check_writable()?;
        let bytes = footer.serialize();
        let end = match &self.sparse {
            Some(sp) => sp.meta.read().map_err(|_| self.lock_err())?.end,
            None => footer.current_size,
        };
        self.file
            .write_all_at(&bytes, end)
            .map_err(io(&self.path))?;
        if self.sparse.is_some() {
            self.file.sync_data().map_err(io(&self.path))?;
            self.file.write_all_at(&bytes, 0).map_err(io(&self.path))?;
        }
        self.file
            .set_len(end + FOOTER_SIZE as u64)
            .map_err(io(&self.path))?;
        self.file.sync_all().map_err(io(&self.path))?;
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
        footer.geometry = super::footer::Geometry::for_size(new_size);
        let sync = |f: &File| f.sync_all().map_err(io(&self.path));
        let Some(sp) = &mut self.sparse else {
            // New footer past the new end first, then clear the old one (now data).
            self.file
                .write_all_at(&footer.serialize(), new_size)
                .map_err(io(&self.path))?;
            sync(&self.file)?;
            self.file
                .write_all_at(&[0u8; FOOTER_SIZE], old_size)
                .map_err(io(&self.path))?;
            sync(&self.file)?;
            self.footer = footer;
            return Ok(());
        };
        let needed = new_size.div_ceil(sp.block_size);
        let needed = u32::try_from(needed).map_err(|_| VhdError::Invalid {
            path: self.path.clone(),
            what: format!("{new_size} bytes needs more blocks than a VHD can address"),
        })?;
        let meta = sp.meta.get_mut().map_err(|_| VhdError::Invalid {
            path: self.path.clone(),
            what: "internal metadata lock poisoned; reopen the disk".into(),
        })?;
        let room = (u64::from(sp.header.max_table_entries) * 4).div_ceil(SECTOR) * SECTOR / 4;
        let mut header = sp.header.clone();
        if u64::from(needed) > room {
            // Move the BAT to the end of the file, then point the header at it.
            let mut bat = meta.bat.clone();
            bat.resize(needed as usize, BAT_UNUSED);
            let bytes: Vec<u8> = bat.iter().flat_map(|e| e.to_be_bytes()).collect();
            let at = meta.end;
            let new_end = at + (bytes.len() as u64).div_ceil(SECTOR) * SECTOR;
            self.file.write_all_at(&bytes, at).map_err(io(&self.path))?;
            self.file
                .write_all_at(&self.footer.serialize(), new_end)
                .map_err(io(&self.path))?;
            sync(&self.file)?;
            header.table_offset = at;
            meta.end = new_end;
            meta.bat = bat;
        } else {
            meta.bat.resize(needed as usize, BAT_UNUSED);
        }
        header.max_table_entries = header.max_table_entries.max(needed);
        self.file
            .write_all_at(&header.serialize(), self.footer.data_offset)
            .map_err(io(&self.path))?;
        sync(&self.file)?;
        sp.header = header;
        self.rewrite_footer(footer)
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
        let Some(sp) = &mut self.sparse else {
            return Err(VhdError::Invalid {
                path,
                what: "a fixed VHD has no parent".into(),
            }
            .into());
        };
        let meta = sp.meta.get_mut().map_err(|_| VhdError::Invalid {
            path: path.clone(),
            what: "internal metadata lock poisoned; reopen the disk".into(),
        })?;
        let mut header = sp.header.clone();
        header.parent_unique_id = parent_id;
        header.parent_timestamp = parent_timestamp;
        header.parent_name = parent_name;
        header.locators = Default::default();
        let mut at = meta.end;
        for (i, (code, data)) in locators.into_iter().enumerate().take(header.locators.len()) {
            let space = (data.len() as u64).div_ceil(SECTOR).max(1) * SECTOR;
            self.file.write_all_at(&data, at).map_err(io(&path))?;
            header.locators[i] = super::header::Locator {
                platform_code: code,
                data_space: space as u32,
                data_length: data.len() as u32,
                data_offset: at,
            };
            at += space;
        }
        self.file.write_all_at(&footer, at).map_err(io(&path))?;
        self.file.sync_all().map_err(io(&path))?;
        meta.end = at;
        self.file
            .write_all_at(&header.serialize(), data_offset)
            .map_err(io(&path))?;
        self.file.sync_all().map_err(io(&path))?;
        sp.header = header;
        Ok(())
    }

    /// Offset of the trailing footer (the end of the data).
    pub fn data_end(&self) -> u64 {
        match &self.sparse {
            Some(sp) => sp.meta.read().map(|m| m.end).unwrap_or(0),
            None => self.footer.current_size,
        }
    }

    pub fn block_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(|s| s.block_size)
    }
}

/// The end of the furthest parent-locator data.
pub(crate) fn locators_end(h: &DynamicHeader) -> u64 {
    h.locators
        .iter()
        .filter(|l| l.platform_code != 0)
        .map(|l| l.data_offset + l.space_bytes().max(u64::from(l.data_length)))
        .max()
        .unwrap_or(0)
}

impl Disk for VhdImage {
    fn size(&self) -> u64 {
        self.footer.current_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(Some(&self.path), self.size(), offset, buf.len() as u64)?;
        let Some(sp) = &self.sparse else {
            return read_exact(&self.file, &self.path, buf, offset);
        };
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let n = ((sp.block_size - off % sp.block_size) as usize).min(buf.len() - pos);
            self.read_in_block(sp, &mut buf[pos..pos + n], off)?;
            pos += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(Some(&self.path), self.size(), offset, buf.len() as u64)?;
        let Some(sp) = &self.sparse else {
            return self.file.write_all_at(buf, offset).map_err(io(&self.path));
        };
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let n = ((sp.block_size - off % sp.block_size) as usize).min(buf.len() - pos);
            self.write_in_block(sp, &buf[pos..pos + n], off)?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if let Some(sp) = &self.sparse {
            self.write_metadata(sp)?;
        }
        self.file.sync_data().map_err(io(&self.path))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(Some(&self.path), self.size(), offset, len)?;
        const CHUNK: u64 = 1 << 20;
        // Unallocated ranges of a dynamic disk already read as zeros.
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let st = self.block_status(offset + done, (len - done).min(CHUNK))?;
            if !(st.allocation == Allocation::Unallocated
                && self.footer.disk_type == DiskType::Dynamic)
            {
                self.write_at(&zeros[..st.len as usize], offset + done)?;
            }
            done += st.len;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(Some(&self.path), self.size(), offset, len)?;
        let Some(sp) = &self.sparse else {
            return Ok(BlockStatus {
                allocation: Allocation::Data,
                len,
            });
        };
        let status_at = |off: u64| -> Result<(bool, u64)> {
            let block = (off / sp.block_size) as u32;
            let in_block = off % sp.block_size;
            let rest = sp.block_size - in_block;
            let entry = sp.meta.read().map_err(|_| self.lock_err())?.bat[block as usize];
            if entry == BAT_UNUSED {
                return Ok((false, rest));
            }
            let bitmap = self.bitmap(sp, block, entry)?;
            let s0 = in_block / SECTOR;
            let present = bit(&bitmap, s0);
            let mut s = s0 + 1;
            while s < sp.block_size / SECTOR && bit(&bitmap, s) == present {
                s += 1;
            }
            Ok((present, s * SECTOR - in_block))
        };
        let (present, mut run) = status_at(offset)?;
        while run < len {
            let (p, r) = status_at(offset + run)?;
            if p != present {
                break;
            }
            run += r;
        }
        Ok(BlockStatus {
            allocation: if present {
                Allocation::Data
            } else {
                Allocation::Unallocated
            },
            len: run.min(len).max(SECTOR.min(len)),
        })
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

impl Drop for VhdImage {
    fn drop(&mut self) {
        if !self.read_only {
            // Best effort: a clean close persists the metadata; errors were
            // reported to whoever flushed last.
            let _ = self.flush();
        }
    }
}
