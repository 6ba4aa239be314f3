//! Viridian's storage engine: the `Disk` abstraction and the VHD and VHDX formats.

pub mod disk;
pub mod error;
pub mod host_file;

pub use disk::{Allocation, BlockStatus, Disk, RawDisk};
pub use error::{Error, Result};
