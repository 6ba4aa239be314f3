//! The VM's disks, opened through the storage engine and served to QEMU.
//!
//! IDE hard disks and DVDs are exported by the engine's NBD server on one unix socket
//! in the runtime folder (one export per drive, named `ide<controller>-<location>`);
//! QEMU's PIIX IDE model reads them through its NBD client. Synthetic (SCSI-controller)
//! disks each get a vhost-user-blk server on `scsi<controller>-<location>.sock`, which
//! QEMU's `vhost-user-blk-pci` device connects to; the guest's virtqueues are served
//! straight from the engine. Writable images are opened
//! with an exclusive lock that the worker holds for the life of the VM, so a second VM
//! (or a tool) cannot open them for writing meanwhile; the lock goes with the process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_config::{ControllerKind, DriveMedia, Slot, VmSettings};

/// Faults opening or serving the VM's disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open the disk {} in slot {slot}", path.display())]
    Open {
        slot: Slot,
        path: PathBuf,
        #[source]
        source: Box<vhd::Error>,
    },
    #[error("the disk in slot {slot} is a pass-through host device ({device}), which the worker cannot serve yet; attach a VHD/VHDX instead")]
    PassThrough { slot: Slot, device: String },
    #[error("cannot serve the synthetic disk {} in slot {slot}", path.display())]
    Synthetic {
        slot: Slot,
        path: PathBuf,
        #[source]
        source: vhost_blk::Error,
    },
    #[error("cannot serve the IDE disks over NBD on {}", socket.display())]
    Nbd {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot switch slot {slot} to {}: no disk is served in that slot", path.display())]
    NotServed { slot: Slot, path: PathBuf },
    #[error("cannot switch slot {slot} to {}: {source}", path.display())]
    Switch {
        slot: Slot,
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("flushing the disk {} failed", path.display())]
    Flush {
        path: PathBuf,
        #[source]
        source: Box<vhd::Error>,
    },
}

/// One IDE drive as served to QEMU.
pub struct ServedIde {
    pub slot: Slot,
    pub export: String,
    pub dvd: bool,
    pub read_only: bool,
    pub path: PathBuf,
    pub disk: Arc<dyn vhd::Disk>,
}

/// One synthetic disk as served to QEMU.
pub struct ServedSynthetic {
    pub slot: Slot,
    pub path: PathBuf,
    pub socket: PathBuf,
    pub num_queues: u16,
    pub disk: Arc<dyn vhd::Disk>,
    server: vhost_blk::Server,
}

/// Most virtqueues a synthetic disk gets (one per vCPU up to this).
pub const MAX_SYNTHETIC_QUEUES: u16 = 4;

/// Every disk of the running VM, open and served.
pub struct ServedDisks {
    pub ide: Vec<ServedIde>,
    pub synthetic: Vec<ServedSynthetic>,
    nbd: Option<nbd_server::Server>,
}

fn metered(
    slot: Slot,
    path: &Path,
    counters: Arc<drive_counters::DriveCounters>,
) -> crate::meter::MeteredDrive {
    crate::meter::MeteredDrive {
        drive: slot.to_string(),
        path: path.display().to_string(),
        counters,
    }
}

/// Opens a disk image through the engine: a VHD with its whole differencing
/// chain, or a raw image (ISO). Writable opens lock the file exclusively, parents
/// and read-only opens shared.
pub fn open_disk(path: &Path, read_only: bool) -> Result<Arc<dyn vhd::Disk>, vhd::Error> {
    Ok(Arc::from(vhd::open(path, read_only)?))
}

