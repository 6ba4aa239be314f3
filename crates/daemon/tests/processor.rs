//! Processor reserve as admission control, and live processor changes, through a real
//! `viridiand` with real workers (firmware-only VMs that idle, so this stays cheap):
//! with reserve 50 % on single-vCPU VMs a 2-processor host starts 4 and refuses the
//! 5th with InsufficientResources naming the numbers; a running VM's limit and weight
//! change live in its cgroup; the count does not.

mod common;

use std::time::{Duration, Instant};

use common::{wait_job, Daemon};
use serde_json::{json, Value};

fn ensure_worker_binary() {
    let daemon = std::path::PathBuf::from(env!("CARGO_BIN_EXE_viridiand"));
    let worker = daemon.with_file_name("viridian-worker");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if matches!((modified(&worker), modified(&daemon)), (Some(w), Some(d)) if w >= d) {
        return;
    }
    let release = daemon.components().any(|c| c.as_os_str() == "release");
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo.args(["build", "-p", "worker", "--bin", "viridian-worker"]);
    if release {
        cargo.arg("--release");
    }
    assert!(cargo.status().expect("cargo runs").success());
}

fn start(d: &Daemon, name: &str) -> common::Reply {
    d.post(&format!("/v1/vms/{name}/start"), json!({}))
}

fn finished(d: &Daemon, job: &Value) -> Value {
    let id = job["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = wait_job(d, &id);
        if matches!(
            j["state"].as_str(),
            Some("Completed" | "Exception" | "Terminated" | "Killed")
        ) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {j}");
    }
}

