//! Live merge: folds one layer of the chain a running VM is served from into
//! its parent while the VM keeps reading and writing (Hyper-V merges a deleted
//! checkpoint's disk this way without stopping the guest).
//!
//! The served disk is first wrapped in a [`Tracked`] disk, which records every
//! range the guest writes and can hold the guest's I/O for a moment. Then:
//!
//! 1. The layer's allocated data is copied into the parent through a second,
//!    writable handle on the parent. The chain the guest reads through still
//!    reads identically: everything written to the parent is covered by the
//!    layer above it. The parent keeps its identity (a VHDX's DataWriteGuid),
//!    so every child still links to it and a merge stopped here (a cancel, a
//!    crash of the worker) leaves a valid chain that reads as before.
//! 2. When the layer is the running leaf, the ranges the guest wrote meanwhile
//!    are copied again, round after round, until few are left.
//! 3. The guest's I/O is held: the last ranges the guest wrote to the merged
//!    leaf are copied (none for a frozen layer: the leaf above it keeps its
//!    writes), the parent is flushed, the old chain is closed (its locks go),
//!    the merged layer's own child is re-pointed at the parent (a frozen
//!    layer), the new chain is opened with the usual locks, `commit` runs (the
//!    caller records, durably, that the parent now holds the current data),
//!    and the guest continues on the new chain. Only this step pauses I/O.
//!
//! Nothing is removed: the caller deletes the merged layer after recording
//! the new chain.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::backing::HeldStorage;
use crate::ops::merge::{copy_allocated, copy_runs, same_file, CopyPath};
use crate::progress::NoProgress;
use crate::progress::Progress;
use crate::vhd1::VhdImage;
use crate::vhdx::VhdxImage;
use crate::{BlockStatus, Disk, Error, FileExtent, Result};

/// Granularity of the written-ranges map.
const DIRTY_GRAIN: u64 = 64 * 1024;
/// Rounds of re-copying written ranges before I/O is held regardless.
const MAX_ROUNDS: u32 = 16;
/// Written data small enough to copy while the guest's I/O is held.
const FINAL_COPY_BYTES: u64 = 16 << 20;
const FILE_TO_FILE: CopyPath = CopyPath::FileToFile;

fn invalid(path: &Path, what: String) -> Error {
    crate::vhd1::Error::Invalid {
        path: path.to_path_buf(),
        what,
    }
    .into()
}

/// Which ranges of a disk were written, at [`DIRTY_GRAIN`] granularity; marked
/// without locks from any thread.
struct DirtyMap {
    words: Vec<AtomicU64>,
    size: u64,
}

impl DirtyMap {
    fn new(size: u64) -> Self {
        let grains = size.div_ceil(DIRTY_GRAIN);
        Self {
            words: (0..grains.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            size,
        }
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_GRAIN;
        let last = (offset.saturating_add(len) - 1).min(self.size.saturating_sub(1)) / DIRTY_GRAIN;
        for g in first..=last {
            if let Some(w) = self.words.get((g / 64) as usize) {
                w.fetch_or(1 << (g % 64), Ordering::AcqRel);
            }
        }
    }

    /// The marked ranges (merged where adjacent), clearing them.
    fn take(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = (i as u64 * 64 + b) * DIRTY_GRAIN;
                if start >= self.size {
                    continue;
                }
                let len = DIRTY_GRAIN.min(self.size - start);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += len,
                    _ => out.push((start, len)),
                }
            }
        }
        out
    }
}

/// A served disk during a live merge: forwards every request to the chain it
/// wraps, records the ranges written, and lets the merge hold I/O for its last
/// step. Serve it in place of the chain (a disk server's `switch`) before
/// [`merge_live`] and switch back to what that returns afterwards. The same
/// hold lets [`Tracked::reopen`] close the chain and serve another in its
/// place (a checkpoint's new layer over the leaf).
pub struct Tracked {
    inner: RwLock<Arc<dyn Disk>>,
    dirty: DirtyMap,
    size: u64,
    logical: u32,
    physical: u32,
    read_only: bool,
    path: Option<PathBuf>,
}

impl Tracked {
    pub fn new(chain: Arc<dyn Disk>) -> Self {
        Self {
            dirty: DirtyMap::new(chain.size()),
            size: chain.size(),
            logical: chain.logical_sector_size(),
            physical: chain.physical_sector_size(),
            read_only: chain.read_only(),
            path: chain.path().map(Path::to_path_buf),
            inner: RwLock::new(chain),
        }
    }

