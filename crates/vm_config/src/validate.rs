//! The rules a VM's settings must follow, each failing with its own error.

use std::collections::HashSet;
use std::path::Path;

use crate::settings::{
    AdapterKind, BootEntry, ControllerKind, Drive, DriveMedia, NetworkAdapter, Slot, VlanMode,
    VmSettings, CURRENT_CONFIGURATION_VERSION,
};

/// What the host allows; the daemon fills it in from the machine it runs on.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub max_processors: u32,
    pub min_memory_mib: u64,
    pub max_memory_mib: u64,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            max_processors: 64,
            min_memory_mib: MIN_MEMORY_MIB,
            max_memory_mib: 1024 * 1024,
        }
    }
}

// The limits of settings and of the requests that carry them. The OpenAPI document
// takes its minimum/maximum/length figures from these (schemars attributes), so the
// document and the checks below cannot drift apart.
pub const MAX_NAME_CHARS: usize = 100;
pub const MIN_GENERATION: u8 = 1;
pub const MAX_GENERATION: u8 = 2;
pub const MIN_PROCESSORS: u32 = 1;
/// Reserve and limit are percentages of a processor: 0 to 100.
pub const MAX_PERCENT: u8 = 100;
pub const MIN_RELATIVE_WEIGHT: u32 = 1;
pub const MAX_RELATIVE_WEIGHT: u32 = 10_000;
/// Smallest startup memory on any host.
pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_CHECKPOINT_NAME_CHARS: usize = 100;
pub const MAX_NOTES_CHARS: usize = 4000;
/// The least and the most a network adapter's `maximum_bandwidth` can be, bits/s.
pub const MIN_BANDWIDTH: u64 = 8_000;
pub const MAX_BANDWIDTH: u64 = 1_000_000_000_000;
/// VLAN ids an adapter can carry: 1 to 4094 (0 and 4095 are reserved by 802.1Q).
pub const MIN_VLAN_ID: u16 = 1;
pub const MAX_VLAN_ID: u16 = 4094;
/// The most entries a trunk's `vlan_allowed` list may have.
pub const MAX_VLAN_RANGES: usize = 64;
pub const MAX_SYNTHETIC_ADAPTERS: usize = 8;
pub const MAX_LEGACY_ADAPTERS: usize = 4;

