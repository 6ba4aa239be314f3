//! The file-descriptor budget: `RLIMIT_NOFILE` raised to its hard limit at start, and
//! connection caps derived from it so the service never runs out of descriptors.

/// Descriptors kept apart from connections at the least: disk files of jobs, sockets
/// to workers, the listeners, logs.
const MIN_HEADROOM: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force
/// afterwards (the old one when raising failed, with a warning in the log).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot read the file-descriptor limit; assuming 1024"
        );
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from a struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                soft = lim.rlim_cur,
                hard = lim.rlim_max,
                "cannot raise the file-descriptor limit to its hard limit"
            );
        }
    }
    lim.rlim_cur
}

/// How many connections may be open at once, on each listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// TCP connections from all clients together.
    pub tcp_total: u32,
    /// TCP connections from one client address.
    pub tcp_per_client: u32,
    /// Unix socket connections: a budget of their own that TCP cannot use up.
    pub unix: u32,
}

/// Connection caps from the configured ones and a descriptor limit `nofile`: at
/// least a quarter of the descriptors (and never fewer than 256) stay for
/// everything that is not a connection; of the rest, the unix socket keeps up to a
/// quarter for itself and TCP gets what remains.
pub fn connection_caps(configured: ConnectionCaps, nofile: u64) -> ConnectionCaps {
    let headroom = (nofile / 4).max(MIN_HEADROOM);
    let for_connections = nofile.saturating_sub(headroom).max(2);
    let fit = |n: u64| u32::try_from(n).unwrap_or(u32::MAX).max(1);
    let unix = configured.unix.min(fit(for_connections / 4));
    let tcp_total = configured
        .tcp_total
        .min(fit(for_connections - u64::from(unix)));
    ConnectionCaps {
        tcp_total,
        tcp_per_client: configured.tcp_per_client.min(tcp_total),
        unix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: ConnectionCaps = ConnectionCaps {
        tcp_total: 1024,
        tcp_per_client: 64,
        unix: 256,
    };

    #[test]
    fn the_usual_1024_descriptors_hold_fewer_connections_than_asked() {
        let caps = connection_caps(WANTED, 1024);
        assert_eq!(caps.unix, 192);
        assert_eq!(caps.tcp_total, 576);
        assert_eq!(caps.tcp_per_client, 64);
        assert!(u64::from(caps.unix + caps.tcp_total) + 256 <= 1024);
    }

    #[test]
    fn a_large_limit_keeps_the_configured_caps() {
        assert_eq!(connection_caps(WANTED, 1 << 20), WANTED);
    }

    #[test]
    fn a_tiny_limit_still_allows_one_connection_each() {
        let caps = connection_caps(WANTED, 16);
        assert_eq!((caps.tcp_total, caps.tcp_per_client, caps.unix), (1, 1, 1));
    }
}
