use std::sync::Mutex;

use super::*;

fn spec(job_type: &str, cancellable: bool) -> JobSpec {
    JobSpec {
        job_type: job_type.into(),
        description: format!("test job {job_type}"),
        cancellable,
        affected: vec![AffectedElement::new("vm", "test-vm")],
    }
}

fn engine(retention_ms: u64, limit: usize) -> JobEngine {
    JobEngine::new(
        JobEngineConfig {
            retention: Duration::from_millis(retention_ms),
            limit,
            ..Default::default()
        },
        None,
    )
}

#[tokio::test]
async fn completed_job_reports_state_7_and_full_percent() {
    let jobs = engine(60_000, 10);
    let job = jobs.submit(spec("Noop", false), |ctx| async move {
        ctx.set_percent(50);
        Ok(())
    });
    assert_eq!(job.state, JobState::New);
    let done = jobs.wait(job.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.state.number(), 7);
    assert_eq!(done.percent_complete, 100);
    assert!(done.started.is_some() && done.finished.is_some());
    assert_eq!(done.affected, vec![AffectedElement::new("vm", "test-vm")]);
}

#[tokio::test]
async fn failed_job_carries_error_code_and_description() {
    let jobs = engine(60_000, 10);
    let job = jobs.submit(spec("Fail", false), |_| async move {
        Err(JobError::failed(
            "FileNotFound",
            "The file /x.vhd does not exist.",
        ))
    });
    let done = jobs.wait(job.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(done.state, JobState::Exception);
    assert_eq!(done.error_code.as_deref(), Some("FileNotFound"));
    assert_eq!(
        done.error_description.as_deref(),
        Some("The file /x.vhd does not exist.")
    );
}

#[tokio::test]
async fn cancel_moves_running_job_to_terminated() {
    let jobs = engine(60_000, 10);
    let job = jobs.submit(spec("Long", true), |ctx| async move {
        ctx.cancelled().await;
        Err(JobError::Cancelled)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let shutting = jobs.cancel(job.id).unwrap();
    assert!(matches!(
        shutting.state,
        JobState::ShuttingDown | JobState::Terminated
    ));
    let done = jobs.wait(job.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(done.state, JobState::Terminated);
    assert!(matches!(
        jobs.cancel(job.id),
        Err(JobsError::AlreadyFinished { .. })
    ));
}

#[tokio::test]
async fn job_that_is_not_cancellable_refuses_cancel() {
    let jobs = engine(60_000, 10);
    let job = jobs.submit(spec("Stubborn", false), |_| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    });
    assert!(matches!(
        jobs.cancel(job.id),
        Err(JobsError::NotCancellable { .. })
    ));
    assert_eq!(
        jobs.wait(job.id, Duration::from_secs(5))
            .await
            .unwrap()
            .state,
        JobState::Completed
    );
}

#[tokio::test]
async fn wait_returns_running_job_when_timeout_passes() {
    let jobs = engine(60_000, 10);
    let job = jobs.submit(spec("Long", true), |ctx| async move {
        ctx.cancelled().await;
        Err(JobError::Cancelled)
    });
    let waited = jobs.wait(job.id, Duration::from_millis(50)).await.unwrap();
    assert!(!waited.state.is_finished());
    jobs.cancel(job.id).unwrap();
}

#[tokio::test]
async fn panicking_job_is_killed_not_lost() {
    let jobs = engine(60_000, 10);
    let job = jobs.submit(spec("Panics", false), |_| async move {
        if true {
            panic!("deliberate test panic");
        }
        Ok(())
    });
    let done = jobs.wait(job.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(done.state, JobState::Killed);
}

#[tokio::test]
async fn count_limit_expires_oldest_finished_first_and_keeps_running_jobs() {
    let jobs = engine(60_000, 2);
    let running = jobs.submit(spec("Long", true), |ctx| async move {
        ctx.cancelled().await;
        Err(JobError::Cancelled)
    });
    let mut finished = Vec::new();
    for _ in 0..4 {
        let j = jobs.submit(spec("Quick", false), |_| async { Ok(()) });
        jobs.wait(j.id, Duration::from_secs(5)).await.unwrap();
        finished.push(j.id);
    }
    let listed: Vec<Uuid> = jobs.list().iter().map(|j| j.id).collect();
    assert_eq!(listed, vec![running.id, finished[2], finished[3]]);
    for old in &finished[..2] {
        match jobs.lookup(*old) {
            Lookup::Expired(o) => assert_eq!(o.state, JobState::Completed),
            other => panic!("expected an outcome record for {old}, got {other:?}"),
        }
    }
    jobs.cancel(running.id).unwrap();
}

#[tokio::test]
async fn age_limit_expires_finished_jobs_but_outcome_remains() {
    let jobs = engine(100, 100);
    let j = jobs.submit(spec("Quick", false), |_| async {
        Err(JobError::failed("Boom", "It failed."))
    });
    jobs.wait(j.id, Duration::from_secs(5)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(matches!(jobs.get(j.id), Err(JobsError::Expired(_))));
    let outcome = jobs.outcome(j.id).unwrap();
    assert_eq!(outcome.state, JobState::Exception);
    assert_eq!(outcome.error_code.as_deref(), Some("Boom"));
}

#[tokio::test]
async fn events_arrive_in_order_for_each_job() {
    let seen: Arc<Mutex<Vec<(Uuid, JobState, u8)>>> = Arc::default();
    let sink_seen = seen.clone();
    let sink: EventSink = Arc::new(move |s: &JobSnapshot| {
        sink_seen
            .lock()
            .unwrap()
            .push((s.id, s.state, s.percent_complete));
    });
    let jobs = JobEngine::new(JobEngineConfig::default(), Some(sink));
    let job = jobs.submit(spec("Steps", false), |ctx| async move {
        for p in [10, 20, 30] {
            ctx.set_percent(p);
        }
        Ok(())
    });
    jobs.wait(job.id, Duration::from_secs(5)).await.unwrap();
    let states: Vec<(JobState, u8)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s, p)| (*s, *p))
        .collect();
    assert_eq!(
        states,
        vec![
            (JobState::New, 0),
            (JobState::Running, 0),
            (JobState::Running, 10),
            (JobState::Running, 20),
            (JobState::Running, 30),
            (JobState::Completed, 100),
        ]
    );
}

#[tokio::test]
async fn unknown_job_is_not_found() {
    let jobs = engine(1000, 10);
    assert!(matches!(
        jobs.get(Uuid::new_v4()),
        Err(JobsError::NotFound(_))
    ));
}

#[tokio::test]
async fn listing_in_pages_gives_every_job_once_in_submission_order() {
    let engine = JobEngine::new(JobEngineConfig::default(), None);
    let ids: Vec<Uuid> = (0..7)
        .map(|_| {
            engine
                .submit(spec("Page", true), |ctx| async move {
                    ctx.cancelled().await;
                    Ok(())
                })
                .id
        })
        .collect();
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let (page, next) = engine.list_page(after, 3);
        assert!(page.len() <= 3);
        seen.extend(page.iter().map(|j| j.id));
        pages += 1;
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);
    let (all, next) = engine.list_page(None, 7);
    assert_eq!((all.len(), next), (7, None));
}

#[tokio::test]
async fn a_job_killed_in_an_earlier_life_is_listed_as_killed_and_expires_to_an_outcome() {
    let jobs = engine(200, 10);
    let id = Uuid::new_v4();
    let created = SystemTime::now() - Duration::from_secs(30);
    let why = "interrupted by a restart of the service";
    let job = jobs.restore_killed(id, spec("disk-convert", true), created, why);
    assert_eq!((job.state, job.state.number()), (JobState::Killed, 9));
    let got = jobs.get(id).unwrap();
    assert_eq!(got.state, JobState::Killed);
    assert_eq!(got.error_code.as_deref(), Some("Killed"));
    assert_eq!(got.error_description.as_deref(), Some(why));
    assert_eq!(got.created, created);
    assert!(!got.cancellable);
    assert_eq!(got.affected, vec![AffectedElement::new("vm", "test-vm")]);
    assert_eq!(jobs.list().iter().map(|j| j.id).collect::<Vec<_>>(), [id]);
    // Waiting on it answers at once; cancelling says it has finished.
    let waited = jobs.wait(id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(waited.state, JobState::Killed);
    assert!(matches!(
        jobs.cancel(id),
        Err(JobsError::AlreadyFinished { .. })
    ));
    // Restoring the same ID again changes nothing.
    jobs.restore_killed(id, spec("other", false), SystemTime::now(), "again");
    assert_eq!(jobs.get(id).unwrap().job_type, "disk-convert");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let outcome = jobs.outcome(id).unwrap();
    assert_eq!(outcome.state, JobState::Killed);
    assert_eq!(outcome.error_description.as_deref(), Some(why));
    assert!(matches!(jobs.get(id), Err(JobsError::Expired(_))));
}

#[tokio::test]
async fn a_job_submitted_with_a_chosen_id_runs_under_it() {
    let jobs = engine(60_000, 10);
    let id = Uuid::new_v4();
    let job = jobs.submit_as(id, spec("Noop", false), move |ctx| async move {
        assert_eq!(ctx.id(), id);
        Ok(())
    });
    assert_eq!(job.id, id);
    let done = jobs.wait(id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(done.state, JobState::Completed);
}
