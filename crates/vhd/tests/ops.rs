//! merge and convert: what a user sees afterwards (bytes of the virtual disk,
//! which files remain, what qemu-img reads).

use std::path::{Path, PathBuf};
use std::process::Command;

use vhd::ops::convert::{convert, Target};
use vhd::ops::merge::merge;
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

/// A dynamic VHD of `size` bytes in 2 MiB blocks.
fn mk_dynamic(path: &Path, size: u64) {
    mk(
        path,
        NewDisk::Dynamic {
            size,
            block_size: 2 << 20,
        },
    );
}

/// A differencing VHD on `parent`.
fn mk_child(path: &Path, parent: &Path) {
    mk(
        path,
        NewDisk::Differencing {
            parent: parent.to_path_buf(),
        },
    );
}

fn write(path: &Path, offset: u64, len: usize, byte: u8) {
    let d = vhd::open(path, false).unwrap();
    d.write_at(&vec![byte; len], offset).unwrap();
    d.flush().unwrap();
}

fn content(path: &Path) -> Vec<u8> {
    let d = vhd::open(path, true).unwrap();
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// qemu-img reads the VHD at `vhd_path` as the raw image `raw`.
fn qemu_compare(vhd_path: &Path, raw: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(vhd_path)
        .arg(raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// base (dynamic) <- mid <- top, each layer writing its own ranges, some overlapping.
fn three_layer_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.avhd");
    let top = dir.join("top.avhd");
    mk_dynamic(&base, 16 << 20);
    write(&base, 0, 6 << 20, 0x11);
    mk_child(&mid, &base);
    write(&mid, (1 << 20) + 512, 3000, 0x22);
    write(&mid, 8 << 20, 2 << 20, 0x23);
    mk_child(&top, &mid);
    write(&top, 2 << 20, 4096, 0x33);
    write(&top, (9 << 20) - 100, 200, 0x34);
    (base, mid, top)
}

#[test]
fn merge_into_an_ancestor_keeps_the_content_and_removes_the_merged_files() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = three_layer_chain(dir.path());
    let before = content(&top);
    let result = merge(&top, Some(&base), &mut NoProgress).unwrap();
    assert_eq!(result.removed, vec![top.clone(), mid.clone()]);
    assert!(!top.exists() && !mid.exists());
    assert!(
        content(&base) == before,
        "the base now reads as the chain did"
    );
}

#[test]
fn merge_into_the_parent_leaves_a_chain_one_shorter() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = three_layer_chain(dir.path());
    let before = content(&top);
    let base_before = content(&base);
    merge(&top, None, &mut NoProgress).unwrap();
    assert!(!top.exists());
    assert!(content(&mid) == before);
    assert!(content(&base) == base_before, "the base is untouched");
}

#[test]
fn cancelled_merge_leaves_the_chain_reading_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _mid, top) = three_layer_chain(dir.path());
    let before = content(&top);
    let mut calls = 0;
    let mut cancel_early = |_: u64, _: u64| {
        calls += 1;
        calls < 2
    };
    let err = merge(&top, Some(&base), &mut cancel_early).unwrap_err();
    assert!(matches!(err, vhd::Error::Cancelled { .. }), "{err}");
    assert!(content(&top) == before);
}

#[test]
fn merge_refuses_a_target_that_is_not_an_ancestor() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, _mid, top) = three_layer_chain(dir.path());
    let other = dir.path().join("other.vhd");
    mk_dynamic(&other, 16 << 20);
    let before = content(&top);
    let err = merge(&top, Some(&other), &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not an ancestor"), "{err}");
    assert!(content(&top) == before);
}

