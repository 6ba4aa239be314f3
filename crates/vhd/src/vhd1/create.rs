//! Creating VHD files: fixed, dynamic and differencing.

use std::path::{Path, PathBuf};

use super::footer::{chs_exact_size, DiskType, Footer, FOOTER_SIZE};
use super::header::{
    block_size_valid, encode_locator_path, DynamicHeader, Locator, HEADER_SIZE, HEADER_VERSION,
    PLATFORM_W2KU, PLATFORM_W2RU,
};
use super::Error as VhdError;
use crate::backing::{io_error, parent_dir, BackingFile, HostStorage, Storage};
use crate::error::{Error, Result};
use crate::progress::Progress;

pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// The largest virtual size of a VHD (2040 GiB, as Hyper-V allows).
pub const MAX_SIZE: u64 = 2040 << 30;
/// How much of a new BAT is written at once.
const BAT_CHUNK: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub enum NewDisk {
    Fixed { size: u64 },
    Dynamic { size: u64, block_size: u32 },
    Differencing { parent: PathBuf },
}

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub kind: NewDisk,
    /// Keep the requested size exactly instead of rounding it up to a size that
    /// readers going by CHS geometry (QEMU 7.2, Virtual PC) see identically.
    pub exact_size: bool,
}

/// What was created.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Created {
    pub path: PathBuf,
    pub size: u64,
    pub requested_size: u64,
}

fn invalid(path: &Path, what: impl Into<String>) -> Error {
    VhdError::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
    .into()
}

/// The size a disk of `requested` bytes gets (see [`CreateOptions::exact_size`]).
pub fn actual_size(requested: u64, exact: bool) -> u64 {
    if exact {
        requested
    } else {
        chs_exact_size(requested)
    }
}

/// The virtual size a VHD of `requested` bytes gets (see [`actual_size`]),
/// refused when it is beyond the format's 2040 GiB: checked before rounding,
/// so a size near `u64::MAX` is refused rather than wrapped.
pub fn virtual_size(path: &Path, requested: u64, exact: bool) -> Result<u64> {
    let beyond = || {
        invalid(
            path,
            format!(
                "size {requested} bytes is beyond the VHD maximum of 2040 GiB ({MAX_SIZE} bytes); use VHDX for a bigger disk"
            ),
        )
    };
    if requested > MAX_SIZE {
        return Err(beyond());
    }
    let size = actual_size(requested, exact);
    if size > MAX_SIZE {
        return Err(beyond());
    }
    Ok(size)
}

/// Checks a new VHD's options as [`create`] would, without touching any file:
/// for a fixed or dynamic disk the size and block size (a differencing disk's
/// size comes from its parent, checked when it is made).
pub fn check_options(path: &Path, opts: &CreateOptions) -> Result<()> {
    match opts.kind {
        NewDisk::Differencing { .. } => Ok(()),
        NewDisk::Fixed { .. } | NewDisk::Dynamic { .. } => plan(path, opts).map(|_| ()),
    }
}

/// Creates a new VHD at `path`; refuses to overwrite an existing file.
pub fn create(path: &Path, opts: &CreateOptions, progress: &mut dyn Progress) -> Result<Created> {
    create_on(&HostStorage, path, opts, progress)
}

/// [`create`] on the given storage.
///
/// The file is built under a temporary name beside `path`, made durable, and
/// only then linked to `path` (which fails if `path` exists): a crash leaves
/// either no `path` or a complete one, never a half-written disk. A crash can
/// leave the temporary `.NAME.*.partial` file behind; it is safe to delete.
pub fn create_on(
    storage: &dyn Storage,
    path: &Path,
    opts: &CreateOptions,
    progress: &mut dyn Progress,
) -> Result<Created> {
    create_via(storage, path, &temp_name(path), opts, progress)
}