#[test]
fn reserve_admits_four_half_cpu_vms_on_two_processors_and_refuses_the_fifth() {
    ensure_worker_binary();
    let d = Daemon::start(&["--host-processors", "2", "--accel", "tcg"]);
    for i in 0..5 {
        let r = d.post(
            "/v1/vms",
            json!({"name": format!("r{i}"), "generation": 1, "processor_count": 1, "memory_mib": 64}),
        );
        assert_eq!(r.status, 201, "{}", r.raw);
        let r = d.req(
            "PATCH",
            &format!("/v1/vms/r{i}/processor"),
            Some(&json!({"reserve_percent": 50}).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.raw);
    }
    let jobs: Vec<Value> = (0..4)
        .map(|i| {
            let r = start(&d, &format!("r{i}"));
            assert_eq!(r.status, 202, "{}", r.raw);
            r.body
        })
        .collect();
    for job in &jobs {
        let j = finished(&d, job);
        assert_eq!(j["state"], "Completed", "{j}\n{}", d.log());
    }
    let host = d.get("/v1/host").body;
    assert_eq!(
        host["resources"]["processor_reserved_percent"], 200,
        "{host}"
    );
    assert_eq!(
        host["resources"]["processor_capacity_percent"], 200,
        "{host}"
    );
    assert_eq!(host["resources"]["memory_assigned_mib"], 256, "{host}");

    let r = start(&d, "r4");
    assert_eq!(r.status, 409, "{}", r.raw);
    assert_eq!(r.code(), "InsufficientResources", "{}", r.raw);
    let msg = r.body["message"].as_str().unwrap();
    assert!(
        msg.contains("r4") && msg.contains("250 %") && msg.contains("200 %"),
        "{msg}"
    );
    assert_eq!(r.body["details"]["reserved_processor_percent"], 200);
    assert_eq!(d.get("/v1/vms/r4").body["runtime"]["state"], "Off");
    assert_eq!(d.get("/v1/vms/r4/measure").code(), "InvalidState");

    // Raising a running VM's reserve past the capacity is refused the same way and
    // changes nothing; lowering it frees room for the fifth.
    let r = d.req(
        "PATCH",
        "/v1/vms/r0/processor",
        Some(&json!({"reserve_percent": 60}).to_string()),
    );
    assert_eq!(r.code(), "InsufficientResources", "{}", r.raw);
    assert_eq!(d.get("/v1/vms/r0/processor").body["reserve_percent"], 50);
    for i in 0..2 {
        let r = d.req(
            "PATCH",
            &format!("/v1/vms/r{i}/processor"),
            Some(&json!({"reserve_percent": 25}).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.raw);
    }
    let r = start(&d, "r4");
    assert_eq!(r.status, 202, "{}", r.raw);
    assert_eq!(finished(&d, &r.body)["state"], "Completed");

    // Live limit and weight reach the VM's cgroup; the count cannot change live.
    let host = d.get("/v1/host").body;
    let control = host["processor_control"].as_str().unwrap().to_string();
    let id = d.get("/v1/vms/r1").body["id"].as_str().unwrap().to_string();
    let r = d.req(
        "PATCH",
        "/v1/vms/r1/processor",
        Some(&json!({"limit_percent": 30, "relative_weight": 300}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["limit_percent"], 30);
    if let Ok(h) = cgroups::Hierarchy::detect() {
        let g = h.vm_group(&id);
        assert!(control.contains("cgroup"), "{control}");
        let read = g.read_cpu().unwrap();
        assert_eq!(read.quota_us, Some(30_000), "{}", d.log());
        assert!(read.weight_or_shares == 300 || read.weight_or_shares == 3072);
    } else {
        eprintln!("SKIP cgroup check: no cgroup hierarchy with the cpu controller ({control})");
    }
    let r = d.req(
        "PATCH",
        "/v1/vms/r1/processor",
        Some(&json!({"count": 2}).to_string()),
    );
    assert_eq!(r.code(), "InvalidState", "{}", r.raw);

    // Metering: runtime, measure and /v1/metrics agree with the cgroup and /proc.
    std::thread::sleep(Duration::from_secs(2));
    let vm = d.get("/v1/vms/r1").body;
    let rt = &vm["runtime"];
    assert!(
        rt["processor"]["per_vcpu_percent"]
            .as_array()
            .is_some_and(|a| a.len() == 1),
        "{vm}"
    );
    assert!(
        rt["processor"]["window_seconds"].as_f64().unwrap() >= 0.9,
        "{vm}"
    );
    assert_eq!(rt["processor_settings"]["limit_percent"], 30, "{vm}");
    let pid = rt["worker_pid"].as_u64().unwrap();
    let r = d.get("/v1/vms/r1/measure");
    assert_eq!(r.status, 200, "{}", r.raw);
    let m = r.body;
    assert_eq!(
        m["average_per_vcpu_percent"].as_array().unwrap().len(),
        1,
        "{m}"
    );
    assert!(m["uptime_seconds"].as_f64().unwrap() > 1.0, "{m}");
    if let Ok(h) = cgroups::Hierarchy::detect() {
        let g = h.vm_group(&id);
        let actual = g.usage().unwrap().as_secs_f64();
        let metered = m["processor_seconds"].as_f64().unwrap();
        // The meter is at most one poll (0.5 s) old; the VM idles in its firmware.
        assert!(
            metered <= actual && actual - metered <= actual * 0.05 + 0.05,
            "metered {metered} s vs cgroup {actual} s"
        );
        let qemu = g
            .processes()
            .unwrap()
            .into_iter()
            .find(|p| u64::from(*p) != pid)
            .expect("QEMU is in the group");
        let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
        let rss_mib = worker::meter::parse_vm_rss(&status).unwrap() as f64 / 1048576.0;
        let metered = m["memory_in_use_mib"].as_f64().unwrap();
        assert!(
            (metered - rss_mib).abs() <= rss_mib * 0.05 + 1.0,
            "metered {metered} MiB vs /proc {rss_mib} MiB"
        );
    }
    let r = d.get("/v1/metrics");
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("text/plain"), "{}", r.headers);
    for i in 0..5 {
        assert!(
            r.raw
                .contains(&format!("viridian_vm_cpu_seconds_total{{vm=\"r{i}\"")),
            "{}",
            r.raw
        );
    }
    assert!(
        r.raw
            .contains("viridian_vm_processor_limit_percent{vm=\"r1\""),
        "{}",
        r.raw
    );

    for i in 0..5 {
        let r = d.post(&format!("/v1/vms/r{i}/stop"), json!({}));
        assert_eq!(r.status, 202, "{}", r.raw);
        assert_eq!(finished(&d, &r.body)["state"], "Completed");
    }
    if let Ok(h) = cgroups::Hierarchy::detect() {
        assert!(
            !h.vm_group(&id).exists(),
            "the cgroup goes when the VM stops"
        );
    }
}
