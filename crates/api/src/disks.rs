//! `/v1/disks/...`: the storage engine's operations, run by the service as jobs.
//!
//! Paths are absolute, or relative to `<data-dir>/Virtual Hard Disks`; a relative
//! path may not climb out of that folder (`..`). Every path must lie in one of the
//! host's storage roots (`GET /v1/host`), else the answer is 403 `Forbidden`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    Fixed,
    Dynamic,
    Differencing,
}

/// A disk image's format, as its signature tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Vhd,
    Vhdx,
    /// A raw image: bytes without a VHD or VHDX signature.
    Raw,
}

/// `POST /v1/disks/create`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDiskRequest {
    /// New file; `.vhd` or `.vhdx` picks the format.
    pub path: String,
    pub kind: DiskKind,
    /// Virtual size in bytes (not for differencing disks).
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// Parent file, for differencing disks.
    #[serde(default)]
    pub parent: Option<String>,
    /// Block size in bytes for dynamic/differencing disks (format default when absent).
    #[serde(default)]
    pub block_size_bytes: Option<u32>,
}

/// `POST /v1/disks/merge`: merge a differencing disk into its parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeDiskRequest {
    pub path: String,
}

/// `POST /v1/disks/convert`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConvertDiskRequest {
    pub path: String,
    /// New file; `.vhd` or `.vhdx` picks the format.
    pub destination: String,
    /// Fixed or dynamic; keeps the source's kind when absent.
    #[serde(default)]
    pub kind: Option<DiskKind>,
    /// The source's format. Absent: it must be a VHD or VHDX (by its signature);
    /// `raw` reads a raw image, which is only done when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_format: Option<ImageFormat>,
}

/// `POST /v1/disks/compact`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompactDiskRequest {
    pub path: String,
}

/// `POST /v1/disks/resize`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeDiskRequest {
    pub path: String,
    pub size_bytes: u64,
}
