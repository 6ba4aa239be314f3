//! `DELETE /v1/vms/{vm}[?force=true][&delete_disks=true]`: deleting a VM as a job
//! that a crash cannot leave half done (Hyper-V's Remove-VM, with the disks too on
//! request).
//!
//! The job first writes `delete-intent.json` into the VM's folder. From then on
//! the delete only rolls forward: a failed job or a daemon killed half-way is
//! finished by the next start ([`resume_at_start`]), and meanwhile the VM is listed
//! as Damaged (it cannot start). The steps, each safe to run again:
//!
//! 1. intent (`force`, `delete_disks`), then turn the VM off if `force` asked;
//! 2. merge each drive's checkpoint layers (its chain's files under `Snapshots/`
//!    or the tree's `layers_dir`) into the first disk below them, the one the user
//!    gave the VM, with `merge_keeping_layers` (oldest layer first; running it again
//!    copies the same data again), so the kept disks hold the current state;
//!    other branches' layers and pending checkpoint merges become moot;
//! 3. `vm.json` names those disks; the intent records what to remove (`removal`);
//! 4. remove saved state, runtime files, checkpoint layers and `checkpoints.json`,
//!    then the disks (with `delete_disks`, only those no other VM's chain uses),
//!    then `vm.json`, then the intent, then the folder.
//!
//! A layer file goes only in step 4, after every merge has flushed its target.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::events::EventBody;
use api::vms::{VmRuntime, VmState};
use api::ErrorCode;
use jobs::{AffectedElement, JobContext, JobError, JobSnapshot, JobSpec};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_config::{DriveMedia, Slot, VmSettings};

use super::disk_owners::{canonical, used_by_others, vm_files, whole_chain};
use super::runtime::StopMode;
use super::store::{error_chain, DISKS_FOLDER, SETTINGS_FILE};
use super::test_seam::Stall;
use crate::checkpoints::tree::{self, Tree, SNAPSHOTS_FOLDER};
use crate::error::{blocking, ApiError};
use crate::service::{find, Service};

pub const INTENT_FILE: &str = "delete-intent.json";
/// 2: `removal.disk_ids` (version 1 intents read with none).
const INTENT_VERSION: u32 = 2;
/// `VIRIDIAN_TEST_STALL_DELETE_AT=<step>`: `intent`, `merge`, `copy-<percent>`,
/// `repoint`, `remove`, `remove-settings` (see [`Stall`]).
pub const STALL_VAR: &str = "VIRIDIAN_TEST_STALL_DELETE_AT";

/// `delete-intent.json`: the durable decision to delete the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    pub schema_version: u32,
    pub force: bool,
    pub delete_disks: bool,
    /// Written once the current state is merged into the kept disks and `vm.json`
    /// names them: what is left to remove.
    #[serde(default)]
    pub removal: Option<Removal>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Removal {
    /// The disks to delete (only with `delete_disks`).
    pub disks: Vec<PathBuf>,
    /// Each disk's unique ID when the removal was planned: a file is removed only
    /// while the engine still reads it as that disk.
    #[serde(default)]
    pub disk_ids: std::collections::BTreeMap<PathBuf, String>,
    /// Folders of checkpoint layers outside the VM's folder (after a storage move).
    pub layer_dirs: Vec<PathBuf>,
    /// The VM's disks that stay, and why.
    pub kept: Vec<Kept>,
    /// Drives whose layers could not be merged (missing or broken chains).
    #[serde(default)]
    pub unmerged: Vec<Kept>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kept {
    pub path: PathBuf,
    pub reason: String,
}

pub fn intent_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(INTENT_FILE)
}

pub fn load_intent(vm_dir: &Path) -> Result<Option<Intent>, ApiError> {
    let path = intent_path(vm_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ApiError::internal(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        ApiError::internal(format!(
            "the delete intent {} is not valid ({e}); remove the VM's folder by hand",
            path.display()
        ))
    })
}

