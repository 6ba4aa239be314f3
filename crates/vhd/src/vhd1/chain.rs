//! Differencing chains: finding a child's parent and opening the whole chain.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::footer::DiskType;
use super::header::{decode_locator_path, DynamicHeader, PLATFORM_W2KU, PLATFORM_W2RU};
use super::{format_guid, Error as VhdError, VhdImage};
use crate::backing::{HostStorage, Storage};
use crate::disk::Disk;
use crate::error::Result;

/// Turns a Windows-style locator path into a path on this host: backslashes
/// become slashes; a relative path is taken from the child's folder.
fn host_path(child_dir: &Path, stored: &str) -> PathBuf {
    let b = stored.as_bytes();
    if b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && b[2] == b'\\' {
        // A Windows drive path: it cannot exist here; kept as written.
        return PathBuf::from(stored);
    }
    let unix = stored.replace('\\', "/");
    let p = Path::new(&unix);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        child_dir.join(unix.trim_start_matches("./"))
    }
}

/// The locator paths of `header`, as stored: relative (W2ru) first, then absolute (W2ku).
pub fn locator_paths(image: &VhdImage, header: &DynamicHeader) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for code in [PLATFORM_W2RU, PLATFORM_W2KU] {
        for loc in header.locators.iter().filter(|l| l.platform_code == code) {
            let len = u64::from(loc.data_length).min(64 * 1024) as usize;
            let mut data = vec![0u8; len];
            if image.file().read_at(&mut data, loc.data_offset).is_ok() {
                out.push((code, decode_locator_path(&data)));
            }
        }
    }
    out
}

/// Where to look for the parent, in order: the relative locator, the absolute
/// locator, then the parent-name field (as a path, then as a name beside the child).
pub fn parent_candidates(image: &VhdImage) -> Vec<PathBuf> {
    let Some(header) = image.header() else {
        return Vec::new();
    };
    let dir = image
        .file_path()
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    for (_, stored) in locator_paths(image, header) {
        push(host_path(&dir, &stored));
    }
    if !header.parent_name.is_empty() {
        push(host_path(&dir, &header.parent_name));
        let unix = header.parent_name.replace('\\', "/");
        if let Some(name) = Path::new(&unix).file_name() {
            push(dir.join(name));
        }
    }
    out
}

/// Finds the parent file of a differencing image, or says every place it looked.
pub fn resolve_parent(image: &VhdImage) -> Result<PathBuf> {
    let tried = parent_candidates(image);
    tried.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        VhdError::ParentNotFound {
            child: image.file_path().to_path_buf(),
            tried,
        }
        .into()
    })
}

/// Opens a VHD and, for a differencing disk, its ancestors: the leaf with the
/// requested access, every parent read-only with a shared lock.
pub fn open_chain(path: &Path, read_only: bool) -> Result<VhdImage> {
    open_chain_on(&HostStorage, path, read_only)
}

/// [`open_chain`] with the leaf on `storage`.
pub fn open_chain_on(storage: &dyn Storage, path: &Path, read_only: bool) -> Result<VhdImage> {
    let mut seen = HashSet::new();
    open_chain_inner(storage, path, read_only, &mut seen)
}

fn open_chain_inner(
    storage: &dyn Storage,
    path: &Path,
    read_only: bool,
    seen: &mut HashSet<PathBuf>,
) -> Result<VhdImage> {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut image = VhdImage::open_layer_on(storage, path, read_only)?;
    seen.insert(canonical);
    if image.footer().disk_type != DiskType::Differencing {
        return Ok(image);
    }
    let parent_path = resolve_parent(&image)?;
    let parent_canonical = parent_path
        .canonicalize()
        .unwrap_or_else(|_| parent_path.clone());
    if seen.contains(&parent_canonical) {
        return Err(VhdError::ParentLoop {
            child: path.to_path_buf(),
            repeated: parent_path,
        }
        .into());
    }
    let parent = crate::open_parent(&parent_path, seen)?;
    check_parent_id(&image, &parent_path)?;
    image.set_parent(parent);
    Ok(image)
}

/// Opens a VHD parent (read-only, shared lock) with its own ancestors.
pub(crate) fn open_vhd_parent(path: &Path, seen: &mut HashSet<PathBuf>) -> Result<Box<dyn Disk>> {
    Ok(Box::new(open_chain_inner(&HostStorage, path, true, seen)?))
}

fn check_parent_id(child: &VhdImage, parent_path: &Path) -> Result<()> {
    let Some(header) = child.header() else {
        return Ok(());
    };
    if let Some(found) = crate::parent_identity(parent_path)? {
        if found != header.parent_unique_id {
            return Err(VhdError::ParentIdMismatch {
                child: child.file_path().to_path_buf(),
                parent: parent_path.to_path_buf(),
                expected: format_guid(&header.parent_unique_id),
                found: format_guid(&found),
            }
            .into());
        }
    }
    Ok(())
}
