//! Live metering: the worker's raw counters (see `worker::meter`) turned into rates
//! for `runtime`, averages for `GET /v1/vms/{vm}/measure`, and Prometheus text for
//! `GET /v1/metrics`: processor, memory, and each drive's bytes and operations.

use std::collections::VecDeque;
use std::fmt::Write;

use api::vms::{DriveIoTotals, DriveMeasurement, DriveUse, ProcessorUse, VmMeasurement};
use uuid::Uuid;
use worker::meter::{DriveMeter, Meter};

/// How far back the live figures look (at least `MIN_WINDOW_MS` when samples allow).
const WINDOW_MS: u64 = 3_000;
const MIN_WINDOW_MS: u64 = 900;

/// The samples of one VM's run that the daemon keeps.
#[derive(Debug, Default, Clone)]
pub struct History {
    samples: VecDeque<Meter>,
    /// Memory × time since the first sample, for the average (MiB·ms).
    memory_mib_ms: f64,
    first_ms: Option<u64>,
}

impl History {
    pub fn push(&mut self, m: Meter) {
        if let Some(last) = self.samples.back() {
            if m.at_unix_ms <= last.at_unix_ms {
                return;
            }
            let dt = (m.at_unix_ms - last.at_unix_ms) as f64;
            self.memory_mib_ms += mib(last.memory_bytes) as f64 * dt;
        } else {
            self.first_ms = Some(m.at_unix_ms);
        }
        self.samples.push_back(m);
        while self.samples.len() > 2
            && self.samples[1].at_unix_ms + WINDOW_MS
                <= self.samples.back().map_or(0, |b| b.at_unix_ms)
        {
            self.samples.pop_front();
        }
    }

    pub fn latest(&self) -> Option<&Meter> {
        self.samples.back()
    }

    /// Processor use between the oldest kept sample and the latest.
    pub fn processor_use(&self, count: u32) -> Option<ProcessorUse> {
        let (a, b) = (self.samples.front()?, self.samples.back()?);
        if b.at_unix_ms < a.at_unix_ms + MIN_WINDOW_MS {
            return None;
        }
        Some(rates(a, b, count))
    }

    /// Each drive's I/O over the same window as [`History::processor_use`], with
    /// its totals; empty until that window is long enough.
    pub fn drive_use(&self) -> Vec<DriveUse> {
        let (Some(a), Some(b)) = (self.samples.front(), self.samples.back()) else {
            return Vec::new();
        };
        if b.at_unix_ms < a.at_unix_ms + MIN_WINDOW_MS {
            return Vec::new();
        }
        drive_rates(a, b)
    }

