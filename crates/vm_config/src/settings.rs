//! The settings of one VM: what is configured, whether or not it runs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A VM's settings (Hyper-V's `Msvm_VirtualSystemSettingData` and friends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    pub id: Uuid,
    /// Unique on the host; 1–100 characters, no path separators or control characters.
    #[schemars(length(min = 1, max = "crate::validate::MAX_NAME_CHARS"))]
    pub name: String,
    /// 1: BIOS, boots from IDE. 2: UEFI, boots from SCSI.
    #[schemars(range(
        min = "crate::validate::MIN_GENERATION",
        max = "crate::validate::MAX_GENERATION"
    ))]
    pub generation: u8,
    pub processor: ProcessorSettings,
    pub memory: MemorySettings,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(default)]
    pub network_adapters: Vec<NetworkAdapter>,
    /// Boot devices in order; empty means "the first hard disk, then the first DVD".
    #[serde(default)]
    pub boot_order: Vec<BootEntry>,
    #[serde(default)]
    #[schemars(length(max = "crate::validate::MAX_NOTES_CHARS"))]
    pub notes: String,
    /// The virtual hardware's version (Hyper-V's configuration version). A saved
    /// state resumes only on the version it was saved with, so a VM keeps its
    /// version; new VMs get [`CURRENT_CONFIGURATION_VERSION`]. A `vm.json` without
    /// it is version 1.
    /// - 1: generation 1's PCI bridges (where synthetic disks sit) take ACPI
    ///   hotplug, as QEMU has it by default.
    /// - 2: they do not. Viridian never hot-plugs, and with it a QEMU 7.2 guest
    ///   reads its synthetic disks 5–10 % slower (BENCHMARKS.md).
    #[serde(default = "first_configuration_version")]
    pub configuration_version: u32,
}

/// The configuration version new VMs get.
pub const CURRENT_CONFIGURATION_VERSION: u32 = 2;

fn first_configuration_version() -> u32 {
    1
}

/// Virtual processors and how much host CPU they may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessorSettings {
    /// Number of virtual processors, 1 up to the host's limit.
    #[schemars(range(min = "crate::validate::MIN_PROCESSORS"))]
    pub count: u32,
    /// Percent of each processor's capacity set aside for this VM, 0–100.
    #[serde(default)]
    #[schemars(range(max = "crate::validate::MAX_PERCENT"))]
    pub reserve_percent: u8,
    /// Percent of each processor's capacity this VM may use at most, 0–100.
    #[serde(default = "default_limit")]
    #[schemars(range(max = "crate::validate::MAX_PERCENT"))]
    pub limit_percent: u8,
    /// Share against other VMs when the host is busy, 1–10000 (default 100).
    #[serde(default = "default_weight")]
    #[schemars(range(
        min = "crate::validate::MIN_RELATIVE_WEIGHT",
        max = "crate::validate::MAX_RELATIVE_WEIGHT"
    ))]
    pub relative_weight: u32,
}

fn default_limit() -> u8 {
    100
}
fn default_weight() -> u32 {
    100
}

impl ProcessorSettings {
    pub fn with_count(count: u32) -> Self {
        ProcessorSettings {
            count,
            reserve_percent: 0,
            limit_percent: 100,
            relative_weight: 100,
        }
    }
}

/// Memory given to the VM at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// Startup memory in MiB.
    #[schemars(range(min = "crate::validate::MIN_MEMORY_MIB"))]
    pub startup_mib: u64,
}

/// The kind of storage controller a drive hangs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ControllerKind {
    /// Emulated IDE: 2 controllers × 2 locations; generation 1 only.
    Ide,
    /// Synthetic SCSI: 4 controllers × 64 locations.
    Scsi,
}

impl ControllerKind {
    /// How many controllers of this kind a VM has, and locations per controller.
    pub fn limits(self) -> (u8, u8) {
        match self {
            ControllerKind::Ide => (2, 2),
            ControllerKind::Scsi => (4, 64),
        }
    }
}

impl std::fmt::Display for ControllerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ControllerKind::Ide => "IDE",
            ControllerKind::Scsi => "SCSI",
        })
    }
}

