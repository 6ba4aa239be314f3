//! Creating VHD files: fixed, dynamic and differencing.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::footer::{chs_exact_size, DiskType, Footer, FOOTER_SIZE};
use super::header::{
    block_size_valid, encode_locator_path, DynamicHeader, Locator, BAT_UNUSED, HEADER_SIZE,
    HEADER_VERSION, PLATFORM_W2KU, PLATFORM_W2RU,
};
use super::Error as VhdError;
use crate::error::{Error, Result};
use crate::progress::Progress;

pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// The largest virtual size of a VHD (2040 GiB, as Hyper-V allows).
pub const MAX_SIZE: u64 = 2040 << 30;

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

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
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

/// Creates a new VHD at `path`; refuses to overwrite an existing file. On
/// failure the partial file is removed.
pub fn create(path: &Path, opts: &CreateOptions, progress: &mut dyn Progress) -> Result<Created> {
    let result = create_inner(path, opts, progress);
    if result.is_err()
        && !matches!(result, Err(Error::Io { ref source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists)
    {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn create_inner(path: &Path, opts: &CreateOptions, progress: &mut dyn Progress) -> Result<Created> {
    let (disk_type, requested, block_size, parent) = match &opts.kind {
        NewDisk::Fixed { size } => (DiskType::Fixed, *size, DEFAULT_BLOCK_SIZE, None),
        NewDisk::Dynamic { size, block_size } => (DiskType::Dynamic, *size, *block_size, None),
        NewDisk::Differencing { parent } => {
            let p = crate::open(parent, true)?;
            let id = crate::parent_identity(parent)?
                .ok_or_else(|| invalid(parent, "cannot read the parent's unique ID"))?;
            let bs = super::VhdImage::open_layer(parent, true)
                .ok()
                .and_then(|i| i.block_size())
                .map_or(DEFAULT_BLOCK_SIZE, |b| b as u32);
            (
                DiskType::Differencing,
                p.size(),
                bs,
                Some((parent.clone(), id)),
            )
        }
    };
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
    let size = if parent.is_some() {
        requested
    } else {
        actual_size(requested, opts.exact_size)
    };
    if size > MAX_SIZE {
        return Err(invalid(
            path,
            format!("{size} bytes is more than the 2040 GiB a VHD can hold; use VHDX"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(io(path))?;
    crate::host_file::lock(&file, path, false)?;
    let mut footer = Footer::new(disk_type, size, *uuid::Uuid::new_v4().as_bytes());
    if disk_type == DiskType::Fixed {
        // Allocate the data (zeros) and put the footer after it.
        file.set_len(size).map_err(io(path))?;
        progress.update(size / 2, size);
        file.write_all_at(&footer.serialize(), size)
            .map_err(io(path))?;
        file.sync_all().map_err(io(path))?;
        progress.update(size, size);
        return Ok(Created {
            path: path.into(),
            size,
            requested_size: requested,
        });
    }
    let entries = size.div_ceil(u64::from(block_size));
    let entries = u32::try_from(entries).map_err(|_| invalid(path, "too many blocks"))?;
    let table_offset = (FOOTER_SIZE + HEADER_SIZE) as u64;
    let bat_bytes = (u64::from(entries) * 4).div_ceil(512) * 512;
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
    let mut locator_data: Vec<(u64, Vec<u8>)> = Vec::new();
    if let Some((parent_path, id)) = &parent {
        header.parent_unique_id = *id;
        header.parent_timestamp = parent_timestamp(parent_path);
        let paths = locator_strings(path, parent_path)?;
        header.parent_name = paths.absolute.clone();
        for (i, (code, text)) in [
            (PLATFORM_W2KU, &paths.absolute),
            (PLATFORM_W2RU, &paths.relative),
        ]
        .into_iter()
        .enumerate()
        {
            let data = encode_locator_path(text);
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
        footer.disk_type = DiskType::Differencing;
    }
    let footer_bytes = footer.serialize();
    // Footer at the end first (the file is always a valid VHD from then on for
    // readers that look at its end), then copy, header, BAT, locators.
    file.write_all_at(&footer_bytes, end).map_err(io(path))?;
    file.write_all_at(&footer_bytes, 0).map_err(io(path))?;
    file.write_all_at(&header.serialize(), FOOTER_SIZE as u64)
        .map_err(io(path))?;
    let bat = vec![0xffu8; bat_bytes as usize];
    debug_assert_eq!(BAT_UNUSED, 0xffff_ffff);
    file.write_all_at(&bat, table_offset).map_err(io(path))?;
    for (at, data) in &locator_data {
        file.write_all_at(data, *at).map_err(io(path))?;
    }
    file.sync_all().map_err(io(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    progress.update(size, size);
    Ok(Created {
        path: path.into(),
        size,
        requested_size: requested,
    })
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
    let abs_parent = std::path::absolute(parent).map_err(io(parent))?;
    let abs_child = std::path::absolute(child).map_err(io(child))?;
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
