//! Running jobs recorded on disk, so a restart knows what a crash cut off.
//!
//! Before a job that writes files starts, `<data-dir>/jobs/running/<job-id>.json`
//! says what it is (type, description, affected elements, created time) and which
//! temporary files it owns; the record goes when the job ends, whatever its state.
//! At start ([`recover_at_start`]) each record left by an earlier life of the
//! service becomes a finished job in state Killed ("interrupted by a restart of
//! the service"), listed and retained like any other; the temporary files it
//! owned are removed, with any other leftovers of the engine's temporary-name
//! pattern beside the disks it named and in the data dir's disk folders; then
//! the record goes. Records are written like settings files: temporary name,
//! fsync, rename, fsync of the folder.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jobs::{AffectedElement, JobEngine, JobSpec};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The error description of a job a restart cut off.
pub const INTERRUPTED: &str = "interrupted by a restart of the service";

/// The version of the record format this build writes.
const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Affected {
    kind: String,
    id: String,
}

/// One running job, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    schema_version: u32,
    id: Uuid,
    job_type: String,
    description: String,
    #[serde(default)]
    affected: Vec<Affected>,
    /// Files the job creates under temporary names and removes or renames
    /// before it ends.
    #[serde(default)]
    temporary_files: Vec<PathBuf>,
    /// When the job was submitted, in milliseconds since the Unix epoch.
    created_ms: u64,
}

/// The folder of the records.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("jobs").join("running")
}

/// A record on disk, removed by [`Recorded::finish`] when its job ends.
#[derive(Debug)]
pub struct Recorded {
    path: PathBuf,
}