/// Where a drive sits: controller kind, controller number, location on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    pub controller: ControllerKind,
    pub controller_number: u8,
    pub location: u8,
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}:{}",
            self.controller, self.controller_number, self.location
        )
    }
}

/// A drive in a slot and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub slot: Slot,
    pub media: DriveMedia,
}

/// What a drive holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DriveMedia {
    /// A virtual hard disk file (.vhd, .vhdx, .avhd, .avhdx), absolute path.
    HardDisk { path: String },
    /// A host block device passed through to the guest, absolute path under /dev.
    PassThrough { device: String },
    /// A DVD drive, with an ISO image inserted or empty.
    Dvd {
        #[serde(default)]
        iso: Option<String>,
    },
}

impl DriveMedia {
    /// The host path this drive uses, if any.
    pub fn host_path(&self) -> Option<&str> {
        match self {
            DriveMedia::HardDisk { path } => Some(path),
            DriveMedia::PassThrough { device } => Some(device),
            DriveMedia::Dvd { iso } => iso.as_deref(),
        }
    }

    pub fn is_hard_disk(&self) -> bool {
        matches!(
            self,
            DriveMedia::HardDisk { .. } | DriveMedia::PassThrough { .. }
        )
    }
}

/// A network adapter, connected to a virtual switch or to nothing.
///
/// The guest knows an adapter by its MAC address and by where it sits on the PCI
/// bus; change either and a guest OS sees a new adapter (Windows keeps the old one
/// as a "phantom" with its IP settings). Both are fixed when the adapter is added
/// and kept through checkpoints, export and import (unless a new id is asked for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkAdapter {
    /// The adapter's device identity. Assigned when absent (schema 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    pub kind: AdapterKind,
    /// MAC address as six colon-separated hex bytes, e.g. `52:54:00:12:34:56`.
    pub mac: String,
    /// The slot on the root PCI bus where the guest finds the adapter. Assigned
    /// when absent: the first free of 16–30 (schema 2); upgraded VMs keep the slot
    /// their adapters had before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_slot: Option<u8>,
    /// The virtual switch it connects to: the switch's id as the service records
    /// it (a name is also understood). Absent: not connected (schema 3; older
    /// files have none). A switch that does not exist when the VM starts leaves the
    /// adapter disconnected, and the VM still starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    /// Whether frames the VM sends with another source MAC pass the switch
    /// (Hyper-V's MacAddressSpoofing). Off: they are dropped (schema 4).
    #[serde(default)]
    pub mac_address_spoofing: bool,
    /// Whether DHCP server messages the VM sends are dropped (Hyper-V's
    /// DhcpGuard): DHCPv4 from UDP port 67, DHCPv6 from UDP port 547 (schema 4).
    #[serde(default)]
    pub dhcp_guard: bool,
    /// Whether router advertisements and redirects the VM sends are dropped
    /// (Hyper-V's RouterGuard): ICMPv6 router advertisements and redirects, ICMP
    /// redirects (schema 4).
    #[serde(default)]
    pub router_guard: bool,
    /// The most the adapter carries each way, in bits per second (Hyper-V's
    /// MaximumBandwidth). Absent: unlimited (schema 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "crate::validate::MIN_BANDWIDTH",
        max = "crate::validate::MAX_BANDWIDTH"
    ))]
    pub maximum_bandwidth: Option<u64>,
    /// How the adapter's frames are tagged on its switch (Hyper-V's
    /// Set-VMNetworkAdapterVlan): `untagged` (the default), `access` (one VLAN,
    /// `vlan_id`, the guest sees untagged frames) or `trunk` (tagged frames of
    /// `vlan_allowed`, `vlan_native` untagged). Schema 5; older adapters are untagged.
    #[serde(default)]
    pub vlan_mode: VlanMode,
    /// The access VLAN, 1–4094 (access mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "crate::validate::MIN_VLAN_ID",
        max = "crate::validate::MAX_VLAN_ID"
    ))]
    pub vlan_id: Option<u16>,
    /// The VLANs a trunk carries tagged: ids and ranges within 1–4094 (trunk mode only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = "crate::validate::MAX_VLAN_RANGES"))]
    pub vlan_allowed: Vec<VlanRange>,
    /// The VLAN a trunk carries untagged, 1–4094 (trunk mode only; absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "crate::validate::MIN_VLAN_ID",
        max = "crate::validate::MAX_VLAN_ID"
    ))]
    pub vlan_native: Option<u16>,
    /// Port mirroring on its switch (Hyper-V's `-PortMirroring`): a source's
    /// frames, both ways, are copied to every destination on the same switch.
    #[serde(default, skip_serializing_if = "PortMirroring::is_none")]
    pub port_mirroring: PortMirroring,
}

