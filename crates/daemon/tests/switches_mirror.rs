//! Port mirroring end to end: guest a pings guest b on a private switch; guest c,
//! a mirroring destination with its interface promiscuous, receives copies of
//! a's frames only while a is a source. The daemon runs in a network namespace
//! of its own.

mod common;

use std::time::{Duration, Instant};

use common::guest::{
    act, ensure_worker_binary, guest_dir, scripted_vm, wait_console, wait_for, KillWorkersOnDrop,
};
use common::Daemon;
use serde_json::{json, Value};

/// Frames the switch passed to `vm`'s adapter so far (its port's counter).
fn received(d: &Daemon, vm: &str) -> u64 {
    let rt = d.get(&format!("/v1/vms/{vm}")).body["runtime"].clone();
    rt["network_adapters"][0]["counters"]["received_packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no counters for {vm}: {rt}"))
}

/// How many frames `vm` receives in `secs` seconds.
fn received_in(d: &Daemon, vm: &str, secs: u64) -> u64 {
    let before = received(d, vm);
    std::thread::sleep(Duration::from_secs(secs));
    received(d, vm) - before
}

/// The last `rx N` guest c printed: what its kernel counted on eth0.
fn guest_rx(d: &Daemon) -> u64 {
    common::guest::console(d, "c")
        .lines()
        .rev()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("VIRIDIAN-GUEST: rx "))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn mirror_tables(d: &Daemon) -> String {
    let (ok, out) = d.in_netns("nft", &["list", "tables", "netdev"]);
    assert!(ok, "{out}");
    out
}

fn patch(d: &Daemon, vm: &str, mac: &str, body: Value) -> common::Reply {
    d.req(
        "PATCH",
        &format!("/v1/vms/{vm}/network-adapters/{mac}"),
        Some(&body.to_string()),
    )
}

#[test]
fn a_destination_receives_a_sources_frames_only_while_it_is_mirrored() {
    ensure_worker_binary();
    let guest = guest_dir();
    let d = Daemon::start_in_netns(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let r = d.post("/v1/switches", json!({"name": "lan"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    let table = format!(
        "viridian-mirror-{}",
        r.body["bridge"]
            .as_str()
            .unwrap()
            .trim_start_matches("vsw-")
    );
    let a = "ip link set lo up\nip link set eth0 up\nip addr add 10.0.0.1/24 dev eth0\n\
        while true; do\n\
          if ping -c1 -W1 10.0.0.2 >/dev/null 2>&1; then echo \"VIRIDIAN-GUEST: reached\"; fi\n\
          sleep 0.2\n\
        done\n";
    let b = "ip link set lo up\nip link set eth0 up\nip addr add 10.0.0.2/24 dev eth0\n\
        echo \"VIRIDIAN-GUEST: net up\"\nwhile true; do sleep 1; done\n";
    // No address: it only listens, promiscuous so its kernel counts every copy.
    let c = "ip link set lo up\nip link set eth0 up\nip link set eth0 promisc on\n\
        echo \"VIRIDIAN-GUEST: net up\"\n\
        while true; do echo \"VIRIDIAN-GUEST: rx $(cat /sys/class/net/eth0/statistics/rx_packets)\"; sleep 0.5; done\n";
    let mut macs = Vec::new();
    for (name, script) in [("a", a), ("b", b), ("c", c)] {
        scripted_vm(&d, &guest, name, script);
        // c is a destination from its start: set while Off, with `nic add`.
        let mirroring = if name == "c" { "destination" } else { "none" };
        let r = d.post(
            &format!("/v1/vms/{name}/network-adapters"),
            json!({"switch": "lan", "port_mirroring": mirroring}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
        assert_eq!(
            r.body["port_mirroring"].as_str().unwrap_or("none"),
            mirroring,
            "{}",
            r.raw
        );
        macs.push(r.body["mac"].as_str().unwrap().to_string());
    }
    let r = patch(&d, "a", &macs[0], json!({"port_mirroring": "everything"}));
    assert_eq!(r.status, 400, "an unknown mode is refused: {}", r.raw);
    for name in ["a", "b", "c"] {
        act(&d, name, "start");
    }
    wait_console(&d, "c", "VIRIDIAN-GUEST: net up");
    wait_for("a to reach b", Duration::from_secs(180), || {
        common::guest::console(&d, "a").contains("VIRIDIAN-GUEST: reached")
    });
    // A destination without a source: no table, nothing copied.
    assert!(!mirror_tables(&d).contains(&table), "{}", mirror_tables(&d));
    let quiet = received_in(&d, "c", 3);

    // a becomes a source while it runs: c gets its pings and b's replies.
    let r = patch(&d, "a", &macs[0], json!({"port_mirroring": "source"}));
    assert_eq!(r.status, 200, "{}\n{}", r.raw, d.log());
    assert_eq!(r.body["port_mirroring"], "source");
    assert!(mirror_tables(&d).contains(&table), "{}", mirror_tables(&d));
    let rx_at = guest_rx(&d);
    let mirrored = received_in(&d, "c", 3);
    assert!(
        mirrored >= quiet + 10,
        "c received {mirrored} frames in 3 s while a was mirrored, {quiet} before"
    );
    // The guest sees them too.
    let deadline = Instant::now() + Duration::from_secs(30);
    while guest_rx(&d) < rx_at + 10 {
        assert!(
            Instant::now() < deadline,
            "guest c counted {} frames, {rx_at} before mirroring",
            guest_rx(&d)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // b is no destination: it gets only what is its own.
    let shown =
        d.get("/v1/vms/a").body["settings"]["network_adapters"][0]["port_mirroring"].clone();
    assert_eq!(shown, "source", "the settings say so");

    // Off again: the table goes, the copies stop.
    let r = patch(&d, "a", &macs[0], json!({"port_mirroring": "none"}));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(!mirror_tables(&d).contains(&table), "{}", mirror_tables(&d));
    let after = received_in(&d, "c", 3);
    assert!(
        after + 10 <= mirrored,
        "c still received {after} frames in 3 s after mirroring stopped ({mirrored} while on)"
    );

    // A source that stops takes its part of the table with it.
    let r = patch(&d, "a", &macs[0], json!({"port_mirroring": "source"}));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(mirror_tables(&d).contains(&table));
    act(&d, "a", "stop");
    wait_for("the mirror table to go", Duration::from_secs(10), || {
        !mirror_tables(&d).contains(&table)
    });
    for name in ["b", "c"] {
        act(&d, name, "stop");
    }
}
