//! The seam every disk format's file I/O goes through.
//!
//! Formats never touch `std::fs::File` for their image files: they read and
//! write through a [`BackingFile`], and create, rename and remove files through
//! a [`Storage`]. [`HostStorage`] is the real thing; [`crate::crash`] wraps it to
//! cut writes off after the N-th mutating step, which is how the crash tests
//! prove that every prefix of the engine's writes leaves a consistent file.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
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
    /// Writes `bufs` one after another from `offset`, as one `write_at` of their
    /// concatenation would. The default writes each in turn; a host file writes
    /// them with one `pwritev` (a device writing a guest's scattered pages from
    /// guest memory saves a system call per page).
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for b in bufs {
            self.write_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Fills `bufs` one after another from `offset`, exactly as one `read_at`
    /// of their total length would, in one request to the file: a block's
    /// metadata and the data after it land in separate buffers without a copy
    /// and without a second read. The default reads into one buffer and copies
    /// out of it; a host file reads with one `preadv`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let total = bufs.iter().map(|b| b.len()).sum();
        let mut all = vec![0u8; total];
        self.read_at(&mut all, offset)?;
        let mut at = 0;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&all[at..at + n]);
            at += n;
        }
        Ok(())
    }
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

    /// Copies `len` bytes at `src_offset` of `src` to `offset` of this file,
    /// growing it if needed: a write of those bytes, as far as durability and
    /// ordering go (nothing is synced). The default reads and writes through
    /// user space; a host file copies inside the kernel where it can.
    fn copy_range(
        &self,
        src: &dyn BackingFile,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        copy_through_buffer(self, src, src_offset, offset, len)
    }

    /// A descriptor the kernel can read this file's bytes through, for an
    /// in-kernel copy out of it ([`Self::copy_range`] of another file). Only
    /// ever read through: writes go through [`Self::write_at`].
    fn read_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Largest piece [`copy_through_buffer`] moves at a time.
const COPY_BUFFER: u64 = 4 << 20;

/// [`BackingFile::copy_range`] by reading into a buffer and writing it out
/// with `dst.write_at`, a piece of at most 4 MiB at a time.
pub fn copy_through_buffer<D: BackingFile + ?Sized>(
    dst: &D,
    src: &dyn BackingFile,
    src_offset: u64,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(COPY_BUFFER) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(COPY_BUFFER) as usize;
        src.read_at(&mut buf[..n], src_offset + done)?;
        dst.write_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
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

impl Drop for HostFile {
    fn drop(&mut self) {
        crate::host_file::unlock(&self.file);
    }
}

impl BackingFile for HostFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        preadv_exact(&self.file, bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        /// Linux's IOV_MAX: the most buffers one `pwritev` takes.
        const IOV_MAX: usize = 1024;
        let mut bufs: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
        let mut rest = &mut bufs[..];
        let mut at = offset;
        while !rest.is_empty() {
            let count = rest.len().min(IOV_MAX);
            let pos = libc::off_t::try_from(at).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "write offset too large")
            })?;
            // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix; the first
            // `count` entries of `rest` name live, readable buffers borrowed for this
            // call, and the kernel only reads from them.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    rest.as_ptr().cast(),
                    count as libc::c_int,
                    pos,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            at += n as u64;
            IoSlice::advance_slices(&mut rest, n as usize);
        }
        Ok(())
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

    /// `copy_file_range(2)` when `src` has a descriptor: the bytes move from
    /// page cache to page cache inside the kernel (or share extents, on file
    /// systems that can). Where the kernel refuses the pair of files (another
    /// file system, an old kernel, a file system without support), the rest is
    /// copied through user space.
    fn copy_range(
        &self,
        src: &dyn BackingFile,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let Some(src_fd) = src.read_fd() else {
            return copy_through_buffer(self, src, src_offset, offset, len);
        };
        let mut done = 0;
        while done < len {
            match copy_file_range(src_fd, src_offset + done, self.file.as_fd(), offset + done, len - done) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the source file ends before byte {} of a {len}-byte copy from offset {src_offset}",
                            done
                        ),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if copy_unsupported(&e) => {
                    return copy_through_buffer(
                        self,
                        src,
                        src_offset + done,
                        offset + done,
                        len - done,
                    )
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }
}

