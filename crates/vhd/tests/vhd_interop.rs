//! Our VHDs read by qemu-img 7.2 and python3-libvhdi, and theirs read by us.

use std::path::Path;
use std::process::Command;

use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::NoProgress;

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn qemu_size(path: &Path) -> u64 {
    // A fixed VHD has no signature at offset 0, so QEMU must be told the format.
    let (ok, text) = qemu_img(&["info", "-f", "vpc", "--output=json", path.to_str().unwrap()]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn new_disk(path: &Path, kind: NewDisk) -> u64 {
    create(
        path,
        &CreateOptions {
            kind,
            exact_size: false,
        },
        &mut NoProgress,
    )
    .unwrap()
    .size
}

#[test]
fn sizes_we_create_are_the_sizes_qemu_img_reports() {
    let dir = tempfile::tempdir().unwrap();
    for (i, req) in [
        1u64 << 20,
        10 << 20,
        100_000_000,
        1 << 30,
        (3 << 30) + 12345,
    ]
    .iter()
    .enumerate()
    {
        for dynamic in [true, false] {
            let p = dir.path().join(format!("d{i}{dynamic}.vhd"));
            let kind = if dynamic {
                NewDisk::Dynamic {
                    size: *req,
                    block_size: 2 << 20,
                }
            } else {
                NewDisk::Fixed { size: *req }
            };
            let size = new_disk(&p, kind);
            assert!(size >= *req);
            assert_eq!(qemu_size(&p), size, "requested {req}");
            assert_eq!(vhd::open(&p, true).unwrap().size(), size);
            std::fs::remove_file(&p).unwrap();
        }
    }
}

#[test]
fn dynamic_vhd_we_write_reads_identically_in_qemu_img_compare() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhd");
    let size = new_disk(
        &p,
        NewDisk::Dynamic {
            size: 64 << 20,
            block_size: 2 << 20,
        },
    );
    let mut expected = vec![0u8; size as usize];
    {
        let d = vhd::open(&p, false).unwrap();
        for (off, len, seed) in [
            (0u64, 4096usize, 1u8),
            (3 << 20, 2 << 20, 2),
            (10_000_000, 777_000, 3),
            (size - 512, 512, 4),
            (1 << 20, 100, 5),
        ] {
            let data = pattern(len, seed);
            d.write_at(&data, off).unwrap();
            expected[off as usize..off as usize + len].copy_from_slice(&data);
        }
        d.flush().unwrap();
        let mut back = vec![0u8; size as usize];
        d.read_at(&mut back, 0).unwrap();
        assert!(back == expected, "we read back what we wrote");
    }
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    // QEMU 7.2's vpc driver has no `check`; `info` opening the file cleanly and
    // `compare` reading every byte are what it can vouch for.
    let (ok, text) = qemu_img(&["info", "-f", "vpc", p.to_str().unwrap()]);
    assert!(ok, "{text}");
    let (ok, text) = qemu_img(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        p.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
}

#[test]
fn we_read_what_qemu_img_writes() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["dynamic", "fixed"] {
        let p = dir.path().join(format!("{sub}.vhd"));
        let (ok, text) = qemu_img(&[
            "create",
            "-f",
            "vpc",
            "-o",
            &format!("subformat={sub}"),
            p.to_str().unwrap(),
            "20M",
        ]);
        assert!(ok, "{text}");
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "vpc",
                "-c",
                "write -P 0xab 1M 64k",
                "-c",
                "write -P 0xcd 5000k 3k",
            ])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success());
        let raw = dir.path().join(format!("{sub}.raw"));
        let (ok, text) = qemu_img(&[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            p.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        let theirs = std::fs::read(&raw).unwrap();
        let d = vhd::open(&p, true).unwrap();
        assert_eq!(d.size(), theirs.len() as u64, "{sub}: sizes agree");
        let mut ours = vec![0u8; theirs.len()];
        d.read_at(&mut ours, 0).unwrap();
        assert!(ours == theirs, "{sub}: same bytes");
        assert_eq!(ours[1 << 20], 0xab);
    }
}

#[test]
fn differencing_chain_reads_the_same_through_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let size = new_disk(
        &base,
        NewDisk::Dynamic {
            size: 16 << 20,
            block_size: 2 << 20,
        },
    );
    {
        let d = vhd::open(&base, false).unwrap();
        d.write_at(&vec![0x11; 6 << 20], 0).unwrap();
        d.flush().unwrap();
    }
    let child = dir.path().join("child.avhd");
    create(
        &child,
        &CreateOptions {
            kind: NewDisk::Differencing {
                parent: base.clone(),
            },
            exact_size: false,
        },
        &mut NoProgress,
    )
    .unwrap();
    {
        let d = vhd::open(&child, false).unwrap();
        // Whole 4 KiB runs so no bitmap byte is shared by parent and child sectors
        // (libvhdi 20210425 mixes them up when they share one).
        d.write_at(&vec![0x22; 8192], 1 << 20).unwrap();
        d.write_at(&vec![0x33; 3 << 20], 5 << 20).unwrap();
        d.flush().unwrap();
        let mut b = [0u8; 4];
        d.read_at(&mut b, (1 << 20) - 2).unwrap();
        assert_eq!(b, [0x11, 0x11, 0x22, 0x22]);
    }
    let ours = {
        let d = vhd::open(&child, true).unwrap();
        let mut v = vec![0u8; size as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    };
    let script = format!(
        "import pyvhdi,sys\np=pyvhdi.file(); p.open('{b}')\nc=pyvhdi.file(); c.open('{c}'); c.set_parent(p)\nsys.stdout.buffer.write(c.read_buffer_at_offset({n}, 0))",
        b = base.display(), c = child.display(), n = size
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), ours.len());
    assert!(
        out.stdout == ours,
        "libvhdi reads the chain with the same bytes"
    );
}
