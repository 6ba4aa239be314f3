//! `/v1/switches`: virtual switches (Hyper-V's VMSwitch) and how adapters connect.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a switch connects (Hyper-V's switch types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SwitchKind {
    /// VMs on it reach each other, nothing else.
    #[default]
    Private,
    /// VMs on it and the host, which gets an interface on the switch with the
    /// host addresses given.
    Internal,
    /// An internal switch whose IPv4 subnet is masqueraded through the host's
    /// default route, with DHCP and DNS (dnsmasq) for the VMs on it.
    Nat,
    /// VMs on it are on the network of a host interface (its `adapter`, the
    /// uplink), as the host is; with `allow_management_os` the host keeps its
    /// addresses there, moved from the interface to the switch.
    External,
}

impl SwitchKind {
    pub fn name(self) -> &'static str {
        match self {
            SwitchKind::Private => "private",
            SwitchKind::Internal => "internal",
            SwitchKind::Nat => "nat",
            SwitchKind::External => "external",
        }
    }
}

/// A switch as the service reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Switch {
    pub id: Uuid,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: SwitchKind,
    /// The host's addresses on an internal switch (`10.44.0.1/24`, `fd00:44::1/64`).
    #[serde(default)]
    pub host_addresses: Vec<String>,
    /// The kernel bridge that is the switch on the host.
    pub bridge: String,
    /// Whether the bridge is on the host now (it is re-made at the service's start).
    pub present: bool,
    /// The network adapters configured to connect to it.
    #[serde(default)]
    pub adapters: Vec<SwitchAdapter>,
    /// NAT switches: the masquerade, DHCP and DNS as they are now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatInfo>,
    /// External switches: the host interface that is the switch's uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// External switches: whether the host shares the uplink (its addresses
    /// and routes are on the switch's bridge).
    #[serde(default)]
    pub allow_management_os: bool,
    /// External switches: the uplink as it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<UplinkInfo>,
}

/// An external switch's uplink on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UplinkInfo {
    /// The host interface.
    pub adapter: String,
    /// Whether it is a port of the switch's bridge now.
    pub connected: bool,
    /// The host's addresses moved from the interface to the switch.
    #[serde(default)]
    pub moved_addresses: Vec<String>,
    /// The host's routes moved with them (`default via 192.0.2.254 metric 100`).
    #[serde(default)]
    pub moved_routes: Vec<String>,
    /// Why it is not connected, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A NAT switch's services on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NatInfo {
    /// The subnet masqueraded (`10.55.0.0/24`).
    pub subnet: String,
    /// The addresses DHCP hands out (`10.55.0.2-10.55.0.254`).
    pub dhcp_range: String,
    /// The DNS domain of the guests' names (`NAME.viridian.internal`).
    pub domain: String,
    /// The host's name in that DNS (`host.viridian.internal`).
    pub host_name: String,
    /// The nftables table with the switch's rules (`ip viridian-nat-1a2b3c4d`).
    pub nft_table: String,
    /// The pid of its dnsmasq, when it is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnsmasq_pid: Option<u32>,
    /// How often dnsmasq was restarted after it died, since the service started.
    pub dnsmasq_restarts: u32,
    /// Why it is not running, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One DHCP lease of a NAT switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Lease {
    /// Lower case, `52:54:00:12:34:56`.
    pub mac: String,
    pub ip: String,
    /// The name the guest gave (also its name in the switch's DNS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// When it ends (RFC 3339, UTC); none for an infinite lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// The VM whose adapter has this MAC, when one on this host has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// The adapter's MAC as the VM's settings write it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// `GET /v1/switches/{switch}/leases`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeaseList {
    pub leases: Vec<Lease>,
    /// Why the list is empty by nature (a switch that is not NAT hands out no
    /// addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An adapter configured on a switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SwitchAdapter {
    pub vm: Uuid,
    pub vm_name: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SwitchList {
    pub switches: Vec<Switch>,
}

/// `POST /v1/switches`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSwitchRequest {
    /// Unique among switches; the same rules as VM names.
    #[schemars(length(min = 1, max = "vm_config::validate::MAX_NAME_CHARS"))]
    pub name: String,
    /// `private` unless given.
    #[serde(rename = "type", default)]
    pub kind: SwitchKind,
    /// Internal switches only: the host's addresses on the switch, IPv4 and IPv6,
    /// with their prefix length. Their subnets may not overlap another switch's.
    /// A NAT switch needs one IPv4 address (its subnet is the one masqueraded).
    #[serde(default)]
    pub host_addresses: Vec<String>,
    /// NAT switches: the addresses DHCP hands out, `START-END` inside the IPv4
    /// subnet, not holding the host's address; the larger side of the subnet
    /// around the host's address unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_range: Option<String>,
    /// External switches (required there, refused elsewhere): the host
    /// interface that becomes the switch's uplink (`eth0`, `bond0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    pub adapter: Option<String>,
    /// External switches: the host shares the uplink; its addresses and routes
    /// on the interface move to the switch. Without it, an interface that holds
    /// addresses is refused (the host would lose them).
    #[serde(default)]
    pub allow_management_os: bool,
}

/// `PATCH /v1/switches/{switch}`: what is given changes, the rest stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSwitchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = "vm_config::validate::MAX_NAME_CHARS"))]
    pub name: Option<String>,
    /// Replaces the host's addresses (internal and NAT switches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_addresses: Option<Vec<String>>,
    /// NAT switches: a new DHCP range (`START-END`), or an empty text for the
    /// range derived from the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_range: Option<String>,
    /// External switches: whether the host shares the uplink can only be the
    /// value it was created with (delete the switch and create it again to
    /// change it); another value is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_management_os: Option<bool>,
}

