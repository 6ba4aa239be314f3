//! Export and import of VMs as jobs: the folder format ([`package`]), the file
//! work ([`export`], [`import`]), and here the checks, VM states and jobs.
//!
//! A running VM is exported through a temporary checkpoint: its frozen disks and
//! saved memory are a consistent point in time that can be copied while the VM
//! goes on; the checkpoint is deleted afterwards (its merge runs once the VM
//! stops, like every merge into a running VM's disks).

pub mod export;
pub mod import;
pub mod package;

use std::path::PathBuf;
use std::sync::Arc;

use api::transfer::{ExportRequest, ImportMode, ImportReport, ImportRequest};
use api::vms::{VmRuntime, VmState};
use api::ErrorCode;
use jobs::{AffectedElement, JobContext, JobError, JobSnapshot, JobSpec};
use uuid::Uuid;

use crate::checkpoints::{self, ops, tree};
use crate::error::{blocking, ApiError};
use crate::service::{damaged_unreadable, find, Service};
use crate::vms::store::error_chain;
use package::ExportKind;

fn progress_of(ctx: &JobContext) -> impl FnMut(u64, u64) -> bool {
    let ctx = ctx.clone();
    move |done, total| {
        ctx.set_progress(done, total);
        !ctx.cancel_requested()
    }
}

/// `POST /v1/vms/{vm}/export`
pub fn submit_export(
    svc: &Arc<Service>,
    key: &str,
    req: ExportRequest,
) -> Result<JobSnapshot, ApiError> {
    let (id, name, dir, state, disks) = {
        let store = svc.store();
        let entry = find(&store, key)?;
        let Some(settings) = &entry.settings else {
            return Err(damaged_unreadable(entry));
        };
        let disks = hard_disks(settings);
        if let Some(reason) = &entry.damaged {
            return Err(ApiError::new(
                ErrorCode::Damaged,
                format!(
                    "VM {} is damaged ({reason}); repair it before exporting",
                    settings.name
                ),
            ));
        }
        (
            entry.id,
            settings.name.clone(),
            entry.dir.clone(),
            svc.state_of(entry).state,
            disks,
        )
    };
    if req.no_checkpoints && req.checkpoint.is_some() {
        return Err(ApiError::invalid(
            "give either no_checkpoints or checkpoint, not both",
        ));
    }
    let dest = PathBuf::from(&req.destination);
    if !dest.is_absolute() {
        return Err(ApiError::invalid(format!(
            "the destination {:?} is not an absolute path; give the full path of an existing directory",
            req.destination
        )));
    }
    if !dest.is_dir() {
        return Err(ApiError::invalid(format!(
            "the destination {} is not an existing directory; create it first",
            dest.display()
        )));
    }
    svc.roots.existing(&dest)?;
    // What the export reads: each disk a VHD/VHDX inside the roots, never a symlink
    // out of them.
    for disk in &disks {
        svc.roots.disk(disk, false)?;
    }
    let vms_root = svc.config.data_dir.join("vms");
    let canonical =
        |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canonical(&dest).starts_with(canonical(&vms_root)) {
        return Err(ApiError::invalid(format!(
            "the destination {} is inside the data directory's VM folders ({}); export somewhere else",
            dest.display(),
            vms_root.display()
        )));
    }
    let folder = dest.join(&name);
    if folder.exists()
        && std::fs::read_dir(&folder)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!(
                "{} already exists and is not empty; export into another directory or remove it",
                folder.display()
            ),
        ));
    }
    if let Some(cp) = &req.checkpoint {
        let t = ops::load(&dir)?;
        ops::find(&t, cp)?;
    }
    let with_memory_via_checkpoint =
        matches!(state, VmState::Running | VmState::Paused) && req.checkpoint.is_none();
    if !matches!(
        state,
        VmState::Off | VmState::Saved | VmState::Running | VmState::Paused
    ) {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!("VM {name} is {state:?}; export it when it is Off, Saved or Running"),
        ));
    }
    let kind = match (&req.checkpoint, req.no_checkpoints) {
        (Some(_), _) => ExportKind::Checkpoint,
        (None, true) => ExportKind::Current,
        (None, false) => ExportKind::Full,
    };
    // Claimed (it may not start) with its state checked again under the store's
    // lock, so a start cannot slip in between.
    let guard = {
        let store = svc.store();
        let entry = find(&store, key)?;
        let now = svc.state_of(entry).state;
        if now != state {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!("VM {name} changed from {state:?} to {now:?} meanwhile; try again"),
            ));
        }
        svc.checkpoints.clone().claim(id)
    };
    let spec = JobSpec {
        job_type: "ExportVm".into(),
        description: format!("Export VM {name} to {}", folder.display()),
        cancellable: true,
        affected: vec![AffectedElement::new("vm", id.to_string())],
    };
    let svc2 = svc.clone();
    Ok(svc.jobs.submit(spec, move |ctx| async move {
        let _guard = guard;
        let vm_lock = svc2.checkpoints.vm_lock(id);
        let held = vm_lock.lock().await;
        let temp = if with_memory_via_checkpoint {
            let label = format!("Export {}", &ctx.id().to_string()[..8]);
            Some(checkpoints::take(&svc2, id, Some(label), ctx.clone()).await?)
        } else {
            None
        };
        let result = export_job(&svc2, id, kind, req.checkpoint.clone(), temp, folder.clone(), ctx.clone()).await;
        if let Some(t) = temp {
            let dir2 = dir.clone();
            let marked = blocking("the transfer", move || ops::delete(&dir2, &t.to_string(), false)).await;
            if let Err(e) = marked {
                tracing::error!(vm = %id, checkpoint = %t, "cannot delete the export's temporary checkpoint: {e:?}");
            }
        }
        drop(held);
        if temp.is_some() {
            checkpoints::settle_in_background(&svc2, id);
        }
        ctx.add_affected(AffectedElement::new("export", folder.to_string_lossy()));
        result
    }))
}

