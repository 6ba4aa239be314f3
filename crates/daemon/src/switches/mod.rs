//! Virtual switches as objects of the service: their files (`store.rs`), their
//! bridges on the host (through `vswitch`), and the ports of running VMs' adapters.
//!
//! Every change to the host goes through one lock (`changes`) so two requests
//! cannot interleave bridge and file work. A request that fails leaves the host as
//! it found it: a bridge made for a switch whose file then cannot be written is
//! removed again, and addresses are put back.

pub mod external;
pub mod nat;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use api::switches::{AdapterConnection, AdapterCounters, GuardDrops, SwitchKind};
use api::ErrorCode;
use uuid::Uuid;
use vm_config::{NetworkAdapter, PortMirroring, VlanMode, VmSettings};
use vswitch::guards::{self, PortGuards};
use vswitch::vlan::{PortVlans, VlanSupport};
use vswitch::{shaping, Cidr, DataPath, Host};

use crate::error::ApiError;
pub use store::SwitchSettings;

pub struct Switches {
    dir: PathBuf,
    entries: Mutex<BTreeMap<Uuid, SwitchSettings>>,
    /// The netlink connection; `None` when the kernel refused one (the reason).
    host: Result<Host, String>,
    pub data_path: DataPath,
    changes: tokio::sync::Mutex<()>,
    /// Running VMs' adapters as connected at their start.
    ports: Mutex<HashMap<Uuid, Vec<AdapterConnection>>>,
    /// NAT switches' rules and DHCP/DNS servers.
    pub nat: nat::Nat,
    /// What the kernel offers for VLANs, probed once at start.
    pub vlan: VlanSupport,
    /// Each port's switch and part in port mirroring, by tap.
    mirrors: Mutex<HashMap<String, (Uuid, PortMirroring)>>,
    /// The switches that have a mirror table now.
    mirror_tables: Mutex<std::collections::HashSet<Uuid>>,
}

/// Where one adapter's port goes on its switch, and what VLANs it carries there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortPlan {
    /// The bridge the tap is a port of.
    bridge: String,
    /// A bridge of the switch made for one VLAN (no VLAN filtering here).
    vlan_bridge: bool,
    /// The port's VLANs on a filtering bridge (`None`: the bridge does not filter).
    vlans: Option<PortVlans>,
}

/// Where adapter `a`'s port goes on switch `switch` with the kernel offering
/// `vlan`, or why its VLAN setting cannot be enforced there.
fn plan_port(
    vlan: &VlanSupport,
    s: &SwitchSettings,
    a: &NetworkAdapter,
) -> Result<PortPlan, ApiError> {
    let switch = s.id;
    let filtering = vlan.bridge_vlan_filtering;
    let main = PortPlan {
        bridge: bridge_of(switch),
        vlan_bridge: false,
        vlans: filtering.then_some(PortVlans::Untagged),
    };
    match (a.vlan_mode, a.vlan_id) {
        (VlanMode::Untagged, _) => Ok(main),
        (VlanMode::Access, Some(id)) if filtering => Ok(PortPlan {
            vlans: Some(PortVlans::Access(id)),
            ..main
        }),
        // A per-VLAN bridge has no uplink: the VLAN would not reach the
        // external network.
        (VlanMode::Access, Some(_)) if s.kind == SwitchKind::External => {
            Err(ApiError::invalid(format!(
                "the network adapter {} cannot be on a VLAN of the external switch {} on this host: tagging its frames onto the uplink needs bridge VLAN filtering, and this kernel lacks {} ({}); leave the adapter untagged, or use a private or internal switch for VLANs between VMs",
                a.mac,
                s.name,
                vswitch::vlan::FILTERING_OPTION,
                vlan.bridge_vlan_filtering_reason
            )))
        }
        (VlanMode::Access, Some(id)) => Ok(PortPlan {
            bridge: vswitch::vlan_bridge_name(switch.as_u128(), id),
            vlan_bridge: true,
            vlans: None,
        }),
        (VlanMode::Access, None) => Err(ApiError::from(vm_config::ConfigError::VlanIdMissing {
            mac: a.mac.clone(),
        })),
        (VlanMode::Trunk, _) if filtering => Ok(PortPlan {
            vlans: Some(PortVlans::Trunk {
                allowed: a.vlan_allowed.iter().map(|r| (r.first, r.last())).collect(),
                native: a.vlan_native,
            }),
            ..main
        }),
        (VlanMode::Trunk, _) => Err(trunk_refused(vlan, &a.mac)),
    }
}

fn trunk_refused(vlan: &VlanSupport, mac: &str) -> ApiError {
    ApiError::invalid(format!(
        "the network adapter {mac} cannot be a VLAN trunk on this host: trunks need bridge VLAN filtering, and this kernel lacks {} ({}); use access mode (one VLAN per adapter, `--vlan ID`), or run Viridian on a kernel built with it",
        vswitch::vlan::FILTERING_OPTION,
        vlan.bridge_vlan_filtering_reason
    ))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn host_error(e: vswitch::SwitchError) -> ApiError {
    ApiError::internal(crate::vms::store::error_chain(&e))
}

/// A tap name for one adapter of one VM (FNV-1a over the VM's id and the MAC).
pub fn tap_for(vm: Uuid, mac: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm
        .as_bytes()
        .iter()
        .chain(mac.to_ascii_lowercase().as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    vswitch::tap_name(h)
}

pub fn bridge_of(id: Uuid) -> String {
    vswitch::bridge_name(id.as_u128())
}

fn guards_of(a: &NetworkAdapter) -> PortGuards {
    PortGuards {
        mac: a.mac.clone(),
        mac_address_spoofing: a.mac_address_spoofing,
        dhcp_guard: a.dhcp_guard,
        router_guard: a.router_guard,
    }
}

/// Makes the port `tap` enforce adapter `a`'s guards and maximum bandwidth.
async fn enforce(host: &Host, tap: &str, a: &NetworkAdapter) -> Result<(), String> {
    guards::apply(tap, &guards_of(a))
        .await
        .map_err(|e| crate::vms::store::error_chain(&e))?;
    shaping::set_bandwidth(host, tap, a.maximum_bandwidth)
        .await
        .map_err(|e| crate::vms::store::error_chain(&e))
}

/// Takes the port `tap`'s guards and limits off the host (its ifb included).
async fn unenforce(host: &Host, tap: &str) {
    if let Err(e) = guards::remove(tap).await {
        tracing::warn!(%tap, "cannot remove the port's guards: {}", crate::vms::store::error_chain(&e));
    }
    if let Err(e) = shaping::clear(host, tap).await {
        tracing::warn!(%tap, "cannot remove the port's bandwidth limit: {}", crate::vms::store::error_chain(&e));
    }
}

/// Checks a switch name being set: the rules of VM names, said of a switch.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    vm_config::validate::validate_new_name(name).map_err(|e| {
        // The rules are the VM name rules; the sentences name the switch instead.
        ApiError::invalid(
            e.to_string()
                .replace("a VM name", "a switch name")
                .replace("the VM name", "the switch name")
                .replace("VMs are found", "switches are found")
                .replace("give the VM a name", "give the switch a name"),
        )
    })
}

