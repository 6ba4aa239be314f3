//! DHCP and DNS for a NAT switch: one dnsmasq per switch, bound to its bridge
//! only, reading no configuration of the host's (`--conf-file=/dev/null`), its
//! lease and pid files where the caller says. [`Supervisor`] keeps it running:
//! restarted when it dies, with a growing pause between tries, each logged.
//!
//! The pure parts (the DHCP range, the command line, the lease file) are apart
//! from the process work and tested on their own.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Cidr;

/// The DNS domain of every NAT switch: guests are `NAME.viridian.internal` (and
/// `NAME`), the host `host.viridian.internal`. (`.internal` is reserved for
/// private use: it never reaches the internet's DNS.)
pub const DOMAIN: &str = "viridian.internal";

/// The host's name on a NAT switch's DNS.
pub fn host_name() -> String {
    format!("host.{DOMAIN}")
}

/// Why a DHCP range or the server cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("`{0}` is not a DHCP range; write it as START-END, like 10.55.0.100-10.55.0.200")]
    Syntax(String),
    #[error("the DHCP range {range} is not inside the switch's subnet {subnet} (its addresses are {first} to {last})")]
    Outside {
        range: String,
        subnet: String,
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
    #[error("the DHCP range {0} starts after it ends")]
    Backwards(String),
    #[error("the DHCP range {range} holds the host's own address {host}; start it after or end it before that")]
    HoldsHost { range: String, host: Ipv4Addr },
    #[error("the subnet {0} has no addresses to hand out besides the host's; give the host a prefix of /30 or shorter")]
    TooSmall(String),
    #[error("cannot start dnsmasq ({binary})")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dnsmasq for {bridge} exited at once ({status}): {log}")]
    Exited {
        bridge: String,
        status: String,
        log: String,
    },
    #[error("dnsmasq for {bridge} did not write its pid file {pid_file} within 5 s")]
    NotReady { bridge: String, pid_file: String },
}

/// An inclusive range of IPv4 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// The first and last host addresses of `host`'s IPv4 subnet, and the host's.
fn hosts_of(host: &Cidr) -> Option<(u32, u32, u32)> {
    let IpAddr::V4(a) = host.addr else {
        return None;
    };
    let bits = u32::from(a);
    let mask = u32::MAX
        .checked_shl(32 - u32::from(host.prefix.min(32)))
        .unwrap_or(0);
    let net = bits & mask;
    let broadcast = net | !mask;
    if broadcast - net < 2 {
        return None;
    }
    Some((net + 1, broadcast - 1, bits))
}

/// The range handed out when none is given: the larger side of the subnet's host
/// addresses around the host's own (`10.55.0.1/24` -> `10.55.0.2-10.55.0.254`).
pub fn default_range(host: &Cidr) -> Result<Range, DhcpError> {
    let (first, last, me) = hosts_of(host).ok_or_else(|| DhcpError::TooSmall(host.network()))?;
    let below = me.saturating_sub(first);
    let above = last.saturating_sub(me);
    let (start, end) = if above >= below {
        (me + 1, last)
    } else {
        (first, me - 1)
    };
    if start > end || (start..=end).contains(&me) {
        return Err(DhcpError::TooSmall(host.network()));
    }
    Ok(Range {
        start: start.into(),
        end: end.into(),
    })
}

/// Checks a range given as `START-END` against the host's subnet.
pub fn parse_range(text: &str, host: &Cidr) -> Result<Range, DhcpError> {
    let syntax = || DhcpError::Syntax(text.to_string());
    let (a, b) = text.split_once('-').ok_or_else(syntax)?;
    let start: Ipv4Addr = a.trim().parse().map_err(|_| syntax())?;
    let end: Ipv4Addr = b.trim().parse().map_err(|_| syntax())?;
    let range = Range { start, end };
    let (first, last, me) = hosts_of(host).ok_or_else(|| DhcpError::TooSmall(host.network()))?;
    let (s, e) = (u32::from(start), u32::from(end));
    if s < first || e > last || s > last || e < first {
        return Err(DhcpError::Outside {
            range: range.to_string(),
            subnet: host.network(),
            first: first.into(),
            last: last.into(),
        });
    }
    if s > e {
        return Err(DhcpError::Backwards(range.to_string()));
    }
    if (s..=e).contains(&me) {
        return Err(DhcpError::HoldsHost {
            range: range.to_string(),
            host: me.into(),
        });
    }
    Ok(range)
}

