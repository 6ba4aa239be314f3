//! Reading request bodies and writing JSON responses.

use std::convert::Infallible;

use api::{ErrorBody, ErrorCode};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// Reads a request body of at most `MAX_BODY_BYTES`.
pub async fn read_bytes(body: Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, api::MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body is larger than {} bytes",
                api::MAX_BODY_BYTES
            ),
        )),
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