impl Recorded {
    /// Removes the job's temporary files that are still there, then the record.
    pub fn finish(self, temporary: &[PathBuf]) {
        for t in temporary {
            if t.symlink_metadata().is_ok() {
                if let Err(e) = std::fs::remove_file(t) {
                    tracing::warn!(file = %t.display(), error = %e, "cannot remove a job's temporary file");
                }
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(record = %self.path.display(), error = %e, "cannot remove a finished job's record");
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
    }
}

/// Records job `id` as running, owning `temporary` files, before it starts.
pub fn record(
    data_dir: &Path,
    id: Uuid,
    spec: &JobSpec,
    temporary: &[PathBuf],
) -> io::Result<Recorded> {
    let created_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rec = Record {
        schema_version: SCHEMA_VERSION,
        id,
        job_type: spec.job_type.clone(),
        description: spec.description.clone(),
        affected: spec
            .affected
            .iter()
            .map(|a| Affected {
                kind: a.kind.clone(),
                id: a.id.clone(),
            })
            .collect(),
        temporary_files: temporary.to_vec(),
        created_ms,
    };
    let dir = dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{id}.json"));
    let tmp = dir.join(format!(".{id}.json.tmp"));
    let bytes = serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(Recorded { path })
}

/// What the start-up found and did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Jobs now listed as Killed.
    pub killed: Vec<Uuid>,
    /// Jobs whose result was in place: listed as Completed.
    pub completed: Vec<Uuid>,
    /// Temporary files removed.
    pub removed: Vec<PathBuf>,
}

/// Turns every record of an earlier life into a Killed job in `jobs`, removes
/// the temporary files it owned and the engine's leftovers beside the disks it
/// named, then the leftovers in the data dir's disk folders. Problems are
/// logged; none stops the service from starting.
pub fn recover(data_dir: &Path, jobs: &JobEngine) -> Recovery {
    let mut out = Recovery::default();
    let dir = dir(data_dir);
    let mut folders: Vec<(PathBuf, Option<PathBuf>)> = disk_folders(data_dir)
        .into_iter()
        .map(|f| (f, None))
        .collect();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e.flatten().map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(folder = %dir.display(), error = %e, "cannot read the running-job records");
            Vec::new()
        }
    };
    for path in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".json.tmp") {
            // A record whose write was cut off: its job never started.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let rec = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                let aside = path.with_extension("json.unreadable");
                tracing::warn!(record = %path.display(), error = %e, moved_to = %aside.display(), "a running-job record cannot be read; it was moved aside");
                let _ = std::fs::rename(&path, &aside);
                continue;
            }
        };
        if rec.schema_version > SCHEMA_VERSION {
            tracing::warn!(record = %path.display(), version = rec.schema_version, "a running-job record is of a later version; reading the fields this version knows");
        }
        // Create and convert give the finished file its name with a hard link,
        // then unlink the temporary one: a temporary file that is the same file
        // as the disk it was to become was named, so the job's work is done.
        let committed = rec.temporary_files.iter().any(|t| {
            rec.affected
                .iter()
                .filter(|a| a.kind == "disk")
                .any(|a| same_file(t, Path::new(&a.id)))
        });
        for t in &rec.temporary_files {
            // Only the engine's own temporary names, whatever the record says.
            if !t
                .file_name()
                .is_some_and(vhd::ops::partial::is_partial_name)
            {
                tracing::warn!(file = %t.display(), "a running-job record names a file that is not a temporary one; left alone");
                continue;
            }
            match std::fs::remove_file(t) {
                Ok(()) => out.removed.push(t.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %t.display(), error = %e, "cannot remove an interrupted job's temporary file")
                }
            }
        }
        for a in rec.affected.iter().filter(|a| a.kind == "disk") {
            let disk = PathBuf::from(&a.id);
            if let Some(folder) = disk.parent() {
                folders.push((folder.to_path_buf(), Some(disk.clone())));
            }
        }
        let created = UNIX_EPOCH + Duration::from_millis(rec.created_ms);
        let spec = JobSpec {
            job_type: rec.job_type,
            description: rec.description,
            cancellable: false,
            affected: rec
                .affected
                .into_iter()
                .map(|a| AffectedElement::new(a.kind, a.id))
                .collect(),
        };
        if committed {
            jobs.restore_completed(rec.id, spec, created);
            tracing::info!(job = %rec.id, "a job had finished its work when the service stopped; it is listed as Completed");
            out.completed.push(rec.id);
        } else {
            jobs.restore_killed(rec.id, spec, created, INTERRUPTED);
            tracing::warn!(job = %rec.id, "a job was interrupted by a restart of the service; it is listed as Killed");
            out.killed.push(rec.id);
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(record = %path.display(), error = %e, "cannot remove an interrupted job's record");
        }
    }
    if !out.killed.is_empty() || !out.completed.is_empty() {
        let _ = std::fs::File::open(&dir).and_then(|d| d.sync_all());
    }
    folders.sort();
    folders.dedup();
    for (folder, disk) in folders {
        out.removed
            .extend(remove_leftovers(&folder, disk.as_deref()));
    }
    out
}

/// Whether both names are one file (a hard link between them).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.symlink_metadata(), b.symlink_metadata()) {
        (Ok(a), Ok(b)) => a.is_file() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The data dir's own disk folders: `Virtual Hard Disks` and each VM's.
fn disk_folders(data_dir: &Path) -> Vec<PathBuf> {
    let disks = crate::vms::store::DISKS_FOLDER;
    let mut out = vec![data_dir.join(disks)];
    if let Ok(vms) = std::fs::read_dir(data_dir.join("vms")) {
        out.extend(vms.flatten().map(|e| e.path().join(disks)));
    }
    out
}

/// Removes the files in `folder` named by the engine's temporary-name pattern
/// (only those of `disk` when given) that no process holds open with a lock.
fn remove_leftovers(folder: &Path, disk: Option<&Path>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let ours = match disk {
            Some(d) => vhd::ops::partial::is_partial_of(&path, d),
            None => vhd::ops::partial::is_partial_name(&e.file_name()),
        };
        if !ours || !e.file_type().is_ok_and(|t| t.is_file()) || in_use(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "removed a temporary file an interrupted disk operation left");
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a leftover temporary file")
            }
        }
    }
    if !removed.is_empty() {
        let _ = std::fs::File::open(folder).and_then(|d| d.sync_all());
    }
    removed
}

/// Whether another process (an offline `viridian vhd` command) holds the file
/// with a lock: then it is still being made and is not a leftover.
fn in_use(path: &Path) -> bool {
    match vhd::host_file::open_locked(path, false) {
        Ok(_) => false,
        Err(vhd::Error::Locked { .. }) => true,
        // Unreadable: leave it to the removal to say why.
        Err(_) => false,
    }
}

