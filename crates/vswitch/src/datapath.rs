//! Which data path synthetic adapters use: vhost-net where the kernel has it, so
//! their packets bypass QEMU's userspace (as Hyper-V's synthetic path bypasses its
//! worker), otherwise QEMU's own virtio-net backend.

use std::path::Path;

pub const VHOST_NET_DEVICE: &str = "/dev/vhost-net";

/// The data path chosen and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPath {
    /// Give QEMU's tap backends `vhost=on`.
    pub vhost_net: bool,
    pub reason: String,
}

impl DataPath {
    /// `vhost-net` or `userspace`, for reports.
    pub fn name(&self) -> &'static str {
        if self.vhost_net {
            "vhost-net"
        } else {
            "userspace"
        }
    }
}

/// Looks for `/dev/vhost-net` (the `vhost_net` module makes it; it is not loaded on
/// demand by QEMU) and whether this process can open it read-write.
pub fn detect() -> DataPath {
    detect_at(Path::new(VHOST_NET_DEVICE))
}

pub fn detect_at(device: &Path) -> DataPath {
    if !device.exists() {
        return DataPath {
            vhost_net: false,
            reason: format!(
                "{} does not exist (the kernel has no vhost_net module loaded or built in), so synthetic adapters use QEMU's userspace virtio-net backend",
                device.display()
            ),
        };
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(device) {
        Ok(_) => DataPath {
            vhost_net: true,
            reason: format!(
                "{} is present and usable, so synthetic adapters' packets go between the tap and the guest in the kernel (vhost-net), bypassing QEMU",
                device.display()
            ),
        },
        Err(e) => DataPath {
            vhost_net: false,
            reason: format!(
                "{} exists but cannot be opened ({e}), so synthetic adapters use QEMU's userspace virtio-net backend",
                device.display()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_means_userspace_and_says_why() {
        let d = detect_at(Path::new("/nonexistent/vhost-net"));
        assert!(!d.vhost_net);
        assert_eq!(d.name(), "userspace");
        assert!(
            d.reason.contains("/nonexistent/vhost-net does not exist"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn detection_matches_the_device_on_this_host() {
        let d = detect();
        assert_eq!(
            d.vhost_net,
            Path::new(VHOST_NET_DEVICE).exists() && d.reason.contains("usable")
        );
    }
}
