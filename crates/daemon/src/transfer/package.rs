//! The export folder: its layout, its manifest, and the file copy both export and
//! import use.
//!
//! ```text
//! <destination>/<VM name>/
//!   export.json             the manifest, written last: an export without it is unfinished
//!   vm.json                 the settings (schema-versioned); disk paths relative to this folder
//!   checkpoints.json        the checkpoint tree, disk paths relative (full exports only)
//!   saved-state.bin         memory and device state when the VM arrives Saved
//!   OVMF_VARS.fd            a generation 2 VM's UEFI variables
//!   Virtual Hard Disks/     disks that lived outside the VM's folder
//!   Snapshots/<id>/         a checkpoint's settings.json, saved-state.bin and disk layers
//! ```
//!
//! Files keep the path they had relative to the VM's folder, so an import by copy
//! into a data directory puts every file back where the daemon keeps it. Parent
//! locators inside the copied differencing disks are rewritten to their new
//! neighbours; the relative locator keeps the chain whole when the folder moves.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const MANIFEST_FILE: &str = "export.json";
pub const FORMAT: &str = "viridian-vm-export";
/// The manifest version this build writes; older ones are read, newer refused.
///
/// - 1: the first.
/// - 2: `switches`, the name (and id, type) of every switch an adapter of the VM
///   or of a checkpoint is on, so another host can match them by name. Version 1
///   manifests have none: their adapters' switches are known by id only.
pub const FORMAT_VERSION: u32 = 2;
pub const DISKS_FOLDER: &str = crate::vms::store::DISKS_FOLDER;

/// What an export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportKind {
    /// The VM with every checkpoint.
    Full,
    /// The current state alone, its disks flattened.
    Current,
    /// One checkpoint as the VM's state, its disks flattened.
    Checkpoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    Disk,
    SavedState,
    CheckpointSettings,
    CheckpointState,
    Firmware,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Relative to the export folder, `/`-separated.
    pub path: String,
    pub bytes: u64,
    pub role: FileRole,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub vm_id: Uuid,
    pub vm_name: String,
    pub kind: ExportKind,
    /// The checkpoint exported, for `kind: checkpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// The VM arrives Saved: `saved-state.bin` holds its memory and device state.
    pub saved: bool,
    /// Milliseconds since the Unix epoch.
    pub exported_ms: u64,
    pub viridian_version: String,
    /// Every file but the manifest and the JSON settings, with its size.
    pub files: Vec<ManifestFile>,
    /// The switches the adapters are on, as the exporting host knew them (version 2).
    #[serde(default)]
    pub switches: Vec<ExportedSwitch>,
}

/// A switch some adapter of the export is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedSwitch {
    /// What the adapters' settings record (the switch's id, or a name).
    pub key: String,
    /// The switch's id on the exporting host, when it was there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// Its name there (absent when the exporting host had no such switch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<api::switches::SwitchKind>,
}

impl ExportedSwitch {
    /// What a version 1 manifest tells of `key`: an id, or a name.
    pub fn from_key(key: &str) -> ExportedSwitch {
        let id = Uuid::parse_str(key).ok();
        ExportedSwitch {
            key: key.to_string(),
            id,
            name: id.is_none().then(|| key.to_string()),
            kind: None,
        }
    }

    /// The switch as a user knows it: its name, else what the settings record.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.key)
    }

    /// Whether `old` (of a `--switch OLD=NEW` mapping) names this switch: its
    /// name, its id, or what the settings record.
    pub fn answers_to(&self, old: &str) -> bool {
        let same_id = |id: Uuid| Uuid::parse_str(old).is_ok_and(|o| o == id);
        self.name.as_deref() == Some(old)
            || self.key == old
            || self.id.is_some_and(same_id)
            || Uuid::parse_str(&self.key).is_ok_and(same_id)
    }
}

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Viridian export manifest: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path} is export format version {found}, newer than this Viridian reads (up to {FORMAT_VERSION}); import it with a newer Viridian")]
    TooNew { path: PathBuf, found: u32 },
}

