//! O_DIRECT file I/O for the benchmarks.
//!
//! The engine has no O_DIRECT mode of its own, but all of its image file I/O
//! goes through the public [`vhd::Storage`] seam. [`DirectStorage`] opens image
//! files with `O_DIRECT`, so the engine's data reads and writes bypass the page
//! cache exactly as QEMU's `cache=none` does. The engine's own small metadata
//! writes (a 512-byte footer and bitmap per new block, BAT sectors at flush)
//! come from buffers that are not memory-aligned; those go through an aligned
//! bounce buffer, a copy of a few hundred bytes. Data buffers the caller aligns
//! pass straight through.
//!
//! Parents of a differencing chain are always opened by the engine itself
//! (buffered): only the leaf goes through a `Storage`.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhd::{BackingFile, Disk, HostStorage, Storage};

/// Memory alignment of every buffer handed to an O_DIRECT descriptor.
pub const MEM_ALIGN: usize = 4096;
/// Offset and length granularity of O_DIRECT I/O (the disk's logical block).
const IO_ALIGN: u64 = 512;

/// A zeroed buffer of `len` bytes whose start is aligned to [`MEM_ALIGN`].
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + MEM_ALIGN];
        let start = storage.as_ptr().align_offset(MEM_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(MEM_ALIGN)
        && offset.is_multiple_of(IO_ALIGN)
        && (buf.len() as u64).is_multiple_of(IO_ALIGN)
}

/// An image file opened with `O_DIRECT`.
pub struct DirectFile {
    file: File,
}

impl DirectFile {
    pub fn open(path: &Path, read_only: bool) -> vhd::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|source| vhd::Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        vhd::host_file::lock(&file, path, read_only)?;
        Ok(DirectFile { file })
    }

    /// Reads `[lo, lo + buf.len())` into an aligned buffer; bytes past the end
    /// of the file read as zeros.
    fn read_span(&self, buf: &mut [u8], lo: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], lo + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The aligned span around `[offset, offset + len)`, read into a bounce buffer.
    fn bounce(&self, offset: u64, len: usize) -> io::Result<(AlignedBuf, u64)> {
        let lo = offset / IO_ALIGN * IO_ALIGN;
        let hi = (offset + len as u64).div_ceil(IO_ALIGN) * IO_ALIGN;
        let mut b = AlignedBuf::new((hi - lo) as usize);
        self.read_span(b.as_mut_slice(), lo)?;
        Ok((b, lo))
    }
}

