//! Benchmark of the virtual switch (issue 17), not part of the suite (`#[ignore]`):
//!
//! ```sh
//! cargo test --release -p daemon --test bench_switch -- --ignored --nocapture
//! ```
//!
//! Two guests on one internal switch, in one run: TCP streams guest to guest and
//! guest to host, a small-packet rate and ping round trips, each measured with the
//! guests' taps on our switch and then on a bridge made by hand (`ip link add type
//! bridge`, no nftables table, the host's address moved onto it): the same QEMU,
//! the same guests, only the switch differs, rounds alternating. Then the guards'
//! added latency (all on vs all off, live), and the time to create a switch and to
//! connect a running VM's adapter. The daemon runs in a network namespace of its
//! own; nothing touches the host's links or firewall.

mod common;

use std::time::{Duration, Instant};

use common::guest::{
    ensure_worker_binary, guest_dir, scripted_vm, wait_console, KillWorkersOnDrop,
};
use common::{wait_job, Daemon};
use serde_json::{json, Value};

const HOST: &str = "10.60.0.1";
const A: &str = "10.60.0.2";
const B: &str = "10.60.0.3";
/// 64 KiB blocks per TCP stream (`VIRIDIAN_BENCH_BLOCKS` to change): 32 MiB.
const BLOCKS: u32 = 512;
/// Rounds of each path (`VIRIDIAN_BENCH_ROUNDS` to change).
const ROUNDS: usize = 3;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Guest a runs what the host tells it (one line from the host's TCP 6000, asked
/// for twice a second) and reports each result on its console with the guest's
/// uptime around it.
fn guest_a() -> String {
    format!(
        r#"ip link set lo up
ip link set eth0 up
ip addr add {A}/24 dev eth0
echo "VIRIDIAN-GUEST: net up"
while true; do
  cmd=$(nc {HOST} 6000 < /dev/null 2>/dev/null)
  set -- $cmd
  case "$1" in
    stream)
      t0=$(cut -d' ' -f1 /proc/uptime)
      dd if=/dev/zero bs=65536 count=$3 2>/dev/null | nc $2 5001
      t1=$(cut -d' ' -f1 /proc/uptime)
      echo "VIRIDIAN-GUEST: result $4 $t0 $t1" ;;
    rate)
      r=$(ping -A -q -s 16 -w 5 $2 | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
      echo "VIRIDIAN-GUEST: result $3 $r" ;;
    rtt)
      r=$(ping -A -q -c 300 $2 | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
      echo "VIRIDIAN-GUEST: result $3 $r" ;;
  esac
  sleep 0.5
done
"#
    )
}

/// Guest b takes TCP streams on 5001 and throws them away.
fn guest_b() -> String {
    format!(
        r#"ip link set lo up
ip link set eth0 up
ip addr add {B}/24 dev eth0
echo "VIRIDIAN-GUEST: net up"
while true; do nc -l -p 5001 > /dev/null; done
"#
    )
}

/// Gives guest a one command and, for a stream to the host, takes the stream on
/// the host's 5001 until it ends.
fn conduct(d: &Daemon, command: &str, take_stream: bool) {
    let script = format!(
        r#"
import socket
def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{HOST}", port)); s.listen(1); s.settimeout(300)
    return s
sink = listener(5001) if {take} else None
c, _ = listener(6000).accept()
c.sendall(b"{command}\n"); c.close()
if sink:
    c, _ = sink.accept(); c.settimeout(300)
    while c.recv(1 << 20): pass
"#,
        take = if take_stream { "True" } else { "False" },
    );
    let (ok, out) = d.in_netns("python3", &["-c", &script]);
    assert!(ok, "the conductor failed: {out}");
}

