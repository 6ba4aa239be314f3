//! `POST /v1/vms/{vm}/export`, `POST /v1/vms/import`, `POST /v1/vms/import/check`.

use std::sync::Arc;

use api::transfer::{ExportRequest, ImportRequest};
use hyper::body::Incoming;
use hyper::Response;

use crate::convert;
use crate::error::ApiError;
use crate::http::body::{accepted, json, read_json, Body};
use crate::service::Service;
use crate::transfer;

type Answer = Result<Response<Body>, ApiError>;

pub async fn export(svc: &Arc<Service>, vm: &str, body: Incoming) -> Answer {
    let req: ExportRequest = read_json(body).await?;
    let job = transfer::submit_export(svc, vm, req)?;
    Ok(accepted(&convert::job(&job)))
}

pub async fn import(svc: &Arc<Service>, body: Incoming) -> Answer {
    let req: ImportRequest = read_json(body).await?;
    let svc2 = svc.clone();
    // The checks read disk headers: off the async threads.
    let job = tokio::task::spawn_blocking(move || transfer::submit_import(&svc2, req))
        .await
        .map_err(|e| ApiError::internal(format!("the import check failed unexpectedly: {e}")))??;
    Ok(accepted(&convert::job(&job)))
}

pub async fn check_import(svc: &Arc<Service>, body: Incoming) -> Answer {
    let req: ImportRequest = read_json(body).await?;
    transfer::confine_import(svc, &req)?;
    let svc2 = svc.clone();
    let report = tokio::task::spawn_blocking(move || transfer::check_import(&svc2, &req))
        .await
        .map_err(|e| ApiError::internal(format!("the import check failed unexpectedly: {e}")))?;
    Ok(json(200, &report))
}
