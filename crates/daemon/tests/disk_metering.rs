//! Per-drive disk metering with a real guest: the test guest writes and reads known
//! amounts with O_DIRECT on an IDE data disk (served over NBD) and a SCSI data disk
//! (vhost-user-blk), and the drives' counters in `runtime`, `measure` and
//! `/v1/metrics` show exactly those amounts, agree with each other, stay on their
//! own drive, and agree with the guest's own accounting (`/sys/block/*/stat`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::guest::{
    act, config_disk, ensure_worker_binary, gen1_vm_with_disks, guest_dir, wait_console,
    KillWorkersOnDrop,
};
use common::Daemon;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const IDE_DATA_SIZE: u64 = 8 * MIB;
const SCSI_DATA_SIZE: u64 = 16 * MIB;
const IDE_WRITTEN: u64 = 3 * MIB;
const SCSI_WRITTEN: u64 = 5 * MIB;
const IDE_READ: u64 = 2 * MIB;
const SCSI_READ: u64 = 4 * MIB;

/// The guest finds its data disks by size, writes and reads them with O_DIRECT in
/// 64 KiB requests, prints its own counters of them, and stays up.
fn script() -> String {
    let ide_sectors = IDE_DATA_SIZE / 512;
    let scsi_sectors = SCSI_DATA_SIZE / 512;
    let blocks = |bytes: u64| bytes / 65536;
    format!(
        "dev_of() {{ for b in /sys/block/$1; do [ \"$(cat $b/size)\" = \"$2\" ] && echo ${{b##*/}}; done; }}\n\
         ide=$(dev_of 'sd*' {ide_sectors})\n\
         scsi=$(dev_of 'vd*' {scsi_sectors})\n\
         echo \"DEVS ide=$ide scsi=$scsi\"\n\
         dd if=/dev/zero of=/dev/$ide bs=65536 count={} oflag=direct\n\
         dd if=/dev/zero of=/dev/$scsi bs=65536 count={} oflag=direct\n\
         dd if=/dev/$ide of=/dev/null bs=65536 count={} iflag=direct\n\
         dd if=/dev/$scsi of=/dev/null bs=65536 count={} iflag=direct\n\
         echo \"STAT ide $(cat /sys/block/$ide/stat)\"\n\
         echo \"STAT scsi $(cat /sys/block/$scsi/stat)\"\n\
         echo disk-io-done\n\
         while true; do sleep 1; done\n",
        blocks(IDE_WRITTEN),
        blocks(SCSI_WRITTEN),
        blocks(IDE_READ),
        blocks(SCSI_READ),
    )
}

fn dynamic_vhd(path: &Path, size: u64) {
    use vhd::vhd1::create::{create, CreateOptions, NewDisk};
    let o = CreateOptions {
        kind: NewDisk::Dynamic {
            size,
            block_size: 2 * MIB as u32,
        },
        exact_size: true,
    };
    create(path, &o, &mut vhd::NoProgress).unwrap();
}

/// The guest's `/sys/block/<dev>/stat` line for `which` from the console:
/// (read I/Os, read bytes, write I/Os, write bytes).
fn guest_stat(console: &str, which: &str) -> (u64, u64, u64, u64) {
    let prefix = format!("STAT {which} ");
    let line = console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {prefix:?} line on the console:\n{console}"));
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (f[0], f[2] * 512, f[4], f[6] * 512)
}

/// `runtime.drives` as a map from slot to the drive's object.
fn runtime_drives(d: &Daemon, name: &str) -> BTreeMap<String, Value> {
    let vm = d.get(&format!("/v1/vms/{name}")).body;
    vm["runtime"]["drives"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| (x["drive"].as_str().unwrap().to_string(), x.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses Prometheus text (format 0.0.4) strictly enough to catch a malformed
/// line: every family has one HELP and one TYPE before its samples, and every
/// sample line is `name{label="value",...} number`. Returns each sample's value by
/// its name and labels.
fn parse_prometheus(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut helped = BTreeSet::new();
    let mut typed = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(helped.insert(name), "a second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap().to_string();
            let kind = it.next().unwrap();
            assert!(
                ["counter", "gauge"].contains(&kind),
                "unknown type in {line}"
            );
            assert!(helped.contains(&name), "TYPE before HELP: {line}");
            assert!(typed.insert(name), "a second TYPE: {line}");
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line}");
        let open = line
            .find('{')
            .unwrap_or_else(|| panic!("no labels: {line}"));
        let close = line
            .rfind('}')
            .unwrap_or_else(|| panic!("no labels: {line}"));
        let name = &line[..open];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name {name:?}"
        );
        assert!(typed.contains(name), "sample before its TYPE: {line}");
        let mut labels = BTreeMap::new();
        let mut rest = &line[open + 1..close];
        while !rest.is_empty() {
            let eq = rest
                .find("=\"")
                .unwrap_or_else(|| panic!("label in {line}"));
            let key = rest[..eq].to_string();
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => panic!("dangling escape in {line}"),
                    },
                    Some((i, '"')) => break eq + 2 + i + 1,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value in {line}"),
                }
            };
            labels.insert(key, value);
            rest = rest[end..].strip_prefix(',').unwrap_or(&rest[end..]);
        }
        let value: f64 = line[close + 1..]
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("value in {line}"));
        samples.insert((name.to_string(), labels), value);
    }
    assert_eq!(helped, typed, "every family has both HELP and TYPE");
    samples
}

