//! Checkpoints (Hyper-V's snapshots): the tree in each VM's folder
//! ([`tree`]), the file work ([`ops`]), and here the orchestration as jobs: one
//! checkpoint operation per VM at a time, VM state checks, the worker for a
//! running VM, and the merges deleted checkpoints wait for, resumed at daemon start
//! and whenever a VM stops.

pub mod ops;
pub mod tree;

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::checkpoints::{
    Checkpoint, CheckpointDisk, CheckpointTree, CreateCheckpointRequest, MergeState, PendingMerge,
};
use api::vms::{VmRuntime, VmState};
use api::ErrorCode;
use jobs::{AffectedElement, JobContext, JobError, JobSnapshot, JobSpec};
use uuid::Uuid;
use vm_config::{Slot, VmSettings};

use crate::error::{blocking, ApiError};
use crate::service::{damaged_unreadable, find, Service};
use crate::vms::runtime::StopMode;
use crate::vms::store::error_chain;
use ops::{Current, SAVED_STATE_FILE};

pub const DEFAULT_LIMIT: usize = 50;

/// Per-VM bookkeeping of checkpoint work in flight.
#[derive(Default)]
pub struct Checkpoints {
    /// VMs with a checkpoint job queued or running: they may not start meanwhile.
    busy: Mutex<HashMap<Uuid, usize>>,
    /// One checkpoint operation per VM at a time.
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// Merges running now: deleted node → (job, percent).
    running: Mutex<HashMap<Uuid, (Uuid, u8)>>,
    /// VMs whose background merge job is queued or running, and whether it
    /// was asked for again meanwhile (the VM's state changed: it runs again).
    settling: Mutex<HashMap<Uuid, bool>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Checkpoints {
    pub fn is_busy(&self, vm: Uuid) -> bool {
        lock(&self.busy).get(&vm).is_some_and(|n| *n > 0)
    }

    /// Marks VM `vm` busy (it may not start) until the guard drops.
    pub(crate) fn claim(self: &Arc<Self>, vm: Uuid) -> BusyGuard {
        *lock(&self.busy).entry(vm).or_default() += 1;
        BusyGuard {
            owner: self.clone(),
            vm,
        }
    }

    /// The lock that serialises checkpoint work on VM `vm`.
    pub(crate) fn vm_lock(&self, vm: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.locks).entry(vm).or_default().clone()
    }
}

pub(crate) struct BusyGuard {
    owner: Arc<Checkpoints>,
    vm: Uuid,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut busy = lock(&self.owner.busy);
        if let Some(n) = busy.get_mut(&self.vm) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                busy.remove(&self.vm);
            }
        }
    }
}

struct Target {
    id: Uuid,
    name: String,
    settings: VmSettings,
    dir: PathBuf,
    state: VmState,
}

fn target(svc: &Service, key: &str) -> Result<Target, ApiError> {
    let store = svc.store();
    let entry = find(&store, key)?;
    let Some(settings) = entry.settings.clone() else {
        return Err(damaged_unreadable(entry));
    };
    Ok(Target {
        id: entry.id,
        name: entry.name(),
        settings,
        dir: entry.dir.clone(),
        state: svc.state_of(entry).state,
    })
}

fn invalid_state(name: &str, state: VmState, what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidState,
        format!("cannot {what} while VM {name} is {state:?}"),
    )
    .with_details(serde_json::json!({ "state": state }))
}

/// Writes new settings for VM `id` (any state: only checkpoint code calls this).
fn write_settings(svc: &Service, settings: VmSettings) -> Result<(), ApiError> {
    let mut store = svc.store();
    store
        .save(settings)
        .map_err(|e| ApiError::internal(error_chain(&e)))?;
    Ok(())
}

/// Re-points the drive in `slot` from `old` to `new` in `vm.json`.
fn repoint_current(
    svc: &Service,
    id: Uuid,
    slot: Slot,
    old: &Path,
    new: &Path,
) -> Result<(), ApiError> {
    let mut store = svc.store();
    let Some(mut settings) = store.get(id).and_then(|e| e.settings.clone()) else {
        return Ok(());
    };
    if ops::repoint_drive(&mut settings, slot, old, new) {
        store
            .save(settings)
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
    }
    Ok(())
}

fn current_mode(svc: &Service, id: Uuid) -> Current {
    match svc.runtime.get(id).state {
        VmState::Off | VmState::Saved | VmState::Critical => Current::Idle,
        VmState::Running | VmState::Paused if svc.workers.is_some() => Current::Live,
        _ => Current::Running,
    }
}

