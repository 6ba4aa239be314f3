//! QEMU's configuration as types, and the one place that turns it into argv.
//!
//! Everything the worker asks of QEMU is expressed as a [`QemuConfig`]; no other
//! code builds QEMU option strings. [`QemuConfig::to_args`] is covered by tests of
//! its output.

use std::path::PathBuf;

/// The accelerator QEMU runs guest code with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Machine type and firmware: generation 1 is i440FX/PIIX with SeaBIOS, generation 2
/// is Q35 with OVMF (UEFI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platform {
    /// i440FX + PIIX3 IDE, SeaBIOS: this image, or QEMU's default `bios-256k.bin`
    /// (see [`crate::firmware`]). `bridge_hotplug`: the PCI bridges take ACPI
    /// hotplug (configuration version 1; see `VmSettings::configuration_version`).
    Generation1 {
        bios: Option<PathBuf>,
        bridge_hotplug: bool,
    },
    /// Q35 with OVMF: read-only code and this VM's own writable variable store.
    Generation2 { code: PathBuf, vars: PathBuf },
}

/// Boot a kernel directly instead of through the firmware (tests, and guests without
/// a boot loader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectKernel {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// What sits in an IDE slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdeMedia {
    HardDisk,
    Dvd,
}

/// An IDE drive whose data QEMU reads from the worker's NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdeDrive {
    /// IDE controller (0 or 1) = QEMU's `ide.0` / `ide.1` bus.
    pub controller: u8,
    /// Location (0 = master, 1 = slave).
    pub location: u8,
    pub media: IdeMedia,
    /// The NBD server's unix socket and export name.
    pub nbd_socket: PathBuf,
    pub export: String,
    pub read_only: bool,
    pub bootindex: Option<u32>,
}

/// A synthetic disk: a vhost-user-blk PCI device whose backend is in the worker.
///
/// SCSI controller `c`, location `l` sits on PCI bridge `scsi{c}.{l / 32}` at slot
/// `l % 32`, so each of the 4 controllers holds 64 disks (see ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticDisk {
    pub controller: u8,
    pub location: u8,
    pub socket: PathBuf,
    pub num_queues: u16,
    pub bootindex: Option<u32>,
}

/// A network adapter: connected to a virtual switch through a tap, or to nothing
/// (the guest sees the adapter with its MAC address and no link partner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Synthetic (virtio-net) or legacy (an emulated Intel e1000).
    pub legacy: bool,
    pub mac: String,
    /// Its slot on the root PCI bus, so the guest finds it where it was last time
    /// (see `vm_config::devices`); `None` lets QEMU choose.
    pub pci_slot: Option<u8>,
    /// The persistent tap on the switch's bridge that the daemon made for it.
    pub tap: Option<String>,
    /// vhost-net for the tap (synthetic adapters only; `vswitch::datapath`).
    pub vhost: bool,
}

/// PCI slots per bridge that synthetic disks use (a `pci-bridge` without SHPC has 32).
pub const SLOTS_PER_BRIDGE: u8 = 32;

/// QEMU's whole configuration for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    pub name: String,
    pub uuid: String,
    pub platform: Platform,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    pub direct_kernel: Option<DirectKernel>,
    pub qmp_socket: PathBuf,
    /// QEMU listens here for the first serial port; the worker connects and keeps the log.
    pub serial_socket: PathBuf,
    /// Use `-sandbox on` with every restriction (QEMU built with seccomp).
    pub sandbox: bool,
    pub ide: Vec<IdeDrive>,
    pub synthetic: Vec<SyntheticDisk>,
    pub nics: Vec<Nic>,
    /// Wait for saved state on this unix socket (`-incoming unix:...`).
    pub incoming: Option<PathBuf>,
}