fn within(what: &str, got: u64, want: u64, pct: f64) {
    let diff = got.abs_diff(want) as f64;
    assert!(
        diff <= want as f64 * pct / 100.0,
        "{what}: {got} vs {want} ({:.2} % apart, at most {pct} % allowed)",
        diff * 100.0 / want.max(1) as f64
    );
}

#[test]
fn guest_disk_io_is_metered_per_drive_in_runtime_measure_and_metrics() {
    ensure_worker_binary();
    let guest = guest_dir();
    let mut d = Daemon::start(&[]);
    let _cleanup = KillWorkersOnDrop(d.data.clone());
    let name = "dio";
    let boot = d.dir.path().join("boot.vhd");
    std::fs::copy(guest.join("boot-fixed.vhd"), &boot).unwrap();
    let cfg = config_disk(d.dir.path(), &script());
    let ide_data = d.dir.path().join("ide-data.vhd");
    dynamic_vhd(&ide_data, IDE_DATA_SIZE);
    let scsi_data = d.dir.path().join("scsi-data.vhd");
    dynamic_vhd(&scsi_data, SCSI_DATA_SIZE);
    gen1_vm_with_disks(
        &d,
        name,
        &[
            ("ide", 0, 0, &boot),
            ("ide", 0, 1, &cfg),
            ("ide", 1, 0, &ide_data),
            ("scsi", 0, 0, &scsi_data),
        ],
    );
    let job = act(&d, name, "start");
    assert_eq!(job["state"], "Completed", "start: {job}");
    let console = wait_console(&d, name, "disk-io-done");
    assert!(
        console.contains("DEVS ide=sd") && console.contains(" scsi=vd"),
        "the guest found both data disks:\n{console}"
    );

    // The worker's counters reach the daemon with its next poll (0.5 s); wait until
    // they show the guest's writes and two samples in a row agree (the guest is idle).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = BTreeMap::new();
    let drives = loop {
        let now = runtime_drives(&d, name);
        let done = |slot: &str, want: u64| {
            now.get(slot)
                .and_then(|x| x["totals"]["write_bytes"].as_u64())
                .is_some_and(|w| w >= want)
        };
        let totals = |m: &BTreeMap<String, Value>| {
            m.iter()
                .map(|(k, v)| (k.clone(), v["totals"].clone()))
                .collect::<Vec<_>>()
        };
        if done("IDE 1:0", IDE_WRITTEN)
            && done("SCSI 0:0", SCSI_WRITTEN)
            && totals(&now) == totals(&last)
        {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the drives' counters never showed the guest's writes: {now:?}\n{}",
            d.log()
        );
        last = now;
        std::thread::sleep(Duration::from_millis(700));
    };

    // Every served drive is there, with its image and the processor's window.
    let vm = d.get(&format!("/v1/vms/{name}")).body;
    let window = vm["runtime"]["processor"]["window_seconds"]
        .as_f64()
        .unwrap();
    let slots: Vec<&str> = drives.keys().map(|k| k.as_str()).collect();
    assert_eq!(slots, ["IDE 0:0", "IDE 0:1", "IDE 1:0", "SCSI 0:0"], "{vm}");
    for (slot, path) in [("IDE 1:0", &ide_data), ("SCSI 0:0", &scsi_data)] {
        assert_eq!(drives[slot]["path"], path.display().to_string(), "{vm}");
        let w = drives[slot]["window_seconds"].as_f64().unwrap();
        assert!(w >= 0.9 && (w - window).abs() <= 1.0, "{vm}");
        for rate in ["read_bytes_per_second", "write_ops_per_second"] {
            assert!(drives[slot][rate].as_f64().is_some(), "{rate}: {vm}");
        }
    }
    let total = |slot: &str, field: &str| drives[slot]["totals"][field].as_u64().unwrap();

    // Each data disk took exactly its own writes; boot and config disks none.
    within(
        "IDE data written",
        total("IDE 1:0", "write_bytes"),
        IDE_WRITTEN,
        0.0,
    );
    within(
        "SCSI data written",
        total("SCSI 0:0", "write_bytes"),
        SCSI_WRITTEN,
        0.0,
    );
    assert_eq!(total("IDE 0:0", "write_bytes"), 0, "{vm}");
    assert_eq!(total("IDE 0:1", "write_bytes"), 0, "{vm}");
    assert!(total("IDE 1:0", "read_bytes") >= IDE_READ, "{vm}");
    assert!(total("SCSI 0:0", "read_bytes") >= SCSI_READ, "{vm}");
    assert!(
        total("IDE 0:0", "read_bytes") > total("IDE 1:0", "read_bytes"),
        "the firmware and boot loader read the kernel from the boot disk: {vm}"
    );
    assert!(
        total("SCSI 0:0", "write_ops") >= SCSI_WRITTEN / 65536,
        "{vm}"
    );

    // The guest's own accounting of the same disks agrees within 5 %.
    let (g_rops, g_read, g_wops, g_written) = guest_stat(&console, "scsi");
    eprintln!(
        "SCSI 0:0: guest {g_read} B read in {g_rops} ops, {g_written} B written in {g_wops} ops; \
         worker {} B read in {} ops, {} B written in {} ops",
        total("SCSI 0:0", "read_bytes"),
        total("SCSI 0:0", "read_ops"),
        total("SCSI 0:0", "write_bytes"),
        total("SCSI 0:0", "write_ops"),
    );
    within(
        "SCSI read bytes vs the guest's",
        total("SCSI 0:0", "read_bytes"),
        g_read,
        5.0,
    );
    within(
        "SCSI written bytes vs the guest's",
        total("SCSI 0:0", "write_bytes"),
        g_written,
        5.0,
    );
    within(
        "SCSI read ops vs the guest's",
        total("SCSI 0:0", "read_ops"),
        g_rops,
        5.0,
    );
    within(
        "SCSI write ops vs the guest's",
        total("SCSI 0:0", "write_ops"),
        g_wops,
        5.0,
    );
    let (g_rops, g_read, g_wops, g_written) = guest_stat(&console, "ide");
    eprintln!(
        "IDE 1:0: guest {g_read} B read in {g_rops} ops, {g_written} B written in {g_wops} ops; \
         worker {} B read in {} ops, {} B written in {} ops",
        total("IDE 1:0", "read_bytes"),
        total("IDE 1:0", "read_ops"),
        total("IDE 1:0", "write_bytes"),
        total("IDE 1:0", "write_ops"),
    );
    within(
        "IDE read bytes vs the guest's",
        total("IDE 1:0", "read_bytes"),
        g_read,
        5.0,
    );
    within(
        "IDE written bytes vs the guest's",
        total("IDE 1:0", "write_bytes"),
        g_written,
        5.0,
    );

    // Measure-VM: the same totals, averaged over the uptime.
    let r = d.get(&format!("/v1/vms/{name}/measure"));
    assert_eq!(r.status, 200, "{}", r.raw);
    let m = r.body;
    let uptime = m["uptime_seconds"].as_f64().unwrap();
    let measured: BTreeMap<String, Value> = m["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["drive"].as_str().unwrap().to_string(), x.clone()))
        .collect();
    assert_eq!(
        measured.keys().collect::<Vec<_>>(),
        drives.keys().collect::<Vec<_>>()
    );
    let mut all_read = 0;
    let mut all_written = 0;
    for (slot, x) in &measured {
        assert_eq!(x["totals"], drives[slot]["totals"], "{slot}: {m}");
        let written = x["totals"]["write_bytes"].as_u64().unwrap();
        let avg = x["average_write_bytes_per_second"].as_f64().unwrap();
        assert!(
            (avg - written as f64 / uptime).abs() <= 0.1 + written as f64 * 0.01,
            "{slot}: {avg} B/s vs {written} B in {uptime} s"
        );
        all_read += x["totals"]["read_bytes"].as_u64().unwrap();
        all_written += written;
    }
    assert_eq!(m["disk_data_read_bytes"], all_read, "{m}");
    assert_eq!(m["disk_data_written_bytes"], all_written, "{m}");
    assert!(m["average_normalized_iops"].as_f64().unwrap() > 0.0, "{m}");

    // Prometheus: valid text, one series per drive and counter, the same totals.
    let r = d.get("/v1/metrics");
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("text/plain"), "{}", r.headers);
    let text = r.raw.split_once("\r\n\r\n").unwrap().1;
    let samples = parse_prometheus(text);
    let id = vm["id"].as_str().unwrap();
    for (slot, x) in &drives {
        for (family, field) in [
            ("viridian_vm_disk_read_bytes_total", "read_bytes"),
            ("viridian_vm_disk_write_bytes_total", "write_bytes"),
            ("viridian_vm_disk_read_ops_total", "read_ops"),
            ("viridian_vm_disk_write_ops_total", "write_ops"),
            ("viridian_vm_disk_flush_ops_total", "flush_ops"),
        ] {
            let labels: BTreeMap<String, String> = [
                ("vm".to_string(), name.to_string()),
                ("id".to_string(), id.to_string()),
                ("drive".to_string(), slot.clone()),
            ]
            .into();
            let got = samples
                .get(&(family.to_string(), labels))
                .unwrap_or_else(|| panic!("no {family} for {slot}:\n{text}"));
            assert_eq!(
                *got,
                x["totals"][field].as_u64().unwrap() as f64,
                "{family} {slot}"
            );
        }
    }

    let job = act(&d, name, "stop");
    assert_eq!(job["state"], "Completed", "stop: {job}");
    d.stop();
}
