//! The host's pool of dynamic MAC addresses (Hyper-V's `MacAddressMinimum` and
//! `MacAddressMaximum`): an adapter added without a MAC gets the next address of
//! the range. The default range is locally administered (`02:…`), its middle
//! three bytes taken from the host's machine id, so two hosts rarely share one.
//!
//! Addresses are handed out in order from a cursor kept in
//! `<data-dir>/mac-pool.json`, so none is given twice until the range is used up;
//! then the pool starts again from its minimum, skipping every address that a VM's
//! or a checkpoint's settings on this host still hold.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The pool's state file in the data dir.
pub const FILE: &str = "mac-pool.json";
const SCHEMA_VERSION: u32 = 1;

/// A MAC address as a 48-bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(u64);

impl Mac {
    /// Parses six hex bytes separated by `:` or `-` (either case).
    pub fn parse(s: &str) -> Option<Mac> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return None;
        }
        let mut v = 0u64;
        for p in parts {
            if p.len() != 2 {
                return None;
            }
            v = (v << 8) | u64::from(u8::from_str_radix(p, 16).ok()?);
        }
        Some(Mac(v))
    }

    /// A multicast address (the low bit of the first byte) cannot be an adapter's.
    pub fn is_multicast(self) -> bool {
        (self.0 >> 40) & 1 == 1
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0.to_be_bytes();
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[2], b[3], b[4], b[5], b[6], b[7]
        )
    }
}

/// The addresses the pool hands out, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacRange {
    pub minimum: Mac,
    pub maximum: Mac,
}

impl MacRange {
    /// `02:HH:HH:HH:00:00`–`02:HH:HH:HH:ff:ff`, `HH` three bytes of a hash of
    /// `host_key` (the machine id): 65,536 addresses.
    pub fn default_for(host_key: &[u8]) -> MacRange {
        // FNV-1a: stable across builds and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in host_key {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let base = (0x02u64 << 40) | ((h & 0xff_ffff) << 16);
        MacRange {
            minimum: Mac(base),
            maximum: Mac(base | 0xffff),
        }
    }

    /// The host's default range, from `/etc/machine-id` (or the host name).
    pub fn host_default() -> MacRange {
        let key = std::fs::read("/etc/machine-id")
            .ok()
            .filter(|k| !k.trim_ascii().is_empty())
            .or_else(|| std::fs::read("/proc/sys/kernel/hostname").ok())
            .unwrap_or_default();
        MacRange::default_for(key.trim_ascii())
    }

    /// Checks an administrator's range: unicast ends, minimum not above maximum.
    pub fn new(minimum: &str, maximum: &str) -> Result<MacRange, String> {
        let parse = |what: &str, s: &str| {
            let m = Mac::parse(s).ok_or_else(|| {
                format!("the MAC address pool's {what} {s:?} is not a MAC address; write six hex bytes separated by colons, e.g. 02:15:5d:00:00:00")
            })?;
            if m.is_multicast() {
                return Err(format!(
                    "the MAC address pool's {what} {s} is a multicast address; adapters need unicast ones (an even first byte)"
                ));
            }
            Ok(m)
        };
        let (minimum, maximum) = (parse("minimum", minimum)?, parse("maximum", maximum)?);
        if minimum > maximum {
            return Err(format!(
                "the MAC address pool's minimum {minimum} is above its maximum {maximum}"
            ));
        }
        if (minimum.0 >> 40) != (maximum.0 >> 40) {
            return Err(format!(
                "the MAC address pool {minimum}–{maximum} spans more than one first byte, so it would hold multicast addresses; keep the first byte the same"
            ));
        }
        Ok(MacRange { minimum, maximum })
    }

    fn len(&self) -> u64 {
        self.maximum.0 - self.minimum.0 + 1
    }

