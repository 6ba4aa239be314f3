//! Export and import of VMs (`POST /v1/vms/{vm}/export`, `POST /v1/vms/import`,
//! `POST /v1/vms/import/check`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `POST /v1/vms/{vm}/export`: writes `destination/<VM name>/`, a self-contained
/// folder that can be copied anywhere and imported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// An existing directory; the export goes into a new folder named after the VM
    /// (which must not exist yet, or be empty).
    pub destination: String,
    /// Export the current state only, its disks flattened (no checkpoints).
    #[serde(default)]
    pub no_checkpoints: bool,
    /// Export this one checkpoint (name or id) as the VM's state, its disks
    /// flattened, as Hyper-V's export of a single checkpoint does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

/// How an import uses the exported files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImportMode {
    /// Use the files where they are: the folder becomes the VM's storage.
    #[default]
    Register,
    /// Copy the files first (to `destination`, or the VM's folder in the data dir).
    Copy,
}

/// `POST /v1/vms/import` (and `/v1/vms/import/check` for the report alone).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// The export folder (the one holding `export.json`), or the directory it was
    /// exported into when that holds exactly one export.
    pub source: String,
    #[serde(default)]
    pub mode: ImportMode,
    /// With `copy`: where the files go (a folder named after the VM is made in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Give the VM a new id, and its network adapters new ids and MAC addresses,
    /// so it can live beside the VM it was exported from.
    #[serde(default)]
    pub new_id: bool,
    /// Import under this name instead of the exported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Puts the adapters of an exported switch on a switch of this host: the
    /// exported switch's name (or id) to this host's switch by name or id, or to
    /// `none` to import them disconnected. Unmapped switches are matched by id,
    /// else by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub switch_mapping: BTreeMap<String, String>,
}

/// What the adapters of one exported switch are connected to on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImportSwitch {
    /// The switch's name on the exporting host (its id when the export does not
    /// record the name: an export of an older Viridian).
    pub exported: String,
    /// Its id on the exporting host, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_id: Option<Uuid>,
    /// The switch of this host the adapters are put on; absent: disconnected, or
    /// no switch found (then a `MissingSwitch` problem says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_name: Option<String>,
    /// How it was found: `id`, `name`, `mapping`, or `missing`.
    pub matched_by: String,
    /// The adapters on it, by MAC address as exported (`MAC in checkpoint "NAME"`
    /// for a checkpoint's).
    pub adapters: Vec<String>,
}

/// One thing that stops an import, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ImportProblem {
    /// Stable kind scripts can switch on: `UnreadableExport`, `UnreadableSettings`,
    /// `SchemaTooNew`, `MissingFile`, `TruncatedFile`, `BrokenChain`, `InvalidSettings`,
    /// `IdInUse`, `NameInUse`, `MacInUse`, `DiskInUse`, `Destination`,
    /// `MissingSwitch` (an adapter's switch is not on this host),
    /// `UnknownSwitch` (a `switch_mapping` names a switch this host does not have),
    /// `UnusedSwitchMapping` (a `switch_mapping` names a switch no adapter is on),
    /// `ConflictingSwitchMapping` (two mappings of one switch, by name and by id,
    /// disagree).
    pub kind: String,
    /// What is wrong, naming the file or setting.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

/// What an import would bring in and everything that stops it (Hyper-V's
/// compatibility report); also the `details` of an `ImportIncompatible` error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImportReport {
    /// The export folder the report is about.
    pub source: String,
    pub vm_id: Option<Uuid>,
    pub vm_name: Option<String>,
    /// The state the VM arrives in: `Off`, or `Saved` when a saved state came along.
    pub state: Option<String>,
    pub checkpoints: usize,
    /// Every disk file of the export.
    pub disks: Vec<String>,
    /// Bytes an import by copy writes.
    pub bytes: u64,
    /// Each switch the exported adapters are on, and where they go here.
    #[serde(default)]
    pub switches: Vec<ImportSwitch>,
    pub problems: Vec<ImportProblem>,
}
