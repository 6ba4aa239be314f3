//! What a NAT switch has beyond an internal one: its nftables table (masquerade,
//! forwarding), the host's IPv4 forwarding, and its supervised dnsmasq (DHCP and
//! DNS), with the lease, pid and log files beside the switch's settings:
//! `<data-dir>/switches/<id>.leases`, `<id>.dnsmasq.pid`, `<id>.dnsmasq.log`.
//!
//! IPv4 forwarding is one setting for the whole host: it is turned on when a NAT
//! switch needs it, and the file `ip_forward.viridian` records that it was us,
//! so it is turned off again only when we turned it on and the last NAT switch
//! goes; one the administrator turned on stays on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use api::switches::NatInfo;
use api::ErrorCode;
use uuid::Uuid;
use vswitch::dnsmasq::{self, Range, Supervisor};
use vswitch::nat::{self, Nft};
use vswitch::Cidr;

use crate::error::ApiError;

/// The programs a NAT switch needs, found on this host.
pub struct Tools {
    pub nft: Nft,
    pub dnsmasq: PathBuf,
}

/// Finds nft and dnsmasq, or says which package to install.
pub fn tools() -> Result<Tools, ApiError> {
    let missing = |e: nat::NatError| {
        ApiError::new(
            ErrorCode::InvalidState,
            format!("this host cannot serve NAT switches: {e}"),
        )
    };
    Ok(Tools {
        nft: Nft::locate().map_err(missing)?,
        dnsmasq: dnsmasq::locate().map_err(missing)?,
    })
}

/// A NAT switch's addresses, checked: its IPv4 subnet and DHCP range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub v4: Cidr,
    pub v6: Vec<Cidr>,
    pub range: Range,
}

/// Checks a NAT switch's host addresses (exactly one IPv4; IPv6 optional) and
/// its DHCP range (derived from the subnet unless given).
pub fn plan(addrs: &[Cidr], dhcp_range: Option<&str>) -> Result<Plan, ApiError> {
    let v4: Vec<Cidr> = addrs.iter().filter(|a| a.addr.is_ipv4()).copied().collect();
    let v4 = match v4.as_slice() {
        [one] => *one,
        [] => {
            return Err(ApiError::invalid(
                "a NAT switch needs an IPv4 host address (its subnet is the one masqueraded and served by DHCP), like --host-address 10.55.0.1/24",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "a NAT switch has one IPv4 host address (one subnet to masquerade and serve); give one, and IPv6 addresses besides if you like",
            ))
        }
    };
    if v4.prefix < 8 || v4.prefix > 30 {
        return Err(ApiError::invalid(format!(
            "the NAT subnet {} is /{}: give a NAT switch a subnet from /8 to /30 (10.55.0.1/24, say), one that leaves room for guests and takes in none of the host's other networks",
            v4.network(),
            v4.prefix
        )));
    }
    let range = match dhcp_range.filter(|r| !r.is_empty()) {
        Some(text) => dnsmasq::parse_range(text, &v4),
        None => dnsmasq::default_range(&v4),
    }
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Plan {
        v4,
        v6: addrs.iter().filter(|a| a.addr.is_ipv6()).copied().collect(),
        range,
    })
}

