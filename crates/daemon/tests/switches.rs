//! Virtual switches end to end. Every daemon here runs in a network namespace of
//! its own (`Daemon::start_in_netns`): its bridges and taps, its workers and QEMU
//! live there and go with it; the host's interfaces are never touched.

mod common;

use std::time::Duration;

use common::guest::{
    act, ensure_worker_binary, guest_dir, scripted_vm, wait_console, wait_for, KillWorkersOnDrop,
};
use common::{wait_job, Daemon};
use serde_json::{json, Value};

/// The namespace's links and addresses, as `ip` shows them (the ifindex-free part).
fn host_net(d: &Daemon) -> String {
    let (ok, links) = d.in_netns("ip", &["-o", "link", "show"]);
    assert!(ok, "{links}");
    let (ok, addrs) = d.in_netns("ip", &["-o", "addr", "show"]);
    assert!(ok, "{addrs}");
    let mut lines: Vec<String> = links
        .lines()
        .chain(addrs.lines())
        .map(|l| l.split_once(": ").map_or(l, |x| x.1).to_string())
        // The kernel's link-local addresses and their lifetimes are not ours.
        .map(|l| l.split(" valid_lft").next().unwrap_or("").to_string())
        .collect();
    lines.sort();
    lines.join("\n")
}

fn switch_files(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.data.join("switches"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn switches_are_bridges_with_their_addresses_and_bad_input_changes_nothing() {
    let mut d = Daemon::start_in_netns(&[]);
    let r = d.post(
        "/v1/switches",
        json!({"name": "lan", "type": "internal", "host_addresses": ["10.44.0.1/24", "fd00:44::1/64"]}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let lan = r.body.clone();
    let bridge = lan["bridge"].as_str().unwrap().to_string();
    assert!(bridge.starts_with("vsw-"), "{bridge}");
    assert_eq!(lan["present"], true);
    let (_, addrs) = d.in_netns("ip", &["-o", "addr", "show", "dev", &bridge]);
    assert!(addrs.contains("inet 10.44.0.1/24"), "{addrs}");
    assert!(addrs.contains("inet6 fd00:44::1/64"), "{addrs}");
    let r = d.post("/v1/switches", json!({"name": "isolated"}));
    assert_eq!(
        (r.status, r.body["type"].as_str()),
        (201, Some("private")),
        "{}",
        r.raw
    );
    let (_, addrs) = d.in_netns(
        "ip",
        &[
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            r.body["bridge"].as_str().unwrap(),
        ],
    );
    assert!(
        addrs.trim().is_empty(),
        "a private switch's bridge has no host address: {addrs}"
    );

    // Each bad request: its own code and words, and the host and the files as before.
    let before = (host_net(&d), switch_files(&d));
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"name": "lan"}),
            409,
            "AlreadyExists",
            "already exists",
        ),
        (
            json!({"name": "lan2", "type": "internal", "host_addresses": ["10.44.0.7/16"]}),
            409,
            "InUse",
            "overlaps 10.44.0.0/24 of the switch lan",
        ),
        (
            json!({"name": "lan3", "type": "internal", "host_addresses": ["fd00:44::9/48"]}),
            409,
            "InUse",
            "overlaps fd00:44::/64",
        ),
        (
            json!({"name": "lan4", "type": "internal", "host_addresses": ["10.45.0.300/24"]}),
            422,
            "InvalidParameter",
            "is not an address with a prefix length",
        ),
        (
            json!({"name": "lan5", "type": "internal", "host_addresses": ["10.45.0.0/24"]}),
            422,
            "InvalidParameter",
            "network address",
        ),
        (
            json!({"name": "lan6", "host_addresses": ["10.46.0.1/24"]}),
            422,
            "InvalidParameter",
            "private switch",
        ),
        (
            json!({"name": "6f1c1d4e-0000-4000-8000-000000000001"}),
            422,
            "InvalidParameter",
            "the switch name",
        ),
        (
            json!({"name": "a/b"}),
            422,
            "InvalidParameter",
            "switch name",
        ),
        (
            json!({"name": "x", "type": "nat"}),
            422,
            "InvalidParameter",
            "needs an IPv4 host address",
        ),
        (
            json!({"name": "x", "type": "external"}),
            422,
            "InvalidParameter",
            "needs the host interface",
        ),
    ];
    for (body, status, code, words) in cases {
        let r = d.post("/v1/switches", body.clone());
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.raw);
        assert!(
            r.body["message"].as_str().unwrap_or("").contains(words),
            "{body}: {}",
            r.raw
        );
        assert_eq!(
            (host_net(&d), switch_files(&d)),
            before,
            "{body} changed the host or the files"
        );
    }
    let r = d.req(
        "PATCH",
        "/v1/switches/lan",
        Some(&json!({"host_addresses": ["10.44.0.1/24", "10.44.0.2/24"]}).to_string()),
    );
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    assert_eq!((host_net(&d), switch_files(&d)), before);

    // Changes: rename (found by the new name and by id), new addresses.
    let id = lan["id"].as_str().unwrap();
    let r = d.req(
        "PATCH",
        &format!("/v1/switches/{id}"),
        Some(&json!({"name": "lab", "host_addresses": ["10.47.0.1/24"]}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(d.get("/v1/switches/lab").body["id"], lan["id"]);
    let (_, addrs) = d.in_netns("ip", &["-o", "addr", "show", "dev", &bridge]);
    assert!(
        addrs.contains("inet 10.47.0.1/24")
            && !addrs.contains("10.44.0.1")
            && !addrs.contains("fd00:44::1"),
        "{addrs}"
    );

    // An adapter on it: delete is InUse, naming the VM; force disconnects it.
    d.create_vm("web");
    let r = d.post("/v1/vms/web/network-adapters", json!({"switch": "lab"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.body["switch"], lan["id"]);
    let mac = r.body["mac"].as_str().unwrap().to_string();
    // A switch the body names that does not exist makes the request invalid.
    let r = d.post("/v1/vms/web/network-adapters", json!({"switch": "nowhere"}));
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("\"nowhere\", which does not exist"),
        "{}",
        r.raw
    );
    assert_eq!(
        d.get("/v1/switches/lab").body["adapters"][0]["vm_name"],
        "web"
    );
    let r = d.req("DELETE", "/v1/switches/lab", None);
    assert_eq!((r.status, r.code()), (409, "InUse"), "{}", r.raw);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains(&format!("web ({mac})")),
        "{}",
        r.raw
    );

    // A restart keeps the bridge as it is.
    d.restart();
    let (_, again) = d.in_netns("ip", &["-o", "addr", "show", "dev", &bridge]);
    assert!(again.contains("inet 10.47.0.1/24"), "{again}");
    // A reboot: a new namespace has no bridges; the daemon makes them again.
    d.stop();
    d.reboot_netns();
    let (_, links) = d.in_netns("ip", &["-o", "link", "show"]);
    assert!(!links.contains("vsw"), "{links}");
    d.launch();
    let (_, addrs) = d.in_netns("ip", &["-o", "addr", "show", "dev", &bridge]);
    assert!(
        addrs.contains("inet 10.47.0.1/24"),
        "the bridge was not rebuilt: {addrs}\n{}",
        d.log()
    );
    let list = d.get("/v1/switches").body;
    let names: Vec<&str> = list["switches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["isolated", "lab"]);

    let r = d.req("DELETE", "/v1/switches/lab?force=true", None);
    assert_eq!(r.status, 204, "{}", r.raw);
    let adapters = d.get("/v1/vms/web/network-adapters").body;
    assert!(
        adapters["network_adapters"][0].get("switch").is_none(),
        "{adapters}"
    );
    let r = d.req("DELETE", "/v1/switches/isolated", None);
    assert_eq!(r.status, 204, "{}", r.raw);
    assert_eq!(d.get("/v1/switches/lab").status, 404);
    let (_, links) = d.in_netns("ip", &["-o", "link", "show"]);
    assert!(
        !links.contains("vsw"),
        "a deleted switch's bridge is left: {links}"
    );
    assert!(switch_files(&d).is_empty());
}

/// The guest's script: bring up eth0 with `addr`, say so, then try each of
/// `peers` over and over, saying for each try whether it answered.
fn pinging_guest(addrs: &[&str], peers: &[&str]) -> String {
    let mut s = String::from("ip link set lo up\nip link set eth0 up\n");
    for a in addrs {
        let six = if a.contains(':') { "-6 " } else { "" };
        s.push_str(&format!("ip {six}addr add {a} dev eth0\n"));
    }
    s.push_str("echo \"VIRIDIAN-GUEST: net up\"\nn=0\nwhile true; do\n  n=$((n+1))\n");
    for p in peers {
        s.push_str(&format!(
            "  if ping -c1 -W1 {p} >/dev/null 2>&1; then echo \"VIRIDIAN-GUEST: reached {p} $n\"; else echo \"VIRIDIAN-GUEST: missed {p} $n\"; fi\n"
        ));
    }
    // The link as the guest sees it: each change of eth0's carrier count, once.
    s.push_str("  c=$(cat /sys/class/net/eth0/carrier_changes)\n  if [ \"$c\" != \"$lc\" ]; then echo \"VIRIDIAN-GUEST: carrier changes $c\"; lc=$c; fi\n");
    s.push_str("  sleep 0.2\ndone\n");
    s
}

/// The guest's last reported count of its link's carrier changes.
fn carrier_changes(console: &str) -> u64 {
    console
        .rsplit("VIRIDIAN-GUEST: carrier changes ")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How many times the console says `what` about `peer` (`reached`, `missed`).
fn tries(console: &str, what: &str, peer: &str) -> usize {
    let needle = format!("VIRIDIAN-GUEST: {what} {peer} ");
    console.matches(&needle).count()
}

fn console_of(d: &Daemon, name: &str) -> String {
    common::guest::console(d, name)
}

#[test]
fn guests_reach_each_other_on_their_switch_only_and_the_host_on_an_internal_one() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start_in_netns(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    for (name, kind, addrs) in [
        ("blue", "private", json!([])),
        ("red", "private", json!([])),
        (
            "inside",
            "internal",
            json!(["10.45.0.1/24", "fd00:45::1/64"]),
        ),
    ] {
        let r = d.post(
            "/v1/switches",
            json!({"name": name, "type": kind, "host_addresses": addrs}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    // a, b on blue; c alone on red (same subnet: only the switch keeps them
    // apart); h on the internal switch with the host.
    let vms: [(&str, &str, Vec<&str>, Vec<&str>); 4] = [
        (
            "a",
            "blue",
            vec!["10.0.0.1/24"],
            vec!["10.0.0.2", "10.0.0.3"],
        ),
        ("b", "blue", vec!["10.0.0.2/24"], vec!["10.0.0.1"]),
        (
            "c",
            "red",
            vec!["10.0.0.3/24"],
            vec!["10.0.0.1", "10.0.0.2"],
        ),
        (
            "h",
            "inside",
            vec!["10.45.0.2/24", "fd00:45::2/64"],
            vec!["10.45.0.1", "fd00:45::1"],
        ),
    ];
    for (name, switch, addrs, peers) in &vms {
        scripted_vm(&d, &guest, name, &pinging_guest(addrs, peers));
        let r = d.post(
            &format!("/v1/vms/{name}/network-adapters"),
            json!({"switch": switch}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
    }
    // h has a second adapter on no switch: no port, nothing on the host for it.
    let r = d.post("/v1/vms/h/network-adapters", json!({}));
    assert_eq!(r.status, 201, "{}", r.raw);
    let loose = r.body["mac"].as_str().unwrap().to_string();
    // c also has an adapter whose switch is not on this host (as after an import):
    // it starts anyway, with that adapter disconnected, and says so.
    let mut settings = d.get("/v1/vms/c").body["settings"].clone();
    settings["network_adapters"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kind": "synthetic", "mac": "52:54:00:0c:0c:0c", "switch": "gone"}));
    let r = d.req("PUT", "/v1/vms/c/settings", Some(&settings.to_string()));
    assert_eq!(r.status, 200, "{}", r.raw);

    let mut jobs = Vec::new();
    for (name, ..) in &vms {
        let r = d.post(&format!("/v1/vms/{name}/start"), json!({}));
        assert_eq!(r.status, 202, "{}", r.raw);
        jobs.push((name.to_string(), r.body["id"].as_str().unwrap().to_string()));
    }
    for (name, id) in &jobs {
        let job = wait_job(&d, id);
        assert_eq!(
            job["state"],
            "Completed",
            "start {name}: {job}\n{}",
            d.log()
        );
        let disconnected: Vec<&Value> = job["affected_elements"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "disconnected-network-adapter")
            .collect();
        if name == "c" {
            assert_eq!(disconnected.len(), 1, "{job}");
            assert_eq!(disconnected[0]["id"], "52:54:00:0c:0c:0c");
            assert!(
                job["description"]
                    .as_str()
                    .unwrap()
                    .contains("\"gone\" does not exist"),
                "{job}"
            );
        } else {
            assert!(disconnected.is_empty(), "{job}");
        }
    }
    let rt = &d.get("/v1/vms/c").body["runtime"];
    let nics = rt["network_adapters"].as_array().unwrap();
    assert_eq!(nics.len(), 2, "{rt}");
    assert_eq!(
        (nics[0]["connected"].as_bool(), nics[0]["switch"].as_str()),
        (Some(true), Some("red")),
        "{rt}"
    );
    assert_eq!(nics[0]["data_path"], "userspace", "{rt}");
    assert_eq!(nics[1]["connected"], false, "{rt}");
    assert!(nics[1].get("switch").is_some(), "{rt}");
    assert!(
        nics[1]["reason"]
            .as_str()
            .unwrap()
            .contains("\"gone\" does not exist"),
        "{rt}"
    );
    // The ports: a tap per adapter, each connected one on its switch's bridge,
    // the disconnected one on none (it can be connected while the VM runs).
    let (_, links) = d.in_netns("ip", &["-o", "link", "show"]);
    let taps: Vec<&str> = links.lines().filter(|l| l.contains("vswt-")).collect();
    assert_eq!(taps.len(), 5, "{links}");
    assert_eq!(
        taps.iter().filter(|l| l.contains("master vsw-")).count(),
        4,
        "{links}"
    );

    for (name, ..) in &vms {
        wait_console(&d, name, "VIRIDIAN-GUEST: net up");
    }
    // Same switch: a and b reach each other.
    wait_for("a to reach b", Duration::from_secs(120), || {
        tries(&console_of(&d, "a"), "reached", "10.0.0.2") > 0
    });
    wait_for("b to reach a", Duration::from_secs(60), || {
        tries(&console_of(&d, "b"), "reached", "10.0.0.1") > 0
    });
    // Another switch: c, up and trying, reaches neither, and neither reaches c.
    let (a0, c0) = (
        tries(&console_of(&d, "a"), "missed", "10.0.0.3"),
        tries(&console_of(&d, "c"), "missed", "10.0.0.1"),
    );
    wait_for(
        "more tries between the switches",
        Duration::from_secs(120),
        || {
            tries(&console_of(&d, "a"), "missed", "10.0.0.3") >= a0 + 3
                && tries(&console_of(&d, "c"), "missed", "10.0.0.2") >= c0 + 3
        },
    );
    let (ca, cc) = (console_of(&d, "a"), console_of(&d, "c"));
    assert_eq!(
        tries(&ca, "reached", "10.0.0.3"),
        0,
        "a reached c across switches:\n{ca}"
    );
    assert_eq!(
        tries(&cc, "reached", "10.0.0.1") + tries(&cc, "reached", "10.0.0.2"),
        0,
        "c reached blue:\n{cc}"
    );

    // Internal switch: the guest reaches the host, IPv4 and IPv6, and the host the guest.
    wait_for("h to reach the host", Duration::from_secs(120), || {
        let c = console_of(&d, "h");
        tries(&c, "reached", "10.45.0.1") > 0 && tries(&c, "reached", "fd00:45::1") > 0
    });
    for addr in ["10.45.0.2", "fd00:45::2"] {
        wait_for(
            &format!("the host to reach {addr}"),
            Duration::from_secs(60),
            || d.in_netns("busybox", &["ping", "-c1", "-W2", addr]).0,
        );
    }
    // The host is not on the private switches.
    let (reached, out) = d.in_netns("busybox", &["ping", "-c2", "-W1", "10.0.0.1"]);
    assert!(!reached, "the host reached a VM on a private switch: {out}");

    // The daemon restarts while a and b ping each other: their workers, taps and
    // bridge stay, and not one ping is missed.
    let before = console_of(&d, "a");
    let (reached, missed) = (
        tries(&before, "reached", "10.0.0.2"),
        tries(&before, "missed", "10.0.0.2"),
    );
    d.restart();
    wait_for("a to go on reaching b", Duration::from_secs(60), || {
        tries(&console_of(&d, "a"), "reached", "10.0.0.2") >= reached + 5
    });
    let after = console_of(&d, "a");
    assert_eq!(
        tries(&after, "missed", "10.0.0.2"),
        missed,
        "pings were lost over the restart:\n{after}"
    );
    let rt = &d.get("/v1/vms/a").body["runtime"];
    assert_eq!(rt["state"], "Running", "{rt}");
    assert_eq!(rt["network_adapters"][0]["connected"], true, "{rt}");
    assert!(
        rt["network_adapters"][0]["tap"]
            .as_str()
            .unwrap()
            .starts_with("vswt-"),
        "{rt}"
    );

    // An adapter that named no switch at its start has no port to move.
    let r = d.post(
        &format!("/v1/vms/h/network-adapters/{loose}/connect"),
        json!({"switch": "blue"}),
    );
    assert_eq!((r.status, r.code()), (409, "InvalidState"), "{}", r.raw);
    assert!(
        r.body["message"].as_str().unwrap().contains("restart"),
        "{}",
        r.raw
    );
    let h = d.get("/v1/vms/h").body;
    assert!(
        h["settings"]["network_adapters"][1].get("switch").is_none(),
        "{h}"
    );
    assert_eq!(
        h["runtime"]["network_adapters"][1]["connected"], false,
        "{h}"
    );

    // A running VM's adapter moves to another switch: c joins blue and reaches a.
    let cmac = d.get("/v1/vms/c").body["settings"]["network_adapters"][0]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let blue = d.get("/v1/switches/blue").body["id"].clone();
    let carrier_before = carrier_changes(&console_of(&d, "c"));
    let r = d.post(
        &format!("/v1/vms/c/network-adapters/{cmac}/connect"),
        json!({"switch": "blue"}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["switch"], blue);
    wait_for("c to reach a on blue", Duration::from_secs(60), || {
        tries(&console_of(&d, "c"), "reached", "10.0.0.1") > 0
    });
    let rt = &d.get("/v1/vms/c").body["runtime"];
    assert_eq!(rt["network_adapters"][0]["switch"], "blue", "{rt}");
    // The guest saw its link go down and up (so a DHCP client asks again).
    wait_for(
        "c to see its link go down and up",
        Duration::from_secs(30),
        || carrier_changes(&console_of(&d, "c")) >= carrier_before + 2,
    );
    // Disconnected while running: it reaches no one any more.
    let r = d.post(
        &format!("/v1/vms/c/network-adapters/{cmac}/disconnect"),
        json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(r.body.get("switch").is_none(), "{}", r.raw);
    std::thread::sleep(Duration::from_secs(3)); // a try in flight may still answer
    let now = console_of(&d, "c");
    let (reached, missed) = (
        tries(&now, "reached", "10.0.0.1"),
        tries(&now, "missed", "10.0.0.1"),
    );
    wait_for("c to try a again", Duration::from_secs(60), || {
        tries(&console_of(&d, "c"), "missed", "10.0.0.1") >= missed + 3
    });
    let now = console_of(&d, "c");
    assert_eq!(
        tries(&now, "reached", "10.0.0.1"),
        reached,
        "c reached a after its disconnect:\n{now}"
    );
    assert_eq!(
        d.get("/v1/vms/c").body["runtime"]["network_adapters"][0]["connected"],
        false
    );

    // Stopped VMs' taps go; the bridges stay.
    for (name, ..) in &vms {
        let job = act(&d, name, "stop");
        assert_eq!(job["state"], "Completed", "{job}");
    }
    wait_for("the taps to go", Duration::from_secs(30), || {
        !d.in_netns("ip", &["-o", "link", "show"])
            .1
            .contains("vswt-")
    });
    let (_, links) = d.in_netns("ip", &["-o", "link", "show"]);
    assert_eq!(links.matches("vsw-").count(), 3, "{links}");
}

/// `nic add` takes the guards and the bandwidth limit that `PATCH` changes; an
/// impossible limit adds nothing.
#[test]
fn an_adapter_is_added_with_its_guards_and_bandwidth() {
    let d = Daemon::start_in_netns(&[]);
    d.create_vm("g");
    let r = d.post(
        "/v1/vms/g/network-adapters",
        json!({"mac_address_spoofing": true, "dhcp_guard": true, "router_guard": true, "maximum_bandwidth": 50_000_000u64}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(
        (
            &r.body["mac_address_spoofing"],
            &r.body["dhcp_guard"],
            &r.body["router_guard"],
            &r.body["maximum_bandwidth"]
        ),
        (
            &json!(true),
            &json!(true),
            &json!(true),
            &json!(50_000_000u64)
        ),
        "{}",
        r.raw
    );
    let r = d.post("/v1/vms/g/network-adapters", json!({}));
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.body["dhcp_guard"], false, "off unless given: {}", r.raw);
    assert!(r.body["maximum_bandwidth"].is_null(), "{}", r.raw);
    let before = d.get("/v1/vms/g/network-adapters").body;
    let r = d.post(
        "/v1/vms/g/network-adapters",
        json!({"maximum_bandwidth": 10}),
    );
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    assert!(r.raw.contains("maximum bandwidth"), "{}", r.raw);
    assert_eq!(d.get("/v1/vms/g/network-adapters").body, before);
}
