//! What the whole-image targets (`vhd_image`, `vhdx_image`) do to a disk once
//! it is open, whatever its format: read it, walk it with `block_status`,
//! write, flush and read back, then check the write after a reopen.

use std::path::Path;

use vhd::{Allocation, Disk, Storage};

/// Opens the image at `path` for writing the way the worker opens disks
/// (`vhd::open_on`). A differencing disk whose parent is not here (an error
/// `parent_missing` accepts) opens as the layer alone, through `open_layer`.
/// `None` if the image does not open.
pub fn open_writable<L: Disk + 'static, E>(
    storage: &dyn Storage,
    path: &Path,
    parent_missing: fn(&vhd::Error) -> bool,
    open_layer: fn(&dyn Storage, &Path, bool) -> Result<L, E>,
) -> Option<Box<dyn Disk>> {
    match vhd::open_on(storage, path, false) {
        Ok(d) => Some(d),
        Err(e) if parent_missing(&e) => match open_layer(storage, path, false) {
            Ok(img) => Some(Box::new(img)),
            Err(_) => None,
        },
        Err(_) => None,
    }
}

/// Reads spread over the disk, walks its allocation, then (if it is writable)
/// zeroes its start, discards its end, writes a pattern a third into it and
/// flushes. Returns where the pattern went and the pattern, for the caller to
/// check after reopening the image; `None` if nothing was flushed.
pub fn exercise(disk: &dyn Disk) -> Option<(u64, Vec<u8>)> {
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

/// The reopened image `img` still holds `pattern` at `at`, and that range is
/// allocated; `how` says which reopen this is, for the panic message.
pub fn reads_back(img: &dyn Disk, at: u64, pattern: &[u8], how: &str) {
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
