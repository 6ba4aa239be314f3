//! External switches: a host interface (the uplink) made a port of the switch's
//! bridge, and, when the host shares it, the host's addresses and routes moved
//! from the interface to the bridge and back.
//!
//! What is moved is written to the switch's file before the host changes, so a
//! service cut off halfway finishes the move at its next start, and a deletion
//! cut off halfway gives the uplink back (`UplinkRecord::deleting`).

use api::switches::{SwitchKind, UplinkInfo};
use api::ErrorCode;
use vswitch::uplink::{HostAddress, HostRoute};
use vswitch::vlan::PortVlans;
use vswitch::Host;

use super::store::{self, UplinkRecord};
use super::{bridge_of, host_error, lock, SwitchSettings, Switches};
use crate::error::ApiError;
use crate::vms::store::error_chain;

/// Link kinds that cannot be an uplink: a bridge (its ports can), a VM's tap
/// or another service's, an ifb (a shaping device), a VXLAN or the like stays
/// possible.
const REFUSED_KINDS: &[(&str, &str)] = &[
    ("bridge", "is a bridge; make one of its ports the uplink instead, after taking it off that bridge"),
    ("tun", "is a tap or tun device (a VM's port or a VPN's); give the host interface of the physical network"),
    ("ifb", "is an ifb (a traffic-shaping device); give the host interface of the physical network"),
];

/// Checks the request's fields that belong to external switches.
pub(super) fn check_fields(
    kind: SwitchKind,
    adapter: Option<&str>,
    allow_management_os: bool,
    host_addresses: &[String],
) -> Result<(), ApiError> {
    match (kind, adapter) {
        (SwitchKind::External, None) => Err(ApiError::invalid(
            "an external switch needs the host interface it puts its VMs' network on: give adapter (`--adapter eth0`; `ip link` lists them)",
        )),
        (SwitchKind::External, Some(_)) if !host_addresses.is_empty() => Err(ApiError::invalid(
            "an external switch's host addresses are the uplink's own: leave out host_addresses, and give allow_management_os to keep the host's addresses of the interface on the switch",
        )),
        (SwitchKind::External, Some(name)) => {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) || name.chars().any(char::is_control) {
                return Err(ApiError::invalid(format!(
                    "{name:?} cannot be a Linux interface name (1 to 15 bytes, no `/`, no white space)"
                )));
            }
            Ok(())
        }
        (other, Some(_)) => Err(ApiError::invalid(format!(
            "only an external switch has an uplink adapter; a {} switch has none (create it with type external to use a host interface)",
            other.name()
        ))),
        (other, None) if allow_management_os => Err(ApiError::invalid(format!(
            "allow_management_os is for external switches (the host sharing their uplink); a {} switch has no uplink",
            other.name()
        ))),
        _ => Ok(()),
    }
}

