//! Reading request bodies and writing JSON responses.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use api::{ErrorBody, ErrorCode};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// Milliseconds a client gets to send a whole request body (`--body-timeout`).
static BODY_TIMEOUT_MS: AtomicU64 = AtomicU64::new(30_000);

/// Sets how long a client gets to send a whole request body (once, at start).
pub fn set_body_timeout(timeout: Duration) {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    BODY_TIMEOUT_MS.store(ms, Ordering::Relaxed);
}

pub fn body_timeout() -> Duration {
    Duration::from_millis(BODY_TIMEOUT_MS.load(Ordering::Relaxed))
}

pub fn too_large() -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "the request body is larger than {} bytes, the most this service takes",
            api::MAX_BODY_BYTES
        ),
    )
}

/// Whether the request announces (`Content-Length`) a body over `MAX_BODY_BYTES`:
/// such a request is refused before anything of it is read.
pub fn announced_too_large(body: &Incoming) -> bool {
    body.size_hint().lower() > api::MAX_BODY_BYTES as u64
}

/// Reads a request body of at most `MAX_BODY_BYTES` within the body time-out.
pub async fn read_bytes(body: Incoming) -> Result<Bytes, ApiError> {
    if announced_too_large(&body) {
        return Err(too_large());
    }
    let timeout = body_timeout();
    let collected = match tokio::time::timeout(
        timeout,
        Limited::new(body, api::MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(collected) => collected,
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} s; send it in one go",
                    timeout.as_secs_f64()
                ),
            ))
        }
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            ErrorCode::MalformedRequest,
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// Parses a JSON body of type `T` (no unknown fields: the types deny them). Every
/// body the API takes is an object: anything else is refused here, before serde,
/// whose derived structs would also take a positional array (`[null, null]`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Some(kind) = not_an_object(bytes) {
        return Err(ApiError::new(
            ErrorCode::MalformedRequest,
            format!("the request body is {kind}, but this endpoint takes a JSON object ({{...}})"),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedRequest,
            format!("the request body is not valid here: {e}"),
        )
    })
}

/// What the body is when it is not a JSON object: `None` when it starts like one
/// (serde then checks the rest).
fn not_an_object(bytes: &[u8]) -> Option<&'static str> {
    // JSON's white space: space, tab, line feed, carriage return.
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    Some(match first {
        b'{' => return None,
        b'[' => "a JSON array",
        b'"' => "a JSON string",
        b'n' => "JSON null",
        b't' | b'f' => "a JSON boolean",
        b'-' | b'0'..=b'9' => "a JSON number",
        _ => "not JSON",
    })
}

/// Reads a JSON body of type `T`: at most `MAX_BODY_BYTES`, no unknown fields.
pub async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, ApiError> {
    let bytes = read_bytes(body).await?;
    if bytes.is_empty() {
        return Err(ApiError::new(
            ErrorCode::MalformedRequest,
            "this request needs a JSON body",
        ));
    }
    parse_json(&bytes)
}

pub fn json<T: Serialize>(status: u16, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(full(bytes))
            .unwrap_or_else(|_| plain_500()),
        Err(_) => plain_500(),
    }
}

/// 202 Accepted with `Location: /v1/jobs/<id>` and the job.
pub fn accepted(job: &api::jobs::Job) -> Response<Body> {
    let mut resp = json(202, job);
    if let Ok(v) = format!("/v1/jobs/{}", job.id).parse() {
        resp.headers_mut().insert("location", v);
    }
    resp
}

pub fn no_content() -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

pub fn error(e: &ApiError) -> Response<Body> {
    let body = ErrorBody {
        code: e.code,
        message: e.message.clone(),
        details: e.details.clone(),
    };
    let mut resp = json(e.code.http_status(), &body);
    if let Some(v) = e.retry_after.and_then(|s| s.to_string().parse().ok()) {
        resp.headers_mut().insert("retry-after", v);
    }
    if e.code == ErrorCode::Unauthorized {
        if let Ok(v) = "Bearer".parse() {
            resp.headers_mut().insert("www-authenticate", v);
        }
    }
    resp
}

fn plain_500() -> Response<Body> {
    let mut resp = Response::new(full(
        r#"{"code":"Internal","message":"cannot encode the response"}"#,
    ));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp
}
