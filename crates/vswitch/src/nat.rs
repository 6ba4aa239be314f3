//! A NAT switch's masquerade and forwarding rules in nftables, and the host's
//! IPv4 forwarding switch. One table per switch, `ip viridian-nat-<8 hex>` (the
//! bridge's hex), so `nft list ruleset` shows what is ours and removing a switch's
//! rules is removing its table. nft is driven with `nft -f -` (a whole table in one
//! transaction) and read with `nft -j` (JSON), never by parsing its human output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Cidr;

/// What every table of ours is called before the switch's hex.
pub const TABLE_PREFIX: &str = "viridian-nat-";

/// Why a NAT switch's rules or the forwarding switch could not be set.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("{program} is not installed (looked in {looked}); install Debian's {package} package (`apt-get install {package}`)")]
    Missing {
        program: &'static str,
        package: &'static str,
        looked: String,
    },
    #[error("cannot run {program}")]
    Run {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft refused to {action}: {stderr}")]
    Nft { action: String, stderr: String },
    #[error("nft's JSON output cannot be read: {0}")]
    Json(String),
    #[error("cannot {action} {path} (IPv4 forwarding, a host-wide setting)")]
    Forwarding {
        action: &'static str,
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Finds `program`: the path in the environment variable `override_var` when set
/// (tests and unusual installs), else the first executable in `PATH`,
/// `/usr/sbin` or `/sbin` (root's programs are there even when `PATH` lacks them).
pub fn find_program(
    program: &'static str,
    package: &'static str,
    override_var: &str,
) -> Result<PathBuf, NatError> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(given) = std::env::var_os(override_var) {
        let p = PathBuf::from(given);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(NatError::Missing {
                program,
                package,
                looked: format!("{} (from {override_var})", p.display()),
            })
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.extend(["/usr/sbin".into(), "/sbin".into()]);
    dirs.iter()
        .map(|d| d.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| NatError::Missing {
            program,
            package,
            looked: "PATH, /usr/sbin and /sbin".into(),
        })
}

/// The table of the switch whose bridge is `bridge` (`vsw-1a2b3c4d` ->
/// `viridian-nat-1a2b3c4d`).
pub fn table_name(bridge: &str) -> String {
    let hex = bridge.strip_prefix("vsw-").unwrap_or(bridge);
    format!("{TABLE_PREFIX}{hex}")
}

/// The nft script that makes the switch's table exactly this, in one
/// transaction (the `table`/`delete table` pair removes any older version first,
/// and works whether it existed or not).
///
/// - postrouting: the subnet's packets to anywhere but the subnet leave with the
///   address of the interface they leave by (masquerade: the host's default
///   route for the internet);
/// - forward: what comes from the bridge is accepted, what goes to it only as
///   replies (established, related); anything else into the subnet is dropped,
///   as behind any NAT router.
pub fn ruleset(bridge: &str, subnet: &Cidr) -> String {
    let table = table_name(bridge);
    let net = subnet.network();
    format!(
        "table ip {table}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tcomment \"Viridian NAT switch on the bridge {bridge}\"\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {net} ip daddr != {net} oifname != \"{bridge}\" masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" accept\n\
         \t\toifname \"{bridge}\" ct state established,related accept\n\
         \t\toifname \"{bridge}\" drop\n\
         \t}}\n\
         }}\n"
    )
}

/// nft, found once.
#[derive(Debug, Clone)]
pub struct Nft {
    bin: PathBuf,
}

impl Nft {
    /// Finds nft (`VIRIDIAN_NFT` overrides where).
    pub fn locate() -> Result<Nft, NatError> {
        find_program("nft", "nftables", "VIRIDIAN_NFT").map(|bin| Nft { bin })
    }

    fn run(&self, args: &[&str], stdin: Option<&str>, action: &str) -> Result<String, NatError> {
        let run_error = |source| NatError::Run {
            program: self.bin.display().to_string(),
            source,
        };
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(run_error)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).map_err(run_error)?;
        }
        let out = child.wait_with_output().map_err(run_error)?;
        if !out.status.success() {
            return Err(NatError::Nft {
                action: action.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes the switch's table what [`ruleset`] says (replacing an older one).
    pub fn apply(&self, bridge: &str, subnet: &Cidr) -> Result<(), NatError> {
        self.run(
            &["-f", "-"],
            Some(&ruleset(bridge, subnet)),
            &format!("set the NAT rules of {bridge}"),
        )
        .map(drop)
    }

    /// Removes the switch's table; one that is not there is fine.
    pub fn remove(&self, bridge: &str) -> Result<(), NatError> {
        let table = table_name(bridge);
        self.run(
            &["-f", "-"],
            Some(&format!("table ip {table}\ndelete table ip {table}\n")),
            &format!("remove the table {table}"),
        )
        .map(drop)
    }

    /// Runs an nft script in one transaction (for the other tables of ours).
    pub fn run_script(&self, script: &str, action: &str) -> Result<(), NatError> {
        self.run(&["-f", "-"], Some(script), action).map(drop)
    }

    /// `nft -j list tables FAMILY`.
    pub fn list_tables_json(&self, family: &str) -> Result<String, NatError> {
        self.run(&["-j", "list", "tables", family], None, "list the tables")
    }

    /// The names of our tables (`viridian-nat-...`) in the `ip` family.
    pub fn tables(&self) -> Result<Vec<String>, NatError> {
        let out = self.run(&["-j", "list", "tables", "ip"], None, "list the tables")?;
        our_tables(&out)
    }
}

/// Our tables' names in the JSON of `nft -j list tables`.
pub fn our_tables(json: &str) -> Result<Vec<String>, NatError> {
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| NatError::Json(e.to_string()))?;
    let items = doc["nftables"]
        .as_array()
        .ok_or_else(|| NatError::Json("no `nftables` array".into()))?;
    Ok(items
        .iter()
        .filter_map(|i| i.get("table"))
        .filter(|t| t["family"] == "ip")
        .filter_map(|t| t["name"].as_str())
        .filter(|n| n.starts_with(TABLE_PREFIX))
        .map(str::to_string)
        .collect())
}

const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Whether the host forwards IPv4 (`net.ipv4.ip_forward`, one switch for the
/// whole host, or for the network namespace the service runs in).
pub fn ip_forward() -> Result<bool, NatError> {
    std::fs::read_to_string(FORWARD)
        .map(|t| t.trim() != "0")
        .map_err(|source| NatError::Forwarding {
            action: "read",
            path: FORWARD,
            source,
        })
}

/// Turns IPv4 forwarding on or off for the whole host.
pub fn set_ip_forward(on: bool) -> Result<(), NatError> {
    std::fs::write(FORWARD, if on { "1\n" } else { "0\n" }).map_err(|source| NatError::Forwarding {
        action: "write",
        path: FORWARD,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_per_switch_masquerades_its_subnet_only() {
        let c: Cidr = "10.55.0.1/24".parse().unwrap();
        let text = ruleset("vsw-1a2b3c4d", &c);
        assert!(text.starts_with(
            "table ip viridian-nat-1a2b3c4d\ndelete table ip viridian-nat-1a2b3c4d\n"
        ));
        assert!(
            text.contains("ip saddr 10.55.0.0/24 ip daddr != 10.55.0.0/24 oifname != \"vsw-1a2b3c4d\" masquerade"),
            "{text}"
        );
        assert!(text.contains("iifname \"vsw-1a2b3c4d\" accept"), "{text}");
        assert!(
            text.contains("oifname \"vsw-1a2b3c4d\" ct state established,related accept"),
            "{text}"
        );
    }

    #[test]
    fn only_our_tables_are_listed() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "viridian-nat-1a2b3c4d", "handle": 1}},
            {"table": {"family": "ip", "name": "filter", "handle": 2}},
            {"table": {"family": "ip6", "name": "viridian-nat-00000000", "handle": 3}}]}"#;
        assert_eq!(our_tables(json).unwrap(), ["viridian-nat-1a2b3c4d"]);
        assert!(our_tables("not json").is_err());
    }

    #[test]
    fn a_missing_program_names_its_package() {
        std::env::set_var("VIRIDIAN_TEST_NO_SUCH", "/nonexistent/nft");
        let e = find_program("nft", "nftables", "VIRIDIAN_TEST_NO_SUCH").unwrap_err();
        assert!(e.to_string().contains("apt-get install nftables"), "{e}");
    }
}