pub struct Nat {
    dir: PathBuf,
    servers: Mutex<HashMap<Uuid, Supervisor>>,
    /// Why a switch's services are not running, when they are not.
    problems: Mutex<HashMap<Uuid, String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn chain(e: &dyn std::error::Error) -> String {
    crate::vms::store::error_chain(e)
}

pub fn lease_file(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(format!("{id}.leases"))
}

fn pid_file(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(format!("{id}.dnsmasq.pid"))
}

fn log_file(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(format!("{id}.dnsmasq.log"))
}

fn marker(dir: &Path) -> PathBuf {
    dir.join("ip_forward.viridian")
}

/// A dnsmasq left by an earlier run of the service (its pid file names it and
/// its command line names that file) is stopped, so the new one can bind.
fn stop_leftover(pid_path: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_path)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    let ours = || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*pid_path.to_string_lossy()))
    };
    if !ours() {
        return;
    }
    tracing::info!(pid, "stopping a dnsmasq an earlier run of the service left");
    // SAFETY: kill(2) on a pid whose command line names our own pid file.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..100 {
        if !ours() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Nat {
    pub fn new(dir: PathBuf) -> Nat {
        Nat {
            dir,
            servers: Mutex::default(),
            problems: Mutex::default(),
        }
    }

    /// Turns IPv4 forwarding on if it is off, recording that we did.
    fn ensure_forwarding(&self) -> Result<(), String> {
        if nat::ip_forward().map_err(|e| chain(&e))? {
            return Ok(());
        }
        nat::set_ip_forward(true).map_err(|e| chain(&e))?;
        std::fs::create_dir_all(&self.dir)
            .and_then(|()| {
                std::fs::write(
                    marker(&self.dir),
                    "Viridian turned net.ipv4.ip_forward on for its NAT switches; it turns it off when the last one is deleted.\n",
                )
            })
            .map_err(|e| format!("cannot write {}: {e}", marker(&self.dir).display()))?;
        tracing::warn!("IPv4 forwarding (net.ipv4.ip_forward, a host-wide setting) was off; turned it on for NAT switches. Viridian turns it off again when its last NAT switch is deleted, and only then.");
        Ok(())
    }

    /// With no NAT switch left: forwarding off again, if we turned it on.
    pub fn release_forwarding(&self, nat_switches_left: usize) {
        if nat_switches_left > 0 || !marker(&self.dir).exists() {
            return;
        }
        match nat::set_ip_forward(false) {
            Ok(()) => {
                let _ = std::fs::remove_file(marker(&self.dir));
                tracing::warn!("the last NAT switch is gone: IPv4 forwarding (net.ipv4.ip_forward, host-wide), which Viridian had turned on, is off again");
            }
            Err(e) => tracing::error!("cannot turn IPv4 forwarding off again: {}", chain(&e)),
        }
    }

    /// Makes the switch's rules and services what `plan` says: its nft table,
    /// forwarding, and a dnsmasq with this configuration (restarted if it ran with
    /// another). On failure nothing of the new configuration is left running.
    pub fn apply(&self, tools: &Tools, id: Uuid, bridge: &str, plan: &Plan) -> Result<(), String> {
        let config = dnsmasq::Config {
            bridge: bridge.to_string(),
            host_v4: plan.v4,
            host_v6: plan.v6.clone(),
            range: plan.range,
            lease_file: lease_file(&self.dir, id),
            pid_file: pid_file(&self.dir, id),
            log_file: log_file(&self.dir, id),
        };
        let result: Result<(), String> = (|| {
            tools.nft.apply(bridge, &plan.v4).map_err(|e| chain(&e))?;
            self.ensure_forwarding()?;
            let running = lock(&self.servers).remove(&id);
            if let Some(old) = running {
                if old.config == config && old.pid() != 0 {
                    lock(&self.servers).insert(id, old);
                    return Ok(());
                }
                old.stop();
            }
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
            stop_leftover(&config.pid_file);
            let server = Supervisor::start(tools.dnsmasq.clone(), config).map_err(|e| chain(&e))?;
            lock(&self.servers).insert(id, server);
            Ok(())
        })();
        match &result {
            Ok(()) => {
                lock(&self.problems).remove(&id);
            }
            Err(e) => {
                lock(&self.problems).insert(id, e.clone());
            }
        }
        result
    }

    /// Stops the switch's dnsmasq and removes its nft table; with `files`, its
    /// lease, pid and log files too (the switch is going).
    pub fn remove(&self, nft: Option<&Nft>, id: Uuid, bridge: &str, files: bool) {
        let server = lock(&self.servers).remove(&id);
        if let Some(s) = server {
            s.stop();
        }
        lock(&self.problems).remove(&id);
        let table = nat::table_name(bridge);
        match nft.map(|n| n.remove(bridge)) {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::error!(switch = %id, "cannot remove the NAT rules of {bridge}: {}; remove them with `nft delete table ip {table}`", chain(&e))
            }
            None => {
                tracing::error!(switch = %id, "nft is not installed any more: the table ip {table} stays; remove it with `nft delete table ip {table}`")
            }
        }
        if files {
            for p in [
                lease_file(&self.dir, id),
                pid_file(&self.dir, id),
                log_file(&self.dir, id),
            ] {
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!("cannot remove {}: {e}", p.display())
                    }
                    _ => {}
                }
            }
        }
    }

    pub fn info(&self, id: Uuid, bridge: &str, plan: Result<Plan, ApiError>) -> NatInfo {
        let servers = lock(&self.servers);
        let server = servers.get(&id);
        let mut problem = lock(&self.problems).get(&id).cloned();
        let pid = server.map(Supervisor::pid).filter(|p| *p != 0);
        if pid.is_none() && problem.is_none() {
            problem = Some(match server.and_then(Supervisor::last_error) {
                Some(e) => format!("dnsmasq is not running: {e}; it is tried again"),
                None => "dnsmasq is not running (it is being restarted)".into(),
            });
        }
        let (subnet, range) = match &plan {
            Ok(p) => (p.v4.network(), p.range.to_string()),
            Err(e) => {
                problem.get_or_insert_with(|| e.message.clone());
                (String::new(), String::new())
            }
        };
        NatInfo {
            subnet,
            dhcp_range: range,
            domain: dnsmasq::DOMAIN.to_string(),
            host_name: dnsmasq::host_name(),
            nft_table: format!("ip {}", nat::table_name(bridge)),
            dnsmasq_pid: pid,
            dnsmasq_restarts: server.map_or(0, Supervisor::restarts),
            problem,
        }
    }

    /// The switch's IPv4 leases as dnsmasq recorded them.
    pub fn leases(&self, id: Uuid) -> Vec<dnsmasq::Lease> {
        std::fs::read_to_string(lease_file(&self.dir, id))
            .map(|t| dnsmasq::parse_leases(&t))
            .unwrap_or_default()
    }
}

