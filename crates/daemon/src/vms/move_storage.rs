//! `POST /v1/vms/{vm}/move-storage`: moves every disk file of a VM (every file of
//! every chain of its drives and checkpoints, except files another VM's chain uses
//! too, which stay where they are) into a destination folder, possibly on another
//! file system: `DEST/Virtual Hard Disks/<name>` for the VM's own disks,
//! `DEST/Snapshots/<checkpoint-id>/<name>` for checkpoint layers (new layers go
//! there too from then on: the tree's `layers_dir`). The VM's settings folder under
//! `<data-dir>/vms` stays, as do saved memory states (they live with the settings).
//!
//! One durable intent, `move-intent.json` in the VM's folder, holds the
//! source → destination mapping and the phase:
//!
//! 1. `copying`: the copies are made (`std::fs::copy`: copy_file_range on Linux,
//!    then fsync), their parent locators re-pointed at the copied parents
//!    (`vhd::ops::set_parent`, same identities), and verified: `vhd::ops::check`
//!    clean, every chain opens from the copies with the right parent IDs and the
//!    same files, same size, and the same bytes in the first and last MiB of every
//!    file (a cheap check; reading every byte again would halve the throughput,
//!    and the structure check already reads every header, table and locator).
//!    Cancel or crash here: the copies go, the source stays (roll back).
//! 2. `committed` (the commit point): `vm.json` (drive paths) and
//!    `checkpoints.json` (node disks, current disks, `layers_dir`) are rewritten
//!    from the mapping, then the sources are removed, then the intent. A crash
//!    after the commit rolls forward at the next start.
//!
//! Offline: the files copy while no worker has them open. An Off or Saved VM stays
//! so (a saved VM's memory state names no disk file).
//!
//! Online, for a Running or Paused VM (see [`move_online`]): every file but the
//! running leaves copies while the guest runs; the guest is paused only while the
//! leaves copy; after the commit the worker switches its disk servers to the copies
//! and the guest resumes. The switch comes after the commit, so a crash before it
//! leaves the worker on the sources; a restart after it switches a live worker
//! before the sources go ([`resume_at_start`]). A worker that cannot switch makes
//! the move offline: saved first, moved, started again from its saved state (and
//! paused again if it was), the guest stopped for the whole copy.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Instant;

use api::vms::{VmRuntime, VmState};
use api::ErrorCode;
use jobs::{AffectedElement, JobContext, JobError, JobSnapshot, JobSpec};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_config::{DriveMedia, VmSettings};

use super::disk_owners::{canonical, used_by_others, vm_files, whole_chain};
use super::runtime::{StopMode, WorkerControl};
use super::store::{error_chain, DISKS_FOLDER};
use super::test_seam::Stall;
use crate::checkpoints::tree::{self, Tree, SNAPSHOTS_FOLDER};
use crate::error::ApiError;
use crate::service::{damaged_unreadable, find, Service};

pub const INTENT_FILE: &str = "move-intent.json";
const INTENT_VERSION: u32 = 1;
/// `VIRIDIAN_TEST_STALL_MOVE_AT=<step>`: `copy-<percent>` (the job stays
/// cancellable there), `relink`, `verify`, `commit` (just before), `committed`
/// (just after), `settings`, `remove-sources`.
pub const STALL_VAR: &str = "VIRIDIAN_TEST_STALL_MOVE_AT";
const SAMPLE: u64 = 1 << 20;
/// `VIRIDIAN_TEST_MOVE_OFFLINE=1`: a running VM's storage moves offline, as with a
/// worker that cannot switch its disks (the tests compare the two downtimes).
pub const OFFLINE_VAR: &str = "VIRIDIAN_TEST_MOVE_OFFLINE";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Copying,
    Committed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMove {
    pub from: PathBuf,
    pub to: PathBuf,
}

/// `move-intent.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    pub schema_version: u32,
    pub phase: Phase,
    pub destination: PathBuf,
    /// Whether the move made the destination folder (a roll back removes it then).
    pub created_destination: bool,
    pub files: Vec<FileMove>,
    /// The checkpoint layers' folder after the move.
    pub layers_dir: PathBuf,
    /// An online move paused the running guest for the leaves' copy: a move
    /// interrupted after that resumes it at the next daemon start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_paused_by_move: bool,
}

pub fn intent_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(INTENT_FILE)
}

