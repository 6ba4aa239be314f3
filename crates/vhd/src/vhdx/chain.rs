//! Differencing chains: finding a VHDX child's parent by its locator, checking
//! the linkage, and opening the whole chain.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::metadata::{ParentLocator, VHDX_LOCATOR_TYPE};
use super::{braced, Error as VhdxError, VhdxImage};
use crate::backing::{HostStorage, Storage};
use crate::disk::Disk;
use crate::error::Result;

pub const PARENT_LINKAGE: &str = "parent_linkage";
pub const PARENT_LINKAGE2: &str = "parent_linkage2";
pub const RELATIVE_PATH: &str = "relative_path";
pub const VOLUME_PATH: &str = "volume_path";
pub const ABSOLUTE_WIN32_PATH: &str = "absolute_win32_path";

/// Turns a locator path into a path on this host: `\\?\` goes, backslashes
/// become slashes, and a relative path is taken from the child's folder. A
/// Windows drive or volume path cannot exist here and is kept as written.
pub fn host_path(child_dir: &Path, stored: &str) -> PathBuf {
    let s = stored.strip_prefix("\\\\?\\").unwrap_or(stored);
    let b = s.as_bytes();
    if (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
        || s.starts_with("Volume{")
        || s.starts_with("UNC\\")
    {
        return PathBuf::from(stored);
    }
    let unix = s.replace('\\', "/");
    let p = Path::new(&unix);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        child_dir.join(unix.trim_start_matches("./"))
    }
}

/// The locator path for an absolute host path, in the `\\?\` form the
/// absolute_win32_path key takes.
pub fn win32_absolute(path: &Path) -> String {
    format!("\\\\?\\{}", path.to_string_lossy().replace('/', "\\"))
}

/// Parses a `{guid}` linkage value (any case, braces optional).
pub fn parse_linkage(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

/// Where to look for the parent, in the order of MS-VHDX 2.6.2.6.3:
/// relative_path, volume_path, absolute_win32_path; then, as a last resort,
/// the file name of any of them beside the child.
pub fn parent_candidates(child: &Path, locator: &ParentLocator) -> Vec<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut out: Vec<PathBuf> = Vec::new();
    let mut names = Vec::new();
    for key in [RELATIVE_PATH, VOLUME_PATH, ABSOLUTE_WIN32_PATH] {
        if let Some(v) = locator.get(key) {
            let p = host_path(&dir, v);
            if !out.contains(&p) {
                out.push(p);
            }
            if let Some(name) = v.rsplit(['\\', '/']).next().filter(|n| !n.is_empty()) {
                names.push(dir.join(name));
            }
        }
    }
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// The parent's identities the child accepts (parent_linkage, parent_linkage2).
pub fn linkages(locator: &ParentLocator) -> Vec<Uuid> {
    [PARENT_LINKAGE, PARENT_LINKAGE2]
        .iter()
        .filter_map(|k| locator.get(k).and_then(parse_linkage))
        .collect()
}

fn locator_of(image: &VhdxImage) -> Result<&ParentLocator> {
    let path = image.file_path();
    let loc =
        image.metadata().parent_locator.as_ref().ok_or_else(|| {
            super::image::invalid(path, "differencing disk without a parent locator")
        })?;
    if loc.locator_type != VHDX_LOCATOR_TYPE {
        return Err(super::image::invalid(
            path,
            format!(
                "parent locator type {} is not the VHDX type; this version opens VHDX parents only",
                loc.locator_type
            ),
        ));
    }
    Ok(loc)
}

/// Finds the parent file of a differencing image, or says every place it looked.
pub fn resolve_parent(image: &VhdxImage) -> Result<PathBuf> {
    let tried = parent_candidates(image.file_path(), locator_of(image)?);
    tried.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        VhdxError::ParentNotFound {
            child: image.file_path().to_path_buf(),
            tried,
        }
        .into()
    })
}

/// Checks that `parent_path` is the parent `child` was made from: a VHDX whose
/// DataWriteGuid is one of the child's linkages, with the same logical sector
/// size.
pub fn check_linkage(child: &VhdxImage, parent_path: &Path) -> Result<()> {
    let loc = locator_of(child)?;
    let parent = VhdxImage::inspect(parent_path)?;
    let found = parent.header()?.data_write_guid;
    let accepted = linkages(loc);
    if !accepted.contains(&found) {
        return Err(VhdxError::ParentLinkageMismatch {
            child: child.file_path().to_path_buf(),
            parent: parent_path.to_path_buf(),
            expected: loc.get(PARENT_LINKAGE).unwrap_or("(none)").to_string(),
            found: braced(&found),
        }
        .into());
    }
    let (c, p) = (
        child.metadata().logical_sector_size,
        parent.metadata().logical_sector_size,
    );
    if c != p {
        return Err(VhdxError::SectorSizeMismatch {
            child: child.file_path().to_path_buf(),
            parent: parent_path.to_path_buf(),
            child_size: c,
            parent_size: p,
        }
        .into());
    }
    Ok(())
}

