//! The VHD (v1) format: fixed, dynamic and differencing disks.

/// Faults specific to VHD files.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