fn save_intent(vm_dir: &Path, intent: &Intent) -> Result<(), ApiError> {
    let path = intent_path(vm_dir);
    vm_config::file::write_json_atomic(&path, intent)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", path.display())))
}

/// A query flag: absent is false; `true`/`1`/empty is true; `false`/`0` is false.
pub(crate) fn flag(query: Option<&str>, name: &str) -> Result<bool, ApiError> {
    let Some(q) = query else {
        return Ok(false);
    };
    for kv in q.split('&') {
        // A bare `?force` is the flag set; `force=` with no value is no boolean.
        let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
        if k == name {
            return match v {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ApiError::invalid(format!(
                    "the query parameter {name}={v} is not a boolean; use true or false"
                ))),
            };
        }
    }
    Ok(false)
}

/// `DELETE /v1/vms/{vm}`: checks at once (nothing changes when refused), then
/// answers 202 with the job.
pub fn submit_from_query(
    svc: &Arc<Service>,
    key: &str,
    query: Option<&str>,
) -> Result<JobSnapshot, ApiError> {
    let force = flag(query, "force")?;
    let delete_disks = flag(query, "delete_disks")?;
    submit(svc, key, force, delete_disks)
}

pub fn submit(
    svc: &Arc<Service>,
    key: &str,
    force: bool,
    delete_disks: bool,
) -> Result<JobSnapshot, ApiError> {
    // The state is checked and the VM claimed (it may not start) under the store's
    // lock, as a start checks and claims: the two cannot both go ahead.
    let (id, name, dir, settings, guard) = {
        let store = svc.store();
        let entry = find(&store, key)?;
        let name = entry.name();
        check_state(&name, svc.state_of(entry).state, force)?;
        let guard = svc.checkpoints.clone().claim(entry.id);
        (
            entry.id,
            name,
            entry.dir.clone(),
            entry.settings.clone(),
            guard,
        )
    };
    if load_intent(&dir)?.is_none() {
        // Refuse now what the job would refuse before writing its intent.
        let t = tree::load(&dir).unwrap_or_default();
        plan_merges(&dir, settings.as_ref(), &t, &used_by_others(svc, id))?;
    }
    let description = format!(
        "Delete VM {name}{}",
        if delete_disks {
            " and its disks"
        } else {
            " (its disks stay)"
        }
    );
    Ok(submit_job(
        svc,
        id,
        dir,
        description,
        Some((force, delete_disks)),
        Some(guard),
    ))
}

fn check_state(name: &str, state: VmState, force: bool) -> Result<(), ApiError> {
    use VmState as S;
    let refuse = |why: String| {
        Err(ApiError::new(ErrorCode::InvalidState, why)
            .with_details(serde_json::json!({ "state": state })))
    };
    match state {
        S::Off | S::Damaged | S::Critical => Ok(()),
        S::Running | S::Paused | S::Saved if force => Ok(()),
        S::Running | S::Paused => refuse(format!(
            "VM {name} is {state:?}; turn it off first, or delete with --force (force=true) to turn it off and delete it"
        )),
        S::Saved => refuse(format!(
            "VM {name} is Saved; deleting it discards its saved state (as Hyper-V does): delete with --force (force=true), or start it and shut it down first"
        )),
        S::Starting | S::Stopping | S::Saving => refuse(format!(
            "VM {name} is {state:?}; wait for its job to end (`viridian job list`) and delete it then"
        )),
    }
}

fn submit_job(
    svc: &Arc<Service>,
    id: Uuid,
    dir: PathBuf,
    description: String,
    request: Option<(bool, bool)>,
    claimed: Option<crate::checkpoints::BusyGuard>,
) -> JobSnapshot {
    let spec = JobSpec {
        job_type: "DeleteVm".into(),
        description,
        cancellable: false,
        affected: vec![AffectedElement::new("vm", id.to_string())],
    };
    let svc2 = svc.clone();
    // Claimed as checkpoint work: the VM cannot start while the delete runs.
    let guard = claimed.unwrap_or_else(|| svc.checkpoints.clone().claim(id));
    svc.jobs.submit(spec, move |ctx| async move {
        let _guard = guard;
        let vm_lock = svc2.checkpoints.vm_lock(id);
        let _held = vm_lock.lock().await;
        run(&svc2, id, dir, request, ctx).await
    })
}

