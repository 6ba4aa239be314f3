//! What a job is and what it leaves behind.

use std::time::SystemTime;

use uuid::Uuid;

use crate::JobState;

/// Something a job touched or produced: the VM it worked on, the disk it created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffectedElement {
    /// What kind of thing it is, e.g. `vm`, `disk`, `checkpoint`.
    pub kind: String,
    /// Its identity: a UUID for a VM, a path for a disk.
    pub id: String,
}

impl AffectedElement {
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Self {
        AffectedElement {
            kind: kind.into(),
            id: id.into(),
        }
    }
}

/// What the caller says about a job when submitting it.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Stable machine-readable type, e.g. `CreateDisk`.
    pub job_type: String,
    /// One sentence for humans: "Create dynamic VHDX /x/y.vhdx of 10 GiB".
    pub description: String,
    pub cancellable: bool,
    pub affected: Vec<AffectedElement>,
}

/// The full state of a job at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSnapshot {
    pub id: Uuid,
    pub job_type: String,
    pub description: String,
    pub state: JobState,
    pub percent_complete: u8,
    pub error_code: Option<String>,
    pub error_description: Option<String>,
    pub created: SystemTime,
    pub started: Option<SystemTime>,
    pub finished: Option<SystemTime>,
    pub cancellable: bool,
    pub affected: Vec<AffectedElement>,
}

impl JobSnapshot {
    pub fn outcome(&self) -> JobOutcome {
        JobOutcome {
            id: self.id,
            job_type: self.job_type.clone(),
            state: self.state,
            error_code: self.error_code.clone(),
            error_description: self.error_description.clone(),
            finished: self.finished.unwrap_or(self.created),
        }
    }
}

/// The compact record that outlives a finished job: did it succeed, and if not, why.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub id: Uuid,
    pub job_type: String,
    pub state: JobState,
    pub error_code: Option<String>,
    pub error_description: Option<String>,
    pub finished: SystemTime,
}

/// How a job's work ended when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// The work stopped because cancellation was requested (state Terminated).
    Cancelled,
    /// The work failed (state Exception) with a stable code and a sentence.
    Failed { code: String, description: String },
}

/// The sentence a log line or a wrapping error shows: the description of a
/// failure, or that the work was cancelled.
impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Cancelled => f.write_str("cancelled"),
            JobError::Failed { description, .. } => f.write_str(description),
        }
    }
}

impl JobError {
    pub fn failed(code: impl Into<String>, description: impl Into<String>) -> Self {
        JobError::Failed {
            code: code.into(),
            description: description.into(),
        }
    }
}
