//! Creating VHDX files: fixed, dynamic and differencing.
//!
//! Layout of a new file: the 1 MiB header section, the log (1 MiB) at 1 MiB,
//! the metadata region (1 MiB) at 2 MiB, the BAT at 3 MiB (room for every
//! chunk's entries, bitmap entries included), then blocks. The file is built
//! under a temporary name, flushed, and only then linked into place.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::bat::{self, BatEntry, Layout};
use super::chain::{win32_absolute, ABSOLUTE_WIN32_PATH, PARENT_LINKAGE, RELATIVE_PATH};
use super::header::{FileIdentifier, Header, HEADER_OFFSETS};
use super::metadata::{Metadata, ParentLocator, MAX_DISK_SIZE, VHDX_LOCATOR_TYPE};
use super::region::{RegionEntry, RegionTable, BAT_GUID, METADATA_GUID, TABLE_OFFSETS};
use super::{braced, VhdxImage, MIB};
use crate::backing::{io_error, parent_dir, BackingFile, HostStorage, Storage};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::vhd1::create::Created;

/// Hyper-V's default block size for fixed and dynamic VHDX.
pub const DEFAULT_BLOCK_SIZE: u32 = 32 << 20;
/// Hyper-V's default block size for differencing VHDX (checkpoints).
pub const DEFAULT_DIFFERENCING_BLOCK_SIZE: u32 = 2 << 20;
pub const LOG_OFFSET: u64 = MIB;
pub const LOG_LENGTH: u32 = MIB as u32;
pub const METADATA_OFFSET: u64 = 2 * MIB;
pub const METADATA_LENGTH: u32 = MIB as u32;
pub const BAT_OFFSET: u64 = 3 * MIB;
pub const CREATOR: &str = "Viridian";

#[derive(Debug, Clone)]
pub enum NewVhdx {
    Fixed { size: u64 },
    Dynamic { size: u64 },
    Differencing { parent: PathBuf },
}

#[derive(Debug, Clone)]
pub struct VhdxOptions {
    pub kind: NewVhdx,
    /// Block size in bytes (a power of two, 1–256 MiB); `None` takes Hyper-V's
    /// default: 32 MiB, or 2 MiB for a differencing disk.
    pub block_size: Option<u32>,
    /// 512 or 4096; a differencing disk takes its parent's.
    pub logical_sector_size: u32,
    /// 512 or 4096; a differencing disk takes its parent's.
    pub physical_sector_size: u32,
}

impl VhdxOptions {
    pub fn new(kind: NewVhdx) -> Self {
        VhdxOptions {
            kind,
            block_size: None,
            logical_sector_size: 512,
            physical_sector_size: 4096,
        }
    }
}

fn invalid(path: &Path, what: impl Into<String>) -> Error {
    super::image::invalid(path, what)
}

/// Creates a new VHDX at `path`; refuses to overwrite an existing file.
pub fn create(path: &Path, opts: &VhdxOptions, progress: &mut dyn Progress) -> Result<Created> {
    create_on(&HostStorage, path, opts, progress)
}

/// The virtual size a VHDX of `requested` bytes gets: rounded up to a whole
/// number of `logical_sector_size` sectors, more than 0 and at most 64 TiB.
/// The rounding is checked, so a size near `u64::MAX` is refused rather than
/// wrapped to a tiny disk.
pub fn virtual_size(path: &Path, requested: u64, logical_sector_size: u32) -> Result<u64> {
    if requested == 0 {
        return Err(invalid(path, "the size must be more than 0 bytes"));
    }
    requested
        .checked_next_multiple_of(u64::from(logical_sector_size.max(1)))
        .filter(|&size| size <= MAX_DISK_SIZE)
        .ok_or_else(|| {
            invalid(
                path,
                format!(
                    "size {requested} bytes is beyond the VHDX maximum of 64 TiB ({MAX_DISK_SIZE} bytes)"
                ),
            )
        })
}

