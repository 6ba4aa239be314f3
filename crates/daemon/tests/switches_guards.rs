//! Per-adapter guards and bandwidth (Hyper-V's Set-VMNetworkAdapter) enforced by
//! the host, with two real guests on one internal switch. The daemon runs in a
//! network namespace of its own (`Daemon::start_in_netns`): its nftables table,
//! its qdiscs and links live there; the host's firewall is never touched.

mod common;

use std::time::Duration;

use common::guest::{
    act, ensure_worker_binary, guest_dir, scripted_vm, wait_console, wait_for, KillWorkersOnDrop,
};
use common::{wait_job, Daemon};
use serde_json::{json, Value};

const HOST: &str = "10.50.0.1";
const A: &str = "10.50.0.2";
/// The MAC guest b changes to.
const SPOOFED: &str = "52:54:00:99:99:99";
/// Bytes each timed transfer carries.
const TRANSFER: usize = 2 << 20;
/// The limit the timed transfers run under, bits/s.
const LIMIT: u64 = 1_500_000;

/// Guest a: a rogue DHCP server (busybox udhcpd), a receiver of what the host's
/// TCP 5002 sends (it says how many bytes it got), and a sender of `TRANSFER`
/// bytes to the host's TCP 5001; both tried every second.
fn guest_a() -> String {
    format!(
        r#"ip link set lo up
ip link set eth0 up
ip addr add {A}/24 dev eth0
printf 'start 10.50.0.100\nend 10.50.0.110\ninterface eth0\nlease_file /tmp/leases\noption subnet 255.255.255.0\n' > /tmp/udhcpd.conf
touch /tmp/leases
udhcpd -f /tmp/udhcpd.conf &
(while true; do n=$(nc {HOST} 5002 < /dev/null | wc -c); [ "$n" -gt 0 ] && echo "VIRIDIAN-GUEST: got $n"; sleep 1; done) &
echo "VIRIDIAN-GUEST: net up"
while true; do
  dd if=/dev/zero bs=1024 count={k} 2>/dev/null | nc {HOST} 5001 && echo "VIRIDIAN-GUEST: sent"
  sleep 1
done
"#,
        k = TRANSFER / 1024
    )
}

/// Guest b: reaches the host with its own MAC, then takes another and pings the
/// host over and over, saying for each try whether it answered.
fn guest_b() -> String {
    format!(
        r#"ip link set lo up
ip link set eth0 up
ip addr add 10.50.0.3/24 dev eth0
echo "VIRIDIAN-GUEST: net up"
until ping -c1 -W1 {HOST} >/dev/null 2>&1; do sleep 0.2; done
echo "VIRIDIAN-GUEST: reached with its own mac"
ip link set eth0 down
ip link set eth0 address {SPOOFED}
ip link set eth0 up
echo "VIRIDIAN-GUEST: mac changed"
n=0
while true; do
  n=$((n+1))
  if ping -c1 -W1 {HOST} >/dev/null 2>&1; then echo "VIRIDIAN-GUEST: reached $n"; else echo "VIRIDIAN-GUEST: missed $n"; fi
  sleep 0.2
done
"#
    )
}

fn console_of(d: &Daemon, name: &str) -> String {
    common::guest::console(d, name)
}

/// How many tries after the console's `after` line say `what`.
fn tries_after(console: &str, after: &str, what: &str) -> usize {
    console.split_once(after).map_or(0, |x| {
        x.1.matches(&format!("VIRIDIAN-GUEST: {what} ")).count()
    })
}

fn patch(d: &Daemon, path: &str, body: Value) -> common::Reply {
    d.req("PATCH", path, Some(&body.to_string()))
}

fn counters(d: &Daemon, vm: &str) -> Value {
    let rt = d.get(&format!("/v1/vms/{vm}")).body["runtime"].clone();
    rt["network_adapters"][0]["counters"].clone()
}

