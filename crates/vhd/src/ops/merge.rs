//! `merge`: folds a differencing disk into its parent or any ancestor (Hyper-V's
//! Merge-VHD).
//!
//! The layers between the child and the target are copied into the target from
//! the bottom up, each one's allocated data only. The target's own content
//! changes, but everything written to it is still covered by the layers above, so
//! the chain through the child reads identically at every moment: a crash or a
//! cancel mid-way leaves a chain that reads as before. Only when the target has
//! been flushed are the merged-away files removed, child first.
//!
//! Data is copied file to file where both sides can say where its bytes live
//! ([`Disk::data_extent`], [`Disk::prepare_extent_write`]): with
//! `copy_file_range(2)` on the host ([`crate::BackingFile::copy_range`]), one
//! copy inside the kernel instead of two through user space. The target's
//! block is allocated before the copy and its sectors are marked present after
//! it, exactly as a [`Disk::write_at`] does, so the target's write ordering
//! (data, then bitmap and BAT at the flush) is unchanged. Anything else (a raw
//! target, runs not on whole sectors of the target) goes through a buffer.
//!
//! Ranges a layer records as zeros (a VHDX ZERO block) are zeroed in the
//! target. Merging a VHDX child into a VHDX follows MS-VHDX 2.6.1.2: the
//! target's virtual-disk metadata (IsVirtualDisk items: virtual disk ID,
//! sector sizes, size) becomes the child's; a child grown past its parent
//! grows the target first.

use std::path::{Path, PathBuf};

use crate::backing::{parent_dir, HostStorage, Storage};
use crate::progress::Progress;
use crate::vhd1::{chain, DiskType, VhdImage};
use crate::vhdx::VhdxImage;
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

/// Whether two paths name the same existing file.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
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
        let img = Layer::inspect(&current)?;
        if !img.is_differencing() {
            let what = match into {
                Some(t) => format!("{} is not an ancestor of {}", t.display(), child.display()),
                None => "is not a differencing disk: there is nothing to merge it into".into(),
            };
            return Err(invalid(if into.is_some() { child } else { &current }, what));
        }
        let parent = img.parent()?;
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

/// How a merge moves the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyPath {
    /// File to file wherever both disks can say where the bytes live (inside
    /// the kernel for host files), through a buffer elsewhere.
    #[default]
    FileToFile,
    /// Every byte read into a buffer and written from it: the path before
    /// file-to-file copies, kept so benchmarks can compare the two.
    Buffered,
}

/// Merges `child` into its parent, or into the ancestor `into`.
pub fn merge(
    child: &Path,
    into: Option<&Path>,
    progress: &mut dyn Progress,
) -> Result<MergeResult> {
    merge_on(&HostStorage, child, into, progress)
}

/// Like [`merge`], but leaves the merged-away files in place (`removed` is empty):
/// for a caller that must first re-point the merged layer's own children at the
/// target (a checkpoint tree) and removes the layers itself afterwards. Running
/// it again after a crash copies the same data again: it is idempotent.
pub fn merge_keeping_layers(
    child: &Path,
    into: &Path,
    progress: &mut dyn Progress,
) -> Result<MergeResult> {
    merge_impl(
        &HostStorage,
        child,
        Some(into),
        false,
        CopyPath::default(),
        progress,
    )
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
    merge_impl(storage, child, into, true, CopyPath::default(), progress)
}

/// How [`merge_with`] runs: the choices [`merge_on`] and
/// [`merge_keeping_layers`] make, open for benchmarks and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MergeOptions {
    pub copy: CopyPath,
    /// Leave the merged-away files in place, as [`merge_keeping_layers`] does.
    pub keep_layers: bool,
}

/// [`merge_on`] with the given options.
pub fn merge_with(
    storage: &dyn Storage,
    child: &Path,
    into: Option<&Path>,
    options: MergeOptions,
    progress: &mut dyn Progress,
) -> Result<MergeResult> {
    merge_impl(
        storage,
        child,
        into,
        !options.keep_layers,
        options.copy,
        progress,
    )
}

