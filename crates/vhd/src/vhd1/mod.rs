//! The VHD (v1) format: fixed, dynamic and differencing disks.
//!
//! Wire formats (`footer`, `header`) are plain types with `parse`/`serialize`;
//! `image` does I/O with them; `chain` finds and opens parents; `create` makes
//! new files.
//!
//! # Write ordering (crash safety)
//!
//! A sparse (dynamic or differencing) image is only ever changed in this order:
//! 1. allocating a block writes, in this order, a new footer past the new block's
//!    end (so the file always ends in a valid footer), the block's sector bitmap,
//!    then the data; the new BAT entry stays in memory;
//! 2. writes into allocated blocks go straight to their data; bitmap changes of a
//!    differencing disk stay in memory;
//! 3. `flush` syncs the file (data, footers, new bitmaps), then writes the dirty
//!    BAT sectors and bitmaps, then syncs again.
//!
//! So on disk, a BAT entry or bitmap bit never points at data that is not durable:
//! after a crash at any point the file opens and checks clean, every write flushed
//! before the crash reads back intact, and unflushed writes read as either their
//! new data or what was there before. The footer copy at offset 0 never changes
//! after creation except on resize; if the trailing footer is ever lost, the copy
//! is used and `check --repair` rewrites it.

pub mod chain;
pub mod create;
pub mod footer;
pub mod header;
pub mod image;

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
