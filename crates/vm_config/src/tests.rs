use uuid::Uuid;

use crate::validate::{check_against_others, check_files, validate};
use crate::*;

fn vm(generation: u8) -> VmSettings {
    VmSettings {
        id: Uuid::new_v4(),
        name: "web01".into(),
        generation,
        processor: ProcessorSettings::with_count(2),
        memory: MemorySettings { startup_mib: 512 },
        drives: vec![],
        network_adapters: vec![],
        boot_order: vec![],
        notes: String::new(),
        configuration_version: crate::CURRENT_CONFIGURATION_VERSION,
    }
}

#[test]
fn a_vm_json_without_a_configuration_version_is_version_1_and_unknown_versions_are_refused() {
    let mut v = serde_json::to_value(vm(1)).unwrap();
    v.as_object_mut().unwrap().remove("configuration_version");
    let old: VmSettings = serde_json::from_value(v).unwrap();
    assert_eq!(old.configuration_version, 1);
    assert!(validate(&old, &HostLimits::default()).is_ok());
    for bad in [0, crate::CURRENT_CONFIGURATION_VERSION + 1] {
        let mut s = vm(1);
        s.configuration_version = bad;
        let e = validate(&s, &HostLimits::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("configuration version {bad} is not one")),
            "{e}"
        );
    }
}

fn slot(controller: ControllerKind, n: u8, l: u8) -> Slot {
    Slot {
        controller,
        controller_number: n,
        location: l,
    }
}

fn disk(s: Slot, path: &str) -> Drive {
    Drive {
        slot: s,
        media: DriveMedia::HardDisk { path: path.into() },
    }
}

fn check(s: &VmSettings) -> Result<(), ConfigError> {
    validate(s, &HostLimits::default())
}

#[test]
fn plain_vm_is_valid() {
    check(&vm(1)).unwrap();
    check(&vm(2)).unwrap();
}

