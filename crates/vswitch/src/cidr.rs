//! An address with its prefix length (`10.44.0.1/24`, `fd00:44::1/64`): what an
//! internal switch's host interface carries. Pure, no kernel involved.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A host address on a subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Written as its text (`192.0.2.1/24`), as settings files hold it.
impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a text is not an address with a prefix length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error(
        "`{0}` is not an address with a prefix length; write it like 10.44.0.1/24 or fd00:44::1/64"
    )]
    Syntax(String),
    #[error("`{text}` has prefix length {prefix}, more than {max} for an IPv{family} address")]
    PrefixTooLong {
        text: String,
        prefix: u32,
        max: u8,
        family: u8,
    },
    #[error("`{0}` is the subnet's network address (all host bits zero); give the host an address inside it, like its .1")]
    NetworkAddress(String),
    #[error("`{0}` is not a unicast address a host interface can carry (unspecified, loopback, multicast or broadcast)")]
    NotUnicast(String),
}

impl Cidr {
    /// The prefix length's upper bound for this address family.
    pub fn max_prefix(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    fn bits(&self) -> u128 {
        match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        }
    }

    fn mask(&self) -> u128 {
        let width = u32::from(self.max_prefix());
        let host_bits = width - u32::from(self.prefix);
        let all = if width == 128 {
            u128::MAX
        } else {
            (1u128 << width) - 1
        };
        if host_bits >= 128 {
            0
        } else {
            all & !((1u128 << host_bits) - 1) & all
        }
    }

    /// Whether the two subnets share an address (same family, one contains the other).
    pub fn overlaps(&self, other: &Cidr) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let prefix = self.prefix.min(other.prefix);
        let shorter = Cidr {
            addr: self.addr,
            prefix,
        };
        let m = shorter.mask();
        self.bits() & m == other.bits() & m
    }

    /// The subnet written with host bits zero (`10.44.0.0/24`).
    pub fn network(&self) -> String {
        let n = self.bits() & self.mask();
        let addr: IpAddr = match self.addr {
            // The value came from a u32.
            IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(n.into()),
        };
        format!("{addr}/{}", self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax(text.to_string());
        let (addr, prefix) = text.split_once('/').ok_or_else(syntax)?;
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 3 {
            return Err(syntax());
        }
        let prefix: u32 = prefix.parse().map_err(|_| syntax())?;
        let (max, family) = match addr {
            IpAddr::V4(_) => (32u8, 4u8),
            IpAddr::V6(_) => (128, 6),
        };
        if prefix > u32::from(max) {
            return Err(CidrError::PrefixTooLong {
                text: text.to_string(),
                prefix,
                max,
                family,
            });
        }
        let unicast = match addr {
            IpAddr::V4(a) => {
                !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
            }
            IpAddr::V6(a) => !(a.is_unspecified() || a.is_loopback() || a.is_multicast()),
        };
        if !unicast {
            return Err(CidrError::NotUnicast(text.to_string()));
        }
        // The value was checked against `max` (at most 128).
        let cidr = Cidr {
            addr,
            prefix: prefix as u8,
        };
        // A /31, /32, /127 or /128 has no network address to avoid.
        if u32::from(max) - prefix >= 2 && cidr.bits() & !cidr.mask() == 0 {
            return Err(CidrError::NetworkAddress(text.to_string()));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_both_families() {
        assert_eq!(c("10.44.0.1/24").to_string(), "10.44.0.1/24");
        assert_eq!(c("fd00:44::1/64").to_string(), "fd00:44::1/64");
        assert_eq!(c("10.44.0.1/24").network(), "10.44.0.0/24");
        assert_eq!(c("fd00:44::1/64").network(), "fd00:44::/64");
        assert_eq!(c("192.168.7.9/32").network(), "192.168.7.9/32");
    }

    #[test]
    fn refuses_what_is_not_a_host_address() {
        for bad in [
            "10.44.0.1",
            "10.44.0.1/",
            "10.44.0.1/x",
            "10.44.0/24",
            "/24",
            "10.44.0.1/+4",
            "10.44.0.1/0024",
        ] {
            assert_eq!(
                bad.parse::<Cidr>(),
                Err(CidrError::Syntax(bad.into())),
                "{bad}"
            );
        }
        assert!(matches!(
            "10.0.0.1/33".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong { prefix: 33, .. })
        ));
        assert!(matches!(
            "fd00::1/129".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong { max: 128, .. })
        ));
        assert!(matches!(
            "10.44.0.0/24".parse::<Cidr>(),
            Err(CidrError::NetworkAddress(_))
        ));
        assert!(matches!(
            "fd00:44::/64".parse::<Cidr>(),
            Err(CidrError::NetworkAddress(_))
        ));
        assert!(matches!(
            "127.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::NotUnicast(_))
        ));
        assert!(matches!(
            "224.0.0.1/4".parse::<Cidr>(),
            Err(CidrError::NotUnicast(_))
        ));
        assert!(matches!(
            "::/0".parse::<Cidr>(),
            Err(CidrError::NotUnicast(_))
        ));
    }

    #[test]
    fn overlap_is_containment_within_one_family() {
        assert!(c("10.44.0.1/24").overlaps(&c("10.44.0.200/24")));
        assert!(c("10.44.0.1/24").overlaps(&c("10.44.1.1/16")));
        assert!(c("10.44.1.1/16").overlaps(&c("10.44.0.1/24")));
        assert!(!c("10.44.0.1/24").overlaps(&c("10.44.1.1/24")));
        assert!(!c("10.44.0.1/24").overlaps(&c("fd00:44::1/64")));
        assert!(c("fd00:44::1/64").overlaps(&c("fd00:44::2/48")));
        assert!(!c("fd00:44::1/64").overlaps(&c("fd00:45::1/64")));
        assert!(c("10.0.0.1/1").overlaps(&c("100.0.0.1/8")));
        assert!(!c("10.0.0.1/1").overlaps(&c("200.0.0.1/8")));
    }
}