#[test]
fn convert_flattens_a_chain_to_raw_and_to_a_sparse_dynamic_vhd_qemu_img_agrees_with() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, _mid, top) = three_layer_chain(dir.path());
    let want = content(&top);
    let raw = dir.path().join("flat.raw");
    convert(&top, &raw, Target::Raw, &mut NoProgress).unwrap();
    assert!(std::fs::read(&raw).unwrap() == want);
    let dynamic = dir.path().join("flat.vhd");
    convert(&raw, &dynamic, Target::VhdDynamic, &mut NoProgress).unwrap();
    assert!(content(&dynamic) == want);
    // Sparse: the all-zero blocks (10 MiB..16 MiB) were not allocated.
    let info = vhd::ops::info::info(&dynamic).unwrap();
    assert!(
        info.allocated_bytes <= 10 << 20,
        "allocated {}",
        info.allocated_bytes
    );
    qemu_compare(&dynamic, &raw);
    let fixed = dir.path().join("fixed.vhd");
    convert(&dynamic, &fixed, Target::VhdFixed, &mut NoProgress).unwrap();
    assert!(content(&fixed) == want);
}

#[test]
fn convert_refuses_an_existing_destination_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _mid, _top) = three_layer_chain(dir.path());
    let dst = dir.path().join("taken.raw");
    std::fs::write(&dst, b"keep me").unwrap();
    assert!(convert(&base, &dst, Target::Raw, &mut NoProgress).is_err());
    assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");
}

#[test]
fn resize_grows_dynamic_and_fixed_disks_keeping_data_and_refuses_to_shrink() {
    use vhd::ops::resize::resize;
    let dir = tempfile::tempdir().unwrap();
    for (name, kind) in [
        // 4 MiB of 2 MiB blocks: growing to 40 MiB needs a bigger BAT, which moves.
        (
            "d.vhd",
            NewDisk::Dynamic {
                size: 4 << 20,
                block_size: 2 << 20,
            },
        ),
        ("f.vhd", NewDisk::Fixed { size: 4 << 20 }),
    ] {
        let p = dir.path().join(name);
        mk(&p, kind);
        write(&p, 1 << 20, 8192, 0x42);
        let before = content(&p);
        let r = resize(&p, 40 << 20, false).unwrap();
        assert!(r.new_size >= 40 << 20);
        write(&p, 30 << 20, 4096, 0x43);
        let after = content(&p);
        assert_eq!(after.len() as u64, r.new_size, "{name}");
        assert!(after[..before.len()] == before[..], "{name}: old data kept");
        assert!(after[30 << 20..(30 << 20) + 4096]
            .iter()
            .all(|&b| b == 0x43));
        assert!(
            after[before.len()..30 << 20].iter().all(|&b| b == 0),
            "{name}: new space reads zeros"
        );
        let raw = dir.path().join(format!("{name}.raw"));
        std::fs::write(&raw, &after).unwrap();
        qemu_compare(&p, &raw);
        let err = resize(&p, 1 << 20, false).unwrap_err().to_string();
        assert!(err.contains("cannot shrink"), "{err}");
        assert!(content(&p) == after);
    }
}

#[test]
fn compact_drops_zero_blocks_shrinks_the_file_and_keeps_content_and_identity() {
    use vhd::ops::compact::compact;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhd");
    mk_dynamic(&p, 32 << 20);
    write(&p, 0, 20 << 20, 0x55);
    write(&p, 2 << 20, 16 << 20, 0); // zeros over eight whole blocks
    let id_before = vhd::ops::info::info(&p).unwrap().unique_id;
    let want = content(&p);
    let r = compact(&p, &mut NoProgress).unwrap();
    assert!(r.file_size_after + (15 << 20) < r.file_size_before, "{r:?}");
    assert!(content(&p) == want);
    assert_eq!(vhd::ops::info::info(&p).unwrap().unique_id, id_before);
    let raw = dir.path().join("c.raw");
    std::fs::write(&raw, &want).unwrap();
    qemu_compare(&p, &raw);
    // A child made before the compact still opens on the compacted parent.
    let child = dir.path().join("c-child.avhd");
    mk_child(&child, &p);
    compact(&p, &mut NoProgress).unwrap();
    assert!(content(&child) == want);
}

