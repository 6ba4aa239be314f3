//! The cgroup file formats Viridian reads and writes, as pure functions.
//!
//! | what | v2 file and format | v1 file and format |
//! |---|---|---|
//! | cap | `cpu.max`: `"QUOTA PERIOD"` or `"max PERIOD"` (µs) | `cpu.cfs_quota_us` (µs, `-1` for none), `cpu.cfs_period_us` |
//! | weight | `cpu.weight`: 1–10000, default 100 | `cpu.shares`: 2–262144, default 1024 |
//! | use | `cpu.stat`: line `usage_usec N` | `cpuacct.usage`: nanoseconds |

/// The CFS period Viridian uses: 100 ms, the kernel's default.
pub const PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts (1 ms).
pub const MIN_QUOTA_US: u64 = 1_000;

/// The quota for `count` virtual processors limited to `limit_percent` % of one
/// logical processor each, per `period_us`; `None` (no cap) at 100 %.
pub fn quota_us(count: u32, limit_percent: u8, period_us: u64) -> Option<u64> {
    if limit_percent >= 100 {
        return None;
    }
    let q = u64::from(count) * u64::from(limit_percent) * period_us / 100;
    Some(q.max(MIN_QUOTA_US))
}

/// v2 `cpu.max` contents.
pub fn cpu_max(quota_us: Option<u64>, period_us: u64) -> String {
    match quota_us {
        Some(q) => format!("{q} {period_us}"),
        None => format!("max {period_us}"),
    }
}

/// Parses v2 `cpu.max`: the quota (`None` for `max`) and the period.
pub fn parse_cpu_max(text: &str) -> Option<(Option<u64>, u64)> {
    let mut words = text.split_whitespace();
    let quota = match words.next()? {
        "max" => None,
        q => Some(q.parse().ok()?),
    };
    let period = words.next()?.parse().ok()?;
    Some((quota, period))
}

/// v1 `cpu.cfs_quota_us` contents (`-1`: no cap).
pub fn cfs_quota(quota_us: Option<u64>) -> String {
    match quota_us {
        Some(q) => q.to_string(),
        None => "-1".to_string(),
    }
}

/// Parses v1 `cpu.cfs_quota_us`.
pub fn parse_cfs_quota(text: &str) -> Option<Option<u64>> {
    let v: i64 = text.trim().parse().ok()?;
    Some(u64::try_from(v).ok())
}

/// v2 `cpu.weight`: Viridian's relative weight (1–10000, default 100) is the same scale.
pub fn cpu_weight(weight: u32) -> u32 {
    weight.clamp(1, 10_000)
}

/// v1 `cpu.shares`: weight 100 (the default) is 1024 shares (the default).
pub fn cpu_shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).clamp(2, 262_144)
}

/// The `usage_usec` line of v2 `cpu.stat`.
pub fn parse_usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == "usage_usec").then(|| v.trim().parse().ok()).flatten()
    })
}

/// A single number file (v1 `cpuacct.usage`, `cpu.shares`, ...).
pub fn parse_number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_count_times_percent_of_one_cpu_per_period() {
        assert_eq!(quota_us(1, 25, PERIOD_US), Some(25_000));
        assert_eq!(quota_us(4, 50, PERIOD_US), Some(200_000));
        assert_eq!(quota_us(2, 100, PERIOD_US), None);
        // 0 % is the kernel's minimum, not "no cap".
        assert_eq!(quota_us(1, 0, PERIOD_US), Some(MIN_QUOTA_US));
    }

    #[test]
    fn cpu_max_round_trips() {
        assert_eq!(cpu_max(Some(25_000), 100_000), "25000 100000");
        assert_eq!(cpu_max(None, 100_000), "max 100000");
        assert_eq!(
            parse_cpu_max("25000 100000\n"),
            Some((Some(25_000), 100_000))
        );
        assert_eq!(parse_cpu_max("max 100000\n"), Some((None, 100_000)));
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn v1_quota_uses_minus_one_for_no_cap() {
        assert_eq!(cfs_quota(None), "-1");
        assert_eq!(cfs_quota(Some(50_000)), "50000");
        assert_eq!(parse_cfs_quota("-1\n"), Some(None));
        assert_eq!(parse_cfs_quota("50000\n"), Some(Some(50_000)));
    }

    #[test]
    fn weight_maps_onto_both_scales_with_the_defaults_aligned() {
        assert_eq!(cpu_weight(100), 100);
        assert_eq!(cpu_weight(10_000), 10_000);
        assert_eq!(cpu_shares(100), 1024);
        assert_eq!(cpu_shares(300), 3072);
        assert_eq!(cpu_shares(1), 10);
        assert_eq!(cpu_shares(10_000), 102_400);
    }

    #[test]
    fn usage_is_read_from_cpu_stat() {
        let stat = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\nnr_periods 0\n";
        assert_eq!(parse_usage_usec(stat), Some(123_456));
        assert_eq!(parse_usage_usec("user_usec 5\n"), None);
    }
}
