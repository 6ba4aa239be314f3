//! A stopgap until the engine's `vhd::open` exists: fixed VHD files, which are the
//! raw disk followed by a 512-byte footer, opened as a raw disk bounded so that the
//! footer is never part of the virtual disk. Other VHD kinds (dynamic, differencing)
//! and VHDX are refused with a sentence saying so.

use std::os::unix::fs::FileExt;

use std::path::{Path, PathBuf};

/// Why a VHD cannot be opened here.
#[derive(Debug, thiserror::Error)]
pub enum FixedVhdError {
    #[error(transparent)]
    Engine(#[from] vhd::Error),
    #[error("cannot read the footer of {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has no VHD footer (no \"conectix\" cookie in its last 512 bytes); is it a VHD?", path.display())]
    NotVhd { path: PathBuf },
    #[error("VHD footer checksum mismatch in {}: stored {stored:#010x}, computed {computed:#010x}", path.display())]
    Checksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("{} is a {kind} VHD; this build of the worker serves fixed VHDs and raw images only (convert it with `qemu-img convert -O vpc -o subformat=fixed`)", path.display())]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{} is a VHDX; this build of the worker serves fixed VHDs and raw images only (VHDX comes with the storage engine's vhd::open)", path.display())]
    Vhdx { path: PathBuf },
    #[error("the VHD footer of {} says the disk is {size} bytes, but the file holds only {available}", path.display())]
    Truncated {
        path: PathBuf,
        size: u64,
        available: u64,
    },
}

/// A raw disk seen only up to `size` bytes.
pub struct Bounded {
    inner: vhd::RawDisk,
    size: u64,
}

fn check(d: &Bounded, offset: u64, len: u64) -> vhd::Result<()> {
    vhd::disk::check_range(vhd::Disk::path(&d.inner), d.size, offset, len)
}

impl vhd::Disk for Bounded {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vhd::Result<()> {
        check(self, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> vhd::Result<()> {
        check(self, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> vhd::Result<()> {
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> vhd::Result<()> {
        check(self, offset, len)?;
        self.inner.write_zeroes(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> vhd::Result<vhd::BlockStatus> {
        check(self, offset, len)?;
        self.inner.block_status(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        vhd::Disk::path(&self.inner)
    }
}

/// Opens a fixed VHD (locked like any engine disk).
pub fn open(path: &Path, read_only: bool) -> Result<Bounded, FixedVhdError> {
    let inner = vhd::RawDisk::open(path, read_only)?;
    let len = vhd::Disk::size(&inner);
    let io = |source| FixedVhdError::Io {
        path: path.to_path_buf(),
        source,
    };
    if len < 512 {
        return Err(FixedVhdError::NotVhd {
            path: path.to_path_buf(),
        });
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let mut footer = [0u8; 512];
    file.read_exact_at(&mut footer, len - 512).map_err(io)?;
    if &footer[0..8] != b"conectix" {
        return Err(FixedVhdError::NotVhd {
            path: path.to_path_buf(),
        });
    }
    let stored = u32::from_be_bytes([footer[64], footer[65], footer[66], footer[67]]);
    let computed = !footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    if stored != computed {
        return Err(FixedVhdError::Checksum {
            path: path.to_path_buf(),
            stored,
            computed,
        });
    }
    let disk_type = u32::from_be_bytes([footer[60], footer[61], footer[62], footer[63]]);
    let kind = match disk_type {
        2 => None,
        3 => Some("dynamic"),
        4 => Some("differencing"),
        _ => Some("unknown kind of"),
    };
    if let Some(kind) = kind {
        return Err(FixedVhdError::Unsupported {
            path: path.to_path_buf(),
            kind,
        });
    }
    let mut size_bytes = [0u8; 8];
    size_bytes.copy_from_slice(&footer[48..56]);
    let size = u64::from_be_bytes(size_bytes);
    if size > len - 512 {
        return Err(FixedVhdError::Truncated {
            path: path.to_path_buf(),
            size,
            available: len - 512,
        });
    }
    Ok(Bounded { inner, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use vhd::Disk;

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn fixed_vhd_from_qemu_img_exposes_its_data_and_never_its_footer() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        let mut data = vec![0u8; 4 << 20];
        data[..5].copy_from_slice(b"hello");
        std::fs::write(&raw, &data).unwrap();
        let vhd_path = dir.path().join("a.vhd");
        let (r, v) = (raw.to_str().unwrap(), vhd_path.to_str().unwrap());
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
            r,
            v,
        ]);
        let disk = open(&vhd_path, false).unwrap();
        assert_eq!(disk.size(), 4 << 20);
        let mut buf = [0u8; 5];
        disk.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(
            disk.write_at(&[1u8; 512], 4 << 20).is_err(),
            "wrote over the footer"
        );
        drop(disk);
        // qemu-img still sees a valid VHD with our data.
        qemu_img(&["compare", "-f", "vpc", "-F", "raw", v, r]);
    }

    #[test]
    fn dynamic_vhd_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("d.vhd");
        qemu_img(&["create", "-f", "vpc", v.to_str().unwrap(), "8M"]);
        let err = open(&v, true).err().expect("refused").to_string();
        assert!(
            err.contains("dynamic VHD") && err.contains("subformat=fixed"),
            "{err}"
        );
    }
}
