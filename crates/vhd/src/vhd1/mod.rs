//! The VHD (v1) format: fixed, dynamic and differencing disks.
//!
//! Wire formats (`footer`, `header`) are plain types with `parse`/`serialize`;
//! `image` does I/O with them; `chain` finds and opens parents; `create` makes
//! new files.
//!
//! # Write ordering (crash safety)
//!
//! All file I/O goes through [`crate::backing`], so the crash harness
//! ([`crate::crash`]) can cut it off after any step; `tests/crash.rs` does so
//! at every step of create, allocating writes, merge and compact.
//!
//! A sparse (dynamic or differencing) image changes in this order:
//! 1. **data**: allocating a block first writes a new footer past the block's
//!    end (the file always ends in a valid footer), then the block's bitmap
//!    (dynamic: all sectors present, since fresh data reads as zeros anyway;
//!    differencing: none present, so the block still reads from the parent),
//!    then the data. The BAT entry changes in memory only. A merge copying
//!    data in from another file (`Disk::prepare_extent_write`, the copy,
//!    `Disk::commit_extent_write`) takes exactly these steps too.
//! 2. **bitmap**: after a write to a differencing block completes, its sectors
//!    are marked present in the cached bitmap (a whole-block write just marks
//!    the block full: no read-modify-write). Nothing is synced per write.
//! 3. **BAT**: `flush` takes the dirty bitmaps and BAT sectors from the cache,
//!    syncs the file (all data, footers and new bitmaps become durable), writes
//!    the bitmaps and BAT sectors, and syncs again. Flushes are serialized;
//!    I/O carries on during the syncs.
//! 4. **footer**: the copy at offset 0 changes only on resize and repair,
//!    after the trailing footer is durable.
//!
//! So whatever subset of unflushed writes reaches the disk, a BAT entry or
//! bitmap bit in the file never points at data that is not durable: after a
//! crash at any point the file opens and checks clean, every write flushed
//! before the crash reads back intact, and every other sector reads as its old
//! or its new contents. A BAT entry written by a concurrent flush before the
//! block's first data write finished is harmless: the block's bitmap in the
//! file is the one from step 1. Space of blocks allocated but not flushed
//! before a crash is leaked (the file ends after them), never reused while
//! referenced; `compact` reclaims it. If the trailing footer is ever lost, the
//! copy at offset 0 is used and `check --repair` rewrites it.
//!
//! New files (`create`, the copy `compact` makes) are built under a temporary
//! name, flushed, and only then linked or renamed into place.

pub mod bat;
pub mod chain;
pub mod create;
pub mod footer;
pub mod header;
pub mod image;
mod maintain;

use std::path::PathBuf;

pub use footer::{DiskType, Footer, Geometry};
pub use header::DynamicHeader;
pub use image::VhdImage;

/// One's-complement of the byte sum of `b`, skipping the 4-byte checksum field at
/// `skip`.
pub(crate) fn checksum(b: &[u8], skip: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |acc, (_, &x)| acc.wrapping_add(u32::from(x)));
    !sum
}

/// Faults specific to VHD files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not a usable VHD: {fault}")]
    Footer {
        path: PathBuf,
        fault: footer::FooterFault,
    },

    #[error("{path}: {fault}")]
    Header {
        path: PathBuf,
        fault: header::HeaderFault,
    },

    #[error("{path} is truncated: {what}")]
    Truncated { path: PathBuf, what: String },

    #[error("{path}: BAT entry {block} points at sector {sector}, past the end of the file's data ({end} bytes)")]
    BatEntryPastEnd {
        path: PathBuf,
        block: u32,
        sector: u32,
        end: u64,
    },

    #[error("{path}: blocks {first} and {second} overlap in the file")]
    OverlappingBlocks {
        path: PathBuf,
        first: u32,
        second: u32,
    },

    #[error("{path}: the BAT has {entries} entries, too few for a {size}-byte disk with {block_size}-byte blocks")]
    BatTooSmall {
        path: PathBuf,
        entries: u32,
        size: u64,
        block_size: u32,
    },

    #[error("parent of {child} not found; tried {}", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    ParentNotFound { child: PathBuf, tried: Vec<PathBuf> },

    #[error("parent {parent} of {child} has unique ID {found}, but the child expects {expected}: the parent was replaced or changed; use 'viridian vhd set-parent' to re-point it if you are sure")]
    ParentIdMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },

    #[error("differencing chain of {child} loops back to {repeated}")]
    ParentLoop { child: PathBuf, repeated: PathBuf },

    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// Formats a 16-byte unique ID as a GUID string (Windows byte order).
pub fn format_guid(id: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes_le(*id).hyphenated().to_string()
}