#[test]
fn whole_block_write_over_a_partly_written_child_block_hides_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.vhd");
    mk_dynamic(&base, 8 << 20);
    write(&base, 0, 4 << 20, 0x11);
    let child = dir.path().join("c.avhd");
    mk_child(&child, &base);
    write(&child, 4096, 512, 0x22); // allocates block 0 with one sector present
    write(&child, 0, 2 << 20, 0x33); // then the whole block
    write(&child, (2 << 20) + 100, 10, 0x44); // a partial sector in a new block
    let c = content(&child);
    assert!(
        c[..2 << 20].iter().all(|&b| b == 0x33),
        "no parent bytes show through"
    );
    assert!(c[(2 << 20)..(2 << 20) + 100].iter().all(|&b| b == 0x11));
    assert!(c[(2 << 20) + 100..(2 << 20) + 110]
        .iter()
        .all(|&b| b == 0x44));
    assert!(c[(2 << 20) + 110..(2 << 20) + 512]
        .iter()
        .all(|&b| b == 0x11));
}

#[test]
fn check_repairs_a_damaged_footer_copy_and_a_lost_trailing_footer() {
    use std::os::unix::fs::FileExt;
    use vhd::ops::check::check;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.vhd");
    mk_dynamic(&p, 8 << 20);
    write(&p, 0, 4096, 0x61);
    let want = content(&p);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0xee; 16], 40).unwrap(); // the copy at offset 0
    drop(f);
    let report = check(&p, false).unwrap();
    assert!(
        !report.clean() && report.problems[0].what.contains("copy at offset 0"),
        "{report:?}"
    );
    assert!(check(&p, true).unwrap().clean());
    assert!(check(&p, false).unwrap().problems.is_empty());

    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0u8; 512], len - 512).unwrap(); // the trailing footer
    drop(f);
    assert!(
        content(&p) == want,
        "the copy at offset 0 keeps the disk readable"
    );
    assert!(!check(&p, false).unwrap().clean());
    assert!(check(&p, true).unwrap().clean());
    assert!(check(&p, false).unwrap().problems.is_empty());
    assert!(content(&p) == want);
}

#[test]
fn set_parent_reconnects_a_child_after_its_parent_moved_and_refuses_a_stranger() {
    use vhd::ops::set_parent::set_parent;
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = three_layer_chain(dir.path());
    let want = content(&top);
    let moved_dir = dir.path().join("elsewhere");
    std::fs::create_dir(&moved_dir).unwrap();
    let moved = moved_dir.join("mid-moved.avhd");
    std::fs::rename(&mid, &moved).unwrap();
    let err = vhd::open(&top, true).err().unwrap().to_string();
    assert!(err.contains("not found"), "{err}");

    // A disk with another identity is refused, and the child is not changed.
    let stranger = dir.path().join("stranger.vhd");
    mk_dynamic(&stranger, 16 << 20);
    let before = std::fs::read(&top).unwrap();
    let err = set_parent(&top, &stranger, false).unwrap_err().to_string();
    assert!(err.contains("unique ID"), "{err}");
    assert!(std::fs::read(&top).unwrap() == before);

    set_parent(&top, &moved, false).unwrap();
    assert!(content(&top) == want, "the chain reads as before the move");
    let info = vhd::ops::info::info(&top).unwrap();
    assert_eq!(
        info.parent.unwrap().locators[0],
        ".\\elsewhere\\mid-moved.avhd"
    );
    assert_eq!(info.chain.len(), 3);
    let _ = base;
}

#[test]
fn layer_info_resolves_the_parent_without_walking_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = three_layer_chain(dir.path());
    let deep = vhd::ops::info::info(&top).unwrap();
    assert_eq!(deep.chain, [top.clone(), mid.clone(), base.clone()]);
    let shallow = vhd::ops::info::layer_info(&top).unwrap();
    assert_eq!(shallow.chain, std::slice::from_ref(&top));
    let parent = shallow.parent.expect("top has a parent");
    assert_eq!(
        std::fs::canonicalize(parent.resolved_path.unwrap()).unwrap(),
        std::fs::canonicalize(&mid).unwrap()
    );
    assert!(parent.problem.is_none());
    // A parent that is not the one the child was made from is reported, not followed.
    std::fs::remove_file(&mid).unwrap();
    std::fs::copy(&base, &mid).unwrap();
    let shallow = vhd::ops::info::layer_info(&top).unwrap();
    assert!(shallow.parent.unwrap().problem.is_some());
}

