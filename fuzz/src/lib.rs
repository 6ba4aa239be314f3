//! What the fuzz targets share: a [`vhd::Storage`] whose one file is a byte
//! vector in memory (the fuzz input), so the engine opens, reads and writes an
//! image without touching the host's files, and the checks the whole-image
//! targets run on a disk once it is open ([`image_checks`]).

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhd::{BackingFile, Storage};

pub mod image_checks;
pub mod vhdx_input;

/// Writes that would grow the file past this fail like a full disk, so an
/// image with 256 MiB blocks costs an error path, not the fuzzer's memory.
pub const MAX_FILE: u64 = 16 << 20;

/// One in-memory file.
pub struct MemFile {
    bytes: Mutex<Vec<u8>>,
}

impl MemFile {
    pub fn new(bytes: &[u8]) -> Arc<Self> {
        Self::from_vec(bytes.to_vec())
    }

    pub fn from_vec(bytes: Vec<u8>) -> Arc<Self> {
        Arc::new(MemFile {
            bytes: Mutex::new(bytes),
        })
    }

    /// The file's bytes now.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().expect("not poisoned").clone()
    }
}

fn full() -> io::Error {
    io::Error::from_raw_os_error(28) // ENOSPC
}

impl BackingFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.bytes.lock().expect("not poisoned");
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= b.len() as u64 => {
                buf.copy_from_slice(&b[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(full)?;
        if end > MAX_FILE {
            return Err(full());
        }
        let mut b = self.bytes.lock().expect("not poisoned");
        if b.len() < end as usize {
            b.resize(end as usize, 0);
        }
        b[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MAX_FILE {
            return Err(full());
        }
        self.bytes
            .lock()
            .expect("not poisoned")
            .resize(len as usize, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.lock().expect("not poisoned").len() as u64)
    }
}

/// A storage holding one file, whatever path it is opened by.
pub struct MemStorage {
    pub file: Arc<MemFile>,
}

impl MemStorage {
    pub fn new(bytes: &[u8]) -> Self {
        MemStorage {
            file: MemFile::new(bytes),
        }
    }

    pub fn from_vec(bytes: Vec<u8>) -> Self {
        MemStorage {
            file: MemFile::from_vec(bytes),
        }
    }
}

fn unsupported(path: &Path) -> vhd::Error {
    vhd::Error::Io {
        path: path.to_path_buf(),
        source: io::ErrorKind::Unsupported.into(),
    }
}

impl Storage for MemStorage {
    fn open(&self, _path: &Path, _read_only: bool) -> vhd::Result<Arc<dyn BackingFile>> {
        Ok(self.file.clone())
    }

    fn inspect(&self, _path: &Path) -> vhd::Result<Arc<dyn BackingFile>> {
        Ok(self.file.clone())
    }

    fn create_new(&self, path: &Path) -> vhd::Result<Arc<dyn BackingFile>> {
        Err(unsupported(path))
    }

    fn link(&self, _existing: &Path, new: &Path) -> vhd::Result<()> {
        Err(unsupported(new))
    }

    fn rename(&self, _from: &Path, to: &Path) -> vhd::Result<()> {
        Err(unsupported(to))
    }

    fn remove(&self, path: &Path) -> vhd::Result<()> {
        Err(unsupported(path))
    }

    fn sync_dir(&self, dir: &Path) -> vhd::Result<()> {
        Err(unsupported(dir))
    }
}
