//! `/v1/vms/{vm}/checkpoints...`: list, create, rename, apply, delete (and subtree).

use std::sync::Arc;

use api::checkpoints::{CreateCheckpointRequest, RenameCheckpointRequest};
use hyper::body::Incoming;
use hyper::Response;

use crate::checkpoints;
use crate::convert;
use crate::error::ApiError;
use crate::http::body::{accepted, json, parse_json, read_bytes, read_json, Body};
use crate::service::Service;

type Answer = Result<Response<Body>, ApiError>;

pub fn list(svc: &Arc<Service>, vm: &str) -> Answer {
    Ok(json(200, &checkpoints::list(svc, vm)?))
}

pub async fn create(svc: &Arc<Service>, vm: &str, body: Incoming) -> Answer {
    let bytes = read_bytes(body).await?;
    let req: CreateCheckpointRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        CreateCheckpointRequest::default()
    } else {
        parse_json(&bytes)?
    };
    let job = checkpoints::submit_create(svc, vm, req)?;
    Ok(accepted(&convert::job(&job)))
}

pub async fn rename(svc: &Arc<Service>, vm: &str, cp: &str, body: Incoming) -> Answer {
    let req: RenameCheckpointRequest = read_json(body).await?;
    Ok(json(
        200,
        &checkpoints::rename(svc, vm, cp, &req.name).await?,
    ))
}

pub fn apply(svc: &Arc<Service>, vm: &str, cp: &str) -> Answer {
    let job = checkpoints::submit_apply(svc, vm, cp)?;
    Ok(accepted(&convert::job(&job)))
}

pub fn delete(svc: &Arc<Service>, vm: &str, cp: &str, subtree: bool) -> Answer {
    let job = checkpoints::submit_delete(svc, vm, cp, subtree)?;
    Ok(accepted(&convert::job(&job)))
}