/// A rule that settings break. Each names the offending value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the VM name is empty; give the VM a name of 1 to {MAX_NAME_CHARS} characters")]
    NameEmpty,
    #[error("the VM name is {0} characters long; at most {MAX_NAME_CHARS} are allowed")]
    NameTooLong(usize),
    #[error("the VM name {name:?} contains {what}, which is not allowed in a VM name")]
    NameInvalid { name: String, what: &'static str },
    #[error("the VM name {name:?} contains U+{code_point:04X}, {what}; a VM name may hold only visible characters")]
    NameCharacter {
        name: String,
        code_point: u32,
        what: &'static str,
    },
    #[error("the VM name {0:?} reads as a UUID; VMs are found by id or by name, so a name may not look like an id: choose another name")]
    NameIsUuid(String),
    #[error(
        "generation {0} does not exist; use 1 (BIOS, boots from IDE) or 2 (UEFI, boots from SCSI)"
    )]
    Generation(u8),
    #[error("configuration version {0} is not one this Viridian knows; it runs versions 1 to {CURRENT_CONFIGURATION_VERSION} (a VM from a newer Viridian needs that Viridian)")]
    ConfigurationVersion(u32),
    #[error("{count} virtual processors is out of range; this host allows 1 to {max}")]
    ProcessorCount { count: u32, max: u32 },
    #[error("processor reserve {0} % is out of range; use 0 to 100")]
    ProcessorReserve(u8),
    #[error("processor limit {0} % is out of range; use 0 to 100")]
    ProcessorLimit(u8),
    #[error("processor relative weight {0} is out of range; use 1 to 10000")]
    ProcessorWeight(u32),
    #[error("startup memory of {mib} MiB is out of range; this host allows {min} to {max} MiB")]
    Memory { mib: u64, min: u64, max: u64 },
    #[error("{kind} controller {number} does not exist; a VM has {kind} controllers 0 to {}", .max - 1)]
    ControllerOutOfRange {
        kind: ControllerKind,
        number: u8,
        max: u8,
    },
    #[error("location {location} on {kind} controller {number} does not exist; use 0 to {}", .max - 1)]
    LocationOutOfRange {
        kind: ControllerKind,
        number: u8,
        location: u8,
        max: u8,
    },
    #[error("slot {0} is already taken by another drive; remove that drive or choose a free slot")]
    SlotTaken(Slot),
    #[error("generation 2 VMs have no IDE controller; attach the drive at {0} to SCSI instead")]
    IdeInGeneration2(Slot),
    #[error(
        "a generation 1 VM boots from IDE, but its boot disk is at {0}; move the boot disk to IDE"
    )]
    BootDiskNotOnIde(Slot),
    #[error("a generation 1 VM cannot have a DVD drive on SCSI ({0}); attach it to IDE")]
    DvdOnScsiGeneration1(Slot),
    #[error("legacy network adapters exist only in generation 1 VMs; use a synthetic adapter")]
    LegacyAdapterInGeneration2,
    #[error("a VM can have at most {max} {kind} network adapters")]
    TooManyAdapters { kind: &'static str, max: usize },
    #[error("MAC address {0:?} is not valid; write six hex bytes separated by colons, not multicast, e.g. 52:54:00:12:34:56")]
    MacInvalid(String),
    #[error("the maximum bandwidth of the network adapter {mac} is {given} bits/s; give {MIN_BANDWIDTH} to {MAX_BANDWIDTH} bits/s (8 kbit/s to 1 Tbit/s), or none for unlimited")]
    BandwidthInvalid { mac: String, given: u64 },
    #[error("VLAN id {given} of the network adapter {mac} ({what}) is out of range; VLAN ids are {MIN_VLAN_ID} to {MAX_VLAN_ID}")]
    VlanIdInvalid {
        mac: String,
        what: &'static str,
        given: u16,
    },
    #[error("the network adapter {mac} is in access mode but has no VLAN id; give one (`--vlan 10`, `vlan_id`), or make it untagged")]
    VlanIdMissing { mac: String },
    #[error("the network adapter {mac} is in trunk mode but allows no VLAN; give the allowed VLANs (`--vlan-trunk 10,20-30`, `vlan_allowed`)")]
    VlanAllowedMissing { mac: String },
    #[error("the network adapter {mac} is in {mode} mode, which has no {field}; {hint}")]
    VlanFieldForMode {
        mac: String,
        mode: &'static str,
        field: &'static str,
        hint: &'static str,
    },
    #[error("the VLAN range {first}-{last} of the network adapter {mac} runs backwards; write the lower id first")]
    VlanRangeReversed { mac: String, first: u16, last: u16 },
    #[error("the network adapter {mac} allows {given} VLAN ranges; at most {MAX_VLAN_RANGES} are allowed (join neighbouring ids into ranges)")]
    VlanTooManyRanges { mac: String, given: usize },
    #[error("MAC address {mac} is already used by {owner}; each adapter needs its own address")]
    MacInUse { mac: String, owner: String },
    #[error("the path {0:?} is not absolute; give the full path starting with /")]
    PathNotAbsolute(String),
    #[error("the file {0} does not exist")]
    FileMissing(String),
    #[error("{path} is not {expected}")]
    WrongFileKind {
        path: String,
        expected: &'static str,
    },
    #[error("the disk {path} is already attached to {owner}; a disk can be attached to one drive of one VM only")]
    DiskInUse { path: String, owner: String },
    #[error("PCI slot {slot} cannot hold a network adapter of a generation {generation} VM; use {first} to {last}, or leave it out to get a free one")]
    AdapterSlotInvalid {
        slot: u8,
        generation: u8,
        first: u8,
        last: u8,
    },
    #[error("two network adapters are in PCI slot {0}; each adapter needs its own slot")]
    AdapterSlotTaken(u8),
    #[error("two network adapters have the id {0}; each adapter needs its own id")]
    AdapterIdTaken(uuid::Uuid),
    #[error("the boot order names {0}, which this VM does not have")]
    BootEntryUnknown(String),
    #[error("the notes are {0} characters long; at most {MAX_NOTES_CHARS} are allowed")]
    NotesTooLong(usize),
}

