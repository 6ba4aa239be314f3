//! Following a job to its end, with a progress bar on a terminal.

use std::io::{IsTerminal, Write};

use api::jobs::{Job, JobStateName};

use crate::client::Client;
use crate::failure::Failure;

/// Polls `wait` in short slices until the job ends (or `timeout` seconds pass),
/// drawing a progress bar on stderr when it is a terminal and `quiet` is off.
pub fn follow(
    client: &Client,
    id: &str,
    timeout: Option<f64>,
    quiet: bool,
) -> Result<Job, Failure> {
    let bar = !quiet && std::io::stderr().is_terminal();
    let start = std::time::Instant::now();
    loop {
        let slice = match timeout {
            Some(t) => (t - start.elapsed().as_secs_f64()).clamp(0.0, 0.5),
            None => 0.5,
        };
        let job: Job = client.get(&format!("/v1/jobs/{id}/wait?timeout={slice}"))?;
        if bar {
            draw(&job);
        }
        if job.state.is_finished() {
            if bar {
                eprintln!();
            }
            return Ok(job);
        }
        if timeout.is_some_and(|t| start.elapsed().as_secs_f64() >= t) {
            if bar {
                eprintln!();
            }
            return Err(Failure::WaitTimedOut {
                id: id.to_string(),
                state: format!("{:?}", job.state),
                percent: job.percent_complete,
            });
        }
    }
}

fn draw(job: &Job) {
    const WIDTH: usize = 30;
    let filled = job.percent_complete as usize * WIDTH / 100;
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r[{}{}] {:>3} % {:?} {}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        job.percent_complete,
        job.state,
        job.job_type
    );
    let _ = err.flush();
}

/// Turns a finished job into success or the failure whose exit code says how it ended.
pub fn outcome(job: &Job) -> Result<(), Failure> {
    match job.state {
        JobStateName::Completed => Ok(()),
        state => Err(Failure::JobFailed {
            id: job.id.to_string(),
            state: format!("{state:?}"),
            description: job
                .error_description
                .clone()
                .unwrap_or_else(|| "no description".into()),
            cancelled: state == JobStateName::Terminated,
        }),
    }
}