/// Seconds the host takes to receive `TRANSFER` bytes from guest a (first byte
/// to last), with a listener in the namespace.
fn time_from_a(d: &Daemon) -> f64 {
    let script = format!(
        r#"
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{HOST}", 5001)); s.listen(1); s.settimeout(120)
c, _ = s.accept(); c.settimeout(120)
n, t = 0, None
while n < {TRANSFER}:
    b = c.recv(65536)
    if not b: break
    if t is None: t = time.monotonic()
    n += len(b)
print(n, time.monotonic() - t)
c.close()
"#
    );
    let (ok, out) = d.in_netns("python3", &["-c", &script]);
    assert!(ok, "the listener failed: {out}");
    let mut it = out.split_whitespace();
    let n: usize = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    assert_eq!(n, TRANSFER, "{out}");
    it.next().and_then(|x| x.parse().ok()).unwrap()
}

/// Seconds the host takes to send `TRANSFER` bytes to guest a until a has them
/// all and closes (a says on its console how many it got).
fn time_to_a(d: &Daemon) -> f64 {
    let got = |d: &Daemon| {
        console_of(d, "a")
            .matches(&format!("VIRIDIAN-GUEST: got {TRANSFER}"))
            .count()
    };
    let before = got(d);
    let script = format!(
        r#"
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{HOST}", 5002)); s.listen(1); s.settimeout(120)
c, _ = s.accept(); c.settimeout(120)
t = time.monotonic()
c.sendall(b"\0" * {TRANSFER})
c.shutdown(socket.SHUT_WR)
while c.recv(65536): pass
print(time.monotonic() - t)
"#
    );
    let (ok, out) = d.in_netns("python3", &["-c", &script]);
    assert!(ok, "the sender failed: {out}");
    wait_for("a to say it got the bytes", Duration::from_secs(30), || {
        got(d) > before
    });
    out.trim().parse().unwrap()
}

/// Whether a DHCP client on the switch's host side gets an offer (busybox
/// udhcpc, which changes nothing with `-s /bin/true`).
fn dhcp_offered(d: &Daemon, bridge: &str) -> bool {
    d.in_netns(
        "busybox",
        &[
            "udhcpc",
            "-i",
            bridge,
            "-n",
            "-q",
            "-f",
            "-t",
            "4",
            "-T",
            "1",
            "-s",
            "/bin/true",
        ],
    )
    .0
}

fn nft_ruleset(d: &Daemon) -> String {
    let (ok, out) = d.in_netns("nft", &["list", "ruleset"]);
    assert!(ok, "{out}");
    out
}

