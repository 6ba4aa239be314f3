//! `/v1/vms/...`

use std::sync::Arc;

use api::vms::VmState;
use api::vms::{
    AddDriveRequest, AddNetworkAdapterRequest, CreateVmRequest, DriveList, NetworkAdapterList,
    UpdateDriveRequest, UpdateProcessorRequest, UpdateVmRequest, VmList,
};
use api::ErrorCode;
use hyper::body::Incoming;
use hyper::Response;
use uuid::Uuid;
use vm_config::validate::{canonical_mac, validate_slot};
use vm_config::{
    AdapterKind, ControllerKind, Drive, MemorySettings, NetworkAdapter, ProcessorSettings, Slot,
    VmSettings,
};

use crate::error::ApiError;
use crate::http::body::{json, no_content, read_json, Body};
use crate::service::{damaged_unreadable, find, Service};

type Answer = Result<Response<Body>, ApiError>;

pub fn list(svc: &Arc<Service>) -> Answer {
    let store = svc.store();
    let vms = store.entries().map(|e| svc.summary(e)).collect();
    Ok(json(200, &VmList { vms }))
}

pub async fn create(svc: &Arc<Service>, body: Incoming) -> Answer {
    let req: CreateVmRequest = read_json(body).await?;
    let settings = VmSettings {
        id: Uuid::new_v4(),
        name: req.name,
        generation: req.generation,
        processor: {
            let d = svc.defaults();
            ProcessorSettings {
                reserve_percent: d.reserve_percent,
                limit_percent: d.limit_percent,
                relative_weight: d.relative_weight,
                ..ProcessorSettings::with_count(req.processor_count)
            }
        },
        memory: MemorySettings {
            startup_mib: req.memory_mib,
        },
        drives: vec![],
        network_adapters: vec![],
        boot_order: vec![],
        notes: req.notes,
        configuration_version: vm_config::CURRENT_CONFIGURATION_VERSION,
    };
    let vm = svc.create_vm(settings)?;
    tracing::info!(vm = %vm.id, name = %vm.name, "VM created");
    let mut resp = json(201, &vm);
    if let Ok(v) = format!("/v1/vms/{}", vm.id).parse() {
        resp.headers_mut().insert("location", v);
    }
    Ok(resp)
}

pub async fn get(svc: &Arc<Service>, key: &str) -> Answer {
    let mut vm = {
        let store = svc.store();
        let entry = find(&store, key)?;
        svc.vm_view(entry)
    };
    // Each port's traffic and drops, read from the kernel now.
    svc.switches
        .add_counters(&mut vm.runtime.network_adapters)
        .await;
    Ok(json(200, &vm))
}

pub async fn update(svc: &Arc<Service>, key: &str, body: Incoming) -> Answer {
    let req: UpdateVmRequest = read_json(body).await?;
    let (_, vm) = svc.update_vm(key, |s| {
        if let Some(name) = req.name {
            s.name = name;
        }
        if let Some(mib) = req.memory_mib {
            s.memory.startup_mib = mib;
        }
        if let Some(notes) = req.notes {
            s.notes = notes;
        }
        if let Some(order) = req.boot_order {
            s.boot_order = order;
        }
        Ok(())
    })?;
    Ok(json(200, &vm))
}

/// `POST /v1/vms/{vm}/upgrade`: the VM to the current configuration version (it must
/// be Off: a saved state only resumes on the version it was saved with). A VM
/// already at the current version is left as it is.
pub fn upgrade(svc: &Arc<Service>, key: &str) -> Answer {
    let (_, vm) = svc.update_vm(key, |s| {
        s.configuration_version = vm_config::CURRENT_CONFIGURATION_VERSION;
        Ok(())
    })?;
    Ok(json(200, &vm))
}

/// `DELETE /v1/vms/{vm}[?force=true][&delete_disks=true]`: a job (`vms::delete`).
pub fn delete(svc: &Arc<Service>, key: &str, query: Option<&str>) -> Answer {
    let job = crate::vms::delete::submit_from_query(svc, key, query)?;
    Ok(crate::http::body::accepted(&crate::convert::job(&job)))
}

