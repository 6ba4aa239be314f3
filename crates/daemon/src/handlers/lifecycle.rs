//! `POST /v1/vms/{vm}/{action}`: start, stop (turn off), shutdown, save, pause, resume,
//! restart, each a job with the VM as affected element; and
//! `GET /v1/vms/{vm}/console/log`: the VM's serial console log.
//!
//! A transition the VM's state does not allow answers `InvalidState` at once and
//! changes nothing; otherwise the VM moves to its transitional state before the
//! answer (202 + Location of the job), so two racing requests cannot both start.

use std::sync::Arc;

use api::vms::{VmActionRequest, VmRuntime, VmState};
use api::ErrorCode;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::Response;
use jobs::{AffectedElement, JobError, JobSpec};

use crate::convert;
use crate::error::ApiError;
use crate::http::body::{accepted, full, parse_json, read_bytes, Body};
use crate::service::{damaged_unreadable, find, Service};
use crate::vms::runtime::StopMode;

type Answer = Result<Response<Body>, ApiError>;

/// The lifecycle actions, as they appear in the URL.
pub const ACTIONS: [&str; 7] = [
    "start", "stop", "shutdown", "save", "pause", "resume", "restart",
];

fn allowed(action: &str, state: VmState) -> bool {
    use VmState as S;
    match action {
        "start" => matches!(state, S::Off | S::Saved | S::Critical),
        "stop" | "save" | "restart" => matches!(state, S::Running | S::Paused),
        "shutdown" | "pause" => state == S::Running,
        "resume" => state == S::Paused,
        _ => false,
    }
}

/// The transitional state an action puts the VM in at once.
fn claim(action: &str) -> Option<VmState> {
    match action {
        "start" => Some(VmState::Starting),
        "stop" | "shutdown" => Some(VmState::Stopping),
        "save" => Some(VmState::Saving),
        _ => None,
    }
}

fn hint(action: &str, state: VmState) -> &'static str {
    match (action, state) {
        ("shutdown", VmState::Paused) => {
            "; a paused guest cannot react to the power button: resume it first, or stop it"
        }
        ("start", VmState::Damaged) => "; repair its settings first",
        ("start", _) => "; it is already running or changing state",
        _ => "",
    }
}

/// Reads the optional body of an action: empty, or a `VmActionRequest`.
async fn read_action_body(body: Incoming) -> Result<VmActionRequest, ApiError> {
    let bytes = read_bytes(body).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(VmActionRequest::default());
    }
    parse_json(&bytes)
}

