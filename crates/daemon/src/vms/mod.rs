//! VMs: the on-disk store, the runtime state table and the worker hook points.

pub mod runtime;
pub mod store;
pub mod workers;
