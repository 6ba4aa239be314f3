//! The VHDX format (MS-VHDX): fixed, dynamic and differencing disks, with the log.
//!
//! Wire formats are plain types with pure `parse(&[u8])`/`serialize` functions,
//! each in its own module and tested on its own (fuzz targets call them
//! directly): [`header`] (file identifier and the two headers), [`region`]
//! (region table), [`metadata`] (metadata table, known items, parent locator),
//! [`bat`] (BAT entries, chunk ratio, sector bitmaps) and [`log`] (log entries
//! and the search for the active sequence). [`image`] does I/O with them,
//! [`chain`] finds parents, [`create`] makes new files and [`maintain`] makes
//! structural changes (resize, new parent, merged identity).
//!
//! # Write ordering (crash safety)
//!
//! All file I/O goes through [`crate::backing`], so the crash harness can cut it
//! off after any step (`tests/vhdx_crash.rs`).
//!
//! 1. **Header**: before the first change of a session, both headers are
//!    rewritten (the non-current one first, each flushed) with a new
//!    FileWriteGuid, and before the first change of what the disk reads, a new
//!    DataWriteGuid, as MS-VHDX 2.2.2.1 asks. The LogGuid is set when the
//!    session's first log entry (which carries it) is durable, so a crash
//!    never leaves a header naming a log with no valid entry. (The log is
//!    empty, LogGuid zero, whenever a session starts: an open replays it.)
//! 2. **Data**: payload writes go straight to their blocks. A new block is
//!    placed past everything the file holds (1 MiB aligned), so it reads as
//!    zeros until written; its BAT entry (and for a differencing disk the
//!    sector bitmap bits) change in memory only. A merge copying data in
//!    from another file (`Disk::prepare_extent_write`, the copy,
//!    `Disk::commit_extent_write`) takes exactly these steps too.
//! 3. **Metadata**: `flush` syncs the file (data and its length become
//!    durable), then writes every dirty 4 KiB page of BAT and sector bitmaps
//!    as one log entry, syncs, (the first time: headers name the log,)
//!    applies the pages in place, syncs. One flush
//!    carries any number of BAT changes: an allocating write costs no flush of
//!    its own. A crash before the log entry is durable loses only unflushed
//!    allocations (their space is leaked, `compact` reclaims it); after it, the
//!    entry is replayed on the next open. A sync with nothing written since
//!    the last one (the close after a flush) is skipped; data copied in
//!    through an extent counts as written when it is committed.
//! 4. **Close**: a clean close rewrites the headers with LogGuid zero, so other
//!    readers see an empty log.
//!
//! Opening a file with a log to replay replays it in place (writable open) or in
//! memory (read-only open), never reading metadata past the log.

pub mod bat;
pub mod chain;
pub mod crc;
pub mod create;
pub mod header;
pub mod image;
pub mod log;
pub mod maintain;
pub mod metadata;
pub mod region;

use std::path::PathBuf;

pub use image::VhdxImage;

/// 1 MiB: the alignment of every VHDX structure.
pub const MIB: u64 = 1 << 20;
/// 4 KiB: the unit of the log.
pub const LOG_SECTOR: usize = 4096;

