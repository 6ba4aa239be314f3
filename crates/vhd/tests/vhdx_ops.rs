//! Every `viridian vhd` operation on VHDX files: info, check (with a log that
//! needs replay), convert in every direction, merge, compact, resize, set-parent.

use std::path::{Path, PathBuf};
use std::process::Command;

use vhd::crash::{AfterCrash, CrashStorage};
use vhd::ops::convert::{convert, Target};
use vhd::vhdx::create::{create, NewVhdx, VhdxOptions};
use vhd::vhdx::VhdxImage;
use vhd::NoProgress;

const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn new_vhdx(path: &Path, kind: NewVhdx) {
    let mut opts = VhdxOptions::new(kind);
    opts.block_size = Some(MIB as u32);
    create(path, &opts, &mut NoProgress).unwrap();
}

fn read_all(path: &Path) -> Vec<u8> {
    let disk = vhd::open(path, true).unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

fn write(path: &Path, off: u64, data: &[u8]) {
    let d = vhd::open(path, false).unwrap();
    d.write_at(data, off).unwrap();
    d.flush().unwrap();
}

/// A dynamic VHDX left by a crash with a log entry flushed but not applied:
/// its data is durable, its BAT says nothing of it until the log is replayed.
fn crashed_with_log(dir: &Path) -> (PathBuf, Vec<u8>) {
    let src = dir.join("src.vhdx");
    new_vhdx(&src, NewVhdx::Dynamic { size: 16 * MIB });
    for n in 0.. {
        let path = dir.join(format!("crash{n}.vhdx"));
        std::fs::copy(&src, &path).unwrap();
        let storage = CrashStorage::cut_after(n, AfterCrash::LoseUnflushedWrites);
        if let Ok(d) = vhd::open_on(&storage, &path, false) {
            let _ = d.write_at(&pattern(3 * MIB as usize, 7), MIB / 2);
            let _ = d.flush();
        }
        storage.power_cut().unwrap();
        assert!(
            storage.tripped(),
            "the write finished without a log to replay"
        );
        let img = VhdxImage::inspect(&path).unwrap();
        if img.log_found().is_some() {
            drop(img);
            let mut model = vec![0u8; 16 * MIB as usize];
            model[(MIB / 2) as usize..(MIB / 2 + 3 * MIB) as usize]
                .copy_from_slice(&pattern(3 * MIB as usize, 7));
            return (path, model);
        }
    }
    unreachable!()
}

#[test]
fn info_describes_a_vhdx_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    new_vhdx(&base, NewVhdx::Dynamic { size: 8 * MIB });
    write(&base, 0, &[1; 4096]);
    new_vhdx(
        &child,
        NewVhdx::Differencing {
            parent: base.clone(),
        },
    );
    let i = vhd::ops::info::info(&child).unwrap();
    let j = serde_json::to_value(&i).unwrap();
    assert_eq!(j["format"], "vhdx");
    assert_eq!(j["disk_type"], "differencing");
    assert_eq!(j["virtual_size"], 8 * MIB);
    assert_eq!(j["block_size"], MIB);
    assert_eq!(j["logical_sector_size"], 512);
    assert_eq!(i.chain, vec![child.clone(), base.clone()]);
    let p = i.parent.unwrap();
    assert_eq!(p.resolved_path.as_deref(), Some(base.as_path()));
    assert!(p.problem.is_none(), "{:?}", p.problem);
    assert!(p.locators.iter().any(|l| l.starts_with("parent_linkage={")));
}

#[test]
fn a_log_left_by_a_crash_is_replayed_the_same_by_us_and_by_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    let (path, model) = crashed_with_log(dir.path());
    // Read-only: replayed in memory, file untouched.
    let before = std::fs::read(&path).unwrap();
    assert!(read_all(&path) == model);
    let report = vhd::ops::check::check(&path, false).unwrap();
    assert!(
        !report.clean() && report.problems[0].what.contains("log"),
        "{:?}",
        report.problems
    );
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a read-only open wrote to the file"
    );
    // QEMU replays a copy.
    let theirs = dir.path().join("theirs.vhdx");
    std::fs::copy(&path, &theirs).unwrap();
    let (_, t) = qemu_img(&["check", "-r", "all", s(&theirs)]);
    let raw = dir.path().join("theirs.raw");
    let (ok, t2) = qemu_img(&["convert", "-O", "raw", s(&theirs), s(&raw)]);
    assert!(ok, "{t}\n{t2}");
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "QEMU's replay differs"
    );
    // Ours replays in place.
    let report = vhd::ops::check::check(&path, true).unwrap();
    assert!(report.clean(), "{:?}", report.problems);
    assert!(vhd::ops::check::check(&path, false)
        .unwrap()
        .problems
        .is_empty());
    assert!(read_all(&path) == model);
    let (ok, t) = qemu_img(&["check", s(&path)]);
    assert!(ok, "{t}");
}