/// `POST /v1/vms/{vm}/move-storage`: a job (`vms::move_storage`).
pub async fn move_storage(svc: &Arc<Service>, key: &str, body: Incoming) -> Answer {
    let req: api::vms::MoveStorageRequest = read_json(body).await?;
    let job = crate::vms::move_storage::submit(svc, key, &req.destination)?;
    Ok(crate::http::body::accepted(&crate::convert::job(&job)))
}

pub async fn replace_settings(svc: &Arc<Service>, key: &str, body: Incoming) -> Answer {
    let settings: VmSettings = read_json(body).await?;
    Ok(json(200, &svc.replace_settings(key, settings)?))
}

fn readable_settings(svc: &Service, key: &str) -> Result<VmSettings, ApiError> {
    let store = svc.store();
    let entry = find(&store, key)?;
    entry
        .settings
        .clone()
        .ok_or_else(|| damaged_unreadable(entry))
}

pub fn processor(svc: &Arc<Service>, key: &str) -> Answer {
    Ok(json(200, &readable_settings(svc, key)?.processor))
}

pub async fn update_processor(svc: &Arc<Service>, key: &str, body: Incoming) -> Answer {
    let req: UpdateProcessorRequest = read_json(body).await?;
    let apply = move |p: &mut ProcessorSettings| {
        p.count = req.count.unwrap_or(p.count);
        p.reserve_percent = req.reserve_percent.unwrap_or(p.reserve_percent);
        p.limit_percent = req.limit_percent.unwrap_or(p.limit_percent);
        p.relative_weight = req.relative_weight.unwrap_or(p.relative_weight);
    };
    let running = {
        let store = svc.store();
        let entry = find(&store, key)?;
        matches!(
            svc.runtime.get(entry.id).state,
            VmState::Running | VmState::Paused
        )
    };
    if running {
        return Ok(json(200, &svc.update_processor_live(key, apply).await?));
    }
    let (_, vm) = svc.update_vm(key, |s| {
        apply(&mut s.processor);
        Ok(())
    })?;
    let processor = vm.settings.map(|s| s.processor);
    Ok(json(200, &processor))
}

pub fn drives(svc: &Arc<Service>, key: &str) -> Answer {
    Ok(json(
        200,
        &DriveList {
            drives: readable_settings(svc, key)?.drives,
        },
    ))
}

/// The first free location, controller by controller, on this kind of controller.
fn first_free(s: &VmSettings, controller: ControllerKind, number: Option<u8>) -> Option<Slot> {
    let (controllers, locations) = controller.limits();
    let numbers: Vec<u8> = match number {
        Some(n) => vec![n],
        None => (0..controllers).collect(),
    };
    numbers.into_iter().find_map(|n| {
        (0..locations)
            .map(|l| Slot {
                controller,
                controller_number: n,
                location: l,
            })
            .find(|slot| !s.drives.iter().any(|d| d.slot == *slot))
    })
}

pub async fn add_drive(svc: &Arc<Service>, key: &str, body: Incoming) -> Answer {
    let req: AddDriveRequest = read_json(body).await?;
    let (drive, _) = svc.update_vm(key, |s| {
        let slot = match (req.controller_number, req.location) {
            (n, Some(location)) => Slot {
                controller: req.controller,
                controller_number: n.unwrap_or(0),
                location,
            },
            (n, None) => first_free(s, req.controller, n).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!(
                        "every {} slot of VM {} is taken; remove a drive first",
                        req.controller, s.name
                    ),
                )
            })?,
        };
        validate_slot(slot)?;
        let drive = Drive {
            slot,
            media: req.media,
        };
        s.drives.push(drive.clone());
        Ok(drive)
    })?;
    Ok(json(201, &drive))
}

fn parse_slot(c: &str, n: &str, l: &str) -> Result<Slot, ApiError> {
    let controller = match c {
        "ide" => ControllerKind::Ide,
        "scsi" => ControllerKind::Scsi,
        _ => {
            return Err(ApiError::invalid(format!(
                "{c:?} is not a controller kind; use ide or scsi"
            )))
        }
    };
    let num = |v: &str, what: &str| {
        v.parse::<u8>()
            .map_err(|_| ApiError::invalid(format!("{what} {v:?} is not a number from 0 to 255")))
    };
    Ok(Slot {
        controller,
        controller_number: num(n, "controller number")?,
        location: num(l, "location")?,
    })
}