/// Parses and checks host addresses for a switch of `kind`.
fn parse_addresses(kind: SwitchKind, given: &[String]) -> Result<Vec<Cidr>, ApiError> {
    if kind == SwitchKind::Private && !given.is_empty() {
        return Err(ApiError::invalid(
            "a private switch connects VMs only and has no host addresses; create an internal switch (type internal) for the host to reach its VMs",
        ));
    }
    let mut out: Vec<Cidr> = Vec::new();
    if kind == SwitchKind::Nat && given.is_empty() {
        return Err(ApiError::invalid(
            "a NAT switch needs an IPv4 host address (its subnet is the one masqueraded and served by DHCP), like --host-address 10.55.0.1/24",
        ));
    }
    for text in given {
        let c: Cidr = text
            .parse()
            .map_err(|e: vswitch::CidrError| ApiError::invalid(e.to_string()))?;
        if let Some(other) = out.iter().find(|o| o.overlaps(&c)) {
            return Err(ApiError::invalid(format!(
                "the host addresses {other} and {c} are on overlapping subnets; give a switch one address per subnet"
            )));
        }
        out.push(c);
    }
    Ok(out)
}

impl Switches {
    /// Reads every switch file (must run inside tokio: the netlink connection's
    /// driver is spawned on it).
    pub fn open(data_dir: &std::path::Path) -> Switches {
        let dir = store::dir(data_dir);
        let (found, problems) = store::load_all(&dir);
        for p in problems {
            tracing::warn!("{p}; that switch is not served until its file is repaired");
        }
        let host = Host::connect().map_err(|e| crate::vms::store::error_chain(&e));
        if let Err(e) = &host {
            tracing::warn!("{e}; virtual switches cannot be made on this host");
        }
        Switches {
            dir: dir.clone(),
            entries: Mutex::new(found.into_iter().map(|s| (s.id, s)).collect()),
            host,
            data_path: vswitch::datapath::detect(),
            changes: tokio::sync::Mutex::new(()),
            ports: Mutex::default(),
            nat: nat::Nat::new(dir.clone()),
            vlan: {
                let v = vswitch::vlan::detect();
                tracing::info!(
                    filtering = v.bridge_vlan_filtering,
                    dot1q = v.dot1q,
                    "VLANs: {}; {}",
                    v.bridge_vlan_filtering_reason,
                    v.dot1q_reason
                );
                v
            },
            mirrors: Mutex::default(),
            mirror_tables: Mutex::default(),
        }
    }

    /// Records the port `tap`'s place (its switch and part in mirroring; `None`:
    /// on no switch, or gone) and rewrites the mirror tables of the switches it
    /// left and joined. Runs under `changes`.
    fn place_mirror(&self, tap: &str, on: Option<(Uuid, PortMirroring)>) -> Result<(), String> {
        let before = match on {
            Some(v) => lock(&self.mirrors).insert(tap.to_string(), v),
            None => lock(&self.mirrors).remove(tap),
        };
        let mut switches: Vec<Uuid> = before.into_iter().chain(on).map(|(s, _)| s).collect();
        switches.dedup();
        let mut result = Ok(());
        for s in switches {
            if let Err(e) = self.sync_mirror(s) {
                result = Err(e);
            }
        }
        result
    }

    /// Makes the mirror table of `switch` match its ports: each source's frames
    /// copied to each destination; no table without both.
    fn sync_mirror(&self, switch: Uuid) -> Result<(), String> {
        let (mut sources, mut destinations) = (Vec::new(), Vec::new());
        for (tap, (s, mode)) in lock(&self.mirrors).iter() {
            match (*s == switch, mode) {
                (true, PortMirroring::Source) => sources.push(tap.clone()),
                (true, PortMirroring::Destination) => destinations.push(tap.clone()),
                _ => {}
            }
        }
        sources.sort();
        destinations.sort();
        let wanted = !sources.is_empty() && !destinations.is_empty();
        if !wanted && !lock(&self.mirror_tables).contains(&switch) {
            return Ok(());
        }
        let bridge = bridge_of(switch);
        let nft = vswitch::nat::Nft::locate().map_err(|e| crate::vms::store::error_chain(&e))?;
        vswitch::mirror::apply(&nft, &bridge, &sources, &destinations)
            .map_err(|e| crate::vms::store::error_chain(&e))?;
        if wanted {
            lock(&self.mirror_tables).insert(switch);
            tracing::info!(%switch, ?sources, ?destinations, "port mirroring set");
        } else {
            lock(&self.mirror_tables).remove(&switch);
            tracing::info!(%switch, "port mirroring removed");
        }
        Ok(())
    }

    /// Forgets every port of a switch being deleted and removes its mirror table.
    fn drop_mirrors(&self, switch: Uuid) {
        lock(&self.mirrors).retain(|_, (s, _)| *s != switch);
        if let Err(e) = self.sync_mirror(switch) {
            tracing::warn!(%switch, "cannot remove the port mirroring of a deleted switch: {e}");
        }
    }

    /// What `GET /v1/host` says of VLANs.
    pub fn vlan_info(&self) -> api::switches::VlanInfo {
        let v = &self.vlan;
        api::switches::VlanInfo {
            bridge_vlan_filtering: v.bridge_vlan_filtering,
            bridge_vlan_filtering_reason: v.bridge_vlan_filtering_reason.clone(),
            dot1q: v.dot1q,
            dot1q_reason: v.dot1q_reason.clone(),
            access: v.access_enforcement().into(),
            trunk: if v.bridge_vlan_filtering {
                "enforced by bridge VLAN filtering".into()
            } else {
                format!(
                    "refused: needs bridge VLAN filtering ({})",
                    vswitch::vlan::FILTERING_OPTION
                )
            },
        }
    }

