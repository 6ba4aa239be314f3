//! The error every handler returns, turned into `{"code", "message", "details"}`.

use api::ErrorCode;
use vm_config::ConfigError;

/// A failed request: a stable code, a sentence, optional details.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Option<serde_json::Value>,
    /// Seconds to send in `Retry-After` (with `TooManyRequests`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// 429 `TooManyRequests` with `Retry-After: seconds`.
    pub fn too_many(message: impl Into<String>, seconds: u64) -> Self {
        let mut e = ApiError::new(ErrorCode::TooManyRequests, message);
        e.retry_after = Some(seconds);
        e
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        ApiError::new(ErrorCode::NotFound, what.to_string())
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InvalidParameter, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Internal, message)
    }
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        let code = match &e {
            ConfigError::DiskInUse { .. } | ConfigError::MacInUse { .. } => ErrorCode::InUse,
            ConfigError::SlotTaken(_) => ErrorCode::AlreadyExists,
            _ => ErrorCode::InvalidParameter,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<jobs::JobsError> for ApiError {
    fn from(e: jobs::JobsError) -> Self {
        use jobs::JobsError as E;
        match &e {
            E::NotFound(_) => ApiError::new(ErrorCode::NotFound, e.to_string()),
            E::Expired(outcome) => ApiError::new(ErrorCode::JobExpired, e.to_string())
                .with_details(
                    serde_json::to_value(crate::convert::outcome(outcome)).unwrap_or_default(),
                ),
            E::NotCancellable { .. } | E::AlreadyFinished { .. } => {
                ApiError::new(ErrorCode::InvalidState, e.to_string())
            }
        }
    }
}

/// A failed request inside a job: the job ends in Exception with the same code.
impl From<ApiError> for jobs::JobError {
    fn from(e: ApiError) -> Self {
        jobs::JobError::failed(e.code.name(), e.message)
    }
}

/// Runs blocking file work of a job off the async threads; its `ApiError` becomes
/// the job's error. `what` names the work if the thread itself fails.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, jobs::JobError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(jobs::JobError::failed(
            "Internal",
            format!("{what} failed unexpectedly: {e}"),
        )),
    }
}
