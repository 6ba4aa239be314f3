//! Sizes at and past each format's limit, and near `u64::MAX`: create and
//! resize refuse them with a sentence naming the limit, never wrap them to a
//! tiny disk, and leave no file (or the old size) behind.

use std::path::Path;

use vhd::vhd1::create::{CreateOptions, NewDisk, MAX_SIZE as VHD_MAX};
use vhd::vhdx::create::{NewVhdx, VhdxOptions};
use vhd::NoProgress;

const MIB: u64 = 1 << 20;
const VHDX_MAX: u64 = 64 << 40;

fn create_vhdx(path: &Path, kind: NewVhdx) -> vhd::Result<u64> {
    // Hyper-V's default 32 MiB blocks keep a 64 TiB BAT small.
    vhd::vhdx::create::create(path, &VhdxOptions::new(kind), &mut NoProgress).map(|c| c.size)
}

fn create_vhd(path: &Path, kind: NewDisk) -> vhd::Result<u64> {
    let opts = CreateOptions {
        kind,
        exact_size: false,
    };
    vhd::vhd1::create::create(path, &opts, &mut NoProgress).map(|c| c.size)
}

fn size_of(path: &Path) -> u64 {
    vhd::open(path, true).unwrap().size()
}

/// The folder holds no file at all (no disk, no temporary file).
fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn vhdx_create_refuses_sizes_that_would_wrap_or_pass_64_tib() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.vhdx");
    for size in [u64::MAX, u64::MAX - 1, u64::MAX - 4095, VHDX_MAX + 1] {
        for kind in [NewVhdx::Dynamic { size }, NewVhdx::Fixed { size }] {
            let err = create_vhdx(&path, kind.clone())
                .expect_err(&format!("{kind:?} was accepted"))
                .to_string();
            assert!(
                err.contains(&format!(
                    "size {size} bytes is beyond the VHDX maximum of 64 TiB"
                )),
                "{kind:?}: {err}"
            );
            assert_empty(dir.path());
        }
    }
}

#[test]
fn vhdx_create_takes_exactly_64_tib_and_rounds_up_to_it() {
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [("max.vhdx", VHDX_MAX), ("round.vhdx", VHDX_MAX - 1)] {
        let path = dir.path().join(name);
        assert_eq!(
            create_vhdx(&path, NewVhdx::Dynamic { size }).unwrap(),
            VHDX_MAX
        );
        assert_eq!(size_of(&path), VHDX_MAX);
    }
}

#[test]
fn vhd_create_refuses_sizes_past_2040_gib_and_near_u64_max() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.vhd");
    for size in [u64::MAX, u64::MAX - 511, VHD_MAX + 1, 1 << 63] {
        for kind in [
            NewDisk::Fixed { size },
            NewDisk::Dynamic {
                size,
                block_size: 512,
            },
            NewDisk::Dynamic {
                size,
                block_size: 2 << 20,
            },
        ] {
            let err = create_vhd(&path, kind.clone())
                .expect_err(&format!("{kind:?} was accepted"))
                .to_string();
            assert!(
                err.contains(&format!(
                    "size {size} bytes is beyond the VHD maximum of 2040 GiB"
                )),
                "{kind:?}: {err}"
            );
            assert_empty(dir.path());
        }
    }
}

#[test]
fn vhdx_resize_to_a_wrapping_size_is_refused_and_keeps_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    create_vhdx(&path, NewVhdx::Dynamic { size: 8 * MIB }).unwrap();
    for size in [u64::MAX, u64::MAX - 511, VHDX_MAX + 1] {
        let pre = vhd::ops::resize::check(&path, size)
            .expect_err("check accepted it")
            .to_string();
        let err = vhd::ops::resize::resize(&path, size, false)
            .expect_err("resize accepted it")
            .to_string();
        for e in [&pre, &err] {
            assert!(
                e.contains(&format!(
                    "size {size} bytes is beyond the VHDX maximum of 64 TiB"
                )),
                "{e}"
            );
        }
        assert_eq!(size_of(&path), 8 * MIB);
    }
    vhd::ops::resize::check(&path, VHDX_MAX).unwrap();
    let grown = vhd::ops::resize::resize(&path, VHDX_MAX, false).unwrap();
    assert_eq!(grown.new_size, VHDX_MAX);
    assert_eq!(size_of(&path), VHDX_MAX);
}

#[test]
fn vhd_resize_past_2040_gib_is_refused_and_keeps_the_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let made = create_vhd(
        &path,
        NewDisk::Dynamic {
            size: 8 * MIB,
            block_size: 512,
        },
    )
    .unwrap();
    for size in [u64::MAX, u64::MAX - 511, VHD_MAX + 1] {
        let pre = vhd::ops::resize::check(&path, size)
            .expect_err("check accepted it")
            .to_string();
        let err = vhd::ops::resize::resize(&path, size, false)
            .expect_err("resize accepted it")
            .to_string();
        for e in [&pre, &err] {
            assert!(
                e.contains(&format!(
                    "size {size} bytes is beyond the VHD maximum of 2040 GiB"
                )),
                "{e}"
            );
        }
        assert_eq!(size_of(&path), made);
    }
    vhd::ops::resize::check(&path, VHD_MAX).unwrap();
}
