//! `compact`: drops the all-zero blocks of a dynamic VHD or VHDX and shrinks
//! the file (for a VHDX also the space of blocks freed by discards and of
//! allocations a crash left unused).
//!
//! The blocks worth keeping are copied into a new file beside the original, with
//! the same unique ID (so differencing children stay valid), which then replaces
//! the original by an atomic rename: a crash leaves either the old file or the
//! new one, never a mix.

use std::path::{Path, PathBuf};

use crate::backing::{parent_dir, HostStorage, Storage};
use crate::progress::Progress;
use crate::vhd1::create::{create_on, CreateOptions, NewDisk};
use crate::vhd1::{DiskType, VhdImage};
use crate::{Allocation, Disk, Error, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Compacted {
    pub file_size_before: u64,
    pub file_size_after: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn compact(path: &Path, progress: &mut dyn Progress) -> Result<Compacted> {
    compact_on(&HostStorage, path, progress)
}

/// [`compact`] on the given storage.
pub fn compact_on(
    storage: &dyn Storage,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<Compacted> {
    if crate::detect_format(path)? == crate::Format::Vhdx {
        return compact_vhdx(storage, path, progress);
    }
    let src = VhdImage::open_layer_on(storage, path, false)?;
    if src.footer().disk_type != DiskType::Dynamic {
        return Err(crate::vhd1::Error::Invalid {
            path: path.to_path_buf(),
            what: format!(
                "compact works on dynamic VHDs; this one is {:?}",
                src.footer().disk_type
            )
            .to_lowercase(),
        }
        .into());
    }
    src.flush()?;
    let before = std::fs::metadata(path).map_err(io(path))?.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.compacting"));
    // A leftover of an earlier compact that crashed: never part of any chain.
    let _ = std::fs::remove_file(&tmp);
    let result = copy_into_new(storage, &src, &tmp, progress)
        .and_then(|()| storage.rename(&tmp, path))
        .and_then(|()| storage.sync_dir(parent_dir(path)));
    if let Err(e) = result {
        let _ = storage.remove(&tmp);
        return Err(e);
    }
    drop(src);
    let after = std::fs::metadata(path).map_err(io(path))?.len();
    Ok(Compacted {
        file_size_before: before,
        file_size_after: after,
    })
}

fn copy_into_new(
    storage: &dyn Storage,
    src: &VhdImage,
    tmp: &Path,
    progress: &mut dyn Progress,
) -> Result<()> {
    let size = src.size();
    let block = src.block_size().unwrap_or(2 << 20);
    let opts = CreateOptions {
        kind: NewDisk::Dynamic {
            size,
            block_size: block as u32,
        },
        exact_size: true,
    };
    create_on(storage, tmp, &opts, &mut crate::NoProgress)?;
    let mut out = VhdImage::open_layer_on(storage, tmp, false)?;
    let mut buf = vec![0u8; block as usize];
    let mut off = 0;
    while off < size {
        let n = block.min(size - off);
        let b = &mut buf[..n as usize];
        let st = src.block_status(off, n)?;
        // Any data in the block (a run shorter than the block means some is).
        if st.allocation == Allocation::Data || st.len < n {
            src.read_at(b, off)?;
            if b.iter().any(|&x| x != 0) {
                out.write_at(b, off)?;
            }
        }
        off += n;
        if !progress.update(off, size) {
            return Err(Error::Cancelled {
                what: format!("{} was left as it was", src.file_path().display()),
            });
        }
    }
    out.flush()?;
    // The same identity as the original, so its children still accept it.
    let mut footer = out.footer().clone();
    footer.unique_id = src.footer().unique_id;
    footer.timestamp = src.footer().timestamp;
    out.rewrite_footer(footer)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.compacting"))
}

/// A dynamic VHDX: the blocks with data go into a new file with the same block
/// size, sector sizes, virtual disk ID and DataWriteGuid (so differencing
/// children stay linked), which replaces the original by an atomic rename.
fn compact_vhdx(
    storage: &dyn Storage,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<Compacted> {
    use crate::vhdx::create::{create_on as create_vhdx, NewVhdx, VhdxOptions};
    use crate::vhdx::image::VhdxType;
    use crate::vhdx::VhdxImage;
    let src = VhdxImage::open_layer_on(storage, path, false)?;
    if src.disk_type() != VhdxType::Dynamic {
        return Err(crate::vhdx::Error::Invalid {
            path: path.to_path_buf(),
            what: format!(
                "compact works on dynamic VHDX files; this one is {:?}",
                src.disk_type()
            )
            .to_lowercase(),
        }
        .into());
    }
    src.flush()?;
    let before = std::fs::metadata(path).map_err(io(path))?.len();
    let tmp = temp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let m = src.metadata().clone();
    let data_write_guid = src.header()?.data_write_guid;
    let mut copy = || -> Result<()> {
        let mut opts = VhdxOptions::new(NewVhdx::Dynamic {
            size: m.virtual_disk_size,
        });
        opts.block_size = Some(m.block_size);
        opts.logical_sector_size = m.logical_sector_size;
        opts.physical_sector_size = m.physical_sector_size;
        create_vhdx(storage, &tmp, &opts, &mut crate::NoProgress)?;
        let mut out = VhdxImage::open_layer_on(storage, &tmp, false)?;
        copy_blocks(&src, &out, u64::from(m.block_size), progress)?;
        out.adopt_virtual_disk_metadata(&m)?;
        out.finish_with_data_write_guid(data_write_guid)?;
        out.close()
    };
    let result = copy()
        .and_then(|()| storage.rename(&tmp, path))
        .and_then(|()| storage.sync_dir(parent_dir(path)));
    if let Err(e) = result {
        let _ = storage.remove(&tmp);
        return Err(e);
    }
    drop(src);
    let after = std::fs::metadata(path).map_err(io(path))?.len();
    Ok(Compacted {
        file_size_before: before,
        file_size_after: after,
    })
}

/// Copies the non-zero data of `src` into `out`, a block at a time.
fn copy_blocks(
    src: &dyn Disk,
    out: &dyn Disk,
    block: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let size = src.size();
    let chunk = block.min(4 << 20);
    let mut buf = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        let b = &mut buf[..n as usize];
        let st = src.block_status(off, n)?;
        if st.allocation == Allocation::Data || st.len < n {
            src.read_at(b, off)?;
            if b.iter().any(|&x| x != 0) {
                out.write_at(b, off)?;
            }
        }
        off += n;
        if !progress.update(off, size) {
            return Err(Error::Cancelled {
                what: format!(
                    "{} was left as it was",
                    src.path().unwrap_or(Path::new("")).display()
                ),
            });
        }
    }
    out.flush()
}
