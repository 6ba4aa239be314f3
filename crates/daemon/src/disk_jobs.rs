//! Disk operations as jobs: parse the request, resolve paths, run the engine's
//! operation on a blocking thread with progress and cancellation.
//!
//! Crash safety: every new file is built under `.NAME.<job-id>.partial` in the
//! destination's folder, flushed, and only then named (create, convert) or
//! renamed over the original (compact, resize); merge changes its target in
//! place in an order that keeps the chain reading the same at every moment.
//! Each job is recorded in `<data-dir>/jobs/running/` while it runs
//! ([`crate::running_jobs`]), so after a crash it shows as Killed and its
//! temporary file is removed at the next start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::disks::{
    CompactDiskRequest, ConvertDiskRequest, CreateDiskRequest, DiskKind, ImageFormat,
    MergeDiskRequest, ResizeDiskRequest,
};
use api::ErrorCode;
use hyper::body::Incoming;
use hyper::Response;
use jobs::{AffectedElement, JobEngine, JobError, JobSnapshot, JobSpec};
use uuid::Uuid;
use vhd::ops::convert::Target;
use vhd::vhd1::create::{create_via, CreateOptions, NewDisk, DEFAULT_BLOCK_SIZE};

use crate::error::ApiError;
use crate::handlers::disks::resolve;
use crate::http::body::{accepted, read_json, Body};
use crate::running_jobs::{self, Recorded};
use crate::service::Service;
use crate::vms::store::error_chain;
use crate::vms::test_seam::Stall;

/// Runs a blocking storage-engine operation as a job. The operation gets a
/// [`vhd::Progress`] that sets the job's percent and asks it to stop once
/// cancellation is requested; `vhd::Error::Cancelled` ends the job Terminated,
/// other errors end it in Exception with a stable code.
pub fn run_engine_op<F>(jobs: &JobEngine, spec: JobSpec, op: F) -> JobSnapshot
where
    F: FnOnce(&mut dyn vhd::Progress) -> vhd::Result<()> + Send + 'static,
{
    run_engine_op_as(jobs, Uuid::new_v4(), spec, None, op)
}

/// [`run_engine_op`] as job `id`; when the job is recorded on disk, the record
/// and the temporary files still there go when it ends, whatever its state.
/// `VIRIDIAN_TEST_STALL_DISK_JOB_AT=<percent>` (the crash tests' seam) makes
/// the operation wait for good once its progress reaches that percent.
fn run_engine_op_as<F>(
    jobs: &JobEngine,
    id: Uuid,
    spec: JobSpec,
    recorded: Option<(Recorded, Vec<PathBuf>)>,
    op: F,
) -> JobSnapshot
where
    F: FnOnce(&mut dyn vhd::Progress) -> vhd::Result<()> + Send + 'static,
{
    jobs.submit_as(id, spec, move |ctx| async move {
        let stall = Stall::from_env("VIRIDIAN_TEST_STALL_DISK_JOB_AT", "the disk job");
        let result = tokio::task::spawn_blocking(move || {
            let mut progress = |done: u64, total: u64| {
                ctx.set_progress(done, total);
                stall.at_percent(percent(done, total));
                !ctx.cancel_requested()
            };
            op(&mut progress)
        })
        .await;
        if let Some((record, temporary)) = recorded {
            let _ = tokio::task::spawn_blocking(move || record.finish(&temporary)).await;
        }
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(vhd::Error::Cancelled { .. })) => Err(JobError::Cancelled),
            Ok(Err(e)) => Err(JobError::failed(error_code(&e), error_chain(&e))),
            Err(join) => Err(JobError::failed(
                "Internal",
                format!("the disk operation failed unexpectedly: {join}"),
            )),
        }
    })
}

/// The percent a done/total pair makes, as the job shows it (before its cap at 99).
fn percent(done: u64, total: u64) -> u8 {
    if total == 0 {
        return 0;
    }
    (u128::from(done.min(total)) * 100 / u128::from(total)) as u8
}