/// Has VM `id`'s worker merge a layer of its running chain (blocking; call
/// on a blocking thread of runtime `rt`), passing its progress on.
fn merge_live(
    svc: &Service,
    rt: &tokio::runtime::Handle,
    id: Uuid,
    merge: crate::vms::runtime::LayerMerge,
    progress: &mut dyn vhd::Progress,
) -> Result<(), ApiError> {
    let Some(workers) = svc.workers.clone() else {
        return Err(ApiError::internal("no worker control"));
    };
    let what = format!(
        "{} into {} in slot {}",
        merge.layer.display(),
        merge.into.display(),
        merge.slot
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let report = Box::new(move |done, total| {
        let _ = tx.send((done, total));
    });
    let outcome = rt.block_on(async {
        let merge = workers.merge_layer(id, merge, report);
        tokio::pin!(merge);
        loop {
            tokio::select! {
                r = &mut merge => break r,
                Some((done, total)) = rx.recv() => {
                    progress.update(done, total);
                }
            }
        }
    });
    match outcome {
        Ok(o) => {
            tracing::info!(vm = %id, merged = %what, bytes = o.bytes_copied, rounds = o.rounds,
                io_paused_ms = o.io_paused_ms, already = o.already, "checkpoint layer merged live");
            Ok(())
        }
        Err(e) => Err(ApiError::new(
            api::error::ErrorCode::Internal,
            format!("the running VM's worker did not merge {what}: {}", e),
        )),
    }
}

/// Runs every merge VM `id` waits for that its state allows, reporting to `ctx`.
/// When the VM's state changes meanwhile (a worker that died during a live
/// merge), it goes on with what the new state allows.
async fn settle(
    svc: &Arc<Service>,
    id: Uuid,
    dir: PathBuf,
    ctx: Option<JobContext>,
) -> Result<usize, JobError> {
    let mut done = 0;
    loop {
        let mode = current_mode(svc, id);
        done += settle_once(svc, id, dir.clone(), ctx.clone(), mode).await?;
        if current_mode(svc, id) == mode {
            return Ok(done);
        }
    }
}

async fn settle_once(
    svc: &Arc<Service>,
    id: Uuid,
    dir: PathBuf,
    ctx: Option<JobContext>,
    mode: Current,
) -> Result<usize, JobError> {
    let svc2 = svc.clone();
    let rt = tokio::runtime::Handle::current();
    blocking("a checkpoint operation", move || {
        let job = ctx.as_ref().map(|c| c.id()).unwrap_or_default();
        let running = &svc2.checkpoints.running;
        let merging: Cell<Option<Uuid>> = Cell::new(None);
        let mut write =
            |slot: Slot, old: &Path, new: &Path| repoint_current(&svc2, id, slot, old, new);
        let mut on_work = |w: &ops::Work| {
            if let Some(prev) = merging.replace(Some(w.node)) {
                lock(running).remove(&prev);
            }
            lock(running).insert(w.node, (job, 0));
        };
        let stall = StallAt::from_env();
        let mut progress = |done: u64, total: u64| {
            if let Some(c) = &ctx {
                c.set_progress(done, total);
            }
            let pct = (done.min(total) * 100).checked_div(total).unwrap_or(0) as u8;
            if let Some(node) = merging.get() {
                lock(running).insert(node, (job, pct));
            }
            stall.at_copy(pct);
            true
        };
        let mut hook = |step: &str| {
            tracing::debug!(vm = %id, step, "checkpoint merge step");
            stall.at_step(step);
            Ok(())
        };
        let mut live = |slot: Slot,
                        layer: &Path,
                        into: &Path,
                        marker: Option<&Path>,
                        progress: &mut dyn vhd::Progress| {
            let merge = crate::vms::runtime::LayerMerge {
                slot,
                layer: layer.to_path_buf(),
                into: into.to_path_buf(),
                marker: marker.map(Path::to_path_buf),
            };
            merge_live(&svc2, &rt, id, merge, progress)
        };
        let done = ops::settle(
            &dir,
            mode,
            &mut write,
            Some(&mut live),
            &mut on_work,
            &mut progress,
            &mut hook,
        );
        if let Some(node) = merging.get() {
            lock(running).remove(&node);
        }
        done.map(|w| w.len())
    })
    .await
}

/// The crash tests' seam: `VIRIDIAN_TEST_STALL_MERGE_AT=<step>` (a merge step:
/// `merge`, `reparent`, `repoint`, `remove-layer`, `forget`, `remove-disk`) or
/// `copy-<percent>` makes a merge stop for good at that point, after logging
/// "merge stalled", so a test can kill the daemon there. Unset, it does nothing.
struct StallAt(Option<String>);

impl StallAt {
    const VAR: &'static str = "VIRIDIAN_TEST_STALL_MERGE_AT";

    fn from_env() -> Self {
        StallAt(std::env::var(Self::VAR).ok().filter(|s| !s.is_empty()))
    }

    fn at_step(&self, step: &str) {
        if self.0.as_deref() == Some(step) {
            Self::forever(step);
        }
    }

    fn at_copy(&self, percent: u8) {
        let at = self.0.as_deref().and_then(|s| s.strip_prefix("copy-"));
        if at
            .and_then(|p| p.parse::<u8>().ok())
            .is_some_and(|p| percent >= p)
        {
            Self::forever(&format!("copy at {percent} %"));
        }
    }

    fn forever(at: &str) -> ! {
        tracing::warn!(at, var = Self::VAR, "merge stalled for a crash test");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Starts a background merge job for VM `id` when a deleted checkpoint waits for
/// one its state now allows (after a stop, at daemon start). At most one per VM.
pub fn settle_in_background(svc: &Arc<Service>, id: Uuid) {
    let Some(dir) = svc.store().get(id).map(|e| e.dir.clone()) else {
        return;
    };
    let Ok(t) = tree::load(&dir) else {
        return;
    };
    let Some(work) = ops::next_work(&t, current_mode(svc, id)) else {
        return;
    };
    {
        let mut settling = lock(&svc.checkpoints.settling);
        if let Some(again) = settling.get_mut(&id) {
            *again = true;
            return;
        }
        settling.insert(id, false);
    }
    let name = t
        .node(work.node)
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let spec = JobSpec {
        job_type: "MergeCheckpoint".into(),
        description: format!("Merge the disks of deleted checkpoint {name:?}"),
        cancellable: false,
        affected: affected_checkpoint(id, work.node),
    };
    let svc2 = svc.clone();
    let guard = svc.checkpoints.clone().claim(id);
    svc.jobs.submit(spec, move |ctx| async move {
        let _guard = guard;
        let vm_lock = svc2.checkpoints.vm_lock(id);
        let _held = vm_lock.lock().await;
        let r = settle(&svc2, id, dir, Some(ctx)).await;
        drop(_held);
        let again = lock(&svc2.checkpoints.settling).remove(&id) == Some(true);
        if again {
            settle_in_background(&svc2, id);
        }
        r.map(drop)
    });
}

/// At daemon start: repairs `vm.json` after a crash mid-operation and resumes the
/// merges deleted checkpoints wait for.
pub fn resume_at_start(svc: &Arc<Service>) {
    let vms: Vec<(Uuid, PathBuf, Option<VmSettings>)> = svc
        .store()
        .entries()
        .map(|e| (e.id, e.dir.clone(), e.settings.clone()))
        .collect();
    for (id, dir, settings) in vms {
        if !tree::tree_path(&dir).exists() {
            continue;
        }
        let mut repoint =
            |slot: Slot, old: &Path, new: &Path| repoint_current(svc, id, slot, old, new);
        match ops::recover_intent(&dir, &mut repoint) {
            Ok(Some(true)) => {
                tracing::warn!(vm = %id, "a checkpoint of the running VM interrupted by a crash was finished; resume the VM if it is paused")
            }
            Ok(Some(false)) => {
                tracing::warn!(vm = %id, "a checkpoint of the running VM interrupted by a crash was taken back")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(vm = %id, error = %e.message, "cannot recover a checkpoint interrupted by a crash")
            }
        }
        let _ = std::fs::remove_file(dir.join(STATE_IN_TRANSIT));
        let settings = svc
            .store()
            .get(id)
            .and_then(|e| e.settings.clone())
            .or(settings);
        if let (Some(s), Current::Idle) = (settings, current_mode(svc, id)) {
            match ops::reconcile(&dir, &s) {
                Ok(Some(fixed)) => {
                    if let Err(e) = write_settings(svc, fixed) {
                        tracing::error!(vm = %id, error = %e.message, "cannot repair vm.json from the checkpoint tree");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(vm = %id, error = %e.message, "cannot read the checkpoint tree")
                }
            }
        }
        settle_in_background(svc, id);
    }
}

fn affected(vm: Uuid) -> Vec<AffectedElement> {
    vec![AffectedElement::new("vm", vm.to_string())]
}

/// [`affected`] and the checkpoint the job works on.
fn affected_checkpoint(vm: Uuid, checkpoint: Uuid) -> Vec<AffectedElement> {
    vec![
        AffectedElement::new("vm", vm.to_string()),
        AffectedElement::new("checkpoint", checkpoint.to_string()),
    ]
}

/// Submits checkpoint job `spec` on VM `vm`: the VM is claimed (it may not start)
/// from now until the job ends, and `work` runs holding the VM's checkpoint lock.
fn submit_locked<F, Fut>(svc: &Arc<Service>, vm: Uuid, spec: JobSpec, work: F) -> JobSnapshot
where
    F: FnOnce(Arc<Service>, JobContext) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    let svc2 = svc.clone();
    let guard = svc.checkpoints.clone().claim(vm);
    svc.jobs.submit(spec, move |ctx| async move {
        let _guard = guard;
        let vm_lock = svc2.checkpoints.vm_lock(vm);
        let _held = vm_lock.lock().await;
        work(svc2, ctx).await
    })
}

/// `POST /v1/vms/{vm}/checkpoints`
pub fn submit_create(
    svc: &Arc<Service>,
    key: &str,
    req: CreateCheckpointRequest,
) -> Result<JobSnapshot, ApiError> {
    let vm = target(svc, key)?;
    if !matches!(
        vm.state,
        VmState::Off | VmState::Saved | VmState::Running | VmState::Paused
    ) {
        return Err(invalid_state(&vm.name, vm.state, "take a checkpoint"));
    }
    // The quick checks answer at once; the job checks again under the VM's lock.
    let t = ops::load(&vm.dir)?;
    if let Some(n) = &req.name {
        ops::check_name(&t, n, None)?;
    }
    let count = t.visible().count();
    if count >= svc.config.checkpoint_limit {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "VM {} already has {count} checkpoints, the most allowed (viridiand --checkpoint-limit {}); delete one first",
                vm.name, svc.config.checkpoint_limit
            ),
        ));
    }
    let spec = JobSpec {
        job_type: "CreateCheckpoint".into(),
        description: format!("Take a checkpoint of VM {}", vm.name),
        cancellable: false,
        affected: affected(vm.id),
    };
    let id = vm.id;
    Ok(submit_locked(svc, id, spec, move |svc2, ctx| async move {
        let node = take(&svc2, vm.id, req.name, ctx.clone()).await?;
        ctx.add_affected(AffectedElement::new("checkpoint", node.to_string()));
        Ok(())
    }))
}

