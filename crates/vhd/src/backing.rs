//! The seam every disk format's file I/O goes through.
//!
//! Formats never touch `std::fs::File` for their image files: they read and
//! write through a [`BackingFile`], and create, rename and remove files through
//! a [`Storage`]. [`HostStorage`] is the real thing; [`crate::crash`] wraps it to
//! cut writes off after the N-th mutating step, which is how the crash tests
//! prove that every prefix of the engine's writes leaves a consistent file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// An open image file: positioned I/O, durability, length.
pub trait BackingFile: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write (and the file's length) durable.
    fn flush(&self) -> io::Result<()>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Opening, creating, linking and removing image files.
pub trait Storage: Send + Sync {
    /// Opens an existing file with a shared (`read_only`) or exclusive lock,
    /// failing at once when another process holds a conflicting one.
    fn open(&self, path: &Path, read_only: bool) -> Result<Arc<dyn BackingFile>>;
    /// Opens an existing file read-only without locking it, for inspection
    /// (`info`, `check`) of files a running VM may hold.
    fn inspect(&self, path: &Path) -> Result<Arc<dyn BackingFile>>;
    /// Creates a new, empty file (refusing an existing one), locked exclusively.
    fn create_new(&self, path: &Path) -> Result<Arc<dyn BackingFile>>;
    /// Gives `existing` the additional name `new`; fails if `new` exists.
    fn link(&self, existing: &Path, new: &Path) -> Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;
    /// Removes a file name.
    fn remove(&self, path: &Path) -> Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> Result<()>;
}

pub(crate) fn io_error(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file on the host.
pub struct HostFile {
    file: File,
}

impl HostFile {
    pub fn new(file: File) -> Self {
        HostFile { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BackingFile for HostFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

/// The host's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostStorage;

impl Storage for HostStorage {
    fn open(&self, path: &Path, read_only: bool) -> Result<Arc<dyn BackingFile>> {
        let file = crate::host_file::open_locked(path, read_only)?;
        Ok(Arc::new(HostFile::new(file)))
    }

    fn inspect(&self, path: &Path) -> Result<Arc<dyn BackingFile>> {
        let file = File::open(path).map_err(io_error(path))?;
        Ok(Arc::new(HostFile::new(file)))
    }

    fn create_new(&self, path: &Path) -> Result<Arc<dyn BackingFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(io_error(path))?;
        crate::host_file::lock(&file, path, false)?;
        Ok(Arc::new(HostFile::new(file)))
    }

    fn link(&self, existing: &Path, new: &Path) -> Result<()> {
        std::fs::hard_link(existing, new).map_err(io_error(new))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(io_error(to))
    }

    fn remove(&self, path: &Path) -> Result<()> {
        std::fs::remove_file(path).map_err(io_error(path))
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir))
    }
}

/// The folder holding `path`, for [`Storage::sync_dir`].
pub(crate) fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}
