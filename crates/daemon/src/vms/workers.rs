//! The worker integration: `viridiand` starts one `viridian-worker` per running VM,
//! talks to it over its control socket, watches it, and re-attaches after a restart.
//!
//! Workers run in their own session (setsid), so stopping or restarting the daemon
//! leaves them and their VMs running. Each VM's worker is watched by a task that polls
//! its status; when the worker is gone the task reads the status the worker left in
//! `runtime/status.json` (Off, Saved, Critical with the reason), or, when the worker
//! was killed before it could write one, marks the VM Critical.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::vms::{VmRuntime, VmState};
use jobs::{JobContext, JobError};
use uuid::Uuid;
use vm_config::VmSettings;
use worker::accel::AccelChoice;
use worker::control::{self, Client, ClientError, FailureKind, Request, WorkerState, WorkerStatus};
use worker::spec::{WorkerSpec, SAVED_STATE_FILE};

use crate::service::Service;
use crate::vms::runtime::{BoxFuture, StopMode, WorkerControl};

/// How long a start may take before the job fails (TCG boots are slow, but the worker
/// reports Running as soon as QEMU runs, long before the guest has booted).
const START_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(500);
/// How long a stop or save job waits for the worker to exit after the VM stopped.
const WORKER_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

struct Watched {
    /// Which run of the VM this is: a watcher only ever acts on its own run, so the
    /// watcher of a worker that just exited (after a save) cannot touch the next one.
    run: u64,
    runtime_dir: PathBuf,
    vm_dir: PathBuf,
    name: String,
    status: Option<WorkerStatus>,
    /// The counters sampled with each status poll.
    history: crate::metering::History,
}

impl Watched {
    fn record(&mut self, status: &WorkerStatus) {
        if let Some(m) = &status.meter {
            self.history.push(m.clone());
        }
        self.status = Some(status.clone());
    }
}

/// Starts, controls and watches VM workers.
pub struct WorkerSupervisor {
    service: OnceLock<Weak<Service>>,
    worker_binary: PathBuf,
    accel: AccelChoice,
    /// Generation 1 firmware, as decided at start-up.
    bios: worker::firmware::BiosChoice,
    /// Decided once at daemon start and handed to every worker (no probe per start).
    decision: Mutex<Option<worker::accel::AccelDecision>>,
    sandbox: OnceLock<bool>,
    /// Where VMs' cgroups go (detected at start); `None`: limits are not enforced.
    pub cgroup: Option<cgroups::Hierarchy>,
    runs: std::sync::atomic::AtomicU64,
    watched: Mutex<HashMap<Uuid, Watched>>,
}

/// Longest name of a socket the worker and QEMU make in the runtime folder
/// (`incoming.sock`, `scsi3-63.sock`, ...), with room to spare.
const SOCKET_NAME_MAX: usize = 24;
/// A unix socket's path must fit in `sun_path` (108 bytes with its NUL).
const SOCKET_PATH_MAX: usize = 107;
/// Runtime folders of VMs whose own folder's path is too long for sockets.
const SHORT_RUNTIME_ROOT: &str = "/run/viridian/rt";

/// The folder with a running VM's sockets, logs and status: `runtime/` in the VM's
/// folder, or, when that path is too long for unix sockets (a deep `--data-dir`),
/// `/run/viridian/rt/<vm-id>`, which `runtime` in the VM's folder then links to.
pub fn runtime_dir(vm_dir: &Path) -> PathBuf {
    let own = vm_dir.join("runtime");
    if own.as_os_str().len() + 1 + SOCKET_NAME_MAX <= SOCKET_PATH_MAX {
        return own;
    }
    let id = vm_dir.file_name().unwrap_or_default();
    Path::new(SHORT_RUNTIME_ROOT).join(id)
}