/// Opens a VHDX and, for a differencing disk, its ancestors: the leaf with the
/// requested access, every parent read-only with a shared lock.
pub fn open_chain(path: &Path, read_only: bool) -> Result<VhdxImage> {
    open_chain_on(&HostStorage, path, read_only, &mut HashSet::new())
}

pub(crate) fn open_chain_on(
    storage: &dyn Storage,
    path: &Path,
    read_only: bool,
    seen: &mut HashSet<PathBuf>,
) -> Result<VhdxImage> {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut image = VhdxImage::open_layer_on(storage, path, read_only)?;
    seen.insert(canonical);
    if !image.is_differencing() {
        return Ok(image);
    }
    let parent_path = resolve_parent(&image)?;
    let parent_canonical = parent_path
        .canonicalize()
        .unwrap_or_else(|_| parent_path.clone());
    if seen.contains(&parent_canonical) {
        return Err(VhdxError::ParentLoop {
            child: path.to_path_buf(),
            repeated: parent_path,
        }
        .into());
    }
    if crate::detect_format(&parent_path)? != crate::Format::Vhdx {
        return Err(super::image::invalid(
            path,
            format!("its parent {} is not a VHDX file", parent_path.display()),
        ));
    }
    check_linkage(&image, &parent_path)?;
    let parent = crate::open_parent(&parent_path, seen)?;
    image.set_parent(parent, parent_path);
    Ok(image)
}

/// Opens a VHDX parent (read-only, shared lock) with its own ancestors.
pub(crate) fn open_vhdx_parent(path: &Path, seen: &mut HashSet<PathBuf>) -> Result<Box<dyn Disk>> {
    Ok(Box::new(open_chain_on(&HostStorage, path, true, seen)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_paths_map_to_host_paths() {
        let dir = Path::new("/vms/a");
        assert_eq!(
            host_path(dir, ".\\base.vhdx"),
            PathBuf::from("/vms/a/base.vhdx")
        );
        assert_eq!(
            host_path(dir, "..\\b\\base.vhdx"),
            PathBuf::from("/vms/a/../b/base.vhdx")
        );
        assert_eq!(
            host_path(dir, "\\\\?\\\\vms\\b\\p.vhdx"),
            PathBuf::from("/vms/b/p.vhdx")
        );
        assert_eq!(
            host_path(dir, "\\\\?\\d:\\x\\p.vhdx"),
            PathBuf::from("\\\\?\\d:\\x\\p.vhdx")
        );
        assert_eq!(
            win32_absolute(Path::new("/vms/b/p.vhdx")),
            "\\\\?\\\\vms\\b\\p.vhdx"
        );
    }

    #[test]
    fn candidates_follow_the_specified_order() {
        let loc = ParentLocator {
            locator_type: VHDX_LOCATOR_TYPE,
            entries: vec![
                (ABSOLUTE_WIN32_PATH.into(), "\\\\?\\\\abs\\p.vhdx".into()),
                (
                    VOLUME_PATH.into(),
                    "\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\p.vhdx".into(),
                ),
                (RELATIVE_PATH.into(), ".\\rel\\p.vhdx".into()),
            ],
        };
        let c = parent_candidates(Path::new("/d/child.avhdx"), &loc);
        assert_eq!(c[0], PathBuf::from("/d/rel/p.vhdx"));
        assert!(c[1].to_string_lossy().contains("Volume{"));
        assert_eq!(c[2], PathBuf::from("/abs/p.vhdx"));
        assert_eq!(c.last().unwrap(), &PathBuf::from("/d/p.vhdx"));
    }

    #[test]
    fn linkage_parses_braced_guids_in_any_case() {
        let g = Uuid::new_v4();
        assert_eq!(parse_linkage(&braced(&g)), Some(g));
        assert_eq!(parse_linkage(&braced(&g).to_uppercase()), Some(g));
        assert_eq!(parse_linkage("nope"), None);
    }
}
