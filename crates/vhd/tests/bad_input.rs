//! Corrupt files: each gives a specific error naming the file and the fault,
//! never a panic, and never a change to the file.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::NoProgress;

fn mk(path: &Path, kind: NewDisk) {
    create(
        path,
        &CreateOptions {
            kind,
            exact_size: true,
        },
        &mut NoProgress,
    )
    .unwrap();
}

/// A dynamic disk with two allocated blocks (BAT at 1536, 4 entries of 2 MiB).
fn good(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    mk(
        &p,
        NewDisk::Dynamic {
            size: 8 << 20,
            block_size: 2 << 20,
        },
    );
    let d = vhd::open(&p, false).unwrap();
    d.write_at(&[1u8; 4096], 0).unwrap();
    d.write_at(&[2u8; 4096], 4 << 20).unwrap();
    d.flush().unwrap();
    p
}

fn poke(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Rewrites the checksum of the 512-byte footer at `at` (after an edit we want to be
/// the only fault).
fn fix_footer_checksum(p: &Path, at: u64) {
    let mut b = vec![0u8; 512];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    let sum: u32 = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, &x)| u32::from(x))
        .sum();
    poke(p, at + 64, &(!sum).to_be_bytes());
}

fn fix_header_checksum(p: &Path) {
    let mut b = vec![0u8; 1024];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, 512)
        .unwrap();
    let sum: u32 = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(36..40).contains(i))
        .map(|(_, &x)| u32::from(x))
        .sum();
    poke(p, 512 + 36, &(!sum).to_be_bytes());
}

#[test]
fn corrupt_files_give_specific_errors_and_stay_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    type Corrupt = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Corrupt, &str)> = vec![
        (
            "bad-cookie",
            Box::new(|p| {
                let l = len(p);
                poke(p, l - 512, b"notavhd!");
                poke(p, 0, b"notavhd!");
            }),
            "not \"conectix\"",
        ),
        (
            "footer-checksum",
            Box::new(|p| {
                let l = len(p);
                poke(p, l - 512 + 48, &[0x7f]);
                poke(p, 48, &[0x7f]);
            }),
            "footer checksum mismatch",
        ),
        (
            "header-checksum",
            Box::new(|p| poke(p, 512 + 100, &[0x55])),
            "dynamic header checksum mismatch",
        ),
        (
            "bat-past-end",
            Box::new(|p| poke(p, 1536, &0x00ff_ffffu32.to_be_bytes())),
            "past the end of the file",
        ),
        (
            "overlapping-blocks",
            Box::new(|p| {
                let mut e = [0u8; 4];
                std::fs::File::open(p)
                    .unwrap()
                    .read_exact_at(&mut e, 1536)
                    .unwrap();
                poke(p, 1536 + 8, &e); // block 2 points where block 0 is
            }),
            "overlap",
        ),
        (
            "block-size",
            Box::new(|p| {
                poke(p, 512 + 32, &(3u32 << 20).to_be_bytes());
                fix_header_checksum(p);
            }),
            "not a power of two",
        ),
        (
            "truncated",
            Box::new(|p| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(1000).unwrap();
            }),
            "",
        ),
        (
            "size-beyond-bat",
            Box::new(|p| {
                let l = len(p);
                for at in [0, l - 512] {
                    poke(p, at + 48, &(64u64 << 20).to_be_bytes());
                    fix_footer_checksum(p, at);
                }
            }),
            "too few for",
        ),
    ];
    for (name, corrupt, want) in cases {
        let p = good(d, &format!("{name}.vhd"));
        corrupt(&p);
        let before = std::fs::read(&p).unwrap();
        for read_only in [true, false] {
            let err = match vhd::open(&p, read_only) {
                Ok(_) => panic!("{name}: a corrupt file opened"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(&p.display().to_string()), "{name}: {err}");
            assert!(err.contains(want), "{name}: {err}");
        }
        let report = vhd::ops::check::check(&p, false).unwrap();
        assert!(!report.clean(), "{name}: check finds it");
        assert!(vhd::ops::info::info(&p).is_err(), "{name}: info refuses it");
        assert!(
            std::fs::read(&p).unwrap() == before,
            "{name}: the file was changed"
        );
    }
}

#[test]
fn chain_faults_name_the_files_involved() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Missing parent.
    let base = good(d, "base.vhd");
    let child = d.join("child.avhd");
    mk(
        &child,
        NewDisk::Differencing {
            parent: base.clone(),
        },
    );
    std::fs::rename(&base, d.join("gone.vhd")).unwrap();
    let err = vhd::open(&child, false).err().unwrap().to_string();
    assert!(
        err.contains("not found") && err.contains("base.vhd"),
        "{err}"
    );

    // Parent replaced by another disk of the same name: unique IDs differ.
    good(d, "base.vhd");
    let before = std::fs::read(&child).unwrap();
    let err = vhd::open(&child, false).err().unwrap().to_string();
    assert!(
        err.contains("unique ID") && err.contains("set-parent"),
        "{err}"
    );
    assert!(std::fs::read(&child).unwrap() == before);

    // A loop: a child whose locators point at itself (parent name field too).
    let a = d.join("a.avhd");
    std::fs::copy(&child, &a).unwrap();
    let before = std::fs::read(&a).unwrap();
    let mut b = vec![0u8; 1024];
    std::fs::File::open(&a)
        .unwrap()
        .read_exact_at(&mut b, 512)
        .unwrap();
    // Point every locator's data at "a.avhd" by rewriting the relative locator in
    // place and clearing the others and the name.
    let self_name: Vec<u8> = ".\\a.avhd"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    for i in 0..8 {
        let at = 576 + i * 24;
        let code = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        if code == 0x5732_7275 {
            let off = u64::from_be_bytes(b[at + 16..at + 24].try_into().unwrap());
            poke(&a, off, &self_name);
            b[at + 8..at + 12].copy_from_slice(&(self_name.len() as u32).to_be_bytes());
        } else {
            b[at..at + 24].fill(0);
        }
    }
    b[64..576].fill(0);
    poke(&a, 512, &b);
    fix_header_checksum(&a);
    let err = vhd::open(&a, true).err().unwrap().to_string();
    assert!(err.contains("loops"), "{err}");
    let _ = before;
}
