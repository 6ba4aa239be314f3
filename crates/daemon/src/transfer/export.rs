//! Export as blocking file work: which files, copied or flattened where, parent
//! links rewritten, settings with export-relative paths, the manifest last.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use api::ErrorCode;
use uuid::Uuid;
use vm_config::{DriveMedia, VmSettings};

use super::package::{self, ExportKind, FileRole, Manifest, ManifestFile, Names};
use crate::checkpoints::ops::SAVED_STATE_FILE;
use crate::checkpoints::tree::{self, Tree, SETTINGS_FILE};
use crate::error::ApiError;
use crate::switches::SwitchSettings;
use crate::vms::store::error_chain;

/// What to export: the state the exported VM arrives in, and for a full export
/// the checkpoint tree.
pub struct Source {
    pub vm_dir: PathBuf,
    /// The settings of the exported state (their drives name the disks to take).
    pub settings: VmSettings,
    /// Full export: the tree to carry (a temporary checkpoint already left out).
    pub tree: Option<Tree>,
    /// Memory and device state the VM arrives with (it arrives Saved).
    pub saved_state: Option<PathBuf>,
    pub kind: ExportKind,
    pub checkpoint: Option<String>,
    /// This host's switches, to record the name of each one an adapter is on.
    pub switches: Vec<SwitchSettings>,
}

pub struct Exported {
    pub folder: PathBuf,
    pub bytes: u64,
    pub files: usize,
}

enum Work {
    /// Copy the file as it is.
    Copy { from: PathBuf, to: String },
    /// Read through the chain under `leaf` into one new disk.
    Flatten {
        leaf: PathBuf,
        to: String,
        size: u64,
    },
}

fn failed(what: String) -> ApiError {
    ApiError::internal(what)
}

fn disk_err(path: &Path, e: &vhd::Error) -> ApiError {
    ApiError::new(
        ErrorCode::Damaged,
        format!("cannot export {}: {}", path.display(), error_chain(e)),
    )
}

/// The chain under `path`, leaf first, with each file's parent; fails when a
/// parent cannot be found (the export would be incomplete).
fn chain(path: &Path, parents: &mut HashMap<PathBuf, PathBuf>) -> Result<Vec<PathBuf>, ApiError> {
    let path = canonical(path)?;
    let mut out = vec![path.clone()];
    let mut cur = path.clone();
    loop {
        // Known from an earlier chain: follow it without reading the file again.
        if let Some(next) = parents.get(&cur) {
            cur = next.clone();
            out.push(cur.clone());
            continue;
        }
        let info = vhd::ops::info::layer_info(&cur).map_err(|e| disk_err(&cur, &e))?;
        let Some(parent) = info.parent else {
            return Ok(out);
        };
        let next = match (parent.resolved_path, parent.problem) {
            (Some(p), None) => canonical(&p)?,
            (_, problem) => {
                return Err(ApiError::new(
                    ErrorCode::Damaged,
                    format!(
                        "cannot export {}: its parent disk {} is missing or is not the disk it was made from ({}); repair the chain with `viridian vhd set-parent` first",
                        cur.display(),
                        parent.name,
                        problem.unwrap_or_default()
                    ),
                ))
            }
        };
        if out.contains(&next) || out.len() > 256 {
            return Err(ApiError::new(
                ErrorCode::Damaged,
                format!(
                    "cannot export {}: its chain of parents loops",
                    path.display()
                ),
            ));
        }
        parents.insert(cur.clone(), next.clone());
        out.push(next.clone());
        cur = next;
    }
}

/// The file's one true path (locators resolve to paths with `..` in them).
fn canonical(p: &Path) -> Result<PathBuf, ApiError> {
    std::fs::canonicalize(p).map_err(|e| {
        ApiError::new(
            ErrorCode::Damaged,
            format!("cannot export {}: {e}", p.display()),
        )
    })
}

fn hard_disk_paths(s: &VmSettings) -> impl Iterator<Item = PathBuf> + '_ {
    s.drives.iter().filter_map(|d| match &d.media {
        DriveMedia::HardDisk { path } => Some(PathBuf::from(path)),
        _ => None,
    })
}