/// Makes the runtime folder; a short one elsewhere gets the `runtime` link in the
/// VM's folder, so its logs are found where they always are.
fn prepare_runtime_dir(vm_dir: &Path, rt: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(rt)?;
    let own = vm_dir.join("runtime");
    if rt == own {
        return Ok(());
    }
    match std::fs::read_link(&own) {
        Ok(target) if target == rt => return Ok(()),
        Ok(_) => std::fs::remove_file(&own)?,
        Err(_) if own.is_dir() => std::fs::remove_dir_all(&own)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(rt, &own)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where `viridian-worker` is: `$VIRIDIAN_WORKER`, else next to `viridiand`, else PATH.
pub fn find_worker_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VIRIDIAN_WORKER") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let candidate = dir.join("viridian-worker");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    PathBuf::from("viridian-worker")
}

fn to_runtime(status: &WorkerStatus) -> VmRuntime {
    let state = match status.state {
        WorkerState::Starting => VmState::Starting,
        WorkerState::Running => VmState::Running,
        WorkerState::Paused => VmState::Paused,
        WorkerState::Saving => VmState::Saving,
        WorkerState::Saved => VmState::Saved,
        WorkerState::Stopping => VmState::Stopping,
        WorkerState::Off => VmState::Off,
        WorkerState::Critical => VmState::Critical,
    };
    let mut rt = VmRuntime::with_state(state);
    if !status.state.is_final() {
        rt.worker_pid = Some(status.worker_pid);
        rt.uptime_seconds = status
            .running_since
            .map(|since| now_unix().saturating_sub(since));
    }
    if matches!(state, VmState::Critical) {
        rt.reason = status.reason.clone();
    }
    rt
}

fn refused(e: ClientError) -> JobError {
    match e {
        ClientError::Refused { kind, message } => JobError::failed(
            match kind {
                FailureKind::InvalidState => "InvalidState",
                FailureKind::Timeout => "Timeout",
                FailureKind::Failed => "Failed",
                FailureKind::Unsupported => "Unsupported",
            },
            message,
        ),
        other => JobError::failed("WorkerUnavailable", worker::runtime::error_chain(&other)),
    }
}

impl WorkerSupervisor {
    pub fn new(
        accel: AccelChoice,
        cgroup: Option<cgroups::Hierarchy>,
        bios: worker::firmware::BiosChoice,
    ) -> Arc<Self> {
        Arc::new(Self {
            cgroup,
            bios,
            service: OnceLock::new(),
            worker_binary: find_worker_binary(),
            accel,
            decision: Mutex::new(None),
            sandbox: OnceLock::new(),
            runs: std::sync::atomic::AtomicU64::new(1),
            watched: Mutex::new(HashMap::new()),
        })
    }

    /// Connects the supervisor to the service it reports to.
    pub fn attach(&self, service: &Arc<Service>) {
        let _ = self.service.set(Arc::downgrade(service));
    }

    fn report(&self, id: Uuid, runtime: VmRuntime) {
        if let Some(svc) = self.service.get().and_then(Weak::upgrade) {
            let stopped = matches!(
                runtime.state,
                VmState::Off | VmState::Saved | VmState::Critical
            );
            if stopped {
                svc.switches.release_vm(id);
            }
            let now_running = matches!(runtime.state, VmState::Running | VmState::Paused)
                && !matches!(
                    svc.runtime.get(id).state,
                    VmState::Running | VmState::Paused
                );
            svc.set_runtime(id, runtime);
            // Merges that waited for the VM's disks to be free, or for its
            // worker to merge them live, can run now.
            if stopped || now_running {
                crate::checkpoints::settle_in_background(&svc, id);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Watched>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime_dir_of(&self, id: Uuid) -> Option<PathBuf> {
        self.lock().get(&id).map(|w| w.runtime_dir.clone())
    }

    fn name_of(&self, id: Uuid) -> String {
        self.lock()
            .get(&id)
            .map(|w| w.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    /// Sends one request to the VM's worker.
    pub async fn call(&self, id: Uuid, request: Request) -> Result<WorkerStatus, JobError> {
        let Some(rt) = self.runtime_dir_of(id) else {
            return Err(JobError::failed(
                "InvalidState",
                format!("VM {} has no running worker", self.name_of(id)),
            ));
        };
        let mut client = Client::connect(&rt).await.map_err(refused)?;
        let status = client.call(&request).await.map_err(refused)?;
        self.update(id, &status);
        Ok(status)
    }

    fn update(&self, id: Uuid, status: &WorkerStatus) {
        if let Some(w) = self.lock().get_mut(&id) {
            w.record(status);
        }
        self.report(id, to_runtime(status));
    }

    /// The console log of the VM in `vm_dir` (kept after the VM stops).
    pub fn console_log(vm_dir: &Path) -> std::io::Result<Vec<u8>> {
        worker::console::read_log(&runtime_dir(vm_dir))
    }

    fn next_run(&self) -> u64 {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn is_current(&self, id: Uuid, run: u64) -> bool {
        self.lock().get(&id).is_some_and(|w| w.run == run)
    }

    /// Watches run `run` of VM `id` (worker process `pid`) until it ends, then records
    /// how it ended.
    fn watch(
        self: &Arc<Self>,
        id: Uuid,
        run: u64,
        pid: u32,
        mut child: Option<tokio::process::Child>,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(rt) = this.runtime_dir_of(id) else {
                return;
            };
            loop {
                if !this.is_current(id, run) {
                    return;
                }
                if let Some(c) = child.as_mut() {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                }
                let alive = match Client::connect(&rt).await {
                    Ok(mut client) => match client.call(&Request::Status).await {
                        // Another run's worker on the same socket means ours is gone.
                        Ok(status) if status.worker_pid != pid => false,
                        Ok(status) if !this.is_current(id, run) => {
                            drop(status);
                            return;
                        }
                        Ok(status) => {
                            let changed = this
                                .lock()
                                .get(&id)
                                .and_then(|w| w.status.as_ref())
                                .map(|s| s.state != status.state)
                                .unwrap_or(true);
                            if changed {
                                this.update(id, &status);
                            } else if let Some(w) = this.lock().get_mut(&id) {
                                w.record(&status);
                            }
                            true
                        }
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                if !alive {
                    // The socket may be briefly busy; confirm the worker is gone.
                    let running = match &mut child {
                        Some(c) => matches!(c.try_wait(), Ok(None)),
                        None => process_alive(pid),
                    };
                    if !running {
                        break;
                    }
                }
                tokio::time::sleep(POLL).await;
            }
            if let Some(mut c) = child {
                let _ = c.wait().await;
            }
            this.finish(id, run);
            this.remove_stale_cgroup(id).await;
        });
    }

    /// A worker that was killed could not remove the VM's cgroup; its QEMU dies with
    /// it a moment later, and then the group can go. Stops when the VM starts again
    /// (its new worker creates and owns the group).
    async fn remove_stale_cgroup(&self, id: Uuid) {
        let Some(h) = &self.cgroup else {
            return;
        };
        let group = h.vm_group(&id.to_string());
        for _ in 0..100 {
            if !group.exists() || self.lock().contains_key(&id) {
                return;
            }
            match group.remove() {
                Ok(()) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        tracing::warn!(vm = %id, "cannot remove the VM's cgroup {}", group.path().display());
    }

    /// Records the final state of run `run` of VM `id`, whose worker has gone.
    fn finish(&self, id: Uuid, run: u64) {
        let w = {
            let mut watched = self.lock();
            match watched.get(&id) {
                Some(w) if w.run == run => watched.remove(&id),
                _ => None,
            }
        };
        let Some(w) = w else {
            return;
        };
        let status = control::read_status_file(&w.runtime_dir).ok();
        let runtime = match status {
            Some(s) if s.state.is_final() => to_runtime(&s),
            Some(s) => {
                let mut rt = VmRuntime::with_state(VmState::Critical);
                rt.reason = Some(format!(
                    "the worker of VM {} (pid {}) exited unexpectedly while the VM was {:?}; \
                     its disks were released. Start the VM again",
                    w.name, s.worker_pid, s.state
                ));
                // Leave a final status behind so a restarted daemon agrees.
                let mut s = s;
                s.state = WorkerState::Critical;
                s.reason = rt.reason.clone();
                let _ = control::write_status_file(&w.runtime_dir, &s);
                rt
            }
            None => {
                let mut rt = VmRuntime::with_state(VmState::Critical);
                rt.reason = Some(format!(
                    "the worker of VM {} exited without reporting a status; see {}",
                    w.name,
                    w.runtime_dir.join("worker.log").display()
                ));
                rt
            }
        };
        // A VM that was saved stays Saved as long as its state file exists.
        let runtime = if runtime.state == VmState::Off && w.vm_dir.join(SAVED_STATE_FILE).exists() {
            VmRuntime::with_state(VmState::Saved)
        } else {
            runtime
        };
        self.report(id, runtime);
    }

    async fn start_inner(
        self: Arc<Self>,
        vm: VmSettings,
        vm_dir: PathBuf,
        job: JobContext,
    ) -> Result<(), JobError> {
        let id = vm.id;
        let rt = runtime_dir(&vm_dir);
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            JobError::failed(
                "Failed",
                format!("cannot start VM {}: {what}: {e}", vm.name),
            )
        };
        prepare_runtime_dir(&vm_dir, &rt).map_err(|e| fail("creating its runtime folder", &e))?;
        // A worker whose VM just stopped by itself may not have exited yet; it may still
        // hold the disk locks. Let it finish before the next one starts.
        let previous = self
            .lock()
            .get(&id)
            .and_then(|w| w.status.as_ref())
            .map(|s| s.worker_pid);
        if let Some(pid) = previous {
            wait_for_exit(pid)
                .await
                .map_err(|e| fail("waiting for its previous worker to exit", &e))?;
        }
        let resume = vm_dir.join(SAVED_STATE_FILE).exists();
        // Ports on the switches; an adapter whose switch is missing runs
        // disconnected, and the job says so (the VM still starts).
        let network = match self.service.get().and_then(Weak::upgrade) {
            Some(svc) => {
                let (ports, connections) = svc.switches.connect_vm(&vm).await;
                for c in connections.iter().filter(|c| c.reason.is_some()) {
                    let reason = c.reason.as_deref().unwrap_or_default();
                    tracing::warn!(vm = %id, mac = %c.mac, "network adapter disconnected: {reason}");
                    job.add_affected(jobs::AffectedElement::new(
                        "disconnected-network-adapter",
                        c.mac.clone(),
                    ));
                    job.set_description(format!(
                        "Start VM {} (network adapter {} disconnected: {reason})",
                        vm.name, c.mac
                    ));
                }
                ports
            }
            None => Vec::new(),
        };
        let spec = WorkerSpec {
            settings: vm.clone(),
            vm_dir: vm_dir.clone(),
            runtime_dir: rt.clone(),
            accel: self.accel,
            accel_decision: self
                .decision
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            sandbox: self.sandbox.get().copied(),
            resume,
            direct_kernel: None,
            console_log_limit: worker::console::DEFAULT_LOG_LIMIT,
            qemu: None,
            cgroup: self.cgroup.clone(),
            bios: self.bios.clone(),
            network,
        };
        let spec_path = rt.join("spec.json");
        let bytes = serde_json::to_vec_pretty(&spec).map_err(|e| fail("writing its spec", &e))?;
        std::fs::write(&spec_path, bytes).map_err(|e| fail("writing its spec", &e))?;
        // A stale status from the previous run must not be mistaken for this one.
        let _ = std::fs::remove_file(rt.join(control::STATUS_FILE));
        let log = std::fs::File::create(rt.join("worker.log"))
            .map_err(|e| fail("creating the worker log", &e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| fail("creating the worker log", &e))?;
        let run = self.next_run();
        self.lock().insert(
            id,
            Watched {
                run,
                runtime_dir: rt.clone(),
                vm_dir: vm_dir.clone(),
                name: vm.name.clone(),
                status: None,
                history: Default::default(),
            },
        );
        self.report(id, VmRuntime::with_state(VmState::Starting));
        job.set_percent(10);
        let mut command = std::process::Command::new(&self.worker_binary);
        command
            .arg("--spec")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own session: the worker outlives a daemon restart.
            .process_group(0);
        let child = tokio::process::Command::from(command).spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                self.lock().remove(&id);
                let err = fail(&format!("running {}", self.worker_binary.display()), &e);
                let mut rtm = VmRuntime::with_state(VmState::Off);
                if let JobError::Failed { description, .. } = &err {
                    rtm = VmRuntime::with_state(VmState::Critical);
                    rtm.reason = Some(description.clone());
                }
                self.report(id, rtm);
                return Err(err);
            }
        };
        job.set_percent(30);
        // Wait for Running, or for the worker to give up.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let outcome = loop {
            if let Ok(Some(_)) = child.try_wait() {
                break None;
            }
            if let Ok(mut client) = Client::connect(&rt).await {
                if let Ok(status) = client.call(&Request::Status).await {
                    break Some(status);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.start_kill();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match outcome {
            Some(status) => {
                self.update(id, &status);
                let pid = child.id().unwrap_or(status.worker_pid);
                self.watch(id, run, pid, Some(child));
                job.set_percent(100);
                Ok(())
            }
            None => {
                let _ = child.wait().await;
                let reason = control::read_status_file(&rt)
                    .ok()
                    .and_then(|s| s.reason)
                    .unwrap_or_else(|| {
                        format!(
                            "the worker exited before the VM ran; see {}",
                            rt.join("worker.log").display()
                        )
                    });
                self.lock().remove(&id);
                let mut rtm =
                    VmRuntime::with_state(if resume { VmState::Saved } else { VmState::Off });
                rtm.reason = Some(reason.clone());
                self.report(id, rtm);
                Err(JobError::failed(
                    "Failed",
                    format!("VM {} did not start: {reason}", vm.name),
                ))
            }
        }
    }
}

/// Waits until the worker process `pid` has exited (or is a zombie).
async fn wait_for_exit(pid: u32) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WORKER_EXIT_TIMEOUT;
    // A pid that now belongs to something else (reused) is not our worker.
    let is_worker = || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"--spec"))
    };
    while process_alive(pid) && is_worker() {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "its worker (pid {pid}) has not exited after {} s",
                WORKER_EXIT_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Slots and the images for them, as the control protocol names them.
fn disk_switches(disks: Vec<(vm_config::Slot, PathBuf)>) -> Vec<worker::control::DiskSwitch> {
    disks
        .into_iter()
        .map(|(slot, path)| worker::control::DiskSwitch { slot, path })
        .collect()
}

impl WorkerControl for Arc<WorkerSupervisor> {
    fn start(
        &self,
        vm: VmSettings,
        vm_dir: PathBuf,
        job: JobContext,
    ) -> BoxFuture<Result<(), JobError>> {
        Box::pin(self.clone().start_inner(vm, vm_dir, job))
    }

    fn stop(&self, id: Uuid, mode: StopMode, job: JobContext) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        Box::pin(async move {
            let request = match mode {
                StopMode::TurnOff => Request::Stop,
                StopMode::Shutdown { timeout_secs } => Request::Shutdown { timeout_secs },
                StopMode::Save => Request::Save,
            };
            job.set_percent(10);
            let pid = this
                .lock()
                .get(&id)
                .and_then(|w| w.status.as_ref())
                .map(|s| s.worker_pid);
            let status = this.call(id, request).await?;
            job.set_percent(80);
            // The job ends when the worker has gone: until then it may still hold the
            // disk locks, and a start right after the job would find them taken.
            if let Some(pid) = pid {
                wait_for_exit(pid)
                    .await
                    .map_err(|e| JobError::failed("Failed", format!("the VM stopped, but {e}")))?;
            }
            job.set_percent(100);
            // The watcher records the final state once the worker has exited; say it now.
            this.update(id, &status);
            Ok(())
        })
    }

    fn pause(&self, id: Uuid, paused: bool) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        Box::pin(async move {
            let request = if paused {
                Request::Pause
            } else {
                Request::Resume
            };
            this.call(id, request).await.map(drop)
        })
    }

    fn restart(&self, id: Uuid) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        Box::pin(async move { this.call(id, Request::Restart).await.map(drop) })
    }

    fn flush_disks(&self, id: Uuid) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        Box::pin(async move { this.call(id, Request::FlushDisks).await.map(drop) })
    }

    fn switch_disks(
        &self,
        id: Uuid,
        disks: Vec<(vm_config::Slot, PathBuf)>,
    ) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        let disks = disk_switches(disks);
        Box::pin(async move {
            this.call(id, Request::SwitchDisks { disks })
                .await
                .map(drop)
        })
    }

    fn save_state(&self, id: Uuid, path: PathBuf) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        Box::pin(async move { this.call(id, Request::SaveState { path }).await.map(drop) })
    }

    fn new_layers(
        &self,
        id: Uuid,
        layers: Vec<(vm_config::Slot, PathBuf)>,
    ) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        let layers = disk_switches(layers);
        Box::pin(async move { this.call(id, Request::NewLayers { layers }).await.map(drop) })
    }

    fn snapshot_state(
        &self,
        id: Uuid,
        path: PathBuf,
        layers: Vec<(vm_config::Slot, PathBuf)>,
    ) -> BoxFuture<Result<worker::control::SnapshotOutcome, JobError>> {
        let this = self.clone();
        let layers = disk_switches(layers);
        Box::pin(async move {
            let Some(rt) = this.runtime_dir_of(id) else {
                return Err(JobError::failed(
                    "InvalidState",
                    format!("VM {} has no running worker", this.name_of(id)),
                ));
            };
            let mut client = Client::connect(&rt).await.map_err(refused)?;
            client
                .snapshot_state(&Request::SnapshotState { path, layers })
                .await
                .map_err(refused)
        })
    }

    fn merge_layer(
        &self,
        id: Uuid,
        merge: crate::vms::runtime::LayerMerge,
        mut progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> BoxFuture<Result<worker::control::MergeOutcome, JobError>> {
        let this = self.clone();
        Box::pin(async move {
            let Some(rt) = this.runtime_dir_of(id) else {
                return Err(JobError::failed(
                    "InvalidState",
                    format!("VM {} has no running worker", this.name_of(id)),
                ));
            };
            let mut client = Client::connect(&rt).await.map_err(refused)?;
            let request = Request::MergeLayer {
                slot: merge.slot,
                layer: merge.layer,
                into: merge.into,
                marker: merge.marker,
            };
            client
                .merge_layer(&request, &mut *progress)
                .await
                .map_err(refused)
        })
    }

    fn set_link(&self, id: Uuid, mac: String, up: bool) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        Box::pin(async move { this.call(id, Request::SetLink { mac, up }).await.map(drop) })
    }

    fn set_processor(
        &self,
        id: Uuid,
        processor: vm_config::ProcessorSettings,
    ) -> BoxFuture<Result<(), JobError>> {
        let this = self.clone();
        Box::pin(async move {
            this.call(id, Request::SetProcessor { processor })
                .await
                .map(drop)
        })
    }

    fn live(&self, id: Uuid) -> Option<VmRuntime> {
        let watched = self.lock();
        let w = watched.get(&id)?;
        let status = w.status.as_ref()?;
        let mut rt = to_runtime(status);
        if !status.state.is_final() {
            rt.processor_settings = status.processor;
            let count = status.processor.map_or(1, |p| p.count);
            rt.processor = w.history.processor_use(count);
            rt.processor_load_percent = rt
                .processor
                .as_ref()
                .map(|p| p.total_percent.round().clamp(0.0, 100.0) as u8);
            rt.memory_in_use_mib = w.history.latest().map(|m| m.memory_bytes / (1024 * 1024));
            rt.drives = w.history.drive_use();
        }
        Some(rt)
    }

    fn measure(&self, id: Uuid) -> Option<api::vms::VmMeasurement> {
        let watched = self.lock();
        let w = watched.get(&id)?;
        let status = w.status.as_ref()?;
        let started = status
            .running_since_ms
            .or(status.running_since.map(|s| s * 1000))?;
        let count = status.processor.map_or(1, |p| p.count);
        crate::metering::measurement(id, &w.name, count, started, &w.history)
    }

    fn metrics(
        &self,
    ) -> Vec<(
        Uuid,
        String,
        vm_config::ProcessorSettings,
        worker::meter::Meter,
    )> {
        self.lock()
            .iter()
            .filter_map(|(id, w)| {
                let status = w.status.as_ref()?;
                if status.state.is_final() {
                    return None;
                }
                Some((
                    *id,
                    w.name.clone(),
                    status.processor?,
                    w.history.latest()?.clone(),
                ))
            })
            .collect()
    }

    fn reattach(&self, vms: Vec<(VmSettings, PathBuf)>) -> BoxFuture<Vec<(Uuid, VmRuntime)>> {
        let this = self.clone();
        Box::pin(async move {
            let mut found = Vec::new();
            for (vm, vm_dir) in vms {
                let rt = runtime_dir(&vm_dir);
                let live = match Client::connect(&rt).await {
                    Ok(mut c) => c.call(&Request::Status).await.ok(),
                    Err(_) => None,
                };
                if let Some(status) = live {
                    if let Some(svc) = this.service.get().and_then(Weak::upgrade) {
                        // Its ports, as its spec recorded them at its start.
                        let network = std::fs::read(rt.join("spec.json"))
                            .ok()
                            .and_then(|b| serde_json::from_slice::<WorkerSpec>(&b).ok())
                            .map(|s| s.network)
                            .unwrap_or_default();
                        svc.switches.adopt(&vm, &network);
                    }
                    let run = this.next_run();
                    this.lock().insert(
                        vm.id,
                        Watched {
                            run,
                            runtime_dir: rt,
                            vm_dir: vm_dir.clone(),
                            name: vm.name.clone(),
                            status: Some(status.clone()),
                            history: Default::default(),
                        },
                    );
                    found.push((vm.id, to_runtime(&status)));
                    this.watch(vm.id, run, status.worker_pid, None);
                    continue;
                }
                if vm_dir.join(SAVED_STATE_FILE).exists() {
                    found.push((vm.id, VmRuntime::with_state(VmState::Saved)));
                    continue;
                }
                // A worker that died while the daemon was down left a non-final status.
                if let Ok(s) = control::read_status_file(&rt) {
                    if s.state == WorkerState::Critical
                        || (!s.state.is_final() && !process_alive(s.worker_pid))
                    {
                        let mut r = VmRuntime::with_state(VmState::Critical);
                        r.reason = Some(s.reason.unwrap_or_else(|| {
                            format!(
                                "the worker of VM {} (pid {}) exited while the daemon was down",
                                vm.name, s.worker_pid
                            )
                        }));
                        found.push((vm.id, r));
                    }
                }
            }
            found
        })
    }
}