    /// Closes the chain served through this disk and serves what `open_new`
    /// opens in its place, while requests wait: for a new chain that needs
    /// the old one's files free (a differencing child made over its leaf,
    /// which must be flushed, closed and unlocked first). When `open_new`
    /// fails, the old chain is opened again from its top file and served.
    pub fn reopen(&self, open_new: impl FnOnce() -> Result<Arc<dyn Disk>>) -> Result<()> {
        let mut slot = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let top = self
            .path
            .clone()
            .ok_or_else(|| invalid(Path::new(""), "the served disk has no file".into()))?;
        slot.flush()?;
        wait_sole_handle(&slot, &top)?;
        *slot = Arc::new(Detached {
            size: self.size,
            logical: self.logical,
            read_only: self.read_only,
        });
        match open_new() {
            Ok(new) => {
                *slot = new;
                Ok(())
            }
            Err(e) => Err(match crate::open(&top, self.read_only) {
                Ok(old) => {
                    *slot = Arc::from(old);
                    e
                }
                Err(again) => invalid(
                    &top,
                    format!("{e}; and the chain cannot be opened again ({again}): the disk fails every request until it is switched"),
                ),
            }),
        }
    }

    /// The chain served through this disk now.
    pub fn inner(&self) -> Arc<dyn Disk> {
        self.get().clone()
    }

    fn get(&self) -> std::sync::RwLockReadGuard<'_, Arc<dyn Disk>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a request that writes `[offset, offset + len)` on the chain and
    /// marks that range before letting go of the chain. The mark must happen
    /// while the request still holds the chain: the merge's last step takes
    /// the chain exclusively and then the marked ranges, so every write that
    /// reached the old chain is marked by then and copied. Marked after the
    /// write: a range copied after its mark holds the new data, and one copied
    /// before it is marked for the next round. (Marked only after the chain
    /// was let go, a write delayed there, a thread preempted on a loaded
    /// host, could land in the leaf after its last copy and be lost.)
    fn written<T>(
        &self,
        offset: u64,
        len: u64,
        write: impl FnOnce(&dyn Disk) -> Result<T>,
    ) -> Result<T> {
        let chain = self.get();
        let r = write(chain.as_ref());
        #[cfg(test)]
        tests::before_mark();
        self.dirty.mark(offset, len);
        drop(chain);
        r
    }
}

impl Disk for Tracked {
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.logical
    }
    fn physical_sector_size(&self) -> u32 {
        self.physical
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.get().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.written(offset, buf.len() as u64, |d| d.write_at(buf, offset))
    }
    fn flush(&self) -> Result<()> {
        self.get().flush()
    }
    fn settle(&self) -> Result<()> {
        self.get().settle()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.written(offset, len, |d| d.write_zeroes(offset, len))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.written(offset, len, |d| d.discard(offset, len))
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.get().block_status(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    fn data_extent(&self, offset: u64, len: u64) -> Result<Option<FileExtent>> {
        self.get().data_extent(offset, len)
    }
    fn prepare_extent_write(&self, _offset: u64, _len: u64) -> Result<Option<FileExtent>> {
        // No: between a caller's prepare and its commit the merge's last step
        // may close the chain, and the bytes would land in the merged layer
        // after its last copy while the commit marked them in the parent.
        // Writes during a live merge go through `write_at`, one call under
        // one lock.
        Ok(None)
    }
    fn commit_extent_write(&self, offset: u64, len: u64) -> Result<()> {
        self.written(offset, len, |d| d.commit_extent_write(offset, len))
    }
}

/// Stands in for the chain while the last step of a live merge has closed it
/// (never seen by a request: I/O is held meanwhile), and stays if the chain
/// cannot be opened again, so requests fail instead of reaching stale files.
struct Detached {
    size: u64,
    logical: u32,
    read_only: bool,
}

impl Detached {
    fn err(&self) -> Error {
        Error::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(
                "the disk's chain could not be reopened after a live merge",
            ),
        }
    }
}

impl Disk for Detached {
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.logical
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
        Err(self.err())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
        Err(self.err())
    }
    fn flush(&self) -> Result<()> {
        Err(self.err())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<()> {
        Err(self.err())
    }
    fn block_status(&self, _: u64, _: u64) -> Result<BlockStatus> {
        Err(self.err())
    }
}

/// What a live merge did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveMergeReport {
    /// The file the served chain's top is now (the parent, when the running
    /// leaf was merged).
    pub top: PathBuf,
    /// The merged layer's child re-pointed at the parent, if any.
    pub relinked: Option<PathBuf>,
    /// Bytes copied, counting ranges the guest wrote meanwhile again.
    pub bytes_copied: u64,
    /// Copy rounds before the last step (1 for a frozen layer).
    pub rounds: u32,
    /// How long the guest's I/O was held in the last step.
    pub io_paused_ms: u64,
}