    /// The average resident memory while watched, MiB.
    pub fn average_memory_mib(&self) -> Option<u64> {
        let first = self.first_ms?;
        let last = self.samples.back()?;
        let span = last.at_unix_ms.saturating_sub(first);
        if span == 0 {
            return Some(mib(last.memory_bytes));
        }
        Some((self.memory_mib_ms / span as f64).round() as u64)
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

fn pct(ns: u64, ms: u64) -> f64 {
    if ms == 0 {
        return 0.0;
    }
    round1(ns as f64 / (ms as f64 * 1e4))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Rates between two samples.
pub fn rates(a: &Meter, b: &Meter, count: u32) -> ProcessorUse {
    let ms = b.at_unix_ms.saturating_sub(a.at_unix_ms);
    let per_vcpu: Vec<f64> = b
        .vcpu_ns
        .iter()
        .zip(a.vcpu_ns.iter().chain(std::iter::repeat(&0)))
        .map(|(y, x)| pct(y.saturating_sub(*x), ms))
        .collect();
    let vcpu_sum: f64 = per_vcpu.iter().sum();
    ProcessorUse {
        total_percent: round1(vcpu_sum / f64::from(count.max(1))),
        per_vcpu_percent: per_vcpu,
        host_processor_percent: pct(b.cpu_ns.saturating_sub(a.cpu_ns), ms),
        window_seconds: ms as f64 / 1000.0,
    }
}

fn totals(d: &DriveMeter) -> DriveIoTotals {
    let io = &d.io;
    DriveIoTotals {
        read_bytes: io.read_bytes,
        write_bytes: io.write_bytes,
        read_ops: io.read_ops,
        write_ops: io.write_ops,
        flush_ops: io.flush_ops,
        discard_ops: io.discard_ops,
        write_zeroes_ops: io.write_zeroes_ops,
        normalized_ops: io.normalized_ops,
    }
}

/// `n` per second over `ms` milliseconds, to 0.1.
fn per_second(n: u64, ms: u64) -> f64 {
    if ms == 0 {
        return 0.0;
    }
    round1(n as f64 * 1000.0 / ms as f64)
}

/// Each drive's rates between two samples. A drive is matched by slot and image;
/// one missing from the older sample (or whose counters went back, as after a
/// worker restart) counts from zero.
pub fn drive_rates(a: &Meter, b: &Meter) -> Vec<DriveUse> {
    let ms = b.at_unix_ms.saturating_sub(a.at_unix_ms);
    b.drives
        .iter()
        .map(|d| {
            let before = a
                .drives
                .iter()
                .find(|x| x.drive == d.drive && x.path == d.path)
                .map(totals)
                .unwrap_or_default();
            let now = totals(d);
            let delta = |f: fn(&DriveIoTotals) -> u64| {
                let (x, y) = (f(&before), f(&now));
                per_second(if y >= x { y - x } else { y }, ms)
            };
            DriveUse {
                drive: d.drive.clone(),
                path: d.path.clone(),
                read_bytes_per_second: delta(|t| t.read_bytes),
                write_bytes_per_second: delta(|t| t.write_bytes),
                read_ops_per_second: delta(|t| t.read_ops),
                write_ops_per_second: delta(|t| t.write_ops),
                flush_ops_per_second: delta(|t| t.flush_ops),
                window_seconds: ms as f64 / 1000.0,
                totals: now,
            }
        })
        .collect()
}

/// Averages since start from the latest counters and the time the VM began running.
pub fn measurement(
    id: Uuid,
    name: &str,
    count: u32,
    started_unix_ms: u64,
    history: &History,
) -> Option<VmMeasurement> {
    let m = history.latest()?;
    let ms = m.at_unix_ms.saturating_sub(started_unix_ms);
    let per_vcpu: Vec<f64> = m.vcpu_ns.iter().map(|ns| pct(*ns, ms)).collect();
    let sum: f64 = per_vcpu.iter().sum();
    let drives: Vec<DriveMeasurement> = m
        .drives
        .iter()
        .map(|d| {
            let t = totals(d);
            DriveMeasurement {
                drive: d.drive.clone(),
                path: d.path.clone(),
                average_read_bytes_per_second: per_second(t.read_bytes, ms),
                average_write_bytes_per_second: per_second(t.write_bytes, ms),
                average_read_ops_per_second: per_second(t.read_ops, ms),
                average_write_ops_per_second: per_second(t.write_ops, ms),
                average_normalized_iops: per_second(t.normalized_ops, ms),
                totals: t,
            }
        })
        .collect();
    let all = |f: fn(&DriveIoTotals) -> u64| drives.iter().map(|d| f(&d.totals)).sum::<u64>();
    Some(VmMeasurement {
        id,
        name: name.to_string(),
        uptime_seconds: ms as f64 / 1000.0,
        processor_seconds: m.cpu_ns as f64 / 1e9,
        average_processor_percent: round1(sum / f64::from(count.max(1))),
        average_per_vcpu_percent: per_vcpu,
        average_memory_mib: history.average_memory_mib().unwrap_or(0),
        memory_in_use_mib: mib(m.memory_bytes),
        processor_count: count,
        disk_data_read_bytes: all(|t| t.read_bytes),
        disk_data_written_bytes: all(|t| t.write_bytes),
        average_normalized_iops: per_second(all(|t| t.normalized_ops), ms),
        drives,
        // The switches know the ports; the caller adds them.
        network_received_bytes: 0,
        network_sent_bytes: 0,
        network_adapters: Vec::new(),
    })
}

/// One running VM as `/v1/metrics` shows it.
pub struct MetricsRow<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub processor: vm_config::ProcessorSettings,
    pub meter: &'a Meter,
}

/// A per-VM gauge family: name, help, and the value it shows.
type VmGauge = (&'static str, &'static str, fn(&MetricsRow<'_>) -> u64);

/// A per-drive counter family: name, help, and the counter it shows.
type DiskFamily = (&'static str, &'static str, fn(&DriveMeter) -> u64);

/// Prometheus text exposition format (version 0.0.4).
pub fn prometheus(rows: &[MetricsRow<'_>]) -> String {
    let mut out = String::new();
    let labels = |r: &MetricsRow<'_>| format!("vm=\"{}\",id=\"{}\"", escape(r.name), r.id);
    let mut family =
        |name: &str, kind: &str, help: &str, values: &mut dyn Iterator<Item = String>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for v in values {
                let _ = writeln!(out, "{name}{v}");
            }
        };
    family(
        "viridian_vm_cpu_seconds_total",
        "counter",
        "Processor time used by the VM's worker and QEMU (its cgroup).",
        &mut rows
            .iter()
            .map(|r| format!("{{{}}} {}", labels(r), r.meter.cpu_ns as f64 / 1e9)),
    );
    family(
        "viridian_vm_vcpu_seconds_total",
        "counter",
        "Processor time used by each virtual processor's thread.",
        &mut rows.iter().flat_map(|r| {
            r.meter
                .vcpu_ns
                .iter()
                .enumerate()
                .map(move |(i, ns)| format!("{{{},vcpu=\"{i}\"}} {}", labels(r), *ns as f64 / 1e9))
        }),
    );
    let vm_gauges: [VmGauge; 5] = [
        (
            "viridian_vm_memory_bytes",
            "Resident memory of the VM's QEMU.",
            |r| r.meter.memory_bytes,
        ),
        ("viridian_vm_processor_count", "Virtual processors.", |r| {
            r.processor.count.into()
        }),
        (
            "viridian_vm_processor_limit_percent",
            "Processor limit, % of one logical processor per virtual processor.",
            |r| r.processor.limit_percent.into(),
        ),
        (
            "viridian_vm_processor_reserve_percent",
            "Processor reserve, % of one logical processor per virtual processor.",
            |r| r.processor.reserve_percent.into(),
        ),
        (
            "viridian_vm_processor_weight",
            "Relative processor weight (1-10000).",
            |r| r.processor.relative_weight.into(),
        ),
    ];
    for (name, help, value) in vm_gauges {
        family(
            name,
            "gauge",
            help,
            &mut rows
                .iter()
                .map(|r| format!("{{{}}} {}", labels(r), value(r))),
        );
    }
    let disk_families: [DiskFamily; 7] = [
        (
            "viridian_vm_disk_read_bytes_total",
            "Bytes the guest read from the drive.",
            |d| d.io.read_bytes,
        ),
        (
            "viridian_vm_disk_write_bytes_total",
            "Bytes the guest wrote to the drive (write-zeroes requests not included).",
            |d| d.io.write_bytes,
        ),
        (
            "viridian_vm_disk_read_ops_total",
            "Read requests the drive completed.",
            |d| d.io.read_ops,
        ),
        (
            "viridian_vm_disk_write_ops_total",
            "Write requests the drive completed.",
            |d| d.io.write_ops,
        ),
        (
            "viridian_vm_disk_flush_ops_total",
            "Flush requests the drive completed.",
            |d| d.io.flush_ops,
        ),
        (
            "viridian_vm_disk_discard_ops_total",
            "Discard (trim) requests the drive completed.",
            |d| d.io.discard_ops,
        ),
        (
            "viridian_vm_disk_write_zeroes_ops_total",
            "Write-zeroes requests the drive completed.",
            |d| d.io.write_zeroes_ops,
        ),
    ];
    for (name, help, value) in disk_families {
        family(
            name,
            "counter",
            help,
            &mut rows.iter().flat_map(|r| {
                r.meter.drives.iter().map(move |d| {
                    format!(
                        "{{{},drive=\"{}\"}} {}",
                        labels(r),
                        escape(&d.drive),
                        value(d)
                    )
                })
            }),
        );
    }
    out
}

/// One adapter of a running VM with its counters, for [`prometheus_network`].
pub struct NetworkRow<'a> {
    pub id: uuid::Uuid,
    pub name: &'a str,
    pub mac: &'a str,
    pub counters: &'a api::switches::AdapterCounters,
}

/// A per-adapter counter family: name, help, and the counter it shows.
type NetworkFamily = (
    &'static str,
    &'static str,
    fn(&api::switches::AdapterCounters) -> u64,
);

/// The adapters' counters in Prometheus text, labelled by VM and MAC; the guards'
/// drops also by guard.
pub fn prometheus_network(rows: &[NetworkRow<'_>]) -> String {
    let mut out = String::new();
    let labels = |r: &NetworkRow<'_>| {
        format!(
            "vm=\"{}\",id=\"{}\",adapter=\"{}\"",
            escape(r.name),
            r.id,
            escape(r.mac)
        )
    };
    let families: [NetworkFamily; 4] = [
        (
            "viridian_vm_network_received_bytes_total",
            "Bytes the switch passed to the VM's adapter.",
            |c| c.received_bytes,
        ),
        (
            "viridian_vm_network_received_packets_total",
            "Frames the switch passed to the VM's adapter.",
            |c| c.received_packets,
        ),
        (
            "viridian_vm_network_sent_bytes_total",
            "Bytes the VM's adapter sent into the switch (before its guards).",
            |c| c.sent_bytes,
        ),
        (
            "viridian_vm_network_sent_packets_total",
            "Frames the VM's adapter sent into the switch (before its guards).",
            |c| c.sent_packets,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for r in rows {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(r), value(r.counters));
        }
    }
    let name = "viridian_vm_network_dropped_packets_total";
    let _ = writeln!(
        out,
        "# HELP {name} Frames from the VM's adapter that a guard dropped.\n# TYPE {name} counter"
    );
    for r in rows {
        let d = &r.counters.dropped;
        for (guard, n) in [
            ("mac_address_spoofing", d.mac_address_spoofing),
            ("dhcp_guard", d.dhcp_guard),
            ("router_guard", d.router_guard),
        ] {
            let _ = writeln!(out, "{name}{{{},guard=\"{guard}\"}} {n}", labels(r));
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(at: u64, cpu_ms: u64, vcpus: &[u64], mem_mib: u64) -> Meter {
        Meter {
            at_unix_ms: at,
            cpu_ns: cpu_ms * 1_000_000,
            vcpu_ns: vcpus.iter().map(|ms| ms * 1_000_000).collect(),
            memory_bytes: mem_mib * 1024 * 1024,
            drives: Vec::new(),
        }
    }

    fn drive(slot: &str, read: u64, written: u64, ops: u64) -> DriveMeter {
        DriveMeter {
            drive: slot.into(),
            path: format!("/vms/{slot}.vhdx"),
            io: worker::meter::DriveIo {
                read_bytes: read,
                write_bytes: written,
                read_ops: ops,
                write_ops: ops,
                flush_ops: 1,
                normalized_ops: 2 * ops,
                ..Default::default()
            },
        }
    }

    fn with_drives(mut m: Meter, drives: Vec<DriveMeter>) -> Meter {
        m.drives = drives;
        m
    }

    #[test]
    fn drive_rates_cover_the_processor_window_and_keep_the_totals() {
        let mut h = History::default();
        h.push(with_drives(
            m(0, 0, &[0], 0),
            vec![drive("IDE 0:0", 1000, 0, 10)],
        ));
        assert!(h.drive_use().is_empty(), "no window yet");
        h.push(with_drives(
            m(2000, 0, &[0], 0),
            vec![
                drive("IDE 0:0", 1000 + (4 << 20), 0, 30),
                drive("SCSI 0:1", 0, 8 << 20, 200),
            ],
        ));
        let u = h.drive_use();
        let p = h.processor_use(1).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].drive, "IDE 0:0");
        assert_eq!(u[0].window_seconds, p.window_seconds);
        assert_eq!(u[0].read_bytes_per_second, (2u64 << 20) as f64);
        assert_eq!(u[0].read_ops_per_second, 10.0);
        assert_eq!(u[0].write_bytes_per_second, 0.0);
        assert_eq!(u[0].totals.read_bytes, 1000 + (4 << 20));
        // A drive absent from the older sample counts from zero.
        assert_eq!(u[1].write_bytes_per_second, (4u64 << 20) as f64);
        assert_eq!(u[1].write_ops_per_second, 100.0);
        assert_eq!(u[1].totals.write_bytes, 8 << 20);
    }

    #[test]
    fn measurement_gives_each_drive_its_averages_and_the_vm_its_aggregates() {
        let mut h = History::default();
        h.push(with_drives(
            m(10_000, 0, &[0], 0),
            vec![
                drive("IDE 0:0", 10 << 20, 0, 50),
                drive("SCSI 0:1", 0, 20 << 20, 100),
            ],
        ));
        let r = measurement(Uuid::nil(), "web", 1, 0, &h).unwrap();
        assert_eq!(r.drives.len(), 2);
        assert_eq!(
            r.drives[0].average_read_bytes_per_second,
            (1u64 << 20) as f64
        );
        assert_eq!(r.drives[0].average_read_ops_per_second, 5.0);
        assert_eq!(
            r.drives[1].average_write_bytes_per_second,
            (2u64 << 20) as f64
        );
        assert_eq!(r.drives[1].average_normalized_iops, 20.0);
        assert_eq!(r.disk_data_read_bytes, 10 << 20);
        assert_eq!(r.disk_data_written_bytes, 20 << 20);
        // (100 + 200) normalized operations in 10 s.
        assert_eq!(r.average_normalized_iops, 30.0);
    }

    #[test]
    fn rates_are_per_vcpu_of_one_host_cpu_and_total_of_the_count() {
        let u = rates(&m(0, 0, &[0, 0], 0), &m(2000, 1100, &[500, 500], 0), 2);
        assert_eq!(u.per_vcpu_percent, vec![25.0, 25.0]);
        assert_eq!(u.total_percent, 25.0);
        assert_eq!(u.host_processor_percent, 55.0);
        assert_eq!(u.window_seconds, 2.0);
    }

    #[test]
    fn history_keeps_a_window_and_averages_memory_over_time() {
        let mut h = History::default();
        assert!(h.processor_use(1).is_none());
        h.push(m(0, 0, &[0], 100));
        h.push(m(500, 100, &[100], 100));
        assert!(
            h.processor_use(1).is_none(),
            "a window under 0.9 s is too short"
        );
        h.push(m(1000, 200, &[200], 300));
        assert_eq!(h.processor_use(1).unwrap().total_percent, 20.0);
        for t in 1..20 {
            h.push(m(1000 + t * 500, 200, &[200], 300));
        }
        let u = h.processor_use(1).unwrap();
        assert!(u.window_seconds <= 3.5, "{u:?}");
        assert_eq!(u.total_percent, 0.0);
        // 1 s at 100 MiB, 9.5 s at 300 MiB: (100 × 1000 + 300 × 9500) / 10500 = 280.95.
        assert_eq!(h.average_memory_mib(), Some(281));
        // An old sample arriving late is ignored.
        h.push(m(10, 0, &[0], 0));
        assert_eq!(h.latest().unwrap().at_unix_ms, 10_500);
    }

    #[test]
    fn measurement_averages_since_start() {
        let mut h = History::default();
        h.push(m(10_000, 4000, &[2000, 1000], 256));
        let r = measurement(Uuid::nil(), "web", 2, 0, &h).unwrap();
        assert_eq!(r.average_per_vcpu_percent, vec![20.0, 10.0]);
        assert_eq!(r.average_processor_percent, 15.0);
        assert_eq!(r.processor_seconds, 4.0);
        assert_eq!(r.memory_in_use_mib, 256);
    }

    #[test]
    fn prometheus_text_has_help_type_and_labelled_samples() {
        let meter = m(0, 1500, &[1000], 64);
        let text = prometheus(&[MetricsRow {
            id: Uuid::nil(),
            name: "we\"b",
            processor: vm_config::ProcessorSettings::with_count(1),
            meter: &meter,
        }]);
        assert!(
            text.contains("# TYPE viridian_vm_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains(r#"viridian_vm_cpu_seconds_total{vm="we\"b",id="00000000-0000-0000-0000-000000000000"} 1.5"#),
            "{text}"
        );
        assert!(text.contains(r#",vcpu="0"} 1"#), "{text}");
        assert!(text.contains("viridian_vm_memory_bytes{"), "{text}");
        assert!(text.contains("viridian_vm_processor_weight{"), "{text}");
    }

    #[test]
    fn prometheus_network_series_are_counters_labelled_by_adapter_and_guard() {
        let c = api::switches::AdapterCounters {
            received_bytes: 100,
            received_packets: 2,
            sent_bytes: 300,
            sent_packets: 4,
            dropped: api::switches::GuardDrops {
                mac_address_spoofing: 5,
                dhcp_guard: 6,
                router_guard: 0,
            },
        };
        let text = prometheus_network(&[NetworkRow {
            id: uuid::Uuid::nil(),
            name: "a",
            mac: "52:54:00:00:00:01",
            counters: &c,
        }]);
        let l = r#"vm="a",id="00000000-0000-0000-0000-000000000000",adapter="52:54:00:00:00:01""#;
        assert!(
            text.contains(&format!(
                "viridian_vm_network_sent_bytes_total{{{l}}} 300\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "viridian_vm_network_received_packets_total{{{l}}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "viridian_vm_network_dropped_packets_total{{{l},guard=\"dhcp_guard\"}} 6\n"
            )),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE viridian_vm_network_dropped_packets_total counter\n")
                .count(),
            1
        );
    }

    #[test]
    fn prometheus_disk_series_are_counters_labelled_by_drive_with_one_help_and_type() {
        let a = with_drives(m(0, 0, &[0], 0), vec![drive("IDE 0:0", 512, 0, 1)]);
        let b = with_drives(
            m(0, 0, &[0], 0),
            vec![drive("IDE 0:0", 0, 0, 0), drive("SCSI 0:1", 0, 4096, 1)],
        );
        let row = |name, meter| MetricsRow {
            id: Uuid::nil(),
            name,
            processor: vm_config::ProcessorSettings::with_count(1),
            meter,
        };
        let text = prometheus(&[row("a", &a), row("b", &b)]);
        assert_eq!(
            text.matches("# TYPE viridian_vm_disk_write_bytes_total counter\n")
                .count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("# HELP viridian_vm_disk_read_bytes_total ")
                .count(),
            1
        );
        assert!(text.contains(r#"viridian_vm_disk_read_bytes_total{vm="a",id="00000000-0000-0000-0000-000000000000",drive="IDE 0:0"} 512"#), "{text}");
        assert!(text.contains(r#"viridian_vm_disk_write_bytes_total{vm="b",id="00000000-0000-0000-0000-000000000000",drive="SCSI 0:1"} 4096"#), "{text}");
        for family in [
            "read_ops",
            "write_ops",
            "flush_ops",
            "discard_ops",
            "write_zeroes_ops",
        ] {
            let name = format!("viridian_vm_disk_{family}_total");
            assert_eq!(
                text.matches(&format!("\n{name}{{")).count(),
                3,
                "{name}: three drives in all\n{text}"
            );
        }
        // Every sample line is `name{labels} number`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.ends_with('}'), "{line}");
        }
    }
}
