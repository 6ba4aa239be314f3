//! VMs: the on-disk store, the runtime state table and the worker hook points.

pub mod delete;
pub mod disk_owners;
pub mod move_storage;
pub mod runtime;
pub mod store;
pub mod test_seam;
pub mod workers;
