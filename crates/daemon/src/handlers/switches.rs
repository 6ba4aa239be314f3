//! `/v1/switches/...` and connecting VMs' adapters to switches.

use std::sync::Arc;

use api::switches::{
    ConnectAdapterRequest, CreateSwitchRequest, Lease, LeaseList, Switch, SwitchAdapter,
    SwitchKind, SwitchList, UpdateNetworkAdapterRequest, UpdateSwitchRequest,
};
use api::ErrorCode;
use hyper::body::Incoming;
use hyper::Response;
use uuid::Uuid;
use vm_config::validate::canonical_mac;

use crate::error::ApiError;
use crate::http::body::{json, no_content, read_json, Body};
use crate::service::{damaged_unreadable, find, Service};
use crate::switches::{bridge_of, SwitchSettings};
use crate::vms::store::error_chain;
use api::vms::VmState;

type Answer = Result<Response<Body>, ApiError>;

/// How long a running VM's worker gets to show the guest its link going down
/// or up around a port's move.
const LINK_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The adapters of every VM whose settings name the switch `id`.
fn adapters_on(svc: &Service, id: Uuid) -> Vec<SwitchAdapter> {
    let store = svc.store();
    let mut out = Vec::new();
    for e in store.entries() {
        let Some(s) = &e.settings else { continue };
        for a in &s.network_adapters {
            let on = a
                .switch
                .as_deref()
                .and_then(|k| svc.switches.resolve(k))
                .is_some_and(|sw| sw.id == id);
            if on {
                out.push(SwitchAdapter {
                    vm: s.id,
                    vm_name: s.name.clone(),
                    mac: a.mac.clone(),
                });
            }
        }
    }
    out
}

async fn view(svc: &Service, s: &SwitchSettings) -> Switch {
    Switch {
        id: s.id,
        name: s.name.clone(),
        kind: s.kind,
        // An external switch holds the uplink's addresses for the host.
        host_addresses: match s.kind {
            SwitchKind::External => crate::switches::external::moved_subnets(s)
                .iter()
                .map(ToString::to_string)
                .collect(),
            _ => s.host_addresses.clone(),
        },
        bridge: bridge_of(s.id),
        present: svc.switches.present(s).await,
        adapters: adapters_on(svc, s.id),
        nat: svc.switches.nat_info(s),
        adapter: s.adapter.clone(),
        allow_management_os: s.allow_management_os,
        uplink: svc.switches.uplink_info(s).await,
    }
}

pub async fn list(svc: &Arc<Service>) -> Answer {
    let mut switches = Vec::new();
    for s in svc.switches.all() {
        switches.push(view(svc, &s).await);
    }
    Ok(json(200, &SwitchList { switches }))
}

pub async fn create(svc: &Arc<Service>, body: Incoming) -> Answer {
    let req: CreateSwitchRequest = read_json(body).await?;
    let s = svc
        .switches
        .create(
            req.name,
            req.kind,
            &req.host_addresses,
            req.dhcp_range,
            req.adapter,
            req.allow_management_os,
        )
        .await?;
    let mut resp = json(201, &view(svc, &s).await);
    if let Ok(v) = format!("/v1/switches/{}", s.id).parse() {
        resp.headers_mut().insert("location", v);
    }
    Ok(resp)
}

pub async fn get(svc: &Arc<Service>, key: &str) -> Answer {
    let s = svc.switches.find(key)?;
    Ok(json(200, &view(svc, &s).await))
}

pub async fn update(svc: &Arc<Service>, key: &str, body: Incoming) -> Answer {
    let req: UpdateSwitchRequest = read_json(body).await?;
    let s = svc
        .switches
        .update(
            key,
            req.name,
            req.host_addresses,
            req.dhcp_range,
            req.allow_management_os,
        )
        .await?;
    Ok(json(200, &view(svc, &s).await))
}

