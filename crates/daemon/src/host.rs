//! What `GET /v1/host` reports: version, build, accelerator, limits.

use api::host::{AcceleratorInfo, HostInfo, HostLimitsInfo};
use vm_config::HostLimits;

use crate::config::DaemonConfig;

pub fn limits() -> HostLimits {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024);
    HostLimits {
        max_processors: cpus,
        min_memory_mib: vm_config::validate::MIN_MEMORY_MIB,
        max_memory_mib: mem_mib.max(vm_config::validate::MIN_MEMORY_MIB),
    }
}

/// What admission control counts against: the host's (or the configured) logical
/// processors and memory, less what is kept for the host.
pub fn capacity(config: &DaemonConfig, limits: &HostLimits) -> crate::admission::Capacity {
    crate::admission::Capacity {
        logical_processors: config.host_processors.unwrap_or(limits.max_processors),
        host_reserve_percent: config.host_reserve_percent,
        memory_total_mib: limits.max_memory_mib,
        memory_headroom_mib: config.memory_headroom_mib,
    }
}

pub fn accelerator() -> AcceleratorInfo {
    let kvm_device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware_virtualization = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let (kind, reason) = match (kvm_device, hardware_virtualization) {
        (true, true) => ("kvm", "/dev/kvm opens and the CPU has hardware virtualization (vmx/svm)"),
        (true, false) => (
            "tcg",
            "/dev/kvm exists but the CPU shows no vmx/svm flag, so guests would not boot under KVM; using QEMU's TCG",
        ),
        (false, true) => ("tcg", "the CPU has vmx/svm but /dev/kvm cannot be opened (load kvm_intel/kvm_amd, check permissions); using QEMU's TCG"),
        (false, false) => ("tcg", "no /dev/kvm and no hardware virtualization; using QEMU's TCG"),
    };
    AcceleratorInfo {
        kind: kind.into(),
        kvm_device,
        hardware_virtualization,
        reason: reason.into(),
    }
}

pub fn info(config: &DaemonConfig, limits: &HostLimits) -> HostInfo {
    let (ide_c, ide_l) = vm_config::ControllerKind::Ide.limits();
    let (scsi_c, scsi_l) = vm_config::ControllerKind::Scsi.limits();
    HostInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        build: format!(
            "{} build for {}-{}",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            std::env::consts::ARCH,
            std::env::consts::OS
        ),
        accelerator: accelerator(),
        limits: HostLimitsInfo {
            max_processors_per_vm: limits.max_processors,
            min_memory_mib: limits.min_memory_mib,
            max_memory_mib: limits.max_memory_mib,
            ide_controllers: ide_c,
            ide_locations: ide_l,
            scsi_controllers: scsi_c,
            scsi_locations: scsi_l,
            max_request_bytes: api::MAX_BODY_BYTES as u64,
            job_retention_seconds: config.job_retention,
            job_limit: config.job_limit as u64,
        },
        data_dir: config.data_dir.display().to_string(),
        storage_roots: vec![config.data_dir.display().to_string()],
        processor_control: "none: this viridiand runs no VMs".into(),
        resources: capacity(config, limits).report(Default::default()),
        new_vm_defaults: Default::default(),
        mac_address_pool: api::host::MacAddressPool {
            minimum: String::new(),
            maximum: String::new(),
        },
        firmware: api::host::FirmwareInfo {
            generation1: "none".into(),
            generation1_reason: "this viridiand runs no VMs".into(),
            generation2: "none".into(),
        },
        network: {
            let d = vswitch::datapath::detect();
            api::switches::NetworkInfo {
                data_path: d.name().into(),
                reason: d.reason,
                vlan: Default::default(),
            }
        },
    }
}