/// `s` with every hard disk path replaced through `map` (paths not in it stay).
fn mapped(s: &VmSettings, map: &HashMap<PathBuf, String>) -> VmSettings {
    let mut s = s.clone();
    for d in &mut s.drives {
        if let DriveMedia::HardDisk { path } = &mut d.media {
            let key = std::fs::canonicalize(path.as_str())
                .unwrap_or_else(|_| PathBuf::from(path.as_str()));
            if let Some(rel) = map.get(&key) {
                *path = rel.clone();
            }
        }
    }
    s
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Writes the export of `src` into `folder` (which must not exist, or be empty).
/// `progress(done, total)` returns false to cancel. On failure or cancel the
/// folder is left as it was found.
pub fn export(
    src: &Source,
    folder: &Path,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<Exported, ApiError> {
    let existed = folder.exists();
    if existed {
        let empty = std::fs::read_dir(folder)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "{} already exists and is not empty; export into another directory or remove it",
                    folder.display()
                ),
            ));
        }
    } else {
        std::fs::create_dir(folder)
            .map_err(|e| failed(format!("cannot create {}: {e}", folder.display())))?;
    }
    let result = write_all(src, folder, progress);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(folder);
        if existed {
            let _ = std::fs::create_dir(folder);
        }
    }
    result
}

