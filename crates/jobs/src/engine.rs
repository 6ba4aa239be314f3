//! The engine: runs jobs on tokio, tracks their state, expires finished ones.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::{AffectedElement, JobError, JobOutcome, JobSnapshot, JobSpec, JobState, JobsError};

/// Retention settings.
#[derive(Debug, Clone)]
pub struct JobEngineConfig {
    /// How long a finished job is kept in full (default 5 minutes).
    pub retention: Duration,
    /// How many finished jobs are kept in full at most (default 4096).
    pub limit: usize,
    /// How long an outcome record is kept after its job expired (default 24 hours).
    pub outcome_retention: Duration,
    /// How many outcome records are kept at most (default 16384).
    pub outcome_limit: usize,
}

impl Default for JobEngineConfig {
    fn default() -> Self {
        JobEngineConfig {
            retention: Duration::from_secs(300),
            limit: 4096,
            outcome_retention: Duration::from_secs(24 * 3600),
            outcome_limit: 16384,
        }
    }
}

/// Receives every change of every job, in order, while the engine's lock is held
/// (so it must be quick and must not call back into the engine).
pub type EventSink = Arc<dyn Fn(&JobSnapshot) + Send + Sync>;

/// The answer to "what about job X?".
#[derive(Debug, Clone)]
pub enum Lookup {
    Live(JobSnapshot),
    Expired(JobOutcome),
    Unknown,
}

struct Entry {
    record: watch::Sender<JobSnapshot>,
    cancel: Arc<CancelFlag>,
}

#[derive(Default)]
struct CancelFlag {
    requested: AtomicBool,
    notify: Notify,
}

#[derive(Default)]
struct Tables {
    /// Every job held in full, by id.
    jobs: HashMap<Uuid, Entry>,
    /// Submission numbers and ids of the jobs in `jobs` submitted so far, in
    /// submission order (for listing, and as the cursor of a listing's pages).
    order: VecDeque<(u64, Uuid)>,
    /// The submission number of the next job.
    next_seq: u64,
    /// Finished jobs in the order they finished: the expiry queue.
    finished: VecDeque<(Uuid, SystemTime)>,
    outcomes: HashMap<Uuid, JobOutcome>,
    outcome_order: VecDeque<(Uuid, SystemTime)>,
}

struct Shared {
    config: JobEngineConfig,
    tables: Mutex<Tables>,
    sink: Option<EventSink>,
}

/// Runs and tracks jobs. Cheap to clone; all clones share one table.
#[derive(Clone)]
pub struct JobEngine {
    shared: Arc<Shared>,
}

/// Handed to a job's work: report progress, learn of cancellation, name what was affected.
#[derive(Clone)]
pub struct JobContext {
    id: Uuid,
    shared: Arc<Shared>,
    cancel: Arc<CancelFlag>,
}

impl JobContext {
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Sets the percent complete (clamped to 99 until the job completes).
    pub fn set_percent(&self, percent: u8) {
        let percent = percent.min(99);
        self.shared.update(self.id, |s| {
            if s.percent_complete == percent || s.state.is_finished() {
                return false;
            }
            s.percent_complete = percent;
            true
        });
    }

    /// Sets the percent from a done/total pair.
    pub fn set_progress(&self, done: u64, total: u64) {
        let percent = if total == 0 {
            0
        } else {
            (done.min(total) as u128 * 100 / total as u128) as u8
        };
        self.set_percent(percent);
    }

