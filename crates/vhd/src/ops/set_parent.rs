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
