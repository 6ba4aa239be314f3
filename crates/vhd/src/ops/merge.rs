//! `merge`: folds a differencing disk into its parent or any ancestor (Hyper-V's
//! Merge-VHD).
//!
//! The layers between the child and the target are copied into the target from
//! the bottom up, each one's allocated data only. The target's own content
//! changes, but everything written to it is still covered by the layers above, so
//! the chain through the child reads identically at every moment: a crash or a
//! cancel mid-way leaves a chain that reads as before. Only when the target has
//! been flushed are the merged-away files removed, child first.

use std::path::{Path, PathBuf};

use crate::backing::{parent_dir, HostStorage, Storage};
use crate::progress::Progress;
use crate::vhd1::{chain, DiskType, VhdImage};
use crate::{Allocation, Disk, Error, Result};

/// Largest single copy.
const CHUNK: u64 = 4 << 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeResult {
    /// The disk that now holds the content.
    pub into: PathBuf,
    /// The files merged away and removed, child first.
    pub removed: Vec<PathBuf>,
    /// Bytes of allocated data copied.
    pub bytes_merged: u64,
}

fn invalid(path: &Path, what: String) -> Error {
    crate::vhd1::Error::Invalid {
        path: path.to_path_buf(),
        what,
    }
    .into()
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The layers from `child` down to (not including) the target, and the target.
fn plan(child: &Path, into: Option<&Path>) -> Result<(Vec<PathBuf>, PathBuf)> {
    let mut layers = vec![child.to_path_buf()];
    loop {
        let current = layers.last().cloned().unwrap_or_default();
        let img = VhdImage::inspect(&current)?;
        if img.footer().disk_type != DiskType::Differencing {
            let what = match into {
                Some(t) => format!("{} is not an ancestor of {}", t.display(), child.display()),
                None => "is not a differencing disk: there is nothing to merge it into".into(),
            };
            return Err(invalid(if into.is_some() { child } else { &current }, what));
        }
        let parent = chain::resolve_parent(&img)?;
        if into.is_none_or(|t| same_file(t, &parent)) {
            return Ok((layers, parent));
        }
        if layers.iter().any(|l| same_file(l, &parent)) || layers.len() > 256 {
            return Err(crate::vhd1::Error::ParentLoop {
                child: child.to_path_buf(),
                repeated: parent,
            }
            .into());
        }
        layers.push(parent);
    }
}

/// Merges `child` into its parent, or into the ancestor `into`.
pub fn merge(
    child: &Path,
    into: Option<&Path>,
    progress: &mut dyn Progress,
) -> Result<MergeResult> {
    merge_on(&HostStorage, child, into, progress)
}

/// [`merge`] on the given storage.
///
/// A crash while the merged-away files are being removed (the last step) can
/// leave some of the intermediate ones behind: the child is always removed
/// first, and what remains is no longer part of any chain and safe to delete.
pub fn merge_on(
    storage: &dyn Storage,
    child: &Path,
    into: Option<&Path>,
    progress: &mut dyn Progress,
) -> Result<MergeResult> {
    // The whole chain must open cleanly (IDs, locators) before anything changes.
    drop(crate::open(child, true)?);
    let (layers, target_path) = plan(child, into)?;
    // The merged-away layers are locked exclusively: no VM or tool may use them.
    let handles: Vec<VhdImage> = layers
        .iter()
        .map(|p| VhdImage::open_layer_on(storage, p, false))
        .collect::<Result<_>>()?;
    let target = crate::open_on(storage, &target_path, false)?;
    let total: u64 = handles.iter().map(VhdImage::allocated_bytes).sum();
    let mut done = 0;
    for layer in handles.iter().rev() {
        copy_allocated(layer, target.as_ref(), &mut done, total, progress)?;
    }
    target.flush()?;
    drop(target);
    drop(handles);
    for l in &layers {
        storage.remove(l)?;
    }
    storage.sync_dir(parent_dir(child))?;
    progress.update(total, total);
    Ok(MergeResult {
        into: target_path,
        removed: layers,
        bytes_merged: done,
    })
}

/// Copies the data `layer` itself holds into `target`.
fn copy_allocated(
    layer: &VhdImage,
    target: &dyn Disk,
    done: &mut u64,
    total: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let size = layer.size().min(target.size());
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        let st = layer.block_status(off, (size - off).min(CHUNK))?;
        if st.allocation == Allocation::Data {
            let b = &mut buf[..st.len as usize];
            layer.read_at(b, off)?;
            target.write_at(b, off)?;
            *done += st.len;
            if !progress.update((*done).min(total), total) {
                target.flush()?;
                return Err(Error::Cancelled {
                    what: format!(
                        "the chain of {} (it reads as before the merge)",
                        layer.file_path().display()
                    ),
                });
            }
        }
        off += st.len;
    }
    Ok(())
}
