//! Virtual switches on the host's kernel: a bridge per switch, a tap per adapter
//! as its port, addresses on the bridge for the host's side of internal switches.
//! Everything goes over rtnetlink (taps are made with one `/dev/net/tun` ioctl,
//! the only way the kernel makes them). This crate knows bridges, ports and
//! addresses; nothing of VMs, settings files or HTTP.

mod cidr;
pub mod datapath;
pub mod dnsmasq;
pub mod guards;
pub mod mirror;
mod names;
pub mod nat;
pub mod shaping;
mod tap;
pub mod uplink;
pub mod vlan;

use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::Stats64;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkIfb, LinkUnspec};

pub use cidr::{Cidr, CidrError};
pub use datapath::DataPath;
pub use names::{
    bridge_name, is_ours, tap_name, vlan_bridge_name, vlan_of_bridge, MAX_NAME_BYTES, PREFIX,
};

/// What went wrong on the host's side of a switch.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("cannot open a netlink connection to the kernel")]
    Connect(#[source] std::io::Error),
    #[error("the kernel refused to {action}")]
    Netlink {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the tap device {name} (is /dev/net/tun there, and does the service run as root?)")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the link {0} does not exist")]
    NoSuchLink(String),
    #[error("the link {name} exists but is a {found}, not a {wanted}; remove it (`ip link delete {name}`) if it is a leftover")]
    WrongKind {
        name: String,
        found: String,
        wanted: &'static str,
    },
    #[error("`{0}` is not a name Viridian gives its links (they start with `{PREFIX}` and fit in {MAX_NAME_BYTES} bytes)")]
    NotOurs(String),
}

/// One link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `bridge`, `tun`, `veth`, ... (empty for links without a kind, like `lo`).
    pub kind: String,
    /// The bridge it is a port of.
    pub master: Option<u32>,
    pub up: bool,
    /// Its hardware address (empty for links without one).
    pub mac: Vec<u8>,
    /// The loopback interface.
    pub loopback: bool,
}

/// A link's traffic counters as the kernel keeps them (for a tap: `rx` is what
/// its VM sent, `tx` what it was sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Whether [`Host::ensure_bridge`] made the bridge or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Existed,
}

/// A netlink connection to the kernel of the network namespace this was opened in.
#[derive(Clone)]
pub struct Host {
    pub(crate) handle: Handle,
}

pub(crate) fn netlink(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> SwitchError {
    move |e| SwitchError::Netlink {
        action: action.into(),
        source: to_io(e),
    }
}

pub(crate) fn to_io(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => std::io::Error::other(other.to_string()),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == errno)
}

pub fn check_ours(name: &str) -> Result<(), SwitchError> {
    if is_ours(name)
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        Ok(())
    } else {
        Err(SwitchError::NotOurs(name.to_string()))
    }
}

