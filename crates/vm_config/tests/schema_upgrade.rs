//! Settings written by older Viridian builds load, upgraded, with nothing lost.
//! The files under `tests/data/v1/` were written by the schema-1 daemon (commit
//! 99c187c) through its API: `web01` (generation 1, two IDE/SCSI disks, three
//! adapters, two checkpoints) and `db01` (generation 2, a disk at SCSI 1:40).

use std::path::{Path, PathBuf};

use uuid::Uuid;
use vm_config::{devices, file, validate, AdapterKind, HostLimits};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/v1")
        .join(name)
}

#[test]
fn schema1_vm_keeps_every_setting_and_its_adapters_keep_their_pci_slots() {
    let s = file::load(&fixture("web01-gen1-two-checkpoints.vm.json")).unwrap();
    assert_eq!(s.name, "web01");
    assert_eq!(s.generation, 1);
    assert_eq!(s.processor.count, 2);
    assert_eq!(
        (
            s.processor.reserve_percent,
            s.processor.limit_percent,
            s.processor.relative_weight
        ),
        (10, 50, 200)
    );
    assert_eq!(s.memory.startup_mib, 256);
    assert_eq!(s.drives.len(), 2);
    assert_eq!(s.notes, "made by Viridian schema v1");
    let macs: Vec<&str> = s.network_adapters.iter().map(|a| a.mac.as_str()).collect();
    assert_eq!(
        macs,
        [
            "52:54:00:12:34:56",
            "52:54:00:93:da:39",
            "52:54:00:1d:92:ca"
        ]
    );
    assert_eq!(s.network_adapters[1].kind, AdapterKind::Legacy);
    // Schema 1 let QEMU place the adapters: after PIIX (slot 1) and the one PCI
    // bridge of SCSI controller 0, in order. (Checked against QEMU 7.2's
    // `info pci` for the same command line.)
    let slots: Vec<Option<u8>> = s.network_adapters.iter().map(|a| a.pci_slot).collect();
    assert_eq!(slots, [Some(3), Some(4), Some(5)]);
    assert!(s.network_adapters.iter().all(|a| a.id.is_some()));
    validate::validate(&s, &HostLimits::default()).unwrap();
}

#[test]
fn schema1_generation2_adapter_sits_after_q35s_bridges() {
    let s = file::load(&fixture("db01-gen2-scsi.vm.json")).unwrap();
    assert_eq!(s.generation, 2);
    // Q35 has no device in slot 1; SCSI 1:40 needs bridge scsi1.1: the adapter is
    // next, in slot 2.
    assert_eq!(s.network_adapters[0].pci_slot, Some(2));
    assert_eq!(s.network_adapters[0].mac, "52:54:00:ab:cd:01");
}

#[test]
fn loading_the_same_old_file_twice_gives_the_same_adapter_ids() {
    let a = file::load(&fixture("web01-gen1-two-checkpoints.vm.json")).unwrap();
    let b = file::load(&fixture("web01-gen1-two-checkpoints.vm.json")).unwrap();
    assert_eq!(a, b);
    let ids: std::collections::HashSet<Option<Uuid>> =
        a.network_adapters.iter().map(|n| n.id).collect();
    assert_eq!(ids.len(), 3, "each adapter gets its own id");
}

#[test]
fn schema1_checkpoint_settings_upgrade_the_same_way() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/v1");
    let mut seen = 0;
    for item in std::fs::read_dir(&dir).unwrap() {
        let path = item.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("web01.checkpoint-") {
            continue;
        }
        let s = file::load(&path).unwrap();
        assert_eq!(s.name, "web01");
        for (a, slot) in s.network_adapters.iter().zip(devices::schema1_slots(&s)) {
            assert_eq!(a.pci_slot, Some(slot));
        }
        seen += 1;
    }
    assert_eq!(seen, 2);
}

#[test]
fn upgraded_file_saves_as_the_current_schema_and_reloads_unchanged() {
    let s = file::load(&fixture("web01-gen1-two-checkpoints.vm.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("vm.json");
    file::save(&path, &s).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("\"schema_version\": {}", file::SCHEMA_VERSION)));
    assert!(text.contains("\"pci_slot\": 3"));
    assert_eq!(file::load(&path).unwrap(), s);
}

#[test]
fn new_adapters_get_free_slots_from_16_and_keep_them_when_others_go() {
    let mut s = file::load(&fixture("db01-gen2-scsi.vm.json")).unwrap();
    let old = s.clone();
    for mac in ["52:54:00:00:00:0a", "52:54:00:00:00:0b"] {
        s.network_adapters.push(vm_config::NetworkAdapter {
            id: None,
            kind: AdapterKind::Synthetic,
            mac: mac.into(),
            pci_slot: None,
            switch: None,
            mac_address_spoofing: false,
            dhcp_guard: false,
            router_guard: false,
            maximum_bandwidth: None,
            vlan_mode: Default::default(),
            vlan_id: None,
            vlan_allowed: Vec::new(),
            vlan_native: None,
            port_mirroring: Default::default(),
        });
    }
    devices::assign_identity(&mut s, Some(&old));
    let slots: Vec<Option<u8>> = s.network_adapters.iter().map(|a| a.pci_slot).collect();
    assert_eq!(slots, [Some(2), Some(16), Some(17)]);
    // Removing the first adapter moves nobody.
    let before = s.clone();
    s.network_adapters.remove(1);
    devices::assign_identity(&mut s, Some(&before));
    assert_eq!(s.network_adapters[1].pci_slot, Some(17));
    assert_eq!(s.network_adapters[1].id, before.network_adapters[2].id);
    // An adapter given back without its identity (a PUT of settings from an older
    // client) gets it back from the adapter with the same MAC.
    let kept = s.clone();
    s.network_adapters[1].id = None;
    s.network_adapters[1].pci_slot = None;
    devices::assign_identity(&mut s, Some(&kept));
    assert_eq!(s, kept);
}

#[test]
fn adapter_slots_are_checked() {
    let mut s = file::load(&fixture("web01-gen1-two-checkpoints.vm.json")).unwrap();
    s.network_adapters[0].pci_slot = Some(1);
    let err = validate::validate(&s, &HostLimits::default()).unwrap_err();
    assert!(err.to_string().contains("PCI slot 1 cannot hold"), "{err}");
    s.network_adapters[0].pci_slot = Some(4);
    let err = validate::validate(&s, &HostLimits::default()).unwrap_err();
    assert!(
        matches!(err, vm_config::ConfigError::AdapterSlotTaken(4)),
        "{err}"
    );
}

#[test]
fn newer_schema_is_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("vm.json");
    let text = std::fs::read_to_string(fixture("db01-gen2-scsi.vm.json")).unwrap();
    std::fs::write(
        &path,
        text.replace("\"schema_version\": 1", "\"schema_version\": 7"),
    )
    .unwrap();
    let err = file::load(&path).unwrap_err();
    assert!(err.to_string().contains("upgrade Viridian"), "{err}");
}
