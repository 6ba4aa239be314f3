//! A crash harness: a [`Storage`] that cuts the engine's writes off after the
//! N-th mutating step, for tests that prove every crash point leaves a
//! consistent image.
//!
//! A *step* is any call that changes what is stored: a write, a flush, a
//! length change, creating, linking, renaming or removing a file, syncing a
//! directory. With `CrashStorage::cut_after(n, ..)` the first `n` steps happen
//! and every later one fails with an I/O error, as if the power went at that
//! moment (a step is either done whole or not at all; torn sectors are not
//! modelled). Reads keep working. Then [`CrashStorage::power_cut`] decides what
//! survived the crash:
//!
//! - [`AfterCrash::KeepAllWrites`]: everything written before the cut (the
//!   page cache reached the disk in order);
//! - [`AfterCrash::LoseUnflushedWrites`]: only what each file had flushed;
//!   writes after a file's last flush are rolled back, so an ordering that
//!   relies on unflushed data shows up as a broken image;
//! - [`AfterCrash::KeepOnlyLastUnflushedWrite`]: as above, except that the very
//!   last write before the cut survives (where it lies within the file as
//!   rolled back): the disk reordered it ahead of the earlier unflushed ones.
//!   Run over every cut point, this finds any write that needed a flush
//!   before it and did not get one.
//!
//! Directory changes (create, link, rename, remove) count as durable at once,
//! the harsher assumption for code that must flush data before renaming it.
//!
//! Typical use, with [`for_every_crash_point`]: set up files with the host
//! storage, run the operation on the crash storage, then reopen with the host
//! storage and check the image and the data flushed before the cut.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::backing::{copy_through_buffer, BackingFile, HostFile, HostStorage, Storage};
use crate::error::{Error, Result};

/// What survives the simulated crash (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCrash {
    KeepAllWrites,
    LoseUnflushedWrites,
    KeepOnlyLastUnflushedWrite,
}

/// How to put back one unflushed change of a file.
struct Undo {
    /// An unlocked handle on the changed file, so the journal never keeps a
    /// lock alive after the engine closed the file.
    file: Arc<File>,
    old_len: u64,
    /// Bytes the change overwrote (within `old_len`), and where.
    offset: u64,
    old_bytes: Vec<u8>,
    /// What a write stored (for redoing it); `None` for length changes.
    new_bytes: Option<Vec<u8>>,
}

struct Switch {
    budget: u64,
    steps: AtomicU64,
    tripped: AtomicBool,
    /// Set by `power_cut`: nothing more is stored, cut or not.
    off: AtomicBool,
    mode: AfterCrash,
    journal: Mutex<Vec<Undo>>,
}

impl Switch {
    /// Takes one step, or fails once the budget is spent.
    fn step(&self) -> io::Result<()> {
        if self.tripped.load(Ordering::SeqCst) || self.off.load(Ordering::SeqCst) {
            return Err(cut());
        }
        if self.steps.fetch_add(1, Ordering::SeqCst) >= self.budget {
            self.tripped.store(true, Ordering::SeqCst);
            return Err(cut());
        }
        Ok(())
    }

    fn record(&self, undo: Undo) {
        if self.mode != AfterCrash::KeepAllWrites {
            if let Ok(mut j) = self.journal.lock() {
                j.push(undo);
            }
        }
    }

    fn forget(&self, file: &Arc<File>) {
        if let Ok(mut j) = self.journal.lock() {
            j.retain(|u| !Arc::ptr_eq(&u.file, file));
        }
    }
}

fn cut() -> io::Error {
    io::Error::other("simulated power cut (crash harness)")
}

/// A [`Storage`] over the host's files that stops after a given number of steps.
#[derive(Clone)]
pub struct CrashStorage {
    switch: Arc<Switch>,
}

