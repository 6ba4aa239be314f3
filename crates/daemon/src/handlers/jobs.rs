//! `/v1/jobs/...` and the diagnostic sleep job.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

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

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::not_found(format!("{id:?} is not a job id (job ids are UUIDs)")))
}

/// `GET /v1/jobs?limit=&after=`: a page of at most `limit` jobs (default and most
/// `MAX_JOBS_PER_PAGE`; a bigger limit is shortened to it, the page then says where
/// the next one starts, so a caller that follows `next_after` misses nothing).
pub fn list(svc: &Arc<Service>, limit: Option<&str>, after: Option<&str>) -> Answer {
    let max = api::jobs::MAX_JOBS_PER_PAGE;
    let limit = match limit {
        None => max,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(max),
            _ => {
                return Err(ApiError::invalid(format!(
                    "limit {l:?} is not a whole number from 1 to {max}"
                )))
            }
        },
    };
    let after = match after {
        None => None,
        Some(a) => Some(a.parse::<u64>().map_err(|_| {
            ApiError::invalid(format!(
                "after {a:?} is not a cursor; pass the next_after of the previous page"
            ))
        })?),
    };
    let (page, next_after) = svc.jobs.list_page(after, limit);
    let jobs = page.iter().map(convert::job).collect();
    Ok(json(200, &JobList { jobs, next_after }))
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

/// `wait?timeout=`: at most `--max-wait` seconds (the default when none is given).
/// A longer time-out is shortened, not refused: the answer carries the job's state,
/// so a caller that asked for longer sees it still running and waits again, as it
/// must after any time-out; refusing would break scripts that pass a large number
/// meaning "as long as it takes".
pub async fn wait(svc: &Arc<Service>, id: &str, timeout: Option<&str>) -> Answer {
    let id = parse_id(id)?;
    let max = svc.config.max_wait as f64;
    let seconds = match timeout {
        None => max,
        Some(t) => match t.parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => s.min(max),
            _ => {
                return Err(ApiError::invalid(format!(
                    "timeout {t:?} is not a number of seconds (0 or more; at most {max} are waited)"
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
        let start = Instant::now();
        let length = Duration::from_millis(total);
        let end = start + length;
        loop {
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next_progress(start, length, now)) => {}
                _ = ctx.cancelled() => return Err(JobError::Cancelled),
            }
            if Instant::now() < end {
                ctx.set_progress(start.elapsed().as_millis() as u64, total);
            }
        }
    });
    Ok(accepted(&convert::job(&job)))
}

/// When a sleep job of `length` begun at `start` next has a new whole percent to
/// report: rounded up to the next whole second of one clock shared by every sleep
/// job, so thousands of them wake together once a second at most, never each on a
/// timer of its own (an hour-long one reports every 36 s).
fn next_progress(start: Instant, length: Duration, now: Instant) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let done = now.saturating_duration_since(start).as_secs_f64();
    let length_s = length.as_secs_f64();
    let percent = (done / length_s * 100.0).floor() + 1.0;
    let due = start + Duration::from_secs_f64(length_s * percent.min(100.0) / 100.0);
    let since = due.saturating_duration_since(epoch).as_secs_f64().ceil();
    (epoch + Duration::from_secs_f64(since)).min(start + length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_hour_long_sleep_job_wakes_once_per_percent_on_whole_seconds() {
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        let first = next_progress(start, hour, start);
        assert!(first >= start + Duration::from_secs(36));
        assert!(first <= start + Duration::from_secs(37));
        let later = next_progress(start, hour, first);
        assert!(later >= first + Duration::from_secs(35));
        let short = Duration::from_millis(300);
        assert_eq!(next_progress(start, short, start), start + short);
    }
}