/// Fills `bufs` one after another from `offset` of `file` with `preadv(2)`,
/// repeating after a short read; the file ending first is an `UnexpectedEof`
/// error, as for `read_exact_at`.
pub fn preadv_exact(file: &File, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
    /// Linux's IOV_MAX: the most buffers one `preadv` takes.
    const IOV_MAX: usize = 1024;
    let mut rest = bufs;
    while rest.first().is_some_and(|b| b.is_empty()) {
        rest = &mut rest[1..];
    }
    let mut at = offset;
    while !rest.is_empty() {
        let count = rest.len().min(IOV_MAX);
        let pos = libc::off_t::try_from(at)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "read offset too large"))?;
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec` on Unix; the first
        // `count` entries of `rest` name live, writable buffers borrowed mutably
        // for this call, and the kernel writes only within their lengths.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                rest.as_ptr().cast(),
                count as libc::c_int,
                pos,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ends before byte {at} of a vectored read from offset {offset}"),
            ));
        }
        at += n as u64;
        IoSliceMut::advance_slices(&mut rest, n as usize);
    }
    Ok(())
}

/// Whether `copy_file_range` failed because it cannot copy between these
/// files at all (not because of an I/O fault), so a plain copy will do.
fn copy_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

/// One `copy_file_range(2)` call: copies up to `len` bytes (at most what one
/// call takes) from `src` at `src_offset` to `dst` at `dst_offset`, without
/// moving either file's position; returns the bytes copied, 0 at the
/// source's end.
fn copy_file_range(
    src: BorrowedFd<'_>,
    src_offset: u64,
    dst: BorrowedFd<'_>,
    dst_offset: u64,
    len: u64,
) -> io::Result<u64> {
    let too_far = || io::Error::from(io::ErrorKind::InvalidInput);
    let mut off_in = libc::loff_t::try_from(src_offset).map_err(|_| too_far())?;
    let mut off_out = libc::loff_t::try_from(dst_offset).map_err(|_| too_far())?;
    // One call moves at most about 2 GiB anyway; ask for no more than a
    // 1 GiB piece so the count always fits the return type.
    let n = len.min(1 << 30) as usize;
    // SAFETY: both descriptors are borrowed from open files for the whole call;
    // the kernel reads and updates only the two offsets, which are live locals
    // (so neither file's position moves), and touches no other memory of ours.
    let rc = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            n,
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u64)
}

/// The host's file system for a file this process already holds locked
/// through another handle (a running chain's parent, during a live merge):
/// opens take no lock of their own, which would conflict with that one.
/// Everything else is [`HostStorage`]'s.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeldStorage;

impl Storage for HeldStorage {
    fn open(&self, path: &Path, read_only: bool) -> Result<Arc<dyn BackingFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(io_error(path))?;
        Ok(Arc::new(HostFile::new(file)))
    }
    fn inspect(&self, path: &Path) -> Result<Arc<dyn BackingFile>> {
        HostStorage.inspect(path)
    }
    fn create_new(&self, path: &Path) -> Result<Arc<dyn BackingFile>> {
        HostStorage.create_new(path)
    }
    fn link(&self, existing: &Path, new: &Path) -> Result<()> {
        HostStorage.link(existing, new)
    }
    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        HostStorage.rename(from, to)
    }
    fn remove(&self, path: &Path) -> Result<()> {
        HostStorage.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> Result<()> {
        HostStorage.sync_dir(dir)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host_file(path: &Path, bytes: &[u8]) -> HostFile {
        std::fs::write(path, bytes).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        HostFile::new(f)
    }

    #[test]
    fn a_vectored_write_lands_as_one_write_of_the_concatenation() {
        let dir = tempfile::tempdir().unwrap();
        let f = host_file(&dir.path().join("v"), &[0u8; 8192]);
        // More buffers than one pwritev takes, empty ones among them.
        let pieces: Vec<Vec<u8>> = (0..1500u32)
            .map(|i| vec![(i % 251) as u8; (i % 3) as usize])
            .collect();
        let slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        f.write_vectored_at(&slices, 100).unwrap();
        let want: Vec<u8> = pieces.concat();
        let mut back = vec![0u8; want.len()];
        f.read_at(&mut back, 100).unwrap();
        assert_eq!(back, want);
        let mut before = [1u8; 100];
        f.read_at(&mut before, 0).unwrap();
        assert_eq!(before, [0u8; 100], "nothing before the offset changed");
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn copy_range_copies_the_bytes_and_grows_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let src = host_file(&dir.path().join("src"), &bytes(3 << 20, 1));
        let dst = host_file(&dir.path().join("dst"), &[9; 4096]);
        dst.copy_range(&src, 1000, 512, (3 << 20) - 1000).unwrap();
        let got = std::fs::read(dir.path().join("dst")).unwrap();
        assert_eq!(got.len(), 512 + (3 << 20) - 1000);
        assert!(got[..512].iter().all(|&b| b == 9));
        assert!(got[512..] == bytes(3 << 20, 1)[1000..]);
    }

    #[test]
    fn copy_range_between_file_systems_falls_back_to_a_plain_copy() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let src_dir = tempfile::tempdir_in(shm).unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let src = host_file(&src_dir.path().join("src"), &bytes(1 << 20, 2));
        let dst = host_file(&dst_dir.path().join("dst"), &[]);
        dst.copy_range(&src, 0, 4096, 1 << 20).unwrap();
        let got = std::fs::read(dst_dir.path().join("dst")).unwrap();
        assert!(got[4096..] == bytes(1 << 20, 2)[..]);
    }

    #[test]
    fn copy_range_past_the_end_of_the_source_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = host_file(&dir.path().join("src"), &bytes(8192, 3));
        let dst = host_file(&dir.path().join("dst"), &[]);
        let err = dst.copy_range(&src, 4096, 0, 8192).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
