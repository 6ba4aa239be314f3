//! VLANs on a switch: what the kernel offers (detected once, in a throw-away
//! network namespace), and the two ways a port's VLAN is enforced.
//!
//! - With bridge VLAN filtering (`CONFIG_BRIDGE_VLAN_FILTERING`): the switch's
//!   bridge filters, each port carries its VLANs over rtnetlink (`AF_BRIDGE`
//!   `IFLA_AF_SPEC` VLAN entries, what `bridge vlan add` sends): an access port
//!   its id as PVID and untagged, a trunk its allowed ids tagged and its native
//!   one as PVID, untagged. The messages are built by plain functions here.
//! - Without it: an access port goes on one more bridge per VLAN of its switch
//!   ([`crate::vlan_bridge_name`]); trunks cannot be enforced and are refused.

use futures_util::stream::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::packet_route::link::{
    AfSpecBridge, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind,
    LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkBridge, LinkUnspec, LinkVlan};

use crate::{netlink, Host, SwitchError};

/// What the kernel offers for VLANs, each with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanSupport {
    /// Bridges can filter by VLAN (`vlan_filtering`).
    pub bridge_vlan_filtering: bool,
    pub bridge_vlan_filtering_reason: String,
    /// 802.1Q VLAN links can be made (`CONFIG_VLAN_8021Q`).
    pub dot1q: bool,
    pub dot1q_reason: String,
}

impl VlanSupport {
    /// How access ports are enforced, in one sentence.
    pub fn access_enforcement(&self) -> &'static str {
        if self.bridge_vlan_filtering {
            "bridge VLAN filtering on the switch's bridge"
        } else {
            "one bridge per VLAN of a switch"
        }
    }
}

/// The kernel option a trunk needs, named in refusals.
pub const FILTERING_OPTION: &str = "CONFIG_BRIDGE_VLAN_FILTERING";

/// Names of the probe's links (inside its own namespace: they meet nothing).
const PROBE_BRIDGE: &str = "vswprobe0";
const PROBE_VLAN: &str = "vswprobe0.10";

/// Tries, in a network namespace of its own that goes away with the probe, a
/// bridge with `vlan_filtering` on and a VLAN link on it. The host's own links
/// are never touched.
pub fn detect() -> VlanSupport {
    let probe = std::thread::Builder::new()
        .name("vlan-probe".into())
        .spawn(probe_in_new_namespace)
        .map_err(|e| format!("cannot start the probe thread: {e}"))
        .and_then(|t| {
            t.join()
                .unwrap_or_else(|_| Err("the probe thread panicked".into()))
        });
    match probe {
        Ok(found) => found,
        Err(why) => VlanSupport {
            bridge_vlan_filtering: false,
            bridge_vlan_filtering_reason: format!("not probed: {why}"),
            dot1q: false,
            dot1q_reason: format!("not probed: {why}"),
        },
    }
}

fn probe_in_new_namespace() -> Result<VlanSupport, String> {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread
    // into a new namespace, which goes away when the thread and its sockets end.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "cannot make a network namespace to probe in ({}; the service needs CAP_SYS_ADMIN)",
            std::io::Error::last_os_error()
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the probe's runtime: {e}"))?;
    rt.block_on(async {
        let host = Host::connect().map_err(|e| e.to_string())?;
        host.handle
            .link()
            .add(LinkBridge::new(PROBE_BRIDGE).build())
            .execute()
            .await
            .map_err(|e| format!("cannot make a bridge to probe with: {}", crate::to_io(e)))?;
        let bridge = host
            .link(PROBE_BRIDGE)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the probe's bridge vanished")?;
        let (filtering, filtering_reason) = match host
            .handle
            .link()
            .set(filtering_message(bridge.index))
            .execute()
            .await
        {
            Err(e) => (
                false,
                format!(
                    "the kernel refuses vlan_filtering on a bridge ({}): it lacks {FILTERING_OPTION}",
                    crate::to_io(e)
                ),
            ),
            Ok(()) => match host.vlan_filtering(PROBE_BRIDGE).await {
                Ok(true) => (
                    true,
                    "a bridge takes vlan_filtering=1 (the kernel has CONFIG_BRIDGE_VLAN_FILTERING)"
                        .into(),
                ),
                Ok(false) => (
                    false,
                    format!("a bridge accepts vlan_filtering=1 but reads back 0: the kernel lacks {FILTERING_OPTION}"),
                ),
                Err(e) => (false, format!("cannot read a bridge's vlan_filtering back: {e}")),
            },
        };
        let (dot1q, dot1q_reason) = match host
            .handle
            .link()
            .add(LinkVlan::new(PROBE_VLAN, bridge.index, 10).build())
            .execute()
            .await
        {
            Ok(()) => (true, "a VLAN link can be made (the kernel has CONFIG_VLAN_8021Q)".into()),
            Err(e) => (
                false,
                format!(
                    "the kernel refuses a VLAN link ({}): it lacks CONFIG_VLAN_8021Q (or the 8021q module)",
                    crate::to_io(e)
                ),
            ),
        };
        Ok(VlanSupport {
            bridge_vlan_filtering: filtering,
            bridge_vlan_filtering_reason: filtering_reason,
            dot1q,
            dot1q_reason,
        })
    })
}

