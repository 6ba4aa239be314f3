//! Disk operations as jobs: parse the request, resolve paths, run the engine's
//! operation on a blocking thread with progress and cancellation.

use std::sync::Arc;

use api::disks::{
    CompactDiskRequest, ConvertDiskRequest, CreateDiskRequest, MergeDiskRequest, ResizeDiskRequest,
};
use api::ErrorCode;
use hyper::body::Incoming;
use hyper::Response;

use crate::error::ApiError;
use crate::handlers::disks::resolve;
use crate::http::body::{read_json, Body};
use crate::service::Service;

pub async fn submit(
    svc: &Arc<Service>,
    op: &str,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    let base = svc.disks_dir();
    let paths = match op {
        "create" => {
            let r: CreateDiskRequest = read_json(body).await?;
            vec![resolve(&base, &r.path)?]
        }
        "merge" => vec![resolve(
            &base,
            &read_json::<MergeDiskRequest>(body).await?.path,
        )?],
        "convert" => {
            let r: ConvertDiskRequest = read_json(body).await?;
            vec![resolve(&base, &r.path)?, resolve(&base, &r.destination)?]
        }
        "compact" => vec![resolve(
            &base,
            &read_json::<CompactDiskRequest>(body).await?.path,
        )?],
        "resize" => vec![resolve(
            &base,
            &read_json::<ResizeDiskRequest>(body).await?.path,
        )?],
        _ => {
            return Err(ApiError::not_found(format!(
                "there is no disk operation {op:?}; use create, merge, convert, compact or resize"
            )))
        }
    };
    Err(ApiError::new(
        ErrorCode::InvalidState,
        format!(
            "the storage engine's {op} operation (for {}) is not available in this build yet",
            paths[0].display()
        ),
    ))
}