fn load_intent(vm_dir: &Path) -> Result<Option<Intent>, ApiError> {
    let path = intent_path(vm_dir);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            ApiError::internal(format!(
                "the move intent {} is not valid: {e}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ApiError::internal(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

fn save_intent(vm_dir: &Path, intent: &Intent) -> Result<(), ApiError> {
    let path = intent_path(vm_dir);
    vm_config::file::write_json_atomic(&path, intent)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", path.display())))
}

fn bad_destination(dest: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidParameter,
        format!("cannot move the VM's storage to {dest:?}: {why}"),
    )
}

/// The destination's checks, changing nothing: absolute; an empty folder or not
/// there yet; not inside the VM's folder or its checkpoint layers' folder;
/// writable (a probe file is made and removed in it or its nearest existing
/// ancestor).
fn check_destination(dest: &str, vm_dir: &Path, t: &Tree) -> Result<PathBuf, ApiError> {
    let path = PathBuf::from(dest);
    if !path.is_absolute() {
        return Err(bad_destination(dest, "use an absolute path"));
    }
    let mut existing = path.clone();
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p.to_path_buf(),
            None => return Err(bad_destination(dest, "no part of it exists")),
        }
    }
    if !existing.is_dir() {
        return Err(bad_destination(
            dest,
            format!(
                "{} is not a folder, so it is not writable",
                existing.display()
            ),
        ));
    }
    let resolved = canonical(&existing).join(path.strip_prefix(&existing).unwrap_or(Path::new("")));
    let inside = |p: &Path| resolved.starts_with(canonical(p));
    if inside(vm_dir) || t.layers_dir.as_deref().is_some_and(inside) {
        return Err(bad_destination(
            dest,
            "it is inside the VM's own folder or where its checkpoint disks are now; choose a folder outside them",
        ));
    }
    if existing == path {
        let mut listing = std::fs::read_dir(&path).map_err(|e| bad_destination(dest, e))?;
        if listing.next().is_some() {
            return Err(bad_destination(
                dest,
                "the folder is not empty; give an empty or new folder",
            ));
        }
    }
    let probe = existing.join(format!(".viridian-probe-{}", Uuid::new_v4()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) => {
            return Err(bad_destination(
                dest,
                format!("{} is not writable ({e})", existing.display()),
            ))
        }
    }
    Ok(path)
}

/// `POST /v1/vms/{vm}/move-storage`.
pub fn submit(svc: &Arc<Service>, key: &str, destination: &str) -> Result<JobSnapshot, ApiError> {
    let (id, name, dir, state) = {
        let store = svc.store();
        let entry = find(&store, key)?;
        if entry.settings.is_none() || entry.damaged.is_some() {
            return Err(damaged_unreadable(entry));
        }
        (
            entry.id,
            entry.name(),
            entry.dir.clone(),
            svc.state_of(entry).state,
        )
    };
    let running = matches!(state, VmState::Running | VmState::Paused);
    let movable =
        matches!(state, VmState::Off | VmState::Saved) || (running && svc.workers.is_some());
    if !movable {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "VM {name} is {state:?}; its storage moves while it is Off, Saved, Running or Paused"
            ),
        )
        .with_details(serde_json::json!({ "state": state })));
    }
    if svc.checkpoints.is_busy(id) {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!("VM {name} has a checkpoint operation, merge or delete running; wait for its job (`viridian job list`)"),
        ));
    }
    if intent_path(&dir).exists() {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!("a storage move of VM {name} is under way"),
        ));
    }
    let t = crate::checkpoints::ops::load(&dir)?;
    let dest = check_destination(destination, &dir, &t)?;
    svc.roots.folder(&dest)?;
    let spec = JobSpec {
        job_type: "MoveVmStorage".into(),
        description: format!(
            "Move the storage of VM {name} to {}{}",
            dest.display(),
            if running {
                " online (the VM runs while every file but the running disks copies, then pauses while those copy and the worker switches to the copies)"
            } else {
                ""
            }
        ),
        cancellable: true,
        affected: vec![AffectedElement::new("vm", id.to_string())],
    };
    let svc2 = svc.clone();
    let guard = svc.checkpoints.clone().claim(id);
    Ok(svc.jobs.submit(spec, move |ctx| async move {
        let _guard = guard;
        let vm_lock = svc2.checkpoints.vm_lock(id);
        let _held = vm_lock.lock().await;
        let state = svc2.runtime.get(id).state;
        let paused = state == VmState::Paused;
        match (svc2.workers.clone(), state) {
            (Some(w), VmState::Running | VmState::Paused) => {
                let why = match move_online(&svc2, &w, id, &dir, &dest, &ctx, paused).await? {
                    Online::Done => return Ok(()),
                    Online::Unsupported(why) => why,
                };
                ctx.set_description(format!(
                    "Move the storage of VM {name} to {} offline ({why}): the running VM is saved, its storage moved, and started again from its saved state",
                    dest.display()
                ));
                ctx.add_affected(AffectedElement::new("move-mode", format!("offline: {why}")));
                svc2.set_runtime(id, VmRuntime::with_state(VmState::Saving));
                w.stop(id, StopMode::Save, ctx.clone()).await?;
                let since = Instant::now();
                let (svc3, ctx3, dir3) = (svc2.clone(), ctx.clone(), dir.clone());
                let moved = blocking(move || run(&svc3, id, &dir3, &dest, &ctx3)).await;
                start_again(&svc2, &w, id, &dir, &ctx, paused, since, moved).await
            }
            (_, VmState::Off | VmState::Saved) => {
                let (svc3, ctx3, dir3) = (svc2.clone(), ctx.clone(), dir.clone());
                blocking(move || run(&svc3, id, &dir3, &dest, &ctx3)).await
            }
            (_, state) => Err(JobError::failed(
                "InvalidState",
                format!("the VM became {state:?}; move its storage when it is Off, Saved, Running or Paused"),
            )),
        }
    }))
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, JobError> + Send + 'static,
) -> Result<T, JobError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(r) => r,
        Err(e) => Err(JobError::failed(
            "Internal",
            format!("the move failed unexpectedly: {e}"),
        )),
    }
}