    /// Whether someone asked this job to stop.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.requested.load(Ordering::SeqCst)
    }

    /// Resolves once cancellation is requested.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.cancel.notify.notified();
            if self.cancel_requested() {
                return;
            }
            notified.await;
        }
    }

    /// Replaces the job's description (when the work turns out other than announced).
    pub fn set_description(&self, description: impl Into<String>) {
        let description = description.into();
        self.shared.update(self.id, |s| {
            s.description = description;
            true
        });
    }

    /// Records one more element the job affected (e.g. the disk it just made).
    pub fn add_affected(&self, element: AffectedElement) {
        self.shared.update(self.id, |s| {
            s.affected.push(element);
            true
        });
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding this lock would be a bug in this file; the tables stay
        // consistent between statements, so carrying on with them is sound.
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `change` to job `id`; when it returns true, publishes the new snapshot.
    fn update(&self, id: Uuid, change: impl FnOnce(&mut JobSnapshot) -> bool) {
        let mut tables = self.lock();
        self.update_locked(&mut tables, id, change);
    }

    fn update_locked(
        &self,
        tables: &mut Tables,
        id: Uuid,
        change: impl FnOnce(&mut JobSnapshot) -> bool,
    ) {
        let Some(entry) = tables.jobs.get(&id) else {
            return;
        };
        let mut changed = false;
        entry.record.send_if_modified(|s| {
            changed = change(s);
            changed
        });
        if changed {
            if let Some(sink) = &self.sink {
                sink(&entry.record.borrow());
            }
        }
    }

    fn finish(&self, id: Uuid, result: Result<(), JobError>, killed: Option<String>) {
        let now = SystemTime::now();
        let mut tables = self.lock();
        let cancel_requested = tables
            .jobs
            .get(&id)
            .map(|e| e.cancel.requested.load(Ordering::SeqCst))
            .unwrap_or(false);
        self.update_locked(&mut tables, id, |s| {
            match (&result, &killed) {
                (_, Some(why)) => {
                    s.state = JobState::Killed;
                    s.error_code = Some("Killed".into());
                    s.error_description = Some(why.clone());
                }
                (Ok(()), None) => {
                    s.state = JobState::Completed;
                    s.percent_complete = 100;
                }
                (Err(JobError::Cancelled), None) => {
                    s.state = JobState::Terminated;
                    s.error_code = Some("Cancelled".into());
                    s.error_description = Some(if cancel_requested {
                        "The job was cancelled at the caller's request.".into()
                    } else {
                        "The job stopped before finishing.".into()
                    });
                }
                (Err(JobError::Failed { code, description }), None) => {
                    s.state = JobState::Exception;
                    s.error_code = Some(code.clone());
                    s.error_description = Some(description.clone());
                }
            }
            s.finished = Some(now);
            true
        });
        tables.finished.push_back((id, now));
        self.expire_locked(&mut tables, now);
    }

    /// Expires finished jobs past the retention time or beyond the count, oldest
    /// finished first, keeping an outcome record of each; then trims outcome records.
    fn expire_locked(&self, tables: &mut Tables, now: SystemTime) {
        let config = &self.config;
        while let Some(&(id, finished)) = tables.finished.front() {
            let too_old = now.duration_since(finished).unwrap_or_default() >= config.retention;
            let too_many = tables.finished.len() > config.limit;
            if !too_old && !too_many {
                break;
            }
            tables.finished.pop_front();
            if let Some(entry) = tables.jobs.remove(&id) {
                let outcome = entry.record.borrow().outcome();
                tables.outcomes.insert(id, outcome);
                tables.outcome_order.push_back((id, finished));
            }
        }
        if tables.order.len() > tables.jobs.len() * 2 + 64 {
            let jobs = &tables.jobs;
            tables.order.retain(|(_, id)| jobs.contains_key(id));
        }
        while let Some(&(id, finished)) = tables.outcome_order.front() {
            let too_old =
                now.duration_since(finished).unwrap_or_default() >= config.outcome_retention;
            if !too_old && tables.outcome_order.len() <= config.outcome_limit {
                break;
            }
            tables.outcome_order.pop_front();
            tables.outcomes.remove(&id);
        }
    }
}

