//! `/v1/jobs/...` and the diagnostic sleep job.

use std::sync::Arc;
use std::time::Duration;

use api::jobs::{JobList, SleepJobRequest};
use hyper::body::Incoming;
use hyper::Response;
use jobs::{AffectedElement, JobError, JobSpec};
use uuid::Uuid;

use crate::convert;
use crate::error::ApiError;
use crate::http::body::{accepted, json, read_json, Body};
use crate::service::Service;

type Answer = Result<Response<Body>, ApiError>;

/// Longest `wait?timeout=` honoured, in seconds.
pub const MAX_WAIT_SECONDS: f64 = 3600.0;

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::not_found(format!("{id:?} is not a job id (job ids are UUIDs)")))
}

pub fn list(svc: &Arc<Service>) -> Answer {
    let jobs = svc.jobs.list().iter().map(convert::job).collect();
    Ok(json(200, &JobList { jobs }))
}

pub fn get(svc: &Arc<Service>, id: &str) -> Answer {
    Ok(json(200, &convert::job(&svc.jobs.get(parse_id(id)?)?)))
}

pub fn outcome(svc: &Arc<Service>, id: &str) -> Answer {
    Ok(json(
        200,
        &convert::outcome(&svc.jobs.outcome(parse_id(id)?)?),
    ))
}

pub fn cancel(svc: &Arc<Service>, id: &str) -> Answer {
    let job = svc.jobs.cancel(parse_id(id)?)?;
    tracing::info!(job = %job.id, "job cancellation requested");
    Ok(accepted(&convert::job(&job)))
}

pub async fn wait(svc: &Arc<Service>, id: &str, timeout: Option<&str>) -> Answer {
    let id = parse_id(id)?;
    let seconds = match timeout {
        None => MAX_WAIT_SECONDS,
        Some(t) => match t.parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => s.min(MAX_WAIT_SECONDS),
            _ => {
                return Err(ApiError::invalid(format!(
                    "timeout {t:?} is not a number of seconds from 0 to 3600"
                )))
            }
        },
    };
    let job = svc.jobs.wait(id, Duration::from_secs_f64(seconds)).await?;
    Ok(json(200, &convert::job(&job)))
}

pub async fn sleep_job(svc: &Arc<Service>, body: Incoming) -> Answer {
    let req: SleepJobRequest = read_json(body).await?;
    if req.milliseconds > api::jobs::MAX_SLEEP_MILLISECONDS {
        return Err(ApiError::invalid(format!(
            "{} ms is out of range; use 0 to {}",
            req.milliseconds,
            api::jobs::MAX_SLEEP_MILLISECONDS
        )));
    }
    let spec = JobSpec {
        job_type: "Sleep".into(),
        description: format!("Wait {} ms (diagnostic)", req.milliseconds),
        cancellable: true,
        affected: vec![AffectedElement::new("host", "localhost")],
    };
    let total = req.milliseconds;
    let job = svc.jobs.submit(spec, move |ctx| async move {
        let start = tokio::time::Instant::now();
        let end = start + Duration::from_millis(total);
        while tokio::time::Instant::now() < end {
            let step = (end - tokio::time::Instant::now()).min(Duration::from_millis(100));
            tokio::select! {
                _ = tokio::time::sleep(step) => {}
                _ = ctx.cancelled() => return Err(JobError::Cancelled),
            }
            if tokio::time::Instant::now() < end {
                ctx.set_progress(start.elapsed().as_millis() as u64, total);
            }
        }
        Ok(())
    });
    Ok(accepted(&convert::job(&job)))
}