/// Takes a checkpoint of VM `id` in whatever state it is (a running VM is saved,
/// switched to new layers and started again) and returns its id. The caller holds
/// the VM's checkpoint lock.
pub(crate) async fn take(
    svc: &Arc<Service>,
    id: Uuid,
    name: Option<String>,
    ctx: JobContext,
) -> Result<Uuid, JobError> {
    let vm = target(svc, &id.to_string()).map_err(JobError::from)?;
    let limit = svc.config.checkpoint_limit;
    match vm.state {
        VmState::Off | VmState::Saved => {
            let saved = vm.dir.join(SAVED_STATE_FILE);
            let memory = (vm.state == VmState::Saved && saved.exists()).then_some(saved);
            let (dir, settings) = (vm.dir.clone(), vm.settings.clone());
            let created = blocking("a checkpoint operation", move || {
                let c = ops::create(&dir, &settings, name, memory.as_deref(), limit)?;
                Ok(c)
            })
            .await?;
            write_settings(svc, created.settings).map_err(JobError::from)?;
            Ok(created.node.id)
        }
        VmState::Running | VmState::Paused => {
            let Some(workers) = svc.workers.clone() else {
                return Err(JobError::failed(
                    "InvalidState",
                    "this viridiand runs no VMs",
                ));
            };
            let note = |kind: &str, value: String| {
                ctx.add_affected(AffectedElement::new(kind, value));
            };
            // Memory saved while the guest runs, where it can be; the reason
            // it cannot is told with the way taken instead.
            let why_not = if vm.state == VmState::Paused {
                "the VM is paused (QEMU starts the guest again when a background snapshot has begun)".to_string()
            } else if svc.config.background_checkpoints == "off" {
                "viridiand runs with --background-checkpoints off".to_string()
            } else {
                match take_background(svc, workers.as_ref(), &vm, name.clone(), limit).await {
                    Ok((node, outcome)) => {
                        note("checkpoint-method", METHOD_BACKGROUND.into());
                        note("guest-downtime-ms", outcome.downtime_ms.to_string());
                        note("saved-bytes", outcome.bytes.to_string());
                        note("background-save-ms", outcome.background_ms.to_string());
                        note("disk-io-held-ms", outcome.io_held_ms.to_string());
                        tracing::info!(vm = %id, downtime_ms = outcome.downtime_ms,
                            background_ms = outcome.background_ms, io_held_ms = outcome.io_held_ms,
                            "checkpoint of a running VM taken in the background");
                        return Ok(node);
                    }
                    Err(InPlace::Refused(e)) => return Err(e),
                    Err(InPlace::NotDone(e)) => {
                        tracing::info!(vm = %id, error = %e,
                            "no background checkpoint; pausing the guest while its memory is saved");
                        e.to_string()
                    }
                }
            };
            // Pause, save memory and device state, switch disks, resume; QEMU
            // stays. A worker that cannot (an older one) is saved and started
            // again instead.
            let started = Instant::now();
            match take_in_place(svc, workers.as_ref(), &vm, name.clone(), limit).await {
                Ok(node) => {
                    let downtime = started.elapsed();
                    note("checkpoint-method", METHOD_PAUSE.into());
                    note("checkpoint-method-reason", why_not);
                    note("guest-downtime-ms", downtime.as_millis().to_string());
                    tracing::info!(vm = %id, downtime_ms = downtime.as_millis() as u64, "checkpoint of a running VM taken in place");
                    return Ok(node);
                }
                Err(InPlace::Refused(e)) => return Err(e),
                Err(InPlace::NotDone(e)) => {
                    tracing::warn!(vm = %id, error = %e,
                        "the worker could not take the checkpoint in place; saving the VM and starting it again instead");
                    note("checkpoint-method", METHOD_SAVE_AND_START.into());
                    note(
                        "checkpoint-method-reason",
                        format!("{why_not}; and the worker could not pause it in place: {e}"),
                    );
                }
            }
            let started = Instant::now();
            svc.set_runtime(id, VmRuntime::with_state(VmState::Saving));
            workers.stop(id, StopMode::Save, ctx.clone()).await?;
            let saved = vm.dir.join(SAVED_STATE_FILE);
            let (dir, settings) = (vm.dir.clone(), vm.settings.clone());
            let memory = saved.clone();
            let created = blocking("a checkpoint operation", move || {
                ops::create(&dir, &settings, name, Some(&memory), limit)
            })
            .await;
            let created = match created {
                Ok(c) => c,
                Err(e) => {
                    // Resume on the old disks: the VM keeps running as before.
                    let _ = workers
                        .start(vm.settings.clone(), vm.dir.clone(), ctx.clone())
                        .await;
                    return Err(e);
                }
            };
            let node = created.node.id;
            let new_settings = created.settings.clone();
            write_settings(svc, created.settings).map_err(JobError::from)?;
            svc.set_runtime(id, VmRuntime::with_state(VmState::Starting));
            workers
                .start(new_settings, vm.dir.clone(), ctx.clone())
                .await?;
            let downtime = started.elapsed();
            ctx.add_affected(AffectedElement::new(
                "guest-downtime-ms",
                downtime.as_millis().to_string(),
            ));
            tracing::info!(vm = %id, downtime_ms = downtime.as_millis() as u64, "checkpoint of a running VM taken");
            Ok(node)
        }
        state => Err(JobError::from(invalid_state(
            &vm.name,
            state,
            "take a checkpoint",
        ))),
    }
}

