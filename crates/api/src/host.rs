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
