//! What can go wrong talking to the daemon, and the exit code each gives.
//!
//! Exit codes (stable; scripts may rely on them):
//! 0 success · 1 other error · 2 bad command line · 3 cannot reach viridiand ·
//! 4 NotFound · 5 invalid request (InvalidParameter, MalformedRequest, PayloadTooLarge) ·
//! 6 InvalidState, Damaged or JobExpired · 7 AlreadyExists · 8 InUse · 9 Unauthorized ·
//! 10 the job failed (Exception or Killed) · 11 the job was cancelled (Terminated) ·
//! 12 waiting timed out while the job still runs · 13 InsufficientResources ·
//! 14 TooManyRequests (a cap on running jobs or listeners; retry later).

use api::{ErrorBody, ErrorCode};

/// The exit codes as the manual page lists them (EXIT STATUS), in the order of
/// [`Failure::exit_code`].
pub const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Success."),
    ("1", "Any other error (MethodNotAllowed, RequestTimeout, Internal, a broken answer)."),
    ("2", "A bad command line (also --host without --token or --ca-cert)."),
    ("3", "viridiand cannot be reached. (viridian vhd check: problems remain.)"),
    ("4", "NotFound."),
    ("5", "An invalid request: InvalidParameter, MalformedRequest, PayloadTooLarge, ImportIncompatible."),
    ("6", "InvalidState, Damaged or JobExpired."),
    ("7", "AlreadyExists."),
    ("8", "InUse."),
    ("9", "Unauthorized."),
    ("10", "The job failed (Exception or Killed)."),
    ("11", "The job was cancelled (Terminated)."),
    ("12", "job wait --timeout ran out while the job still runs."),
    ("13", "InsufficientResources."),
    ("14", "TooManyRequests: a cap on running jobs or event listeners; retry later."),
    ("15", "Forbidden: a path outside the host's storage roots."),
];

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("cannot reach viridiand at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("{}", .0.message)]
    Api(ErrorBody),
    #[error("viridiand answered HTTP {status} without a readable error: {body}")]
    Protocol { status: u16, body: String },
    #[error("job {id} ended in state {state}: {description}")]
    JobFailed {
        id: String,
        state: String,
        description: String,
        cancelled: bool,
    },
    #[error("job {id} is still {state} ({percent} %) after waiting; wait again with `viridian job wait {id}`")]
    WaitTimedOut {
        id: String,
        state: String,
        percent: u8,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Other(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Connect { .. } => 3,
            Failure::Api(body) => match body.code {
                ErrorCode::NotFound => 4,
                ErrorCode::InvalidParameter
                | ErrorCode::MalformedRequest
                | ErrorCode::PayloadTooLarge
                | ErrorCode::ImportIncompatible => 5,
                ErrorCode::InvalidState | ErrorCode::Damaged | ErrorCode::JobExpired => 6,
                ErrorCode::AlreadyExists => 7,
                ErrorCode::InUse => 8,
                ErrorCode::Unauthorized => 9,
                ErrorCode::InsufficientResources => 13,
                ErrorCode::TooManyRequests => 14,
                ErrorCode::Forbidden => 15,
                ErrorCode::MethodNotAllowed | ErrorCode::RequestTimeout | ErrorCode::Internal => 1,
            },
            Failure::JobFailed {
                cancelled: true, ..
            } => 11,
            Failure::JobFailed { .. } => 10,
            Failure::WaitTimedOut { .. } => 12,
            Failure::Usage(_) => 2,
            Failure::Protocol { .. } | Failure::Other(_) => 1,
        }
    }

    /// The machine-readable form printed with `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Failure::Api(body) => serde_json::to_value(body).unwrap_or_default(),
            other => serde_json::json!({ "code": other.code_name(), "message": other.to_string() }),
        }
    }

    fn code_name(&self) -> &'static str {
        match self {
            Failure::Connect { .. } => "Unreachable",
            Failure::Api(b) => b.code.name(),
            Failure::Protocol { .. } => "Protocol",
            Failure::JobFailed {
                cancelled: true, ..
            } => "JobCancelled",
            Failure::JobFailed { .. } => "JobFailed",
            Failure::WaitTimedOut { .. } => "WaitTimedOut",
            Failure::Usage(_) => "Usage",
            Failure::Other(_) => "Error",
        }
    }
}

impl Failure {
    /// More lines to print under the error, where the daemon sent a report.
    pub fn details_text(&self) -> Option<String> {
        let Failure::Api(body) = self else {
            return None;
        };
        if body.code != ErrorCode::ImportIncompatible {
            return None;
        }
        let report: api::transfer::ImportReport =
            serde_json::from_value(body.details.clone()?).ok()?;
        Some(crate::transfer_cmd::report_text(&report))
    }
}