async fn export_job(
    svc: &Arc<Service>,
    id: Uuid,
    kind: ExportKind,
    checkpoint: Option<String>,
    temp: Option<Uuid>,
    folder: PathBuf,
    ctx: JobContext,
) -> Result<(), JobError> {
    let (dir, settings, vm_state) = {
        let store = svc.store();
        let entry = store
            .get(id)
            .ok_or_else(|| JobError::failed("NotFound", "the VM was deleted"))?;
        let settings = entry
            .settings
            .clone()
            .ok_or_else(|| JobError::failed("Damaged", "the VM's settings became unreadable"))?;
        (entry.dir.clone(), settings, svc.state_of(entry).state)
    };
    let mut progress = progress_of(&ctx);
    let switches = svc.switches.all();
    blocking("the transfer", move || {
        let mut t = ops::load(&dir)?;
        // The point in time exported: a checkpoint (the named one, or the
        // temporary one of a running VM), or the current state of an idle VM.
        let point = match (&checkpoint, temp) {
            (Some(cp), _) => Some(ops::find(&t, cp)?.clone()),
            (None, Some(tmp)) => t.node(tmp).cloned(),
            (None, None) => None,
        };
        let (settings, saved_state) = match &point {
            Some(node) => {
                let nd = tree::node_dir(&dir, node.id);
                let s = vm_config::file::load(&nd.join(tree::SETTINGS_FILE))
                    .map_err(|e| ApiError::new(ErrorCode::Damaged, error_chain(&e)))?;
                let state = nd.join(ops::SAVED_STATE_FILE);
                (s, (node.memory_state && state.exists()).then_some(state))
            }
            None => {
                let state = dir.join(ops::SAVED_STATE_FILE);
                let saved = vm_state == VmState::Saved && state.is_file();
                (settings, saved.then_some(state))
            }
        };
        let tree = match (kind, temp, &point) {
            (ExportKind::Full, Some(tmp), Some(node)) => {
                // The temporary checkpoint is the exported current state.
                t.current_parent = node.parent;
                t.current_disks = node.disks.clone();
                t.nodes.retain(|n| n.id != tmp);
                Some(t)
            }
            (ExportKind::Full, _, _) => Some(t),
            _ => None,
        };
        let src = export::Source {
            vm_dir: dir.clone(),
            settings,
            tree,
            saved_state,
            kind,
            checkpoint,
            switches,
        };
        export::export(&src, &folder, &mut progress)
    })
    .await?;
    Ok(())
}

/// `POST /v1/vms/import/check`: the report alone.
/// The files of a VM's hard disk drives.
fn hard_disks(settings: &vm_config::VmSettings) -> Vec<PathBuf> {
    settings
        .drives
        .iter()
        .filter_map(|d| match &d.media {
            vm_config::DriveMedia::HardDisk { path } => Some(PathBuf::from(path)),
            _ => None,
        })
        .collect()
}

pub fn check_import(svc: &Arc<Service>, req: &ImportRequest) -> ImportReport {
    inspect(svc, req).0
}

