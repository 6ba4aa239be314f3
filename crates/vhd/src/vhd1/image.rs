//! I/O on one VHD file: fixed, dynamic or differencing. See the module docs of
//! [`super`] for the write ordering that keeps the file consistent across crashes.

use std::collections::{BTreeSet, HashMap};
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::bat::{self, bitmap_bytes, BAT_UNUSED, SECTOR};
use super::footer::{DiskType, Footer, FOOTER_SIZE};
use super::header::{DynamicHeader, HEADER_SIZE};
use super::Error as VhdError;
use crate::backing::{io_error, BackingFile, HostStorage, Storage};
use crate::disk::{check_range, Allocation, BlockStatus, Disk, FileExtent};
use crate::error::{Error, Result};

/// Block data starts on this boundary in files we write (a multiple of the
/// 4 KiB the format's users expect). 64 KiB rather than 4 KiB: the page cache
/// then holds a block's data in large folios that line up with the file, and
/// buffered allocating sequential writes ran at 0.93 of a raw file's speed
/// instead of 0.78 (BENCHMARKS.md, "Storage engine"). The gap before each
/// block's bitmap sector is written with zeros (see [`GAP_ZEROS`]).
const DATA_ALIGN: u64 = 64 * 1024;

/// What fills the gap a new block leaves before its bitmap sector (less than
/// [`DATA_ALIGN`]). Written, not left a hole: with holes between them, every
/// block is an extent of its own, the kernel's read-ahead reads each in 4 KiB
/// pages and splits it into three device requests (1,557 for a 1 GiB disk
/// against 302 for a raw file; 315 with the gaps written), and cold buffered
/// sequential reads ran well below a raw file's speed (BENCHMARKS.md, "Issue
/// 23: sequential reads"). It costs 3 % more bytes written per new 2 MiB
/// block, in the same request as the bitmap.
static GAP_ZEROS: [u8; DATA_ALIGN as usize] = [0; DATA_ALIGN as usize];

/// A block's sector bitmap as cached.
#[derive(Clone)]
pub(super) enum Bitmap {
    /// Every sector of the block is present (all dynamic blocks we write, and
    /// differencing blocks written whole): no per-sector work.
    Full,
    Sectors(Arc<Vec<u8>>),
}

impl Bitmap {
    fn from_bytes(bytes: Vec<u8>, sectors: u64) -> Self {
        // Whole bytes first (a sequential reader loads one bitmap per block;
        // bit by bit this was 1 % of a warm read's time), then the odd bits.
        let whole = (sectors / 8) as usize;
        let full = bytes
            .get(..whole)
            .is_some_and(|b| b.iter().all(|&x| x == 0xff))
            && (whole as u64 * 8..sectors).all(|s| bat::bit(&bytes, s));
        if full {
            Bitmap::Full
        } else {
            Bitmap::Sectors(Arc::new(bytes))
        }
    }

    fn present(&self, sector: u64) -> bool {
        match self {
            Bitmap::Full => true,
            Bitmap::Sectors(b) => bat::bit(b, sector),
        }
    }

    fn all_present(&self, first: u64, count: u64) -> bool {
        (first..first + count).all(|s| self.present(s))
    }

    fn mark(&mut self, first: u64, count: u64, sectors: u64) {
        if let Bitmap::Sectors(b) = self {
            bat::set_bits(Arc::make_mut(b).as_mut_slice(), first, count);
            if (0..sectors).all(|s| bat::bit(b, s)) {
                *self = Bitmap::Full;
            }
        }
    }

    fn bytes(&self, size: u64) -> Vec<u8> {
        match self {
            Bitmap::Full => vec![0xff; size as usize],
            Bitmap::Sectors(b) => b.to_vec(),
        }
    }
}

/// The sparse part of a dynamic or differencing image.
pub(super) struct Sparse {
    pub(super) header: DynamicHeader,
    pub(super) block_size: u64,
    /// Bytes of a block's sector bitmap, rounded up to whole sectors.
    pub(super) bitmap_size: u64,
    /// Most bitmaps kept in memory; clean ones beyond it are dropped and read again
    /// when needed, so a huge disk does not cost its whole bitmap area in memory.
    pub(super) bitmap_cache_entries: usize,
    pub(super) meta: RwLock<Meta>,
    /// Serializes flushes, so an older metadata snapshot never lands after a newer one.
    flush_lock: Mutex<()>,
}

