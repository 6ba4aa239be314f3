//! VM settings: the types, the rules they must follow, and `vm.json` on disk.

pub mod devices;
pub mod file;
mod settings;
pub mod validate;

pub use settings::{
    AdapterKind, BootEntry, ControllerKind, Drive, DriveMedia, MemorySettings, NetworkAdapter,
    PortMirroring, ProcessorSettings, Slot, VlanMode, VlanRange, VmSettings,
    CURRENT_CONFIGURATION_VERSION,
};
pub use validate::{ConfigError, HostLimits};

/// A fresh locally administered MAC address in QEMU's 52:54:00 range.
pub fn random_mac() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

#[cfg(test)]
mod tests;
