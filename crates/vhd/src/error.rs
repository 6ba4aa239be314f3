//! Errors of the storage engine. Messages name the file and the fault; the
//! format modules add their own variants here as they need them.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is in use by another process (wanted a {wanted} lock); stop the VM or tool that has it open")]
    Locked { path: PathBuf, wanted: &'static str },

    #[error("{path} is open read-only; writes are refused")]
    ReadOnly { path: PathBuf },

    #[error("operation cancelled; {what} was left consistent")]
    Cancelled { what: String },

    #[error(transparent)]
    Vhd(#[from] crate::vhd1::Error),

    #[error(transparent)]
    Vhdx(#[from] crate::vhdx::Error),

    #[error("access of {len} bytes at offset {offset} is outside the {size}-byte disk {path}")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
}
