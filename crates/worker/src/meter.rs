//! Live metering of a running VM: processor time of the VM's cgroup and of each vCPU
//! thread, the memory QEMU holds, and each drive's I/O as its server (NBD for IDE,
//! vhost-user-blk for SCSI) counted it. Raw counters; the daemon turns two samples into
//! rates (Hyper-V's live objects) and one sample plus the uptime into averages
//! (Measure-VM).

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use drive_counters::DriveIo;

/// One sample of a VM's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// When the sample was taken, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Processor time of everything in the VM's cgroup (worker, QEMU and its threads),
    /// or of QEMU alone when the VM runs without a cgroup; nanoseconds.
    pub cpu_ns: u64,
    /// Processor time of each vCPU thread (in vCPU index order), nanoseconds.
    pub vcpu_ns: Vec<u64>,
    /// QEMU's resident memory (guest memory it touched plus its own), bytes.
    pub memory_bytes: u64,
    /// Each served drive's I/O totals since the worker started serving it, in slot
    /// order. Absent from the samples of workers older than disk metering.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveMeter>,
}

/// One drive's I/O totals in a sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveMeter {
    /// The drive's slot as shown to users, e.g. `SCSI 0:1` or `IDE 0:0`.
    pub drive: String,
    /// The image file the drive serves.
    pub path: String,
    #[serde(flatten)]
    pub io: drive_counters::DriveIo,
}

/// A served drive and its server's live counters, read at each sample.
#[derive(Debug, Clone)]
pub struct MeteredDrive {
    pub drive: String,
    pub path: String,
    pub counters: Arc<drive_counters::DriveCounters>,
}

impl MeteredDrive {
    pub fn sample(&self) -> DriveMeter {
        DriveMeter {
            drive: self.drive.clone(),
            path: self.path.clone(),
            io: self.counters.snapshot(),
        }
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The first field of `/proc/PID/task/TID/schedstat`: time on a CPU, nanoseconds.
pub fn thread_cpu_ns(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    parse_schedstat(&text)
}

pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// utime + stime of process `pid` from `/proc/PID/stat`, nanoseconds.
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no memory effects; _SC_CLK_TCK is a valid name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    parse_stat_cpu_ticks(&text).map(|t| t * 1_000_000_000 / ticks)
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    // The command name is in parentheses and may hold spaces: count after its end.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of process `pid`, bytes.
pub fn process_rss_bytes(pid: u32) -> Option<u64> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    parse_vm_rss(&text)
}

pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_found_after_a_command_name_with_spaces_and_parens() {
        let line =
            "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 5 0 1 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(300));
    }

    #[test]
    fn schedstat_and_rss_parse() {
        assert_eq!(parse_schedstat("123456789 1000 42\n"), Some(123_456_789));
        assert_eq!(
            parse_vm_rss("Name:\tqemu\nVmRSS:\t  204800 kB\nThreads: 5\n"),
            Some(204_800 * 1024)
        );
    }

    #[test]
    fn drives_travel_flat_in_the_sample_and_old_samples_have_none() {
        let counters = Arc::new(drive_counters::DriveCounters::new());
        counters.write(4096);
        let d = MeteredDrive {
            drive: "SCSI 0:1".into(),
            path: "/vms/a/data.vhdx".into(),
            counters,
        };
        let m = Meter {
            at_unix_ms: 1,
            cpu_ns: 2,
            vcpu_ns: vec![3],
            memory_bytes: 4,
            drives: vec![d.sample()],
        };
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["drives"][0]["drive"], "SCSI 0:1");
        assert_eq!(json["drives"][0]["write_bytes"], 4096);
        assert_eq!(json["drives"][0]["write_ops"], 1);
        assert_eq!(serde_json::from_value::<Meter>(json).unwrap(), m);
        let old = r#"{"at_unix_ms":1,"cpu_ns":2,"vcpu_ns":[3],"memory_bytes":4}"#;
        assert!(serde_json::from_str::<Meter>(old)
            .unwrap()
            .drives
            .is_empty());
    }

    #[test]
    fn this_process_is_metered() {
        let pid = std::process::id();
        assert!(process_rss_bytes(pid).unwrap() > 0);
        assert!(process_cpu_ns(pid).is_some());
        assert!(thread_cpu_ns(pid, pid).is_some());
    }
}