/// At daemon start (after workers re-attached): every VM folder holding a delete
/// intent gets a job that finishes the delete.
pub fn resume_at_start(svc: &Arc<Service>) {
    let root = svc.config.data_dir.join("vms");
    let Ok(listing) = std::fs::read_dir(&root) else {
        return;
    };
    for item in listing.flatten() {
        let Ok(id) = Uuid::parse_str(&item.file_name().to_string_lossy()) else {
            continue;
        };
        let dir = item.path();
        match load_intent(&dir) {
            Ok(Some(_)) => {
                let name = svc
                    .store()
                    .get(id)
                    .map(|e| e.name())
                    .unwrap_or_else(|| id.to_string());
                tracing::warn!(vm = %id, "a delete was interrupted; finishing it");
                submit_job(
                    svc,
                    id,
                    dir,
                    format!("Finish deleting VM {name} (interrupted by a restart)"),
                    None,
                    None,
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(vm = %id, error = %e.message, "cannot finish an interrupted delete")
            }
        }
    }
}

fn settings_of(svc: &Service, id: Uuid) -> Option<VmSettings> {
    svc.store().get(id).and_then(|e| e.settings.clone())
}

async fn run(
    svc: &Arc<Service>,
    id: Uuid,
    dir: PathBuf,
    request: Option<(bool, bool)>,
    ctx: JobContext,
) -> Result<(), JobError> {
    // 1. The intent.
    let intent = {
        let (svc, dir) = (svc.clone(), dir.clone());
        blocking("the delete", move || {
            let stall = Stall::from_env(STALL_VAR, "delete");
            let intent = match (load_intent(&dir)?, request) {
                (Some(mut i), Some((force, delete_disks))) => {
                    // A delete asked again after one failed: it may ask for more.
                    if i.removal.is_none()
                        && ((force && !i.force) || (delete_disks && !i.delete_disks))
                    {
                        i.force |= force;
                        i.delete_disks |= delete_disks;
                        save_intent(&dir, &i)?;
                    }
                    i
                }
                (Some(i), None) => i,
                (None, Some(_)) if svc.store().get(id).is_none() => {
                    // Another delete finished while this one waited: nothing left.
                    return Ok(None);
                }
                (None, Some((force, delete_disks))) => {
                    let t = tree::load(&dir).unwrap_or_default();
                    plan_merges(
                        &dir,
                        settings_of(&svc, id).as_ref(),
                        &t,
                        &used_by_others(&svc, id),
                    )?;
                    let i = Intent {
                        schema_version: INTENT_VERSION,
                        force,
                        delete_disks,
                        removal: None,
                    };
                    save_intent(&dir, &i)?;
                    svc.store().recheck(id);
                    i
                }
                (None, None) => return Err(ApiError::internal("the delete intent vanished")),
            };
            stall.at("intent");
            Ok(Some(intent))
        })
        .await?
    };
    let Some(intent) = intent else {
        return Ok(());
    };
    // 2. Turn the VM off when asked.
    let state = svc.runtime.get(id).state;
    if matches!(
        state,
        VmState::Running
            | VmState::Paused
            | VmState::Starting
            | VmState::Stopping
            | VmState::Saving
    ) {
        if !intent.force {
            return Err(JobError::failed(
                "InvalidState",
                format!("the VM is {state:?}; delete with --force to turn it off"),
            ));
        }
        let Some(workers) = svc.workers.clone() else {
            return Err(JobError::failed(
                "InvalidState",
                "this viridiand runs no VMs",
            ));
        };
        svc.set_runtime(id, VmRuntime::with_state(VmState::Stopping));
        workers.stop(id, StopMode::TurnOff, ctx.clone()).await?;
    }
    ctx.set_percent(5);
    // 3. Merge the checkpoint layers into the kept disks; vm.json names them.
    let intent = match intent.removal {
        Some(_) => intent,
        None => {
            let (svc, dir, ctx) = (svc.clone(), dir.clone(), ctx.clone());
            blocking("the delete", move || {
                merge_phase(&svc, id, &dir, intent, &ctx)
            })
            .await?
        }
    };
    ctx.set_percent(80);
    // 4. Remove the files.
    let removal = intent.removal.clone().unwrap_or_default();
    {
        let (dir, removal) = (dir.clone(), removal.clone());
        blocking("the delete", move || remove_phase(&dir, &removal)).await?;
    }
    // 5. Forget it.
    {
        let mut store = svc.store();
        store
            .remove(id)
            .map_err(|e| JobError::failed("Internal", error_chain(&e)))?;
    }
    svc.runtime.forget(id);
    svc.events.publish(EventBody::VmDeleted { id });
    for d in &removal.disks {
        ctx.add_affected(AffectedElement::new("deleted-disk", d.to_string_lossy()));
    }
    for (kind, list) in [
        ("kept-disk", &removal.kept),
        ("unmerged-disk", &removal.unmerged),
    ] {
        for k in list {
            ctx.add_affected(AffectedElement::new(
                kind,
                format!("{}: {}", k.path.display(), k.reason),
            ));
        }
    }
    tracing::info!(vm = %id, deleted = removal.disks.len(), kept = removal.kept.len(), "VM deleted");
    Ok(())
}

/// One drive's merge: `layers` (leaf first, all checkpoint layers) into `base`.
#[derive(Debug)]
struct Merge {
    slot: Slot,
    leaf: PathBuf,
    base: PathBuf,
    layers: Vec<PathBuf>,
}

/// The merges the current drives need, and the drives that cannot be merged (a
/// missing file or a broken chain: nothing to keep there). Refuses (InUse) when a
/// merge would change a disk another VM's chain builds on.
fn plan_merges(
    vm_dir: &Path,
    settings: Option<&VmSettings>,
    t: &Tree,
    others: &std::collections::HashMap<PathBuf, String>,
) -> Result<(Vec<Merge>, Vec<Kept>), ApiError> {
    let mut merges = Vec::new();
    let mut unmerged = Vec::new();
    let Some(settings) = settings else {
        return Ok((merges, unmerged));
    };
    for d in &settings.drives {
        let DriveMedia::HardDisk { path } = &d.media else {
            continue;
        };
        let leaf = PathBuf::from(path);
        let Some(chain) = whole_chain(&leaf) else {
            if tree::owns_layer(vm_dir, t, &leaf) {
                unmerged.push(Kept {
                    path: leaf.clone(),
                    reason: "not merged, its chain is missing a file or does not open; removed with the VM's checkpoint files".into(),
                });
            }
            continue;
        };
        let n = chain
            .iter()
            .take_while(|p| tree::owns_layer(vm_dir, t, p))
            .count();
        if n == 0 {
            continue;
        }
        let Some(base) = chain.get(n).cloned() else {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "the disk in {} ({}) is a checkpoint layer with no disk of the VM's own below it; nothing could keep its content",
                    d.slot,
                    leaf.display()
                ),
            ));
        };
        if let Some(p) = chain[n..].iter().find(|p| tree::owns_layer(vm_dir, t, p)) {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "the chain of the disk in {} runs through {} and then through the checkpoint layer {}; re-point the drive first",
                    d.slot,
                    base.display(),
                    p.display()
                ),
            ));
        }
        if let Some(other) = others.get(&canonical(&base)) {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "deleting the VM merges its current state into {}, but {other} builds on that disk (it is in its chain); delete that VM first or give it its own copy of the disk",
                    base.display()
                ),
            ));
        }
        merges.push(Merge {
            slot: d.slot,
            leaf,
            base,
            layers: chain[..n].to_vec(),
        });
    }
    Ok((merges, unmerged))
}

