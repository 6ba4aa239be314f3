//! Per-VM control groups for processor reserve, limit and weight.
//!
//! Each running VM's worker and QEMU live in one cgroup: `viridian.slice/vm-<id>` on
//! cgroup v2, `<cpu mount>/viridian/vm-<id>` (and the same under `cpuacct` when that
//! controller is mounted apart) on v1. The daemon detects the hierarchy
//! ([`Hierarchy::detect`]) and hands it to the worker, which creates the group, moves
//! itself into it before it starts QEMU (so QEMU and all its threads follow), sets the
//! cap and weight, and removes the group when the VM ends.
//!
//! The file formats are in [`format`]; every operation here takes the hierarchy's
//! paths from [`Hierarchy`], so tests run them against a fake directory tree.

pub mod format;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the VMs' groups go below the hierarchy's root.
pub const PARENT_V1: &str = "viridian";
pub const PARENT_V2: &str = "viridian.slice";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds something that is not understood: {text:?}", path.display())]
    Format { path: PathBuf, text: String },
    #[error("no cgroup hierarchy with the cpu controller is mounted: {0}")]
    NoCpuController(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup hierarchy that controls processor time on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "version", rename_all = "snake_case")]
pub enum Hierarchy {
    /// cgroup v1: the `cpu` controller's mount (quota, shares) and the `cpuacct`
    /// controller's (usage); often the same directory (`cpu,cpuacct`).
    V1 { cpu: PathBuf, cpuacct: PathBuf },
    /// cgroup v2: the unified hierarchy's mount, whose root offers `cpu`.
    V2 { root: PathBuf },
}

/// What a VM's group is set to: its processor count, limit and weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuControl {
    pub count: u32,
    /// 0–100 % of one logical processor per virtual processor.
    pub limit_percent: u8,
    /// 1–10000, default 100.
    pub weight: u32,
}

/// What a group's files say now (read back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSettingsRead {
    pub quota_us: Option<u64>,
    pub period_us: u64,
    /// `cpu.weight` (v2) or `cpu.shares` (v1), as the file holds it.
    pub weight_or_shares: u64,
}

impl Hierarchy {
    /// Finds the hierarchy with the `cpu` controller from `/proc/self/mountinfo`:
    /// v2 when a cgroup2 mount offers `cpu`, else v1's `cpu` mount.
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(io("read", path))?;
        Self::detect_in(&text, |p| std::fs::read_to_string(p).ok())
    }

    /// [`Hierarchy::detect`] on given mountinfo text; `read` reads a file (a v2
    /// mount's `cgroup.controllers`).
    pub fn detect_in(
        mountinfo: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Result<Hierarchy, CgroupError> {
        let mut v1_cpu = None;
        let mut v1_acct = None;
        let mut v2_without_cpu = Vec::new();
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(dash) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(mount_point), Some(fstype), Some(options)) =
                (fields.get(4), fields.get(dash + 1), fields.get(dash + 3))
            else {
                continue;
            };
            let mount_point = PathBuf::from(unescape(mount_point));
            match *fstype {
                "cgroup2" => {
                    let controllers = read(&mount_point.join("cgroup.controllers"));
                    if controllers.is_some_and(|c| c.split_whitespace().any(|c| c == "cpu")) {
                        return Ok(Hierarchy::V2 { root: mount_point });
                    }
                    v2_without_cpu.push(mount_point);
                }
                "cgroup" => {
                    let opts: Vec<&str> = options.split(',').collect();
                    if opts.contains(&"cpu") && v1_cpu.is_none() {
                        v1_cpu = Some(mount_point.clone());
                    }
                    if opts.contains(&"cpuacct") && v1_acct.is_none() {
                        v1_acct = Some(mount_point);
                    }
                }
                _ => {}
            }
        }
        match (v1_cpu, v1_acct) {
            (Some(cpu), Some(cpuacct)) => Ok(Hierarchy::V1 { cpu, cpuacct }),
            (cpu, acct) => Err(CgroupError::NoCpuController(format!(
                "cgroup2 mounts without cpu: {:?}; v1 cpu mount: {:?}; v1 cpuacct mount: {:?}",
                v2_without_cpu, cpu, acct
            ))),
        }
    }

    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V1 { .. } => 1,
            Hierarchy::V2 { .. } => 2,
        }
    }

    /// A short description for `viridian host`.
    pub fn describe(&self) -> String {
        match self {
            Hierarchy::V1 { cpu, cpuacct } if cpu == cpuacct => {
                format!("cgroup v1 (cpu,cpuacct at {})", cpu.display())
            }
            Hierarchy::V1 { cpu, cpuacct } => format!(
                "cgroup v1 (cpu at {}, cpuacct at {})",
                cpu.display(),
                cpuacct.display()
            ),
            Hierarchy::V2 { root } => format!("cgroup v2 (at {})", root.display()),
        }
    }

    /// The group of VM `id`.
    pub fn vm_group(&self, id: &str) -> Group {
        let parent = match self {
            Hierarchy::V1 { .. } => PARENT_V1,
            Hierarchy::V2 { .. } => PARENT_V2,
        };
        Group {
            hierarchy: self.clone(),
            rel: Path::new(parent).join(format!("vm-{id}")),
        }
    }
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// One VM's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    hierarchy: Hierarchy,
    /// Below the hierarchy's root (each v1 controller's mount).
    rel: PathBuf,
}

