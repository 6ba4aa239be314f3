//! The VHDX format (MS-VHDX): fixed, dynamic and differencing disks, with the log.

/// Faults specific to VHDX files.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