/// Installs the worker integration into a service being built: the supervisor, and
/// the accelerator decision (with its reason) that `GET /v1/host` reports.
pub fn install(
    svc: &mut Service,
    config: &crate::config::DaemonConfig,
) -> Result<Arc<WorkerSupervisor>, String> {
    let accel: AccelChoice = config.accel.parse()?;
    let host = worker::accel::probe_host(Path::new("qemu-system-x86_64"));
    let decision = worker::accel::decide(accel, &host)?;
    let bios =
        worker::firmware::resolve(&config.bios, Path::new(worker::firmware::VIRIDIAN_SEABIOS))
            .map_err(|e| e.to_string())?;
    tracing::info!(bios = ?bios.path, reason = %bios.reason, "generation 1 firmware");
    svc.host.firmware = api::host::FirmwareInfo {
        generation1: bios
            .path
            .as_ref()
            .map_or_else(|| "qemu".to_string(), |p| p.display().to_string()),
        generation1_reason: bios.reason,
        generation2: worker::runtime::OVMF_CODE.into(),
    };
    // Workers boot what was decided here (not a later look at what is installed),
    // so `viridian host` tells the truth.
    let bios = match bios.path {
        Some(path) => worker::firmware::BiosChoice::File(path),
        None => worker::firmware::BiosChoice::Qemu,
    };
    svc.host.accelerator.kind = decision.accel.as_str().to_string();
    svc.host.accelerator.reason = decision.reason.clone();
    let cgroup = match cgroups::Hierarchy::detect() {
        Ok(h) => {
            tracing::info!(hierarchy = %h.describe(), "VM processor limits and weights are enforced through cgroups");
            svc.host.processor_control = format!(
                "{}; each VM's worker and QEMU run in {}",
                h.describe(),
                h.vm_group("<id>").path().display()
            );
            Some(h)
        }
        Err(e) => {
            tracing::warn!("VM processor limits and weights are not enforced: {e}");
            svc.host.processor_control =
                format!("none: processor limits and weights are not enforced ({e})");
            None
        }
    };
    let supervisor = WorkerSupervisor::new(accel, cgroup, bios);
    *supervisor
        .decision
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(decision);
    svc.workers = Some(Arc::new(supervisor.clone()));
    Ok(supervisor)
}

/// Connects the supervisor to the running service and re-attaches to the workers
/// of VMs that kept running while the daemon was down.
pub async fn attach_and_reattach(supervisor: &Arc<WorkerSupervisor>, svc: &Arc<Service>) {
    supervisor.attach(svc);
    let sandbox = worker::runtime::sandbox_supported(Path::new("qemu-system-x86_64")).await;
    let _ = supervisor.sandbox.set(sandbox);
    let vms: Vec<(VmSettings, PathBuf)> = svc
        .store()
        .entries()
        .filter_map(|e| e.settings.clone().map(|s| (s, e.dir.clone())))
        .collect();
    let count = vms.len();
    for (id, runtime) in supervisor.reattach(vms).await {
        tracing::info!(vm = %id, state = ?runtime.state, "VM state found at start");
        svc.set_runtime(id, runtime);
    }
    tracing::info!(vms = count, "worker integration ready");
}
