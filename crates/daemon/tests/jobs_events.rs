//! Jobs and events through a real viridiand: lifecycle, cancel, wait, expiry, SSE order.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{wait_job, Daemon};
use serde_json::{json, Value};

fn sleep_job(d: &Daemon, ms: u64) -> Value {
    let r = d.post("/v1/diagnostics/sleep-job", json!({ "milliseconds": ms }));
    assert_eq!(r.status, 202, "{}", r.raw);
    let id = r.body["id"].as_str().unwrap();
    assert_eq!(
        r.header("location").as_deref(),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    r.body
}

#[test]
fn job_runs_to_completed_with_cim_state_times_and_affected_elements() {
    let d = Daemon::start(&[]);
    let job = sleep_job(&d, 50);
    assert_eq!(
        (job["state"].as_str(), job["state_number"].as_u64()),
        (Some("New"), Some(2))
    );
    let done = wait_job(&d, job["id"].as_str().unwrap());
    assert_eq!(
        (done["state"].as_str(), done["state_number"].as_u64()),
        (Some("Completed"), Some(7))
    );
    assert_eq!(done["percent_complete"], 100);
    assert!(done["started"].is_string() && done["finished"].is_string());
    assert_eq!(done["affected_elements"][0]["kind"], "host");
    assert_eq!(done["cancellable"], true);
}

#[test]
fn wait_with_timeout_returns_the_running_job_and_cancel_terminates_it() {
    let d = Daemon::start(&[]);
    let id = sleep_job(&d, 60_000)["id"].as_str().unwrap().to_string();
    let r = d.get(&format!("/v1/jobs/{id}/wait?timeout=0.2"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body["state"], "Running");
    let r = d.req("DELETE", &format!("/v1/jobs/{id}"), None);
    assert_eq!(r.status, 202, "{}", r.raw);
    let done = wait_job(&d, &id);
    assert_eq!(
        (done["state"].as_str(), done["state_number"].as_u64()),
        (Some("Terminated"), Some(8))
    );
    assert_eq!(done["error_code"], "Cancelled");
    let again = d.req("DELETE", &format!("/v1/jobs/{id}"), None);
    assert_eq!((again.status, again.code()), (409, "InvalidState"));
    assert_eq!(
        d.get(&format!("/v1/jobs/{}", uuid_zero())).code(),
        "NotFound"
    );
    assert_eq!(
        d.get(&format!("/v1/jobs/{id}/wait?timeout=abc")).code(),
        "InvalidParameter"
    );
}

fn uuid_zero() -> &'static str {
    "00000000-0000-0000-0000-000000000000"
}

#[test]
fn finished_jobs_expire_oldest_first_running_jobs_stay_and_outcomes_remain() {
    let d = Daemon::start(&["--job-retention", "2", "--job-limit", "2"]);
    let running = sleep_job(&d, 60_000)["id"].as_str().unwrap().to_string();
    let quick: Vec<String> = (0..4)
        .map(|_| {
            let id = sleep_job(&d, 0)["id"].as_str().unwrap().to_string();
            wait_job(&d, &id);
            id
        })
        .collect();
    let listed: Vec<String> = d.get("/v1/jobs").body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(
        listed,
        vec![running.clone(), quick[2].clone(), quick[3].clone()],
        "count limit keeps the newest 2"
    );
    for old in &quick[..2] {
        let r = d.get(&format!("/v1/jobs/{old}"));
        assert_eq!((r.status, r.code()), (410, "JobExpired"), "{}", r.raw);
        assert_eq!(r.body["details"]["state"], "Completed");
        let o = d.get(&format!("/v1/jobs/{old}/outcome"));
        assert_eq!((o.status, o.body["state_number"].as_u64()), (200, Some(7)));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let listed: Vec<String> = d.get("/v1/jobs").body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(
        listed,
        vec![running.clone()],
        "age limit expires the rest; the running job stays"
    );
    assert_eq!(
        d.get(&format!("/v1/jobs/{}/outcome", quick[3])).body["state"],
        "Completed"
    );
    d.req("DELETE", &format!("/v1/jobs/{running}"), None);
}

/// Opens `/v1/events` and returns a line reader positioned after the headers.
fn subscribe(d: &Daemon) -> BufReader<UnixStream> {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    // Wait for the stream's opening comment, so the subscription is live.
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.contains(": connected") {
            return r;
        }
    }
}

/// Reads SSE events (name, JSON) until `n` have arrived or the stream ends.
fn read_events(r: &mut BufReader<UnixStream>, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut name = String::new();
    let mut line = String::new();
    while out.len() < n {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        // Chunked transfer encoding: size lines are hex digits only.
        let l = line.trim_end();
        if let Some(v) = l.strip_prefix("event: ") {
            name = v.to_string();
        } else if let Some(v) = l.strip_prefix("data: ") {
            out.push((name.clone(), serde_json::from_str(v).unwrap()));
        } else if l == "0" {
            break;
        }
    }
    out
}

#[test]
fn events_arrive_in_order_with_consecutive_sequence_numbers() {
    let mut d = Daemon::start(&[]);
    let mut stream = subscribe(&d);
    let vm = d.create_vm("ev");
    d.req("PATCH", "/v1/vms/ev", Some(r#"{"notes":"changed"}"#));
    let job = sleep_job(&d, 10);
    wait_job(&d, job["id"].as_str().unwrap());
    // A delete is a job too; the VM is gone before its job completes.
    d.req("DELETE", "/v1/vms/ev", None);
    let mut events = read_events(&mut stream, 5);
    while !events.iter().any(|(n, _)| n == "vm_deleted") && events.len() < 30 {
        events.extend(read_events(&mut stream, 1));
    }
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..5], ["vm", "vm", "job", "job", "job"]);
    assert_eq!(names.last(), Some(&"vm_deleted"), "{names:?}");
    assert!(
        names[5..names.len() - 1].iter().all(|n| *n == "job"),
        "{names:?}"
    );
    let last = read_events(&mut stream, 1);
    assert_eq!(last[0].1["job"]["type"], "DeleteVm", "{last:?}");
    assert_eq!(last[0].1["job"]["state"], "Completed", "{last:?}");
    events.extend(last);
    let seqs: Vec<u64> = events
        .iter()
        .map(|(_, e)| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let states: Vec<&str> = events[2..5]
        .iter()
        .map(|(_, e)| e["job"]["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["New", "Running", "Completed"]);
    assert_eq!(events[0].1["vm"]["id"], vm["id"]);

    // SIGTERM ends the stream cleanly and the daemon exits 0 with a listener attached.
    d.stop();
    assert!(read_events(&mut stream, 1).is_empty());
}

#[test]
fn a_listener_that_falls_behind_is_disconnected_not_skipped() {
    let d = Daemon::start(&[]);
    let mut slow = subscribe(&d);
    // About 3 events per job: far more than a listener's buffer.
    for _ in 0..700 {
        sleep_job(&d, 0);
    }
    let events = read_events(&mut slow, usize::MAX);
    let (last_name, last) = events.last().unwrap();
    assert_eq!(
        last_name, "overflow",
        "the stream ends with an overflow notice"
    );
    assert!(last["reason"].as_str().unwrap().contains("fell behind"));
    let seqs: Vec<u64> = events[..events.len() - 1]
        .iter()
        .map(|(_, e)| e["seq"].as_u64().unwrap())
        .collect();
    assert!(!seqs.is_empty());
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no event was skipped before the disconnect"
    );
    assert!(
        seqs.len() < 2100,
        "the listener was cut off rather than buffered without bound"
    );
}