impl Group {
    /// The group's directory (v1: in the `cpu` controller's mount).
    pub fn path(&self) -> PathBuf {
        match &self.hierarchy {
            Hierarchy::V1 { cpu, .. } => cpu.join(&self.rel),
            Hierarchy::V2 { root } => root.join(&self.rel),
        }
    }

    /// Every directory that makes up the group (two on v1 with split mounts).
    fn dirs(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V1 { cpu, cpuacct } if cpu != cpuacct => {
                vec![cpu.join(&self.rel), cpuacct.join(&self.rel)]
            }
            _ => vec![self.path()],
        }
    }

    fn roots(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V1 { cpu, cpuacct } if cpu != cpuacct => vec![cpu.clone(), cpuacct.clone()],
            Hierarchy::V1 { cpu, .. } => vec![cpu.clone()],
            Hierarchy::V2 { root } => vec![root.clone()],
        }
    }

    /// Creates the group (and its parent); on v2 also enables the `cpu` controller
    /// for the parent's and the root's children. An existing group is reused.
    pub fn create(&self) -> Result<(), CgroupError> {
        if let Hierarchy::V2 { root } = &self.hierarchy {
            enable_cpu(root)?;
            let parent = self.path().parent().map(Path::to_path_buf);
            if let Some(parent) = parent {
                mkdir(&parent)?;
                enable_cpu(&parent)?;
            }
        }
        for dir in self.dirs() {
            if let Some(parent) = dir.parent() {
                mkdir(parent)?;
            }
            mkdir(&dir)?;
        }
        Ok(())
    }

    pub fn exists(&self) -> bool {
        self.path().is_dir()
    }

    /// Moves process `pid` (all its threads) into the group; its children follow.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Moves process `pid` back to the hierarchy's root (before the group is removed).
    pub fn release_process(&self, pid: u32) -> Result<(), CgroupError> {
        for root in self.roots() {
            write(&root.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the group.
    pub fn processes(&self) -> Result<Vec<u32>, CgroupError> {
        let path = self.path().join("cgroup.procs");
        let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Sets the cap (count × limit % of one CPU) and the weight.
    pub fn set_cpu(&self, c: CpuControl) -> Result<(), CgroupError> {
        let period = format::PERIOD_US;
        let quota = format::quota_us(c.count, c.limit_percent, period);
        let dir = self.path();
        match &self.hierarchy {
            Hierarchy::V2 { .. } => {
                write(&dir.join("cpu.max"), &format::cpu_max(quota, period))?;
                write(
                    &dir.join("cpu.weight"),
                    &format::cpu_weight(c.weight).to_string(),
                )?;
            }
            Hierarchy::V1 { .. } => {
                // The period first: the kernel checks quota against it.
                write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &format::cfs_quota(quota))?;
                write(
                    &dir.join("cpu.shares"),
                    &format::cpu_shares(c.weight).to_string(),
                )?;
            }
        }
        Ok(())
    }

    /// Reads back the cap and weight.
    pub fn read_cpu(&self) -> Result<CpuSettingsRead, CgroupError> {
        let dir = self.path();
        match &self.hierarchy {
            Hierarchy::V2 { .. } => {
                let (max_path, text) = read(&dir.join("cpu.max"))?;
                let (quota_us, period_us) =
                    format::parse_cpu_max(&text).ok_or_else(|| bad(&max_path, &text))?;
                Ok(CpuSettingsRead {
                    quota_us,
                    period_us,
                    weight_or_shares: read_number(&dir.join("cpu.weight"))?,
                })
            }
            Hierarchy::V1 { .. } => {
                let (q_path, text) = read(&dir.join("cpu.cfs_quota_us"))?;
                let quota_us = format::parse_cfs_quota(&text).ok_or_else(|| bad(&q_path, &text))?;
                Ok(CpuSettingsRead {
                    quota_us,
                    period_us: read_number(&dir.join("cpu.cfs_period_us"))?,
                    weight_or_shares: read_number(&dir.join("cpu.shares"))?,
                })
            }
        }
    }

    /// Processor time used by everything that ran in the group.
    pub fn usage(&self) -> Result<Duration, CgroupError> {
        match &self.hierarchy {
            Hierarchy::V2 { .. } => {
                let (path, text) = read(&self.path().join("cpu.stat"))?;
                let usec = format::parse_usage_usec(&text).ok_or_else(|| bad(&path, &text))?;
                Ok(Duration::from_micros(usec))
            }
            Hierarchy::V1 { cpuacct, .. } => {
                let ns = read_number(&cpuacct.join(&self.rel).join("cpuacct.usage"))?;
                Ok(Duration::from_nanos(ns))
            }
        }
    }

    /// Removes the group; it must hold no process. A group already gone is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &dir)(e)),
            }
        }
        Ok(())
    }
}

fn bad(path: &Path, text: &str) -> CgroupError {
    CgroupError::Format {
        path: path.to_path_buf(),
        text: text.to_string(),
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("create", dir)(e)),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("write", path))
}

fn read(path: &Path) -> Result<(PathBuf, String), CgroupError> {
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    Ok((path.to_path_buf(), text))
}

fn read_number(path: &Path) -> Result<u64, CgroupError> {
    let (path, text) = read(path)?;
    format::parse_number(&text).ok_or_else(|| bad(&path, &text))
}

/// Enables the `cpu` controller for `dir`'s children (v2), unless it already is.
fn enable_cpu(dir: &Path) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    let current = std::fs::read_to_string(&control).unwrap_or_default();
    if current.split_whitespace().any(|c| c == "cpu") {
        return Ok(());
    }
    write(&control, "+cpu")
}

#[cfg(test)]
mod tests;