/// The VLANs one port of a filtering bridge carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortVlans {
    /// Untagged frames on the bridge's default VLAN, as a new port gets.
    Untagged,
    /// One VLAN, PVID and untagged on egress.
    Access(u16),
    /// `allowed` (inclusive ranges) tagged; `native` PVID and untagged.
    Trunk {
        allowed: Vec<(u16, u16)>,
        native: Option<u16>,
    },
}

/// The bridge's default VLAN, which every new port carries untagged.
pub const DEFAULT_PVID: u16 = 1;

/// `RTM_SETLINK` turning `vlan_filtering` on for the bridge `index`.
pub fn filtering_message(index: u32) -> LinkMessage {
    let mut msg = LinkUnspec::new_with_index(index).build();
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Bridge),
        LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(true)])),
    ]));
    msg
}

fn bridge_message(port: u32, entries: Vec<AfSpecBridge>) -> LinkMessage {
    let mut msg = LinkUnspec::new_with_index(port).build();
    msg.header.interface_family = AddressFamily::Bridge;
    msg.attributes.push(LinkAttribute::AfSpecBridge(entries));
    msg
}

fn entry(vid: u16, flags: BridgeVlanInfoFlags) -> AfSpecBridge {
    AfSpecBridge::VlanInfo(BridgeVlanInfo { flags, vid })
}

/// The `AF_BRIDGE` message (sent as `RTM_DELLINK`) taking the default VLAN
/// off the port `port`, so it carries only what [`add_vlans_message`] gives it.
pub fn remove_default_message(port: u32) -> LinkMessage {
    bridge_message(
        port,
        vec![entry(DEFAULT_PVID, BridgeVlanInfoFlags::empty())],
    )
}

/// The `AF_BRIDGE` message (sent as `RTM_SETLINK`) giving the port `port` its
/// VLANs; `None` for [`PortVlans::Untagged`] (a new port's default is that).
pub fn add_vlans_message(port: u32, vlans: &PortVlans) -> Option<LinkMessage> {
    let both = BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged;
    let entries = match vlans {
        PortVlans::Untagged => return None,
        PortVlans::Access(id) => vec![entry(*id, both)],
        PortVlans::Trunk { allowed, native } => {
            let mut v = Vec::new();
            for &(first, last) in allowed {
                if first == last {
                    v.push(entry(first, BridgeVlanInfoFlags::empty()));
                } else {
                    v.push(entry(first, BridgeVlanInfoFlags::RangeBegin));
                    v.push(entry(last, BridgeVlanInfoFlags::RangeEnd));
                }
            }
            // Last, so its flags win where it is also in `allowed`.
            if let Some(n) = native {
                v.push(entry(*n, both));
            }
            v
        }
    };
    Some(bridge_message(port, entries))
}

