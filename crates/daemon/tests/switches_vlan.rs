//! Adapters' VLANs on a switch, end to end, with the daemon in a network
//! namespace of its own (`Daemon::start_in_netns`): the host's links are never
//! touched. This kernel has no bridge VLAN filtering, so access VLANs are kept
//! apart by one bridge per VLAN and trunks are refused.

mod common;

use std::time::Duration;

use common::guest::{
    ensure_worker_binary, guest_dir, scripted_vm, wait_console, wait_for, KillWorkersOnDrop,
};
use common::{wait_job, Daemon};
use serde_json::{json, Value};

/// The namespace's links, names and masters only (sorted).
fn links(d: &Daemon) -> Vec<String> {
    let (ok, out) = d.in_netns("ip", &["-o", "link", "show"]);
    assert!(ok, "{out}");
    let mut v: Vec<String> = out
        .lines()
        .map(|l| {
            let name = l.split(": ").nth(1).unwrap_or("").to_string();
            let master = l
                .split(" master ")
                .nth(1)
                .and_then(|m| m.split_whitespace().next())
                .map_or(String::new(), |m| format!(" master {m}"));
            format!("{name}{master}")
        })
        .collect();
    v.sort();
    v
}

fn vlan_bridges(d: &Daemon) -> Vec<String> {
    links(d)
        .into_iter()
        .filter(|l| l.starts_with("vswv"))
        .collect()
}

fn pinging_guest(addr: &str, peers: &[&str]) -> String {
    let mut s = format!(
        "ip link set lo up\nip link set eth0 up\nip addr add {addr} dev eth0\necho \"VIRIDIAN-GUEST: net up\"\nn=0\nwhile true; do\n  n=$((n+1))\n"
    );
    for p in peers {
        s.push_str(&format!(
            "  if ping -c1 -W1 {p} >/dev/null 2>&1; then echo \"VIRIDIAN-GUEST: reached {p} $n\"; else echo \"VIRIDIAN-GUEST: missed {p} $n\"; fi\n"
        ));
    }
    s.push_str("  sleep 0.2\ndone\n");
    s
}

fn tries(console: &str, what: &str, peer: &str) -> usize {
    console
        .matches(&format!("VIRIDIAN-GUEST: {what} {peer} "))
        .count()
}

fn console_of(d: &Daemon, name: &str) -> String {
    common::guest::console(d, name)
}

fn patch(d: &Daemon, vm: &str, mac: &str, body: Value) -> common::Reply {
    d.req(
        "PATCH",
        &format!("/v1/vms/{vm}/network-adapters/{mac}"),
        Some(&body.to_string()),
    )
}

fn adapter(d: &Daemon, vm: &str) -> Value {
    d.get(&format!("/v1/vms/{vm}")).body["settings"]["network_adapters"][0].clone()
}

