//! vhost-user-blk backend over any `vhd::Disk`: synthetic disks.
//!
//! QEMU's `vhost-user-blk-pci` device connects to [`Server`]'s unix socket and
//! hands it the guest's memory and virtqueues; requests go straight from the
//! rings to the storage engine (QEMU's block layer is not in the data path).
//! See `backend` for the device and `protocol` for the virtio-blk wire formats.
//! The disk's [`DriveCounters`] (bytes and operations of completed requests, over
//! every front end it served) are read through [`Server::counters`].

mod backend;
pub mod protocol;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhd::{Disk, DiskCell, Gate, Held};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use backend::BlkBackend;
pub use backend::BlkOptions;
pub use drive_counters::{DriveCounters, DriveIo};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen for vhost-user connections on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot start the vhost-user-blk thread for {}", path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the vhost-user-blk server on {} failed: {message}", path.display())]
    Serve { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A vhost-user-blk server for one disk, on one unix socket.
///
/// It accepts one front end at a time; when that one disconnects (QEMU exited or
/// reconnects) the next is accepted, each with fresh virtqueue state. The socket
/// is created once, before the front end starts, and lives until [`Server::stop`].
pub struct Server {
    socket: PathBuf,
    stopping: Arc<AtomicBool>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<std::result::Result<(), String>>>,
    counters: Arc<DriveCounters>,
    /// The disk, shared with every connection's device.
    disk: Arc<DiskCell>,
    /// Holds every connection's requests back (see [`Server::hold`]).
    gate: Arc<Gate>,
}

impl Server {
    /// Listens on `socket` (replacing a stale socket file) and serves `disk` there.
    pub fn start(disk: Arc<dyn Disk>, socket: &Path, opts: BlkOptions) -> Result<Self> {
        let mut listener = Listener::new(socket, true).map_err(|source| Error::Listen {
            path: socket.to_path_buf(),
            source,
        })?;
        let disk = Arc::new(DiskCell::new(disk));
        let cell = disk.clone();
        let stopping = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(DriveCounters::new());
        let counting = counters.clone();
        let gate = Arc::new(Gate::default());
        let gating = gate.clone();
        let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::new(Mutex::new(None));
        let name = format!(
            "vhost-blk-{}",
            socket
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let (stop2, current2, path2) = (stopping.clone(), current.clone(), socket.to_path_buf());
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    // A fresh device per connection: ring state never leaks between front ends.
                    let backend = Arc::new(BlkBackend::new(disk.clone(), opts.clone(), counting.clone(), gating.clone()));
                    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
                    let mut daemon = VhostUserDaemon::new(name.clone(), backend, mem)
                        .map_err(|e| format!("creating the device: {e}"))?;
                    daemon
                        .start(&mut listener)
                        .map_err(|e| format!("accepting a front end: {e}"))?;
                    *current2.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
                    if stop2.load(Ordering::Acquire) {
                        daemon.request_shutdown();
                    }
                    match daemon.wait() {
                        Ok(()) => tracing::info!(socket = %path2.display(), "vhost-user front end disconnected"),
                        // A front end that goes away mid-message (QEMU killed) is not our failure.
                        Err(e) => tracing::info!(socket = %path2.display(), error = %e, "vhost-user connection ended"),
                    }
                    *current2.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    // Dropping the daemon stops its queue threads; the disk stays open.
                    drop(daemon);
                }
                Ok(())
            })
            .map_err(|source| Error::Thread {
                path: socket.to_path_buf(),
                source,
            })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            stopping,
            current,
            thread: Some(thread),
            counters,
            disk: cell,
            gate,
        })
    }

    /// Switches the served disk to `disk` while the front end stays connected:
    /// requests in flight finish on the old disk, which is then flushed; later
    /// ones go to `disk`, which must have the old one's size, sector size and
    /// read-only mode. Returns the old disk (dropping it closes it).
    pub fn switch(
        &self,
        disk: Arc<dyn Disk>,
    ) -> std::result::Result<Arc<dyn Disk>, vhd::SwitchError> {
        self.disk.replace(disk)
    }

    /// Holds the guest's requests back until the returned guard drops: requests
    /// being processed finish first, later ones wait in their virtqueue, and the
    /// front end can still stop and start the device meanwhile. Nothing writes
    /// to the disk or to the guest's memory while it is held.
    pub fn hold(&self) -> Held {
        self.gate.hold()
    }

    /// The disk served now.
    pub fn disk(&self) -> Arc<dyn Disk> {
        self.disk.current()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The disk's counters: totals since the server started, over every front end.
    pub fn counters(&self) -> Arc<DriveCounters> {
        self.counters.clone()
    }

    /// Disconnects the front end (if any), stops serving and removes the socket.
    /// Every request the front end saw completed has reached the disk.
    pub fn stop(mut self) -> Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stopping.store(true, Ordering::Release);
        if let Some(h) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            h.shutdown();
        }
        // Wake an accept() that is waiting for a front end.
        let _ = UnixStream::connect(&self.socket);
        let result = thread.join();
        let _ = std::fs::remove_file(&self.socket);
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(Error::Serve {
                path: self.socket.clone(),
                message,
            }),
            Err(_) => Err(Error::Serve {
                path: self.socket.clone(),
                message: "its thread panicked".to_string(),
            }),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}
