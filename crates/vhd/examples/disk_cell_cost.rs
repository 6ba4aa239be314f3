//! What switching support costs a served drive: 4 KiB reads of a raw file in the
//! page cache, straight from the `Disk` and through a `DiskCell` (a read lock per
//! request), interleaved in rounds, in one run.
//!
//! `cargo run --release -p vhd --example disk_cell_cost`

use std::sync::Arc;
use std::time::Instant;

use vhd::{Disk, DiskCell, RawDisk};

fn main() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![7u8; 64 << 20]).expect("the test file");
    let disk: Arc<dyn Disk> = Arc::new(RawDisk::open(&path, false).expect("open"));
    let cell = DiskCell::new(disk.clone());
    let mut buf = vec![0u8; 4096];
    let blocks = (64u64 << 20) / 4096;
    let n = 400_000u64;
    let (mut direct, mut through) = (0f64, 0f64);
    for _round in 0..5 {
        let t = Instant::now();
        for i in 0..n {
            disk.read_at(&mut buf, (i % blocks) * 4096).unwrap();
        }
        direct += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..n {
            cell.get().read_at(&mut buf, (i % blocks) * 4096).unwrap();
        }
        through += t.elapsed().as_secs_f64();
    }
    let per = |s: f64| s * 1e9 / (5 * n) as f64;
    println!(
        "4 KiB cached reads: direct {:.0} ns, through DiskCell {:.0} ns ({:+.1} %)",
        per(direct),
        per(through),
        (through / direct - 1.0) * 100.0
    );
}