    /// Refuses a VLAN setting that this host could not enforce on the switch the
    /// adapter names (an adapter on no switch may hold any valid setting).
    pub fn check_vlan(&self, a: &NetworkAdapter) -> Result<(), ApiError> {
        // A setting that is wrong anywhere says so first.
        vm_config::validate::validate_vlan(&a.mac, a)?;
        if a.switch.is_some() && a.vlan_mode == VlanMode::Trunk && !self.vlan.bridge_vlan_filtering
        {
            return Err(trunk_refused(&self.vlan, &a.mac));
        }
        Ok(())
    }

    /// Puts the tap on the bridge `plan` names (made first if it is a per-VLAN
    /// bridge; the switch's bridge made to filter where the plan says so), with
    /// its VLANs.
    async fn attach_planned(host: &Host, tap: &str, plan: &PortPlan) -> Result<(), String> {
        let chain = |e: vswitch::SwitchError| crate::vms::store::error_chain(&e);
        if plan.vlan_bridge {
            host.ensure_bridge(&plan.bridge).await.map_err(chain)?;
        }
        if plan.vlans.is_some() && !host.vlan_filtering(&plan.bridge).await.map_err(chain)? {
            host.set_vlan_filtering(&plan.bridge).await.map_err(chain)?;
        }
        host.attach(tap, &plan.bridge).await.map_err(chain)?;
        if let Some(v) = &plan.vlans {
            host.set_port_vlans(tap, v).await.map_err(chain)?;
        }
        Ok(())
    }

    /// Removes the per-VLAN bridges of `switch` (every switch for `None`) that
    /// have no port left; with `all`, the ones with ports too (the switch is
    /// going).
    async fn prune_vlan_bridges(&self, host: &Host, switch: Option<Uuid>, all: bool) {
        let ids: Vec<Uuid> = match switch {
            Some(id) => vec![id],
            None => lock(&self.entries).keys().copied().collect(),
        };
        let Ok(links) = host.our_links().await else {
            return;
        };
        for l in links.iter().filter(|l| l.kind == "bridge") {
            let Some(id) = ids
                .iter()
                .find(|id| vswitch::vlan_of_bridge(id.as_u128(), &l.name).is_some())
            else {
                continue;
            };
            let empty = !links.iter().any(|p| p.master == Some(l.index));
            if all || empty {
                match host.delete_link(&l.name).await {
                    Ok(()) => {
                        tracing::info!(switch = %id, bridge = %l.name, "per-VLAN bridge removed")
                    }
                    Err(e) => {
                        tracing::warn!(switch = %id, "cannot remove the per-VLAN bridge {}: {e}", l.name)
                    }
                }
            }
        }
    }

    fn host(&self) -> Result<&Host, ApiError> {
        self.host.as_ref().map_err(|e| {
            ApiError::internal(format!(
                "virtual switches need a netlink connection to the kernel: {e}"
            ))
        })
    }

