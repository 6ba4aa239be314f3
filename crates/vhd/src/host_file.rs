//! Host file primitives shared by every format: opening with the right lock,
//! punching holes, and finding data runs in sparse files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// Opens `path` for I/O and takes an advisory `flock`: shared for read-only opens,
/// exclusive for writable ones. Fails at once (no waiting) when another process
/// holds a conflicting lock, with an error naming the file.
pub fn open_locked(path: &Path, read_only: bool) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    lock(&file, path, read_only)?;
    Ok(file)
}

/// Takes the advisory lock on an already open file (see [`open_locked`]).
pub fn lock(file: &File, path: &Path, shared: bool) -> Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::Locked {
                path: path.to_path_buf(),
                wanted: if shared { "shared" } else { "exclusive" },
            });
        }
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: err,
        });
    }
    Ok(())
}

/// Drops the advisory lock on `file` now. Closing a file releases its lock only
/// when the last descriptor of the open file goes, and a process forked by another
/// thread (to run `qemu-img`, a worker, ...) holds copies of every descriptor
/// until it calls exec: the file would look locked for that moment after it was
/// closed here. Unlocking first releases it at once.
pub fn unlock(file: &File) {
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// Makes `[offset, offset+len)` of `file` read as zeros, deallocating where the
/// file system can and writing zeros where it cannot.
pub fn punch_hole_or_zero(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate only reads the descriptor and integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    write_zeros(file, offset, len)
}

/// Writes explicit zeros over a range, in chunks.
pub fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Whether `offset` in `file` is in a data run (true) or a hole (false), and how
/// long that run is, capped at `len`. Files systems without SEEK_DATA report all data.
pub fn seek_data_run(file: &File, offset: u64, len: u64) -> io::Result<(bool, u64)> {
    let fd = file.as_raw_fd();
    let Ok(off) = i64::try_from(offset) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: lseek only reads the descriptor and integer arguments.
    let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
    if data < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            // ENXIO: no data at or after offset: the rest is a hole.
            Some(libc::ENXIO) => Ok((false, len)),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((true, len)),
            _ => Err(err),
        };
    }
    let data = data as u64;
    if data > offset {
        return Ok((false, (data - offset).min(len)));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
    if hole < 0 {
        return Ok((true, len));
    }
    Ok((true, (hole as u64 - offset).clamp(1, len)))
}
