//! `<data-dir>/host.json`: the host-wide settings (processor defaults for new VMs),
//! versioned and written atomically like `vm.json`.

use std::path::{Path, PathBuf};

use api::host::NewVmDefaults;
use serde::{Deserialize, Serialize};

pub const FILE: &str = "host.json";
const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HostFile {
    schema_version: u32,
    #[serde(default)]
    new_vm_defaults: NewVmDefaults,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The saved defaults; Hyper-V's (0 %, 100 %, 100) when there is no file yet.
pub fn load(data_dir: &Path) -> Result<NewVmDefaults, String> {
    let p = path(data_dir);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice::<HostFile>(&bytes)
            .map(|f| f.new_vm_defaults)
            .map_err(|e| format!("{} cannot be read: {e}; fix or remove it", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NewVmDefaults::default()),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

pub fn save(data_dir: &Path, defaults: NewVmDefaults) -> std::io::Result<()> {
    let file = HostFile {
        schema_version: SCHEMA_VERSION,
        new_vm_defaults: defaults,
    };
    vm_config::file::write_json_atomic(&path(data_dir), &file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_absent_file_means_hyper_v_defaults() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), NewVmDefaults::default());
        let d = NewVmDefaults {
            reserve_percent: 20,
            limit_percent: 80,
            relative_weight: 200,
        };
        save(dir.path(), d).unwrap();
        assert_eq!(load(dir.path()).unwrap(), d);
        std::fs::write(path(dir.path()), "nonsense").unwrap();
        assert!(load(dir.path()).unwrap_err().contains("host.json"));
    }
}