#[test]
fn convert_goes_between_vhd_vhdx_and_raw_in_every_direction_keeping_content_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    let mut content = vec![0u8; 32 * MIB as usize];
    content[(5 * MIB) as usize..(5 * MIB + 70_000) as usize].copy_from_slice(&pattern(70_000, 3));
    content[(30 * MIB) as usize..(31 * MIB) as usize].copy_from_slice(&pattern(MIB as usize, 4));
    std::fs::write(&raw, &content).unwrap();
    let steps: [(&str, &str, Option<Target>); 7] = [
        ("a.raw", "b.vhdx", None),
        ("b.vhdx", "c.vhd", None),
        ("c.vhd", "d.vhdx", Some(Target::VhdxFixed)),
        ("d.vhdx", "e.raw", None),
        ("e.raw", "f.vhd", Some(Target::VhdFixed)),
        ("f.vhd", "g.vhdx", None),
        ("g.vhdx", "h.vhdx", None),
    ];
    for (from, to, target) in steps {
        let (src, dst) = (dir.path().join(from), dir.path().join(to));
        convert(
            &src,
            &dst,
            target.unwrap_or(Target::for_path(&dst)),
            &mut NoProgress,
        )
        .unwrap();
        assert!(read_all(&dst) == content, "{from} -> {to}");
    }
    for sparse in ["b.vhdx", "g.vhdx", "h.vhdx"] {
        let i = vhd::ops::info::info(&dir.path().join(sparse)).unwrap();
        assert!(
            i.allocated_bytes <= 64 * MIB,
            "{sparse}: {} bytes allocated",
            i.allocated_bytes
        );
    }
    let (ok, t) = qemu_img(&["compare", s(&dir.path().join("d.vhdx")), s(&raw)]);
    assert!(ok, "{t}");
}

#[test]
fn merge_folds_a_vhdx_child_into_its_parent_and_grows_it_to_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    new_vhdx(&base, NewVhdx::Dynamic { size: 8 * MIB });
    write(&base, 0, &pattern(8 * MIB as usize, 1));
    new_vhdx(
        &child,
        NewVhdx::Differencing {
            parent: base.clone(),
        },
    );
    write(&child, 3 * MIB + 512, &pattern(5000, 2));
    {
        let d = vhd::open(&child, false).unwrap();
        d.discard(6 * MIB, MIB).unwrap();
    }
    vhd::ops::resize::resize(&child, 10 * MIB, true).unwrap();
    write(&child, 9 * MIB, &[9; 4096]);
    let expected = read_all(&child);
    assert_eq!(expected.len() as u64, 10 * MIB);
    let r = vhd::ops::merge::merge(&child, None, &mut NoProgress).unwrap();
    assert_eq!(r.into, base);
    assert!(!child.exists());
    assert!(read_all(&base) == expected);
    let (ok, t) = qemu_img(&["check", s(&base)]);
    assert!(ok, "{t}");
}

#[test]
fn compact_shrinks_a_dynamic_vhdx_and_keeps_its_children_linked() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    new_vhdx(&base, NewVhdx::Dynamic { size: 32 * MIB });
    write(&base, 0, &pattern(20 * MIB as usize, 1));
    {
        let d = vhd::open(&base, false).unwrap();
        d.write_at(&vec![0u8; 10 * MIB as usize], 2 * MIB).unwrap();
    }
    let expected = read_all(&base);
    let child = dir.path().join("child.avhdx");
    new_vhdx(
        &child,
        NewVhdx::Differencing {
            parent: base.clone(),
        },
    );
    let r = vhd::ops::compact::compact(&base, &mut NoProgress).unwrap();
    assert!(r.file_size_after + 9 * MIB < r.file_size_before, "{r:?}");
    assert!(read_all(&base) == expected);
    assert!(read_all(&child) == expected, "the child no longer links");
    let (ok, t) = qemu_img(&["check", s(&base)]);
    assert!(ok, "{t}");
}

