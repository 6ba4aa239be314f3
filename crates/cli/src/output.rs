//! Printing: human tables by default, JSON with `--json`.

use api::jobs::Job;
use api::vms::{Vm, VmSummary};
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
            println!("  generation:  {}", s.generation);
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
                match a.pci_slot {
                    Some(slot) => {
                        println!("  network:     {:?} {} (PCI slot {slot})", a.kind, a.mac)
                    }
                    None => println!("  network:     {:?} {}", a.kind, a.mac),
                }
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
