//! Helpers for tests that boot the real test guest under a real worker.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use worker::control::{self, Client, Request, WorkerState, WorkerStatus};
use worker::spec::{DirectKernelSpec, WorkerSpec};

/// The cached test guest (guest/build.sh builds it once; later calls are quick).
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new(root.join("guest/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("guest/build.sh runs");
        assert!(out.status.success(), "guest/build.sh failed");
        let text = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(
            text.lines()
                .last()
                .expect("guest/build.sh prints the guest folder"),
        )
    })
}

pub fn settings(name: &str, drives: Vec<vm_config::Drive>) -> vm_config::VmSettings {
    vm_config::VmSettings {
        configuration_version: vm_config::CURRENT_CONFIGURATION_VERSION,
        id: uuid::Uuid::new_v4(),
        name: name.to_string(),
        generation: 1,
        processor: vm_config::ProcessorSettings::with_count(1),
        memory: vm_config::MemorySettings { startup_mib: 192 },
        drives,
        network_adapters: vec![],
        boot_order: vec![],
        notes: String::new(),
    }
}

pub fn ide(controller_number: u8, location: u8, path: &Path) -> vm_config::Drive {
    vm_config::Drive {
        slot: vm_config::Slot {
            controller: vm_config::ControllerKind::Ide,
            controller_number,
            location,
        },
        media: vm_config::DriveMedia::HardDisk {
            path: path.display().to_string(),
        },
    }
}

/// Direct kernel boot of the test guest running `script` (extra kernel args appended).
pub fn direct_boot(script: &str, extra: &str) -> DirectKernelSpec {
    use std::io::Write;
    let g = guest_dir();
    let mut encoded = Vec::new();
    {
        let mut child = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        encoded.extend(child.wait_with_output().unwrap().stdout);
    }
    DirectKernelSpec {
        kernel: g.join("vmlinuz"),
        initrd: Some(g.join("initramfs.img")),
        cmdline: format!(
            "console=ttyS0 panic=-1 quiet no_timer_check viridian.cmd={} {extra}",
            String::from_utf8(encoded).unwrap()
        ),
    }
}

/// A VM folder in a temp dir, and a worker process running it.
pub struct Vm {
    pub dir: tempfile::TempDir,
    pub spec: WorkerSpec,
    pub worker: Option<Child>,
}

impl Vm {
    pub fn new(settings: vm_config::VmSettings, direct: Option<DirectKernelSpec>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let spec = WorkerSpec {
            settings,
            runtime_dir: vm_dir.join("runtime"),
            vm_dir,
            accel: worker::accel::AccelChoice::Auto,
            accel_decision: None,
            sandbox: None,
            resume: false,
            direct_kernel: direct,
            console_log_limit: 1 << 20,
            qemu: None,
            cgroup: None,
            bios: Default::default(),
            network: Vec::new(),
        };
        Self {
            dir,
            spec,
            worker: None,
        }
    }

    pub fn start(&mut self) {
        let spec_path = self.dir.path().join("spec.json");
        std::fs::write(&spec_path, serde_json::to_vec(&self.spec).unwrap()).unwrap();
        let log = std::fs::File::create(self.dir.path().join("worker.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_viridian-worker"))
            .arg("--spec")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.worker = Some(child);
    }

    pub fn rt(&self) -> &Path {
        &self.spec.runtime_dir
    }

    pub fn worker_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&worker::console::read_log(self.rt()).unwrap_or_default())
            .into_owned()
    }

    /// Waits until the console log contains `needle`; panics with the log if not.
    pub fn wait_console(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.console().contains(needle) {
                return;
            }
            if let Ok(status) = control::read_status_file(self.rt()) {
                assert!(
                    status.state != WorkerState::Critical,
                    "the VM went Critical while waiting for {needle:?}: {:?}\nworker log:\n{}",
                    status.reason,
                    self.worker_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "no {needle:?} on the console within {timeout:?}; console:\n{}\nworker log:\n{}",
            self.console(),
            self.worker_log()
        );
    }

    pub async fn call(&self, request: Request) -> Result<WorkerStatus, control::ClientError> {
        let mut c = Client::connect_with_retry(self.rt(), Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}\nworker log:\n{}", self.worker_log()));
        c.call(&request).await
    }

    /// Waits for the worker process to exit and returns the final status file.
    pub fn wait_exit(&mut self, timeout: Duration) -> WorkerStatus {
        let start = Instant::now();
        loop {
            let child = self.worker.as_mut().expect("worker started");
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                start.elapsed() < timeout,
                "worker still running after {timeout:?}\nconsole:\n{}\nworker log:\n{}",
                self.console(),
                self.worker_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.worker = None;
        control::read_status_file(self.rt()).unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = &mut self.worker {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
