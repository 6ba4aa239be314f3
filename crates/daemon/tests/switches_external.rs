//! External switches end to end, in network namespaces the tests make: the
//! daemon's namespace stands in for the host, with `lan0` as its interface to
//! the physical network; a veth peer in a namespace of its own is that network
//! (its router 192.0.2.254, a remote network 198.51.100.0/24 behind it).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::guest::{
    act, ensure_worker_binary, guest_dir, scripted_vm, wait_console, wait_for, KillWorkersOnDrop,
};
use common::Daemon;
use serde_json::{json, Value};

/// The network's namespace, removed with the test.
struct Lan(Child);

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Lan {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Pings the host's address 192.0.2.1 from the network every 50 ms, one
    /// line each (`ok` or `miss`, a miss taking its 1 s time-out) into `log`,
    /// until the returned process is killed.
    fn watch_host(&self, log: &std::path::Path) -> Child {
        Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.pid()))
            .args([
                "--",
                "sh",
                "-c",
                "while true; do if busybox ping -c1 -W1 192.0.2.1 >/dev/null 2>&1; then echo ok; else echo miss; fi; sleep 0.05; done",
            ])
            .stdout(std::fs::File::create(log).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn run(&self, script: &str) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.pid()))
            .args(["--", "sh", "-c", script])
            .output()
            .expect("nsenter runs");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

fn sh(d: &Daemon, script: &str) -> String {
    let (ok, out) = d.in_netns("sh", &["-c", script]);
    assert!(ok, "{script}: {out}");
    out
}