impl BackingFile for DirectFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if aligned(buf, offset) {
            return self.file.read_exact_at(buf, offset);
        }
        let (b, lo) = self.bounce(offset, buf.len())?;
        let at = (offset - lo) as usize;
        buf.copy_from_slice(&b.as_slice()[at..at + buf.len()]);
        Ok(())
    }

    /// One `preadv`, as the host file does: buffers that O_DIRECT cannot take
    /// (the engine's small bitmap buffer) are read through aligned stand-ins
    /// and copied out; the data buffer the caller aligned is read in place.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let sectors = bufs
            .iter()
            .all(|b| (b.len() as u64).is_multiple_of(IO_ALIGN));
        if !sectors || !offset.is_multiple_of(IO_ALIGN) {
            let (b, lo) = self.bounce(offset, bufs.iter().map(|b| b.len()).sum())?;
            let mut at = (offset - lo) as usize;
            for buf in bufs.iter_mut() {
                let n = buf.len();
                buf.copy_from_slice(&b.as_slice()[at..at + n]);
                at += n;
            }
            return Ok(());
        }
        let mut stand_ins: Vec<Option<AlignedBuf>> = bufs
            .iter()
            .map(|b| (!aligned(b, 0)).then(|| AlignedBuf::new(b.len())))
            .collect();
        {
            let mut parts: Vec<IoSliceMut<'_>> = bufs
                .iter_mut()
                .zip(stand_ins.iter_mut())
                .map(|(b, s)| match s {
                    Some(s) => IoSliceMut::new(s.as_mut_slice()),
                    None => IoSliceMut::new(b),
                })
                .collect();
            vhd::backing::preadv_exact(&self.file, &mut parts, offset)?;
        }
        for (b, s) in bufs.iter_mut().zip(&stand_ins) {
            if let Some(s) = s {
                b.copy_from_slice(s.as_slice());
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if aligned(buf, offset) {
            return self.file.write_all_at(buf, offset);
        }
        // Read-modify-write of the covering sectors (for whole, sector-aligned
        // metadata writes this reads sectors it then overwrites entirely;
        // skip the read then).
        let whole = offset.is_multiple_of(IO_ALIGN) && (buf.len() as u64).is_multiple_of(IO_ALIGN);
        let (mut b, lo) = if whole {
            (AlignedBuf::new(buf.len()), offset)
        } else {
            self.bounce(offset, buf.len())?
        };
        let at = (offset - lo) as usize;
        b.as_mut_slice()[at..at + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(b.as_slice(), lo)
    }

    /// One write, as the host file's `pwritev` is: the pieces (the engine's
    /// zeros before a new block's bitmap, and the bitmap) are joined in an
    /// aligned buffer, rather than each becoming a synchronous device write.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        if let [one] = bufs {
            return self.write_at(one, offset);
        }
        let total = bufs.iter().map(|b| b.len()).sum();
        let mut joined = AlignedBuf::new(total);
        let mut at = 0;
        for b in bufs {
            joined.as_mut_slice()[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        self.write_at(joined.as_slice(), offset)
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

/// Opens image files with `O_DIRECT`; everything else (creating, renaming,
/// removing) is the host's.
pub struct DirectStorage;

impl Storage for DirectStorage {
    fn open(&self, path: &Path, read_only: bool) -> vhd::Result<Arc<dyn BackingFile>> {
        Ok(Arc::new(DirectFile::open(path, read_only)?))
    }

    fn inspect(&self, path: &Path) -> vhd::Result<Arc<dyn BackingFile>> {
        HostStorage.inspect(path)
    }

    fn create_new(&self, path: &Path) -> vhd::Result<Arc<dyn BackingFile>> {
        HostStorage.create_new(path)
    }

    fn link(&self, existing: &Path, new: &Path) -> vhd::Result<()> {
        HostStorage.link(existing, new)
    }

    fn rename(&self, from: &Path, to: &Path) -> vhd::Result<()> {
        HostStorage.rename(from, to)
    }

    fn remove(&self, path: &Path) -> vhd::Result<()> {
        HostStorage.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> vhd::Result<()> {
        HostStorage.sync_dir(dir)
    }
}

/// A raw image over any [`BackingFile`]: the raw baseline with `O_DIRECT`
/// (the engine's own [`vhd::RawDisk`] is buffered only).
pub struct PlainDisk {
    file: Arc<dyn BackingFile>,
    path: PathBuf,
    size: u64,
}

impl PlainDisk {
    pub fn open(storage: &dyn Storage, path: &Path) -> vhd::Result<Self> {
        let file = storage.open(path, false)?;
        let size = file.len().map_err(|source| vhd::Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PlainDisk {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    fn io_err(&self, source: io::Error) -> vhd::Error {
        vhd::Error::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl Disk for PlainDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vhd::Result<()> {
        vhd::disk::check_range(Some(&self.path), self.size, offset, buf.len() as u64)?;
        self.file.read_at(buf, offset).map_err(|e| self.io_err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> vhd::Result<()> {
        vhd::disk::check_range(Some(&self.path), self.size, offset, buf.len() as u64)?;
        self.file.write_at(buf, offset).map_err(|e| self.io_err(e))
    }

    fn flush(&self) -> vhd::Result<()> {
        self.file.flush().map_err(|e| self.io_err(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> vhd::Result<()> {
        let zeros = AlignedBuf::new(len as usize);
        self.write_at(zeros.as_slice(), offset)
    }

    fn block_status(&self, _offset: u64, len: u64) -> vhd::Result<vhd::BlockStatus> {
        Ok(vhd::BlockStatus {
            allocation: vhd::Allocation::Data,
            len,
        })
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}
