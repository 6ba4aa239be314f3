//! The worker's life: open and serve the disks, run QEMU, answer the control
//! socket, and report how it ended.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch};

use crate::accel::{self, AccelDecision};
use crate::console::CappedLog;
use crate::control::{
    self, FailureKind, Request, Response, WorkerState, WorkerStatus, CONTROL_SOCKET,
};
use crate::disks::{self, ServedDisks};
use crate::qemu::{DirectKernel, IdeDrive, IdeMedia, Platform, QemuConfig, SyntheticDisk};
use crate::spec::WorkerSpec;

pub const QMP_SOCKET: &str = "qmp.sock";
pub const SERIAL_SOCKET: &str = "serial.sock";
pub const NBD_SOCKET: &str = "nbd.sock";
pub const QEMU_LOG: &str = "qemu.log";
const SAVE_SOCKET: &str = "save.sock";

mod snapshot;
const INCOMING_SOCKET: &str = "incoming.sock";

/// Faults that keep a worker from running its VM.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot prepare the runtime folder {}", path.display())]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Accel(String),
    #[error(transparent)]
    Disks(#[from] disks::DiskError),
    #[error("cannot start QEMU ({})", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited while starting ({status}); its log {} ends with: {tail}", log.display())]
    QemuStart {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("QEMU's QMP connection failed while starting the VM")]
    Qmp(#[from] qmp::Error),
    #[error("cannot connect to the VM's serial port socket {}", path.display())]
    Serial {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot restore the saved state {}: {detail}", path.display())]
    Restore { path: PathBuf, detail: String },
    #[error("the UEFI firmware file {} is missing; generation 2 VMs need Debian's ovmf package (scripts/setup.sh installs it)", path.display())]
    Firmware { path: PathBuf },
    #[error(transparent)]
    Bios(#[from] crate::firmware::FirmwareError),
    #[error("cannot put the VM into its cgroup")]
    Cgroup(#[from] cgroups::CgroupError),
    #[error("the serial console log in {} cannot be written", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the worker should treat QEMU's exit when it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    None,
    TurnOff,
    Save,
}

struct Shared {
    spec: WorkerSpec,
    qmp: Arc<qmp::Client>,
    status: watch::Sender<WorkerStatus>,
    intent: Mutex<Intent>,
    guest_shutdown: Mutex<Option<String>>,
    /// Serialises lifecycle operations; status and console never wait on it.
    op: tokio::sync::Mutex<()>,
    serial_out: broadcast::Sender<Vec<u8>>,
    serial_in: mpsc::Sender<Vec<u8>>,
    /// The VM's cgroup (worker and QEMU), when it runs in one.
    group: Option<cgroups::Group>,
    /// QEMU's pid and its vCPU threads, in vCPU index order.
    qemu_pid: u32,
    vcpu_threads: Vec<u32>,
    /// Every served drive's counters, for the meter (paths change on a switch).
    drives: Mutex<Vec<crate::meter::MeteredDrive>>,
    /// The served disks, until QEMU has exited and they are closed.
    served: tokio::sync::Mutex<Option<ServedDisks>>,
    /// Held (shared) by every control request from its start until its answer is
    /// written; the worker takes it exclusively before it exits, so the answer to
    /// a stop or save that ended the VM reaches the daemon.
    answering: tokio::sync::RwLock<()>,
    /// Held by a live merge for its whole run: one at a time, and no disk
    /// switch meanwhile.
    merging: tokio::sync::Mutex<()>,
    /// A background snapshot runs: QEMU's STOP and RESUME around its instant
    /// are its own, not a pause of the VM.
    snapshotting: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn state(&self) -> WorkerState {
        self.status.borrow().state
    }

    fn set_state(&self, state: WorkerState, reason: Option<String>) {
        self.status.send_modify(|s| {
            s.state = state;
            s.reason = reason;
            if state == WorkerState::Running && s.running_since.is_none() {
                s.running_since = Some(now_unix());
                s.running_since_ms = Some(crate::meter::now_unix_ms());
            }
        });
        if let Err(e) = control::write_status_file(&self.spec.runtime_dir, &self.status.borrow()) {
            tracing::warn!("cannot write the status file: {e}");
        }
    }

    fn set_intent(&self, intent: Intent) {
        *self.intent.lock().unwrap_or_else(|p| p.into_inner()) = intent;
    }

    fn intent(&self) -> Intent {
        *self.intent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(&self) -> &str {
        &self.spec.settings.name
    }

    /// Waits until the worker reaches a final state, or `timeout` passes.
    async fn wait_final(&self, timeout: Duration) -> Option<WorkerStatus> {
        let mut rx = self.status.subscribe();
        let result = tokio::time::timeout(timeout, rx.wait_for(|s| s.state.is_final())).await;
        match result {
            Ok(Ok(status)) => Some(status.clone()),
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn runtime_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |source| WorkerError::RuntimeDir {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs the VM described by `spec` until it ends; returns the final status, which is
/// also left in `<runtime_dir>/status.json`. A start failure is written there too
/// (state Critical, with the reason).
pub async fn run(spec: WorkerSpec) -> Result<WorkerStatus, WorkerError> {
    let runtime_dir = spec.runtime_dir.clone();
    std::fs::create_dir_all(&runtime_dir).map_err(runtime_err(&runtime_dir))?;
    let mut status = WorkerStatus {
        state: WorkerState::Starting,
        reason: None,
        worker_pid: std::process::id(),
        qemu_pid: None,
        accel: None,
        running_since: None,
        running_since_ms: None,
        processor: Some(spec.settings.processor),
        cgroup: None,
        meter: None,
    };
    control::write_status_file(&runtime_dir, &status).map_err(runtime_err(&runtime_dir))?;
    let group = spec
        .cgroup
        .as_ref()
        .map(|h| h.vm_group(&spec.settings.id.to_string()));
    let result = run_inner(spec, &mut status, group.clone()).await;
    if let Some(group) = group {
        leave_cgroup(&group);
    }
    match result {
        Ok(final_status) => Ok(final_status),
        Err(e) => {
            status.state = WorkerState::Critical;
            status.reason = Some(error_chain(&e));
            let _ = control::write_status_file(&runtime_dir, &status);
            Err(e)
        }
    }
}

/// `e` and its sources, joined into one sentence chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The cgroup settings for `p`.
pub fn cpu_control(p: &vm_config::ProcessorSettings) -> cgroups::CpuControl {
    cgroups::CpuControl {
        count: p.count,
        limit_percent: p.limit_percent,
        weight: p.relative_weight,
    }
}

/// Creates the VM's group, sets it and moves this worker into it (QEMU, started
/// later, inherits it).
fn enter_cgroup(
    group: &cgroups::Group,
    p: &vm_config::ProcessorSettings,
) -> Result<(), WorkerError> {
    group.create()?;
    group.set_cpu(cpu_control(p))?;
    group.add_process(std::process::id())?;
    tracing::info!(cgroup = %group.path().display(), limit = p.limit_percent, weight = p.relative_weight, "VM placed in its cgroup");
    Ok(())
}

/// Moves this worker out of the VM's group and removes the group (QEMU has exited).
fn leave_cgroup(group: &cgroups::Group) {
    if !group.exists() {
        return;
    }
    if let Err(e) = group.release_process(std::process::id()) {
        tracing::warn!("cannot leave the VM's cgroup: {}", error_chain(&e));
    }
    // The kernel may take a moment to forget exited members.
    for _ in 0..50 {
        match group.remove() {
            Ok(()) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    if let Err(e) = group.remove() {
        tracing::warn!("cannot remove the VM's cgroup: {}", error_chain(&e));
    }
}

/// QEMU's vCPU threads, in vCPU index order (`query-cpus-fast`).
async fn vcpu_threads(qmp: &qmp::Client) -> Vec<u32> {
    let Ok(answer) = qmp.execute("query-cpus-fast", None).await else {
        return Vec::new();
    };
    let mut cpus: Vec<(u64, u32)> = answer
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| {
                    let index = c.get("cpu-index")?.as_u64()?;
                    let tid = u32::try_from(c.get("thread-id")?.as_u64()?).ok()?;
                    Some((index, tid))
                })
                .collect()
        })
        .unwrap_or_default();
    cpus.sort_unstable();
    cpus.into_iter().map(|(_, tid)| tid).collect()
}

async fn run_inner(
    spec: WorkerSpec,
    status: &mut WorkerStatus,
    group: Option<cgroups::Group>,
) -> Result<WorkerStatus, WorkerError> {
    let rt = spec.runtime_dir.clone();
    for name in [
        CONTROL_SOCKET,
        QMP_SOCKET,
        SERIAL_SOCKET,
        NBD_SOCKET,
        SAVE_SOCKET,
        INCOMING_SOCKET,
    ] {
        match std::fs::remove_file(rt.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(runtime_err(&rt)(e)),
        }
    }
    // Bound now so that the daemon can connect at once; served once QEMU runs.
    let control_listener = UnixListener::bind(rt.join(CONTROL_SOCKET)).map_err(runtime_err(&rt))?;

    let qemu_bin = spec.qemu_binary().to_path_buf();
    let decision: AccelDecision = if let Some(d) = spec.accel_decision.clone() {
        d
    } else {
        let bin = qemu_bin.clone();
        let choice = spec.accel;
        tokio::task::spawn_blocking(move || accel::decide(choice, &accel::probe_host(&bin)))
            .await
            .map_err(|e| WorkerError::Accel(format!("the accelerator probe failed: {e}")))?
            .map_err(WorkerError::Accel)?
    };
    tracing::info!(accel = decision.accel.as_str(), reason = %decision.reason, "accelerator chosen");
    status.accel = Some(decision.clone());

    let bios = if spec.settings.generation == 2 {
        ensure_uefi_vars(&spec.vm_dir)?;
        None
    } else {
        let bios =
            crate::firmware::resolve(&spec.bios, Path::new(crate::firmware::VIRIDIAN_SEABIOS))?;
        tracing::info!(bios = ?bios.path, reason = %bios.reason, "generation 1 firmware");
        bios.path
    };
    let served = ServedDisks::open_and_serve(&spec.settings, &rt.join(NBD_SOCKET), &rt).await?;
    let sandbox = match spec.sandbox {
        Some(known) => known,
        None => sandbox_supported(&qemu_bin).await,
    };
    let config = build_config(&spec, &decision, &served, sandbox, bios);
    let args = config.to_args();
    tracing::info!(?args, "starting QEMU");

    if let Some(group) = &group {
        enter_cgroup(group, &spec.settings.processor)?;
        status.cgroup = Some(group.path());
    }

    let log_path = rt.join(QEMU_LOG);
    let log = std::fs::File::create(&log_path).map_err(runtime_err(&rt))?;
    let log2 = log.try_clone().map_err(runtime_err(&rt))?;
    let mut command = tokio::process::Command::new(&qemu_bin);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl,
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            // QEMU dies with its worker: a killed worker must not leave a VM running
            // without its disk servers.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| WorkerError::Spawn {
        binary: qemu_bin.clone(),
        source,
    })?;
    status.qemu_pid = child.id();

    let qmp_path = rt.join(QMP_SOCKET);
    let connected = tokio::select! {
        r = qmp::Client::connect_with_retry(&qmp_path, Duration::from_secs(30)) => r,
        exit = child.wait() => {
            return Err(WorkerError::QemuStart {
                status: exit.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                log: log_path.clone(),
                tail: log_tail(&log_path),
            });
        }
    };
    // QEMU may accept the QMP connection and then refuse its configuration.
    let qmp_client = match connected {
        Ok(c) => Arc::new(c),
        Err(e) => {
            return Err(
                match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                    Ok(exit) => WorkerError::QemuStart {
                        status: exit
                            .map(|s| s.to_string())
                            .unwrap_or_else(|e| e.to_string()),
                        log: log_path.clone(),
                        tail: log_tail(&log_path),
                    },
                    Err(_) => WorkerError::Qmp(e),
                },
            )
        }
    };
    let mut events = qmp_client.events();
    let vcpus = vcpu_threads(&qmp_client).await;

    let serial = UnixStream::connect(rt.join(SERIAL_SOCKET))
        .await
        .map_err(|source| WorkerError::Serial {
            path: rt.join(SERIAL_SOCKET),
            source,
        })?;
    let console_log =
        CappedLog::open(&rt, spec.console_log_limit).map_err(|source| WorkerError::ConsoleLog {
            path: rt.clone(),
            source,
        })?;
    let (serial_out, _) = broadcast::channel(1024);
    let (serial_in, serial_in_rx) = mpsc::channel(64);
    tokio::spawn(pump_serial(
        serial,
        console_log,
        serial_out.clone(),
        serial_in_rx,
    ));

    let (status_tx, _) = watch::channel(status.clone());
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        qmp: qmp_client.clone(),
        status: status_tx,
        intent: Mutex::new(Intent::None),
        guest_shutdown: Mutex::new(None),
        op: tokio::sync::Mutex::new(()),
        serial_out,
        serial_in,
        group,
        qemu_pid: status.qemu_pid.unwrap_or(0),
        vcpu_threads: vcpus,
        drives: Mutex::new(served.metered()),
        served: tokio::sync::Mutex::new(None),
        answering: tokio::sync::RwLock::new(()),
        merging: tokio::sync::Mutex::new(()),
        snapshotting: std::sync::atomic::AtomicBool::new(false),
    });

    *shared.served.lock().await = Some(served);
    if spec.resume {
        restore(&shared).await?;
    }
    qmp_client.cont().await?;
    shared.set_state(WorkerState::Running, None);
    if spec.resume {
        let saved = spec.saved_state_path();
        if let Err(e) = std::fs::remove_file(&saved) {
            tracing::warn!(
                "cannot remove the saved state {} after resuming: {e}",
                saved.display()
            );
        }
    }
    tracing::info!(vm = %spec.settings.name, "VM running");

    let accept_shared = shared.clone();
    let acceptor = tokio::spawn(async move {
        loop {
            match control_listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_control(accept_shared.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let event_shared = shared.clone();
    let event_watch = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) if event.event == "SHUTDOWN" => {
                    let guest = event.data.get("guest").and_then(|v| v.as_bool()) == Some(true);
                    let why = event
                        .data
                        .get("reason")
                        .and_then(|v| v.as_str())
                        .unwrap_or("unknown")
                        .to_string();
                    if guest {
                        *event_shared
                            .guest_shutdown
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(why);
                    }
                }
                Ok(event) if event.event == "STOP" => {
                    // A guest-caused pause (e.g. an I/O error) shows as Paused.
                    let snapshot = event_shared
                        .snapshotting
                        .load(std::sync::atomic::Ordering::SeqCst);
                    if event_shared.state() == WorkerState::Running && !snapshot {
                        event_shared
                            .set_state(WorkerState::Paused, Some("QEMU paused the VM".into()));
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });

    let exit = child.wait().await;
    // The QMP reader sees the socket close right after; give the SHUTDOWN event a
    // moment to be recorded before deciding how the VM ended.
    let _ = tokio::time::timeout(Duration::from_millis(500), event_watch).await;
    acceptor.abort();

    let served = shared.served.lock().await.take();
    let flush = match served {
        Some(served) => served.flush_and_close().await,
        None => Ok(()),
    };
    let (state, reason) = match (
        shared.intent(),
        shared
            .guest_shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    ) {
        (Intent::Save, _) => (WorkerState::Saved, None),
        (Intent::TurnOff, _) => (WorkerState::Off, Some("turned off".to_string())),
        (Intent::None, Some(why)) => (
            WorkerState::Off,
            Some(format!("the guest shut down ({why})")),
        ),
        (Intent::None, None) => (
            WorkerState::Critical,
            Some(format!(
                "QEMU exited unexpectedly ({}); its log {} ends with: {}",
                exit.map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
                log_path.display(),
                log_tail(&log_path)
            )),
        ),
    };
    let (state, reason) = match flush {
        Ok(()) => (state, reason),
        Err(e) => (
            WorkerState::Critical,
            Some(format!(
                "{}; then flushing the disks failed: {}",
                reason.unwrap_or_else(|| format!("{state:?}")),
                error_chain(&e)
            )),
        ),
    };
    shared.set_state(state, reason);
    // Let the requests that waited for this end (stop, save, shutdown) answer first.
    if tokio::time::timeout(Duration::from_secs(5), shared.answering.write())
        .await
        .is_err()
    {
        tracing::warn!("a control request was still unanswered 5 s after the VM ended");
    }
    for name in [CONTROL_SOCKET, QMP_SOCKET, SERIAL_SOCKET, NBD_SOCKET] {
        let _ = std::fs::remove_file(rt.join(name));
    }
    let final_status = shared.status.borrow().clone();
    tracing::info!(state = ?final_status.state, reason = ?final_status.reason, "VM ended");
    Ok(final_status)
}

fn build_config(
    spec: &WorkerSpec,
    decision: &AccelDecision,
    served: &ServedDisks,
    sandbox: bool,
    bios: Option<PathBuf>,
) -> QemuConfig {
    let settings = &spec.settings;
    let rt = &spec.runtime_dir;
    let platform = if settings.generation == 2 {
        Platform::Generation2 {
            code: PathBuf::from(OVMF_CODE),
            vars: spec.vm_dir.join(UEFI_VARS_FILE),
        }
    } else {
        Platform::Generation1 {
            bios,
            // Version 1 VMs keep QEMU's default: their saved states need it.
            bridge_hotplug: settings.configuration_version < 2,
        }
    };
    let boot_slots: Vec<vm_config::Slot> = settings
        .boot_order
        .iter()
        .filter_map(|b| match b {
            vm_config::BootEntry::Drive { slot } => Some(*slot),
            vm_config::BootEntry::Network { .. } => None,
        })
        .collect();
    let default_boot = if settings.generation == 2 {
        served
            .synthetic
            .iter()
            .map(|d| d.slot)
            .min_by_key(|s| (s.controller_number, s.location))
    } else {
        Some(vm_config::Slot {
            controller: vm_config::ControllerKind::Ide,
            controller_number: 0,
            location: 0,
        })
    };
    let bootindex = |slot: vm_config::Slot| -> Option<u32> {
        if spec.direct_kernel.is_some() {
            // The kernel given to QEMU boots first (it takes boot index 0).
            None
        } else if boot_slots.is_empty() {
            // Hyper-V's defaults: generation 1 boots IDE 0:0, generation 2 the first
            // SCSI disk.
            (Some(slot) == default_boot).then_some(0)
        } else {
            boot_slots
                .iter()
                .position(|s| *s == slot)
                .and_then(|p| u32::try_from(p).ok())
        }
    };
    let ide = served
        .ide
        .iter()
        .map(|d| IdeDrive {
            controller: d.slot.controller_number,
            location: d.slot.location,
            media: if d.dvd {
                IdeMedia::Dvd
            } else {
                IdeMedia::HardDisk
            },
            nbd_socket: rt.join(NBD_SOCKET),
            export: d.export.clone(),
            read_only: d.read_only,
            bootindex: bootindex(d.slot),
        })
        .collect();
    QemuConfig {
        name: settings.name.clone(),
        uuid: settings.id.to_string(),
        platform,
        accel: decision.accel,
        cpus: settings.processor.count,
        memory_mib: settings.memory.startup_mib,
        direct_kernel: spec.direct_kernel.as_ref().map(|k| DirectKernel {
            kernel: k.kernel.clone(),
            initrd: k.initrd.clone(),
            cmdline: k.cmdline.clone(),
        }),
        qmp_socket: rt.join(QMP_SOCKET),
        serial_socket: rt.join(SERIAL_SOCKET),
        sandbox,
        ide,
        synthetic: served
            .synthetic
            .iter()
            .map(|d| SyntheticDisk {
                controller: d.slot.controller_number,
                location: d.slot.location,
                socket: d.socket.clone(),
                num_queues: d.num_queues,
                bootindex: bootindex(d.slot),
            })
            .collect(),
        nics: settings
            .network_adapters
            .iter()
            .map(|n| {
                let port = spec
                    .network
                    .iter()
                    .find(|p| p.mac.eq_ignore_ascii_case(&n.mac));
                crate::qemu::Nic {
                    legacy: n.kind == vm_config::AdapterKind::Legacy,
                    mac: n.mac.clone(),
                    pci_slot: n.pci_slot,
                    tap: port.map(|p| p.tap.clone()),
                    vhost: port.is_some_and(|p| p.vhost),
                }
            })
            .collect(),
        incoming: spec.resume.then(|| rt.join(INCOMING_SOCKET)),
    }
}

/// OVMF's code for generation 2 (Debian's `ovmf` package).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// The empty UEFI variable store each generation 2 VM starts from.
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub const UEFI_VARS_FILE: &str = "OVMF_VARS.fd";

/// Gives a generation 2 VM its own UEFI variable store (boot entries persist in it).
fn ensure_uefi_vars(vm_dir: &Path) -> Result<(), WorkerError> {
    let vars = vm_dir.join(UEFI_VARS_FILE);
    if vars.exists() {
        return Ok(());
    }
    for file in [OVMF_CODE, OVMF_VARS_TEMPLATE] {
        if !Path::new(file).exists() {
            return Err(WorkerError::Firmware {
                path: PathBuf::from(file),
            });
        }
    }
    let tmp = vm_dir.join(format!("{UEFI_VARS_FILE}.tmp"));
    std::fs::copy(OVMF_VARS_TEMPLATE, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &vars))
        .map_err(runtime_err(vm_dir))
}

/// Whether this QEMU has `-sandbox` (built with seccomp): a QEMU started with it
/// reaches its QMP greeting.
pub async fn sandbox_supported(qemu: &Path) -> bool {
    let child = tokio::process::Command::new(qemu)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-machine",
            "none",
            "-display",
            "none",
            "-sandbox",
            "on",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let Some(stdout) = child.stdout.take() else {
        return false;
    };
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    let _ = child.kill().await;
    matches!(read, Ok(Ok(n)) if n > 0) && line.contains("\"QMP\"")
}

/// The last non-empty line of QEMU's log, for error messages.
fn log_tail(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(nothing)".to_string())
}

/// Copies the guest's serial output into the log and to attached consoles, and
/// console input to the guest.
async fn pump_serial(
    serial: UnixStream,
    mut log: CappedLog,
    out: broadcast::Sender<Vec<u8>>,
    mut input: mpsc::Receiver<Vec<u8>>,
) {
    let (mut read, mut write) = serial.into_split();
    let writer = tokio::spawn(async move {
        while let Some(bytes) = input.recv().await {
            if write.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 4096];
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Err(e) = log.append(&buf[..n]) {
                    tracing::warn!("cannot write the console log: {e}");
                }
                let _ = out.send(buf[..n].to_vec());
            }
        }
    }
    writer.abort();
}

/// Feeds the saved state into QEMU's `-incoming` socket and waits until QEMU has
/// loaded it.
async fn restore(shared: &Shared) -> Result<(), WorkerError> {
    let path = shared.spec.saved_state_path();
    let fail = |detail: String| WorkerError::Restore {
        path: path.clone(),
        detail,
    };
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| fail(format!("cannot open it: {e}")))?;
    let socket = shared.spec.runtime_dir.join(INCOMING_SOCKET);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(fail(format!("QEMU's incoming socket did not open: {e}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    tokio::io::copy(&mut file, &mut stream)
        .await
        .map_err(|e| fail(format!("cannot send it to QEMU: {e}")))?;
    stream
        .shutdown()
        .await
        .map_err(|e| fail(format!("cannot send it to QEMU: {e}")))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let status = shared.qmp.query_status().await?;
        match status.status.as_str() {
            "inmigrate" => {}
            "paused" | "prelaunch" => return Ok(()),
            other => {
                let info = shared.qmp.query_migrate().await.ok();
                return Err(fail(format!(
                    "QEMU is in state {other} after loading it{}",
                    info.and_then(|i| i.error_desc)
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                )));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail("QEMU did not finish loading it within 120 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serve_control(shared: Arc<Shared>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Console) => {
                let ok = Response::Ok {
                    status: shared.status.borrow().clone(),
                };
                if write_response(&mut write, &ok).await.is_err() {
                    return;
                }
                attach_console(&shared, lines.into_inner(), write).await;
                return;
            }
            Ok(Request::MergeLayer {
                slot,
                layer,
                into,
                marker,
            }) => {
                let _answering = shared.answering.read().await;
                let response = merge_layer(&shared, slot, layer, into, marker, &mut write).await;
                if write_response(&mut write, &response).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(request) => {
                let _answering = shared.answering.read().await;
                let response = handle(&shared, request).await;
                if write_response(&mut write, &response).await.is_err() {
                    return;
                }
                continue;
            }
            Err(e) => Response::Error {
                kind: FailureKind::Failed,
                message: format!("the worker does not understand this request ({e}): {line}"),
            },
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// [`Request::MergeLayer`]: wraps the slot's disk for the merge, runs it on a
/// blocking thread (progress lines go to `write` as it goes; a lost
/// connection does not stop it), and serves the new chain afterwards, or the
/// old one again if the merge did not finish.
async fn merge_layer(
    shared: &Arc<Shared>,
    slot: vm_config::Slot,
    layer: PathBuf,
    into: PathBuf,
    marker: Option<PathBuf>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> Response {
    let runs = |s: &Shared| matches!(s.state(), WorkerState::Running | WorkerState::Paused);
    if !runs(shared) {
        return invalid(shared, "merge a disk layer", "");
    }
    let _merging = shared.merging.lock().await;
    let tracked = {
        let mut served = shared.served.lock().await;
        let Some(served) = served.as_mut() else {
            return invalid(shared, "merge a disk layer", "");
        };
        let Some((disk, top)) = served.served_in(slot) else {
            return Response::Error {
                kind: FailureKind::Failed,
                message: format!("no disk is served in slot {slot}"),
            };
        };
        match merged_before(&top, &layer, &into) {
            Ok(true) => {
                return Response::Merged(control::MergeOutcome {
                    top,
                    already: true,
                    bytes_copied: 0,
                    rounds: 0,
                    io_paused_ms: 0,
                })
            }
            Ok(false) => {}
            Err(e) => return failed(&format!("cannot read the chain of {}", top.display()), &e),
        }
        let tracked = Arc::new(vhd::ops::live_merge::Tracked::new(disk));
        if let Err(e) = served.replace(slot, tracked.clone(), top) {
            return failed("cannot start the live merge", &e);
        }
        tracked
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, u64)>();
    let merge = {
        let (shared, tracked) = (shared.clone(), tracked.clone());
        let (layer, into) = (layer.clone(), into.clone());
        tokio::task::spawn_blocking(move || {
            let mut commit = || match &marker {
                Some(m) => write_marker(m, &layer, &into),
                None => Ok(()),
            };
            let stall = stall_live_merge_at();
            let mut progress = |done: u64, total: u64| {
                let _ = tx.send((done, total));
                if stall.is_some_and(|p| done.saturating_mul(100) >= p.saturating_mul(total)) {
                    tracing::warn!(done, total, "live merge stalled for a crash test");
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                }
                runs(&shared)
            };
            vhd::ops::live_merge::merge_live(&tracked, &layer, &into, &mut commit, &mut progress)
        })
    };
    tokio::pin!(merge);
    let mut connected = true;
    let result = loop {
        tokio::select! {
            r = &mut merge => break r,
            Some((done, total)) = rx.recv() => {
                if connected {
                    connected = write_response(write, &Response::Progress { done, total }).await.is_ok();
                }
            }
        }
    };
    let mut served = shared.served.lock().await;
    let outcome = match result {
        Ok(Ok((new, report))) => {
            tracing::info!(vm = %shared.name(), %slot, layer = %layer.display(), into = %into.display(),
                bytes = report.bytes_copied, rounds = report.rounds, io_paused_ms = report.io_paused_ms,
                "layer merged live");
            if let Some(served) = served.as_mut() {
                if let Err(e) = served.replace(slot, new, report.top.clone()) {
                    // The wrapper keeps serving the new chain: nothing is lost.
                    tracing::warn!(error = %e, "the merged chain stays served through the merge's wrapper");
                }
            }
            Response::Merged(control::MergeOutcome {
                top: report.top,
                already: false,
                bytes_copied: report.bytes_copied,
                rounds: report.rounds,
                io_paused_ms: report.io_paused_ms,
            })
        }
        Ok(Err(e)) => {
            if let Some(served) = served.as_mut() {
                let top = vhd::Disk::path(tracked.as_ref())
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                if let Err(e) = served.replace(slot, tracked.inner(), top) {
                    tracing::warn!(error = %e, "the chain stays served through the merge's wrapper");
                }
            }
            failed(
                &format!(
                    "the live merge of {} into {} did not finish; the disk reads as before",
                    layer.display(),
                    into.display()
                ),
                &e,
            )
        }
        Err(e) => Response::Error {
            kind: FailureKind::Failed,
            message: format!("the live merge's thread failed: {e}"),
        },
    };
    if let Some(served) = served.as_ref() {
        *shared.drives.lock().unwrap_or_else(|p| p.into_inner()) = served.metered();
    }
    outcome
}

/// The crash tests' seam: `VIRIDIAN_TEST_STALL_LIVE_MERGE_AT=<percent>` makes a
/// live merge stop for good once that much is copied, so a test can kill the
/// worker there. Unset, nothing changes.
fn stall_live_merge_at() -> Option<u64> {
    std::env::var("VIRIDIAN_TEST_STALL_LIVE_MERGE_AT")
        .ok()
        .and_then(|p| p.parse().ok())
}

/// Whether `layer` was merged into `into` before: the chain served from
/// `top` no longer has it but still has `into`.
fn merged_before(top: &Path, layer: &Path, into: &Path) -> Result<bool, vhd::Error> {
    let chain = vhd::ops::info::info(top)?.chain;
    let has = |p: &Path| {
        let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        chain
            .iter()
            .any(|c| c.canonicalize().unwrap_or_else(|_| c.clone()) == p)
    };
    Ok(!has(layer) && has(into))
}

/// Records, durably, that `into` holds the disk's current data now.
fn write_marker(marker: &Path, layer: &Path, into: &Path) -> Result<(), vhd::Error> {
    use std::io::Write;
    let io = |source| vhd::Error::Io {
        path: marker.to_path_buf(),
        source,
    };
    let text = serde_json::json!({
        "merged": layer,
        "into": into,
        "at_ms": crate::meter::now_unix_ms(),
    });
    let mut f = std::fs::File::create(marker).map_err(io)?;
    f.write_all(text.to_string().as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    if let Some(dir) = marker.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

async fn write_response(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

async fn attach_console(
    shared: &Shared,
    mut read: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
) {
    let mut out = shared.serial_out.subscribe();
    let input = shared.serial_in.clone();
    let to_guest = async move {
        let mut buf = vec![0u8; 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input.send(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let from_guest = async move {
        loop {
            match out.recv().await {
                Ok(bytes) => {
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    };
    tokio::select! {
        _ = to_guest => {}
        _ = from_guest => {}
    }
}

fn invalid(shared: &Shared, what: &str, hint: &str) -> Response {
    Response::Error {
        kind: FailureKind::InvalidState,
        message: format!(
            "VM {} cannot {what} while it is {:?}{hint}",
            shared.name(),
            shared.state()
        ),
    }
}

/// Holds off live merges while the served disks change underneath (`what` the
/// VM is about to do); refuses when one runs.
fn no_live_merge<'a>(
    shared: &'a Shared,
    what: &str,
) -> Result<tokio::sync::MutexGuard<'a, ()>, Box<Response>> {
    shared.merging.try_lock().map_err(|_| {
        Box::new(Response::Error {
        kind: FailureKind::InvalidState,
        message: format!(
            "VM {} cannot {what} while a live merge of a checkpoint runs; try again when it has finished",
            shared.name()
        ),
        })
    })
}

fn failed(what: &str, e: &dyn std::error::Error) -> Response {
    Response::Error {
        kind: FailureKind::Failed,
        message: format!("{what}: {}", error_chain(e)),
    }
}

async fn handle(shared: &Arc<Shared>, request: Request) -> Response {
    if request == Request::Status {
        let mut status = shared.status.borrow().clone();
        if !status.state.is_final() {
            status.meter = Some(sample(shared));
        }
        return Response::Ok { status };
    }
    // One operation at a time, but an adapter's link (one QMP command, no state
    // change) does not wait behind a long one such as a shutdown waiting for
    // its guest: a switch port's move would stall as long.
    let _op = match request {
        Request::SetLink { .. } => None,
        _ => Some(shared.op.lock().await),
    };
    let state = shared.state();
    let ok = |shared: &Shared| Response::Ok {
        status: shared.status.borrow().clone(),
    };
    match request {
        Request::Status | Request::Console => ok(shared),
        // serve_control answers it (with progress lines) and never gets here.
        Request::MergeLayer { .. } => Response::Error {
            kind: FailureKind::Failed,
            message: "merge_layer is answered on its own; this is a bug in the worker".into(),
        },
        Request::SaveState { path } => {
            if state != WorkerState::Paused {
                return invalid(
                    shared,
                    "save its state for a checkpoint",
                    "; pause it first",
                );
            }
            match save_to(shared, &path).await {
                Ok(()) => ok(shared),
                Err(message) => Response::Error {
                    kind: FailureKind::Failed,
                    message,
                },
            }
        }
        Request::SnapshotState { path, layers } => {
            snapshot::snapshot_state(shared, &path, layers).await
        }
        Request::NewLayers { layers } => {
            if state != WorkerState::Paused {
                return invalid(shared, "take new disk layers", "; pause it first");
            }
            let _no_merge = match no_live_merge(shared, "take new disk layers") {
                Ok(guard) => guard,
                Err(refused) => return *refused,
            };
            let mut served = shared.served.lock().await;
            let Some(served) = served.as_mut() else {
                return invalid(shared, "take new disk layers", "");
            };
            let wanted: Vec<_> = layers.into_iter().map(|d| (d.slot, d.path)).collect();
            let made = tokio::task::block_in_place(|| served.new_layers(&wanted));
            *shared.drives.lock().unwrap_or_else(|p| p.into_inner()) = served.metered();
            match made {
                Ok(()) => {
                    tracing::info!(vm = %shared.name(), disks = wanted.len(), "disks continue on new layers");
                    ok(shared)
                }
                Err(e) => failed(
                    "making the new disk layers failed; every disk stays on its chain",
                    &e,
                ),
            }
        }
        Request::SetProcessor { processor } => set_processor(shared, processor),
        Request::SetLink { mac, up } => {
            if !matches!(state, WorkerState::Running | WorkerState::Paused) {
                return invalid(shared, "change an adapter's link", "");
            }
            let Some(i) = shared
                .spec
                .settings
                .network_adapters
                .iter()
                .position(|a| a.mac.eq_ignore_ascii_case(&mac))
            else {
                return Response::Error {
                    kind: FailureKind::InvalidState,
                    message: format!(
                        "VM {} started without a network adapter with MAC {mac}",
                        shared.name()
                    ),
                };
            };
            let args = serde_json::json!({"name": format!("nic{i}"), "up": up});
            match shared.qmp.execute("set_link", Some(args)).await {
                Ok(_) => {
                    tracing::info!(vm = %shared.name(), mac = %mac, up, "adapter link changed");
                    ok(shared)
                }
                Err(e) => failed("changing the adapter's link failed", &e),
            }
        }
        Request::FlushDisks => {
            if !matches!(state, WorkerState::Running | WorkerState::Paused) {
                return invalid(shared, "flush its disks", "");
            }
            let served = shared.served.lock().await;
            match served.as_ref().map(ServedDisks::settle) {
                Some(Err(e)) => failed("flushing the disks failed", &e),
                Some(Ok(())) | None => ok(shared),
            }
        }
        Request::SwitchDisks { disks } => {
            if !matches!(state, WorkerState::Running | WorkerState::Paused) {
                return invalid(shared, "switch its disks", "");
            }
            let _no_merge = match no_live_merge(shared, "switch its disks") {
                Ok(guard) => guard,
                Err(refused) => return *refused,
            };
            let mut served = shared.served.lock().await;
            let Some(served) = served.as_mut() else {
                return invalid(shared, "switch its disks", "");
            };
            let wanted: Vec<_> = disks.into_iter().map(|d| (d.slot, d.path)).collect();
            match served.switch(&wanted) {
                Ok(switched) => {
                    tracing::info!(vm = %shared.name(), slots = switched.len(), "disks switched");
                    *shared.drives.lock().unwrap_or_else(|p| p.into_inner()) = served.metered();
                    ok(shared)
                }
                Err(e) => failed(
                    "switching the disks failed; every disk stays where it was",
                    &e,
                ),
            }
        }
        Request::Pause => {
            if state != WorkerState::Running {
                return invalid(shared, "pause", "");
            }
            match shared.qmp.stop().await {
                Ok(()) => {
                    shared.set_state(WorkerState::Paused, None);
                    ok(shared)
                }
                Err(e) => failed("pausing failed", &e),
            }
        }
        Request::Resume => {
            if state != WorkerState::Paused {
                return invalid(shared, "resume", "");
            }
            match shared.qmp.cont().await {
                Ok(()) => {
                    shared.set_state(WorkerState::Running, None);
                    ok(shared)
                }
                Err(e) => failed("resuming failed", &e),
            }
        }
        Request::Restart => {
            if !matches!(state, WorkerState::Running | WorkerState::Paused) {
                return invalid(shared, "restart", "");
            }
            if let Err(e) = shared.qmp.system_reset().await {
                return failed("restarting failed", &e);
            }
            if state == WorkerState::Paused {
                if let Err(e) = shared.qmp.cont().await {
                    return failed("resuming after the restart failed", &e);
                }
            }
            shared.set_state(WorkerState::Running, None);
            ok(shared)
        }
        Request::Stop => {
            if !matches!(state, WorkerState::Running | WorkerState::Paused) {
                return invalid(shared, "be turned off", "");
            }
            shared.set_intent(Intent::TurnOff);
            shared.set_state(WorkerState::Stopping, None);
            if let Err(e) = shared.qmp.quit().await {
                return failed("turning off failed", &e);
            }
            match shared.wait_final(Duration::from_secs(60)).await {
                Some(status) => Response::Ok { status },
                None => Response::Error {
                    kind: FailureKind::Timeout,
                    message: format!(
                        "QEMU of VM {} did not exit within 60 s of being told to quit",
                        shared.name()
                    ),
                },
            }
        }
        Request::Shutdown { timeout_secs } => {
            if state != WorkerState::Running {
                let hint = if state == WorkerState::Paused {
                    "; a paused guest cannot react to the power button, resume it first"
                } else {
                    ""
                };
                return invalid(shared, "shut down", hint);
            }
            if let Err(e) = shared.qmp.system_powerdown().await {
                return failed("pressing the ACPI power button failed", &e);
            }
            match shared.wait_final(Duration::from_secs(timeout_secs)).await {
                Some(status) => Response::Ok { status },
                None => Response::Error {
                    kind: FailureKind::Timeout,
                    message: format!(
                        "VM {name} did not shut down within {timeout_secs} s after the ACPI power \
                         button was pressed; it is still running. The guest may ignore the power \
                         button: shut it down from inside, or turn it off with `viridian vm stop {name}`",
                        name = shared.name()
                    ),
                },
            }
        }
        Request::Save => {
            if !matches!(state, WorkerState::Running | WorkerState::Paused) {
                return invalid(shared, "be saved", "");
            }
            shared.set_state(WorkerState::Saving, None);
            match save(shared).await {
                Ok(()) => {}
                Err(message) => {
                    // Back to where it was; the guest keeps running.
                    if state == WorkerState::Running {
                        let _ = shared.qmp.cont().await;
                    }
                    shared.set_state(state, None);
                    return Response::Error {
                        kind: FailureKind::Failed,
                        message,
                    };
                }
            }
            shared.set_intent(Intent::Save);
            let _ = shared.qmp.quit().await;
            match shared.wait_final(Duration::from_secs(60)).await {
                Some(status) => Response::Ok { status },
                None => Response::Error {
                    kind: FailureKind::Timeout,
                    message: format!(
                        "the state of VM {} was saved but QEMU did not exit within 60 s",
                        shared.name()
                    ),
                },
            }
        }
    }
}

/// Migrates the paused VM into `<vm_dir>/saved-state.bin` (through a temp file).
async fn save(shared: &Shared) -> Result<(), String> {
    save_to(shared, &shared.spec.saved_state_path()).await
}

/// Pauses the VM (if it runs) and writes its memory and device state into
/// `target` (temp file, fsync, rename, folder synced); QEMU stays, paused.
async fn save_to(shared: &Shared, target: &Path) -> Result<(), String> {
    shared.qmp.stop().await.map_err(|e| {
        format!(
            "saving VM {} into {} failed: pausing it: {e}",
            shared.name(),
            target.display()
        )
    })?;
    migrate_to_file(shared, target).await.map(drop)
}

/// Has QEMU migrate the VM into `target` (temp file, fsync, rename, folder
/// synced) with the migration capabilities set now; returns the bytes written.
/// On a failure no file is left.
async fn migrate_to_file(shared: &Shared, target: &Path) -> Result<u64, String> {
    let rt = &shared.spec.runtime_dir;
    let target = target.to_path_buf();
    let tmp = target.with_extension("bin.tmp");
    let name = shared.name().to_string();
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        format!(
            "saving VM {name} into {} failed: {what}: {e}",
            target.display()
        )
    };
    let socket = rt.join(SAVE_SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| fail("opening the save socket", &e))?;
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| fail("creating the file", &e))?;
    let copy = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let n = tokio::io::copy(&mut stream, &mut file).await?;
        file.sync_all().await?;
        Ok::<u64, std::io::Error>(n)
    });
    let started = shared
        .qmp
        .migrate(&format!("unix:{}", socket.display()))
        .await;
    if let Err(e) = started {
        copy.abort();
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&socket);
        return Err(fail("QEMU refused", &e));
    }
    let info = shared
        .qmp
        .wait_migration(Duration::from_secs(600))
        .await
        .map_err(|e| fail("waiting for QEMU", &e));
    let _ = std::fs::remove_file(&socket);
    let info = match info {
        Ok(info) => info,
        Err(e) => {
            copy.abort();
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if info.status.as_deref() != Some("completed") {
        copy.abort();
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(
            "QEMU's migration did not complete",
            &info
                .error_desc
                .unwrap_or_else(|| format!("{:?}", info.status)),
        ));
    }
    let written = match copy.await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail("writing the file", &e));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail("the copy task", &e));
        }
    };
    if let Err(e) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("renaming the file into place", &e));
    }
    if let Some(dir) = target.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    tracing::info!(bytes = written, file = %target.display(), "VM state saved");
    Ok(written)
}

/// Samples the VM's counters now.
fn sample(shared: &Shared) -> crate::meter::Meter {
    use crate::meter;
    let pid = shared.qemu_pid;
    let cpu_ns = shared
        .group
        .as_ref()
        .and_then(|g| g.usage().ok())
        .map(|d| d.as_nanos() as u64)
        .or_else(|| meter::process_cpu_ns(pid))
        .unwrap_or(0);
    meter::Meter {
        at_unix_ms: meter::now_unix_ms(),
        cpu_ns,
        vcpu_ns: shared
            .vcpu_threads
            .iter()
            .map(|tid| meter::thread_cpu_ns(pid, *tid).unwrap_or(0))
            .collect(),
        memory_bytes: meter::process_rss_bytes(pid).unwrap_or(0),
        drives: shared
            .drives
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|d| d.sample())
            .collect(),
    }
}

/// Applies a new limit and weight (and records the reserve) on the running VM.
fn set_processor(shared: &Shared, processor: vm_config::ProcessorSettings) -> Response {
    let current = shared.status.borrow().processor;
    if let Some(current) = current {
        if current.count != processor.count {
            return Response::Error {
                kind: FailureKind::InvalidState,
                message: format!(
                    "VM {} runs with {} virtual processors; the count changes only while it is off",
                    shared.name(),
                    current.count
                ),
            };
        }
    }
    if let Some(group) = &shared.group {
        if let Err(e) = group.set_cpu(cpu_control(&processor)) {
            return failed("setting the VM's cgroup failed", &e);
        }
    }
    shared.status.send_modify(|s| s.processor = Some(processor));
    if let Err(e) = control::write_status_file(&shared.spec.runtime_dir, &shared.status.borrow()) {
        tracing::warn!("cannot write the status file: {e}");
    }
    tracing::info!(
        limit = processor.limit_percent,
        weight = processor.relative_weight,
        reserve = processor.reserve_percent,
        "processor settings changed"
    );
    Response::Ok {
        status: shared.status.borrow().clone(),
    }
}