/// The IPv4 and IPv6 addresses of a switch's settings.
pub fn addresses(texts: &[String]) -> Vec<Cidr> {
    texts.iter().filter_map(|a| a.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn a_nat_switch_needs_one_ipv4_address_and_a_range_inside_it() {
        let e = plan(&[c("fd00:55::1/64")], None).unwrap_err();
        assert!(
            e.message.contains("needs an IPv4 host address"),
            "{}",
            e.message
        );
        let e = plan(&[c("10.55.0.1/24"), c("10.56.0.1/24")], None).unwrap_err();
        assert!(e.message.contains("one IPv4 host address"), "{}", e.message);
        let p = plan(&[c("10.55.0.1/24"), c("fd00:55::1/64")], None).unwrap();
        assert_eq!(p.range.to_string(), "10.55.0.2-10.55.0.254");
        assert_eq!(p.v6, [c("fd00:55::1/64")]);
        for wide_or_narrow in ["0.0.0.1/0", "10.0.0.1/7", "10.0.0.1/31"] {
            let e = plan(&[c(wide_or_narrow)], None).unwrap_err();
            assert!(e.message.contains("from /8 to /30"), "{}", e.message);
        }
        let e = plan(&[c("10.55.0.1/24")], Some("10.9.0.2-10.9.0.9")).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParameter);
        assert!(e.message.contains("not inside"), "{}", e.message);
        let p = plan(&[c("10.55.0.1/24")], Some("")).unwrap();
        assert_eq!(p.range.to_string(), "10.55.0.2-10.55.0.254");
    }
}