/// `checkpoint-method` in a checkpoint job's result: the guest ran while its
/// memory was saved (it stopped only for the switch-over).
pub const METHOD_BACKGROUND: &str = "background";
/// The guest was paused while its memory was saved, QEMU staying.
pub const METHOD_PAUSE: &str = "pause";
/// The VM was saved, and started again from that state.
pub const METHOD_SAVE_AND_START: &str = "save-and-start";

/// A checkpoint of the running VM `vm` with its memory saved while the guest
/// runs: the checkpoint is recorded with its layers planned and its memory to
/// come (the intent first), then the worker saves the memory of one instant
/// into the checkpoint's folder and puts the disks on their layers from that
/// instant; `vm.json` follows. `NotDone` when the worker, QEMU or the host
/// cannot: the checkpoint is taken back and the VM runs on as before.
async fn take_background(
    svc: &Arc<Service>,
    workers: &dyn crate::vms::runtime::WorkerControl,
    vm: &Target,
    name: Option<String>,
    limit: usize,
) -> Result<(Uuid, worker::control::SnapshotOutcome), InPlace> {
    let id = vm.id;
    let (dir, settings) = (vm.dir.clone(), vm.settings.clone());
    let planned: Arc<Mutex<Option<ops::Intent>>> = Arc::default();
    let plan = planned.clone();
    let created = blocking("a checkpoint operation", move || {
        let tell = |intent: &ops::Intent| {
            ops::write_intent(&dir, intent)?;
            *lock(&plan) = Some(intent.clone());
            Ok(())
        };
        ops::create_with(
            &dir,
            &settings,
            name,
            ops::Memory::ToCome,
            limit,
            Some(&tell),
        )
    })
    .await;
    let intent = lock(&planned).take();
    let take_back = |intent: ops::Intent| async move {
        let dir = vm.dir.clone();
        if let Err(e) = blocking("a checkpoint operation", move || {
            ops::undo_intent(&dir, &intent)
        })
        .await
        {
            tracing::error!(vm = %id, error = %e, "cannot take back a background checkpoint that did not happen");
        }
    };
    let created = match created {
        Ok(c) => c,
        Err(e) => {
            if let Some(intent) = intent {
                take_back(intent).await;
            }
            return Err(InPlace::Refused(e));
        }
    };
    let Some(intent) = intent else {
        return Err(InPlace::Refused(JobError::failed(
            "Failed",
            "the checkpoint's layers were not planned; this is a bug in viridiand",
        )));
    };
    let layers = intent
        .layers
        .iter()
        .map(|l| (l.slot, l.layer.clone()))
        .collect();
    let memory = ops::memory_path(&vm.dir, created.node.id);
    let outcome = match workers.snapshot_state(id, memory, layers).await {
        Ok(o) => o,
        Err(e) => {
            take_back(intent).await;
            return Err(InPlace::NotDone(e));
        }
    };
    if let Err(e) = write_settings(svc, created.settings) {
        // The tree and the worker have the new layers; the intent left in
        // place re-points vm.json at the next start.
        return Err(InPlace::Refused(JobError::from(e)));
    }
    let _ = std::fs::remove_file(ops::intent_path(&vm.dir));
    Ok((created.node.id, outcome))
}