#[test]
fn names_with_separators_control_chars_or_dots_are_rejected() {
    for bad in [
        "a/b",
        "a\\b",
        "tab\there",
        "..",
        ".",
        "",
        " lead",
        &"x".repeat(101),
    ] {
        let mut s = vm(1);
        s.name = bad.into();
        assert!(check(&s).is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn processor_and_memory_ranges_are_enforced() {
    let mut s = vm(1);
    s.processor.count = 0;
    assert_eq!(
        check(&s),
        Err(ConfigError::ProcessorCount { count: 0, max: 64 })
    );
    let mut s = vm(1);
    s.processor.reserve_percent = 101;
    assert_eq!(check(&s), Err(ConfigError::ProcessorReserve(101)));
    let mut s = vm(1);
    s.processor.limit_percent = 150;
    assert_eq!(check(&s), Err(ConfigError::ProcessorLimit(150)));
    let mut s = vm(1);
    s.processor.relative_weight = 10_001;
    assert_eq!(check(&s), Err(ConfigError::ProcessorWeight(10_001)));
    let mut s = vm(1);
    s.memory.startup_mib = 1;
    assert!(matches!(check(&s), Err(ConfigError::Memory { mib: 1, .. })));
    let mut s = vm(3);
    s.generation = 3;
    assert_eq!(check(&s), Err(ConfigError::Generation(3)));
}

#[test]
fn slots_out_of_range_or_taken_are_rejected() {
    let mut s = vm(1);
    s.drives = vec![disk(slot(ControllerKind::Ide, 2, 0), "/a.vhd")];
    assert!(matches!(
        check(&s),
        Err(ConfigError::ControllerOutOfRange { number: 2, .. })
    ));
    s.drives = vec![disk(slot(ControllerKind::Scsi, 0, 64), "/a.vhd")];
    assert!(matches!(
        check(&s),
        Err(ConfigError::LocationOutOfRange { location: 64, .. })
    ));
    s.drives = vec![
        disk(slot(ControllerKind::Ide, 0, 0), "/a.vhd"),
        disk(slot(ControllerKind::Ide, 0, 0), "/b.vhd"),
    ];
    assert_eq!(
        check(&s),
        Err(ConfigError::SlotTaken(slot(ControllerKind::Ide, 0, 0)))
    );
}

#[test]
fn generation_1_boot_disk_must_be_on_ide() {
    let mut s = vm(1);
    s.drives = vec![disk(slot(ControllerKind::Scsi, 0, 0), "/a.vhd")];
    assert_eq!(
        check(&s),
        Err(ConfigError::BootDiskNotOnIde(slot(
            ControllerKind::Scsi,
            0,
            0
        )))
    );
    s.drives
        .push(disk(slot(ControllerKind::Ide, 0, 0), "/b.vhd"));
    check(&s).unwrap();
    s.boot_order = vec![BootEntry::Drive {
        slot: slot(ControllerKind::Scsi, 0, 0),
    }];
    assert_eq!(
        check(&s),
        Err(ConfigError::BootDiskNotOnIde(slot(
            ControllerKind::Scsi,
            0,
            0
        )))
    );
}

#[test]
fn generation_rules_for_dvd_ide_and_legacy_adapters() {
    let mut s = vm(1);
    s.drives = vec![Drive {
        slot: slot(ControllerKind::Scsi, 0, 1),
        media: DriveMedia::Dvd { iso: None },
    }];
    assert!(matches!(
        check(&s),
        Err(ConfigError::DvdOnScsiGeneration1(_))
    ));
    let mut s = vm(2);
    s.drives = vec![disk(slot(ControllerKind::Ide, 0, 0), "/a.vhdx")];
    assert!(matches!(check(&s), Err(ConfigError::IdeInGeneration2(_))));
    let mut s = vm(2);
    s.network_adapters = vec![NetworkAdapter {
        id: None,
        pci_slot: None,
        switch: None,
        kind: AdapterKind::Legacy,
        mac: random_mac(),
        mac_address_spoofing: false,
        dhcp_guard: false,
        router_guard: false,
        maximum_bandwidth: None,
        vlan_mode: Default::default(),
        vlan_id: None,
        vlan_allowed: Vec::new(),
        vlan_native: None,
        port_mirroring: Default::default(),
    }];
    assert_eq!(check(&s), Err(ConfigError::LegacyAdapterInGeneration2));
}

#[test]
fn same_disk_twice_in_one_vm_or_across_vms_is_in_use() {
    let mut s = vm(2);
    s.drives = vec![
        disk(slot(ControllerKind::Scsi, 0, 0), "/a.vhdx"),
        disk(slot(ControllerKind::Scsi, 0, 1), "/a.vhdx"),
    ];
    assert!(matches!(check(&s), Err(ConfigError::DiskInUse { .. })));
    let mut other = vm(2);
    other.name = "other".into();
    other.drives = vec![disk(slot(ControllerKind::Scsi, 1, 0), "/a.vhdx")];
    s.drives.pop();
    let err = check_against_others(&s, [&other]).unwrap_err();
    assert!(
        err.to_string().contains("already attached to VM other"),
        "{err}"
    );
}

#[test]
fn missing_files_and_relative_paths_are_rejected() {
    let mut s = vm(2);
    s.drives = vec![disk(slot(ControllerKind::Scsi, 0, 0), "rel.vhdx")];
    assert_eq!(
        check(&s),
        Err(ConfigError::PathNotAbsolute("rel.vhdx".into()))
    );
    s.drives = vec![disk(
        slot(ControllerKind::Scsi, 0, 0),
        "/nonexistent/x.vhdx",
    )];
    assert_eq!(
        check_files(&s),
        Err(ConfigError::FileMissing("/nonexistent/x.vhdx".into()))
    );
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, b"x").unwrap();
    s.drives = vec![disk(
        slot(ControllerKind::Scsi, 0, 0),
        txt.to_str().unwrap(),
    )];
    assert!(matches!(
        check_files(&s),
        Err(ConfigError::WrongFileKind { .. })
    ));
}

#[test]
fn bad_and_duplicate_macs_are_rejected() {
    let mut s = vm(1);
    s.network_adapters = vec![NetworkAdapter {
        id: None,
        pci_slot: None,
        switch: None,
        kind: AdapterKind::Synthetic,
        mac: "01:00:00:00:00:01".into(),
        mac_address_spoofing: false,
        dhcp_guard: false,
        router_guard: false,
        maximum_bandwidth: None,
        vlan_mode: Default::default(),
        vlan_id: None,
        vlan_allowed: Vec::new(),
        vlan_native: None,
        port_mirroring: Default::default(),
    }];
    assert!(matches!(check(&s), Err(ConfigError::MacInvalid(_))));
    let mac = random_mac();
    s.network_adapters = vec![
        NetworkAdapter {
            id: None,
            pci_slot: None,
            switch: None,
            kind: AdapterKind::Synthetic,
            mac: mac.clone(),
            mac_address_spoofing: false,
            dhcp_guard: false,
            router_guard: false,
            maximum_bandwidth: None,
            vlan_mode: Default::default(),
            vlan_id: None,
            vlan_allowed: Vec::new(),
            vlan_native: None,
            port_mirroring: Default::default(),
        },
        NetworkAdapter {
            id: None,
            pci_slot: None,
            switch: None,
            kind: AdapterKind::Legacy,
            mac: mac.to_uppercase(),
            mac_address_spoofing: false,
            dhcp_guard: false,
            router_guard: false,
            maximum_bandwidth: None,
            vlan_mode: Default::default(),
            vlan_id: None,
            vlan_allowed: Vec::new(),
            vlan_native: None,
            port_mirroring: Default::default(),
        },
    ];
    assert!(matches!(check(&s), Err(ConfigError::MacInUse { .. })));
}

#[test]
fn vm_json_round_trips_with_schema_version_and_rejects_newer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.json");
    let s = vm(2);
    file::save(&path, &s).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("\"schema_version\": {}", file::SCHEMA_VERSION)));
    assert_eq!(file::load(&path).unwrap(), s);
    std::fs::write(
        &path,
        text.replace(
            &format!("\"schema_version\": {}", file::SCHEMA_VERSION),
            "\"schema_version\": 99",
        ),
    )
    .unwrap();
    assert!(matches!(
        file::load(&path),
        Err(file::FileError::TooNew { found: 99, .. })
    ));
    std::fs::write(&path, b"{not json").unwrap();
    assert!(matches!(
        file::load(&path),
        Err(file::FileError::Parse { .. })
    ));
}