/// The file names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_convert_stopped_half_way_leaves_no_file_under_the_destination_nor_a_temporary_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vhd");
    mk_dynamic(&src, 16 << 20);
    write(&src, 0, 16 << 20, 0x3c);
    for target in [Target::Raw, Target::VhdDynamic, Target::VhdxDynamic] {
        let dst = dir.path().join("dst.img");
        let mut seen_partial = false;
        let mut stop_half_way = |done: u64, total: u64| {
            // While it copies, only the temporary name exists.
            assert!(!dst.exists(), "{target:?}: the destination exists mid-way");
            seen_partial |= names_in(dir.path()).iter().any(|n| n.ends_with(".partial"));
            done < total / 2
        };
        let err = convert(&src, &dst, target, &mut stop_half_way).unwrap_err();
        assert!(matches!(err, vhd::Error::Cancelled { .. }), "{err}");
        assert!(seen_partial, "{target:?} built under a temporary name");
        assert_eq!(names_in(dir.path()), ["src.vhd"], "{target:?}");
    }
    // Run to its end, the destination gets its name, and only then.
    let dst = dir.path().join("dst.vhdx");
    convert(&src, &dst, Target::VhdxDynamic, &mut NoProgress).unwrap();
    assert_eq!(names_in(dir.path()), ["dst.vhdx", "src.vhd"]);
    assert_eq!(content(&dst), content(&src));
}

#[test]
fn resize_via_a_copy_leaves_the_original_as_it_was_when_stopped_and_grows_it_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["d.vhd", "d.vhdx"] {
        let disk = dir.path().join(name);
        if name.ends_with(".vhdx") {
            vhd::create_dynamic(&disk, 16 << 20, Some(2 << 20)).unwrap();
        } else {
            mk_dynamic(&disk, 16 << 20);
        }
        write(&disk, 0, 16 << 20, 0x7e);
        let before = std::fs::read(&disk).unwrap();
        let tmp = vhd::ops::partial::partial_path(&disk, "0123abcd");
        let mut stop = |done: u64, total: u64| done < total / 3;
        let err = vhd::ops::resize::resize_via(&disk, &tmp, 32 << 20, true, &mut stop).unwrap_err();
        assert!(matches!(err, vhd::Error::Cancelled { .. }), "{err}");
        assert_eq!(std::fs::read(&disk).unwrap(), before, "{name} changed");
        assert!(!tmp.exists());
        // A disk someone else has open is refused, as an in-place resize refuses it.
        let other = vhd::host_file::open_locked(&disk, true).unwrap();
        let err = vhd::ops::resize::resize_via(&disk, &tmp, 32 << 20, true, &mut NoProgress);
        assert!(matches!(err, Err(vhd::Error::Locked { .. })), "{err:?}");
        assert!(!tmp.exists());
        drop(other);
        let r = vhd::ops::resize::resize_via(&disk, &tmp, 32 << 20, true, &mut NoProgress).unwrap();
        assert_eq!((r.old_size, r.new_size), (16 << 20, 32 << 20));
        assert!(!tmp.exists());
        let grown = content(&disk);
        assert_eq!(grown.len(), 32 << 20);
        assert!(grown[..16 << 20].iter().all(|&b| b == 0x7e));
        assert!(grown[16 << 20..].iter().all(|&b| b == 0));
        // A refused size is refused before any copy, naming the disk itself.
        let err = vhd::ops::resize::resize_via(&disk, &tmp, 1 << 20, true, &mut NoProgress)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{err}");
        assert!(!tmp.exists());
        std::fs::remove_file(&disk).unwrap();
    }
}
