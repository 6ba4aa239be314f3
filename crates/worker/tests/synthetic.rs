//! Synthetic (SCSI-controller) disks served by the worker's vhost-user-blk backend
//! straight from the storage engine, with the real guest's virtio-blk driver.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{direct_boot, ide, settings, Vm};
use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::vhdx::create::{NewVhdx, VhdxOptions};
use worker::control::WorkerState;

const MIB: u64 = 1 << 20;

fn new_disk(path: &Path, kind: NewDisk) {
    let opts = CreateOptions {
        kind,
        exact_size: true,
    };
    create(path, &opts, &mut vhd::NoProgress).unwrap();
}

fn dynamic(path: &Path, size: u64) {
    new_disk(
        path,
        NewDisk::Dynamic {
            size,
            block_size: 2 << 20,
        },
    );
}

fn vhdx(path: &Path, kind: NewVhdx, logical_sector_size: u32) {
    let mut opts = VhdxOptions::new(kind);
    opts.logical_sector_size = logical_sector_size;
    opts.block_size = Some(2 << 20);
    vhd::vhdx::create::create(path, &opts, &mut vhd::NoProgress).unwrap();
}

fn scsi(controller_number: u8, location: u8, path: &Path) -> vm_config::Drive {
    vm_config::Drive {
        slot: vm_config::Slot {
            controller: vm_config::ControllerKind::Scsi,
            controller_number,
            location,
        },
        media: vm_config::DriveMedia::HardDisk {
            path: path.display().to_string(),
        },
    }
}

/// The 1000-line pattern the guest writes to the disk called `name`.
fn pattern(name: &str) -> Vec<u8> {
    (0..1000)
        .map(|i| format!("{name}-PATTERN-{i:04}\n"))
        .collect::<String>()
        .into_bytes()
}

