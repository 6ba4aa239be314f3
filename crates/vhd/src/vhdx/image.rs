//! I/O on one VHDX file: fixed, dynamic or differencing. See the module docs of
//! [`super`] for the write ordering that keeps the file consistent across crashes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use super::bat::{self, BatEntry, Layout};
use super::header::{self, FileIdentifier, Header, HEADER_OFFSETS, HEADER_SIZE};
use super::log::{find_active_sequence, LogEntry, LogOp};
use super::metadata::Metadata;
use super::region::{self, RegionEntry, RegionTable};
use super::{Error as VhdxError, Fault, LOG_SECTOR, MIB};
use crate::backing::{io_error, BackingFile, HostStorage, Storage};
use crate::disk::{check_range, Allocation, BlockStatus, Disk, FileExtent};
use crate::error::{Error, Result};

const PAGE: u64 = LOG_SECTOR as u64;
/// The largest metadata region we read into memory.
const MAX_METADATA_REGION: u64 = 64 * MIB;

/// Memory the cached sector bitmaps of one image may take, as for VHD: 8
/// bitmaps of 1 MiB, each covering 2^23 sectors (4 GiB of the virtual disk
/// with 512-byte sectors, 32 GiB with 4 KiB ones).
pub(super) const BITMAP_CACHE_BYTES: u64 = 8 << 20;

/// What a flush takes from the cache: the pages (to put back if it fails),
/// their contents at their file offsets, the file's length and end.
type Dirty = (Vec<Page>, Vec<(u64, Vec<u8>)>, u64, u64);

/// The disk type, from the file parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VhdxType {
    Fixed,
    Dynamic,
    Differencing,
}

/// A 4 KiB metadata page that changed since the last flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Page {
    /// Page `n` of the BAT.
    Bat(u64),
    /// Page `page` of chunk `chunk`'s sector bitmap.
    Bitmap { chunk: u64, page: u64 },
}

pub(super) struct State {
    pub(super) bat: Vec<u64>,
    /// Sector bitmaps of chunks, loaded on first use (1 MiB each). Clean ones
    /// beyond `bitmap_limit` are dropped and read again when needed, so a
    /// large differencing disk does not hold its whole bitmap area in memory.
    bitmaps: HashMap<u64, Vec<u8>>,
    /// Most bitmaps kept in memory (see [`BITMAP_CACHE_BYTES`]).
    bitmap_limit: usize,
    /// Chunks whose bitmap pages a flush has taken but not yet written in
    /// place: the file does not have them yet, so they must stay cached.
    flushing: BTreeSet<u64>,
    dirty: BTreeSet<Page>,
    /// Where the next block goes (1 MiB aligned, past every structure).
    pub(super) end: u64,
    /// The file's length as we last set or saw it.
    pub(super) file_len: u64,
}

/// The headers as this session knows them, and where the log continues.
impl State {
    /// Drops clean cached bitmaps (never `keep`, never one with unflushed
    /// bits or one a flush is writing) until a quarter of the room is free.
    fn trim_bitmaps(&mut self, keep: Option<u64>) {
        if self.bitmaps.len() <= self.bitmap_limit {
            return;
        }
        let target = self.bitmap_limit - self.bitmap_limit / 4;
        let excess = self.bitmaps.len() - target;
        let dirty: BTreeSet<u64> = self
            .dirty
            .range(Page::Bitmap { chunk: 0, page: 0 }..)
            .filter_map(|p| match p {
                Page::Bitmap { chunk, .. } => Some(*chunk),
                Page::Bat(_) => None,
            })
            .collect();
        let victims: Vec<u64> = self
            .bitmaps
            .keys()
            .copied()
            .filter(|c| Some(*c) != keep && !dirty.contains(c) && !self.flushing.contains(c))
            .take(excess)
            .collect();
        for c in victims {
            self.bitmaps.remove(&c);
        }
    }
}

pub(super) struct Session {
    pub(super) header: Header,
    /// Slot (0 or 1) holding the current header.
    slot: usize,
    /// Whether this session's first header update (new GUIDs) happened.
    started: bool,
    /// Whether this session changed what the disk reads (new DataWriteGuid).
    data_changed: bool,
    log_head: u64,
    log_seq: u64,
}

/// What opening found in the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogState {
    /// Sequence number of the head entry of the replayed sequence.
    pub head_sequence: u64,
    pub entries: usize,
    /// Whether it was replayed into the file (writable open) or only in memory.
    pub replayed_in_file: bool,
}

/// One open VHDX file, with its parent attached when it is a differencing disk.
pub struct VhdxImage {
    pub(super) file: Arc<dyn BackingFile>,
    pub(super) path: PathBuf,
    pub(super) read_only: bool,
    pub(super) creator: String,
    pub(super) regions: RegionTable,
    pub(super) bat_region: RegionEntry,
    pub(super) meta_region: RegionEntry,
    pub(super) metadata: Metadata,
    pub(super) layout: Layout,
    pub(super) state: RwLock<State>,
    pub(super) session: Mutex<Session>,
    started: AtomicBool,
    data_changed: AtomicBool,
    /// Whether the file may hold writes (or a new length) that no sync has
    /// covered yet: set after each write, cleared by the sync that covers
    /// it. A flush with nothing new (a close after a flush) skips its
    /// fdatasync, never one that data or a log entry depends on.
    unsynced: AtomicBool,
    /// The DataWriteGuid the next change of content takes, when it must be
    /// known beforehand (a merge records it in the child first).
    planned_data_write_guid: Mutex<Option<Uuid>>,
    /// Held shared by every change ([`Disk::write_at`], `write_zeroes`,
    /// `discard`, extent writes) and exclusively by [`Disk::settle`].
    write_gate: RwLock<()>,
    /// Log updates replayed in memory (read-only open of a file with a log).
    overlay: Vec<LogOp>,
    pub(super) log_found: Option<LogState>,
    parent: Option<Box<dyn Disk>>,
    pub(super) parent_path: Option<PathBuf>,
}

fn structure(path: &Path, fault: Fault) -> Error {
    VhdxError::Structure {
        path: path.into(),
        fault,
    }
    .into()
}