/// After an offline move of a running VM (`moved`, whatever its outcome): starts
/// it from its saved state on whichever files the settings name now (the copies,
/// or the sources after a roll back), paused again if it was; reports the
/// guest's downtime since `since`.
#[allow(clippy::too_many_arguments)]
async fn start_again(
    svc: &Arc<Service>,
    w: &Arc<dyn WorkerControl>,
    id: Uuid,
    dir: &Path,
    ctx: &JobContext,
    paused: bool,
    since: Instant,
    moved: Result<(), JobError>,
) -> Result<(), JobError> {
    let settings = svc.store().get(id).and_then(|e| e.settings.clone());
    if let Some(settings) = settings {
        svc.set_runtime(id, VmRuntime::with_state(VmState::Starting));
        let started = w.start(settings, dir.to_path_buf(), ctx.clone()).await;
        if started.is_ok() && paused {
            w.pause(id, true).await?;
        }
        ctx.add_affected(AffectedElement::new(
            "guest-downtime-ms",
            since.elapsed().as_millis().to_string(),
        ));
        moved.clone()?;
        started?;
    }
    moved
}

/// How an online move went.
enum Online {
    Done,
    /// The worker cannot switch its disks; nothing was changed (move offline).
    Unsupported(String),
}

/// What the online move's first part (while the guest runs) made ready.
struct Prepared {
    settings: VmSettings,
    tree: Tree,
    intent: Intent,
    /// The running leaves (the drives' current files), copied while the guest is paused.
    leaves: Vec<FileMove>,
    /// Each running leaf's slot and its copy: what the worker switches to.
    slots: Vec<(vm_config::Slot, PathBuf)>,
}