    pub fn all(&self) -> Vec<SwitchSettings> {
        let mut v: Vec<_> = lock(&self.entries).values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The switch with this id, or else this name.
    pub fn resolve(&self, key: &str) -> Option<SwitchSettings> {
        let entries = lock(&self.entries);
        if let Ok(id) = Uuid::parse_str(key) {
            if let Some(s) = entries.get(&id) {
                return Some(s.clone());
            }
        }
        entries.values().find(|s| s.name == key).cloned()
    }

    /// The switch a request's body names (an adapter's `switch`): one that does
    /// not exist makes the request invalid (422), not its URL's target missing.
    pub fn find_named(&self, key: &str) -> Result<SwitchSettings, ApiError> {
        self.resolve(key).ok_or_else(|| {
            ApiError::invalid(format!(
                "the request names the virtual switch {key:?}, which does not exist on this host; `GET /v1/switches` lists them"
            ))
        })
    }

    pub fn find(&self, key: &str) -> Result<SwitchSettings, ApiError> {
        self.resolve(key).ok_or_else(|| {
            ApiError::not_found(format!(
                "no virtual switch is named or has the id {key:?}; `GET /v1/switches` lists them"
            ))
        })
    }

    pub async fn present(&self, s: &SwitchSettings) -> bool {
        match &self.host {
            Ok(h) => matches!(h.link(&bridge_of(s.id)).await, Ok(Some(l)) if l.kind == "bridge"),
            Err(_) => false,
        }
    }

    fn check_conflicts(&self, s: &SwitchSettings, addrs: &[Cidr]) -> Result<(), ApiError> {
        let entries = lock(&self.entries);
        for other in entries.values().filter(|o| o.id != s.id) {
            if other.name == s.name {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "a virtual switch named {:?} already exists ({}); switch names are unique on a host",
                        s.name, other.id
                    ),
                ));
            }
            let theirs_all = other
                .host_addresses
                .iter()
                .filter_map(|text| text.parse::<Cidr>().ok())
                .chain(external::moved_subnets(other));
            for theirs in theirs_all {
                if let Some(mine) = addrs.iter().find(|a| a.overlaps(&theirs)) {
                    return Err(ApiError::new(
                        ErrorCode::InUse,
                        format!(
                            "the subnet of {mine} overlaps {} of the switch {}; choose a subnet no other switch uses",
                            theirs.network(), other.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A NAT switch's subnets may not overlap the host's own networks (addresses
    /// on links that are not ours): its masquerade and routes would take them over.
    async fn check_host_networks(&self, name: &str, addrs: &[Cidr]) -> Result<(), ApiError> {
        let mut theirs = self.host()?.foreign_addresses().await.map_err(host_error)?;
        // The host's addresses that external switches hold for it are its
        // networks too.
        for s in lock(&self.entries).values() {
            let on = s.adapter.clone().unwrap_or_default();
            theirs.extend(
                external::moved_subnets(s)
                    .into_iter()
                    .map(|c| (on.clone(), c)),
            );
        }
        for (link, other) in theirs {
            if let Some(mine) = addrs.iter().find(|a| a.overlaps(&other)) {
                return Err(ApiError::new(
                    ErrorCode::InUse,
                    format!(
                        "the subnet of {mine} for the NAT switch {name} overlaps {} of the host's interface {link}; choose a subnet the host does not use",
                        other.network()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Creates a switch: checks, the bridge and its addresses, then the file.
    pub async fn create(
        &self,
        name: String,
        kind: SwitchKind,
        host_addresses: &[String],
        dhcp_range: Option<String>,
        adapter: Option<String>,
        allow_management_os: bool,
    ) -> Result<SwitchSettings, ApiError> {
        validate_name(&name)?;
        external::check_fields(
            kind,
            adapter.as_deref(),
            allow_management_os,
            host_addresses,
        )?;
        let addrs = parse_addresses(kind, host_addresses)?;
        let dhcp_range = dhcp_range.filter(|r| !r.is_empty());
        let nat_plan = match kind {
            SwitchKind::Nat => Some(nat::plan(&addrs, dhcp_range.as_deref())?),
            _ if dhcp_range.is_some() => return Err(ApiError::invalid(
                "only a NAT switch hands out addresses; a DHCP range is for a switch of type nat",
            )),
            _ => None,
        };
        let _changing = self.changes.lock().await;
        // An id whose bridge name no other switch has (they share 32 bits).
        let id = loop {
            let id = Uuid::new_v4();
            if !lock(&self.entries)
                .keys()
                .any(|k| bridge_of(*k) == bridge_of(id))
            {
                break id;
            }
        };
        let s = SwitchSettings {
            id,
            name,
            kind,
            host_addresses: addrs.iter().map(Cidr::to_string).collect(),
            dhcp_range,
            adapter,
            allow_management_os,
            uplink: None,
        };
        self.check_conflicts(&s, &addrs)?;
        if kind == SwitchKind::External {
            return self.create_external(s).await;
        }
        let host = self.host()?;
        if nat_plan.is_some() {
            self.check_host_networks(&s.name, &addrs).await?;
        }
        // The programs first: a host without them changes nothing.
        let tools = nat_plan.as_ref().map(|_| nat::tools()).transpose()?;
        let bridge = bridge_of(id);
        let made = host.ensure_bridge(&bridge).await.map_err(host_error)?;
        let undo = || async {
            if made == vswitch::Ensured::Created {
                if let Err(e) = host.delete_link(&bridge).await {
                    tracing::error!("cannot remove the bridge {bridge} again: {e}");
                }
            }
        };
        if let Err(e) = host.set_addresses(&bridge, &addrs).await {
            undo().await;
            return Err(host_error(e));
        }
        if let (Some(plan), Some(tools)) = (&nat_plan, &tools) {
            if let Err(e) = self.nat.apply(tools, id, &bridge, plan) {
                self.nat.remove(Some(&tools.nft), id, &bridge, true);
                self.nat.release_forwarding(self.nat_count());
                undo().await;
                return Err(ApiError::internal(format!(
                    "cannot set up the NAT switch {}: {e}",
                    s.name
                )));
            }
        }
        if let Err(e) = store::save(&self.dir, &s) {
            if let Some(tools) = &tools {
                self.nat.remove(Some(&tools.nft), id, &bridge, true);
                self.nat.release_forwarding(self.nat_count());
            }
            undo().await;
            return Err(ApiError::internal(format!(
                "cannot write {}: {e}",
                store::path(&self.dir, id).display()
            )));
        }
        lock(&self.entries).insert(id, s.clone());
        tracing::info!(switch = %id, name = %s.name, kind = s.kind.name(), %bridge, "virtual switch created");
        Ok(s)
    }

    /// Renames a switch or replaces its host addresses.
    pub async fn update(
        &self,
        key: &str,
        name: Option<String>,
        host_addresses: Option<Vec<String>>,
        dhcp_range: Option<String>,
        allow_management_os: Option<bool>,
    ) -> Result<SwitchSettings, ApiError> {
        let _changing = self.changes.lock().await;
        let old = self.find(key)?;
        let mut new = old.clone();
        if let Some(allow) = allow_management_os.filter(|a| *a != old.allow_management_os) {
            return Err(if old.kind == SwitchKind::External {
                ApiError::new(
                    ErrorCode::InvalidState,
                    format!(
                        "the switch {} was created {} the host sharing its uplink {}; that cannot change on a live switch (the host's addresses would have nowhere to go): delete the switch and create it again {} --allow-management-os",
                        old.name,
                        if old.allow_management_os { "with" } else { "without" },
                        old.adapter.as_deref().unwrap_or(""),
                        if allow { "with" } else { "without" }
                    ),
                )
            } else {
                ApiError::invalid(format!(
                    "allow_management_os is for external switches; the switch {} is {}",
                    old.name,
                    old.kind.name()
                ))
            });
        }
        if old.kind == SwitchKind::External && host_addresses.is_some() {
            return Err(ApiError::invalid(format!(
                "the host's addresses on the external switch {} are those of its uplink {}: change them on the switch's bridge {} with the host's own tools, or delete the switch (which gives them back to {}) and change them there",
                old.name,
                old.adapter.as_deref().unwrap_or(""),
                bridge_of(old.id),
                old.adapter.as_deref().unwrap_or("")
            )));
        }
        if let Some(range) = dhcp_range {
            if new.kind != SwitchKind::Nat {
                return Err(ApiError::invalid(format!(
                    "the switch {} is {}: only a NAT switch hands out addresses, so it has no DHCP range",
                    old.name,
                    old.kind.name()
                )));
            }
            new.dhcp_range = Some(range).filter(|r| !r.is_empty());
        }
        if let Some(name) = name {
            if name != old.name {
                validate_name(&name)?;
            }
            new.name = name;
        }
        let addrs = match &host_addresses {
            Some(given) => parse_addresses(new.kind, given)?,
            None => parse_addresses(new.kind, &new.host_addresses)?,
        };
        new.host_addresses = addrs.iter().map(Cidr::to_string).collect();
        self.check_conflicts(&new, &addrs)?;
        let bridge = bridge_of(new.id);
        let nat_plan = match new.kind {
            SwitchKind::Nat => Some(nat::plan(&addrs, new.dhcp_range.as_deref())?),
            _ => None,
        };
        let nat_changed = nat_plan.is_some()
            && (new.host_addresses != old.host_addresses || new.dhcp_range != old.dhcp_range);
        let tools = if nat_changed {
            Some(nat::tools()?)
        } else {
            None
        };
        if nat_changed && new.host_addresses != old.host_addresses {
            self.check_host_networks(&new.name, &addrs).await?;
        }
        if new.host_addresses != old.host_addresses {
            let host = self.host()?;
            host.ensure_bridge(&bridge).await.map_err(host_error)?;
            host.set_addresses(&bridge, &addrs)
                .await
                .map_err(host_error)?;
        }
        if let (Some(plan), Some(tools)) = (&nat_plan, &tools) {
            if let Err(e) = self.nat.apply(tools, new.id, &bridge, plan) {
                // Back to the old addresses and services.
                let back = parse_addresses(old.kind, &old.host_addresses).unwrap_or_default();
                if let Ok(host) = self.host() {
                    let _ = host.set_addresses(&bridge, &back).await;
                }
                if let Ok(old_plan) = nat::plan(&back, old.dhcp_range.as_deref()) {
                    let _ = self.nat.apply(tools, old.id, &bridge, &old_plan);
                }
                return Err(ApiError::internal(format!(
                    "cannot change the NAT switch {}: {e}",
                    old.name
                )));
            }
        }
        if let Err(e) = store::save(&self.dir, &new) {
            if new.host_addresses != old.host_addresses {
                let back = parse_addresses(old.kind, &old.host_addresses).unwrap_or_default();
                if let Ok(host) = self.host() {
                    let _ = host.set_addresses(&bridge, &back).await;
                }
            }
            if let Some(tools) = &tools {
                let back = nat::addresses(&old.host_addresses);
                if let Ok(old_plan) = nat::plan(&back, old.dhcp_range.as_deref()) {
                    let _ = self.nat.apply(tools, old.id, &bridge, &old_plan);
                }
            }
            return Err(ApiError::internal(format!(
                "cannot write {}: {e}",
                store::path(&self.dir, new.id).display()
            )));
        }
        lock(&self.entries).insert(new.id, new.clone());
        Ok(new)
    }

    /// Deletes the switch's file, then its bridge (running VMs' taps on it are let
    /// go by the kernel and carry nothing). The caller checked who uses it.
    pub async fn delete(&self, id: Uuid) -> Result<(), ApiError> {
        let _changing = self.changes.lock().await;
        let external = lock(&self.entries)
            .get(&id)
            .filter(|s| s.kind == SwitchKind::External)
            .cloned();
        self.drop_mirrors(id);
        if let Some(s) = external {
            return self.delete_external(s).await;
        }
        store::remove(&self.dir, id).map_err(|e| {
            ApiError::internal(format!(
                "cannot remove {}: {e}",
                store::path(&self.dir, id).display()
            ))
        })?;
        let gone = lock(&self.entries).remove(&id);
        let bridge = bridge_of(id);
        if gone.is_some_and(|s| s.kind == SwitchKind::Nat) {
            // dnsmasq goes before its bridge; the table and files with it.
            let nft = vswitch::nat::Nft::locate().ok();
            self.nat.remove(nft.as_ref(), id, &bridge, true);
            self.nat.release_forwarding(self.nat_count());
        }
        if let Ok(host) = self.host() {
            self.prune_vlan_bridges(host, Some(id), true).await;
            if let Err(e) = host.delete_link(&bridge).await {
                tracing::error!("the switch {id} is deleted, but its bridge {bridge} is not: {e}");
            }
        }
        tracing::info!(switch = %id, %bridge, "virtual switch deleted");
        Ok(())
    }

    /// At the service's start: makes each switch's bridge and addresses where they
    /// are missing (after a host reboot); what exists is kept, with its ports, so
    /// running VMs keep their connectivity.
    pub async fn rebuild(&self) {
        let Ok(host) = self.host() else {
            return;
        };
        let _changing = self.changes.lock().await;
        for s in self.all() {
            if s.kind == SwitchKind::External {
                self.rebuild_external(host, s).await;
                continue;
            }
            let bridge = bridge_of(s.id);
            let addrs: Vec<Cidr> = s
                .host_addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            let result = async {
                let made = host.ensure_bridge(&bridge).await?;
                host.set_addresses(&bridge, &addrs).await?;
                Ok::<_, vswitch::SwitchError>(made)
            }
            .await;
            let result = match (result, s.kind) {
                (Ok(made), SwitchKind::Nat) => {
                    let applied = nat::plan(&addrs, s.dhcp_range.as_deref())
                        .map_err(|e| e.message)
                        .and_then(|plan| {
                            let tools = nat::tools().map_err(|e| e.message)?;
                            self.nat.apply(&tools, s.id, &bridge, &plan)
                        });
                    if let Err(e) = applied {
                        tracing::error!(switch = %s.id, name = %s.name, "cannot set up the NAT of {bridge}: {e}");
                    }
                    Ok(made)
                }
                (other, _) => other,
            };
            match result {
                Ok(made) => {
                    tracing::info!(switch = %s.id, name = %s.name, %bridge, ?made, "virtual switch ready")
                }
                Err(e) => {
                    tracing::error!(switch = %s.id, name = %s.name, "cannot set up the bridge {bridge}: {}", crate::vms::store::error_chain(&e))
                }
            }
        }
        // Tables named like ours that no switch of this service has are left
        // alone: another service on this host (another data dir) may own them.
        self.nat.release_forwarding(self.nat_count());
    }

    /// How many NAT switches there are.
    pub fn nat_count(&self) -> usize {
        lock(&self.entries)
            .values()
            .filter(|s| s.kind == SwitchKind::Nat)
            .count()
    }

    /// The NAT switch's services as they are now (`None` for other types).
    pub fn nat_info(&self, s: &SwitchSettings) -> Option<api::switches::NatInfo> {
        (s.kind == SwitchKind::Nat).then(|| {
            let addrs = nat::addresses(&s.host_addresses);
            self.nat.info(
                s.id,
                &bridge_of(s.id),
                nat::plan(&addrs, s.dhcp_range.as_deref()),
            )
        })
    }

    /// Makes the ports of a VM about to start: a tap on its switch's bridge for
    /// each adapter whose switch exists. An adapter whose switch is missing (or
    /// whose tap cannot be made) is left disconnected, with the reason; the VM
    /// starts regardless.
    pub async fn connect_vm(
        &self,
        vm: &VmSettings,
    ) -> (Vec<worker::spec::NicPort>, Vec<AdapterConnection>) {
        let _changing = self.changes.lock().await;
        let mut ports = Vec::new();
        let mut connections = Vec::new();
        for a in &vm.network_adapters {
            let mut c = AdapterConnection {
                mac: a.mac.clone(),
                switch: a.switch.clone(),
                connected: false,
                tap: None,
                data_path: None,
                reason: None,
                counters: None,
            };
            // An adapter that names a switch gets a tap: on the switch's bridge
            // when that exists, on none otherwise (it can be connected while the
            // VM runs). One that names none runs with no port, as it always has,
            // and makes nothing on the host.
            if a.switch.is_none() {
                connections.push(c);
                continue;
            }
            let tap = tap_for(vm.id, &a.mac);
            let target = a.switch.as_ref().map(|key| (key, self.resolve(key)));
            // The tap is made on no bridge, given its guards and limit, and only
            // then put on the switch: it never carries a frame unguarded. A port
            // whose guards cannot be set stays off the switch.
            // A VLAN setting this host cannot enforce keeps the port off too.
            let mut guarded = match &target {
                Some((_, Some(s))) => plan_port(&self.vlan, s, a).map(drop).map_err(|e| e.message),
                _ => Ok(()),
            };
            let made = match self.host() {
                Err(e) => Err(e.message),
                Ok(h) => match h.create_detached_tap(&tap).await {
                    Err(e) => Err(crate::vms::store::error_chain(&e)),
                    Ok(()) => {
                        if guarded.is_ok() {
                            guarded = enforce(h, &tap, a).await;
                        }
                        match (&guarded, &target) {
                            (Ok(()), Some((_, Some(s)))) => match plan_port(&self.vlan, s, a) {
                                Ok(plan) => Self::attach_planned(h, &tap, &plan).await,
                                Err(e) => Err(e.message),
                            },
                            // Off any bridge (a quick restart's tap may be on one).
                            _ => h
                                .detach(&tap)
                                .await
                                .map_err(|e| crate::vms::store::error_chain(&e)),
                        }
                    }
                },
            };
            match (&made, &target) {
                (Ok(()), Some((_, Some(s)))) if guarded.is_ok() => {
                    c.connected = true;
                    c.switch = Some(s.name.clone());
                    if let Err(e) = self.place_mirror(&tap, Some((s.id, a.port_mirroring))) {
                        tracing::error!(vm = %vm.id, mac = %a.mac, "cannot set the port mirroring of {tap}: {e}");
                    }
                }
                (Ok(()), Some((_, Some(s)))) => {
                    c.switch = Some(s.name.clone());
                    c.reason = Some(format!(
                        "its port on the switch {} cannot be guarded or put on its VLAN: {}",
                        s.name,
                        guarded.as_ref().err().map_or("", String::as_str)
                    ));
                }
                (Err(e), Some((_, Some(s)))) => {
                    c.switch = Some(s.name.clone());
                    c.reason = Some(format!(
                        "its port on the switch {} cannot be made: {e}",
                        s.name
                    ));
                }
                (_, Some((key, None))) => {
                    c.reason = Some(format!(
                        "the virtual switch {key:?} does not exist on this host; connect the adapter to another switch (`viridian vm nic connect`) or create it"
                    ));
                }
                (_, None) => {}
            }
            if made.is_ok() {
                let vhost = self.data_path.vhost_net && a.kind == vm_config::AdapterKind::Synthetic;
                c.tap = Some(tap.clone());
                c.data_path = Some(if vhost { "vhost-net" } else { "userspace" }.into());
                ports.push(worker::spec::NicPort {
                    mac: a.mac.clone(),
                    tap,
                    vhost,
                });
            }
            connections.push(c);
        }
        lock(&self.ports).insert(vm.id, connections.clone());
        (ports, connections)
    }

    /// Records the connections of a VM found running at the service's start.
    pub fn adopt(&self, vm: &VmSettings, network: &[worker::spec::NicPort]) {
        let connections = vm
            .network_adapters
            .iter()
            .map(|a| {
                let port = network.iter().find(|p| p.mac.eq_ignore_ascii_case(&a.mac));
                AdapterConnection {
                    mac: a.mac.clone(),
                    switch: a
                        .switch
                        .as_ref()
                        .map(|k| self.resolve(k).map_or(k.clone(), |s| s.name)),
                    connected: port.is_some() && a.switch.is_some(),
                    tap: port.map(|p| p.tap.clone()),
                    data_path: port.map(|p| if p.vhost { "vhost-net" } else { "userspace" }.into()),
                    reason: (port.is_none() && a.switch.is_some())
                        .then(|| "the adapter was not connected when the VM started".to_string()),
                    counters: None,
                }
            })
            .collect();
        lock(&self.ports).insert(vm.id, connections);
    }

    /// Moves a running VM's adapter to the switch `to` (or to none): its tap goes
    /// onto that switch's bridge (or off its bridge). The guest keeps its adapter.
    pub async fn move_port(
        &self,
        vm: Uuid,
        adapter: &NetworkAdapter,
        to: Option<&SwitchSettings>,
    ) -> Result<(), ApiError> {
        let mac = adapter.mac.as_str();
        let _changing = self.changes.lock().await;
        let tap = lock(&self.ports)
            .get(&vm)
            .and_then(|cs| cs.iter().find(|c| c.mac.eq_ignore_ascii_case(mac)))
            .and_then(|c| c.tap.clone())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidState,
                    format!("the adapter {mac} has no port in this run of the VM (it named no switch when the VM started); connect it while the VM is off, or connect it and restart the VM"),
                )
            })?;
        let host = self.host()?;
        // Refused VLAN settings change nothing: the plan comes first.
        let plan = to.map(|s| plan_port(&self.vlan, s, adapter)).transpose()?;
        if to.is_some() {
            enforce(host, &tap, adapter)
                .await
                .map_err(|e| ApiError::internal(format!("the port {tap} of the adapter {mac} cannot be guarded, so it stays where it is: {e}")))?;
        }
        let moved = match &plan {
            Some(plan) => {
                // Off its old bridge first: on a filtering bridge a port comes
                // back with the default VLAN only, which its plan then replaces.
                if plan.vlans.is_some() {
                    host.detach(&tap).await.map_err(host_error)?;
                }
                Self::attach_planned(host, &tap, plan)
                    .await
                    .map_err(ApiError::internal)
            }
            None => host.detach(&tap).await.map_err(host_error),
        };
        self.prune_vlan_bridges(host, None, false).await;
        moved?;
        if let Err(e) = self.place_mirror(&tap, to.map(|s| (s.id, adapter.port_mirroring))) {
            tracing::error!(vm = %vm, %mac, "cannot set the port mirroring of {tap}: {e}");
        }
        if let Some(c) = lock(&self.ports)
            .get_mut(&vm)
            .and_then(|cs| cs.iter_mut().find(|c| c.mac.eq_ignore_ascii_case(mac)))
        {
            c.connected = to.is_some();
            c.switch = to.map(|s| s.name.clone());
            c.reason = None;
        }
        tracing::info!(vm = %vm, %mac, %tap, switch = ?to.map(|s| &s.name), "network adapter moved while running");
        Ok(())
    }

    /// Applies a running VM's adapter's guards and bandwidth to its port at once.
    /// An adapter with no port in this run has nothing on the host to change.
    pub async fn set_port_options(
        &self,
        vm: Uuid,
        adapter: &NetworkAdapter,
    ) -> Result<(), ApiError> {
        let _changing = self.changes.lock().await;
        let Some(tap) = self.tap_of(vm, &adapter.mac) else {
            return Ok(());
        };
        let host = self.host()?;
        enforce(host, &tap, adapter).await.map_err(|e| {
            ApiError::internal(format!(
                "cannot change the port {tap} of the network adapter {}: {e}",
                adapter.mac
            ))
        })?;
        // Its part in mirroring, on the switch it is on now.
        let on = lock(&self.mirrors).get(&tap).map(|(s, _)| *s);
        if let Some(switch) = on {
            self.place_mirror(&tap, Some((switch, adapter.port_mirroring)))
                .map_err(|e| {
                    ApiError::internal(format!(
                        "cannot change the port mirroring of the network adapter {}: {e}",
                        adapter.mac
                    ))
                })?;
        }
        tracing::info!(vm = %vm, mac = %adapter.mac, %tap, spoofing = adapter.mac_address_spoofing, dhcp_guard = adapter.dhcp_guard, router_guard = adapter.router_guard, bandwidth = ?adapter.maximum_bandwidth, "network adapter's port changed while running");
        Ok(())
    }

    /// Whether the running VM's adapter has a port in this run.
    pub fn has_port(&self, vm: Uuid, mac: &str) -> bool {
        self.tap_of(vm, mac).is_some()
    }

    fn tap_of(&self, vm: Uuid, mac: &str) -> Option<String> {
        lock(&self.ports)
            .get(&vm)
            .and_then(|cs| cs.iter().find(|c| c.mac.eq_ignore_ascii_case(mac)))
            .and_then(|c| c.tap.clone())
    }

    /// Every port's counters now, by tap: the tap's traffic and its guards' drops.
    async fn port_counters(&self, taps: &[String]) -> HashMap<String, AdapterCounters> {
        let mut out = HashMap::new();
        let Ok(host) = self.host() else {
            return out;
        };
        let drops: HashMap<String, guards::GuardDrops> = if taps.is_empty() {
            HashMap::new()
        } else {
            match guards::drops().await {
                Ok(d) => d.into_iter().collect(),
                Err(e) => {
                    // Asked at every read of a running VM: no warning each time.
                    tracing::debug!(
                        "cannot read the guards' counters: {}",
                        crate::vms::store::error_chain(&e)
                    );
                    HashMap::new()
                }
            }
        };
        for tap in taps {
            let Ok(Some(s)) = host.stats(tap).await else {
                continue;
            };
            let d = drops.get(tap).copied().unwrap_or_default();
            out.insert(
                tap.clone(),
                AdapterCounters {
                    // The tap receives what the VM sends and sends what it receives.
                    received_bytes: s.tx_bytes,
                    received_packets: s.tx_packets,
                    sent_bytes: s.rx_bytes,
                    sent_packets: s.rx_packets,
                    dropped: GuardDrops {
                        mac_address_spoofing: d.mac_spoofing.packets,
                        dhcp_guard: d.dhcp_guard.packets,
                        router_guard: d.router_guard.packets,
                    },
                },
            );
        }
        out
    }

    /// Fills in the counters of connections that have a port.
    pub async fn add_counters(&self, connections: &mut [AdapterConnection]) {
        let taps: Vec<String> = connections.iter().filter_map(|c| c.tap.clone()).collect();
        let mut counters = self.port_counters(&taps).await;
        for c in connections {
            if let Some(tap) = &c.tap {
                c.counters = counters.remove(tap);
            }
        }
    }

    /// Every running VM's adapters with their counters (for `/v1/metrics`).
    pub async fn all_counters(&self) -> Vec<(Uuid, AdapterConnection)> {
        let mut all: Vec<(Uuid, AdapterConnection)> = lock(&self.ports)
            .iter()
            .flat_map(|(vm, cs)| cs.iter().map(|c| (*vm, c.clone())))
            .filter(|(_, c)| c.tap.is_some())
            .collect();
        let taps: Vec<String> = all.iter().filter_map(|(_, c)| c.tap.clone()).collect();
        let mut counters = self.port_counters(&taps).await;
        for (_, c) in &mut all {
            if let Some(tap) = &c.tap {
                c.counters = counters.remove(tap);
            }
        }
        all.retain(|(_, c)| c.counters.is_some());
        all
    }

    pub fn connections(&self, vm: Uuid) -> Vec<AdapterConnection> {
        lock(&self.ports).get(&vm).cloned().unwrap_or_default()
    }

    /// Forgets a stopped VM's ports and removes its taps. The ports are taken at
    /// once; the taps go later, unless a new start of the VM has claimed them
    /// again by then (the same names), so a quick restart keeps its ports.
    pub fn release_vm(self: &std::sync::Arc<Self>, vm: Uuid) {
        let taps: Vec<String> = lock(&self.ports)
            .remove(&vm)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.tap)
            .collect();
        if taps.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(host) = this.host() else {
                return;
            };
            let _changing = this.changes.lock().await;
            for tap in taps {
                let claimed = lock(&this.ports)
                    .values()
                    .flatten()
                    .any(|c| c.tap.as_deref() == Some(tap.as_str()));
                if claimed {
                    continue;
                }
                if let Err(e) = this.place_mirror(&tap, None) {
                    tracing::warn!(vm = %vm, "cannot take the port {tap} out of port mirroring: {e}");
                }
                unenforce(host, &tap).await;
                match host.delete_link(&tap).await {
                    Ok(()) => tracing::debug!(vm = %vm, %tap, "port removed"),
                    Err(e) => tracing::warn!(vm = %vm, "cannot remove the tap {tap}: {e}"),
                }
            }
            this.prune_vlan_bridges(host, None, false).await;
        });
    }

    /// At start, after running VMs were found: the taps this service would make
    /// for its VMs' adapters that no running VM uses (left by a crash) are
    /// removed. Links of other names, other services' included, are left alone.
    pub async fn remove_stale_taps(&self, vms: &[VmSettings]) {
        let Ok(host) = self.host() else {
            return;
        };
        let used: Vec<String> = lock(&self.ports)
            .values()
            .flatten()
            .filter_map(|c| c.tap.clone())
            .collect();
        let ours: Vec<String> = vms
            .iter()
            .flat_map(|vm| vm.network_adapters.iter().map(|a| tap_for(vm.id, &a.mac)))
            .filter(|t| !used.contains(t))
            .collect();
        let Ok(links) = host.our_links().await else {
            return;
        };
        for l in links {
            if l.kind == "tun" && ours.contains(&l.name) {
                tracing::info!(tap = %l.name, "removing a tap no running VM uses");
                unenforce(host, &l.name).await;
                let _ = host.delete_link(&l.name).await;
            } else if l.kind == "ifb" && ours.iter().any(|t| shaping::ifb_for(t) == l.name) {
                let _ = host.delete_link(&l.name).await;
            }
        }
        // Guards of ports that are gone (their taps went in a crash).
        match guards::ports().await {
            Ok(ports) => {
                for p in ports.iter().filter(|p| ours.contains(p)) {
                    tracing::info!(tap = %p, "removing the guards of a port no running VM uses");
                    if let Err(e) = guards::remove(p).await {
                        tracing::warn!(tap = %p, "cannot remove the port's guards: {}", crate::vms::store::error_chain(&e));
                    }
                }
            }
            Err(e) => tracing::debug!(
                "no guards to look at: {}",
                crate::vms::store::error_chain(&e)
            ),
        }
        // The running VMs' ports keep their guards and limits (the kernel kept
        // them across the restart); made again from the settings, in case.
        for vm in vms {
            for a in &vm.network_adapters {
                let connected = lock(&self.ports).get(&vm.id).is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.connected && c.mac.eq_ignore_ascii_case(&a.mac))
                });
                if let (true, Some(tap)) = (connected, self.tap_of(vm.id, &a.mac)) {
                    if let Err(e) = enforce(host, &tap, a).await {
                        tracing::error!(vm = %vm.id, mac = %a.mac, "cannot guard the port {tap} again: {e}");
                    }
                    // Its mirroring as the settings say (the table is rewritten
                    // whole, so one left by the last run is replaced).
                    let on = a
                        .switch
                        .as_deref()
                        .and_then(|k| self.resolve(k))
                        .map(|s| s.id);
                    if let Some(switch) = on {
                        if let Err(e) = self.place_mirror(&tap, Some((switch, a.port_mirroring))) {
                            tracing::error!(vm = %vm.id, mac = %a.mac, "cannot set the port mirroring of {tap} again: {e}");
                        }
                    }
                    // Its VLAN's bridge made again where it went (a per-VLAN
                    // bridge removed by hand), the tap on it.
                    let switch = a.switch.as_deref().and_then(|k| self.resolve(k));
                    if let Some(s) = switch {
                        let placed = match plan_port(&self.vlan, &s, a) {
                            Ok(plan) => Self::attach_planned(host, &tap, &plan).await,
                            Err(e) => Err(e.message),
                        };
                        if let Err(e) = placed {
                            tracing::error!(vm = %vm.id, mac = %a.mac, "cannot put the port {tap} on its VLAN again: {e}");
                        }
                    }
                }
            }
        }
        // Per-VLAN bridges no port uses any more (their last VM stopped while
        // the service was down).
        self.prune_vlan_bridges(host, None, false).await;
        // Mirror tables of the last run: made again from the ports above, or
        // removed when their sources or destinations stopped meanwhile.
        if let Ok(nft) = vswitch::nat::Nft::locate() {
            let tables = vswitch::mirror::tables(&nft).unwrap_or_default();
            for s in self.all() {
                if tables.contains(&vswitch::mirror::table_name(&bridge_of(s.id))) {
                    lock(&self.mirror_tables).insert(s.id);
                    if let Err(e) = self.sync_mirror(s.id) {
                        tracing::error!(switch = %s.id, "cannot set the port mirroring again: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_differ_per_vm_and_adapter_and_carry_the_prefix() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let t = tap_for(a, "52:54:00:00:00:01");
        assert!(
            t.starts_with("vswt-") && t.len() <= vswitch::MAX_NAME_BYTES,
            "{t}"
        );
        assert_eq!(t, tap_for(a, "52:54:00:00:00:01".to_uppercase().as_str()));
        assert_ne!(t, tap_for(a, "52:54:00:00:00:02"));
        assert_ne!(t, tap_for(b, "52:54:00:00:00:01"));
    }

    #[test]
    fn host_addresses_are_checked_by_kind_and_subnet() {
        assert!(parse_addresses(SwitchKind::Private, &["10.0.0.1/24".into()]).is_err());
        let ok = parse_addresses(
            SwitchKind::Internal,
            &["10.0.0.1/24".into(), "fd00::1/64".into()],
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let e = parse_addresses(
            SwitchKind::Internal,
            &["10.0.0.1/24".into(), "10.0.0.2/16".into()],
        )
        .unwrap_err();
        assert!(e.message.contains("overlapping"), "{}", e.message);
        let e = parse_addresses(SwitchKind::Internal, &["10.0.0.300/24".into()]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParameter);
    }

    #[test]
    fn switch_names_follow_the_vm_rules_in_their_own_words() {
        let e = validate_name("").unwrap_err();
        assert!(e.message.contains("switch"), "{}", e.message);
        assert!(!e.message.contains("VM"), "{}", e.message);
        let e = validate_name(&Uuid::new_v4().to_string()).unwrap_err();
        assert!(
            e.message.contains("switch name") && e.message.contains("switches are found"),
            "{}",
            e.message
        );
        assert!(validate_name("lan 1").is_ok());
    }
}
