//! [`Request::SnapshotState`](crate::control::Request::SnapshotState): a
//! checkpoint's memory saved while the guest runs.
//!
//! QEMU's `background-snapshot` migration stops the guest, saves the devices'
//! state, write-protects guest memory with userfaultfd and starts the guest
//! again; then it writes each page out, copying a page first whenever the guest
//! is about to change it. The file holds the memory of the instant the guest
//! stopped.
//!
//! Disks must be of that same instant. QEMU cannot see what our disk backends
//! write: a vhost-user-blk backend writes read data, used rings and status
//! bytes into guest memory through its own mapping, past QEMU's write
//! tracking, so it must write nothing until the memory is saved. Every
//! synthetic disk's requests are therefore held (see [`vhd::Gate`]) from just
//! before the instant until the save is done; the guest runs meanwhile and its
//! requests wait in their rings. Then each disk gets its new differencing layer
//! and the requests go on there: the old layers hold exactly the instant's data.
//!
//! IDE disks go through QEMU's block layer to our NBD server, and QEMU drains
//! their requests while it stops the guest: holding them before the instant
//! would stall that stop, and pausing the guest first and holding them then
//! hung a guest writing to its IDE disk all the time. A VM with a writable IDE
//! disk is therefore answered `unsupported`, and the daemon pauses it instead.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::{invalid, migrate_to_file, no_live_merge, Shared};
use crate::control::{DiskSwitch, FailureKind, Response, SnapshotOutcome, WorkerState};

const CAPABILITY: &str = "background-snapshot";

/// Why a background snapshot did not happen (nothing changed).
struct NotDone {
    kind: FailureKind,
    message: String,
}

fn unsupported(message: String) -> NotDone {
    NotDone {
        kind: FailureKind::Unsupported,
        message,
    }
}

fn failed(message: String) -> NotDone {
    NotDone {
        kind: FailureKind::Failed,
        message,
    }
}

pub(super) async fn snapshot_state(
    shared: &Shared,
    path: &Path,
    layers: Vec<DiskSwitch>,
) -> Response {
    if shared.state() != WorkerState::Running {
        return invalid(
            shared,
            "take a checkpoint in the background",
            "; it must be running",
        );
    }
    let _no_merge = match no_live_merge(shared, "take a checkpoint in the background") {
        Ok(guard) => guard,
        Err(refused) => return *refused,
    };
    shared.snapshotting.store(true, Ordering::SeqCst);
    let result = snapshot(shared, path, layers).await;
    // Later saves (a stop with save, a checkpoint the other way) are plain migrations.
    if let Err(e) = shared.qmp.set_migration_capability(CAPABILITY, false).await {
        tracing::warn!(vm = %shared.name(), error = %e, "cannot turn background-snapshot off again");
    }
    shared.snapshotting.store(false, Ordering::SeqCst);
    match result {
        Ok(outcome) => {
            tracing::info!(vm = %shared.name(), downtime_ms = outcome.downtime_ms,
                background_ms = outcome.background_ms, io_held_ms = outcome.io_held_ms,
                bytes = outcome.bytes,
                "checkpoint memory saved in the background; disks continue on new layers");
            Response::Snapshot(outcome)
        }
        Err(NotDone { kind, message }) => {
            tracing::warn!(vm = %shared.name(), %message, "no background checkpoint");
            Response::Error { kind, message }
        }
    }
}

