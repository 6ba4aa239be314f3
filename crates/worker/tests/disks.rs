//! IDE disks served by the worker's NBD server from the storage engine, with the real
//! guest booting through SeaBIOS and syslinux from IDE 0:0.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{ide, settings, Vm};
use worker::control::{Request, WorkerState};

const DATA_DISK_BYTES: usize = 64 << 20;

/// A raw "config disk" the guest's init runs as its command.
fn config_disk(path: &Path, script: &str) {
    let mut bytes = format!("#viridian-guest-script\n{script}\n").into_bytes();
    bytes.resize(1 << 20, 0);
    std::fs::write(path, bytes).unwrap();
}

fn pattern() -> Vec<u8> {
    (0..1000)
        .map(|i| format!("VIRIDIAN-PATTERN-{i:04}\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_from_a_vhd_on_ide_0_0_reads_its_dvd_and_its_writes_to_an_ide_disk_reach_the_file(
) {
    let g = common::guest_dir();
    let scratch = tempfile::tempdir().unwrap();
    // The boot disk is a differencing child of the guest's dynamic VHD, and the data
    // disk a dynamic VHD: the worker serves both from the engine; QEMU never opens them.
    let base = scratch.path().join("boot.vhd");
    std::fs::copy(g.join("boot.vhd"), &base).unwrap();
    let boot = scratch.path().join("boot.avhd");
    let new_disk = |path: &Path, kind| {
        let opts = vhd::vhd1::create::CreateOptions {
            kind,
            exact_size: true,
        };
        vhd::vhd1::create::create(path, &opts, &mut vhd::NoProgress).unwrap();
    };
    new_disk(
        &boot,
        vhd::vhd1::create::NewDisk::Differencing {
            parent: base.clone(),
        },
    );
    let data = scratch.path().join("data.vhd");
    new_disk(
        &data,
        vhd::vhd1::create::NewDisk::Dynamic {
            size: DATA_DISK_BYTES as u64,
            block_size: 2 << 20,
        },
    );
    // A DVD (read-only, served like the disks): the guest reads its first bytes.
    let iso = scratch.path().join("media.iso");
    let mut iso_bytes = b"VIRIDIAN-ISO-CONTENT".to_vec();
    iso_bytes.resize(1 << 20, 0);
    std::fs::write(&iso, &iso_bytes).unwrap();
    let cfg = scratch.path().join("cfg.raw");
    // Find the data disk by its size (64 MiB = 131072 sectors), write the pattern at
    // 1 MiB with O_DIRECT-like durability, and power off.
    config_disk(
        &cfg,
        "dev=''; for d in /sys/block/sd*; do [ \"$(cat $d/size)\" = 131072 ] && dev=/dev/${d##*/}; done\n\
         echo \"data disk $dev\"\n\
         i=0; while [ $i -lt 1000 ]; do printf 'VIRIDIAN-PATTERN-%04d\\n' $i; i=$((i+1)); done > /tmp/p\n\
         dd if=/tmp/p of=$dev bs=1M seek=1 conv=fsync 2>&1\n\
         echo \"dvd says $(head -c 20 /dev/sr0)\"\n\
         sync",
    );
    let mut vm = Vm::new(
        settings(
            "firmware",
            vec![
                ide(0, 0, &boot),
                ide(0, 1, &cfg),
                ide(1, 0, &data),
                vm_config::Drive {
                    slot: vm_config::Slot {
                        controller: vm_config::ControllerKind::Ide,
                        controller_number: 1,
                        location: 1,
                    },
                    media: vm_config::DriveMedia::Dvd {
                        iso: Some(iso.display().to_string()),
                    },
                },
            ],
        ),
        None,
    );
    vm.start();
    vm.wait_console("SYSLINUX", Duration::from_secs(120));
    vm.wait_console("VIRIDIAN-GUEST: booted", Duration::from_secs(120));

    // The firmware (Viridian's SeaBIOS build, ATA DMA) read the boot loader, kernel
    // and initramfs in whole requests, not one NBD round trip per 512-byte sector.
    let meter = vm
        .call(worker::control::Request::Status)
        .await
        .unwrap()
        .meter
        .unwrap();
    let boot_io = meter
        .drives
        .iter()
        .find(|d| d.path == boot.display().to_string())
        .expect("the boot disk is metered")
        .io;
    assert!(
        boot_io.read_bytes > 10 << 20 && boot_io.read_bytes / boot_io.read_ops >= 8192,
        "{boot_io:?}"
    );

    // While it runs, the writable disks are locked: a second VM cannot open them.
    let mut other = Vm::new(settings("intruder", vec![ide(0, 0, &data)]), None);
    other.start();
    let status = other.wait_exit(Duration::from_secs(60));
    assert_eq!(status.state, WorkerState::Critical);
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("in use by another process") && reason.contains("data.vhd"),
        "{reason}"
    );

    let status = vm.wait_exit(Duration::from_secs(120));
    assert_eq!(
        status.state,
        WorkerState::Off,
        "{:?}\n{}",
        status.reason,
        vm.console()
    );
    let console = vm.console();
    assert!(console.contains("data disk /dev/sd"), "{console}");
    assert!(
        console.contains("VIRIDIAN-GUEST: command exited 0"),
        "{console}"
    );
    assert!(
        console.contains("dvd says VIRIDIAN-ISO-CONTENT"),
        "{console}"
    );
    assert_eq!(
        std::fs::read(&iso).unwrap(),
        iso_bytes,
        "the DVD image changed"
    );

    // The host reads the same bytes through the engine; the lock is gone.
    let disk = vhd::open(&data, false).expect("the worker released its lock");
    let want = pattern();
    let mut got = vec![0u8; want.len()];
    disk.read_at(&mut got, 1 << 20).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_releases_the_disk_lock_and_the_next_start_works() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data.raw");
    std::fs::write(&data, vec![0u8; 8 << 20]).unwrap();
    let direct = common::direct_boot("while true; do echo alive; sleep 1; done", "");
    let mut vm = Vm::new(settings("victim", vec![ide(0, 0, &data)]), Some(direct));
    vm.start();
    vm.wait_console("alive", Duration::from_secs(90));
    assert!(
        vhd::RawDisk::open(&data, false).is_err(),
        "the disk is not locked"
    );
    vm.worker.as_mut().unwrap().kill().unwrap();
    vm.worker.as_mut().unwrap().wait().unwrap();
    vm.worker = None;
    // QEMU goes with its worker; then nothing holds the disk.
    let start = std::time::Instant::now();
    loop {
        match vhd::RawDisk::open(&data, false) {
            Ok(_) => break,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(10),
                "the lock outlived the worker: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the VM starts again (a fresh console log, to see this boot's marker).
    let _ = std::fs::remove_file(vm.rt().join(worker::console::LOG_FILE));
    vm.start();
    vm.wait_console("VIRIDIAN-GUEST: booted", Duration::from_secs(90));
    let status = vm.call(Request::Stop).await.unwrap();
    assert_eq!(status.state, WorkerState::Off);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_leaves_the_vm_critical_with_the_reason_and_releases_the_disk() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data.raw");
    std::fs::write(&data, vec![0u8; 8 << 20]).unwrap();
    let direct = common::direct_boot("while true; do echo alive; sleep 1; done", "");
    let mut vm = Vm::new(settings("crashy", vec![ide(0, 0, &data)]), Some(direct));
    vm.start();
    vm.wait_console("alive", Duration::from_secs(90));
    let qemu = vm.call(Request::Status).await.unwrap().qemu_pid.unwrap() as i32;
    // SAFETY: kill(2) on the QEMU this test's worker started.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.state, WorkerState::Critical);
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("QEMU exited unexpectedly") && reason.contains("signal: 9"),
        "{reason}"
    );
    vhd::RawDisk::open(&data, false).expect("the worker released the disk");
}
