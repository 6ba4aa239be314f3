//! `set-parent`: re-points a differencing disk at its parent after the parent
//! moved (Hyper-V's "reconnect"), rewriting the parent name and both locators.

use std::path::Path;

use crate::vhd1::create::locator_strings;
use crate::vhd1::header::{encode_locator_path, PLATFORM_W2KU, PLATFORM_W2RU};
use crate::vhd1::{format_guid, DiskType, VhdImage};
use crate::{Error, Result};

fn invalid(path: &Path, what: String) -> Error {
    crate::vhd1::Error::Invalid {
        path: path.to_path_buf(),
        what,
    }
    .into()
}

/// Points `child` at `parent`. The parent must be the disk the child was made
/// from (same unique ID) unless `ignore_id_mismatch`, in which case the child
/// adopts the new parent's ID — the user vouches that its content is the same.
pub fn set_parent(child: &Path, parent: &Path, ignore_id_mismatch: bool) -> Result<()> {
    if crate::detect_format(child)? == crate::Format::Vhdx {
        return set_parent_vhdx(child, parent, ignore_id_mismatch);
    }
    let mut img = VhdImage::open_layer(child, false)?;
    if img.footer().disk_type != DiskType::Differencing {
        return Err(invalid(
            child,
            "is not a differencing disk: it has no parent".into(),
        ));
    }
    // The new parent (and its own chain) must open.
    let parent_disk = crate::open(parent, true)?;
    if parent_disk.size() < img.footer().current_size {
        return Err(invalid(
            child,
            format!(
                "the new parent {} ({} bytes) is smaller than the child ({} bytes)",
                parent.display(),
                parent_disk.size(),
                img.footer().current_size
            ),
        ));
    }
    drop(parent_disk);
    let expected = img.header().map(|h| h.parent_unique_id).unwrap_or_default();
    let found = crate::parent_identity(parent)?
        .ok_or_else(|| invalid(parent, "has no unique ID to link a VHD child to".into()))?;
    if found != expected && !ignore_id_mismatch {
        return Err(crate::vhd1::Error::ParentIdMismatch {
            child: child.to_path_buf(),
            parent: parent.to_path_buf(),
            expected: format_guid(&expected),
            found: format_guid(&found),
        }
        .into());
    }
    let paths = locator_strings(child, parent)?;
    let timestamp = std::fs::metadata(parent)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| {
            d.as_secs()
                .saturating_sub(crate::vhd1::footer::VHD_EPOCH_OFFSET) as u32
        });
    img.relink_parent(
        found,
        timestamp,
        paths.absolute.clone(),
        vec![
            (PLATFORM_W2KU, encode_locator_path(&paths.absolute)),
            (PLATFORM_W2RU, encode_locator_path(&paths.relative)),
        ],
    )
}

/// A VHDX child: the new parent must be a VHDX with the same logical sector
/// size whose DataWriteGuid is the child's parent_linkage (unless
/// `ignore_id_mismatch`); the locator is rewritten with parent_linkage,
/// relative_path and absolute_win32_path (a stale volume_path goes).
fn set_parent_vhdx(child: &Path, parent: &Path, ignore_id_mismatch: bool) -> Result<()> {
    use crate::vhdx::chain::{
        self, ABSOLUTE_WIN32_PATH, PARENT_LINKAGE, PARENT_LINKAGE2, RELATIVE_PATH, VOLUME_PATH,
    };
    use crate::vhdx::{braced, Error as VhdxError, VhdxImage};
    let mut img = VhdxImage::open_layer(child, false)?;
    if !img.is_differencing() {
        return Err(invalid(
            child,
            "is not a differencing disk: it has no parent".into(),
        ));
    }
    if crate::detect_format(parent)? != crate::Format::Vhdx {
        return Err(invalid(
            parent,
            "is not a VHDX file; a VHDX child needs a VHDX parent".into(),
        ));
    }
    let parent_disk = crate::open(parent, true)?;
    if parent_disk.size() < img.metadata().virtual_disk_size {
        return Err(invalid(
            child,
            format!(
                "the new parent {} ({} bytes) is smaller than the child ({} bytes)",
                parent.display(),
                parent_disk.size(),
                img.metadata().virtual_disk_size
            ),
        ));
    }
    drop(parent_disk);
    let p = VhdxImage::inspect(parent)?;
    let (cs, ps) = (
        img.metadata().logical_sector_size,
        p.metadata().logical_sector_size,
    );
    if cs != ps {
        return Err(VhdxError::SectorSizeMismatch {
            child: child.to_path_buf(),
            parent: parent.to_path_buf(),
            child_size: cs,
            parent_size: ps,
        }
        .into());
    }
    let found = p.header()?.data_write_guid;
    let mut loc = img.metadata().parent_locator.clone().unwrap_or_default();
    if !chain::linkages(&loc).contains(&found) && !ignore_id_mismatch {
        return Err(VhdxError::ParentLinkageMismatch {
            child: child.to_path_buf(),
            parent: parent.to_path_buf(),
            expected: loc.get(PARENT_LINKAGE).unwrap_or("(none)").to_string(),
            found: braced(&found),
        }
        .into());
    }
    let abs = std::path::absolute(parent).map_err(|source| Error::Io {
        path: parent.to_path_buf(),
        source,
    })?;
    loc.locator_type = crate::vhdx::metadata::VHDX_LOCATOR_TYPE;
    loc.set(PARENT_LINKAGE, Some(braced(&found)));
    loc.set(PARENT_LINKAGE2, None);
    loc.set(
        RELATIVE_PATH,
        Some(locator_strings(child, parent)?.relative),
    );
    loc.set(VOLUME_PATH, None);
    loc.set(ABSOLUTE_WIN32_PATH, Some(chain::win32_absolute(&abs)));
    img.relink_parent(loc)?;
    img.close()
}