#[test]
fn an_adapters_switch_round_trips_and_schema_2_files_read_as_not_connected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.json");
    let mut s = vm(2);
    s.network_adapters = vec![NetworkAdapter {
        id: Some(Uuid::new_v4()),
        kind: AdapterKind::Synthetic,
        mac: "52:54:00:12:34:56".into(),
        pci_slot: Some(16),
        switch: Some("a6f1c1d4-0000-4000-8000-000000000001".into()),
        mac_address_spoofing: false,
        dhcp_guard: false,
        router_guard: false,
        maximum_bandwidth: None,
        vlan_mode: Default::default(),
        vlan_id: None,
        vlan_allowed: Vec::new(),
        vlan_native: None,
        port_mirroring: Default::default(),
    }];
    file::save(&path, &s).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(&format!("\"schema_version\": {}", file::SCHEMA_VERSION)),
        "{text}"
    );
    assert_eq!(file::load(&path).unwrap(), s);
    // A schema 2 file has no `switch`: its adapters load, not connected.
    let mut v2: serde_json::Value = serde_json::from_str(&text).unwrap();
    v2["schema_version"] = 2.into();
    v2["settings"]["network_adapters"][0]
        .as_object_mut()
        .unwrap()
        .remove("switch")
        .unwrap();
    let v2 = serde_json::to_string_pretty(&v2).unwrap();
    assert!(!v2.contains("switch"), "{v2}");
    std::fs::write(&path, v2).unwrap();
    let loaded = file::load(&path).unwrap();
    assert_eq!(loaded.network_adapters[0].switch, None);
    assert_eq!(loaded.network_adapters[0].mac, "52:54:00:12:34:56");
}