/// The host's side as an admin would configure it: `lan0` with its address, a
/// default route and a route to a remote network; the network's side with the
/// router and the remote network on it.
fn host_and_lan(d: &Daemon) -> Lan {
    let lan = Lan(Command::new("unshare")
        .args(["--net", "--", "sleep", "infinity"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap());
    let me = std::fs::read_link("/proc/self/ns/net").unwrap();
    let pid = lan.pid();
    wait_for("the network's namespace", Duration::from_secs(10), || {
        std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|n| n != me)
    });
    sh(
        d,
        &format!(
            "ip link add lan0 type veth peer name lan1 netns {pid} && ip link set lan0 up && \
             ip addr add 192.0.2.1/24 dev lan0 && \
             ip route add default via 192.0.2.254 dev lan0 metric 100 && \
             ip route add 198.51.100.0/24 via 192.0.2.254 dev lan0 metric 50"
        ),
    );
    let (ok, out) = lan.run(
        "ip link set lo up && ip addr add 198.51.100.1/24 dev lo && \
         ip link set lan1 up && ip addr add 192.0.2.254/24 dev lan1 && \
         echo 1 > /proc/sys/net/ipv4/ip_forward",
    );
    assert!(ok, "{out}");
    wait_for("the network to answer", Duration::from_secs(10), || {
        d.in_netns("busybox", &["ping", "-c1", "-W1", "192.0.2.254"])
            .0
    });
    lan
}

/// The host's view: links with their masters, addresses, routes.
fn host_state(d: &Daemon) -> String {
    let mut out = Vec::new();
    for args in [
        &["-o", "link", "show"][..],
        &["-o", "-4", "addr", "show"],
        &["-6", "addr", "show", "scope", "global"],
        &["route", "show"],
        &["-6", "route", "show"],
    ] {
        let (ok, text) = d.in_netns("ip", args);
        assert!(ok, "{text}");
        out.extend(
            text.lines()
                .map(|l| l.split_once(": ").map_or(l, |x| x.1))
                .map(|l| l.split(" valid_lft").next().unwrap_or("").to_string()),
        );
    }
    out.sort();
    out.join("\n")
}

fn reaches(d: &Daemon, addr: &str) -> bool {
    d.in_netns("busybox", &["ping", "-c1", "-W2", addr]).0
}

fn switch_files(d: &Daemon) -> usize {
    std::fs::read_dir(d.data.join("switches")).map_or(0, |r| {
        r.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count()
    })
}

fn mac_of(d: &Daemon, link: &str) -> String {
    // `ip`, not /sys: sysfs shows the namespace it was mounted in.
    let out = sh(d, &format!("ip -o link show {link}"));
    out.split("link/ether ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("no MAC in {out}"))
        .to_string()
}

#[test]
fn an_external_switch_takes_the_interface_with_the_hosts_addresses_and_gives_them_back() {
    let mut d = Daemon::start_in_netns(&[]);
    let lan = host_and_lan(&d);
    let lan0_mac = mac_of(&d, "lan0");
    // A bridge made by hand with a port, an interface without addresses, and an
    // internal switch of ours: none can be taken.
    sh(
        &d,
        "ip link add br-host type bridge && ip link add spare0 type veth peer name spare1 && \
         ip link set spare0 master br-host && ip link add bare0 type veth peer name bare1 && \
         ip link set bare0 up && ip link set bare1 up",
    );
    let r = d.post(
        "/v1/switches",
        json!({"name": "inside", "type": "internal", "host_addresses": ["10.44.0.1/24"]}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let inside_bridge = r.body["bridge"].as_str().unwrap().to_string();

    let before = host_state(&d);
    let files = switch_files(&d);
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"name": "x", "type": "external"}),
            422,
            "InvalidParameter",
            "needs the host interface",
        ),
        (
            json!({"name": "x", "type": "external", "adapter": "nosuch0"}),
            422,
            "InvalidParameter",
            "no network interface named nosuch0",
        ),
        (
            json!({"name": "x", "type": "external", "adapter": "lo"}),
            422,
            "InvalidParameter",
            "loopback",
        ),
        (
            json!({"name": "x", "type": "external", "adapter": "lan0"}),
            409,
            "InUse",
            "holds the host's addresses 192.0.2.1/24",
        ),
        (
            json!({"name": "x", "type": "external", "adapter": "br-host", "allow_management_os": true}),
            422,
            "InvalidParameter",
            "is a bridge",
        ),
        (
            json!({"name": "x", "type": "external", "adapter": "spare0"}),
            409,
            "InUse",
            "already a port of br-host",
        ),
        (
            json!({"name": "x", "type": "external", "adapter": inside_bridge}),
            422,
            "InvalidParameter",
            "a link Viridian made",
        ),
        (
            json!({"name": "x", "type": "internal", "adapter": "bare0"}),
            422,
            "InvalidParameter",
            "only an external switch",
        ),
        (
            json!({"name": "x", "type": "private", "allow_management_os": true}),
            422,
            "InvalidParameter",
            "allow_management_os is for external switches",
        ),
        (
            json!({"name": "x", "type": "external", "adapter": "bare0", "host_addresses": ["10.9.0.1/24"]}),
            422,
            "InvalidParameter",
            "leave out host_addresses",
        ),
        (
            json!({"name": "inside", "type": "external", "adapter": "bare0"}),
            409,
            "AlreadyExists",
            "already exists",
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
        assert_eq!(host_state(&d), before, "{body} changed the host");
        assert_eq!(switch_files(&d), files, "{body} wrote a file");
    }

    // The host shares lan0: its address and routes move to the switch, and
    // the network reaches the host there before, during and after.
    let watch_log = d.dir.path().join("watch.log");
    let mut watcher = lan.watch_host(&watch_log);
    let answers = || {
        let text = std::fs::read_to_string(&watch_log).unwrap_or_default();
        (text.matches("ok").count(), text.matches("miss").count())
    };
    wait_for(
        "the network to reach the host",
        Duration::from_secs(10),
        || answers().0 >= 3,
    );
    let r = d.post(
        "/v1/switches",
        json!({"name": "uplink", "type": "external", "adapter": "lan0", "allow_management_os": true}),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.raw, d.log());
    let s = r.body.clone();
    let bridge = s["bridge"].as_str().unwrap().to_string();
    assert_eq!(s["type"], "external");
    assert_eq!(s["adapter"], "lan0");
    assert_eq!(s["allow_management_os"], true);
    assert_eq!(s["uplink"]["connected"], true, "{s}");
    assert_eq!(s["host_addresses"], json!(["192.0.2.1/24"]), "{s}");
    assert_eq!(s["uplink"]["moved_addresses"], json!(["192.0.2.1/24"]));
    assert_eq!(
        s["uplink"]["moved_routes"],
        json!([
            "default via 192.0.2.254 metric 100",
            "198.51.100.0/24 via 192.0.2.254 metric 50"
        ]),
        "{s}"
    );
    let moved = |d: &Daemon| {
        let addrs = sh(d, &format!("ip -o -4 addr show dev {bridge}"));
        assert_eq!(addrs.matches("inet 192.0.2.1/24").count(), 1, "{addrs}");
        let lan0 = sh(d, "ip -o -4 addr show dev lan0");
        assert!(lan0.trim().is_empty(), "{lan0}");
        let link = sh(d, "ip -o link show lan0");
        assert!(link.contains(&format!("master {bridge}")), "{link}");
        let routes = sh(d, "ip route show");
        assert!(
            routes.contains(&format!("default via 192.0.2.254 dev {bridge} metric 100")),
            "{routes}"
        );
        assert!(
            routes.contains(&format!(
                "198.51.100.0/24 via 192.0.2.254 dev {bridge} metric 50"
            )),
            "{routes}"
        );
        assert!(!routes.contains("dev lan0"), "{routes}");
        // The network still sees the host at its MAC, and the host reaches it.
        assert_eq!(mac_of(d, &bridge), lan0_mac);
        assert!(reaches(d, "192.0.2.254"), "{}", host_state(d));
        assert!(reaches(d, "198.51.100.1"), "{}", host_state(d));
    };
    moved(&d);
    let seen = answers().0;
    wait_for(
        "the network to reach the host after",
        Duration::from_secs(10),
        || answers().0 >= seen + 3,
    );
    let (ok, missed) = answers();
    assert!(
        missed <= 1,
        "the network lost the host for {missed} s while lan0 moved ({ok} answers)"
    );

    // lan0 is taken; the network's subnet is the host's.
    let r = d.post(
        "/v1/switches",
        json!({"name": "again", "type": "external", "adapter": "lan0", "allow_management_os": true}),
    );
    assert_eq!((r.status, r.code()), (409, "InUse"), "{}", r.raw);
    assert!(
        r.raw
            .contains("already the uplink of the external switch uplink"),
        "{}",
        r.raw
    );
    let r = d.post(
        "/v1/switches",
        json!({"name": "clash", "type": "internal", "host_addresses": ["192.0.2.200/24"]}),
    );
    assert_eq!((r.status, r.code()), (409, "InUse"), "{}", r.raw);
    assert!(r.raw.contains("switch uplink"), "{}", r.raw);
    // What cannot change on a live external switch is refused and named.
    let patch =
        |d: &Daemon, body: Value| d.req("PATCH", "/v1/switches/uplink", Some(&body.to_string()));
    let r = patch(&d, json!({"allow_management_os": false}));
    assert_eq!((r.status, r.code()), (409, "InvalidState"), "{}", r.raw);
    assert!(
        r.raw.contains("delete the switch and create it again"),
        "{}",
        r.raw
    );
    let r = patch(&d, json!({"host_addresses": ["192.0.2.7/24"]}));
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);
    let r = patch(&d, json!({"name": "wan"}));
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["adapter"], "lan0");
    moved(&d);

    // Killed and started again: kept as it is, nothing doubled.
    d.kill();
    d.launch();
    assert_eq!(d.get("/v1/switches/wan").body["uplink"]["connected"], true);
    moved(&d);

    // After a host reboot the interface has the host's configuration back and
    // the bridge is gone: the start moves it all again.
    d.kill();
    sh(
        &d,
        &format!(
            "ip link delete {bridge} && ip addr add 192.0.2.1/24 dev lan0 && \
             ip route add default via 192.0.2.254 dev lan0 metric 100 && \
             ip route add 198.51.100.0/24 via 192.0.2.254 dev lan0 metric 50"
        ),
    );
    d.launch();
    moved(&d);

    // Deleted: lan0 is the host's again, as it was.
    std::fs::write(&watch_log, b"").unwrap();
    let _ = watcher.kill();
    let _ = watcher.wait();
    let mut watcher = lan.watch_host(&watch_log);
    wait_for(
        "the network to reach the host",
        Duration::from_secs(10),
        || answers().0 >= 3,
    );
    let r = d.req("DELETE", "/v1/switches/wan", None);
    assert_eq!(r.status, 204, "{}\n{}", r.raw, d.log());
    let seen = answers().0;
    wait_for(
        "the network to reach the host after",
        Duration::from_secs(10),
        || answers().0 >= seen + 3,
    );
    let (ok, missed) = answers();
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(
        missed <= 1,
        "the network lost the host for {missed} s while lan0 came back ({ok} answers)"
    );
    assert_eq!(host_state(&d), before, "{}", d.log());
    assert_eq!(switch_files(&d), files);
    assert!(reaches(&d, "192.0.2.254"));
    assert!(reaches(&d, "198.51.100.1"));

    // A deletion cut off after it was recorded is finished at the next start.
    let r = d.post(
        "/v1/switches",
        json!({"name": "wan", "type": "external", "adapter": "lan0", "allow_management_os": true}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let id = r.body["id"].as_str().unwrap().to_string();
    d.kill();
    let file = d.data.join("switches").join(format!("{id}.json"));
    let mut v: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    v["settings"]["uplink"]["deleting"] = json!(true);
    std::fs::write(&file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    d.launch();
    assert_eq!(d.get("/v1/switches/wan").status, 404);
    assert_eq!(host_state(&d), before, "{}", d.log());
    assert!(reaches(&d, "192.0.2.254"));

    // Without the host on it: an interface without addresses, and the bridge
    // gives the host no presence (no IPv6 link-local address either).
    let r = d.post(
        "/v1/switches",
        json!({"name": "vms-only", "type": "external", "adapter": "bare0"}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let bare_bridge = r.body["bridge"].as_str().unwrap().to_string();
    assert_eq!(r.body["allow_management_os"], false);
    assert_eq!(r.body["host_addresses"], json!([]));
    let addrs = sh(&d, &format!("ip -o addr show dev {bare_bridge}"));
    assert!(addrs.trim().is_empty(), "{addrs}");
    assert!(sh(&d, "ip -o link show bare0").contains(&format!("master {bare_bridge}")));
    let r = d.req("DELETE", "/v1/switches/vms-only", None);
    assert_eq!(r.status, 204, "{}", r.raw);
    assert_eq!(host_state(&d), before);
}

#[test]
fn a_guest_on_an_external_switch_is_on_the_uplinks_network_beside_the_host() {
    ensure_worker_binary();
    let guest = guest_dir();
    let d = Daemon::start_in_netns(&[]);
    let _workers = KillWorkersOnDrop(d.data.clone());
    let lan = host_and_lan(&d);
    let r = d.post(
        "/v1/switches",
        json!({"name": "wan", "type": "external", "adapter": "lan0", "allow_management_os": true}),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.raw, d.log());

    // The guest has an address on the network, the router as its gateway.
    let script = "ip link set lo up\nip link set eth0 up\nip addr add 192.0.2.10/24 dev eth0\n\
        ip route add default via 192.0.2.254\necho \"VIRIDIAN-GUEST: net up\"\n\
        while true; do\n\
          for p in 192.0.2.254 198.51.100.1 192.0.2.1; do\n\
            if ping -c1 -W1 $p >/dev/null 2>&1; then echo \"VIRIDIAN-GUEST: reached $p\"; fi\n\
          done\n\
          sleep 0.5\n\
        done\n";
    scripted_vm(&d, &guest, "g", script);
    let r = d.post("/v1/vms/g/network-adapters", json!({"switch": "wan"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    let mac = r.body["mac"].as_str().unwrap().to_lowercase();
    act(&d, "g", "start");
    wait_console(&d, "g", "VIRIDIAN-GUEST: net up");
    // The router, the network behind it, and the host (on its moved address).
    for peer in ["192.0.2.254", "198.51.100.1", "192.0.2.1"] {
        wait_for(
            &format!("the guest to reach {peer}"),
            Duration::from_secs(180),
            || common::guest::console(&d, "g").contains(&format!("VIRIDIAN-GUEST: reached {peer}")),
        );
    }
    // The network sees the guest at its own MAC, beside the host's.
    let (ok, out) = lan.run("busybox ping -c1 -W2 192.0.2.10 && ip neigh show 192.0.2.10");
    assert!(ok, "{out}");
    assert!(out.contains(&mac), "{out}");
    assert!(reaches(&d, "192.0.2.10"), "{}", host_state(&d));
    act(&d, "g", "stop");
}