fn merge_phase(
    svc: &Arc<Service>,
    id: Uuid,
    dir: &Path,
    mut intent: Intent,
    ctx: &JobContext,
) -> Result<Intent, ApiError> {
    let stall = Stall::from_env(STALL_VAR, "delete");
    // Hyper-V discards a deleted VM's saved state.
    remove_file(&dir.join(crate::checkpoints::ops::SAVED_STATE_FILE))?;
    let settings = settings_of(svc, id);
    let t = match tree::load(dir) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(vm = %id, error = %error_chain(&e), "the checkpoint tree cannot be read; the drives' chains are merged as found");
            Tree::default()
        }
    };
    let others = used_by_others(svc, id);
    let (merges, unmerged) = plan_merges(dir, settings.as_ref(), &t, &others)?;
    let total = merges.len().max(1) as u64;
    for (i, m) in merges.iter().enumerate() {
        stall.at("merge");
        tracing::info!(vm = %id, slot = %m.slot, from = %m.leaf.display(), into = %m.base.display(), layers = m.layers.len(), "merging the current state into the kept disk");
        let mut progress = |done: u64, all: u64| {
            let pct = (done.min(all) * 100).checked_div(all).unwrap_or(100);
            ctx.set_percent((5 + (i as u64 * 100 + pct) * 75 / (total * 100)) as u8);
            stall.at_copy(pct as u8);
            true
        };
        vhd::ops::merge::merge_keeping_layers(&m.leaf, &m.base, &mut progress).map_err(|e| {
            ApiError::internal(format!(
                "cannot merge the current state of {} into {}: {}",
                m.slot,
                m.base.display(),
                error_chain(&e)
            ))
        })?;
    }
    stall.at("repoint");
    if let (Some(mut s), false) = (settings, merges.is_empty()) {
        for d in &mut s.drives {
            if let (DriveMedia::HardDisk { path }, Some(m)) =
                (&mut d.media, merges.iter().find(|m| m.slot == d.slot))
            {
                *path = m.base.to_string_lossy().into_owned();
            }
        }
        svc.store()
            .save(s)
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
    }
    // What to remove, from the settings as they are now.
    let settings = settings_of(svc, id);
    let mut removal = Removal {
        unmerged,
        ..Removal::default()
    };
    for f in vm_files(settings.as_ref(), &t) {
        if tree::owns_layer(dir, &t, &f) {
            continue;
        }
        let reason = match others.get(&canonical(&f)) {
            Some(other) => Some(format!("kept: {other} uses it (it is in its chain)")),
            None if !intent.delete_disks => {
                Some("kept: disks are deleted only with --delete-disks".to_string())
            }
            None => None,
        };
        let reason = reason.map(Err).unwrap_or_else(|| disk_identity(&f));
        match reason {
            Err(reason) => removal.kept.push(Kept { path: f, reason }),
            Ok(unique_id) => {
                removal.disk_ids.insert(f.clone(), unique_id);
                removal.disks.push(f);
            }
        }
    }
    if let Some(layers) = &t.layers_dir {
        removal
            .layer_dirs
            .extend(t.nodes.iter().map(|n| layers.join(n.id.to_string())));
    }
    intent.removal = Some(removal);
    save_intent(dir, &intent)?;
    Ok(intent)
}