/// What one switch's dnsmasq serves, and where its files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub bridge: String,
    /// The host's IPv4 address on the bridge (router, DNS server).
    pub host_v4: Cidr,
    /// The host's IPv6 addresses on the bridge (named in DNS too).
    pub host_v6: Vec<Cidr>,
    pub range: Range,
    pub lease_file: PathBuf,
    pub pid_file: PathBuf,
    /// Where dnsmasq's own log (its stderr) goes, new at each start.
    pub log_file: PathBuf,
}

/// The command line (after the program) for `config`.
pub fn args(config: &Config) -> Vec<OsString> {
    let host_bits = 32 - u32::from(config.host_v4.prefix.min(32));
    let netmask = Ipv4Addr::from(u32::MAX.checked_shl(host_bits).unwrap_or(0));
    let mut host_record = format!("--host-record={},{}", host_name(), config.host_v4.addr);
    for a in &config.host_v6 {
        host_record.push_str(&format!(",{}", a.addr));
    }
    let mut out: Vec<OsString> = vec![
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-hosts".into(),
        "--log-facility=-".into(),
    ];
    let mut file = |flag: &str, p: &PathBuf| {
        let mut s = OsString::from(flag);
        s.push(p);
        out.push(s);
    };
    file("--pid-file=", &config.pid_file);
    file("--dhcp-leasefile=", &config.lease_file);
    out.extend(
        [
            format!("--interface={}", config.bridge),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            format!(
                "--dhcp-range={},{},{netmask},1h",
                config.range.start, config.range.end
            ),
            "--dhcp-authoritative".into(),
            format!("--domain={DOMAIN}"),
            format!("--local=/{DOMAIN}/"),
            "--expand-hosts".into(),
            host_record,
        ]
        .map(OsString::from),
    );
    out
}

/// One line of a dnsmasq lease file (IPv4 leases; DHCPv6 ones are skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Seconds since the epoch when it ends; `None` for an infinite lease.
    pub expires: Option<u64>,
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub ip: Ipv4Addr,
    /// The name the guest sent, if any.
    pub hostname: Option<String>,
}

/// The IPv4 leases in a dnsmasq lease file's text (`EXPIRY MAC IP NAME CLIENT-ID`
/// per line; `*` for no name). Lines it cannot read are skipped.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[0] == "duid" {
            continue;
        }
        let (Ok(expiry), Ok(ip)) = (f[0].parse::<u64>(), f[2].parse::<Ipv4Addr>()) else {
            continue;
        };
        out.push(Lease {
            expires: (expiry != 0).then_some(expiry),
            mac: f[1].to_ascii_lowercase(),
            ip,
            hostname: (f[3] != "*").then(|| f[3].to_string()),
        });
    }
    out
}

/// Finds dnsmasq (`VIRIDIAN_DNSMASQ` overrides where).
pub fn locate() -> Result<PathBuf, crate::nat::NatError> {
    crate::nat::find_program("dnsmasq", "dnsmasq-base", "VIRIDIAN_DNSMASQ")
}

struct Shared {
    stop: AtomicBool,
    pid: AtomicU32,
    restarts: AtomicU32,
    child: Mutex<Option<Child>>,
    /// Why the last restart failed, until one succeeds.
    last_error: Mutex<Option<String>>,
}

/// A running dnsmasq and the thread that keeps it running.
pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub config: Config,
}

fn spawn(binary: &PathBuf, config: &Config) -> Result<Child, DhcpError> {
    let _ = std::fs::remove_file(&config.pid_file);
    let log = std::fs::File::create(&config.log_file).map_err(|source| DhcpError::Spawn {
        binary: binary.display().to_string(),
        source,
    })?;
    let mut command = Command::new(binary);
    command
        .args(args(config))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a signal to the service's group is not for it.
        .process_group(0);
    // SAFETY: prctl(2) with integer arguments only, between fork and exec; it
    // touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            // dnsmasq dies with the supervising thread (and so with the service):
            // nothing of ours outlives the service; the next start makes it again.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().map_err(|source| DhcpError::Spawn {
        binary: binary.display().to_string(),
        source,
    })
}