impl QemuConfig {
    /// QEMU's argv (without the program name).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Args::default();
        a.push("-nodefaults");
        a.push("-no-user-config");
        a.opt("-name", format!("{},process=viridian-qemu", self.name));
        a.opt("-uuid", &self.uuid);
        // Paused until the worker has connected and wired everything up.
        a.push("-S");
        a.opt("-display", "none");
        if self.sandbox {
            a.opt(
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            );
        }

        let machine = match self.platform {
            Platform::Generation1 { .. } => "pc",
            Platform::Generation2 { .. } => "q35",
        };
        let mut machine_opts = format!("{machine},memory-backend=ram0");
        if let Platform::Generation2 { .. } = self.platform {
            machine_opts.push_str(",pflash0=fw-code,pflash1=fw-vars");
        }
        a.opt("-machine", machine_opts);
        a.opt("-accel", self.accel.as_str());
        if self.accel == Accel::Kvm {
            a.opt("-cpu", "host");
        }
        a.opt("-smp", self.cpus.to_string());
        a.opt("-m", format!("{}M", self.memory_mib));
        // Guest memory is a shared memfd so vhost-user backends can map it.
        a.opt(
            "-object",
            format!(
                "memory-backend-memfd,id=ram0,size={}M,share=on",
                self.memory_mib
            ),
        );
        if let Platform::Generation1 {
            bios,
            bridge_hotplug,
        } = &self.platform
        {
            if let Some(bios) = bios {
                a.opt("-bios", bios.display().to_string());
            }
            if !bridge_hotplug {
                a.opt(
                    "-global",
                    "PIIX4_PM.acpi-pci-hotplug-with-bridge-support=off",
                );
            }
        }
        if let Platform::Generation2 { code, vars } = &self.platform {
            a.opt(
                "-blockdev",
                format!(
                    "driver=file,filename={},node-name=fw-code,read-only=on",
                    escape(&code.display().to_string())
                ),
            );
            a.opt(
                "-blockdev",
                format!(
                    "driver=file,filename={},node-name=fw-vars",
                    escape(&vars.display().to_string())
                ),
            );
        }

        if let Some(k) = &self.direct_kernel {
            a.opt("-kernel", k.kernel.display().to_string());
            if let Some(initrd) = &k.initrd {
                a.opt("-initrd", initrd.display().to_string());
            }
            a.opt("-append", &k.cmdline);
        }

