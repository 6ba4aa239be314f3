//! `viridian job ...` and the shared "start a job, then wait or not" step.

use api::jobs::{Job, JobList};
use clap::Subcommand;
use hyper::Method;
use serde::Serialize;

use crate::client::{segment, Client};
use crate::connection::Connection;
use crate::failure::Failure;
use crate::job_wait;
use crate::output;

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// List jobs (running ones and finished ones still kept).
    List,
    /// Show one job.
    Show { id: String },
    /// Wait for a job to end, with a progress bar.
    Wait {
        id: String,
        /// Give up after this many seconds (exit code 12).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Ask a job to stop.
    Cancel { id: String },
}

pub fn run(cmd: JobCmd, conn: &Connection) -> Result<(), Failure> {
    let client = conn.client()?;
    match cmd {
        JobCmd::List => {
            // Every page, following the cursor (each answer is bounded by the daemon).
            let mut list: JobList = client.get("/v1/jobs")?;
            while let Some(after) = list.next_after.take() {
                let page: JobList = client.get(&format!("/v1/jobs?after={after}"))?;
                list.jobs.extend(page.jobs);
                list.next_after = page.next_after;
            }
            if conn.json {
                output::print_json(&list);
            } else {
                output::job_table(&list.jobs);
            }
            Ok(())
        }
        JobCmd::Show { id } => {
            let job: Job = client.get(&format!("/v1/jobs/{}", segment(&id)))?;
            show(conn, &job);
            Ok(())
        }
        JobCmd::Wait { id, timeout } => {
            let job = job_wait::follow(&client, &segment(&id), timeout, conn.json)?;
            show(conn, &job);
            job_wait::outcome(&job)
        }
        JobCmd::Cancel { id } => {
            let (job, _) = client.call::<Job>(
                Method::DELETE,
                &format!("/v1/jobs/{}", segment(&id)),
                None::<&()>,
            )?;
            if conn.json {
                output::print_json(&job);
            } else {
                println!(
                    "cancellation requested for job {} (now {:?})",
                    job.id, job.state
                );
            }
            Ok(())
        }
    }
}

fn show(conn: &Connection, job: &Job) {
    if conn.json {
        output::print_json(job);
    } else {
        output::job_details(job);
    }
}

/// POSTs a request that answers 202 with a job; then waits for it unless `--no-wait`.
pub fn start(
    client: &Client,
    conn: &Connection,
    path: &str,
    body: &impl Serialize,
) -> Result<(), Failure> {
    start_job(client, conn, Method::POST, path, Some(body)).map(drop)
}

/// Sends a request that answers 202 with a job; then waits for it unless
/// `--no-wait`. Returns the job as it ended (or as it started, with `--no-wait`).
pub fn start_job(
    client: &Client,
    conn: &Connection,
    method: Method,
    path: &str,
    body: Option<&impl Serialize>,
) -> Result<Job, Failure> {
    let (job, _) = client.call::<Job>(method, path, body)?;
    if conn.no_wait {
        if conn.json {
            output::print_json(&job);
        } else {
            println!("{}", job.id);
        }
        return Ok(job);
    }
    let done = job_wait::follow(client, &job.id.to_string(), None, conn.json)?;
    if conn.json {
        output::print_json(&done);
    } else if done.state == api::jobs::JobStateName::Completed {
        println!("{}: completed", done.description);
    }
    job_wait::outcome(&done)?;
    Ok(done)
}
