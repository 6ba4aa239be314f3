//! `/v1/vms`: VM definitions (`settings`) and what is running now (`runtime`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_config::{
    AdapterKind, BootEntry, ControllerKind, Drive, DriveMedia, NetworkAdapter, ProcessorSettings,
    VmSettings,
};

/// A VM's runtime state (Hyper-V's `EnabledState` plus the health states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VmState {
    Off,
    Starting,
    Running,
    Paused,
    Saving,
    Saved,
    Stopping,
    /// The VM's worker failed while it ran; see `runtime.reason`.
    Critical,
    /// The VM's folder or settings are damaged; see `damaged_reason`. Repair or remove it.
    Damaged,
}

/// `GET /v1/vms/{vm}`: a VM in full. `settings` is what is configured; `runtime`
/// is what is running now. Changing settings never changes runtime by itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Vm {
    pub id: Uuid,
    pub name: String,
    /// What is configured. Absent only when the VM is Damaged and its settings file
    /// cannot be read at all.
    pub settings: Option<VmSettings>,
    pub runtime: VmRuntime,
    /// Why the VM is Damaged, when it is.
    pub damaged_reason: Option<String>,
    /// Deleted checkpoints whose disks wait to be merged, or are being merged now.
    #[serde(default)]
    pub pending_merges: Vec<crate::checkpoints::PendingMerge>,
}

/// What is running now. Only `state` is present while the VM is off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmRuntime {
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor_load_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_assigned_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_pid: Option<u32>,
    /// Processor use over the last seconds (Hyper-V's live counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor: Option<ProcessorUse>,
    /// Memory QEMU holds now (resident: guest memory touched plus its own), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_in_use_mib: Option<u64>,
    /// The processor settings in force now (they change live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor_settings: Option<ProcessorSettings>,
    /// Each served drive's I/O over the same window as `processor`, with its
    /// totals since start (Hyper-V's live disk counters), IDE before SCSI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveUse>,
    /// Why the VM is Critical, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How each network adapter is connected in this run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_adapters: Vec<crate::switches::AdapterConnection>,
}

impl VmRuntime {
    pub fn with_state(state: VmState) -> Self {
        VmRuntime {
            state,
            uptime_seconds: None,
            processor_load_percent: None,
            memory_assigned_mib: None,
            worker_pid: None,
            processor: None,
            memory_in_use_mib: None,
            processor_settings: None,
            drives: Vec::new(),
            reason: None,
            network_adapters: Vec::new(),
        }
    }
}

/// A running VM's processor use over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessorUse {
    /// Use of all its virtual processors together, % of its count (100: all busy).
    pub total_percent: f64,
    /// Each virtual processor's use, % of one host processor, in vCPU order.
    pub per_vcpu_percent: Vec<f64>,
    /// Everything in the VM's cgroup (vCPUs, QEMU's other threads, the worker), % of
    /// one host processor.
    pub host_processor_percent: f64,
    /// The window these figures cover, seconds.
    pub window_seconds: f64,
}

/// One drive's I/O totals since the VM's worker began serving it: what the guest's
/// completed requests moved, as the drive's server (NBD for IDE, vhost-user-blk for
/// SCSI) counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DriveIoTotals {
    pub read_bytes: u64,
    /// Bytes of data written (write-zeroes requests move none and are not in it).
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub flush_ops: u64,
    pub discard_ops: u64,
    pub write_zeroes_ops: u64,
    /// Reads and writes in units of 8 KiB: a transfer of up to 8 KiB counts one,
    /// a larger one one per started 8 KiB (Hyper-V's normalized operations).
    pub normalized_ops: u64,
}

/// A running VM's drive: its I/O rates over a window, and its totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DriveUse {
    /// The drive's slot, e.g. `SCSI 0:1` or `IDE 0:0`.
    pub drive: String,
    /// The image file it serves.
    pub path: String,
    pub read_bytes_per_second: f64,
    pub write_bytes_per_second: f64,
    pub read_ops_per_second: f64,
    pub write_ops_per_second: f64,
    pub flush_ops_per_second: f64,
    /// The window the rates cover, seconds (the same as the processor's).
    pub window_seconds: f64,
    pub totals: DriveIoTotals,
}

