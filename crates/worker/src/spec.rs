//! What the daemon hands a worker: the VM's settings and where it runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::accel::AccelChoice;

/// Saved memory and device state, in the VM's folder.
pub const SAVED_STATE_FILE: &str = "saved-state.bin";
/// Default time a guest gets to shut down after the ACPI power button.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 120;

/// Boot a kernel directly instead of through the firmware.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectKernelSpec {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

/// Everything a worker needs to run one VM. Written by the daemon as
/// `<runtime_dir>/spec.json` and passed with `viridian-worker --spec PATH`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    pub settings: vm_config::VmSettings,
    /// The VM's folder (`<data-dir>/vms/<id>`): saved state and firmware variables live here.
    pub vm_dir: PathBuf,
    /// Sockets, logs and the status file of this run (`<vm_dir>/runtime`).
    pub runtime_dir: PathBuf,
    #[serde(default)]
    pub accel: AccelChoice,
    /// The accelerator already decided by the daemon (with its reason); when present
    /// the worker uses it instead of probing the host again, which saves start time.
    #[serde(default)]
    pub accel_decision: Option<crate::accel::AccelDecision>,
    /// Whether QEMU supports `-sandbox`, when the daemon already knows; probed when absent.
    #[serde(default)]
    pub sandbox: Option<bool>,
    /// Resume from `<vm_dir>/saved-state.bin` instead of booting.
    #[serde(default)]
    pub resume: bool,
    #[serde(default)]
    pub direct_kernel: Option<DirectKernelSpec>,
    /// Cap on the serial console log, in bytes.
    #[serde(default = "default_console_log_limit")]
    pub console_log_limit: u64,
    /// QEMU binary; `qemu-system-x86_64` from PATH when absent.
    #[serde(default)]
    pub qemu: Option<PathBuf>,
    /// The cgroup hierarchy the daemon found: the worker puts itself and QEMU in the
    /// VM's group there (`vm-<id>`) and enforces the processor limit and weight.
    /// Absent: no cgroup, nothing enforced.
    #[serde(default)]
    pub cgroup: Option<cgroups::Hierarchy>,
    /// Generation 1 firmware (viridiand's `--bios`); generation 2 boots OVMF.
    #[serde(default)]
    pub bios: crate::firmware::BiosChoice,
    /// The adapters connected to a virtual switch: the tap the daemon made for
    /// each on the switch's bridge. Adapters not listed run disconnected.
    #[serde(default)]
    pub network: Vec<NicPort>,
}

/// One connected adapter's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicPort {
    /// The adapter, by its MAC address (as in the settings).
    pub mac: String,
    /// The persistent tap QEMU attaches to (`tap,ifname=...`).
    pub tap: String,
    /// Give the tap backend vhost-net (the kernel carries the packets).
    #[serde(default)]
    pub vhost: bool,
}

fn default_console_log_limit() -> u64 {
    crate::console::DEFAULT_LOG_LIMIT
}

impl WorkerSpec {
    pub fn saved_state_path(&self) -> PathBuf {
        self.vm_dir.join(SAVED_STATE_FILE)
    }

    pub fn qemu_binary(&self) -> &Path {
        self.qemu
            .as_deref()
            .unwrap_or(Path::new("qemu-system-x86_64"))
    }
}
