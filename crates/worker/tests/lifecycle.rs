//! Lifecycle of a real guest under a real worker and QEMU (TCG here): boot, pause and
//! resume, save and resume where it left off, ACPI shutdown, the shutdown time-out,
//! turning off, and a killed worker.

mod common;

use std::time::Duration;

use common::{direct_boot, settings, Vm};
use worker::control::{ClientError, FailureKind, Request, WorkerState};

const BOOT: Duration = Duration::from_secs(90);

/// The guest counts on its console, five times a second, forever.
const COUNTER: &str = "i=0; while true; do echo \"count $i\"; i=$((i+1)); sleep 0.2; done";

fn last_count(console: &str) -> u64 {
    console
        .lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix("count "))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count on the console:\n{console}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_pauses_resumes_saves_continues_its_counter_and_shuts_down_by_acpi() {
    let mut vm = Vm::new(settings("counter", vec![]), Some(direct_boot(COUNTER, "")));
    vm.start();
    vm.wait_console("VIRIDIAN-GUEST: booted", BOOT);
    vm.wait_console("count 3", BOOT);
    let status = vm.call(Request::Status).await.unwrap();
    assert_eq!(status.state, WorkerState::Running);
    let accel = status.accel.expect("the accelerator is reported");
    assert!(!accel.reason.is_empty());

    // Pause: the counter stops.
    let status = vm.call(Request::Pause).await.unwrap();
    assert_eq!(status.state, WorkerState::Paused);
    let paused_at = last_count(&vm.console());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(last_count(&vm.console()) <= paused_at + 1);
    // Pausing twice is refused and changes nothing.
    match vm.call(Request::Pause).await {
        Err(ClientError::Refused { kind, message }) => {
            assert_eq!(kind, FailureKind::InvalidState);
            assert!(message.contains("Paused"), "{message}");
        }
        other => panic!("pausing a paused VM answered {other:?}"),
    }
    // Resume: it counts on.
    assert_eq!(
        vm.call(Request::Resume).await.unwrap().state,
        WorkerState::Running
    );
    vm.wait_console(&format!("count {}", paused_at + 3), BOOT);

    // Save: the worker exits, the state file exists, the VM is Saved.
    let status = vm.call(Request::Save).await.unwrap();
    assert_eq!(status.state, WorkerState::Saved);
    assert_eq!(
        vm.wait_exit(Duration::from_secs(30)).state,
        WorkerState::Saved
    );
    let saved = vm.spec.saved_state_path();
    assert!(saved.exists(), "no saved state at {}", saved.display());
    let saved_at = last_count(&vm.console());

    // Start again from the saved state: the counter continues, no second boot.
    vm.spec.resume = true;
    vm.start();
    vm.wait_console(&format!("count {}", saved_at + 2), BOOT);
    let console = vm.console();
    assert_eq!(
        console.matches("VIRIDIAN-GUEST: booted").count(),
        1,
        "{console}"
    );
    assert!(
        console.contains(&format!("count {}\n", saved_at + 1))
            || console.contains(&format!("count {}\r\n", saved_at + 1)),
        "the count after resuming does not follow {saved_at}:\n{console}"
    );
    assert!(
        !saved.exists(),
        "the saved state was not removed after resuming"
    );

    // ACPI shutdown: the guest powers off, the worker reports Off.
    let status = vm
        .call(Request::Shutdown { timeout_secs: 60 })
        .await
        .unwrap();
    assert_eq!(status.state, WorkerState::Off);
    assert!(vm.console().contains("VIRIDIAN-GUEST: acpi power button"));
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.state, WorkerState::Off);
    assert!(
        status
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("guest shut down"),
        "{:?}",
        status.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_of_a_guest_that_ignores_acpi_ends_in_an_error_and_the_vm_keeps_running() {
    let mut vm = Vm::new(
        settings("deaf", vec![]),
        Some(direct_boot(COUNTER, "viridian.acpi=ignore")),
    );
    vm.start();
    vm.wait_console("VIRIDIAN-GUEST: ignoring acpi", BOOT);
    vm.wait_console("count 1", BOOT);
    match vm.call(Request::Shutdown { timeout_secs: 3 }).await {
        Err(ClientError::Refused { kind, message }) => {
            assert_eq!(kind, FailureKind::Timeout);
            assert!(
                message.contains("did not shut down within 3 s")
                    && message.contains("still running")
                    && message.contains("viridian vm stop deaf"),
                "{message}"
            );
        }
        other => panic!("shutdown of a deaf guest answered {other:?}"),
    }
    // Still running: no silent power-off.
    let before = last_count(&vm.console());
    vm.wait_console(&format!("count {}", before + 2), BOOT);
    assert_eq!(
        vm.call(Request::Status).await.unwrap().state,
        WorkerState::Running
    );
    // Turning off works and says so.
    let status = vm.call(Request::Stop).await.unwrap();
    assert_eq!(status.state, WorkerState::Off);
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.state, WorkerState::Off);
    assert_eq!(status.reason.as_deref(), Some("turned off"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_takes_its_qemu_down() {
    let mut vm = Vm::new(settings("victim", vec![]), Some(direct_boot(COUNTER, "")));
    vm.start();
    vm.wait_console("count 1", BOOT);
    let status = vm.call(Request::Status).await.unwrap();
    let qemu_pid = status.qemu_pid.expect("QEMU's pid is reported") as i32;
    vm.worker.as_mut().unwrap().kill().unwrap();
    vm.worker.as_mut().unwrap().wait().unwrap();
    vm.worker = None;
    let start = std::time::Instant::now();
    // Gone, or a zombie waiting for whoever inherited it to reap it.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    };
    while alive(qemu_pid) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "QEMU {qemu_pid} outlived its killed worker"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation2_boots_on_q35_with_ovmf_its_own_uefi_variable_store_and_its_network_adapter() {
    let mut s = settings("uefi", vec![]);
    s.generation = 2;
    // A synthetic adapter (unconnected until virtual switches exist): the guest sees it.
    s.network_adapters = vec![vm_config::NetworkAdapter {
        id: None,
        pci_slot: None,
        switch: None,
        kind: vm_config::AdapterKind::Synthetic,
        mac: "52:54:00:00:be:ef".into(),
        mac_address_spoofing: false,
        dhcp_guard: false,
        router_guard: false,
        maximum_bandwidth: None,
        vlan_mode: Default::default(),
        vlan_id: None,
        vlan_allowed: Vec::new(),
        vlan_native: None,
        port_mirroring: Default::default(),
    }];
    s.memory.startup_mib = 256;
    let mut vm = Vm::new(
        s,
        Some(direct_boot(
            "cat /sys/firmware/efi/fw_platform_size 2>&1 | sed 's/^/efi-bits /'; \
             for d in /sys/bus/pci/devices/*; do \
             [ \"$(cat $d/vendor)\" = 0x1af4 ] && echo \"virtio-pci $(cat $d/device)\"; done; \
             echo gen2-ok",
            "",
        )),
    );
    vm.start();
    vm.wait_console("gen2-ok", Duration::from_secs(180));
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.state, WorkerState::Off, "{:?}", status.reason);
    assert!(vm.console().contains("efi-bits 64"), "{}", vm.console());
    // virtio-net (transitional device id 0x1000) is there for the synthetic adapter.
    assert!(
        vm.console().contains("virtio-pci 0x1000"),
        "{}",
        vm.console()
    );
    assert!(vm.spec.vm_dir.join("OVMF_VARS.fd").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_refusing_to_start_leaves_critical_with_qemus_own_message() {
    let mut direct = direct_boot("true", "");
    direct.kernel = "/nonexistent/vmlinuz".into();
    let mut vm = Vm::new(settings("broken", vec![]), Some(direct));
    vm.start();
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.state, WorkerState::Critical);
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("QEMU exited while starting") && reason.contains("/nonexistent/vmlinuz"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_attaches_to_the_guest_shell_and_restart_reboots_the_guest() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let g = common::guest_dir();
    let direct = worker::spec::DirectKernelSpec {
        kernel: g.join("vmlinuz"),
        initrd: Some(g.join("initramfs.img")),
        cmdline: "console=ttyS0 panic=-1 quiet no_timer_check".into(),
    };
    let mut vm = Vm::new(settings("shell", vec![]), Some(direct));
    vm.start();
    vm.wait_console("VIRIDIAN-GUEST: ready", BOOT);

    let client = worker::control::Client::connect(vm.rt()).await.unwrap();
    let mut console = client.into_console().await.unwrap();
    console
        .get_mut()
        .write_all(b"echo $((6*7))-from-console\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 1024];
        loop {
            let n = console.read(&mut buf).await.unwrap();
            assert!(n > 0, "console closed");
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("42-from-console") {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "{}", String::from_utf8_lossy(&seen));
    drop(console);
    // What the console showed is in the log too.
    vm.wait_console("42-from-console", Duration::from_secs(5));

    assert_eq!(
        vm.call(Request::Restart).await.unwrap().state,
        WorkerState::Running
    );
    let start = std::time::Instant::now();
    while vm.console().matches("VIRIDIAN-GUEST: booted").count() < 2 {
        assert!(start.elapsed() < BOOT, "no second boot:\n{}", vm.console());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        vm.call(Request::Stop).await.unwrap().state,
        WorkerState::Off
    );
}