/// One drive's averages since the VM started (Measure-VM's disk figures, per drive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DriveMeasurement {
    pub drive: String,
    pub path: String,
    pub average_read_bytes_per_second: f64,
    pub average_write_bytes_per_second: f64,
    pub average_read_ops_per_second: f64,
    pub average_write_ops_per_second: f64,
    /// Average normalized operations (8 KiB units) per second, reads and writes.
    pub average_normalized_iops: f64,
    pub totals: DriveIoTotals,
}

/// `GET /v1/vms/{vm}/measure`: averages since the VM started (Hyper-V's Measure-VM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmMeasurement {
    pub id: Uuid,
    pub name: String,
    pub uptime_seconds: f64,
    /// Processor time used since start by everything in the VM's cgroup, seconds.
    pub processor_seconds: f64,
    /// Average use of all its virtual processors together, % of its count.
    pub average_processor_percent: f64,
    /// Average use of each virtual processor, % of one host processor.
    pub average_per_vcpu_percent: Vec<f64>,
    /// Average resident memory while the daemon watched it, MiB.
    pub average_memory_mib: u64,
    pub memory_in_use_mib: u64,
    pub processor_count: u32,
    /// Bytes read from all drives since start (Hyper-V's AggregatedDiskDataRead).
    #[serde(default)]
    pub disk_data_read_bytes: u64,
    /// Bytes written to all drives since start (AggregatedDiskDataWritten).
    #[serde(default)]
    pub disk_data_written_bytes: u64,
    /// Normalized (8 KiB) operations per second on all drives, averaged since start
    /// (AggregatedAverageNormalizedIOPS).
    #[serde(default)]
    pub average_normalized_iops: f64,
    /// Each drive's averages and totals, IDE before SCSI.
    #[serde(default)]
    pub drives: Vec<DriveMeasurement>,
    /// Bytes the VM's connected adapters received since their ports were made
    /// (Hyper-V's inbound network traffic).
    #[serde(default)]
    pub network_received_bytes: u64,
    /// Bytes they sent (outbound traffic).
    #[serde(default)]
    pub network_sent_bytes: u64,
    /// Each connected adapter's totals and drops by guard.
    #[serde(default)]
    pub network_adapters: Vec<AdapterMeasurement>,
}

/// One adapter's totals in a measurement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AdapterMeasurement {
    pub mac: String,
    pub counters: crate::switches::AdapterCounters,
}

/// One line of `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmSummary {
    pub id: Uuid,
    pub name: String,
    pub state: VmState,
    pub generation: Option<u8>,
    pub processor_count: Option<u32>,
    pub memory_mib: Option<u64>,
    pub damaged_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VmList {
    pub vms: Vec<VmSummary>,
}

/// `POST /v1/vms`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    #[schemars(length(min = 1, max = "vm_config::validate::MAX_NAME_CHARS"))]
    pub name: String,
    /// 1 or 2 (default 2).
    #[serde(default = "default_generation")]
    #[schemars(range(
        min = "vm_config::validate::MIN_GENERATION",
        max = "vm_config::validate::MAX_GENERATION"
    ))]
    pub generation: u8,
    /// Virtual processors (default 1).
    #[serde(default = "default_cpus")]
    #[schemars(range(min = "vm_config::validate::MIN_PROCESSORS"))]
    pub processor_count: u32,
    /// Startup memory in MiB (default 1024).
    #[serde(default = "default_memory")]
    #[schemars(range(min = "vm_config::validate::MIN_MEMORY_MIB"))]
    pub memory_mib: u64,
    #[serde(default)]
    #[schemars(length(max = "vm_config::validate::MAX_NOTES_CHARS"))]
    pub notes: String,
}

fn default_generation() -> u8 {
    2
}
fn default_cpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    1024
}

