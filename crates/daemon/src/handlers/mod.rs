//! Request handlers, one module per resource.

pub mod checkpoints;
pub mod disks;
pub mod jobs;
pub mod lifecycle;
pub mod metrics;
pub mod switches;
pub mod transfer;
pub mod vms;