#[test]
fn adapter_guards_round_trip_and_schema_3_files_read_with_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.json");
    let mut s = vm(2);
    s.network_adapters = vec![NetworkAdapter {
        id: Some(Uuid::new_v4()),
        kind: AdapterKind::Synthetic,
        mac: "52:54:00:12:34:56".into(),
        pci_slot: Some(16),
        switch: None,
        mac_address_spoofing: true,
        dhcp_guard: true,
        router_guard: true,
        maximum_bandwidth: Some(100_000_000),
        vlan_mode: Default::default(),
        vlan_id: None,
        vlan_allowed: Vec::new(),
        vlan_native: None,
        port_mirroring: Default::default(),
    }];
    file::save(&path, &s).unwrap();
    assert_eq!(file::load(&path).unwrap(), s);
    // A schema 3 file has none of them: spoofing off, guards off, unlimited.
    let mut v3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v3["schema_version"] = 3.into();
    let a = v3["settings"]["network_adapters"][0]
        .as_object_mut()
        .unwrap();
    for k in [
        "mac_address_spoofing",
        "dhcp_guard",
        "router_guard",
        "maximum_bandwidth",
    ] {
        a.remove(k).unwrap();
    }
    std::fs::write(&path, serde_json::to_string(&v3).unwrap()).unwrap();
    let a = &file::load(&path).unwrap().network_adapters[0];
    assert_eq!(
        (
            a.mac_address_spoofing,
            a.dhcp_guard,
            a.router_guard,
            a.maximum_bandwidth
        ),
        (false, false, false, None)
    );
}

#[test]
fn maximum_bandwidth_outside_its_range_is_rejected_naming_the_adapter() {
    let mut s = vm(2);
    for (bw, ok) in [
        (0, false),
        (7_999, false),
        (8_000, true),
        (1_000_000_000_001, false),
    ] {
        s.network_adapters = vec![NetworkAdapter {
            id: None,
            kind: AdapterKind::Synthetic,
            mac: "52:54:00:12:34:56".into(),
            pci_slot: None,
            switch: None,
            mac_address_spoofing: false,
            dhcp_guard: false,
            router_guard: false,
            maximum_bandwidth: Some(bw),
            vlan_mode: Default::default(),
            vlan_id: None,
            vlan_allowed: Vec::new(),
            vlan_native: None,
            port_mirroring: Default::default(),
        }];
        match check(&s) {
            Ok(()) => assert!(ok, "{bw} accepted"),
            Err(e) => {
                assert!(!ok, "{bw}: {e}");
                assert!(
                    e.to_string().contains("52:54:00:12:34:56") && e.to_string().contains("bits/s"),
                    "{e}"
                );
            }
        }
    }
}

fn vlan_adapter(mode: VlanMode) -> NetworkAdapter {
    NetworkAdapter {
        id: None,
        kind: AdapterKind::Synthetic,
        mac: "52:54:00:12:34:56".into(),
        pci_slot: None,
        switch: None,
        mac_address_spoofing: false,
        dhcp_guard: false,
        router_guard: false,
        maximum_bandwidth: None,
        vlan_mode: mode,
        vlan_id: None,
        vlan_allowed: Vec::new(),
        vlan_native: None,
        port_mirroring: Default::default(),
    }
}

