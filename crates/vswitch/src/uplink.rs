//! External switches' uplinks: a host interface enslaved to a switch's bridge,
//! and the host's own addresses and routes moved between the two (Hyper-V's
//! "allow management operating system to share this network adapter").
//!
//! Every step here is idempotent (an address already there, a route already
//! gone are fine), so a service that was cut off halfway can run the same steps
//! again from what it recorded and finish.

use std::net::IpAddr;

use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkBridge, LinkUnspec};

use crate::{check_ours, is_errno, netlink, Cidr, Ensured, Host, Link, SwitchError};

/// One of the host's addresses on an interface, as much of it as is moved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostAddress {
    pub cidr: Cidr,
    /// `IFA_F_*` flags that a user sets (`noprefixroute`, `nodad`, ...); the
    /// kernel's own (`permanent`, `tentative`, `secondary`) are left out.
    pub flags: u32,
    /// IPv4's broadcast address, when one was set.
    pub broadcast: Option<IpAddr>,
}

/// A route through an interface, as much of it as is moved: the kernel's own
/// routes (a subnet's route made with its address, IPv6 link-local and
/// multicast ones) are not, they follow the addresses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostRoute {
    /// The destination network (`0.0.0.0` / `::` with prefix 0: the default route).
    pub destination: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub metric: Option<u32>,
    pub table: u32,
    pub protocol: u8,
    pub scope: u8,
    pub kind: u8,
    /// The preferred source address (`src`).
    pub source: Option<IpAddr>,
}

impl std::fmt::Display for HostRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix == 0 {
            write!(f, "default")?;
        } else {
            write!(f, "{}/{}", self.destination, self.prefix)?;
        }
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        Ok(())
    }
}

/// The address flags a user may set; the rest the kernel keeps for itself.
const USER_FLAGS: u32 = 0x02 | 0x04 | 0x10 | 0x100 | 0x200 | 0x400;

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

fn route_of(msg: &RouteMessage) -> Option<(u32, HostRoute)> {
    let mut oif = None;
    let mut route = HostRoute {
        destination: match msg.header.address_family {
            AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            _ => return None,
        },
        prefix: msg.header.destination_prefix_length,
        gateway: None,
        metric: None,
        table: u32::from(msg.header.table),
        protocol: msg.header.protocol.into(),
        scope: msg.header.scope.into(),
        kind: msg.header.kind.into(),
        source: None,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(a) => route.destination = ip_of(a)?,
            RouteAttribute::Gateway(a) => route.gateway = ip_of(a),
            RouteAttribute::Priority(m) => route.metric = Some(*m),
            RouteAttribute::Table(t) => route.table = *t,
            RouteAttribute::PrefSource(a) => route.source = ip_of(a),
            _ => {}
        }
    }
    Some((oif?, route))
}

fn message_of(route: &HostRoute, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if route.destination.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.destination_prefix_length = route.prefix;
    msg.header.table = u8::try_from(route.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    msg.header.protocol = RouteProtocol::from(route.protocol);
    msg.header.scope = RouteScope::from(route.scope);
    msg.header.kind = RouteType::from(route.kind);
    if route.prefix > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(route_address(
                route.destination,
            )));
    }
    if let Some(g) = route.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(route_address(g)));
    }
    if let Some(m) = route.metric {
        msg.attributes.push(RouteAttribute::Priority(m));
    }
    if let Some(s) = route.source {
        msg.attributes
            .push(RouteAttribute::PrefSource(route_address(s)));
    }
    msg.attributes.push(RouteAttribute::Table(route.table));
    msg.attributes.push(RouteAttribute::Oif(oif));
    msg
}

impl Host {
    fn require(&self, link: Option<Link>, name: &str) -> Result<Link, SwitchError> {
        link.ok_or_else(|| SwitchError::NoSuchLink(name.into()))
    }

