//! `/v1/vms/{vm}/checkpoints`: a VM's checkpoint tree (Hyper-V's snapshots).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `POST /v1/vms/{vm}/checkpoints`: the body is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpointRequest {
    /// Unique within the VM; default `<VM name> - (<YYYY-MM-DD> - <HH:MM:SS>)` (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = "vm_config::validate::MAX_CHECKPOINT_NAME_CHARS"))]
    pub name: Option<String>,
}

/// `PATCH /v1/vms/{vm}/checkpoints/{checkpoint}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameCheckpointRequest {
    #[schemars(length(min = 1, max = "vm_config::validate::MAX_CHECKPOINT_NAME_CHARS"))]
    pub name: String,
}

/// One disk of a checkpoint: the file that holds the disk as it was at the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckpointDisk {
    /// `ide 0:0`, `scsi 0:1`, ...
    pub slot: vm_config::Slot,
    pub path: String,
    /// Bytes the file takes on the host's disk.
    pub size_on_disk_bytes: u64,
}

/// One checkpoint of the tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Checkpoint {
    pub id: Uuid,
    pub name: String,
    /// The checkpoint this one was taken after; `None` at the root.
    pub parent: Option<Uuid>,
    /// Checkpoints taken after this one (visible ones; merge-pending ones are
    /// folded into their parents' list of children).
    pub children: Vec<Uuid>,
    /// RFC 3339.
    pub created: String,
    /// Whether the checkpoint holds memory and device state (taken while the VM
    /// ran or was saved): applying it leaves the VM Saved.
    pub has_memory_state: bool,
    pub disks: Vec<CheckpointDisk>,
    /// Bytes its files take (disks, settings, memory state).
    pub size_on_disk_bytes: u64,
    /// Whether the VM's current state descends directly from this checkpoint.
    pub is_current_parent: bool,
}

/// A deleted checkpoint whose disks are still waiting to be merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PendingMerge {
    /// The deleted checkpoint's id.
    pub id: Uuid,
    /// Its name when it was deleted.
    pub name: String,
    pub state: MergeState,
    /// Why it waits, or how far it is.
    pub reason: String,
    /// The running merge job, when `Running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_complete: Option<u8>,
    /// Its disks, waiting to be merged.
    pub disks: Vec<CheckpointDisk>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MergeState {
    /// Waits until only one descendant remains (or, when the running VM cannot
    /// merge live, until it stops).
    Pending,
    /// A merge job is running now.
    Running,
}

/// `GET /v1/vms/{vm}/checkpoints`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CheckpointTree {
    /// In creation order.
    pub checkpoints: Vec<Checkpoint>,
    /// The visible checkpoint the VM's current state descends from (after any
    /// merge-pending ones in between); `None` when it has none.
    pub current_parent: Option<Uuid>,
    pub pending_merges: Vec<PendingMerge>,
    /// At most this many checkpoints per VM (`viridiand --checkpoint-limit`).
    pub limit: usize,
}
