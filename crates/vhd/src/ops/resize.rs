//! `resize`: grows a VHD or VHDX. A VHD never shrinks, as Hyper-V refuses it
//! for VHD; a VHDX shrinks down to its last block that holds data, as Hyper-V
//! allows for VHDX (nothing but zeros is lost).

use std::path::Path;

use crate::vhd1::create::virtual_size;
use crate::vhd1::VhdImage;
use crate::{Error, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Resized {
    pub old_size: u64,
    pub new_size: u64,
}

fn invalid(path: &Path, what: String) -> Error {
    crate::vhd1::Error::Invalid {
        path: path.to_path_buf(),
        what,
    }
    .into()
}

/// Checks, without changing the file, that `requested` bytes is within the
/// limits of `path`'s format: what a caller can refuse before starting the
/// work. Whether the disk can shrink that far is left to [`resize`].
pub fn check(path: &Path, requested: u64) -> Result<()> {
    if crate::detect_format(path)? == crate::Format::Vhdx {
        let img = crate::vhdx::VhdxImage::inspect(path)?;
        crate::vhdx::create::virtual_size(path, requested, img.metadata().logical_sector_size)?;
        return Ok(());
    }
    virtual_size(path, requested, false).map(|_| ())
}

/// Grows the VHD at `path` to at least `requested` bytes (rounded up to a
/// CHS-exact size, as `create` does, unless `exact`).
pub fn resize(path: &Path, requested: u64, exact: bool) -> Result<Resized> {
    if crate::detect_format(path)? == crate::Format::Vhdx {
        return resize_vhdx(&crate::HostStorage, path, requested);
    }
    let mut img = VhdImage::open_layer(path, false)?;
    let old_size = img.footer().current_size;
    if exact && !requested.is_multiple_of(512) {
        return Err(invalid(
            path,
            format!("{requested} bytes is not a whole number of sectors"),
        ));
    }
    if requested < old_size {
        return Err(invalid(
            path,
            format!(
                "cannot shrink a VHD ({old_size} bytes) to {requested} bytes: data past the new end would be lost; convert it to a smaller disk with a partition tool first"
            ),
        ));
    }
    let new_size = virtual_size(path, requested, exact)?;
    if new_size != old_size {
        img.grow(new_size)?;
    }
    Ok(Resized { old_size, new_size })
}

/// Resizes a VHDX to `requested` bytes (rounded up to a whole logical sector).
pub fn resize_vhdx(storage: &dyn crate::Storage, path: &Path, requested: u64) -> Result<Resized> {
    use crate::Disk;
    let mut img = crate::vhdx::VhdxImage::open_layer_on(storage, path, false)?;
    let old_size = img.size();
    let new_size =
        crate::vhdx::create::virtual_size(path, requested, img.metadata().logical_sector_size)?;
    if new_size < old_size {
        if img.is_differencing() {
            return Err(invalid(
                path,
                "cannot shrink a differencing VHDX: its parent's data past the new end would show again if it grew; merge it first".into(),
            ));
        }
        let min = img.min_size()?;
        if new_size < min {
            return Err(invalid(
                path,
                format!(
                    "cannot shrink to {new_size} bytes: blocks up to {min} bytes hold data; a VHDX shrinks only down to its last block in use"
                ),
            ));
        }
    }
    if new_size != old_size {
        img.resize(new_size)?;
    }
    img.close()?;
    Ok(Resized { old_size, new_size })
}