fn merge_impl(
    storage: &dyn Storage,
    child: &Path,
    into: Option<&Path>,
    remove_layers: bool,
    copy: CopyPath,
    progress: &mut dyn Progress,
) -> Result<MergeResult> {
    // The whole chain must open cleanly (IDs, locators) before anything changes.
    drop(crate::open(child, true)?);
    let (layers, target_path) = plan(child, into)?;
    // The merged-away layers are locked exclusively: no VM or tool may use them.
    let mut handles: Vec<Layer> = layers
        .iter()
        .map(|p| Layer::open(storage, p))
        .collect::<Result<_>>()?;
    let mut target = Target::open(storage, &target_path)?;
    if let (Target::Vhdx(t), Some(Layer::Vhdx(above))) = (&target, handles.last_mut()) {
        // MS-VHDX 2.6.2.6.3: the target's new DataWriteGuid goes into the
        // child above it (parent_linkage2) before the target changes, so the
        // chain links whichever GUID a crash leaves the target with.
        let guid = uuid::Uuid::new_v4();
        let mut loc = above.metadata().parent_locator.clone().unwrap_or_default();
        loc.set(
            crate::vhdx::chain::PARENT_LINKAGE2,
            Some(crate::vhdx::braced(&guid)),
        );
        above.relink_parent(loc)?;
        t.plan_data_write_guid(guid)?;
    }
    if let (Target::Vhdx(t), Some(Layer::Vhdx(c))) = (&mut target, handles.first()) {
        if c.size() > t.size() {
            let size = c.size();
            t.resize(size)?;
        }
    }
    let total: u64 = handles.iter().map(Layer::allocated_bytes).sum();
    let mut done = 0;
    for layer in handles.iter().rev() {
        copy_allocated(
            layer.disk(),
            target.disk(),
            copy,
            &mut done,
            total,
            progress,
        )?;
    }
    target.disk().flush()?;
    match (target, handles.first()) {
        (Target::Vhdx(mut t), Some(Layer::Vhdx(c))) => {
            t.adopt_virtual_disk_metadata(c.metadata())?;
            t.close()?;
        }
        (t, _) => drop(t),
    }
    drop(handles);
    if !remove_layers {
        progress.update(total, total);
        return Ok(MergeResult {
            into: target_path,
            removed: Vec::new(),
            bytes_merged: done,
        });
    }
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

/// One layer of the chain, VHD or VHDX.
enum Layer {
    Vhd(VhdImage),
    Vhdx(VhdxImage),
}

impl Layer {
    fn inspect(path: &Path) -> Result<Self> {
        Ok(match crate::detect_format(path)? {
            crate::Format::Vhdx => Layer::Vhdx(VhdxImage::inspect(path)?),
            _ => Layer::Vhd(VhdImage::inspect(path)?),
        })
    }

    /// Opens a layer to be merged away, locked exclusively.
    fn open(storage: &dyn Storage, path: &Path) -> Result<Self> {
        Ok(match crate::detect_format(path)? {
            crate::Format::Vhdx => Layer::Vhdx(VhdxImage::open_layer_on(storage, path, false)?),
            _ => Layer::Vhd(VhdImage::open_layer_on(storage, path, false)?),
        })
    }

    fn is_differencing(&self) -> bool {
        match self {
            Layer::Vhd(i) => i.footer().disk_type == DiskType::Differencing,
            Layer::Vhdx(i) => i.is_differencing(),
        }
    }

    fn parent(&self) -> Result<PathBuf> {
        match self {
            Layer::Vhd(i) => chain::resolve_parent(i),
            Layer::Vhdx(i) => crate::vhdx::chain::resolve_parent(i),
        }
    }

    fn disk(&self) -> &dyn Disk {
        match self {
            Layer::Vhd(i) => i,
            Layer::Vhdx(i) => i,
        }
    }

    fn allocated_bytes(&self) -> u64 {
        match self {
            Layer::Vhd(i) => i.allocated_bytes(),
            Layer::Vhdx(i) => i.allocated_bytes(),
        }
    }
}

/// The disk merged into: a VHDX is kept as such for its metadata update.
enum Target {
    Any(Box<dyn Disk>),
    Vhdx(Box<VhdxImage>),
}

impl Target {
    fn open(storage: &dyn Storage, path: &Path) -> Result<Self> {
        Ok(match crate::detect_format(path)? {
            crate::Format::Vhdx => Target::Vhdx(Box::new(crate::vhdx::chain::open_chain_on(
                storage,
                path,
                false,
                &mut std::collections::HashSet::new(),
            )?)),
            _ => Target::Any(crate::open_on(storage, path, false)?),
        })
    }

    fn disk(&self) -> &dyn Disk {
        match self {
            Target::Any(d) => d.as_ref(),
            Target::Vhdx(i) => i.as_ref(),
        }
    }
}

/// Copies the data `layer` itself holds into `target`, and zeroes there what
/// it records as zeros.
pub(crate) fn copy_allocated(
    layer: &dyn Disk,
    target: &dyn Disk,
    copy: CopyPath,
    done: &mut u64,
    total: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let size = layer.size().min(target.size());
    copy_runs(layer, target, &[(0, size)], copy, done, total, progress)
}

/// Copies into `target` what `layer` itself holds in each of `runs`
/// (offset, length): its data, its zeros; ranges it holds nothing for read
/// through to the target already. Adds the bytes of data copied to `done`
/// and reports them against `total`; when `progress` asks to stop, flushes
/// the target and returns [`Error::Cancelled`].
pub(crate) fn copy_runs(
    layer: &dyn Disk,
    target: &dyn Disk,
    runs: &[(u64, u64)],
    copy: CopyPath,
    done: &mut u64,
    total: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let mut buf = Vec::new();
    for &(start, len) in runs {
        let end = start + len;
        let mut off = start;
        while off < end {
            let st = layer.block_status(off, (end - off).min(CHUNK))?;
            match st.allocation {
                Allocation::Zero => target.write_zeroes(off, st.len)?,
                Allocation::Data => {
                    match copy {
                        CopyPath::FileToFile => {
                            copy_file_to_file(layer, target, off, st.len, &mut buf)?
                        }
                        CopyPath::Buffered => copy_buffered(layer, target, off, st.len, &mut buf)?,
                    }
                    *done += st.len;
                    if !progress.update((*done).min(total), total) {
                        target.flush()?;
                        return Err(Error::Cancelled {
                            what: format!(
                                "the chain of {} (it reads as before the merge)",
                                layer.path().unwrap_or(Path::new("")).display()
                            ),
                        });
                    }
                }
                Allocation::Unallocated => {}
            }
            off += st.len;
        }
    }
    Ok(())
}

/// Copies `[off, off + len)`, all data of `layer`, through `buf`.
fn copy_buffered(
    layer: &dyn Disk,
    target: &dyn Disk,
    off: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.resize(len as usize, 0);
    let b = &mut buf[..len as usize];
    layer.read_at(b, off)?;
    target.write_at(b, off)
}

/// Copies `[off, off + len)`, all data of `layer`, from the layer's file into
/// the target's, a run of contiguous bytes on both sides at a time; what
/// either side cannot place in its file goes through `buf`.
fn copy_file_to_file(
    layer: &dyn Disk,
    target: &dyn Disk,
    off: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let Some(src) = layer.data_extent(pos, end - pos)? else {
            return copy_buffered(layer, target, pos, end - pos, buf);
        };
        let Some(dst) = target.prepare_extent_write(pos, src.len)? else {
            return copy_buffered(layer, target, pos, end - pos, buf);
        };
        dst.file
            .copy_range(src.file.as_ref(), src.offset, dst.offset, dst.len)
            .map_err(|source| Error::Io {
                path: target.path().unwrap_or(Path::new("")).to_path_buf(),
                source,
            })?;
        target.commit_extent_write(pos, dst.len)?;
        pos += dst.len;
    }
    Ok(())
}