impl ConfigError {
    /// Whether this is a conflict with something existing (vs a plain bad value).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            ConfigError::SlotTaken(_)
                | ConfigError::DiskInUse { .. }
                | ConfigError::MacInUse { .. }
                | ConfigError::AdapterSlotTaken(_)
                | ConfigError::AdapterIdTaken(_)
        )
    }
}

/// Checks a VM name on its own.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(ConfigError::NameEmpty);
    }
    if chars > MAX_NAME_CHARS {
        return Err(ConfigError::NameTooLong(chars));
    }
    let invalid = |what| {
        Err(ConfigError::NameInvalid {
            name: name.to_string(),
            what,
        })
    };
    if name.contains('/') || name.contains('\\') {
        return invalid("a path separator");
    }
    if name.chars().any(char::is_control) {
        return invalid("a control character");
    }
    if name == "." || name == ".." {
        return invalid("only dots");
    }
    if name.trim() != name {
        return invalid("leading or trailing white space");
    }
    Ok(())
}

/// Checks a name given to a new VM, or a VM's new name: the rules of
/// [`validate_name`], and no UUID and no invisible characters (see
/// [`invisible_character`]). A VM already stored under such a name keeps loading:
/// only a name being set is checked this way.
pub fn validate_new_name(name: &str) -> Result<(), ConfigError> {
    validate_name(name)?;
    if let Some((c, what)) = invisible_character(name) {
        return Err(ConfigError::NameCharacter {
            name: name.to_string(),
            code_point: u32::from(c),
            what,
        });
    }
    if looks_like_uuid(name) {
        return Err(ConfigError::NameIsUuid(name.to_string()));
    }
    Ok(())
}

/// Whether `name` parses as a UUID in any form the API's lookups take.
pub fn looks_like_uuid(name: &str) -> bool {
    uuid::Uuid::parse_str(name).is_ok()
}

/// The first character of `s` that shows nothing or changes how the text around
/// it is shown, and what it is: control characters (Unicode category Cc), format
/// characters (Cf: bidirectional controls, zero-width characters, the byte order
/// mark, ...), line and paragraph separators, private-use code points and
/// noncharacters. Names made of visible text cannot pass for other names.
pub fn invisible_character(s: &str) -> Option<(char, &'static str)> {
    s.chars()
        .find_map(|c| invisible_kind(c).map(|what| (c, what)))
}