fn log_tail(config: &Config) -> String {
    let text = std::fs::read_to_string(&config.log_file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Waits until the child wrote its pid file (it is serving) or exited.
fn wait_ready(child: &mut Child, config: &Config) -> Result<(), DhcpError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DhcpError::Exited {
                bridge: config.bridge.clone(),
                status: status.to_string(),
                log: log_tail(config),
            });
        }
        let written = std::fs::read_to_string(&config.pid_file)
            .is_ok_and(|t| t.trim().parse::<u32>().is_ok());
        if written {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(DhcpError::NotReady {
                bridge: config.bridge.clone(),
                pid_file: config.pid_file.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Supervisor {
    /// Starts dnsmasq for `config` and returns once it serves (or why it does
    /// not); from then on a thread restarts it whenever it dies (after 1 s, then
    /// twice as long each time up to 30 s; back to 1 s after a minute of running).
    pub fn start(binary: PathBuf, config: Config) -> Result<Supervisor, DhcpError> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            pid: AtomicU32::new(0),
            restarts: AtomicU32::new(0),
            child: Mutex::new(None),
            last_error: Mutex::new(None),
        });
        let (s, c) = (shared.clone(), config.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // The thread spawns every dnsmasq itself: the parent-death signal is tied
        // to the thread that forked, so it must be the one that lives as long.
        let thread = std::thread::Builder::new()
            .name(format!("dnsmasq {}", config.bridge))
            .spawn(move || {
                let first = spawn(&binary, &c).and_then(|mut child| {
                    wait_ready(&mut child, &c)?;
                    Ok(child)
                });
                match first {
                    Ok(child) => {
                        s.pid.store(child.id(), Ordering::Relaxed);
                        *s.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
                        let _ = ready_tx.send(Ok(()));
                        watch(&binary, &c, &s);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| DhcpError::Spawn {
                binary: "a supervising thread".into(),
                source,
            })?;
        let ready = ready_rx.recv().unwrap_or_else(|_| {
            Err(DhcpError::NotReady {
                bridge: config.bridge.clone(),
                pid_file: config.pid_file.display().to_string(),
            })
        });
        if let Err(e) = ready {
            let _ = thread.join();
            return Err(e);
        }
        tracing::info!(bridge = %config.bridge, pid = shared.pid.load(Ordering::Relaxed), range = %config.range, "DHCP and DNS server (dnsmasq) started");
        Ok(Supervisor {
            shared,
            thread: Some(thread),
            config,
        })
    }

    /// The pid of the dnsmasq running now (0 while it is being restarted).
    pub fn pid(&self) -> u32 {
        self.shared.pid.load(Ordering::Relaxed)
    }

    /// How many times it was restarted after dying.
    pub fn restarts(&self) -> u32 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// Why the last try to restart it failed, while it is not running.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops dnsmasq (SIGTERM, then SIGKILL after 2 s) and its supervision.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.config.pid_file);
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.halt();
    }
}

fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped (so the pid is its).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The supervising thread: watches the child, restarts it with back-off, and
/// stops it when asked.
fn watch(binary: &PathBuf, config: &Config, shared: &Shared) {
    let mut pause = Duration::from_secs(1);
    let mut started = Instant::now();
    let lock = || shared.child.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            if let Some(mut c) = lock().take() {
                terminate(&mut c);
            }
            shared.pid.store(0, Ordering::Relaxed);
            tracing::info!(bridge = %config.bridge, "DHCP and DNS server (dnsmasq) stopped");
            return;
        }
        let exited = lock()
            .as_mut()
            .map(|c| c.try_wait().ok().flatten().map(|s| s.to_string()));
        let dead = match exited {
            Some(Some(status)) => Some(status),
            Some(None) => None,
            None => Some("not running".to_string()),
        };
        let Some(status) = dead else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        lock().take();
        shared.pid.store(0, Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(60) {
            pause = Duration::from_secs(1);
        }
        tracing::warn!(bridge = %config.bridge, %status, log = %log_tail(config), "the DHCP and DNS server (dnsmasq) died; restarting it in {} s", pause.as_secs());
        let until = Instant::now() + pause;
        while Instant::now() < until && !shared.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if shared.stop.load(Ordering::SeqCst) {
            continue;
        }
        pause = (pause * 2).min(Duration::from_secs(30));
        started = Instant::now();
        match spawn(binary, config).and_then(|mut c| wait_ready(&mut c, config).map(|()| c)) {
            Ok(c) => {
                shared.pid.store(c.id(), Ordering::Relaxed);
                shared.restarts.fetch_add(1, Ordering::Relaxed);
                *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(bridge = %config.bridge, pid = c.id(), "DHCP and DNS server (dnsmasq) restarted");
                *lock() = Some(c);
            }
            Err(e) => {
                tracing::error!(bridge = %config.bridge, "cannot restart dnsmasq: {e}");
                *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn the_range_is_the_larger_side_of_the_host_address() {
        assert_eq!(
            default_range(&c("10.55.0.1/24")).unwrap().to_string(),
            "10.55.0.2-10.55.0.254"
        );
        assert_eq!(
            default_range(&c("10.55.0.254/24")).unwrap().to_string(),
            "10.55.0.1-10.55.0.253"
        );
        assert_eq!(
            default_range(&c("192.168.9.1/30")).unwrap().to_string(),
            "192.168.9.2-192.168.9.2"
        );
        assert!(matches!(
            default_range(&c("10.0.0.1/31")),
            Err(DhcpError::TooSmall(_))
        ));
    }

    #[test]
    fn a_given_range_must_sit_in_the_subnet_beside_the_host() {
        let h = c("10.55.0.1/24");
        assert_eq!(
            parse_range("10.55.0.100-10.55.0.200", &h).unwrap(),
            Range {
                start: "10.55.0.100".parse().unwrap(),
                end: "10.55.0.200".parse().unwrap()
            }
        );
        for (bad, words) in [
            ("10.55.0.100", "is not a DHCP range"),
            ("10.55.0.x-10.55.0.9", "is not a DHCP range"),
            (
                "10.56.0.2-10.56.0.9",
                "not inside the switch's subnet 10.55.0.0/24",
            ),
            ("10.55.0.2-10.55.0.255", "not inside"),
            ("10.55.0.9-10.55.0.2", "starts after it ends"),
            ("10.55.0.1-10.55.0.9", "host's own address 10.55.0.1"),
        ] {
            let e = parse_range(bad, &h).unwrap_err().to_string();
            assert!(e.contains(words), "{bad}: {e}");
        }
    }

    #[test]
    fn the_command_line_binds_the_bridge_only_and_reads_no_host_config() {
        let cfg = Config {
            bridge: "vsw-1a2b3c4d".into(),
            host_v4: c("10.55.0.1/24"),
            host_v6: vec![c("fd00:55::1/64")],
            range: default_range(&c("10.55.0.1/24")).unwrap(),
            lease_file: "/d/switches/x.leases".into(),
            pid_file: "/d/switches/x.pid".into(),
            log_file: "/d/switches/x.log".into(),
        };
        let a: Vec<String> = args(&cfg)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        for want in [
            "--conf-file=/dev/null",
            "--interface=vsw-1a2b3c4d",
            "--bind-interfaces",
            "--except-interface=lo",
            "--dhcp-leasefile=/d/switches/x.leases",
            "--pid-file=/d/switches/x.pid",
            "--dhcp-range=10.55.0.2,10.55.0.254,255.255.255.0,1h",
            "--host-record=host.viridian.internal,10.55.0.1,fd00:55::1",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
    }

    #[test]
    fn lease_lines_are_read_and_odd_ones_skipped() {
        let text = "1765071234 52:54:00:AB:cd:01 10.55.0.37 guest1 01:52:54:00:ab:cd:01\n\
                    0 52:54:00:ab:cd:02 10.55.0.38 * *\n\
                    duid 00:01:00:01:2c:aa\n\
                    garbage\n";
        let l = parse_leases(text);
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!(l[0].mac, "52:54:00:ab:cd:01");
        assert_eq!(l[0].expires, Some(1_765_071_234));
        assert_eq!(l[0].hostname.as_deref(), Some("guest1"));
        assert_eq!(l[1].expires, None);
        assert_eq!(l[1].hostname, None);
    }
}