pub(super) struct Meta {
    pub(super) bat: Vec<u32>,
    /// Sector bitmaps of allocated blocks, loaded on first use.
    bitmaps: HashMap<u32, Bitmap>,
    /// Blocks whose BAT entry changed since the last flush.
    dirty_bat: BTreeSet<u32>,
    /// Blocks whose bitmap changed since the last flush.
    dirty_bitmaps: BTreeSet<u32>,
    /// Bitmaps a flush has taken but not yet written: the file does not have them
    /// yet, so they must stay cached.
    flushing_bitmaps: BTreeSet<u32>,
    /// Offset of the trailing footer: where the next block goes.
    pub(super) end: u64,
}

/// Memory the cached sector bitmaps of one image may take (about 16,384 bitmaps
/// of 2 MiB blocks: 32 GiB of partly written data).
pub(super) const BITMAP_CACHE_BYTES: u64 = 8 << 20;

pub(super) fn bitmap_cache_entries(bitmap_size: u64) -> usize {
    (BITMAP_CACHE_BYTES / bitmap_size.max(1)).max(64) as usize
}

impl Meta {
    /// Drops clean cached bitmaps (never `keep`, never one not yet flushed) until
    /// a quarter of the room is free again.
    fn trim_bitmaps(&mut self, limit: usize, keep: u32) {
        if self.bitmaps.len() <= limit {
            return;
        }
        let target = limit - limit / 4;
        let excess = self.bitmaps.len() - target;
        let victims: Vec<u32> = self
            .bitmaps
            .keys()
            .copied()
            .filter(|b| {
                *b != keep && !self.dirty_bitmaps.contains(b) && !self.flushing_bitmaps.contains(b)
            })
            .take(excess)
            .collect();
        for b in victims {
            self.bitmaps.remove(&b);
        }
    }
}

/// Metadata writes one flush makes, taken from the cache under its lock.
struct Snapshot {
    writes: Vec<(u64, Vec<u8>)>,
    bat_blocks: Vec<u32>,
    bitmap_blocks: Vec<u32>,
}

/// One open VHD file, with its parent attached when it is a differencing disk.
pub struct VhdImage {
    pub(super) file: Arc<dyn BackingFile>,
    pub(super) path: PathBuf,
    pub(super) read_only: bool,
    pub(super) footer: Footer,
    pub(super) sparse: Option<Sparse>,
    parent: Option<Box<dyn Disk>>,
    /// Whether the trailing footer was unreadable and the copy at offset 0 was used.
    pub(super) footer_recovered: bool,
}

fn read_exact(file: &dyn BackingFile, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_at(buf, offset).map_err(io_error(path))
}

fn truncated(path: &Path, what: String) -> Error {
    VhdError::Truncated {
        path: path.into(),
        what,
    }
    .into()
}

/// Reads the trailing footer, or for a sparse image whose end is damaged, the
/// copy at offset 0. Returns the footer, where the data ends, and whether the
/// copy was used.
fn read_footer(file: &dyn BackingFile, path: &Path, len: u64) -> Result<(Footer, u64, bool)> {
    if len < FOOTER_SIZE as u64 {
        return Err(truncated(
            path,
            format!("{len} bytes is shorter than a VHD footer"),
        ));
    }
    let at = len / SECTOR * SECTOR - SECTOR;
    let mut buf = [0u8; FOOTER_SIZE];
    read_exact(file, path, &mut buf, at)?;
    let fault = match Footer::parse(&buf) {
        Ok(f) => return Ok((f, at, false)),
        Err(fault) => fault,
    };
    read_exact(file, path, &mut buf, 0)?;
    match Footer::parse(&buf) {
        // New blocks go after everything the file holds, whatever it is.
        Ok(copy) if copy.disk_type != DiskType::Fixed => {
            Ok((copy, len.div_ceil(SECTOR) * SECTOR, true))
        }
        _ => Err(VhdError::Footer {
            path: path.into(),
            fault,
        }
        .into()),
    }
}