/// The code points [`invisible_character`] refuses besides control characters
/// (`char::is_control`, U+0000–U+001F and U+007F–U+009F) and noncharacters
/// (U+FDD0–U+FDEF and the last two of every plane), as inclusive ranges. The
/// OpenAPI document's name patterns are built from the same table.
pub const INVISIBLE_RANGES: &[(u32, u32, &str)] = &[
    (0x202A, 0x202E, "a bidirectional control character"),
    (0x2066, 0x2069, "a bidirectional control character"),
    (0x200E, 0x200F, "a bidirectional control character"),
    (0x061C, 0x061C, "a bidirectional control character"),
    (0x200B, 0x200D, "a zero-width character"),
    (0x2060, 0x2060, "a zero-width character"),
    (0xFEFF, 0xFEFF, "a zero-width character"),
    // The rest of Unicode's format characters (category Cf).
    (0x00AD, 0x00AD, "an invisible format character"),
    (0x0600, 0x0605, "an invisible format character"),
    (0x06DD, 0x06DD, "an invisible format character"),
    (0x070F, 0x070F, "an invisible format character"),
    (0x0890, 0x0891, "an invisible format character"),
    (0x08E2, 0x08E2, "an invisible format character"),
    (0x180E, 0x180E, "an invisible format character"),
    (0x2061, 0x2064, "an invisible format character"),
    (0x206A, 0x206F, "an invisible format character"),
    (0xFFF9, 0xFFFB, "an invisible format character"),
    (0x110BD, 0x110BD, "an invisible format character"),
    (0x110CD, 0x110CD, "an invisible format character"),
    (0x13430, 0x1343F, "an invisible format character"),
    (0x1BCA0, 0x1BCA3, "an invisible format character"),
    (0x1D173, 0x1D17A, "an invisible format character"),
    (0xE0001, 0xE0001, "an invisible format character"),
    (0xE0020, 0xE007F, "an invisible format character"),
    (0x2028, 0x2029, "a line or paragraph separator"),
    (0xE000, 0xF8FF, "a private-use character"),
    (0xF0000, 0xFFFFD, "a private-use character"),
    (0x100000, 0x10FFFD, "a private-use character"),
    (0xFDD0, 0xFDEF, "a noncharacter"),
];

fn invisible_kind(c: char) -> Option<&'static str> {
    let u = u32::from(c);
    if c.is_control() {
        return Some("a control character");
    }
    if let Some((_, _, what)) = INVISIBLE_RANGES
        .iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&u))
    {
        return Some(what);
    }
    (u & 0xFFFE == 0xFFFE).then_some("a noncharacter")
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (hex, either case); rejects multicast.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::MacInvalid(mac.to_string());
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut bytes = [0u8; 6];
    for (b, p) in bytes.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if bytes[0] & 1 == 1 || bytes == [0; 6] {
        return Err(bad());
    }
    Ok(bytes)
}

/// A MAC address in canonical form (lower case).
pub fn canonical_mac(mac: &str) -> Result<String, ConfigError> {
    let b = parse_mac(mac)?;
    Ok(format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    ))
}

/// Checks every rule that depends on the settings alone (not on files or other VMs).
pub fn validate(s: &VmSettings, limits: &HostLimits) -> Result<(), ConfigError> {
    validate_name(&s.name)?;
    if !(MIN_GENERATION..=MAX_GENERATION).contains(&s.generation) {
        return Err(ConfigError::Generation(s.generation));
    }
    if !(1..=CURRENT_CONFIGURATION_VERSION).contains(&s.configuration_version) {
        return Err(ConfigError::ConfigurationVersion(s.configuration_version));
    }
    let p = &s.processor;
    if p.count < MIN_PROCESSORS || p.count > limits.max_processors {
        return Err(ConfigError::ProcessorCount {
            count: p.count,
            max: limits.max_processors,
        });
    }
    if p.reserve_percent > MAX_PERCENT {
        return Err(ConfigError::ProcessorReserve(p.reserve_percent));
    }
    if p.limit_percent > MAX_PERCENT {
        return Err(ConfigError::ProcessorLimit(p.limit_percent));
    }
    if !(MIN_RELATIVE_WEIGHT..=MAX_RELATIVE_WEIGHT).contains(&p.relative_weight) {
        return Err(ConfigError::ProcessorWeight(p.relative_weight));
    }
    let mib = s.memory.startup_mib;
    if mib < limits.min_memory_mib || mib > limits.max_memory_mib {
        return Err(ConfigError::Memory {
            mib,
            min: limits.min_memory_mib,
            max: limits.max_memory_mib,
        });
    }
    let notes = s.notes.chars().count();
    if notes > MAX_NOTES_CHARS {
        return Err(ConfigError::NotesTooLong(notes));
    }
    validate_drives(s)?;
    validate_adapters(s)?;
    validate_boot_order(s)
}

