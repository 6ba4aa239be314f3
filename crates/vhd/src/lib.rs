//! Viridian's storage engine: the `Disk` abstraction and the VHD and VHDX formats.

pub mod disk;
pub mod error;
pub mod host_file;
pub mod ops;
pub mod progress;
pub mod vhd1;
pub mod vhdx;

pub use disk::{Allocation, BlockStatus, Disk, RawDisk};
pub use error::{Error, Result};
pub use progress::{NoProgress, Progress};
