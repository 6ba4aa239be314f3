//! A whole VHDX image from the fuzz input, opened the way the worker opens
//! disks (`vhd::open_on`, the file's I/O going to memory), then read, walked
//! with `block_status`, written, flushed and reopened. The input is a sparse
//! file (see `viridian_fuzz::vhdx_input`) whose flags byte can have the
//! headers', region tables' and log entries' checksums recomputed. Checks that
//! nothing panics, that zeroed and written bytes read back before and after
//! reopening (read-only, then writable: the log replayed in memory and in
//! place), and that the engine never damages an image it opened.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhd::vhdx::VhdxImage;
use vhd::{Allocation, Disk};
use viridian_fuzz::vhdx_input::{decode, fix_checksums};
use viridian_fuzz::MemStorage;

/// `vhd::open_on` tells the format from the file on the host, so the input's
/// first bytes are also written there, in a folder of its own (a parent
/// locator's relative path finds nothing beside it); everything else goes
/// through the in-memory storage.
fn host_copy() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("viridian-fuzz-vhdx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        dir.join("disk.vhdx")
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

fn reads_back(img: &VhdxImage, at: u64, pattern: &[u8], how: &str) {
    let mut back = vec![0u8; pattern.len()];
    img.read_at(&mut back, at)
        .unwrap_or_else(|e| panic!("reads after reopening {how}: {e}"));
    assert_eq!(
        back, pattern,
        "flushed write at {at} lost after reopening {how}"
    );
    let st = img.block_status(at, pattern.len() as u64).expect("status");
    assert_ne!(
        st.allocation,
        Allocation::Unallocated,
        "written range unallocated ({how})"
    );
}

fuzz_target!(|data: &[u8]| {
    let (flags, mut file) = decode(data);
    fix_checksums(flags, &mut file);
    let path = host_copy();
    if std::fs::write(path, file.get(..8).unwrap_or_default()).is_err() {
        return;
    }
    let storage = MemStorage::from_vec(file);
    let disk: Box<dyn Disk> = match vhd::open_on(&storage, path, false) {
        Ok(d) => d,
        // A differencing disk whose parent is not here: the layer alone.
        Err(vhd::Error::Vhdx(
            vhd::vhdx::Error::ParentNotFound { .. }
            | vhd::vhdx::Error::ParentLinkageMismatch { .. }
            | vhd::vhdx::Error::ParentLoop { .. }
            | vhd::vhdx::Error::SectorSizeMismatch { .. },
        )) => match VhdxImage::open_layer_on(&storage, path, false) {
            Ok(img) => Box::new(img),
            Err(_) => return,
        },
        Err(_) => return,
    };
    let written = exercise(disk.as_ref());
    drop(disk);
    if let Some((at, pattern)) = written {
        // What was flushed survives a reopen: read-only (a log left behind
        // is replayed in memory), then writable (replayed in place). The
        // layer alone: any parent is only read, never written.
        let img = VhdxImage::open_layer_on(&storage, path, true)
            .unwrap_or_else(|e| panic!("the image we wrote does not reopen read-only: {e}"));
        reads_back(&img, at, &pattern, "read-only");
        drop(img);
        let img = VhdxImage::open_layer_on(&storage, path, false)
            .unwrap_or_else(|e| panic!("the image we wrote does not reopen writable: {e}"));
        reads_back(&img, at, &pattern, "writable");
        img.close().expect("a clean close");
        let img = VhdxImage::open_layer_on(&storage, path, true)
            .unwrap_or_else(|e| panic!("the image we closed does not reopen: {e}"));
        assert!(
            img.log_found().is_none(),
            "a clean close left a log to replay"
        );
        reads_back(&img, at, &pattern, "after a clean close");
    }
});
