//! Printing: human tables by default, JSON with `--json`.

use api::jobs::Job;
use api::vms::{DriveMeasurement, DriveUse, Vm, VmMeasurement, VmSummary};
use serde::Serialize;

use crate::size::human;

pub fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode the answer as JSON: {e}"),
    }
}

pub fn vm_table(vms: &[VmSummary]) {
    println!(
        "{:<24} {:<9} {:>3} {:>4} {:>10}  ID",
        "NAME", "STATE", "GEN", "CPUS", "MEMORY"
    );
    for v in vms {
        let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<9} {:>3} {:>4} {:>10}  {}",
            v.name,
            format!("{:?}", v.state),
            opt(v.generation.map(|g| g.to_string())),
            opt(v.processor_count.map(|c| c.to_string())),
            opt(v.memory_mib.map(|m| human(m << 20))),
            v.id
        );
        if let Some(reason) = &v.damaged_reason {
            println!("    damaged: {reason}");
        }
    }
}

pub fn vm_details(vm: &Vm) {
    println!("{} ({})", vm.name, vm.id);
    if let Some(reason) = &vm.damaged_reason {
        println!("  DAMAGED: {reason}");
    }
    println!("Settings (what is configured):");
    match &vm.settings {
        None => println!("  (unreadable)"),
        Some(s) => {
            println!(
                "  generation:  {} (configuration version {})",
                s.generation, s.configuration_version
            );
            let p = &s.processor;
            println!(
                "  processors:  {} (reserve {} %, limit {} %, weight {})",
                p.count, p.reserve_percent, p.limit_percent, p.relative_weight
            );
            println!("  memory:      {}", human(s.memory.startup_mib << 20));
            for d in &s.drives {
                let what = match &d.media {
                    api::vm_config::DriveMedia::HardDisk { path } => format!("hard disk {path}"),
                    api::vm_config::DriveMedia::PassThrough { device } => {
                        format!("pass-through {device}")
                    }
                    api::vm_config::DriveMedia::Dvd { iso: Some(iso) } => format!("DVD {iso}"),
                    api::vm_config::DriveMedia::Dvd { iso: None } => "DVD (empty)".into(),
                };
                println!("  drive {:<10} {what}", d.slot.to_string());
            }
            for a in &s.network_adapters {
                let slot = a
                    .pci_slot
                    .map_or(String::new(), |slot| format!(" (PCI slot {slot})"));
                let switch = a
                    .switch
                    .as_deref()
                    .map_or(", not connected".into(), |sw| format!(", switch {sw}"));
                println!("  network:     {:?} {}{slot}{switch}", a.kind, a.mac);
                println!("               {}", crate::vm_cmd::adapter_options(a));
            }
            if !s.notes.is_empty() {
                println!("  notes:       {}", s.notes);
            }
        }
    }
    let r = &vm.runtime;
    println!("Runtime (what is running now):");
    println!("  state:       {:?}", r.state);
    if let Some(u) = r.uptime_seconds {
        println!("  uptime:      {u} s");
    }
    if let Some(p) = &r.processor {
        let per: Vec<String> = p
            .per_vcpu_percent
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect();
        println!(
            "  processor:   {:.1} % of its vCPUs (each: {} %; {:.1} % of a host CPU in all, last {:.1} s)",
            p.total_percent,
            per.join(" / "),
            p.host_processor_percent,
            p.window_seconds
        );
    } else if let Some(p) = r.processor_load_percent {
        println!("  cpu load:    {p} %");
    }
    if let Some(m) = r.memory_in_use_mib {
        println!("  memory used: {m} MiB");
    }
    for d in &r.drives {
        for line in drive_use(d) {
            println!("  {line}");
        }
    }
    for a in &r.network_adapters {
        match (&a.tap, &a.reason) {
            (Some(_), Some(reason)) if !a.connected => {
                println!("  network:     {} DISCONNECTED: {reason}", a.mac)
            }
            (Some(tap), _) => println!(
                "  network:     {} on switch {} (port {tap}, {})",
                a.mac,
                a.switch.as_deref().unwrap_or("?"),
                a.data_path.as_deref().unwrap_or("userspace")
            ),
            (None, Some(reason)) => println!("  network:     {} DISCONNECTED: {reason}", a.mac),
            (None, None) => println!("  network:     {} not connected", a.mac),
        }
        if let Some(c) = &a.counters {
            println!(
                "               received {} in {} frames, sent {} in {} frames",
                human(c.received_bytes),
                c.received_packets,
                human(c.sent_bytes),
                c.sent_packets
            );
            println!(
                "               dropped: {} by mac spoofing, {} by dhcp guard, {} by router guard",
                c.dropped.mac_address_spoofing, c.dropped.dhcp_guard, c.dropped.router_guard
            );
        }
    }
    if let Some(p) = &r.processor_settings {
        println!(
            "  in force:    reserve {} %, limit {} %, weight {}",
            p.reserve_percent, p.limit_percent, p.relative_weight
        );
    }
    if let Some(m) = r.memory_assigned_mib {
        println!("  memory:      {}", human(m << 20));
    }
    if let Some(reason) = &r.reason {
        println!("  reason:      {reason}");
    }
    for m in &vm.pending_merges {
        let pct = m
            .percent_complete
            .map(|p| format!(" {p} %"))
            .unwrap_or_default();
        println!(
            "  merge:       {:?}{pct} deleted checkpoint {:?} ({}): {}",
            m.state, m.name, m.id, m.reason
        );
    }
}

/// A byte rate, e.g. `1.5 MiB/s`.
fn rate(bytes_per_second: f64) -> String {
    format!("{}/s", human(bytes_per_second.round().max(0.0) as u64))
}