        a.opt(
            "-chardev",
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                escape(&self.qmp_socket.display().to_string())
            ),
        );
        a.opt("-mon", "chardev=qmp,mode=control");
        a.opt(
            "-chardev",
            format!(
                "socket,id=serial0,path={},server=on,wait=off",
                escape(&self.serial_socket.display().to_string())
            ),
        );
        a.opt("-serial", "chardev:serial0");

        for d in &self.ide {
            let node = format!("ide{}-{}", d.controller, d.location);
            a.opt(
                "-blockdev",
                format!(
                    "driver=nbd,node-name={node},server.type=unix,server.path={},export={},read-only={},cache.direct=off",
                    escape(&d.nbd_socket.display().to_string()),
                    escape(&d.export),
                    on_off(d.read_only || d.media == IdeMedia::Dvd),
                ),
            );
            let model = match d.media {
                IdeMedia::HardDisk => "ide-hd",
                IdeMedia::Dvd => "ide-cd",
            };
            let mut dev = format!(
                "{model},drive={node},bus=ide.{},unit={},id={node}-dev",
                d.controller, d.location
            );
            if let Some(i) = d.bootindex {
                dev.push_str(&format!(",bootindex={i}"));
            }
            a.opt("-device", dev);
        }

        // Adapters first: their slots are fixed, and QEMU then gives the bridges
        // below the first free slots, as it did before adapters had fixed slots.
        for (i, nic) in self.nics.iter().enumerate() {
            let model = if nic.legacy {
                "e1000"
            } else {
                "virtio-net-pci"
            };
            let mut dev = format!("{model},mac={},id=nic{i}", escape(&nic.mac));
            if let Some(tap) = &nic.tap {
                // The daemon made the tap and put it on the bridge; QEMU only
                // attaches (no scripts: `-sandbox on` forbids spawning them anyway).
                let mut netdev = format!(
                    "tap,id=net{i},ifname={},script=no,downscript=no",
                    escape(tap)
                );
                if nic.vhost && !nic.legacy {
                    netdev.push_str(",vhost=on");
                }
                a.opt("-netdev", netdev);
                dev.push_str(&format!(",netdev=net{i}"));
            }
            if let Some(slot) = nic.pci_slot {
                dev.push_str(&format!(",addr=0x{slot:x}"));
            }
            a.opt("-device", dev);
        }

        let mut bridges: Vec<(u8, u8)> = self
            .synthetic
            .iter()
            .map(|d| (d.controller, d.location / SLOTS_PER_BRIDGE))
            .collect();
        bridges.sort_unstable();
        bridges.dedup();
        for (controller, half) in &bridges {
            a.opt(
                "-device",
                format!(
                    "pci-bridge,id=scsi{controller}.{half},chassis_nr={},shpc=off",
                    u32::from(*controller) * 2 + u32::from(*half) + 1
                ),
            );
        }
        for d in &self.synthetic {
            let id = format!("scsi{}-{}", d.controller, d.location);
            a.opt(
                "-chardev",
                format!(
                    "socket,id={id}-chr,path={}",
                    escape(&d.socket.display().to_string())
                ),
            );
            let mut dev = format!(
                "vhost-user-blk-pci,chardev={id}-chr,id={id},num-queues={},bus=scsi{}.{},addr=0x{:x}",
                d.num_queues,
                d.controller,
                d.location / SLOTS_PER_BRIDGE,
                d.location % SLOTS_PER_BRIDGE,
            );
            if let Some(i) = d.bootindex {
                dev.push_str(&format!(",bootindex={i}"));
            }
            a.opt("-device", dev);
        }

        if let Some(sock) = &self.incoming {
            a.opt("-incoming", format!("unix:{}", sock.display()));
        }
        a.0
    }
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn push(&mut self, s: &str) {
        self.0.push(s.to_string());
    }
    fn opt(&mut self, name: &str, value: impl AsRef<str>) {
        self.0.push(name.to_string());
        self.0.push(value.as_ref().to_string());
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Escapes a value inside a QEMU `key=value,...` option: a comma is written twice.
fn escape(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> QemuConfig {
        QemuConfig {
            name: "web1".into(),
            uuid: "6f1c1d4e-0000-4000-8000-000000000001".into(),
            platform: Platform::Generation1 {
                bios: None,
                bridge_hotplug: false,
            },
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 256,
            direct_kernel: None,
            qmp_socket: "/run/vm/qmp.sock".into(),
            serial_socket: "/run/vm/serial.sock".into(),
            sandbox: true,
            ide: vec![],
            synthetic: vec![],
            nics: vec![],
            incoming: None,
        }
    }

    /// The value following each occurrence of `flag`.
    fn values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn generation1_is_paused_pc_with_shared_memfd_memory_and_sockets() {
        let args = base().to_args();
        assert_eq!(args[0], "-nodefaults");
        assert!(args.contains(&"-S".to_string()));
        assert_eq!(values(&args, "-machine"), ["pc,memory-backend=ram0"]);
        assert_eq!(values(&args, "-accel"), ["tcg"]);
        assert_eq!(values(&args, "-cpu"), Vec::<String>::new());
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-memfd,id=ram0,size=256M,share=on"]
        );
        assert_eq!(
            values(&args, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert_eq!(
            values(&args, "-chardev"),
            [
                "socket,id=qmp,path=/run/vm/qmp.sock,server=on,wait=off",
                "socket,id=serial0,path=/run/vm/serial.sock,server=on,wait=off"
            ]
        );
        assert_eq!(values(&args, "-serial"), ["chardev:serial0"]);
        assert!(values(&args, "-blockdev").is_empty());
    }

    #[test]
    fn kvm_uses_host_cpu_and_sandbox_off_is_omitted() {
        let mut c = base();
        c.accel = Accel::Kvm;
        c.sandbox = false;
        let args = c.to_args();
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host"]);
        assert!(values(&args, "-sandbox").is_empty());
    }

    #[test]
    fn ide_disk_and_dvd_are_nbd_blockdevs_on_their_bus_and_unit() {
        let mut c = base();
        c.ide = vec![
            IdeDrive {
                controller: 0,
                location: 0,
                media: IdeMedia::HardDisk,
                nbd_socket: "/run/vm/nbd.sock".into(),
                export: "ide0-0".into(),
                read_only: false,
                bootindex: Some(0),
            },
            IdeDrive {
                controller: 1,
                location: 1,
                media: IdeMedia::Dvd,
                nbd_socket: "/run/vm/nbd.sock".into(),
                export: "ide1-1".into(),
                read_only: false,
                bootindex: None,
            },
        ];
        let args = c.to_args();
        assert_eq!(
            values(&args, "-blockdev"),
            [
                "driver=nbd,node-name=ide0-0,server.type=unix,server.path=/run/vm/nbd.sock,export=ide0-0,read-only=off,cache.direct=off",
                "driver=nbd,node-name=ide1-1,server.type=unix,server.path=/run/vm/nbd.sock,export=ide1-1,read-only=on,cache.direct=off",
            ]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "ide-hd,drive=ide0-0,bus=ide.0,unit=0,id=ide0-0-dev,bootindex=0",
                "ide-cd,drive=ide1-1,bus=ide.1,unit=1,id=ide1-1-dev",
            ]
        );
    }

    #[test]
    fn synthetic_disks_get_one_bridge_per_32_locations_of_a_controller() {
        let mut c = base();
        let disk = |controller, location| SyntheticDisk {
            controller,
            location,
            socket: format!("/run/vm/scsi{controller}-{location}.sock").into(),
            num_queues: 2,
            bootindex: None,
        };
        c.synthetic = vec![disk(0, 0), disk(0, 1), disk(3, 63)];
        let args = c.to_args();
        let devices = values(&args, "-device");
        assert_eq!(
            devices,
            [
                "pci-bridge,id=scsi0.0,chassis_nr=1,shpc=off",
                "pci-bridge,id=scsi3.1,chassis_nr=8,shpc=off",
                "vhost-user-blk-pci,chardev=scsi0-0-chr,id=scsi0-0,num-queues=2,bus=scsi0.0,addr=0x0",
                "vhost-user-blk-pci,chardev=scsi0-1-chr,id=scsi0-1,num-queues=2,bus=scsi0.0,addr=0x1",
                "vhost-user-blk-pci,chardev=scsi3-63-chr,id=scsi3-63,num-queues=2,bus=scsi3.1,addr=0x1f",
            ]
        );
    }

    #[test]
    fn generation1_takes_the_given_seabios_image_and_otherwise_qemus_own() {
        assert_eq!(values(&base().to_args(), "-bios"), Vec::<String>::new());
        let mut c = base();
        c.platform = Platform::Generation1 {
            bios: Some("/usr/local/share/viridian/firmware/seabios.bin".into()),
            bridge_hotplug: false,
        };
        let args = c.to_args();
        assert_eq!(
            values(&args, "-bios"),
            ["/usr/local/share/viridian/firmware/seabios.bin"]
        );
        assert_eq!(values(&args, "-machine"), ["pc,memory-backend=ram0"]);
    }

    #[test]
    fn configuration_version_1_keeps_qemus_acpi_hotplug_on_pci_bridges_and_2_turns_it_off() {
        let hotplug_off = || "PIIX4_PM.acpi-pci-hotplug-with-bridge-support=off".to_string();
        assert_eq!(values(&base().to_args(), "-global"), [hotplug_off()]);
        let mut c = base();
        c.platform = Platform::Generation1 {
            bios: None,
            bridge_hotplug: true,
        };
        assert_eq!(values(&c.to_args(), "-global"), Vec::<String>::new());
    }

    #[test]
    fn generation2_is_q35_with_ovmf_pflash_and_paths_with_commas_are_escaped() {
        let mut c = base();
        c.platform = Platform::Generation2 {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars: "/vms/a,b/OVMF_VARS.fd".into(),
        };
        let args = c.to_args();
        assert_eq!(
            values(&args, "-machine"),
            ["q35,memory-backend=ram0,pflash0=fw-code,pflash1=fw-vars"]
        );
        assert_eq!(
            values(&args, "-blockdev"),
            [
                "driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.fd,node-name=fw-code,read-only=on",
                "driver=file,filename=/vms/a,,b/OVMF_VARS.fd,node-name=fw-vars",
            ]
        );
    }

    #[test]
    fn network_adapters_are_virtio_net_or_e1000_with_their_mac() {
        let mut c = base();
        c.nics = vec![
            Nic {
                legacy: false,
                mac: "52:54:00:12:34:56".into(),
                pci_slot: Some(0x10),
                tap: None,
                vhost: false,
            },
            Nic {
                legacy: true,
                mac: "52:54:00:ab:cd:ef".into(),
                pci_slot: None,
                tap: None,
                vhost: false,
            },
        ];
        assert_eq!(
            values(&c.to_args(), "-device"),
            [
                "virtio-net-pci,mac=52:54:00:12:34:56,id=nic0,addr=0x10",
                "e1000,mac=52:54:00:ab:cd:ef,id=nic1",
            ]
        );
        assert!(values(&c.to_args(), "-netdev").is_empty());
    }

    #[test]
    fn connected_adapters_attach_to_their_tap() {
        let mut c = base();
        c.nics = vec![
            Nic {
                legacy: false,
                mac: "52:54:00:12:34:56".into(),
                pci_slot: Some(0x10),
                tap: Some("vswt-00000000aa".into()),
                vhost: true,
            },
            Nic {
                legacy: true,
                mac: "52:54:00:ab:cd:ef".into(),
                pci_slot: None,
                tap: Some("vswt-00000000bb".into()),
                vhost: true,
            },
            Nic {
                legacy: false,
                mac: "52:54:00:00:00:01".into(),
                pci_slot: None,
                tap: None,
                vhost: false,
            },
        ];
        let args = c.to_args();
        assert_eq!(
            values(&args, "-netdev"),
            [
                "tap,id=net0,ifname=vswt-00000000aa,script=no,downscript=no,vhost=on",
                // vhost-net serves virtio only.
                "tap,id=net1,ifname=vswt-00000000bb,script=no,downscript=no",
            ]
        );
        assert_eq!(
            values(&args, "-device")[..3],
            [
                "virtio-net-pci,mac=52:54:00:12:34:56,id=nic0,netdev=net0,addr=0x10",
                "e1000,mac=52:54:00:ab:cd:ef,id=nic1,netdev=net1",
                "virtio-net-pci,mac=52:54:00:00:00:01,id=nic2",
            ]
        );
    }

    #[test]
    fn direct_kernel_and_incoming_state() {
        let mut c = base();
        c.direct_kernel = Some(DirectKernel {
            kernel: "/g/vmlinuz".into(),
            initrd: Some("/g/initramfs.img".into()),
            cmdline: "console=ttyS0 quiet".into(),
        });
        c.incoming = Some("/run/vm/incoming.sock".into());
        let args = c.to_args();
        assert_eq!(values(&args, "-kernel"), ["/g/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/g/initramfs.img"]);
        assert_eq!(values(&args, "-append"), ["console=ttyS0 quiet"]);
        assert_eq!(values(&args, "-incoming"), ["unix:/run/vm/incoming.sock"]);
    }
}
