//! Names of the links Viridian makes. Every one starts with [`PREFIX`], so a
//! cleanup (or an admin's `ip link`) can tell them from the host's own.

/// What every Viridian link's name starts with.
pub const PREFIX: &str = "vsw";

/// Linux interface names are at most 15 bytes (IFNAMSIZ less the NUL).
pub const MAX_NAME_BYTES: usize = 15;

/// A switch's bridge: `vsw-` and the first 8 hex digits of the switch's id
/// (`vsw-1a2b3c4d`). The daemon keeps these unique among its switches.
pub fn bridge_name(switch_id: u128) -> String {
    format!("{PREFIX}-{:08x}", switch_id >> 96)
}

/// An adapter's tap: `vswt-` and 10 hex digits of a key the caller derives from
/// what the port belongs to (`vswt-0123456789`).
pub fn tap_name(key: u64) -> String {
    format!("{PREFIX}t-{:010x}", key & 0xff_ffff_ffff)
}

/// A switch's bridge for one VLAN, where kernels without bridge VLAN filtering
/// put its access ports: `vswv`, the switch's 8 hex digits (as its bridge's) and
/// the VLAN id in 3 hex digits (`vswv1a2b3c4d00a` is VLAN 10 of `vsw-1a2b3c4d`).
pub fn vlan_bridge_name(switch_id: u128, vlan: u16) -> String {
    format!("{PREFIX}v{:08x}{:03x}", switch_id >> 96, vlan & 0xfff)
}

/// The VLAN of a name [`vlan_bridge_name`] gave the switch `switch_id`'s bridge.
pub fn vlan_of_bridge(switch_id: u128, name: &str) -> Option<u16> {
    let rest = name.strip_prefix(&format!("{PREFIX}v{:08x}", switch_id >> 96))?;
    (rest.len() == 3)
        .then(|| u16::from_str_radix(rest, 16).ok())
        .flatten()
}

/// Whether a link's name is one of ours.
pub fn is_ours(name: &str) -> bool {
    name.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_carry_the_prefix() {
        let b = bridge_name(0x1a2b_3c4d_0000_4000_8000_0000_0000_00ff_u128);
        assert_eq!(b, "vsw-1a2b3c4d");
        let t = tap_name(u64::MAX);
        assert_eq!(t, "vswt-ffffffffff");
        for n in [&b, &t] {
            assert!(n.len() <= MAX_NAME_BYTES, "{n}");
            assert!(is_ours(n));
        }
        let v = vlan_bridge_name(0x1a2b_3c4d_0000_4000_8000_0000_0000_00ff_u128, 4094);
        assert_eq!(v, "vswv1a2b3c4dffe");
        assert!(v.len() <= MAX_NAME_BYTES && is_ours(&v));
        assert_eq!(vlan_of_bridge(0x1a2b_3c4d_u128 << 96, &v), Some(4094));
        assert_eq!(vlan_of_bridge(0x1a2b_3c4e_u128 << 96, &v), None);
        assert_eq!(vlan_of_bridge(0x1a2b_3c4d_u128 << 96, &b), None);
        assert!(!is_ours("eth0"));
        assert!(!is_ours("virbr0"));
    }
}
