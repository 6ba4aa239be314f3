//! The REST API's request and response types, shared by `viridiand` and `viridian`,
//! and the OpenAPI document generated from them.

pub mod checkpoints;
pub mod disks;
pub mod error;
pub mod events;
pub mod host;
pub mod jobs;
pub mod openapi;
pub mod switches;
pub mod transfer;
pub mod vms;

pub use error::{ErrorBody, ErrorCode};

/// Re-exported so clients need only this crate for the settings types.
pub use vm_config;

/// Largest request body the service accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
