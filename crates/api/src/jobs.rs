//! `/v1/jobs`: long operations, Hyper-V's `Msvm_ConcreteJob`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// CIM job state names; `state_number` carries CIM's number alongside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum JobStateName {
    New,
    Starting,
    Running,
    Suspended,
    ShuttingDown,
    Completed,
    Terminated,
    Killed,
    Exception,
}

impl JobStateName {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Terminated | Self::Killed | Self::Exception
        )
    }
}

/// Something a job touched or produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AffectedElement {
    /// `vm`, `disk`, ...
    pub kind: String,
    /// A VM's UUID, a disk's path, ...
    pub id: String,
}

/// A job in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Job {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: String,
    pub description: String,
    pub state: JobStateName,
    /// CIM `JobState`: 2 New, 3 Starting, 4 Running, 5 Suspended, 6 ShuttingDown,
    /// 7 Completed, 8 Terminated, 9 Killed, 10 Exception.
    pub state_number: u16,
    pub percent_complete: u8,
    pub error_code: Option<String>,
    pub error_description: Option<String>,
    /// RFC 3339 times.
    pub created: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub cancellable: bool,
    pub affected_elements: Vec<AffectedElement>,
}

/// The compact record kept after a job expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobOutcome {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: String,
    pub state: JobStateName,
    pub state_number: u16,
    pub error_code: Option<String>,
    pub error_description: Option<String>,
    pub finished: String,
}

/// Most jobs one page of `GET /v1/jobs` holds (also its default `limit`).
pub const MAX_JOBS_PER_PAGE: usize = 1000;

/// Longest `GET /v1/jobs/{id}/wait?timeout=` the service honours by default, in
/// seconds (`viridiand --max-wait`); a longer time-out is shortened to it.
pub const DEFAULT_MAX_WAIT_SECONDS: u64 = 300;

/// `GET /v1/jobs?limit=N&after=CURSOR`: one page of the jobs held in full, oldest
/// submitted first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Present when more jobs follow: pass it as `after` to get the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<u64>,
}

/// Longest diagnostic sleep job, in milliseconds.
pub const MAX_SLEEP_MILLISECONDS: u64 = 3_600_000;

/// `POST /v1/diagnostics/sleep-job`: a job that only waits, to check the job
/// machinery end to end (and to measure it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SleepJobRequest {
    /// How long the job runs, 0 to 3,600,000 ms.
    #[schemars(range(max = "MAX_SLEEP_MILLISECONDS"))]
    pub milliseconds: u64,
}
