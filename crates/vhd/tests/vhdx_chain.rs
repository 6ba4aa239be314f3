//! VHDX differencing chains: reads through the chain, discard that never
//! exposes the parent, linkage and sector-size checks, and the same chain read
//! by python3-libvhdi.

use std::path::Path;
use std::process::Command;

use vhd::vhdx::create::{create, NewVhdx, VhdxOptions};
use vhd::{Disk, NoProgress};

const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn new_vhdx(path: &Path, kind: NewVhdx, sector: u32) {
    let mut opts = VhdxOptions::new(kind);
    opts.block_size = Some(MIB as u32);
    opts.logical_sector_size = sector;
    create(path, &opts, &mut NoProgress).unwrap();
}

fn read_all(path: &Path) -> Vec<u8> {
    let disk = vhd::open(path, true).unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

/// Writes `data` at `off` both to the disk and to the model.
fn put(disk: &dyn Disk, model: &mut [u8], off: u64, data: &[u8]) {
    disk.write_at(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// A base with data everywhere, and a child with partial-sector, whole-block
/// and cross-block writes plus discards over the base's data.
fn make_chain(dir: &Path, sector: u32) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.avhdx");
    new_vhdx(&base, NewVhdx::Dynamic { size: 8 * MIB }, sector);
    let mut model = vec![0u8; 8 * MIB as usize];
    {
        let d = vhd::open(&base, false).unwrap();
        put(d.as_ref(), &mut model, 0, &pattern(8 * MIB as usize, 9));
    }
    new_vhdx(
        &child,
        NewVhdx::Differencing {
            parent: base.clone(),
        },
        sector,
    );
    {
        let d = vhd::open(&child, false).unwrap();
        put(d.as_ref(), &mut model, 100, &pattern(300, 1));
        put(d.as_ref(), &mut model, MIB, &pattern(MIB as usize, 2));
        put(d.as_ref(), &mut model, 3 * MIB - 5000, &pattern(10_000, 3));
        put(d.as_ref(), &mut model, 8 * MIB - 4096, &pattern(4096, 4));
        // Discard: a whole block, and part of one (the rest keeps the base's data).
        d.discard(5 * MIB, MIB).unwrap();
        model[5 * MIB as usize..6 * MIB as usize].fill(0);
        d.discard(6 * MIB + 8192, 16384).unwrap();
        model[(6 * MIB + 8192) as usize..(6 * MIB + 24576) as usize].fill(0);
        d.flush().unwrap();
    }
    (base, child, model)
}

#[test]
fn differencing_chain_reads_child_data_over_the_parent_and_discard_never_exposes_it() {
    for sector in [512, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let (_, child, model) = make_chain(dir.path(), sector);
        assert!(
            read_all(&child) == model,
            "sector {sector}: chain content differs"
        );
    }
}

#[test]
fn differencing_chain_we_write_reads_the_same_through_libvhdi() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, model) = make_chain(dir.path(), 512);
    let script = format!(
        "import pyvhdi,sys\n\
         p=pyvhdi.file(); p.open({base:?})\n\
         c=pyvhdi.file(); c.open({child:?}); c.set_parent(p)\n\
         sys.stdout.buffer.write(c.read_buffer_at_offset(c.get_media_size(), 0))\n",
        base = base.to_str().unwrap(),
        child = child.to_str().unwrap()
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
    assert_eq!(out.stdout.len(), model.len());
    let first = out.stdout.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        first.is_none(),
        "libvhdi reads the chain differently from byte {first:?}"
    );
}

#[test]
fn a_parent_written_after_the_child_was_made_is_refused_with_the_linkage() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, _) = make_chain(dir.path(), 512);
    {
        let d = vhd::open(&base, false).unwrap();
        d.write_at(&[1u8; 512], 0).unwrap();
    }
    let err = vhd::open(&child, true)
        .err()
        .expect("linkage mismatch")
        .to_string();
    assert!(
        err.contains("DataWriteGuid") && err.contains("parent_linkage"),
        "{err}"
    );
    assert!(err.contains(child.to_str().unwrap()), "{err}");
}

#[test]
fn a_moved_parent_is_found_by_its_relative_path_and_a_missing_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, child, model) = make_chain(dir.path(), 512);
    let moved = tempfile::tempdir().unwrap();
    let to = moved.path().join("sub");
    std::fs::create_dir(&to).unwrap();
    for f in ["base.vhdx", "child.avhdx"] {
        std::fs::rename(dir.path().join(f), to.join(f)).unwrap();
    }
    assert!(read_all(&to.join("child.avhdx")) == model);
    std::fs::remove_file(to.join("base.vhdx")).unwrap();
    let err = vhd::open(&to.join("child.avhdx"), true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("parent of") && err.contains("base.vhdx"),
        "{err}"
    );
    let _ = child;
}

#[test]
fn a_child_inherits_its_parents_sector_size_and_virtual_disk_id() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, _) = make_chain(dir.path(), 512);
    let c = vhd::vhdx::VhdxImage::inspect(&child).unwrap();
    assert_eq!(c.metadata().logical_sector_size, 512);
    let b = vhd::vhdx::VhdxImage::inspect(&base).unwrap();
    assert_eq!(c.metadata().virtual_disk_id, b.metadata().virtual_disk_id);
}