/// The fields of guest a's last `result TAG ...` line, after it appears.
fn result(d: &Daemon, tag: &str) -> Vec<f64> {
    let needle = format!("VIRIDIAN-GUEST: result {tag} ");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let console = common::guest::console(d, "a");
        if let Some(line) = console
            .rsplit(&needle)
            .next()
            .filter(|_| console.contains(&needle))
            .and_then(|rest| rest.lines().next())
        {
            let v: Vec<f64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            assert!(!v.is_empty(), "guest a's result {tag} is empty: {line}");
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no result {tag} from guest a:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Default)]
struct Figures {
    /// MB/s (10^6 bytes) per round.
    guest_to_guest: Vec<f64>,
    guest_to_host: Vec<f64>,
    /// Round trips per second, 16-byte pings one after another.
    rate: Vec<f64>,
    /// Average ping round trip a → b, ms.
    rtt: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn measure(d: &Daemon, path: &str, round: usize, blocks: u32, into: &mut Figures) {
    let mb = f64::from(blocks) * 65536.0 / 1e6;
    let tag = format!("{path}-{round}-g2g");
    conduct(d, &format!("stream {B} {blocks} {tag}"), false);
    let v = result(d, &tag);
    into.guest_to_guest.push(mb / (v[1] - v[0]));
    let tag = format!("{path}-{round}-g2h");
    conduct(d, &format!("stream {HOST} {blocks} {tag}"), true);
    let v = result(d, &tag);
    into.guest_to_host.push(mb / (v[1] - v[0]));
    let tag = format!("{path}-{round}-rate");
    conduct(d, &format!("rate {B} {tag}"), false);
    into.rate.push(result(d, &tag)[0] / 5.0);
    let tag = format!("{path}-{round}-rtt");
    conduct(d, &format!("rtt {B} {tag}"), false);
    into.rtt.push(result(d, &tag)[0]);
}

fn ip(d: &Daemon, args: &[&str]) {
    let (ok, out) = d.in_netns("ip", args);
    assert!(ok, "ip {args:?}: {out}");
}

/// Moves both taps and the host's address between our bridge and the hand-made
/// one; our nftables table goes while they are on the hand-made bridge (it is
/// saved and put back).
fn to_hand_bridge(d: &Daemon, ours: &str, taps: &[String], saved: &std::path::Path) {
    let (ok, table) = d.in_netns("nft", &["list", "table", "bridge", "viridian"]);
    assert!(ok, "{table}");
    std::fs::write(saved, table).unwrap();
    let (ok, out) = d.in_netns("nft", &["delete", "table", "bridge", "viridian"]);
    assert!(ok, "{out}");
    ip(d, &["addr", "del", &format!("{HOST}/24"), "dev", ours]);
    ip(d, &["addr", "add", &format!("{HOST}/24"), "dev", "handbr0"]);
    for t in taps {
        ip(d, &["link", "set", t, "master", "handbr0"]);
    }
}

fn to_our_switch(d: &Daemon, ours: &str, taps: &[String], saved: &std::path::Path) {
    for t in taps {
        ip(d, &["link", "set", t, "master", ours]);
    }
    ip(d, &["addr", "del", &format!("{HOST}/24"), "dev", "handbr0"]);
    ip(d, &["addr", "add", &format!("{HOST}/24"), "dev", ours]);
    let (ok, out) = d.in_netns("nft", &["-f", &saved.display().to_string()]);
    assert!(ok, "{out}");
}

fn set_guards(d: &Daemon, vm: &str, mac: &str, on: bool) {
    let r = d.req(
        "PATCH",
        &format!("/v1/vms/{vm}/network-adapters/{mac}"),
        Some(
            &json!({"mac_address_spoofing": !on, "dhcp_guard": on, "router_guard": on}).to_string(),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
}

fn timed(f: impl FnOnce() -> common::Reply) -> (f64, common::Reply) {
    let t = Instant::now();
    let r = f();
    (t.elapsed().as_secs_f64() * 1e3, r)
}

#[test]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
fn switch_benchmark() {
    let blocks = env_or("VIRIDIAN_BENCH_BLOCKS", BLOCKS);
    let rounds = env_or("VIRIDIAN_BENCH_ROUNDS", ROUNDS);
    ensure_worker_binary();
    let guest = guest_dir();
    let d = Daemon::start_in_netns(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let r = d.post(
        "/v1/switches",
        json!({"name": "lab", "type": "internal", "host_addresses": [format!("{HOST}/24")]}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let ours = r.body["bridge"].as_str().unwrap().to_string();
    let mut macs = Vec::new();
    for (name, script) in [("a", guest_a()), ("b", guest_b())] {
        scripted_vm(&d, &guest, name, &script);
        let r = d.post(
            &format!("/v1/vms/{name}/network-adapters"),
            json!({"switch": "lab"}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
        macs.push(r.body["mac"].as_str().unwrap().to_string());
    }
    let mut jobs = Vec::new();
    for name in ["a", "b"] {
        let r = d.post(&format!("/v1/vms/{name}/start"), json!({}));
        assert_eq!(r.status, 202, "{}", r.raw);
        jobs.push(r.body["id"].as_str().unwrap().to_string());
    }
    for id in &jobs {
        let job = wait_job(&d, id);
        assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());
    }
    for name in ["a", "b"] {
        wait_console(&d, name, "VIRIDIAN-GUEST: net up");
    }
    let taps: Vec<String> = ["a", "b"]
        .iter()
        .map(|vm| {
            let rt: Value = d.get(&format!("/v1/vms/{vm}")).body["runtime"].clone();
            rt["network_adapters"][0]["tap"]
                .as_str()
                .unwrap_or_else(|| panic!("{vm} has no tap: {rt}"))
                .to_string()
        })
        .collect();
    ip(&d, &["link", "add", "handbr0", "type", "bridge"]);
    ip(&d, &["link", "set", "handbr0", "up"]);
    let saved = d.dir.path().join("viridian.nft");

    // Warm up (ARP, the guests' page cache of dd and nc) on our switch.
    let mut warm = Figures::default();
    measure(&d, "warm", 0, blocks / 8, &mut warm);

    let (mut on_ours, mut on_hand) = (Figures::default(), Figures::default());
    for round in 0..rounds {
        let hand_first = round % 2 == 1;
        for hand in [hand_first, !hand_first] {
            if hand {
                to_hand_bridge(&d, &ours, &taps, &saved);
                measure(&d, "hand", round, blocks, &mut on_hand);
                to_our_switch(&d, &ours, &taps, &saved);
            } else {
                measure(&d, "ours", round, blocks, &mut on_ours);
            }
        }
    }

    // The guards' latency: every guard on vs every guard off, alternating.
    let (mut guards_on, mut guards_off) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for on in [round % 2 == 0, round % 2 == 1] {
            for (vm, mac) in ["a", "b"].iter().zip(&macs) {
                set_guards(&d, vm, mac, on);
            }
            let tag = format!("guards-{on}-{round}");
            conduct(&d, &format!("rtt {B} {tag}"), false);
            let v = result(&d, &tag)[0];
            if on { &mut guards_on } else { &mut guards_off }.push(v);
        }
    }

    // Creating a switch, and connecting a running VM's adapter to another one.
    let (mut create_private, mut create_internal, mut connect) = (vec![], vec![], vec![]);
    for i in 0..10 {
        let (ms, r) = timed(|| d.post("/v1/switches", json!({"name": format!("p{i}")})));
        assert_eq!(r.status, 201, "{}", r.raw);
        create_private.push(ms);
        let (ms, r) = timed(|| {
            d.post(
                "/v1/switches",
                json!({"name": format!("i{i}"), "type": "internal",
                       "host_addresses": [format!("10.61.{i}.1/24")]}),
            )
        });
        assert_eq!(r.status, 201, "{}", r.raw);
        create_internal.push(ms);
    }
    for i in 0..10 {
        let to = if i % 2 == 0 { "p0" } else { "lab" };
        let (ms, r) = timed(|| {
            d.post(
                &format!("/v1/vms/b/network-adapters/{}/connect", macs[1]),
                json!({"switch": to}),
            )
        });
        assert!(r.status < 300, "{}", r.raw);
        connect.push(ms);
    }

    let ratio = |o: &[f64], h: &[f64]| median(o) / median(h);
    println!("switch benchmark: {rounds} rounds, {blocks} x 64 KiB per stream");
    println!("| what | our switch (median) | hand-made bridge (median) | ours / hand | rounds, ours | rounds, hand |");
    println!("|---|---|---|---|---|---|");
    let rows: [(&str, &[f64], &[f64]); 4] = [
        (
            "TCP stream guest → guest, MB/s",
            &on_ours.guest_to_guest,
            &on_hand.guest_to_guest,
        ),
        (
            "TCP stream guest → host, MB/s",
            &on_ours.guest_to_host,
            &on_hand.guest_to_host,
        ),
        (
            "16-byte ping round trips/s, guest → guest",
            &on_ours.rate,
            &on_hand.rate,
        ),
        ("ping RTT guest → guest, ms", &on_ours.rtt, &on_hand.rtt),
    ];
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (what, o, h) in rows {
        println!(
            "| {what} | {:.2} | {:.2} | {:.3} | {} | {} |",
            median(o),
            median(h),
            ratio(o, h),
            fmt(o),
            fmt(h)
        );
    }
    println!(
        "guards: RTT all on {:.3} ms, all off {:.3} ms (median; on: {}; off: {})",
        median(&guards_on),
        median(&guards_off),
        fmt(&guards_on),
        fmt(&guards_off)
    );
    let summary = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        format!("p50 {:.1} ms, max {:.1} ms", median(v), s[s.len() - 1])
    };
    println!("create a private switch: {}", summary(&create_private));
    println!(
        "create an internal switch with an address: {}",
        summary(&create_internal)
    );
    println!(
        "connect a running VM's adapter to another switch: {}",
        summary(&connect)
    );
    // What a reader checks first: every figure came from a real measurement.
    for v in [
        &on_ours.guest_to_guest,
        &on_hand.guest_to_guest,
        &on_ours.rate,
        &guards_on,
    ] {
        assert!(v.iter().all(|x| x.is_finite() && *x > 0.0), "{v:?}");
    }
}