impl Switches {
    /// Checks that the host interface `name` can become the uplink of a new
    /// external switch, and reads what would move off it.
    pub(super) async fn plan_uplink(
        &self,
        name: &str,
        allow_management_os: bool,
    ) -> Result<UplinkRecord, ApiError> {
        let taken = lock(&self.entries)
            .values()
            .find(|s| s.adapter.as_deref() == Some(name))
            .cloned();
        if let Some(other) = taken {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "{name} is already the uplink of the external switch {}; a host interface can be the uplink of one switch",
                    other.name
                ),
            ));
        }
        let host = self.host()?;
        let link = host.link(name).await.map_err(host_error)?.ok_or_else(|| {
            ApiError::invalid(format!(
                "this host has no network interface named {name}; `ip link` lists them"
            ))
        })?;
        if link.loopback {
            return Err(ApiError::invalid(format!(
                "{name} is the loopback interface, which reaches no network; give the host interface of the physical network"
            )));
        }
        if vswitch::check_ours(name).is_ok() {
            return Err(ApiError::invalid(format!(
                "{name} is a link Viridian made (a switch's bridge or a VM's port); give a host interface"
            )));
        }
        if let Some((_, why)) = REFUSED_KINDS.iter().find(|(k, _)| *k == link.kind) {
            return Err(ApiError::invalid(format!("{name} {why}")));
        }
        if let Some(master) = link.master {
            let bridge = host
                .link_by_index(master)
                .await
                .map_err(host_error)?
                .map_or_else(|| format!("index {master}"), |l| l.name);
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "{name} is already a port of {bridge}; take it off first (`ip link set {name} nomaster`) or give another interface"
                ),
            ));
        }
        let addresses = host.host_addresses(name).await.map_err(host_error)?;
        if !addresses.is_empty() && !allow_management_os {
            let shown: Vec<String> = addresses.iter().map(|a| a.cidr.to_string()).collect();
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "{name} holds the host's addresses {}; a port of a switch's bridge carries no addresses, so the host would lose them: give allow_management_os (`--allow-management-os`) to move them to the switch, or choose an interface without addresses",
                    shown.join(", ")
                ),
            ));
        }
        let routes = if allow_management_os {
            host.host_routes(name).await.map_err(host_error)?
        } else {
            Vec::new()
        };
        Ok(UplinkRecord {
            addresses,
            routes,
            deleting: false,
        })
    }

    /// Makes the uplink a port of the switch's bridge and moves what the record
    /// says onto the bridge. Every step is idempotent: run again after a start
    /// cut off halfway, it finishes.
    pub(super) async fn attach_uplink(
        &self,
        host: &Host,
        s: &SwitchSettings,
    ) -> Result<(), vswitch::SwitchError> {
        let Some(adapter) = s.adapter.as_deref() else {
            return Ok(());
        };
        let record = s.uplink.clone().unwrap_or_default();
        let bridge = bridge_of(s.id);
        let link = host
            .link(adapter)
            .await?
            .ok_or_else(|| vswitch::SwitchError::NoSuchLink(adapter.into()))?;
        // The bridge answers with the uplink's MAC: the network sees the host
        // where it was.
        host.ensure_bridge_with_mac(&bridge, Some(&link.mac))
            .await?;
        if !s.allow_management_os {
            // The host has no presence on the network: no IPv6 link-local
            // address, no addresses from router advertisements.
            set_ipv6(&bridge, false);
        }
        host.enslave(adapter, &bridge).await?;
        if self.vlan.bridge_vlan_filtering {
            // The uplink carries every VLAN tagged and the untagged default.
            host.set_port_vlans(
                adapter,
                &PortVlans::Trunk {
                    allowed: vec![(2, 4094)],
                    native: Some(vswitch::vlan::DEFAULT_PVID),
                },
            )
            .await?;
        }
        if s.allow_management_os {
            host.add_host_addresses(&bridge, &record.addresses, true)
                .await?;
            host.remove_host_addresses(adapter, &record.addresses)
                .await?;
            host.remove_host_routes(adapter, &record.routes).await?;
            host.add_host_routes(&bridge, &record.routes).await?;
        }
        Ok(())
    }

    /// Gives the uplink back: off the bridge, with the host's addresses and
    /// routes on it again, and the bridge removed. Idempotent like the attach.
    pub(super) async fn detach_uplink(
        &self,
        host: &Host,
        s: &SwitchSettings,
    ) -> Result<(), vswitch::SwitchError> {
        let bridge = bridge_of(s.id);
        let Some(adapter) = s.adapter.as_deref() else {
            return host.delete_link(&bridge).await;
        };
        let record = s.uplink.clone().unwrap_or_default();
        let present = host.link(adapter).await?.is_some();
        if present {
            host.release(adapter, &bridge).await?;
            if s.allow_management_os {
                host.add_host_addresses(adapter, &record.addresses, true)
                    .await?;
            }
        }
        self.prune_vlan_bridges(host, Some(s.id), true).await;
        host.delete_link(&bridge).await?;
        if present && s.allow_management_os {
            host.add_host_routes(adapter, &record.routes).await?;
        }
        Ok(())
    }

    /// Creates an external switch: its file (with what will move) first, then
    /// the host; a host step that fails undoes the others and the file.
    pub(super) async fn create_external(
        &self,
        mut s: SwitchSettings,
    ) -> Result<SwitchSettings, ApiError> {
        let adapter = s.adapter.clone().unwrap_or_default();
        s.uplink = Some(self.plan_uplink(&adapter, s.allow_management_os).await?);
        let host = self.host()?;
        store::save(&self.dir, &s).map_err(|e| {
            ApiError::internal(format!(
                "cannot write {}: {e}",
                store::path(&self.dir, s.id).display()
            ))
        })?;
        if let Err(e) = self.attach_uplink(host, &s).await {
            let why = error_chain(&e);
            let undone = self.detach_uplink(host, &s).await;
            let removed = store::remove(&self.dir, s.id);
            if let Err(u) = &undone {
                tracing::error!(switch = %s.id, "cannot give {adapter} back after a failed create: {}", error_chain(u));
            }
            if let Err(r) = &removed {
                tracing::error!(switch = %s.id, "cannot remove the switch file after a failed create: {r}");
            }
            return Err(ApiError::internal(format!(
                "cannot make {adapter} the uplink of the switch {}: {why}; {}",
                s.name,
                if undone.is_ok() && removed.is_ok() {
                    "nothing was changed".to_string()
                } else {
                    "undoing it failed too (the service's log says how); the next start of the service finishes the switch".to_string()
                }
            )));
        }
        lock(&self.entries).insert(s.id, s.clone());
        tracing::info!(switch = %s.id, name = %s.name, %adapter, allow_management_os = s.allow_management_os, moved_addresses = s.uplink.as_ref().map_or(0, |u| u.addresses.len()), "external switch created");
        Ok(s)
    }

    /// Deletes an external switch: marked as being deleted in its file, the
    /// uplink given back, then the file removed. Cut off halfway, the next start
    /// finishes it.
    pub(super) async fn delete_external(&self, mut s: SwitchSettings) -> Result<(), ApiError> {
        let host = self.host()?;
        s.uplink.get_or_insert_with(UplinkRecord::default).deleting = true;
        store::save(&self.dir, &s).map_err(|e| {
            ApiError::internal(format!(
                "cannot write {}: {e}",
                store::path(&self.dir, s.id).display()
            ))
        })?;
        lock(&self.entries).insert(s.id, s.clone());
        self.detach_uplink(host, &s).await.map_err(|e| {
            ApiError::internal(format!(
                "cannot give the uplink {} of the switch {} back to the host: {}; the switch is marked as being deleted, and deleting it again (or the next start of the service) finishes it",
                s.adapter.as_deref().unwrap_or(""),
                s.name,
                error_chain(&e)
            ))
        })?;
        store::remove(&self.dir, s.id).map_err(|e| {
            ApiError::internal(format!(
                "cannot remove {}: {e}",
                store::path(&self.dir, s.id).display()
            ))
        })?;
        lock(&self.entries).remove(&s.id);
        tracing::info!(switch = %s.id, adapter = ?s.adapter, "external switch deleted; its uplink is the host's again");
        Ok(())
    }

    /// At start: an external switch is made again (after a host reboot its
    /// interface holds the host's addresses again, which move too), or its
    /// deletion is finished.
    pub(super) async fn rebuild_external(&self, host: &Host, mut s: SwitchSettings) {
        let adapter = s.adapter.clone().unwrap_or_default();
        if s.uplink.as_ref().is_some_and(|u| u.deleting) {
            match self.detach_uplink(host, &s).await {
                Ok(()) => {
                    if let Err(e) = store::remove(&self.dir, s.id) {
                        tracing::error!(switch = %s.id, "cannot remove the file of a deleted switch: {e}");
                    } else {
                        lock(&self.entries).remove(&s.id);
                        tracing::info!(switch = %s.id, name = %s.name, %adapter, "the deletion of an external switch cut off at the last stop is finished");
                    }
                }
                Err(e) => {
                    tracing::error!(switch = %s.id, name = %s.name, "cannot finish deleting the switch (giving {adapter} back): {}", error_chain(&e))
                }
            }
            return;
        }
        if s.allow_management_os {
            // What the interface holds now moves too (the host's network
            // configuration put it back after a reboot, or an admin added it).
            let (now, routes) = match (
                host.host_addresses(&adapter).await,
                host.host_routes(&adapter).await,
            ) {
                (Ok(a), Ok(r)) => (a, r),
                _ => (Vec::new(), Vec::new()),
            };
            let record = s.uplink.get_or_insert_with(UplinkRecord::default);
            let before = record.clone();
            merge(&mut record.addresses, now);
            merge(&mut record.routes, routes);
            if *record != before {
                if let Err(e) = store::save(&self.dir, &s) {
                    tracing::error!(switch = %s.id, "cannot record the uplink's addresses: {e}");
                    return;
                }
                lock(&self.entries).insert(s.id, s.clone());
            }
        }
        match self.attach_uplink(host, &s).await {
            Ok(()) => {
                tracing::info!(switch = %s.id, name = %s.name, %adapter, "external switch ready")
            }
            Err(e) => {
                tracing::error!(switch = %s.id, name = %s.name, "cannot make {adapter} the uplink of the switch again: {}", error_chain(&e))
            }
        }
    }

    /// The uplink as it is now (`None` for other switch types).
    pub async fn uplink_info(&self, s: &SwitchSettings) -> Option<UplinkInfo> {
        let adapter = s.adapter.clone()?;
        let record = s.uplink.clone().unwrap_or_default();
        let (connected, problem) = match self.host() {
            Err(e) => (false, Some(e.message)),
            Ok(host) => {
                let bridge = host.link(&bridge_of(s.id)).await.ok().flatten();
                match (host.link(&adapter).await, bridge) {
                    (Ok(None), _) => (false, Some(format!("the host has no interface named {adapter} now; the switch connects it again at the service's next start once it is back"))),
                    (Err(e), _) => (false, Some(error_chain(&e))),
                    (Ok(Some(_)), None) => (false, Some(format!("the switch's bridge {} is missing; the service's next start makes it again", bridge_of(s.id)))),
                    (Ok(Some(l)), Some(b)) if l.master == Some(b.index) => (true, None),
                    (Ok(Some(_)), Some(_)) => (false, Some(format!("{adapter} is not a port of the switch's bridge {} (taken off by hand?); the service's next start puts it back", bridge_of(s.id)))),
                }
            }
        };
        Some(UplinkInfo {
            adapter,
            connected,
            moved_addresses: record
                .addresses
                .iter()
                .map(|a| a.cidr.to_string())
                .collect(),
            moved_routes: record.routes.iter().map(HostRoute::to_string).collect(),
            problem,
        })
    }
}

/// Adds to `into` what `more` holds that it does not.
fn merge<T: PartialEq>(into: &mut Vec<T>, more: Vec<T>) {
    for m in more {
        if !into.contains(&m) {
            into.push(m);
        }
    }
}

/// Turns IPv6 on or off on our link `name` (in this service's network namespace).
fn set_ipv6(name: &str, on: bool) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, if on { "0" } else { "1" }) {
        // A kernel without IPv6 has no such file, and nothing to turn off.
        tracing::debug!("cannot write {path}: {e}");
    }
}

/// The addresses an external switch holds for the host (for the subnet checks
/// of other switches).
pub fn moved_subnets(s: &SwitchSettings) -> Vec<vswitch::Cidr> {
    s.uplink
        .iter()
        .flat_map(|u| u.addresses.iter().map(|a: &HostAddress| a.cidr))
        .collect()
}