/// `GET /v1/switches/{switch}/leases`: a NAT switch's leases as its dnsmasq
/// recorded them, each with the VM and adapter that have its MAC (an adapter on
/// this switch first, else any VM's on this host). Another switch hands out no
/// addresses: an empty list and the reason.
pub async fn leases(svc: &Arc<Service>, key: &str) -> Answer {
    let s = svc.switches.find(key)?;
    if s.kind != SwitchKind::Nat {
        return Ok(json(
            200,
            &LeaseList {
                leases: Vec::new(),
                reason: Some(format!(
                    "the switch {} is {}: only NAT switches hand out addresses (DHCP), so it has no leases",
                    s.name,
                    s.kind.name()
                )),
            },
        ));
    }
    let owners: Vec<(bool, Uuid, String, String)> = {
        let store = svc.store();
        store
            .entries()
            .filter_map(|e| e.settings.as_ref())
            .flat_map(|vm| {
                vm.network_adapters.iter().map(|a| {
                    let here = a
                        .switch
                        .as_deref()
                        .and_then(|k| svc.switches.resolve(k))
                        .is_some_and(|sw| sw.id == s.id);
                    (here, vm.id, vm.name.clone(), a.mac.clone())
                })
            })
            .collect()
    };
    let leases = svc
        .switches
        .nat
        .leases(s.id)
        .into_iter()
        .map(|l| {
            let owner = owners
                .iter()
                .filter(|o| o.3.eq_ignore_ascii_case(&l.mac))
                .max_by_key(|o| o.0);
            Lease {
                mac: l.mac,
                ip: l.ip.to_string(),
                hostname: l.hostname,
                expires: l.expires.map(|t| {
                    crate::convert::rfc3339(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
                    )
                }),
                vm: owner.map(|o| o.1),
                vm_name: owner.map(|o| o.2.clone()),
                adapter: owner.map(|o| o.3.clone()),
            }
        })
        .collect();
    Ok(json(
        200,
        &LeaseList {
            leases,
            reason: None,
        },
    ))
}

/// `DELETE /v1/switches/{switch}[?force=true]`: a switch adapters are configured
/// on is `InUse`; `force` disconnects them in their VMs' settings first.
pub async fn delete(svc: &Arc<Service>, key: &str, query: Option<&str>) -> Answer {
    let force = crate::vms::delete::flag(query, "force")?;
    let s = svc.switches.find(key)?;
    let users = adapters_on(svc, s.id);
    if !users.is_empty() && !force {
        let names: Vec<String> = users
            .iter()
            .map(|u| format!("{} ({})", u.vm_name, u.mac))
            .collect();
        return Err(ApiError::new(
            ErrorCode::InUse,
            format!(
                "the virtual switch {} is used by the network adapters of {}; disconnect them (`viridian vm nic disconnect`) or delete with force=true, which disconnects them",
                s.name,
                names.join(", ")
            ),
        )
        .with_details(serde_json::to_value(&users).unwrap_or_default()));
    }
    if force {
        disconnect_all(svc, &s, &users)?;
    }
    svc.switches.delete(s.id).await?;
    Ok(no_content())
}

/// Clears the switch from every adapter on it (also of running VMs: their taps go
/// with the bridge, so the settings say what is true).
fn disconnect_all(
    svc: &Service,
    s: &SwitchSettings,
    users: &[SwitchAdapter],
) -> Result<(), ApiError> {
    let mut store = svc.store();
    let mut vms: Vec<Uuid> = users.iter().map(|u| u.vm).collect();
    vms.dedup();
    for vm in vms {
        let Some(mut settings) = store.get(vm).and_then(|e| e.settings.clone()) else {
            continue;
        };
        for a in &mut settings.network_adapters {
            if a.switch
                .as_deref()
                .and_then(|k| svc.switches.resolve(k))
                .is_some_and(|sw| sw.id == s.id)
            {
                a.switch = None;
            }
        }
        store
            .save(settings)
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
    }
    Ok(())
}

