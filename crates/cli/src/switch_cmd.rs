//! `viridian switch create|list|show|set|delete`.

use api::switches::{CreateSwitchRequest, Switch, SwitchKind, SwitchList, UpdateSwitchRequest};
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
    },
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
        } => {
            let req = CreateSwitchRequest {
                name,
                kind: match kind {
                    Kind::Private => SwitchKind::Private,
                    Kind::Internal => SwitchKind::Internal,
                },
                host_addresses,
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
            };
            let (s, _) = client.call::<Switch>(Method::PATCH, &path(&switch), Some(&req))?;
            if conn.json {
                output::print_json(&s);
            } else {
                details(&s);
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
