//! Our VHDX files read by qemu-img 7.2 and python3-libvhdi, and theirs read by us.

use std::path::Path;
use std::process::Command;

use vhd::vhdx::create::{create, NewVhdx, VhdxOptions};
use vhd::{Disk, NoProgress};

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect("tool runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    run("qemu-img", args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read_all(disk: &dyn Disk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

fn new_vhdx(path: &Path, kind: NewVhdx, block_size: Option<u32>, sector: u32) {
    let mut opts = VhdxOptions::new(kind);
    opts.block_size = block_size;
    opts.logical_sector_size = sector;
    create(path, &opts, &mut NoProgress).unwrap();
}

/// Writes at a block start, across a block boundary, a partial sector and the end.
fn write_samples(disk: &dyn Disk) -> Vec<(u64, Vec<u8>)> {
    let size = disk.size();
    let samples = vec![
        (0u64, pattern(64 << 10, 1)),
        ((1 << 20) - 4096, pattern(12288, 2)),
        ((3 << 20) + 100, pattern(1000, 3)),
        (size - 8192, pattern(8192, 4)),
    ];
    for (off, data) in &samples {
        disk.write_at(data, *off).unwrap();
    }
    disk.flush().unwrap();
    samples
}

#[test]
fn qemu_made_dynamic_and_fixed_vhdx_read_like_qemus_raw_export() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["dynamic", "fixed"] {
        let img = dir.path().join(format!("{sub}.vhdx"));
        let raw = dir.path().join(format!("{sub}.raw"));
        let (ok, t) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            &format!("subformat={sub},block_size=1M"),
            s(&img),
            "24M",
        ]);
        assert!(ok, "{t}");
        let (ok, t) = run(
            "qemu-io",
            &[
                "-c",
                "write -P 0xab 1M 64k",
                "-c",
                "write -P 0x11 5000k 3M",
                "-c",
                "write -P 0x5a 23M 1M",
                s(&img),
            ],
        );
        assert!(ok, "{t}");
        let (ok, t) = qemu_img(&["convert", "-O", "raw", s(&img), s(&raw)]);
        assert!(ok, "{t}");
        let disk = vhd::open(&img, true).unwrap();
        assert_eq!(disk.size(), 24 << 20);
        assert!(
            read_all(disk.as_ref()) == std::fs::read(&raw).unwrap(),
            "{sub}: content differs"
        );
    }
}

#[test]
fn our_dynamic_and_fixed_vhdx_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for (name, kind) in [
        ("dyn.vhdx", NewVhdx::Dynamic { size: 40 << 20 }),
        ("fix.vhdx", NewVhdx::Fixed { size: 40 << 20 }),
    ] {
        let img = dir.path().join(name);
        new_vhdx(&img, kind, Some(1 << 20), 512);
        let (ok, t) = qemu_img(&["check", s(&img)]);
        assert!(ok, "fresh {name}: {t}");
        let disk = vhd::open(&img, false).unwrap();
        write_samples(disk.as_ref());
        let ours = read_all(disk.as_ref());
        drop(disk);
        let raw = dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, &ours).unwrap();
        let (ok, t) = qemu_img(&["check", s(&img)]);
        assert!(ok, "{name}: {t}");
        let (ok, t) = qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&raw)]);
        assert!(ok, "{name}: {t}");
        // And the other way: QEMU writes into our file, we read what it wrote.
        let (ok, t) = run(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x77 7M 2M", s(&img)],
        );
        assert!(ok, "{t}");
        let (ok, t) = qemu_img(&["convert", "-O", "raw", s(&img), s(&raw)]);
        assert!(ok, "{t}");
        let disk = vhd::open(&img, true).unwrap();
        assert!(
            read_all(disk.as_ref()) == std::fs::read(&raw).unwrap(),
            "{name}: differs after QEMU wrote"
        );
    }
}

#[test]
fn a_4096_byte_sector_vhdx_reads_back_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("4k.vhdx");
    new_vhdx(
        &img,
        NewVhdx::Dynamic { size: 64 << 20 },
        Some(1 << 20),
        4096,
    );
    let disk = vhd::open(&img, false).unwrap();
    assert_eq!(disk.logical_sector_size(), 4096);
    let samples = write_samples(disk.as_ref());
    drop(disk);
    let disk = vhd::open(&img, true).unwrap();
    let all = read_all(disk.as_ref());
    for (off, data) in samples {
        assert_eq!(&all[off as usize..off as usize + data.len()], &data[..]);
    }
    assert!(all[(5 << 20)..(6 << 20)].iter().all(|&b| b == 0));
}