fn write_all(
    src: &Source,
    folder: &Path,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<Exported, ApiError> {
    let vm_dir = &canonical(&src.vm_dir)?;
    let mut names = Names::default();
    let mut parents: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut map: HashMap<PathBuf, String> = HashMap::new();
    let mut work: Vec<Work> = Vec::new();
    let mut node_settings: Vec<(uuid::Uuid, VmSettings)> = Vec::new();

    match &src.tree {
        Some(t) => {
            // Every disk any state refers to, with every file of its chain.
            let mut roots: Vec<PathBuf> = hard_disk_paths(&src.settings).collect();
            roots.extend(t.current_disks.iter().map(|d| d.path.clone()));
            for n in &t.nodes {
                roots.extend(n.disks.iter().map(|d| d.path.clone()));
                if n.deleted {
                    continue;
                }
                let p = tree::node_dir(vm_dir, n.id).join(SETTINGS_FILE);
                let s = vm_config::file::load(&p).map_err(|e| {
                    ApiError::new(
                        ErrorCode::Damaged,
                        format!("cannot export checkpoint {:?}: {}", n.name, error_chain(&e)),
                    )
                })?;
                roots.extend(hard_disk_paths(&s));
                node_settings.push((n.id, s));
            }
            for r in roots {
                for f in chain(&r, &mut parents)? {
                    if !map.contains_key(&f) {
                        let rel = names.name_for(vm_dir, &f);
                        map.insert(f.clone(), rel.clone());
                        work.push(Work::Copy { from: f, to: rel });
                    }
                }
            }
        }
        None => {
            for leaf in hard_disk_paths(&src.settings) {
                let leaf = canonical(&leaf)?;
                if map.contains_key(&leaf) {
                    continue;
                }
                let files = chain(&leaf, &mut parents)?;
                let base = files.last().cloned().unwrap_or_else(|| leaf.clone());
                if files.len() == 1 {
                    let rel = names.unique(
                        &base
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| "disk.vhd".into()),
                    );
                    map.insert(leaf.clone(), rel.clone());
                    work.push(Work::Copy {
                        from: leaf,
                        to: rel,
                    });
                } else {
                    let file = base
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "disk.vhdx".into());
                    let rel = names.unique(&file);
                    let size = vhd::ops::info::info(&leaf)
                        .map_err(|e| disk_err(&leaf, &e))?
                        .virtual_size;
                    map.insert(leaf.clone(), rel.clone());
                    work.push(Work::Flatten {
                        leaf,
                        to: rel,
                        size,
                    });
                }
            }
        }
    }

    let mut extra: Vec<(PathBuf, String, FileRole)> = Vec::new();
    if let Some(state) = &src.saved_state {
        extra.push((state.clone(), SAVED_STATE_FILE.into(), FileRole::SavedState));
    }
    let vars = vm_dir.join(worker::runtime::UEFI_VARS_FILE);
    if vars.exists() {
        extra.push((
            vars,
            worker::runtime::UEFI_VARS_FILE.into(),
            FileRole::Firmware,
        ));
    }
    if let Some(t) = &src.tree {
        for n in t.nodes.iter().filter(|n| n.memory_state && !n.deleted) {
            let p = tree::node_dir(vm_dir, n.id).join(SAVED_STATE_FILE);
            if p.exists() {
                extra.push((
                    p,
                    format!("{}/{}/{SAVED_STATE_FILE}", tree::SNAPSHOTS_FOLDER, n.id),
                    FileRole::CheckpointState,
                ));
            }
        }
    }

    let total: u64 = work
        .iter()
        .map(|w| match w {
            Work::Copy { from, .. } => size_of(from),
            Work::Flatten { size, .. } => *size,
        })
        .sum::<u64>()
        + extra.iter().map(|(p, _, _)| size_of(p)).sum::<u64>();
    let mut done: u64 = 0;
    let mut files: Vec<ManifestFile> = Vec::new();
    let cancelled = || {
        ApiError::new(
            ErrorCode::InvalidState,
            "the export was cancelled; nothing was left behind",
        )
    };

    let make_parent = |dst: &Path| -> Result<(), ApiError> {
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        }
        Ok(())
    };
    let copy = |from: &Path,
                rel: &str,
                done: &mut u64,
                progress: &mut dyn FnMut(u64, u64) -> bool|
     -> Result<u64, ApiError> {
        let dst = folder.join(rel);
        make_parent(&dst)?;
        let base = *done;
        let n =
            package::copy_file(from, &dst, &mut |d| progress(base + d, total)).map_err(|e| {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    cancelled()
                } else {
                    failed(format!(
                        "cannot copy {} to {}: {e}",
                        from.display(),
                        dst.display()
                    ))
                }
            })?;
        *done += n;
        Ok(n)
    };

    for w in &work {
        match w {
            Work::Copy { from, to } => {
                let bytes = copy(from, to, &mut done, progress)?;
                files.push(ManifestFile {
                    path: to.clone(),
                    bytes,
                    role: FileRole::Disk,
                });
            }
            Work::Flatten { leaf, to, size } => {
                let dst = folder.join(to);
                make_parent(&dst)?;
                let base = done;
                let mut step = |d: u64, t: u64| {
                    let part = if t == 0 {
                        0
                    } else {
                        (d as u128 * *size as u128 / t as u128) as u64
                    };
                    progress(base + part, total)
                };
                vhd::ops::convert::convert(
                    leaf,
                    &dst,
                    vhd::ops::convert::Target::for_path(&dst),
                    &mut step,
                )
                .map_err(|e| match e {
                    vhd::Error::Cancelled { .. } => cancelled(),
                    e => disk_err(leaf, &e),
                })?;
                done += size;
                files.push(ManifestFile {
                    path: to.clone(),
                    bytes: size_of(&dst),
                    role: FileRole::Disk,
                });
            }
        }
    }
    for (from, rel, role) in &extra {
        let bytes = copy(from, rel, &mut done, progress)?;
        files.push(ManifestFile {
            path: rel.clone(),
            bytes,
            role: *role,
        });
    }

    // The copies' parent links point at their new neighbours, bases first: a
    // parent's own chain must already resolve inside the folder when its child is
    // re-pointed at it.
    fn depth<'a>(parents: &'a HashMap<PathBuf, PathBuf>, mut f: &'a PathBuf) -> usize {
        let mut n = 0;
        while let Some(p) = parents.get(f) {
            f = p;
            n += 1;
        }
        n
    }
    let mut links: Vec<(&PathBuf, &PathBuf)> = parents.iter().collect();
    links.sort_by_key(|(child, _)| depth(&parents, child));
    for (child, parent) in links {
        let (Some(c), Some(p)) = (map.get(child), map.get(parent)) else {
            continue;
        };
        vhd::ops::set_parent::set_parent(&folder.join(c), &folder.join(p), false)
            .map_err(|e| disk_err(child, &e))?;
    }

    // Every disk in the folder verifies as it is: a VHDX copied while its
    // worker held it (a running VM's frozen layers are closed, but a copy of
    // an open file holds a log) has its log replayed here, in our copy; damage
    // (already in the source) fails the export rather than hide in it.
    for f in files.iter().filter(|f| f.role == FileRole::Disk) {
        let path = folder.join(&f.path);
        match vhd::ops::check::verify_copy(&path) {
            Ok(vhd::ops::check::Verified::Damaged(what)) => {
                return Err(failed(format!(
                    "the exported disk {} is damaged: {what}; check the VM's disk with `viridian vhd check`",
                    path.display()
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(disk_err(&path, &e)),
        }
    }

    // Settings with export-relative paths.
    let settings = mapped(&src.settings, &map);
    vm_config::file::save(&folder.join(crate::vms::store::SETTINGS_FILE), &settings)
        .map_err(|e| failed(error_chain(&e)))?;
    if let Some(t) = &src.tree {
        for (id, s) in &node_settings {
            let p = folder.join(tree::SNAPSHOTS_FOLDER).join(id.to_string());
            std::fs::create_dir_all(&p)
                .map_err(|e| failed(format!("cannot create {}: {e}", p.display())))?;
            vm_config::file::save(&p.join(SETTINGS_FILE), &mapped(s, &map))
                .map_err(|e| failed(error_chain(&e)))?;
            files.push(ManifestFile {
                path: format!("{}/{id}/{SETTINGS_FILE}", tree::SNAPSHOTS_FOLDER),
                bytes: size_of(&p.join(SETTINGS_FILE)),
                role: FileRole::CheckpointSettings,
            });
        }
        let mut t = t.clone();
        // Every layer is inside the folder now, wherever it lived before.
        t.layers_dir = None;
        let rel = |p: &PathBuf| {
            let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            map.get(&key)
                .map(PathBuf::from)
                .unwrap_or_else(|| p.clone())
        };
        for d in &mut t.current_disks {
            d.path = rel(&d.path);
        }
        for n in &mut t.nodes {
            for d in &mut n.disks {
                d.path = rel(&d.path);
            }
        }
        tree::save(folder, &t).map_err(|e| failed(error_chain(&e)))?;
    }
    sync_tree(folder).map_err(|e| failed(format!("cannot sync {}: {e}", folder.display())))?;

    // Sizes as the files are now (re-pointing a parent can grow a disk's header).
    for f in &mut files {
        f.bytes = size_of(&folder.join(&f.path));
    }
    let all_settings = std::iter::once(&src.settings).chain(node_settings.iter().map(|(_, s)| s));
    let manifest = Manifest {
        format: package::FORMAT.into(),
        format_version: package::FORMAT_VERSION,
        vm_id: src.settings.id,
        vm_name: src.settings.name.clone(),
        kind: src.kind,
        checkpoint: src.checkpoint.clone(),
        saved: src.saved_state.is_some(),
        exported_ms: crate::checkpoints::ops::now_ms(),
        viridian_version: env!("CARGO_PKG_VERSION").into(),
        files,
        switches: exported_switches(all_settings, &src.switches),
    };
    package::write_manifest(folder, &manifest).map_err(|e| {
        failed(format!(
            "cannot write the manifest in {}: {e}",
            folder.display()
        ))
    })?;
    Ok(Exported {
        folder: folder.to_path_buf(),
        bytes: total,
        files: manifest.files.len(),
    })
}

/// Every switch an adapter of `states` is on, with its name, id and type as this
/// host knows it (a switch the host no longer has: what the settings record).
fn exported_switches<'a>(
    states: impl Iterator<Item = &'a VmSettings>,
    switches: &[SwitchSettings],
) -> Vec<package::ExportedSwitch> {
    let mut out: Vec<package::ExportedSwitch> = Vec::new();
    for key in states.flat_map(|s| {
        s.network_adapters
            .iter()
            .filter_map(|a| a.switch.as_deref())
    }) {
        if out.iter().any(|e| e.key == key) {
            continue;
        }
        let here = Uuid::parse_str(key)
            .ok()
            .and_then(|id| switches.iter().find(|s| s.id == id))
            .or_else(|| switches.iter().find(|s| s.name == key));
        out.push(match here {
            Some(s) => package::ExportedSwitch {
                key: key.to_string(),
                id: Some(s.id),
                name: Some(s.name.clone()),
                kind: Some(s.kind),
            },
            None => package::ExportedSwitch::from_key(key),
        });
    }
    out
}

/// Syncs every directory under `root` (the files were synced as they were written).
fn sync_tree(root: &Path) -> std::io::Result<()> {
    for item in std::fs::read_dir(root)? {
        let item = item?;
        if item.file_type()?.is_dir() {
            sync_tree(&item.path())?;
        }
    }
    package::sync_dir(root)
}
