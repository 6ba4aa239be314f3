//! Which files make up a VM's disks (every file of every chain: the current
//! drives and every checkpoint's), and which of them other VMs use too: what a
//! delete may remove and what a storage move may take along.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vm_config::{DriveMedia, VmSettings};

use crate::checkpoints::tree::Tree;
use crate::service::Service;

/// The path with links and `..` resolved when it exists, else as given.
pub fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// The chain under `leaf`, leaf first (as given), when the whole chain opens
/// (every parent present and linked by the right identity); `None` otherwise.
/// The parents are canonical: a relative locator resolves through the child's
/// folder (`Snapshots/<id>/../../x.vhd`), which may go away before the parent.
pub fn whole_chain(leaf: &Path) -> Option<Vec<PathBuf>> {
    drop(vhd::open(leaf, true).ok()?);
    let chain = vhd::ops::info::info(leaf).ok()?.chain;
    Some(
        std::iter::once(leaf.to_path_buf())
            .chain(chain.iter().skip(1).map(|p| canonical(p)))
            .collect(),
    )
}

/// The hard-disk paths the VM's settings name.
pub fn drive_paths(settings: &VmSettings) -> Vec<PathBuf> {
    settings
        .drives
        .iter()
        .filter_map(|d| match &d.media {
            DriveMedia::HardDisk { path } => Some(PathBuf::from(path)),
            _ => None,
        })
        .collect()
}

/// Every file of every chain of a VM: its current drives' and its checkpoints',
/// leaf first per chain, each once. A chain that does not open counts with the
/// files that exist of what the settings and the tree name.
pub fn vm_files(settings: Option<&VmSettings>, tree: &Tree) -> Vec<PathBuf> {
    let mut leaves: Vec<PathBuf> = settings.map(drive_paths).unwrap_or_default();
    leaves.extend(tree.current_disks.iter().map(|d| d.path.clone()));
    leaves.extend(
        tree.nodes
            .iter()
            .flat_map(|n| &n.disks)
            .map(|d| d.path.clone()),
    );
    let mut out: Vec<PathBuf> = Vec::new();
    for leaf in leaves {
        let files = whole_chain(&leaf).unwrap_or_else(|| {
            if leaf.exists() {
                vec![leaf.clone()]
            } else {
                Vec::new()
            }
        });
        for f in files {
            if !out.iter().any(|o| canonical(o) == canonical(&f)) {
                out.push(f);
            }
        }
    }
    out
}

/// Every file the chains of the other VMs use, canonical, with the VM that uses it.
pub fn used_by_others(svc: &Service, id: Uuid) -> HashMap<PathBuf, String> {
    let others: Vec<(Uuid, String, PathBuf, Option<VmSettings>)> = svc
        .store()
        .entries()
        .filter(|e| e.id != id)
        .map(|e| (e.id, e.name(), e.dir.clone(), e.settings.clone()))
        .collect();
    let mut out = HashMap::new();
    for (oid, name, dir, settings) in others {
        let tree = crate::checkpoints::tree::load(&dir).unwrap_or_default();
        for f in vm_files(settings.as_ref(), &tree) {
            out.entry(canonical(&f))
                .or_insert_with(|| format!("VM {name} ({oid})"));
        }
    }
    out
}

/// Why a drive's chain is broken (a parent missing or not the one the child was
/// made from), for the first such drive; `None` when every chain resolves or a
/// disk cannot be inspected at all (then the drive checks speak). Reads headers
/// only, takes no locks: safe while a worker holds the disks.
pub fn broken_chain(settings: &VmSettings) -> Option<String> {
    for d in &settings.drives {
        let DriveMedia::HardDisk { path } = &d.media else {
            continue;
        };
        let mut cur = PathBuf::from(path);
        for _ in 0..256 {
            // One layer at a time: a deep `info` at every level read the chain
            // below it again, d² header reads for a chain of d (a VM with 45
            // checkpoints spent 300 ms here on every settings change).
            let Ok(info) = vhd::ops::info::layer_info(&cur) else {
                break;
            };
            let Some(parent) = info.parent else {
                break;
            };
            if let Some(problem) = parent.problem {
                return Some(format!(
                    "the disk in {} ({path}) builds on a parent that is missing or does not match: {problem}; restore the parent or re-point the drive",
                    d.slot
                ));
            }
            let Some(next) = parent.resolved_path else {
                return Some(format!(
                    "the disk in {} ({path}) builds on {}, which is missing; restore it or re-point the drive",
                    d.slot, parent.name
                ));
            };
            cur = next;
        }
    }
    None
}
