//! What the VHD and VHDX crash tests share: running an operation cut off at
//! every crash point in every mode, the create and allocating-write crash
//! tests written once for any format, the checks made after a cut, and the
//! model of what each sector may read as after a crash.

use std::path::Path;

use vhd::crash::{for_every_crash_point, AfterCrash, CrashStorage};
use vhd::{Disk, HostStorage, Storage};

/// Bytes per sector.
pub const SECTOR: usize = 512;

/// Every way a crash can treat the writes not yet flushed.
const MODES: [AfterCrash; 3] = [
    AfterCrash::KeepAllWrites,
    AfterCrash::LoseUnflushedWrites,
    AfterCrash::KeepOnlyLastUnflushedWrite,
];

/// More steps than any operation under test takes.
pub const LIMIT: u64 = 10_000;

/// A disk the crash tests make.
pub enum Kind<'a> {
    Fixed,
    Dynamic,
    Differencing { parent: &'a Path },
}

/// What the crash tests need to know of a disk format.
pub trait Format {
    /// Extension of the files the tests make ("vhd", "vhdx").
    const EXT: &'static str;
    /// Virtual size of every disk the tests make.
    const SIZE: u64;
    /// Block size of the dynamic disks the tests make.
    const BLOCK: u64;

    /// Creates a `kind` disk of [`Format::SIZE`] at `path` through `storage`.
    fn create_on(storage: &dyn Storage, path: &Path, kind: Kind) -> vhd::Result<()>;

    /// After the cut at crash point `n`, `path` opens and checks clean.
    fn assert_consistent(path: &Path, n: u64);
}

/// Creates a `kind` disk at `path` with the real storage.
pub fn new_disk<F: Format>(path: &Path, kind: Kind) {
    F::create_on(&HostStorage, path, kind).unwrap();
}

/// Runs `run` at every crash point in every mode; returns how many were tried.
pub fn at_every_crash_point_in_every_mode(mut run: impl FnMut(&CrashStorage, u64)) -> u64 {
    MODES
        .into_iter()
        .map(|mode| for_every_crash_point(mode, LIMIT, &mut run))
        .sum()
}

/// Prints how many crash points a test tried (`--nocapture` to see it) and
/// fails if that is too few for the harness to have cut anything useful.
pub fn report_crash_points(what: &str, tried: u64, at_least: u64) {
    println!("{what}: {tried} crash points tried");
    assert!(
        tried > at_least,
        "{what}: only {tried} crash points; the harness cut too little"
    );
}

/// The whole virtual disk at `path`, read with the real storage.
pub fn read_all(path: &Path) -> Vec<u8> {
    let disk = vhd::open(path, true).unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

/// After a crash, the disk still takes new allocating writes that survive a reopen.
pub fn assert_still_writable<F: Format>(path: &Path, n: u64) {
    let disk = vhd::open(path, false).unwrap();
    let last = disk.size() - SECTOR as u64;
    disk.write_at(&[0x5a; SECTOR], last).unwrap();
    disk.flush().unwrap();
    drop(disk);
    F::assert_consistent(path, n);
    let disk = vhd::open(path, true).unwrap();
    let mut buf = [0u8; SECTOR];
    disk.read_at(&mut buf, last).unwrap();
    assert_eq!(
        buf, [0x5a; SECTOR],
        "crash point {n}: write after the crash lost"
    );
}

/// Creates a fixed, a dynamic and a differencing disk cut at every crash
/// point: each cut leaves no disk (and create did not say Ok) or a complete
/// one that checks clean, reads as zeros and takes writes. Returns how many
/// crash points were tried.
pub fn create_at_every_crash_point<F: Format>() -> u64 {
    let mut tried = 0;
    for kind in ["fixed", "dynamic", "differencing"] {
        tried += at_every_crash_point_in_every_mode(|storage, n| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("new.{}", F::EXT));
            let base = dir.path().join(format!("base.{}", F::EXT));
            let new = match kind {
                "fixed" => Kind::Fixed,
                "dynamic" => Kind::Dynamic,
                _ => {
                    new_disk::<F>(&base, Kind::Dynamic);
                    Kind::Differencing { parent: &base }
                }
            };
            let result = F::create_on(storage, &path, new);
            storage.power_cut().unwrap();
            if !storage.tripped() {
                assert!(result.is_ok(), "{kind}: {result:?}");
            }
            if path.exists() {
                F::assert_consistent(&path, n);
                assert!(
                    read_all(&path) == vec![0u8; F::SIZE as usize],
                    "{kind} at {n}: the new disk does not read as zeros"
                );
                assert_still_writable::<F>(&path, n);
            } else {
                assert!(
                    result.is_err(),
                    "{kind} at {n}: create said Ok without a file"
                );
            }
        });
    }
    tried
}