/// In the guest: for every disk, print what the guest sees, write the disk's pattern
/// at 1 MiB, read it back; on each synthetic disk also fill 8–10 MiB with 'Z' and
/// discard it.
const SCRIPT: &str = r#"
pat() { i=0; while [ $i -lt 1000 ]; do printf '%s-PATTERN-%04d\n' "$1" $i; i=$((i+1)); done; }
for d in /sys/block/vd*; do
    n=${d##*/}; s=$(cat $d/serial)
    echo "SYN $s dev=$n sectors=$(cat $d/size) lbs=$(cat $d/queue/logical_block_size) queues=$(ls $d/mq | wc -l) discard=$(cat $d/queue/discard_max_bytes) ro=$(cat $d/ro)"
    pat "$s" > /tmp/p
    dd if=/tmp/p of=/dev/$n bs=1M seek=1 conv=fsync 2>/dev/null || echo "WRITE-FAILED $s"
    dd if=/dev/zero bs=1M count=2 2>/dev/null | tr '\0' Z > /tmp/z
    dd if=/tmp/z of=/dev/$n bs=1M seek=8 conv=fsync 2>/dev/null || echo "WRITE-FAILED $s"
    blkdiscard -o $((8*1024*1024)) -l $((2*1024*1024)) /dev/$n || echo "DISCARD-FAILED $s"
    echo 3 > /proc/sys/vm/drop_caches
    if [ "$(dd if=/dev/$n bs=1M skip=1 count=1 2>/dev/null | head -c $(wc -c < /tmp/p) | md5sum)" = "$(md5sum < /tmp/p)" ]; then
        echo "READBACK-OK $s"
    else
        echo "READBACK-BAD $s"
    fi
done
for d in /sys/block/sd*; do
    n=${d##*/}; s="ide-$(cat $d/size)"
    echo "IDE $s dev=$n"
    pat "$s" > /tmp/p
    dd if=/tmp/p of=/dev/$n bs=1M seek=1 conv=fsync 2>/dev/null || echo "WRITE-FAILED $s"
done
sync
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_sees_8_synthetic_disks_vhdx_and_vhd_on_2_scsi_controllers_and_2_ide_disks_and_its_writes_reach_the_files(
) {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    // Slots chosen to cover both PCI bridges of a controller (locations 0–31, 32–63).
    let slots: [(u8, u8); 8] = [
        (0, 0),
        (0, 1),
        (0, 31),
        (0, 32),
        (1, 0),
        (1, 5),
        (1, 40),
        (1, 63),
    ];
    let mut drives = Vec::new();
    let mut synthetic: Vec<(String, PathBuf, u64)> = Vec::new();
    // The first synthetic disk is a VHDX differencing child (an .avhdx, as Hyper-V's
    // checkpoints are): its parent must not change. The second is a dynamic VHDX
    // with 4096-byte logical sectors; the rest are dynamic VHDs.
    let parent = dir.join("parent.vhdx");
    vhdx(&parent, NewVhdx::Dynamic { size: 32 * MIB }, 512);
    {
        let p = vhd::open(&parent, false).unwrap();
        p.write_at(&vec![0xAB; 4 * MIB as usize], 8 * MIB).unwrap();
        p.flush().unwrap();
    }
    let parent_before = std::fs::read(&parent).unwrap();
    for (i, (c, l)) in slots.iter().enumerate() {
        let size = (32 + i as u64) * MIB;
        let path = match i {
            0 => {
                let path = dir.join(format!("scsi{c}-{l}.avhdx"));
                vhdx(
                    &path,
                    NewVhdx::Differencing {
                        parent: parent.clone(),
                    },
                    512,
                );
                path
            }
            1 => {
                let path = dir.join(format!("scsi{c}-{l}.vhdx"));
                vhdx(&path, NewVhdx::Dynamic { size }, 4096);
                path
            }
            _ => {
                let path = dir.join(format!("scsi{c}-{l}.vhd"));
                dynamic(&path, size);
                path
            }
        };
        let size = if i == 0 { 32 * MIB } else { size };
        synthetic.push((format!("scsi{c}-{l}"), path.clone(), size));
        drives.push(scsi(*c, *l, &path));
    }
    let mut ide_disks = Vec::new();
    for (i, l) in [0u8, 1].iter().enumerate() {
        let path = dir.join(format!("ide0-{l}.vhd"));
        let size = (48 + i as u64) * MIB;
        dynamic(&path, size);
        ide_disks.push((format!("ide-{}", size / 512), path.clone()));
        drives.push(ide(0, *l, &path));
    }

    let mut s = settings("synthetic", drives);
    s.processor = vm_config::ProcessorSettings::with_count(2);
    let mut vm = Vm::new(s, Some(direct_boot(SCRIPT, "")));
    vm.start();
    let status = vm.wait_exit(Duration::from_secs(240));
    let console = vm.console();
    assert_eq!(
        status.state,
        WorkerState::Off,
        "{:?}\n{console}\n{}",
        status.reason,
        vm.worker_log()
    );
    assert!(
        console.contains("VIRIDIAN-GUEST: command exited 0"),
        "{console}"
    );
    for (i, (name, _, size)) in synthetic.iter().enumerate() {
        let line = console
            .lines()
            .find(|l| l.starts_with(&format!("SYN {name} ")))
            .unwrap_or_else(|| panic!("the guest did not see {name}:\n{console}"));
        assert!(line.contains(&format!("sectors={}", size / 512)), "{line}");
        let lbs = if i == 1 { 4096 } else { 512 };
        assert!(line.contains(&format!("lbs={lbs} ")), "{line}");
        // One virtqueue per vCPU, each served by its own thread.
        assert!(line.contains("queues=2"), "{line}");
        assert!(!line.contains("discard=0 "), "discard not offered: {line}");
        assert!(line.contains("ro=0"), "{line}");
        assert!(
            console.contains(&format!("READBACK-OK {name}")),
            "{name}: {console}"
        );
    }
    for (name, _) in &ide_disks {
        assert!(
            console.contains(&format!("IDE {name} ")),
            "{name}: {console}"
        );
    }
    assert!(!console.contains("FAILED"), "{console}");

    // The host reads every pattern through the engine (the locks are gone).
    for (name, path, _) in synthetic
        .iter()
        .map(|(n, p, s)| (n.clone(), p, s))
        .chain(ide_disks.iter().map(|(n, p)| (n.clone(), p, &0)))
    {
        let disk = vhd::open(path, false).expect("the worker released its lock");
        let want = pattern(&name);
        let mut got = vec![0u8; want.len()];
        disk.read_at(&mut got, MIB).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{name}"
        );
    }
    // A discard in the differencing child never brings the parent's old bytes back:
    // the range reads as what the guest wrote or as zeros. The parent is untouched.
    let child = vhd::open(&synthetic[0].1, true).unwrap();
    let mut got = vec![0u8; 2 * MIB as usize];
    child.read_at(&mut got, 8 * MIB).unwrap();
    assert!(
        got.iter().all(|b| *b == 0) || got.iter().all(|b| *b == b'Z'),
        "the discarded range shows other data (parent's 0xAB: {})",
        got.contains(&0xAB)
    );
    let mut rest = vec![0u8; 2 * MIB as usize];
    child.read_at(&mut rest, 10 * MIB).unwrap();
    assert!(rest.iter().all(|b| *b == 0xAB), "parent data lost");
    drop(child);
    assert!(
        std::fs::read(&parent).unwrap() == parent_before,
        "the parent changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation2_boots_through_ovmf_from_a_vhd_on_scsi_0_0() {
    let g = common::guest_dir();
    let scratch = tempfile::tempdir().unwrap();
    // A differencing child of the guest's dynamic VHD: the firmware reads the chain
    // through our vhost-user-blk backend.
    let base = scratch.path().join("boot.vhd");
    std::fs::copy(g.join("boot.vhd"), &base).unwrap();
    let boot = scratch.path().join("boot.avhd");
    new_disk(&boot, NewDisk::Differencing { parent: base });
    // The config disk (the UEFI image's command line has no script) on SCSI 0:1.
    let cfg = scratch.path().join("cfg.raw");
    let mut bytes = b"#viridian-guest-script\n\
        echo \"efi-bits $(cat /sys/firmware/efi/fw_platform_size)\"\n\
        echo \"root-disk $(cat /sys/block/vda/serial)\"\n"
        .to_vec();
    bytes.resize(1 << 20, 0);
    std::fs::write(&cfg, bytes).unwrap();
    let mut s = settings("uefi-scsi", vec![scsi(0, 0, &boot), scsi(0, 1, &cfg)]);
    s.generation = 2;
    s.memory.startup_mib = 256;
    let mut vm = Vm::new(s, None);
    vm.start();
    let status = vm.wait_exit(Duration::from_secs(240));
    let console = vm.console();
    assert_eq!(
        status.state,
        WorkerState::Off,
        "{:?}\n{console}",
        status.reason
    );
    assert!(console.contains("efi-bits 64"), "{console}");
    assert!(console.contains("root-disk scsi0-0"), "{console}");
    assert!(
        console.contains("VIRIDIAN-GUEST: command exited 0"),
        "{console}"
    );
}

/// Writes sector `i` with the text `sector i` and prints `count i`, forever.
const WRITER: &str = r#"
i=0
while true; do
    printf 'sector %d\n' $i | dd of=/dev/vda bs=512 seek=$i conv=sync,fsync 2>/dev/null
    echo "count $i"
    i=$((i+1))
    sleep 0.3
done
"#;

fn last_count(console: &str) -> u64 {
    console
        .lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix("count "))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count on the console:\n{console}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_and_resume_with_a_busy_synthetic_disk_loses_no_write() {
    use worker::control::Request;
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data.vhd");
    dynamic(&data, 16 * MIB);
    let mut vm = Vm::new(
        settings("busy", vec![scsi(0, 0, &data)]),
        Some(direct_boot(WRITER, "")),
    );
    vm.start();
    vm.wait_console("count 5", Duration::from_secs(120));
    // vhost-user-blk does not block saving (LOG_ALL with LOG_SHMFD is offered).
    let status = vm.call(Request::Save).await.unwrap();
    assert_eq!(status.state, WorkerState::Saved, "{:?}", status.reason);
    assert_eq!(
        vm.wait_exit(Duration::from_secs(60)).state,
        WorkerState::Saved
    );
    let saved_at = last_count(&vm.console());
    vm.spec.resume = true;
    vm.start();
    vm.wait_console(&format!("count {}", saved_at + 5), Duration::from_secs(120));
    let console = vm.console();
    assert_eq!(
        console.matches("VIRIDIAN-GUEST: booted").count(),
        1,
        "it booted again instead of resuming:\n{console}"
    );
    let status = vm.call(Request::Stop).await.unwrap();
    assert_eq!(status.state, WorkerState::Off);
    vm.wait_exit(Duration::from_secs(60));
    let last = last_count(&vm.console());
    // Every write the guest saw complete (it printed the count after the fsync) is
    // in the file, before and after the save.
    let disk = vhd::open(&data, true).unwrap();
    for i in 0..=last {
        let mut sector = [0u8; 512];
        disk.read_at(&mut sector, i * 512).unwrap();
        let want = format!("sector {i}\n");
        assert_eq!(
            &sector[..want.len()],
            want.as_bytes(),
            "sector {i} of {last} (saved at {saved_at})"
        );
    }
}
