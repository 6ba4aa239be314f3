//! From the engine's types to the API's.

use std::time::{SystemTime, UNIX_EPOCH};

use api::jobs::{AffectedElement, Job, JobOutcome, JobStateName};
use jobs::{JobSnapshot, JobState};

pub fn state_name(s: JobState) -> JobStateName {
    match s {
        JobState::New => JobStateName::New,
        JobState::Starting => JobStateName::Starting,
        JobState::Running => JobStateName::Running,
        JobState::Suspended => JobStateName::Suspended,
        JobState::ShuttingDown => JobStateName::ShuttingDown,
        JobState::Completed => JobStateName::Completed,
        JobState::Terminated => JobStateName::Terminated,
        JobState::Killed => JobStateName::Killed,
        JobState::Exception => JobStateName::Exception,
    }
}

pub fn job(s: &JobSnapshot) -> Job {
    Job {
        id: s.id,
        job_type: s.job_type.clone(),
        description: s.description.clone(),
        state: state_name(s.state),
        state_number: s.state.number(),
        percent_complete: s.percent_complete,
        error_code: s.error_code.clone(),
        error_description: s.error_description.clone(),
        created: rfc3339(s.created),
        started: s.started.map(rfc3339),
        finished: s.finished.map(rfc3339),
        cancellable: s.cancellable,
        affected_elements: s
            .affected
            .iter()
            .map(|a| AffectedElement {
                kind: a.kind.clone(),
                id: a.id.clone(),
            })
            .collect(),
    }
}

pub fn outcome(o: &jobs::JobOutcome) -> JobOutcome {
    JobOutcome {
        id: o.id,
        job_type: o.job_type.clone(),
        state: state_name(o.state),
        state_number: o.state.number(),
        error_code: o.error_code.clone(),
        error_description: o.error_description.clone(),
        finished: rfc3339(o.finished),
    }
}

/// `2026-11-22T11:15:37.123Z`
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_format_as_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