fn validate_drives(s: &VmSettings) -> Result<(), ConfigError> {
    let mut taken = HashSet::new();
    let mut paths: HashSet<&str> = HashSet::new();
    for d in &s.drives {
        validate_slot(d.slot)?;
        if !taken.insert(d.slot) {
            return Err(ConfigError::SlotTaken(d.slot));
        }
        if s.generation == 2 && d.slot.controller == ControllerKind::Ide {
            return Err(ConfigError::IdeInGeneration2(d.slot));
        }
        if s.generation == 1
            && d.slot.controller == ControllerKind::Scsi
            && matches!(d.media, DriveMedia::Dvd { .. })
        {
            return Err(ConfigError::DvdOnScsiGeneration1(d.slot));
        }
        if let Some(path) = d.media.host_path() {
            if !path.starts_with('/') {
                return Err(ConfigError::PathNotAbsolute(path.to_string()));
            }
            if d.media.is_hard_disk() && !paths.insert(path) {
                return Err(ConfigError::DiskInUse {
                    path: path.to_string(),
                    owner: format!("this VM ({})", s.name),
                });
            }
        }
    }
    if s.generation == 1 {
        if let Some(boot) = boot_disk(s) {
            if boot.slot.controller != ControllerKind::Ide {
                return Err(ConfigError::BootDiskNotOnIde(boot.slot));
            }
        }
    }
    Ok(())
}

/// The slot must exist on this kind of controller.
pub fn validate_slot(slot: Slot) -> Result<(), ConfigError> {
    let (controllers, locations) = slot.controller.limits();
    if slot.controller_number >= controllers {
        return Err(ConfigError::ControllerOutOfRange {
            kind: slot.controller,
            number: slot.controller_number,
            max: controllers,
        });
    }
    if slot.location >= locations {
        return Err(ConfigError::LocationOutOfRange {
            kind: slot.controller,
            number: slot.controller_number,
            location: slot.location,
            max: locations,
        });
    }
    Ok(())
}

/// The hard disk the VM boots from: the first hard disk in the boot order, or, with no
/// disk in the boot order, the first hard disk by slot.
pub fn boot_disk(s: &VmSettings) -> Option<&Drive> {
    let from_order = s.boot_order.iter().find_map(|e| match e {
        BootEntry::Drive { slot } => s
            .drives
            .iter()
            .find(|d| d.slot == *slot && d.media.is_hard_disk()),
        BootEntry::Network { .. } => None,
    });
    if from_order.is_some()
        || s.boot_order
            .iter()
            .any(|e| matches!(e, BootEntry::Drive { .. }))
    {
        return from_order;
    }
    let mut disks: Vec<&Drive> = s.drives.iter().filter(|d| d.media.is_hard_disk()).collect();
    disks.sort_by_key(|d| {
        (
            d.slot.controller == ControllerKind::Scsi,
            d.slot.controller_number,
            d.slot.location,
        )
    });
    disks.first().copied()
}

fn validate_adapters(s: &VmSettings) -> Result<(), ConfigError> {
    let mut macs = HashSet::new();
    let legacy = s
        .network_adapters
        .iter()
        .filter(|a| a.kind == AdapterKind::Legacy)
        .count();
    let synthetic = s.network_adapters.len() - legacy;
    if legacy > 0 && s.generation == 2 {
        return Err(ConfigError::LegacyAdapterInGeneration2);
    }
    if legacy > MAX_LEGACY_ADAPTERS {
        return Err(ConfigError::TooManyAdapters {
            kind: "legacy",
            max: MAX_LEGACY_ADAPTERS,
        });
    }
    if synthetic > MAX_SYNTHETIC_ADAPTERS {
        return Err(ConfigError::TooManyAdapters {
            kind: "synthetic",
            max: MAX_SYNTHETIC_ADAPTERS,
        });
    }
    let usable = crate::devices::usable_slots(s.generation);
    let mut slots = HashSet::new();
    let mut ids = HashSet::new();
    for a in &s.network_adapters {
        if let Some(slot) = a.pci_slot {
            if !usable.contains(&slot) {
                return Err(ConfigError::AdapterSlotInvalid {
                    slot,
                    generation: s.generation,
                    first: *usable.start(),
                    last: *usable.end(),
                });
            }
            if !slots.insert(slot) {
                return Err(ConfigError::AdapterSlotTaken(slot));
            }
        }
        if let Some(id) = a.id {
            if !ids.insert(id) {
                return Err(ConfigError::AdapterIdTaken(id));
            }
        }
        let mac = canonical_mac(&a.mac)?;
        if let Some(bw) = a.maximum_bandwidth {
            if !(MIN_BANDWIDTH..=MAX_BANDWIDTH).contains(&bw) {
                return Err(ConfigError::BandwidthInvalid { mac, given: bw });
            }
        }
        validate_vlan(&mac, a)?;
        if !macs.insert(mac.clone()) {
            return Err(ConfigError::MacInUse {
                mac,
                owner: format!("another adapter of this VM ({})", s.name),
            });
        }
    }
    Ok(())
}

