//! `convert`: copies a disk (or a whole differencing chain, flattened) into a new
//! file of another type, keeping it sparse: ranges that read as zeros are not
//! written, so they stay unallocated in a dynamic VHD and holes in a raw file.

use std::path::Path;

use crate::progress::Progress;
use crate::vhd1::create::{create, CreateOptions, NewDisk, DEFAULT_BLOCK_SIZE};
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

/// Converts `src` (with its chain) into the new file `dst`. On failure or cancel
/// `dst` is removed; `src` is only read.
pub fn convert(src: &Path, dst: &Path, target: Target, progress: &mut dyn Progress) -> Result<()> {
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
    match target {
        Target::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dst)
                .map_err(|source| Error::Io {
                    path: dst.to_path_buf(),
                    source,
                })?;
            f.set_len(size).map_err(|source| Error::Io {
                path: dst.to_path_buf(),
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
            create(
                dst,
                &CreateOptions {
                    kind,
                    exact_size: true,
                },
                &mut crate::NoProgress,
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
            crate::vhdx::create::create(dst, &opts, &mut crate::NoProgress)?;
        }
    }
    let result = copy(source.as_ref(), dst, target, progress);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy(
    source: &dyn crate::Disk,
    dst: &Path,
    target: Target,
    progress: &mut dyn Progress,
) -> Result<()> {
    let out: Box<dyn crate::Disk> = match target {
        Target::Raw => Box::new(crate::RawDisk::open(dst, false)?),
        _ => crate::open(dst, false)?,
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
                what: format!("{} was removed", dst.display()),
            });
        }
    }
    out.flush()
}
