//! `convert`: copies a disk (or a whole differencing chain, flattened) into a new
//! file of another type, keeping it sparse: ranges that read as zeros are not
//! written, so they stay unallocated in a dynamic VHD and holes in a raw file.

use std::path::Path;

use crate::backing::{parent_dir, HostStorage, Storage};
use crate::progress::Progress;
use crate::vhd1::create::{build_at, CreateOptions, NewDisk, DEFAULT_BLOCK_SIZE};
use crate::{Error, Result};

const CHUNK: usize = 2 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Raw,
    VhdFixed,
    VhdDynamic,
    VhdxFixed,
    VhdxDynamic,
}

impl Target {
    /// The default for a destination path: a dynamic VHD for `.vhd`/`.avhd`, a
    /// dynamic VHDX for `.vhdx`/`.avhdx`, raw otherwise.
    pub fn for_path(path: &Path) -> Self {
        if crate::is_vhd_name(path) {
            Target::VhdDynamic
        } else if crate::is_vhdx_name(path) {
            Target::VhdxDynamic
        } else {
            Target::Raw
        }
    }
}

/// Converts `src` (with its chain) into the new file `dst`; `src` is only read.
/// The copy is built under a temporary name beside `dst` (see
/// [`crate::ops::partial`]) and gets its name only when complete and flushed, so
/// neither a failure, a cancel nor a crash leaves a partial file named `dst`.
pub fn convert(src: &Path, dst: &Path, target: Target, progress: &mut dyn Progress) -> Result<()> {
    let tmp = crate::ops::partial::random_partial_path(dst);
    convert_via(src, dst, &tmp, target, progress)
}

/// [`convert`] with the temporary name chosen by the caller (in `dst`'s folder,
/// e.g. [`crate::ops::partial::partial_path`] with a job ID). On failure or
/// cancel the temporary file is removed; `dst` is never written but linked to
/// the finished file (refused if `dst` exists by then).
pub fn convert_via(
    src: &Path,
    dst: &Path,
    tmp: &Path,
    target: Target,
    progress: &mut dyn Progress,
) -> Result<()> {
    if dst.symlink_metadata().is_ok() {
        return Err(Error::Io {
            path: dst.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the file exists; convert never overwrites one",
            ),
        });
    }
    let source = crate::open(src, true)?;
    let size = source.size();
    let sector = u64::from(source.logical_sector_size());
    if matches!(target, Target::VhdxFixed | Target::VhdxDynamic) && size % sector != 0 {
        return Err(crate::vhd1::Error::Invalid {
            path: src.to_path_buf(),
            what: format!(
                "{size} bytes is not a whole number of {sector}-byte sectors; a VHDX cannot hold it exactly"
            ),
        }
        .into());
    }
    if matches!(target, Target::VhdFixed | Target::VhdDynamic) && size % 512 != 0 {
        return Err(crate::vhd1::Error::Invalid {
            path: src.to_path_buf(),
            what: format!(
                "{size} bytes is not a whole number of sectors; a VHD cannot hold it exactly"
            ),
        }
        .into());
    }
    let result = build(source.as_ref(), tmp, target)
        .and_then(|()| copy(source.as_ref(), tmp, dst, target, progress))
        .and_then(|()| HostStorage.link(tmp, dst));
    // Whatever happened, the temporary name goes (a finished file lives on as `dst`).
    if tmp.symlink_metadata().is_ok() {
        let _ = HostStorage.remove(tmp);
    }
    result?;
    HostStorage.sync_dir(parent_dir(dst))
}

/// Makes the empty file of the target type at `tmp`, the source's size.
fn build(source: &dyn crate::Disk, tmp: &Path, target: Target) -> Result<()> {
    let size = source.size();
    match target {
        Target::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(tmp)
                .map_err(|source| Error::Io {
                    path: tmp.to_path_buf(),
                    source,
                })?;
            f.set_len(size).map_err(|source| Error::Io {
                path: tmp.to_path_buf(),
                source,
            })?;
        }
        Target::VhdFixed | Target::VhdDynamic => {
            let kind = if target == Target::VhdFixed {
                NewDisk::Fixed { size }
            } else {
                NewDisk::Dynamic {
                    size,
                    block_size: DEFAULT_BLOCK_SIZE,
                }
            };
            build_at(
                &HostStorage,
                tmp,
                &CreateOptions {
                    kind,
                    exact_size: true,
                },
            )?;
        }
        Target::VhdxFixed | Target::VhdxDynamic => {
            use crate::vhdx::create::{NewVhdx, VhdxOptions};
            let kind = if target == Target::VhdxFixed {
                NewVhdx::Fixed { size }
            } else {
                NewVhdx::Dynamic { size }
            };
            let mut opts = VhdxOptions::new(kind);
            opts.logical_sector_size = source.logical_sector_size();
            opts.physical_sector_size = source.physical_sector_size();
            crate::vhdx::create::build_at(&HostStorage, tmp, &opts)?;
        }
    }
    Ok(())
}

/// Copies the source's data into the new file `tmp` (to be named `dst`) and
/// flushes it.
fn copy(
    source: &dyn crate::Disk,
    tmp: &Path,
    dst: &Path,
    target: Target,
    progress: &mut dyn Progress,
) -> Result<()> {
    let out: Box<dyn crate::Disk> = match target {
        Target::Raw => Box::new(crate::RawDisk::open(tmp, false)?),
        _ => crate::open(tmp, false)?,
    };
    let size = source.size();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(CHUNK);
        source.read_at(&mut buf[..n], off)?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_at(&buf[..n], off)?;
        }
        off += n as u64;
        if !progress.update(off, size) {
            return Err(Error::Cancelled {
                what: format!("{} was not made", dst.display()),
            });
        }
    }
    // As a clean close leaves it (a VHDX's log emptied), and durable, before it
    // gets its name.
    out.settle()
}