#[test]
fn compact_of_a_differencing_vhdx_drops_what_the_parent_reads_the_same_and_keeps_its_children_linked(
) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    new_vhdx(&base, NewVhdx::Dynamic { size: 32 * MIB });
    // The parent has data in its first 16 MiB, zeros after.
    let parent_data = pattern(16 * MIB as usize, 1);
    write(&base, 0, &parent_data);
    let child = dir.path().join("child.avhdx");
    new_vhdx(
        &child,
        NewVhdx::Differencing {
            parent: base.clone(),
        },
    );
    // Kept: new data (4-7 MiB), zeros over the parent's data (10-12 MiB: they hide it).
    write(&child, 4 * MIB, &pattern(3 * MIB as usize, 2));
    write(&child, 10 * MIB, &vec![0u8; 2 * MIB as usize]);
    // Dropped: the parent's own data written again (0-2 MiB), zeros over zeros (20-26 MiB).
    write(&child, 0, &parent_data[..2 * MIB as usize]);
    write(&child, 20 * MIB, &vec![0u8; 6 * MIB as usize]);
    let expected = read_all(&child);
    assert!(expected[10 * MIB as usize..12 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    let grandchild = dir.path().join("grandchild.avhdx");
    new_vhdx(
        &grandchild,
        NewVhdx::Differencing {
            parent: child.clone(),
        },
    );
    let before = vhd::ops::info::layer_info(&child).unwrap().allocated_bytes;
    let r = vhd::ops::compact::compact(&child, &mut NoProgress).unwrap();
    let after = vhd::ops::info::layer_info(&child).unwrap().allocated_bytes;
    // 8 blocks of 1 MiB dropped (the sector bitmap block stays, counted in both).
    assert_eq!(before - after, 8 * MIB, "{before} -> {after}, {r:?}");
    assert!(r.file_size_after + 8 * MIB <= r.file_size_before, "{r:?}");
    assert!(
        read_all(&child) == expected,
        "the compacted child reads as before"
    );
    assert!(
        read_all(&grandchild) == expected,
        "its child still links to it"
    );
    assert!(vhd::ops::check::check(&child, false).unwrap().clean());
    assert_eq!(
        vhd::ops::info::info(&child).unwrap().chain.len(),
        2,
        "still over the same parent"
    );
    // A fixed VHDX is refused with a reason, and left alone.
    let fixed = dir.path().join("fixed.vhdx");
    new_vhdx(&fixed, NewVhdx::Fixed { size: 4 * MIB });
    let err = vhd::ops::compact::compact(&fixed, &mut NoProgress).unwrap_err();
    assert!(err.to_string().contains("fixed"), "{err}");
}

#[test]
fn resize_grows_past_the_bat_and_shrinks_only_to_the_last_used_block() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhdx");
    new_vhdx(&p, NewVhdx::Dynamic { size: 8 * MIB });
    write(&p, 3 * MIB, &pattern(MIB as usize, 5));
    let small = read_all(&p);
    // 200 GiB of 1 MiB blocks needs more BAT than the first 1 MiB region holds.
    let r = vhd::ops::resize::resize(&p, 200 << 30, false).unwrap();
    assert_eq!(r.new_size, 200 << 30);
    let d = vhd::open(&p, false).unwrap();
    let mut buf = vec![0u8; 8 * MIB as usize];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf == small);
    d.write_at(&[7; 4096], (200 << 30) - 4096).unwrap();
    drop(d);
    let (ok, t) = qemu_img(&["check", s(&p)]);
    assert!(ok, "{t}");
    // Back down: not below the last block that holds data.
    d_write_zero_tail(&p);
    let err = vhd::ops::resize::resize(&p, 2 * MIB, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("last block in use") && err.contains("d.vhdx"),
        "{err}"
    );
    vhd::ops::resize::resize(&p, 4 * MIB, false).unwrap();
    assert!(read_all(&p) == small[..4 * MIB as usize]);
    vhd::ops::resize::resize(&p, 8 * MIB, false).unwrap();
    assert!(read_all(&p)[4 * MIB as usize..].iter().all(|&b| b == 0));
    let (ok, t) = qemu_img(&["check", s(&p)]);
    assert!(ok, "{t}");
}