/// Checks a new VHDX's options as [`create`] would, without touching any file:
/// for a fixed or dynamic disk the size, block size and sector sizes (a
/// differencing disk's size comes from its parent, checked when it is made).
pub fn check_options(path: &Path, opts: &VhdxOptions) -> Result<()> {
    match opts.kind {
        NewVhdx::Differencing { .. } => Ok(()),
        NewVhdx::Fixed { .. } | NewVhdx::Dynamic { .. } => plan(path, opts).map(|_| ()),
    }
}

/// Everything a new file holds, decided before anything is written.
struct Plan {
    requested: u64,
    metadata: Metadata,
    layout: Layout,
    fixed: bool,
}

fn plan(path: &Path, opts: &VhdxOptions) -> Result<Plan> {
    let (requested, fixed, parent) = match &opts.kind {
        NewVhdx::Fixed { size } => (*size, true, None),
        NewVhdx::Dynamic { size } => (*size, false, None),
        NewVhdx::Differencing { parent } => (0, false, Some(parent)),
    };
    let mut metadata = Metadata {
        block_size: opts.block_size.unwrap_or(if parent.is_some() {
            DEFAULT_DIFFERENCING_BLOCK_SIZE
        } else {
            DEFAULT_BLOCK_SIZE
        }),
        leave_blocks_allocated: fixed,
        has_parent: parent.is_some(),
        virtual_disk_size: requested,
        virtual_disk_id: Uuid::new_v4(),
        logical_sector_size: opts.logical_sector_size,
        physical_sector_size: opts.physical_sector_size,
        parent_locator: None,
        other: Vec::new(),
    };
    if let Some(parent) = parent {
        if crate::detect_format(parent)? != crate::Format::Vhdx {
            return Err(invalid(
                parent,
                "a VHDX differencing disk needs a VHDX parent; convert the parent to VHDX first",
            ));
        }
        // The whole parent chain must open before a child is made.
        drop(crate::open(parent, true)?);
        let p = VhdxImage::inspect(parent)?;
        let pm = p.metadata();
        // Virtual-disk metadata is inherited when forking (MS-VHDX 2.6.1.2).
        metadata.virtual_disk_size = pm.virtual_disk_size;
        metadata.virtual_disk_id = pm.virtual_disk_id;
        metadata.logical_sector_size = pm.logical_sector_size;
        metadata.physical_sector_size = pm.physical_sector_size;
        metadata.other = pm
            .other
            .iter()
            .filter(|o| o.entry.is_virtual_disk)
            .cloned()
            .collect();
        let abs_parent = std::path::absolute(parent).map_err(io_error(parent))?;
        let rel = crate::vhd1::create::locator_strings(path, parent)?.relative;
        metadata.parent_locator = Some(ParentLocator {
            locator_type: VHDX_LOCATOR_TYPE,
            entries: vec![
                (PARENT_LINKAGE.into(), braced(&p.header()?.data_write_guid)),
                (RELATIVE_PATH.into(), rel),
                (ABSOLUTE_WIN32_PATH.into(), win32_absolute(&abs_parent)),
            ],
        });
    }
    let ss = metadata.logical_sector_size;
    if ss != 512 && ss != 4096 || !matches!(metadata.physical_sector_size, 512 | 4096) {
        return Err(invalid(path, "sector sizes must be 512 or 4096 bytes"));
    }
    let bs = metadata.block_size;
    if !bs.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&bs) {
        return Err(invalid(
            path,
            format!("block size {bs} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    metadata.virtual_disk_size = virtual_size(path, metadata.virtual_disk_size, ss)?;
    let layout = Layout {
        block_size: u64::from(bs),
        logical_sector_size: u64::from(ss),
        disk_size: metadata.virtual_disk_size,
        has_parent: metadata.has_parent,
    };
    Ok(Plan {
        requested: if parent.is_some() {
            metadata.virtual_disk_size
        } else {
            requested
        },
        metadata,
        layout,
        fixed,
    })
}

/// Builds the file of a new VHDX at `path` itself (refusing an existing file),
/// flushed, without a temporary name: for a caller that builds under its own
/// temporary name and renames it into place when its work is done (convert).
pub(crate) fn build_at(storage: &dyn Storage, path: &Path, opts: &VhdxOptions) -> Result<Created> {
    let plan = plan(path, opts)?;
    let file = storage.create_new(path)?;
    write_new(file.as_ref(), path, &plan)?;
    Ok(Created {
        path: path.into(),
        size: plan.metadata.virtual_disk_size,
        requested_size: plan.requested,
    })
}

/// [`create`] on the given storage. A crash leaves either no `path` or a
/// complete one; the temporary `.NAME.*.partial` file it may leave behind is
/// safe to delete.
pub fn create_on(
    storage: &dyn Storage,
    path: &Path,
    opts: &VhdxOptions,
    progress: &mut dyn Progress,
) -> Result<Created> {
    let tmp = crate::ops::partial::random_partial_path(path);
    create_via(storage, path, &tmp, opts, progress)
}

/// [`create_on`] with the temporary name chosen by the caller (in `path`'s
/// folder, e.g. [`crate::ops::partial::partial_path`] with a job ID).
pub fn create_via(
    storage: &dyn Storage,
    path: &Path,
    tmp: &Path,
    opts: &VhdxOptions,
    progress: &mut dyn Progress,
) -> Result<Created> {
    let plan = plan(path, opts)?;
    if path.symlink_metadata().is_ok() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the file exists; creating a disk never overwrites one",
            ),
        });
    }
    let size = plan.metadata.virtual_disk_size;
    let built = storage.create_new(tmp).and_then(|file| {
        write_new(file.as_ref(), tmp, &plan)?;
        // Built and flushed; what is left is giving it its name.
        progress.update(size, size);
        Ok(())
    });
    let linked = built.and_then(|()| storage.link(tmp, path));
    let _ = storage.remove(tmp);
    linked?;
    storage.sync_dir(parent_dir(path))?;
    Ok(Created {
        path: path.into(),
        size,
        requested_size: plan.requested,
    })
}