/// What [`snapshot_state`] does once it may; on an error the VM runs on as
/// before and no file is left.
async fn snapshot(
    shared: &Shared,
    path: &Path,
    layers: Vec<DiskSwitch>,
) -> Result<SnapshotOutcome, NotDone> {
    let name = shared.name().to_string();
    if let Some(nic) = vhost_net_adapter(shared) {
        return Err(unsupported(format!(
            "VM {name}'s adapter {nic} uses vhost-net, whose writes into guest memory \
             a background snapshot cannot follow"
        )));
    }
    let mut served = shared.served.lock().await;
    let Some(served) = served.as_mut() else {
        return Err(unsupported(format!("VM {name} serves no disks now")));
    };
    if let Some(slot) = served.writable_ide() {
        return Err(unsupported(format!(
            "VM {name} has a writable IDE disk ({slot}): QEMU drains IDE requests while it \
             stops the guest, so they cannot be held at the snapshot's instant"
        )));
    }
    shared
        .qmp
        .set_migration_capability(CAPABILITY, true)
        .await
        .map_err(|e| {
            unsupported(format!(
                "QEMU cannot save VM {name}'s memory while it runs: {e}"
            ))
        })?;
    let mut events = shared.qmp.events();
    let resume_if_stopped = || async {
        if let Ok(status) = shared.qmp.query_status().await {
            if !status.running {
                if let Err(e) = shared.qmp.cont().await {
                    tracing::error!(vm = %name, error = %e, "cannot resume the VM after a background checkpoint that did not happen");
                }
            }
        }
    };
    let held_at = Instant::now();
    let held = tokio::task::block_in_place(|| served.hold());
    let migrated = migrate_to_file(shared, path).await;
    let seen = stop_and_resume(&mut events);
    let bytes = match migrated {
        Ok(bytes) => bytes,
        Err(message) => {
            drop(held);
            resume_if_stopped().await;
            return Err(failed(message));
        }
    };
    let saved_at = Instant::now();
    let wanted: Vec<_> = layers.into_iter().map(|d| (d.slot, d.path)).collect();
    let made = tokio::task::block_in_place(|| served.new_layers(&wanted));
    *shared.drives.lock().unwrap_or_else(|p| p.into_inner()) = served.metered();
    if let Err(e) = made {
        drop(held);
        let _ = std::fs::remove_file(path);
        resume_if_stopped().await;
        return Err(failed(format!(
            "making the new disk layers failed; every disk stays on its chain: {}",
            super::error_chain(&e)
        )));
    }
    drop(held);
    let io_held = held_at.elapsed();
    let Some((stop_us, resume_us)) = seen else {
        // The file and the layers are good; only the measurement is missing.
        tracing::warn!(vm = %name, "QEMU's STOP and RESUME events of the snapshot were not seen");
        return Ok(SnapshotOutcome {
            downtime_ms: 0,
            bytes,
            background_ms: 0,
            io_held_ms: ms(io_held),
        });
    };
    let downtime = Duration::from_micros(resume_us.saturating_sub(stop_us).max(0) as u64);
    // RESUME to the end of the save, on this host's clock.
    let resumed_ago = wall_micros().saturating_sub(resume_us).max(0) as u64;
    let background = Duration::from_micros(resumed_ago).saturating_sub(saved_at.elapsed());
    Ok(SnapshotOutcome {
        downtime_ms: ms(downtime),
        bytes,
        background_ms: ms(background),
        io_held_ms: ms(io_held),
    })
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn wall_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The first STOP and the RESUME after it among the events received so far,
/// as QEMU's timestamps (microseconds).
fn stop_and_resume(events: &mut broadcast::Receiver<qmp::Event>) -> Option<(i64, i64)> {
    let mut stop = None;
    loop {
        match events.try_recv() {
            Ok(e) if e.event == "STOP" && stop.is_none() => {
                stop = e.timestamp.map(|t| t.micros());
            }
            Ok(e) if e.event == "RESUME" => {
                if let (Some(s), Some(t)) = (stop, e.timestamp) {
                    return Some((s, t.micros()));
                }
            }
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return None,
        }
    }
}

/// The MAC of an adapter whose packets vhost-net carries, if any.
fn vhost_net_adapter(shared: &Shared) -> Option<String> {
    let spec = &shared.spec;
    spec.settings
        .network_adapters
        .iter()
        .filter(|n| n.kind != vm_config::AdapterKind::Legacy)
        .find(|n| {
            spec.network
                .iter()
                .any(|p| p.vhost && p.mac.eq_ignore_ascii_case(&n.mac))
        })
        .map(|n| n.mac.clone())
}
