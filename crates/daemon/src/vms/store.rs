//! The VM store: one folder per VM under `<data-dir>/vms`, `vm.json` inside.
//! The folders are the truth; the in-memory index is rebuilt from them at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vm_config::{file, validate, VmSettings};

/// One VM as the store knows it.
#[derive(Debug, Clone)]
pub struct VmEntry {
    pub id: Uuid,
    pub dir: PathBuf,
    /// `None` when `vm.json` cannot be read or parsed.
    pub settings: Option<VmSettings>,
    /// Why the VM is damaged, if it is.
    pub damaged: Option<String>,
}

impl VmEntry {
    pub fn name(&self) -> String {
        match &self.settings {
            Some(s) => s.name.clone(),
            None => self.id.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the VM folder {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list the VM folders in {path}; check that the data directory is readable")]
    ListDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] file::FileError),
    #[error("cannot remove the VM folder {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The index of VMs, in id order.
pub struct Store {
    root: PathBuf,
    vms: BTreeMap<Uuid, VmEntry>,
}

pub const SETTINGS_FILE: &str = "vm.json";
pub const DISKS_FOLDER: &str = "Virtual Hard Disks";

impl Store {
    /// Reads every VM folder under `<data_dir>/vms`. A damaged folder becomes a
    /// Damaged entry; it never stops the others from loading.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let root = data_dir.join("vms");
        std::fs::create_dir_all(&root).map_err(|source| StoreError::CreateDir {
            path: root.clone(),
            source,
        })?;
        let mut store = Store {
            root: root.clone(),
            vms: BTreeMap::new(),
        };
        let listing = std::fs::read_dir(&root).map_err(|source| StoreError::ListDir {
            path: root.clone(),
            source,
        })?;
        for item in listing.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let Ok(id) = Uuid::parse_str(&name) else {
                tracing::debug!(folder = %item.path().display(), "not a VM folder (name is not a UUID); skipped");
                continue;
            };
            let dir = item.path();
            let settings_path = dir.join(SETTINGS_FILE);
            if !dir.is_dir() {
                continue;
            }
            if std::fs::symlink_metadata(&settings_path).is_err() {
                tracing::info!(folder = %dir.display(), "folder holds no vm.json (left by a deleted VM); skipped");
                continue;
            }
            let entry = match file::load(&settings_path) {
                Ok(s) if s.id != id => VmEntry {
                    id,
                    dir,
                    damaged: Some(format!(
                        "{} says the VM's id is {}, but its folder is named {id}; rename the folder or fix the id",
                        settings_path.display(),
                        s.id
                    )),
                    settings: Some(s),
                },
                Ok(s) => VmEntry { id, dir, settings: Some(s), damaged: None },
                Err(e) => VmEntry { id, dir, settings: None, damaged: Some(error_chain(&e)) },
            };
            store.vms.insert(id, entry);
        }
        store.recheck_all();
        for e in store.vms.values().filter(|e| e.damaged.is_some()) {
            tracing::warn!(vm = %e.id, reason = e.damaged.as_deref().unwrap_or(""), "VM is damaged");
        }
        Ok(store)
    }

    /// Recomputes damage from missing files and duplicate names for every VM.
    fn recheck_all(&mut self) {
        let ids: Vec<Uuid> = self.vms.keys().copied().collect();
        for id in ids {
            self.recheck(id);
        }
    }

    /// Marks a VM damaged when its disks are missing or its name is taken by an
    /// earlier VM; clears the mark when it is whole again. Unreadable settings stay damaged.
    pub fn recheck(&mut self, id: Uuid) {
        let Some(entry) = self.vms.get(&id) else {
            return;
        };
        if crate::vms::delete::intent_path(&entry.dir).exists() {
            if let Some(e) = self.vms.get_mut(&id) {
                e.damaged = Some(
                    "a delete of this VM is under way or was interrupted; `viridian vm delete` (or the next daemon start) finishes it".into(),
                );
            }
            return;
        }
        let Some(settings) = &entry.settings else {
            return;
        };
        if entry
            .damaged
            .as_deref()
            .is_some_and(|d| d.contains("but its folder is named"))
        {
            return;
        }
        let mut reason = validate::check_files(settings)
            .err()
            .map(|e| format!("{e}; re-point the drive or remove it"))
            .or_else(|| crate::vms::disk_owners::broken_chain(settings));
        if reason.is_none() {
            if let Some(other) = self
                .vms
                .values()
                .find(|o| o.id < id && o.settings.as_ref().is_some_and(|s| s.name == settings.name))
            {
                reason = Some(format!(
                    "the name {:?} is also used by VM {}; rename one of them",
                    settings.name, other.id
                ));
            }
        }
        if let Some(e) = self.vms.get_mut(&id) {
            e.damaged = reason;
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = &VmEntry> {
        self.vms.values()
    }

    pub fn get(&self, id: Uuid) -> Option<&VmEntry> {
        self.vms.get(&id)
    }

    /// Finds a VM by id (when `key` is a UUID of a VM) or else by name.
    pub fn find(&self, key: &str) -> Option<&VmEntry> {
        if let Ok(id) = Uuid::parse_str(key) {
            if let Some(e) = self.vms.get(&id) {
                return Some(e);
            }
        }
        self.vms
            .values()
            .find(|e| e.settings.as_ref().is_some_and(|s| s.name == key))
    }

    /// Settings of every readable VM except `id`.
    pub fn others(&self, id: Uuid) -> impl Iterator<Item = &VmSettings> {
        self.vms
            .values()
            .filter(move |e| e.id != id)
            .filter_map(|e| e.settings.as_ref())
    }

    /// Writes a VM's settings (creating its folder when new) and updates the index.
    pub fn save(&mut self, settings: VmSettings) -> Result<&VmEntry, StoreError> {
        let id = settings.id;
        let dir = self.root.join(id.to_string());
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        file::save(&dir.join(SETTINGS_FILE), &settings)?;
        self.vms.insert(
            id,
            VmEntry {
                id,
                dir,
                settings: Some(settings),
                damaged: None,
            },
        );
        self.recheck(id);
        Ok(&self.vms[&id])
    }

    /// Removes a VM: its settings, checkpoints and runtime files. Disks under
    /// `Virtual Hard Disks` stay (as Hyper-V's Remove-VM leaves the VHDs).
    pub fn remove(&mut self, id: Uuid) -> Result<(), StoreError> {
        let Some(entry) = self.vms.get(&id) else {
            return Ok(());
        };
        let dir = entry.dir.clone();
        let settings_path = dir.join(SETTINGS_FILE);
        let meta = std::fs::symlink_metadata(&settings_path);
        let removed = match meta {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&settings_path),
            Ok(_) => std::fs::remove_file(&settings_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        removed.map_err(|source| StoreError::Remove {
            path: settings_path.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(dir.join(crate::checkpoints::tree::TREE_FILE));
        for sub in ["Snapshots", "runtime"] {
            let p = dir.join(sub);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|source| StoreError::Remove {
                    path: p.clone(),
                    source,
                })?;
            }
        }
        // Removes the folder only when nothing (no disks) is left in it.
        let disks = dir.join(DISKS_FOLDER);
        let _ = std::fs::remove_dir(&disks);
        let _ = std::fs::remove_dir(&dir);
        self.vms.remove(&id);
        Ok(())
    }
}

/// An error and its sources as one sentence chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
