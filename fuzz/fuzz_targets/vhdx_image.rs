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
use viridian_fuzz::image_checks::{exercise, open_writable, reads_back};
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

fuzz_target!(|data: &[u8]| {
    let (flags, mut file) = decode(data);
    fix_checksums(flags, &mut file);
    let path = host_copy();
    if std::fs::write(path, file.get(..8).unwrap_or_default()).is_err() {
        return;
    }
    let storage = MemStorage::from_vec(file);
    // A differencing disk whose parent is not here: the layer alone.
    let parent_missing = |e: &vhd::Error| {
        matches!(
            e,
            vhd::Error::Vhdx(
                vhd::vhdx::Error::ParentNotFound { .. }
                    | vhd::vhdx::Error::ParentLinkageMismatch { .. }
                    | vhd::vhdx::Error::ParentLoop { .. }
                    | vhd::vhdx::Error::SectorSizeMismatch { .. },
            )
        )
    };
    let Some(disk) = open_writable(&storage, path, parent_missing, VhdxImage::open_layer_on) else {
        return;
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
