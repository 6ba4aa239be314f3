//! The `Disk` abstraction every Viridian disk format implements, and raw files.
//!
//! A `Disk` is a virtual block device: a byte-addressed, fixed-size address space.
//! Methods take `&self` so one disk can serve several I/O queues at once; each
//! implementation keeps its metadata behind its own locks and does data I/O with
//! positioned reads and writes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backing::BackingFile;
use crate::error::{Error, Result};

/// What one layer of a disk holds for a range of the virtual address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// This layer holds data for the range.
    Data,
    /// This layer records the range as zeros (it does not fall through to a parent).
    Zero,
    /// This layer holds nothing for the range: reads come from the parent, or are
    /// zeros where there is no parent.
    Unallocated,
}

/// The allocation of a run starting at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    pub allocation: Allocation,
    /// Length in bytes of the run with this allocation, starting at the queried
    /// offset; at least one sector and never past the queried range.
    pub len: u64,
}

/// Where a run of a disk's virtual address space is stored in one of its
/// files: `len` bytes, contiguous in `file` from `offset`.
#[derive(Clone)]
pub struct FileExtent {
    pub file: Arc<dyn BackingFile>,
    /// Byte offset in the file of the run's first byte.
    pub offset: u64,
    /// Bytes of the run; never more than was asked for.
    pub len: u64,
}

/// A virtual disk: a VHD, VHDX or raw file, or a chain of differencing layers.
pub trait Disk: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Logical sector size in bytes (512 or 4096).
    fn logical_sector_size(&self) -> u32 {
        512
    }

    /// Physical sector size in bytes, a hint for alignment.
    fn physical_sector_size(&self) -> u32 {
        self.logical_sector_size()
    }

    /// Whether the disk was opened read-only.
    fn read_only(&self) -> bool;

    /// Reads `buf.len()` bytes at `offset`. Reading past `size()` is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`. Writing past `size()` is an error.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes every completed write durable, data and metadata.
    fn flush(&self) -> Result<()>;

    /// Flushes, and leaves the files as a clean close would, while the disk
    /// stays open: a copy taken now, or another program reading the file,
    /// sees a file that needs no recovery step (a VHDX's log applied and
    /// emptied; the next write starts a new session). For formats without such
    /// a step it is [`Self::flush`]. The caller keeps new writes from arriving
    /// (a paused guest) when it copies the files after it.
    fn settle(&self) -> Result<()> {
        self.flush()
    }

    /// Makes the range read as zeros, releasing space where the format can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Tells the disk the range's contents are no longer needed. Afterwards the
    /// range reads as zeros or keeps its old contents, never as another layer's data.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    /// What the top layer of this disk holds at `offset`, for a run of at most `len`
    /// bytes. Used for sparse copies, merge and compact.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;

    /// The file this disk lives in, for messages; `None` for disks not backed by one.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// Where the data the top layer itself holds for the run at `offset` (at
    /// most `len` bytes) is stored, when it is stored contiguously in one
    /// file: the bytes there are exactly what the layer reads for the run.
    /// `None` when this layer holds no data at `offset` (zeros, the parent's,
    /// nothing) or the format cannot say; the caller then reads through
    /// [`Self::read_at`]. Merge uses it to copy file to file.
    fn data_extent(&self, offset: u64, len: u64) -> Result<Option<FileExtent>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Prepares a write of the run at `offset` (at most `len` bytes) that the
    /// caller makes itself, straight into the returned extent of the file (as
    /// with [`crate::BackingFile::copy_range`]): allocates what the run needs,
    /// as [`Self::write_at`] would before its data. Once the bytes are there,
    /// the caller calls [`Self::commit_extent_write`] with the returned run,
    /// which records them as this layer's data the way `write_at` does after
    /// its data; until then the run reads as it did or as the new bytes,
    /// never as anything else. `None` when the disk cannot take such a write
    /// (a run not on whole sectors, a format without one file); the caller
    /// then uses `write_at`.
    fn prepare_extent_write(&self, offset: u64, len: u64) -> Result<Option<FileExtent>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Records the bytes written into an extent from
    /// [`Self::prepare_extent_write`] as this layer's data (in memory; they
    /// reach the file's metadata at the next flush, as with `write_at`).
    fn commit_extent_write(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub fn check_range(path: Option<&Path>, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            path: path.map(Path::to_path_buf).unwrap_or_default(),
            offset,
            len,
            size,
        }),
    }
}

/// A raw image file: the virtual disk is the file's bytes.
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl Drop for RawDisk {
    fn drop(&mut self) {
        crate::host_file::unlock(&self.file);
    }
}

