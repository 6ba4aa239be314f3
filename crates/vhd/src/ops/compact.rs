//! `compact`: drops the all-zero blocks of a dynamic VHD and shrinks the file.
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
