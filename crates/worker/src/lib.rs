//! The per-VM worker: QEMU command line, device wiring, lifecycle.
