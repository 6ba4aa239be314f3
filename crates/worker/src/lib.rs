//! The per-VM worker (`viridian-worker`): one process per running VM, which runs QEMU,
//! serves every disk of the VM from the storage engine, keeps the serial console log,
//! and answers the daemon on its control socket.
//!
//! - [`qemu`]: QEMU's configuration as types and the one builder of its argv.
//! - [`accel`]: KVM or TCG, and why; [`firmware`]: which SeaBIOS generation 1 boots.
//! - [`disks`] / [`nbd`]: the VM's disks opened through the engine and served to QEMU.
//! - [`runtime`]: the worker's life; [`control`]: the daemon's protocol and client.
//! - [`console`]: the size-capped serial console log.

pub mod accel;
pub mod console;
pub mod control;
pub mod disks;
pub mod firmware;
pub mod meter;
pub mod qemu;
pub mod runtime;
pub mod spec;

pub use control::{WorkerState, WorkerStatus};
pub use spec::WorkerSpec;
