//! NAT switches end to end: the masquerade (nftables), DHCP and DNS (dnsmasq,
//! supervised), leases. Every daemon runs in a network namespace of its own
//! (`Daemon::start_in_netns`), and "the internet" is another namespace joined to
//! it by a veth pair: the host's interfaces, routes and firewall are never
//! touched, and nothing leaves the machine.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::{act, ensure_worker_binary, guest_dir, scripted_vm, wait_for};
use common::{wait_job, Daemon};
use serde_json::{json, Value};

/// Our nft tables in the daemon's namespace, from `nft -j` (JSON).
fn our_tables(d: &Daemon) -> Vec<String> {
    let (ok, out) = d.in_netns("nft", &["-j", "list", "tables"]);
    assert!(ok, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["table"]["name"].as_str())
        .filter(|n| n.starts_with("viridian"))
        .map(str::to_string)
        .collect()
}

/// The pids of the dnsmasq processes serving this daemon's switches (their
/// command lines name files in its data dir).
fn our_dnsmasqs(d: &Daemon) -> Vec<u32> {
    let needle = d.data.display().to_string();
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("dnsmasq") && cmdline.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn ip_forward(d: &Daemon) -> String {
    d.in_netns("cat", &["/proc/sys/net/ipv4/ip_forward"])
        .1
        .trim()
        .to_string()
}

/// What the host has of ours or could be changed by a request: links,
/// addresses, the whole ruleset, forwarding, files.
fn host_state(d: &Daemon) -> String {
    let (_, links) = d.in_netns("ip", &["-o", "link", "show"]);
    let (_, addrs) = d.in_netns("ip", &["-o", "addr", "show"]);
    let (_, rules) = d.in_netns("nft", &["list", "ruleset"]);
    let mut files: Vec<String> = std::fs::read_dir(d.data.join("switches"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let strip = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| l.split_once(": ").map_or(l, |x| x.1).to_string())
            .map(|l| l.split(" valid_lft").next().unwrap_or("").to_string())
            .collect()
    };
    format!(
        "{:?}\n{:?}\n{rules}\nforward={}\n{files:?}\ndnsmasq={:?}",
        strip(&links),
        strip(&addrs),
        ip_forward(d),
        our_dnsmasqs(d)
    )
}

#[test]
fn nat_switches_bad_input_changes_nothing_and_delete_leaves_nothing_of_ours() {
    let mut d = Daemon::start_in_netns(&[]);
    assert_eq!(ip_forward(&d), "0");
    let before = host_state(&d);
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"name": "n", "type": "nat"}),
            422,
            "InvalidParameter",
            "needs an IPv4 host address",
        ),
        (
            json!({"name": "n", "type": "nat", "host_addresses": ["fd00:55::1/64"]}),
            422,
            "InvalidParameter",
            "needs an IPv4 host address",
        ),
        (
            json!({"name": "n", "type": "nat", "host_addresses": ["10.55.0.1/31"]}),
            422,
            "InvalidParameter",
            "from /8 to /30",
        ),
        (
            json!({"name": "n", "type": "nat", "host_addresses": ["10.55.0.1/24", "10.56.0.1/24"]}),
            422,
            "InvalidParameter",
            "one IPv4 host address",
        ),
        (
            json!({"name": "n", "type": "nat", "host_addresses": ["10.55.0.1/24"], "dhcp_range": "10.66.0.10-10.66.0.20"}),
            422,
            "InvalidParameter",
            "not inside the switch's subnet 10.55.0.0/24",
        ),
        (
            json!({"name": "n", "type": "nat", "host_addresses": ["10.55.0.1/24"], "dhcp_range": "10.55.0.1-10.55.0.20"}),
            422,
            "InvalidParameter",
            "holds the host's own address",
        ),
        (
            json!({"name": "n", "type": "nat", "host_addresses": ["10.55.0.1/24"], "dhcp_range": "ten to twenty"}),
            422,
            "InvalidParameter",
            "is not a DHCP range",
        ),
        (
            json!({"name": "n", "type": "internal", "host_addresses": ["10.55.0.1/24"], "dhcp_range": "10.55.0.10-10.55.0.20"}),
            422,
            "InvalidParameter",
            "a DHCP range is for a switch of type nat",
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
    }
    // A subnet of the host's own (an address on a link that is not ours).
    sh(
        &d,
        "ip link add uplink0 type veth peer name uplink1 && ip addr add 192.0.2.5/24 dev uplink0",
    );
    let before = host_state(&d);
    let r = d.post(
        "/v1/switches",
        json!({"name": "n", "type": "nat", "host_addresses": ["192.0.2.1/25"]}),
    );
    assert_eq!((r.status, r.code()), (409, "InUse"), "{}", r.raw);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("overlaps 192.0.2.0/24 of the host's interface uplink0"),
        "{}",
        r.raw
    );
    assert_eq!(host_state(&d), before);
    // A host without nft or dnsmasq: the package to install, nothing made.
    let good = json!({"name": "n", "type": "nat", "host_addresses": ["10.55.0.1/24"]});
    for (var, package) in [
        ("VIRIDIAN_NFT", "apt-get install nftables"),
        ("VIRIDIAN_DNSMASQ", "apt-get install dnsmasq-base"),
    ] {
        d.env = vec![(var.to_string(), "/nonexistent/program".to_string())];
        d.restart();
        let r = d.post("/v1/switches", good.clone());
        assert_eq!((r.status, r.code()), (409, "InvalidState"), "{}", r.raw);
        assert!(
            r.body["message"].as_str().unwrap().contains(package),
            "{}",
            r.raw
        );
        assert_eq!(host_state(&d), before, "{var}: the host changed");
    }
    d.env.clear();
    d.restart();

    // A good one: bridge, table, forwarding on, one dnsmasq bound to the bridge.
    let r = d.post("/v1/switches", good.clone());
    assert_eq!(r.status, 201, "{}\n{}", r.raw, d.log());
    let sw = r.body.clone();
    let bridge = sw["bridge"].as_str().unwrap().to_string();
    let table = format!("viridian-nat-{}", &bridge[4..]);
    assert_eq!(sw["nat"]["dhcp_range"], "10.55.0.2-10.55.0.254", "{sw}");
    assert_eq!(sw["nat"]["nft_table"], format!("ip {table}"), "{sw}");
    assert_eq!(our_tables(&d), vec![table.clone()]);
    assert_eq!(ip_forward(&d), "1");
    assert!(
        d.log().contains("host-wide"),
        "forwarding was turned on without saying so:\n{}",
        d.log()
    );
    let pids = our_dnsmasqs(&d);
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(sw["nat"]["dnsmasq_pid"], pids[0], "{sw}");
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", pids[0])).unwrap();
    for arg in [
        format!("--interface={bridge}"),
        "--conf-file=/dev/null".into(),
        "--except-interface=lo".into(),
    ] {
        assert!(cmdline.split('\0').any(|a| a == arg), "{arg}: {cmdline:?}");
    }
    // The DNS answers the host's name on the switch.
    let (ok, out) = d.in_netns(
        "busybox",
        &["nslookup", "host.viridian.internal", "10.55.0.1"],
    );
    assert!(ok && out.contains("10.55.0.1"), "{out}");
    // A second NAT switch: its own table and dnsmasq; the subnet must not overlap.
    let r = d.post(
        "/v1/switches",
        json!({"name": "m", "type": "nat", "host_addresses": ["10.55.0.9/16"]}),
    );
    assert_eq!((r.status, r.code()), (409, "InUse"), "{}", r.raw);
    let r = d.post(
        "/v1/switches",
        json!({"name": "m", "type": "nat", "host_addresses": ["10.56.0.1/24"], "dhcp_range": "10.56.0.100-10.56.0.110"}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.body["nat"]["dhcp_range"], "10.56.0.100-10.56.0.110");
    assert_eq!(our_tables(&d).len(), 2);
    assert_eq!(our_dnsmasqs(&d).len(), 2);
    // Leases of a switch that is not NAT: an empty list and why.
    let r = d.post(
        "/v1/switches",
        json!({"name": "inside", "type": "internal", "host_addresses": ["10.57.0.1/24"]}),
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let r = d.get("/v1/switches/inside/leases");
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["leases"], json!([]));
    assert!(
        r.body["reason"]
            .as_str()
            .unwrap()
            .contains("only NAT switches hand out addresses"),
        "{}",
        r.raw
    );
    // A changed range restarts its dnsmasq with it.
    let r = d.req(
        "PATCH",
        "/v1/switches/m",
        Some(&json!({"dhcp_range": "10.56.0.200-10.56.0.210"}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["nat"]["dhcp_range"], "10.56.0.200-10.56.0.210");
    let pid = r.body["nat"]["dnsmasq_pid"].as_u64().unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.contains("10.56.0.200,10.56.0.210"), "{cmdline:?}");
    let r = d.req(
        "PATCH",
        "/v1/switches/m",
        Some(&json!({"dhcp_range": "10.57.0.2-10.57.0.3"}).to_string()),
    );
    assert_eq!((r.status, r.code()), (422, "InvalidParameter"), "{}", r.raw);

    // A reboot: no bridge, table or dnsmasq; the daemon makes them all again.
    d.stop();
    assert!(our_dnsmasqs(&d).is_empty(), "dnsmasq outlived the service");
    d.reboot_netns();
    assert!(our_tables(&d).is_empty());
    d.launch();
    assert_eq!(our_tables(&d).len(), 2, "{}", d.log());
    assert_eq!(our_dnsmasqs(&d).len(), 2, "{}", d.log());
    assert_eq!(ip_forward(&d), "1");

    // Deleting every switch leaves nothing of ours: tables, processes, files,
    // and forwarding (which we turned on) is off again.
    for name in ["n", "m", "inside"] {
        let r = d.req("DELETE", &format!("/v1/switches/{name}"), None);
        assert_eq!(r.status, 204, "{}", r.raw);
    }
    assert!(our_tables(&d).is_empty());
    let (_, rules) = d.in_netns("nft", &["list", "ruleset"]);
    assert!(!rules.contains("viridian"), "{rules}");
    assert!(our_dnsmasqs(&d).is_empty());
    assert_eq!(ip_forward(&d), "0");
    let left: Vec<_> = std::fs::read_dir(d.data.join("switches"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let (_, links) = d.in_netns("ip", &["-o", "link", "show"]);
    assert!(!links.contains("vsw"), "{links}");
}

/// Processes of the test (the internet's namespace and its server), killed at the end.
struct KillOnDrop(Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nsenter(pid: u32, program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .expect("nsenter runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn sh(d: &Daemon, script: &str) {
    let (ok, out) = d.in_netns("sh", &["-c", script]);
    assert!(ok, "{script}: {out}");
}

/// The guest: a lease from udhcpc (with its hostname), names looked up, the
/// file fetched from the internet, then renewals every few seconds.
const GUEST: &str = r#"ip link set lo up
ip link set eth0 up
mkdir -p /etc
cat > /tmp/dhcp.sh <<'EOS'
#!/bin/sh
case "$1" in
  bound)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for s in $dns; do echo "nameserver $s" >> /etc/resolv.conf; done
    echo "VIRIDIAN-GUEST: dhcp bound $ip router $router dns $dns"
    ;;
  renew)
    # udhcpc runs in the background by now, its output on /dev/null.
    echo "VIRIDIAN-GUEST: dhcp renew $ip" > /dev/console
    ;;
esac
EOS
chmod +x /tmp/dhcp.sh
udhcpc -i eth0 -s /tmp/dhcp.sh -x hostname:natguest -t 60 -T 2 -A 2 || echo "VIRIDIAN-GUEST: no lease"
look() { echo "VIRIDIAN-GUEST: lookup $1 $(nslookup "$1" 10.55.0.1 2>&1 | grep -A9 "^Name:" | grep -o 'Address: [0-9.]*' | head -1)"; }
look host.viridian.internal
look natguest.viridian.internal
# HTTP by hand over nc: this guest's static busybox wget crashes looking up the
# "http" service (getservbyname without glibc's NSS modules).
printf 'GET /payload.bin HTTP/1.0\r\nHost: 203.0.113.2\r\n\r\n' | nc -w 30 203.0.113.2 8080 > /tmp/response
head -1 /tmp/response
header=$(sed -n '1,/^\r$/p' /tmp/response | wc -c)
tail -c +$((header + 1)) /tmp/response > /tmp/payload
echo "VIRIDIAN-GUEST: fetched $(sha256sum /tmp/payload | cut -d' ' -f1)"
while true; do
  sleep 3
  kill -USR1 $(pidof udhcpc) 2>/dev/null
done
"#;

/// `viridian` beside `viridiand`; built on demand when only this crate was built.
fn cli() -> std::path::PathBuf {
    let daemon = std::path::Path::new(env!("CARGO_BIN_EXE_viridiand"));
    let cli = daemon.with_file_name("viridian");
    // Built every time (a no-op when fresh): a stale binary would lack new commands.
    {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "cli", "--bin", "viridian"]);
        if daemon.to_string_lossy().contains("/release/") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "cannot build viridian");
    }
    cli
}