pub fn read_manifest(folder: &Path) -> Result<Manifest, ManifestError> {
    let path = folder.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(|source| ManifestError::Read {
        path: path.clone(),
        source,
    })?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ManifestError::Parse {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if m.format != FORMAT {
        return Err(ManifestError::Parse {
            path,
            reason: format!("its format is {:?}, not {FORMAT:?}", m.format),
        });
    }
    if m.format_version > FORMAT_VERSION {
        return Err(ManifestError::TooNew {
            path,
            found: m.format_version,
        });
    }
    Ok(m)
}

pub fn write_manifest(folder: &Path, m: &Manifest) -> std::io::Result<()> {
    vm_config::file::write_json_atomic(&folder.join(MANIFEST_FILE), m)
}

/// Chooses export-relative names: a file under the VM's folder keeps its relative
/// path; any other goes to `Virtual Hard Disks/` under its own name, made unique.
#[derive(Default)]
pub struct Names {
    used: HashSet<String>,
}

impl Names {
    pub fn name_for(&mut self, vm_dir: &Path, path: &Path) -> String {
        if let Ok(rel) = path.strip_prefix(vm_dir) {
            let rel = rel.to_string_lossy().into_owned();
            if self.used.insert(rel.clone()) {
                return rel;
            }
        }
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        self.unique(&file)
    }

    /// `Virtual Hard Disks/<file>`, or `<stem>-2.<ext>` ... when that is taken.
    pub fn unique(&mut self, file: &str) -> String {
        let (stem, ext) = match file.rsplit_once('.') {
            Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
            _ => (file.to_string(), String::new()),
        };
        for n in 1.. {
            let candidate = if n == 1 {
                format!("{DISKS_FOLDER}/{stem}{ext}")
            } else {
                format!("{DISKS_FOLDER}/{stem}-{n}{ext}")
            };
            if self.used.insert(candidate.clone()) {
                return candidate;
            }
        }
        unreachable!("an unused name is always found")
    }
}

/// Copies `src` to the new file `dst` (which must not exist) and syncs it.
/// `step` is told the bytes copied so far and stops the copy by returning false
/// (the partial file is removed and the error is `Interrupted`). Uses
/// `copy_file_range`, so the kernel copies (or shares) the data without passing
/// it through user space; falls back to read/write where it is not supported.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    step: &mut dyn FnMut(u64) -> bool,
) -> std::io::Result<u64> {
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    // From here on the file is ours: a failed copy takes it away again.
    let result = copy_inner(from, to, src, step);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

const CHUNK: usize = 64 << 20;

fn copy_inner(
    mut from: File,
    mut to: File,
    src: &Path,
    step: &mut dyn FnMut(u64) -> bool,
) -> std::io::Result<u64> {
    let len = from.metadata()?.len();
    let stopped = || std::io::Error::new(std::io::ErrorKind::Interrupted, "the copy was cancelled");
    let mut done: u64 = 0;
    let mut kernel_copy = true;
    let mut buf = Vec::new();
    while done < len {
        let want = (len - done).min(CHUNK as u64) as usize;
        let n = if kernel_copy {
            // SAFETY: both descriptors are open files owned by this function for the
            // whole call; null offsets make the kernel use and advance the file
            // positions, and no memory of this process is passed.
            let r = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    to.as_raw_fd(),
                    std::ptr::null_mut(),
                    want,
                    0,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                        if done == 0 =>
                    {
                        kernel_copy = false;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            r as usize
        } else {
            if buf.is_empty() {
                buf = vec![0u8; 4 << 20];
            }
            let take = want.min(buf.len());
            let n = from.read(&mut buf[..take])?;
            to.write_all(&buf[..n])?;
            n
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{} became shorter while it was copied", src.display()),
            ));
        }
        done += n as u64;
        if !step(done) {
            return Err(stopped());
        }
    }
    to.sync_all()?;
    Ok(done)
}

/// Syncs a directory, so the names of files made in it survive a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `rel` (a `/`-separated export path) under `root`, refusing anything that would
/// leave `root` (absolute paths, `..`): an export folder is not trusted input.
pub fn inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    let safe = !rel.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    safe.then(|| root.join(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_the_vm_folder_layout_and_make_outside_names_unique() {
        let mut n = Names::default();
        let vm = Path::new("/data/vms/1");
        assert_eq!(
            n.name_for(vm, Path::new("/data/vms/1/Snapshots/a/x.avhd")),
            "Snapshots/a/x.avhd"
        );
        assert_eq!(
            n.name_for(vm, Path::new("/srv/os.vhd")),
            "Virtual Hard Disks/os.vhd"
        );
        assert_eq!(
            n.name_for(vm, Path::new("/other/os.vhd")),
            "Virtual Hard Disks/os-2.vhd"
        );
        assert_eq!(
            n.name_for(vm, Path::new("/data/vms/1/Virtual Hard Disks/os-2.vhd")),
            "Virtual Hard Disks/os-2-2.vhd"
        );
    }

    #[test]
    fn an_exported_switch_answers_to_its_name_id_or_recorded_key() {
        let id = Uuid::parse_str("a6f1c1d4-0000-4000-8000-000000000001").unwrap();
        let e = ExportedSwitch {
            key: id.to_string(),
            id: Some(id),
            name: Some("lab".into()),
            kind: None,
        };
        assert!(e.answers_to("lab"));
        assert!(e.answers_to(&id.to_string()));
        assert!(e.answers_to("A6F1C1D4-0000-4000-8000-000000000001"));
        assert!(!e.answers_to("backend"));
        assert_eq!(e.label(), "lab");
        // A version 1 manifest: the settings' key is all there is.
        let old = ExportedSwitch::from_key(&id.to_string());
        assert_eq!((old.id, old.name.as_deref()), (Some(id), None));
        assert_eq!(old.label(), id.to_string());
        assert!(old.answers_to(&id.to_string()) && !old.answers_to("lab"));
        let by_name = ExportedSwitch::from_key("lab");
        assert_eq!((by_name.id, by_name.name.as_deref()), (None, Some("lab")));
    }

    #[test]
    fn export_paths_cannot_leave_the_folder() {
        let root = Path::new("/e/vm");
        assert_eq!(
            inside(root, "Snapshots/a/b.avhd"),
            Some(root.join("Snapshots/a/b.avhd"))
        );
        assert_eq!(inside(root, "../etc/passwd"), None);
        assert_eq!(inside(root, "/etc/passwd"), None);
        assert_eq!(inside(root, "a/../../b"), None);
        assert_eq!(inside(root, ""), None);
    }

    #[test]
    fn copy_file_copies_every_byte_and_can_be_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let data: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let dst = dir.path().join("dst");
        let mut seen = 0;
        assert_eq!(
            copy_file(&src, &dst, &mut |d| {
                seen = d;
                true
            })
            .unwrap(),
            data.len() as u64
        );
        assert_eq!(seen, data.len() as u64);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        // An existing destination is never overwritten.
        assert!(copy_file(&src, &dst, &mut |_| true).is_err());
        let dst2 = dir.path().join("dst2");
        let err = copy_file(&src, &dst2, &mut |_| false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
        assert!(!dst2.exists(), "a stopped copy leaves nothing behind");
    }
}