/// Checks an adapter's VLAN setting: ids in range, the fields its mode has and
/// no others.
pub fn validate_vlan(mac: &str, a: &NetworkAdapter) -> Result<(), ConfigError> {
    let id = |what, given: u16| {
        if (MIN_VLAN_ID..=MAX_VLAN_ID).contains(&given) {
            Ok(())
        } else {
            Err(ConfigError::VlanIdInvalid {
                mac: mac.to_string(),
                what,
                given,
            })
        }
    };
    let not_for = |mode: VlanMode, field, hint| ConfigError::VlanFieldForMode {
        mac: mac.to_string(),
        mode: mode.name(),
        field,
        hint,
    };
    if let Some(v) = a.vlan_id {
        id("its access VLAN", v)?;
    }
    if let Some(v) = a.vlan_native {
        id("its native VLAN", v)?;
    }
    if a.vlan_allowed.len() > MAX_VLAN_RANGES {
        return Err(ConfigError::VlanTooManyRanges {
            mac: mac.to_string(),
            given: a.vlan_allowed.len(),
        });
    }
    for r in &a.vlan_allowed {
        id("in its allowed VLANs", r.first)?;
        id("in its allowed VLANs", r.last())?;
        if r.last() < r.first {
            return Err(ConfigError::VlanRangeReversed {
                mac: mac.to_string(),
                first: r.first,
                last: r.last(),
            });
        }
    }
    let trunk_only = "allowed VLANs and a native VLAN belong to trunk mode (`--vlan-trunk`)";
    match a.vlan_mode {
        VlanMode::Untagged => {
            if a.vlan_id.is_some() {
                return Err(not_for(
                    a.vlan_mode,
                    "VLAN id",
                    "an access VLAN needs access mode (`--vlan 10`)",
                ));
            }
            if !a.vlan_allowed.is_empty() {
                return Err(not_for(a.vlan_mode, "allowed VLANs", trunk_only));
            }
            if a.vlan_native.is_some() {
                return Err(not_for(a.vlan_mode, "native VLAN", trunk_only));
            }
        }
        VlanMode::Access => {
            if a.vlan_id.is_none() {
                return Err(ConfigError::VlanIdMissing {
                    mac: mac.to_string(),
                });
            }
            if !a.vlan_allowed.is_empty() {
                return Err(not_for(a.vlan_mode, "allowed VLANs", trunk_only));
            }
            if a.vlan_native.is_some() {
                return Err(not_for(a.vlan_mode, "native VLAN", trunk_only));
            }
        }
        VlanMode::Trunk => {
            if a.vlan_id.is_some() {
                return Err(not_for(
                    a.vlan_mode,
                    "access VLAN id",
                    "a trunk carries its allowed VLANs tagged and its native VLAN untagged (`vlan_native`)",
                ));
            }
            if a.vlan_allowed.is_empty() {
                return Err(ConfigError::VlanAllowedMissing {
                    mac: mac.to_string(),
                });
            }
        }
    }
    Ok(())
}