/// The files of the chain on top of `top`, top first.
fn chain_files(top: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![top.to_path_buf()];
    loop {
        let current = out.last().cloned().unwrap_or_default();
        let info = crate::ops::info::layer_info(&current)?;
        let Some(parent) = info.parent else {
            return Ok(out);
        };
        let Some(p) = parent.resolved_path else {
            return Err(invalid(
                &current,
                format!(
                    "its parent cannot be found{}",
                    parent.problem.map(|p| format!(": {p}")).unwrap_or_default()
                ),
            ));
        };
        if out.len() > 256 || out.iter().any(|o| same_file(o, &p)) {
            return Err(crate::vhd1::Error::ParentLoop {
                child: current,
                repeated: p,
            }
            .into());
        }
        out.push(p);
    }
}

/// The parent merged into, opened writable without a lock of its own: the
/// running chain already holds it shared, which keeps every other writer out.
enum Parent {
    Vhd(Box<dyn Disk>),
    Vhdx(Box<VhdxImage>),
}

impl Parent {
    fn open(path: &Path) -> Result<Self> {
        Ok(match crate::detect_format(path)? {
            crate::Format::Vhdx => {
                let img = crate::vhdx::chain::open_chain_on(
                    &HeldStorage,
                    path,
                    false,
                    &mut std::collections::HashSet::new(),
                )?;
                // The children keep linking to the parent: what they read does
                // not change (see the module comment).
                let guid = img.header()?.data_write_guid;
                img.plan_data_write_guid(guid)?;
                Parent::Vhdx(Box::new(img))
            }
            crate::Format::Vhd => Parent::Vhd(crate::open_on(&HeldStorage, path, false)?),
            crate::Format::Raw => {
                return Err(invalid(
                    path,
                    "is a raw image: only a VHD or VHDX parent can take a live merge".into(),
                ))
            }
        })
    }

    fn disk(&self) -> &dyn Disk {
        match self {
            Parent::Vhd(d) => d.as_ref(),
            Parent::Vhdx(i) => i.as_ref(),
        }
    }

    /// Flushes and closes; a VHDX takes the merged child's virtual-disk
    /// metadata first (MS-VHDX 2.6.1.2).
    fn finish(self, child: &Path) -> Result<()> {
        match self {
            Parent::Vhd(d) => d.flush(),
            Parent::Vhdx(mut t) => {
                t.flush()?;
                if crate::detect_format(child)? == crate::Format::Vhdx {
                    let c = VhdxImage::inspect(child)?;
                    t.adopt_virtual_disk_metadata(c.metadata())?;
                }
                t.close()
            }
        }
    }
}

/// A frozen layer opened to be read (shared lock, as the running chain has it).
fn open_frozen(path: &Path) -> Result<Box<dyn Disk>> {
    Ok(match crate::detect_format(path)? {
        crate::Format::Vhdx => Box::new(VhdxImage::open_layer(path, true)?),
        _ => Box::new(VhdImage::open_layer(path, true)?),
    })
}