/// An adapter's part in port mirroring on its switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortMirroring {
    #[default]
    None,
    /// What it sends and receives is copied to the destinations.
    Source,
    /// It receives a copy of every source's frames.
    Destination,
}

impl PortMirroring {
    pub fn is_none(&self) -> bool {
        *self == PortMirroring::None
    }

    pub fn name(self) -> &'static str {
        match self {
            PortMirroring::None => "none",
            PortMirroring::Source => "source",
            PortMirroring::Destination => "destination",
        }
    }
}

/// How an adapter's frames are tagged on its switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VlanMode {
    /// No VLAN: the switch's untagged segment (where the host's interface is).
    #[default]
    Untagged,
    /// One VLAN (`vlan_id`); the guest sends and receives untagged frames.
    Access,
    /// Tagged frames of the allowed VLANs, and the native VLAN untagged.
    Trunk,
}

impl VlanMode {
    pub fn name(self) -> &'static str {
        match self {
            VlanMode::Untagged => "untagged",
            VlanMode::Access => "access",
            VlanMode::Trunk => "trunk",
        }
    }
}

/// VLAN ids `first` to `last`, both included (`last` absent: just `first`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VlanRange {
    #[schemars(range(
        min = "crate::validate::MIN_VLAN_ID",
        max = "crate::validate::MAX_VLAN_ID"
    ))]
    pub first: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "crate::validate::MIN_VLAN_ID",
        max = "crate::validate::MAX_VLAN_ID"
    ))]
    pub last: Option<u16>,
}

impl VlanRange {
    pub fn last(&self) -> u16 {
        self.last.unwrap_or(self.first)
    }

    /// Parses `10,20-30` (Hyper-V's AllowedVlanIdList) into ranges; the
    /// values are checked by [`crate::validate`].
    pub fn parse_list(text: &str) -> Result<Vec<VlanRange>, String> {
        let bad = |part: &str| {
            format!("{part:?} in the VLAN list {text:?} is not a VLAN id or range; write ids and ranges of 1 to 4094 separated by commas, like 10,20-30")
        };
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), Some(b.trim())),
                None => (part, None),
            };
            let first: u16 = a.parse().map_err(|_| bad(part))?;
            let last = b
                .map(|b| b.parse::<u16>().map_err(|_| bad(part)))
                .transpose()?;
            out.push(VlanRange { first, last });
        }
        Ok(out)
    }

    /// Ranges as Hyper-V writes them: `10,20-30`.
    pub fn list_text(ranges: &[VlanRange]) -> String {
        ranges
            .iter()
            .map(|r| match r.last {
                Some(l) if l != r.first => format!("{}-{l}", r.first),
                _ => r.first.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl NetworkAdapter {
    /// The adapter's VLAN setting in one line: `untagged`, `access 10`,
    /// `trunk 10,20-30 native 1`.
    pub fn vlan_text(&self) -> String {
        match self.vlan_mode {
            VlanMode::Untagged => "untagged".into(),
            VlanMode::Access => match self.vlan_id {
                Some(id) => format!("access {id}"),
                None => "access (no id)".into(),
            },
            VlanMode::Trunk => {
                let mut t = format!("trunk {}", VlanRange::list_text(&self.vlan_allowed));
                if let Some(n) = self.vlan_native {
                    t.push_str(&format!(" native {n}"));
                }
                t
            }
        }
    }
}

/// Synthetic (virtio, fast) or legacy (emulated, boots PXE on generation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    Synthetic,
    Legacy,
}

/// One entry in the boot order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BootEntry {
    /// Boot from the drive in this slot.
    Drive { slot: Slot },
    /// Boot from the network adapter with this MAC.
    Network { mac: String },
}