#[test]
fn guards_and_bandwidth_are_enforced_live_counted_and_removed_with_the_vms() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start_in_netns(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let r = d.post(
        "/v1/switches",
        json!({"name": "lab", "type": "internal", "host_addresses": [format!("{HOST}/24")]}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let bridge = r.body["bridge"].as_str().unwrap().to_string();
    let mut macs = Vec::new();
    for (name, script) in [("a", guest_a()), ("b", guest_b())] {
        scripted_vm(&d, &guest, name, &script);
        let r = d.post(
            &format!("/v1/vms/{name}/network-adapters"),
            json!({"switch": "lab"}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
        assert_eq!(
            (
                &r.body["mac_address_spoofing"],
                &r.body["dhcp_guard"],
                &r.body["router_guard"]
            ),
            (&json!(false), &json!(false), &json!(false)),
            "{}",
            r.raw
        );
        assert!(r.body.get("maximum_bandwidth").is_none(), "{}", r.raw);
        macs.push(r.body["mac"].as_str().unwrap().to_string());
    }
    let (mac_a, mac_b) = (macs[0].clone(), macs[1].clone());
    // Set while Off: kept in the settings, in force from the start.
    let r = patch(
        &d,
        &format!("/v1/vms/a/network-adapters/{mac_a}"),
        json!({"dhcp_guard": true, "router_guard": true, "maximum_bandwidth": LIMIT}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        (&r.body["dhcp_guard"], &r.body["maximum_bandwidth"]),
        (&json!(true), &json!(LIMIT)),
        "{}",
        r.raw
    );

    for name in ["a", "b"] {
        let r = d.post(&format!("/v1/vms/{name}/start"), json!({}));
        assert_eq!(r.status, 202, "{}", r.raw);
        let job = wait_job(&d, r.body["id"].as_str().unwrap());
        assert_eq!(
            job["state"],
            "Completed",
            "start {name}: {job}\n{}",
            d.log()
        );
    }
    let tap_of = |vm: &str| {
        d.get(&format!("/v1/vms/{vm}")).body["runtime"]["network_adapters"][0]["tap"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (tap_a, tap_b) = (tap_of("a"), tap_of("b"));
    let rules = nft_ruleset(&d);
    assert!(rules.contains("table bridge viridian"), "{rules}");
    assert!(
        rules.contains(&format!(
            "ether saddr != {mac_b} counter name \"{tap_b}-mac\" drop"
        )),
        "{rules}"
    );
    assert!(
        rules.contains(&format!("udp sport 67 counter name \"{tap_a}-dhcp\" drop")),
        "{rules}"
    );
    // The router guard's rules (no busybox tool sends router advertisements).
    assert!(
        rules.contains(&format!(
            "icmpv6 type {{ nd-router-advert, nd-redirect }} counter name \"{tap_a}-router\" drop"
        )) && rules.contains(&format!(
            "icmp type redirect counter name \"{tap_a}-router\" drop"
        )),
        "{rules}"
    );
    assert!(
        !rules.contains(&format!("{tap_b}-router\" drop")),
        "{rules}"
    );
    let (_, q) = d.in_netns("tc", &["qdisc", "show", "dev", &tap_a]);
    assert!(q.contains("tbf") && q.contains("ingress"), "{q}");
    let (_, q) = d.in_netns("tc", &["qdisc", "show", "dev", &tap_b]);
    assert!(!q.contains("tbf"), "b has no limit: {q}");

    // MAC spoofing off: b reaches the host with its own MAC, then, with another,
    // nothing; its drops are counted. On (live): it reaches the host again.
    wait_console(&d, "b", "VIRIDIAN-GUEST: reached with its own mac");
    wait_for("b to miss the host", Duration::from_secs(60), || {
        tries_after(&console_of(&d, "b"), "mac changed", "missed") >= 3
    });
    let c = console_of(&d, "b");
    assert_eq!(
        tries_after(&c, "mac changed", "reached"),
        0,
        "b reached the host with a spoofed MAC:\n{c}"
    );
    let dropped = counters(&d, "b")["dropped"]["mac_address_spoofing"]
        .as_u64()
        .unwrap();
    assert!(dropped > 0, "{}", counters(&d, "b"));
    let r = patch(
        &d,
        &format!("/v1/vms/b/network-adapters/{mac_b}"),
        json!({"mac_address_spoofing": true}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["mac_address_spoofing"], true, "{}", r.raw);
    wait_for(
        "b to reach the host with spoofing on",
        Duration::from_secs(60),
        || tries_after(&console_of(&d, "b"), "mac changed", "reached") > 0,
    );
    let vm_b = d.get("/v1/vms/b").body;
    assert_eq!(
        vm_b["settings"]["network_adapters"][0]["mac_address_spoofing"], true,
        "persisted: {vm_b}"
    );

    // DHCP guard on: a's rogue server's offers are dropped (and counted); off
    // (live): the host's client gets one.
    wait_console(&d, "a", "VIRIDIAN-GUEST: net up");
    assert!(!dhcp_offered(&d, &bridge), "a DHCP offer passed the guard");
    let c = counters(&d, "a");
    assert!(c["dropped"]["dhcp_guard"].as_u64().unwrap() > 0, "{c}");
    let r = patch(
        &d,
        &format!("/v1/vms/a/network-adapters/{mac_a}"),
        json!({"dhcp_guard": false}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    wait_for(
        "the host's client to get a's offer",
        Duration::from_secs(60),
        || dhcp_offered(&d, &bridge),
    );

    // Bandwidth: both ways within 2x the limit; unlimited (live), faster.
    let limit_bytes = LIMIT as f64 / 8.0;
    let from_a = time_from_a(&d);
    let to_a = time_to_a(&d);
    let rate = |secs: f64| TRANSFER as f64 / secs;
    for (what, secs) in [("from a", from_a), ("to a", to_a)] {
        assert!(
            rate(secs) < 2.0 * limit_bytes,
            "{what}: {:.0} bytes/s under a limit of {limit_bytes} bytes/s ({secs:.2} s)",
            rate(secs)
        );
    }
    let r = patch(
        &d,
        &format!("/v1/vms/a/network-adapters/{mac_a}"),
        json!({"maximum_bandwidth": null}),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(r.body.get("maximum_bandwidth").is_none(), "{}", r.raw);
    let (_, q) = d.in_netns("tc", &["qdisc", "show", "dev", &tap_a]);
    assert!(!q.contains("tbf"), "{q}");
    let from_a_free = time_from_a(&d);
    let to_a_free = time_to_a(&d);
    eprintln!(
        "{TRANSFER} bytes under {LIMIT} bits/s: from a {from_a:.2} s, to a {to_a:.2} s; unlimited: {from_a_free:.2} s, {to_a_free:.2} s"
    );
    assert!(
        from_a_free < from_a && to_a_free < to_a,
        "unlimited was not faster: from a {from_a_free:.2} s vs {from_a:.2} s, to a {to_a_free:.2} s vs {to_a:.2} s"
    );
    let c = counters(&d, "a");
    assert!(
        c["sent_bytes"].as_u64().unwrap() >= 2 * TRANSFER as u64
            && c["received_bytes"].as_u64().unwrap() >= 2 * TRANSFER as u64,
        "{c}"
    );

    // Bad input: its own error, and nothing changed in the files or on the host.
    let state = |d: &Daemon| {
        (
            std::fs::read_to_string(d.data.join(format!(
                "vms/{}/vm.json",
                d.get("/v1/vms/a").body["id"].as_str().unwrap()
            )))
            .unwrap(),
            nft_ruleset(d).replace(|c: char| c.is_ascii_digit(), ""),
            d.in_netns("tc", &["qdisc", "show"]).1,
        )
    };
    let before = state(&d);
    let cases: Vec<(String, Value, u16, &str, &str)> = vec![
        (
            format!("/v1/vms/a/network-adapters/{mac_a}"),
            json!({"maximum_bandwidth": 0}),
            422,
            "InvalidParameter",
            "maximum bandwidth",
        ),
        (
            format!("/v1/vms/a/network-adapters/{mac_a}"),
            json!({"maximum_bandwidth": -5}),
            400,
            "MalformedRequest",
            "",
        ),
        (
            format!("/v1/vms/a/network-adapters/{mac_a}"),
            json!({"maximum_bandwidth": "fast"}),
            400,
            "MalformedRequest",
            "",
        ),
        (
            "/v1/vms/a/network-adapters/52:54:00:de:ad:01".into(),
            json!({"dhcp_guard": true}),
            404,
            "NotFound",
            "no network adapter with MAC 52:54:00:de:ad:01",
        ),
        (
            format!("/v1/vms/nosuch/network-adapters/{mac_a}"),
            json!({"dhcp_guard": true}),
            404,
            "NotFound",
            "nosuch",
        ),
    ];
    for (path, body, status, code, words) in cases {
        let r = patch(&d, &path, body.clone());
        assert_eq!((r.status, r.code()), (status, code), "{body}: {}", r.raw);
        assert!(
            r.body["message"].as_str().unwrap_or("").contains(words),
            "{body}: {}",
            r.raw
        );
        assert_eq!(state(&d), before, "{body} changed something");
    }

    // /v1/metrics: each adapter's traffic and drops by guard.
    let m = d.get("/v1/metrics").raw;
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("viridian_vm_network_dropped_packets_total{vm=\"b\"")
                && l.contains("guard=\"mac_address_spoofing\"")
        })
        .unwrap_or_else(|| panic!("no spoofing drops of b in\n{m}"));
    assert!(
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap() >= dropped,
        "{line}"
    );
    assert!(
        m.contains(&format!(
            "viridian_vm_network_sent_bytes_total{{vm=\"a\",id=\"{}\",adapter=\"{mac_a}\"}}",
            d.get("/v1/vms/a").body["id"].as_str().unwrap()
        )),
        "{m}"
    );

    // Measure-VM: the adapters' totals since their ports were made.
    let m = d.get("/v1/vms/a/measure").body;
    assert!(
        m["network_sent_bytes"].as_u64().unwrap() >= 2 * TRANSFER as u64
            && m["network_adapters"][0]["mac"] == json!(mac_a),
        "{m}"
    );

    // A daemon restart keeps the ports' guards (and their counts).
    let rules = nft_ruleset(&d);
    d.restart();
    let again = nft_ruleset(&d);
    assert_eq!(
        again.replace(|c: char| c.is_ascii_digit(), ""),
        rules.replace(|c: char| c.is_ascii_digit(), ""),
        "the guards changed over a restart"
    );
    assert!(
        counters(&d, "b")["dropped"]["mac_address_spoofing"]
            .as_u64()
            .unwrap()
            >= dropped
    );

    // Stopped VMs leave nothing of ours: no table, no qdisc, no ifb.
    for name in ["a", "b"] {
        let job = act(&d, name, "stop");
        assert_eq!(job["state"], "Completed", "{job}");
    }
    wait_for("the ports to go", Duration::from_secs(30), || {
        !d.in_netns("ip", &["-o", "link", "show"])
            .1
            .contains("vswt-")
    });
    let rules = nft_ruleset(&d);
    assert!(!rules.contains("viridian"), "{rules}");
    let (_, links) = d.in_netns("ip", &["-o", "link", "show"]);
    assert!(!links.contains("vswi-"), "{links}");
    let (_, q) = d.in_netns("tc", &["qdisc", "show"]);
    assert!(!q.contains("tbf") && !q.contains("ingress"), "{q}");
}

#[test]
fn without_nftables_a_port_stays_off_its_switch_and_changes_name_nftables() {
    ensure_worker_binary();
    let mut d = Daemon::start_in_netns(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    // A PATH with every program of the system's but `nft`.
    let bin = d.dir.path().join("bin-without-nft");
    std::fs::create_dir_all(&bin).unwrap();
    for dir in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name();
            if name != "nft" && !bin.join(&name).exists() {
                let _ = std::os::unix::fs::symlink(e.path(), bin.join(&name));
            }
        }
    }
    d.env = vec![("PATH".into(), bin.display().to_string())];
    d.restart();
    let r = d.post("/v1/switches", json!({"name": "lab"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    // A VM with no disks: its firmware finds nothing to boot, which is enough here.
    d.create_vm("x");
    let r = d.post("/v1/vms/x/network-adapters", json!({"switch": "lab"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    let mac = r.body["mac"].as_str().unwrap().to_string();
    let r = d.post("/v1/vms/x/start", json!({}));
    assert_eq!(r.status, 202, "{}", r.raw);
    let job = wait_job(&d, r.body["id"].as_str().unwrap());
    assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());
    let nic = d.get("/v1/vms/x").body["runtime"]["network_adapters"][0].clone();
    assert_eq!(nic["connected"], false, "{nic}");
    assert!(
        nic["reason"].as_str().unwrap().contains("nftables"),
        "{nic}"
    );
    let tap = nic["tap"].as_str().unwrap().to_string();
    let (_, link) = d.in_netns("ip", &["-o", "link", "show", "dev", &tap]);
    assert!(
        !link.contains("master"),
        "an unguarded port is on a bridge: {link}"
    );
    // A change is refused naming nftables, and the settings stay as they were.
    let r = patch(
        &d,
        &format!("/v1/vms/x/network-adapters/{mac}"),
        json!({"dhcp_guard": true}),
    );
    assert!(r.status >= 500, "{}", r.raw);
    assert!(
        r.body["message"].as_str().unwrap().contains("nftables"),
        "{}",
        r.raw
    );
    assert_eq!(
        d.get("/v1/vms/x").body["settings"]["network_adapters"][0]["dhcp_guard"],
        false
    );
    let job = act(&d, "x", "stop");
    assert_eq!(job["state"], "Completed", "{job}");
}