/// A fault in one on-disk structure, found by a pure parser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("{what}: bad signature {found:?} (expected {expected:?})")]
    Signature {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("{what}: CRC-32C mismatch, stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{what}: {bytes} bytes is too short")]
    Short { what: &'static str, bytes: usize },
    #[error("{what}: {detail}")]
    Field { what: &'static str, detail: String },
}

pub(crate) fn field(what: &'static str, detail: impl Into<String>) -> Fault {
    Fault::Field {
        what,
        detail: detail.into(),
    }
}

pub(crate) fn need(what: &'static str, b: &[u8], len: usize) -> Result<(), Fault> {
    if b.len() < len {
        return Err(Fault::Short {
            what,
            bytes: b.len(),
        });
    }
    Ok(())
}

pub(crate) fn signature(what: &'static str, b: &[u8], expected: &[u8]) -> Result<(), Fault> {
    let found = &b[..expected.len()];
    if found != expected {
        return Err(Fault::Signature {
            what,
            expected: String::from_utf8_lossy(expected).into_owned(),
            found: String::from_utf8_lossy(found).into_owned(),
        });
    }
    Ok(())
}

/// Little-endian readers over a slice the caller has checked is long enough.
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}
/// A GUID stored in its binary (Windows, mixed-endian) form.
pub(crate) fn guid_at(b: &[u8], at: usize) -> uuid::Uuid {
    let mut x = [0u8; 16];
    x.copy_from_slice(&b[at..at + 16]);
    uuid::Uuid::from_bytes_le(x)
}
pub(crate) fn put_guid(b: &mut [u8], at: usize, g: &uuid::Uuid) {
    b[at..at + 16].copy_from_slice(&g.to_bytes_le());
}

/// A GUID as text, `{...}` lowercase as the parent locator stores it.
pub fn braced(g: &uuid::Uuid) -> String {
    format!("{{{}}}", g.hyphenated())
}

/// Faults specific to VHDX files. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not a VHDX file: {fault}")]
    NotVhdx { path: PathBuf, fault: Fault },

    #[error("{path}: neither VHDX header is valid (header 1 at 64 KiB: {first}; header 2 at 128 KiB: {second}); the file is corrupt")]
    NoValidHeader {
        path: PathBuf,
        first: Box<Fault>,
        second: Box<Fault>,
    },

    #[error("{path}: neither copy of the VHDX region table is valid (at 192 KiB: {first}; at 256 KiB: {second})")]
    NoValidRegionTable {
        path: PathBuf,
        first: Box<Fault>,
        second: Box<Fault>,
    },

    #[error("{path} has a required region {guid} that this version does not know; opening it could corrupt it, so it is refused")]
    UnknownRequiredRegion { path: PathBuf, guid: String },

    #[error("{path} has a required metadata item {guid} that this version does not know; opening it could misread it, so it is refused")]
    UnknownRequiredMetadata { path: PathBuf, guid: String },

    #[error("{path}: {fault}")]
    Structure { path: PathBuf, fault: Fault },

    #[error("{path}: BAT entry {index} places a block at byte {offset}, past the end of the file ({end} bytes)")]
    BatEntryPastEnd {
        path: PathBuf,
        index: u64,
        offset: u64,
        end: u64,
    },

    #[error("{path}: BAT entry {index} places a block at byte {offset}, over the {what}; the file is corrupt")]
    BatEntryOverlaps {
        path: PathBuf,
        index: u64,
        offset: u64,
        what: String,
    },

    #[error("{path}: the log needs replay (LogGuid {log_guid}) but holds no valid, complete log sequence; the file is corrupt")]
    LogNoValidSequence { path: PathBuf, log_guid: String },

    #[error("{path} is {len} bytes, shorter than the {flushed} bytes its log says were durable (FlushedFileOffset): the file was truncated")]
    LogFileTruncated {
        path: PathBuf,
        len: u64,
        flushed: u64,
    },

    #[error("{path} is truncated: {what}")]
    Truncated { path: PathBuf, what: String },

    #[error("parent of {child} not found; tried {}", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    ParentNotFound { child: PathBuf, tried: Vec<PathBuf> },

    #[error("parent {parent} of {child} has DataWriteGuid {found}, but the child's parent_linkage is {expected}: the parent was written to or replaced after the child was made; use 'viridian vhd set-parent' to re-point it if you are sure the content is the same")]
    ParentLinkageMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },

    #[error("differencing chain of {child} loops back to {repeated}")]
    ParentLoop { child: PathBuf, repeated: PathBuf },

    #[error("{child} has {child_size}-byte logical sectors but its parent {parent} has {parent_size}-byte ones; a child and its parent must have the same logical sector size")]
    SectorSizeMismatch {
        child: PathBuf,
        parent: PathBuf,
        child_size: u32,
        parent_size: u32,
    },

    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}