/// The unique ID of the disk at `p`, or why it is not removed: only a regular file
/// (not a symlink) that the engine reads as a VHD or VHDX is a disk to delete.
fn disk_identity(p: &Path) -> Result<String, String> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err("kept: it is a symlink; only disk files themselves are deleted".to_string())
        }
        Ok(m) if !m.is_file() => return Err("kept: it is not a regular file".to_string()),
        Ok(_) => {}
        Err(e) => return Err(format!("kept: it cannot be read ({e})")),
    }
    match vhd::ops::info::layer_info(p) {
        Ok(info) if info.format != vhd::Format::Raw => info
            .unique_id
            .ok_or_else(|| "kept: the disk carries no unique ID".to_string()),
        Ok(_) => Err("kept: it is not a VHD or VHDX file (no signature)".to_string()),
        Err(e) => Err(format!(
            "kept: the storage engine does not read it as a disk ({})",
            error_chain(&e)
        )),
    }
}

/// Removes a planned disk only while it is still the disk planned (same unique ID).
fn remove_disk(p: &Path, removal: &Removal) -> Result<(), ApiError> {
    if std::fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    let now = disk_identity(p);
    let same = match (removal.disk_ids.get(p), &now) {
        (Some(id), Ok(current)) => id == current,
        // Planned by a daemon before IDs were recorded: a disk still.
        (None, Ok(_)) => true,
        (_, Err(_)) => false,
    };
    if !same {
        tracing::warn!(
            path = %p.display(),
            "not removed: the file is no longer the disk the delete planned to remove"
        );
        return Ok(());
    }
    remove_file(p)
}