fn console(d: &Daemon) -> String {
    common::guest::console(d, "g")
}

fn wait_console(d: &Daemon, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let last = console(d);
        if last.contains(needle) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on the console:\n{last}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn renewals(d: &Daemon) -> usize {
    console(d).matches("VIRIDIAN-GUEST: dhcp renew").count()
}

/// Waits until the guest has renewed its lease `at_least` times in all.
fn wait_renewals(d: &Daemon, at_least: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while renewals(d) < at_least {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}\n{}",
            console(d),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_guest_on_a_nat_switch_gets_a_lease_resolves_names_and_fetches_through_the_masquerade() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start_in_netns(&[]);
    let _workers = common::guest::KillWorkersOnDrop(d.data.clone());
    let mut ours = KillOnDrop(Vec::new());

    // The internet: a namespace of its own, a veth to the daemon's, whose
    // default route goes there; an HTTP server in it serving a file.
    let internet = Command::new("unshare")
        .args(["--net", "--", "sleep", "infinity"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let inet = internet.id();
    ours.0.push(internet);
    let me = std::fs::read_link("/proc/self/ns/net").unwrap();
    wait_for("the internet's namespace", Duration::from_secs(10), || {
        std::fs::read_link(format!("/proc/{inet}/ns/net")).is_ok_and(|n| n != me)
    });
    sh(
        &d,
        &format!("ip link add uplink0 type veth peer name uplink1 netns {inet} && ip addr add 203.0.113.1/24 dev uplink0 && ip link set uplink0 up && ip route add default via 203.0.113.2"),
    );
    for cmd in [
        "ip link set lo up",
        "ip addr add 203.0.113.2/24 dev uplink1",
        "ip link set uplink1 up",
    ] {
        let args: Vec<&str> = cmd.split(' ').skip(1).collect();
        let (ok, out) = nsenter(inet, "ip", &args);
        assert!(ok, "{cmd}: {out}");
    }
    let www = d.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let payload: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(www.join("payload.bin"), &payload).unwrap();
    std::fs::write(www.join("ready.txt"), b"ready").unwrap();
    let sum = Command::new("sha256sum")
        .arg(www.join("payload.bin"))
        .output()
        .unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let server_log = d.dir.path().join("http.log");
    let server = Command::new("nsenter")
        .arg(format!("--net=/proc/{inet}/ns/net"))
        .args([
            "--",
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "203.0.113.2",
            "--directory",
        ])
        .arg(&www)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&server_log).unwrap())
        .spawn()
        .unwrap();
    ours.0.push(server);
    wait_for("the HTTP server", Duration::from_secs(20), || {
        d.in_netns(
            "busybox",
            &[
                "wget",
                "-q",
                "-O",
                "/dev/null",
                "http://203.0.113.2:8080/ready.txt",
            ],
        )
        .0
    });

    let r = d.post(
        "/v1/switches",
        json!({"name": "nat", "type": "nat", "host_addresses": ["10.55.0.1/24"]}),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.raw, d.log());
    let bridge = r.body["bridge"].as_str().unwrap().to_string();

    scripted_vm(&d, &guest, "g", GUEST);
    let r = d.post("/v1/vms/g/network-adapters", json!({"switch": "nat"}));
    assert_eq!(r.status, 201, "{}", r.raw);
    let mac = r.body["mac"].as_str().unwrap().to_ascii_lowercase();
    let vm_id = d.get("/v1/vms/g").body["settings"]["id"].clone();
    let r = d.post("/v1/vms/g/start", json!({}));
    assert_eq!(r.status, 202, "{}", r.raw);
    let job = wait_job(&d, r.body["id"].as_str().unwrap());
    assert_eq!(job["state"], "Completed", "{job}\n{}", d.log());

    // The lease: in the guest, and listed with its MAC, hostname and VM.
    let text = wait_console(&d, "VIRIDIAN-GUEST: dhcp bound", Duration::from_secs(240));
    let bound = text
        .lines()
        .find(|l| l.contains("VIRIDIAN-GUEST: dhcp bound"))
        .unwrap()
        .to_string();
    let ip = bound.split_whitespace().nth(3).unwrap().to_string();
    assert!(ip.starts_with("10.55.0."), "{bound}");
    assert!(
        bound.contains("router 10.55.0.1") && bound.contains("dns 10.55.0.1"),
        "{bound}"
    );
    let leases = d.get("/v1/switches/nat/leases").body;
    let list = leases["leases"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{leases}");
    let l = &list[0];
    assert_eq!(
        (l["mac"].as_str(), l["ip"].as_str(), l["hostname"].as_str()),
        (Some(mac.as_str()), Some(ip.as_str()), Some("natguest")),
        "{leases}"
    );
    assert_eq!(
        (&l["vm"], l["vm_name"].as_str()),
        (&vm_id, Some("g")),
        "{leases}"
    );
    assert!(l["expires"].as_str().unwrap().ends_with('Z'), "{leases}");
    // The CLI's table says the same.
    let out = Command::new(cli())
        .arg("--socket")
        .arg(&d.socket)
        .args(["switch", "leases", "nat"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table.lines().find(|l| l.starts_with(&mac)).unwrap_or("");
    assert!(
        row.contains(&ip) && row.contains("natguest") && row.ends_with(" g"),
        "{table}"
    );

    // Names the DNS knows: the host's and the guest's own (from its lease).
    let text = wait_console(
        &d,
        "VIRIDIAN-GUEST: lookup natguest",
        Duration::from_secs(60),
    );
    assert!(
        text.contains("VIRIDIAN-GUEST: lookup host.viridian.internal Address: 10.55.0.1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "VIRIDIAN-GUEST: lookup natguest.viridian.internal Address: {ip}"
        )),
        "{text}"
    );
    // The file, through the masquerade: the internet saw the daemon's address.
    let text = wait_console(&d, "VIRIDIAN-GUEST: fetch", Duration::from_secs(120));
    assert!(
        text.contains(&format!("VIRIDIAN-GUEST: fetched {sum}")),
        "{text}\n{}",
        std::fs::read_to_string(&server_log).unwrap_or_default()
    );
    let seen = std::fs::read_to_string(&server_log).unwrap();
    let guest_gets: Vec<&str> = seen
        .lines()
        .filter(|l| l.contains("GET /payload.bin"))
        .collect();
    assert_eq!(guest_gets.len(), 1, "{seen}");
    assert!(
        guest_gets.iter().all(|l| l.starts_with("203.0.113.1 ")),
        "the internet saw another address than the host's: {seen}"
    );
    assert!(!seen.contains("10.55.0."), "{seen}");

    // Renewals go on; dnsmasq killed: restarted, and the lease renews again.
    wait_renewals(&d, 1, "a first renewal");
    let sw = d.get("/v1/switches/nat").body;
    let pid = sw["nat"]["dnsmasq_pid"].as_u64().unwrap();
    // SAFETY: kill(2) on the dnsmasq this test's daemon started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_for("dnsmasq to be restarted", Duration::from_secs(30), || {
        let n = &d.get("/v1/switches/nat").body["nat"];
        n["dnsmasq_restarts"] == 1 && n["dnsmasq_pid"].as_u64().is_some_and(|p| p != pid)
    });
    assert!(d.log().contains("died; restarting it"), "{}", d.log());
    std::thread::sleep(Duration::from_secs(1));
    let after_kill = renewals(&d);
    wait_renewals(&d, after_kill + 2, "renewals from the new dnsmasq");
    // A daemon restart: a new dnsmasq at once, the lease kept and renewed.
    d.restart();
    let n = &d.get("/v1/switches/nat").body["nat"];
    assert!(n["dnsmasq_pid"].as_u64().is_some(), "{n}\n{}", d.log());
    let after_restart = renewals(&d);
    wait_renewals(&d, after_restart + 2, "renewals after the daemon's restart");
    let leases = d.get("/v1/switches/nat/leases").body;
    assert_eq!(
        leases["leases"][0]["ip"].as_str(),
        Some(ip.as_str()),
        "{leases}"
    );
    let console_now = console(&d);
    assert_eq!(
        console_now.matches("VIRIDIAN-GUEST: dhcp bound").count(),
        1,
        "the guest had to start over for an address:\n{console_now}"
    );

    // Deleted: no table, no dnsmasq, no lease file.
    let job = act(&d, "g", "stop");
    assert_eq!(job["state"], "Completed", "{job}");
    let r = d.req("DELETE", "/v1/switches/nat?force=true", None);
    assert_eq!(r.status, 204, "{}", r.raw);
    assert!(our_tables(&d).is_empty(), "{:?}", our_tables(&d));
    assert!(our_dnsmasqs(&d).is_empty());
    let (_, links) = d.in_netns("ip", &["-o", "link", "show"]);
    assert!(!links.contains(&bridge), "{links}");
    let left: Vec<_> = std::fs::read_dir(d.data.join("switches"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