/// [`create_on`] with the temporary name chosen by the caller (in `path`'s
/// folder, e.g. [`crate::ops::partial::partial_path`] with a job ID), so a
/// service that records its jobs knows which file to clean up after a crash.
pub fn create_via(
    storage: &dyn Storage,
    path: &Path,
    tmp: &Path,
    opts: &CreateOptions,
    progress: &mut dyn Progress,
) -> Result<Created> {
    let layout = plan(path, opts)?;
    if path.symlink_metadata().is_ok() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the file exists; creating a disk never overwrites one",
            ),
        });
    }
    let built = storage
        .create_new(tmp)
        .and_then(|file| write_layout(file.as_ref(), tmp, &layout, progress));
    let linked = built.and_then(|()| storage.link(tmp, path));
    // Whatever happened, the temporary name goes (the file lives on as `path`).
    let _ = storage.remove(tmp);
    linked?;
    storage.sync_dir(parent_dir(path))?;
    Ok(Created {
        path: path.into(),
        size: layout.footer.current_size,
        requested_size: layout.requested,
    })
}

fn temp_name(path: &Path) -> PathBuf {
    crate::ops::partial::random_partial_path(path)
}

/// Builds the file of a new disk at `path` itself (refusing an existing file),
/// flushed, without a temporary name: for a caller that builds under its own
/// temporary name and renames it into place when its work is done (convert).
pub(crate) fn build_at(
    storage: &dyn Storage,
    path: &Path,
    opts: &CreateOptions,
) -> Result<Created> {
    let layout = plan(path, opts)?;
    let file = storage.create_new(path)?;
    write_layout(file.as_ref(), path, &layout, &mut crate::NoProgress)?;
    Ok(Created {
        path: path.into(),
        size: layout.footer.current_size,
        requested_size: layout.requested,
    })
}

/// Everything a new file holds, decided before anything is written.
struct Layout {
    requested: u64,
    footer: Footer,
    /// The dynamic header and the BAT's size in bytes, for sparse disks.
    sparse: Option<(DynamicHeader, u64)>,
    locator_data: Vec<(u64, Vec<u8>)>,
    /// Where the trailing footer goes.
    end: u64,
}

/// The kind, requested size, block size and parent (with its unique ID) of a new disk.
type Kind = (DiskType, u64, u32, Option<(PathBuf, [u8; 16])>);

fn kind_of(opts: &CreateOptions) -> Result<Kind> {
    Ok(match &opts.kind {
        NewDisk::Fixed { size } => (DiskType::Fixed, *size, DEFAULT_BLOCK_SIZE, None),
        NewDisk::Dynamic { size, block_size } => (DiskType::Dynamic, *size, *block_size, None),
        NewDisk::Differencing { parent } => {
            // The whole parent chain must open (IDs, locators) before a child is made.
            let size = crate::open(parent, true)?.size();
            let id = crate::parent_identity(parent)?
                .ok_or_else(|| invalid(parent, "cannot read the parent's unique ID"))?;
            let block_size = super::VhdImage::inspect(parent)
                .ok()
                .and_then(|i| i.block_size())
                .map_or(DEFAULT_BLOCK_SIZE, |b| b as u32);
            (
                DiskType::Differencing,
                size,
                block_size,
                Some((parent.clone(), id)),
            )
        }
    })
}

fn plan(path: &Path, opts: &CreateOptions) -> Result<Layout> {
    let (disk_type, requested, block_size, parent) = kind_of(opts)?;
    if requested == 0 {
        return Err(invalid(path, "the size must be more than 0 bytes"));
    }
    if requested % 512 != 0 && opts.exact_size {
        return Err(invalid(
            path,
            format!("--exact-size needs a multiple of 512 bytes, not {requested}"),
        ));
    }
    if disk_type != DiskType::Fixed && !block_size_valid(block_size) {
        return Err(invalid(
            path,
            format!("block size {block_size} is not a power of two between 512 bytes and 256 MiB"),
        ));
    }
    let size = match parent {
        Some(_) => requested,
        None => virtual_size(path, requested, opts.exact_size)?,
    };
    let footer = Footer::new(disk_type, size, *uuid::Uuid::new_v4().as_bytes());
    if disk_type == DiskType::Fixed {
        return Ok(Layout {
            requested,
            footer,
            sparse: None,
            locator_data: Vec::new(),
            end: size,
        });
    }
    sparse_layout(path, requested, footer, block_size, parent)
}

