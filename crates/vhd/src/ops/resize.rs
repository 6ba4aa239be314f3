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

/// The size a VHD of `old_size` bytes grows to for `requested`, or why not: whole
/// sectors when `exact`, never smaller.
fn vhd_new_size(path: &Path, old_size: u64, requested: u64, exact: bool) -> Result<u64> {
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
    Ok(new_size)
}

/// Grows the VHD at `path` to at least `requested` bytes (rounded up to a
/// CHS-exact size, as `create` does, unless `exact`).
pub fn resize(path: &Path, requested: u64, exact: bool) -> Result<Resized> {
    if crate::detect_format(path)? == crate::Format::Vhdx {
        return resize_vhdx(&crate::HostStorage, path, requested);
    }
    let mut img = VhdImage::open_layer(path, false)?;
    let old_size = img.footer().current_size;
    let new_size = vhd_new_size(path, old_size, requested, exact)?;
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

/// What [`resize`] would do to `path`, found without changing it: the old and the
/// new virtual size, or the error `resize` would give.
pub fn plan(path: &Path, requested: u64, exact: bool) -> Result<Resized> {
    if crate::detect_format(path)? == crate::Format::Vhdx {
        let img = crate::vhdx::VhdxImage::inspect(path)?;
        let old_size = crate::Disk::size(&img);
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
        return Ok(Resized { old_size, new_size });
    }
    let img = VhdImage::inspect(path)?;
    let old_size = img.footer().current_size;
    let new_size = vhd_new_size(path, old_size, requested, exact)?;
    Ok(Resized { old_size, new_size })
}

/// [`resize`] that leaves, after a crash at any point, either the old disk or
/// the resized one: the file is copied (its data runs only; holes stay holes)
/// to `tmp` in its folder (e.g. [`crate::ops::partial::partial_path`]), the
/// copy resized and flushed, then renamed over `path` and the folder synced.
/// `path` is held with an exclusive lock meanwhile (it is only read), so
/// nobody changes it under the copy. The copy reports progress; a cancel leaves `path` as it was.
pub fn resize_via(
    path: &Path,
    tmp: &Path,
    requested: u64,
    exact: bool,
    progress: &mut dyn crate::Progress,
) -> Result<Resized> {
    use crate::backing::{parent_dir, HostStorage, Storage};
    let planned = plan(path, requested, exact)?;
    if planned.new_size == planned.old_size {
        progress.update(1, 1);
        return Ok(planned);
    }
    // Exclusive, as an in-place resize takes it: nobody else may have it open.
    let held = crate::host_file::open_locked(path, false)?;
    let _ = std::fs::remove_file(tmp);
    let result = copy_file(&held, path, tmp, progress)
        .and_then(|()| resize(tmp, requested, exact))
        .and_then(|done| {
            std::fs::File::open(tmp)
                .and_then(|f| f.sync_all())
                .map_err(|source| Error::Io {
                    path: tmp.to_path_buf(),
                    source,
                })?;
            HostStorage.rename(tmp, path)?;
            HostStorage.sync_dir(parent_dir(path))?;
            Ok(done)
        });
    if result.is_err() && tmp.symlink_metadata().is_ok() {
        let _ = std::fs::remove_file(tmp);
    }
    drop(held);
    let done = result?;
    progress.update(1, 1);
    Ok(done)
}

/// Copies the file `from` (open as `file`) into the new file `tmp`, its data
/// runs only, and flushes the copy. Progress goes to 90 % of the whole.
fn copy_file(
    file: &std::fs::File,
    from: &Path,
    tmp: &Path,
    progress: &mut dyn crate::Progress,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io {
            path: p.clone(),
            source,
        }
    };
    let len = file.metadata().map_err(io(from))?.len();
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io(tmp))?;
    // The original's permissions, which the rename would otherwise change.
    let perms = file.metadata().map_err(io(from))?.permissions();
    out.set_permissions(perms).map_err(io(tmp))?;
    out.set_len(len).map_err(io(tmp))?;
    // About 64 steps, so progress moves evenly whatever the size.
    let chunk = (len / 64).clamp(64 << 10, 4 << 20);
    let mut buf = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < len {
        let (data, run) =
            crate::host_file::seek_data_run(file, off, chunk.min(len - off)).map_err(io(from))?;
        if data {
            let b = &mut buf[..run as usize];
            file.read_exact_at(b, off).map_err(io(from))?;
            out.write_all_at(b, off).map_err(io(tmp))?;
        }
        off += run;
        if !progress.update(off * 9, len * 10) {
            return Err(Error::Cancelled {
                what: format!("{} was left as it was", from.display()),
            });
        }
    }
    out.sync_all().map_err(io(tmp))
}