/// Merges `layer` into its parent `into` while `served` keeps serving the
/// chain it wraps (whose top is `layer` itself or a descendant of it). See
/// the module comment for the steps. `commit` runs while I/O is held, once
/// the new chain is open and before it serves anything: a failure there
/// puts the old chain back. `progress` may cancel until the last step; the
/// chain then reads as before. Returns the new chain, which the caller
/// serves in place of `served`.
pub fn merge_live(
    served: &Tracked,
    layer: &Path,
    into: &Path,
    commit: &mut dyn FnMut() -> Result<()>,
    progress: &mut dyn Progress,
) -> Result<(Arc<dyn Disk>, LiveMergeReport)> {
    let top = served
        .path
        .clone()
        .ok_or_else(|| invalid(layer, "the served disk has no file".into()))?;
    let files = chain_files(&top)?;
    let Some(at) = files.iter().position(|f| same_file(f, layer)) else {
        return Err(invalid(
            layer,
            format!("is not in the chain served from {}", top.display()),
        ));
    };
    if !files.get(at + 1).is_some_and(|p| same_file(p, into)) {
        return Err(invalid(
            layer,
            format!("its parent is not {}", into.display()),
        ));
    }
    let running_leaf = at == 0;
    let child = (!running_leaf).then(|| files[at - 1].clone());
    if served.read_only {
        return Err(invalid(&top, "is served read-only".into()));
    }
    let parent = Parent::open(into)?;
    if parent.disk().size() != served.size {
        return Err(invalid(
            into,
            format!(
                "its size ({} bytes) differs from the running disk's ({} bytes): the disk was resized after the checkpoint; merge it while the VM is off",
                parent.disk().size(),
                served.size
            ),
        ));
    }
    let frozen = if running_leaf {
        None
    } else {
        Some(open_frozen(layer)?)
    };
    let total = crate::ops::info::layer_info(layer)
        .map(|i| i.allocated_bytes)
        .unwrap_or(0)
        .max(1);
    let mut copied = 0u64;
    let mut rounds = 1;
    {
        let inner = served.inner();
        let from: &dyn Disk = frozen.as_deref().unwrap_or(inner.as_ref());
        copy_allocated(
            from,
            parent.disk(),
            CopyPath::FileToFile,
            &mut copied,
            total,
            progress,
        )?;
    }
    let mut pending = Vec::new();
    if running_leaf {
        loop {
            pending = served.dirty.take();
            let bytes: u64 = pending.iter().map(|r| r.1).sum();
            if bytes <= FINAL_COPY_BYTES || rounds >= MAX_ROUNDS {
                break;
            }
            let inner = served.inner();
            let from = inner.as_ref();
            copy_runs(
                from,
                parent.disk(),
                &pending,
                FILE_TO_FILE,
                &mut copied,
                total,
                progress,
            )?;
            rounds += 1;
        }
    }
    parent.disk().flush()?;

    // The last step: the guest's I/O waits from here to the end.
    let mut slot = served.inner.write().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    if running_leaf {
        // The last ranges the guest wrote to the merged leaf. Not for a frozen
        // layer: the guest writes to a leaf above it, which stays, and the
        // parent must not take those writes (it now stands for the frozen
        // layer, a checkpoint other branches may read through).
        pending.extend(served.dirty.take());
        // No cancel from here: the guest waits.
        copy_runs(
            slot.as_ref(),
            parent.disk(),
            &pending,
            FILE_TO_FILE,
            &mut copied,
            total,
            &mut NoProgress,
        )?;
    }
    parent.finish(layer)?;
    drop(frozen);
    slot.flush()?;
    wait_sole_handle(&slot, &top)?;
    // Closing the old chain releases its files and locks.
    *slot = Arc::new(Detached {
        size: served.size,
        logical: served.logical,
        read_only: served.read_only,
    });
    let new_top = if running_leaf {
        into.to_path_buf()
    } else {
        top.clone()
    };
    let switched = (|| {
        if let Some(c) = &child {
            // The child expected the layer's identity; the parent now reads as
            // the layer did, so the child takes the parent's.
            crate::ops::set_parent::set_parent(c, into, true)?;
        }
        let new: Arc<dyn Disk> = Arc::from(crate::open(&new_top, false)?);
        commit()?;
        Ok(new)
    })();
    let new = match switched {
        Ok(new) => new,
        Err(e) => {
            // The old chain reads as before (a re-pointed child reads the same
            // through the parent): serve it again.
            return Err(match crate::open(&top, false) {
                Ok(old) => {
                    *slot = Arc::from(old);
                    e
                }
                Err(again) => invalid(
                    &top,
                    format!("the live merge's last step failed ({e}) and the chain cannot be opened again ({again}); the disk fails every request until it is switched"),
                ),
            });
        }
    };
    *slot = new.clone();
    let paused = started.elapsed();
    drop(slot);
    progress.update(total, total);
    Ok((
        new,
        LiveMergeReport {
            top: new_top,
            relinked: child,
            bytes_copied: copied,
            rounds,
            io_paused_ms: paused.as_millis() as u64,
        },
    ))
}