/// Checks that every used BAT entry lies within the data and that no two
/// blocks overlap. Returns the used blocks' file offsets, sorted.
fn validate_bat(
    path: &Path,
    footer: &Footer,
    header: &DynamicHeader,
    entries: &[u32],
    data_end: u64,
) -> Result<Vec<(u64, u32)>> {
    let block_size = u64::from(header.block_size);
    let bitmap_size = bitmap_bytes(block_size);
    let needed = footer.current_size.div_ceil(block_size) as usize;
    // Block data found over these (by fuzzing) made every write to the block
    // overwrite the header or the BAT, destroying the image.
    let metadata = [
        (0, FOOTER_SIZE as u64, "the footer copy"),
        (footer.data_offset, HEADER_SIZE as u64, "the dynamic header"),
        (header.table_offset, entries.len() as u64 * 4, "the BAT"),
    ];
    // Not the parent locators: their claimed lengths are not bounded by the
    // data, so a check against them could refuse a file the engine itself
    // had just written (new blocks go past the end, where such a locator reaches).
    if let Some(what) = bat::overlap(metadata[2].0, metadata[2].1, &metadata[..2]) {
        return Err(VhdError::Invalid {
            path: path.into(),
            what: format!("the BAT at offset {} overlaps {what}", header.table_offset),
        }
        .into());
    }
    let mut used = Vec::new();
    for (i, &e) in entries.iter().enumerate().take(needed) {
        if e == BAT_UNUSED {
            continue;
        }
        let start = u64::from(e) * SECTOR;
        // The last block of a disk may be cut short by the disk's end.
        let in_disk = (footer.current_size - i as u64 * block_size).min(block_size);
        if start + bitmap_size + in_disk > data_end {
            return Err(VhdError::BatEntryPastEnd {
                path: path.into(),
                block: i as u32,
                sector: e,
                end: data_end,
            }
            .into());
        }
        if let Some(what) = bat::overlap(start, bitmap_size + in_disk, &metadata) {
            return Err(VhdError::Invalid {
                path: path.into(),
                what: format!(
                    "BAT entry {i} points at sector {e}, where the file keeps {what}; the BAT is damaged"
                ),
            }
            .into());
        }
        used.push((start, i as u32));
    }
    used.sort_unstable();
    for w in used.windows(2) {
        if w[1].0 < w[0].0 + bitmap_size + block_size {
            return Err(VhdError::OverlappingBlocks {
                path: path.into(),
                first: w[0].1,
                second: w[1].1,
            }
            .into());
        }
    }
    Ok(used)
}

impl VhdImage {
    /// Opens one VHD file without its parent (see [`super::chain`] for chains),
    /// locked shared (read-only) or exclusive. Validates footer, header and BAT;
    /// refuses a damaged file with an error naming the fault. Never writes.
    pub fn open_layer(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_layer_on(&HostStorage, path, read_only)
    }

    /// [`Self::open_layer`] on the given storage.
    pub fn open_layer_on(storage: &dyn Storage, path: &Path, read_only: bool) -> Result<Self> {
        Self::from_file(storage.open(path, read_only)?, path, read_only)
    }

    /// Opens a VHD file read-only without locking it, to look at it (`info`,
    /// `check`) while a VM may be using it.
    pub fn inspect(path: &Path) -> Result<Self> {
        Self::from_file(HostStorage.inspect(path)?, path, true)
    }