fn validate_boot_order(s: &VmSettings) -> Result<(), ConfigError> {
    for e in &s.boot_order {
        match e {
            BootEntry::Drive { slot } => {
                if !s.drives.iter().any(|d| d.slot == *slot) {
                    return Err(ConfigError::BootEntryUnknown(format!("a drive at {slot}")));
                }
            }
            BootEntry::Network { mac } => {
                let wanted = canonical_mac(mac)?;
                let found = s
                    .network_adapters
                    .iter()
                    .any(|a| canonical_mac(&a.mac).ok().as_deref() == Some(&wanted));
                if !found {
                    return Err(ConfigError::BootEntryUnknown(format!(
                        "a network adapter with MAC {mac}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Checks that every file the drives name exists and is of the right kind.
pub fn check_files(s: &VmSettings) -> Result<(), ConfigError> {
    for d in &s.drives {
        match &d.media {
            DriveMedia::HardDisk { path } => {
                check_file(path, "a regular file (a .vhd or .vhdx disk)", |m| {
                    m.is_file()
                })?;
                let lower = path.to_ascii_lowercase();
                if ![".vhd", ".vhdx", ".avhd", ".avhdx"]
                    .iter()
                    .any(|e| lower.ends_with(e))
                {
                    return Err(ConfigError::WrongFileKind {
                        path: path.clone(),
                        expected: "a virtual hard disk (its name must end in .vhd, .vhdx, .avhd or .avhdx)",
                    });
                }
            }
            DriveMedia::PassThrough { device } => {
                use std::os::unix::fs::FileTypeExt;
                check_file(device, "a block device", |m| {
                    m.file_type().is_block_device()
                })?;
            }
            DriveMedia::Dvd { iso: Some(iso) } => {
                check_file(iso, "a regular file (an ISO image)", |m| m.is_file())?
            }
            DriveMedia::Dvd { iso: None } => {}
        }
    }
    Ok(())
}

fn check_file(
    path: &str,
    expected: &'static str,
    ok: impl Fn(&std::fs::Metadata) -> bool,
) -> Result<(), ConfigError> {
    match std::fs::metadata(Path::new(path)) {
        Ok(m) if ok(&m) => Ok(()),
        Ok(_) => Err(ConfigError::WrongFileKind {
            path: path.to_string(),
            expected,
        }),
        Err(_) => Err(ConfigError::FileMissing(path.to_string())),
    }
}

/// Checks that no hard disk or MAC of `s` is used by one of `others` (the other VMs).
pub fn check_against_others<'a>(
    s: &VmSettings,
    others: impl IntoIterator<Item = &'a VmSettings>,
) -> Result<(), ConfigError> {
    let key = |p: &str| {
        std::fs::canonicalize(p)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or(p.to_string())
    };
    let mine: Vec<(String, &str)> = s
        .drives
        .iter()
        .filter(|d| d.media.is_hard_disk())
        .filter_map(|d| d.media.host_path())
        .map(|p| (key(p), p))
        .collect();
    let my_macs: Vec<String> = s
        .network_adapters
        .iter()
        .filter_map(|a| canonical_mac(&a.mac).ok())
        .collect();
    for other in others {
        if other.id == s.id {
            continue;
        }
        let owner = || format!("VM {} ({})", other.name, other.id);
        for d in other.drives.iter().filter(|d| d.media.is_hard_disk()) {
            if let Some(p) = d.media.host_path() {
                let k = key(p);
                if let Some((_, path)) = mine.iter().find(|(m, _)| *m == k) {
                    return Err(ConfigError::DiskInUse {
                        path: path.to_string(),
                        owner: owner(),
                    });
                }
            }
        }
        for a in &other.network_adapters {
            if let Ok(m) = canonical_mac(&a.mac) {
                if my_macs.contains(&m) {
                    return Err(ConfigError::MacInUse {
                        mac: m,
                        owner: owner(),
                    });
                }
            }
        }
    }
    Ok(())
}