/// Waits (briefly) until `old` is the only handle on the chain: a request may
/// hold one for a moment. Only then does replacing it close the files.
fn wait_sole_handle(old: &Arc<dyn Disk>, top: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(old) > 1 {
        if Instant::now() >= deadline {
            return Err(invalid(
                top,
                "the running chain is still referenced elsewhere; it cannot be closed for the merge's last step".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::mpsc;

    use super::*;
    use crate::vhd1::create::{create, CreateOptions, NewDisk};
    use crate::vhdx::create::{create as create_vhdx, NewVhdx, VhdxOptions};

    const MIB: u64 = 1 << 20;

    thread_local! {
        /// Runs once on the writing thread after a write through a [`Tracked`]
        /// reached the chain and before its range is marked.
        static BEFORE_MARK: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
    }

    pub(super) fn before_mark() {
        if let Some(f) = BEFORE_MARK.with(|h| h.borrow_mut().take()) {
            f();
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Format {
        Vhd,
        Vhdx,
    }

    /// A dynamic `base` of 8 MiB and a differencing `mid` over it.
    fn new_chain(f: Format, base: &Path, mid: &Path) {
        match f {
            Format::Vhd => {
                let opts = |kind| CreateOptions {
                    kind,
                    exact_size: true,
                };
                let dynamic = NewDisk::Dynamic {
                    size: 8 * MIB,
                    block_size: 2 * MIB as u32,
                };
                create(base, &opts(dynamic), &mut NoProgress).unwrap();
                let diff = NewDisk::Differencing {
                    parent: base.to_path_buf(),
                };
                create(mid, &opts(diff), &mut NoProgress).unwrap();
            }
            Format::Vhdx => {
                let mut opts = VhdxOptions::new(NewVhdx::Dynamic { size: 8 * MIB });
                opts.block_size = Some(MIB as u32);
                create_vhdx(base, &opts, &mut NoProgress).unwrap();
                let diff = VhdxOptions::new(NewVhdx::Differencing {
                    parent: base.to_path_buf(),
                });
                create_vhdx(mid, &diff, &mut NoProgress).unwrap();
            }
        }
    }

    /// The interleaving a loaded host produced: a guest write reaches the
    /// leaf after the leaf's first copy of that range, and the writing thread
    /// is then held up (preempted) before its range is marked while the merge
    /// runs on to its last step. The last step must wait for that mark, or the
    /// write stays behind in the merged-away leaf.
    #[test]
    fn a_write_held_up_before_its_mark_reads_back_after_the_merge() {
        for f in [Format::Vhd, Format::Vhdx] {
            write_held_up_before_its_mark(f);
        }
    }

    fn write_held_up_before_its_mark(f: Format) {
        let dir = tempfile::tempdir().unwrap();
        let (base, mid) = match f {
            Format::Vhd => (dir.path().join("base.vhd"), dir.path().join("mid.avhd")),
            Format::Vhdx => (dir.path().join("base.vhdx"), dir.path().join("mid.avhdx")),
        };
        new_chain(f, &base, &mid);
        let old = vec![0x11u8; MIB as usize];
        {
            let d = crate::open(&mid, false).unwrap();
            d.write_at(&old, 0).unwrap();
            d.write_at(&old, 4 * MIB).unwrap();
            d.flush().unwrap();
        }
        let chain: Arc<dyn Disk> = Arc::from(crate::open(&mid, false).unwrap());
        let tracked = Arc::new(Tracked::new(chain));

        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (landed_tx, landed_rx) = mpsc::channel::<()>();
        let (merged_tx, merged_rx) = mpsc::channel::<()>();
        let new = vec![0x22u8; 4096];
        let guest = {
            let tracked = tracked.clone();
            let new = new.clone();
            std::thread::spawn(move || {
                go_rx.recv_timeout(Duration::from_secs(30)).unwrap();
                BEFORE_MARK.with(|h| {
                    *h.borrow_mut() = Some(Box::new(move || {
                        landed_tx.send(()).unwrap();
                        // Held up until the merge has finished, or for a
                        // second when the merge (rightly) waits for this write.
                        let _ = merged_rx.recv_timeout(Duration::from_secs(1));
                    }))
                });
                tracked.write_at(&new, 0).unwrap();
            })
        };

        let mut calls = 0;
        let mut progress = |_: u64, _: u64| {
            calls += 1;
            if calls == 1 {
                // The first run [0, 1 MiB) is copied: now the guest writes into it.
                go_tx.send(()).unwrap();
                landed_rx.recv_timeout(Duration::from_secs(30)).unwrap();
            }
            true
        };
        let (served, _) = merge_live(&tracked, &mid, &base, &mut || Ok(()), &mut progress).unwrap();
        let _ = merged_tx.send(());
        guest.join().unwrap();

        let mut got = vec![0u8; 4096];
        tracked.read_at(&mut got, 0).unwrap();
        assert!(
            got == new,
            "{f:?}: the served disk lost the guest's write at byte 0: it reads {:#x}",
            got[0]
        );
        served.read_at(&mut got, 0).unwrap();
        assert!(
            got == new,
            "{f:?}: the new chain lost the guest's write at byte 0: it reads {:#x}",
            got[0]
        );
        drop((served, tracked));
        let reopened = crate::open(&base, true).unwrap();
        reopened.read_at(&mut got, 0).unwrap();
        assert!(
            got == new,
            "{f:?}: the merged base lost the guest's write at byte 0: it reads {:#x}",
            got[0]
        );
    }
}