pub async fn update_drive(
    svc: &Arc<Service>,
    key: &str,
    (c, n, l): (&str, &str, &str),
    body: Incoming,
) -> Answer {
    let slot = parse_slot(c, n, l)?;
    let req: UpdateDriveRequest = read_json(body).await?;
    let (drive, _) = svc.update_vm(key, |s| {
        let name = s.name.clone();
        let d = s
            .drives
            .iter_mut()
            .find(|d| d.slot == slot)
            .ok_or_else(|| ApiError::not_found(format!("VM {name} has no drive at {slot}")))?;
        d.media = req.media;
        Ok(d.clone())
    })?;
    Ok(json(200, &drive))
}

pub fn remove_drive(svc: &Arc<Service>, key: &str, (c, n, l): (&str, &str, &str)) -> Answer {
    let slot = parse_slot(c, n, l)?;
    svc.update_vm(key, |s| {
        let before = s.drives.len();
        s.drives.retain(|d| d.slot != slot);
        if s.drives.len() == before {
            return Err(ApiError::not_found(format!(
                "VM {} has no drive at {slot}",
                s.name
            )));
        }
        s.boot_order
            .retain(|e| !matches!(e, vm_config::BootEntry::Drive { slot: b } if *b == slot));
        Ok(())
    })?;
    Ok(no_content())
}

pub fn adapters(svc: &Arc<Service>, key: &str) -> Answer {
    Ok(json(
        200,
        &NetworkAdapterList {
            network_adapters: readable_settings(svc, key)?.network_adapters,
        },
    ))
}

pub async fn add_adapter(svc: &Arc<Service>, key: &str, body: Incoming) -> Answer {
    let req: AddNetworkAdapterRequest = read_json(body).await?;
    let mac = match req.mac {
        Some(m) => canonical_mac(&m)?,
        None => svc.new_mac()?,
    };
    // The VM first: a missing one is the answer (404) whatever the body says.
    find(&svc.store(), key)?;
    // Recorded by id, so renaming the switch keeps the adapter on it.
    let switch = match &req.switch {
        Some(key) => Some(svc.switches.find_named(key)?.id.to_string()),
        None => None,
    };
    let vlan_mode = req.vlan_mode.unwrap_or(if req.vlan_id.is_some() {
        vm_config::VlanMode::Access
    } else if req.vlan_allowed.is_some() || req.vlan_native.is_some() {
        vm_config::VlanMode::Trunk
    } else {
        vm_config::VlanMode::Untagged
    });
    let adapter = NetworkAdapter {
        id: None,
        kind: req.kind.unwrap_or(AdapterKind::Synthetic),
        mac: mac.clone(),
        pci_slot: req.pci_slot,
        switch,
        mac_address_spoofing: req.mac_address_spoofing.unwrap_or(false),
        dhcp_guard: req.dhcp_guard.unwrap_or(false),
        router_guard: req.router_guard.unwrap_or(false),
        maximum_bandwidth: req.maximum_bandwidth,
        vlan_mode,
        vlan_id: req.vlan_id,
        vlan_allowed: req.vlan_allowed.unwrap_or_default(),
        vlan_native: req.vlan_native,
        port_mirroring: req.port_mirroring.unwrap_or_default(),
    };
    svc.switches.check_vlan(&adapter)?;
    let (_, vm) = svc.update_vm(key, |s| {
        s.network_adapters.push(adapter);
        Ok(())
    })?;
    // The adapter as written, with the id and slot it was given.
    let adapter = vm
        .settings
        .and_then(|s| s.network_adapters.into_iter().find(|a| a.mac == mac))
        .ok_or_else(|| ApiError::internal("the new adapter is missing from the saved settings"))?;
    Ok(json(201, &adapter))
}

pub fn remove_adapter(svc: &Arc<Service>, key: &str, mac: &str) -> Answer {
    let wanted = canonical_mac(mac)?;
    svc.update_vm(key, |s| {
        let before = s.network_adapters.len();
        s.network_adapters.retain(|a| canonical_mac(&a.mac).ok().as_deref() != Some(&wanted));
        if s.network_adapters.len() == before {
            return Err(ApiError::not_found(format!("VM {} has no network adapter with MAC {wanted}", s.name)));
        }
        s.boot_order.retain(|e| {
            !matches!(e, vm_config::BootEntry::Network { mac } if canonical_mac(mac).ok().as_deref() == Some(&wanted))
        });
        Ok(())
    })?;
    Ok(no_content())
}
