//! The files in ../shared/testdata/vhd, made by other tools, behave as their README says.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vhd::ops::{check, info};
use vhd::vhd1::DiskType;

/// A private copy of a test file: the originals are never opened writable.
fn copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/testdata/vhd")
        .join(name);
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join(name);
    std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    (dir, dst)
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn file_hash(p: &Path) -> String {
    sha256(&std::fs::read(p).unwrap())
}

#[test]
fn ext2_vhd_from_qemu_reads_with_the_known_content_hash() {
    let (_d, p) = copy("ext2.vhd");
    let disk = vhd::open(&p, true).unwrap();
    assert_eq!(disk.size(), 4_212_736);
    let mut all = vec![0u8; disk.size() as usize];
    disk.read_at(&mut all, 0).unwrap();
    assert_eq!(
        sha256(&all),
        "870be7ae16c1fa8faab05c6eb9205dc9a7ae35c5f552c5cf8a267c0bc6a5cb99"
    );
    let i = info::info(&p).unwrap();
    assert_eq!(i.creator.as_deref(), Some("qemu"));
    assert!(check::check(&p, false).unwrap().problems.is_empty());
}

#[test]
fn windows_differencing_disk_reports_its_metadata_and_a_missing_parent() {
    let (_d, p) = copy("fat-differential.vhd");
    let before = file_hash(&p);
    let i = info::info(&p).unwrap();
    assert_eq!(i.disk_type, Some(DiskType::Differencing));
    assert_eq!(
        i.virtual_size, 4_194_304,
        "size comes from current size, not the 120/4/17 geometry"
    );
    let g = i.geometry.unwrap();
    assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (120, 4, 17));
    assert_eq!(i.creator.as_deref(), Some("win "));
    let parent = i.parent.unwrap();
    assert_eq!(
        parent.name,
        "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"
    );
    assert_eq!(
        parent.locators,
        vec![
            ".\\fat-parent.vhd".to_string(),
            "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd".to_string()
        ]
    );
    assert!(parent.resolved_path.is_none());

    let err = vhd::open(&p, false)
        .err()
        .expect("the chain cannot open without its parent")
        .to_string();
    assert!(
        err.contains("parent of") && err.contains("not found"),
        "{err}"
    );
    assert!(
        err.contains(
            &p.parent()
                .unwrap()
                .join("fat-parent.vhd")
                .display()
                .to_string()
        ),
        "{err}"
    );
    assert!(
        err.contains("C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"),
        "{err}"
    );
    assert_eq!(file_hash(&p), before, "nothing was written");
}

#[test]
fn images_with_wrong_checksums_are_refused_and_reported_by_check() {
    for (name, computed) in [("image.vhd", "0xffffef25"), ("image-differential.vhd", "")] {
        let (_d, p) = copy(name);
        let before = file_hash(&p);
        let err = vhd::open(&p, false)
            .err()
            .expect("a strict open refuses it")
            .to_string();
        assert!(
            err.contains("checksum mismatch") && err.contains("0xfffff683"),
            "{err}"
        );
        assert!(err.contains(computed), "{err}");
        assert!(err.contains(&p.display().to_string()), "{err}");
        let report = check::check(&p, false).unwrap();
        assert!(!report.clean());
        assert!(report.problems[0].what.contains("checksum mismatch"));
        assert_eq!(file_hash(&p), before, "nothing was written");
    }
}