/// How one of a running VM's adapters is connected now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AdapterConnection {
    pub mac: String,
    /// The switch the settings name (id or name as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    pub connected: bool,
    /// Its port on the switch's bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// `vhost-net` or `userspace` (QEMU's own virtio-net or e1000 backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_path: Option<String>,
    /// Why a configured adapter is not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its port's traffic and drops since the port was made (`GET /v1/vms/{vm}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<AdapterCounters>,
}

/// A running adapter's counters, as the host's kernel keeps them for its port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AdapterCounters {
    /// Bytes and frames the switch passed to the VM.
    pub received_bytes: u64,
    pub received_packets: u64,
    /// Bytes and frames the VM sent into the switch (before its guards).
    pub sent_bytes: u64,
    pub sent_packets: u64,
    /// Frames from the VM each guard dropped.
    pub dropped: GuardDrops,
}

/// Frames from a VM dropped by each of its adapter's guards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GuardDrops {
    /// Another source MAC than the adapter's, with MAC address spoofing off.
    pub mac_address_spoofing: u64,
    /// DHCP server messages, with the DHCP guard on.
    pub dhcp_guard: u64,
    /// Router advertisements and redirects, with the router guard on.
    pub router_guard: u64,
}

/// `PATCH /v1/vms/{vm}/network-adapters/{mac}`: what is given changes, the rest
/// stays (Hyper-V's Set-VMNetworkAdapter). A running VM's port changes at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateNetworkAdapterRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address_spoofing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_guard: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_guard: Option<bool>,
    /// Bits per second each way; `null` takes the limit away.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(
        min = "vm_config::validate::MIN_BANDWIDTH",
        max = "vm_config::validate::MAX_BANDWIDTH"
    ))]
    pub maximum_bandwidth: Option<Option<u64>>,
    /// `untagged`, `access` or `trunk` (Hyper-V's Set-VMNetworkAdapterVlan
    /// `-Untagged`, `-Access`, `-Trunk`). Changing the mode drops the fields the
    /// new mode has not (an access id when going trunk, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_mode: Option<vm_config::VlanMode>,
    /// The access VLAN, 1–4094 (access mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(
        min = "vm_config::validate::MIN_VLAN_ID",
        max = "vm_config::validate::MAX_VLAN_ID"
    ))]
    pub vlan_id: Option<u16>,
    /// The VLANs a trunk carries tagged (trunk mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = "vm_config::validate::MAX_VLAN_RANGES"))]
    pub vlan_allowed: Option<Vec<vm_config::VlanRange>>,
    /// The VLAN a trunk carries untagged, 1–4094 (trunk mode); `null` takes it away.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(
        min = "vm_config::validate::MIN_VLAN_ID",
        max = "vm_config::validate::MAX_VLAN_ID"
    ))]
    pub vlan_native: Option<Option<u16>>,
    /// `none`, `source` or `destination` (Hyper-V's `-PortMirroring`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mirroring: Option<vm_config::PortMirroring>,
}

impl UpdateNetworkAdapterRequest {
    /// Whether the request changes the adapter's VLAN.
    pub fn changes_vlan(&self) -> bool {
        self.vlan_mode.is_some()
            || self.vlan_id.is_some()
            || self.vlan_allowed.is_some()
            || self.vlan_native.is_some()
    }

    /// Applies the request's VLAN fields to `a` (checked afterwards with the
    /// rest of the settings).
    pub fn apply_vlan(&self, a: &mut vm_config::NetworkAdapter) {
        use vm_config::VlanMode;
        if let Some(mode) = self.vlan_mode {
            if mode != a.vlan_mode {
                if mode != VlanMode::Access {
                    a.vlan_id = None;
                }
                if mode != VlanMode::Trunk {
                    a.vlan_allowed.clear();
                    a.vlan_native = None;
                }
            }
            a.vlan_mode = mode;
        }
        if let Some(id) = self.vlan_id {
            a.vlan_id = Some(id);
        }
        if let Some(list) = &self.vlan_allowed {
            a.vlan_allowed = list.clone();
        }
        if let Some(native) = self.vlan_native {
            a.vlan_native = native;
        }
    }
}

/// A field that is present, `null` included (absent stays `None` by `default`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `POST /v1/vms/{vm}/network-adapters/{mac}/connect`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectAdapterRequest {
    /// The switch, by name or id.
    pub switch: String,
}

/// How synthetic adapters' packets travel, and why (`GET /v1/host`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkInfo {
    /// `vhost-net` or `userspace`.
    pub data_path: String,
    pub reason: String,
    /// What the kernel offers for adapters' VLANs, probed at the service's start.
    #[serde(default)]
    pub vlan: VlanInfo,
}

/// The kernel's VLAN features and how adapters' VLAN settings are enforced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VlanInfo {
    /// Bridges filter by VLAN (`CONFIG_BRIDGE_VLAN_FILTERING`).
    pub bridge_vlan_filtering: bool,
    pub bridge_vlan_filtering_reason: String,
    /// 802.1Q VLAN links (`CONFIG_VLAN_8021Q`).
    pub dot1q: bool,
    pub dot1q_reason: String,
    /// How access-mode adapters are kept apart.
    pub access: String,
    /// Whether trunk-mode adapters are enforced, or why they are refused.
    pub trunk: String,
}