/// `PATCH /v1/vms/{vm}`: fields present are changed, others kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVmRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = "vm_config::validate::MAX_NAME_CHARS"))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = "vm_config::validate::MIN_MEMORY_MIB"))]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = "vm_config::validate::MAX_NOTES_CHARS"))]
    pub notes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<Vec<BootEntry>>,
}

/// `PATCH /v1/vms/{vm}/processor`: fields present are changed, others kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProcessorRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = "vm_config::validate::MIN_PROCESSORS"))]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = "vm_config::validate::MAX_PERCENT"))]
    pub reserve_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = "vm_config::validate::MAX_PERCENT"))]
    pub limit_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "vm_config::validate::MIN_RELATIVE_WEIGHT",
        max = "vm_config::validate::MAX_RELATIVE_WEIGHT"
    ))]
    pub relative_weight: Option<u32>,
}

/// `GET /v1/vms/{vm}/processor`
pub type Processor = ProcessorSettings;

/// `POST /v1/vms/{vm}/drives`. Without a number/location the first free slot on
/// that kind of controller is taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDriveRequest {
    pub controller: ControllerKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_number: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<u8>,
    pub media: DriveMedia,
}

/// `POST /v1/vms/{vm}/{start,stop,shutdown,save,pause,resume,restart}`: the body is
/// optional (empty or `{}`).
/// The longest shutdown time-out a request may ask for (a day).
pub const MAX_SHUTDOWN_TIMEOUT_SECONDS: u64 = 86_400;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmActionRequest {
    /// `shutdown` only: seconds the guest gets to power off after the ACPI power
    /// button before the job fails with `Timeout` (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// `PUT /v1/vms/{vm}/drives/{controller}/{number}/{location}`: change what a drive
/// holds (insert an ISO, re-point a moved disk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDriveRequest {
    pub media: DriveMedia,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DriveList {
    pub drives: Vec<Drive>,
}

/// `POST /v1/vms/{vm}/network-adapters`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddNetworkAdapterRequest {
    /// Synthetic unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<AdapterKind>,
    /// A fresh address is generated unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The slot on the guest's root PCI bus; the first free of 16–30 unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_slot: Option<u8>,
    /// The virtual switch to connect it to, by name or id; not connected unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    /// Its VLAN mode (`untagged` unless given) and the fields of that mode, as
    /// `PATCH /v1/vms/{vm}/network-adapters/{mac}` takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_mode: Option<vm_config::VlanMode>,
    /// The access VLAN, 1–4094; alone it means access mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "vm_config::validate::MIN_VLAN_ID",
        max = "vm_config::validate::MAX_VLAN_ID"
    ))]
    pub vlan_id: Option<u16>,
    /// The VLANs a trunk carries tagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = "vm_config::validate::MAX_VLAN_RANGES"))]
    pub vlan_allowed: Option<Vec<vm_config::VlanRange>>,
    /// The VLAN a trunk carries untagged, 1–4094.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "vm_config::validate::MIN_VLAN_ID",
        max = "vm_config::validate::MAX_VLAN_ID"
    ))]
    pub vlan_native: Option<u16>,
    /// Its guards, as `PATCH /v1/vms/{vm}/network-adapters/{mac}` sets them:
    /// all off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address_spoofing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_guard: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_guard: Option<bool>,
    /// Bits per second each way; unlimited unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "vm_config::validate::MIN_BANDWIDTH",
        max = "vm_config::validate::MAX_BANDWIDTH"
    ))]
    pub maximum_bandwidth: Option<u64>,
    /// Its part in port mirroring on its switch; `none` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mirroring: Option<vm_config::PortMirroring>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkAdapterList {
    pub network_adapters: Vec<NetworkAdapter>,
}

/// `POST /v1/vms/{vm}/move-storage`: moves every disk of the VM and of its
/// checkpoints (every file of every chain that belongs to the VM) into
/// `destination` (`Virtual Hard Disks/` and `Snapshots/<checkpoint-id>/` inside
/// it). The VM's settings folder stays. A job; cancellable until it commits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveStorageRequest {
    /// An absolute path: an empty folder, or one that does not exist yet.
    pub destination: String,
}