/// `POST /v1/vms/{vm}/network-adapters/{mac}/connect`: settings of a VM that is
/// Off; a running (or paused) VM's adapter moves to the switch at once.
pub async fn connect(svc: &Arc<Service>, vm: &str, mac: &str, body: Incoming) -> Answer {
    let req: ConnectAdapterRequest = read_json(body).await?;
    // The VM first: a missing one is the answer (404) whatever the body says.
    find(&svc.store(), vm)?;
    let s = svc.switches.find_named(&req.switch)?;
    set_switch(svc, vm, mac, Some(s)).await
}

/// `POST /v1/vms/{vm}/network-adapters/{mac}/disconnect`
pub async fn disconnect(svc: &Arc<Service>, vm: &str, mac: &str) -> Answer {
    set_switch(svc, vm, mac, None).await
}

async fn set_switch(
    svc: &Arc<Service>,
    vm: &str,
    mac: &str,
    switch: Option<SwitchSettings>,
) -> Answer {
    let wanted = canonical_mac(mac)?;
    let is_it =
        |a: &vm_config::NetworkAdapter| canonical_mac(&a.mac).ok().as_deref() == Some(&wanted);
    let no_such = |name: &str| {
        ApiError::not_found(format!(
            "VM {name} has no network adapter with MAC {wanted}"
        ))
    };
    let live = {
        let store = svc.store();
        let entry = find(&store, vm)?;
        let state = svc.runtime.get(entry.id).state;
        let settings = entry
            .settings
            .clone()
            .ok_or_else(|| damaged_unreadable(entry))?;
        matches!(state, VmState::Running | VmState::Paused).then_some(settings)
    };
    let Some(mut settings) = live else {
        let (adapter, _) = svc.update_vm(vm, |s| {
            let name = s.name.clone();
            let a = s
                .network_adapters
                .iter_mut()
                .find(|a| is_it(a))
                .ok_or_else(|| no_such(&name))?;
            a.switch = switch.as_ref().map(|s| s.id.to_string());
            svc.switches.check_vlan(a)?;
            Ok(a.clone())
        })?;
        return Ok(json(200, &adapter));
    };
    // Running: the port moves first; the settings then say where it is.
    let name = settings.name.clone();
    let index = settings
        .network_adapters
        .iter()
        .position(is_it)
        .ok_or_else(|| no_such(&name))?;
    // The guest sees its link go down while the port moves and come back on the
    // new switch (so it asks for an address again), as Hyper-V's guests do.
    let mac = settings.network_adapters[index].mac.clone();
    link(svc, settings.id, &mac, false).await;
    let moved = svc
        .switches
        .move_port(
            settings.id,
            &settings.network_adapters[index],
            switch.as_ref(),
        )
        .await;
    link(svc, settings.id, &mac, true).await;
    moved?;
    settings.network_adapters[index].switch = switch.as_ref().map(|s| s.id.to_string());
    let adapter = settings.network_adapters[index].clone();
    let mut store = svc.store();
    let entry = store
        .save(settings)
        .map_err(|e| ApiError::internal(error_chain(&e)))?;
    svc.events.publish(api::events::EventBody::Vm {
        vm: svc.summary(entry),
    });
    Ok(json(200, &adapter))
}

/// Sets the adapter's link as the guest sees it (a failure is logged: the port
/// change itself went ahead).
///
/// The link as the guest sees it is a courtesy: a worker busy with a long
/// request does not hold up the port's move (`LINK_TIME_LIMIT`).
async fn link(svc: &Arc<Service>, vm: uuid::Uuid, mac: &str, up: bool) {
    let Some(w) = svc.workers.clone() else {
        return;
    };
    match tokio::time::timeout(LINK_TIME_LIMIT, w.set_link(vm, mac.to_string(), up)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(vm = %vm, mac = %mac, up, error = %e, "cannot change the adapter's link as the guest sees it")
        }
        Err(_) => tracing::warn!(
            vm = %vm, mac = %mac, up,
            "the VM's worker did not change the adapter's link as the guest sees it within {} s; the port moves regardless",
            LINK_TIME_LIMIT.as_secs()
        ),
    }
}

