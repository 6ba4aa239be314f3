//! Viridian's storage engine: the `Disk` abstraction and the VHD and VHDX formats.

pub mod backing;
pub mod crash;
pub mod disk;
pub mod error;
pub mod host_file;
pub mod ops;
pub mod progress;
pub mod vhd1;
pub mod vhdx;

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use backing::{BackingFile, HostStorage, Storage};
pub use disk::{
    Allocation, BlockStatus, Disk, DiskCell, FileExtent, Gate, Held, Pass, RawDisk, SwitchError,
};
pub use error::{Error, Result};
pub use progress::{NoProgress, Progress};

/// The format of a disk file, by its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Vhd,
    Vhdx,
    Raw,
}

/// Tells a file's format from its signature: "vhdxfile" at offset 0 is VHDX;
/// "conectix" at the end (or, for sparse VHDs, at offset 0) is VHD; anything
/// else is raw.
pub fn detect_format(path: &Path) -> Result<Format> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut head = [0u8; 8];
    if file.read_exact_at(&mut head, 0).is_ok() {
        if &head == b"vhdxfile" {
            return Ok(Format::Vhdx);
        }
        if &head == vhd1::footer::COOKIE {
            return Ok(Format::Vhd);
        }
    }
    if len >= 512 {
        let mut tail = [0u8; 8];
        if file.read_exact_at(&mut tail, len / 512 * 512 - 512).is_ok()
            && &tail == vhd1::footer::COOKIE
        {
            return Ok(Format::Vhd);
        }
    }
    Ok(Format::Raw)
}

pub(crate) fn is_vhd_name(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("vhd" | "avhd")
    )
}

/// Whether the file name says VHDX (`.vhdx`, `.avhdx`, any case): new files take
/// their format from it.
pub fn is_vhdx_name(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("vhdx" | "avhdx")
    )
}

/// Opens a virtual disk for I/O: a VHD or VHDX with its whole differencing chain
/// (the leaf with the requested access, ancestors read-only), or a raw image.
/// A file named `.vhd`/`.avhd`/`.vhdx`/`.avhdx` must carry that format's
/// signature; a damaged one is refused, never read as raw.
pub fn open(path: &Path, read_only: bool) -> Result<Box<dyn Disk>> {
    open_on(&HostStorage, path, read_only)
}

/// [`open`] with the leaf's file I/O going through `storage` (parents are
/// only read, so they always come from the host).
pub fn open_on(storage: &dyn Storage, path: &Path, read_only: bool) -> Result<Box<dyn Disk>> {
    let mut seen = HashSet::new();
    open_with(storage, path, read_only, &mut seen)
}

fn open_with(
    storage: &dyn Storage,
    path: &Path,
    read_only: bool,
    seen: &mut HashSet<PathBuf>,
) -> Result<Box<dyn Disk>> {
    let format = detect_format(path)?;
    match format {
        Format::Vhd => {
            if read_only && !seen.is_empty() {
                vhd1::chain::open_vhd_parent(path, seen)
            } else {
                Ok(Box::new(vhd1::chain::open_chain_on(
                    storage, path, read_only,
                )?))
            }
        }
        Format::Vhdx => {
            if read_only && !seen.is_empty() {
                vhdx::chain::open_vhdx_parent(path, seen)
            } else {
                Ok(Box::new(vhdx::chain::open_chain_on(
                    storage, path, read_only, seen,
                )?))
            }
        }
        Format::Raw if is_vhd_name(path) => {
            // Named VHD but no footer anywhere: say what is wrong with the end.
            Err(vhd1::VhdImage::open_layer(path, true).err().unwrap_or(Error::Vhd(
                vhd1::Error::Invalid {
                    path: path.to_path_buf(),
                    what: "not a VHD".into(),
                },
            )))
        }
        Format::Raw if is_vhdx_name(path) => Err(vhd1::Error::Invalid {
            path: path.to_path_buf(),
            what: "no VHDX file identifier (\"vhdxfile\") at offset 0: not a VHDX file, or its first 64 KiB are damaged".into(),
        }
        .into()),
        Format::Raw => Ok(Box::new(RawDisk::open(path, read_only)?)),
    }
}

/// Makes an empty dynamic disk of exactly `size` bytes at `path`, in the format
/// the name says (`.vhdx`/`.avhdx`: VHDX, else VHD), with `block_size` or the
/// format's default (VHD 2 MiB, VHDX 32 MiB).
pub fn create_dynamic(path: &Path, size: u64, block_size: Option<u32>) -> Result<()> {
    let mut none = NoProgress;
    if is_vhdx_name(path) {
        use vhdx::create::{NewVhdx, VhdxOptions};
        let mut opts = VhdxOptions::new(NewVhdx::Dynamic { size });
        opts.block_size = block_size;
        vhdx::create::create(path, &opts, &mut none).map(drop)
    } else {
        use vhd1::create::{CreateOptions, NewDisk};
        let opts = CreateOptions {
            kind: NewDisk::Dynamic {
                size,
                block_size: block_size.unwrap_or(2 << 20),
            },
            exact_size: true,
        };
        vhd1::create::create(path, &opts, &mut none).map(drop)
    }
}

/// Makes a differencing disk at `path` on `parent`, in the format the name
/// says (`.avhdx`/`.vhdx`: VHDX, else VHD) with the format's defaults for a
/// checkpoint layer. The parent (and its chain) must open.
pub fn create_child(path: &Path, parent: &Path) -> Result<()> {
    let mut none = NoProgress;
    if is_vhdx_name(path) {
        use vhdx::create::{NewVhdx, VhdxOptions};
        let opts = VhdxOptions::new(NewVhdx::Differencing {
            parent: parent.to_path_buf(),
        });
        vhdx::create::create(path, &opts, &mut none).map(drop)
    } else {
        use vhd1::create::{CreateOptions, NewDisk};
        let opts = CreateOptions {
            kind: NewDisk::Differencing {
                parent: parent.to_path_buf(),
            },
            exact_size: false,
        };
        vhd1::create::create(path, &opts, &mut none).map(drop)
    }
}

/// Opens a parent in a chain: read-only, shared lock, with its own ancestors.
pub(crate) fn open_parent(path: &Path, seen: &mut HashSet<PathBuf>) -> Result<Box<dyn Disk>> {
    open_with(&HostStorage, path, true, seen)
}

/// The identity a disk file presents to its differencing children: a VHD's
/// unique ID, a VHDX's DataWriteGuid (in its on-disk byte order). `None` when
/// the format has none to check (raw).
pub fn parent_identity(path: &Path) -> Result<Option<[u8; 16]>> {
    match detect_format(path)? {
        Format::Vhd => {
            let img = vhd1::VhdImage::inspect(path)?;
            Ok(Some(img.footer().unique_id))
        }
        Format::Vhdx => {
            let img = vhdx::VhdxImage::inspect(path)?;
            Ok(Some(img.header()?.data_write_guid.to_bytes_le()))
        }
        _ => Ok(None),
    }
}
