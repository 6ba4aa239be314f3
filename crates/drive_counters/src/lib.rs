//! Per-drive I/O counters: the disk servers (`nbd_server`, `vhost_blk`) count every
//! request they complete, and the worker's meter reads them.
//!
//! Counting is a relaxed atomic add per figure, with no lock and no shared cache line
//! written by anything but these counters, so the I/O path pays a few nanoseconds a
//! request. A reader sees each figure exactly, but not all figures at one instant:
//! a request may be counted in `read_ops` a moment before its `read_bytes` are.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Size of one normalized operation (Hyper-V's normalized IOPS: a transfer of up to
/// 8 KiB counts one, a larger one one per started 8 KiB).
pub const NORMALIZED_OP_BYTES: u64 = 8 * 1024;

/// The live counters of one drive, shared by its server and the meter.
#[derive(Debug, Default)]
pub struct DriveCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    flush_ops: AtomicU64,
    discard_ops: AtomicU64,
    write_zeroes_ops: AtomicU64,
    normalized_ops: AtomicU64,
}

impl DriveCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// A read of `bytes` completed.
    pub fn read(&self, bytes: u64) {
        self.read_ops.fetch_add(1, Relaxed);
        self.read_bytes.fetch_add(bytes, Relaxed);
        self.normalized_ops.fetch_add(normalized(bytes), Relaxed);
    }

    /// A write of `bytes` completed.
    pub fn write(&self, bytes: u64) {
        self.write_ops.fetch_add(1, Relaxed);
        self.write_bytes.fetch_add(bytes, Relaxed);
        self.normalized_ops.fetch_add(normalized(bytes), Relaxed);
    }

    /// A flush completed.
    pub fn flush(&self) {
        self.flush_ops.fetch_add(1, Relaxed);
    }

    /// A discard (trim) completed.
    pub fn discard(&self) {
        self.discard_ops.fetch_add(1, Relaxed);
    }

    /// A write-zeroes request completed (no data crossed; its bytes are not in
    /// `write_bytes`).
    pub fn write_zeroes(&self) {
        self.write_zeroes_ops.fetch_add(1, Relaxed);
    }

    /// The figures now.
    pub fn snapshot(&self) -> DriveIo {
        DriveIo {
            read_bytes: self.read_bytes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            read_ops: self.read_ops.load(Relaxed),
            write_ops: self.write_ops.load(Relaxed),
            flush_ops: self.flush_ops.load(Relaxed),
            discard_ops: self.discard_ops.load(Relaxed),
            write_zeroes_ops: self.write_zeroes_ops.load(Relaxed),
            normalized_ops: self.normalized_ops.load(Relaxed),
        }
    }
}

fn normalized(bytes: u64) -> u64 {
    bytes.div_ceil(NORMALIZED_OP_BYTES).max(1)
}

/// One drive's counters at one moment, totals since its server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveIo {
    /// Bytes the guest read (completed reads).
    pub read_bytes: u64,
    /// Bytes the guest wrote (completed writes; write-zeroes not included).
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub flush_ops: u64,
    #[serde(default)]
    pub discard_ops: u64,
    #[serde(default)]
    pub write_zeroes_ops: u64,
    /// Reads and writes counted in 8 KiB units (Hyper-V's normalized operations).
    #[serde(default)]
    pub normalized_ops: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_adds_its_bytes_and_one_operation() {
        let c = DriveCounters::new();
        c.read(4096);
        c.read(65536);
        c.write(512);
        c.flush();
        c.discard();
        c.write_zeroes();
        let s = c.snapshot();
        assert_eq!(s.read_bytes, 69632);
        assert_eq!(s.read_ops, 2);
        assert_eq!(s.write_bytes, 512);
        assert_eq!(s.write_ops, 1);
        assert_eq!((s.flush_ops, s.discard_ops, s.write_zeroes_ops), (1, 1, 1));
        // 4 KiB: 1, 64 KiB: 8, 512 B: 1.
        assert_eq!(s.normalized_ops, 10);
    }

    #[test]
    fn counting_from_many_threads_loses_nothing() {
        let c = std::sync::Arc::new(DriveCounters::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.write(4096);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = c.snapshot();
        assert_eq!(s.write_ops, 40_000);
        assert_eq!(s.write_bytes, 40_000 * 4096);
    }
}