/// `PATCH /v1/vms/{vm}/network-adapters/{mac}`: an adapter's guards and maximum
/// bandwidth. A VM that is Off gets new settings; a running (or paused) VM's
/// port changes first, then its settings are written (a port that cannot change
/// is put back as it was, and nothing is written).
pub async fn update_adapter(svc: &Arc<Service>, vm: &str, mac: &str, body: Incoming) -> Answer {
    let req: UpdateNetworkAdapterRequest = read_json(body).await?;
    let wanted = canonical_mac(mac)?;
    let apply = |a: &mut vm_config::NetworkAdapter| {
        if let Some(v) = req.mac_address_spoofing {
            a.mac_address_spoofing = v;
        }
        if let Some(v) = req.dhcp_guard {
            a.dhcp_guard = v;
        }
        if let Some(v) = req.router_guard {
            a.router_guard = v;
        }
        if let Some(v) = req.maximum_bandwidth {
            a.maximum_bandwidth = v;
        }
        if let Some(v) = req.port_mirroring {
            a.port_mirroring = v;
        }
        req.apply_vlan(a);
    };
    let is_it =
        |a: &vm_config::NetworkAdapter| canonical_mac(&a.mac).ok().as_deref() == Some(&wanted);
    let no_such = |name: &str| {
        ApiError::not_found(format!(
            "VM {name} has no network adapter with MAC {wanted}; `viridian vm show {name}` lists its adapters"
        ))
    };
    let live = {
        let store = svc.store();
        let entry = find(&store, vm)?;
        let state = svc.runtime.get(entry.id).state;
        let settings = entry
            .settings
            .clone()
            .ok_or_else(|| damaged_unreadable(entry))?;
        matches!(state, VmState::Running | VmState::Paused).then_some(settings)
    };
    let Some(old) = live else {
        let (adapter, _) = svc.update_vm(vm, |s| {
            let name = s.name.clone();
            let a = s
                .network_adapters
                .iter_mut()
                .find(|a| is_it(a))
                .ok_or_else(|| no_such(&name))?;
            apply(a);
            svc.switches.check_vlan(a)?;
            Ok(a.clone())
        })?;
        return Ok(json(200, &adapter));
    };
    let index = old
        .network_adapters
        .iter()
        .position(is_it)
        .ok_or_else(|| no_such(&old.name))?;
    let mut new = old.clone();
    apply(&mut new.network_adapters[index]);
    svc.check_running_settings(&new)?;
    let adapter = new.network_adapters[index].clone();
    svc.switches.check_vlan(&adapter)?;
    // A new VLAN moves the port (between per-VLAN bridges, or its VLANs on a
    // filtering bridge) with a link blip, so the guest notices and asks again.
    let moves = req.changes_vlan() && svc.switches.has_port(new.id, &adapter.mac);
    let id = new.id;
    let place = |a: vm_config::NetworkAdapter| {
        let svc = svc.clone();
        async move {
            if !moves {
                return svc.switches.set_port_options(id, &a).await;
            }
            let switch = a.switch.as_deref().and_then(|k| svc.switches.resolve(k));
            link(&svc, id, &a.mac, false).await;
            let moved = svc.switches.move_port(id, &a, switch.as_ref()).await;
            link(&svc, id, &a.mac, true).await;
            moved
        }
    };
    place(adapter.clone()).await?;
    let saved = {
        let mut store = svc.store();
        store
            .save(new)
            .map(|entry| svc.summary(entry))
            .map_err(|e| ApiError::internal(error_chain(&e)))
    };
    match saved {
        Ok(summary) => {
            svc.events
                .publish(api::events::EventBody::Vm { vm: summary });
            Ok(json(200, &adapter))
        }
        Err(e) => {
            // The settings say what the port does: put the port back.
            if let Err(back) = place(old.network_adapters[index].clone()).await {
                tracing::error!(
                    "cannot put the port of {} back: {}",
                    adapter.mac,
                    back.message
                );
            }
            Err(e)
        }
    }
}
