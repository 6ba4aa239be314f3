//! The VM's disks, opened through the storage engine and served to QEMU.
//!
//! IDE hard disks and DVDs are exported by the engine's NBD server on one unix socket
//! in the runtime folder (one export per drive, named `ide<controller>-<location>`);
//! QEMU's PIIX IDE model reads them through its NBD client. Writable images are opened
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
    #[error("the disk {} in slot {slot} is on a SCSI controller, and synthetic (vhost-user-blk) disks are not wired into the worker yet; attach it to an IDE controller for now", path.display())]
    SyntheticUnavailable { slot: Slot, path: PathBuf },
    #[error("cannot serve the IDE disks over NBD on {}", socket.display())]
    Nbd {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
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

/// Every disk of the running VM, open and served.
pub struct ServedDisks {
    pub ide: Vec<ServedIde>,
    nbd: Option<nbd_server::Server>,
}

/// Opens a disk image through the engine: a VHD with its whole differencing
/// chain, or a raw image (ISO). Writable opens lock the file exclusively, parents
/// and read-only opens shared.
pub fn open_disk(path: &Path, read_only: bool) -> Result<Arc<dyn vhd::Disk>, vhd::Error> {
    Ok(Arc::from(vhd::open(path, read_only)?))
}

impl ServedDisks {
    /// Opens every drive of `settings` and starts serving the IDE ones on `nbd_socket`.
    pub async fn open_and_serve(
        settings: &VmSettings,
        nbd_socket: &Path,
    ) -> Result<Self, DiskError> {
        let mut ide = Vec::new();
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
            if slot.controller == ControllerKind::Scsi {
                return Err(DiskError::SyntheticUnavailable { slot, path });
            }
            let read_only = dvd;
            let disk = open_disk(&path, read_only).map_err(|source| DiskError::Open {
                slot,
                path: path.clone(),
                source: Box::new(source),
            })?;
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
        Ok(Self { ide, nbd })
    }

    /// Stops serving and makes every write durable. Called after QEMU has exited.
    pub async fn flush_and_close(self) -> Result<(), DiskError> {
        if let Some(nbd) = self.nbd {
            let _ = tokio::task::spawn_blocking(move || nbd.stop()).await;
        }
        for d in &self.ide {
            if !d.read_only {
                d.disk.flush().map_err(|source| DiskError::Flush {
                    path: d.path.clone(),
                    source: Box::new(source),
                })?;
            }
        }
        Ok(())
    }
}