impl Host {
    /// Whether the bridge `name` filters by VLAN.
    pub async fn vlan_filtering(&self, name: &str) -> Result<bool, SwitchError> {
        let Some(msg) = self.link_message(name, "look up the bridge").await? else {
            return Err(SwitchError::NoSuchLink(name.into()));
        };
        Ok(msg.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| {
                matches!(i, LinkInfo::Data(InfoData::Bridge(d))
                    if d.contains(&InfoBridge::VlanFiltering(true)))
            }),
            _ => false,
        }))
    }

    /// Turns VLAN filtering on for the bridge `name` (a kernel without
    /// [`FILTERING_OPTION`] refuses).
    pub async fn set_vlan_filtering(&self, name: &str) -> Result<(), SwitchError> {
        crate::check_ours(name)?;
        let br = self
            .link(name)
            .await?
            .ok_or_else(|| SwitchError::NoSuchLink(name.into()))?;
        self.handle
            .link()
            .set(filtering_message(br.index))
            .execute()
            .await
            .map_err(netlink(format!(
                "turn VLAN filtering on for the bridge {name}"
            )))
    }

    /// Gives `port`, a port of a filtering bridge that was just attached (so it
    /// carries the default VLAN only), the VLANs `vlans`.
    pub async fn set_port_vlans(&self, port: &str, vlans: &PortVlans) -> Result<(), SwitchError> {
        let p = self
            .link(port)
            .await?
            .ok_or_else(|| SwitchError::NoSuchLink(port.into()))?;
        let Some(add) = add_vlans_message(p.index, vlans) else {
            return Ok(());
        };
        let action = format!("set the VLANs of the port {port}");
        self.bridge_request(RouteNetlinkMessage::DelLink(remove_default_message(
            p.index,
        )))
        .await
        .or_else(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(()),
            _ => Err(e),
        })
        .map_err(|source| SwitchError::Netlink {
            action: action.clone(),
            source,
        })?;
        self.bridge_request(RouteNetlinkMessage::SetLink(add))
            .await
            .map_err(|source| SwitchError::Netlink { action, source })
    }

    async fn bridge_request(&self, msg: RouteNetlinkMessage) -> std::io::Result<()> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut handle = self.handle.clone();
        let mut answers = handle
            .request(req)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        while let Some(m) = answers.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                if e.code.is_some() {
                    return Err(e.to_io());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::Emitable;

    fn vlans_of(msg: &LinkMessage) -> Vec<(u16, BridgeVlanInfoFlags)> {
        msg.attributes
            .iter()
            .flat_map(|a| match a {
                LinkAttribute::AfSpecBridge(v) => v.clone(),
                _ => Vec::new(),
            })
            .filter_map(|e| match e {
                AfSpecBridge::VlanInfo(i) => Some((i.vid, i.flags)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_access_port_gets_its_id_as_pvid_untagged_and_loses_the_default() {
        let add = add_vlans_message(7, &PortVlans::Access(10)).unwrap();
        assert_eq!(add.header.index, 7);
        assert_eq!(add.header.interface_family, AddressFamily::Bridge);
        assert_eq!(
            vlans_of(&add),
            [(
                10,
                BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged
            )]
        );
        let del = remove_default_message(7);
        assert_eq!(del.header.interface_family, AddressFamily::Bridge);
        assert_eq!(vlans_of(&del), [(1, BridgeVlanInfoFlags::empty())]);
        // On the wire: IFLA_AF_SPEC (26) holding IFLA_BRIDGE_VLAN_INFO (2) with
        // flags PVID|UNTAGGED (6) and vid 10, as `bridge vlan add` sends.
        let mut buf = vec![0; add.buffer_len()];
        add.emit(&mut buf);
        let want = [12u8, 0, 26, 0, 8, 0, 2, 0, 6, 0, 10, 0];
        assert!(
            buf.windows(want.len()).any(|w| w == want),
            "{buf:?} lacks {want:?}"
        );
        assert_eq!(add_vlans_message(7, &PortVlans::Untagged), None);
    }

    #[test]
    fn a_trunk_port_carries_ranges_tagged_and_its_native_vlan_last_untagged() {
        let add = add_vlans_message(
            3,
            &PortVlans::Trunk {
                allowed: vec![(10, 10), (20, 30)],
                native: Some(1),
            },
        )
        .unwrap();
        assert_eq!(
            vlans_of(&add),
            [
                (10, BridgeVlanInfoFlags::empty()),
                (20, BridgeVlanInfoFlags::RangeBegin),
                (30, BridgeVlanInfoFlags::RangeEnd),
                (1, BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged),
            ]
        );
    }

    #[test]
    fn the_filtering_message_sets_vlan_filtering_on_the_bridge() {
        let msg = filtering_message(4);
        assert_eq!(msg.header.index, 4);
        let info = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i.clone()),
                _ => None,
            })
            .unwrap();
        assert!(info.contains(&LinkInfo::Kind(InfoKind::Bridge)));
        assert!(info.contains(&LinkInfo::Data(InfoData::Bridge(vec![
            InfoBridge::VlanFiltering(true)
        ]))));
    }
}
