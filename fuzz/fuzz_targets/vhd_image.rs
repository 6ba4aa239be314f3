//! A whole image from the fuzz input, opened the way the worker opens disks
//! (`vhd::open_on`, the file's I/O going to memory), then read, walked with
//! `block_status`, written, flushed and reopened. Finds panics in the offset
//! arithmetic of fixed, dynamic and differencing images, and checks that what
//! was written and flushed reads back, before and after reopening.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhd::vhd1::VhdImage;
use vhd::{Allocation, Disk};
use viridian_fuzz::MemStorage;

/// `vhd::open_on` tells the format from the file on the host, so the input is
/// also written there; everything else goes through the in-memory storage.
fn host_copy() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("viridian-fuzz-{}.vhd", std::process::id()))
    })
}

fn exercise(disk: &dyn Disk) -> Option<(u64, Vec<u8>)> {
    let size = disk.size();
    let mut buf = vec![0u8; 4096];
    // Reads spread over the disk, some unaligned and crossing block edges.
    for k in 0..=8u64 {
        let at = (size / 8).saturating_mul(k);
        for (skew, len) in [(0u64, 4096u64), (1, 513), (511, 2)] {
            let off = (at / 512 * 512).saturating_sub(skew);
            let len = len.min(size.saturating_sub(off));
            let _ = disk.read_at(&mut buf[..len as usize], off);
        }
    }
    assert!(
        disk.read_at(&mut buf[..1], size).is_err(),
        "read past the end"
    );
    // Walk the allocation from start to end in at most 64 runs.
    let mut off = 0;
    for _ in 0..64 {
        if off >= size {
            break;
        }
        let Ok(st) = disk.block_status(off, size - off) else {
            break;
        };
        assert!(
            st.len > 0 && st.len <= size - off,
            "{st:?} at {off} of {size}"
        );
        off += st.len;
    }
    if disk.read_only() || size < 512 {
        return None;
    }
    // Zero the start and discard the end; zeroed bytes read as zeros.
    let zeroed = size.min(1024);
    if disk.write_zeroes(0, zeroed).is_ok() {
        let mut back = vec![0xffu8; zeroed as usize];
        disk.read_at(&mut back, 0).expect("zeroed range reads");
        assert!(back.iter().all(|&b| b == 0), "write_zeroes left data");
    }
    let _ = disk.discard(size - zeroed, zeroed);
    // Then write a pattern a third into the disk, flush, read it back.
    let at = size / 3 / 512 * 512;
    let len = (size - at).min(1536);
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    if disk.write_at(&pattern, at).is_err() || disk.flush().is_err() {
        return None;
    }
    let mut back = vec![0u8; len as usize];
    disk.read_at(&mut back, at)
        .expect("a flushed write reads back");
    assert_eq!(back, pattern, "flushed write at {at} reads back different");
    Some((at, pattern))
}

fuzz_target!(|data: &[u8]| {
    let path = host_copy();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let storage = MemStorage::new(data);
    let disk: Box<dyn Disk> = match vhd::open_on(&storage, path, false) {
        Ok(d) => d,
        // A differencing disk whose parent is not here: the layer alone.
        Err(vhd::Error::Vhd(
            vhd::vhd1::Error::ParentNotFound { .. } | vhd::vhd1::Error::ParentIdMismatch { .. },
        )) => match VhdImage::open_layer_on(&storage, path, false) {
            Ok(img) => Box::new(img),
            Err(_) => return,
        },
        Err(_) => return,
    };
    let written = exercise(disk.as_ref());
    drop(disk);
    if let Some((at, pattern)) = written {
        // What was flushed survives a reopen (the layer alone: any parent is
        // only read, never written).
        let img = VhdImage::open_layer_on(&storage, path, true)
            .unwrap_or_else(|e| panic!("the image we wrote does not reopen: {e}"));
        let mut back = vec![0u8; pattern.len()];
        img.read_at(&mut back, at).expect("reads after reopen");
        assert_eq!(back, pattern, "flushed write at {at} lost after reopen");
        let st = img.block_status(at, pattern.len() as u64).expect("status");
        assert_ne!(
            st.allocation,
            Allocation::Unallocated,
            "written range unallocated"
        );
    }
    let _ = std::fs::remove_file(path);
});
