//! Admission control: running VMs' processor reserves (count × reserve %) and memory
//! must fit the host's capacity, as Hyper-V refuses a start that cannot get its
//! reserve. Pure arithmetic here; the service sums the running VMs.

use api::host::HostResources;
use api::ErrorCode;
use vm_config::VmSettings;

use crate::error::ApiError;

/// What admission control counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub logical_processors: u32,
    pub host_reserve_percent: u32,
    pub memory_total_mib: u64,
    pub memory_headroom_mib: u64,
}

/// What a VM holds while it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// count × reserve %, in % of one logical processor.
    pub processor_percent: u64,
    pub memory_mib: u64,
}

impl Demand {
    pub fn of(s: &VmSettings) -> Demand {
        Demand {
            processor_percent: u64::from(s.processor.count)
                * u64::from(s.processor.reserve_percent),
            memory_mib: s.memory.startup_mib,
        }
    }
}

impl std::ops::Add for Demand {
    type Output = Demand;

    fn add(self, other: Demand) -> Demand {
        Demand {
            processor_percent: self.processor_percent + other.processor_percent,
            memory_mib: self.memory_mib + other.memory_mib,
        }
    }
}

impl Capacity {
    pub fn processor_percent(&self) -> u64 {
        (u64::from(self.logical_processors) * 100)
            .saturating_sub(u64::from(self.host_reserve_percent))
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_total_mib
            .saturating_sub(self.memory_headroom_mib)
    }

    pub fn report(&self, running: Demand) -> HostResources {
        HostResources {
            logical_processors: self.logical_processors,
            host_reserve_percent: self.host_reserve_percent,
            processor_capacity_percent: self.processor_percent(),
            processor_reserved_percent: running.processor_percent,
            memory_total_mib: self.memory_total_mib,
            memory_headroom_mib: self.memory_headroom_mib,
            memory_capacity_mib: self.memory_mib(),
            memory_assigned_mib: running.memory_mib,
        }
    }

    /// Whether VM `name` needing `new` fits beside the running VMs' `running`;
    /// `what` says what is being done ("start VM web01").
    pub fn admit(&self, what: &str, running: Demand, new: Demand) -> Result<(), ApiError> {
        let details = || {
            serde_json::json!({
                "requested_processor_percent": new.processor_percent,
                "reserved_processor_percent": running.processor_percent,
                "processor_capacity_percent": self.processor_percent(),
                "logical_processors": self.logical_processors,
                "host_reserve_percent": self.host_reserve_percent,
                "requested_memory_mib": new.memory_mib,
                "assigned_memory_mib": running.memory_mib,
                "memory_capacity_mib": self.memory_mib(),
            })
        };
        let cpu_total = running.processor_percent + new.processor_percent;
        if cpu_total > self.processor_percent() {
            return Err(ApiError::new(
                ErrorCode::InsufficientResources,
                format!(
                    "cannot {what}: its processor reserve of {} % (count × reserve) on top of the {} % \
                     running VMs reserve makes {cpu_total} %, more than the host's {} % \
                     ({} logical processors × 100 % − {} % host reserve); lower its reserve or \
                     stop another VM",
                    new.processor_percent,
                    running.processor_percent,
                    self.processor_percent(),
                    self.logical_processors,
                    self.host_reserve_percent
                ),
            )
            .with_details(details()));
        }
        let mem_total = running.memory_mib + new.memory_mib;
        if mem_total > self.memory_mib() {
            return Err(ApiError::new(
                ErrorCode::InsufficientResources,
                format!(
                    "cannot {what}: its {} MiB of memory on top of the {} MiB running VMs hold makes \
                     {mem_total} MiB, more than the {} MiB the host can give ({} MiB − {} MiB \
                     headroom); give it less memory or stop another VM",
                    new.memory_mib,
                    running.memory_mib,
                    self.memory_mib(),
                    self.memory_total_mib,
                    self.memory_headroom_mib
                ),
            )
            .with_details(details()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capacity {
        Capacity {
            logical_processors: 2,
            host_reserve_percent: 0,
            memory_total_mib: 4096,
            memory_headroom_mib: 1024,
        }
    }

    fn d(cpu: u64, mem: u64) -> Demand {
        Demand {
            processor_percent: cpu,
            memory_mib: mem,
        }
    }

    #[test]
    fn reserve_of_fifty_percent_admits_four_single_vcpu_vms_on_two_cpus() {
        let c = cap();
        let mut running = Demand::default();
        for _ in 0..4 {
            c.admit("start VM x", running, d(50, 64)).unwrap();
            running = running + d(50, 64);
        }
        let e = c.admit("start VM fifth", running, d(50, 64)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientResources);
        assert!(
            e.message.contains("250 %") && e.message.contains("200 %"),
            "{}",
            e.message
        );
        assert_eq!(e.details.unwrap()["processor_capacity_percent"], 200);
    }

    #[test]
    fn host_reserve_and_memory_headroom_shrink_the_capacity() {
        let c = Capacity {
            host_reserve_percent: 50,
            ..cap()
        };
        assert!(c.admit("x", d(100, 0), d(60, 0)).is_err());
        c.admit("x", d(100, 0), d(50, 0)).unwrap();
        let e = c.admit("start VM big", d(0, 2048), d(0, 1025)).unwrap_err();
        assert!(
            e.message.contains("3073 MiB") && e.message.contains("3072 MiB"),
            "{}",
            e.message
        );
        c.admit("x", d(0, 2048), d(0, 1024)).unwrap();
    }
}