#[test]
fn vlan_settings_are_checked_reported_and_trunks_refused_without_filtering() {
    let d = Daemon::start_in_netns(&[]);
    let host = d.get("/v1/host").body;
    let vlan = &host["network"]["vlan"];
    assert_eq!(vlan["bridge_vlan_filtering"], false, "{vlan}");
    assert!(
        vlan["bridge_vlan_filtering_reason"]
            .as_str()
            .unwrap()
            .contains("CONFIG_BRIDGE_VLAN_FILTERING"),
        "{vlan}"
    );
    assert!(
        vlan["trunk"].as_str().unwrap().starts_with("refused"),
        "{vlan}"
    );
    let r = d.post("/v1/switches", json!({"name": "lan", "type": "private"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    let r = d.post(
        "/v1/vms",
        json!({"name": "v", "generation": 1, "processor_count": 1, "memory_mib": 64}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let r = d.post(
        "/v1/vms/v/network-adapters",
        json!({"switch": "lan", "vlan_id": 10}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(
        (r.body["vlan_mode"].as_str(), r.body["vlan_id"].as_u64()),
        (Some("access"), Some(10))
    );
    let mac = r.body["mac"].as_str().unwrap().to_string();
    let before = (adapter(&d, "v"), links(&d));
    // Bad ids and fields of another mode: specific 422s, nothing changed.
    for (body, says) in [
        (json!({"vlan_id": 0}), "out of range"),
        (json!({"vlan_id": 4095}), "1 to 4094"),
        (
            json!({"vlan_allowed": [{"first": 20}]}),
            "access mode, which has no allowed VLANs",
        ),
        (
            json!({"vlan_native": 3}),
            "access mode, which has no native VLAN",
        ),
        (
            json!({"vlan_mode": "trunk", "vlan_allowed": [{"first": 30, "last": 20}]}),
            "backwards",
        ),
        (json!({"vlan_mode": "trunk"}), "allows no VLAN"),
    ] {
        let r = patch(&d, "v", &mac, body.clone());
        assert!(r.status == 422 || r.status == 400, "{body}: {}", r.raw);
        assert!(r.raw.contains(says), "{body}: {}", r.raw);
        assert_eq!(
            (adapter(&d, "v"), links(&d)),
            before,
            "{body} changed something"
        );
    }
    let r = d.post("/v1/vms/v/network-adapters", json!({"vlan_mode": "access"}));
    assert_eq!(r.status, 422, "{}", r.raw);
    assert!(r.raw.contains("has no VLAN id"), "{}", r.raw);
    assert_eq!((adapter(&d, "v"), links(&d)), before);
    // A trunk on a switch: refused naming the kernel feature, nothing changed.
    let r = patch(
        &d,
        "v",
        &mac,
        json!({"vlan_mode": "trunk", "vlan_allowed": [{"first": 10}, {"first": 20, "last": 30}], "vlan_native": 1}),
    );
    assert_eq!(r.status, 422, "{}", r.raw);
    assert_eq!(r.body["code"], "InvalidParameter", "{}", r.raw);
    assert!(r.raw.contains("CONFIG_BRIDGE_VLAN_FILTERING"), "{}", r.raw);
    assert_eq!((adapter(&d, "v"), links(&d)), before);
    // On no switch an adapter may hold a trunk; connecting it is refused.
    let r = d.post(
        &format!("/v1/vms/v/network-adapters/{mac}/disconnect"),
        json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    let r = patch(
        &d,
        "v",
        &mac,
        json!({"vlan_mode": "trunk", "vlan_allowed": [{"first": 10}]}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["vlan_mode"], "trunk");
    assert!(r.body.get("vlan_id").is_none(), "{}", r.raw);
    let held = adapter(&d, "v");
    let r = d.post(
        &format!("/v1/vms/v/network-adapters/{mac}/connect"),
        json!({"switch": "lan"}),
    );
    assert_eq!(r.status, 422, "{}", r.raw);
    assert!(r.raw.contains("CONFIG_BRIDGE_VLAN_FILTERING"), "{}", r.raw);
    assert_eq!(adapter(&d, "v"), held);
    let r = d.post(
        "/v1/vms/v/network-adapters",
        json!({"switch": "lan", "vlan_mode": "trunk", "vlan_allowed": [{"first": 5}]}),
    );
    assert_eq!(r.status, 422, "{}", r.raw);
    // Untagged again: the trunk's fields go with the mode.
    let r = patch(&d, "v", &mac, json!({"vlan_mode": "untagged"}));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(r.body.get("vlan_allowed").is_none(), "{}", r.raw);
    assert!(vlan_bridges(&d).is_empty(), "{:?}", links(&d));
}

#[test]
fn guests_on_one_vlan_reach_each_other_only_and_a_running_guest_moves_between_vlans() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start_in_netns(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let r = d.post("/v1/switches", json!({"name": "lan", "type": "private"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    let switch_id = r.body["id"].as_str().unwrap().to_string();
    let bridge = format!("vsw-{}", &switch_id[..8]);
    let vlan_bridge = |vlan: u16| format!("vswv{}{vlan:03x}", &switch_id[..8]);
    // a, b on VLAN 10; c on VLAN 20; one subnet, so only the VLANs keep them apart.
    let vms = [
        ("a", 10, "10.0.0.1/24", vec!["10.0.0.2", "10.0.0.3"]),
        ("b", 10, "10.0.0.2/24", vec!["10.0.0.1", "10.0.0.3"]),
        ("c", 20, "10.0.0.3/24", vec!["10.0.0.1", "10.0.0.2"]),
    ];
    let mut macs = Vec::new();
    for (name, vlan, addr, peers) in &vms {
        scripted_vm(&d, &guest, name, &pinging_guest(addr, peers));
        let r = d.post(
            &format!("/v1/vms/{name}/network-adapters"),
            json!({"switch": "lan", "vlan_id": vlan}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
        macs.push(r.body["mac"].as_str().unwrap().to_string());
    }
    // Nothing is made for a VLAN before its first port arrives.
    assert!(vlan_bridges(&d).is_empty(), "{:?}", links(&d));
    let jobs: Vec<(String, String)> = vms
        .iter()
        .map(|(name, ..)| {
            let r = d.post(&format!("/v1/vms/{name}/start"), json!({}));
            assert_eq!(r.status, 202, "{}", r.raw);
            (name.to_string(), r.body["id"].as_str().unwrap().to_string())
        })
        .collect();
    for (name, id) in &jobs {
        let job = wait_job(&d, id);
        assert_eq!(
            job["state"],
            "Completed",
            "start {name}: {job}\n{}",
            d.log()
        );
    }
    // One bridge per VLAN in use, the taps on them, none on the switch's own.
    assert_eq!(
        vlan_bridges(&d),
        [vlan_bridge(10), vlan_bridge(20)],
        "{:?}",
        links(&d)
    );
    let l = links(&d);
    let on = |b: &str| {
        l.iter()
            .filter(|x| x.ends_with(&format!(" master {b}")))
            .count()
    };
    assert_eq!(
        (on(&vlan_bridge(10)), on(&vlan_bridge(20)), on(&bridge)),
        (2, 1, 0),
        "{l:?}"
    );
    assert_eq!(
        (
            adapter(&d, "c")["vlan_mode"].as_str(),
            adapter(&d, "c")["vlan_id"].as_u64()
        ),
        (Some("access"), Some(20))
    );

    for (name, ..) in &vms {
        wait_console(&d, name, "VIRIDIAN-GUEST: net up");
    }
    wait_for("a to reach b", Duration::from_secs(180), || {
        tries(&console_of(&d, "a"), "reached", "10.0.0.2") > 0
    });
    wait_for("b to reach a", Duration::from_secs(60), || {
        tries(&console_of(&d, "b"), "reached", "10.0.0.1") > 0
    });
    let c0 = tries(&console_of(&d, "c"), "missed", "10.0.0.2");
    let a0 = tries(&console_of(&d, "a"), "missed", "10.0.0.3");
    wait_for(
        "more tries across the VLANs",
        Duration::from_secs(120),
        || {
            tries(&console_of(&d, "c"), "missed", "10.0.0.2") >= c0 + 3
                && tries(&console_of(&d, "a"), "missed", "10.0.0.3") >= a0 + 3
        },
    );
    let (ca, cb, cc) = (
        console_of(&d, "a"),
        console_of(&d, "b"),
        console_of(&d, "c"),
    );
    assert_eq!(
        tries(&ca, "reached", "10.0.0.3") + tries(&cb, "reached", "10.0.0.3"),
        0,
        "a or b reached c:\n{ca}\n{cb}"
    );
    assert_eq!(
        tries(&cc, "reached", "10.0.0.1") + tries(&cc, "reached", "10.0.0.2"),
        0,
        "c reached VLAN 10:\n{cc}"
    );

    // A trunk for running c: refused, naming the kernel feature; nothing moved.
    let before = (adapter(&d, "c"), links(&d));
    let r = patch(
        &d,
        "c",
        &macs[2],
        json!({"vlan_mode": "trunk", "vlan_allowed": [{"first": 10}]}),
    );
    assert_eq!(r.status, 422, "{}", r.raw);
    assert!(r.raw.contains("CONFIG_BRIDGE_VLAN_FILTERING"), "{}", r.raw);
    assert_eq!((adapter(&d, "c"), links(&d)), before);
    let r = patch(&d, "c", &macs[2], json!({"vlan_id": 4095}));
    assert_eq!(r.status, 422, "{}", r.raw);
    assert_eq!((adapter(&d, "c"), links(&d)), before);

    // c moves to VLAN 10 while running: it reaches a, and VLAN 20's bridge goes.
    let r = patch(&d, "c", &macs[2], json!({"vlan_id": 10}));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(adapter(&d, "c")["vlan_id"], 10);
    assert_eq!(vlan_bridges(&d), [vlan_bridge(10)], "{:?}", links(&d));
    // (Before the move c never reached a, checked above; it may have by now.)
    wait_for("c to reach a on VLAN 10", Duration::from_secs(120), || {
        tries(&console_of(&d, "c"), "reached", "10.0.0.1") > 0
    });

    // Stopped, their ports go and with the last one the VLAN's bridge.
    for (name, ..) in &vms {
        let r = d.post(&format!("/v1/vms/{name}/stop"), json!({}));
        assert_eq!(r.status, 202, "{}", r.raw);
        wait_job(&d, r.body["id"].as_str().unwrap());
    }
    wait_for(
        "the ports and VLAN bridges to go",
        Duration::from_secs(20),
        || {
            links(&d)
                .iter()
                .all(|l| !l.starts_with("vswv") && !l.starts_with("vswt"))
        },
    );
    // The switch deleted: nothing of it is left.
    let r = d.req("DELETE", "/v1/switches/lan?force=true", None);
    assert!(r.status == 204 || r.status == 200, "{}", r.raw);
    assert!(
        links(&d).iter().all(|l| !l.starts_with("vsw")),
        "{:?}",
        links(&d)
    );
    let _ = &mut d;
}
