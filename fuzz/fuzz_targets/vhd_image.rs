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
use viridian_fuzz::image_checks::{exercise, open_writable, reads_back};
use viridian_fuzz::MemStorage;

/// `vhd::open_on` tells the format from the file on the host, so the input is
/// also written there; everything else goes through the in-memory storage.
fn host_copy() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("viridian-fuzz-{}.vhd", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = host_copy();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let storage = MemStorage::new(data);
    // A differencing disk whose parent is not here: the layer alone.
    let parent_missing = |e: &vhd::Error| {
        matches!(
            e,
            vhd::Error::Vhd(
                vhd::vhd1::Error::ParentNotFound { .. } | vhd::vhd1::Error::ParentIdMismatch { .. },
            )
        )
    };
    let Some(disk) = open_writable(&storage, path, parent_missing, VhdImage::open_layer_on) else {
        return;
    };
    let written = exercise(disk.as_ref());
    drop(disk);
    if let Some((at, pattern)) = written {
        // What was flushed survives a reopen (the layer alone: any parent is
        // only read, never written).
        let img = VhdImage::open_layer_on(&storage, path, true)
            .unwrap_or_else(|e| panic!("the image we wrote does not reopen: {e}"));
        reads_back(&img, at, &pattern, "read-only");
    }
    let _ = std::fs::remove_file(path);
});