    pub(crate) fn from_file(
        file: Arc<dyn BackingFile>,
        path: &Path,
        read_only: bool,
    ) -> Result<Self> {
        let len = file.len().map_err(io_error(path))?;
        let (footer, footer_at, recovered) = read_footer(file.as_ref(), path, len)?;
        let sparse = match footer.disk_type {
            DiskType::Fixed if footer_at < footer.current_size => {
                return Err(truncated(
                    path,
                    format!(
                        "a fixed VHD of {} bytes needs that many bytes of data before its footer, the file has {footer_at}",
                        footer.current_size
                    ),
                ))
            }
            DiskType::Fixed => None,
            _ => Some(Self::open_sparse(file.as_ref(), path, &footer, footer_at)?),
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
        file: &dyn BackingFile,
        path: &Path,
        footer: &Footer,
        data_end: u64,
    ) -> Result<Sparse> {
        let hdr_end = footer.data_offset.checked_add(HEADER_SIZE as u64);
        if hdr_end.is_none_or(|e| e > data_end) {
            return Err(truncated(
                path,
                format!(
                    "the dynamic header at offset {} lies past the end of the data",
                    footer.data_offset
                ),
            ));
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(file, path, &mut hb, footer.data_offset)?;
        let header = DynamicHeader::parse(&hb).map_err(|fault| VhdError::Header {
            path: path.into(),
            fault,
        })?;
        let block_size = u64::from(header.block_size);
        if u64::from(header.max_table_entries) < footer.current_size.div_ceil(block_size) {
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
            .is_none_or(|e| e > data_end)
        {
            return Err(truncated(
                path,
                format!(
                    "the BAT ({bat_bytes} bytes at offset {}) lies past the end of the data",
                    header.table_offset
                ),
            ));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        read_exact(file, path, &mut raw, header.table_offset)?;
        let entries = bat::parse(&raw);
        validate_bat(path, footer, &header, &entries, data_end)?;
        Ok(Sparse {
            header,
            block_size,
            bitmap_size: bitmap_bytes(block_size),
            bitmap_cache_entries: bitmap_cache_entries(bitmap_bytes(block_size)),
            meta: RwLock::new(Meta {
                bat: entries,
                bitmaps: HashMap::new(),
                dirty_bat: BTreeSet::new(),
                dirty_bitmaps: BTreeSet::new(),
                flushing_bitmaps: BTreeSet::new(),
                end: data_end,
            }),
            flush_lock: Mutex::new(()),
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

    pub(crate) fn file(&self) -> &dyn BackingFile {
        self.file.as_ref()
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
            .and_then(|s| s.meta.read().ok().map(|m| m.bat.clone()))
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

    fn is_differencing(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    pub(super) fn lock_err(&self) -> Error {
        VhdError::Invalid {
            path: self.path.clone(),
            what: "internal metadata lock poisoned by an earlier failure; reopen the disk".into(),
        }
        .into()
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    pub(super) fn write_file(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_at(buf, offset)
            .map_err(io_error(&self.path))
    }

    pub(super) fn sync(&self) -> Result<()> {
        self.file.flush().map_err(io_error(&self.path))
    }

    fn extent(&self, offset: u64, len: u64) -> FileExtent {
        FileExtent {
            file: self.file.clone(),
            offset,
            len,
        }
    }

    /// A block's BAT entry and bitmap, or `None` when this file has no data for it.
    fn lookup(&self, sp: &Sparse, block: u32) -> Result<Option<(u32, Bitmap)>> {
        let entry = {
            let meta = sp.meta.read().map_err(|_| self.lock_err())?;
            let entry = meta.bat[block as usize];
            if entry == BAT_UNUSED {
                return Ok(None);
            }
            if let Some(b) = meta.bitmaps.get(&block) {
                return Ok(Some((entry, b.clone())));
            }
            entry
        };
        let mut bytes = vec![0u8; sp.bitmap_size as usize];
        read_exact(
            self.file(),
            &self.path,
            &mut bytes,
            u64::from(entry) * SECTOR,
        )?;
        let loaded = Bitmap::from_bytes(bytes, sp.block_size / SECTOR);
        Ok(Some((entry, self.cache_bitmap(sp, block, loaded)?)))
    }

    /// Puts a block's bitmap as read from the file into the cache (unless a
    /// newer copy got there first) and returns the cached one.
    fn cache_bitmap(&self, sp: &Sparse, block: u32, loaded: Bitmap) -> Result<Bitmap> {
        let mut meta = sp.meta.write().map_err(|_| self.lock_err())?;
        let bitmap = meta.bitmaps.entry(block).or_insert(loaded).clone();
        meta.trim_bitmaps(sp.bitmap_cache_entries, block);
        Ok(bitmap)
    }

    /// A read from the start of a block whose bitmap is not cached yet: the
    /// bitmap and the data after it are read in one request (the bitmap sits
    /// right before the block's data), so a sequential reader pays no separate
    /// bitmap read per block (with O_DIRECT, one synchronous device read per
    /// block less). The request is vectored: the bitmap lands in its own small
    /// buffer and the data straight in `buf`, with no block-sized buffer to
    /// allocate, clear and copy out of. Returns whether `buf` was filled:
    /// `false` when the block is not allocated, its bitmap is cached, or not
    /// every sector read is present (then `buf` holds bytes to be overwritten).
    fn read_block_start(&self, sp: &Sparse, buf: &mut [u8], block: u32) -> Result<bool> {
        let entry = {
            let meta = sp.meta.read().map_err(|_| self.lock_err())?;
            let entry = meta.bat[block as usize];
            if entry == BAT_UNUSED || meta.bitmaps.contains_key(&block) {
                return Ok(false);
            }
            entry
        };
        let mut bitmap = vec![0u8; sp.bitmap_size as usize];
        let at = u64::from(entry) * SECTOR;
        self.file()
            .read_vectored_at(
                &mut [IoSliceMut::new(&mut bitmap), IoSliceMut::new(buf)],
                at,
            )
            .map_err(io_error(&self.path))?;
        // Judged by the bitmap read with the data: what the file said then.
        let loaded = Bitmap::from_bytes(bitmap, sp.block_size / SECTOR);
        let sectors = (buf.len() as u64).div_ceil(SECTOR);
        let usable = loaded.all_present(0, sectors);
        self.cache_bitmap(sp, block, loaded)?;
        Ok(usable)
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
        if in_block == 0 && self.read_block_start(sp, buf, block)? {
            return Ok(());
        }
        let Some((entry, bitmap)) = self.lookup(sp, block)? else {
            return self.read_below(buf, offset);
        };
        let data = u64::from(entry) * SECTOR + sp.bitmap_size;
        if let Bitmap::Full = bitmap {
            return read_exact(self.file(), &self.path, buf, data + in_block);
        }
        // Runs of sectors that are all present here, or all absent.
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = in_block + pos as u64;
            let present = bitmap.present(at / SECTOR);
            let mut end = ((at / SECTOR + 1) * SECTOR - in_block) as usize;
            while end < buf.len() && bitmap.present((in_block + end as u64) / SECTOR) == present {
                end += SECTOR as usize;
            }
            let end = end.min(buf.len());
            if present {
                read_exact(self.file(), &self.path, &mut buf[pos..end], data + at)?;
            } else if self.is_differencing() {
                self.read_below(&mut buf[pos..end], offset + pos as u64)?;
            } else {
                buf[pos..end].fill(0);
            }
            pos = end;
        }
        Ok(())
    }

    /// The block's BAT entry, placing a new block at the end of the file if it
    /// has none: a footer past the new block first (the file always ends in a
    /// valid footer), then zeros from the old footer up to the new block's
    /// bitmap, and the bitmap (all present for a dynamic disk, whose fresh
    /// data reads as zeros anyway; none present for a differencing disk, so
    /// it still reads from the parent until written data is marked).
    fn entry_for_write(&self, sp: &Sparse, block: u32) -> Result<u32> {
        let entry = sp.meta.read().map_err(|_| self.lock_err())?.bat[block as usize];
        if entry != BAT_UNUSED {
            return Ok(entry);
        }
        let mut meta = sp.meta.write().map_err(|_| self.lock_err())?;
        let entry = meta.bat[block as usize];
        if entry != BAT_UNUSED {
            return Ok(entry);
        }
        // Past the old trailing footer at `meta.end`, which must stay intact
        // until the new one is durable (only a flush orders the two writes).
        let old_footer_end = meta.end + FOOTER_SIZE as u64;
        let start =
            (old_footer_end + sp.bitmap_size).div_ceil(DATA_ALIGN) * DATA_ALIGN - sp.bitmap_size;
        let new_end = start + sp.bitmap_size + sp.block_size;
        let entry = u32::try_from(start / SECTOR).map_err(|_| VhdError::Invalid {
            path: self.path.clone(),
            what: "the file has grown past the 2 TiB a VHD's BAT can address".into(),
        })?;
        self.write_file(&self.footer.serialize(), new_end)?;
        let bitmap = if self.is_differencing() {
            Bitmap::Sectors(Arc::new(vec![0; sp.bitmap_size as usize]))
        } else {
            Bitmap::Full
        };
        // The gap after the old footer and the bitmap, in one request.
        let gap = &GAP_ZEROS[..(start - old_footer_end) as usize];
        let bytes = bitmap.bytes(sp.bitmap_size);
        self.file
            .write_vectored_at(&[IoSlice::new(gap), IoSlice::new(&bytes)], old_footer_end)
            .map_err(io_error(&self.path))?;
        meta.bitmaps.insert(block, bitmap);
        meta.trim_bitmaps(sp.bitmap_cache_entries, block);
        meta.bat[block as usize] = entry;
        meta.dirty_bat.insert(block);
        meta.end = new_end;
        Ok(entry)
    }

    fn write_in_block(&self, sp: &Sparse, buf: &[u8], offset: u64) -> Result<()> {
        let block = (offset / sp.block_size) as u32;
        let in_block = offset % sp.block_size;
        let entry = self.entry_for_write(sp, block)?;
        let data = u64::from(entry) * SECTOR + sp.bitmap_size;
        self.write_file(buf, data + in_block)?;
        self.mark_present(sp, block, in_block, buf.len() as u64)
    }

    /// After data is written, marks its sectors present (in memory; the bitmap
    /// reaches the file at the next flush). A whole-block write just marks the
    /// block full: no bitmap read-modify-write.
    fn mark_present(&self, sp: &Sparse, block: u32, in_block: u64, len: u64) -> Result<()> {
        let sectors = sp.block_size / SECTOR;
        let whole = in_block == 0 && len == sp.block_size;
        let first = in_block / SECTOR;
        let count = (in_block + len).div_ceil(SECTOR) - first;
        if !whole {
            let Some((entry, bitmap)) = self.lookup(sp, block)? else {
                return Ok(());
            };
            if bitmap.all_present(first, count) {
                return Ok(());
            }
            let data = u64::from(entry) * SECTOR + sp.bitmap_size;
            self.fill_partial_sectors(sp, &bitmap, block, data, in_block, len)?;
        }
        let mut meta = sp.meta.write().map_err(|_| self.lock_err())?;
        if whole {
            if let Some(Bitmap::Full) = meta.bitmaps.get(&block) {
                return Ok(());
            }
            meta.bitmaps.insert(block, Bitmap::Full);
        } else {
            loop {
                if let Some(slot) = meta.bitmaps.get_mut(&block) {
                    slot.mark(first, count, sectors);
                    break;
                }
                // Dropped from the cache since the lookup above. It was clean, so the
                // file holds its latest state: read it again (never mark a stale copy).
                drop(meta);
                self.lookup(sp, block)?;
                meta = sp.meta.write().map_err(|_| self.lock_err())?;
            }
        }
        meta.dirty_bitmaps.insert(block);
        meta.trim_bitmaps(sp.bitmap_cache_entries, block);
        Ok(())
    }

    /// Before marking sectors present that a write covers only partly, copies
    /// the parent's bytes into the parts of those sectors the write left out.
    fn fill_partial_sectors(
        &self,
        sp: &Sparse,
        bitmap: &Bitmap,
        block: u32,
        data: u64,
        in_block: u64,
        len: u64,
    ) -> Result<()> {
        let base = u64::from(block) * sp.block_size;
        let end = in_block + len;
        let mut edges = vec![];
        if !in_block.is_multiple_of(SECTOR) {
            edges.push(in_block / SECTOR);
        }
        if !end.is_multiple_of(SECTOR) && !edges.contains(&((end - 1) / SECTOR)) {
            edges.push((end - 1) / SECTOR);
        }
        for sector in edges.into_iter().filter(|&s| !bitmap.present(s)) {
            let lo = sector * SECTOR;
            let hi = lo + SECTOR;
            let mut old = [0u8; SECTOR as usize];
            self.read_below(&mut old, base + lo)?;
            // The parts of the sector before and after the write keep the parent's bytes.
            for (from, to) in [(lo, in_block.max(lo)), (end.min(hi), hi)] {
                if from < to {
                    self.write_file(&old[(from - lo) as usize..(to - lo) as usize], data + from)?;
                }
            }
        }
        Ok(())
    }

    /// Takes the dirty BAT sectors and bitmaps out of the cache.
    fn take_dirty(&self, sp: &Sparse) -> Result<Snapshot> {
        let mut meta = sp.meta.write().map_err(|_| self.lock_err())?;
        let mut writes = Vec::new();
        let bitmap_blocks: Vec<u32> = std::mem::take(&mut meta.dirty_bitmaps)
            .into_iter()
            .collect();
        meta.flushing_bitmaps.extend(bitmap_blocks.iter().copied());
        for &b in &bitmap_blocks {
            if let Some(bm) = meta.bitmaps.get(&b) {
                let at = u64::from(meta.bat[b as usize]) * SECTOR;
                writes.push((at, bm.bytes(sp.bitmap_size)));
            }
        }
        let bat_blocks: Vec<u32> = std::mem::take(&mut meta.dirty_bat).into_iter().collect();
        let per_sector = (SECTOR / 4) as usize;
        let sectors: BTreeSet<usize> = bat_blocks
            .iter()
            .map(|&b| b as usize / per_sector)
            .collect();
        for s in sectors {
            let first = s * per_sector;
            let last = (first + per_sector).min(meta.bat.len());
            let at = sp.header.table_offset + first as u64 * 4;
            writes.push((at, bat::serialize(&meta.bat[first..last])));
        }
        Ok(Snapshot {
            writes,
            bat_blocks,
            bitmap_blocks,
        })
    }

    /// Flushes a sparse image: data first, then the metadata that refers to it.
    fn flush_sparse(&self, sp: &Sparse) -> Result<()> {
        let _serial = sp.flush_lock.lock().map_err(|_| self.lock_err())?;
        let snap = self.take_dirty(sp)?;
        let result = self.sync().and_then(|()| {
            if snap.writes.is_empty() {
                return Ok(());
            }
            for (at, bytes) in &snap.writes {
                self.write_file(bytes, *at)?;
            }
            self.sync()
        });
        if let Ok(mut meta) = sp.meta.write() {
            for b in &snap.bitmap_blocks {
                meta.flushing_bitmaps.remove(b);
            }
            if result.is_err() {
                // Not durable: write them again at the next flush.
                meta.dirty_bat.extend(snap.bat_blocks);
                meta.dirty_bitmaps.extend(snap.bitmap_blocks);
            } else {
                meta.trim_bitmaps(sp.bitmap_cache_entries, u32::MAX);
            }
        }
        result
    }

    fn read_fixed(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_exact(self.file(), &self.path, buf, offset)
    }

    /// The allocation of the run at `off` within its block: (present, run length).
    fn status_in_block(&self, sp: &Sparse, off: u64) -> Result<(bool, u64)> {
        let block = (off / sp.block_size) as u32;
        let in_block = off % sp.block_size;
        let rest = sp.block_size - in_block;
        let Some((_, bitmap)) = self.lookup(sp, block)? else {
            return Ok((false, rest));
        };
        if let Bitmap::Full = bitmap {
            return Ok((true, rest));
        }
        let s0 = in_block / SECTOR;
        let present = bitmap.present(s0);
        let mut s = s0 + 1;
        while s < sp.block_size / SECTOR && bitmap.present(s) == present {
            s += 1;
        }
        Ok((present, s * SECTOR - in_block))
    }
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
            return self.read_fixed(buf, offset);
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
            return self.write_file(buf, offset);
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
        match &self.sparse {
            Some(sp) => self.flush_sparse(sp),
            None => self.sync(),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(Some(&self.path), self.size(), offset, len)?;
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let st = self.block_status(offset + done, (len - done).min(CHUNK))?;
            // Unallocated ranges of a dynamic disk already read as zeros.
            let already_zero = st.allocation == Allocation::Unallocated && !self.is_differencing();
            if !already_zero {
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
        let (present, mut run) = self.status_in_block(sp, offset)?;
        while run < len {
            let (p, r) = self.status_in_block(sp, offset + run)?;
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

    /// A fixed disk's data is the file's first bytes; a sparse disk's block
    /// data follows the block's bitmap, so a run of present sectors within
    /// one block is contiguous in the file.
    fn data_extent(&self, offset: u64, len: u64) -> Result<Option<FileExtent>> {
        check_range(Some(&self.path), self.size(), offset, len)?;
        let Some(sp) = &self.sparse else {
            return Ok(Some(self.extent(offset, len)));
        };
        if len == 0 || !offset.is_multiple_of(SECTOR) {
            return Ok(None);
        }
        let block = (offset / sp.block_size) as u32;
        let in_block = offset % sp.block_size;
        let Some((entry, bitmap)) = self.lookup(sp, block)? else {
            return Ok(None);
        };
        let mut run = (sp.block_size - in_block).min(len);
        if let Bitmap::Sectors(_) = bitmap {
            let first = in_block / SECTOR;
            let last = (in_block + run).div_ceil(SECTOR);
            let present = (first..last).take_while(|&s| bitmap.present(s)).count() as u64;
            if present == 0 {
                return Ok(None);
            }
            run = run.min(present * SECTOR);
        }
        let data = u64::from(entry) * SECTOR + sp.bitmap_size;
        Ok(Some(self.extent(data + in_block, run)))
    }

    /// Allocates the block as [`Disk::write_at`] does (footer past it, then
    /// its bitmap); the run ends at the block's end.
    fn prepare_extent_write(&self, offset: u64, len: u64) -> Result<Option<FileExtent>> {
        self.check_writable()?;
        check_range(Some(&self.path), self.size(), offset, len)?;
        let Some(sp) = &self.sparse else {
            return Ok(Some(self.extent(offset, len)));
        };
        let in_block = offset % sp.block_size;
        let run = (sp.block_size - in_block).min(len);
        if run == 0 || !offset.is_multiple_of(SECTOR) || !run.is_multiple_of(SECTOR) {
            return Ok(None);
        }
        let entry = self.entry_for_write(sp, (offset / sp.block_size) as u32)?;
        let data = u64::from(entry) * SECTOR + sp.bitmap_size;
        Ok(Some(self.extent(data + in_block, run)))
    }

    /// Marks the sectors present, as after a write's data.
    fn commit_extent_write(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(Some(&self.path), self.size(), offset, len)?;
        let Some(sp) = &self.sparse else {
            return Ok(());
        };
        let mut pos = offset;
        while pos < offset + len {
            let in_block = pos % sp.block_size;
            let n = (sp.block_size - in_block).min(offset + len - pos);
            self.mark_present(sp, (pos / sp.block_size) as u32, in_block, n)?;
            pos += n;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd1::chain::open_chain;
    use crate::vhd1::create::{create, CreateOptions, NewDisk};
    use crate::NoProgress;

    const BLOCK: u64 = 64 << 10;
    const BLOCKS: u64 = 200;

    /// Sector `s` of block `b` written by the child holds this byte.
    fn byte(b: u64, s: u64) -> u8 {
        (1 + (b * 7 + s) % 250) as u8
    }

    #[test]
    fn a_bitmap_cache_much_smaller_than_the_disk_keeps_every_partial_write() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("p.vhd");
        let child = dir.path().join("c.vhd");
        let new = |path: &Path, kind| {
            create(
                path,
                &CreateOptions {
                    kind,
                    exact_size: true,
                },
                &mut NoProgress,
            )
            .unwrap();
        };
        new(
            &parent,
            NewDisk::Dynamic {
                size: BLOCK * BLOCKS,
                block_size: BLOCK as u32,
            },
        );
        {
            let p = open_chain(&parent, false).unwrap();
            p.write_at(&vec![0xEE; (BLOCK * BLOCKS) as usize], 0)
                .unwrap();
            p.flush().unwrap();
        }
        new(
            &child,
            NewDisk::Differencing {
                parent: parent.clone(),
            },
        );
        let mut img = open_chain(&child, false).unwrap();
        img.sparse.as_mut().unwrap().bitmap_cache_entries = 8;
        // Two sectors of every block, in three passes with flushes between, so that
        // clean bitmaps are dropped and read back while others are being marked.
        for pass in 0..3u64 {
            for b in 0..BLOCKS {
                let s = pass * 2;
                let data: Vec<u8> = (0..2).flat_map(|i| vec![byte(b, s + i); 512]).collect();
                img.write_at(&data, b * BLOCK + s * 512).unwrap();
            }
            img.flush().unwrap();
            let cached = img
                .sparse
                .as_ref()
                .unwrap()
                .meta
                .read()
                .unwrap()
                .bitmaps
                .len();
            assert!(cached <= 8, "{cached} bitmaps cached");
        }
        let check = |img: &VhdImage| {
            let mut buf = vec![0u8; BLOCK as usize];
            for b in 0..BLOCKS {
                img.read_at(&mut buf, b * BLOCK).unwrap();
                for s in 0..BLOCK / 512 {
                    let want = if s < 6 { byte(b, s) } else { 0xEE };
                    let got = &buf[(s * 512) as usize..((s + 1) * 512) as usize];
                    assert!(got.iter().all(|x| *x == want), "block {b} sector {s}");
                }
            }
        };
        check(&img);
        drop(img);
        check(&open_chain(&child, true).unwrap());
    }
}