/// [`recover`] for the service at start, before it serves requests.
pub fn recover_at_start(data_dir: &Path, jobs: &JobEngine) {
    let r = recover(data_dir, jobs);
    if !r.killed.is_empty() || !r.completed.is_empty() || !r.removed.is_empty() {
        tracing::info!(
            killed = r.killed.len(),
            completed = r.completed.len(),
            removed = r.removed.len(),
            "recovered from jobs an earlier run left unfinished"
        );
    }
}

#[cfg(test)]
mod tests {
    use jobs::{JobEngineConfig, JobState};

    use super::*;

    fn spec(disk: &Path) -> JobSpec {
        JobSpec {
            job_type: "disk-convert".into(),
            description: format!("convert {}", disk.display()),
            cancellable: true,
            affected: vec![AffectedElement::new("disk", disk.display().to_string())],
        }
    }

    #[tokio::test]
    async fn a_record_left_by_a_crash_becomes_a_killed_job_and_its_files_go() {
        let data = tempfile::tempdir().unwrap();
        let folder = data.path().join("elsewhere");
        std::fs::create_dir_all(&folder).unwrap();
        let disk = folder.join("new.vhdx");
        let id = Uuid::new_v4();
        let tmp = vhd::ops::partial::partial_path(&disk, &id.to_string());
        std::fs::write(&tmp, b"half a disk").unwrap();
        // An older leftover of the same destination, and a stranger's file.
        let older = folder.join(".new.vhdx.0123abcd.creating");
        std::fs::write(&older, b"x").unwrap();
        let other = folder.join(".other.vhdx.0123abcd.partial");
        std::fs::write(&other, b"x").unwrap();
        let recorded = record(data.path(), id, &spec(&disk), std::slice::from_ref(&tmp)).unwrap();
        assert!(recorded.path.is_file());
        // The record is versioned JSON naming what the job owns.
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&recorded.path).unwrap()).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["job_type"], "disk-convert");
        assert_eq!(v["temporary_files"][0], tmp.display().to_string());
        std::mem::forget(recorded);

        let jobs = JobEngine::new(JobEngineConfig::default(), None);
        let r = recover(data.path(), &jobs);
        assert_eq!(r.killed, [id]);
        let job = jobs.get(id).unwrap();
        assert_eq!(job.state, JobState::Killed);
        assert_eq!(job.error_description.as_deref(), Some(INTERRUPTED));
        assert_eq!(job.job_type, "disk-convert");
        assert_eq!(job.affected, spec(&disk).affected);
        assert!(!tmp.exists() && !older.exists());
        assert!(
            other.exists(),
            "a leftover of another disk outside the data dir stays"
        );
        assert_eq!(std::fs::read_dir(dir(data.path())).unwrap().count(), 0);
        // A second start finds nothing more.
        let again = recover(
            data.path(),
            &JobEngine::new(JobEngineConfig::default(), None),
        );
        assert!(again.killed.is_empty() && again.removed.is_empty());
    }

    #[tokio::test]
    async fn a_job_cut_off_after_naming_its_file_is_completed_and_keeps_it() {
        // Create and convert link the finished file to its name, then unlink the
        // temporary name: a kill between the two leaves both names on one file.
        let data = tempfile::tempdir().unwrap();
        let disk = data.path().join("made.vhdx");
        let id = Uuid::new_v4();
        let tmp = vhd::ops::partial::partial_path(&disk, &id.to_string());
        std::fs::write(&tmp, b"a whole disk").unwrap();
        std::fs::hard_link(&tmp, &disk).unwrap();
        // A second job whose temporary file is only beside an existing disk.
        let other_disk = data.path().join("kept.vhdx");
        std::fs::write(&other_disk, b"older").unwrap();
        let other = Uuid::new_v4();
        let other_tmp = vhd::ops::partial::partial_path(&other_disk, &other.to_string());
        std::fs::write(&other_tmp, b"half").unwrap();
        for (job, d, t) in [(id, &disk, &tmp), (other, &other_disk, &other_tmp)] {
            let r = record(data.path(), job, &spec(d), std::slice::from_ref(t)).unwrap();
            std::mem::forget(r);
        }
        let jobs = JobEngine::new(JobEngineConfig::default(), None);
        let r = recover(data.path(), &jobs);
        assert_eq!(r.completed, [id]);
        assert_eq!(r.killed, [other]);
        let job = jobs.get(id).unwrap();
        assert_eq!(job.state, JobState::Completed);
        assert_eq!(job.percent_complete, 100);
        assert_eq!(job.error_description, None);
        assert_eq!(std::fs::read(&disk).unwrap(), b"a whole disk");
        assert!(!tmp.exists() && !other_tmp.exists());
        assert_eq!(std::fs::read(&other_disk).unwrap(), b"older");
        assert_eq!(jobs.get(other).unwrap().state, JobState::Killed);
    }

    #[tokio::test]
    async fn a_finished_job_leaves_no_record_and_no_temporary_file() {
        let data = tempfile::tempdir().unwrap();
        let disk = data.path().join("d.vhd");
        let tmp = vhd::ops::partial::partial_path(&disk, "0123abcd");
        std::fs::write(&tmp, b"x").unwrap();
        let recorded = record(data.path(), Uuid::new_v4(), &spec(&disk), &[]).unwrap();
        recorded.finish(std::slice::from_ref(&tmp));
        assert!(!tmp.exists());
        assert_eq!(std::fs::read_dir(dir(data.path())).unwrap().count(), 0);
        let jobs = JobEngine::new(JobEngineConfig::default(), None);
        assert!(recover(data.path(), &jobs).killed.is_empty());
        assert!(jobs.list().is_empty());
    }

    #[tokio::test]
    async fn leftovers_in_the_disk_folders_go_unless_locked_and_ordinary_files_stay() {
        let data = tempfile::tempdir().unwrap();
        let disks = data.path().join(crate::vms::store::DISKS_FOLDER);
        let vm_disks = data
            .path()
            .join("vms/0f0e0d0c-0000-4000-8000-000000000001")
            .join(crate::vms::store::DISKS_FOLDER);
        std::fs::create_dir_all(&disks).unwrap();
        std::fs::create_dir_all(&vm_disks).unwrap();
        let stale = [
            disks.join(".a.vhdx.0123abcd.creating"),
            disks.join(".a.vhdx.0f1e2d3c-aaaa-bbbb-cccc-000011112222.partial"),
            vm_disks.join(".b.vhd.compacting"),
        ];
        for f in &stale {
            std::fs::write(f, b"x").unwrap();
        }
        let kept = [
            disks.join("a.vhdx"),
            disks.join(".hidden"),
            vm_disks.join("b.vhd"),
        ];
        for f in &kept {
            std::fs::write(f, b"x").unwrap();
        }
        let busy = disks.join(".c.vhd.89abcdef.partial");
        std::fs::write(&busy, b"x").unwrap();
        let held = vhd::host_file::open_locked(&busy, false).unwrap();
        // The lock is per open file: a second open in this process conflicts too.
        let r = recover(
            data.path(),
            &JobEngine::new(JobEngineConfig::default(), None),
        );
        let mut removed = r.removed.clone();
        removed.sort();
        let mut want = stale.to_vec();
        want.sort();
        assert_eq!(removed, want);
        assert!(kept.iter().all(|f| f.exists()));
        assert!(
            busy.exists(),
            "a temporary file someone holds is not a leftover"
        );
        drop(held);
    }

    #[tokio::test]
    async fn an_unreadable_record_is_moved_aside_and_does_not_stop_the_start() {
        let data = tempfile::tempdir().unwrap();
        let d = dir(data.path());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("junk.json"), b"{not json").unwrap();
        std::fs::write(d.join(".x.json.tmp"), b"{").unwrap();
        let jobs = JobEngine::new(JobEngineConfig::default(), None);
        assert!(recover(data.path(), &jobs).killed.is_empty());
        assert!(d.join("junk.json.unreadable").is_file());
        assert!(!d.join("junk.json").exists() && !d.join(".x.json.tmp").exists());
    }
}