pub(super) fn invalid(path: &Path, what: impl Into<String>) -> Error {
    VhdxError::Invalid {
        path: path.into(),
        what: what.into(),
    }
    .into()
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
fn read_padded(
    file: &dyn BackingFile,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    len: u64,
) -> Result<()> {
    let avail = len.saturating_sub(offset).min(buf.len() as u64) as usize;
    if avail > 0 {
        file.read_at(&mut buf[..avail], offset)
            .map_err(io_error(path))?;
    }
    buf[avail..].fill(0);
    Ok(())
}

/// Applies logged updates to bytes read from `[offset, offset + buf.len())`.
fn patch(ops: &[LogOp], buf: &mut [u8], offset: u64) {
    let end = offset + buf.len() as u64;
    for op in ops {
        let (at, len, data) = match op {
            LogOp::Data { offset, bytes } => (*offset, bytes.len() as u64, Some(bytes)),
            LogOp::Zero { offset, length } => (*offset, *length, None),
        };
        let lo = at.max(offset);
        let hi = at.saturating_add(len).min(end);
        if lo >= hi {
            continue;
        }
        let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
        match data {
            Some(d) => dst.copy_from_slice(&d[(lo - at) as usize..(hi - at) as usize]),
            None => dst.fill(0),
        }
    }
}

fn new_guid() -> Uuid {
    Uuid::new_v4()
}

impl VhdxImage {
    /// Opens one VHDX file without its parent (see [`super::chain`] for chains),
    /// locked shared (read-only) or exclusive. A log that needs replay is
    /// replayed into the file (writable) or in memory (read-only).
    pub fn open_layer(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_layer_on(&HostStorage, path, read_only)
    }

    pub fn open_layer_on(storage: &dyn Storage, path: &Path, read_only: bool) -> Result<Self> {
        Self::from_file(storage.open(path, read_only)?, path, read_only)
    }

    /// Opens a VHDX file read-only without locking it, to look at it (`info`,
    /// `check`) while a VM may be using it. Never writes.
    pub fn inspect(path: &Path) -> Result<Self> {
        Self::from_file(HostStorage.inspect(path)?, path, true)
    }

    pub(crate) fn from_file(
        file: Arc<dyn BackingFile>,
        path: &Path,
        read_only: bool,
    ) -> Result<Self> {
        let len = file.len().map_err(io_error(path))?;
        let mut head = vec![0u8; header::FILE_ID_SIZE];
        read_padded(file.as_ref(), path, &mut head, 0, len)?;
        let file_id = FileIdentifier::parse(&head).map_err(|fault| VhdxError::NotVhdx {
            path: path.into(),
            fault,
        })?;
        let parsed: Vec<std::result::Result<Header, Fault>> = HEADER_OFFSETS
            .iter()
            .map(|&at| {
                let mut b = vec![0u8; HEADER_SIZE];
                read_padded(file.as_ref(), path, &mut b, at, len).map(|()| Header::parse(&b))
            })
            .collect::<Result<_>>()?;
        let slot = header::current(&parsed[0], &parsed[1]).map_err(|faults| {
            let (first, second) = *faults;
            VhdxError::NoValidHeader {
                path: path.into(),
                first: Box::new(first),
                second: Box::new(second),
            }
        })?;
        let mut hdr = match &parsed[slot] {
            Ok(h) => h.clone(),
            Err(_) => unreachable!("current() returns a valid slot"),
        };
        let mut session = Session {
            header: hdr.clone(),
            slot,
            started: false,
            data_changed: false,
            log_head: 0,
            log_seq: 1,
        };
        let mut overlay = Vec::new();
        let mut log_found = None;
        let mut file_len = len;
        if !hdr.log_guid.is_nil() {
            let (ops, state, last) = Self::read_log(file.as_ref(), path, &hdr, len)?;
            if read_only {
                overlay = ops;
                file_len = file_len.max(last);
            } else {
                Self::replay(file.as_ref(), path, &mut session, &ops, last, len)?;
                file_len = file_len.max(last);
                hdr = session.header.clone();
            }
            log_found = Some(LogState {
                replayed_in_file: !read_only,
                ..state
            });
        }
        let read_meta = |buf: &mut [u8], offset: u64| -> Result<()> {
            read_padded(file.as_ref(), path, buf, offset, len)?;
            patch(&overlay, buf, offset);
            Ok(())
        };
        // Region tables.
        let tables: Vec<std::result::Result<RegionTable, Fault>> = region::TABLE_OFFSETS
            .iter()
            .map(|&at| {
                let mut b = vec![0u8; region::TABLE_SIZE];
                read_meta(&mut b, at).map(|()| RegionTable::parse(&b))
            })
            .collect::<Result<_>>()?;
        let regions = match (&tables[0], &tables[1]) {
            (Ok(t), _) | (Err(_), Ok(t)) => t.clone(),
            (Err(first), Err(second)) => {
                return Err(VhdxError::NoValidRegionTable {
                    path: path.into(),
                    first: Box::new(first.clone()),
                    second: Box::new(second.clone()),
                }
                .into())
            }
        };
        if let Some(u) = regions.unknown_required() {
            return Err(VhdxError::UnknownRequiredRegion {
                path: path.into(),
                guid: u.guid.hyphenated().to_string(),
            }
            .into());
        }
        let missing = |what: &str| {
            structure(
                path,
                super::field("region table", format!("no {what} region")),
            )
        };
        let bat_region = regions
            .find(&region::BAT_GUID)
            .cloned()
            .ok_or_else(|| missing("BAT"))?;
        let meta_region = regions
            .find(&region::METADATA_GUID)
            .cloned()
            .ok_or_else(|| missing("metadata"))?;
        for r in [&bat_region, &meta_region] {
            if r.end() > file_len {
                return Err(VhdxError::Truncated {
                    path: path.into(),
                    what: format!(
                        "region {} ({} bytes at offset {}) lies past the end of the file ({file_len} bytes)",
                        r.guid, r.length, r.file_offset
                    ),
                }
                .into());
            }
        }
        if u64::from(meta_region.length) > MAX_METADATA_REGION {
            return Err(invalid(
                path,
                format!(
                    "metadata region of {} bytes is larger than this version reads",
                    meta_region.length
                ),
            ));
        }
        let mut mb = vec![0u8; meta_region.length as usize];
        read_meta(&mut mb, meta_region.file_offset)?;
        let metadata = Metadata::parse(&mb).map_err(|f| structure(path, f))?;
        if let Some(u) = metadata.unknown_required() {
            return Err(VhdxError::UnknownRequiredMetadata {
                path: path.into(),
                guid: u.entry.item_id.hyphenated().to_string(),
            }
            .into());
        }
        let layout = Layout {
            block_size: u64::from(metadata.block_size),
            logical_sector_size: u64::from(metadata.logical_sector_size),
            disk_size: metadata.virtual_disk_size,
            has_parent: metadata.has_parent,
        };
        let capacity = u64::from(bat_region.length) / 8;
        if capacity < layout.required_entries() {
            return Err(structure(
                path,
                super::field(
                    "BAT",
                    format!(
                        "the region holds {capacity} entries, too few for a {}-byte disk with {}-byte blocks ({} needed)",
                        layout.disk_size,
                        layout.block_size,
                        layout.required_entries()
                    ),
                ),
            ));
        }
        let entries = capacity
            .min(layout.full_entries())
            .max(layout.required_entries());
        let mut raw = vec![0u8; (entries * 8) as usize];
        read_meta(&mut raw, bat_region.file_offset)?;
        let bat = bat::parse(&raw);
        // What a block must not lie over: the log and every region.
        let mut taken = vec![(hdr.log_offset, u64::from(hdr.log_length), "log".to_string())];
        for r in &regions.entries {
            let what = match r.guid {
                region::BAT_GUID => "BAT".to_string(),
                region::METADATA_GUID => "metadata region".to_string(),
                g => format!("region {g}"),
            };
            taken.push((r.file_offset, u64::from(r.length), what));
        }
        let end = Self::validate_bat(path, &layout, &bat, file_len, &taken)?;
        let log_end = hdr.log_offset + u64::from(hdr.log_length);
        // New blocks go past every block and structure, regions we do not
        // know included (a block over one would be refused at the next open).
        let end = [end, file_len.div_ceil(MIB) * MIB, log_end]
            .into_iter()
            .chain(regions.entries.iter().map(RegionEntry::end))
            .max()
            .unwrap_or(MIB);
        session.header = hdr;
        Ok(VhdxImage {
            file,
            path: path.to_path_buf(),
            read_only,
            creator: file_id.creator,
            regions,
            bat_region,
            meta_region,
            metadata,
            layout,
            state: RwLock::new(State {
                bat,
                bitmaps: HashMap::new(),
                bitmap_limit: (BITMAP_CACHE_BYTES / bat::BITMAP_BLOCK).max(2) as usize,
                flushing: BTreeSet::new(),
                dirty: BTreeSet::new(),
                end,
                file_len,
            }),
            session: Mutex::new(session),
            started: AtomicBool::new(false),
            data_changed: AtomicBool::new(false),
            unsynced: AtomicBool::new(true),
            planned_data_write_guid: Mutex::new(None),
            write_gate: RwLock::new(()),
            overlay,
            log_found,
            parent: None,
            parent_path: None,
        })
    }

    /// Reads the log and finds its active sequence; returns the updates to
    /// replay, what was found, and the file size the sequence needs.
    fn read_log(
        file: &dyn BackingFile,
        path: &Path,
        hdr: &Header,
        len: u64,
    ) -> Result<(Vec<LogOp>, LogState, u64)> {
        let log_end = hdr.log_offset.checked_add(u64::from(hdr.log_length));
        if log_end.is_none_or(|e| e > len) {
            return Err(VhdxError::Truncated {
                path: path.into(),
                what: format!(
                    "the log ({} bytes at offset {}) lies past the end of the file ({len} bytes)",
                    hdr.log_length, hdr.log_offset
                ),
            }
            .into());
        }
        let mut log = vec![0u8; hdr.log_length as usize];
        file.read_at(&mut log, hdr.log_offset)
            .map_err(io_error(path))?;
        let active = find_active_sequence(&log, &hdr.log_guid).ok_or_else(|| {
            VhdxError::LogNoValidSequence {
                path: path.into(),
                log_guid: hdr.log_guid.hyphenated().to_string(),
            }
        })?;
        let head = active.head();
        if len < head.flushed_file_offset {
            return Err(VhdxError::LogFileTruncated {
                path: path.into(),
                len,
                flushed: head.flushed_file_offset,
            }
            .into());
        }
        let state = LogState {
            head_sequence: head.sequence_number,
            entries: active.entries.len(),
            replayed_in_file: false,
        };
        let last = head.last_file_offset;
        let ops = active.entries.into_iter().flat_map(|e| e.ops).collect();
        Ok((ops, state, last))
    }

    /// Replays logged updates into the file (MS-VHDX 2.3.3): headers first
    /// (new FileWriteGuid), then the updates, the file's length, a flush, and
    /// the headers again with an empty log.
    fn replay(
        file: &dyn BackingFile,
        path: &Path,
        s: &mut Session,
        ops: &[LogOp],
        last: u64,
        len: u64,
    ) -> Result<()> {
        let mut h = s.header.clone();
        h.file_write_guid = new_guid();
        write_headers(file, path, s, h)?;
        for op in ops {
            match op {
                LogOp::Data { offset, bytes } => file.write_at(bytes, *offset),
                LogOp::Zero { offset, length } => {
                    let mut done = 0;
                    let zeros = vec![0u8; (*length).min(MIB) as usize];
                    let mut r = Ok(());
                    while done < *length && r.is_ok() {
                        let n = (length - done).min(MIB);
                        r = file.write_at(&zeros[..n as usize], offset + done);
                        done += n;
                    }
                    r
                }
            }
            .map_err(io_error(path))?;
        }
        if len < last {
            file.set_len(last).map_err(io_error(path))?;
        }
        file.flush().map_err(io_error(path))?;
        let mut h = s.header.clone();
        h.log_guid = Uuid::nil();
        write_headers(file, path, s, h)
    }

    /// Checks every allocated block and bitmap lies within the file, past the
    /// header section and clear of the `taken` ranges (offset, length, what):
    /// a write to a block over the log, the BAT or the metadata would destroy
    /// them. Returns the end of the last one.
    fn validate_bat(
        path: &Path,
        layout: &Layout,
        bat: &[u64],
        file_len: u64,
        taken: &[(u64, u64, String)],
    ) -> Result<u64> {
        let cr = layout.chunk_ratio();
        let mut end = 0u64;
        // (offset, end, entry) of every present block: no two may share a byte.
        let mut placed: Vec<(u64, u64, u64)> = Vec::new();
        for (i, &raw) in bat.iter().enumerate() {
            let i = i as u64;
            let e = BatEntry::parse(raw);
            let is_bitmap = i % (cr + 1) == cr;
            let (present, size) = if is_bitmap {
                match e.state {
                    bat::SB_BLOCK_NOT_PRESENT => (false, 0),
                    bat::SB_BLOCK_PRESENT => (true, bat::BITMAP_BLOCK),
                    s => {
                        return Err(structure(
                            path,
                            super::field(
                                "BAT",
                                format!("sector bitmap entry {i} has reserved state {s}"),
                            ),
                        ))
                    }
                }
            } else {
                let block = i - i / (cr + 1);
                if block >= layout.payload_blocks() {
                    continue;
                }
                match e.state {
                    bat::PAYLOAD_BLOCK_FULLY_PRESENT => {}
                    bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT if layout.has_parent => {}
                    bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                        return Err(structure(
                            path,
                            super::field(
                                "BAT",
                                format!(
                                    "entry {i} is partially present in a disk without a parent"
                                ),
                            ),
                        ))
                    }
                    bat::PAYLOAD_BLOCK_NOT_PRESENT
                    | bat::PAYLOAD_BLOCK_UNDEFINED
                    | bat::PAYLOAD_BLOCK_ZERO
                    | bat::PAYLOAD_BLOCK_UNMAPPED => continue,
                    s => {
                        return Err(structure(
                            path,
                            super::field(
                                "BAT",
                                format!("payload entry {i} has reserved state {s}"),
                            ),
                        ))
                    }
                }
                let in_disk = (layout.disk_size - block * layout.block_size).min(layout.block_size);
                (true, in_disk)
            };
            if !present {
                continue;
            }
            let offset = e.offset();
            let block_end = offset.checked_add(size);
            if offset < MIB || block_end.is_none_or(|x| x > file_len) {
                return Err(VhdxError::BatEntryPastEnd {
                    path: path.into(),
                    index: i,
                    offset,
                    end: file_len,
                }
                .into());
            }
            // `block_end` is within the file, so no sum here overflows.
            let end_here = offset + size;
            if let Some((_, _, what)) = taken
                .iter()
                .find(|(at, len, _)| offset < at.saturating_add(*len) && *at < end_here)
            {
                return Err(VhdxError::BatEntryOverlaps {
                    path: path.into(),
                    index: i,
                    offset,
                    what: what.clone(),
                }
                .into());
            }
            placed.push((offset, end_here, i));
            let whole = if is_bitmap {
                bat::BITMAP_BLOCK
            } else {
                layout.block_size
            };
            end = end.max(offset + whole);
        }
        placed.sort_unstable();
        if let Some(w) = placed.windows(2).find(|w| w[1].0 < w[0].1) {
            // Writing either block would overwrite the other.
            return Err(VhdxError::BatEntryOverlaps {
                path: path.into(),
                index: w[1].2,
                offset: w[1].0,
                what: format!("the block of BAT entry {}", w[0].2),
            }
            .into());
        }
        Ok(end)
    }

    pub fn file_path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &dyn BackingFile {
        self.file.as_ref()
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn creator(&self) -> &str {
        &self.creator
    }

    pub fn regions(&self) -> &RegionTable {
        &self.regions
    }

    /// The current header (as this session last wrote or read it).
    pub fn header(&self) -> Result<Header> {
        Ok(self
            .session
            .lock()
            .map_err(|_| self.lock_err())?
            .header
            .clone())
    }

    /// What the log held when the file was opened, if it needed replay.
    pub fn log_found(&self) -> Option<&LogState> {
        self.log_found.as_ref()
    }

    pub fn disk_type(&self) -> VhdxType {
        if self.metadata.has_parent {
            VhdxType::Differencing
        } else if self.metadata.leave_blocks_allocated {
            VhdxType::Fixed
        } else {
            VhdxType::Dynamic
        }
    }

    pub fn is_differencing(&self) -> bool {
        self.metadata.has_parent
    }

    pub(crate) fn set_parent(&mut self, parent: Box<dyn Disk>, path: PathBuf) {
        self.parent = Some(parent);
        self.parent_path = Some(path);
    }

    /// Bytes of blocks and bitmaps this file holds.
    pub fn allocated_bytes(&self) -> u64 {
        let Ok(st) = self.state.read() else { return 0 };
        let cr = self.layout.chunk_ratio();
        st.bat
            .iter()
            .enumerate()
            .map(|(i, &raw)| {
                let e = BatEntry::parse(raw);
                if i as u64 % (cr + 1) == cr {
                    if e.state == bat::SB_BLOCK_PRESENT {
                        bat::BITMAP_BLOCK
                    } else {
                        0
                    }
                } else if matches!(
                    e.state,
                    bat::PAYLOAD_BLOCK_FULLY_PRESENT | bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT
                ) {
                    self.layout.block_size
                } else {
                    0
                }
            })
            .sum()
    }

    /// The index past the last payload block that is not NOT_PRESENT, i.e.
    /// how many blocks a shrink must keep.
    pub fn used_blocks(&self) -> Result<u64> {
        let st = self.state.read().map_err(|_| self.lock_err())?;
        let mut used = 0;
        for b in 0..self.layout.payload_blocks() {
            let e = self.entry(&st, b);
            if e.state != bat::PAYLOAD_BLOCK_NOT_PRESENT && e.state != bat::PAYLOAD_BLOCK_ZERO {
                used = b + 1;
            }
        }
        Ok(used)
    }

    pub(super) fn lock_err(&self) -> Error {
        invalid(
            &self.path,
            "internal metadata lock poisoned by an earlier failure; reopen the disk",
        )
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
            .map_err(io_error(&self.path))?;
        // After the write: a sync running meanwhile may not cover it, so the
        // next one must not be skipped.
        self.unsynced.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes every write so far durable (fdatasync), unless none came since
    /// the last sync.
    pub(super) fn sync(&self) -> Result<()> {
        if !self.unsynced.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.file.flush().map_err(|e| {
            self.unsynced.store(true, Ordering::Release);
            io_error(&self.path)(e)
        })
    }

    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_at(buf, offset).map_err(io_error(&self.path))
    }

    /// Reads metadata bytes as the log says they are (in-memory replay).
    pub(super) fn read_meta(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = self.state.read().map_err(|_| self.lock_err())?.file_len;
        read_padded(self.file.as_ref(), &self.path, buf, offset, len)?;
        patch(&self.overlay, buf, offset);
        Ok(())
    }

    fn entry(&self, st: &State, block: u64) -> BatEntry {
        let i = self.layout.payload_index(block) as usize;
        BatEntry::parse(st.bat.get(i).copied().unwrap_or(0))
    }

    pub(super) fn set_entry(&self, st: &mut State, index: u64, e: BatEntry) {
        if let Some(slot) = st.bat.get_mut(index as usize) {
            *slot = e.raw();
            st.dirty.insert(Page::Bat(index * 8 / PAGE));
        }
    }

    /// Before the first change of a session, both headers get a new
    /// FileWriteGuid and LogGuid; before the first change of what the disk
    /// reads (`data`), a new DataWriteGuid (MS-VHDX 2.2.2, 2.2.2.1). A
    /// metadata-only change (a new parent locator) keeps the DataWriteGuid, so
    /// the disk's own children stay linked.
    pub(super) fn begin_session(&self, data: bool) -> Result<()> {
        let done = if data {
            &self.data_changed
        } else {
            &self.started
        };
        if done.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut s = self.session.lock().map_err(|_| self.lock_err())?;
        self.begin_session_locked(&mut s, data)
    }

    /// [`Self::begin_session`] with the session already locked.
    fn begin_session_locked(&self, s: &mut Session, data: bool) -> Result<()> {
        if s.started && (s.data_changed || !data) {
            return Ok(());
        }
        let mut h = s.header.clone();
        if !s.started {
            h.file_write_guid = new_guid();
        }
        if data {
            let planned = self
                .planned_data_write_guid
                .lock()
                .map_err(|_| self.lock_err())?
                .take();
            h.data_write_guid = planned.unwrap_or_else(new_guid);
        }
        write_headers(self.file.as_ref(), &self.path, s, h)?;
        s.started = true;
        s.data_changed |= data;
        self.started.store(true, Ordering::Release);
        self.data_changed.store(s.data_changed, Ordering::Release);
        Ok(())
    }

    /// Makes the next change of content take `guid` as DataWriteGuid.
    pub(crate) fn plan_data_write_guid(&self, guid: Uuid) -> Result<()> {
        *self
            .planned_data_write_guid
            .lock()
            .map_err(|_| self.lock_err())? = Some(guid);
        Ok(())
    }

    /// Marks the session closed (headers already say so).
    pub(super) fn end_session(&self, s: &mut Session) {
        s.started = false;
        s.data_changed = false;
        self.started.store(false, Ordering::Release);
        self.data_changed.store(false, Ordering::Release);
    }

    /// Chunk `chunk`'s sector bitmap, read into the cache when it is not
    /// there. Read under the lock: a copy read outside it could be older
    /// than bits a flush wrote after the read, once the cached copy holding
    /// them was dropped.
    fn cached_bitmap<'a>(&self, st: &'a mut State, chunk: u64) -> Result<&'a mut Vec<u8>> {
        if !st.bitmaps.contains_key(&chunk) {
            let i = self.layout.bitmap_index(chunk) as usize;
            let e = BatEntry::parse(st.bat.get(i).copied().unwrap_or(0));
            let mut b = vec![0u8; bat::BITMAP_BLOCK as usize];
            if e.state == bat::SB_BLOCK_PRESENT {
                self.read_meta_locked(st, &mut b, e.offset())?;
            }
            st.bitmaps.insert(chunk, b);
            st.trim_bitmaps(Some(chunk));
        }
        // Cached: it was there or was inserted above, and trimming keeps it.
        Ok(st.bitmaps.entry(chunk).or_default())
    }

    /// Runs `f` on chunk `chunk`'s sector bitmap (under the read lock when it
    /// is cached, else loading it under the write lock).
    fn with_bitmap<R>(&self, chunk: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        {
            let st = self.state.read().map_err(|_| self.lock_err())?;
            if let Some(bm) = st.bitmaps.get(&chunk) {
                return Ok(f(bm));
            }
        }
        let mut st = self.state.write().map_err(|_| self.lock_err())?;
        Ok(f(self.cached_bitmap(&mut st, chunk)?))
    }

    /// How many sector bitmaps are cached.
    #[cfg(test)]
    fn cached_bitmaps(&self) -> usize {
        self.state.read().map(|st| st.bitmaps.len()).unwrap_or(0)
    }

    /// Caps the bitmap cache at `entries` bitmaps (tests use a small cap).
    #[cfg(test)]
    fn set_bitmap_limit(&self, entries: usize) {
        if let Ok(mut st) = self.state.write() {
            st.bitmap_limit = entries.max(2);
        }
    }

    /// Bit index (in its chunk's bitmap) of the first sector of `block`.
    fn bitmap_base(&self, block: u64) -> (u64, u64) {
        let cr = self.layout.chunk_ratio();
        (block / cr, (block % cr) * self.layout.sectors_per_block())
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

    /// For a partially present block: runs of sectors present here or not,
    /// from `in_block`, covering `len` bytes: (present, bytes).
    fn partial_runs(&self, block: u64, in_block: u64, len: u64) -> Result<Vec<(bool, u64)>> {
        let (chunk, base) = self.bitmap_base(block);
        let ss = self.layout.logical_sector_size;
        self.with_bitmap(chunk, |bm| {
            let mut runs: Vec<(bool, u64)> = Vec::new();
            let mut pos = in_block;
            let end = in_block + len;
            while pos < end {
                let present = bat::bit(bm, base + pos / ss);
                let next = ((pos / ss + 1) * ss).min(end);
                let n = next - pos;
                match runs.last_mut() {
                    Some((p, l)) if *p == present => *l += n,
                    _ => runs.push((present, n)),
                }
                pos = next;
            }
            runs
        })
    }

    /// Where the disk's byte `off` lies in the file and how many of the `len`
    /// bytes from it can be read there in one request: up to the end of its
    /// block, and on through the blocks after it while each is fully present
    /// and starts where the one before it ends in the file (a sequential
    /// writer's blocks do). `None` when `off`'s block is not fully present.
    fn present_run(&self, off: u64, len: u64) -> Result<Option<(u64, u64)>> {
        let bs = self.layout.block_size;
        let st = self.state.read().map_err(|_| self.lock_err())?;
        let mut block = off / bs;
        let e = self.entry(&st, block);
        if e.state != bat::PAYLOAD_BLOCK_FULLY_PRESENT {
            return Ok(None);
        }
        let at = e.offset() + off % bs;
        let mut n = (bs - off % bs).min(len);
        let mut next_at = e.offset() + bs;
        while n < len {
            block += 1;
            let e = self.entry(&st, block);
            if e.state != bat::PAYLOAD_BLOCK_FULLY_PRESENT || e.offset() != next_at {
                break;
            }
            n = (n + bs).min(len);
            next_at += bs;
        }
        Ok(Some((at, n)))
    }

    fn read_in_block(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let block = offset / self.layout.block_size;
        let in_block = offset % self.layout.block_size;
        let e = {
            let st = self.state.read().map_err(|_| self.lock_err())?;
            self.entry(&st, block)
        };
        match e.state {
            bat::PAYLOAD_BLOCK_FULLY_PRESENT => self.read_data(buf, e.offset() + in_block),
            bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                let mut pos = 0usize;
                for (present, n) in self.partial_runs(block, in_block, buf.len() as u64)? {
                    let piece = &mut buf[pos..pos + n as usize];
                    let at = in_block + pos as u64;
                    if present {
                        self.read_data(piece, e.offset() + at)?;
                    } else {
                        self.read_below(piece, offset + pos as u64)?;
                    }
                    pos += n as usize;
                }
                Ok(())
            }
            bat::PAYLOAD_BLOCK_NOT_PRESENT | bat::PAYLOAD_BLOCK_UNDEFINED
                if self.is_differencing() =>
            {
                self.read_below(buf, offset)
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Places a new block (or bitmap) of `size` bytes past everything the file
    /// holds; the file is extended so it reads as zeros.
    fn allocate(&self, st: &mut State, size: u64) -> Result<u64> {
        let at = st.end;
        let end = at
            .checked_add(size)
            .filter(|&e| e >> 20 < 1 << 44)
            .ok_or_else(|| {
                invalid(
                    &self.path,
                    "the file cannot grow past what a BAT entry addresses",
                )
            })?;
        if end > st.file_len {
            self.file.set_len(end).map_err(io_error(&self.path))?;
            self.unsynced.store(true, Ordering::Release);
            st.file_len = end;
        }
        st.end = end;
        Ok(at)
    }

    /// The block's entry for writing: allocates it if it has no data here.
    /// A new block of a differencing disk over a parent's data starts
    /// partially present with no sector marked, so it reads from the parent
    /// until written data is marked; any other new block is fully present
    /// (fresh space reads as zeros, which is what it held).
    fn entry_for_write(&self, block: u64) -> Result<BatEntry> {
        {
            let st = self.state.read().map_err(|_| self.lock_err())?;
            let e = self.entry(&st, block);
            if matches!(
                e.state,
                bat::PAYLOAD_BLOCK_FULLY_PRESENT | bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT
            ) {
                return Ok(e);
            }
        }
        let mut st = self.state.write().map_err(|_| self.lock_err())?;
        let e = self.entry(&st, block);
        if matches!(
            e.state,
            bat::PAYLOAD_BLOCK_FULLY_PRESENT | bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT
        ) {
            return Ok(e);
        }
        let from_parent = self.is_differencing()
            && matches!(
                e.state,
                bat::PAYLOAD_BLOCK_NOT_PRESENT | bat::PAYLOAD_BLOCK_UNDEFINED
            );
        if from_parent {
            let (chunk, _) = self.bitmap_base(block);
            let sb_index = self.layout.bitmap_index(chunk);
            let sb = BatEntry::parse(st.bat.get(sb_index as usize).copied().unwrap_or(0));
            if sb.state != bat::SB_BLOCK_PRESENT {
                let at = self.allocate(&mut st, bat::BITMAP_BLOCK)?;
                self.set_entry(&mut st, sb_index, BatEntry::new(bat::SB_BLOCK_PRESENT, at));
                st.bitmaps
                    .insert(chunk, vec![0u8; bat::BITMAP_BLOCK as usize]);
                st.trim_bitmaps(Some(chunk));
            }
        }
        let at = self.allocate(&mut st, self.layout.block_size)?;
        let state = if from_parent {
            bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT
        } else {
            bat::PAYLOAD_BLOCK_FULLY_PRESENT
        };
        let new = BatEntry::new(state, at);
        self.set_entry(&mut st, self.layout.payload_index(block), new);
        Ok(new)
    }

    /// After data is written into a partially present block, marks its
    /// sectors present; a whole-block write makes the block fully present.
    fn mark_present(&self, block: u64, in_block: u64, len: u64) -> Result<()> {
        let (chunk, base) = self.bitmap_base(block);
        let ss = self.layout.logical_sector_size;
        let whole = in_block == 0 && len == self.layout.block_size;
        let mut st = self.state.write().map_err(|_| self.lock_err())?;
        let e = self.entry(&st, block);
        if e.state != bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT {
            return Ok(());
        }
        if whole {
            let i = self.layout.payload_index(block);
            self.set_entry(
                &mut st,
                i,
                BatEntry::new(bat::PAYLOAD_BLOCK_FULLY_PRESENT, e.offset()),
            );
            return Ok(());
        }
        let first = base + in_block / ss;
        let count = (in_block + len).div_ceil(ss) - in_block / ss;
        let bm = self.cached_bitmap(&mut st, chunk)?;
        if (first..first + count).all(|i| bat::bit(bm, i)) {
            return Ok(());
        }
        bat::set_bits(bm, first, count);
        let bits_per_page = PAGE * 8;
        for page in first / bits_per_page..=(first + count - 1) / bits_per_page {
            st.dirty.insert(Page::Bitmap { chunk, page });
        }
        Ok(())
    }

    fn write_in_block(&self, buf: &[u8], offset: u64) -> Result<()> {
        let block = offset / self.layout.block_size;
        let in_block = offset % self.layout.block_size;
        let ss = self.layout.logical_sector_size;
        if self.is_differencing()
            && (!in_block.is_multiple_of(ss) || !(buf.len() as u64).is_multiple_of(ss))
        {
            // Whole sectors only: a sector is present here or not at all.
            let lo = offset / ss * ss;
            let hi = (offset + buf.len() as u64).div_ceil(ss) * ss;
            let mut whole = vec![0u8; (hi - lo) as usize];
            self.read_at(&mut whole[..ss as usize], lo)?;
            let tail = whole.len() - ss as usize;
            if tail > 0 {
                self.read_at(&mut whole[tail..], hi - ss)?;
            }
            let at = (offset - lo) as usize;
            whole[at..at + buf.len()].copy_from_slice(buf);
            return self.write_in_block(&whole, lo);
        }
        let e = self.entry_for_write(block)?;
        self.write_file(buf, e.offset() + in_block)?;
        if e.state == bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT {
            self.mark_present(block, in_block, buf.len() as u64)?;
        }
        Ok(())
    }

    /// Makes a whole block read as zeros without writing its data: the ZERO
    /// state, or in a differencing disk a fresh fully present block (fresh
    /// space reads as zeros). MS-VHDX defines ZERO to read as zeros in any
    /// disk, but libvhdi reads a differencing disk's ZERO blocks from the
    /// parent, and a discard must never expose the parent's data.
    fn zero_block(&self, block: u64) -> Result<()> {
        let mut st = self.state.write().map_err(|_| self.lock_err())?;
        let i = self.layout.payload_index(block);
        if self.is_differencing() {
            let at = self.allocate(&mut st, self.layout.block_size)?;
            self.set_entry(
                &mut st,
                i,
                BatEntry::new(bat::PAYLOAD_BLOCK_FULLY_PRESENT, at),
            );
        } else if self.entry(&st, block).state != bat::PAYLOAD_BLOCK_ZERO {
            self.set_entry(&mut st, i, BatEntry::new(bat::PAYLOAD_BLOCK_ZERO, 0));
        }
        Ok(())
    }

    /// The dirty metadata pages with their contents, taken from the cache.
    fn take_dirty(&self) -> Result<Dirty> {
        let mut st = self.state.write().map_err(|_| self.lock_err())?;
        let pages: Vec<Page> = std::mem::take(&mut st.dirty).into_iter().collect();
        let cap = u64::from(self.bat_region.length);
        let mut out = Vec::with_capacity(pages.len());
        for &p in &pages {
            match p {
                Page::Bat(n) => {
                    let at = n * PAGE;
                    if at >= cap {
                        continue;
                    }
                    let mut bytes = vec![0u8; PAGE as usize];
                    let first = (at / 8) as usize;
                    let last = (first + (PAGE / 8) as usize).min(st.bat.len());
                    let ser = bat::serialize(&st.bat[first..last]);
                    bytes[..ser.len()].copy_from_slice(&ser);
                    if ser.len() < PAGE as usize {
                        // Entries we do not track keep what the file holds.
                        let mut old = vec![0u8; PAGE as usize - ser.len()];
                        self.read_meta_locked(
                            &st,
                            &mut old,
                            self.bat_region.file_offset + at + ser.len() as u64,
                        )?;
                        bytes[ser.len()..].copy_from_slice(&old);
                    }
                    out.push((self.bat_region.file_offset + at, bytes));
                }
                Page::Bitmap { chunk, page } => {
                    let i = self.layout.bitmap_index(chunk) as usize;
                    let sb = BatEntry::parse(st.bat.get(i).copied().unwrap_or(0));
                    st.flushing.insert(chunk);
                    if let (bat::SB_BLOCK_PRESENT, Some(bm)) = (sb.state, st.bitmaps.get(&chunk)) {
                        let lo = (page * PAGE) as usize;
                        out.push((
                            sb.offset() + page * PAGE,
                            bm[lo..lo + PAGE as usize].to_vec(),
                        ));
                    }
                }
            }
        }
        Ok((pages, out, st.file_len, st.end))
    }

    fn read_meta_locked(&self, st: &State, buf: &mut [u8], offset: u64) -> Result<()> {
        read_padded(self.file.as_ref(), &self.path, buf, offset, st.file_len)?;
        patch(&self.overlay, buf, offset);
        Ok(())
    }

    /// Writes 4 KiB-aligned metadata pages through the log: entries (each
    /// small enough for the log), flush, apply, flush.
    pub(super) fn log_pages(
        &self,
        s: &mut Session,
        pages: &[(u64, Vec<u8>)],
        file_len: u64,
        end: u64,
    ) -> Result<()> {
        let log_len = u64::from(s.header.log_length);
        let mut per_entry = 1usize;
        while (LogEntry::length_for(per_entry + 1) as u64) < log_len {
            per_entry += 1;
        }
        if (LogEntry::length_for(1) as u64) >= log_len {
            return Err(invalid(
                &self.path,
                format!("the log ({log_len} bytes) is too small to write to"),
            ));
        }
        for group in pages.chunks(per_entry) {
            let len = LogEntry::length_for(group.len()) as u64;
            let first = s.header.log_guid.is_nil();
            if first {
                s.log_head = 0;
                s.log_seq = 1;
            }
            if s.log_head + len > log_len {
                s.log_head = 0;
            }
            let log_guid = if first { new_guid() } else { s.header.log_guid };
            let entry = LogEntry {
                sequence_number: s.log_seq,
                tail: s.log_head as u32,
                log_guid,
                flushed_file_offset: file_len / MIB * MIB,
                last_file_offset: end.max(file_len).div_ceil(MIB) * MIB,
                ops: group
                    .iter()
                    .map(|(offset, bytes)| LogOp::Data {
                        offset: *offset,
                        bytes: bytes.clone(),
                    })
                    .collect(),
            };
            self.write_file(&entry.serialize(), s.header.log_offset + s.log_head)?;
            self.sync()?;
            if first {
                // The header names the log only once an entry of it is
                // durable: a crash before leaves an empty log, never one the
                // header points at with nothing valid in it.
                let mut h = s.header.clone();
                h.log_guid = log_guid;
                write_headers(self.file.as_ref(), &self.path, s, h)?;
            }
            for (offset, bytes) in group {
                self.write_file(bytes, *offset)?;
            }
            self.sync()?;
            s.log_head += len;
            s.log_seq += 1;
        }
        Ok(())
    }

    /// Flushes: data first, then the metadata that refers to it, through the log.
    fn flush_inner(&self) -> Result<()> {
        let mut s = self.session.lock().map_err(|_| self.lock_err())?;
        self.flush_locked(&mut s)
    }

    /// [`Self::flush_inner`] with the session already locked.
    fn flush_locked(&self, s: &mut Session) -> Result<()> {
        if !s.started {
            // Metadata changed outside a session (an extent write committed
            // after a settle ended the session) still reaches the file: in a
            // new session, so the headers say the file is being changed.
            let pending = !self
                .state
                .read()
                .map_err(|_| self.lock_err())?
                .dirty
                .is_empty();
            if !pending {
                return Ok(());
            }
            self.begin_session_locked(s, true)?;
        }
        let (dirty, pages, file_len, end) = self.take_dirty()?;
        let result = self.sync().and_then(|()| {
            if pages.is_empty() {
                return Ok(());
            }
            self.log_pages(s, &pages, file_len, end)
        });
        if let Ok(mut st) = self.state.write() {
            if result.is_err() {
                // Not durable: write them again at the next flush (and keep
                // their bitmaps cached until then).
                st.dirty.extend(dirty);
            }
            st.flushing.clear();
            st.trim_bitmaps(None);
        }
        result
    }

    /// Rewrites the headers with an empty log, after a flush: the clean state
    /// other readers expect.
    fn close_session(&self) -> Result<()> {
        let mut s = self.session.lock().map_err(|_| self.lock_err())?;
        self.close_locked(&mut s)
    }

    /// [`Self::close_session`] with the session already locked.
    fn close_locked(&self, s: &mut Session) -> Result<()> {
        self.flush_locked(s)?;
        if !s.started {
            return Ok(());
        }
        let mut h = s.header.clone();
        h.log_guid = Uuid::nil();
        write_headers(self.file.as_ref(), &self.path, s, h)?;
        self.end_session(s);
        Ok(())
    }

    /// Flushes and leaves the file as a clean close would: every log entry
    /// applied and the headers naming no log, while the image stays open (the
    /// next change starts a new session with new write GUIDs). What a copy of
    /// the file taken now holds verifies and opens anywhere without a replay.
    /// Writes wait meanwhile (`write_gate`), so none can begin in a session
    /// that is being closed under it.
    fn settle_inner(&self) -> Result<()> {
        let _no_writes = self.write_gate.write().map_err(|_| self.lock_err())?;
        let mut s = self.session.lock().map_err(|_| self.lock_err())?;
        self.close_locked(&mut s)
    }

    /// Closes the image, reporting what a drop would swallow.
    pub fn close(self) -> Result<()> {
        let r = if self.read_only {
            Ok(())
        } else {
            self.close_session()
        };
        // Drop finds the session closed and does nothing more.
        drop(self);
        r
    }

    /// The allocation of the run at `off` within its block: (allocation, bytes).
    fn status_in_block(&self, off: u64, max: u64) -> Result<(Allocation, u64)> {
        let block = off / self.layout.block_size;
        let in_block = off % self.layout.block_size;
        let rest = (self.layout.block_size - in_block).min(max);
        let e = {
            let st = self.state.read().map_err(|_| self.lock_err())?;
            self.entry(&st, block)
        };
        Ok(match e.state {
            bat::PAYLOAD_BLOCK_FULLY_PRESENT => (Allocation::Data, rest),
            bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                let runs = self.partial_runs(block, in_block, rest)?;
                let (present, n) = runs.first().copied().unwrap_or((false, rest));
                (
                    if present {
                        Allocation::Data
                    } else {
                        Allocation::Unallocated
                    },
                    n,
                )
            }
            bat::PAYLOAD_BLOCK_NOT_PRESENT => (Allocation::Unallocated, rest),
            bat::PAYLOAD_BLOCK_UNDEFINED if self.is_differencing() => {
                (Allocation::Unallocated, rest)
            }
            _ => (Allocation::Zero, rest),
        })
    }
}

/// The header update procedure of MS-VHDX 2.2.2.1, done twice so both slots
/// hold the new header: each write goes to the non-current slot with the next
/// sequence number, and is flushed before the next.
pub(super) fn write_headers(
    file: &dyn BackingFile,
    path: &Path,
    s: &mut Session,
    mut h: Header,
) -> Result<()> {
    for _ in 0..2 {
        h.sequence_number = s.header.sequence_number.wrapping_add(1);
        let slot = 1 - s.slot;
        file.write_at(&h.serialize(), HEADER_OFFSETS[slot])
            .map_err(io_error(path))?;
        file.flush().map_err(io_error(path))?;
        s.header = h.clone();
        s.slot = slot;
    }
    Ok(())
}

impl Disk for VhdxImage {
    fn size(&self) -> u64 {
        self.metadata.virtual_disk_size
    }

    fn logical_sector_size(&self) -> u32 {
        self.metadata.logical_sector_size
    }

    fn physical_sector_size(&self) -> u32 {
        self.metadata.physical_sector_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(Some(&self.path), self.size(), offset, buf.len() as u64)?;
        let bs = self.layout.block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            if let Some((at, n)) = self.present_run(off, (buf.len() - pos) as u64)? {
                self.read_data(&mut buf[pos..pos + n as usize], at)?;
                pos += n as usize;
                continue;
            }
            let n = ((bs - off % bs) as usize).min(buf.len() - pos);
            self.read_in_block(&mut buf[pos..pos + n], off)?;
            pos += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let _gate = self.write_gate.read().map_err(|_| self.lock_err())?;
        check_range(Some(&self.path), self.size(), offset, buf.len() as u64)?;
        self.begin_session(true)?;
        let bs = self.layout.block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let n = ((bs - off % bs) as usize).min(buf.len() - pos);
            self.write_in_block(&buf[pos..pos + n], off)?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush_inner()
    }

    fn settle(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.settle_inner()
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let _gate = self.write_gate.read().map_err(|_| self.lock_err())?;
        check_range(Some(&self.path), self.size(), offset, len)?;
        self.begin_session(true)?;
        let bs = self.layout.block_size;
        let zeros = vec![0u8; bs.min(len).min(4 * MIB) as usize];
        let mut done = 0;
        while done < len {
            let off = offset + done;
            let n = (bs - off % bs).min(len - done);
            let block = off / bs;
            let whole = off.is_multiple_of(bs) && (n == bs || off + n == self.size());
            if whole && !self.metadata.leave_blocks_allocated {
                self.zero_block(block)?;
            } else {
                let mut pos = 0;
                while pos < n {
                    let (alloc, run) = self.status_in_block(off + pos, n - pos)?;
                    let needs = match alloc {
                        Allocation::Data => true,
                        Allocation::Zero => false,
                        Allocation::Unallocated => self.is_differencing(),
                    };
                    if needs {
                        let mut w = 0;
                        while w < run {
                            let m = (run - w).min(zeros.len() as u64);
                            self.write_in_block(&zeros[..m as usize], off + pos + w)?;
                            w += m;
                        }
                    }
                    pos += run;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(Some(&self.path), self.size(), offset, len)?;
        let (alloc, mut run) = self.status_in_block(offset, len)?;
        while run < len {
            let (a, r) = self.status_in_block(offset + run, len - run)?;
            if a != alloc {
                break;
            }
            run += r;
        }
        let ss = u64::from(self.metadata.logical_sector_size);
        Ok(BlockStatus {
            allocation: alloc,
            len: run.min(len).max(ss.min(len)),
        })
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    /// A fully present block's data is contiguous in the file, and so is a
    /// run of present sectors of a partially present one.
    fn data_extent(&self, offset: u64, len: u64) -> Result<Option<FileExtent>> {
        check_range(Some(&self.path), self.size(), offset, len)?;
        let ss = self.layout.logical_sector_size;
        if len == 0 || !offset.is_multiple_of(ss) {
            return Ok(None);
        }
        let block = offset / self.layout.block_size;
        let in_block = offset % self.layout.block_size;
        let mut run = (self.layout.block_size - in_block).min(len);
        let e = {
            let st = self.state.read().map_err(|_| self.lock_err())?;
            self.entry(&st, block)
        };
        match e.state {
            bat::PAYLOAD_BLOCK_FULLY_PRESENT => {}
            bat::PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                match self.partial_runs(block, in_block, run)?.first() {
                    Some(&(true, n)) => run = run.min(n),
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        }
        Ok(Some(FileExtent {
            file: self.file.clone(),
            offset: e.offset() + in_block,
            len: run,
        }))
    }

    /// Starts the session and allocates the block as [`Disk::write_at`] does;
    /// the run ends at the block's end.
    fn prepare_extent_write(&self, offset: u64, len: u64) -> Result<Option<FileExtent>> {
        self.check_writable()?;
        let _gate = self.write_gate.read().map_err(|_| self.lock_err())?;
        check_range(Some(&self.path), self.size(), offset, len)?;
        let ss = self.layout.logical_sector_size;
        let in_block = offset % self.layout.block_size;
        let run = (self.layout.block_size - in_block).min(len);
        if run == 0 || !offset.is_multiple_of(ss) || !run.is_multiple_of(ss) {
            return Ok(None);
        }
        self.begin_session(true)?;
        let e = self.entry_for_write(offset / self.layout.block_size)?;
        Ok(Some(FileExtent {
            file: self.file.clone(),
            offset: e.offset() + in_block,
            len: run,
        }))
    }

    /// Marks the sectors of partially present blocks present, as after a
    /// write's data.
    fn commit_extent_write(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let _gate = self.write_gate.read().map_err(|_| self.lock_err())?;
        // The caller wrote the data through the extent, not `write_file`: the
        // next flush must sync it before the metadata that points at it.
        self.unsynced.store(true, Ordering::Release);
        check_range(Some(&self.path), self.size(), offset, len)?;
        let bs = self.layout.block_size;
        let mut pos = offset;
        while pos < offset + len {
            let n = (bs - pos % bs).min(offset + len - pos);
            self.mark_present(pos / bs, pos % bs, n)?;
            pos += n;
        }
        Ok(())
    }
}

impl Drop for VhdxImage {
    fn drop(&mut self) {
        if !self.read_only {
            // Best effort: a clean close persists the metadata and empties the
            // log; errors were reported to whoever flushed last.
            let _ = self.close_session();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::open_chain;
    use super::super::create::{create, NewVhdx, VhdxOptions};
    use super::*;
    use crate::NoProgress;

    /// With 512-byte sectors one sector bitmap covers 4 GiB of the disk.
    const CHUNK: u64 = 4 << 30;
    const CHUNKS: u64 = 6;
    const SPAN: usize = 64 << 10;

    fn new_vhdx(path: &Path, kind: NewVhdx) {
        let mut opts = VhdxOptions::new(kind);
        opts.block_size = Some(MIB as u32);
        opts.logical_sector_size = 512;
        create(path, &opts, &mut NoProgress).unwrap();
    }

    fn byte(chunk: u64, pass: u64, i: usize) -> u8 {
        (chunk * 31 + pass * 7 + i as u64 / 512) as u8 | 1
    }

    fn check(disk: &dyn Disk, model: &[Vec<u8>]) {
        for (c, want) in model.iter().enumerate() {
            let mut got = vec![0u8; SPAN];
            disk.read_at(&mut got, c as u64 * CHUNK).unwrap();
            assert!(got == *want, "chunk {c} reads other bytes");
        }
    }

    #[test]
    fn a_bitmap_cache_smaller_than_the_bitmaps_touched_keeps_every_partial_write() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("p.vhdx");
        let child = dir.path().join("c.avhdx");
        new_vhdx(
            &parent,
            NewVhdx::Dynamic {
                size: CHUNK * CHUNKS,
            },
        );
        // The parent's data at the start of every chunk, which the child's
        // unmarked sectors must keep showing.
        let mut model: Vec<Vec<u8>> = (0..CHUNKS)
            .map(|c| (0..SPAN).map(|i| (c as u8) << 4 | (i % 13) as u8).collect())
            .collect();
        {
            let p = open_chain(&parent, false).unwrap();
            for (c, data) in model.iter().enumerate() {
                p.write_at(data, c as u64 * CHUNK).unwrap();
            }
            p.close().unwrap();
        }
        new_vhdx(
            &child,
            NewVhdx::Differencing {
                parent: parent.clone(),
            },
        );
        let img = open_chain(&child, false).unwrap();
        img.set_bitmap_limit(2);
        // Two sectors in every chunk per pass, flushes between: clean bitmaps
        // are dropped and read back while others are being marked.
        for pass in 0..3u64 {
            for (c, m) in model.iter_mut().enumerate() {
                let at = (pass * 3 * 512) as usize;
                let data: Vec<u8> = (0..1024).map(|i| byte(c as u64, pass, i)).collect();
                img.write_at(&data, c as u64 * CHUNK + at as u64).unwrap();
                m[at..at + 1024].copy_from_slice(&data);
            }
            img.flush().unwrap();
            assert!(img.cached_bitmaps() <= 2, "{} cached", img.cached_bitmaps());
            check(&img, &model);
            assert!(img.cached_bitmaps() <= 2, "{} cached", img.cached_bitmaps());
        }
        img.close().unwrap();
        let img = open_chain(&child, true).unwrap();
        img.set_bitmap_limit(2);
        check(&img, &model);
        assert!(img.cached_bitmaps() <= 2, "{} cached", img.cached_bitmaps());
        // The default cap holds them all here.
        let img = open_chain(&child, true).unwrap();
        check(&img, &model);
        assert_eq!(img.cached_bitmaps(), CHUNKS as usize);
    }
}
