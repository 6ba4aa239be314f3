//! Live merge: a layer of a chain that is being written all the time (a thread
//! standing in for the guest) is merged into its parent; every byte the
//! writer wrote reads back afterwards, from the new chain and from the files
//! reopened, and QEMU agrees where it can open the result.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhd::ops::live_merge::{merge_live, Tracked};
use vhd::vhd1::create::{create, CreateOptions, NewDisk};
use vhd::vhdx::create::{create as create_vhdx, NewVhdx, VhdxOptions};
use vhd::{Disk, NoProgress};

const MIB: u64 = 1 << 20;
/// Asked for; a VHD rounds it up to a size its CHS geometry gives exactly, so
/// QEMU (which goes by the geometry) sees the same size as we do.
const SIZE: u64 = 48 * MIB;

/// One test at a time: a `qemu-img` forked by one thread holds every open
/// descriptor until it execs, so a lock another thread just dropped can look
/// taken (see tests/merge_extents.rs).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8).wrapping_mul(7) ^ ((i / 512) as u8).wrapping_mul(13) ^ (i as u8))
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Vhd,
    Vhdx,
}

fn new_base(path: &Path, f: Format) {
    match f {
        Format::Vhd => {
            let opts = CreateOptions {
                kind: NewDisk::Dynamic {
                    size: SIZE,
                    block_size: 2 * MIB as u32,
                },
                exact_size: false,
            };
            create(path, &opts, &mut NoProgress).unwrap();
        }
        Format::Vhdx => {
            let mut opts = VhdxOptions::new(NewVhdx::Dynamic { size: SIZE });
            opts.block_size = Some(MIB as u32);
            create_vhdx(path, &opts, &mut NoProgress).unwrap();
        }
    }
}

fn new_child(path: &Path, parent: &Path, f: Format) {
    match f {
        Format::Vhd => {
            let opts = CreateOptions {
                kind: NewDisk::Differencing {
                    parent: parent.to_path_buf(),
                },
                exact_size: true,
            };
            create(path, &opts, &mut NoProgress).unwrap();
        }
        Format::Vhdx => {
            let opts = VhdxOptions::new(NewVhdx::Differencing {
                parent: parent.to_path_buf(),
            });
            create_vhdx(path, &opts, &mut NoProgress).unwrap();
        }
    }
}

