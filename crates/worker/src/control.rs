//! The worker's control socket: how `viridiand` talks to a running worker.
//!
//! The socket is `control.sock` in the VM's runtime folder. Each request is one JSON
//! line, answered by one JSON line. A `console` request turns the connection into a
//! raw byte stream to and from the guest's serial port. The daemon can disconnect and
//! reconnect at any time (for instance after a daemon restart); the worker keeps running.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::accel::AccelDecision;

pub const CONTROL_SOCKET: &str = "control.sock";
/// The worker's last known status, rewritten on every change; it outlives the worker.
pub const STATUS_FILE: &str = "status.json";

/// A running VM's state as the worker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    Starting,
    Running,
    Paused,
    Saving,
    Saved,
    Stopping,
    Off,
    /// QEMU or a disk server died; `reason` says how.
    Critical,
}

impl WorkerState {
    /// Whether the worker has finished (nothing runs any more).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Saved | Self::Off | Self::Critical)
    }
}

/// What `status` answers, and what `status.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub state: WorkerState,
    /// Why the VM is in this state, when there is more to say (e.g. how QEMU died).
    #[serde(default)]
    pub reason: Option<String>,
    pub worker_pid: u32,
    #[serde(default)]
    pub qemu_pid: Option<u32>,
    #[serde(default)]
    pub accel: Option<AccelDecision>,
    /// When the guest started running (seconds since the Unix epoch).
    #[serde(default)]
    pub running_since: Option<u64>,
    /// The same in milliseconds (for averages since start).
    #[serde(default)]
    pub running_since_ms: Option<u64>,
    /// The processor settings in force (count, and the limit and weight the cgroup
    /// enforces; they change live with `set_processor`).
    #[serde(default)]
    pub processor: Option<vm_config::ProcessorSettings>,
    /// The VM's cgroup, when it runs in one.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Counters sampled for this answer (`status` answers only; never in the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<crate::meter::Meter>,
}

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Turn off at once (QEMU quits; like pulling the plug, disks are flushed).
    Stop,
    /// Press the ACPI power button and wait up to `timeout_secs` for the guest to power off.
    Shutdown {
        timeout_secs: u64,
    },
    /// Save memory and device state into the VM's folder, then exit.
    Save,
    Pause,
    Resume,
    /// Reset the VM (like the reset button).
    Restart,
    /// Turn this connection into the serial console: raw bytes both ways.
    Console,
    /// Apply new reserve, limit and weight to the running VM's cgroup. The count
    /// cannot change while the VM runs.
    SetProcessor {
        processor: vm_config::ProcessorSettings,
    },
    /// Take the link of the adapter with this MAC down or up, as the guest sees
    /// it (QMP `set_link`): the daemon takes it down while it moves the adapter's
    /// port to another switch and up afterwards, so the guest renews its address.
    /// Workers older than this answer that they do not understand the request.
    SetLink {
        mac: String,
        up: bool,
    },
    /// Make every write to the VM's writable disks durable and leave their
    /// files as a clean close would (a VHDX's log emptied), the VM running on.
    FlushDisks,
    /// Switch the disks in these slots to other images (copies of what they serve,
    /// after a storage move) while QEMU stays connected: all or nothing; the old
    /// disks are flushed and closed. Workers older than this answer that they do
    /// not understand the request.
    SwitchDisks {
        disks: Vec<DiskSwitch>,
    },
    /// Save the paused VM's memory and device state into `path` (temp file,
    /// fsync, rename) and stay paused with QEMU running: a checkpoint of a
    /// running VM, which resumes afterwards.
    SaveState {
        path: PathBuf,
    },
    /// A checkpoint of the running VM that keeps the guest running while its
    /// memory is saved: QEMU's `background-snapshot` (userfaultfd write
    /// protection) writes the memory of one instant into `path` (temp file,
    /// fsync, rename) while the guest runs on; the guest stops only for the
    /// switch-over. The disks' requests are held from just before that instant
    /// until the save is done, then each slot in `layers` gets its new
    /// differencing child (as [`Request::NewLayers`]) and the requests go on
    /// there, so memory and disks are of the same instant. Answered by
    /// `snapshot`. All or nothing: on any failure the VM runs on its old chains
    /// and no file is left. `unsupported` (nothing changed) when this host,
    /// QEMU or VM cannot do it: the caller checkpoints another way.
    SnapshotState {
        path: PathBuf,
        layers: Vec<DiskSwitch>,
    },
    /// Give the disk in each slot a new differencing child at the given path
    /// and serve that from now on (the paused VM's checkpoint): each served
    /// chain is flushed and closed while its requests wait, the child made
    /// over its leaf, the new chain opened. All or nothing: on a failure the
    /// children made are removed and the old chains served again.
    NewLayers {
        layers: Vec<DiskSwitch>,
    },
    /// Merge `layer`, a layer of the chain served in `slot` (its running leaf or
    /// a frozen layer under it), into its parent `into` while the VM runs (see
    /// `vhd::ops::live_merge`). Answered by `progress` lines, then `merged` or
    /// an error. Once the parent holds the current data, and before the guest
    /// writes to it, the worker creates `marker` (when given), durably: from
    /// then on the parent, not the layer, is the disk's current state. A layer
    /// no longer in the chain, merged into a parent that is, answers `merged`
    /// with `already` set. A stop, save or shutdown of the VM cancels the merge;
    /// the chain then reads as before.
    MergeLayer {
        slot: vm_config::Slot,
        layer: PathBuf,
        into: PathBuf,
        #[serde(default)]
        marker: Option<PathBuf>,
    },
}