/// A running drive's live figures: rates over the window, then totals.
pub fn drive_use(d: &DriveUse) -> [String; 2] {
    let t = &d.totals;
    [
        format!(
            "drive {:<10} read {} ({:.1} ops/s), write {} ({:.1} ops/s), {:.1} flushes/s (last {:.1} s)  {}",
            d.drive,
            rate(d.read_bytes_per_second),
            d.read_ops_per_second,
            rate(d.write_bytes_per_second),
            d.write_ops_per_second,
            d.flush_ops_per_second,
            d.window_seconds,
            d.path
        ),
        format!(
            "{:<16} in all: {} read in {} ops, {} written in {} ops, {} flushes",
            "",
            human(t.read_bytes),
            t.read_ops,
            human(t.write_bytes),
            t.write_ops,
            t.flush_ops
        ),
    ]
}

/// A drive's averages since the VM started, then totals.
pub fn drive_measurement(d: &DriveMeasurement) -> [String; 2] {
    let t = &d.totals;
    [
        format!(
            "drive {:<10} read {} ({:.1} ops/s), write {} ({:.1} ops/s), {:.1} normalized IOPS on average  {}",
            d.drive,
            rate(d.average_read_bytes_per_second),
            d.average_read_ops_per_second,
            rate(d.average_write_bytes_per_second),
            d.average_write_ops_per_second,
            d.average_normalized_iops,
            d.path
        ),
        format!(
            "{:<16} in all: {} read in {} ops, {} written in {} ops, {} flushes",
            "",
            human(t.read_bytes),
            t.read_ops,
            human(t.write_bytes),
            t.write_ops,
            t.flush_ops
        ),
    ]
}

/// `viridian vm measure` in text.
pub fn measurement(m: &VmMeasurement) {
    println!("{} ({}), up {:.0} s", m.name, m.id, m.uptime_seconds);
    println!(
        "  processor:   {:.1} % of its {} vCPUs on average ({:.1} s of processor time)",
        m.average_processor_percent, m.processor_count, m.processor_seconds
    );
    for (i, p) in m.average_per_vcpu_percent.iter().enumerate() {
        println!("  vCPU {i}:      {p:.1} %");
    }
    println!(
        "  memory:      {} MiB on average, {} MiB now",
        m.average_memory_mib, m.memory_in_use_mib
    );
    println!(
        "  disks:       {} read, {} written, {:.1} normalized IOPS on average (8 KiB units)",
        human(m.disk_data_read_bytes),
        human(m.disk_data_written_bytes),
        m.average_normalized_iops
    );
    for d in &m.drives {
        for line in drive_measurement(d) {
            println!("  {line}");
        }
    }
    if !m.network_adapters.is_empty() {
        println!(
            "  network:     {} received, {} sent",
            human(m.network_received_bytes),
            human(m.network_sent_bytes)
        );
    }
    for a in &m.network_adapters {
        let c = &a.counters;
        println!(
            "  adapter {}: {} received, {} sent; dropped {} (mac spoofing), {} (dhcp guard), {} (router guard)",
            a.mac,
            human(c.received_bytes),
            human(c.sent_bytes),
            c.dropped.mac_address_spoofing,
            c.dropped.dhcp_guard,
            c.dropped.router_guard
        );
    }
}

pub fn job_table(jobs: &[Job]) {
    println!(
        "{:<36}  {:<12} {:<14} {:>4}  DESCRIPTION",
        "ID", "TYPE", "STATE", "%"
    );
    for j in jobs {
        println!(
            "{:<36}  {:<12} {:<14} {:>4}  {}",
            j.id,
            j.job_type,
            format!("{:?}({})", j.state, j.state_number),
            j.percent_complete,
            j.description
        );
    }
}

pub fn job_details(j: &Job) {
    println!("job {} ({})", j.id, j.job_type);
    println!("  {}", j.description);
    println!("  state:       {:?} ({})", j.state, j.state_number);
    println!("  percent:     {}", j.percent_complete);
    println!("  cancellable: {}", j.cancellable);
    println!("  created:     {}", j.created);
    if let Some(t) = &j.started {
        println!("  started:     {t}");
    }
    if let Some(t) = &j.finished {
        println!("  finished:    {t}");
    }
    if let Some(c) = &j.error_code {
        println!(
            "  error:       {c}: {}",
            j.error_description.as_deref().unwrap_or("")
        );
    }
    for a in &j.affected_elements {
        println!("  affected:    {} {}", a.kind, a.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::vms::DriveIoTotals;

    #[test]
    fn drive_lines_show_rates_in_units_and_totals() {
        let d = DriveUse {
            drive: "SCSI 0:1".into(),
            path: "/vms/a/data.vhdx".into(),
            read_bytes_per_second: 0.0,
            write_bytes_per_second: 1572864.0,
            read_ops_per_second: 0.0,
            write_ops_per_second: 24.0,
            flush_ops_per_second: 0.5,
            window_seconds: 3.0,
            totals: DriveIoTotals {
                write_bytes: 5 << 20,
                write_ops: 80,
                flush_ops: 2,
                ..Default::default()
            },
        };
        let [live, total] = drive_use(&d);
        assert!(live.starts_with("drive SCSI 0:1"), "{live}");
        assert!(live.contains("write 1.5 MiB/s (24.0 ops/s)"), "{live}");
        assert!(live.contains("read 0 B/s (0.0 ops/s)"), "{live}");
        assert!(live.ends_with("/vms/a/data.vhdx"), "{live}");
        assert!(
            total.contains("0 B read in 0 ops, 5 MiB written in 80 ops, 2 flushes"),
            "{total}"
        );
    }
}