    pub fn contains(&self, m: Mac) -> bool {
        (self.minimum..=self.maximum).contains(&m)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PoolFile {
    schema_version: u32,
    /// The next address to hand out.
    next: String,
    /// Whether the range was used up once: then addresses still held are skipped.
    #[serde(default)]
    wrapped: bool,
}

/// The pool, shared by every request that adds an adapter.
pub struct MacPool {
    file: PathBuf,
    state: Mutex<State>,
}

struct State {
    range: MacRange,
    next: Mac,
    wrapped: bool,
}

impl MacPool {
    /// The pool of `range`, continuing from the cursor saved in `data_dir` when
    /// it lies in the range (a changed range starts at its minimum).
    pub fn open(data_dir: &Path, range: MacRange) -> MacPool {
        let file = data_dir.join(FILE);
        let saved = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<PoolFile>(&b).ok())
            .and_then(|f| Some((Mac::parse(&f.next)?, f.wrapped)))
            .filter(|(m, _)| range.contains(*m));
        let (next, wrapped) = saved.unwrap_or((range.minimum, false));
        MacPool {
            file,
            state: Mutex::new(State {
                range,
                next,
                wrapped,
            }),
        }
    }

    pub fn range(&self) -> MacRange {
        self.lock().range
    }

    /// Replaces the range; the next address is its minimum (or the saved cursor
    /// when the range is unchanged).
    pub fn set_range(&self, range: MacRange) -> Result<(), String> {
        let mut s = self.lock();
        if s.range == range {
            return Ok(());
        }
        let new = State {
            range,
            next: range.minimum,
            wrapped: false,
        };
        save(&self.file, &new)?;
        *s = new;
        Ok(())
    }

    /// The next free address. `held` gives the addresses this host's VMs and
    /// checkpoints hold; it is asked only once the range has been used up.
    pub fn allocate(&self, held: impl FnOnce() -> HashSet<Mac>) -> Result<String, String> {
        let mut s = self.lock();
        let range = s.range;
        let held = if s.wrapped { held() } else { HashSet::new() };
        let mut candidate = s.next;
        let mut wrapped = s.wrapped;
        for _ in 0..range.len() {
            let after = if candidate == range.maximum {
                wrapped = true;
                range.minimum
            } else {
                Mac(candidate.0 + 1)
            };
            if !held.contains(&candidate) {
                let new = State {
                    range,
                    next: after,
                    wrapped,
                };
                save(&self.file, &new)?;
                *s = new;
                return Ok(candidate.to_string());
            }
            candidate = after;
        }
        Err(format!(
            "every address of the MAC address pool {}–{} is held by a VM or checkpoint on this host; widen the pool (`viridian host set --mac-address-maximum ...`) or give the adapter a static MAC",
            range.minimum, range.maximum
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn save(file: &Path, s: &State) -> Result<(), String> {
    let f = PoolFile {
        schema_version: SCHEMA_VERSION,
        next: s.next.to_string(),
        wrapped: s.wrapped,
    };
    vm_config::file::write_json_atomic(file, &f)
        .map_err(|e| format!("cannot write {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_range_is_local_unicast_and_differs_between_hosts() {
        let a = MacRange::default_for(b"4c4c4544003910318034b4c04f4d4d32");
        let b = MacRange::default_for(b"0f1e2d3c4b5a69788796a5b4c3d2e1f0");
        assert_ne!(a, b);
        for r in [a, b] {
            assert_eq!(r.minimum.0 >> 40, 0x02, "{}", r.minimum);
            assert!(!r.minimum.is_multicast());
            assert_eq!(r.len(), 65_536);
            assert!(r.minimum.to_string().ends_with(":00:00"));
            assert!(r.maximum.to_string().ends_with(":ff:ff"));
        }
    }

    #[test]
    fn addresses_come_in_order_survive_a_restart_and_skip_held_ones_after_wrapping() {
        let dir = tempfile::tempdir().unwrap();
        let range = MacRange::new("02:00:00:00:00:fd", "02:00:00:00:00:ff").unwrap();
        let pool = MacPool::open(dir.path(), range);
        let none = HashSet::new;
        assert_eq!(pool.allocate(none).unwrap(), "02:00:00:00:00:fd");
        assert_eq!(pool.allocate(none).unwrap(), "02:00:00:00:00:fe");
        // A restart continues where the pool was.
        let pool = MacPool::open(dir.path(), range);
        assert_eq!(pool.allocate(none).unwrap(), "02:00:00:00:00:ff");
        // Used up: from the start again, past what is still held.
        let held = || HashSet::from([Mac::parse("02:00:00:00:00:fd").unwrap()]);
        assert_eq!(pool.allocate(held).unwrap(), "02:00:00:00:00:fe");
        let all = || {
            ["fd", "fe", "ff"]
                .iter()
                .map(|b| Mac::parse(&format!("02:00:00:00:00:{b}")).unwrap())
                .collect()
        };
        let err = pool.allocate(all).unwrap_err();
        assert!(err.contains("every address"), "{err}");
        // A new range starts at its minimum.
        pool.set_range(MacRange::new("02:aa:00:00:00:00", "02:aa:00:00:00:10").unwrap())
            .unwrap();
        assert_eq!(pool.allocate(none).unwrap(), "02:aa:00:00:00:00");
    }

    #[test]
    fn bad_ranges_are_refused_with_the_reason() {
        for (min, max, says) in [
            ("02:00:00:00:00:10", "02:00:00:00:00:01", "above"),
            ("03:00:00:00:00:00", "03:00:00:00:00:10", "multicast"),
            ("02:00:00:00:00", "02:00:00:00:00:10", "not a MAC"),
            ("02:ff:ff:ff:ff:ff", "04:00:00:00:00:00", "first byte"),
        ] {
            let e = MacRange::new(min, max).unwrap_err();
            assert!(e.contains(says), "{min}-{max}: {e}");
        }
        let m = Mac::parse("02-AB-cd-00-11-22").unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:11:22");
    }
}