/// One slot of a [`Request::SwitchDisks`]: the image it is to serve from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSwitch {
    pub slot: vm_config::Slot,
    pub path: PathBuf,
}

/// Why a request failed, for the daemon to map onto API error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The request is not valid in the VM's current state; nothing changed.
    InvalidState,
    /// The guest did not do what was asked in time (e.g. shut down).
    Timeout,
    /// Something went wrong doing it.
    Failed,
    /// This worker, its QEMU, the host or the VM cannot do it; nothing changed.
    Unsupported,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok {
        status: WorkerStatus,
    },
    Error {
        kind: FailureKind,
        message: String,
    },
    /// Progress of a long request (bytes done of total), before its answer.
    Progress {
        done: u64,
        total: u64,
    },
    /// The answer to [`Request::MergeLayer`].
    Merged(MergeOutcome),
    /// The answer to [`Request::SnapshotState`].
    Snapshot(SnapshotOutcome),
}

/// What a background snapshot did (times in milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOutcome {
    /// The guest's vCPUs stopped, from QEMU's STOP event to its RESUME event.
    pub downtime_ms: u64,
    /// Size of the state file written.
    pub bytes: u64,
    /// How long the memory was saved with the guest running (RESUME to the
    /// migration's end).
    pub background_ms: u64,
    /// How long the disks' requests were held (the guest ran, its disk I/O
    /// waited).
    pub io_held_ms: u64,
}

/// What a live merge did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeOutcome {
    /// The file the slot's chain is served from now.
    pub top: PathBuf,
    /// The merge had been done before (by an earlier request).
    #[serde(default)]
    pub already: bool,
    #[serde(default)]
    pub bytes_copied: u64,
    #[serde(default)]
    pub rounds: u32,
    /// How long the guest's I/O to the disk was held.
    #[serde(default)]
    pub io_paused_ms: u64,
}

/// Faults talking to a worker.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the VM worker at {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error talking to the VM worker at {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM worker at {} closed the connection before answering", socket.display())]
    Closed { socket: PathBuf },
    #[error("the VM worker at {} sent an answer that is not understood: {detail}", socket.display())]
    BadAnswer { socket: PathBuf, detail: String },
    #[error("{message}")]
    Refused { kind: FailureKind, message: String },
}