impl RawDisk {
    /// Opens a raw image. Writable opens take an exclusive lock, read-only ones a
    /// shared lock, so two writers on one file are impossible across processes.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = crate::host_file::open_locked(path, read_only)?;
        let size = file
            .metadata()
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
        })
    }

    fn io_err(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(Some(&self.path), self.size, offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(Some(&self.path), self.size, offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err(e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.io_err(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(Some(&self.path), self.size, offset, len)?;
        crate::host_file::punch_hole_or_zero(&self.file, offset, len).map_err(|e| self.io_err(e))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(Some(&self.path), self.size, offset, len)?;
        let (data, run) =
            crate::host_file::seek_data_run(&self.file, offset, len).map_err(|e| self.io_err(e))?;
        Ok(BlockStatus {
            allocation: if data {
                Allocation::Data
            } else {
                Allocation::Unallocated
            },
            len: run,
        })
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

/// Why [`DiskCell::replace`] refused to switch (the old disk stays in place).
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("{new} cannot take the place of {old}: {what}")]
    Mismatch {
        old: String,
        new: String,
        what: String,
    },
    #[error("flushing {path} before switching away from it failed")]
    Flush {
        path: String,
        #[source]
        source: Box<Error>,
    },
}

fn shown(disk: &dyn Disk) -> String {
    disk.path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "an unnamed disk".to_string())
}

/// The disk behind a served drive, which can be switched to another disk (a copy
/// of it) while the drive is served.
///
/// A request holds [`DiskCell::get`]'s read guard while it runs (one uncontended
/// read lock per request: two atomic operations), so [`DiskCell::replace`], which
/// takes the write lock, waits for the requests in flight; they finish on the old
/// disk, which is flushed, and every later request goes to the new one. Take the
/// guard once per request and never while holding it: a second read lock on the
/// same thread can deadlock behind a waiting switch.
pub struct DiskCell {
    disk: std::sync::RwLock<std::sync::Arc<dyn Disk>>,
}

impl DiskCell {
    pub fn new(disk: std::sync::Arc<dyn Disk>) -> Self {
        Self {
            disk: std::sync::RwLock::new(disk),
        }
    }

    /// The disk for one request; hold the guard until the request is done.
    pub fn get(&self) -> std::sync::RwLockReadGuard<'_, std::sync::Arc<dyn Disk>> {
        self.disk.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk served now (a handle that does not hold a switch back).
    pub fn current(&self) -> std::sync::Arc<dyn Disk> {
        self.get().clone()
    }

    /// Waits for the requests in flight, flushes the old disk and puts `new` in
    /// its place; returns the old disk. `new` must have the same size, sector
    /// sizes and read-only mode (what the front end was told); otherwise, or when
    /// the flush fails, nothing changes.
    pub fn replace(
        &self,
        new: std::sync::Arc<dyn Disk>,
    ) -> std::result::Result<std::sync::Arc<dyn Disk>, SwitchError> {
        let mut slot = self.disk.write().unwrap_or_else(|p| p.into_inner());
        let old = slot.clone();
        let same = |what: &str, a: u64, b: u64| {
            if a == b {
                Ok(())
            } else {
                Err(SwitchError::Mismatch {
                    old: shown(old.as_ref()),
                    new: shown(new.as_ref()),
                    what: format!("its {what} is {b}, the served disk's {a}"),
                })
            }
        };
        same("size", old.size(), new.size())?;
        same(
            "logical sector size",
            u64::from(old.logical_sector_size()),
            u64::from(new.logical_sector_size()),
        )?;
        same(
            "read-only flag",
            u64::from(old.read_only()),
            u64::from(new.read_only()),
        )?;
        if !old.read_only() {
            old.flush().map_err(|source| SwitchError::Flush {
                path: shown(old.as_ref()),
                source: Box::new(source),
            })?;
        }
        *slot = new;
        Ok(old)
    }
}

/// Holds a served drive's requests back: while a [`Held`] from [`Gate::hold`]
/// lives, a front end's request waits in [`Gate::enter`] before it touches the
/// disk or the guest's memory. A checkpoint of a running VM holds its drives
/// from the snapshot's instant until the guest's memory is saved (the backend's
/// writes into guest memory are not seen by QEMU's write tracking) and its disks
/// are on their new layers.
///
/// The front end calls `enter` before it takes any lock the VM's own stop path
/// needs (a vhost-user virtqueue's), so QEMU can still stop and start the device
/// while requests wait.
#[derive(Debug, Default)]
pub struct Gate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    holds: usize,
    busy: usize,
}

impl Gate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits while the gate is held, then lets one request (or one batch) in
    /// until the returned pass drops.
    pub fn enter(&self) -> Pass<'_> {
        let mut s = self.state();
        while s.holds > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.busy += 1;
        Pass(self)
    }

    /// Holds every later request back and waits for those already in to finish;
    /// they are held until the returned guard drops.
    pub fn hold(self: &std::sync::Arc<Self>) -> Held {
        let mut s = self.state();
        s.holds += 1;
        while s.busy > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        Held(self.clone())
    }

    /// Whether requests are held now.
    pub fn is_held(&self) -> bool {
        self.state().holds > 0
    }
}

/// One request let in by [`Gate::enter`].
#[derive(Debug)]
pub struct Pass<'a>(&'a Gate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.busy -= 1;
        if s.busy == 0 {
            self.0.changed.notify_all();
        }
    }
}

/// Requests held back by [`Gate::hold`] until this drops.
#[derive(Debug)]
pub struct Held(std::sync::Arc<Gate>);

impl Drop for Held {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.holds -= 1;
        if s.holds == 0 {
            self.0.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod gate_tests {
    use super::Gate;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_held_gate_keeps_requests_out_until_released_and_hold_waits_for_those_in() {
        let gate = Arc::new(Gate::default());
        // A request in flight: hold() returns only after it finishes.
        let pass = gate.enter();
        let (g2, finished) = (gate.clone(), Arc::new(AtomicBool::new(false)));
        let f2 = finished.clone();
        let holder = std::thread::spawn(move || {
            let held = g2.hold();
            assert!(f2.load(Ordering::SeqCst), "hold returned with a request in");
            held
        });
        std::thread::sleep(Duration::from_millis(50));
        finished.store(true, Ordering::SeqCst);
        drop(pass);
        let held = holder.join().unwrap();
        assert!(gate.is_held());
        // A new request waits until the hold is dropped.
        let (g3, got_in) = (gate.clone(), Arc::new(AtomicBool::new(false)));
        let in2 = got_in.clone();
        let request = std::thread::spawn(move || {
            let _pass = g3.enter();
            in2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !got_in.load(Ordering::SeqCst),
            "a request got past a held gate"
        );
        drop(held);
        request.join().unwrap();
        assert!(got_in.load(Ordering::SeqCst));
        assert!(!gate.is_held());
    }
}