fn sparse_layout(
    path: &Path,
    requested: u64,
    footer: Footer,
    block_size: u32,
    parent: Option<(PathBuf, [u8; 16])>,
) -> Result<Layout> {
    let entries = footer.current_size.div_ceil(u64::from(block_size));
    let entries = u32::try_from(entries).map_err(|_| invalid(path, "too many blocks"))?;
    let table_offset = (FOOTER_SIZE + HEADER_SIZE) as u64;
    let bat_bytes = super::bat::table_bytes(entries);
    let mut header = DynamicHeader {
        table_offset,
        header_version: HEADER_VERSION,
        max_table_entries: entries,
        block_size,
        parent_unique_id: [0; 16],
        parent_timestamp: 0,
        parent_name: String::new(),
        locators: Default::default(),
    };
    let mut end = table_offset + bat_bytes;
    let mut locator_data = Vec::new();
    if let Some((parent_path, id)) = &parent {
        header.parent_unique_id = *id;
        header.parent_timestamp = parent_timestamp(parent_path);
        let paths = locator_strings(path, parent_path)?;
        header.parent_name = paths.absolute.clone();
        let texts = [
            (PLATFORM_W2KU, &paths.absolute),
            (PLATFORM_W2RU, &paths.relative),
        ];
        for (i, (code, text)) in texts.into_iter().enumerate() {
            let data = encode_locator_path(text);
            // "Data space" in bytes, as Windows writes it.
            let space = (data.len() as u64).div_ceil(512).max(1) * 512;
            header.locators[i] = Locator {
                platform_code: code,
                data_space: space as u32,
                data_length: data.len() as u32,
                data_offset: end,
            };
            locator_data.push((end, data));
            end += space;
        }
    }
    Ok(Layout {
        requested,
        footer,
        sparse: Some((header, bat_bytes)),
        locator_data,
        end,
    })
}

fn write_layout(
    file: &dyn BackingFile,
    path: &Path,
    layout: &Layout,
    progress: &mut dyn Progress,
) -> Result<()> {
    let io = io_error(path);
    let footer = layout.footer.serialize();
    let size = layout.footer.current_size;
    match &layout.sparse {
        // A fixed disk's data is the file's (sparse) start; the footer follows it.
        None => file.set_len(layout.end).map_err(&io)?,
        Some((header, bat_bytes)) => {
            file.write_at(&footer, 0).map_err(&io)?;
            file.write_at(&header.serialize(), FOOTER_SIZE as u64)
                .map_err(&io)?;
            // Unused entries, a MiB at a time: a BAT of small blocks can be
            // gigabytes long, more than is wise to hold in memory at once.
            let unused = vec![0xffu8; (*bat_bytes).min(BAT_CHUNK) as usize];
            let mut done = 0u64;
            while done < *bat_bytes {
                let n = (*bat_bytes - done).min(BAT_CHUNK);
                file.write_at(&unused[..n as usize], header.table_offset + done)
                    .map_err(&io)?;
                done += n;
            }
            for (at, data) in &layout.locator_data {
                file.write_at(data, *at).map_err(&io)?;
            }
        }
    }
    file.write_at(&footer, layout.end).map_err(&io)?;
    file.flush().map_err(&io)?;
    progress.update(size, size);
    Ok(())
}

fn parent_timestamp(parent: &Path) -> u32 {
    std::fs::metadata(parent)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| {
            d.as_secs().saturating_sub(super::footer::VHD_EPOCH_OFFSET) as u32
        })
}

pub struct LocatorStrings {
    pub absolute: String,
    pub relative: String,
}

/// The absolute path of `parent` and its path relative to `child`'s folder, in
/// the Windows style the locators use (`.\parent.vhd`, `..\base\parent.vhd`).
pub fn locator_strings(child: &Path, parent: &Path) -> Result<LocatorStrings> {
    let abs_parent = std::path::absolute(parent).map_err(io_error(parent))?;
    let abs_child = std::path::absolute(child).map_err(io_error(child))?;
    let child_dir = abs_child.parent().unwrap_or(Path::new("/"));
    let rel = relative_path(child_dir, &abs_parent);
    let mut relative = rel.to_string_lossy().replace('/', "\\");
    if !relative.starts_with("..") {
        relative = format!(".\\{relative}");
    }
    Ok(LocatorStrings {
        absolute: abs_parent.to_string_lossy().into_owned(),
        relative,
    })
}

fn relative_path(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from_dir.components().collect();
    let to_c: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to_c).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to_c[common..] {
        out.push(c);
    }
    out
}