    /// The link with this index, if there is one.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, SwitchError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(crate::link_of(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(netlink(format!("look up the link with index {index}"))(e)),
        }
    }

    /// The host's global addresses on `name`, with their flags (link-local
    /// ones the kernel makes are left out).
    pub async fn host_addresses(&self, name: &str) -> Result<Vec<HostAddress>, SwitchError> {
        let link = self.link(name).await?;
        let link = self.require(link, name)?;
        let mut out = Vec::new();
        for msg in self.address_messages(&link).await? {
            if msg.header.scope != AddressScope::Universe {
                continue;
            }
            let mut local = None;
            let mut address = None;
            let mut flags = u32::from(msg.header.flags.bits());
            let mut broadcast = None;
            for a in &msg.attributes {
                match a {
                    AddressAttribute::Local(a) => local = Some(*a),
                    AddressAttribute::Address(a) => address = Some(*a),
                    AddressAttribute::Flags(f) => flags = f.bits(),
                    AddressAttribute::Broadcast(b) => broadcast = Some(IpAddr::V4(*b)),
                    _ => {}
                }
            }
            if let Some(addr) = local.or(address) {
                out.push(HostAddress {
                    cidr: Cidr {
                        addr,
                        prefix: msg.header.prefix_len,
                    },
                    flags: flags & USER_FLAGS,
                    broadcast,
                });
            }
        }
        out.sort_by_key(|a| a.cidr);
        Ok(out)
    }

    /// The routes through `name` that are not the kernel's own (see [`HostRoute`]),
    /// in every table but the local one.
    pub async fn host_routes(&self, name: &str) -> Result<Vec<HostRoute>, SwitchError> {
        let link = self.link(name).await?;
        let link = self.require(link, name)?;
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            let mut routes = self.handle.route().get(req).execute();
            while let Some(msg) = routes
                .try_next()
                .await
                .map_err(netlink(format!("list the routes through {name}")))?
            {
                let Some((oif, route)) = route_of(&msg) else {
                    continue;
                };
                // 255 is the local table: the kernel's routes to the host's own addresses.
                if oif != link.index
                    || route.table == 255
                    || msg.header.protocol == RouteProtocol::Kernel
                    || msg.header.kind != RouteType::Unicast
                {
                    continue;
                }
                out.push(route);
            }
        }
        Ok(out)
    }

    /// Makes sure the bridge `name` exists and is up, with `mac` as its address
    /// when given (an external switch that shares its uplink with the host takes
    /// the uplink's, so the network sees the host where it was).
    pub async fn ensure_bridge_with_mac(
        &self,
        name: &str,
        mac: Option<&[u8]>,
    ) -> Result<Ensured, SwitchError> {
        check_ours(name)?;
        let Some(mac) = mac else {
            return self.ensure_bridge(name).await;
        };
        match self.link(name).await? {
            Some(link) if link.kind != "bridge" => Err(SwitchError::WrongKind {
                name: name.into(),
                found: link.kind,
                wanted: "bridge",
            }),
            Some(link) => {
                if link.mac != mac || !link.up {
                    self.handle
                        .link()
                        .set(
                            LinkUnspec::new_with_index(link.index)
                                .address(mac.to_vec())
                                .up()
                                .build(),
                        )
                        .execute()
                        .await
                        .map_err(netlink(format!(
                            "give the bridge {name} its address and bring it up"
                        )))?;
                }
                Ok(Ensured::Existed)
            }
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(name).address(mac.to_vec()).up().build())
                    .execute()
                    .await
                    .map_err(netlink(format!("create the bridge {name}")))?;
                Ok(Ensured::Created)
            }
        }
    }

    /// Makes the host interface `port` a port of our bridge `bridge`, up. One
    /// that already is stays as it is (no flap).
    pub async fn enslave(&self, port: &str, bridge: &str) -> Result<(), SwitchError> {
        check_ours(bridge)?;
        let br = self.link(bridge).await?;
        let br = self.require(br, bridge)?;
        let p = self.link(port).await?;
        let p = self.require(p, port)?;
        if p.master == Some(br.index) && p.up {
            return Ok(());
        }
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(p.index)
                    .controller(br.index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!(
                "make {port} a port of the bridge {bridge}"
            )))
    }

    /// Takes the host interface `port` off our bridge `bridge`, leaving it up. One
    /// that is on no bridge, or on another, is left alone.
    pub async fn release(&self, port: &str, bridge: &str) -> Result<(), SwitchError> {
        check_ours(bridge)?;
        let Some(p) = self.link(port).await? else {
            return Ok(());
        };
        let Some(br) = self.link(bridge).await? else {
            return Ok(());
        };
        if p.master != Some(br.index) {
            return Ok(());
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(p.index).nocontroller().build())
            .execute()
            .await
            .map_err(netlink(format!("take {port} off the bridge {bridge}")))
    }

    /// Adds `addrs` to the link `name`; ones already there are fine. `nodad`
    /// adds IPv6 addresses without duplicate address detection (an address the
    /// host already held, usable at once).
    pub async fn add_host_addresses(
        &self,
        name: &str,
        addrs: &[HostAddress],
        nodad: bool,
    ) -> Result<(), SwitchError> {
        let link = self.link(name).await?;
        let link = self.require(link, name)?;
        for a in addrs {
            let mut req = self
                .handle
                .address()
                .add(link.index, a.cidr.addr, a.cidr.prefix);
            let mut flags = a.flags;
            if nodad && a.cidr.addr.is_ipv6() {
                flags |= 0x02;
            }
            let msg = req.message_mut();
            msg.attributes
                .retain(|x| !matches!(x, AddressAttribute::Broadcast(_)));
            if let Some(IpAddr::V4(b)) = a.broadcast {
                msg.attributes.push(AddressAttribute::Broadcast(b));
            }
            if flags != 0 {
                msg.attributes
                    .push(AddressAttribute::Flags(AddressFlags::from_bits_retain(
                        flags,
                    )));
            }
            match req.execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EEXIST) => {}
                Err(e) => return Err(netlink(format!("add {} to {name}", a.cidr))(e)),
            }
        }
        Ok(())
    }

    /// Removes `addrs` from the link `name`; ones not there are fine.
    pub async fn remove_host_addresses(
        &self,
        name: &str,
        addrs: &[HostAddress],
    ) -> Result<(), SwitchError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        for msg in self.address_messages(&link).await? {
            let here = msg.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(a) => Some(*a),
                _ => None,
            });
            let here = here.or_else(|| {
                msg.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(a) => Some(*a),
                    _ => None,
                })
            });
            let Some(here) = here else { continue };
            let cidr = Cidr {
                addr: here,
                prefix: msg.header.prefix_len,
            };
            if !addrs.iter().any(|a| a.cidr == cidr) {
                continue;
            }
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) || is_errno(&e, libc::ENOENT) => {}
                Err(e) => return Err(netlink(format!("remove {cidr} from {name}"))(e)),
            }
        }
        Ok(())
    }

    /// Adds `routes` through the link `name`; ones already there are fine.
    pub async fn add_host_routes(
        &self,
        name: &str,
        routes: &[HostRoute],
    ) -> Result<(), SwitchError> {
        let link = self.link(name).await?;
        let link = self.require(link, name)?;
        for r in routes {
            match self
                .handle
                .route()
                .add(message_of(r, link.index))
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EEXIST) => {}
                Err(e) => return Err(netlink(format!("add the route {r} through {name}"))(e)),
            }
        }
        Ok(())
    }

    /// Removes `routes` through the link `name`; ones not there are fine.
    pub async fn remove_host_routes(
        &self,
        name: &str,
        routes: &[HostRoute],
    ) -> Result<(), SwitchError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        let present = self.host_routes(name).await?;
        for r in routes.iter().filter(|r| present.contains(r)) {
            match self
                .handle
                .route()
                .del(message_of(r, link.index))
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::ESRCH) || is_errno(&e, libc::ENOENT) => {}
                Err(e) => return Err(netlink(format!("remove the route {r} through {name}"))(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_goes_to_the_kernel_as_it_was_read() {
        let r = HostRoute {
            destination: "198.51.100.0".parse().unwrap(),
            prefix: 24,
            gateway: Some("192.0.2.254".parse().unwrap()),
            metric: Some(50),
            table: 254,
            protocol: 4,
            scope: 0,
            kind: 1,
            source: Some("192.0.2.1".parse().unwrap()),
        };
        let (oif, back) = route_of(&message_of(&r, 7)).unwrap();
        assert_eq!((oif, back), (7, r.clone()));
        assert_eq!(r.to_string(), "198.51.100.0/24 via 192.0.2.254 metric 50");
        let default = HostRoute {
            destination: "::".parse().unwrap(),
            prefix: 0,
            gateway: Some("fe80::1".parse().unwrap()),
            metric: None,
            table: 254,
            protocol: 3,
            scope: 0,
            kind: 1,
            source: None,
        };
        assert_eq!(route_of(&message_of(&default, 3)).unwrap().1, default);
        assert_eq!(default.to_string(), "default via fe80::1");
    }
}
