//! Live merge against the offline merge and `cp`, side by side in one run:
//! a differencing layer holding MIB MiB of written data (whole 2 MiB blocks)
//! over a dynamic base, VHD and VHDX; each round, in turn:
//! - `cp` of the layer file into a new file, then fsync (the floor: the same
//!   allocated data copied by the kernel);
//! - the offline merge that deleting a checkpoint of an off VM runs
//!   (`merge_keeping_layers`);
//! - the live merge (`merge_live`) of the same layer while a thread stands in
//!   for the guest, writing 64 KiB at random offsets at about 20 MiB/s
//!   through the served disk; reports its copy rounds and how long the
//!   guest's I/O was held.
//!
//! Every side starts from its own fresh copy of the files (made before the
//! timing, page cache dropped as far as `posix_fadvise` goes), so each
//! writes into new files.
//!
//! `cargo run --release -p vhd --example live_merge_bench -- [MIB] [ROUNDS] [DIR]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhd::ops::live_merge::{merge_live, Tracked};
use vhd::{Disk, NoProgress};

const MIB: u64 = 1 << 20;

fn make(dir: &Path, vhdx: bool, mib: u64) -> (PathBuf, PathBuf) {
    let (b, c) = if vhdx {
        ("vhdx", "avhdx")
    } else {
        ("vhd", "avhd")
    };
    let base = dir.join(format!("base.{b}"));
    let layer = dir.join(format!("layer.{c}"));
    let size = (mib * 2).max(64) * MIB;
    vhd::create_dynamic(&base, size, Some(2 << 20)).expect("base");
    vhd::create_child(&layer, &base).expect("layer");
    let d = vhd::open(&layer, false).expect("open layer");
    let chunk: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut off = 0;
    while off < mib * MIB {
        d.write_at(&chunk, off).expect("write");
        off += chunk.len() as u64;
    }
    d.flush().expect("flush");
    (base, layer)
}

/// A fresh copy of `files` in a new folder under `root`.
fn fresh(root: &Path, tag: &str, files: &[&Path]) -> Vec<PathBuf> {
    let dir = root.join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("folder");
    let out: Vec<PathBuf> = files
        .iter()
        .map(|f| {
            let to = dir.join(f.file_name().expect("name"));
            let ok = Command::new("cp")
                .arg("--sparse=always")
                .arg(f)
                .arg(&to)
                .status()
                .expect("cp");
            assert!(ok.success());
            to
        })
        .collect();
    // The layer's parent locator is relative: the copy links to its own base.
    sync();
    out
}

fn sync() {
    let _ = Command::new("sync").status();
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn guest(disk: Arc<dyn Disk>, stop: Arc<AtomicBool>) {
    let buf = vec![0x5au8; 64 << 10];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let size = disk.size();
    while !stop.load(Ordering::Acquire) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % (size - buf.len() as u64) / 4096 * 4096;
        disk.write_at(&buf, off).expect("guest write");
        // About 20 MiB/s.
        std::thread::sleep(Duration::from_micros(3200));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let root = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("vlm-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("scratch folder");
    println!(
        "live merge bench: {mib} MiB in the layer, {rounds} rounds, in {}; load {}",
        root.display(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for vhdx in [false, true] {
        let src = root.join(if vhdx { "src-vhdx" } else { "src-vhd" });
        std::fs::create_dir_all(&src).expect("folder");
        let (base, layer) = make(&src, vhdx, mib);
        let (mut cp, mut offline, mut live, mut paused, mut rounds_used) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            // cp of the layer file.
            let f = fresh(&root, &format!("cp{r}"), &[&layer]);
            let t = Instant::now();
            let to = f[0].with_extension("copy");
            let ok = Command::new("cp").arg(&f[0]).arg(&to).status().expect("cp");
            assert!(ok.success());
            std::fs::File::open(&to)
                .and_then(|f| f.sync_all())
                .expect("fsync");
            cp.push(secs(t));
            // Offline merge.
            let f = fresh(&root, &format!("off{r}"), &[&base, &layer]);
            let t = Instant::now();
            vhd::ops::merge::merge_keeping_layers(&f[1], &f[0], &mut NoProgress)
                .expect("offline merge");
            offline.push(secs(t));
            // Live merge with a guest writing.
            let f = fresh(&root, &format!("live{r}"), &[&base, &layer]);
            let chain: Arc<dyn Disk> = Arc::from(vhd::open(&f[1], false).expect("open"));
            let tracked = Arc::new(Tracked::new(chain));
            let stop = Arc::new(AtomicBool::new(false));
            let g = {
                let (d, s) = (tracked.clone() as Arc<dyn Disk>, stop.clone());
                std::thread::spawn(move || guest(d, s))
            };
            let t = Instant::now();
            let (new, report) = merge_live(&tracked, &f[1], &f[0], &mut || Ok(()), &mut NoProgress)
                .expect("live merge");
            live.push(secs(t));
            stop.store(true, Ordering::Release);
            g.join().expect("guest thread");
            paused.push(report.io_paused_ms as f64);
            rounds_used.push(report.rounds as f64);
            drop(new);
            drop(tracked);
            for tag in ["cp", "off", "live"] {
                let _ = std::fs::remove_dir_all(root.join(format!("{tag}{r}")));
            }
        }
        let rate = |s: f64| mib as f64 / s;
        let (c, o, l) = (median(cp), median(offline), median(live));
        println!(
            "{}: cp+fsync {:.2} s ({:.0} MiB/s); offline merge {:.2} s ({:.0} MiB/s, {:.0} % of cp); \
             live merge {:.2} s ({:.0} MiB/s, {:.0} % of cp), {} copy rounds, guest I/O held {:.0} ms (medians of {rounds})",
            if vhdx { "VHDX" } else { "VHD" },
            c,
            rate(c),
            o,
            rate(o),
            c / o * 100.0,
            l,
            rate(l),
            c / l * 100.0,
            median(rounds_used),
            median(paused)
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
