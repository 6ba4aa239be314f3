//! `GET /v1/host`

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HostInfo {
    /// Viridian's version, e.g. `0.1.0`.
    pub version: String,
    /// How this build was made: profile and target.
    pub build: String,
    pub accelerator: AcceleratorInfo,
    pub limits: HostLimitsInfo,
    pub data_dir: String,
    /// The folders where the API may create, read, attach, move, export to and delete
    /// files (the data dir first); set by the host's administrator with
    /// `viridiand --storage-root` or in host.json, not through the API.
    #[serde(default)]
    pub storage_roots: Vec<String>,
    /// How processor limits and weights are enforced: the cgroup hierarchy and where
    /// VMs' groups go, or why they are not enforced.
    #[serde(default)]
    pub processor_control: String,
    /// What admission control counts: capacity, and what running VMs hold now.
    pub resources: HostResources,
    /// Processor settings every new VM starts with (`PATCH /v1/host` changes them).
    pub new_vm_defaults: NewVmDefaults,
    /// Where adapters added without a MAC get theirs (`PATCH /v1/host` changes it).
    pub mac_address_pool: MacAddressPool,
    /// The firmware VMs boot.
    #[serde(default)]
    pub firmware: FirmwareInfo,
    /// Virtual switches' data path.
    #[serde(default)]
    pub network: crate::switches::NetworkInfo,
}

/// The firmware each generation boots, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FirmwareInfo {
    /// Generation 1's SeaBIOS image, or `qemu` for QEMU's own `bios-256k.bin`.
    pub generation1: String,
    /// One sentence: why that one (viridiand's `--bios`).
    pub generation1_reason: String,
    /// Generation 2's UEFI code (OVMF).
    pub generation2: String,
}

/// Processor reserve, limit and weight a new VM gets unless it says otherwise; kept
/// in `<data-dir>/host.json`. Changing them leaves existing VMs as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NewVmDefaults {
    pub reserve_percent: u8,
    pub limit_percent: u8,
    pub relative_weight: u32,
}

impl Default for NewVmDefaults {
    fn default() -> Self {
        NewVmDefaults {
            reserve_percent: 0,
            limit_percent: 100,
            relative_weight: 100,
        }
    }
}

/// The range dynamic MAC addresses come from (Hyper-V's `MacAddressMinimum` and
/// `MacAddressMaximum`), both ends included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MacAddressPool {
    pub minimum: String,
    pub maximum: String,
}

/// `PATCH /v1/host`: fields present are changed, others kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateHostRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = "vm_config::validate::MAX_PERCENT"))]
    pub default_reserve_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = "vm_config::validate::MAX_PERCENT"))]
    pub default_limit_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "vm_config::validate::MIN_RELATIVE_WEIGHT",
        max = "vm_config::validate::MAX_RELATIVE_WEIGHT"
    ))]
    pub default_relative_weight: Option<u32>,
    /// The first address of the dynamic MAC pool (unicast, e.g. `02:15:5d:00:00:00`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address_minimum: Option<String>,
    /// The last address of the dynamic MAC pool (the same first byte as the minimum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address_maximum: Option<String>,
}

/// Admission control's figures. A start (or a live change of the reserve) that would
/// take `processor_reserved_percent` above `processor_capacity_percent`, or
/// `memory_assigned_mib` above `memory_capacity_mib`, fails with `InsufficientResources`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HostResources {
    /// Logical processors admission control counts (the host's, unless configured).
    pub logical_processors: u32,
    /// Processor capacity kept for the host, in % of one logical processor.
    pub host_reserve_percent: u32,
    /// logical_processors × 100 − host_reserve_percent.
    pub processor_capacity_percent: u64,
    /// Sum over running VMs of count × reserve %.
    pub processor_reserved_percent: u64,
    pub memory_total_mib: u64,
    /// Memory kept for the host.
    pub memory_headroom_mib: u64,
    /// memory_total_mib − memory_headroom_mib.
    pub memory_capacity_mib: u64,
    /// Sum of running VMs' memory.
    pub memory_assigned_mib: u64,
}

/// Which accelerator VMs run under, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AcceleratorInfo {
    /// `kvm` or `tcg`.
    pub kind: String,
    /// Whether `/dev/kvm` exists and opens.
    pub kvm_device: bool,
    /// Whether the CPU flags show hardware virtualization (vmx or svm).
    pub hardware_virtualization: bool,
    /// One sentence: why this accelerator was chosen.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HostLimitsInfo {
    pub max_processors_per_vm: u32,
    pub min_memory_mib: u64,
    pub max_memory_mib: u64,
    pub ide_controllers: u8,
    pub ide_locations: u8,
    pub scsi_controllers: u8,
    pub scsi_locations: u8,
    pub max_request_bytes: u64,
    pub job_retention_seconds: u64,
    pub job_limit: u64,
}