#[test]
fn vlan_settings_round_trip_and_schema_4_files_load_untagged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.json");
    let mut s = vm(2);
    let mut access = vlan_adapter(VlanMode::Access);
    access.vlan_id = Some(10);
    let mut trunk = vlan_adapter(VlanMode::Trunk);
    trunk.mac = "52:54:00:12:34:57".into();
    trunk.vlan_allowed = VlanRange::parse_list("10,20-30").unwrap();
    trunk.vlan_native = Some(1);
    s.network_adapters = vec![access, trunk];
    validate(&s, &HostLimits::default()).unwrap();
    file::save(&path, &s).unwrap();
    assert_eq!(file::load(&path).unwrap(), s);
    assert_eq!(s.network_adapters[0].vlan_text(), "access 10");
    assert_eq!(s.network_adapters[1].vlan_text(), "trunk 10,20-30 native 1");
    // A schema 4 file has no VLAN fields: its adapters are untagged.
    let mut v4: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v4["schema_version"] = 4.into();
    for a in v4["settings"]["network_adapters"].as_array_mut().unwrap() {
        let a = a.as_object_mut().unwrap();
        for k in ["vlan_mode", "vlan_id", "vlan_allowed", "vlan_native"] {
            a.remove(k);
        }
    }
    std::fs::write(&path, serde_json::to_string(&v4).unwrap()).unwrap();
    let loaded = file::load(&path).unwrap();
    for a in &loaded.network_adapters {
        assert_eq!(a.vlan_mode, VlanMode::Untagged);
        assert_eq!(a.vlan_text(), "untagged");
    }
}

#[test]
fn vlan_settings_out_of_range_or_of_the_wrong_mode_are_refused_by_name() {
    let check = |a: NetworkAdapter| {
        let mut s = vm(2);
        s.network_adapters = vec![a];
        validate(&s, &HostLimits::default())
    };
    let mut a = vlan_adapter(VlanMode::Access);
    for (id, ok) in [(0, false), (1, true), (4094, true), (4095, false)] {
        a.vlan_id = Some(id);
        let r = check(a.clone());
        assert_eq!(r.is_ok(), ok, "{id}: {r:?}");
        if let Err(e) = r {
            assert!(matches!(e, ConfigError::VlanIdInvalid { given, .. } if given == id));
            assert!(e.to_string().contains("1 to 4094"), "{e}");
        }
    }
    a.vlan_id = None;
    assert!(matches!(
        check(a.clone()),
        Err(ConfigError::VlanIdMissing { .. })
    ));
    a.vlan_id = Some(10);
    a.vlan_allowed = VlanRange::parse_list("20").unwrap();
    let e = check(a.clone()).unwrap_err();
    assert!(
        matches!(
            e,
            ConfigError::VlanFieldForMode {
                mode: "access",
                field: "allowed VLANs",
                ..
            }
        ),
        "{e:?}"
    );
    let mut t = vlan_adapter(VlanMode::Trunk);
    assert!(matches!(
        check(t.clone()),
        Err(ConfigError::VlanAllowedMissing { .. })
    ));
    t.vlan_allowed = VlanRange::parse_list("30-20").unwrap();
    assert!(matches!(
        check(t.clone()),
        Err(ConfigError::VlanRangeReversed {
            first: 30,
            last: 20,
            ..
        })
    ));
    t.vlan_allowed = VlanRange::parse_list("10,4000-4095").unwrap();
    assert!(matches!(
        check(t.clone()),
        Err(ConfigError::VlanIdInvalid { given: 4095, .. })
    ));
    t.vlan_allowed = VlanRange::parse_list("10").unwrap();
    t.vlan_id = Some(10);
    assert!(matches!(
        check(t.clone()),
        Err(ConfigError::VlanFieldForMode { mode: "trunk", .. })
    ));
    let mut u = vlan_adapter(VlanMode::Untagged);
    u.vlan_native = Some(3);
    assert!(matches!(
        check(u),
        Err(ConfigError::VlanFieldForMode {
            mode: "untagged",
            ..
        })
    ));
    assert!(VlanRange::parse_list("10,x").unwrap_err().contains("\"x\""));
    assert!(VlanRange::parse_list("").is_err());
}