/// Why a checkpoint of a running VM was not taken in place.
enum InPlace {
    /// Nothing changed and the VM runs as before; the save-and-start way may work.
    NotDone(JobError),
    /// The checkpoint itself is refused (a name, the limit): nothing changed.
    Refused(JobError),
}

/// The saved state of a checkpoint of a running VM on its way into the
/// checkpoint's folder.
const STATE_IN_TRANSIT: &str = "checkpoint-state.bin";

/// A checkpoint of the running (or paused) VM `vm` with its worker and QEMU
/// staying: pause, save the state beside QEMU, record the checkpoint with its
/// layers planned (the intent first), have the worker make them over the
/// leaves it holds and serve them, write `vm.json`, resume.
async fn take_in_place(
    svc: &Arc<Service>,
    workers: &dyn crate::vms::runtime::WorkerControl,
    vm: &Target,
    name: Option<String>,
    limit: usize,
) -> Result<Uuid, InPlace> {
    let id = vm.id;
    let was_running = vm.state == VmState::Running;
    let resume = |why: JobError| async move {
        if was_running {
            if let Err(e) = workers.pause(id, false).await {
                tracing::error!(vm = %id, error = %e, "cannot resume the VM after a checkpoint that did not happen");
            }
        }
        why
    };
    if was_running {
        workers.pause(id, true).await.map_err(InPlace::NotDone)?;
    }
    let state = vm.dir.join(STATE_IN_TRANSIT);
    if let Err(e) = workers.save_state(id, state.clone()).await {
        return Err(InPlace::NotDone(resume(e).await));
    }
    let (dir, settings) = (vm.dir.clone(), vm.settings.clone());
    let planned: Arc<Mutex<Option<ops::Intent>>> = Arc::default();
    let plan = planned.clone();
    let memory = state.clone();
    let created = blocking("a checkpoint operation", move || {
        let tell = |intent: &ops::Intent| {
            ops::write_intent(&dir, intent)?;
            *lock(&plan) = Some(intent.clone());
            Ok(())
        };
        ops::create_with(
            &dir,
            &settings,
            name,
            ops::Memory::File(&memory),
            limit,
            Some(&tell),
        )
    })
    .await;
    let _ = std::fs::remove_file(&state);
    let created = match created {
        Ok(c) => c,
        Err(e) => {
            let intent = lock(&planned).take();
            if let Some(intent) = intent {
                let dir = vm.dir.clone();
                let _ = blocking("a checkpoint operation", move || {
                    ops::undo_intent(&dir, &intent)
                })
                .await;
            }
            return Err(InPlace::Refused(resume(e).await));
        }
    };
    let intent = lock(&planned).take();
    let intent = intent.unwrap_or(ops::Intent {
        node: created.node.id,
        layers: Vec::new(),
        memory_to_come: false,
    });
    let layers = intent
        .layers
        .iter()
        .map(|l| (l.slot, l.layer.clone()))
        .collect();
    if let Err(e) = workers.new_layers(id, layers).await {
        let dir = vm.dir.clone();
        if let Err(u) = blocking("a checkpoint operation", move || {
            ops::undo_intent(&dir, &intent)
        })
        .await
        {
            tracing::error!(vm = %id, error = %u, "cannot take back a checkpoint whose layers were not made");
        }
        return Err(InPlace::NotDone(resume(e).await));
    }
    let node = created.node.id;
    if let Err(e) = write_settings(svc, created.settings) {
        // The tree and the worker have the new layers; the intent left in
        // place re-points vm.json at the next start.
        return Err(InPlace::Refused(resume(JobError::from(e)).await));
    }
    let _ = std::fs::remove_file(ops::intent_path(&vm.dir));
    if was_running {
        workers.pause(id, false).await.map_err(|e| {
            InPlace::Refused(JobError::failed(
                "Failed",
                format!(
                    "the checkpoint was taken, but resuming the VM failed: {}",
                    e
                ),
            ))
        })?;
    }
    Ok(node)
}