pub(crate) fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: String::new(),
        master: None,
        up: msg
            .header
            .flags
            .contains(rtnetlink::packet_route::link::LinkFlags::Up),
        mac: Vec::new(),
        loopback: msg
            .header
            .flags
            .contains(rtnetlink::packet_route::link::LinkFlags::Loopback),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Controller(m) => link.master = Some(*m),
            LinkAttribute::Address(a) => link.mac = a.clone(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        link.kind = match k {
                            InfoKind::Bridge => "bridge".into(),
                            InfoKind::Tun => "tun".into(),
                            InfoKind::Veth => "veth".into(),
                            InfoKind::Ifb => "ifb".into(),
                            InfoKind::Bond => "bond".into(),
                            other => other.to_string(),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    link
}

impl Host {
    /// Opens the connection; its driver runs on the current tokio runtime.
    pub fn connect() -> Result<Host, SwitchError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(SwitchError::Connect)?;
        tokio::spawn(connection);
        Ok(Host { handle })
    }

    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, SwitchError> {
        Ok(self
            .link_message(name, "look up the link")
            .await?
            .map(|msg| link_of(&msg)))
    }

    /// The kernel's message for the link called `name`, if there is one;
    /// `action` names what failed otherwise (`look up the link`).
    pub(crate) async fn link_message(
        &self,
        name: &str,
        action: &str,
    ) -> Result<Option<LinkMessage>, SwitchError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(msg) => Ok(msg),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(netlink(format!("{action} {name}"))(e)),
        }
    }

    /// The traffic counters of the link `name`, if there is one.
    pub async fn stats(&self, name: &str) -> Result<Option<LinkStats>, SwitchError> {
        let Some(msg) = self.link_message(name, "read the counters of").await? else {
            return Ok(None);
        };
        let s: Option<Stats64> = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Stats64(s) => Some(*s),
            _ => None,
        });
        Ok(Some(s.map_or_else(LinkStats::default, |s| LinkStats {
            rx_bytes: s.rx_bytes,
            rx_packets: s.rx_packets,
            tx_bytes: s.tx_bytes,
            tx_packets: s.tx_packets,
        })))
    }

    /// Makes sure the ifb link `name` exists and is up.
    pub async fn ensure_ifb(&self, name: &str) -> Result<(), SwitchError> {
        check_ours(name)?;
        let link = match self.link(name).await? {
            Some(l) if l.kind != "ifb" => {
                return Err(SwitchError::WrongKind {
                    name: name.into(),
                    found: l.kind,
                    wanted: "ifb",
                })
            }
            Some(l) => l,
            None => {
                self.handle
                    .link()
                    .add(LinkIfb::new(name).build())
                    .execute()
                    .await
                    .map_err(netlink(format!("create the ifb link {name}")))?;
                self.link(name)
                    .await?
                    .ok_or_else(|| SwitchError::NoSuchLink(name.into()))?
            }
        };
        if !link.up {
            self.set_up(&link).await?;
        }
        Ok(())
    }

    /// Every link whose name carries Viridian's prefix.
    pub async fn our_links(&self) -> Result<Vec<Link>, SwitchError> {
        let mut out = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links
            .try_next()
            .await
            .map_err(netlink("list the host's links"))?
        {
            let link = link_of(&msg);
            if is_ours(&link.name) {
                out.push(link);
            }
        }
        Ok(out)
    }

    /// Makes sure the bridge `name` exists and is up; an existing one is kept as it
    /// is (with its ports), so running VMs keep their connectivity.
    pub async fn ensure_bridge(&self, name: &str) -> Result<Ensured, SwitchError> {
        check_ours(name)?;
        if let Some(link) = self.link(name).await? {
            if link.kind != "bridge" {
                return Err(SwitchError::WrongKind {
                    name: name.into(),
                    found: link.kind,
                    wanted: "bridge",
                });
            }
            if !link.up {
                self.set_up(&link).await?;
            }
            return Ok(Ensured::Existed);
        }
        self.handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(netlink(format!("create the bridge {name}")))?;
        Ok(Ensured::Created)
    }

    async fn set_up(&self, link: &Link) -> Result<(), SwitchError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(netlink(format!("bring the link {} up", link.name)))
    }

    /// Deletes one of our links (a bridge's ports are let go, not deleted). A link
    /// that is already gone is fine.
    pub async fn delete_link(&self, name: &str) -> Result<(), SwitchError> {
        check_ours(name)?;
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(netlink(format!("delete the link {name}"))(e)),
        }
    }

    /// Creates the tap `name` as a port of `bridge`, up. An existing tap of that
    /// name is re-used (moved to `bridge` if it was elsewhere).
    pub async fn create_tap(&self, name: &str, bridge: &str) -> Result<(), SwitchError> {
        check_ours(name)?;
        match self.link(name).await? {
            Some(l) if l.kind != "tun" => {
                return Err(SwitchError::WrongKind {
                    name: name.into(),
                    found: l.kind,
                    wanted: "tap",
                })
            }
            Some(_) => {}
            None => tap::create_persistent(name).map_err(|source| SwitchError::Tap {
                name: name.into(),
                source,
            })?,
        }
        self.attach(name, bridge).await
    }

    /// Creates the tap `name` on no bridge (a port that carries nothing until it
    /// is attached). An existing tap of that name is re-used as it is.
    pub async fn create_detached_tap(&self, name: &str) -> Result<(), SwitchError> {
        check_ours(name)?;
        match self.link(name).await? {
            Some(l) if l.kind != "tun" => Err(SwitchError::WrongKind {
                name: name.into(),
                found: l.kind,
                wanted: "tap",
            }),
            Some(_) => Ok(()),
            None => tap::create_persistent(name).map_err(|source| SwitchError::Tap {
                name: name.into(),
                source,
            }),
        }
    }

    /// Makes `port` a port of `bridge` and brings it up.
    pub async fn attach(&self, port: &str, bridge: &str) -> Result<(), SwitchError> {
        let br = self
            .link(bridge)
            .await?
            .ok_or_else(|| SwitchError::NoSuchLink(bridge.into()))?;
        let p = self
            .link(port)
            .await?
            .ok_or_else(|| SwitchError::NoSuchLink(port.into()))?;
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
            .map_err(netlink(format!("attach {port} to the bridge {bridge}")))
    }

    /// Takes `port` off its bridge; it stays, down, and carries nothing.
    pub async fn detach(&self, port: &str) -> Result<(), SwitchError> {
        let p = self
            .link(port)
            .await?
            .ok_or_else(|| SwitchError::NoSuchLink(port.into()))?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(p.index)
                    .nocontroller()
                    .down()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("detach {port} from its bridge")))
    }

    /// The global-scope addresses on the link `name` (link-local ones the kernel
    /// gives are left out).
    pub async fn addresses(&self, name: &str) -> Result<Vec<Cidr>, SwitchError> {
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| SwitchError::NoSuchLink(name.into()))?;
        let mut out = Vec::new();
        for msg in self.address_messages(&link).await? {
            if msg.header.scope != AddressScope::Universe {
                continue;
            }
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(a) => Some(*a),
                _ => None,
            });
            let addr = addr.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(a) => Some(*a),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                out.push(Cidr {
                    addr,
                    prefix: msg.header.prefix_len,
                });
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every address the kernel lists for `link`.
    pub(crate) async fn address_messages(
        &self,
        link: &Link,
    ) -> Result<Vec<AddressMessage>, SwitchError> {
        let mut out = Vec::new();
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(netlink(format!("list the addresses of {}", link.name)))?
        {
            if msg.header.index == link.index {
                out.push(msg);
            }
        }
        Ok(out)
    }

    /// Every global-scope address on links that are not ours, with its link's
    /// name: the host's own networks, which a switch's subnet must not overlap.
    pub async fn foreign_addresses(&self) -> Result<Vec<(String, Cidr)>, SwitchError> {
        let mut names = std::collections::HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links
            .try_next()
            .await
            .map_err(netlink("list the host's links"))?
        {
            let link = link_of(&msg);
            names.insert(link.index, link.name);
        }
        let mut out = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(netlink("list the host's addresses"))?
        {
            if msg.header.scope != AddressScope::Universe {
                continue;
            }
            let Some(name) = names.get(&msg.header.index) else {
                continue;
            };
            if is_ours(name) {
                continue;
            }
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(a) | AddressAttribute::Address(a) => Some(*a),
                _ => None,
            });
            if let Some(addr) = addr {
                out.push((
                    name.clone(),
                    Cidr {
                        addr,
                        prefix: msg.header.prefix_len,
                    },
                ));
            }
        }
        Ok(out)
    }

    /// Makes the global addresses of our link `name` exactly `wanted`: adds the
    /// missing ones, removes the others.
    pub async fn set_addresses(&self, name: &str, wanted: &[Cidr]) -> Result<(), SwitchError> {
        check_ours(name)?;
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| SwitchError::NoSuchLink(name.into()))?;
        let present = self.addresses(name).await?;
        for extra in present.iter().filter(|c| !wanted.contains(c)) {
            let mut msgs = self
                .handle
                .address()
                .get()
                .set_link_index_filter(link.index)
                .set_address_filter(extra.addr)
                .execute();
            while let Some(msg) = msgs
                .try_next()
                .await
                .map_err(netlink(format!("find {extra} on {name}")))?
            {
                if msg.header.index == link.index && msg.header.prefix_len == extra.prefix {
                    self.handle
                        .address()
                        .del(msg)
                        .execute()
                        .await
                        .map_err(netlink(format!("remove {extra} from {name}")))?;
                }
            }
        }
        for missing in wanted.iter().filter(|c| !present.contains(c)) {
            self.add_address(&link, missing).await?;
        }
        Ok(())
    }

    async fn add_address(&self, link: &Link, cidr: &Cidr) -> Result<(), SwitchError> {
        let mut req = self
            .handle
            .address()
            .add(link.index, cidr.addr, cidr.prefix);
        if cidr.addr.is_ipv6() {
            // No duplicate address detection: the host's address on its own switch
            // is usable at once (a guest that answers DAD would be misconfigured).
            req.message_mut().attributes.push(AddressAttribute::Flags(
                rtnetlink::packet_route::address::AddressFlags::Nodad,
            ));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(netlink(format!("add {cidr} to {}", link.name))(e)),
        }
    }
}
