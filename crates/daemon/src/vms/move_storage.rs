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
//! so (a saved VM's memory state names no disk file). A Running or Paused VM is
//! saved first, then moved, then started again from its saved state (and paused
//! again if it was): the guest is stopped for the whole copy. An online move (the
//! worker switching its disk servers to the copies while the guest runs) is not
//! built yet.

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
use super::runtime::StopMode;
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
    let mut bytes =
        serde_json::to_vec_pretty(intent).map_err(|e| ApiError::internal(e.to_string()))?;
    bytes.push(b'\n');
    vm_config::file::write_atomic(&path, &bytes)
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
    let spec = JobSpec {
        job_type: "MoveVmStorage".into(),
        description: format!(
            "Move the storage of VM {name} to {}{}",
            dest.display(),
            if running {
                " (the running VM is saved, its storage moved, and started again from its saved state: the guest is stopped while the files copy)"
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
        let workers = svc2.workers.clone();
        let stopped = match (&workers, state) {
            (Some(w), VmState::Running | VmState::Paused) => {
                // Offline move of a running VM: save, move, start from the saved state.
                svc2.set_runtime(id, VmRuntime::with_state(VmState::Saving));
                w.stop(id, StopMode::Save, ctx.clone()).await?;
                Some((w.clone(), state == VmState::Paused, Instant::now()))
            }
            (_, VmState::Off | VmState::Saved) => None,
            (_, state) => {
                return Err(JobError::failed(
                    "InvalidState",
                    format!("the VM became {state:?}; move its storage when it is Off, Saved, Running or Paused"),
                ))
            }
        };
        let (svc3, ctx3, dir3) = (svc2.clone(), ctx.clone(), dir.clone());
        let moved =
            match tokio::task::spawn_blocking(move || run(&svc3, id, &dir3, &dest, &ctx3)).await {
                Ok(r) => r,
                Err(e) => Err(JobError::failed(
                    "Internal",
                    format!("the move failed unexpectedly: {e}"),
                )),
            };
        if let Some((w, paused, since)) = stopped {
            // Back on whichever files the settings name now (the copies, or the
            // source after a roll back).
            let settings = svc2.store().get(id).and_then(|e| e.settings.clone());
            if let Some(settings) = settings {
                svc2.set_runtime(id, VmRuntime::with_state(VmState::Starting));
                let started = w.start(settings, dir.clone(), ctx.clone()).await;
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
        }
        moved
    }))
}

fn job_err(e: ApiError) -> JobError {
    let code = serde_json::to_value(e.code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "Failed".into());
    JobError::failed(code, e.message)
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
    let settings = svc
        .store()
        .get(id)
        .and_then(|e| e.settings.clone())
        .ok_or_else(|| JobError::failed("Damaged", "the VM's settings cannot be read"))?;
    let t = crate::checkpoints::ops::load(vm_dir).map_err(job_err)?;
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
    };
    save_intent(vm_dir, &intent).map_err(job_err)?;
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
    save_intent(vm_dir, &intent).map_err(job_err)?;
    stall.at("committed");
    roll_forward(svc, id, vm_dir, &intent, &stall).map_err(job_err)?;
    for m in &intent.files {
        ctx.add_affected(AffectedElement::new("disk", m.to.to_string_lossy()));
    }
    tracing::info!(vm = %id, files = intent.files.len(), destination = %dest.display(), "VM storage moved");
    Ok(())
}

fn copy_and_verify(
    vm_dir: &Path,
    settings: &VmSettings,
    t: &Tree,
    intent: &Intent,
    ctx: &JobContext,
    stall: &Stall,
) -> Result<(), JobError> {
    let io = |what: String, e: std::io::Error| JobError::failed("Internal", format!("{what}: {e}"));
    let total: u64 = intent
        .files
        .iter()
        .map(|m| std::fs::metadata(&m.from).map(|x| x.len()).unwrap_or(0))
        .sum::<u64>()
        .max(1);
    let mut done = 0u64;
    for m in &intent.files {
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
        // The bytes, before the copy's parent locator is rewritten: same size,
        // same first and last MiB.
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
        done += n;
        let pct = (done.min(total) * 100 / total) as u8;
        ctx.set_percent((u16::from(pct) * 8 / 10) as u8);
        stall.at_copy_unless(pct, || ctx.cancel_requested());
    }
    for m in &intent.files {
        if let Some(folder) = m.to.parent() {
            let _ = std::fs::File::open(folder).and_then(|f| f.sync_all());
        }
    }
    // Parent locators of the copies: at the copied parent, or the source parent
    // that stays (shared with another VM).
    stall.at("relink");
    let map: HashMap<PathBuf, PathBuf> = intent
        .files
        .iter()
        .map(|m| (canonical(&m.from), m.to.clone()))
        .collect();
    let to_of = |p: &Path| {
        map.get(&canonical(p))
            .cloned()
            .unwrap_or_else(|| p.to_path_buf())
    };
    for m in &intent.files {
        let Some(chain) = whole_chain(&m.from) else {
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
    ctx.set_percent(85);
    // Verify.
    stall.at("verify");
    let fail =
        |what: String| JobError::failed("Internal", format!("the copy does not verify: {what}"));
    for m in &intent.files {
        let report = vhd::ops::check::check(&m.to, false)
            .map_err(|e| fail(format!("{}: {}", m.to.display(), error_chain(&e))))?;
        if !report.clean() {
            return Err(fail(format!(
                "{} has problems: {:?}",
                m.to.display(),
                report.problems
            )));
        }
    }
    let mut leaves = super::disk_owners::drive_paths(settings);
    leaves.extend(
        t.nodes
            .iter()
            .flat_map(|n| &n.disks)
            .map(|d| d.path.clone()),
    );
    leaves.extend(t.current_disks.iter().map(|d| d.path.clone()));
    for leaf in leaves {
        let Some(src) = whole_chain(&leaf) else {
            continue;
        };
        let want: Vec<PathBuf> = src.iter().map(|p| canonical(&to_of(p))).collect();
        let got =
            whole_chain(&to_of(&leaf)).map(|c| c.iter().map(|p| canonical(p)).collect::<Vec<_>>());
        if got.as_ref() != Some(&want) {
            return Err(fail(format!(
                "the copied chain of {} opens as {got:?}, not {want:?}",
                leaf.display()
            )));
        }
    }
    let _ = vm_dir;
    ctx.set_percent(90);
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
/// after it is finished.
pub fn resume_at_start(svc: &Arc<Service>) {
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
        match intent.phase {
            Phase::Copying => {
                tracing::warn!(vm = %id, "a storage move was interrupted before its commit; rolling it back");
                roll_back(&dir, &intent);
            }
            Phase::Committed => {
                tracing::warn!(vm = %id, "a storage move was interrupted after its commit; finishing it");
                let none = Stall::from_env("", "move");
                if let Err(e) = roll_forward(svc, id, &dir, &intent, &none) {
                    tracing::error!(vm = %id, error = %e.message, "cannot finish the storage move");
                }
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
