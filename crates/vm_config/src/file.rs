//! `vm.json` on disk: the versioned envelope and atomic writes.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::VmSettings;

/// The schema version this build writes. Older versions are upgraded on load.
///
/// - 1: the first.
/// - 2: network adapters carry a device id and their PCI slot (see [`crate::devices`]).
/// - 3: network adapters may name the virtual switch they connect to (`switch`).
///   Nothing to upgrade: an older adapter is not connected.
/// - 4: network adapters carry their guards and bandwidth (`mac_address_spoofing`,
///   `dhcp_guard`, `router_guard`, `maximum_bandwidth`). Nothing to upgrade: an
///   older adapter has the defaults (spoofing off, guards off, unlimited).
/// - 5: network adapters carry their VLAN (`vlan_mode`, `vlan_id`, `vlan_allowed`,
///   `vlan_native`). Nothing to upgrade: an older adapter is untagged.
/// - 6: network adapters carry their port mirroring (`port_mirroring`). Nothing to
///   upgrade: an older adapter mirrors nothing.
pub const SCHEMA_VERSION: u32 = 6;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    schema_version: u32,
    settings: VmSettings,
}

/// Why a `vm.json` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid VM settings: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path} has schema_version {found}, newer than this Viridian understands (up to {SCHEMA_VERSION}); upgrade Viridian")]
    TooNew { path: PathBuf, found: u64 },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why [`versioned`] refused a file's bytes.
#[derive(Debug)]
pub enum Versioned {
    /// Not JSON, or no numeric `schema_version`.
    Parse(String),
    /// Written by a newer Viridian: the version found.
    TooNew(u64),
}

/// Parses a versioned JSON file's bytes (a top-level `schema_version`, at most
/// `newest`): the document and its version, for the caller's upgrade steps.
pub fn versioned(bytes: &[u8], newest: u32) -> Result<(serde_json::Value, u64), Versioned> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Versioned::Parse(e.to_string()))?;
    let version = value
        .get("schema_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Versioned::Parse("it has no numeric schema_version".into()))?;
    if version > u64::from(newest) {
        return Err(Versioned::TooNew(version));
    }
    Ok((value, version))
}

/// Reads and, if older, upgrades a `vm.json`.
pub fn load(path: &Path) -> Result<VmSettings, FileError> {
    let bytes = fs::read(path).map_err(|source| FileError::Read {
        path: path.into(),
        source,
    })?;
    let parse = |reason: String| FileError::Parse {
        path: path.into(),
        reason,
    };
    let (value, version) = versioned(&bytes, SCHEMA_VERSION).map_err(|e| match e {
        Versioned::Parse(reason) => parse(reason),
        Versioned::TooNew(found) => FileError::TooNew {
            path: path.into(),
            found,
        },
    })?;
    let file: VmFile = serde_json::from_value(value).map_err(|e| parse(e.to_string()))?;
    let mut settings = file.settings;
    // Upgrade steps, oldest first.
    if version < 2 {
        crate::devices::upgrade_schema1(&mut settings);
    }
    Ok(settings)
}

/// Writes `vm.json` atomically: temp file, fsync, rename, fsync of the directory.
pub fn save(path: &Path, settings: &VmSettings) -> Result<(), FileError> {
    let file = VmFile {
        schema_version: SCHEMA_VERSION,
        settings: settings.clone(),
    };
    write_json_atomic(path, &file).map_err(|source| FileError::Write {
        path: path.into(),
        source,
    })
}

/// Writes `value` as pretty JSON (ending in a newline) with [`write_atomic`]: every
/// settings, tree, intent and manifest file of Viridian is written this way.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}