/// A connection to one worker's control socket.
pub struct Client {
    socket: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the control socket in `runtime_dir`.
    pub async fn connect(runtime_dir: &Path) -> Result<Self, ClientError> {
        let socket = runtime_dir.join(CONTROL_SOCKET);
        let stream = UnixStream::connect(&socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: socket.clone(),
                source,
            })?;
        Ok(Self {
            socket,
            stream: BufReader::new(stream),
        })
    }

    /// Connects, retrying for up to `timeout` while the worker is starting.
    pub async fn connect_with_retry(
        runtime_dir: &Path,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match Self::connect(runtime_dir).await {
                Ok(c) => return Ok(c),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Sends `request` and waits for its answer; a refusal is [`ClientError::Refused`].
    pub async fn call(&mut self, request: &Request) -> Result<WorkerStatus, ClientError> {
        match self.exchange(request, &mut |_, _| {}).await? {
            Response::Ok { status } => Ok(status),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Sends a [`Request::MergeLayer`] and waits for the merge to end, passing
    /// each progress report to `progress`.
    pub async fn merge_layer(
        &mut self,
        request: &Request,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<MergeOutcome, ClientError> {
        match self.exchange(request, progress).await? {
            Response::Merged(outcome) => Ok(outcome),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Sends a [`Request::SnapshotState`] and waits for the snapshot.
    pub async fn snapshot_state(
        &mut self,
        request: &Request,
    ) -> Result<SnapshotOutcome, ClientError> {
        match self.exchange(request, &mut |_, _| {}).await? {
            Response::Snapshot(outcome) => Ok(outcome),
            other => Err(self.unexpected(&other)),
        }
    }

    fn unexpected(&self, answer: &Response) -> ClientError {
        ClientError::BadAnswer {
            socket: self.socket.clone(),
            detail: format!("an answer of another kind: {answer:?}"),
        }
    }

    /// Sends `request`; returns its answer (a refusal as an error), passing
    /// progress lines before it to `progress`.
    async fn exchange(
        &mut self,
        request: &Request,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        let mut line = serde_json::to_string(request).map_err(|e| ClientError::BadAnswer {
            socket: self.socket.clone(),
            detail: e.to_string(),
        })?;
        line.push('\n');
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .map_err(io)?;
        loop {
            let mut answer = String::new();
            let n = self
                .stream
                .read_line(&mut answer)
                .await
                .map_err(|source| ClientError::Io {
                    socket: self.socket.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(ClientError::Closed {
                    socket: self.socket.clone(),
                });
            }
            match serde_json::from_str(&answer) {
                Ok(Response::Progress { done, total }) => progress(done, total),
                Ok(Response::Error { kind, message }) => {
                    return Err(ClientError::Refused { kind, message })
                }
                Ok(other) => return Ok(other),
                Err(e) => {
                    return Err(ClientError::BadAnswer {
                        socket: self.socket.clone(),
                        detail: format!("{e}: {}", answer.trim()),
                    })
                }
            }
        }
    }

    /// Switches this connection to the serial console and returns the raw stream.
    pub async fn into_console(mut self) -> Result<BufReader<UnixStream>, ClientError> {
        self.call(&Request::Console).await?;
        Ok(self.stream)
    }
}

/// Reads the status the worker last wrote into `runtime_dir` (also after it exited).
pub fn read_status_file(runtime_dir: &Path) -> std::io::Result<WorkerStatus> {
    let bytes = std::fs::read(runtime_dir.join(STATUS_FILE))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes `status` into `runtime_dir` atomically (temp file, fsync, rename).
pub fn write_status_file(runtime_dir: &Path, status: &WorkerStatus) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = runtime_dir.join(format!("{STATUS_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, runtime_dir.join(STATUS_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_are_one_json_object_each() {
        assert_eq!(
            serde_json::to_string(&Request::Shutdown { timeout_secs: 30 }).unwrap(),
            r#"{"op":"shutdown","timeout_secs":30}"#
        );
        let r: Request = serde_json::from_str(r#"{"op":"pause"}"#).unwrap();
        let switch = Request::SwitchDisks {
            disks: vec![DiskSwitch {
                slot: vm_config::Slot {
                    controller: vm_config::ControllerKind::Scsi,
                    controller_number: 0,
                    location: 1,
                },
                path: "/d/x.vhdx".into(),
            }],
        };
        let text = serde_json::to_string(&switch).unwrap();
        assert!(
            text.starts_with(r#"{"op":"switch_disks","disks":[{"slot":"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), switch);
        assert_eq!(r, Request::Pause);
        let e = Response::Error {
            kind: FailureKind::InvalidState,
            message: "VM web1 is Paused; resume it first".into(),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"result":"error","kind":"InvalidState","message":"VM web1 is Paused; resume it first"}"#
        );
    }
}
