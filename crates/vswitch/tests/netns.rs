//! The kernel objects, made for real inside a network namespace of the test's own
//! (never the host's), checked with `ip`, the tool an admin would look with.

use std::process::Command;

use vswitch::{bridge_name, tap_name, Cidr, Ensured, Host, SwitchError};

/// Runs `f` on a thread of its own that first moves into a new network namespace;
/// the netlink socket, the taps and the `ip` children all live there. The
/// namespace goes away with the thread.
fn in_new_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f());
    })
    .join()
    .unwrap();
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn line_of(listing: &str, name: &str) -> String {
    listing
        .lines()
        .find(|l| l.contains(&format!(": {name}:")) || l.contains(&format!(": {name}@")))
        .unwrap_or_else(|| panic!("{name} not in\n{listing}"))
        .to_string()
}

#[test]
fn bridge_taps_and_addresses_as_ip_shows_them() {
    in_new_netns(|| async {
        let host = Host::connect().unwrap();
        let br = bridge_name(0x1a2b3c4d << 96);
        assert_eq!(host.ensure_bridge(&br).await.unwrap(), Ensured::Created);
        assert_eq!(host.ensure_bridge(&br).await.unwrap(), Ensured::Existed);
        let links = ip(&["-o", "-d", "link", "show"]);
        let l = line_of(&links, &br);
        assert!(l.contains("bridge"), "{l}");
        assert!(l.contains(",UP"), "{l}");

        let (t1, t2) = (tap_name(1), tap_name(2));
        host.create_tap(&t1, &br).await.unwrap();
        host.create_tap(&t2, &br).await.unwrap();
        // Again: kept, still on the bridge.
        host.create_tap(&t1, &br).await.unwrap();
        let links = ip(&["-o", "-d", "link", "show"]);
        for t in [&t1, &t2] {
            let l = line_of(&links, t);
            assert!(l.contains(&format!("master {br}")), "{l}");
            assert!(l.contains("tun type tap") || l.contains("tap"), "{l}");
        }

        let v4: Cidr = "10.44.0.1/24".parse().unwrap();
        let v6: Cidr = "fd00:44::1/64".parse().unwrap();
        host.set_addresses(&br, &[v4, v6]).await.unwrap();
        let addrs = ip(&["-o", "addr", "show", "dev", &br]);
        assert!(addrs.contains("inet 10.44.0.1/24"), "{addrs}");
        assert!(addrs.contains("inet6 fd00:44::1/64"), "{addrs}");
        assert_eq!(host.addresses(&br).await.unwrap(), vec![v4, v6]);
        // The route the host reaches the guests by.
        let routes = ip(&["-4", "route"]);
        assert!(
            routes.contains(&format!("10.44.0.0/24 dev {br}")),
            "{routes}"
        );

        host.set_addresses(&br, &[v6]).await.unwrap();
        let addrs = ip(&["-o", "addr", "show", "dev", &br]);
        assert!(!addrs.contains("10.44.0.1"), "{addrs}");
        assert!(addrs.contains("fd00:44::1/64"), "{addrs}");

        host.detach(&t2).await.unwrap();
        let l = line_of(&ip(&["-o", "link", "show"]), &t2);
        assert!(!l.contains("master"), "{l}");
        host.attach(&t2, &br).await.unwrap();
        assert!(line_of(&ip(&["-o", "link", "show"]), &t2).contains(&format!("master {br}")));
        host.detach(&t2).await.unwrap();
        let t3 = tap_name(3);
        host.create_detached_tap(&t3).await.unwrap();
        host.create_detached_tap(&t3).await.unwrap();
        let l = line_of(&ip(&["-o", "-d", "link", "show"]), &t3);
        assert!(!l.contains("master") && l.contains("tap"), "{l}");
        host.delete_link(&t3).await.unwrap();

        let ours: Vec<String> = host
            .our_links()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(ours.len(), 3, "{ours:?}");
        for name in &ours {
            host.delete_link(name).await.unwrap();
        }
        // Gone is fine the second time.
        host.delete_link(&t1).await.unwrap();
        let links = ip(&["-o", "link", "show"]);
        assert!(!links.contains("vsw"), "{links}");
        assert!(host.our_links().await.unwrap().is_empty());
    });
}