pub async fn action(svc: &Arc<Service>, key: &str, action: &str, body: Incoming) -> Answer {
    if !ACTIONS.contains(&action) {
        return Err(ApiError::not_found(format!(
            "there is no VM action {action:?}; use one of {}",
            ACTIONS.join(", ")
        )));
    }
    let request = read_action_body(body).await?;
    let shutdown_timeout = match (action, request.timeout_seconds) {
        ("shutdown", Some(t)) if (1..=api::vms::MAX_SHUTDOWN_TIMEOUT_SECONDS).contains(&t) => t,
        ("shutdown", Some(t)) => {
            return Err(ApiError::invalid(format!(
                "a shutdown timeout of {t} s is out of range; use 1 to {}",
                api::vms::MAX_SHUTDOWN_TIMEOUT_SECONDS
            )))
        }
        ("shutdown", None) => worker::spec::DEFAULT_SHUTDOWN_TIMEOUT_SECS,
        (_, Some(_)) => {
            return Err(ApiError::invalid(format!(
                "timeout_seconds applies to shutdown only, not to {action}"
            )))
        }
        (_, None) => 0,
    };
    let Some(workers) = svc.workers.clone() else {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            "this viridiand runs no VMs (started without the worker integration)",
        ));
    };
    // Check and claim the transition under the store lock, so it is atomic.
    let (id, name, settings, dir) = {
        let store = svc.store();
        let entry = find(&store, key)?;
        let state = svc.state_of(entry).state;
        if !allowed(action, state) {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "VM {} cannot {action} while it is {state:?}{}",
                    entry.name(),
                    hint(action, state)
                ),
            )
            .with_details(serde_json::json!({ "state": state })));
        }
        let Some(settings) = entry.settings.clone() else {
            return Err(damaged_unreadable(entry));
        };
        if action == "start" && svc.checkpoints.is_busy(entry.id) {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "VM {} cannot start while a checkpoint operation or merge runs on its disks; wait for its job (`viridian job list`)",
                    entry.name()
                ),
            ));
        }
        if action == "start" {
            svc.admit(&store, &settings, &format!("start VM {}", entry.name()))?;
        }
        if let Some(state) = claim(action) {
            svc.runtime.set(entry.id, VmRuntime::with_state(state));
        }
        (entry.id, entry.name(), settings, entry.dir.clone())
    };
    let claim = claim(action);
    if let Some(state) = claim {
        // Publish the claimed state (already recorded above, under the lock).
        svc.set_runtime(id, VmRuntime::with_state(state));
    }
    let (job_type, description) = match action {
        "start" => ("StartVm", format!("Start VM {name}")),
        "stop" => ("TurnOffVm", format!("Turn off VM {name}")),
        "shutdown" => (
            "ShutdownVm",
            format!("Shut down VM {name} (ACPI power button)"),
        ),
        "save" => ("SaveVm", format!("Save VM {name}")),
        "pause" => ("PauseVm", format!("Pause VM {name}")),
        "resume" => ("ResumeVm", format!("Resume VM {name}")),
        _ => ("RestartVm", format!("Restart VM {name}")),
    };
    let spec = JobSpec {
        job_type: job_type.into(),
        description,
        cancellable: false,
        affected: vec![AffectedElement::new("vm", id.to_string())],
    };
    let action = action.to_string();
    let svc2 = svc.clone();
    let job = svc.jobs.submit(spec, move |ctx| async move {
        let before = svc2.runtime.get(id);
        let result = match action.as_str() {
            "start" => workers.start(settings, dir, ctx).await,
            "stop" => workers.stop(id, StopMode::TurnOff, ctx).await,
            "shutdown" => {
                let mode = StopMode::Shutdown {
                    timeout_secs: shutdown_timeout,
                };
                workers.stop(id, mode, ctx).await
            }
            "save" => workers.stop(id, StopMode::Save, ctx).await,
            "pause" => workers.pause(id, true).await,
            "resume" => workers.pause(id, false).await,
            _ => workers.restart(id).await,
        };
        if let Err(JobError::Failed { .. }) = &result {
            // A refused or failed stop/shutdown/save leaves the VM as the worker says
            // it is (still running, for a shutdown that timed out).
            if claim.is_some() && action != "start" {
                if let Some(rt) = workers.live(id) {
                    svc2.set_runtime(id, rt);
                } else if svc2.runtime.get(id).state == before.state {
                    svc2.set_runtime(id, VmRuntime::with_state(VmState::Running));
                }
            }
        }
        result
    });
    Ok(accepted(&convert::job(&job)))
}

/// `GET /v1/vms/{vm}/console/log`: everything kept of the serial console, as bytes.
pub fn console_log(svc: &Arc<Service>, key: &str) -> Answer {
    let dir = {
        let store = svc.store();
        find(&store, key)?.dir.clone()
    };
    let bytes = crate::vms::workers::WorkerSupervisor::console_log(&dir).map_err(|e| {
        ApiError::internal(format!(
            "cannot read the console log in {}: {e}",
            dir.join("runtime").display()
        ))
    })?;
    Response::builder()
        .status(200)
        .header("content-type", "application/octet-stream")
        .body(full(Bytes::from(bytes)))
        .map_err(|e| ApiError::internal(format!("cannot build the response: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_vm_state() {
        assert!(allowed("start", VmState::Off));
        assert!(allowed("start", VmState::Saved));
        assert!(allowed("start", VmState::Critical));
        assert!(!allowed("start", VmState::Running));
        assert!(!allowed("start", VmState::Damaged));
        assert!(allowed("pause", VmState::Running));
        assert!(!allowed("pause", VmState::Paused));
        assert!(allowed("resume", VmState::Paused));
        assert!(!allowed("shutdown", VmState::Paused));
        assert!(allowed("save", VmState::Paused));
        assert!(!allowed("stop", VmState::Off));
        assert!(!allowed("restart", VmState::Saved));
    }
}