/// The slots whose disk (the running leaf the worker has open) moves, with where.
fn moving_slots(settings: &VmSettings, intent: &Intent) -> Vec<(vm_config::Slot, PathBuf)> {
    settings
        .drives
        .iter()
        .filter_map(|d| match &d.media {
            DriveMedia::HardDisk { path } => {
                let from = canonical(Path::new(path.as_str()));
                intent
                    .files
                    .iter()
                    .find(|m| canonical(&m.from) == from)
                    .map(|m| (d.slot, m.to.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The online move of a Running or Paused VM: every file but the running leaves
/// copies (and is re-pointed and checked) while the guest runs (checkpoint layers
/// and bases are frozen); then the guest is paused, the worker flushes, the
/// leaves copy and every chain is verified, the intent is committed, the worker
/// switches its disk servers to the copies, and the guest resumes. The pause
/// covers only the leaves' copy, reported as `guest-downtime-ms`. Then the
/// settings are rewritten and the sources removed, as offline.
///
/// The switch comes after the commit, so a crash before the commit leaves the
/// worker on the sources (the roll back removes only copies). A worker that
/// cannot flush (an older one, which does not know the request) is reported as
/// [`Online::Unsupported`] before anything changed; one that fails to switch
/// after the commit is saved, and the move finishes offline.
async fn move_online(
    svc: &Arc<Service>,
    w: &Arc<dyn WorkerControl>,
    id: Uuid,
    dir: &Path,
    dest: &Path,
    ctx: &JobContext,
    paused: bool,
) -> Result<Online, JobError> {
    if std::env::var_os(OFFLINE_VAR).is_some() {
        return Ok(Online::Unsupported(format!("{OFFLINE_VAR} is set")));
    }
    if let Err(e) = w.flush_disks(id).await {
        return Ok(Online::Unsupported(format!(
            "the VM's worker cannot switch its disks ({})",
            e
        )));
    }
    ctx.add_affected(AffectedElement::new("move-mode", "online"));
    let (svc3, ctx3, dir3, dest3) = (
        svc.clone(),
        ctx.clone(),
        dir.to_path_buf(),
        dest.to_path_buf(),
    );
    let mut p = blocking(move || prepare_online(&svc3, id, &dir3, &dest3, &ctx3)).await?;
    let undo = |intent: &Intent| roll_back(dir, intent);
    if !paused {
        p.intent.guest_paused_by_move = true;
        if let Err(e) = save_intent(dir, &p.intent) {
            undo(&p.intent);
            return Err(JobError::from(e));
        }
        if let Err(e) = w.pause(id, true).await {
            undo(&p.intent);
            return Err(e);
        }
    }
    let since = Instant::now();
    let resume = || async {
        if !paused {
            if let Err(e) = w.pause(id, false).await {
                tracing::error!(vm = %id, error = %e, "cannot resume the guest after its storage move");
            }
        }
    };
    if let Err(e) = w.flush_disks(id).await {
        undo(&p.intent);
        resume().await;
        return Err(e);
    }
    let (ctx3, dir3) = (ctx.clone(), dir.to_path_buf());
    let p = match blocking(move || finish_online(&dir3, p, &ctx3)).await {
        Ok(p) => p,
        Err(e) => {
            // Rolled back already (before the commit): the worker is on the sources.
            resume().await;
            return Err(e);
        }
    };
    // Committed: the worker switches to the copies, then the guest runs on.
    match w.switch_disks(id, p.slots.clone()).await {
        Ok(()) => {
            resume().await;
            ctx.add_affected(AffectedElement::new(
                "guest-downtime-ms",
                since.elapsed().as_millis().to_string(),
            ));
            let (svc3, ctx3, dir3) = (svc.clone(), ctx.clone(), dir.to_path_buf());
            blocking(move || finish_committed(&svc3, id, &dir3, &p.intent, &ctx3)).await?;
            Ok(Online::Done)
        }
        Err(e) => {
            // The copies are the VM's disks now, and the worker cannot take them:
            // finish offline (the paused guest is saved, nothing has changed since
            // the copy, so the copies hold what the sources hold).
            tracing::warn!(vm = %id, error = %e, "the worker could not switch to the moved disks; finishing the move offline");
            ctx.set_description(format!(
                "Move the storage of VM {} to {}: the worker could not switch to the copies ({e}), so the VM was saved and started again on them",
                p.settings.name,
                dest.display()
            ));
            ctx.add_affected(AffectedElement::new(
                "move-mode",
                format!("offline after the copy: the worker could not switch ({e})"),
            ));
            svc.set_runtime(id, VmRuntime::with_state(VmState::Saving));
            w.stop(id, StopMode::Save, ctx.clone()).await?;
            let (svc3, ctx3, dir3) = (svc.clone(), ctx.clone(), dir.to_path_buf());
            let intent = p.intent.clone();
            let moved = blocking(move || finish_committed(&svc3, id, &dir3, &intent, &ctx3)).await;
            start_again(svc, w, id, dir, ctx, paused, since, moved).await?;
            Ok(Online::Done)
        }
    }
}

/// The online move's part while the guest runs: intent, then every file but the
/// running leaves copied, re-pointed and checked. Rolls back on failure.
fn prepare_online(
    svc: &Arc<Service>,
    id: Uuid,
    vm_dir: &Path,
    dest: &Path,
    ctx: &JobContext,
) -> Result<Prepared, JobError> {
    let stall = Stall::from_env(STALL_VAR, "move");
    let (settings, t, intent) = begin(svc, id, vm_dir, dest, ctx)?;
    let slots = moving_slots(&settings, &intent);
    let leaf_set: Vec<PathBuf> = slots.iter().map(|(_, to)| to.clone()).collect();
    let (leaves, frozen): (Vec<FileMove>, Vec<FileMove>) = intent
        .files
        .iter()
        .cloned()
        .partition(|m| leaf_set.contains(&m.to));
    let frozen: Vec<&FileMove> = frozen.iter().collect();
    let mut progress = Progress::new(&intent, 0, 70);
    let done = copy_files(&frozen, ctx, &stall, &mut progress)
        .and_then(|()| relink(&intent, &frozen))
        .and_then(|()| check_copies(&frozen));
    if let Err(e) = done {
        roll_back(vm_dir, &intent);
        return Err(e);
    }
    Ok(Prepared {
        settings,
        tree: t,
        intent,
        leaves,
        slots,
    })
}

/// The online move's part while the guest is paused and its disks flushed: the
/// leaves copied, re-pointed and checked, every chain verified, the commit.
/// Rolls back on failure before the commit.
fn finish_online(vm_dir: &Path, p: Prepared, ctx: &JobContext) -> Result<Prepared, JobError> {
    let stall = Stall::from_env(STALL_VAR, "move");
    let leaves: Vec<&FileMove> = p.leaves.iter().collect();
    let mut progress = Progress::new(&p.intent, 70, 80);
    progress.done = progress.total * 7 / 10;
    let done = copy_files(&leaves, ctx, &stall, &mut progress)
        .and_then(|()| {
            stall.at("relink");
            relink(&p.intent, &leaves)
        })
        .and_then(|()| {
            stall.at("verify");
            check_copies(&leaves)
        })
        .and_then(|()| verify_chains(&p.settings, &p.tree, &p.intent))
        .and_then(|()| {
            if ctx.cancel_requested() {
                Err(JobError::Cancelled)
            } else {
                Ok(())
            }
        });
    if let Err(e) = done {
        roll_back(vm_dir, &p.intent);
        return Err(e);
    }
    stall.at("commit");
    let intent = Intent {
        phase: Phase::Committed,
        ..p.intent
    };
    if let Err(e) = save_intent(vm_dir, &intent) {
        roll_back(vm_dir, &intent);
        return Err(JobError::from(e));
    }
    stall.at("committed");
    Ok(Prepared { intent, ..p })
}

/// After the commit (and, online, the switch): settings rewritten, sources removed.
fn finish_committed(
    svc: &Arc<Service>,
    id: Uuid,
    vm_dir: &Path,
    intent: &Intent,
    ctx: &JobContext,
) -> Result<(), JobError> {
    let stall = Stall::from_env(STALL_VAR, "move");
    roll_forward(svc, id, vm_dir, intent, &stall).map_err(JobError::from)?;
    for m in &intent.files {
        ctx.add_affected(AffectedElement::new("disk", m.to.to_string_lossy()));
    }
    tracing::info!(vm = %id, files = intent.files.len(), destination = %intent.destination.display(), "VM storage moved");
    Ok(())
}

/// Where each file goes: checkpoint layers by their checkpoint's folder, the rest
/// into `Virtual Hard Disks`, names made unique.
fn plan(vm_dir: &Path, t: &Tree, files: &[PathBuf], dest: &Path) -> Vec<FileMove> {
    let snapshots = dest.join(SNAPSHOTS_FOLDER);
    let mut out: Vec<FileMove> = Vec::new();
    for f in files {
        let name = f.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        let node = f
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| Uuid::parse_str(&n.to_string_lossy()).ok())
            .filter(|id| t.node(*id).is_some());
        let folder = match (tree::owns_layer(vm_dir, t, f), node) {
            (true, Some(id)) => snapshots.join(id.to_string()),
            (true, None) => snapshots.clone(),
            (false, _) => dest.join(DISKS_FOLDER),
        };
        let mut to = folder.join(&name);
        let mut n = 2;
        while out.iter().any(|m| m.to == to) {
            let p = Path::new(&name);
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ext = p
                .extension()
                .map(|e| format!(".{}", e.to_string_lossy()))
                .unwrap_or_default();
            to = folder.join(format!("{stem} ({n}){ext}"));
            n += 1;
        }
        out.push(FileMove {
            from: f.clone(),
            to,
        });
    }
    out
}

fn run(
    svc: &Arc<Service>,
    id: Uuid,
    vm_dir: &Path,
    dest: &Path,
    ctx: &JobContext,
) -> Result<(), JobError> {
    let stall = Stall::from_env(STALL_VAR, "move");
    let (settings, t, intent) = begin(svc, id, vm_dir, dest, ctx)?;
    let copied = copy_and_verify(vm_dir, &settings, &t, &intent, ctx, &stall);
    let copied = copied.and_then(|()| {
        if ctx.cancel_requested() {
            Err(JobError::Cancelled)
        } else {
            Ok(())
        }
    });
    if let Err(e) = copied {
        roll_back(vm_dir, &intent);
        return Err(e);
    }
    stall.at("commit");
    let intent = Intent {
        phase: Phase::Committed,
        ..intent
    };
    save_intent(vm_dir, &intent).map_err(JobError::from)?;
    stall.at("committed");
    finish_committed(svc, id, vm_dir, &intent, ctx)
}

/// The move's plan, recorded: the settings and tree it starts from, the intent
/// (phase `copying`) written; files another VM uses too reported as kept.
fn begin(
    svc: &Arc<Service>,
    id: Uuid,
    vm_dir: &Path,
    dest: &Path,
    ctx: &JobContext,
) -> Result<(VmSettings, Tree, Intent), JobError> {
    let settings = svc
        .store()
        .get(id)
        .and_then(|e| e.settings.clone())
        .ok_or_else(|| JobError::failed("Damaged", "the VM's settings cannot be read"))?;
    let t = crate::checkpoints::ops::load(vm_dir).map_err(JobError::from)?;
    let others = used_by_others(svc, id);
    let (mine, shared): (Vec<PathBuf>, Vec<PathBuf>) = vm_files(Some(&settings), &t)
        .into_iter()
        .partition(|f| !others.contains_key(&canonical(f)));
    for f in &shared {
        ctx.add_affected(AffectedElement::new(
            "kept-disk",
            format!(
                "{}: stays, {} uses it too",
                f.display(),
                others
                    .get(&canonical(f))
                    .map(String::as_str)
                    .unwrap_or("another VM")
            ),
        ));
    }
    let created_destination = !dest.exists();
    let intent = Intent {
        schema_version: INTENT_VERSION,
        phase: Phase::Copying,
        destination: dest.to_path_buf(),
        created_destination,
        files: plan(vm_dir, &t, &mine, dest),
        layers_dir: dest.join(SNAPSHOTS_FOLDER),
        guest_paused_by_move: false,
    };
    save_intent(vm_dir, &intent).map_err(JobError::from)?;
    Ok((settings, t, intent))
}

fn copy_and_verify(
    vm_dir: &Path,
    settings: &VmSettings,
    t: &Tree,
    intent: &Intent,
    ctx: &JobContext,
    stall: &Stall,
) -> Result<(), JobError> {
    let all: Vec<&FileMove> = intent.files.iter().collect();
    let mut progress = Progress::new(intent, 0, 80);
    copy_files(&all, ctx, stall, &mut progress)?;
    stall.at("relink");
    relink(intent, &all)?;
    ctx.set_percent(85);
    stall.at("verify");
    check_copies(&all)?;
    verify_chains(settings, t, intent)?;
    let _ = vm_dir;
    ctx.set_percent(90);
    Ok(())
}

/// How far the copy is, for the job's percent (`from`..`to` of it).
struct Progress {
    done: u64,
    total: u64,
    from: u8,
    to: u8,
}

impl Progress {
    fn new(intent: &Intent, from: u8, to: u8) -> Self {
        let total = intent
            .files
            .iter()
            .map(|m| std::fs::metadata(&m.from).map(|x| x.len()).unwrap_or(0))
            .sum::<u64>()
            .max(1);
        Self {
            done: 0,
            total,
            from,
            to,
        }
    }

    /// Adds `n` bytes; returns the copy's own percent (0-100) and sets the job's.
    fn add(&mut self, n: u64, ctx: &JobContext) -> u8 {
        self.done += n;
        let pct = (self.done.min(self.total) * 100 / self.total) as u8;
        let span = u16::from(self.to - self.from);
        ctx.set_percent(self.from + (u16::from(pct) * span / 100) as u8);
        pct
    }
}

/// Copies `files` (`std::fs::copy`, then fsync), each checked before its parent
/// locator is rewritten: same size, same first and last MiB.
fn copy_files(
    files: &[&FileMove],
    ctx: &JobContext,
    stall: &Stall,
    progress: &mut Progress,
) -> Result<(), JobError> {
    let io = |what: String, e: std::io::Error| JobError::failed("Internal", format!("{what}: {e}"));
    for m in files {
        if ctx.cancel_requested() {
            return Err(JobError::Cancelled);
        }
        let folder = m.to.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(folder)
            .map_err(|e| io(format!("cannot create {}", folder.display()), e))?;
        let n = std::fs::copy(&m.from, &m.to).map_err(|e| {
            io(
                format!("cannot copy {} to {}", m.from.display(), m.to.display()),
                e,
            )
        })?;
        std::fs::File::open(&m.to)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(format!("cannot flush {}", m.to.display()), e))?;
        let (a, b) = (len(&m.from), len(&m.to));
        let same = a == b && matches!((samples(&m.from), samples(&m.to)), (Ok(x), Ok(y)) if x == y);
        if !same {
            return Err(JobError::failed(
                "Internal",
                format!(
                    "the copy {} of {} does not read back the same (size {b:?} against {a:?}, or the first or last MiB differ)",
                    m.to.display(),
                    m.from.display()
                ),
            ));
        }
        let pct = progress.add(n, ctx);
        stall.at_copy_unless(pct, || ctx.cancel_requested());
    }
    for m in files {
        if let Some(folder) = m.to.parent() {
            let _ = std::fs::File::open(folder).and_then(|f| f.sync_all());
        }
    }
    Ok(())
}

/// The files of `leaf`'s chain, leaf first. A leaf a running VM's worker holds
/// (locked exclusively) is read without opening it for I/O.
fn chain_of(leaf: &Path) -> Option<Vec<PathBuf>> {
    whole_chain(leaf).or_else(|| {
        let chain = vhd::ops::info::info(leaf).ok()?.chain;
        Some(
            std::iter::once(leaf.to_path_buf())
                .chain(chain.iter().skip(1).map(|p| canonical(p)))
                .collect(),
        )
    })
}

/// Where each source file goes.
fn destination_of(intent: &Intent) -> impl Fn(&Path) -> PathBuf + '_ {
    let map: HashMap<PathBuf, PathBuf> = intent
        .files
        .iter()
        .map(|m| (canonical(&m.from), m.to.clone()))
        .collect();
    move |p: &Path| {
        map.get(&canonical(p))
            .cloned()
            .unwrap_or_else(|| p.to_path_buf())
    }
}

/// Points each copy's parent locator at the copied parent, or at the source
/// parent that stays (shared with another VM).
fn relink(intent: &Intent, files: &[&FileMove]) -> Result<(), JobError> {
    let to_of = destination_of(intent);
    for m in files {
        let Some(chain) = chain_of(&m.from) else {
            return Err(JobError::failed(
                "Internal",
                format!("the chain of {} does not open", m.from.display()),
            ));
        };
        if let Some(parent) = chain.get(1) {
            let new_parent = to_of(parent);
            vhd::ops::set_parent::set_parent(&m.to, &new_parent, false).map_err(|e| {
                JobError::failed(
                    "Internal",
                    format!(
                        "cannot point the copy {} at {}: {}",
                        m.to.display(),
                        new_parent.display(),
                        error_chain(&e)
                    ),
                )
            })?;
        }
    }
    Ok(())
}

fn not_verified(what: String) -> JobError {
    JobError::failed("Internal", format!("the copy does not verify: {what}"))
}

/// `vhd check` of each copy: clean. The leaves were settled by the worker
/// with the guest paused (their logs applied and emptied), so their copies
/// need nothing; a copy that still holds a log (a worker from before `settle`,
/// which only flushes) is not damaged: the copy is ours and unused, so its log
/// is replayed ([`vhd::ops::check::verify_copy`]). Only damage fails the move.
fn check_copies(files: &[&FileMove]) -> Result<(), JobError> {
    use vhd::ops::check::{verify_copy, Verified};
    for m in files {
        let verified = verify_copy(&m.to)
            .map_err(|e| not_verified(format!("{}: {}", m.to.display(), error_chain(&e))))?;
        if let Verified::Damaged(what) = verified {
            return Err(not_verified(format!(
                "{} is damaged: {what}",
                m.to.display()
            )));
        }
    }
    Ok(())
}

/// Every chain (drives, checkpoints, current disks) opens from the copies through
/// the expected files.
fn verify_chains(settings: &VmSettings, t: &Tree, intent: &Intent) -> Result<(), JobError> {
    let to_of = destination_of(intent);
    let mut leaves = super::disk_owners::drive_paths(settings);
    leaves.extend(
        t.nodes
            .iter()
            .flat_map(|n| &n.disks)
            .map(|d| d.path.clone()),
    );
    leaves.extend(t.current_disks.iter().map(|d| d.path.clone()));
    for leaf in leaves {
        let Some(src) = chain_of(&leaf) else {
            continue;
        };
        let want: Vec<PathBuf> = src.iter().map(|p| canonical(&to_of(p))).collect();
        let got =
            whole_chain(&to_of(&leaf)).map(|c| c.iter().map(|p| canonical(p)).collect::<Vec<_>>());
        if got.as_ref() != Some(&want) {
            return Err(not_verified(format!(
                "the copied chain of {} opens as {got:?}, not {want:?}",
                leaf.display()
            )));
        }
    }
    Ok(())
}

fn len(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// The first and last MiB of a file.
fn samples(p: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(p)?;
    let size = f.metadata()?.len();
    let mut out = Vec::new();
    (&mut f).take(SAMPLE).read_to_end(&mut out)?;
    f.seek(SeekFrom::Start(size.saturating_sub(SAMPLE)))?;
    f.take(SAMPLE).read_to_end(&mut out)?;
    Ok(out)
}

fn remove_quietly(p: &Path) {
    if let Err(e) = std::fs::remove_file(p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %p.display(), error = %e, "cannot remove a file of a storage move");
        }
    }
}

/// Before the commit: the copies and the folders the move made go, the source stays.
fn roll_back(vm_dir: &Path, intent: &Intent) {
    for m in &intent.files {
        remove_quietly(&m.to);
    }
    let mut folders: Vec<PathBuf> = intent
        .files
        .iter()
        .filter_map(|m| m.to.parent().map(Path::to_path_buf))
        .collect();
    folders.push(intent.layers_dir.clone());
    folders.push(intent.destination.join(DISKS_FOLDER));
    folders.sort_by_key(|f| std::cmp::Reverse(f.components().count()));
    for f in folders {
        let _ = std::fs::remove_dir(f);
    }
    if intent.created_destination {
        let _ = std::fs::remove_dir(&intent.destination);
    }
    remove_quietly(&intent_path(vm_dir));
    tracing::info!(vm_dir = %vm_dir.display(), "storage move rolled back; the source stays");
}

/// After the commit: the settings name the copies, then the sources go.
fn roll_forward(
    svc: &Service,
    id: Uuid,
    vm_dir: &Path,
    intent: &Intent,
    stall: &Stall,
) -> Result<(), ApiError> {
    let map: HashMap<PathBuf, PathBuf> = intent
        .files
        .iter()
        .flat_map(|m| {
            [
                (m.from.clone(), m.to.clone()),
                (canonical(&m.from), m.to.clone()),
            ]
        })
        .collect();
    let moved = |p: &Path| map.get(p).or_else(|| map.get(&canonical(p))).cloned();
    // vm.json
    let settings = svc.store().get(id).and_then(|e| e.settings.clone());
    if let Some(mut s) = settings {
        let mut changed = false;
        for d in &mut s.drives {
            if let DriveMedia::HardDisk { path } = &mut d.media {
                if let Some(to) = moved(Path::new(path.as_str())) {
                    *path = to.to_string_lossy().into_owned();
                    changed = true;
                }
            }
        }
        if changed {
            svc.store()
                .save(s)
                .map_err(|e| ApiError::internal(error_chain(&e)))?;
        }
    }
    stall.at("settings");
    // checkpoints.json
    let mut t = crate::checkpoints::ops::load(vm_dir)?;
    let old_layers = t.layers_dir.clone();
    let before = t.clone();
    for d in t
        .nodes
        .iter_mut()
        .flat_map(|n| n.disks.iter_mut())
        .chain(t.current_disks.iter_mut())
    {
        if let Some(to) = moved(&d.path) {
            d.path = to;
        }
    }
    // Each checkpoint's settings (its drives, as they were when it was taken)
    // name the moved files too: an export, or a restore of the settings, reads
    // the drives from there. Rewritten before the sources go, like vm.json; a
    // roll forward after a crash rewrites what is left.
    for n in t.nodes.iter().filter(|n| !n.deleted) {
        let file = tree::node_dir(vm_dir, n.id).join(tree::SETTINGS_FILE);
        let Ok(mut ns) = vm_config::file::load(&file) else {
            continue;
        };
        let mut changed = false;
        for d in &mut ns.drives {
            if let DriveMedia::HardDisk { path } = &mut d.media {
                if let Some(to) = moved(Path::new(path.as_str())) {
                    *path = to.to_string_lossy().into_owned();
                    changed = true;
                }
            }
        }
        if changed {
            vm_config::file::save(&file, &ns).map_err(|e| ApiError::internal(error_chain(&e)))?;
        }
    }
    // New checkpoints' layers go to the destination too.
    t.layers_dir = Some(intent.layers_dir.clone());
    if t != before {
        tree::save(vm_dir, &t).map_err(|e| ApiError::internal(error_chain(&e)))?;
    }
    // The sources.
    stall.at("remove-sources");
    for m in &intent.files {
        remove_quietly(&m.from);
    }
    if let Some(old) = old_layers.filter(|o| *o != intent.layers_dir) {
        for n in &t.nodes {
            let _ = std::fs::remove_dir(old.join(n.id.to_string()));
        }
        let _ = std::fs::remove_dir(&old);
    }
    remove_quietly(&intent_path(vm_dir));
    let _ = std::fs::File::open(vm_dir).and_then(|f| f.sync_all());
    svc.store().recheck(id);
    Ok(())
}

/// At daemon start: a move stopped before its commit is rolled back, one stopped
/// after it is finished. For a VM whose worker still runs (an online move), the
/// worker is switched to the copies before the sources go (it may still serve the
/// sources when the daemon died between the commit and the switch; a slot already
/// on its copy is left alone); if it cannot switch, the move stays unfinished (the
/// sources are kept) and is tried again at the next start. A guest the move paused
/// is resumed.
pub async fn resume_at_start(svc: &Arc<Service>) {
    let dirs: Vec<(Uuid, PathBuf)> = svc
        .store()
        .entries()
        .map(|e| (e.id, e.dir.clone()))
        .collect();
    for (id, dir) in dirs {
        let intent = match load_intent(&dir) {
            Ok(Some(i)) => i,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(vm = %id, error = %e.message, "cannot finish an interrupted storage move");
                continue;
            }
        };
        let state = svc.runtime.get(id).state;
        let live = svc
            .workers
            .clone()
            .filter(|_| matches!(state, VmState::Running | VmState::Paused));
        match intent.phase {
            Phase::Copying => {
                tracing::warn!(vm = %id, "a storage move was interrupted before its commit; rolling it back");
                roll_back(&dir, &intent);
            }
            Phase::Committed => {
                tracing::warn!(vm = %id, "a storage move was interrupted after its commit; finishing it");
                if let Some(w) = &live {
                    let settings = svc.store().get(id).and_then(|e| e.settings.clone());
                    let slots = settings
                        .map(|s| moving_slots(&s, &intent))
                        .unwrap_or_default();
                    if let Err(e) = w.switch_disks(id, slots).await {
                        tracing::error!(vm = %id, error = %e, "the running VM's worker cannot switch to the moved disks; the move stays unfinished and the sources are kept until the next start");
                        continue;
                    }
                }
                let none = Stall::from_env("", "move");
                if let Err(e) = roll_forward(svc, id, &dir, &intent, &none) {
                    tracing::error!(vm = %id, error = %e.message, "cannot finish the storage move");
                }
            }
        }
        if let (Some(w), true, VmState::Paused) = (&live, intent.guest_paused_by_move, state) {
            if let Err(e) = w.pause(id, false).await {
                tracing::error!(vm = %id, error = %e, "cannot resume the guest a storage move paused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_must_be_absolute_empty_and_outside_the_vm_folder() {
        let root = tempfile::tempdir().unwrap();
        let vm_dir = root.path().join("vm");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let t = Tree::default();
        assert!(check_destination("relative/x", &vm_dir, &t).is_err());
        assert!(check_destination(vm_dir.join("sub").to_str().unwrap(), &vm_dir, &t).is_err());
        let full = root.path().join("full");
        std::fs::create_dir_all(&full).unwrap();
        std::fs::write(full.join("x"), b"x").unwrap();
        assert!(check_destination(full.to_str().unwrap(), &vm_dir, &t).is_err());
        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_destination(file.join("d").to_str().unwrap(), &vm_dir, &t).is_err());
        let ok = root.path().join("new").join("place");
        assert_eq!(
            check_destination(ok.to_str().unwrap(), &vm_dir, &t).unwrap(),
            ok
        );
        assert!(!ok.exists(), "the checks change nothing");
    }

    #[test]
    fn names_that_would_collide_are_made_unique() {
        let t = Tree::default();
        let files = [PathBuf::from("/a/disk.vhdx"), PathBuf::from("/b/disk.vhdx")];
        let p = plan(Path::new("/vm"), &t, &files, Path::new("/dest"));
        assert_eq!(p[0].to, Path::new("/dest/Virtual Hard Disks/disk.vhdx"));
        assert_eq!(p[1].to, Path::new("/dest/Virtual Hard Disks/disk (2).vhdx"));
    }
}