#[test]
fn refuses_foreign_names_and_wrong_kinds() {
    in_new_netns(|| async {
        let host = Host::connect().unwrap();
        ip(&["link", "add", "br-host", "type", "bridge"]);
        assert!(matches!(
            host.delete_link("br-host").await,
            Err(SwitchError::NotOurs(_))
        ));
        assert!(matches!(
            host.create_tap("eth1", "br-host").await,
            Err(SwitchError::NotOurs(_))
        ));
        line_of(&ip(&["-o", "link"]), "br-host");

        // A leftover of ours that is not a bridge is named, not silently used.
        ip(&[
            "link",
            "add",
            "vsw-0000beef",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
        ]);
        let err = host.ensure_bridge("vsw-0000beef").await.unwrap_err();
        assert!(matches!(err, SwitchError::WrongKind { .. }), "{err}");
        assert!(
            err.to_string().contains("ip link delete vsw-0000beef"),
            "{err}"
        );

        let err = host
            .create_tap(&tap_name(7), "vsw-absent0")
            .await
            .unwrap_err();
        assert!(
            matches!(err, SwitchError::NoSuchLink(ref n) if n == "vsw-absent0"),
            "{err}"
        );
    });
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn guards_are_one_table_of_chains_per_port_and_go_with_the_last_port() {
    use vswitch::guards::{self, PortGuards};
    in_new_netns(|| async {
        let (t1, t2) = (tap_name(1), tap_name(2));
        let mut g = PortGuards {
            mac: "52:54:00:00:00:01".into(),
            mac_address_spoofing: false,
            dhcp_guard: false,
            router_guard: false,
        };
        guards::apply(&t1, &g).await.unwrap();
        let rules = run("nft", &["list", "ruleset"]);
        assert!(rules.contains("table bridge viridian"), "{rules}");
        assert!(
            rules.contains(&format!(
                "ether saddr != 52:54:00:00:00:01 counter name \"{t1}-mac\" drop"
            )),
            "{rules}"
        );
        assert!(!rules.contains("udp sport 67"), "{rules}");
        // A change replaces the port's rules (applied twice: still once each).
        g.dhcp_guard = true;
        g.router_guard = true;
        guards::apply(&t1, &g).await.unwrap();
        guards::apply(&t1, &g).await.unwrap();
        let rules = run("nft", &["list", "ruleset"]);
        assert_eq!(rules.matches("udp sport 67").count(), 1, "{rules}");
        assert_eq!(rules.matches("iifname vmap @port").count(), 1, "{rules}");
        assert!(rules.contains("nd-router-advert"), "{rules}");
        guards::apply(
            &t2,
            &PortGuards {
                mac: "52:54:00:00:00:02".into(),
                ..g.clone()
            },
        )
        .await
        .unwrap();
        let mut ports = guards::ports().await.unwrap();
        ports.sort();
        assert_eq!(ports, [t1.clone(), t2.clone()]);
        let drops = guards::drops().await.unwrap();
        assert_eq!(drops.len(), 2);
        assert_eq!(drops[0].1, guards::GuardDrops::default());
        guards::remove(&t1).await.unwrap();
        let rules = run("nft", &["list", "ruleset"]);
        assert!(!rules.contains(&t1) && rules.contains(&t2), "{rules}");
        guards::remove(&t2).await.unwrap();
        guards::remove(&t2).await.unwrap();
        let rules = run("nft", &["list", "ruleset"]);
        assert!(rules.trim().is_empty(), "{rules}");
    });
}

#[test]
fn a_bandwidth_limit_is_a_tbf_each_way_and_goes_without_a_trace() {
    use vswitch::shaping;
    in_new_netns(|| async {
        let host = Host::connect().unwrap();
        let br = bridge_name(0x1a2b3c4d << 96);
        host.ensure_bridge(&br).await.unwrap();
        let tap = tap_name(7);
        host.create_tap(&tap, &br).await.unwrap();
        let ifb = shaping::ifb_for(&tap);
        shaping::set_bandwidth(&host, &tap, Some(10_000_000))
            .await
            .unwrap();
        shaping::set_bandwidth(&host, &tap, Some(20_000_000))
            .await
            .unwrap();
        let q = run("tc", &["-j", "qdisc", "show", "dev", &tap]);
        let q: serde_json::Value = serde_json::from_str(&q).unwrap();
        let kinds: Vec<&str> = q
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["tbf", "ingress"], "{q}");
        assert_eq!(q[0]["options"]["rate"], 2_500_000, "{q}");
        let f = run(
            "tc",
            &["-j", "filter", "show", "dev", &tap, "parent", "ffff:"],
        );
        assert!(f.contains(&format!("\"to_dev\":\"{ifb}\"")), "{f}");
        let q = run("tc", &["-j", "qdisc", "show", "dev", &ifb]);
        assert!(
            q.contains("\"kind\":\"tbf\"") && q.contains("2500000"),
            "{q}"
        );
        shaping::set_bandwidth(&host, &tap, None).await.unwrap();
        let q = run("tc", &["-j", "qdisc", "show", "dev", &tap]);
        assert!(!q.contains("tbf") && !q.contains("ingress"), "{q}");
        assert!(host.link(&ifb).await.unwrap().is_none());
        // Again, and on a tap that is gone: nothing to do.
        shaping::clear(&host, &tap).await.unwrap();
        host.delete_link(&tap).await.unwrap();
        shaping::clear(&host, &tap).await.unwrap();
    });
}

