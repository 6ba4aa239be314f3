//! `viridian vm ...`. A VM is named by its name or its id everywhere.

use api::vm_config::{
    AdapterKind, ControllerKind, Drive, DriveMedia, NetworkAdapter, ProcessorSettings,
};
use api::vms::{
    AddDriveRequest, AddNetworkAdapterRequest, CreateVmRequest, UpdateProcessorRequest,
    UpdateVmRequest, Vm, VmList,
};
use clap::{Subcommand, ValueEnum};
use hyper::Method;

use crate::client::{segment, Client};
use crate::connection::Connection;
use crate::failure::Failure;
use crate::output;
use crate::size::memory_mib;

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Controller {
    Ide,
    Scsi,
}

impl From<Controller> for ControllerKind {
    fn from(c: Controller) -> Self {
        match c {
            Controller::Ide => ControllerKind::Ide,
            Controller::Scsi => ControllerKind::Scsi,
        }
    }
}

impl Controller {
    /// The controller as the drive URLs and messages name it.
    fn name(self) -> &'static str {
        match self {
            Controller::Ide => "ide",
            Controller::Scsi => "scsi",
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create a VM.
    Create {
        name: String,
        /// Virtual processors.
        #[arg(long)]
        cpus: u32,
        /// Startup memory, e.g. 2G or 512M (a bare number is MiB).
        #[arg(long, value_parser = memory_mib)]
        memory: u64,
        /// 1 (BIOS, boots from IDE) or 2 (UEFI, boots from SCSI).
        #[arg(long, default_value_t = 2)]
        generation: u8,
        #[arg(long, default_value = "")]
        notes: String,
    },
    /// List VMs.
    List,
    /// Show a VM's settings and runtime.
    Show { vm: String },
    /// Change a VM's name, memory or notes.
    Set {
        vm: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_parser = memory_mib)]
        memory: Option<u64>,
        #[arg(long)]
        notes: Option<String>,
    },
    /// Delete a VM (a job): its checkpoints are merged into its disks, which stay
    /// unless --delete-disks.
    Delete {
        vm: String,
        /// Also delete the VM's disks (never one another VM's chain uses).
        #[arg(long)]
        delete_disks: bool,
        /// Turn a running VM off (or discard a saved VM's state) and delete it.
        #[arg(long)]
        force: bool,
    },
    /// Move the VM's disks and checkpoint disks to another folder (a job). A
    /// Running or Paused VM moves online: the guest pauses only while its
    /// current disks copy, then runs on the copies; an Off or Saved VM moves
    /// offline.
    MoveStorage {
        vm: String,
        /// An absolute path: an empty folder or a new one.
        destination: String,
    },
    /// Move an Off VM to the current configuration version (its virtual hardware).
    Upgrade { vm: String },
    /// Processor settings.
    Processor {
        #[command(subcommand)]
        cmd: ProcessorCmd,
    },
    /// Hard disks.
    Disk {
        #[command(subcommand)]
        cmd: DiskCmd,
    },
    /// DVD drives.
    Dvd {
        #[command(subcommand)]
        cmd: DvdCmd,
    },
    /// Network adapters.
    Nic {
        #[command(subcommand)]
        cmd: NicCmd,
    },
    /// Export a VM (Off, Saved or Running) with its checkpoints into DIR/<name>/,
    /// a self-contained folder that can be copied anywhere and imported.
    Export {
        vm: String,
        dir: String,
        /// Only the current state, its disks flattened (no checkpoints).
        #[arg(long, conflicts_with = "checkpoint")]
        no_checkpoints: bool,
        /// Only this checkpoint, as the VM's state, its disks flattened.
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Import an exported VM. Everything is checked first: every problem is
    /// reported at once and nothing changes.
    Import {
        /// The export folder (or the directory holding exactly one export).
        dir: String,
        /// Copy the files first: to DEST/<name>/, or without DEST into the data directory.
        #[arg(long, value_name = "DEST", num_args = 0..=1, default_missing_value = "", conflicts_with = "register")]
        copy: Option<String>,
        /// Use the files where they are (the default).
        #[arg(long)]
        register: bool,
        /// New VM id, new adapter ids and MAC addresses (to run beside the original).
        #[arg(long)]
        new_id: bool,
        /// Import under another name.
        #[arg(long)]
        name: Option<String>,
        /// Only print the compatibility report; import nothing.
        #[arg(long)]
        check: bool,
        /// Put the adapters of exported switch OLD (its name or id) on this host's
        /// switch NEW (name or id), or `OLD=none` to import them disconnected.
        /// Repeatable. Unmapped switches match by id, else by name.
        #[arg(long = "switch", value_name = "OLD=NEW", value_parser = crate::transfer_cmd::parse_switch_mapping)]
        switch_mapping: Vec<(String, String)>,
    },
    /// Start a VM (or resume it from its saved state).
    Start { vm: String },
    /// Turn a VM off at once, like pulling the plug.
    Stop { vm: String },
    /// Shut a VM down with the ACPI power button; fails if the guest has not stopped in time.
    Shutdown {
        vm: String,
        /// Seconds the guest gets before the job fails (default 120).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Save a VM's memory and device state; the next start resumes from it.
    Save { vm: String },
    /// Pause a VM's processors.
    Pause { vm: String },
    /// Resume a paused VM.
    Resume { vm: String },
    /// Reset a VM (the reset button).
    Restart { vm: String },
    /// A running VM's averages since it started: processor per vCPU and in total,
    /// memory, and each drive's bytes and operations read and written (Hyper-V's
    /// Measure-VM).
    Measure { vm: String },
    /// Attach to a VM's serial console (detach with Ctrl-]), or print its log with --log.
    Console {
        vm: String,
        /// Print the kept console output instead of attaching.
        #[arg(long)]
        log: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProcessorCmd {
    /// Change count, reserve, limit or weight; of a running VM reserve, limit and
    /// weight change live.
    Set {
        /// The VM (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        vm: Option<String>,
        /// Every VM on the host (each is reported; the others still change when one fails).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        count: Option<u32>,
        /// Percent reserved, 0-100.
        #[arg(long)]
        reserve: Option<u8>,
        /// Percent limit, 0-100.
        #[arg(long)]
        limit: Option<u8>,
        /// Relative weight, 1-10000.
        #[arg(long)]
        weight: Option<u32>,
    },
}

#[derive(clap::Args, Debug)]
pub struct SlotArgs {
    #[arg(long, value_enum)]
    pub controller: Controller,
    /// Controller number (first one with a free location when absent).
    #[arg(long)]
    pub number: Option<u8>,
    /// Location on the controller (first free when absent).
    #[arg(long)]
    pub location: Option<u8>,
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Attach a VHD/VHDX file (or, with --passthrough, a host block device).
    Add {
        vm: String,
        path: String,
        #[command(flatten)]
        slot: SlotArgs,
        #[arg(long)]
        passthrough: bool,
    },
    /// Remove the drive in a slot.
    Remove {
        vm: String,
        #[arg(long, value_enum)]
        controller: Controller,
        #[arg(long)]
        number: u8,
        #[arg(long)]
        location: u8,
    },
    /// Re-point the hard disk in a slot to another file (repairs a moved disk).
    Set {
        vm: String,
        path: String,
        #[arg(long, value_enum)]
        controller: Controller,
        #[arg(long)]
        number: u8,
        #[arg(long)]
        location: u8,
    },
}

#[derive(Subcommand, Debug)]
pub enum DvdCmd {
    /// Add a DVD drive, with an ISO inserted or empty.
    Add {
        vm: String,
        iso: Option<String>,
        #[command(flatten)]
        slot: SlotArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum NicCmd {
    /// Add a network adapter.
    Add {
        vm: String,
        /// Emulated adapter (generation 1 only) instead of synthetic.
        #[arg(long)]
        legacy: bool,
        #[arg(long)]
        mac: Option<String>,
        /// Slot on the guest's root PCI bus (default: the first free of 16-30).
        #[arg(long)]
        pci_slot: Option<u8>,
        /// The virtual switch to connect it to (name or id).
        #[arg(long)]
        switch: Option<String>,
        /// Put it on this VLAN in access mode (1-4094).
        #[arg(long)]
        vlan: Option<u16>,
        #[command(flatten)]
        port: PortArgs,
    },
    /// Remove the adapter with this MAC address.
    Remove { vm: String, mac: String },
    /// Connect the adapter to a virtual switch (a running VM's adapter moves at once).
    Connect {
        vm: String,
        mac: String,
        #[arg(long)]
        switch: String,
    },
    /// Disconnect the adapter from its switch (also while the VM runs).
    Disconnect { vm: String, mac: String },
    /// Change the adapter's guards and bandwidth (a running VM's port at once).
    Set {
        vm: String,
        mac: String,
        #[command(flatten)]
        port: PortArgs,
        /// Access mode on this VLAN (1-4094); the guest sees untagged frames.
        #[arg(long, conflicts_with_all = ["vlan_trunk", "untagged"])]
        vlan: Option<u16>,
        /// Trunk mode carrying these VLANs tagged: ids and ranges, like 10,20-30.
        #[arg(long, value_parser = vlan_list, conflicts_with = "untagged")]
        vlan_trunk: Option<VlanList>,
        /// The VLAN a trunk carries untagged (with --vlan-trunk, or on a trunk).
        #[arg(long, conflicts_with_all = ["vlan", "untagged"])]
        vlan_native: Option<u16>,
        /// No VLAN: the switch's untagged segment.
        #[arg(long)]
        untagged: bool,
    },
}

/// An adapter's port settings, as `nic add` and `nic set` take them (off, unlimited
/// and none unless given to `nic add`; unchanged unless given to `nic set`).
#[derive(clap::Args, Debug)]
pub struct PortArgs {
    /// Let frames with another source MAC through (off: they are dropped).
    #[arg(long = "mac-spoofing")]
    mac_spoofing: Option<OnOff>,
    /// Drop DHCP server messages the VM sends.
    #[arg(long)]
    dhcp_guard: Option<OnOff>,
    /// Drop router advertisements and redirects the VM sends.
    #[arg(long)]
    router_guard: Option<OnOff>,
    /// Bits per second each way (100M, 1G, 64k), or none for unlimited.
    #[arg(long, value_parser = bandwidth, allow_hyphen_values = true)]
    maximum_bandwidth: Option<Bandwidth>,
    /// Its part in port mirroring on its switch.
    #[arg(long, value_enum)]
    port_mirroring: Option<Mirroring>,
}

/// `--vlan-trunk`: VLAN ids and ranges.
#[derive(Debug, Clone)]
pub struct VlanList(Vec<api::vm_config::VlanRange>);

fn vlan_list(text: &str) -> Result<VlanList, String> {
    api::vm_config::VlanRange::parse_list(text).map(VlanList)
}

/// `--maximum-bandwidth`: bits per second, or `None` for unlimited.
#[derive(Clone, Copy, Debug)]
pub struct Bandwidth(Option<u64>);

fn bandwidth(text: &str) -> Result<Bandwidth, String> {
    crate::size::bandwidth_bits(text).map(Bandwidth)
}

/// `--port-mirroring`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mirroring {
    None,
    /// Its frames, both ways, are copied to the destinations on its switch.
    Source,
    /// It receives a copy of the sources' frames on its switch.
    Destination,
}

impl Mirroring {
    fn api(self) -> api::vm_config::PortMirroring {
        match self {
            Mirroring::None => api::vm_config::PortMirroring::None,
            Mirroring::Source => api::vm_config::PortMirroring::Source,
            Mirroring::Destination => api::vm_config::PortMirroring::Destination,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        self == OnOff::On
    }
}

/// `mac spoofing off, dhcp guard on, router guard off, bandwidth 100 Mbit/s`.
pub fn adapter_options(a: &NetworkAdapter) -> String {
    let onoff = |b: bool| if b { "on" } else { "off" };
    format!(
        "mac spoofing {}, dhcp guard {}, router guard {}, bandwidth {}, vlan {}, port mirroring {}",
        onoff(a.mac_address_spoofing),
        onoff(a.dhcp_guard),
        onoff(a.router_guard),
        a.maximum_bandwidth
            .map_or("unlimited".into(), crate::size::human_bits),
        a.vlan_text(),
        a.port_mirroring.name()
    )
}

fn vm_path(vm: &str) -> String {
    format!("/v1/vms/{}", segment(vm))
}

/// The URL of the VM's drive at `controller` `number`:`location`.
fn drive_path(vm: &str, controller: Controller, number: u8, location: u8) -> String {
    format!(
        "{}/drives/{}/{number}/{location}",
        vm_path(vm),
        controller.name()
    )
}

/// The disks a finished delete or move deleted, kept (and why) or moved.
fn print_disk_outcome(conn: &Connection, job: &api::jobs::Job) {
    if conn.json || conn.no_wait {
        return;
    }
    for a in &job.affected_elements {
        match a.kind.as_str() {
            "deleted-disk" => println!("  deleted {}", a.id),
            "kept-disk" => println!("  kept {}", a.id),
            "unmerged-disk" => println!("  not merged {}", a.id),
            "disk" => println!("  now at {}", a.id),
            _ => {}
        }
    }
}

fn print_vm(conn: &Connection, vm: &Vm) {
    if conn.json {
        output::print_json(vm);
    } else {
        output::vm_details(vm);
    }
}

pub fn run(cmd: VmCmd, conn: &Connection) -> Result<(), Failure> {
    let client = conn.client()?;
    match cmd {
        VmCmd::Create {
            name,
            cpus,
            memory,
            generation,
            notes,
        } => {
            let req = CreateVmRequest {
                name,
                generation,
                processor_count: cpus,
                memory_mib: memory,
                notes,
            };
            let (vm, _) = client.call::<Vm>(Method::POST, "/v1/vms", Some(&req))?;
            if conn.json {
                output::print_json(&vm);
            } else {
                println!("created VM {} ({})", vm.name, vm.id);
            }
        }
        VmCmd::List => {
            let list: VmList = client.get("/v1/vms")?;
            if conn.json {
                output::print_json(&list);
            } else {
                output::vm_table(&list.vms);
            }
        }
        VmCmd::Show { vm } => print_vm(conn, &client.get(&vm_path(&vm))?),
        VmCmd::Set {
            vm,
            name,
            memory,
            notes,
        } => {
            let req = UpdateVmRequest {
                name,
                memory_mib: memory,
                notes,
                boot_order: None,
            };
            let (vm, _) = client.call::<Vm>(Method::PATCH, &vm_path(&vm), Some(&req))?;
            print_vm(conn, &vm);
        }
        VmCmd::Delete {
            vm,
            delete_disks,
            force,
        } => {
            let path = format!("{}?delete_disks={delete_disks}&force={force}", vm_path(&vm));
            let job = crate::job_cmd::start_job(&client, conn, Method::DELETE, &path, None::<&()>)?;
            print_disk_outcome(conn, &job);
        }
        VmCmd::Upgrade { vm } => {
            let path = format!("{}/upgrade", vm_path(&vm));
            let (vm, _) = client.call::<Vm>(Method::POST, &path, None::<&()>)?;
            print_vm(conn, &vm);
        }
        VmCmd::MoveStorage { vm, destination } => {
            let req = api::vms::MoveStorageRequest { destination };
            let path = format!("{}/move-storage", vm_path(&vm));
            let job = crate::job_cmd::start_job(&client, conn, Method::POST, &path, Some(&req))?;
            print_disk_outcome(conn, &job);
        }
        VmCmd::Processor {
            cmd:
                ProcessorCmd::Set {
                    vm,
                    all,
                    count,
                    reserve,
                    limit,
                    weight,
                },
        } => {
            let req = UpdateProcessorRequest {
                count,
                reserve_percent: reserve,
                limit_percent: limit,
                relative_weight: weight,
            };
            let names: Vec<String> = match vm {
                Some(vm) if !all => vec![vm],
                _ => client
                    .get::<api::vms::VmList>("/v1/vms")?
                    .vms
                    .into_iter()
                    .filter(|v| v.damaged_reason.is_none())
                    .map(|v| v.id.to_string())
                    .collect(),
            };
            let mut failed = None;
            let mut done = Vec::new();
            for vm in &names {
                let path = format!("{}/processor", vm_path(vm));
                match client.call::<ProcessorSettings>(Method::PATCH, &path, Some(&req)) {
                    Ok((p, _)) => {
                        if !conn.json {
                            println!(
                                "{vm}: {} processors, reserve {} %, limit {} %, weight {}",
                                p.count, p.reserve_percent, p.limit_percent, p.relative_weight
                            );
                        }
                        done.push(serde_json::json!({"vm": vm, "processor": p}));
                    }
                    Err(e) if all => {
                        eprintln!("{vm}: {e}");
                        done.push(serde_json::json!({"vm": vm, "error": e.to_json()}));
                        failed = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            if conn.json {
                if all {
                    output::print_json(&done);
                } else if let Some(p) = done.first().map(|d| &d["processor"]) {
                    output::print_json(p);
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        VmCmd::Measure { vm } => {
            let m: api::vms::VmMeasurement = client.get(&format!("{}/measure", vm_path(&vm)))?;
            if conn.json {
                output::print_json(&m);
            } else {
                output::measurement(&m);
            }
        }
        VmCmd::Disk {
            cmd:
                DiskCmd::Add {
                    vm,
                    path,
                    slot,
                    passthrough,
                },
        } => {
            let path = conn.host_path(path);
            let media = if passthrough {
                DriveMedia::PassThrough { device: path }
            } else {
                DriveMedia::HardDisk { path }
            };
            add_drive(&client, conn, &vm, slot, media)?;
        }
        VmCmd::Disk {
            cmd:
                DiskCmd::Remove {
                    vm,
                    controller,
                    number,
                    location,
                },
        } => {
            client.call_empty(
                Method::DELETE,
                &drive_path(&vm, controller, number, location),
            )?;
            if !conn.json {
                let kind = controller.name();
                println!("removed the drive at {kind} {number}:{location} from {vm}");
            }
        }
        VmCmd::Disk {
            cmd:
                DiskCmd::Set {
                    vm,
                    path,
                    controller,
                    number,
                    location,
                },
        } => {
            let req = api::vms::UpdateDriveRequest {
                media: DriveMedia::HardDisk {
                    path: conn.host_path(path),
                },
            };
            let url = drive_path(&vm, controller, number, location);
            let (d, _) = client.call::<Drive>(Method::PUT, &url, Some(&req))?;
            if conn.json {
                output::print_json(&d);
            } else {
                println!(
                    "{vm}: the drive at {} now uses {}",
                    d.slot,
                    d.media.host_path().unwrap_or("")
                );
            }
        }
        VmCmd::Dvd {
            cmd: DvdCmd::Add { vm, iso, slot },
        } => {
            let iso = iso.map(|p| conn.host_path(p));
            add_drive(&client, conn, &vm, slot, DriveMedia::Dvd { iso })?;
        }
        VmCmd::Nic {
            cmd:
                NicCmd::Add {
                    vm,
                    legacy,
                    mac,
                    pci_slot,
                    switch,
                    vlan,
                    port,
                },
        } => {
            let kind = Some(if legacy {
                AdapterKind::Legacy
            } else {
                AdapterKind::Synthetic
            });
            let req = AddNetworkAdapterRequest {
                kind,
                mac,
                pci_slot,
                switch,
                vlan_mode: None,
                vlan_id: vlan,
                vlan_allowed: None,
                vlan_native: None,
                mac_address_spoofing: port.mac_spoofing.map(OnOff::on),
                dhcp_guard: port.dhcp_guard.map(OnOff::on),
                router_guard: port.router_guard.map(OnOff::on),
                maximum_bandwidth: port.maximum_bandwidth.and_then(|b| b.0),
                port_mirroring: port.port_mirroring.map(Mirroring::api),
            };
            let path = format!("{}/network-adapters", vm_path(&vm));
            let (a, _) = client.call::<NetworkAdapter>(Method::POST, &path, Some(&req))?;
            if conn.json {
                output::print_json(&a);
            } else {
                println!(
                    "added {:?} network adapter {} to {vm} in PCI slot {}",
                    a.kind,
                    a.mac,
                    a.pci_slot.map_or("?".into(), |s| s.to_string())
                );
            }
        }
        VmCmd::Export {
            vm,
            dir,
            no_checkpoints,
            checkpoint,
        } => crate::transfer_cmd::export(conn, &vm, dir, no_checkpoints, checkpoint)?,
        VmCmd::Import {
            dir,
            copy,
            register: _,
            new_id,
            name,
            check,
            switch_mapping,
        } => crate::transfer_cmd::import(
            conn,
            crate::transfer_cmd::ImportArgs {
                dir,
                copy,
                new_id,
                name,
                check,
                switch_mapping,
            },
        )?,
        VmCmd::Start { vm } => crate::vm_lifecycle::action(conn, &vm, "start")?,
        VmCmd::Stop { vm } => crate::vm_lifecycle::action(conn, &vm, "stop")?,
        VmCmd::Shutdown { vm, timeout } => crate::vm_lifecycle::shutdown(conn, &vm, timeout)?,
        VmCmd::Save { vm } => crate::vm_lifecycle::action(conn, &vm, "save")?,
        VmCmd::Pause { vm } => crate::vm_lifecycle::action(conn, &vm, "pause")?,
        VmCmd::Resume { vm } => crate::vm_lifecycle::action(conn, &vm, "resume")?,
        VmCmd::Restart { vm } => crate::vm_lifecycle::action(conn, &vm, "restart")?,
        VmCmd::Console { vm, log } => crate::vm_lifecycle::console(conn, &vm, log)?,
        VmCmd::Nic {
            cmd: NicCmd::Remove { vm, mac },
        } => {
            client.call_empty(
                Method::DELETE,
                &format!("{}/network-adapters/{}", vm_path(&vm), segment(&mac)),
            )?;
            if !conn.json {
                println!("removed network adapter {mac} from {vm}");
            }
        }
        VmCmd::Nic {
            cmd: NicCmd::Connect { vm, mac, switch },
        } => {
            let path = format!(
                "{}/network-adapters/{}/connect",
                vm_path(&vm),
                segment(&mac)
            );
            let req = api::switches::ConnectAdapterRequest {
                switch: switch.clone(),
            };
            let (a, _) = client.call::<NetworkAdapter>(Method::POST, &path, Some(&req))?;
            if conn.json {
                output::print_json(&a);
            } else {
                println!(
                    "connected network adapter {} of {vm} to switch {switch}",
                    a.mac
                );
            }
        }
        VmCmd::Nic {
            cmd: NicCmd::Disconnect { vm, mac },
        } => {
            let path = format!(
                "{}/network-adapters/{}/disconnect",
                vm_path(&vm),
                segment(&mac)
            );
            let (a, _) = client.call::<NetworkAdapter>(Method::POST, &path, None::<&()>)?;
            if conn.json {
                output::print_json(&a);
            } else {
                println!("disconnected network adapter {} of {vm}", a.mac);
            }
        }
        VmCmd::Nic {
            cmd:
                NicCmd::Set {
                    vm,
                    mac,
                    port,
                    vlan,
                    vlan_trunk,
                    vlan_native,
                    untagged,
                },
        } => {
            use api::vm_config::VlanMode;
            let vlan_mode = if untagged {
                Some(VlanMode::Untagged)
            } else if vlan.is_some() {
                Some(VlanMode::Access)
            } else if vlan_trunk.is_some() {
                Some(VlanMode::Trunk)
            } else {
                None
            };
            let path = format!("{}/network-adapters/{}", vm_path(&vm), segment(&mac));
            let req = api::switches::UpdateNetworkAdapterRequest {
                mac_address_spoofing: port.mac_spoofing.map(OnOff::on),
                dhcp_guard: port.dhcp_guard.map(OnOff::on),
                router_guard: port.router_guard.map(OnOff::on),
                maximum_bandwidth: port.maximum_bandwidth.map(|b| b.0),
                vlan_mode,
                vlan_id: vlan,
                vlan_allowed: vlan_trunk.map(|l| l.0),
                vlan_native: vlan_native.map(Some),
                port_mirroring: port.port_mirroring.map(Mirroring::api),
            };
            let (a, _) = client.call::<NetworkAdapter>(Method::PATCH, &path, Some(&req))?;
            if conn.json {
                output::print_json(&a);
            } else {
                println!("network adapter {} of {vm}: {}", a.mac, adapter_options(&a));
            }
        }
    }
    Ok(())
}

fn add_drive(
    client: &Client,
    conn: &Connection,
    vm: &str,
    slot: SlotArgs,
    media: DriveMedia,
) -> Result<(), Failure> {
    let req = AddDriveRequest {
        controller: slot.controller.into(),
        controller_number: slot.number,
        location: slot.location,
        media,
    };
    let (d, _) =
        client.call::<Drive>(Method::POST, &format!("{}/drives", vm_path(vm)), Some(&req))?;
    if conn.json {
        output::print_json(&d);
    } else {
        println!("attached to {vm} at {}", d.slot);
    }
    Ok(())
}
