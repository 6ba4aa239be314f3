//! `<data-dir>/host.json`: the host-wide settings (processor defaults for new VMs,
//! the storage roots, the MAC address pool), versioned and written atomically like
//! `vm.json`. Schema 1 (no storage roots) reads as schema 2 with none besides the
//! data dir; schema 2 (no MAC pool) as schema 3 with the host's default pool.

use std::path::{Path, PathBuf};

use api::host::NewVmDefaults;
use serde::{Deserialize, Serialize};

pub const FILE: &str = "host.json";
const SCHEMA_VERSION: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HostFile {
    schema_version: u32,
    #[serde(default)]
    new_vm_defaults: NewVmDefaults,
    /// Folders the API may use besides the data dir (schema 2). Only the host's
    /// administrator edits them, here or with `viridiand --storage-root`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    storage_roots: Vec<PathBuf>,
    /// The range of dynamic MAC addresses (schema 3); absent: the host's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac_address_pool: Option<api::host::MacAddressPool>,
}

/// What host.json holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSettings {
    pub new_vm_defaults: NewVmDefaults,
    pub storage_roots: Vec<PathBuf>,
    /// Set by `PATCH /v1/host`; `None`: the host's default range.
    pub mac_address_pool: Option<api::host::MacAddressPool>,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The saved settings; Hyper-V's processor defaults (0 %, 100 %, 100) and no extra
/// storage roots when there is no file yet.
pub fn load(data_dir: &Path) -> Result<HostSettings, String> {
    let p = path(data_dir);
    match std::fs::read(&p) {
        Ok(bytes) => {
            let f = serde_json::from_slice::<HostFile>(&bytes)
                .map_err(|e| format!("{} cannot be read: {e}; fix or remove it", p.display()))?;
            if f.schema_version > SCHEMA_VERSION {
                return Err(format!(
                    "{} has schema version {}, newer than this viridiand knows ({SCHEMA_VERSION}); run a newer viridiand",
                    p.display(),
                    f.schema_version
                ));
            }
            Ok(HostSettings {
                new_vm_defaults: f.new_vm_defaults,
                storage_roots: f.storage_roots,
                mac_address_pool: f.mac_address_pool,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HostSettings::default()),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// Saves new processor defaults and MAC pool, keeping the file's storage roots.
pub fn save(
    data_dir: &Path,
    defaults: NewVmDefaults,
    mac_address_pool: Option<api::host::MacAddressPool>,
) -> Result<(), String> {
    let storage_roots = load(data_dir)?.storage_roots;
    let file = HostFile {
        schema_version: SCHEMA_VERSION,
        new_vm_defaults: defaults,
        storage_roots,
        mac_address_pool,
    };
    vm_config::file::write_json_atomic(&path(data_dir), &file)
        .map_err(|e| format!("cannot write {}: {e}", path(data_dir).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_absent_file_means_hyper_v_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), HostSettings::default());
        let d = NewVmDefaults {
            reserve_percent: 20,
            limit_percent: 80,
            relative_weight: 200,
        };
        save(dir.path(), d, None).unwrap();
        assert_eq!(load(dir.path()).unwrap().new_vm_defaults, d);
        std::fs::write(path(dir.path()), "nonsense").unwrap();
        assert!(load(dir.path()).unwrap_err().contains("host.json"));
    }

    #[test]
    fn schema_1_reads_with_no_roots_and_saving_defaults_keeps_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            path(dir.path()),
            r#"{"schema_version":1,"new_vm_defaults":{"reserve_percent":10,"limit_percent":90,"relative_weight":300}}"#,
        )
        .unwrap();
        let s = load(dir.path()).unwrap();
        assert_eq!(s.new_vm_defaults.reserve_percent, 10);
        assert!(s.storage_roots.is_empty());
        std::fs::write(
            path(dir.path()),
            r#"{"schema_version":2,"storage_roots":["/srv/disks"]}"#,
        )
        .unwrap();
        save(dir.path(), NewVmDefaults::default(), None).unwrap();
        assert_eq!(
            load(dir.path()).unwrap().storage_roots,
            vec![PathBuf::from("/srv/disks")]
        );
        std::fs::write(path(dir.path()), r#"{"schema_version":9}"#).unwrap();
        assert!(load(dir.path()).unwrap_err().contains("newer"));
    }
}