impl CrashStorage {
    /// Lets `steps` mutating steps through, then fails every later one.
    pub fn cut_after(steps: u64, mode: AfterCrash) -> Self {
        CrashStorage {
            switch: Arc::new(Switch {
                budget: steps,
                steps: AtomicU64::new(0),
                tripped: AtomicBool::new(false),
                off: AtomicBool::new(false),
                mode,
                journal: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Whether the cut happened (some step was refused).
    pub fn tripped(&self) -> bool {
        self.switch.tripped.load(Ordering::SeqCst)
    }

    /// Steps attempted so far, including refused ones.
    pub fn steps(&self) -> u64 {
        self.switch.steps.load(Ordering::SeqCst)
    }

    /// Ends the simulated run: rolls back what the mode says did not survive
    /// and releases the files the harness still holds (and their locks). Call
    /// it after dropping every disk opened on this storage.
    pub fn power_cut(&self) -> io::Result<()> {
        self.switch.off.store(true, Ordering::SeqCst);
        let journal = match self.switch.journal.lock() {
            Ok(mut j) => std::mem::take(&mut *j),
            Err(_) => return Err(io::Error::other("crash journal poisoned")),
        };
        for undo in journal.iter().rev() {
            let f = &undo.file;
            f.set_len(undo.old_len)?;
            f.write_all_at(&undo.old_bytes, undo.offset)?;
        }
        if self.switch.mode == AfterCrash::KeepOnlyLastUnflushedWrite {
            if let Some(Undo {
                file,
                offset,
                new_bytes: Some(bytes),
                ..
            }) = journal.last()
            {
                let len = file.metadata()?.len();
                let keep = len.saturating_sub(*offset).min(bytes.len() as u64) as usize;
                file.write_all_at(&bytes[..keep], *offset)?;
            }
        }
        Ok(())
    }

    fn wrap(&self, path: &Path, file: File) -> Result<Arc<dyn BackingFile>> {
        // A second open file description of the same inode carries no flock.
        let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let shadow = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&proc_path)
            .or_else(|_| File::open(&proc_path))
            .map_err(|e| refused(path, e))?;
        Ok(Arc::new(CrashFile {
            file: HostFile::new(file),
            shadow: Arc::new(shadow),
            switch: self.switch.clone(),
        }))
    }
}

struct CrashFile {
    file: HostFile,
    shadow: Arc<File>,
    switch: Arc<Switch>,
}

impl CrashFile {
    /// Remembers what `[offset, offset + len)` and the length were before a
    /// change, and what a write stores there.
    fn remember(&self, offset: u64, len: u64, new_bytes: Option<&[u8]>) -> io::Result<()> {
        if self.switch.mode == AfterCrash::KeepAllWrites {
            return Ok(());
        }
        let old_len = self.file.len()?;
        let end = (offset + len).min(old_len);
        let mut old_bytes = vec![0u8; end.saturating_sub(offset) as usize];
        if !old_bytes.is_empty() {
            self.file.read_at(&mut old_bytes, offset)?;
        }
        self.switch.record(Undo {
            file: self.shadow.clone(),
            old_len,
            offset,
            old_bytes,
            new_bytes: new_bytes.map(<[u8]>::to_vec),
        });
        Ok(())
    }
}

impl BackingFile for CrashFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.file.read_vectored_at(bufs, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.switch.step()?;
        self.remember(offset, buf.len() as u64, Some(buf))?;
        self.file.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.switch.step()?;
        self.file.flush()?;
        self.switch.forget(&self.shadow);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.switch.step()?;
        let old = self.file.len()?;
        self.remember(len.min(old), old.saturating_sub(len), None)?;
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    /// Never in the kernel: the bytes go through [`Self::write_at`] in pieces
    /// of at most 4 MiB, each a step, so a cut can land inside a copy and
    /// every piece is journalled like any other write.
    fn copy_range(
        &self,
        src: &dyn BackingFile,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        copy_through_buffer(self, src, src_offset, offset, len)
    }

    /// Reading needs no step, so a host file may copy out of this one.
    fn read_fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.read_fd()
    }
}

fn refused(path: &Path, e: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

impl Storage for CrashStorage {
    fn open(&self, path: &Path, read_only: bool) -> Result<Arc<dyn BackingFile>> {
        let file = crate::host_file::open_locked(path, read_only)?;
        self.wrap(path, file)
    }

    fn inspect(&self, path: &Path) -> Result<Arc<dyn BackingFile>> {
        HostStorage.inspect(path)
    }

    fn create_new(&self, path: &Path) -> Result<Arc<dyn BackingFile>> {
        self.switch.step().map_err(|e| refused(path, e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| refused(path, e))?;
        crate::host_file::lock(&file, path, false)?;
        self.wrap(path, file)
    }

    fn link(&self, existing: &Path, new: &Path) -> Result<()> {
        self.switch.step().map_err(|e| refused(new, e))?;
        HostStorage.link(existing, new)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.switch.step().map_err(|e| refused(to, e))?;
        HostStorage.rename(from, to)
    }

    fn remove(&self, path: &Path) -> Result<()> {
        self.switch.step().map_err(|e| refused(path, e))?;
        HostStorage.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        self.switch.step().map_err(|e| refused(dir, e))?;
        HostStorage.sync_dir(dir)
    }
}

/// Runs `run` with the cut after 0, 1, 2, ... steps, until a run completes
/// without being cut, and returns how many crash points were tried (the cut
/// runs; the final, complete run is not counted).
///
/// `run` gets the crash storage and the crash point; it sets up its files with
/// [`HostStorage`], runs the operation on the crash storage, drops what it
/// opened, calls [`CrashStorage::power_cut`], and then verifies the result
/// with the host storage. `limit` guards against an operation that never
/// finishes: passing it panics, as the test harness it is.
pub fn for_every_crash_point(
    mode: AfterCrash,
    limit: u64,
    mut run: impl FnMut(&CrashStorage, u64),
) -> u64 {
    for n in 0..=limit {
        let storage = CrashStorage::cut_after(n, mode);
        run(&storage, n);
        if !storage.tripped() {
            return n;
        }
    }
    panic!("the operation was still being cut after {limit} steps; raise the limit");
}
