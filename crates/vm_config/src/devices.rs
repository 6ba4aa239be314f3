//! Device identity the guest sees: where each network adapter sits on the PCI bus
//! and its id. Given once, kept for the adapter's life, so the guest never meets a
//! "new" adapter because another device came or went (Hyper-V's phantom NICs).

use std::collections::HashSet;
use std::ops::RangeInclusive;

use uuid::Uuid;

use crate::{ControllerKind, DriveMedia, VmSettings};

/// Root-bus slots new adapters get, lowest free first. Below them QEMU places the
/// chipset and the synthetic disks' PCI bridges; slot 31 is the Q35 chipset's.
pub const NIC_SLOTS: RangeInclusive<u8> = 0x10..=0x1e;

/// Root-bus slots an adapter may sit in on a VM of `generation`: not the host
/// bridge (0), not PIIX (1, generation 1), not ICH9 (31, generation 2).
pub fn usable_slots(generation: u8) -> RangeInclusive<u8> {
    if generation == 1 {
        2..=0x1f
    } else {
        1..=0x1e
    }
}

/// Gives every adapter without an id or slot one: an adapter of `old` with the
/// same MAC keeps what it had there; otherwise a new id and the first free slot of
/// [`NIC_SLOTS`]. Adapters that have both are left alone.
pub fn assign_identity(settings: &mut VmSettings, old: Option<&VmSettings>) {
    let same_mac = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let mut taken: HashSet<u8> = settings
        .network_adapters
        .iter()
        .filter_map(|a| a.pci_slot)
        .collect();
    for adapter in &mut settings.network_adapters {
        let before = old.and_then(|o| {
            o.network_adapters
                .iter()
                .find(|b| same_mac(&b.mac, &adapter.mac))
        });
        if adapter.id.is_none() {
            adapter.id = Some(before.and_then(|b| b.id).unwrap_or_else(Uuid::new_v4));
        }
        if adapter.pci_slot.is_none() {
            let kept = before
                .and_then(|b| b.pci_slot)
                .filter(|s| !taken.contains(s));
            let slot = kept.or_else(|| NIC_SLOTS.clone().find(|s| !taken.contains(s)));
            if let Some(s) = slot {
                taken.insert(s);
                adapter.pci_slot = Some(s);
            }
            // With every slot taken the adapter stays without one and validation
            // reports too many adapters.
        }
    }
}

/// The root-bus slots a schema-1 VM's adapters had: QEMU placed them, in order,
/// after the chipset (slot 2 on `pc`, 1 on `q35`) and one PCI bridge per 32
/// locations of a SCSI controller in use.
pub fn schema1_slots(settings: &VmSettings) -> Vec<u8> {
    let mut bridges: Vec<(u8, u8)> = settings
        .drives
        .iter()
        .filter(|d| d.slot.controller == ControllerKind::Scsi)
        .filter(|d| !matches!(d.media, DriveMedia::Dvd { iso: None }))
        .map(|d| (d.slot.controller_number, d.slot.location / 32))
        .collect();
    bridges.sort_unstable();
    bridges.dedup();
    let first: usize = if settings.generation == 1 { 2 } else { 1 };
    (0..settings.network_adapters.len())
        .map(|i| u8::try_from(first + bridges.len() + i).unwrap_or(u8::MAX))
        .collect()
}

/// Upgrades schema-1 settings: each adapter gets the slot it had (so the guest sees
/// the same device) and an id derived from the VM's id and the MAC, so that loading
/// the same old file twice gives the same ids.
pub fn upgrade_schema1(settings: &mut VmSettings) {
    let slots = schema1_slots(settings);
    let vm = settings.id;
    for (adapter, slot) in settings.network_adapters.iter_mut().zip(slots) {
        adapter.id = Some(Uuid::new_v5(
            &vm,
            adapter.mac.to_ascii_lowercase().as_bytes(),
        ));
        adapter.pci_slot = Some(slot);
    }
}

/// New identities for every adapter: fresh ids and MAC addresses (from
/// `new_mac`, e.g. the host's pool), the same slots (an imported copy that runs
/// beside its original must not share their MACs).
pub fn renew_adapters<E>(
    settings: &mut VmSettings,
    mut new_mac: impl FnMut() -> Result<String, E>,
) -> Result<(), E> {
    for adapter in &mut settings.network_adapters {
        adapter.id = Some(Uuid::new_v4());
        adapter.mac = new_mac()?;
    }
    Ok(())
}