impl JobEngine {
    /// Makes an engine. `sink`, when given, hears every job change in order.
    /// Must be called inside a tokio runtime (a sweeper task expires old jobs).
    pub fn new(config: JobEngineConfig, sink: Option<EventSink>) -> Self {
        let shared = Arc::new(Shared {
            config,
            tables: Mutex::default(),
            sink,
        });
        let weak = Arc::downgrade(&shared);
        let tick =
            (shared.config.retention / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(shared) = weak.upgrade() else { return };
                let mut tables = shared.lock();
                shared.expire_locked(&mut tables, SystemTime::now());
            }
        });
        JobEngine { shared }
    }

    pub fn config(&self) -> &JobEngineConfig {
        &self.shared.config
    }

    /// Starts a job running `work` and returns its first snapshot (state New).
    pub fn submit<F, Fut>(&self, spec: JobSpec, work: F) -> JobSnapshot
    where
        F: FnOnce(JobContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        self.submit_as(Uuid::new_v4(), spec, work)
    }

    /// [`JobEngine::submit`] with an ID the caller chose (a fresh one, e.g. to
    /// record the job on disk under it before it starts).
    pub fn submit_as<F, Fut>(&self, id: Uuid, spec: JobSpec, work: F) -> JobSnapshot
    where
        F: FnOnce(JobContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let snapshot = JobSnapshot {
            id,
            job_type: spec.job_type,
            description: spec.description,
            state: JobState::New,
            percent_complete: 0,
            error_code: None,
            error_description: None,
            created: SystemTime::now(),
            started: None,
            finished: None,
            cancellable: spec.cancellable,
            affected: spec.affected,
        };
        let cancel = Arc::new(CancelFlag::default());
        {
            let mut tables = self.shared.lock();
            let (record, _) = watch::channel(snapshot.clone());
            tables.jobs.insert(
                id,
                Entry {
                    record,
                    cancel: cancel.clone(),
                },
            );
            let seq = tables.next_seq;
            tables.next_seq += 1;
            tables.order.push_back((seq, id));
            if let Some(sink) = &self.shared.sink {
                sink(&snapshot);
            }
        }
        let ctx = JobContext {
            id,
            shared: self.shared.clone(),
            cancel,
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            shared.update(id, |s| {
                if s.state != JobState::New {
                    return false;
                }
                s.state = JobState::Running;
                s.started = Some(SystemTime::now());
                true
            });
            let inner = tokio::spawn(work(ctx));
            match inner.await {
                Ok(result) => shared.finish(id, result, None),
                Err(join) => {
                    let why = if join.is_panic() {
                        "The job's work failed unexpectedly (an internal error); see the service log."
                    } else {
                        "The job's work was stopped by the service."
                    };
                    shared.finish(id, Ok(()), Some(why.into()))
                }
            }
        });
        snapshot
    }

    /// Adds a job that ran in an earlier life of the service and was cut off by
    /// its end (a crash, a kill): it is listed and expires like any finished job,
    /// in state Killed with `why` as its error description. Does nothing when a
    /// job with this ID is already known.
    pub fn restore_killed(
        &self,
        id: Uuid,
        spec: JobSpec,
        created: SystemTime,
        why: impl Into<String>,
    ) -> JobSnapshot {
        self.restore(id, spec, created, Some(why.into()))
    }

    /// Adds a job of an earlier life of the service whose work was done (its
    /// result in place) when that life ended, before it could say so: listed as
    /// Completed like any finished job. Does nothing when the ID is known.
    pub fn restore_completed(&self, id: Uuid, spec: JobSpec, created: SystemTime) -> JobSnapshot {
        self.restore(id, spec, created, None)
    }

    /// A finished job of an earlier life: Killed with `killed`'s reason, or Completed.
    fn restore(
        &self,
        id: Uuid,
        spec: JobSpec,
        created: SystemTime,
        killed: Option<String>,
    ) -> JobSnapshot {
        let now = SystemTime::now();
        let snapshot = JobSnapshot {
            id,
            job_type: spec.job_type,
            description: spec.description,
            state: if killed.is_some() {
                JobState::Killed
            } else {
                JobState::Completed
            },
            percent_complete: if killed.is_some() { 0 } else { 100 },
            error_code: killed.as_ref().map(|_| "Killed".into()),
            error_description: killed,
            created,
            started: Some(created),
            finished: Some(now),
            cancellable: false,
            affected: spec.affected,
        };
        let mut tables = self.shared.lock();
        if tables.jobs.contains_key(&id) || tables.outcomes.contains_key(&id) {
            return snapshot;
        }
        let (record, _) = watch::channel(snapshot.clone());
        tables.jobs.insert(
            id,
            Entry {
                record,
                cancel: Arc::default(),
            },
        );
        let seq = tables.next_seq;
        tables.next_seq += 1;
        tables.order.push_back((seq, id));
        tables.finished.push_back((id, now));
        if let Some(sink) = &self.shared.sink {
            sink(&snapshot);
        }
        self.shared.expire_locked(&mut tables, now);
        snapshot
    }

    /// The job in full, its outcome if it expired, or Unknown.
    pub fn lookup(&self, id: Uuid) -> Lookup {
        let mut tables = self.shared.lock();
        self.shared.expire_locked(&mut tables, SystemTime::now());
        if let Some(entry) = tables.jobs.get(&id) {
            return Lookup::Live(entry.record.borrow().clone());
        }
        match tables.outcomes.get(&id) {
            Some(outcome) => Lookup::Expired(outcome.clone()),
            None => Lookup::Unknown,
        }
    }

    /// The job in full, or an error saying it expired or never existed.
    pub fn get(&self, id: Uuid) -> Result<JobSnapshot, JobsError> {
        match self.lookup(id) {
            Lookup::Live(s) => Ok(s),
            Lookup::Expired(o) => Err(JobsError::Expired(o)),
            Lookup::Unknown => Err(JobsError::NotFound(id)),
        }
    }

    /// The outcome of a job, live or expired: `None` while it runs or if unknown.
    pub fn outcome(&self, id: Uuid) -> Result<JobOutcome, JobsError> {
        match self.lookup(id) {
            Lookup::Live(s) => Ok(s.outcome()),
            Lookup::Expired(o) => Ok(o),
            Lookup::Unknown => Err(JobsError::NotFound(id)),
        }
    }

    /// Every job held in full, oldest submitted first.
    pub fn list(&self) -> Vec<JobSnapshot> {
        self.list_page(None, usize::MAX).0
    }

    /// At most `limit` jobs held in full, oldest submitted first, starting after the
    /// cursor `after` (from an earlier page); with the cursor of the next page when
    /// more jobs follow.
    pub fn list_page(&self, after: Option<u64>, limit: usize) -> (Vec<JobSnapshot>, Option<u64>) {
        let mut tables = self.shared.lock();
        self.shared.expire_locked(&mut tables, SystemTime::now());
        let start = after.map_or(0, |a| tables.order.partition_point(|&(seq, _)| seq <= a));
        let mut page = Vec::new();
        let mut last = None;
        let live = tables
            .order
            .range(start..)
            .filter_map(|(seq, id)| tables.jobs.get(id).map(|e| (*seq, e)));
        for (seq, entry) in live {
            if page.len() == limit {
                return (page, last);
            }
            page.push(entry.record.borrow().clone());
            last = Some(seq);
        }
        (page, None)
    }

    /// Number of jobs held in full and outcome records held, for tests and benchmarks.
    pub fn counts(&self) -> (usize, usize) {
        let tables = self.shared.lock();
        (tables.jobs.len(), tables.outcomes.len())
    }

    /// Waits until the job finishes or `timeout` passes; returns the job as it then is
    /// (check `state.is_finished()` to tell the two apart).
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> Result<JobSnapshot, JobsError> {
        let mut rx = {
            let tables = self.shared.lock();
            match tables.jobs.get(&id) {
                Some(entry) => entry.record.subscribe(),
                None => {
                    drop(tables);
                    return self.get(id);
                }
            }
        };
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.state.is_finished())).await;
        let snapshot = rx.borrow().clone();
        Ok(snapshot)
    }

    /// Asks a job to stop. The job moves to ShuttingDown, then Terminated once its
    /// work has stopped at a consistent point.
    pub fn cancel(&self, id: Uuid) -> Result<JobSnapshot, JobsError> {
        let mut tables = self.shared.lock();
        let (cancellable, state, job_type, flag) = match tables.jobs.get(&id) {
            Some(e) => {
                let s = e.record.borrow();
                (s.cancellable, s.state, s.job_type.clone(), e.cancel.clone())
            }
            None => {
                drop(tables);
                return match self.lookup(id) {
                    Lookup::Expired(o) => Err(JobsError::AlreadyFinished { id, state: o.state }),
                    _ => Err(JobsError::NotFound(id)),
                };
            }
        };
        if state.is_finished() {
            return Err(JobsError::AlreadyFinished { id, state });
        }
        if !cancellable {
            return Err(JobsError::NotCancellable { id, job_type });
        }
        flag.requested.store(true, Ordering::SeqCst);
        flag.notify.notify_waiters();
        self.shared.update_locked(&mut tables, id, |s| {
            if s.state.is_finished() || s.state == JobState::ShuttingDown {
                return false;
            }
            s.state = JobState::ShuttingDown;
            true
        });
        let snapshot = tables.jobs.get(&id).map(|e| e.record.borrow().clone());
        drop(tables);
        snapshot.ok_or(JobsError::NotFound(id))
    }
}

#[cfg(test)]
mod tests;
