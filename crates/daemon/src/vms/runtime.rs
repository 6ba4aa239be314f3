//! VM runtime state and the hook points where the per-VM worker plugs in.
//!
//! The management service keeps one [`VmRuntime`] per VM in a [`RuntimeTable`]
//! (Off when nothing is recorded). Starting, stopping, pausing and saving VMs is the
//! job of a [`WorkerControl`] implementation (the worker integration), installed in
//! [`crate::service::Service::workers`]. It reports every state change through
//! [`crate::service::Service::set_runtime`], which updates the table and publishes a
//! `vm` event, and the settings handlers refuse changes unless the VM is Off.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;

use api::vms::{VmRuntime, VmState};
use jobs::{JobContext, JobError};
use uuid::Uuid;
use vm_config::VmSettings;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How to stop a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask the guest to shut down (ACPI power button); fail if it has not after `timeout_secs`.
    Shutdown { timeout_secs: u64 },
    /// Pull the plug.
    TurnOff,
    /// Save memory and device state to disk (state Saved).
    Save,
}

/// One layer to merge live: see [`WorkerControl::merge_layer`].
#[derive(Debug, Clone)]
pub struct LayerMerge {
    pub slot: vm_config::Slot,
    pub layer: PathBuf,
    pub into: PathBuf,
    /// Created by the worker once `into` holds the disk's current data.
    pub marker: Option<PathBuf>,
}

/// Starts and stops VM workers. Each call runs inside a job (the `JobContext` reports
/// progress and carries cancellation); the implementation calls
/// `Service::set_runtime` for every state it passes through (Starting, Running,
/// Stopping, Saving, Saved, Off, Critical).
pub trait WorkerControl: Send + Sync + 'static {
    /// Starts the worker for `vm` (folder `vm_dir`, runtime files in `vm_dir/runtime`).
    fn start(
        &self,
        vm: VmSettings,
        vm_dir: PathBuf,
        job: JobContext,
    ) -> BoxFuture<Result<(), JobError>>;
    /// Stops the VM's worker the way `mode` says.
    fn stop(&self, id: Uuid, mode: StopMode, job: JobContext) -> BoxFuture<Result<(), JobError>>;
    /// Pauses or resumes the vCPUs.
    fn pause(&self, id: Uuid, paused: bool) -> BoxFuture<Result<(), JobError>>;
    /// Resets the VM (the reset button).
    fn restart(&self, id: Uuid) -> BoxFuture<Result<(), JobError>>;
    /// Makes every write to a running VM's disks durable.
    fn flush_disks(&self, id: Uuid) -> BoxFuture<Result<(), JobError>>;
    /// Switches a running VM's disks in the given slots to the given images (copies
    /// of what they serve) while the VM runs: all or nothing. A worker that cannot
    /// (an older one) fails with a message saying it does not understand.
    fn switch_disks(
        &self,
        id: Uuid,
        disks: Vec<(vm_config::Slot, PathBuf)>,
    ) -> BoxFuture<Result<(), JobError>>;
    /// Saves a paused VM's memory and device state into `path`; QEMU stays.
    fn save_state(&self, id: Uuid, path: PathBuf) -> BoxFuture<Result<(), JobError>>;
    /// Gives a paused VM's disks in the given slots new differencing children
    /// at the given paths and serves those (all or nothing).
    fn new_layers(
        &self,
        id: Uuid,
        layers: Vec<(vm_config::Slot, PathBuf)>,
    ) -> BoxFuture<Result<(), JobError>>;
    /// A checkpoint of a running VM with its memory saved while it runs
    /// (`worker::control::Request::SnapshotState`): the memory of one instant
    /// into `path`, and the disks in the given slots on new differencing
    /// children at the given paths from that instant. All or nothing; the
    /// error code `Unsupported` says this host, QEMU or VM cannot do it.
    fn snapshot_state(
        &self,
        id: Uuid,
        path: PathBuf,
        layers: Vec<(vm_config::Slot, PathBuf)>,
    ) -> BoxFuture<Result<worker::control::SnapshotOutcome, JobError>>;
    /// Merges `layer` into its parent `into` in the chain a running VM serves
    /// in `slot`, while it runs (`worker::control::Request::MergeLayer`),
    /// reporting bytes done of total to `progress`.
    fn merge_layer(
        &self,
        id: Uuid,
        merge: LayerMerge,
        progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> BoxFuture<Result<worker::control::MergeOutcome, JobError>>;
    /// Takes a running VM's adapter (by MAC) link down or up, as its guest sees it.
    fn set_link(&self, id: Uuid, mac: String, up: bool) -> BoxFuture<Result<(), JobError>>;
    /// Applies new reserve, limit and weight to a running VM (same count).
    fn set_processor(
        &self,
        id: Uuid,
        processor: vm_config::ProcessorSettings,
    ) -> BoxFuture<Result<(), JobError>>;
    /// Live figures (uptime, load, memory) for a running VM.
    fn live(&self, id: Uuid) -> Option<VmRuntime>;
    /// Averages since a running VM started.
    fn measure(&self, id: Uuid) -> Option<api::vms::VmMeasurement>;
    /// The latest counters of every running VM: id, name, processor settings in force.
    fn metrics(
        &self,
    ) -> Vec<(
        Uuid,
        String,
        vm_config::ProcessorSettings,
        worker::meter::Meter,
    )>;
    /// Called once at daemon start with every readable VM: finds workers still running
    /// from before a restart and re-attaches to them, returning their runtime.
    fn reattach(&self, vms: Vec<(VmSettings, PathBuf)>) -> BoxFuture<Vec<(Uuid, VmRuntime)>>;
}

/// The runtime state of every VM that is not simply Off.
#[derive(Default)]
pub struct RuntimeTable {
    states: Mutex<HashMap<Uuid, VmRuntime>>,
}

impl RuntimeTable {
    /// The VM's runtime; Off when nothing is recorded.
    pub fn get(&self, id: Uuid) -> VmRuntime {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .get(&id)
            .cloned()
            .unwrap_or_else(|| VmRuntime::with_state(VmState::Off))
    }

    pub fn set(&self, id: Uuid, runtime: VmRuntime) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if runtime.state == VmState::Off {
            states.remove(&id);
        } else {
            states.insert(id, runtime);
        }
    }

    pub fn forget(&self, id: Uuid) {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}
