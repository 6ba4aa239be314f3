//! `viridian switch create|list|show|set|delete|leases`.

use api::switches::{
    CreateSwitchRequest, LeaseList, Switch, SwitchKind, SwitchList, UpdateSwitchRequest,
};
use clap::Subcommand;
use hyper::Method;

use crate::client::segment;
use crate::connection::Connection;
use crate::failure::Failure;
use crate::output;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    /// VMs on it reach each other, nothing else.
    Private,
    /// VMs on it and the host (which gets the --host-address addresses).
    Internal,
    /// Internal, plus the IPv4 subnet masqueraded to the host's default route,
    /// and DHCP and DNS for the VMs (dnsmasq).
    Nat,
    /// VMs on the network of a host interface (--adapter), as the host is.
    External,
}

#[derive(Subcommand, Debug)]
pub enum SwitchCmd {
    /// Create a virtual switch (a bridge on the host).
    Create {
        name: String,
        #[arg(long = "type", value_enum, default_value = "private")]
        kind: Kind,
        /// The host's address on an internal switch, with its prefix length
        /// (10.44.0.1/24, fd00:44::1/64); repeat for more.
        #[arg(long = "host-address", value_name = "CIDR")]
        host_addresses: Vec<String>,
        /// NAT switches: the addresses DHCP hands out (10.55.0.100-10.55.0.200);
        /// the larger side of the subnet around the host's address unless given.
        #[arg(long = "dhcp-range", value_name = "START-END")]
        dhcp_range: Option<String>,
        /// External switches: the host interface that becomes the uplink (eth0).
        #[arg(long, value_name = "INTERFACE")]
        adapter: Option<String>,
        /// External switches: the host shares the uplink; its addresses and
        /// routes move from the interface to the switch (and back at delete).
        #[arg(long)]
        allow_management_os: bool,
    },
    /// The virtual switches.
    List,
    /// One switch: type, bridge, host addresses, the adapters on it.
    Show { switch: String },
    /// Rename a switch or replace its host addresses.
    Set {
        switch: String,
        #[arg(long)]
        name: Option<String>,
        /// Replaces all host addresses; repeat for more.
        #[arg(long = "host-address", value_name = "CIDR")]
        host_addresses: Vec<String>,
        /// Remove every host address.
        #[arg(long, conflicts_with = "host_addresses")]
        no_host_addresses: bool,
        /// NAT switches: a new DHCP range (START-END); "" for the derived one.
        #[arg(long = "dhcp-range", value_name = "START-END")]
        dhcp_range: Option<String>,
    },
    /// A NAT switch's DHCP leases: MAC, address, hostname, expiry, and the VM
    /// whose adapter has the MAC.
    Leases { switch: String },
    /// Delete a switch. One that adapters are on is refused unless --force,
    /// which disconnects them.
    Delete {
        switch: String,
        #[arg(long)]
        force: bool,
    },
}

fn path(switch: &str) -> String {
    format!("/v1/switches/{}", segment(switch))
}

fn details(s: &Switch) {
    println!("{} ({})", s.name, s.id);
    println!("  type:        {}", s.kind.name());
    println!(
        "  bridge:      {}{}",
        s.bridge,
        if s.present {
            ""
        } else {
            " (missing on the host)"
        }
    );
    for a in &s.host_addresses {
        println!("  host:        {a}");
    }
    if let Some(n) = &s.nat {
        println!("  masquerade:  {} (nft table {})", n.subnet, n.nft_table);
        println!("  dhcp range:  {}", n.dhcp_range);
        println!(
            "  dns:         *.{} ({} is the host)",
            n.domain, n.host_name
        );
        match n.dnsmasq_pid {
            Some(pid) => println!(
                "  dnsmasq:     running, pid {pid}, restarted {} times",
                n.dnsmasq_restarts
            ),
            None => println!("  dnsmasq:     not running"),
        }
        if let Some(p) = &n.problem {
            println!("  problem:     {p}");
        }
    }
    if let Some(u) = &s.uplink {
        println!(
            "  uplink:      {} ({}){}",
            u.adapter,
            if u.connected {
                "connected"
            } else {
                "not connected"
            },
            if s.allow_management_os {
                ", shared with the host"
            } else {
                ", the host has no presence on it"
            }
        );
        for r in &u.moved_routes {
            println!("  host route:  {r}");
        }
        if let Some(p) = &u.problem {
            println!("  problem:     {p}");
        }
    }
    for a in &s.adapters {
        println!("  adapter:     {} of {} ({})", a.mac, a.vm_name, a.vm);
    }
}