/// The temporary name job `id` builds its new file under, beside `path`.
fn job_temp(path: &Path, id: Uuid) -> PathBuf {
    vhd::ops::partial::partial_path(path, &id.to_string())
}

/// The job error code for an engine error.
pub fn error_code(e: &vhd::Error) -> &'static str {
    match e {
        vhd::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "FileNotFound"
        }
        vhd::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
            "AlreadyExists"
        }
        vhd::Error::Io { .. } => "IoError",
        vhd::Error::Locked { .. } => "InUse",
        vhd::Error::ReadOnly { .. } => "ReadOnly",
        vhd::Error::Cancelled { .. } => "Cancelled",
        vhd::Error::Vhd(_) | vhd::Error::Vhdx(_) => "InvalidDisk",
        vhd::Error::OutOfRange { .. } => "InvalidParameter",
    }
}

/// A request the engine's checks refuse before any work starts (a size beyond
/// the format's maximum, a bad block size): 422 InvalidParameter.
fn refused(e: vhd::Error) -> ApiError {
    ApiError::invalid(error_chain(&e))
}

/// A disk the job reads: inside the storage roots, with its format's signature
/// (a raw image only when `raw` is asked for), its chain inside the roots too.
fn source_disk(svc: &Service, path: &Path, format: Option<ImageFormat>) -> Result<(), ApiError> {
    svc.roots.disk(path, format == Some(ImageFormat::Raw))?;
    let Some(wanted) = format else {
        return Ok(());
    };
    let found = match vhd::detect_format(path) {
        Ok(vhd::Format::Vhd) => ImageFormat::Vhd,
        Ok(vhd::Format::Vhdx) => ImageFormat::Vhdx,
        Ok(vhd::Format::Raw) => ImageFormat::Raw,
        Err(e) => return Err(ApiError::invalid(error_chain(&e))),
    };
    if found != wanted {
        return Err(ApiError::invalid(format!(
            "{} is a {} image, not {}; leave out source_format to read it as it is",
            path.display(),
            format_name(found),
            format_name(wanted)
        )));
    }
    Ok(())
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Vhd => "VHD",
        ImageFormat::Vhdx => "VHDX",
        ImageFormat::Raw => "raw",
    }
}

/// Refuses to touch a disk that a VM not Off has attached.
fn not_in_running_vm(svc: &Service, path: &Path) -> Result<(), ApiError> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let store = svc.store();
    for entry in store.entries() {
        let Some(settings) = &entry.settings else {
            continue;
        };
        let uses = settings
            .drives
            .iter()
            .filter_map(|d| d.media.host_path())
            .any(|p| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p)) == key);
        let state = svc.runtime.get(entry.id).state;
        if uses && state != api::vms::VmState::Off {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "{} is attached to VM {}, which is {state:?}; turn the VM off first",
                    path.display(),
                    settings.name
                ),
            ));
        }
    }
    Ok(())
}

/// A blocking engine operation, ready to run as a job.
type EngineOp = Box<dyn FnOnce(&mut dyn vhd::Progress) -> vhd::Result<()> + Send>;