/// Writes `data` at `off` of the chain at `path` (opened and closed here) and
/// into `model`.
fn write(path: &Path, model: &mut [u8], off: u64, data: &[u8]) {
    let d = vhd::open(path, false).unwrap();
    d.write_at(data, off).unwrap();
    d.flush().unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

/// The guest: writes, zeroes and discards all over the disk until told to stop,
/// keeping `model` equal to what it wrote. Returns how many requests it made.
fn guest(disk: Arc<dyn Disk>, model: Arc<Mutex<Vec<u8>>>, stop: Arc<AtomicBool>) -> u64 {
    let mut n: u64 = 0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while !stop.load(Ordering::Acquire) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (1 + x % 128) * 512;
        let off = (x >> 20) % (disk.size() - len) / 512 * 512;
        let mut m = model.lock().unwrap();
        if n % 16 == 5 {
            disk.write_zeroes(off, len).unwrap();
            m[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = pattern(len as usize, n);
            disk.write_at(&data, off).unwrap();
            m[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        drop(m);
        n += 1;
    }
    n
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(at) = first_difference(got, want) {
        panic!(
            "{what}: first difference at byte {at} (sector {})",
            at / 512
        );
    }
}

fn qemu_compare(expected: &[u8], disk: &Path) {
    let raw = disk.with_extension("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw"])
        .arg(&raw)
        .arg(disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {}: {}{}",
        disk.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Setup {
    _dir: tempfile::TempDir,
    base: PathBuf,
    mid: PathBuf,
    top: Option<PathBuf>,
    model: Vec<u8>,
    /// What the chain on `mid` holds (the frozen layer's checkpoint).
    mid_model: Vec<u8>,
}

/// base (written) <- mid (written) [<- top (written), when `frozen`].
fn setup(f: Format, frozen: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (b, c) = match f {
        Format::Vhd => ("vhd", "avhd"),
        Format::Vhdx => ("vhdx", "avhdx"),
    };
    let base = dir.path().join(format!("base.{b}"));
    let mid = dir.path().join(format!("mid.{c}"));
    new_base(&base, f);
    let size = vhd::open(&base, true).unwrap().size();
    let mut model = vec![0u8; size as usize];
    write(&base, &mut model, 0, &pattern(30 * MIB as usize, 1));
    new_child(&mid, &base, f);
    write(&mid, &mut model, 4 * MIB, &pattern(6 * MIB as usize, 2));
    write(&mid, &mut model, 20 * MIB + 4096, &pattern(100_000, 3));
    write(&mid, &mut model, 40 * MIB, &pattern(3 * MIB as usize, 4));
    let mid_model = model.clone();
    let top = frozen.then(|| {
        let top = dir.path().join(format!("top.{c}"));
        new_child(&top, &mid, f);
        write(&top, &mut model, 5 * MIB, &pattern(MIB as usize, 5));
        top
    });
    Setup {
        _dir: dir,
        base,
        mid,
        top,
        model,
        mid_model,
    }
}

/// Merges `mid` into `base` while a guest writes to the served chain; checks
/// what everyone reads afterwards. Returns the report.
fn run(f: Format, frozen: bool) -> vhd::ops::live_merge::LiveMergeReport {
    let _s = serial();
    let s = setup(f, frozen);
    let served_top = s.top.clone().unwrap_or(s.mid.clone());
    let chain: Arc<dyn Disk> = Arc::from(vhd::open(&served_top, false).unwrap());
    let tracked = Arc::new(Tracked::new(chain));
    let model = Arc::new(Mutex::new(s.model.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (d, m, st) = (
            tracked.clone() as Arc<dyn Disk>,
            model.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || guest(d, m, st))
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut committed = false;
    let (new, report) = merge_live(
        &tracked,
        &s.mid,
        &s.base,
        &mut || {
            committed = true;
            Ok(())
        },
        &mut NoProgress,
    )
    .unwrap();
    assert!(committed);
    // The guest goes on writing for a while on the new chain.
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Release);
    let requests = writer.join().unwrap();
    assert!(requests > 20, "the guest made only {requests} requests");
    let want = model.lock().unwrap().clone();
    assert_same(
        "the served disk after the merge",
        &read_all(tracked.as_ref()),
        &want,
    );
    assert_same("the new chain", &read_all(new.as_ref()), &want);
    assert_eq!(new.path(), Some(report.top.as_path()));
    if frozen {
        assert_eq!(report.top, served_top);
        assert_eq!(report.relinked.as_deref(), Some(served_top.as_path()));
        // The leaf links to base now.
        let info = vhd::ops::info::layer_info(&served_top).unwrap();
        let parent = info.parent.unwrap().resolved_path.unwrap();
        assert_eq!(
            parent.canonicalize().unwrap(),
            s.base.canonicalize().unwrap()
        );
    } else {
        assert_eq!(report.top, s.base);
        assert!(report.relinked.is_none());
    }
    // The new chain holds its files: the top exclusively.
    let again = vhd::open(&report.top, false);
    assert!(
        matches!(again, Err(vhd::Error::Locked { .. })),
        "opening the new top a second time for writing was not refused: {:?}",
        again.err()
    );
    drop(new);
    drop(tracked);
    let reopened = vhd::open(&report.top, true).unwrap();
    assert_same("the chain reopened", &read_all(reopened.as_ref()), &want);
    drop(reopened);
    if frozen {
        // base now holds what the frozen layer's chain held, and nothing the
        // guest wrote to the leaf above it meanwhile.
        let merged = vhd::open(&s.base, true).unwrap();
        assert_same(
            "base after a frozen layer merged into it",
            &read_all(merged.as_ref()),
            &s.mid_model,
        );
    }
    let check = vhd::ops::check::check(&s.base, false).unwrap();
    assert!(check.clean(), "{:?}", check.problems);
    if !frozen {
        // base is not a differencing disk: QEMU reads it too.
        qemu_compare(&want, &s.base);
    }
    eprintln!("{requests} guest requests; {report:?}");
    report
}

#[test]
fn a_running_vhd_leaf_merges_into_its_parent_while_written() {
    let r = run(Format::Vhd, false);
    assert!(r.bytes_copied >= 9 * MIB, "{r:?}");
}

#[test]
fn a_running_vhdx_leaf_merges_into_its_parent_while_written() {
    let r = run(Format::Vhdx, false);
    assert!(r.bytes_copied >= 9 * MIB, "{r:?}");
}

#[test]
fn a_frozen_vhd_layer_merges_under_a_running_leaf() {
    run(Format::Vhd, true);
}

#[test]
fn a_frozen_vhdx_layer_merges_under_a_running_leaf() {
    run(Format::Vhdx, true);
}

#[test]
fn a_cancelled_live_merge_leaves_the_chain_as_it_was() {
    let _s = serial();
    for f in [Format::Vhd, Format::Vhdx] {
        let s = setup(f, false);
        let chain: Arc<dyn Disk> = Arc::from(vhd::open(&s.mid, false).unwrap());
        let tracked = Tracked::new(chain);
        let mut calls = 0;
        let r = merge_live(
            &tracked,
            &s.mid,
            &s.base,
            &mut || panic!("committed a cancelled merge"),
            &mut |_: u64, _: u64| {
                calls += 1;
                calls < 2
            },
        );
        assert!(
            matches!(r, Err(vhd::Error::Cancelled { .. })),
            "{:?}",
            r.err()
        );
        // Still served from mid, reading as before; the files reopen as a chain.
        assert_same("the served disk", &read_all(&tracked), &s.model);
        drop(tracked);
        let d = vhd::open(&s.mid, false).unwrap();
        assert_same("the chain reopened", &read_all(d.as_ref()), &s.model);
    }
}

#[test]
fn a_layer_that_is_not_in_the_served_chain_is_refused() {
    let _s = serial();
    let s = setup(Format::Vhd, false);
    let chain: Arc<dyn Disk> = Arc::from(vhd::open(&s.mid, false).unwrap());
    let tracked = Tracked::new(chain);
    let other = s.base.with_file_name("other.avhd");
    new_child(&other, &s.base, Format::Vhd);
    let e = merge_live(&tracked, &other, &s.base, &mut || Ok(()), &mut NoProgress)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("is not in the chain served from"),
        "{e}"
    );
    // mid's parent is base, not mid itself.
    let e = merge_live(&tracked, &s.mid, &s.mid, &mut || Ok(()), &mut NoProgress)
        .err()
        .unwrap();
    assert!(e.to_string().contains("its parent is not"), "{e}");
    assert_same("the served disk", &read_all(&tracked), &s.model);
}