pub fn run(cmd: SwitchCmd, conn: &Connection) -> Result<(), Failure> {
    let client = conn.client()?;
    match cmd {
        SwitchCmd::Create {
            name,
            kind,
            host_addresses,
            dhcp_range,
            adapter,
            allow_management_os,
        } => {
            let req = CreateSwitchRequest {
                name,
                kind: match kind {
                    Kind::Private => SwitchKind::Private,
                    Kind::Internal => SwitchKind::Internal,
                    Kind::Nat => SwitchKind::Nat,
                    Kind::External => SwitchKind::External,
                },
                host_addresses,
                dhcp_range,
                adapter,
                allow_management_os,
            };
            let (s, _) = client.call::<Switch>(Method::POST, "/v1/switches", Some(&req))?;
            if conn.json {
                output::print_json(&s);
            } else {
                println!(
                    "created {} switch {} (bridge {})",
                    s.kind.name(),
                    s.name,
                    s.bridge
                );
            }
        }
        SwitchCmd::List => {
            let list: SwitchList = client.get("/v1/switches")?;
            if conn.json {
                output::print_json(&list);
            } else {
                println!(
                    "{:<24} {:<9} {:<13} HOST ADDRESSES",
                    "NAME", "TYPE", "BRIDGE"
                );
                for s in &list.switches {
                    println!(
                        "{:<24} {:<9} {:<13} {}",
                        s.name,
                        s.kind.name(),
                        s.bridge,
                        s.host_addresses.join(", ")
                    );
                }
            }
        }
        SwitchCmd::Show { switch } => {
            let s: Switch = client.get(&path(&switch))?;
            if conn.json {
                output::print_json(&s);
            } else {
                details(&s);
            }
        }
        SwitchCmd::Set {
            switch,
            name,
            host_addresses,
            no_host_addresses,
            dhcp_range,
        } => {
            let req = UpdateSwitchRequest {
                name,
                host_addresses: if no_host_addresses {
                    Some(Vec::new())
                } else if host_addresses.is_empty() {
                    None
                } else {
                    Some(host_addresses)
                },
                dhcp_range,
                allow_management_os: None,
            };
            let (s, _) = client.call::<Switch>(Method::PATCH, &path(&switch), Some(&req))?;
            if conn.json {
                output::print_json(&s);
            } else {
                details(&s);
            }
        }
        SwitchCmd::Leases { switch } => {
            let list: LeaseList = client.get(&format!("{}/leases", path(&switch)))?;
            if conn.json {
                output::print_json(&list);
            } else if let Some(reason) = &list.reason {
                println!("no leases: {reason}");
            } else {
                println!(
                    "{:<17} {:<15} {:<20} {:<20} VM",
                    "MAC", "ADDRESS", "HOSTNAME", "EXPIRES"
                );
                for l in &list.leases {
                    println!(
                        "{:<17} {:<15} {:<20} {:<20} {}",
                        l.mac,
                        l.ip,
                        l.hostname.as_deref().unwrap_or("-"),
                        l.expires.as_deref().unwrap_or("never"),
                        l.vm_name.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        SwitchCmd::Delete { switch, force } => {
            let p = if force {
                format!("{}?force=true", path(&switch))
            } else {
                path(&switch)
            };
            client.call_empty(Method::DELETE, &p)?;
            if !conn.json {
                println!("deleted switch {switch}");
            }
        }
    }
    Ok(())
}