fn d_write_zero_tail(p: &Path) {
    let d = vhd::open(p, false).unwrap();
    d.write_zeroes((200 << 30) - MIB, MIB).unwrap();
}

#[test]
fn set_parent_repoints_a_vhdx_child_and_refuses_another_disk() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    new_vhdx(&base, NewVhdx::Dynamic { size: 8 * MIB });
    write(&base, 0, &pattern(MIB as usize, 1));
    new_vhdx(
        &child,
        NewVhdx::Differencing {
            parent: base.clone(),
        },
    );
    let expected = read_all(&child);
    let elsewhere = tempfile::tempdir().unwrap();
    let moved = elsewhere.path().join("moved-base.vhdx");
    std::fs::rename(&base, &moved).unwrap();
    assert!(vhd::open(&child, true).is_err());
    let other = dir.path().join("other.vhdx");
    new_vhdx(&other, NewVhdx::Dynamic { size: 8 * MIB });
    let err = vhd::ops::set_parent::set_parent(&child, &other, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("DataWriteGuid"), "{err}");
    vhd::ops::set_parent::set_parent(&child, &moved, false).unwrap();
    assert!(read_all(&child) == expected);
    let loc = VhdxImage::inspect(&child)
        .unwrap()
        .metadata()
        .parent_locator
        .clone()
        .unwrap();
    assert!(loc
        .get("absolute_win32_path")
        .unwrap()
        .ends_with("moved-base.vhdx"));
}

/// What a storage move or an export of a running VM does: the worker keeps the
/// VHDX open for writing and the daemon copies its file. After a flush the copy
/// holds a log to replay (what made online moves fail); after a settle the copy
/// checks clean with no replay, reads what was written, and the open image
/// takes further writes that persist.
#[test]
fn settle_leaves_an_open_vhdx_whose_copy_checks_clean_and_later_writes_persist() {
    use vhd::ops::check::check;
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhdx");
    new_vhdx(&parent, NewVhdx::Dynamic { size: 16 * MIB });
    write(&parent, 0, &pattern(MIB as usize, 1));
    for kind in ["dynamic", "differencing"] {
        let path = dir.path().join(format!("{kind}.vhdx"));
        if kind == "dynamic" {
            new_vhdx(&path, NewVhdx::Dynamic { size: 16 * MIB });
        } else {
            new_vhdx(
                &path,
                NewVhdx::Differencing {
                    parent: parent.clone(),
                },
            );
        }
        let mut model = if kind == "dynamic" {
            vec![0u8; 16 * MIB as usize]
        } else {
            read_all(&parent)
        };
        let disk = vhd::open(&path, false).unwrap();
        let first = pattern(512, 7);
        disk.write_at(&first, 3 * MIB).unwrap();
        model[3 * MIB as usize..3 * MIB as usize + 512].copy_from_slice(&first);
        disk.flush().unwrap();

        let flushed = dir.path().join(format!("{kind}-flushed.vhdx"));
        std::fs::copy(&path, &flushed).unwrap();
        let report = check(&flushed, false).unwrap();
        assert!(
            report.needs_only_log_replay(),
            "{kind}: a copy after a flush alone should hold a log to replay, got {:?}",
            report.problems
        );

        disk.settle().unwrap();
        let settled = dir.path().join(format!("{kind}-settled.vhdx"));
        std::fs::copy(&path, &settled).unwrap();
        let report = check(&settled, false).unwrap();
        assert!(
            report.problems.is_empty(),
            "{kind}: a copy after a settle should need nothing, got {}",
            report.summary()
        );
        assert!(
            read_all(&settled) == model,
            "{kind}: the settled copy reads other data"
        );
        if kind == "dynamic" {
            let (ok, out) = qemu_img(&["check", s(&settled)]);
            assert!(ok, "qemu-img check of the settled copy: {out}");
        }

        let second = pattern(512, 9);
        disk.write_at(&second, 9 * MIB).unwrap();
        model[9 * MIB as usize..9 * MIB as usize + 512].copy_from_slice(&second);
        disk.flush().unwrap();
        drop(disk);
        let report = check(&path, false).unwrap();
        assert!(report.problems.is_empty(), "{kind}: {}", report.summary());
        assert!(
            read_all(&path) == model,
            "{kind}: a write after the settle was lost"
        );
    }
}
