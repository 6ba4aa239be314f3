//! The job engine: Hyper-V's `Msvm_ConcreteJob`, for Viridian's long operations.
//!
//! A job has a CIM state ([`JobState`]), a percent, an error code and description,
//! created/started/finished times, a cancellable flag and the elements it affected.
//! Finished jobs are kept for a retention time and up to a count (oldest finished
//! expired first, running jobs never); a compact [`JobOutcome`] outlives each job.

mod engine;
mod record;
mod state;

pub use engine::{EventSink, JobContext, JobEngine, JobEngineConfig, Lookup};
pub use record::{AffectedElement, JobError, JobOutcome, JobSnapshot, JobSpec};
pub use state::JobState;

use uuid::Uuid;

/// Errors from asking the engine about or for a job.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job {0} does not exist; `GET /v1/jobs` lists the jobs that do")]
    NotFound(Uuid),
    #[error("job {} has expired; it ended in state {} ({})", .0.id, .0.state, .0.state.number())]
    Expired(JobOutcome),
    #[error("job {id} ({job_type}) cannot be cancelled")]
    NotCancellable { id: Uuid, job_type: String },
    #[error("job {id} has already finished in state {state}; there is nothing to cancel")]
    AlreadyFinished { id: Uuid, state: JobState },
}
