//! The error body every failed request answers with.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Stable error codes scripts can switch on. New codes may be added; existing ones
/// keep their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ErrorCode {
    /// The VM, job, drive or adapter named does not exist.
    NotFound,
    /// The object is in a state that does not allow this (e.g. a finished job).
    InvalidState,
    /// A value in the request breaks a rule (range, slot, generation, path ...).
    InvalidParameter,
    /// The body is not the JSON this endpoint takes (syntax, unknown field, type).
    MalformedRequest,
    /// Something with this name or in this place already exists.
    AlreadyExists,
    /// The object is used by something else (a disk attached to another VM).
    InUse,
    /// TCP request without the right bearer token.
    Unauthorized,
    /// A path outside the host's storage roots (or escaping one through `..` or a
    /// symlink); the message names the roots.
    Forbidden,
    /// The body exceeds the size limit.
    PayloadTooLarge,
    /// The path exists but not with this method.
    MethodNotAllowed,
    /// The job has expired; `details` holds its outcome record.
    JobExpired,
    /// The VM is damaged; repair or remove it first.
    Damaged,
    /// Starting the VM or the change would reserve more processor or memory than
    /// the host has; `details` holds the numbers.
    InsufficientResources,
    /// An import cannot go ahead; `details` is the whole report (`ImportReport`)
    /// with every problem found and what to do about each.
    ImportIncompatible,
    /// The request body did not arrive in time (see `--body-timeout`).
    RequestTimeout,
    /// A cap on running jobs or event listeners is reached; the `Retry-After`
    /// header says in how many seconds to try again.
    TooManyRequests,
    /// The service failed in a way that is not the caller's fault; see its log.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::InvalidState
            | ErrorCode::AlreadyExists
            | ErrorCode::InUse
            | ErrorCode::Damaged
            | ErrorCode::InsufficientResources => 409,
            ErrorCode::InvalidParameter | ErrorCode::ImportIncompatible => 422,
            ErrorCode::MalformedRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::JobExpired => 410,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Internal => 500,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "NotFound",
            ErrorCode::InvalidState => "InvalidState",
            ErrorCode::InvalidParameter => "InvalidParameter",
            ErrorCode::MalformedRequest => "MalformedRequest",
            ErrorCode::AlreadyExists => "AlreadyExists",
            ErrorCode::InUse => "InUse",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::PayloadTooLarge => "PayloadTooLarge",
            ErrorCode::MethodNotAllowed => "MethodNotAllowed",
            ErrorCode::JobExpired => "JobExpired",
            ErrorCode::ImportIncompatible => "ImportIncompatible",
            ErrorCode::Damaged => "Damaged",
            ErrorCode::InsufficientResources => "InsufficientResources",
            ErrorCode::RequestTimeout => "RequestTimeout",
            ErrorCode::TooManyRequests => "TooManyRequests",
            ErrorCode::Internal => "Internal",
        }
    }
}

/// `{"code": "InvalidState", "message": "...", "details": {...}}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// A sentence naming the object and the fault, and what to do next.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}
