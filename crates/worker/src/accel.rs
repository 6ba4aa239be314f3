//! Choosing the accelerator: KVM where the host really has hardware virtualization,
//! TCG otherwise, with the reason in words.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::qemu::Accel;

/// What the host administrator asked for (`--accel auto|kvm|tcg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerator in use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// What the host offers, found by [`probe_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVirtualization {
    /// The CPU flag (`vmx` or `svm`), if any.
    pub cpu_flag: Option<&'static str>,
    /// Whether `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// Result of running a probe VM under KVM: `Ok` or the failure in words.
    /// `None` when no probe was run (no CPU flag or no /dev/kvm).
    pub probe: Option<Result<(), String>>,
}

/// Decides from what the host offers and what was asked.
pub fn decide(choice: AccelChoice, host: &HostVirtualization) -> Result<AccelDecision, String> {
    let kvm_usable = match (host.cpu_flag, host.dev_kvm, &host.probe) {
        (None, _, _) => Err(
            "the CPU flags have neither vmx nor svm, so there is no hardware virtualization"
                .to_string(),
        ),
        (Some(_), false, _) => Err("/dev/kvm does not exist (is the kvm module loaded?)".into()),
        (Some(flag), true, Some(Ok(()))) => Ok(format!(
            "the CPU has {flag}, /dev/kvm exists and a probe VM ran under KVM"
        )),
        (Some(flag), true, Some(Err(e))) => Err(format!(
            "the CPU has {flag} and /dev/kvm exists, but a probe VM failed under KVM: {e}"
        )),
        (Some(_), true, None) => Err("no probe VM was run under KVM".into()),
    };
    match (choice, kvm_usable) {
        (AccelChoice::Auto, Ok(why)) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: format!("KVM: {why}"),
        }),
        (AccelChoice::Auto, Err(why)) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: format!("TCG (software emulation, slow): {why}"),
        }),
        (AccelChoice::Kvm, Ok(why)) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: format!("KVM, as configured (--accel kvm): {why}"),
        }),
        (AccelChoice::Kvm, Err(why)) => Err(format!(
            "KVM was asked for (--accel kvm) but cannot be used: {why}. Use --accel auto or tcg"
        )),
        (AccelChoice::Tcg, _) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: "TCG, as configured (--accel tcg)".into(),
        }),
    }
}

/// Reads the host's CPU flags and `/dev/kvm`, and runs a probe VM under KVM when
/// both suggest it could work.
pub fn probe_host(qemu: &Path) -> HostVirtualization {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_flag = cpu_virt_flag(&cpuinfo);
    let dev_kvm = Path::new("/dev/kvm").exists();
    let probe = if cpu_flag.is_some() && dev_kvm {
        Some(run_kvm_probe(qemu))
    } else {
        None
    };
    HostVirtualization {
        cpu_flag,
        dev_kvm,
        probe,
    }
}

/// `vmx` or `svm` if the `flags` line of /proc/cpuinfo has one.
pub fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))?
        .split(':')
        .nth(1)?;
    flags.split_whitespace().find_map(|f| match f {
        "vmx" => Some("vmx"),
        "svm" => Some("svm"),
        _ => None,
    })
}

/// Runs a tiny VM under KVM for about a second: it must start and keep running
/// (a host with a broken nested setup fails at the first guest entry).
fn run_kvm_probe(qemu: &Path) -> Result<(), String> {
    let mut child = Command::new(qemu)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            "kvm",
            "-m",
            "16",
            "-machine",
            "pc",
            "-no-reboot",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    use std::io::Read;
                    let _ = stderr.read_to_string(&mut err);
                }
                return Err(format!(
                    "QEMU exited with {status}: {}",
                    err.trim().lines().last().unwrap_or("no message")
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("cannot wait for the probe VM: {e}")),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(
        cpu_flag: Option<&'static str>,
        dev_kvm: bool,
        probe: Option<Result<(), String>>,
    ) -> HostVirtualization {
        HostVirtualization {
            cpu_flag,
            dev_kvm,
            probe,
        }
    }

    #[test]
    fn no_vmx_or_svm_means_tcg_even_with_dev_kvm() {
        let d = decide(AccelChoice::Auto, &host(None, true, None)).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("neither vmx nor svm"), "{}", d.reason);
    }

    #[test]
    fn vmx_and_a_running_probe_means_kvm() {
        let d = decide(AccelChoice::Auto, &host(Some("vmx"), true, Some(Ok(())))).unwrap();
        assert_eq!(d.accel, Accel::Kvm);
        assert!(d.reason.contains("probe VM ran"), "{}", d.reason);
    }

    #[test]
    fn failing_probe_means_tcg_with_the_failure_in_the_reason() {
        let h = host(Some("svm"), true, Some(Err("KVM: entry failed".into())));
        let d = decide(AccelChoice::Auto, &h).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("KVM: entry failed"), "{}", d.reason);
    }

    #[test]
    fn forced_kvm_without_hardware_is_an_error_and_forced_tcg_always_works() {
        let err = decide(AccelChoice::Kvm, &host(None, true, None)).unwrap_err();
        assert!(err.contains("--accel kvm"), "{err}");
        let d = decide(AccelChoice::Tcg, &host(Some("vmx"), true, Some(Ok(())))).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
    }

    #[test]
    fn cpu_flags_are_read_from_the_flags_line() {
        let info = "processor\t: 0\nflags\t\t: fpu vme de pse svm sse\nbugs\t\t: vmx\n";
        assert_eq!(cpu_virt_flag(info), Some("svm"));
        assert_eq!(cpu_virt_flag("flags\t: fpu sse\n"), None);
    }

    #[test]
    fn this_host_comes_out_as_tcg_without_settings() {
        // This host family has /dev/kvm but no vmx/svm underneath (DESIGN.md).
        let h = probe_host(Path::new("qemu-system-x86_64"));
        let d = decide(AccelChoice::Auto, &h).unwrap();
        if h.cpu_flag.is_none() {
            assert_eq!(d.accel, Accel::Tcg, "{}", d.reason);
        }
    }
}