fn remove_file(p: &Path) -> Result<(), ApiError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ApiError::internal(format!(
            "cannot remove {}: {e}",
            p.display()
        ))),
    }
}

fn remove_dir_all(p: &Path) -> Result<(), ApiError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ApiError::internal(format!(
            "cannot remove {}: {e}",
            p.display()
        ))),
    }
}

fn remove_phase(dir: &Path, removal: &Removal) -> Result<(), ApiError> {
    let stall = Stall::from_env(STALL_VAR, "delete");
    stall.at("remove");
    remove_file(&dir.join(crate::checkpoints::ops::SAVED_STATE_FILE))?;
    remove_dir_all(&dir.join("runtime"))?;
    // A runtime folder kept outside the VM's folder (its path was too long for sockets).
    remove_dir_all(&crate::vms::workers::runtime_dir(dir))?;
    remove_dir_all(&dir.join(SNAPSHOTS_FOLDER))?;
    for d in &removal.layer_dirs {
        remove_dir_all(d)?;
        if let Some(parent) = d.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    remove_file(&tree::tree_path(dir))?;
    for d in &removal.disks {
        remove_disk(d, removal)?;
    }
    stall.at("remove-settings");
    let settings = dir.join(SETTINGS_FILE);
    if settings.is_dir() {
        // Damaged: a folder where the settings file belongs.
        remove_dir_all(&settings)?;
    }
    remove_file(&settings)?;
    remove_file(&intent_path(dir))?;
    // The folder goes, but for kept disks inside it (`Virtual Hard Disks`).
    let keeps_inside = removal.kept.iter().any(|k| k.path.starts_with(dir));
    if !keeps_inside {
        remove_dir_all(dir)?;
    } else if let Ok(listing) = std::fs::read_dir(dir) {
        for item in listing.flatten() {
            if item.file_name() != DISKS_FOLDER {
                let p = item.path();
                if p.is_dir() {
                    remove_dir_all(&p)?;
                } else {
                    remove_file(&p)?;
                }
            }
        }
    }
    if let Some(root) = dir.parent() {
        if let Ok(f) = std::fs::File::open(root) {
            let _ = f.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_flags_parse_as_booleans() {
        assert!(!flag(None, "force").unwrap());
        assert!(flag(Some("force=true"), "force").unwrap());
        assert!(flag(Some("delete_disks&force=1"), "delete_disks").unwrap());
        assert!(!flag(Some("force=false"), "force").unwrap());
        assert!(flag(Some("force=maybe"), "force").is_err());
    }

    #[test]
    fn a_saved_or_running_vm_needs_force() {
        assert!(check_state("a", VmState::Off, false).is_ok());
        assert!(check_state("a", VmState::Damaged, false).is_ok());
        assert!(check_state("a", VmState::Running, false).is_err());
        assert!(check_state("a", VmState::Saved, false).is_err());
        assert!(check_state("a", VmState::Saved, true).is_ok());
        assert!(check_state("a", VmState::Starting, true).is_err());
    }
}