#[test]
fn an_uplinks_addresses_and_routes_move_to_the_bridge_and_back() {
    in_new_netns(|| async {
        ip(&[
            "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
        ]);
        ip(&["link", "set", "lan0", "up"]);
        ip(&["link", "set", "lan1", "up"]);
        ip(&["addr", "add", "192.0.2.1/24", "dev", "lan0"]);
        ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.0.2.254",
            "dev",
            "lan0",
            "metric",
            "100",
        ]);
        ip(&[
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            "192.0.2.254",
            "dev",
            "lan0",
            "metric",
            "50",
        ]);
        let host = Host::connect().unwrap();
        let lan0 = host.link("lan0").await.unwrap().unwrap();
        let addrs = host.host_addresses("lan0").await.unwrap();
        let routes = host.host_routes("lan0").await.unwrap();
        assert_eq!(addrs.len(), 1, "{addrs:?}");
        let shown: Vec<String> = routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "default via 192.0.2.254 metric 100",
                "198.51.100.0/24 via 192.0.2.254 metric 50"
            ],
            "the kernel's subnet route is not among them"
        );
        let br = bridge_name(0x5e5e_0000 << 96);
        host.ensure_bridge_with_mac(&br, Some(&lan0.mac))
            .await
            .unwrap();
        host.enslave("lan0", &br).await.unwrap();
        host.add_host_addresses(&br, &addrs, true).await.unwrap();
        host.remove_host_addresses("lan0", &addrs).await.unwrap();
        host.remove_host_routes("lan0", &routes).await.unwrap();
        host.add_host_routes(&br, &routes).await.unwrap();
        // Again, as after a restart cut off halfway: nothing fails, nothing doubles.
        host.enslave("lan0", &br).await.unwrap();
        host.add_host_addresses(&br, &addrs, true).await.unwrap();
        host.add_host_routes(&br, &routes).await.unwrap();
        let bridge = host.link(&br).await.unwrap().unwrap();
        assert_eq!(bridge.mac, lan0.mac);
        assert_eq!(
            host.link("lan0").await.unwrap().unwrap().master,
            Some(bridge.index)
        );
        assert_eq!(host.host_addresses(&br).await.unwrap().len(), 1);
        assert!(host.host_addresses("lan0").await.unwrap().is_empty());
        assert_eq!(host.host_routes(&br).await.unwrap(), routes);
        assert!(host.host_routes("lan0").await.unwrap().is_empty());
        // And back.
        host.release("lan0", &br).await.unwrap();
        host.add_host_addresses("lan0", &addrs, false)
            .await
            .unwrap();
        host.delete_link(&br).await.unwrap();
        host.add_host_routes("lan0", &routes).await.unwrap();
        let back = host.link("lan0").await.unwrap().unwrap();
        assert_eq!((back.master, back.up), (None, true));
        assert_eq!(host.host_addresses("lan0").await.unwrap(), addrs);
        assert_eq!(host.host_routes("lan0").await.unwrap(), routes);
    });
}