/// `POST /v1/vms/{vm}/checkpoints/{checkpoint}/apply`
pub fn submit_apply(svc: &Arc<Service>, key: &str, cp: &str) -> Result<JobSnapshot, ApiError> {
    let vm = target(svc, key)?;
    if !matches!(vm.state, VmState::Off | VmState::Saved) {
        return Err(invalid_state(
            &vm.name,
            vm.state,
            "apply a checkpoint (turn the VM off or save it first)",
        ));
    }
    let t = ops::load(&vm.dir)?;
    let node = ops::find(&t, cp)?.clone();
    let spec = JobSpec {
        job_type: "ApplyCheckpoint".into(),
        description: format!("Apply checkpoint {:?} to VM {}", node.name, vm.name),
        cancellable: false,
        affected: affected_checkpoint(vm.id, node.id),
    };
    let cp = node.id.to_string();
    let id = vm.id;
    Ok(submit_locked(svc, id, spec, move |svc2, ctx| async move {
        let vm = target(&svc2, &vm.id.to_string()).map_err(JobError::from)?;
        if !matches!(vm.state, VmState::Off | VmState::Saved) {
            return Err(JobError::from(invalid_state(
                &vm.name,
                vm.state,
                "apply a checkpoint",
            )));
        }
        let (dir, settings) = (vm.dir.clone(), vm.settings.clone());
        let applied = blocking("a checkpoint operation", move || {
            ops::apply(&dir, &settings, &cp)
        })
        .await?;
        ctx.set_percent(30);
        write_settings(&svc2, applied.settings).map_err(JobError::from)?;
        let saved = vm.dir.join(SAVED_STATE_FILE);
        let state = match &applied.memory_state {
            Some(m) => {
                let (m, saved) = (m.clone(), saved.clone());
                blocking("a checkpoint operation", move || {
                    restore_state(&m, &saved).map_err(|e| {
                        ApiError::internal(format!(
                            "cannot restore the memory state {}: {e}",
                            m.display()
                        ))
                    })
                })
                .await?;
                VmState::Saved
            }
            None => {
                if let Err(e) = std::fs::remove_file(&saved) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(JobError::failed(
                            "Internal",
                            format!(
                                "cannot remove the VM's saved state {}: {e}",
                                saved.display()
                            ),
                        ));
                    }
                }
                VmState::Off
            }
        };
        svc2.set_runtime(vm.id, VmRuntime::with_state(state));
        ops::remove_files(&applied.discard);
        ctx.set_percent(50);
        settle(&svc2, vm.id, vm.dir.clone(), Some(ctx))
            .await
            .map(drop)
    }))
}