/// One step of a workload run on a disk.
#[derive(Clone, Copy)]
pub enum Step {
    /// Writes `count` sectors from sector `first`.
    Write(usize, usize),
    /// Discards `count` sectors from sector `first`.
    #[allow(dead_code)] // The VHD workload (crash.rs) has no discards.
    Discard(usize, usize),
    Flush,
}

/// Runs `workload` on `disk`, recording in `model` what each step made
/// possible. Stops at the first failure (the cut).
fn run_workload(disk: &dyn Disk, workload: &[Step], model: &mut Model) {
    for (i, step) in workload.iter().enumerate() {
        let ok = match *step {
            Step::Flush => {
                let ok = disk.flush().is_ok();
                if ok {
                    model.flushed();
                }
                ok
            }
            Step::Write(first, count) => {
                let value = 1 + (i as u8 % 100);
                model.writing(first, count, value);
                disk.write_at(&vec![value; count * SECTOR], (first * SECTOR) as u64)
                    .is_ok()
            }
            Step::Discard(first, count) => {
                model.writing(first, count, 0);
                disk.discard((first * SECTOR) as u64, (count * SECTOR) as u64)
                    .is_ok()
            }
        };
        if !ok {
            return;
        }
    }
}

/// A dynamic disk at `path` whose every other block reads as 0xc0 + block
/// number (modulo 0x30), flushed; returns its content.
pub fn patterned_parent<F: Format>(path: &Path) -> Vec<u8> {
    new_disk::<F>(path, Kind::Dynamic);
    let disk = vhd::open(path, false).unwrap();
    for b in (0..F::SIZE / F::BLOCK).step_by(2) {
        let v = 0xc0 + (b as u8 % 0x30);
        disk.write_at(&vec![v; F::BLOCK as usize], b * F::BLOCK)
            .unwrap();
    }
    disk.flush().unwrap();
    drop(disk);
    read_all(path)
}

/// Runs `workload` on a dynamic disk and on a differencing disk over a
/// patterned parent, cut at every crash point: each cut leaves a disk that
/// checks clean, reads every sector as its flushed value or one written
/// since, and takes writes. Returns how many crash points were tried.
pub fn workload_at_every_crash_point<F: Format>(workload: &[Step]) -> u64 {
    let mut tried = 0;
    for differencing in [false, true] {
        tried += at_every_crash_point_in_every_mode(|storage, n| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("disk.{}", F::EXT));
            let initial = if differencing {
                let base = dir.path().join(format!("base.{}", F::EXT));
                let content = patterned_parent::<F>(&base);
                new_disk::<F>(&path, Kind::Differencing { parent: &base });
                content
            } else {
                new_disk::<F>(&path, Kind::Dynamic);
                vec![0; F::SIZE as usize]
            };
            let mut model = Model::new(initial.chunks(SECTOR).map(|s| s[0]).collect());
            let disk = vhd::open_on(storage, &path, false).unwrap();
            run_workload(disk.as_ref(), workload, &mut model);
            drop(disk);
            storage.power_cut().unwrap();
            F::assert_consistent(&path, n);
            model.assert_matches(&read_all(&path), n);
            assert_still_writable::<F>(&path, n);
        });
    }
    tried
}

/// What each sector may read as after a crash: its durable value, or any
/// value written to it since (the write may or may not have landed).
struct Model {
    durable: Vec<u8>,
    since_flush: Vec<Vec<u8>>,
}

impl Model {
    fn new(initial: Vec<u8>) -> Self {
        let n = initial.len();
        Model {
            durable: initial,
            since_flush: vec![Vec::new(); n],
        }
    }

    fn writing(&mut self, first: usize, count: usize, value: u8) {
        for s in first..first + count {
            self.since_flush[s].push(value);
        }
    }

    fn flushed(&mut self) {
        for (d, since) in self.durable.iter_mut().zip(&mut self.since_flush) {
            if let Some(&last) = since.last() {
                *d = last;
            }
            since.clear();
        }
    }

    fn assert_matches(&self, data: &[u8], n: u64) {
        for (s, sector) in data.chunks(SECTOR).enumerate() {
            let v = sector[0];
            assert!(
                sector.iter().all(|&b| b == v),
                "crash point {n}: sector {s} is torn"
            );
            assert!(
                v == self.durable[s] || self.since_flush[s].contains(&v),
                "crash point {n}: sector {s} reads {v:#x}; flushed {:#x}, written since {:?}",
                self.durable[s],
                self.since_flush[s]
            );
        }
    }
}