fn inspect(svc: &Arc<Service>, req: &ImportRequest) -> (ImportReport, Option<import::Plan>) {
    let vms: Vec<(PathBuf, vm_config::VmSettings)> = svc
        .store()
        .entries()
        .filter_map(|e| e.settings.clone().map(|s| (e.dir.clone(), s)))
        .collect();
    let existing: Vec<import::Existing> = vms
        .into_iter()
        .map(|(dir, settings)| {
            let mut disks = hard_disks(&settings);
            if let Ok(t) = tree::load(&dir) {
                disks.extend(t.current_disks.iter().map(|d| d.path.clone()));
                disks.extend(
                    t.nodes
                        .iter()
                        .flat_map(|n| n.disks.iter().map(|d| d.path.clone())),
                );
            }
            let disks = disks
                .into_iter()
                .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
                .collect();
            import::Existing { settings, disks }
        })
        .collect();
    import::inspect(
        req,
        &svc.config.data_dir,
        &existing,
        &svc.limits,
        &svc.switches.all(),
    )
}

/// The request's own shape, which no export can fix: absolute paths without
/// control characters (the document's pattern) and a valid new name. Answered as
/// `InvalidParameter` by import and by its check alike, before any file is read.
fn check_import_request(req: &ImportRequest) -> Result<(), ApiError> {
    let path = |what: &str, value: &str| {
        if !value.starts_with('/') {
            return Err(ApiError::invalid(format!(
                "the {what} {value:?} is not an absolute path; give the full path"
            )));
        }
        if value.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "the {what} {value:?} holds a control character"
            )));
        }
        Ok(())
    };
    path("source", &req.source)?;
    if let Some(dest) = &req.destination {
        path("destination", dest)?;
    }
    if let Some(name) = &req.name {
        vm_config::validate::validate_new_name(name)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    Ok(())
}

/// The import's folders must lie in the storage roots: the export read from, and
/// with `copy` the destination written to.
pub fn confine_import(svc: &Service, req: &ImportRequest) -> Result<(), ApiError> {
    check_import_request(req)?;
    svc.roots.existing(std::path::Path::new(&req.source))?;
    if let Some(dest) = req.destination.as_deref() {
        svc.roots.folder(std::path::Path::new(dest))?;
    }
    Ok(())
}

/// `POST /v1/vms/import`: checks everything first; any problem answers
/// `ImportIncompatible` with the whole report and nothing changes.
pub fn submit_import(svc: &Arc<Service>, req: ImportRequest) -> Result<JobSnapshot, ApiError> {
    confine_import(svc, &req)?;
    let (report, plan) = inspect(svc, &req);
    let Some(mut plan) = plan else {
        let n = report.problems.len();
        let first = report
            .problems
            .first()
            .map(|p| p.message.clone())
            .unwrap_or_default();
        return Err(ApiError::new(
            ErrorCode::ImportIncompatible,
            format!(
                "the export in {} cannot be imported: {n} problem{} ({first}{}); nothing was changed",
                report.source,
                if n == 1 { "" } else { "s" },
                if n > 1 { "; see details for all" } else { "" }
            ),
        )
        .with_details(serde_json::to_value(&report).unwrap_or_default()));
    };
    if req.new_id {
        import::pool_macs(&mut plan, || svc.new_mac())?;
    }
    let id = plan.settings.id;
    let spec = JobSpec {
        job_type: "ImportVm".into(),
        description: format!(
            "Import VM {} from {} ({})",
            plan.settings.name,
            plan.folder.display(),
            match plan.mode {
                ImportMode::Register => "register in place",
                ImportMode::Copy => "copy",
            }
        ),
        cancellable: true,
        affected: vec![AffectedElement::new("vm", id.to_string())],
    };
    let svc2 = svc.clone();
    let guard = svc.checkpoints.clone().claim(id);
    Ok(svc.jobs.submit(spec, move |ctx| async move {
        let _guard = guard;
        let vm_dir = svc2.config.data_dir.join("vms").join(id.to_string());
        let saved = plan.manifest.saved;
        let mut progress = progress_of(&ctx);
        let plan2 = plan.clone();
        let dir2 = vm_dir.clone();
        let settings = blocking("the transfer", move || import::carry_out(&plan2, &dir2, &mut progress)).await?;
        // The commit point: vm.json, written under the store lock after checking
        // again that nothing took the id or name meanwhile.
        let committed = {
            let mut store = svc2.store();
            let clash = store.entries().any(|e| {
                e.id == id || e.settings.as_ref().is_some_and(|s| s.name == settings.name)
            });
            if clash {
                Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("a VM with the id {id} or the name {:?} appeared while importing; nothing was imported", settings.name),
                ))
            } else {
                store.save(settings).map(|_| ()).map_err(|e| ApiError::internal(error_chain(&e)))
            }
        };
        if let Err(e) = committed {
            let _ = std::fs::remove_dir_all(&vm_dir);
            return Err(JobError::from(e));
        }
        if saved {
            svc2.set_runtime(id, VmRuntime::with_state(VmState::Saved));
        } else {
            svc2.set_runtime(id, VmRuntime::with_state(VmState::Off));
        }
        tracing::info!(vm = %id, "VM imported");
        Ok(())
    }))
}