fn write_new(file: &dyn BackingFile, path: &Path, plan: &Plan) -> Result<()> {
    let io = io_error(path);
    let bat_bytes = plan.layout.region_bytes();
    let data_start = BAT_OFFSET + bat_bytes;
    let mut entries = vec![0u64; (plan.layout.full_entries()) as usize];
    let mut end = data_start;
    if plan.fixed {
        for b in 0..plan.layout.payload_blocks() {
            let i = plan.layout.payload_index(b) as usize;
            entries[i] = BatEntry::new(bat::PAYLOAD_BLOCK_FULLY_PRESENT, end).raw();
            end += plan.layout.block_size;
        }
    }
    // The file's full length first: a fixed disk's blocks read as zeros.
    file.set_len(end).map_err(&io)?;
    file.write_at(
        &FileIdentifier {
            creator: CREATOR.into(),
        }
        .serialize(),
        0,
    )
    .map_err(&io)?;
    let header = Header {
        sequence_number: 0,
        file_write_guid: Uuid::new_v4(),
        data_write_guid: Uuid::new_v4(),
        log_guid: Uuid::nil(),
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH,
        log_offset: LOG_OFFSET,
    };
    for (i, at) in HEADER_OFFSETS.iter().enumerate() {
        let h = Header {
            sequence_number: i as u64 + 1,
            ..header.clone()
        };
        file.write_at(&h.serialize(), *at).map_err(&io)?;
    }
    let regions = RegionTable {
        entries: vec![
            RegionEntry {
                guid: BAT_GUID,
                file_offset: BAT_OFFSET,
                length: bat_bytes as u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_GUID,
                file_offset: METADATA_OFFSET,
                length: METADATA_LENGTH,
                required: true,
            },
        ],
    }
    .serialize();
    for at in TABLE_OFFSETS {
        file.write_at(&regions, at).map_err(&io)?;
    }
    let meta = plan
        .metadata
        .serialize(METADATA_LENGTH as usize)
        .map_err(|fault| super::Error::Structure {
            path: path.into(),
            fault,
        })?;
    file.write_at(&meta, METADATA_OFFSET).map_err(&io)?;
    if plan.fixed {
        file.write_at(&bat::serialize(&entries), BAT_OFFSET)
            .map_err(&io)?;
    }
    file.flush().map_err(&io)?;
    Ok(())
}
