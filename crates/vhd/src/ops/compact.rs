//! `compact`: drops the all-zero blocks of a dynamic VHD or VHDX and shrinks
//! the file (for a VHDX also the space of blocks freed by discards and of
//! allocations a crash left unused). A differencing VHDX drops what its parent
//! already reads the same (data written again unchanged, zeros over zeros) and
//! keeps the rest, zeros that hide the parent's data included.
//!
//! The blocks worth keeping are copied into a new file beside the original, with
//! the same unique ID (so differencing children stay valid), which then replaces
//! the original by an atomic rename: a crash leaves either the old file or the
//! new one, never a mix.

use std::path::{Path, PathBuf};

use crate::backing::{parent_dir, HostStorage, Storage};
use crate::progress::Progress;
use crate::vhd1::create::{build_at, CreateOptions, NewDisk};
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
    compact_via(storage, path, &temp_path(path), progress)
}

/// [`compact_on`] with the temporary name of the new copy chosen by the caller
/// (in `path`'s folder, e.g. [`crate::ops::partial::partial_path`] with a job ID).
pub fn compact_via(
    storage: &dyn Storage,
    path: &Path,
    tmp: &Path,
    progress: &mut dyn Progress,
) -> Result<Compacted> {
    if crate::detect_format(path)? == crate::Format::Vhdx {
        return compact_vhdx(storage, path, tmp, progress);
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
    // A leftover of an earlier compact that crashed: never part of any chain.
    let _ = std::fs::remove_file(tmp);
    let result = copy_into_new(storage, &src, tmp, progress)
        .and_then(|()| storage.rename(tmp, path))
        .and_then(|()| storage.sync_dir(parent_dir(path)));
    if let Err(e) = result {
        let _ = storage.remove(tmp);
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
    build_at(storage, tmp, &opts)?;
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
    crate::ops::partial::random_partial_path(path)
}

/// A dynamic VHDX: the blocks with data go into a new file with the same block
/// size, sector sizes, virtual disk ID and DataWriteGuid (so differencing
/// children stay linked), which replaces the original by an atomic rename.
fn compact_vhdx(
    storage: &dyn Storage,
    path: &Path,
    tmp: &Path,
    progress: &mut dyn Progress,
) -> Result<Compacted> {
    use crate::vhdx::create::{NewVhdx, VhdxOptions};
    use crate::vhdx::image::VhdxType;
    use crate::vhdx::VhdxImage;
    let src = VhdxImage::open_layer_on(storage, path, false)?;
    let differencing = src.disk_type() == VhdxType::Differencing;
    if src.disk_type() != VhdxType::Dynamic && !differencing {
        return Err(crate::vhdx::Error::Invalid {
            path: path.to_path_buf(),
            what: format!(
                "compact works on dynamic and differencing VHDX files; this one is {:?} (a fixed disk has no blocks to drop)",
                src.disk_type()
            )
            .to_lowercase(),
        }
        .into());
    }
    // A child is rebuilt over the same parent, which must be there.
    let parent = if differencing {
        Some(crate::vhdx::chain::resolve_parent(&src)?)
    } else {
        None
    };
    src.flush()?;
    let before = std::fs::metadata(path).map_err(io(path))?.len();
    let _ = std::fs::remove_file(tmp);
    let m = src.metadata().clone();
    let data_write_guid = src.header()?.data_write_guid;
    let mut copy = || -> Result<()> {
        let kind = match &parent {
            Some(p) => NewVhdx::Differencing { parent: p.clone() },
            None => NewVhdx::Dynamic {
                size: m.virtual_disk_size,
            },
        };
        let mut opts = VhdxOptions::new(kind);
        opts.block_size = Some(m.block_size);
        opts.logical_sector_size = m.logical_sector_size;
        opts.physical_sector_size = m.physical_sector_size;
        crate::vhdx::create::build_at(storage, tmp, &opts)?;
        let mut out = VhdxImage::open_layer_on(storage, tmp, false)?;
        if let Some(p) = &parent {
            let below = crate::open(p, true)?;
            copy_layer(&src, below.as_ref(), &out, progress)?;
            // The locator exactly as it was (the same relative and absolute paths).
            if let Some(locator) = m.parent_locator.clone() {
                out.relink_parent(locator)?;
            }
        } else {
            copy_blocks(&src, &out, u64::from(m.block_size), progress)?;
        }
        out.adopt_virtual_disk_metadata(&m)?;
        out.finish_with_data_write_guid(data_write_guid)?;
        out.close()
    };
    let result = copy()
        .and_then(|()| storage.rename(tmp, path))
        .and_then(|()| storage.sync_dir(parent_dir(path)));
    if let Err(e) = result {
        let _ = storage.remove(tmp);
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

/// Copies what the layer `src` holds into the empty child `out` over the same
/// parent (`below`, read through its chain), sector by sector: what the parent
/// already reads the same is left out (it reads through), the rest is written
/// (zeros as zeros); ranges the layer does not hold stay absent.
fn copy_layer(
    src: &dyn Disk,
    below: &dyn Disk,
    out: &dyn Disk,
    progress: &mut dyn Progress,
) -> Result<()> {
    let size = src.size();
    let chunk: u64 = 4 << 20;
    let sector = src.logical_sector_size().max(512) as usize;
    let mut mine = vec![0u8; chunk as usize];
    let mut theirs = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < size {
        let st = src.block_status(off, chunk.min(size - off))?;
        let n = st.len;
        if st.allocation != Allocation::Unallocated {
            let a = &mut mine[..n as usize];
            match st.allocation {
                Allocation::Zero => a.fill(0),
                _ => src.read_at(a, off)?,
            }
            // What the parent reads there (zeros past its end, if it is smaller).
            let b = &mut theirs[..n as usize];
            b.fill(0);
            let within = below.size().saturating_sub(off).min(n) as usize;
            if within > 0 {
                below.read_at(&mut b[..within], off)?;
            }
            // Runs of sectors that differ from the parent, written as they are.
            let mut i = 0;
            while i < a.len() {
                let differs = |k: usize| a[k..k + sector] != b[k..k + sector];
                if !differs(i) {
                    i += sector;
                    continue;
                }
                let start = i;
                while i < a.len() && differs(i) {
                    i += sector;
                }
                let run = &a[start..i];
                let at = off + start as u64;
                if run.iter().all(|&x| x == 0) {
                    out.write_zeroes(at, run.len() as u64)?;
                } else {
                    out.write_at(run, at)?;
                }
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