pub async fn submit(
    svc: &Arc<Service>,
    op: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let base = svc.disks_dir();
    let id = Uuid::new_v4();
    // Relative paths live in `<data-dir>/Virtual Hard Disks`; make it on first use.
    std::fs::create_dir_all(&base).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("cannot create {}: {e}", base.display()),
        )
    })?;
    let (source, target, run): (Option<PathBuf>, PathBuf, Option<EngineOp>) = match op {
        "create" => {
            let r: CreateDiskRequest = read_json(body).await?;
            let path = resolve(&base, &r.path)?;
            svc.roots.new_file(&path)?;
            let kind = match (r.kind, &r.parent, r.size_bytes) {
                (DiskKind::Differencing, Some(parent), None) => {
                    let parent = resolve(&base, parent)?;
                    source_disk(svc, &parent, None)?;
                    NewDisk::Differencing { parent }
                }
                (DiskKind::Fixed, None, Some(size)) => NewDisk::Fixed { size },
                (DiskKind::Dynamic, None, Some(size)) => NewDisk::Dynamic {
                    size,
                    block_size: r.block_size_bytes.unwrap_or(DEFAULT_BLOCK_SIZE),
                },
                _ => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidParameter,
                        "a fixed or dynamic disk needs size_bytes and no parent; a differencing disk needs parent and no size_bytes",
                    ))
                }
            };
            let p = path.clone();
            let run: EngineOp = if vhd::is_vhdx_name(&path) {
                use vhd::vhdx::create::{NewVhdx, VhdxOptions};
                let mut opts = VhdxOptions::new(match kind {
                    NewDisk::Fixed { size } => NewVhdx::Fixed { size },
                    NewDisk::Dynamic { size, .. } => NewVhdx::Dynamic { size },
                    NewDisk::Differencing { parent } => NewVhdx::Differencing { parent },
                });
                // VHDX has its own default (32 MiB, as Hyper-V).
                opts.block_size = r.block_size_bytes;
                vhd::vhdx::create::check_options(&path, &opts).map_err(refused)?;
                let t = job_temp(&path, id);
                Box::new(move |progress| {
                    vhd::vhdx::create::create_via(&vhd::HostStorage, &p, &t, &opts, progress)
                        .map(|_| ())
                })
            } else {
                let opts = CreateOptions {
                    kind,
                    exact_size: false,
                };
                vhd::vhd1::create::check_options(&path, &opts).map_err(refused)?;
                let t = job_temp(&path, id);
                Box::new(move |progress| {
                    create_via(&vhd::HostStorage, &p, &t, &opts, progress).map(|_| ())
                })
            };
            (None, path, Some(run))
        }
        "merge" => {
            let path = resolve(&base, &read_json::<MergeDiskRequest>(body).await?.path)?;
            source_disk(svc, &path, None)?;
            let p = path.clone();
            let run: EngineOp =
                Box::new(move |progress| vhd::ops::merge::merge(&p, None, progress).map(|_| ()));
            (Some(path.clone()), path, Some(run))
        }
        "convert" => {
            let r: ConvertDiskRequest = read_json(body).await?;
            let (src, dst) = (resolve(&base, &r.path)?, resolve(&base, &r.destination)?);
            source_disk(svc, &src, r.source_format)?;
            svc.roots.new_file(&dst)?;
            let target = match r.kind {
                None => Target::for_path(&dst),
                Some(DiskKind::Fixed) => Target::VhdFixed,
                Some(DiskKind::Dynamic) => Target::VhdDynamic,
                Some(DiskKind::Differencing) => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidParameter,
                        "convert makes a fixed or dynamic disk (or raw); a differencing disk is made with create",
                    ))
                }
            };
            let (s, d, t) = (src.clone(), dst.clone(), job_temp(&dst, id));
            let run: EngineOp = Box::new(move |progress| {
                vhd::ops::convert::convert_via(&s, &d, &t, target, progress)
            });
            (Some(src), dst, Some(run))
        }
        "compact" => {
            let path = resolve(&base, &read_json::<CompactDiskRequest>(body).await?.path)?;
            source_disk(svc, &path, None)?;
            let (p, t) = (path.clone(), job_temp(&path, id));
            let run: EngineOp = Box::new(move |progress| {
                vhd::ops::compact::compact_via(&vhd::HostStorage, &p, &t, progress).map(|_| ())
            });
            (Some(path.clone()), path, Some(run))
        }
        "resize" => {
            let r: ResizeDiskRequest = read_json(body).await?;
            let path = resolve(&base, &r.path)?;
            source_disk(svc, &path, None)?;
            match vhd::ops::resize::check(&path, r.size_bytes) {
                // A file that cannot be read fails as the job, with its code.
                Err(vhd::Error::Io { .. }) | Ok(()) => {}
                Err(e) => return Err(refused(e)),
            }
            let (p, t) = (path.clone(), job_temp(&path, id));
            let run: EngineOp = Box::new(move |progress| {
                vhd::ops::resize::resize_via(&p, &t, r.size_bytes, false, progress).map(|_| ())
            });
            (Some(path.clone()), path, Some(run))
        }
        _ => {
            return Err(ApiError::not_found(format!(
                "there is no disk operation {op:?}; use create, merge, convert, compact or resize"
            )))
        }
    };
    if let Some(src) = &source {
        not_in_running_vm(svc, src)?;
    }
    let Some(run) = run else {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "the storage engine's {op} operation (for {}) is not available in this build yet",
                target.display()
            ),
        ));
    };
    let mut affected = vec![AffectedElement::new("disk", target.display().to_string())];
    if let Some(src) = source.filter(|s| *s != target) {
        affected.insert(0, AffectedElement::new("disk", src.display().to_string()));
    }
    let spec = JobSpec {
        job_type: format!("disk-{op}"),
        description: format!("{op} {}", target.display()),
        cancellable: op != "create",
        affected,
    };
    // Merge changes its target in place and builds no new file.
    let temporary = if op == "merge" {
        Vec::new()
    } else {
        vec![job_temp(&target, id)]
    };
    let record = running_jobs::record(&svc.config.data_dir, id, &spec, &temporary).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!(
                "cannot record the job in {}: {e}; check that the data dir is writable and has free space",
                running_jobs::dir(&svc.config.data_dir).display()
            ),
        )
    })?;
    let job = run_engine_op_as(&svc.jobs, id, spec, Some((record, temporary)), run);
    Ok(accepted(&crate::convert::job(&job)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jobs::{AffectedElement, JobEngineConfig, JobState};

    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            job_type: "TestDiskOp".into(),
            description: "test".into(),
            cancellable: true,
            affected: vec![AffectedElement::new("disk", "/x.vhdx")],
        }
    }

    #[tokio::test]
    async fn engine_progress_becomes_job_percent_and_success_completes() {
        let jobs = JobEngine::new(JobEngineConfig::default(), None);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let job = run_engine_op(&jobs, spec(), move |p| {
            assert!(p.update(50, 200));
            rx.recv().ok();
            Ok(())
        });
        let mid = loop {
            let s = jobs.get(job.id).unwrap();
            if s.percent_complete > 0 {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(mid.percent_complete, 25);
        tx.send(()).unwrap();
        let done = jobs.wait(job.id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            (done.state, done.percent_complete),
            (JobState::Completed, 100)
        );
    }

    #[tokio::test]
    async fn cancel_reaches_the_engine_and_ends_terminated() {
        let jobs = JobEngine::new(JobEngineConfig::default(), None);
        let job = run_engine_op(&jobs, spec(), |p| {
            for i in 0.. {
                if !p.update(i, u64::MAX) {
                    return Err(vhd::Error::Cancelled {
                        what: "the test disk".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        jobs.cancel(job.id).unwrap();
        let done = jobs.wait(job.id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(done.state, JobState::Terminated);
    }

    #[tokio::test]
    async fn engine_errors_end_in_exception_with_a_code() {
        let jobs = JobEngine::new(JobEngineConfig::default(), None);
        let job = run_engine_op(&jobs, spec(), |_| {
            Err(vhd::Error::Locked {
                path: "/x.vhdx".into(),
                wanted: "exclusive",
            })
        });
        let done = jobs.wait(job.id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(done.state, JobState::Exception);
        assert_eq!(done.error_code.as_deref(), Some("InUse"));
        assert!(done
            .error_description
            .unwrap()
            .contains("/x.vhdx is in use"));
    }
}