impl ServedDisks {
    /// Opens every drive of `settings`, serves the IDE ones on `nbd_socket` and each
    /// synthetic one on its own vhost-user socket in `runtime_dir`.
    pub async fn open_and_serve(
        settings: &VmSettings,
        nbd_socket: &Path,
        runtime_dir: &Path,
    ) -> Result<Self, DiskError> {
        let mut ide = Vec::new();
        let mut synthetic: Vec<ServedSynthetic> = Vec::new();
        let num_queues = u16::try_from(settings.processor.count)
            .unwrap_or(u16::MAX)
            .clamp(1, MAX_SYNTHETIC_QUEUES);
        for drive in &settings.drives {
            let slot = drive.slot;
            let (path, dvd) = match &drive.media {
                DriveMedia::HardDisk { path } => (PathBuf::from(path), false),
                DriveMedia::Dvd { iso: Some(iso) } => (PathBuf::from(iso), true),
                // An empty DVD drive: nothing to serve.
                DriveMedia::Dvd { iso: None } => continue,
                DriveMedia::PassThrough { device } => {
                    return Err(DiskError::PassThrough {
                        slot,
                        device: device.clone(),
                    })
                }
            };
            let read_only = dvd;
            let disk = open_disk(&path, read_only).map_err(|source| DiskError::Open {
                slot,
                path: path.clone(),
                source: Box::new(source),
            })?;
            if slot.controller == ControllerKind::Scsi {
                let name = format!("scsi{}-{}", slot.controller_number, slot.location);
                let socket = runtime_dir.join(format!("{name}.sock"));
                let opts = vhost_blk::BlkOptions {
                    num_queues,
                    serial: name,
                    ..Default::default()
                };
                let server =
                    vhost_blk::Server::start(disk.clone(), &socket, opts).map_err(|source| {
                        DiskError::Synthetic {
                            slot,
                            path: path.clone(),
                            source,
                        }
                    })?;
                synthetic.push(ServedSynthetic {
                    slot,
                    path,
                    socket,
                    num_queues,
                    disk,
                    server,
                });
                continue;
            }
            ide.push(ServedIde {
                slot,
                export: format!("ide{}-{}", slot.controller_number, slot.location),
                dvd,
                read_only,
                path,
                disk,
            });
        }
        let nbd = if ide.is_empty() {
            None
        } else {
            let exports = ide
                .iter()
                .map(|d| (d.export.clone(), d.disk.clone()))
                .collect();
            Some(
                nbd_server::Server::start(nbd_socket, exports).map_err(|source| {
                    DiskError::Nbd {
                        socket: nbd_socket.to_path_buf(),
                        source,
                    }
                })?,
            )
        };
        Ok(Self {
            ide,
            synthetic,
            nbd,
        })
    }

    /// Every served drive with its server's counters, in slot order.
    pub fn metered(&self) -> Vec<crate::meter::MeteredDrive> {
        let mut drives: Vec<(Slot, crate::meter::MeteredDrive)> = Vec::new();
        for d in &self.ide {
            let counters = self.nbd.as_ref().and_then(|n| n.counters(&d.export));
            if let Some(counters) = counters {
                drives.push((d.slot, metered(d.slot, &d.path, counters)));
            }
        }
        for d in &self.synthetic {
            drives.push((d.slot, metered(d.slot, &d.path, d.server.counters())));
        }
        // IDE before SCSI, then by controller and location.
        drives.sort_by_key(|(slot, _)| {
            (
                slot.controller == ControllerKind::Scsi,
                slot.controller_number,
                slot.location,
            )
        });
        drives.into_iter().map(|(_, d)| d).collect()
    }

