//! `<data-dir>/switches/<id>.json`: one switch's settings, versioned, written
//! atomically like `vm.json`. The folder is the truth about which switches exist.

use std::path::{Path, PathBuf};

use api::switches::SwitchKind;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The schema version this build writes.
///
/// - 1: the first (private and internal switches).
/// - 2: NAT switches (`type: nat`, `dhcp_range`). Nothing to upgrade.
/// - 3: external switches (`type: external`, `adapter`, `allow_management_os`,
///   `uplink`). Nothing to upgrade.
pub const SCHEMA_VERSION: u32 = 3;

/// One switch's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSettings {
    pub id: Uuid,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: SwitchKind,
    /// Internal switches: the host's addresses on the bridge, canonical text.
    #[serde(default)]
    pub host_addresses: Vec<String>,
    /// NAT switches: the DHCP range given (`START-END`); derived when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_range: Option<String>,
    /// External switches: the host interface that is the uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// External switches: the host shares the uplink.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_management_os: bool,
    /// External switches: what was moved off the uplink, written before the
    /// host is changed so that a service cut off halfway finishes (or, when
    /// `deleting`, undoes) the move at its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<UplinkRecord>,
}

/// The host's addresses and routes an external switch took from its uplink
/// (given back when the switch is deleted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkRecord {
    #[serde(default)]
    pub addresses: Vec<vswitch::uplink::HostAddress>,
    #[serde(default)]
    pub routes: Vec<vswitch::uplink::HostRoute>,
    /// The switch is being deleted: the next start gives the uplink back and
    /// removes the file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchFile {
    schema_version: u32,
    settings: SwitchSettings,
}

pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("switches")
}

pub fn path(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Every readable switch in `dir`, and a sentence for each file that is not.
pub fn load_all(dir: &Path) -> (Vec<SwitchSettings>, Vec<String>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let Ok(read) = std::fs::read_dir(dir) else {
        return (found, problems);
    };
    for entry in read.flatten() {
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        match load(&p) {
            Ok(s) if path(dir, s.id) == p => found.push(s),
            Ok(s) => problems.push(format!(
                "{} holds the switch {}, whose file would be {}; rename it or remove it",
                p.display(),
                s.id,
                path(dir, s.id).display()
            )),
            Err(e) => problems.push(e),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    (found, problems)
}

fn load(p: &Path) -> Result<SwitchSettings, String> {
    let bytes = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let (value, _version) = vm_config::file::versioned(&bytes, SCHEMA_VERSION).map_err(|e| match e {
        vm_config::file::Versioned::Parse(reason) => {
            format!("{} is not valid switch settings: {reason}", p.display())
        }
        vm_config::file::Versioned::TooNew(found) => format!(
            "{} has schema_version {found}, newer than this Viridian understands (up to {SCHEMA_VERSION}); upgrade Viridian",
            p.display()
        ),
    })?;
    let file: SwitchFile = serde_json::from_value(value)
        .map_err(|e| format!("{} is not valid switch settings: {e}", p.display()))?;
    Ok(file.settings)
}

/// Writes the switch's file atomically (temp, fsync, rename, fsync of the folder).
pub fn save(dir: &Path, settings: &SwitchSettings) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    vm_config::file::write_json_atomic(
        &path(dir, settings.id),
        &SwitchFile {
            schema_version: SCHEMA_VERSION,
            settings: settings.clone(),
        },
    )
}

pub fn remove(dir: &Path, id: Uuid) -> std::io::Result<()> {
    match std::fs::remove_file(path(dir, id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => std::fs::File::open(dir).and_then(|d| d.sync_all()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = SwitchSettings {
            id: Uuid::new_v4(),
            name: "lan".into(),
            kind: SwitchKind::Internal,
            host_addresses: vec!["10.44.0.1/24".into()],
            dhcp_range: None,
            adapter: None,
            allow_management_os: false,
            uplink: None,
        };
        save(dir.path(), &s).unwrap();
        let text = std::fs::read_to_string(path(dir.path(), s.id)).unwrap();
        assert!(text.contains("\"schema_version\": 3"), "{text}");
        assert!(text.contains("\"type\": \"internal\""), "{text}");
        std::fs::write(
            dir.path().join("broken.json"),
            b"{\"schema_version\": 1, \"settings\": {",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("future.json"),
            text.replace("\"schema_version\": 3", "\"schema_version\": 9"),
        )
        .unwrap();
        let (found, problems) = load_all(dir.path());
        assert_eq!(found, vec![s.clone()]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("broken.json is not valid switch settings")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("newer than this Viridian")),
            "{problems:?}"
        );
        remove(dir.path(), s.id).unwrap();
        remove(dir.path(), s.id).unwrap();
        assert!(load_all(dir.path()).0.is_empty());
    }
}