fn restore_state(from: &Path, to: &Path) -> std::io::Result<()> {
    let tmp = to.with_extension("restoring");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(from, &tmp).is_err() {
        std::fs::copy(from, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
    }
    std::fs::rename(&tmp, to)?;
    std::fs::File::open(to.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// `DELETE /v1/vms/{vm}/checkpoints/{checkpoint}[/subtree]`
pub fn submit_delete(
    svc: &Arc<Service>,
    key: &str,
    cp: &str,
    subtree: bool,
) -> Result<JobSnapshot, ApiError> {
    let vm = target(svc, key)?;
    let t = ops::load(&vm.dir)?;
    let node = ops::find(&t, cp)?.clone();
    let spec = JobSpec {
        job_type: if subtree {
            "DeleteCheckpointSubtree".into()
        } else {
            "DeleteCheckpoint".into()
        },
        description: format!(
            "Delete checkpoint {:?}{} of VM {}",
            node.name,
            if subtree { " and its subtree" } else { "" },
            vm.name
        ),
        cancellable: false,
        affected: affected_checkpoint(vm.id, node.id),
    };
    let cp = node.id.to_string();
    let id = vm.id;
    Ok(submit_locked(svc, id, spec, move |svc2, ctx| async move {
        let dir = vm.dir.clone();
        blocking("a checkpoint operation", move || {
            ops::delete(&dir, &cp, subtree)
        })
        .await?;
        ctx.set_percent(5);
        settle(&svc2, vm.id, vm.dir.clone(), Some(ctx))
            .await
            .map(drop)
    }))
}

/// `PATCH /v1/vms/{vm}/checkpoints/{checkpoint}`
pub async fn rename(
    svc: &Arc<Service>,
    key: &str,
    cp: &str,
    name: &str,
) -> Result<Checkpoint, ApiError> {
    let vm = target(svc, key)?;
    let vm_lock = svc.checkpoints.vm_lock(vm.id);
    let _held = vm_lock.lock().await;
    let node = ops::rename(&vm.dir, cp, name)?;
    let t = ops::load(&vm.dir)?;
    Ok(view(&vm.dir, &t, &t.node(node.id).cloned().unwrap_or(node)))
}

fn disks_view(disks: &[tree::NodeDisk]) -> Vec<CheckpointDisk> {
    disks
        .iter()
        .map(|d| CheckpointDisk {
            slot: d.slot,
            path: d.path.to_string_lossy().into_owned(),
            size_on_disk_bytes: ops::size_on_disk(&d.path),
        })
        .collect()
}

fn view(vm_dir: &Path, t: &tree::Tree, n: &tree::Node) -> Checkpoint {
    // Children through deleted nodes: what a user sees as the next checkpoints.
    let mut children = Vec::new();
    let mut stack = vec![n.id];
    while let Some(cur) = stack.pop() {
        for c in t.nodes.iter().filter(|c| c.parent == Some(cur)) {
            if c.deleted {
                stack.push(c.id);
            } else {
                children.push(c.id);
            }
        }
    }
    let disks = disks_view(&n.disks);
    let dir = tree::node_dir(vm_dir, n.id);
    let own: u64 = [tree::SETTINGS_FILE, SAVED_STATE_FILE]
        .iter()
        .map(|f| ops::size_on_disk(&dir.join(f)))
        .sum();
    Checkpoint {
        id: n.id,
        name: n.name.clone(),
        parent: t.visible_at_or_above(n.parent),
        children,
        created: crate::convert::rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(n.created_ms),
        ),
        has_memory_state: n.memory_state,
        size_on_disk_bytes: own + disks.iter().map(|d| d.size_on_disk_bytes).sum::<u64>(),
        disks,
        is_current_parent: t.visible_at_or_above(t.current_parent) == Some(n.id),
    }
}

/// The merges a VM waits for or runs now.
pub fn pending_merges(svc: &Service, id: Uuid, vm_dir: &Path, t: &tree::Tree) -> Vec<PendingMerge> {
    let running = lock(&svc.checkpoints.running).clone();
    let mode = current_mode(svc, id);
    t.nodes
        .iter()
        .filter(|n| n.deleted)
        .map(|n| {
            let run = running.get(&n.id);
            PendingMerge {
                id: n.id,
                name: n.name.clone(),
                state: if run.is_some() {
                    MergeState::Running
                } else {
                    MergeState::Pending
                },
                reason: match run {
                    Some(_) => "merging now".into(),
                    None => ops::waiting_reason(t, n.id, mode),
                },
                job: run.map(|r| r.0),
                percent_complete: run.map(|r| r.1),
                disks: disks_view(&n.disks),
            }
        })
        .filter(|_| vm_dir.exists())
        .collect()
}

/// `GET /v1/vms/{vm}/checkpoints`
pub fn list(svc: &Arc<Service>, key: &str) -> Result<CheckpointTree, ApiError> {
    let vm = target(svc, key)?;
    let t = ops::load(&vm.dir)?;
    Ok(CheckpointTree {
        checkpoints: t.visible().map(|n| view(&vm.dir, &t, n)).collect(),
        current_parent: t.visible_at_or_above(t.current_parent),
        pending_merges: pending_merges(svc, vm.id, &vm.dir, &t),
        limit: svc.config.checkpoint_limit,
    })
}