    /// Makes every write to the writable disks durable and leaves their files
    /// as a clean close would (a VHDX's log applied and emptied), while the VM
    /// keeps running: what the daemon copies from outside the worker next (a
    /// storage move's leaves, with the guest paused) verifies as it is.
    pub fn settle(&self) -> Result<(), DiskError> {
        let synthetic = self.synthetic.iter().map(|d| (&d.path, &d.disk));
        let ide = self
            .ide
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| (&d.path, &d.disk));
        for (path, disk) in synthetic.chain(ide) {
            if disk.read_only() {
                continue;
            }
            disk.settle().map_err(|source| DiskError::Flush {
                path: path.clone(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }

    /// Switches the disks in the given slots to the images at the given paths (copies
    /// of what they serve now, e.g. after a storage move) while QEMU stays
    /// connected. All or nothing: every new chain is opened first (a writable leaf
    /// locked exclusively: it is another file than the one served, so both locks
    /// can be held at once); if any fails to open, nothing switches and the error
    /// names that slot and file. Then each server switches (requests in flight
    /// finish on the old disk, which is flushed) and the old disks are closed,
    /// which releases their files and locks. A slot already on its path is left
    /// alone. Returns the slots that switched.
    pub fn switch(&mut self, wanted: &[(Slot, PathBuf)]) -> Result<Vec<Slot>, DiskError> {
        let mut opened: Vec<(Slot, PathBuf, Arc<dyn vhd::Disk>)> = Vec::new();
        for (slot, path) in wanted {
            let (served, current) = self.served_in(*slot).ok_or_else(|| DiskError::NotServed {
                slot: *slot,
                path: path.clone(),
            })?;
            if &current == path {
                continue;
            }
            let disk = open_disk(path, served.read_only()).map_err(|source| DiskError::Open {
                slot: *slot,
                path: path.clone(),
                source: Box::new(source),
            })?;
            opened.push((*slot, path.clone(), disk));
        }
        // Switch; a failure (a disk that does not match, a flush that fails) puts
        // back the ones already switched.
        let mut done: Vec<(Slot, PathBuf, Arc<dyn vhd::Disk>)> = Vec::new();
        for (slot, path, disk) in opened {
            let from = self.served_in(slot).map(|(_, p)| p).unwrap_or_default();
            match self.replace(slot, disk, path.clone()) {
                Ok(old) => {
                    tracing::info!(%slot, from = %from.display(), to = %path.display(), "disk switched");
                    done.push((slot, from, old));
                }
                Err(e) => {
                    for (slot, from, old) in done.into_iter().rev() {
                        if let Err(why) = self.replace(slot, old, from) {
                            tracing::error!(error = %why, "cannot switch a disk back after a failed switch");
                        }
                    }
                    return Err(e);
                }
            }
        }
        // The old disks' last handles go here: their files close and their
        // locks are released.
        Ok(done.into_iter().map(|(slot, _, _)| slot).collect())
    }

    /// The disk served in `slot` and the file its chain's top is.
    /// The first IDE hard disk the guest can write to, if any.
    pub fn writable_ide(&self) -> Option<Slot> {
        self.ide.iter().find(|d| !d.read_only).map(|d| d.slot)
    }

    /// Holds the guest's requests to every synthetic disk until the guards
    /// drop (see [`vhd::Gate`]); requests being served finish first.
    pub fn hold(&self) -> Vec<vhd::Held> {
        self.synthetic.iter().map(|d| d.server.hold()).collect()
    }

    pub fn served_in(&self, slot: Slot) -> Option<(Arc<dyn vhd::Disk>, PathBuf)> {
        if let Some(d) = self.ide.iter().find(|d| d.slot == slot) {
            return Some((d.disk.clone(), d.path.clone()));
        }
        self.synthetic
            .iter()
            .find(|d| d.slot == slot)
            .map(|d| (d.disk.clone(), d.path.clone()))
    }

    /// Serves `disk` (whose top is `path`) in `slot` in place of what is served
    /// there: the server switches (requests in flight finish first; the old
    /// disk is flushed), and the old disk is returned.
    pub fn replace(
        &mut self,
        slot: Slot,
        disk: Arc<dyn vhd::Disk>,
        path: PathBuf,
    ) -> Result<Arc<dyn vhd::Disk>, DiskError> {
        let switch_err = |source: Box<dyn std::error::Error + Send + Sync>| DiskError::Switch {
            slot,
            path: path.clone(),
            source,
        };
        if let Some(d) = self.ide.iter_mut().find(|d| d.slot == slot) {
            let nbd = self
                .nbd
                .as_ref()
                .ok_or_else(|| switch_err("no NBD server runs".into()))?;
            nbd.switch(&d.export, disk.clone())
                .map_err(|e| switch_err(e.into()))?;
            d.path = path;
            return Ok(std::mem::replace(&mut d.disk, disk));
        }
        if let Some(d) = self.synthetic.iter_mut().find(|d| d.slot == slot) {
            d.server
                .switch(disk.clone())
                .map_err(|e| switch_err(e.into()))?;
            d.path = path;
            return Ok(std::mem::replace(&mut d.disk, disk));
        }
        Err(DiskError::NotServed { slot, path })
    }

    /// Gives each slot's disk a new differencing child at the given path and
    /// serves it (see [`crate::control::Request::NewLayers`]); all or nothing.
    pub fn new_layers(&mut self, wanted: &[(Slot, PathBuf)]) -> Result<(), DiskError> {
        let mut done: Vec<(Slot, PathBuf, PathBuf)> = Vec::new();
        for (slot, child) in wanted {
            match self.layer_over(*slot, child) {
                Ok(old_top) => done.push((*slot, old_top, child.clone())),
                Err(e) => {
                    for (slot, old_top, child) in done.into_iter().rev() {
                        if let Err(e) = self.reopen(
                            slot,
                            &child,
                            || Ok(Arc::from(vhd::open(&old_top, false)?)),
                            old_top.clone(),
                        ) {
                            tracing::error!(%slot, error = %e, "cannot go back to the disk's old chain after a failed checkpoint");
                            continue;
                        }
                        let _ = std::fs::remove_file(&child);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Makes `child` over the leaf served in `slot` and serves it; returns the
    /// old leaf.
    fn layer_over(&mut self, slot: Slot, child: &Path) -> Result<PathBuf, DiskError> {
        let (_, top) = self.served_in(slot).ok_or_else(|| DiskError::NotServed {
            slot,
            path: child.to_path_buf(),
        })?;
        let parent = top.clone();
        self.reopen(
            slot,
            &top,
            || {
                vhd::create_child(child, &parent)?;
                vhd::open(child, false).map(Arc::from).inspect_err(|_| {
                    let _ = std::fs::remove_file(child);
                })
            },
            child.to_path_buf(),
        )?;
        Ok(top)
    }

    /// Closes the chain served in `slot` (top `top`) while its requests wait
    /// and serves what `open_new` opens (top `new_top`); the old chain again
    /// if that fails.
    fn reopen(
        &mut self,
        slot: Slot,
        top: &Path,
        open_new: impl FnOnce() -> Result<Arc<dyn vhd::Disk>, vhd::Error>,
        new_top: PathBuf,
    ) -> Result<(), DiskError> {
        let (disk, _) = self.served_in(slot).ok_or_else(|| DiskError::NotServed {
            slot,
            path: new_top.clone(),
        })?;
        let gate = Arc::new(vhd::ops::live_merge::Tracked::new(disk));
        self.replace(slot, gate.clone(), top.to_path_buf())?;
        let reopened = gate.reopen(open_new);
        let (served, path) = match &reopened {
            Ok(()) => (gate.inner(), new_top.clone()),
            Err(_) => (gate.inner(), top.to_path_buf()),
        };
        // Serve the chain itself again, without the gate.
        self.replace(slot, served, path)?;
        reopened.map_err(|source| DiskError::Open {
            slot,
            path: new_top,
            source: Box::new(source),
        })
    }

    /// Stops serving and makes every write durable. Called after QEMU has exited.
    pub async fn flush_and_close(self) -> Result<(), DiskError> {
        if let Some(nbd) = self.nbd {
            let _ = tokio::task::spawn_blocking(move || nbd.stop()).await;
        }
        let mut writable: Vec<(PathBuf, Arc<dyn vhd::Disk>)> = Vec::new();
        for d in self.synthetic {
            let server = d.server;
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || server.stop()).await {
                tracing::warn!(error = %e, "stopping a synthetic disk's server");
            }
            writable.push((d.path, d.disk));
        }
        for d in self.ide {
            if !d.read_only {
                writable.push((d.path, d.disk));
            }
        }
        for (path, disk) in writable {
            disk.flush().map_err(|source| DiskError::Flush {
                path,
                source: Box::new(source),
            })?;
        }
        Ok(())
    }
}
